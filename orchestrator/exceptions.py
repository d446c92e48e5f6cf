"""The one error hierarchy of BuildSmartDB.

Every error the orchestrator raises on purpose is a :class:`BuildSmartError`. Lower layers
(psycopg, subprocess, OS) are converted at module boundaries with ``raise ... from exc`` so the
CLI can print one clear sentence and exit with a stable code.
"""

from __future__ import annotations

from dataclasses import dataclass


class BuildSmartError(Exception):
    """Root of all BuildSmartDB errors. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class ConfigError(BuildSmartError):
    """A spec file, option or on-disk topology is missing, malformed or inconsistent."""

    exit_code = 2


class NodeError(BuildSmartError):
    """A server could not be started, stopped, reached or set up."""

    exit_code = 3


class ClusterStateError(BuildSmartError):
    """The cluster is not in a state that allows the requested operation."""

    exit_code = 4


@dataclass(frozen=True)
class InputLocation:
    """Where in an input file a fault is: 1-based line and column (column 0 = whole line)."""

    path: str
    line: int
    column: int = 0

    def __str__(self) -> str:
        if self.column:
            return f"{self.path}:{self.line}:{self.column}"
        return f"{self.path}:{self.line}"


class InputError(BuildSmartError):
    """Bad input data: names the file, line and column and the reason."""

    exit_code = 5

    def __init__(self, location: InputLocation, reason: str) -> None:
        super().__init__(f"{location}: {reason}")
        self.location = location
        self.reason = reason


class UnreadableInput(InputError):
    """The input stopped being readable after some lines (corrupt gzip data, an I/O error)."""


class RejectsUnwritable(ConfigError):
    """The --rejects file cannot be created or written."""

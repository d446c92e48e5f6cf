"""The typer application, shared options and the error boundary of the CLI."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import psycopg
import typer
from rich.console import Console
from rich.markup import escape

from orchestrator import logfiles
from orchestrator.exceptions import BuildSmartError, NodeError

app = typer.Typer(
    name="buildsmart",
    help="BuildSmartDB: energy readings of many buildings on a cluster of PostgreSQL servers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

DEFAULT_DIR = Path(os.environ.get("BUILDSMART_DIR", ".buildsmart"))
DirOpt = Annotated[
    Path, typer.Option("--dir", help="Cluster directory: topology, credentials (0600), logs, data.", show_default=True)
]
LOG_FILE = "buildsmart.log"


def setup_logging(directory: Path | None, verbose: bool = False) -> None:
    """INFO and up to DIR/buildsmart.log (every state change), warnings (or all with -v) to stderr."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(logging.INFO if verbose else logging.WARNING)
    stderr.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(stderr)
    if directory is not None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fh = logfiles.private_handler(directory / LOG_FILE)
        except OSError:
            return
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)


def report(message: str) -> None:
    console.print(message)


def main() -> None:
    """Entry point: converts BuildSmartError into one clear line and its exit code."""
    try:
        # With standalone_mode=False click returns the code of `raise typer.Exit(n)` instead of exiting.
        code = app(standalone_mode=False)
    except BuildSmartError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}")
        sys.exit(exc.exit_code)
    except psycopg.Error as exc:
        # A database error no command turned into a BuildSmartError: one line, the server's
        # message and SQLSTATE, no traceback (the log file has the details).
        logging.getLogger(__name__).debug("unhandled database error", exc_info=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        state = f" (SQLSTATE {exc.sqlstate})" if exc.sqlstate else ""
        console.print(
            f"[bold red]error:[/] database error{state}: {escape(first)}\n"
            "the command stopped here; what it committed before stays committed (details in the cluster's "
            f"{LOG_FILE}); run it again once the cause is fixed"
        )
        sys.exit(NodeError.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:
        # Usage errors arrive as a ClickException (typer >= 0.16 vendors click as typer._click);
        # `raise typer.Exit(n)` inside a callback as an Exit.
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()  # type: ignore[attr-defined]
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        if type(exc).__name__ == "Exit" and isinstance(getattr(exc, "exit_code", None), int):
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        raise
    sys.exit(code if isinstance(code, int) else 0)

"""Log files the orchestrator creates (as root, for processes it starts): mode 0600.

Why: these logs may hold SQL statements, connection errors and Patroni's view of the servers;
created with the default umask they were 0644, readable by every local user. One opener, so every
log gets the same mode, and an existing log of an older release is narrowed on its next open.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import BinaryIO

MODE = 0o600


def open_private(path: Path) -> BinaryIO:
    """Open ``path`` for appending (binary), creating it with mode 0600 and narrowing an older one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, MODE)
    os.fchmod(fd, MODE)
    return os.fdopen(fd, "ab")


def private_handler(path: Path) -> logging.FileHandler:
    """A logging handler appending to ``path`` with mode 0600."""
    open_private(path).close()
    return logging.FileHandler(path)

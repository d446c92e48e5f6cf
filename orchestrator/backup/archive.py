"""The archive_command of every member the local runtime starts.

Why a file per member and not a fixed command: ``archive_mode`` needs a restart, so it is set
(``always``) when a member is created, while a repository may be configured (or changed) later.
Every member runs ``../archive-wal.sh %p %f`` (relative to PGDATA, the archiver's working
directory); the script reads ``archive.conf`` beside it. Without that file (no repository
configured, or a restored cluster that was not given one) a WAL file is acknowledged and not kept,
as PostgreSQL does with archiving off; with it, the file is copied to a spool directory, flushed
and renamed into Barman's incoming directory of the group (atomic: Barman never sees half a file).

Why ``always``: with ``on`` only the primary archives, and a segment it completed but had not
archived when it crashed would be missing after a failover (a standby marks what it receives as
archived). With ``always`` the synchronous standby archives the same segments; a file already in
incoming with the same bytes is acknowledged, Barman drops matching duplicates it already holds.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

SCRIPT = "archive-wal.sh"
CONF = "archive.conf"
# Relative to PGDATA (the archiver's cwd): the member's base directory holds the script.
ARCHIVE_COMMAND = f'../{SCRIPT} "%p" "%f"'
ARCHIVE_SETTINGS: dict[str, str] = {
    "archive_mode": "'always'",
    "archive_command": "'" + ARCHIVE_COMMAND.replace("'", "''") + "'",
}

_SCRIPT_TEXT = """#!/bin/sh
# written by buildsmart (orchestrator/backup/archive.py): archive_command of this member.
# $1 = %p (path relative to PGDATA), $2 = %f (file name). Exit 0 only when the file is safe.
set -eu
here=$(dirname "$0")
[ -f "$here/archive.conf" ] || exit 0   # no backup repository configured: WAL is not kept
. "$here/archive.conf"                  # INCOMING=..., SPOOL=...
dst="$INCOMING/$2"
if [ -f "$dst" ]; then
  cmp -s "$1" "$dst" && exit 0          # the other member of the group archived it already
  echo "archive-wal: $dst exists with other content" >&2
  exit 1
fi
tmp="$SPOOL/$2.$$"
cp "$1" "$tmp"
sync "$tmp"
mv "$tmp" "$dst"
sync "$INCOMING"
"""


def write_script(base: Path, uid: int | None = None, gid: int | None = None) -> None:
    """Install the script in a member's base directory (idempotent)."""
    base.mkdir(parents=True, exist_ok=True)
    path = base / SCRIPT
    if not path.exists() or path.read_text() != _SCRIPT_TEXT:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(_SCRIPT_TEXT)
        os.chmod(tmp, 0o755)
        if uid is not None and gid is not None:
            os.chown(tmp, uid, gid)
        os.replace(tmp, path)


def write_conf(base: Path, incoming: Path, spool: Path, uid: int | None = None, gid: int | None = None) -> bool:
    """Point a member's archiving at a repository's incoming directory. True when it changed."""
    text = f"INCOMING={shlex.quote(str(incoming))}\nSPOOL={shlex.quote(str(spool))}\n"
    path = base / CONF
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    if uid is not None and gid is not None:
        os.chown(tmp, uid, gid)
    os.replace(tmp, path)
    return True


def remove_conf(base: Path) -> None:
    (base / CONF).unlink(missing_ok=True)

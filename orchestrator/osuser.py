"""The unprivileged OS user that runs servers when the orchestrator runs as root.

PostgreSQL refuses to run as root, so as root we create (or reuse) a system user and run
initdb/pg_ctl as that user. As a normal user, servers simply run as that user.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from orchestrator.exceptions import NodeError

log = logging.getLogger(__name__)

DEFAULT_SERVICE_USER = "buildsmart"


@dataclass(frozen=True)
class ServiceUser:
    name: str
    uid: int
    gid: int

    @property
    def is_current(self) -> bool:
        return self.uid == os.geteuid()

    def chown(self, path: Path) -> None:
        """Give a path (recursively) to the service user; a no-op when we are that user.

        Never follows a symbolic link (root would otherwise hand any file a link points at, e.g.
        /etc/shadow planted under a data directory, to the service user): links themselves are
        changed, and the walk goes by directory file descriptors (``os.fwalk``), so a directory
        swapped for a link while we walk is not entered either."""
        if self.is_current:
            return
        os.chown(path, self.uid, self.gid, follow_symlinks=False)
        if path.is_symlink() or not path.is_dir():
            return
        for _root, dirs, files, dirfd in os.fwalk(path, follow_symlinks=False):
            for name in dirs + files:
                os.chown(name, self.uid, self.gid, dir_fd=dirfd, follow_symlinks=False)

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a child running as this user: ``base`` (default: ours) with the user's
        own HOME, USER and LOGNAME. Servers started by root must not inherit HOME=/root: libpq in a
        server process (postgres_fdw, subscriptions, Patroni) reads ~/.postgresql/ and fails on a
        directory it may not open."""
        env = dict(os.environ if base is None else base)
        if not self.is_current:
            env.update(HOME=pwd.getpwuid(self.uid).pw_dir, USER=self.name, LOGNAME=self.name)
        return env

    def can_traverse(self, path: Path) -> bool:
        """True when every ancestor of ``path`` is searchable by this user."""
        if self.is_current:
            return True
        probe = subprocess.run(["test", "-x", str(path)], user=self.uid, group=self.gid, check=False, capture_output=True)
        return probe.returncode == 0


def service_user(name: str | None = None) -> ServiceUser:
    """Who runs the servers: the current user, or (as root) an unprivileged system user."""
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        return ServiceUser(entry.pw_name, entry.pw_uid, entry.pw_gid)
    name = name or os.environ.get("BUILDSMART_SERVICE_USER", DEFAULT_SERVICE_USER)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        _create_system_user(name)
        entry = pwd.getpwnam(name)
    return ServiceUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _create_system_user(name: str) -> None:
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    cmd = [useradd, "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode not in (0, 9):  # 9: already exists (a concurrent creator won)
        raise NodeError(f"cannot create service user {name!r}: {result.stderr.strip()}")
    log.info("created service user %s to run the servers (PostgreSQL refuses root)", name)


def run_as(user: ServiceUser, cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a command as the service user, capturing output; raises NodeError with stderr on failure."""
    extra: dict[str, object] = {}
    if not user.is_current:
        env = kwargs.pop("env", None)
        extra = {"user": user.uid, "group": user.gid, "extra_groups": [], "env": user.environment(env)}  # type: ignore[arg-type]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, **extra, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise NodeError(f"{Path(cmd[0]).name} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return result

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
        """Give a path (recursively) to the service user; a no-op when we are that user."""
        if self.is_current:
            return
        for root, dirs, files in os.walk(path):
            os.chown(root, self.uid, self.gid)
            for name in dirs + files:
                os.lchown(os.path.join(root, name), self.uid, self.gid)

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
        extra = {"user": user.uid, "group": user.gid, "extra_groups": []}
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, **extra, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise NodeError(f"{Path(cmd[0]).name} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return result

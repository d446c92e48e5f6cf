"""Where the local runtime keeps each member's files: DIR/nodes/<member>/ (data, logs, pid files).

Its own module so that the supervisor, the runtimes and the CLI can all find member files without
importing ``orchestrator.cluster`` (which imports them: the old import circle)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from orchestrator.exceptions import ConfigError
from orchestrator.osuser import ServiceUser
from orchestrator.runtime.local import LocalMember
from orchestrator.topology import Group, Member, Topology

log = logging.getLogger(__name__)

FALLBACK_DATA_ROOT = Path("/var/lib/buildsmart")


def data_root(directory: Path, user: ServiceUser) -> Path:
    """Where member directories live: DIR/nodes, or (when the service user cannot reach DIR, e.g.
    under /root) a directory under /var/lib/buildsmart that DIR/nodes links to."""
    nodes = directory / "nodes"
    if nodes.is_symlink():
        return nodes.resolve()
    if user.can_traverse(directory):
        nodes.mkdir(parents=True, exist_ok=True)
        return nodes
    digest = hashlib.sha1(str(directory).encode()).hexdigest()[:12]
    target = FALLBACK_DATA_ROOT / digest
    target.mkdir(parents=True, exist_ok=True)
    FALLBACK_DATA_ROOT.chmod(0o755)
    if nodes.exists():
        raise ConfigError(f"{nodes} exists but the service user {user.name} cannot reach it; move DIR elsewhere")
    nodes.symlink_to(target)
    log.info("service user %s cannot reach %s; member data lives in %s (linked from %s)", user.name, directory, target, nodes)
    return target


def local_member(root: Path, member: Member) -> LocalMember:
    base = root / (member.data_dir or member.name)
    return LocalMember(member, base / "data", base / "postgres.log")


def local_members(directory: Path, topo: Topology, user: ServiceUser) -> list[tuple[Group, LocalMember]]:
    """Every member the local runtime runs (groups it manages), with its files."""
    root = data_root(directory, user)
    return [(group, local_member(root, m)) for group in topo.groups if group.managed for m in group.members]

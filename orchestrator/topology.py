"""The cluster as the orchestrator knows it: node groups, their members and credentials.

A *node* is always a replication group (primary + replicas): in the foundation a group has one
member; Patroni groups add more. Connection strings list every member with
``target_session_attrs=read-write`` so clients follow whichever member is primary.

On disk in DIR: ``topology.json`` (mode 0644) and ``credentials.json`` (mode 0600).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from orchestrator.exceptions import ConfigError

log = logging.getLogger(__name__)

TOPOLOGY_FILE = "topology.json"
CREDENTIALS_FILE = "credentials.json"
COORDINATOR = "coordinator"
WORKER = "worker"
# Where the servers run (orchestrator/runtime/base.py): plain pg_ctl servers or local Patroni groups
# started by `up`, hosts that run their own members (`buildsmart host up`), or servers someone else
# runs (`init --spec` without hosts). None: a topology written before this field existed.
RuntimeKind = Literal["plain", "patroni", "hosts", "external"]
RUNTIME_KINDS: tuple[RuntimeKind, ...] = ("plain", "patroni", "hosts", "external")


@dataclass(frozen=True)
class Member:
    """One PostgreSQL server of a group."""

    name: str
    host: str
    port: int
    data_dir: str | None = None  # set for servers the local runtime started (relative to DIR)


@dataclass(frozen=True)
class Group:
    """A node: a replication group with a role in the cluster."""

    name: str
    role: str
    members: tuple[Member, ...]
    dbname: str = "buildsmart"
    managed: bool = True  # started and stopped by the local runtime

    @property
    def hosts(self) -> str:
        return ",".join(m.host for m in self.members)

    @property
    def ports(self) -> str:
        return ",".join(str(m.port) for m in self.members)

    @property
    def address(self) -> str:
        return ",".join(f"{m.host}:{m.port}" for m in self.members)


def _token() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class Credentials:
    """Roles and passwords of a cluster (what each role may do: orchestrator/roles.py)."""

    superuser: str
    superuser_password: str
    app_user: str
    app_password: str
    ingest_user: str = "buildsmart_ingest"  # the data path (IngestSession)
    ingest_password: str = field(default_factory=_token)
    fdw_user: str = "buildsmart_fdw"  # what the coordinator logs in to workers as
    fdw_password: str = field(default_factory=_token)
    # the cluster CA (runtime/tls.py) every connection verifies servers against, sslmode=verify-full;
    # None: a cluster made without TLS. The same path is valid on every host of the cluster.
    ca_file: str | None = None

    @staticmethod
    def generate(superuser: str = "buildsmart_admin", app_user: str = "buildsmart_app") -> Credentials:
        return Credentials(superuser, _token(), app_user, _token())


@dataclass(frozen=True)
class Layout:
    """Declarative fragmentation: building split points and the time-partition interval."""

    split_points: tuple[str, ...] = ()
    time_interval: str = "1 month"


@dataclass(frozen=True)
class Topology:
    cluster_name: str
    groups: tuple[Group, ...]
    layout: Layout = field(default_factory=Layout)
    service_user: str | None = None
    runtime: RuntimeKind | None = None

    @property
    def coordinator(self) -> Group:
        for group in self.groups:
            if group.role == COORDINATOR:
                return group
        raise ConfigError("topology has no coordinator group")

    @property
    def workers(self) -> tuple[Group, ...]:
        return tuple(g for g in self.groups if g.role == WORKER)

    def group(self, name: str) -> Group:
        for group in self.groups:
            if group.name == name:
                return group
        raise ConfigError(f"no node named {name!r} (known: {', '.join(g.name for g in self.groups)})")

    def with_group(self, group: Group) -> Topology:
        others = tuple(g for g in self.groups if g.name != group.name)
        return replace(self, groups=(*others, group))


def _topology_from_dict(data: dict[str, Any]) -> Topology:
    groups = tuple(
        Group(
            name=g["name"],
            role=g["role"],
            members=tuple(Member(**m) for m in g["members"]),
            dbname=g.get("dbname", "buildsmart"),
            managed=g.get("managed", True),
        )
        for g in data["groups"]
    )
    layout_data = data.get("layout", {})
    layout = Layout(tuple(layout_data.get("split_points", ())), layout_data.get("time_interval", "1 month"))
    runtime = data.get("runtime")
    if runtime is not None and runtime not in RUNTIME_KINDS:
        raise ConfigError(f"unknown runtime {runtime!r} (known: {', '.join(RUNTIME_KINDS)})")
    return Topology(data["cluster_name"], groups, layout, data.get("service_user"), runtime)


def load(directory: Path) -> Topology:
    path = directory / TOPOLOGY_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"no cluster in {directory} ({TOPOLOGY_FILE} missing): run `buildsmart up` first") from exc
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a valid topology: {exc}") from exc
    return _topology_from_dict(data)


def exists(directory: Path) -> bool:
    return (directory / TOPOLOGY_FILE).exists()


def save(directory: Path, topology: Topology) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / TOPOLOGY_FILE, json.dumps(asdict(topology), indent=2) + "\n", 0o644)
    log.info("saved topology of cluster %s (%d nodes) to %s", topology.cluster_name, len(topology.groups), directory)


def load_credentials(directory: Path) -> Credentials:
    path = directory / CREDENTIALS_FILE
    try:
        data = json.loads(path.read_text())
        creds = Credentials(**data)
    except FileNotFoundError as exc:
        raise ConfigError(f"no credentials in {directory} ({CREDENTIALS_FILE} missing)") from exc
    except (json.JSONDecodeError, TypeError) as exc:
        raise ConfigError(f"{path} is not a valid credentials file: {exc}") from exc
    if set(asdict(creds)) - set(data):
        # A cluster of an older release: its new roles' passwords are made once and kept.
        save_credentials(directory, creds)
        log.info("added the ingest and fdw roles' passwords to %s", path)
    return creds


def save_credentials(directory: Path, creds: Credentials) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / CREDENTIALS_FILE, json.dumps(asdict(creds), indent=2) + "\n", 0o600)


def atomic_write(path: Path, text: str, mode: int) -> None:
    """Replace ``path`` with ``text`` at once, the mode set before any byte lands (secrets: 0600)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)

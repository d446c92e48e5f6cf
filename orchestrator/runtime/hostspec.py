"""The hosts spec: what a user writes to build a multi-host cluster (``buildsmart host plan``).

Why a file of its own: the spec is the one input of the planner (runtime/hostplan.py), so its
grammar, its defaults and its error messages live in one place. Every fault is reported as
``FILE: KEY: what is wrong`` (a :class:`ConfigError`), never a traceback. Example::

    [cluster]
    name = "estate"                  # etcd namespace /estate/ and the CA's name: a-z, 0-9, - and _
    split_points = ["m"]             # building ranges (-inf,m) [m,+inf), as in `init --spec`
    time_interval = "1 month"        # optional
    service_user = "buildsmart"      # optional: the OS user that runs the servers on every host

    [hosts]                          # host name -> IP address (etcd binds IP addresses only)
    h1 = "10.0.0.1"
    h2 = "10.0.0.2"
    h3 = "10.0.0.3"
    h4 = "10.0.0.4"
    h5 = "10.0.0.5"

    [etcd]                           # 3 (or 5) members on distinct hosts; 1 only for a trial
    hosts = ["h1", "h2", "h3"]
    client_port = 2379               # optional (default 2379 and 2380)
    peer_port = 2380

    [groups.coordinator]             # one Patroni group per node; members <group>-<i> in this order
    hosts = ["h4", "h5"]             # each member on a host of its own
    # port = 5432, rest_port = 8008  # optional; default 5432 + i and 8008 + i, i = the group's
    #                                  position in this file (the coordinator first, new groups last)
    [groups.w1]
    hosts = ["h1", "h2"]
    [groups.w2]
    hosts = ["h3", "h4"]

    [network]
    allow = ["10.0.0.0/24"]          # pg_hba networks: hosts, the orchestrator's machine, clients

    [credentials]                    # optional: role names (passwords are generated and kept)
    superuser = "buildsmart_admin"
    app_user = "buildsmart_app"

    [patroni]                        # optional: synchronous mode and the lease (docs/hosts.md)
    synchronous = "on"               # "on", "strict" or "off"
    ttl = 20
    loop_wait = 1
    retry_timeout = 5

A group named ``coordinator`` is the coordinator; every other group is a worker. Semantic checks
(unknown host names, a group's members on one host, etcd's size, port clashes) are the planner's.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.exceptions import ConfigError
from orchestrator.fragments import validate_split_points
from orchestrator.runtime.hasettings import SYNC_MODES
from orchestrator.runtime.memberconf import Timing

# names end up in etcd keys, file names, certificate names and PostgreSQL server names
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,30}")
_GROUP = re.compile(r"[a-z][a-z0-9_]{0,30}")
_TABLES = ("cluster", "hosts", "etcd", "groups", "network", "credentials", "patroni")
_KEYS = {
    "cluster": ("name", "split_points", "time_interval", "service_user"),
    "etcd": ("hosts", "client_port", "peer_port"),
    "group": ("hosts", "port", "rest_port", "dbname"),
    "network": ("allow",),
    "credentials": ("superuser", "app_user"),
    "patroni": ("synchronous", "ttl", "loop_wait", "retry_timeout"),
}


@dataclass(frozen=True)
class GroupSpec:
    name: str
    hosts: tuple[str, ...]
    port: int | None = None
    rest_port: int | None = None
    dbname: str = "buildsmart"


@dataclass(frozen=True)
class HostsSpec:
    source: str  # the file, for messages
    cluster: str
    hosts: tuple[tuple[str, str], ...]  # (name, address), in the file's order
    etcd: tuple[str, ...]
    groups: tuple[GroupSpec, ...]  # in the file's order
    allow: tuple[str, ...]
    split_points: tuple[str, ...] = ()
    time_interval: str = "1 month"
    service_user: str | None = None
    etcd_client_port: int = 2379
    etcd_peer_port: int = 2380
    superuser: str = "buildsmart_admin"
    app_user: str = "buildsmart_app"
    synchronous: str = "on"
    timing: Timing = field(default_factory=Timing)

    def error(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {what}")


def load(path: Path) -> HostsSpec:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: the hosts spec does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the hosts spec: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse(data, str(path))


class _Reader:
    """Typed access to the TOML document that names the offending key in every error."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {what}")

    def table(self, data: dict[str, Any], key: str, required: bool, known: tuple[str, ...] | None) -> dict[str, Any]:
        value = data.get(key.rsplit(".", 1)[-1])
        if value is None:
            if required:
                raise self.fail(key, f"a [{key}] table is required")
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table ([{key}]), not {type(value).__name__}")
        if known is not None:
            for k in value:
                if k not in known:
                    raise self.fail(f"{key}.{k}", f"unknown key (known: {', '.join(known)})")
        return value

    def string(self, data: dict[str, Any], key: str, default: str | None = None) -> str:
        value = data.get(key.rsplit(".", 1)[-1], default)
        if value is None:
            raise self.fail(key, "is required")
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"must be a non-empty string, not {value!r}")
        return value

    def name(self, data: dict[str, Any], key: str, pattern: re.Pattern[str], default: str | None = None) -> str:
        value = self.string(data, key, default)
        if not pattern.fullmatch(value):
            raise self.fail(key, f"{value!r} is not a valid name ({pattern.pattern})")
        return value

    def strings(self, data: dict[str, Any], key: str, required: bool) -> tuple[str, ...]:
        value = data.get(key.rsplit(".", 1)[-1])
        if value is None and not required:
            return ()
        if not isinstance(value, list) or (required and not value):
            raise self.fail(key, f"must be a non-empty list of strings, not {value!r}")
        for i, v in enumerate(value):
            if not isinstance(v, str):
                raise self.fail(f"{key}[{i}]", f"must be a string, not {v!r}")
        return tuple(value)

    def port(self, data: dict[str, Any], key: str, default: int | None) -> int | None:
        value = data.get(key.rsplit(".", 1)[-1], default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise self.fail(key, f"must be a port number (1-65535), not {value!r}")
        return value

    def seconds(self, data: dict[str, Any], key: str, default: int) -> int:
        value = data.get(key.rsplit(".", 1)[-1], default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(key, f"must be a whole number of seconds >= 1, not {value!r}")
        return value


def parse(data: dict[str, Any], source: str) -> HostsSpec:
    """The spec from a parsed TOML document; ``source`` names it in messages."""
    r = _Reader(source)
    for k in data:
        if k not in _TABLES:
            raise r.fail(k, f"unknown table (known: {', '.join(_TABLES)})")
    cluster = r.table(data, "cluster", True, _KEYS["cluster"])
    name = r.name(cluster, "cluster.name", _NAME)
    try:
        split_points = validate_split_points(r.strings(cluster, "cluster.split_points", required=False))
    except ConfigError as exc:
        raise r.fail("cluster.split_points", str(exc)) from exc
    service_user = cluster.get("service_user")
    if service_user is not None:
        service_user = r.string(cluster, "cluster.service_user")

    hosts_table = r.table(data, "hosts", True, None)
    if not hosts_table:
        raise r.fail("hosts", 'names no host (write `h1 = "10.0.0.1"` lines)')
    hosts: list[tuple[str, str]] = []
    for host, address in hosts_table.items():
        key = f"hosts.{host}"
        if not _NAME.fullmatch(host):
            raise r.fail(key, f"{host!r} is not a valid host name ({_NAME.pattern})")
        if not isinstance(address, str):
            raise r.fail(key, f"must be the host's IP address as a string, not {address!r}")
        try:
            hosts.append((host, str(ipaddress.ip_address(address))))
        except ValueError as exc:
            raise r.fail(key, f"{address!r} is not an IP address (etcd binds IP addresses only)") from exc

    etcd = r.table(data, "etcd", True, _KEYS["etcd"])
    etcd_hosts = r.strings(etcd, "etcd.hosts", required=True)

    groups_table = r.table(data, "groups", True, None)
    if not groups_table:
        raise r.fail("groups", "names no group (write a [groups.coordinator] table and one per worker)")
    groups = []
    for gname in groups_table:
        key = f"groups.{gname}"
        if not _GROUP.fullmatch(gname):
            raise r.fail(key, f"{gname!r} is not a valid group name ({_GROUP.pattern})")
        g = r.table(groups_table, key, True, _KEYS["group"])
        groups.append(
            GroupSpec(
                gname,
                r.strings(g, f"{key}.hosts", required=True),
                r.port(g, f"{key}.port", None),
                r.port(g, f"{key}.rest_port", None),
                r.string(g, f"{key}.dbname", "buildsmart"),
            )
        )

    network = r.table(data, "network", True, _KEYS["network"])
    allow = r.strings(network, "network.allow", required=True)
    networks = []
    for i, net in enumerate(allow):
        try:
            networks.append(str(ipaddress.ip_network(net, strict=False)))
        except ValueError as exc:
            raise r.fail(f"network.allow[{i}]", f"{net!r} is not a network (e.g. 10.0.0.0/24)") from exc

    creds = r.table(data, "credentials", False, _KEYS["credentials"])
    patroni = r.table(data, "patroni", False, _KEYS["patroni"])
    synchronous = r.string(patroni, "patroni.synchronous", "on")
    if synchronous not in SYNC_MODES:
        raise r.fail("patroni.synchronous", f"{synchronous!r} is not one of {', '.join(SYNC_MODES)}")
    defaults = Timing()
    timing = Timing(
        r.seconds(patroni, "patroni.ttl", defaults.ttl),
        r.seconds(patroni, "patroni.loop_wait", defaults.loop_wait),
        r.seconds(patroni, "patroni.retry_timeout", defaults.retry_timeout),
    )
    try:
        timing.check()
    except ConfigError as exc:
        raise r.fail("patroni", str(exc)) from exc

    return HostsSpec(
        source=source,
        cluster=name,
        hosts=tuple(hosts),
        etcd=etcd_hosts,
        groups=tuple(groups),
        allow=tuple(networks),
        split_points=split_points,
        time_interval=r.string(cluster, "cluster.time_interval", "1 month"),
        service_user=service_user,
        etcd_client_port=r.port(etcd, "etcd.client_port", 2379) or 2379,
        etcd_peer_port=r.port(etcd, "etcd.peer_port", 2380) or 2380,
        superuser=r.name(creds, "credentials.superuser", _GROUP, "buildsmart_admin"),
        app_user=r.name(creds, "credentials.app_user", _GROUP, "buildsmart_app"),
        synchronous=synchronous,
        timing=timing,
    )

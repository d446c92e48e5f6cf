"""Cluster spec files (TOML) for servers the orchestrator did not start.

Example::

    [cluster]
    name = "estate"
    time_interval = "1 month"
    split_points = ["b2", "b5"]          # building ranges: (-inf,b2) [b2,b5) [b5,+inf)

    [credentials]
    superuser = "postgres"
    superuser_password_env = "BUILDSMART_SUPERUSER_PASSWORD"   # or superuser_password = "..."
    app_user = "buildsmart_app"          # app_password(_env) optional: generated if absent

    [coordinator]
    hosts = ["db0.example"]              # several hosts = one replication group
    ports = [5432]
    dbname = "buildsmart"

    [[workers]]
    name = "w1"
    hosts = ["db1a.example", "db1b.example"]
    ports = [5432, 5432]
"""

from __future__ import annotations

import os
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.exceptions import ConfigError
from orchestrator.fragments import validate_split_points
from orchestrator.topology import COORDINATOR, WORKER, Credentials, Group, Layout, Member, Topology


@dataclass(frozen=True)
class ClusterSpec:
    topology: Topology
    credentials: Credentials
    app_password_generated: bool = False  # no app password in the spec: one was made up


def load_spec(path: Path) -> ClusterSpec:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"spec file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return parse_spec(data, str(path))


def parse_spec(data: dict[str, Any], where: str) -> ClusterSpec:
    cluster = _table(data, "cluster", where, required=False)
    layout = Layout(
        validate_split_points(cluster.get("split_points", [])),
        str(cluster.get("time_interval", "1 month")),
    )
    coordinator = _group(_table(data, "coordinator", where), "coordinator", COORDINATOR, f"{where} [coordinator]")
    workers_data = data.get("workers")
    if not isinstance(workers_data, list) or not workers_data:
        raise ConfigError(f"{where}: at least one [[workers]] entry is required")
    workers = []
    for i, w in enumerate(workers_data, 1):
        name = w.get("name") or f"w{i}"
        workers.append(_group(w, name, WORKER, f"{where} [[workers]] #{i}"))
    names = [g.name for g in (coordinator, *workers)]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: node names must be unique, got {names}")
    topo = Topology(str(cluster.get("name", "buildsmart")), (coordinator, *workers), layout)
    creds_table = _table(data, "credentials", where)
    generated = "app_password" not in creds_table and "app_password_env" not in creds_table
    return ClusterSpec(topo, _credentials(creds_table, where), generated)


def _table(data: dict[str, Any], key: str, where: str, required: bool = True) -> dict[str, Any]:
    value = data.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: a [{key}] table is required")
    return value


def _group(data: dict[str, Any], name: str, role: str, where: str) -> Group:
    hosts: list[Any] = data.get("hosts") or ([data["host"]] if "host" in data else [])
    if not hosts:
        raise ConfigError(f"{where}: `host` or `hosts` is required")
    ports: list[Any] = data.get("ports") or [data.get("port", 5432)]
    if len(ports) == 1 and len(hosts) > 1:
        ports = ports * len(hosts)
    if len(ports) != len(hosts):
        raise ConfigError(f"{where}: {len(hosts)} hosts but {len(ports)} ports")
    try:
        members = tuple(Member(f"{name}-{i}", str(h), int(p)) for i, (h, p) in enumerate(zip(hosts, ports, strict=True)))
    except ValueError as exc:
        raise ConfigError(f"{where}: ports must be integers: {exc}") from exc
    return Group(name, role, members, str(data.get("dbname", "buildsmart")), managed=False)


def _secret(data: dict[str, Any], key: str, where: str, generate: bool) -> str:
    if key in data:
        return str(data[key])
    env = data.get(f"{key}_env")
    if env:
        value = os.environ.get(str(env))
        if value is None:
            raise ConfigError(f"{where}: environment variable {env} (for {key}) is not set")
        return value
    if generate:
        return secrets.token_urlsafe(24)
    raise ConfigError(f"{where}: [credentials] needs {key} or {key}_env")


def _credentials(data: dict[str, Any], where: str) -> Credentials:
    return Credentials(
        superuser=str(data.get("superuser", "postgres")),
        superuser_password=_secret(data, "superuser_password", where, generate=False),
        app_user=str(data.get("app_user", "buildsmart_app")),
        app_password=_secret(data, "app_password", where, generate=True),
    )

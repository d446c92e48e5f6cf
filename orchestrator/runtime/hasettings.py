"""The HA settings of a local cluster (DIR/ha.json, 0600): replicas per group, synchronous mode,
etcd ports, Patroni REST ports and the REST password. A cluster without this file is a plain
(``--replicas 0``) cluster whose members are started by pg_ctl alone."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

from orchestrator.exceptions import ConfigError

HA_FILE = "ha.json"
SYNC_MODES = ("on", "strict", "off")


@dataclass(frozen=True)
class HaSettings:
    replicas: int
    synchronous: str  # "on" (Patroni synchronous_mode), "strict" (also synchronous_mode_strict) or "off"
    etcd_client_port: int
    etcd_peer_port: int
    restapi_ports: dict[str, int] = field(default_factory=dict)  # member name -> Patroni REST port
    restapi_user: str = "buildsmart"
    restapi_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    # group -> member that led it when the cluster was last stopped: it starts first next time,
    # so a replica that stopped earlier (and may lack the last commits) never bootstraps the group
    last_leaders: dict[str, str] = field(default_factory=dict)

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_client_port}"

    def restapi_url(self, member: str) -> str:
        try:
            return f"http://127.0.0.1:{self.restapi_ports[member]}"
        except KeyError as exc:
            raise ConfigError(f"member {member!r} has no Patroni REST port in {HA_FILE}") from exc


def exists(directory: Path) -> bool:
    return (directory / HA_FILE).exists()


def load(directory: Path) -> HaSettings:
    path = directory / HA_FILE
    try:
        data = json.loads(path.read_text())
        return HaSettings(**data)
    except FileNotFoundError as exc:
        raise ConfigError(f"{directory} is not an HA cluster ({HA_FILE} missing; it was made with --replicas 0)") from exc
    except (json.JSONDecodeError, TypeError) as exc:
        raise ConfigError(f"{path} is not a valid HA settings file: {exc}") from exc


def save(directory: Path, settings: HaSettings) -> None:
    path = directory / HA_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(asdict(settings), indent=2) + "\n")
    os.replace(tmp, path)

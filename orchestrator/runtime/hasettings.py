"""The HA settings of a local cluster (DIR/ha.json, 0600): replicas per group, synchronous mode,
etcd ports, Patroni REST ports and the REST password. A cluster without this file is a plain
(``--replicas 0``) cluster whose members are started by pg_ctl alone."""

from __future__ import annotations

import json
import os
import secrets
import ssl
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
    # Multi-host clusters (runtime/hosts.py): member -> REST host; etcd client endpoints (host:port);
    # an etcd user. Empty for the local runtime: everything on 127.0.0.1.
    restapi_hosts: dict[str, str] = field(default_factory=dict)
    etcd_endpoints: list[str] = field(default_factory=list)
    etcd_user: str | None = None
    etcd_password: str | None = None
    # TLS for the REST API and etcd: the cluster CA and the orchestrator's client certificate
    # (runtime/tls.py); None: plain HTTP
    tls_dir: str | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls_dir else "http"

    @property
    def etcd_url(self) -> str:
        return self.etcd_urls[0]

    @property
    def etcd_urls(self) -> list[str]:
        """etcd client URLs to try in turn (the local runtime's one etcd speaks plain HTTP on loopback)."""
        if self.etcd_endpoints:
            return [f"{self.scheme}://{e}" for e in self.etcd_endpoints]
        return [f"http://127.0.0.1:{self.etcd_client_port}"]

    def restapi_url(self, member: str) -> str:
        try:
            port = self.restapi_ports[member]
        except KeyError as exc:
            raise ConfigError(f"member {member!r} has no Patroni REST port in {HA_FILE}") from exc
        return f"{self.scheme}://{self.restapi_hosts.get(member, '127.0.0.1')}:{port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """Verifies the REST API and etcd against the cluster CA, presenting our client certificate."""
        if not self.tls_dir:
            return None
        from orchestrator.runtime import tls  # late: cryptography is only needed with TLS

        d = Path(self.tls_dir)
        return tls.client_context(d / "ca.crt", tls.CertPaths(d / f"{tls.CLIENT}.crt", d / f"{tls.CLIENT}.key"))


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

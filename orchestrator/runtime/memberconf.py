"""The Patroni configuration of one member, as data (:class:`MemberConf`), rendered into
``patroni/member.yml.tmpl``: the one renderer behind the local runtime, the docker compose
members (docker/patroni/render.py) and the members of ``host plan`` (runtime/hostfiles.py),
so they cannot drift; the per-host agent (runtime/agent.py) starts members from configs it rendered.
Sections are written as JSON, which is valid YAML: every value is quoted and escaped correctly
whatever it contains."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import resources
from orchestrator.exceptions import ConfigError

TEMPLATE = resources.path("patroni") / "member.yml.tmpl"


@dataclass(frozen=True)
class Timing:
    """Patroni's lease: ttl (>= 20 s, Patroni's floor), loop_wait and retry_timeout, with
    loop_wait + 2 * retry_timeout <= ttl so a primary cut off from etcd demotes itself before its
    lease can expire and another member be promoted (docs/hosts.md)."""

    ttl: int = 20
    loop_wait: int = 1
    retry_timeout: int = 5

    def check(self) -> None:
        if self.ttl < 20:
            raise ConfigError(f"Patroni refuses ttl {self.ttl} (< 20 s)")
        if self.loop_wait + 2 * self.retry_timeout > self.ttl:
            raise ConfigError(
                f"unsafe Patroni timing: loop_wait {self.loop_wait} + 2 x retry_timeout {self.retry_timeout} > ttl {self.ttl}"
            )


@dataclass(frozen=True)
class TlsFiles:
    """Paths as seen by the member: the cluster CA, this host's certificate and key."""

    ca: str
    cert: str
    key: str


@dataclass(frozen=True)
class MemberConf:
    scope: str
    namespace: str
    name: str
    restapi_listen: str
    restapi_address: str
    restapi_user: str
    restapi_password: str | None  # None: given at run time (compose: PATRONI_RESTAPI_PASSWORD)
    etcd_hosts: tuple[str, ...]
    synchronous: str
    pg_listen: str
    pg_address: str
    data_dir: str
    bin_dir: str
    pgpass: str
    superuser: str
    superuser_password: str | None  # None: given at run time (PATRONI_SUPERUSER_PASSWORD ...)
    dcs_parameters: dict[str, str]
    local_parameters: dict[str, str]
    hba: tuple[str, ...]
    tls: TlsFiles | None = None
    # etcd over TLS with this host's client certificate (multi-host etcd); the local runtime's single
    # etcd listens on loopback over plain HTTP
    etcd_tls: bool = False
    # the certificate presented to etcd: a client-only one without a common name (etcd's gateway
    # refuses named client certificates once authentication is on; runtime/tls.py); None: ``tls``
    etcd_client: TlsFiles | None = None
    etcd_user: str | None = None
    etcd_password: str | None = None
    timing: Timing = field(default_factory=Timing)


def _auth(user: str, password: str | None) -> dict[str, str]:
    return {"username": user} if password is None else {"username": user, "password": password}


def values(c: MemberConf) -> dict[str, Any]:
    c.timing.check()
    restapi: dict[str, Any] = {
        "listen": c.restapi_listen,
        "connect_address": c.restapi_address,
        "authentication": _auth(c.restapi_user, c.restapi_password),
    }
    ctl: dict[str, Any] = {"authentication": _auth(c.restapi_user, c.restapi_password)}
    etcd_tls = (c.etcd_client or c.tls) if c.etcd_tls else None
    etcd3: dict[str, Any] = {"hosts": list(c.etcd_hosts), "protocol": "https" if etcd_tls else "http"}
    pg_user = _auth(c.superuser, c.superuser_password)
    auth: dict[str, Any] = {"superuser": dict(pg_user), "replication": dict(pg_user), "rewind": dict(pg_user)}
    if c.tls is not None:
        restapi |= {"certfile": c.tls.cert, "keyfile": c.tls.key, "cafile": c.tls.ca, "verify_client": "optional"}
        ctl |= {"cacert": c.tls.ca, "certfile": c.tls.cert, "keyfile": c.tls.key}
        for section in auth.values():
            section |= {"sslmode": "verify-full", "sslrootcert": c.tls.ca}
    if etcd_tls is not None:
        etcd3 |= {"cacert": etcd_tls.ca, "cert": etcd_tls.cert, "key": etcd_tls.key}
    if c.etcd_user is not None:
        etcd3 |= _auth(c.etcd_user, c.etcd_password)
    return {
        "scope": c.scope,
        "namespace": c.namespace,
        "name": c.name,
        "restapi": restapi,
        "ctl": ctl,
        "etcd3": etcd3,
        "ttl": c.timing.ttl,
        "loop_wait": c.timing.loop_wait,
        "retry_timeout": c.timing.retry_timeout,
        "synchronous_mode": c.synchronous in ("on", "strict"),
        "synchronous_mode_strict": c.synchronous == "strict",
        "dcs_parameters": c.dcs_parameters,
        "pg_listen": c.pg_listen,
        "pg_address": c.pg_address,
        "data_dir": c.data_dir,
        "bin_dir": c.bin_dir,
        "pgpass": c.pgpass,
        "pg_authentication": auth,
        "local_parameters": c.local_parameters,
        "pg_hba": list(c.hba),
    }


def render(c: MemberConf, template: Path = TEMPLATE) -> str:
    try:
        text = template.read_text()
    except FileNotFoundError as exc:
        raise ConfigError(f"Patroni template {template} is missing") from exc
    return string.Template(text).substitute({k: json.dumps(v) for k, v in values(c).items()})


def pg_value(value: str) -> str:
    """postgresql.conf values are quoted in SERVER_SETTINGS; Patroni wants them bare."""
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == "'" else value

"""Named connections with timeouts.

Every connection says who it is (``application_name = buildsmart:<purpose>``), has a connect
timeout and a statement timeout, and lists all members of a group so it lands on the primary.

The orchestrator's own sessions pin ``search_path`` to ``pg_catalog, pg_temp``: they run as the
superuser or the ingest role, and an unqualified name resolved through a schema someone else can
write (``public.to_timestamp(bigint)`` is an exact match and beats pg_catalog's with a cast) would
run their code with those privileges. Clients (``search_path=None``) keep the server's default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg
from psycopg.conninfo import make_conninfo

from orchestrator.exceptions import NodeError
from orchestrator.topology import Credentials, Group

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10
# Purpose (so application name "buildsmart:ingest-bulk:<shard>") of a bulk load's worker sessions
# (a file, not a stream): the rollups task sees it in pg_stat_activity and defers refreshing while
# one writes (energy/rollups.py).
BULK_LOAD_APP = "ingest-bulk"


def application_name(purpose: str) -> str:
    """What pg_stat_activity shows for a session opened by :func:`connect` for ``purpose``."""
    return f"buildsmart:{purpose}"


PINNED_SEARCH_PATH = "pg_catalog,pg_temp"


@dataclass(frozen=True)
class Target:
    """Everything needed to reach one group as one role."""

    group: str
    hosts: str
    ports: str
    dbname: str
    user: str
    password: str
    ca_file: str | None = None  # set: TLS, and the server must prove it is the host we asked for

    def tls_params(self) -> dict[str, str]:
        return tls_params(self.ca_file)

    def conninfo(
        self,
        purpose: str,
        *,
        primary: bool = True,
        statement_timeout_ms: int | None = None,
        search_path: str | None = PINNED_SEARCH_PATH,
        passfile: str | None = None,
    ) -> str:
        """libpq key/value string; with ``passfile`` the password is left out (libpq reads it
        from that file), for strings a server stores (subscriptions)."""
        settings = []
        if statement_timeout_ms is not None:
            settings.append(f"-c statement_timeout={statement_timeout_ms}")
        if search_path is not None:
            settings.append(f"-c search_path={search_path}")
        options = " ".join(settings) or None
        params: dict[str, str | int] = {
            "host": self.hosts,
            "port": self.ports,
            "dbname": self.dbname,
            "user": self.user,
            "connect_timeout": CONNECT_TIMEOUT_S,
            "application_name": application_name(purpose),
        }
        if passfile is not None:
            params["passfile"] = passfile
        else:
            params["password"] = self.password
        if primary:
            params["target_session_attrs"] = "read-write"
        params.update(self.tls_params())
        params.update(LIVENESS_PARAMS)
        if options:
            params["options"] = options
        return make_conninfo("", **params)

    def uri(self) -> str:
        """A libpq URI (password included) for any SQL client; with TLS it verifies the server
        (sslmode=verify-full against the cluster CA)."""
        from urllib.parse import quote, urlencode

        hostports = ",".join(f"{h}:{p}" for h, p in zip(self.hosts.split(","), self.ports.split(","), strict=True))
        query = ({"target_session_attrs": "read-write"} if "," in self.hosts else {}) | self.tls_params()
        suffix = f"?{urlencode(query, safe='/')}" if query else ""
        return f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}@{hostports}/{self.dbname}{suffix}"


TLS_OPTIONS = frozenset({"sslmode", "sslrootcert", "sslcertmode"})

# A server cut off by the network never answers, and a connection waiting for it (the orchestrator's,
# an FDW server's, a subscription's) would wait on its socket for the kernel's ~15 minutes of
# retransmissions: keepalives end an idle wait after about 11 s, tcp_user_timeout a wait with
# unacknowledged data after 30 s (long enough for a busy server's full receive window). See
# docs/hosts.md; on one host neither ever fires.
LIVENESS_PARAMS: dict[str, str] = {
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}


def tls_params(ca_file: str | None) -> dict[str, str]:
    """libpq TLS parameters of every connection in the cluster (clients, FDW servers, subscriptions):
    verify the server's certificate and address against the cluster CA. ``sslcertmode=disable``:
    users authenticate with SCRAM, and a server process connecting out (FDW, subscription) would
    otherwise try ``~/.postgresql/postgresql.crt`` of whatever HOME it inherited and fail on it."""
    return {"sslmode": "verify-full", "sslrootcert": ca_file, "sslcertmode": "disable"} if ca_file else {}


def superuser_target(group: Group, creds: Credentials, dbname: str | None = None) -> Target:
    return Target(
        group.name, group.hosts, group.ports, dbname or group.dbname, creds.superuser, creds.superuser_password, creds.ca_file
    )


def app_target(group: Group, creds: Credentials) -> Target:
    return Target(group.name, group.hosts, group.ports, group.dbname, creds.app_user, creds.app_password, creds.ca_file)


def ingest_target(group: Group, creds: Credentials) -> Target:
    """The data path's role (orchestrator/roles.py): writes fragments, reads the catalog."""
    return Target(group.name, group.hosts, group.ports, group.dbname, creds.ingest_user, creds.ingest_password)


def connect(
    target: Target,
    purpose: str,
    *,
    autocommit: bool = False,
    statement_timeout_ms: int | None = None,
    primary: bool = True,
    search_path: str | None = PINNED_SEARCH_PATH,
) -> psycopg.Connection:
    """Open a named connection; converts connection failures to NodeError naming the node.
    ``search_path=None``: a client's session, with the server's default search_path."""
    try:
        return psycopg.connect(
            target.conninfo(purpose, primary=primary, statement_timeout_ms=statement_timeout_ms, search_path=search_path),
            autocommit=autocommit,
        )
    except psycopg.OperationalError as exc:
        raise NodeError(f"cannot connect to node {target.group} ({target.hosts}:{target.ports}) for {purpose}: {exc}") from exc

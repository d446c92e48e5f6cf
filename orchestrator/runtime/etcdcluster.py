"""etcd as a cluster of members spread over hosts (the DCS of a multi-host cluster).

The local runtime runs one etcd on loopback (runtime/etcd.py). Over hosts, three members (one per
host) keep the DCS alive when any one host is lost or cut off: a majority of two still elects and
commits, and the cut-off member refuses linearizable reads and writes until it rejoins. Members
speak TLS to clients and to each other with the cluster CA (runtime/tls.py): each presents its
host's certificate, and with ``--client-cert-auth`` / ``--peer-client-cert-auth`` every client and
peer must present a certificate of the same CA (a client without one, or with another CA's, is
refused during the handshake). Keys are read and written through runtime/etcd.py ``Client``,
which tries the endpoints in turn.

:func:`member_argv` is the one place the command line of a member is written; a host starts its
member with it (under its agent, or in the network-namespace tests).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from orchestrator.exceptions import NodeError
from orchestrator.runtime import etcd, tls

log = logging.getLogger(__name__)

CLIENT_PORT = 2379
PEER_PORT = 2380


@dataclass(frozen=True)
class EtcdMember:
    """One etcd member: its name, its host's address and where its data lives on that host."""

    name: str
    address: str
    directory: Path
    client_port: int = CLIENT_PORT
    peer_port: int = PEER_PORT

    def client_url(self, secure: bool) -> str:
        return f"{'https' if secure else 'http'}://{self.address}:{self.client_port}"

    def peer_url(self, secure: bool) -> str:
        return f"{'https' if secure else 'http'}://{self.address}:{self.peer_port}"

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.client_port}"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"


def initial_cluster(members: Sequence[EtcdMember], secure: bool) -> str:
    return ",".join(f"{m.name}={m.peer_url(secure)}" for m in members)


def member_argv(
    binary: str,
    me: EtcdMember,
    members: Sequence[EtcdMember],
    material: tls.Material | None,
    token: str,
    listen: str | None = None,
) -> list[str]:
    """etcd's command line for ``me`` in the cluster of ``members`` (TLS when ``material``).
    ``token`` keeps two clusters made on the same addresses from joining each other. ``listen``:
    the address to bind when the member's address is a name (etcd binds IP addresses only; compose
    services are reached by name), by default the member's address."""
    secure = material is not None
    bind = replace(me, address=listen) if listen is not None else me
    argv = [
        binary,
        "--name", me.name,
        "--data-dir", str(me.data_dir),
        "--listen-client-urls", bind.client_url(secure),
        "--advertise-client-urls", me.client_url(secure),
        "--listen-peer-urls", bind.peer_url(secure),
        "--initial-advertise-peer-urls", me.peer_url(secure),
        "--initial-cluster", initial_cluster(members, secure),
        "--initial-cluster-state", "new",
        "--initial-cluster-token", token,
        # Patroni's lease is 20 s: elect a new etcd leader well within it after a host is lost
        "--heartbeat-interval", "100",
        "--election-timeout", "1000",
        "--snapshot-count", "10000",
        "--logger", "zap",
    ]  # fmt: skip
    if material is not None:
        cert, key, ca = str(material.own.cert), str(material.own.key), str(material.ca)
        argv += [
            "--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca, "--client-cert-auth",
            "--peer-cert-file", cert, "--peer-key-file", key, "--peer-trusted-ca-file", ca, "--peer-client-cert-auth",
        ]  # fmt: skip
    return argv


def _prefix_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def enable_auth(client: etcd.Client, root_password: str, users: Mapping[str, tuple[str, str]]) -> None:
    """Turn etcd's authentication on: a root user, and for each ``user -> (password, key prefix)``
    a role that may read and write that prefix only (the orchestrator, and each host's Patroni
    under its own name: ``MemberConf.etcd_user``). Clients reach etcd through its JSON gateway,
    which does not pass the client certificate's name on, so users authenticate with a password
    (a token per member, runtime/etcd.py Client) on top of the certificate TLS demands. Run once
    (:func:`auth_enabled` tells; :func:`add_users` adds users afterwards)."""
    etcd.call(client, "/v3/auth/role/add", {"name": "root"})
    etcd.call(client, "/v3/auth/user/add", {"name": "root", "password": root_password})
    etcd.call(client, "/v3/auth/user/grant", {"user": "root", "role": "root"})
    for name, (password, prefix) in users.items():
        _add_user(client, name, password, prefix)
    etcd.call(client, "/v3/auth/enable", {})
    log.info("etcd authentication enabled for %s", ", ".join(sorted(users)))


def _add_user(client: etcd.Client, name: str, password: str, prefix: str) -> None:
    perm = {"permType": "READWRITE", "key": etcd.encode(prefix), "range_end": etcd.encode(_prefix_end(prefix))}
    etcd.call(client, "/v3/auth/role/add", {"name": name})
    etcd.call(client, "/v3/auth/role/grant", {"name": name, "perm": perm})
    etcd.call(client, "/v3/auth/user/add", {"name": name, "password": password})
    etcd.call(client, "/v3/auth/user/grant", {"user": name, "role": name})


def auth_enabled(client: etcd.Client) -> bool:
    """Whether etcd's authentication is on: ``client`` (no user) may read a key only while it is
    off. Raises NodeError when no member answers at all."""
    try:
        etcd.get(replace(client, user=None, password=None), "/")
    except NodeError as exc:
        if "HTTP Error 4" in str(exc):  # 400/401: a request without a token, refused
            return True
        raise
    return False


def add_users(root: etcd.Client, users: Mapping[str, tuple[str, str]]) -> list[str]:
    """With authentication on (``root``: the root user's client), add the users that do not exist
    yet (``user -> (password, key prefix)``), each confined to its prefix; returns their names.
    Existing users are left alone: their passwords are in use."""
    listed = etcd.call(root, "/v3/auth/user/list", {}).get("users") or []
    added = [name for name in users if name not in listed]
    for name in added:
        password, prefix = users[name]
        _add_user(root, name, password, prefix)
    if added:
        log.info("etcd users added: %s", ", ".join(added))
    return added

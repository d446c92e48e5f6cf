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

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.runtime import tls

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
    binary: str, me: EtcdMember, members: Sequence[EtcdMember], material: tls.Material | None, token: str
) -> list[str]:
    """etcd's command line for ``me`` in the cluster of ``members`` (TLS when ``material``).
    ``token`` keeps two clusters made on the same addresses from joining each other."""
    secure = material is not None
    argv = [
        binary,
        "--name", me.name,
        "--data-dir", str(me.data_dir),
        "--listen-client-urls", me.client_url(secure),
        "--advertise-client-urls", me.client_url(secure),
        "--listen-peer-urls", me.peer_url(secure),
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

"""Members on network-namespace hosts (tests/netns.py), made the way a host would make them: etcd
members from runtime/etcdcluster.py, Patroni members from runtime/memberconf.py, TLS material from
runtime/tls.py (one certificate per host, for its address)."""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Sequence
from pathlib import Path

from orchestrator import pgbin
from orchestrator.osuser import ServiceUser
from orchestrator.runtime import etcd, etcdcluster, memberconf, tls
from orchestrator.runtime.local import hba_rules, tls_settings
from orchestrator.runtime.patroni import dcs_parameters, patroni_python
from tests import netns


class HostCa:
    """The cluster CA, a certificate per host (key owned by the service user) and the
    orchestrator's client certificate."""

    def __init__(self, base: Path, user: ServiceUser) -> None:
        self.dir = base / "ca"
        self.user = user
        tls.make_ca(self.dir, "hosts-test")
        os.chmod(self.dir, 0o755)
        self.client = tls.issue(self.dir, self.dir, tls.CLIENT, (), server=False)
        self.context = tls.client_context(self.ca, self.client)

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def host_material(self, host: str, address: str, into: Path) -> tls.Material:
        into.mkdir(parents=True, exist_ok=True)
        os.chmod(into, 0o755)
        return tls.Material(self.ca, tls.issue(self.dir, into, host, [address], self.user))


class EtcdHosts:
    """One etcd member on each of ``hosts``, TLS with client-certificate auth."""

    def __init__(self, net: netns.Network, base: Path, ca: HostCa, hosts: Sequence[str]) -> None:
        self.net, self.ca, self.hosts = net, ca, tuple(hosts)
        self.members = [etcdcluster.EtcdMember(f"etcd-{h}", net.address(h), base / f"etcd-{h}") for h in hosts]
        for h, m in zip(hosts, self.members, strict=True):
            m.directory.mkdir(parents=True)
            material = tls.Material(ca.ca, tls.issue(ca.dir, m.directory, m.name, [m.address]))
            argv = etcdcluster.member_argv(etcd.binary(), m, self.members, material, f"t-{net.tag}")
            net.start(h, argv, m.directory / "etcd.log")

    def url(self, host: str) -> str:
        return self.members[self.hosts.index(host)].client_url(True)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(m.endpoint for m in self.members)

    def client(self, hosts: Sequence[str] | None = None) -> etcd.Client:
        return etcd.Client(tuple(self.url(h) for h in (hosts or self.hosts)), self.ca.context)

    def wait_healthy(self, hosts: Sequence[str] | None = None, timeout_s: float = 30.0) -> None:
        hosts = tuple(hosts or self.hosts)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(etcd.healthy(self.url(h), self.ca.context) for h in hosts):
                return
            time.sleep(0.2)
        logs = {m.name: (m.directory / "etcd.log").read_text()[-800:] for m in self.members}
        raise AssertionError(f"etcd members on {hosts} not healthy within {timeout_s} s: {logs}")


REST_PORT = 8008
PG_PORT = 5432


def start_patroni(
    net: netns.Network,
    host: str,
    name: str,
    scope: str,
    base: Path,
    ca: HostCa,
    etcd_hosts: EtcdHosts,
    user: ServiceUser,
    superuser: tuple[str, str],
    rest: tuple[str, str],
    subnet: str,
) -> Path:
    """Render and start one Patroni member on ``host`` as the service user; returns its config."""
    address = net.address(host)
    member_dir = base / name
    member_dir.mkdir(parents=True)
    material = ca.host_material(host, address, member_dir / "tls")
    files = memberconf.TlsFiles(str(material.ca), str(material.own.cert), str(material.own.key))
    conf = memberconf.MemberConf(
        scope=scope,
        namespace="/hosts-test/",
        name=name,
        restapi_listen=f"{address}:{REST_PORT}",
        restapi_address=f"{address}:{REST_PORT}",
        restapi_user=rest[0],
        restapi_password=rest[1],
        etcd_hosts=etcd_hosts.endpoints,
        synchronous="on",
        pg_listen=f"{address}:{PG_PORT}",
        pg_address=f"{address}:{PG_PORT}",
        data_dir=str(member_dir / "data"),
        bin_dir=str(pgbin.bin_dir()),
        pgpass=str(member_dir / "pgpass"),
        superuser=superuser[0],
        superuser_password=superuser[1],
        dcs_parameters=dcs_parameters(),
        local_parameters={k: memberconf.pg_value(v) for k, v in tls_settings(material).items()},
        hba=tuple(hba_rules(networks=(subnet,), use_tls=True)),
        tls=files,
        etcd_tls=True,
    )
    config = member_dir / "patroni.yml"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(memberconf.render(conf))
    user.chown(member_dir)
    drop = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups"]
    env = ["env", f"HOME={member_dir}", f"PATH={pgbin.bin_dir()}:/usr/bin:/bin"]
    net.start(host, [*drop, *env, patroni_python(), "-I", "-m", "patroni", str(config)], member_dir / "patroni.log")
    return config


def rest_context(ca: HostCa) -> ssl.SSLContext:
    return ca.context

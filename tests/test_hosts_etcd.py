"""etcd as three members on three hosts (network namespaces, tests/netns.py), with TLS between
members and client-certificate auth (issue 13 items 2, 7 and 10 for the DCS):

* a client that offers no TLS, presents no certificate, presents one of another CA, or verifies
  the members against another CA is refused;
* a member's host cut off (a minority of one): writes through the client (which tries every
  endpoint) still commit on the majority, the cut-off member itself cannot commit, and after the
  heal it serves the writes it missed;
* the harness leaves no namespace, link or process behind.
"""

from __future__ import annotations

import json
import shutil
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.exceptions import NodeError
from orchestrator.runtime import etcd, etcdcluster, tls
from tests import netns
from tests.harness import make_tmp_dir

pytestmark = pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))

HOSTS = ("e1", "e2", "e3")


class Etcd3:
    def __init__(self, net: netns.Network, base: Path) -> None:
        self.net, self.base = net, base
        self.ca_dir = base / "ca"
        tls.make_ca(self.ca_dir, "hosts-test")
        self.client_cert = tls.issue(self.ca_dir, self.ca_dir, tls.CLIENT, (), server=False)
        self.members = [etcdcluster.EtcdMember(h, net.address(h), base / h) for h in HOSTS]
        for m in self.members:
            m.directory.mkdir(parents=True)
            own = tls.issue(self.ca_dir, m.directory, m.name, [m.address])
            material = tls.Material(self.ca_dir / "ca.crt", own)
            argv = etcdcluster.member_argv(etcd.binary(), m, self.members, material, f"t-{net.tag}")
            net.start(m.name, argv, m.directory / "etcd.log")
        self.context = tls.client_context(self.ca_dir / "ca.crt", self.client_cert)

    def url(self, host: str) -> str:
        return next(m for m in self.members if m.name == host).client_url(True)

    def client(self, hosts: tuple[str, ...] = HOSTS) -> etcd.Client:
        return etcd.Client(tuple(self.url(h) for h in hosts), self.context)

    def wait_healthy(self, hosts: tuple[str, ...] = HOSTS, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(etcd.healthy(self.url(h), self.context) for h in hosts):
                return
            time.sleep(0.2)
        logs = {m.name: (m.directory / "etcd.log").read_text()[-800:] for m in self.members}
        raise AssertionError(f"etcd members {hosts} not healthy within {timeout_s} s: {logs}")


@pytest.fixture(scope="module")
def cluster3() -> Iterator[Etcd3]:
    net = netns.Network(HOSTS)
    base = make_tmp_dir("bs-etcd3-")
    try:
        e = Etcd3(net, base)
        e.wait_healthy()
        yield e
    finally:
        net.close()
        left = net.leftovers()
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"the harness left {left}"


def _get(url: str, context: ssl.SSLContext | None) -> int:
    with urllib.request.urlopen(f"{url}/health", timeout=3, context=context) as resp:
        return int(resp.status)


def test_members_refuse_clients_without_tls_or_of_another_ca(cluster3: Etcd3, tmp_path: Path) -> None:
    url = cluster3.url("e2")
    assert _get(url, cluster3.context) == 200
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        _get(url.replace("https://", "http://", 1), None)
    no_cert = ssl.create_default_context(cafile=str(cluster3.ca_dir / "ca.crt"))
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        _get(url, no_cert)
    other = tls.make_ca(tmp_path / "other", "impostor")
    impostor_cert = tls.issue(tmp_path / "other", tmp_path / "other", "impostor", ["127.0.0.1"])
    impostor = ssl.create_default_context(cafile=str(cluster3.ca_dir / "ca.crt"))
    impostor.load_cert_chain(str(impostor_cert.cert), str(impostor_cert.key))
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        _get(url, impostor)
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        _get(url, tls.client_context(other, cluster3.client_cert))


PROBE = """
import base64, json, ssl, sys, urllib.error, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[2]); ctx.load_cert_chain(sys.argv[3], sys.argv[4])
body = json.dumps({"key": base64.b64encode(b"probe/minority").decode(), "value": base64.b64encode(b"x").decode()})
req = urllib.request.Request(sys.argv[1] + "/v3/kv/put", data=body.encode(), method="POST")
try:
    with urllib.request.urlopen(req, timeout=8, context=ctx) as resp:
        out = json.loads(resp.read())
        print("COMMITTED" if "error" not in out else "REFUSED " + str(out))
except urllib.error.HTTPError as exc:
    print("REFUSED", exc.code, exc.read().decode(errors="replace"))
except OSError as exc:
    print("REFUSED", exc)
"""


def test_minority_member_cut_off_then_healed(cluster3: Etcd3) -> None:
    client = cluster3.client()
    etcd.put(client, "t/before", "1")
    cluster3.net.cut("e1")  # the first endpoint the client tries
    try:
        started = time.monotonic()
        deadline = started + 20
        while True:  # the majority (e2, e3) elects within the election timeout if e1 led
            try:
                etcd.put(client, "t/during", "2")
                break
            except NodeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert etcd.get(cluster3.client(("e2", "e3")), "t/during") == "2"
        # the cut-off member cannot commit: asked from inside its own host, the write is refused
        probe = cluster3.net.run(
            "e1",
            [sys.executable, "-I", "-c", PROBE, cluster3.url("e1"), str(cluster3.ca_dir / "ca.crt"),
             str(cluster3.client_cert.cert), str(cluster3.client_cert.key)],
            timeout=30,
        )  # fmt: skip
        # etcd's own answer (a timed-out proposal, or no leader), not a local error of the probe
        assert probe.stdout.startswith("REFUSED 5"), probe.stdout + probe.stderr
        assert any(w in probe.stdout for w in ("deadline exceeded", "timed out", "leader")), probe.stdout
    finally:
        cluster3.net.heal("e1")
    cluster3.wait_healthy()
    deadline = time.monotonic() + 20
    alone = cluster3.client(("e1",))
    value = None
    while time.monotonic() < deadline:
        try:
            value = etcd.get(alone, "t/during")
            if value == "2":
                break
        except NodeError:
            pass
        time.sleep(0.2)
    assert value == "2", "the healed member did not catch up with the writes it missed"
    assert etcd.get(cluster3.client(("e2",)), "probe/minority") is None, "the minority committed a write"
    members = json.dumps(etcd.call(client, "/v3/cluster/member/list", {}))
    assert all(m.address in members for m in cluster3.members)


def test_auth_confines_each_user_to_its_prefix(cluster3: Etcd3, tmp_path: Path) -> None:
    """With authentication on, the orchestrator's user reads and writes its own prefix only; a
    client with a certificate of the cluster CA but no user, or a wrong password, gets nothing."""
    client = cluster3.client()
    etcd.put(client, "/buildsmart/w1/leader", "w1-0")
    etcdcluster.enable_auth(client, "root-secret", {"orchestrator": ("orch-secret", "/buildsmart/")})
    with pytest.raises(NodeError, match="HTTP Error 40"):
        etcd.get(client, "/buildsmart/w1/leader")  # TLS and a certificate, but no user
    user = etcd.Client(client.urls, client.context, "orchestrator", "orch-secret")
    assert etcd.get(user, "/buildsmart/w1/leader") == "w1-0"
    etcd.put(user, "/buildsmart/w1/leader", "w1-1")
    assert etcd.get(user, "/buildsmart/w1/leader") == "w1-1"
    with pytest.raises(NodeError, match="HTTP Error 40"):
        etcd.put(user, "/elsewhere/key", "x")
    with pytest.raises(NodeError, match="HTTP Error 40"):
        etcd.get(etcd.Client(client.urls, client.context, "orchestrator", "wrong"), "/buildsmart/w1/leader")
    # a certificate carrying a common name is refused by the gateway once auth is on (etcd would
    # otherwise be asked to trust a name it cannot check): client certificates carry none
    named = tls.issue(cluster3.ca_dir, tmp_path, "named-client", ["127.0.0.1"])
    as_named = etcd.Client(client.urls, tls.client_context(cluster3.ca_dir / "ca.crt", named), "orchestrator", "orch-secret")
    with pytest.raises(NodeError, match="HTTP Error 400"):
        etcd.get(as_named, "/buildsmart/w1/leader")

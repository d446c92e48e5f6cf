"""The hosts spec, its planner and the plan's writer (issue 13: a user builds a multi-host cluster
without the test harness). No server runs here: the planner is pure, and ``host plan`` only
writes files (certificates, configs, plans, secrets); the hosts tests start what it wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import topology
from orchestrator.exceptions import ConfigError
from orchestrator.runtime import agent, hasettings, hostfiles, hostspec
from orchestrator.runtime.hostplan import ClusterPlan, plan
from orchestrator.topology import COORDINATOR, WORKER, Group, Layout, Member, Topology
from tests.harness import make_tmp_dir

SPEC = """
[cluster]
name = "estate"
split_points = ["m"]

[hosts]
h1 = "10.0.0.1"
h2 = "10.0.0.2"
h3 = "10.0.0.3"
h4 = "10.0.0.4"
h5 = "10.0.0.5"

[etcd]
hosts = ["h1", "h2", "h3"]

[groups.coordinator]
hosts = ["h4", "h5"]

[groups.w1]
hosts = ["h1", "h2"]

[groups.w2]
hosts = ["h3", "h4"]

[network]
allow = ["10.0.0.0/24"]
"""


def _data(**changes: Any) -> dict[str, Any]:
    """The example spec as parsed TOML, with ``changes`` ("table.key" -> value; None deletes)."""
    data = tomllib.loads(SPEC)
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        table = data
        for part in path:
            table = table.setdefault(part, {})
        if value is None:
            table.pop(last, None)
        else:
            table[last] = value
    return data


def _plan(**changes: Any) -> ClusterPlan:
    return plan(hostspec.parse(_data(**changes), "hosts.toml"))


def _refused(match: str, **changes: Any) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        _plan(**changes)
    return str(info.value)


# ---------------------------------------------------------------- the planner


def test_members_ports_and_hosts_as_planned() -> None:
    p = _plan()
    assert p.warnings == ()
    assert [(g.name, g.role, g.pg_port, g.rest_port) for g in p.groups] == [
        ("coordinator", COORDINATOR, 5432, 8008),
        ("w1", WORKER, 5433, 8009),
        ("w2", WORKER, 5434, 8010),
    ]
    assert [(m.name, m.host, m.pg_address, m.rest_address, m.peers) for m in p.group("w2").members] == [
        ("w2-0", "h3", "10.0.0.3:5434", "10.0.0.3:8010", ("w2-1",)),
        ("w2-1", "h4", "10.0.0.4:5434", "10.0.0.4:8010", ("w2-0",)),
    ]
    assert [m.name for m in p.host("h4").members] == ["coordinator-0", "w2-1"]
    assert p.host("h4").etcd is None and p.host("h5").members[0].name == "coordinator-1"
    assert [(e.name, e.endpoint) for e in p.etcd] == [
        ("etcd-h1", "10.0.0.1:2379"),
        ("etcd-h2", "10.0.0.2:2379"),
        ("etcd-h3", "10.0.0.3:2379"),
    ]
    assert p.namespace == "/estate/"
    assert set(p.etcd_users) == {
        *(m.name for m in p.members),
        *(f"agent-h{i}" for i in range(1, 6)),
        "buildsmart",
    }


def test_each_host_tries_its_own_etcd_member_first() -> None:
    p = _plan()
    assert p.host("h2").etcd_urls == ("https://10.0.0.2:2379", "https://10.0.0.1:2379", "https://10.0.0.3:2379")
    assert p.host("h3").etcd_urls[0] == "https://10.0.0.3:2379"
    # a host without an etcd member: the spec's order
    assert p.host("h5").etcd_urls == tuple(e.url for e in p.etcd)


def test_topology_is_what_init_remote_records() -> None:
    topo = _plan().topology()
    assert topo == Topology(
        "estate",
        (
            Group(
                "coordinator", COORDINATOR,
                (Member("coordinator-0", "10.0.0.4", 5432), Member("coordinator-1", "10.0.0.5", 5432)), managed=False,
            ),
            Group("w1", WORKER, (Member("w1-0", "10.0.0.1", 5433), Member("w1-1", "10.0.0.2", 5433)), managed=False),
            Group("w2", WORKER, (Member("w2-0", "10.0.0.3", 5434), Member("w2-1", "10.0.0.4", 5434)), managed=False),
        ),
        Layout(("m",)),
        runtime="hosts",
    )  # fmt: skip


def test_the_same_spec_always_gives_the_same_plan() -> None:
    assert _plan() == _plan()


def test_explicit_ports_and_a_clash_named_by_key() -> None:
    p = _plan(**{"groups.w2.port": 6000, "groups.w2.rest_port": 9000})
    assert (p.group("w2").pg_port, p.group("w2").rest_port) == (6000, 9000)
    msg = _refused("port", **{"groups.w2.port": 5432})  # the coordinator's port, on h4 too
    assert msg.startswith("hosts.toml: groups.w2.port: port 5432 on host h4 is taken twice"), msg
    msg = _refused("port", **{"groups.w1.rest_port": 2379})  # etcd's client port on h1
    assert msg.startswith("hosts.toml: groups.w1.rest_port: port 2379 on host h1"), msg


def test_etcd_needs_three_members_or_one_with_a_warning() -> None:
    msg = _refused("etcd", **{"etcd.hosts": ["h1", "h2"]})
    assert msg.startswith("hosts.toml: etcd.hosts: 2 members"), msg
    one = _plan(**{"etcd.hosts": ["h1"]})
    assert len(one.etcd) == 1
    assert any("etcd runs on h1 only" in w for w in one.warnings), one.warnings
    four = _plan(**{"etcd.hosts": ["h1", "h2", "h3", "h4"]})
    assert any("odd" in w for w in four.warnings), four.warnings
    msg = _refused("twice", **{"etcd.hosts": ["h1", "h2", "h1"]})
    assert msg.startswith("hosts.toml: etcd.hosts[2]: host 'h1' is named twice"), msg


def test_a_groups_members_on_distinct_hosts() -> None:
    msg = _refused("different hosts", **{"groups.w1.hosts": ["h1", "h1"]})
    assert msg.startswith("hosts.toml: groups.w1.hosts[1]: host 'h1' already holds w1-0"), msg
    single = _plan(**{"groups.w2.hosts": ["h3"]})
    assert any("group w2 has one member" in w for w in single.warnings), single.warnings


def test_unknown_host_names_the_key() -> None:
    msg = _refused("unknown host", **{"groups.w1.hosts": ["h1", "h9"]})
    assert msg.startswith("hosts.toml: groups.w1.hosts[1]: unknown host 'h9'"), msg
    msg = _refused("unknown host", **{"etcd.hosts": ["h1", "h2", "x"]})
    assert msg.startswith("hosts.toml: etcd.hosts[2]: unknown host 'x'"), msg


def test_every_host_must_be_inside_the_allowed_networks() -> None:
    msg = _refused("network", **{"network.allow": ["10.0.1.0/24"]})
    assert msg.startswith("hosts.toml: network.allow: host h1 (10.0.0.1) is in none of 10.0.1.0/24"), msg


def test_a_plan_without_a_coordinator_only_starts_groups() -> None:
    data = _data()
    data["groups"] = {"w1": {"hosts": ["h1", "h2"]}}
    p = plan(hostspec.parse(data, "hosts.toml"))
    assert not p.is_cluster
    assert any("no BuildSmartDB cluster without a [groups.coordinator]" in w for w in p.warnings), p.warnings
    assert (p.group("w1").pg_port, p.group("w1").rest_port) == (5432, 8008)  # the first group's ports
    assert any("h5 runs nothing" in w for w in p.warnings)


# ---------------------------------------------------------------- the spec's grammar


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"hosts.h1": "not-an-ip"}, "hosts.toml: hosts.h1: 'not-an-ip' is not an IP address"),
        ({"hosts.h1": 10}, "hosts.toml: hosts.h1: must be the host's IP address as a string"),
        ({"cluster.name": "Bad Name"}, "hosts.toml: cluster.name: 'Bad Name' is not a valid name"),
        ({"cluster.name": None}, "hosts.toml: cluster.name: is required"),
        ({"cluster.colour": "red"}, "hosts.toml: cluster.colour: unknown key"),
        ({"cluster.split_points": ["m", "b"]}, "hosts.toml: cluster.split_points: fragment split points must increase"),
        ({"network.allow": None}, "hosts.toml: network.allow: must be a non-empty list of strings"),
        ({"network.allow": ["10.0.0.0/33"]}, "hosts.toml: network.allow[0]: '10.0.0.0/33' is not a network"),
        ({"etcd.hosts": "h1"}, "hosts.toml: etcd.hosts: must be a non-empty list of strings"),
        ({"etcd.client_port": 70000}, "hosts.toml: etcd.client_port: must be a port number"),
        ({"groups.w1.hosts": ["h1", 2]}, "hosts.toml: groups.w1.hosts[1]: must be a string"),
        ({"groups.w1.replicas": 2}, "hosts.toml: groups.w1.replicas: unknown key"),
        ({"groups.W-1": {"hosts": ["h1"]}}, "hosts.toml: groups.W-1: 'W-1' is not a valid group name"),
        ({"patroni.ttl": 10}, "hosts.toml: patroni: Patroni refuses ttl 10"),
        ({"patroni.retry_timeout": 10}, "hosts.toml: patroni: unsafe Patroni timing"),
        ({"patroni.synchronous": "maybe"}, "hosts.toml: patroni.synchronous: 'maybe' is not one of on, strict, off"),
        ({"nodes": {}}, "hosts.toml: nodes: unknown table"),
        ({"hosts": None}, "hosts.toml: hosts: a [hosts] table is required"),
    ],
)
def test_spec_faults_name_file_and_key(changes: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        hostspec.parse(_data(**changes), "hosts.toml")
    assert str(info.value).startswith(expected), str(info.value)


def test_spec_file_faults_are_one_line_from_the_cli(tmp_path: Path) -> None:
    """A bad spec: the file and key, exit code 2 (ConfigError), never a traceback."""
    bad = tmp_path / "hosts.toml"
    bad.write_text(SPEC.replace('h2 = "10.0.0.2"', 'h2 = "10.0.0.256"'))
    cmd = [sys.executable, "-m", "orchestrator", "host", "plan", "--spec", str(bad), "--dir", str(tmp_path / "d")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done
    assert f"{bad}: hosts.h2: '10.0.0.256' is not an IP address" in " ".join(done.stderr.split()), done.stderr
    assert "Traceback" not in done.stderr
    bad.write_text("[cluster\nname = 1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and f"{bad}: not valid TOML" in " ".join(done.stderr.split()), done.stderr


def test_host_init_without_a_plan_says_what_to_run(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "orchestrator", "host", "init", "--dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    said = " ".join(done.stderr.split())
    assert done.returncode == 2 and "hosts.toml: missing: write the plan first (`buildsmart host plan" in said, said


# ---------------------------------------------------------------- the writer (`host plan`)


@pytest.fixture
def planned() -> Iterator[tuple[Path, Path]]:
    base = make_tmp_dir("bs-hostplan-")
    spec = base / "spec.toml"
    spec.write_text(SPEC)
    try:
        yield spec, base / "cluster"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every secret-bearing file of DIR: keys, passwords, configs, plans."""
    files = [p for p in directory.rglob("*") if p.is_file() and not p.name.endswith(".log")]
    return {str(p.relative_to(directory)): p.read_bytes() for p in files}


def test_host_plan_writes_what_each_host_needs(planned: tuple[Path, Path]) -> None:
    spec, directory = planned
    cmd = [sys.executable, "-m", "orchestrator", "host", "plan", "--spec", str(spec), "--dir", str(directory)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    said = done.stdout + done.stderr
    assert "plan written for 5 hosts" in " ".join(said.split()), said

    sec = hostfiles.load_secrets(directory)
    creds = json.loads((directory / "credentials.json").read_text())
    secrets = [sec.etcd_root, sec.rest_password, *sec.etcd_users.values(), creds["superuser_password"], creds["app_password"]]
    logged = (directory / "buildsmart.log").read_text()
    for s in secrets:
        assert s not in said and s not in logged, "a secret was printed or logged"

    # private files are 0600; the CA key stays in DIR/tls
    for private in ("host-secrets.json", "credentials.json", "ha.json", "tls/ca.key", "hosts/h1/agent/etcd-password",
                    "hosts/h1/w1-0/patroni.yml", "hosts/h1/tls/h1.key"):  # fmt: skip
        assert _mode(directory / private) == 0o600, private
    assert not any(p.name == "ca.key" for p in (directory / "hosts").rglob("*"))
    assert (directory / "ca.crt").read_bytes() == (directory / "tls/ca.crt").read_bytes()
    assert json.loads((directory / "credentials.json").read_text())["ca_file"] == str(directory / "ca.crt")

    # each host's agent plan: its etcd member, its Patroni members, its own etcd user
    h1 = agent.load_plan(directory, "h1")
    assert h1.etcd is not None and h1.etcd.name == "etcd-h1"
    assert "--client-cert-auth" in h1.etcd.argv and sec.etcd_token in h1.etcd.argv
    assert [p.name for p in h1.patroni] == ["w1-0"]
    assert h1.patroni[0].leader_key == "/estate/w1/leader" and h1.patroni[0].peers == ("w1-1",)
    assert h1.dcs.user == "agent-h1" and h1.dcs.urls[0] == "https://10.0.0.1:2379"
    assert Path(h1.dcs.password_file or "").read_text() == sec.etcd_users["agent-h1"]
    h4 = agent.load_plan(directory, "h4")
    assert h4.etcd is None and [p.name for p in h4.patroni] == ["coordinator-0", "w2-1"]

    conf = (directory / "hosts/h4/w2-1/patroni.yml").read_text()
    assert '"10.0.0.4:5434"' in conf and '"10.0.0.4:8010"' in conf and "hostssl all all 10.0.0.0/24" in conf
    assert sec.etcd_users["w2-1"] in conf  # its own etcd user

    ha = hasettings.load(directory)
    assert ha.restapi_url("w2-1") == "https://10.0.0.4:8010"
    assert ha.etcd_urls == ["https://10.0.0.1:2379", "https://10.0.0.2:2379", "https://10.0.0.3:2379"]
    assert ha.etcd_user == "buildsmart" and ha.etcd_password == sec.etcd_users["buildsmart"]
    assert ha.tls_dir == str(directory / "tls") and ha.restapi_password == sec.rest_password
    assert (directory / "hosts.toml").read_text() == SPEC


def test_host_plan_again_keeps_every_key_and_password(planned: tuple[Path, Path]) -> None:
    """Re-running keeps CA, keys and passwords; a group added to the spec gets its members and
    etcd users without touching the others' files."""
    spec, directory = planned
    said: list[str] = []
    hostfiles.write(spec, directory, said.append)
    before = _snapshot(directory)
    said.clear()
    hostfiles.write(spec, directory, said.append)
    assert _snapshot(directory) == before
    assert any("every password kept" in s for s in said), said

    spec.write_text(SPEC + '\n[groups.w3]\nhosts = ["h5", "h1"]\n')
    said.clear()
    p = hostfiles.write(spec, directory, said.append)
    after = _snapshot(directory)
    assert any("made 2 new (etcd user w3-0, etcd user w3-1)" in s for s in said), said
    changed = {k for k in before if after.get(k) != before[k]}
    # the new group's members appear in the plans of h5 and h1, ha.json and the secrets; the spec copy changed
    assert changed == {"hosts.toml", "host-secrets.json", "ha.json", "host-h1.json", "host-h5.json"}, changed
    assert (p.group("w3").pg_port, [m.host for m in p.group("w3").members]) == (5435, ["h5", "h1"])
    assert [s.name for s in agent.load_plan(directory, "h5").patroni] == ["coordinator-1", "w3-0"]
    assert os.path.exists(directory / "hosts/h1/w3-1/patroni.yml")


def test_node_add_on_hosts_names_the_steps_for_an_unplanned_group(planned: tuple[Path, Path]) -> None:
    """`node add NAME` on a hosts cluster takes its members from the plan; a group the plan does
    not hold (or a DIR no plan wrote) is refused with the commands that make one, before any
    server is asked."""
    from orchestrator.runtime.hosts import HostsRuntime

    spec, directory = planned
    p = hostfiles.write(spec, directory, lambda _: None)
    topo = p.topology()
    creds = topology.load_credentials(directory)
    rt = HostsRuntime(directory)
    with pytest.raises(ConfigError, match=r"w9 is not a group of .*hosts.toml: add a \[groups.w9\] table") as info:
        rt.add_worker(topo, "w9", creds, lambda _: None)
    assert "`buildsmart host plan --spec FILE" in str(info.value) and "`buildsmart node add w9`" in str(info.value)
    with pytest.raises(ConfigError, match="coordinator group"):
        rt.add_worker(topo, "coordinator", creds, lambda _: None)
    (directory / "hosts.toml").unlink()
    with pytest.raises(ConfigError, match="was not planned by `buildsmart host plan`"):
        rt.add_worker(topo, "w3", creds, lambda _: None)

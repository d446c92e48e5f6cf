"""The per-host agent's decisions without servers: what a host can know about its group
(runtime/agent.py host_snapshot) fed to the supervisor's one ``decide``, the host plan's round
trip, refusal of a bad plan, and the systemd unit it renders."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.exceptions import ConfigError
from orchestrator.runtime import agent
from orchestrator.runtime.supervisor import MemberView, decide

INF = float("inf")


def _local(name: str, patroni: bool, postmaster: int | None, dead_for: float = 0.0, since_restart: float = INF) -> MemberView:
    return MemberView(name, patroni, postmaster, dead_for, since_restart)


def test_dead_local_primary_releases_the_leader_key_when_a_remote_standby_is_registered() -> None:
    snap = agent.host_snapshot("w1", "w1-0", (_local("w1-0", False, None, 0.2),), ("w1-1",), frozenset({"w1-1"}))
    action = decide(snap)
    assert (action.kind, action.member) == ("release_leader", "w1-0")
    assert agent.acts_here(action, frozenset({"w1-0"}))


def test_dead_local_primary_is_not_released_when_no_remote_peer_is_registered() -> None:
    """No peer could take over: releasing would only cause an outage; restart it instead."""
    snap = agent.host_snapshot("w1", "w1-0", (_local("w1-0", False, None, 0.2),), ("w1-1",), frozenset())
    action = decide(snap)
    assert (action.kind, action.member) == ("restart", "w1-0")


def test_local_primary_without_patroni_but_with_postgres_is_fenced_first() -> None:
    snap = agent.host_snapshot("w1", "w1-0", (_local("w1-0", False, 4242, 0.2),), ("w1-1",), frozenset({"w1-1"}))
    assert (decide(snap).kind, decide(snap).member) == ("fence", "w1-0")


def test_a_remote_leader_is_never_judged_from_another_host() -> None:
    """The leader lives on another host whose member key is gone: this host cannot know whether it
    is dead or cut off, so it neither releases its key nor restarts anything there."""
    snap = agent.host_snapshot("w1", "w1-1", (_local("w1-0", True, 100),), ("w1-1",), frozenset())
    assert decide(snap).kind == "none"


def test_a_dead_remote_replica_is_not_restarted_from_here() -> None:
    snap = agent.host_snapshot("w1", "w1-0", (_local("w1-0", True, 100),), ("w1-1",), frozenset())
    action = decide(snap)
    assert action.kind == "none"
    assert not agent.acts_here(action, frozenset({"w1-0"}))


def test_dead_local_replica_rejoins_under_a_remote_leader_after_the_backoff() -> None:
    fresh = agent.host_snapshot("w1", "w1-1", (_local("w1-0", False, None, 1.0, since_restart=1.0),), ("w1-1",), frozenset())
    assert decide(fresh).kind == "none"  # restarted a moment ago: give it time
    later = agent.host_snapshot("w1", "w1-1", (_local("w1-0", False, None, 5.0, since_restart=5.0),), ("w1-1",), frozenset())
    assert (decide(later).kind, decide(later).member) == ("restart", "w1-0")


def test_actions_on_members_of_other_hosts_are_refused() -> None:
    snap = agent.host_snapshot("w1", "w1-0", (_local("w1-0", False, None, 0.2),), ("w1-1",), frozenset({"w1-1"}))
    assert not agent.acts_here(decide(snap), frozenset({"w1-1"}))


def _plan() -> agent.HostPlan:
    dcs = agent.DcsAccess(("https://10.0.0.1:2379", "https://10.0.0.2:2379"), "/ca.crt", "/a.crt", "/a.key", "agent-h1", "/pw")
    etcd = agent.EtcdSpec("etcd-h1", "/d/etcd-h1", "/d/etcd-h1/data", ("/usr/bin/etcd", "--name", "etcd-h1"))
    member = agent.PatroniSpec("w1-0", "w1", "/d/w1-0", "10.0.0.1:5432", "/c/w1/leader", "/c/w1/members/", ("w1-1",))
    return agent.HostPlan("h1", "buildsmart", dcs, etcd, (member,))


def test_plan_round_trip(tmp_path: Path) -> None:
    plan = _plan()
    agent.write_plan(tmp_path, plan)
    assert agent.load_plan(tmp_path, "h1") == plan
    member = agent.patroni_member(plan.patroni[0])
    assert member.config_file == Path("/d/w1-0/patroni.yml")
    assert member.local.data_dir == Path("/d/w1-0/data")


def test_missing_or_bad_plan_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"host-h9\.json: no plan for host 'h9'"):
        agent.load_plan(tmp_path, "h9")
    (tmp_path / "host-h2.json").write_text('{"host": "h2"}')
    with pytest.raises(ConfigError, match=r"host-h2\.json: not a host plan"):
        agent.load_plan(tmp_path, "h2")


def test_systemd_unit_runs_the_agent_isolated_and_keeps_members_on_agent_restart() -> None:
    unit = agent.systemd_unit(Path("/srv/bsdb"), "h1", python="/opt/venv/bin/python")
    assert "ExecStart=/opt/venv/bin/python -I -m orchestrator.runtime.agent /srv/bsdb h1\n" in unit
    assert "Restart=always\n" in unit
    assert "KillMode=process\n" in unit
    assert "WantedBy=multi-user.target" in unit


def test_host_up_runs_one_verified_agent_and_host_down_stops_it(tmp_path: Path) -> None:
    """`host up` starts the agent as a daemon from the plan (once: a second `up` finds it by
    identity), `host unit` prints its unit, `host down` stops it; a host without a plan is refused."""
    from orchestrator.runtime import tls
    from tests.harness import ClusterHandle

    directory = tmp_path / "d"
    directory.mkdir()
    ca = tls.make_ca(directory / "ca", "agent-test")
    client = tls.issue(directory / "ca", directory / "ca", "agent-h1", (), server=False)
    dcs = agent.DcsAccess(("https://127.0.0.1:9",), str(ca), str(client.cert), str(client.key))
    agent.write_plan(directory, agent.HostPlan("h1", "root", dcs, None, ()))
    handle = ClusterHandle(directory)
    try:
        handle.run_cli("host", "up", "--host", "h1")
        first = agent.running(directory, "h1")
        assert first is not None
        handle.run_cli("host", "up", "--host", "h1")
        again = agent.running(directory, "h1")
        assert again is not None and again.pid == first.pid
        assert f"-m orchestrator.runtime.agent {directory} h1" in handle.run_cli("host", "unit", "--host", "h1").stdout
    finally:
        down = handle.run_cli("host", "down", "--host", "h1")
    assert "agent of h1 stopped" in down.stderr
    assert agent.running(directory, "h1") is None
    refused = handle.run_cli("host", "up", "--host", "h2", check=False)
    assert refused.returncode != 0 and "host-h2.json: no plan for host 'h2'" in refused.stderr


@pytest.mark.parametrize("leader", ["w1-0", "w1-1", None])
@pytest.mark.parametrize("registered", [frozenset(), frozenset({"w1-1"})])
def test_a_live_local_patroni_needs_no_dcs_read(leader: str | None, registered: frozenset[str]) -> None:
    """The agent skips its etcd reads while its member's Patroni lives: whatever the DCS says,
    ``decide`` then has nothing for this host to do (so the shortcut changes no decision)."""
    local = _local("w1-0", True, 100)
    assert not agent.needs_dcs(local)
    action = decide(agent.host_snapshot("w1", leader, (local,), ("w1-1",), registered))
    assert not agent.acts_here(action, frozenset({"w1-0"}))
    assert agent.needs_dcs(_local("w1-0", False, None, 0.1))

"""The supervisor's decisions on frozen snapshots (no processes needed)."""

from __future__ import annotations

import math

from orchestrator.runtime.supervisor import GroupSnapshot, MemberView, decide


def view(name: str, patroni: bool = True, postmaster: int | None = 100, dead_for: float = 0.0) -> MemberView:
    return MemberView(name, patroni, postmaster, dead_for, math.inf)


def test_healthy_group_needs_nothing() -> None:
    assert decide(GroupSnapshot("w1", "w1-0", (view("w1-0"), view("w1-1")))).kind == "none"


def test_orphaned_primary_is_fenced_before_anything_else() -> None:
    action = decide(GroupSnapshot("w1", "w1-0", (view("w1-0", patroni=False, postmaster=42), view("w1-1"))))
    assert (action.kind, action.member) == ("fence", "w1-0")
    assert "cannot acknowledge commits" in action.reason


def test_dead_leader_key_is_released_when_a_peer_lives() -> None:
    action = decide(GroupSnapshot("w1", "w1-0", (view("w1-0", patroni=False, postmaster=None), view("w1-1"))))
    assert (action.kind, action.member) == ("release_leader", "w1-0")


def test_dead_leader_without_peers_is_restarted_in_place() -> None:
    snap = GroupSnapshot("w1", "w1-0", (view("w1-0", False, None), view("w1-1", False, None)))
    assert (decide(snap).kind, decide(snap).member) == ("restart", "w1-0")


def test_old_leader_waits_for_the_election_then_rejoins() -> None:
    leaderless = GroupSnapshot("w1", None, (view("w1-0", False, None, dead_for=1.0), view("w1-1")))
    assert decide(leaderless).kind == "none"  # the standby must win first: the ex-leader could race it
    after = GroupSnapshot("w1", "w1-1", (view("w1-0", False, None, dead_for=2.0), view("w1-1")))
    assert (decide(after).kind, decide(after).member) == ("restart", "w1-0")


def test_restart_backs_off() -> None:
    recent = MemberView("w1-1", False, None, 1.0, 0.5)
    assert decide(GroupSnapshot("w1", "w1-0", (view("w1-0"), recent))).kind == "none"


def test_with_every_patroni_alive_the_leader_does_not_matter() -> None:
    """Why the supervisor reads the leader key only when a Patroni is down: with all alive, every
    leader value (none, a member, a stranger) gives the same decision."""
    members = (view("w1-0"), view("w1-1", postmaster=None), view("w1-2", postmaster=7))
    for leader in (None, "w1-0", "w1-1", "w1-2", "elsewhere"):
        assert decide(GroupSnapshot("w1", leader, members)).kind == "none"

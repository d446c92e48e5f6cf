"""The foreign servers' host order on a multi-host cluster (orchestrator/fdwroute.py), decided
without servers: the DCS's leader first, members whose lease expired left out, and never an empty
list."""

from __future__ import annotations

from orchestrator.fdwroute import GroupDcs, route, snapshot
from orchestrator.planner import same_server
from orchestrator.topology import WORKER, Group, Member

MEMBERS = (Member("w1-0", "10.0.0.1", 5433), Member("w1-1", "10.0.0.2", 5433), Member("w1-2", "10.0.0.3", 5434))


def test_leader_first_then_registered_members_in_topology_order() -> None:
    dcs = GroupDcs("w1-2", frozenset({"w1-0", "w1-1", "w1-2"}))
    assert route(MEMBERS, dcs) == ("10.0.0.3,10.0.0.1,10.0.0.2", "5434,5433,5433")


def test_a_member_whose_lease_expired_is_left_out_until_it_registers_again() -> None:
    # the old primary's host was cut off: its member key expired with its lease; no leader yet
    assert route(MEMBERS, GroupDcs(None, frozenset({"w1-1", "w1-2"}))) == ("10.0.0.2,10.0.0.3", "5433,5434")
    # the replica promoted: it leads; the old primary back as a replica comes last
    assert route(MEMBERS, GroupDcs("w1-1", frozenset({"w1-1", "w1-2"}))) == ("10.0.0.2,10.0.0.3", "5433,5434")
    assert route(MEMBERS, GroupDcs("w1-1", frozenset(MEMBERS[i].name for i in range(3))))[0] == "10.0.0.2,10.0.0.1,10.0.0.3"


def test_a_leader_without_a_member_key_still_leads_and_no_keys_keep_every_member() -> None:
    assert route(MEMBERS, GroupDcs("w1-0", frozenset()))[0] == "10.0.0.1"
    assert route(MEMBERS, GroupDcs(None, frozenset())) == ("10.0.0.1,10.0.0.2,10.0.0.3", "5433,5433,5434")


def test_snapshot_reads_leader_and_member_keys_of_each_group_only() -> None:
    g = Group("w1", WORKER, MEMBERS[:2])
    keys = {
        "/c/w1/leader": "w1-1",
        "/c/w1/members/w1-0": "{}",
        "/c/w1/members/w1-1": "{}",
        "/c/w1/members/stranger": "{}",  # not a member of the topology: ignored
        "/c/w10/members/w1-0": "{}",  # another group whose name starts alike
        "/c/w2/leader": "w2-0",
    }
    assert snapshot(keys, "/c/", [g]) == {"w1": GroupDcs("w1-1", frozenset({"w1-0", "w1-1"}))}
    assert snapshot({"/c/w1/leader": "stranger"}, "/c/", [g]) == {"w1": GroupDcs(None, frozenset())}


def test_setup_does_not_undo_the_order() -> None:
    assert same_server(("10.0.0.2,10.0.0.1", "5433,5432", "db"), ("10.0.0.1,10.0.0.2", "5432,5433", "db"))
    assert not same_server(("10.0.0.2,10.0.0.1", "5432,5433", "db"), ("10.0.0.1,10.0.0.2", "5432,5433", "db"))
    assert not same_server(("10.0.0.1", "5432", "db"), ("10.0.0.1,10.0.0.2", "5432,5433", "db"))


def test_fdw_liveness_is_short_only_for_workers_on_other_hosts() -> None:
    from orchestrator.connections import LIVENESS_PARAMS
    from orchestrator.executor import FDW_LIVENESS, fdw_liveness

    assert fdw_liveness("127.0.0.1,127.0.0.1") == LIVENESS_PARAMS  # local clusters: as before
    assert fdw_liveness("10.0.0.1,10.0.0.2")["tcp_user_timeout"] == FDW_LIVENESS["tcp_user_timeout"] == "3000"
    assert fdw_liveness("127.0.0.1,10.0.0.2") == FDW_LIVENESS

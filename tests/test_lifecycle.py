"""Lifecycle of the local runtime: down stops every server by PID, up restarts and keeps data,
a second up changes nothing; servers run as the unprivileged user; secrets are private."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from orchestrator import cluster
from orchestrator.osuser import service_user
from orchestrator.runtime import local
from orchestrator.runtime.ports import is_listening
from tests.harness import ClusterHandle, write_csv


def _pids(handle: ClusterHandle) -> dict[str, int | None]:
    topo = handle.topology
    return {lm.name: local.pid_of(lm.data_dir) for _, lm in cluster.local_members(handle.directory, topo, service_user())}


def test_down_up_keeps_data_and_second_up_is_a_no_op(main_cluster: ClusterHandle, token: str, tmp_path: Path) -> None:
    b = f"t{token}"
    main_cluster.run_cli("ingest", str(write_csv(tmp_path / "x.csv", [(b, "el", "2023-01-01 00:00:00+00", 42.0)])))
    before = _pids(main_cluster)
    assert all(before.values())

    out = main_cluster.run_cli("down")
    assert sum(f"{name}: stopped" in out.stderr for name in before) == len(before)
    assert "task runner: stopped" in out.stderr  # the background task runner `up` started
    assert not any(_pids(main_cluster).values())
    for g in main_cluster.topology.groups:
        for m in g.members:
            assert not is_listening(m.host, m.port)
            assert not (g.managed and before[m.name] and _alive(before[m.name]))

    main_cluster.run_cli("up")
    after = _pids(main_cluster)
    assert all(after.values()) and set(after.values()).isdisjoint(before.values())
    with main_cluster.coordinator() as conn:
        assert conn.execute("SELECT kwh FROM readings WHERE building = %s", (b,)).fetchall() == [(42.0,)]

    again = main_cluster.run_cli("up")
    assert "already running" in again.stderr and "up to date" in again.stderr
    assert _pids(main_cluster) == after


def _alive(pid: int | None) -> bool:
    """Running (a zombie waiting for its reaper does not count)."""
    if pid is None:
        return False
    try:
        state = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("State:"))
    except FileNotFoundError:
        return False
    return "zombie" not in state


def test_servers_run_unprivileged_and_secrets_are_private(main_cluster: ClusterHandle) -> None:
    user = service_user()
    for name, pid in _pids(main_cluster).items():
        assert pid is not None
        status = Path(f"/proc/{pid}/status").read_text()
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        assert uid == user.uid, f"{name} runs as uid {uid}"
        if os.geteuid() == 0:
            assert uid != 0
    creds = main_cluster.directory / "credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert json.loads(creds.read_text())["app_password"]
    for _, lm in cluster.local_members(main_cluster.directory, main_cluster.topology, user):
        hba = (lm.data_dir / "pg_hba.conf").read_text()
        rules = [ln.split() for ln in hba.splitlines() if ln.strip() and not ln.startswith("#")]
        assert rules and all(r[-1] == "scram-sha-256" for r in rules)


def test_app_role_is_not_superuser_and_password_is_checked(main_cluster: ClusterHandle) -> None:
    import psycopg

    from orchestrator.connections import app_target

    topo, creds = main_cluster.topology, main_cluster.creds
    with main_cluster.coordinator(admin=False) as conn:
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)
    wrong = app_target(topo.coordinator, creds)
    bad = psycopg.conninfo.make_conninfo(wrong.conninfo("test"), password="wrong")
    try:
        psycopg.connect(bad).close()
    except psycopg.OperationalError as exc:
        assert "password authentication failed" in str(exc)
    else:
        raise AssertionError("a wrong password was accepted")

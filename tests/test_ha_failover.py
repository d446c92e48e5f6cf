"""Replication and failover with real Patroni, etcd and PostgreSQL, on the session's HA cluster
(coordinator + 2 workers, one synchronous replica each; conftest.ha_dir); the failover supervisor
runs as it does after `buildsmart up`."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

import orchestrator.cli.ha_cmds  # noqa: F401  (registers switchover/failover on the app)
from orchestrator import topology
from orchestrator.cli.app import app
from orchestrator.connections import Target, connect, superuser_target
from orchestrator.exceptions import BuildSmartError
from orchestrator.runtime import ha, hasettings, identity
from tests import ha_tools

SPLIT_POINTS = ["b3", "b6", "t", "u"]
RECOVERY_TARGET_S = 5.0


@pytest.fixture
def healthy(ha_dir: Path) -> Path:
    ha_tools.wait_healthy(ha_dir)
    return ha_dir


def _prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}_"  # sorts into the fragment [t, u)


def _count(directory: Path, prefix: str, timeout_s: float = 30.0) -> tuple[int, int]:
    """Rows of ``prefix`` through the coordinator, retrying while a rejoining member bounces connections."""
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with connect(superuser_target(topo.coordinator, creds), "ha-test", autocommit=True, search_path=None) as conn:
                return ha_tools.count_rows(conn, prefix)
        except (psycopg.Error, Exception) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"coordinator query still failing: {exc}") from exc
            time.sleep(0.3)


def _runner_elected(directory: Path, timeout_s: float = 30.0) -> str:
    """The session holding the task runner's election lock on the coordinator's current primary."""
    from orchestrator.tasks.runner import ELECTION_LOCK

    topo, creds = topology.load(directory), topology.load_credentials(directory)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with connect(superuser_target(topo.coordinator, creds), "ha-test", autocommit=True, search_path=None) as conn:
                row = conn.execute(
                    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.classid = %s AND l.granted",
                    (ELECTION_LOCK,),
                ).fetchone()
                if row is not None:
                    return str(row[0])
        except (psycopg.Error, BuildSmartError):
            pass  # the coordinator is failing over
        assert time.monotonic() < deadline, "no task runner holds the election lock on the coordinator primary"
        time.sleep(0.3)


def _crash_primary_under_load(directory: Path, group: str, prefix: str) -> None:
    runner = _runner_elected(directory) if group == "coordinator" else None
    writer = ha_tools.Writer(directory, prefix, rows=500).start()
    writer.wait_acked(10)
    old = ha_tools.leader(directory, group)
    t0 = ha_tools.kill9(ha_tools.members(directory)[old])
    new = ha_tools.wait_leader(directory, group, not_member=old, timeout_s=30)
    writer.wait_acked(writer.acked + 10, timeout_s=60)
    writer.finish()
    recovery = writer.recovery_after(t0)
    failed = len(writer.failures_after(t0))
    print(f"{group}: {old} killed, {new} leads; first write after {recovery} s, {failed} failed attempts")
    assert recovery is not None and recovery < RECOVERY_TARGET_S, f"writes resumed only after {recovery} s"
    assert _count(directory, prefix) == (writer.acked * writer.rows,) * 2, "every acknowledged row exactly once"
    if runner is not None:  # the task runner lost its lock session with the old primary and is elected again
        assert _runner_elected(directory, timeout_s=60) == runner
    ha_tools.wait_member_state(directory, old, "replica", timeout_s=60)  # rejoined (pg_rewind when diverged)


def test_worker_primary_crash_under_load(healthy: Path) -> None:
    prefix = _prefix()
    _crash_primary_under_load(healthy, ha_tools.worker_of(healthy, prefix), prefix)


def test_coordinator_primary_crash_under_load(healthy: Path) -> None:
    _crash_primary_under_load(healthy, "coordinator", _prefix())


def test_patroni_killed_alone_no_split_brain(healthy: Path) -> None:
    """kill -9 of Patroni only on a worker primary: the supervisor fences the orphaned postmaster before
    a replica is promoted, so everything the old primary acknowledged is on the new one."""
    directory = healthy
    group = ha_tools.worker_of(directory, "t")
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    with connect(superuser_target(topo.group(group), creds), "ha-test", autocommit=True, search_path=None) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS public.ha_probe (id bigint PRIMARY KEY)")
        conn.execute("TRUNCATE public.ha_probe")
    old = ha_tools.leader(directory, group)
    member = topo.group(group).members[[m.name for m in topo.group(group).members].index(old)]
    direct = Target(group, member.host, str(member.port), "buildsmart", creds.superuser, creds.superuser_password)
    acked: list[int] = []
    stop = threading.Event()

    def probe() -> None:
        """Commit ids on the OLD primary only (no failover in the conninfo) until told to stop."""
        next_id = 0
        while not stop.is_set():
            try:
                with psycopg.connect(direct.conninfo("ha-probe", primary=False), autocommit=True, connect_timeout=2) as c:
                    while not stop.is_set():
                        c.execute("INSERT INTO public.ha_probe VALUES (%s)", (next_id,))
                        acked.append(next_id)
                        next_id += 1
            except psycopg.Error:
                next_id += 1  # an id whose commit failed is never reused: it may or may not exist
                time.sleep(0.05)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    time.sleep(0.5)
    pm = ha_tools.members(directory)[old]
    postmaster = pm.postmaster_pid()
    ha_tools.kill9(pm, patroni=True, postgres=False)
    new = ha_tools.wait_leader(directory, group, not_member=old, timeout_s=30)
    time.sleep(3.0)  # keep trying to commit on the old primary well after the promotion
    stop.set()
    thread.join(10)
    assert acked, "the probe never committed on the old primary"
    assert not identity.alive(postmaster), "the orphaned postmaster still runs"
    with connect(superuser_target(topo.group(group), creds), "ha-test", autocommit=True, search_path=None) as conn:
        present = {r[0] for r in conn.execute("SELECT id FROM public.ha_probe").fetchall()}
    lost = sorted(set(acked) - present)
    print(f"{group}: Patroni of {old} killed; {new} promoted; {len(acked)} commits acknowledged by {old}, lost {len(lost)}")
    assert not lost, f"commits acknowledged by the old primary are missing on the new one: {lost[:10]}"
    ha_tools.wait_member_state(directory, old, "replica", timeout_s=60)


def test_replica_loss_writes_continue_and_it_catches_up(healthy: Path) -> None:
    directory = healthy
    prefix = _prefix()
    group = ha_tools.worker_of(directory, prefix)
    leader = ha_tools.leader(directory, group)
    replica = next(m.name for m in topology.load(directory).group(group).members if m.name != leader)
    writer = ha_tools.Writer(directory, prefix, rows=500).start()
    writer.wait_acked(10)
    t0 = ha_tools.kill9(ha_tools.members(directory)[replica])
    writer.wait_acked(writer.acked + 20, timeout_s=30)
    recovery = writer.recovery_after(t0)
    assert recovery is not None and recovery < RECOVERY_TARGET_S, f"writes stalled {recovery} s after losing the replica"
    assert ha_tools.leader(directory, group) == leader, "losing a replica must not move the primary"
    ha_tools.wait_member_state(directory, replica, "replica", timeout_s=60)
    writer.finish()
    assert _count(directory, prefix) == (writer.acked * writer.rows,) * 2
    ha_tools.wait_healthy(directory)
    status = ha.group_members_status(directory, group)
    back = next(m for m in status if m["name"] == replica)
    assert back["state"] == "streaming" and back["sync"], back


def test_switchover_under_load_retries_at_most_one_batch(healthy: Path) -> None:
    directory = healthy
    prefix = _prefix()
    group = ha_tools.worker_of(directory, prefix)
    old = ha_tools.leader(directory, group)
    writer = ha_tools.Writer(directory, prefix, rows=500).start()
    writer.wait_acked(10)
    t0 = time.monotonic()
    result = CliRunner().invoke(app, ["switchover", group, "--dir", str(directory)])
    assert result.exit_code == 0, result.output
    writer.wait_acked(writer.acked + 10, timeout_s=30)
    writer.finish()
    assert ha_tools.leader(directory, group) != old
    retried = {a.batch for a in writer.failures_after(t0)}
    print(
        f"{group}: switchover {old} -> {ha_tools.leader(directory, group)}; first write after {writer.recovery_after(t0):.2f} s"
    )
    assert len(retried) <= 1, f"more than one batch needed a retry: {sorted(retried)}"
    assert _count(directory, prefix) == (writer.acked * writer.rows,) * 2
    ha_tools.wait_member_state(directory, old, "replica", timeout_s=60)


def test_cli_failover_and_member_status(healthy: Path) -> None:
    directory = healthy
    old = ha_tools.leader(directory, "w1")
    result = CliRunner().invoke(app, ["failover", "w1", "--dir", str(directory)])
    assert result.exit_code == 0, result.output
    assert ha_tools.leader(directory, "w1") != old
    ha_tools.wait_member_state(directory, old, "replica", timeout_s=60)
    ha_tools.wait_healthy(directory)
    status = ha.group_members_status(directory, "w1")
    assert sorted(str(m["role"]) for m in status) == ["leader", "sync_standby"]
    assert all(m["timeline"] and m["timeline"] >= 2 for m in status)
    assert hasettings.load(directory).synchronous == "on"


def test_ingest_survives_worker_primary_crash(healthy: Path, tmp_path: Path) -> None:
    """kill -9 of a worker primary (postgres + Patroni) while `buildsmart ingest` loads 600k rows:
    the ingest finishes by itself and every row is there exactly once."""
    directory = healthy
    prefix = _prefix()
    group = ha_tools.worker_of(directory, prefix)
    rows = 600_000
    path = tmp_path / "load.csv"
    with path.open("w") as fh:
        fh.write("building,meter,ts,kwh\n")
        for i in range(rows):
            fh.write(f"{prefix}{i % 20},m,{_ts(i // 20)},{i}\n")
    cmd = [sys.executable, "-m", "orchestrator", "ingest", str(path), "--batch-rows", "50000", "--dir", str(directory)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        assert proc.poll() is None, "the ingest finished before the kill; make the load bigger"
        old = ha_tools.leader(directory, group)
        ha_tools.kill9(ha_tools.members(directory)[old])
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"ingest failed after the crash:\n{out}\n{err}"
    assert _count(directory, prefix) == (rows, rows)
    ha_tools.wait_member_state(directory, old, "replica", timeout_s=60)


def _ts(second: int) -> str:
    return f"2026-02-{1 + second // 86400:02d} {second // 3600 % 24:02d}:{second // 60 % 60:02d}:{second % 60:02d}+00"

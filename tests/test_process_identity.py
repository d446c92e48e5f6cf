"""Process identity (issue 12 items 3-4): nothing is signalled unless executable, the argument that
names the member and the start time all match; a live decoy holding a recycled PID survives every
stop and fence; Patroni liveness is not a substring match; daemons cannot be hijacked through the
current directory; chown never follows links; failover refuses a non-synchronous replica."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from orchestrator import pgbin
from orchestrator.exceptions import ClusterStateError
from orchestrator.osuser import service_user
from orchestrator.runtime import identity, local, patroni, procs
from orchestrator.runtime.ha import choose_failover
from orchestrator.runtime.local import LocalMember
from orchestrator.topology import WORKER, Group, Member
from tests.harness import make_tmp_dir

PG = identity.resolve(pgbin.tool("postgres"))


def _obs(exe: str = PG, cmdline: tuple[str, ...] = (PG, "-D", "/d"), created: float = 1000.0) -> identity.Observed:
    return identity.Observed(42, exe, cmdline, created, False)


def _exp(started: float | None = 1000.0, args: tuple[tuple[str, ...], ...] = (("-D", "/d"),)) -> identity.Expected:
    return identity.Expected("postmaster of t", frozenset({PG}), args, started)


def test_judge_accepts_only_the_full_identity() -> None:
    assert identity.judge(_obs(), _exp()).ok
    assert identity.judge(_obs(created=1001.5), _exp()).ok, "postmaster.pid keeps whole seconds"
    assert not identity.judge(None, _exp()).ok
    assert not identity.judge(_obs(exe="/usr/bin/python3.11"), _exp()).ok
    assert not identity.judge(_obs(cmdline=(PG, "-D", "/other")), _exp()).ok
    assert not identity.judge(_obs(cmdline=(PG, "-D/d")), _exp()).ok, "the argument pair must be exact"
    verdict = identity.judge(_obs(created=1500.0), _exp())
    assert not verdict.ok and "reused" in verdict.reason
    assert not identity.judge(identity.Observed(42, PG, (PG, "-D", "/d"), 1000.0, True), _exp()).ok


def test_patroni_liveness_is_not_a_substring_match() -> None:
    cfg = "/srv/w1-0/patroni.yml"
    exp = identity.Expected("Patroni of w1-0", frozenset({"/usr/bin/python3"}), (("-m", "patroni"), (cfg,)), None)
    for cmdline in (
        ("/usr/bin/python3", "-m", "patroni", "/srv/w1-1/patroni.yml"),  # another member's Patroni
        ("/usr/bin/python3", "-m", "patroni", cfg + ".bak"),
        ("/usr/bin/python3", "-c", f"print('{cfg}')"),  # any command line merely containing the path
    ):
        assert not identity.judge(identity.Observed(7, "/usr/bin/python3", cmdline, 0.0, False), exp).ok, cmdline
    ok = ("/usr/bin/python3", "-I", "-m", "patroni", cfg)
    assert identity.judge(identity.Observed(7, "/usr/bin/python3", ok, 0.0, False), exp).ok


@pytest.fixture
def member_dir() -> Iterator[Path]:
    base = make_tmp_dir("bs-ident-")
    (base / "w9-0" / "data").mkdir(parents=True)
    yield base
    import shutil

    shutil.rmtree(base, ignore_errors=True)


def _decoy(*argv: str) -> subprocess.Popen[bytes]:
    """A live process that is NOT ours, to stand for whatever now holds a recycled PID."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *argv])
    time.sleep(0.2)
    return proc


def _write_postmaster_pid(data_dir: Path, pid: int, started: float) -> None:
    # the layout PostgreSQL writes: pid, data dir, start time (epoch s), port, socket dir, ...
    (data_dir / "postmaster.pid").write_text(f"{pid}\n{data_dir}\n{int(started)}\n5432\n\n")


def test_a_decoy_holding_a_recycled_postmaster_pid_is_never_signalled(member_dir: Path) -> None:
    data = member_dir / "w9-0" / "data"
    # even with "-D DATA_DIR" on its command line and the right start time, it is not postgres
    decoy = _decoy("-D", str(data))
    try:
        _write_postmaster_pid(data, decoy.pid, psutil.Process(decoy.pid).create_time())
        lm = LocalMember(Member("w9-0", "127.0.0.1", 1), data, member_dir / "w9-0" / "postgres.log")
        user = service_user()
        assert local.pid_of(data) is None
        assert local.stop(lm, user, mode="immediate") is False
        pm = patroni.PatroniMember(Group("w9", WORKER, (lm.member,)), lm)
        assert patroni.fence(pm, user) is False
        assert patroni.stop(pm, user) is False
        time.sleep(0.3)
        assert decoy.poll() is None, "the decoy holding the recycled PID was killed"
    finally:
        decoy.kill()
        decoy.wait()


def test_a_recycled_pid_of_our_own_kind_is_caught_by_its_start_time(member_dir: Path) -> None:
    """Same executable, same arguments, wrong start time: still not ours (PID reuse)."""
    cfg = member_dir / "w9-0" / "patroni.yml"
    decoy = subprocess.Popen([patroni.patroni_python(), "-c", "import time; time.sleep(120)", "-m", "patroni", str(cfg)])
    time.sleep(0.2)
    try:
        pid_file = member_dir / "w9-0" / "patroni.pid"
        started = psutil.Process(decoy.pid).create_time()
        pid_file.write_text(f"{decoy.pid} {started - 600:.3f}\n")  # recorded 10 minutes before this process started
        lm = LocalMember(Member("w9-0", "127.0.0.1", 1), member_dir / "w9-0" / "data", member_dir / "w9-0" / "postgres.log")
        pm = patroni.PatroniMember(Group("w9", WORKER, (lm.member,)), lm)
        assert pm.patroni() is None
        assert patroni.stop(pm, service_user()) is False
        pid_file.write_text(f"{decoy.pid} {started:.3f}\n")  # the true record: now it is verified
        assert pm.patroni() is not None and pm.patroni_pid() == decoy.pid
        assert decoy.poll() is None
        assert procs.stop(pm.patroni(), 5) is True
        assert decoy.wait(5) is not None
    finally:
        if decoy.poll() is None:
            decoy.kill()
            decoy.wait()


def test_daemons_start_isolated_from_the_current_directory(tmp_path: Path) -> None:
    """A module planted in root's current directory is not imported in place of ours."""
    planted = tmp_path / "orchestrator"
    planted.mkdir()
    marker = tmp_path / "hijacked"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(0)\n")
    argv = procs.python_module("orchestrator.runtime.identity")
    assert argv[1:3] == ["-I", "-m"]
    subprocess.run(argv, cwd=tmp_path, check=True, capture_output=True)
    assert not marker.exists(), "python -I -m imported the planted module"
    # the same command without -I does import it: the check above can fail
    subprocess.run([sys.executable, "-m", "orchestrator.runtime.identity"], cwd=tmp_path, check=False, capture_output=True)
    assert marker.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to the service user needs root")
def test_recursive_chown_does_not_follow_links(tmp_path: Path) -> None:
    user = service_user()
    secret = tmp_path / "secret"
    secret.write_text("root's")
    secret_dir = tmp_path / "secret_dir"
    secret_dir.mkdir()
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file").write_text("x")
    (tree / "link").symlink_to(secret)
    (tree / "sub" / "dirlink").symlink_to(secret_dir)
    top_link = tmp_path / "toplink"
    top_link.symlink_to(secret_dir)
    user.chown(tree)
    user.chown(top_link)
    assert (tree / "sub" / "file").stat().st_uid == user.uid
    assert os.lstat(tree / "link").st_uid == user.uid
    assert secret.stat().st_uid == 0 and secret_dir.stat().st_uid == 0, "chown followed a symbolic link"


def test_failover_refuses_a_replica_that_is_not_the_synchronous_standby() -> None:
    members = [
        {"name": "w1-0", "role": "leader", "state": "running"},
        {"name": "w1-1", "role": "sync_standby", "state": "streaming", "lag": 0},
        {"name": "w1-2", "role": "replica", "state": "streaming", "lag": 4096},
    ]
    assert choose_failover("w1", "w1-0", members, None, False).candidate == "w1-1"
    refused = choose_failover("w1", "w1-0", members, "w1-2", False)
    assert refused.candidate is None and refused.refusal and "not the synchronous standby" in refused.refusal
    assert "w1-1" in refused.refusal and "--force" in refused.refusal
    assert choose_failover("w1", "w1-0", members, "w1-2", True).candidate == "w1-2"
    no_sync = [members[0], {**members[1], "role": "replica", "lag": 100}, members[2]]
    refused = choose_failover("w1", "w1-0", no_sync, None, False)
    assert refused.candidate is None and refused.refusal and "no member is the synchronous standby" in refused.refusal
    assert choose_failover("w1", "w1-0", no_sync, None, True).candidate == "w1-1", "forced: the least lag"
    assert choose_failover("w1", "w1-0", members, "w1-0", True).candidate is None


def test_failover_refuses_the_leader_and_unknown_members_on_a_live_group(ha_dir: Path) -> None:
    """On the session's Patroni cluster (one replica, so no non-synchronous replica to refuse: the
    pure test above covers that): promoting the leader or a member that does not exist is refused."""
    from orchestrator import runtime, topology
    from orchestrator.runtime import ha

    topo = topology.load(ha_dir)
    settings = runtime.for_cluster(ha_dir, topo).ha()
    assert settings is not None
    group = topo.group("w1")
    leader = ha.leader_of(topo, group, settings)
    with pytest.raises(ClusterStateError, match="already leads"):
        ha.failover(topo, group, settings, leader)
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "failover", "w1", "--to", "w1-9", "--dir", str(ha_dir)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "w1-9" in proc.stderr + proc.stdout

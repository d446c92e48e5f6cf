"""`down --purge` never deletes data under a running server, and tolerates files vanishing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import cluster
from orchestrator.exceptions import ClusterStateError


def test_purge_refuses_while_a_server_works_in_a_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "c" / "nodes" / "w1-0" / "data"
    data.mkdir(parents=True)
    # a process whose working directory is the data directory, named by its postmaster.pid
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=data)
    try:
        (data / "postmaster.pid").write_text(f"{proc.pid}\n{data}\n")
        monkeypatch.setattr(cluster, "PURGE_WAIT_S", 0.5)
        with pytest.raises(ClusterStateError, match=rf"PostgreSQL still runs on its data \(pid {proc.pid}"):
            cluster._purge(tmp_path / "c", True, lambda _m: None)
        assert (data / "postmaster.pid").exists(), "nothing may be deleted while the server runs"
    finally:
        proc.kill()
        proc.wait()
    said: list[str] = []
    cluster._purge(tmp_path / "c", True, said.append)  # a stale pid file of a dead server is no obstacle
    assert not (tmp_path / "c").exists() and said == [f"purged {tmp_path / 'c'}"]

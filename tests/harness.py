"""Test harness: one real cluster per shape for the whole session (Citus' style), helpers to
reach its nodes, and per-test cleanup of what each test made."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg

from orchestrator import cluster, topology
from orchestrator.connections import app_target, connect, superuser_target
from orchestrator.topology import Credentials, Topology

REPO = Path(__file__).resolve().parent.parent


def _shared_data() -> Path:
    """The project's shared data sets: $BUILDSMART_SHARED_DATA, else ../shared/data beside the
    checkout (as CI lays it out), else /work/shared/data."""
    for candidate in (os.environ.get("BUILDSMART_SHARED_DATA"), REPO.parent / "shared" / "data", "/work/shared/data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return REPO.parent / "shared" / "data"


SHARED_DATA = _shared_data()


def make_tmp_dir(prefix: str) -> Path:
    """A temp dir the unprivileged service user can traverse (pytest's own are 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("BUILDSMART_TEST_TMP")))
    path.chmod(0o755)
    return path


@dataclass
class ClusterHandle:
    directory: Path

    @property
    def topology(self) -> Topology:
        return topology.load(self.directory)

    @property
    def creds(self) -> Credentials:
        return topology.load_credentials(self.directory)

    @contextmanager
    def coordinator(self, admin: bool = True) -> Iterator[psycopg.Connection]:
        topo, creds = self.topology, self.creds
        target = superuser_target(topo.coordinator, creds) if admin else app_target(topo.coordinator, creds)
        with connect(target, "test", autocommit=True, search_path=None) as conn:  # a client: default search_path
            yield conn

    @contextmanager
    def worker(self, name: str) -> Iterator[psycopg.Connection]:
        topo, creds = self.topology, self.creds
        with connect(superuser_target(topo.group(name), creds), "test", autocommit=True, search_path=None) as conn:
            yield conn

    def run_cli(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``buildsmart ARGS --dir DIR`` as a user would; returns the finished process."""
        cmd = [sys.executable, "-m", "orchestrator", *args, "--dir", str(self.directory)]
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=600, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc


def write_csv(path: Path, rows: list[tuple[str, str, str, float | str]], header: str = "building,meter,ts,kwh") -> Path:
    lines = [header] + [f"{b},{m},{t},{k}" for b, m, t, k in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_cluster(
    prefix: str, workers: int, split_points: list[str] | None, replicas: int = 0, balancer: bool = False
) -> ClusterHandle:
    """Start a local cluster; on failure, stop whatever it started before re-raising. The
    background balancer starts paused unless ``balancer`` (tests that move fragments themselves
    must not race it); the task runner runs either way."""
    directory = make_tmp_dir(prefix) / "cluster"
    handle = ClusterHandle(directory)
    try:
        cluster.up(directory, workers=workers, split_points=split_points, replicas=replicas, balancer_paused=not balancer)
    except BaseException:
        stop_cluster(handle)
        raise
    return handle


def stop_cluster(handle: ClusterHandle) -> None:
    """Stop the cluster, then make sure nothing started for it is left: a leftover process is
    stopped by its PID and reported as a failure."""
    root = str(handle.directory.parent)
    if topology.exists(handle.directory):
        cluster.down(handle.directory, purge=True)
    leftovers = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if root in cmdline and proc.pid != os.getpid():
            leftovers.append(f"{proc.pid}: {cmdline[:120]}")
            with suppress(psutil.NoSuchProcess):
                proc.kill()
    if leftovers:
        raise AssertionError("processes left running after `down`:\n" + "\n".join(leftovers))
    shutil.rmtree(handle.directory.parent, ignore_errors=True)

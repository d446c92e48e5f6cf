"""The wheel is enough on its own: built from this checkout, installed with pip into a clean venv
(one the unprivileged server user can run), it brings a cluster up with ``--serve`` (the C module
compiled at ``up`` from the packaged sources), ingests the packaged sample, serves and goes down
again, ``down`` stopping the server too — run
from a directory outside the checkout, so nothing is read from it.

Slow (4-6 minutes on the shared 2-core machine, most of it pip installing the dependencies)."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from orchestrator.runtime.identity import read_pid_file
from orchestrator.runtime.ports import free_port
from tests.harness import REPO, make_tmp_dir

PASSWORD = "wheel-test-password"


def run(cmd: list[str], cwd: Path, stdin: str | None = None, timeout: float = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def fetch(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.slow
def test_wheel_in_a_clean_venv_runs_up_ingest_serve_and_down() -> None:
    tmp = make_tmp_dir("bs-wheel-")
    venv, directory, elsewhere = tmp / "venv", tmp / "cluster", tmp / "work"
    elsewhere.mkdir()
    bs = str(venv / "bin" / "buildsmart")
    try:
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(REPO), "-w", str(tmp / "dist")], cwd=elsewhere)
        wheel = next((tmp / "dist").glob("buildsmartdb-*.whl"))
        run(["/usr/bin/python3", "-m", "venv", str(venv)], cwd=elsewhere)
        pip = [str(venv / "bin" / "pip"), "install", "-q", "--no-compile", "--disable-pip-version-check"]
        run([*pip, str(wheel)], cwd=elsewhere)

        where = run(
            [str(venv / "bin" / "python"), "-c",
             "import orchestrator, orchestrator.resources as r; print(orchestrator.__file__); print(r.path('sql')); "
             "print(r.path('samples'))"],
            cwd=elsewhere,
        ).split("\n")[:3]  # fmt: skip
        assert all(p.startswith(str(venv)) for p in where), where  # nothing from the checkout
        sample = Path(where[2]) / "cambridge-2023-sample.csv.gz"
        assert (Path(where[1]) / "src" / "dist_planner.c").exists()

        port = free_port()
        up = run([bs, "up", "--dir", str(directory), "--workers", "1", "--replicas", "0", "--no-mongo", "--serve", str(port)],
                 cwd=elsewhere)  # fmt: skip
        assert f"http://127.0.0.1:{port}/ui/" in up
        out = run([bs, "ingest", str(sample), "--dir", str(directory)], cwd=elsewhere)
        assert "122,640 rows" in out and "rejected 0" in out
        run([bs, "users", "add", "ops", "--rights", "write", "--password-stdin", "--dir", str(directory)],
            cwd=elsewhere, stdin=PASSWORD + "\n")  # fmt: skip
        again = run([bs, "serve", "--detach", "--port", str(port), "--dir", str(directory)], cwd=elsewhere)
        assert "running (pid" in again  # the one `up --serve` started, not a second one
        pid, _started = read_pid_file(directory / "serve.pid")  # "PID START-TIME" (process identity)
        assert pid is not None
        url = f"http://127.0.0.1:{port}"
        auth = {"Authorization": "Basic " + base64.b64encode(f"ops:{PASSWORD}".encode()).decode()}
        assert fetch(f"{url}/api/about")[0] == 401
        status, body = fetch(f"{url}/metrics", auth)
        assert status == 200 and b'buildsmart_node_up{node="w1",role="worker"} 1.0' in body
        status, body = fetch(f"{url}/ingest", {**auth, "Content-Type": "text/csv"},
                             b"building,meter,ts,kwh\nb0,electricity,2024-01-01 00:00:00+00,1.5\n")  # fmt: skip
        assert status == 200 and b'"inserted":1' in body, body
        status, page = fetch(f"{url}/static/uPlot.iife.min.js")
        assert status == 200 and len(page) > 10_000

        out = run([bs, "down", "--purge", "--dir", str(directory)], cwd=elsewhere)
        assert f"buildsmart serve: stopped (pid {pid})" in out
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        if directory.exists():
            subprocess.run([bs, "down", "--purge", "--dir", str(directory)], cwd=elsewhere, capture_output=True, check=False)
        shutil.rmtree(tmp, ignore_errors=True)

"""The remote path: servers the orchestrator did not start, described by a spec file, set up with
`buildsmart init --spec`. The test starts plain PostgreSQL servers itself."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.osuser import service_user
from orchestrator.runtime import local
from orchestrator.runtime.ports import free_port
from orchestrator.topology import Credentials, Member
from tests.harness import ClusterHandle, make_tmp_dir, write_csv

SUPERUSER_PASSWORD = "remote-secret"


@pytest.fixture(scope="module")
def plain_servers() -> Iterator[tuple[Path, list[local.LocalMember]]]:
    base = make_tmp_dir("bs-remote-")
    user = service_user()
    creds = Credentials("postgres", SUPERUSER_PASSWORD, "unused", "unused")
    members = []
    for name in ("db0", "db1", "db2"):
        m = local.LocalMember(Member(name, "127.0.0.1", free_port()), base / name / "data", base / name / "log")
        local.initdb(m, user, creds)
        local.start(m, user)
        members.append(m)
    try:
        yield base, members
    finally:
        for m in members:
            local.stop(m, user, mode="immediate")
        shutil.rmtree(base, ignore_errors=True)


def test_init_from_spec_sets_up_servers_it_did_not_start(
    plain_servers: tuple[Path, list[local.LocalMember]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, (db0, db1, db2) = plain_servers
    spec = tmp_path / "cluster.toml"
    spec.write_text(
        f"""
[cluster]
name = "remote-test"
split_points = ["m"]

[credentials]
superuser = "postgres"
superuser_password_env = "TEST_SUPERUSER_PASSWORD"
app_user = "estate_app"

[coordinator]
host = "127.0.0.1"
port = {db0.member.port}

[[workers]]
name = "east"
hosts = ["127.0.0.1"]
ports = [{db1.member.port}]

[[workers]]
name = "west"
host = "127.0.0.1"
port = {db2.member.port}
"""
    )
    monkeypatch.setenv("TEST_SUPERUSER_PASSWORD", SUPERUSER_PASSWORD)
    handle = ClusterHandle(base / "state")
    proc = handle.run_cli("init", "--spec", str(spec))
    assert "initialised remote-test" in proc.stderr
    assert handle.run_cli("init", "--spec", str(spec)).stderr.count("up to date") == 1  # idempotent

    rows = [("alpha", "el", "2023-01-01 00:00:00+00", 1.0), ("zulu", "el", "2023-01-01 00:00:00+00", 2.0)]
    handle.run_cli("ingest", str(write_csv(tmp_path / "r.csv", rows)))
    with handle.worker("east") as conn:
        assert conn.execute("SELECT building FROM bsdata.readings_f1").fetchall() == [("alpha",)]
    with handle.worker("west") as conn:
        assert conn.execute("SELECT building FROM bsdata.readings_f2").fetchall() == [("zulu",)]
    with handle.coordinator(admin=False) as conn:
        assert conn.execute("SELECT current_user, sum(kwh) FROM readings GROUP BY 1").fetchall() == [("estate_app", 3.0)]
    # nothing was started by the orchestrator: `down` has nothing to stop
    assert "stopped" not in handle.run_cli("down").stderr


def test_spec_errors_are_clear(tmp_path: Path) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text("[coordinator]\nhost = 'x'\n")
    handle = ClusterHandle(tmp_path / "state")
    proc = handle.run_cli("init", "--spec", str(spec), check=False)
    assert proc.returncode == 2 and "at least one [[workers]]" in proc.stderr
    spec.write_text("[coordinator\nhost = 'x'\n")
    proc = handle.run_cli("init", "--spec", str(spec), check=False)
    assert proc.returncode == 2 and "bad.toml" in proc.stderr and "line 1" in proc.stderr

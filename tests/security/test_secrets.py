"""No password where PostgreSQL or a local user could read it, after a full lifecycle (up, ingest,
move, split, migrate) with every statement logged: not in server or orchestrator logs, not in
pg_user_mapping, pg_subscription or pg_authid, not in any file of the cluster directory (data
files and WAL included) but the two secret stores, which are mode 0600."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.elastic import migrate, move, split
from orchestrator.elastic.context import open_cluster
from tests.harness import ClusterHandle, start_cluster, stop_cluster, write_csv

SECRET_STORES = ("credentials.json", "nodes/pgpass")


@pytest.fixture(scope="module")
def scluster() -> Iterator[ClusterHandle]:
    handle = start_cluster("bs-sec-", workers=2, split_points=["b", "m"])
    try:
        yield handle
    finally:
        stop_cluster(handle)


def _nodes(handle: ClusterHandle) -> list[tuple[str, bool]]:
    topo = handle.topology
    return [(topo.coordinator.name, True), *((w.name, False) for w in topo.workers)]


def _log_everything(handle: ClusterHandle) -> None:
    for node, is_coord in _nodes(handle):
        with handle.coordinator() if is_coord else handle.worker(node) as conn:
            conn.execute("ALTER SYSTEM SET log_statement = 'all'")
            conn.execute("ALTER SYSTEM SET log_min_error_statement = 'error'")
            conn.execute("SELECT pg_reload_conf()")


def _files(directory: Path) -> Iterator[Path]:
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            yield path


@pytest.mark.slow
def test_no_password_anywhere_after_a_lifecycle(scluster: ClusterHandle, tmp_path: Path) -> None:
    handle = scluster
    creds = handle.creds
    passwords = {
        creds.superuser: creds.superuser_password,
        creds.app_user: creds.app_password,
        creds.ingest_user: creds.ingest_password,
        creds.fdw_user: creds.fdw_password,
    }
    _log_everything(handle)
    handle.run_cli("up")  # roles refreshed (ALTER ROLE), mappings checked
    rows = [(f"{b}{i:02d}", "electricity", f"2024-0{1 + h % 3}-0{1 + h % 9} 0{h % 10}:00:00+00", 1.0 + h)
            for b in ("a", "c", "p") for i in range(10) for h in range(12)]  # fmt: skip
    handle.run_cli("ingest", str(write_csv(tmp_path / "r.csv", rows)))
    with open_cluster(handle.directory) as el:
        frag = next(f for f in el.fragments() if f.range_to == "b")
        dst = "w2" if frag.node == "w1" else "w1"
        move.move_fragment(el, frag.fragment_id, dst)
        split.split_fragment(el, frag.fragment_id, "a05")
    migrate.run(handle.directory, "head")
    migrate.run(handle.directory, "base", downgrade=True)
    handle.run_cli("check")

    # the catalogs: verifiers only, mappings without passwords, no subscription holding one
    for node, is_coord in _nodes(handle):
        with handle.coordinator() if is_coord else handle.worker(node) as conn:
            stored = dict(conn.execute("SELECT rolname, rolpassword FROM pg_authid WHERE rolpassword IS NOT NULL").fetchall())
            assert stored, f"{node}: no role has a password"
            for role, secret in stored.items():
                assert secret.startswith("SCRAM-SHA-256$"), f"{node}: {role} has no SCRAM verifier"
            options = conn.execute(
                "SELECT coalesce(array_to_string(umoptions, ' '), '') FROM pg_user_mapping "
                "UNION ALL SELECT subconninfo FROM pg_subscription "
                "UNION ALL SELECT coalesce(array_to_string(srvoptions, ' '), '') FROM pg_foreign_server"
            ).fetchall()
            for (text,) in options:
                for role, pw in passwords.items():
                    assert pw not in text, f"{node}: the password of {role} is in a catalog: {text[:60]}..."

    # every file of the cluster: logs, configuration, data files and WAL
    logged = b""
    scanned = 0
    for path in _files(handle.directory):
        rel = path.relative_to(handle.directory).as_posix()
        data = path.read_bytes()
        scanned += 1
        if rel in SECRET_STORES:
            assert path.stat().st_mode & 0o077 == 0, f"{rel} is readable by others"
            continue
        for role, pw in passwords.items():
            assert pw.encode() not in data, f"the password of {role} is in {rel}"
        if path.suffix == ".log" or path.parent.name == "log":
            assert path.stat().st_mode & 0o077 == 0, f"log {rel} is readable by others ({oct(path.stat().st_mode)})"
            logged += data
    # the check above means something only if the statements were logged (those that carry a
    # verifier or a remote mapping's password are not: roles.unlogged)
    for statement in (b"CREATE SUBSCRIPTION", b"CREATE PUBLICATION", b"COPY", b"alembic_version"):
        assert statement in logged, f"no {statement.decode()} in the server logs: the lifecycle was not logged"
    print(f"scanned {scanned} files ({len(logged)} bytes of logs) for {len(passwords)} passwords")

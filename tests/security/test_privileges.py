"""Attacks as the application role, the other roles and a local unprivileged OS user, on the
session's plain cluster: each must fail (README: Security model; orchestrator/roles.py)."""

from __future__ import annotations

import os
import pwd
import re
import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from orchestrator import pgbin
from orchestrator.catalog import load_fragments
from orchestrator.connections import Target, app_target, connect, ingest_target
from orchestrator.exceptions import NodeError
from orchestrator.fragments import Router
from orchestrator.ingest.loader import ingest
from tests.harness import ClusterHandle, write_csv

# What a role that may create objects could plant: an exact match for the five-text format() call
# inside buildsmart.ensure_time_partitions (SECURITY DEFINER). With public on the path it would win
# over pg_catalog.format(text, VARIADIC "any") and run as the superuser.
PLANTED_FORMAT = "CREATE FUNCTION public.format(text, text, text, text, text) RETURNS text LANGUAGE sql AS 'SELECT 1::text'"
PLANT = """
CREATE SEQUENCE IF NOT EXISTS public.planted_calls;
CREATE OR REPLACE FUNCTION public.format(f text, a text, b text, c text, d text) RETURNS text
LANGUAGE sql AS $$ SELECT pg_catalog.nextval('public.planted_calls')::text || pg_catalog.format(f, a, b, c, d) $$;
CREATE OR REPLACE FUNCTION public.to_char(timestamp without time zone, text) RETURNS text
LANGUAGE sql AS $$ SELECT pg_catalog.nextval('public.planted_calls')::text || pg_catalog.to_char($1, $2) $$;
"""
UNPLANT = """
DROP FUNCTION IF EXISTS public.format(text, text, text, text, text);
DROP FUNCTION IF EXISTS public.to_char(timestamp without time zone, text);
DROP SEQUENCE IF EXISTS public.planted_calls;
"""


@contextmanager
def _as(target: Target) -> Iterator[psycopg.Connection]:
    # a client session: the server's default search_path, as an attacker would have it
    with connect(target, "attack", autocommit=True, search_path=None) as conn:
        yield conn


def _fails(conn: psycopg.Connection, statement: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)


def test_application_role_creates_nothing(main_cluster: ClusterHandle) -> None:
    topo, creds = main_cluster.topology, main_cluster.creds
    with _as(app_target(topo.coordinator, creds)) as app:
        assert app.execute("SELECT current_user").fetchone() == (creds.app_user,)
        _fails(app, PLANTED_FORMAT)
        _fails(app, "CREATE TABLE public.planted (x int)")
        _fails(app, "CREATE SCHEMA planted")
        _fails(app, "CREATE VIEW buildsmart.planted AS SELECT 1")
        _fails(app, "CREATE TABLE bsdata.planted (x int)")
        _fails(app, "SET session_replication_role = replica")
        _fails(app, "ALTER TABLE public.readings ADD COLUMN planted int")
        _fails(app, "SELECT * FROM pg_catalog.pg_user_mapping")
        _fails(app, "UPDATE buildsmart.fragments SET shard_name = shard_name")
        # what it may do: read and write readings
        app.execute("SELECT count(*) FROM public.readings WHERE building = 'nobody'")
        # the SECURITY DEFINER functions it may execute: none
        definers = app.execute(
            "SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = 'buildsmart' AND p.prosecdef AND pg_catalog.has_function_privilege(p.oid, 'EXECUTE')"
        ).fetchall()
        assert definers == []


def test_application_role_cannot_log_in_to_workers(main_cluster: ClusterHandle) -> None:
    topo, creds = main_cluster.topology, main_cluster.creds
    for worker in topo.workers:
        with pytest.raises(NodeError):
            connect(app_target(worker, creds), "attack").close()


def test_ingest_and_fdw_roles_create_nothing_on_workers(main_cluster: ClusterHandle) -> None:
    topo, creds = main_cluster.topology, main_cluster.creds
    fdw_targets = [Target(w.name, w.hosts, w.ports, w.dbname, creds.fdw_user, creds.fdw_password) for w in topo.workers]
    for target in [*fdw_targets, *(ingest_target(w, creds) for w in topo.workers)]:
        with _as(target) as conn:
            _fails(conn, PLANTED_FORMAT)
            _fails(conn, "CREATE TABLE bsdata.planted (x int)")
            _fails(conn, "CREATE SCHEMA planted")
            row = conn.execute("SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user")
            assert row.fetchone() == (False, False, False)
    for target in fdw_targets:
        with _as(target) as fdw:  # the coordinator's mapping role may not bypass the replace trigger
            _fails(fdw, "SET session_replication_role = replica")
            _fails(fdw, "SELECT buildsmart.ensure_time_partitions('pg_catalog.pg_class', '1 month', now(), now())")


# Functions without a pinned search_path, because a SET clause would stop the planner inlining them
# (time_bucket) or add a GUC save/restore to every row of a GROUP BY: they are SECURITY INVOKER and
# IMMUTABLE, and their bodies are bound at creation (SQL-standard RETURN) or call pg_catalog only.
UNPINNED = {
    "buildsmart.time_bucket(interval,timestamp with time zone)",
    "buildsmart.time_bucket(interval,timestamp with time zone,buildsmart.zone)",
    "buildsmart.month_bucket(timestamp with time zone,buildsmart.zone)",
}
CALL = re.compile(r"([A-Za-z_][\w.]*)\s*\(")


def test_every_extension_function_pins_its_search_path(main_cluster: ClusterHandle) -> None:
    query = (
        "SELECT p.oid::regprocedure::text, p.prosecdef, p.prosqlbody IS NOT NULL, p.prosrc, l.lanname "
        "FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_language l ON l.oid = p.prolang "
        "JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e' "
        "JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid AND e.extname = 'buildsmart' "
        "WHERE l.lanname <> 'c' AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY(p.proconfig), false)"
    )
    topo = main_cluster.topology
    for node in [topo.coordinator.name, *(w.name for w in topo.workers)]:
        with main_cluster.coordinator() if node == topo.coordinator.name else main_cluster.worker(node) as conn:
            unpinned = conn.execute(query).fetchall()
            n = conn.execute(
                "SELECT count(*) FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid "
                "WHERE e.extname = 'buildsmart' AND d.classid = 'pg_catalog.pg_proc'::regclass"
            ).fetchone()
        assert n is not None and n[0] > 5, f"{node}: the query sees none of the extension's functions"
        assert {r[0] for r in unpinned} <= UNPINNED, f"{node}: functions without a pinned search_path: {unpinned}"
        for name, definer, bound, src, lang in unpinned:
            assert not definer, f"{node}: {name} is SECURITY DEFINER without a pinned search_path"
            if bound:
                continue
            assert lang == "plpgsql", name
            unqualified = [c for c in CALL.findall(src) if not c.startswith("pg_catalog.")]
            assert unqualified == [], f"{node}: {name} calls {unqualified} through the caller's search_path"


def test_planted_format_never_runs_when_the_cluster_makes_partitions(
    main_cluster: ClusterHandle, token: str, tmp_path: Path
) -> None:
    """Plant public.format(5 x text) and public.to_char on every node (as if a role had CREATE on
    public), then make the cluster create time partitions: through the ingest role's call of
    ensure_time_partitions on the workers, and the partition upkeep of the orchestrator."""
    topo = main_cluster.topology
    nodes = [topo.coordinator.name, *(w.name for w in topo.workers)]

    def on(node: str) -> AbstractContextManager[psycopg.Connection]:
        return main_cluster.coordinator() if node == topo.coordinator.name else main_cluster.worker(node)

    for node in nodes:
        with on(node) as conn:
            conn.execute(PLANT)
            # the plant works for a session whose search_path reaches public
            conn.execute("SELECT format('%s%s%s%s', 'a', 'b', 'c', 'd')")
            assert conn.execute("SELECT last_value, is_called FROM public.planted_calls").fetchone() == (1, True)
            conn.execute("SELECT setval('public.planted_calls', 1, false)")
    try:
        building = f"t{token}"
        year = 2031 + int(token[:4], 16) % 40  # far from every test's data: new partitions
        when = datetime(year, 3, 5, 7, tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S+00")
        path = write_csv(tmp_path / "r.csv", [(building, "electricity", when, 1.5)])
        result = ingest(main_cluster.directory, str(path))
        assert result.inserted == 1
        with main_cluster.coordinator() as conn:
            frag = Router(load_fragments(conn)).route(building)
        with main_cluster.worker(frag.node) as w:
            made = w.execute(
                "SELECT count(*) FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = %s::regclass AND c.relname LIKE %s",
                (f"bsdata.{frag.shard_name}", f"%_p{year}%"),
            ).fetchone()
            assert made is not None and made[0] >= 1, "the load made no partition: the attack was not exercised"
        main_cluster.run_cli("maintain")  # the partition upkeep, as the orchestrator runs it
    finally:
        calls = {}
        for node in nodes:
            with on(node) as conn:
                calls[node] = conn.execute("SELECT is_called FROM public.planted_calls").fetchone()
                conn.execute(UNPLANT)
    assert all(c == (False,) for c in calls.values()), f"planted code ran: {calls}"


def _nobody() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def _as_nobody(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    uid, gid = _nobody()
    return subprocess.run(
        list(cmd), user=uid, group=gid, extra_groups=[], capture_output=True, text=True, timeout=30, check=False, env=env
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a probe as another OS user")
def test_local_os_user_reads_no_secret_and_cannot_connect(main_cluster: ClusterHandle) -> None:
    directory = main_cluster.directory
    creds, topo = main_cluster.creds, main_cluster.topology
    secrets = [directory / "credentials.json", directory / "nodes" / "pgpass"]
    logs = [p for p in directory.rglob("*") if p.is_file() and (p.suffix == ".log" or p.parent.name == "log")]
    assert logs, "no log files found to probe"
    for path in [*secrets, *logs]:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others ({oct(path.stat().st_mode)})"
        probe = _as_nobody("cat", str(path))
        assert probe.returncode != 0 and creds.superuser_password not in probe.stdout, f"nobody read {path}"
    # nobody plants no file where the servers or the orchestrator would read it
    for where in (directory, directory / "nodes"):
        assert _as_nobody("touch", str(where / "planted")).returncode != 0
    # no role logs in without its password, over TCP or the socket
    psql = pgbin.tool("psql")
    member = topo.coordinator.members[0]
    for user in (creds.superuser, creds.app_user, creds.ingest_user, "buildsmart", "postgres"):
        probe = _as_nobody(
            psql, "-w", "-h", member.host, "-p", str(member.port), "-U", user, "-d", topo.coordinator.dbname, "-c", "SELECT 1",
            env={"PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "5"},
        )  # fmt: skip
        assert probe.returncode != 0 and "password" in probe.stderr.lower(), (user, probe.stderr)

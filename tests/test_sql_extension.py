"""The extension's SQL: generated scripts are current, every source is used, snapshots are frozen,
and upgrading 0.1 -> 0.2 (and back) on a real server gives exactly what a fresh install gives."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

import psycopg
import pytest

from orchestrator import EXTENSION_NAME, EXTENSION_VERSION, extension, sqlbuild
from orchestrator.osuser import service_user
from orchestrator.runtime import local
from orchestrator.runtime.ports import free_port
from orchestrator.topology import Credentials, Member
from tests.harness import make_tmp_dir

# The 0.1 release as it shipped: what clusters created before 0.2 run, and the upgrade fixture.
RELEASE_0_1_SHA256 = "22200a4adc3a9b536d5cc8b64e3a6cdb8889605063d330400a9f479d995a966b"


def test_generated_scripts_are_current() -> None:
    for path, text in sqlbuild.generated().items():
        assert path.exists() and path.read_text() == text, f"{path.name} is stale: run `python -m orchestrator.sqlbuild`"


def test_every_source_is_listed_once() -> None:
    listed = sqlbuild.sources()
    assert len(listed) == len(set(listed))
    on_disk = {
        p
        for p in sqlbuild.SQL_DIR.glob("**/*.sql")
        if not {"app", "upgrades", "downgrades", "src"} & set(p.parts)
        and not p.name.startswith("buildsmart--")
        and not re.fullmatch(r"\d+\.\d+\.sql", p.name)
    }
    assert on_disk <= set(listed), f"unlisted: {sorted(on_disk - set(listed))}"


def test_latest_is_the_newest_snapshot() -> None:
    for folder in sorted((sqlbuild.SQL_DIR / "udfs").iterdir()):
        versions = sorted(
            (p for p in folder.glob("*.sql") if re.fullmatch(r"\d+\.\d+\.sql", p.name)),
            key=lambda p: tuple(int(x) for x in p.stem.split(".")),
        )
        assert versions, f"{folder.name} has no versioned snapshot"
        assert (folder / "latest.sql").read_text() == versions[-1].read_text(), (
            f"{folder.name}/latest.sql differs from {versions[-1].name}"
        )


def test_released_install_script_is_frozen() -> None:
    released = sqlbuild.SQL_DIR / f"{EXTENSION_NAME}--0.1.sql"
    assert hashlib.sha256(released.read_bytes()).hexdigest() == RELEASE_0_1_SHA256, "buildsmart--0.1.sql was edited"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """A plain PostgreSQL with the extension files installed (the C module too)."""
    extension.copy_files()
    user = service_user()
    base = make_tmp_dir("bs-ext-")
    member = local.LocalMember(Member("ext", "127.0.0.1", free_port()), base / "data", base / "log")
    local.initdb(member, user, Credentials("ext", "ext-secret", "x", "x"))
    local.start(member, user)
    try:
        yield f"host=127.0.0.1 port={member.member.port} user=ext password=ext-secret"
    finally:
        local.stop(member, user, mode="immediate")


SIGNATURE = """
SELECT pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid) || ': ' || coalesce(
  CASE d.classid
    WHEN 'pg_catalog.pg_proc'::regclass THEN pg_catalog.pg_get_functiondef(d.objid)
    WHEN 'pg_catalog.pg_class'::regclass THEN (
      SELECT string_agg(a.attname || ' ' || pg_catalog.format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull
             THEN ' not null' ELSE '' END, ', ' ORDER BY a.attnum)
        FROM pg_catalog.pg_attribute a WHERE a.attrelid = d.objid AND a.attnum > 0 AND NOT a.attisdropped)
      || ' | ' || coalesce((SELECT string_agg(pg_catalog.pg_get_constraintdef(c.oid), ', ' ORDER BY 1)
                              FROM pg_catalog.pg_constraint c WHERE c.conrelid = d.objid), '')
      || ' | ' || coalesce((SELECT string_agg(pg_catalog.pg_get_indexdef(i.indexrelid), ', ' ORDER BY 1)
                              FROM pg_catalog.pg_index i WHERE i.indrelid = d.objid), '')
      || ' | ' || coalesce(pg_catalog.pg_get_viewdef(d.objid), '')
    WHEN 'pg_catalog.pg_type'::regclass THEN (
      SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder) FROM pg_catalog.pg_enum e WHERE e.enumtypid = d.objid)
  END, '')
  FROM pg_catalog.pg_depend d
 WHERE d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.deptype = 'e'
   AND d.refobjid = (SELECT oid FROM pg_catalog.pg_extension WHERE extname = 'buildsmart')
 ORDER BY 1
"""


def _signature(server: str, dbname: str, steps: list[str]) -> list[str]:
    with psycopg.connect(server + " dbname=postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {dbname}")
        admin.execute(f"CREATE DATABASE {dbname}")
    with psycopg.connect(server + f" dbname={dbname}", autocommit=True) as conn:
        for step in steps:
            conn.execute(step)
        return [r[0] for r in conn.execute(SIGNATURE).fetchall()]


def test_upgrade_gives_what_a_fresh_install_gives(server: str) -> None:
    fresh = _signature(server, "ext_fresh", [f"CREATE EXTENSION {EXTENSION_NAME}"])
    upgraded = _signature(
        server,
        "ext_upgraded",
        [f"CREATE EXTENSION {EXTENSION_NAME} VERSION '0.1'", f"ALTER EXTENSION {EXTENSION_NAME} UPDATE TO '{EXTENSION_VERSION}'"],
    )
    assert any("replace_existing" in s for s in fresh), "0.2 objects missing from the fresh install"
    assert upgraded == fresh


def test_downgrade_gives_the_previous_release(server: str) -> None:
    released = _signature(server, "ext_released", [f"CREATE EXTENSION {EXTENSION_NAME} VERSION '0.1'"])
    downgraded = _signature(
        server, "ext_downgraded", [f"CREATE EXTENSION {EXTENSION_NAME}", f"ALTER EXTENSION {EXTENSION_NAME} UPDATE TO '0.1'"]
    )
    assert downgraded == released

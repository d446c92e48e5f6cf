"""The extension's versioned install script is generated from one-file-per-object sources."""

from __future__ import annotations

from orchestrator import sqlbuild


def test_install_script_is_current() -> None:
    assert sqlbuild.install_script_path().read_text() == sqlbuild.render(), (
        "sql/buildsmart--<version>.sql is stale: run `python -m orchestrator.sqlbuild`"
    )


def test_every_source_is_listed_once() -> None:
    listed = sqlbuild.sources()
    assert len(listed) == len(set(listed))
    on_disk = {p for p in (sqlbuild.SQL_DIR).glob("**/*.sql") if "app" not in p.parts and not p.name.startswith("buildsmart--")}
    assert on_disk <= set(listed), f"unlisted: {sorted(on_disk - set(listed))}"

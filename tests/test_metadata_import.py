"""Import of Haystack/Brick files into public.devices on a real cluster: effects, links, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg.types.json import Jsonb

from orchestrator.exceptions import InputError, NodeError
from orchestrator.metadata import haystack, importer
from orchestrator.metadata.mirror import pg_connect
from tests.harness import SHARED_DATA, ClusterHandle, make_tmp_dir

HAYSTACK = SHARED_DATA / "haystack"
BRICK = SHARED_DATA / "brick"
BUILDSMART = str(Path(sys.executable).parent / "buildsmart")
CARYTOWN_SITE = "p:demo:r:23a44701-a89a6c66"


def _count(cluster: ClusterHandle, where: str = "true", params: tuple[object, ...] = ()) -> int:
    with cluster.coordinator() as conn:
        row = conn.execute(f"SELECT count(*) FROM public.devices WHERE {where}", params).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return int(row[0])


def _flat(text: str) -> str:
    """Console output without rich's line wrapping."""
    return " ".join(text.split()).replace("/ ", "/")


def _import(cluster: ClusterHandle, path: Path) -> importer.ImportResult:
    with pg_connect(cluster.directory, "test-import") as conn:
        return importer.import_file(conn, path)


@pytest.fixture
def cleanup_ids(main_cluster: ClusterHandle) -> Iterator[set[str]]:
    """Ids a test imported; deleted afterwards (buildings with the test prefix too)."""
    ids: set[str] = set()
    yield ids
    with main_cluster.coordinator() as conn:
        conn.execute("DELETE FROM public.devices WHERE id = ANY(%s)", (sorted(ids),))


@pytest.fixture
def tmp_files() -> Iterator[Path]:
    path = make_tmp_dir("bs-meta-files-")
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def test_carytown_v3_links_site_to_building_and_reimport_changes_nothing(
    main_cluster: ClusterHandle, cleanup_ids: set[str], building_prefix: str
) -> None:
    code = f"{building_prefix}cary"
    with main_cluster.coordinator() as conn:
        conn.execute(
            "INSERT INTO public.buildings (code, attributes) VALUES (%s, %s)", (code, Jsonb({"haystack_id": CARYTOWN_SITE}))
        )
    try:
        path = HAYSTACK / "carytown.json"
        cleanup_ids.update(e.id for e in haystack.parse_file(path))
        first = _import(main_cluster, path)
        assert (first.entities, first.inserted, first.updated, first.unchanged) == (22, 22, 0, 0)
        assert first.linked_buildings == (code,)
        assert _count(main_cluster, "id = ANY(%s) AND building = %s", (sorted(cleanup_ids), code)) == 22

        with main_cluster.coordinator() as conn:
            row = conn.execute("SELECT kind, metadata FROM public.devices WHERE id = %s", (CARYTOWN_SITE,)).fetchone()
            assert row is not None
            kind, meta = row
            assert kind == "site"
            assert meta["area"] == {"val": 3149, "unit": "ft²"}  # n:3149 ft²
            assert meta["site"] is True  # m:
            assert meta["regionRef"] == "p:demo:r:23a44701-67faf4db"  # r:id dis -> id
            assert meta["geoCoord"] == {"lat": 37.555385, "lng": -77.486903}
            outbox_before = conn.execute("SELECT count(*) FROM bsmirror.outbox").fetchone()

        again = _import(main_cluster, path)
        assert (again.inserted, again.updated, again.unchanged) == (0, 0, 22)
        with main_cluster.coordinator() as conn:
            # an unchanged re-import leaves no events for the mirror
            assert conn.execute("SELECT count(*) FROM bsmirror.outbox").fetchone() == outbox_before
    finally:
        with main_cluster.coordinator() as conn:
            conn.execute("DELETE FROM public.buildings WHERE code = %s", (code,))


def test_ghausi_export_encoding_and_cli(main_cluster: ClusterHandle, cleanup_ids: set[str]) -> None:
    path = HAYSTACK / "ghausi.json"
    cleanup_ids.update(e.id for e in haystack.parse_file(path))
    proc = subprocess.run(
        [BUILDSMART, "devices", "import", str(path), "--dir", str(main_cluster.directory)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "2183 entities, 2183 inserted, 0 updated, 0 unchanged" in _flat(proc.stderr)
    with main_cluster.coordinator() as conn:
        row = conn.execute("SELECT building, kind, metadata FROM public.devices WHERE id = '1da07501-49df433d'").fetchone()
    assert row is not None
    building, kind, meta = row
    assert building == "1d3999e1-a371e5b3"  # no such building row: the site id is kept
    assert kind == "point"
    assert meta["equipRef"] == "1db03e90-66a56d18"  # "@id \"dis\"" -> id
    assert meta["air"] is True  # "M" -> marker
    assert meta["hisId"] == 0.976
    assert meta["dis"] == "VAV 1_07 Rm 1123B General Exhaust Air Flow Sp"  # from the id ref's display name


def test_brick_turtle_import(main_cluster: ClusterHandle, cleanup_ids: set[str]) -> None:
    path = BRICK / "rice_brick.ttl"
    cleanup_ids.update(e.id for e in importer.parse(path))
    result = _import(main_cluster, path)
    assert result.inserted == 751
    with main_cluster.coordinator() as conn:
        kinds = dict(
            conn.execute(
                "SELECT kind, count(*) FROM public.devices WHERE id = ANY(%s) GROUP BY kind", (sorted(cleanup_ids),)
            ).fetchall()
        )
        buildings = conn.execute(
            "SELECT DISTINCT building FROM public.devices WHERE id = ANY(%s)", (sorted(cleanup_ids),)
        ).fetchall()
    assert kinds == {"point": 414, "equip": 234, "space": 102, "site": 1}
    assert buildings == [("http://virginia.edu/building/ontology/rice#RICE",)]


GOOD_ROW = '{"id": "@t-ok-1 \\"fine\\"", "point": "M"}'


@pytest.mark.parametrize(
    ("text", "where", "reason"),
    [
        ('{"rows": [\n  ' + GOOD_ROW + ',\n  {"id": "@t-ok-2" "x": "M"}\n]}', ":3:20", "invalid JSON: Expecting ',' delimiter"),
        ('{"rows": {"id": "@x"}}', ":1:10", '"rows" must be a list'),
        ("[1, 2]", ":1:1", "a Haystack grid is a JSON object"),
        ('{"rows": [\n  ' + GOOD_ROW + ',\n  {"dis": "no id here"}\n]}', ":3:3", "row 1 has no id tag"),
        ('{"rows": [\n  ' + GOOD_ROW + ',\n  "just a string"\n]}', ":3:3", "row 1 must be an object"),
        ('{"rows": [\n  ' + GOOD_ROW + ',\n  {"id": "t-ok-2"}\n]}', ":3:10", "is not a ref"),
        ('{"rows": [\n  ' + GOOD_ROW + ",\n  " + GOOD_ROW + "\n]}", ":3:10", "duplicate id 't-ok-1'"),
        ('{"meta": {"ver": "3.0"}, "rows": [\n  {"id": "r:t-ok-1", "area": "n:12x ft"}\n]}', ":2:30", "malformed number"),
    ],
)
def test_malformed_files_name_the_place_and_import_nothing(
    main_cluster: ClusterHandle, tmp_files: Path, text: str, where: str, reason: str
) -> None:
    path = tmp_files / "bad.json"
    path.write_text(text)
    before = _count(main_cluster)
    with pytest.raises(InputError) as err:
        _import(main_cluster, path)
    assert str(err.value).startswith(f"{path}{where}: "), str(err.value)
    assert reason in err.value.reason
    assert _count(main_cluster) == before
    assert _count(main_cluster, "id LIKE 't-ok-%%'") == 0


def test_cli_reports_bad_file_with_exit_code(main_cluster: ClusterHandle, tmp_files: Path) -> None:
    path = tmp_files / "broken.json"
    path.write_text('{"rows": [\n  {"id": "@t-cli-1", "x": tru}\n]}')
    proc = subprocess.run(
        [BUILDSMART, "devices", "import", str(path), "--dir", str(main_cluster.directory)], capture_output=True, text=True
    )
    assert proc.returncode == 5
    assert f"{path}:2:27: invalid JSON" in _flat(proc.stderr)
    assert _count(main_cluster, "id = 't-cli-1'") == 0


def test_database_rejection_rolls_back_whole_file(main_cluster: ClusterHandle, tmp_files: Path) -> None:
    # jsonb refuses \u0000; the bad row comes last, after 50 good ones that must not stay behind.
    rows = [{"id": f"@t-nul-{i}", "point": "M"} for i in range(50)] + [{"id": "@t-nul-bad", "dis": "a\u0000b"}]
    path = tmp_files / "nul.json"
    path.write_text(json.dumps({"rows": rows}))
    with pytest.raises(NodeError, match="nothing was imported"):
        _import(main_cluster, path)
    assert _count(main_cluster, "id LIKE 't-nul-%%'") == 0


def test_unknown_suffix_is_refused(tmp_files: Path) -> None:
    path = tmp_files / "model.xml"
    path.write_text("<x/>")
    with pytest.raises(InputError, match=r"unknown format \.xml"):
        importer.parse(path)


def test_json_v3_z_removes_tag_and_na_is_null() -> None:
    text = json.dumps(
        {"meta": {"ver": "3.0"}, "rows": [{"id": "r:a b", "gone": "z:", "na": "-:", "s": "s:x:y", "n": "n:-2.5e3"}]}
    )
    (entity,) = haystack.parse_text(text, "inline.json")
    assert entity.id == "a"
    assert entity.metadata == {"na": None, "s": "x:y", "n": -2500.0, "dis": "b"}
    assert entity.kind == "entity"
    assert entity.site_ref is None

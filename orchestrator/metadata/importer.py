"""Import parsed entities into public.devices: one transaction, upsert by id, report the effect.

Parsing happens completely before the transaction starts, so a bad file changes nothing.
Entities not in the file are kept; unchanged ones are not touched (and so emit no outbox event).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

from orchestrator.exceptions import InputError, InputLocation, NodeError
from orchestrator.metadata import haystack, outbox
from orchestrator.metadata.model import Entity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportResult:
    source: str
    entities: int
    inserted: int
    updated: int
    unchanged: int
    linked_buildings: tuple[str, ...]  # existing public.buildings codes the entities were linked to


def parse(path: Path) -> list[Entity]:
    """Entities of a Haystack JSON (.json) or Brick Turtle (.ttl) file."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return haystack.parse_file(path)
    if suffix in (".ttl", ".turtle"):
        from orchestrator.metadata import brick  # rdflib is slow to import: only when needed

        return brick.parse_file(path)
    raise InputError(
        InputLocation(str(path), 1), f"unknown format {suffix or '(no suffix)'}: expected .json (Haystack) or .ttl (Brick)"
    )


def _resolve_buildings(conn: psycopg.Connection, site_refs: Iterable[str]) -> dict[str, str]:
    """Site id -> building code, for sites that name an existing building.

    A building matches a site when its code is the site id, or its attributes carry the site id
    as ``haystack_id`` / ``brick_id``. Unmatched sites keep their id as the building value.
    """
    refs = sorted(set(site_refs))
    if not refs:
        return {}
    rows = conn.execute(
        "SELECT s.ref, b.code FROM unnest(%s::text[]) AS s(ref)"
        " JOIN public.buildings b ON b.code = s.ref OR b.attributes->>'haystack_id' = s.ref OR b.attributes->>'brick_id' = s.ref"
        " ORDER BY s.ref, (b.code = s.ref) DESC, b.code",
        (refs,),
    ).fetchall()
    resolved: dict[str, str] = {}
    for ref, code in rows:
        resolved.setdefault(ref, code)
    return resolved


def import_entities(conn: psycopg.Connection, entities: list[Entity], source: str) -> ImportResult:
    """Upsert ``entities`` in one transaction on ``conn`` (which must not be in autocommit)."""
    outbox.ensure_outbox(conn)
    with conn.transaction():
        links = _resolve_buildings(conn, (e.site_ref for e in entities if e.site_ref))
        conn.execute(
            'CREATE TEMP TABLE devices_import (id text PRIMARY KEY, building text COLLATE "C", kind text, metadata jsonb)'
            " ON COMMIT DROP"
        )
        with conn.cursor().copy("COPY devices_import (id, building, kind, metadata) FROM STDIN") as copy:
            for e in entities:
                building = links.get(e.site_ref, e.site_ref) if e.site_ref else None
                copy.write_row((e.id, building, e.kind, Jsonb(e.metadata)))
        rows = conn.execute(
            "INSERT INTO public.devices AS d (id, building, kind, metadata, updated_at)"
            " SELECT id, building, kind, metadata, now() FROM devices_import ORDER BY id"
            " ON CONFLICT (id) DO UPDATE SET building = EXCLUDED.building, kind = EXCLUDED.kind,"
            "   metadata = EXCLUDED.metadata, updated_at = EXCLUDED.updated_at"
            " WHERE (d.building, d.kind, d.metadata) IS DISTINCT FROM (EXCLUDED.building, EXCLUDED.kind, EXCLUDED.metadata)"
            " RETURNING (xmax = 0)"
        ).fetchall()
    inserted = sum(1 for (was_insert,) in rows if was_insert)
    updated = len(rows) - inserted
    result = ImportResult(
        source=source,
        entities=len(entities),
        inserted=inserted,
        updated=updated,
        unchanged=len(entities) - len(rows),
        linked_buildings=tuple(sorted(set(links.values()))),
    )
    log.info(
        "imported %s: %d entities, %d inserted, %d updated, %d unchanged, linked to buildings %s",
        source, result.entities, result.inserted, result.updated, result.unchanged, list(result.linked_buildings) or "none",
    )  # fmt: skip
    return result


def import_file(conn: psycopg.Connection, path: Path) -> ImportResult:
    entities = parse(path)
    try:
        return import_entities(conn, entities, str(path))
    except psycopg.Error as exc:  # the transaction rolled back: nothing of the file is in
        raise NodeError(f"import of {path} failed, nothing was imported: {exc}") from exc

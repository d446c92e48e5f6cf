"""Brick models (RDF Turtle, via rdflib) to entities.

Every subject typed with a Brick class is an entity keyed by its full IRI. Its document holds the
Brick classes (local names), the rdfs:label, and each other predicate by local name: IRIs of
related entities, or literal values. The building is found by walking location/part/point
relations up to a ``Building``; a model with one building links everything to it.
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path
from typing import Any

from rdflib import RDF, RDFS, Graph, Literal, URIRef
from rdflib.plugins.parsers.notation3 import BadSyntax

from orchestrator.exceptions import InputError, InputLocation
from orchestrator.metadata.model import Entity, read_text

log = logging.getLogger(__name__)

_POINT_SUFFIXES = ("Sensor", "Setpoint", "Command", "Status", "Alarm", "Point")
_SPACE_NAMES = ("Room", "Floor", "Zone", "Space", "Wing", "Storey", "Outside")
_UP_RELATIONS = ("isLocatedIn", "isPartOf", "isPointOf", "hasLocation")
_MAX_HOPS = 8


def _local(iri: object) -> str:
    text = str(iri)
    for sep in ("#", "/"):
        if sep in text:
            text = text.rsplit(sep, 1)[1]
    return text


def _is_brick_class(iri: URIRef) -> bool:
    text = str(iri)
    return "Brick#" in text or "brickschema.org/schema" in text


def _kind(classes: list[str]) -> str:
    if any(c in ("Building", "Site") for c in classes):
        return "site"
    if any(c.endswith(_POINT_SUFFIXES) for c in classes):
        return "point"
    if any(c.startswith(_SPACE_NAMES) or c in _SPACE_NAMES for c in classes):
        return "space"
    return "equip"


def _literal(value: Literal) -> Any:
    py = value.toPython()
    return py if isinstance(py, str | int | float | bool) else str(value)


def _syntax_error(path: str, exc: BadSyntax) -> InputError:
    text, offset = getattr(exc, "_str", None), getattr(exc, "_i", None)
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")  # rdflib keeps the source as UTF-8 bytes
        offset = len(text.encode()[:offset].decode("utf-8", errors="replace")) if isinstance(offset, int) else None
    if isinstance(text, str) and isinstance(offset, int):
        line = text.count("\n", 0, offset) + 1
        column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    else:
        line, column = int(getattr(exc, "lines", 0)) + 1, 0
    return InputError(InputLocation(path, line, column), f"invalid Turtle: {getattr(exc, '_why', exc)}")


def parse_text(text: str, path: str) -> list[Entity]:
    graph = Graph()
    try:
        graph.parse(data=text, format="turtle")
    except BadSyntax as exc:
        raise _syntax_error(path, exc) from exc
    except Exception as exc:  # rdflib raises many types for bad input; all mean "this file is wrong"
        raise InputError(InputLocation(path, 1), f"invalid Turtle: {exc}") from exc

    classes: dict[URIRef, list[str]] = {}
    for subject, cls in graph.subject_objects(RDF.type):
        if isinstance(subject, URIRef) and isinstance(cls, URIRef) and _is_brick_class(cls):
            classes.setdefault(subject, []).append(_local(cls))
    if not classes:
        raise InputError(InputLocation(path, 1), "no Brick entities (subjects typed with a Brick class) in this model")
    buildings = {s for s, cls in classes.items() if "Building" in cls}

    def building_of(subject: URIRef) -> str | None:
        seen, queue = {subject}, deque([(subject, 0)])
        while queue:
            node, hops = queue.popleft()
            if node in buildings:
                return str(node)
            if hops >= _MAX_HOPS:
                continue
            for pred, obj in graph.predicate_objects(node):
                if isinstance(obj, URIRef) and obj not in seen and _local(pred) in _UP_RELATIONS:
                    seen.add(obj)
                    queue.append((obj, hops + 1))
        return str(next(iter(buildings))) if len(buildings) == 1 else None

    entities: list[Entity] = []
    for subject in sorted(classes):
        doc: dict[str, Any] = {"brickClass": sorted(set(classes[subject]))}
        relations: dict[str, set[str]] = {}
        for pred, obj in graph.predicate_objects(subject):
            if pred == RDF.type:
                continue
            if pred == RDFS.label and isinstance(obj, Literal):
                doc["label"] = str(obj)
            elif isinstance(obj, URIRef):
                relations.setdefault(_local(pred), set()).add(str(obj))
            elif isinstance(obj, Literal):
                doc[_local(pred)] = _literal(obj)
        for name, targets in relations.items():
            doc[name] = sorted(targets)
        entities.append(Entity(id=str(subject), kind=_kind(doc["brickClass"]), metadata=doc, site_ref=building_of(subject)))
    log.info("parsed %d Brick entities (%d buildings) from %s", len(entities), len(buildings), path)
    return entities


def parse_file(path: Path) -> list[Entity]:
    return parse_text(read_text(path), str(path))

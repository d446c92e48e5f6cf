"""What an imported entity is, and the one document shape both sides of the mirror share."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.exceptions import ConfigError, InputError, InputLocation

# The MongoDB document of a device is ``{"_id": id, **image}``; the image is built in SQL by
# bsmirror.device_doc() so the trigger, verify and repair all agree on one definition.
IMAGE_KEYS = ("building", "kind", "metadata")


@dataclass(frozen=True)
class Entity:
    """One device/point/site parsed from an input file, not yet linked to a building."""

    id: str
    kind: str | None
    metadata: dict[str, Any]
    site_ref: str | None  # the source's site id; the importer resolves it to a building code


def mongo_document(entity_id: str, image: dict[str, Any]) -> dict[str, Any]:
    return {"_id": entity_id, **{key: image.get(key) for key in IMAGE_KEYS}}


def document_hash(doc: dict[str, Any]) -> str:
    """A hash independent of key order, so jsonb and BSON copies of one document agree."""
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def read_text(path: Path) -> str:
    """An input file as UTF-8 text; a non-UTF-8 byte is an input error at its place."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(InputLocation(str(path), 1), f"not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc

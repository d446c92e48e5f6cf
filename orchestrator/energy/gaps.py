"""Missing intervals per meter, found on the workers (buildsmart.meter_gaps on every fragment),
for ``buildsmart gaps``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from orchestrator import catalog
from orchestrator.energy import reference
from orchestrator.nodeconn import NodeConnections


@dataclass(frozen=True)
class Gap:
    building: str
    meter: str
    gap_from: datetime
    gap_to: datetime
    missing: int


def find(
    nodes: NodeConnections, building: str | None = None, since: datetime | None = None, until: datetime | None = None
) -> list[Gap]:
    frags = catalog.load_fragments(nodes.coordinator)
    reference.sync(nodes, frags)  # expected intervals come from the workers' copies of meters
    if building is not None:
        frags = tuple(f for f in frags if f.holds(building))
    out: list[Gap] = []
    for frag in frags:
        rows = nodes.get(frag.node).execute(
            "SELECT building, meter, gap_from, gap_to, missing FROM buildsmart.meter_gaps(%s, %s, "
            "coalesce(%s::timestamptz, '-infinity'), coalesce(%s::timestamptz, 'infinity'))",
            (frag.shard_name, building, since, until),
        ).fetchall()
        out += [Gap(str(r[0]), str(r[1]), r[2], r[3], int(r[4])) for r in rows]
    return sorted(out, key=lambda g: (g.building, g.meter, g.gap_from))

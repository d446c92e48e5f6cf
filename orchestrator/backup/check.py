"""``backup verify``: restore a point into a scratch directory and compare it with the point.

What is compared, and why it proves the restore: the point's record holds, per fragment, the
count and whole-row checksum of every time partition, computed inside the point's write pause
from exported snapshots with the one checksum function moves use
(orchestrator/elastic/verify.py:unit_sums). The restored cluster must have the same fragments
in its catalog (ids, ranges, nodes), each fragment table on its node, and the same sums per
time partition. The scratch cluster is plain (no replicas) and removed afterwards.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchestrator import cluster
from orchestrator.backup import points, repo, restore
from orchestrator.backup.decide import RestorePoint
from orchestrator.elastic import verify
from orchestrator.elastic.context import open_cluster

log = logging.getLogger(__name__)
Report = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


def make_scratch_dir(prefix: str) -> Path:
    """A scratch directory the service user can traverse ($BUILDSMART_SCRATCH, else /var/tmp)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("BUILDSMART_SCRATCH", "/var/tmp")))
    path.chmod(0o755)
    return path


@dataclass(frozen=True)
class VerifyResult:
    point: str
    fragments: int
    mismatches: tuple[str, ...]
    restore_seconds: float
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.mismatches


def compare(point: RestorePoint, directory: Path) -> list[str]:
    """Differences between a (restored) cluster in ``directory`` and the point's record."""
    problems: list[str] = []
    with open_cluster(directory, "backup:verify") as el:
        have = {f.fragment_id: points.fragment_at(f) for f in el.fragments()}
        want = {f.fragment_id: f for f in point.fragments}
        for fid in sorted(set(want) | set(have)):
            w, h = want.get(fid), have.get(fid)
            if w is None or h is None:
                problems.append(f"fragment {fid}: {'not in the point' if w is None else 'missing from the restored catalog'}")
                continue
            if h != w:
                problems.append(f"fragment {fid}: restored as {h}, at the point {w}")
                continue
            got = verify.unit_sums(el.nodes.get(w.node), w.shard_name)
            expected = dict(point.checksums.get(w.shard_name, {}))
            if got != expected:
                diff = sorted(b for b in set(got) | set(expected) if got.get(b) != expected.get(b))
                problems.append(
                    f"fragment {fid} ({w.shard_name} on {w.node}): {len(diff)} time partition(s) differ, e.g. {diff[0]}: "
                    f"restored {got.get(diff[0])}, at the point {expected.get(diff[0])}"
                )
    return problems


def verify_point(r: repo.Repository, point: RestorePoint, scratch: Path | None = None, report: Report = _quiet) -> VerifyResult:
    started = time.monotonic()
    base = scratch or make_scratch_dir("bs-verify-")
    target = base / "cluster"
    try:
        restored = restore.restore(r, point, target, replicas=0, report=report)
        for line in restored.jobs_closed:
            report(line)
        problems = compare(point, target)
    finally:
        try:
            cluster.down(target, purge=True)
        finally:
            if scratch is None:
                shutil.rmtree(base, ignore_errors=True)
    result = VerifyResult(point.name, len(point.fragments), tuple(problems), restored.seconds, time.monotonic() - started)
    log.info("verify of %s: %s", point.name, "ok" if result.ok else "; ".join(problems))
    return result

"""The main job end to end: `buildsmart demo` on a new directory, as a user runs it; its answers
are checked against a reference computed from the bundled sample file."""

from __future__ import annotations

import csv
import gzip
import re
import subprocess
import sys
from collections import defaultdict
from datetime import datetime
from zoneinfo import ZoneInfo

from orchestrator import demo
from tests.harness import ClusterHandle, make_tmp_dir, stop_cluster


def _reference_top_december() -> list[tuple[str, int]]:
    london = ZoneInfo(demo.DEMO_TZ)
    sums: dict[str, float] = defaultdict(float)
    with gzip.open(demo.SAMPLE_READINGS, "rt") as fh:
        for row in csv.DictReader(fh):
            local = datetime.fromisoformat(row["ts"]).astimezone(london)
            if (local.year, local.month) == (2023, 12):
                sums[row["building"]] += float(row["kwh"])
    return sorted(((b, round(s)) for b, s in sums.items()), key=lambda x: -x[1])[:5]


def test_demo_brings_up_a_cluster_loads_the_sample_and_answers() -> None:
    handle = ClusterHandle(make_tmp_dir("bs-demo-") / "cluster")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator", "demo", "--workers", "2", "--dir", str(handle.directory)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        assert "122,640 rows" in out and "rejected 0" in out
        shown = re.findall(r"│ (b\d+)\s+│\s+([\d,]+) │", out.split("Daily profile")[0])
        assert [(b, int(k.replace(",", ""))) for b, k in shown] == _reference_top_december()
        assert out.count("2023-12-31 23:00") == 14  # the last reading of each of the 14 meters
        with handle.coordinator(admin=False) as conn:
            assert conn.execute("SELECT count(*) FROM readings").fetchone() == (122_640,)
        again = subprocess.run(
            [sys.executable, "-m", "orchestrator", "demo", "--workers", "2", "--dir", str(handle.directory)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert "unchanged 122,640" in again.stdout  # a second run reuses the cluster and duplicates nothing
    finally:
        stop_cluster(handle)

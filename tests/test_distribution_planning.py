"""Pure logic of self-distribution (no servers): split points from data and from statistics,
first-load layout, the balancer's decisions, write rates, time-split routing, input counting."""

from __future__ import annotations

import gzip
import itertools
from collections import deque
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from orchestrator.elastic.autobalance import rates
from orchestrator.elastic.autosplit import LayoutState, count_buildings, place, plan_presplit, range_weights
from orchestrator.elastic.observe import FragmentSample, Sample
from orchestrator.elastic.policy import BalancerPolicy, parse_settings, parse_size
from orchestrator.elastic.rebalance import BalanceSnapshot, FragmentView, decide
from orchestrator.elastic.splitpoints import ColumnStats, building_split_point, fraction_below, time_split_point
from orchestrator.exceptions import ConfigError
from orchestrator.fragments import Fragment, Router, c_order, initial_fragments, weighted_split_points

MB = 1024 * 1024
ODD_IDS = [
    "Ghausi Hall",
    " leading space",
    "trailing space ",
    "p:demo:r:21986bd2-8152fe4e",
    "p:demo:r:21986bd2-8152fe4f",
    "p:demo:r:2198",
    "550e8400-e29b-41d4-a716-446655440000",
    "550e8400-e29b-41d4-a716-446655440001",
    "Zürich Kaserne",
    "東京タワー",
    "é",
    "e",
    "E",
    "site-0042",
    "site-0042-annex",
]


# ---------------------------------------------------------------- split points from counts


def test_weighted_split_points_even_weights() -> None:
    counts = {f"b{i}": 100 for i in range(120)}
    points = weighted_split_points(counts, 6)
    assert len(points) == 5
    router = Router(initial_fragments(points, ["w1"], "1 month"))
    per: dict[int, int] = {}
    for b, n in counts.items():
        per[router.route(b).fragment_id] = per.get(router.route(b).fragment_id, 0) + n
    assert max(per.values()) - min(per.values()) <= 100  # one building at most


def test_weighted_split_points_isolate_a_heavy_building_and_keep_byte_order() -> None:
    counts = {"a": 10, "b": 10, "big": 1000, "c": 10, "d": 10}
    points = weighted_split_points(counts, 4)
    assert list(points) == sorted(points, key=c_order)
    router = Router(initial_fragments(points, ["w1"], "1 month"))
    big = router.route("big")
    assert [b for b in counts if router.route(b) == big] == ["big"]  # alone in its range
    assert weighted_split_points({"only": 5}, 4) == ()
    assert weighted_split_points({}, 4) == ()


def test_weighted_split_points_any_id_shape_in_byte_order() -> None:
    counts = {b: 10 + i for i, b in enumerate(ODD_IDS)}
    points = weighted_split_points(counts, 5)
    assert len(points) == 4
    assert [c_order(p) for p in points] == sorted(c_order(p) for p in points)
    assert " leading space" in ODD_IDS and all(p in counts for p in points)  # real ids, kept verbatim
    router = Router(initial_fragments(points, ["w1", "w2"], "1 month"))
    for b in ODD_IDS:
        assert router.route(b).holds(b)
        assert router.route_bytes(b.encode()) == router.route(b)


def test_place_round_robin_and_neighbours_apart() -> None:
    assert place([1] * 6, ("w1", "w2", "w3")) == ["w1", "w2", "w3", "w1", "w2", "w3"]
    assert place([50, 10, 10, 10], ("w1", "w2")) == ["w1", "w2", "w1", "w2"]  # two workers: alternate
    weights = [50, 10, 10, 10, 10, 10, 10, 10, 10]
    nodes = place(weights, ("w1", "w2", "w3"))
    assert all(a != b for a, b in itertools.pairwise(nodes))
    load = {n: sum(w for w, x in zip(weights, nodes, strict=True) if x == n) for n in ("w1", "w2", "w3")}
    assert load == {"w1": 50, "w2": 40, "w3": 40}  # the heavy range's worker takes no more


def test_range_weights() -> None:
    ranges = [(None, "b"), ("b", "m"), ("m", None)]
    assert range_weights(ranges, {"a": 1, "b": 2, "c": 3, "z": 4, "m": 5}) == [1, 5, 9]


def _state(**kw: object) -> LayoutState:
    base: dict[str, object] = {
        "fragments": (Fragment(1, None, None, "w1"),),
        "workers": ("w1", "w2", "w3"),
        "auto_layout": True,
        "empty": True,
        "next_id": 2,
    }
    base.update(kw)
    return LayoutState(**base)  # type: ignore[arg-type]


def test_plan_presplit_lays_out_and_says_why() -> None:
    counts = {f"b{i}": 1000 for i in range(90)}
    new, reason = plan_presplit(_state(), counts, BalancerPolicy())
    assert new is not None and len(new) == 9
    assert [f.fragment_id for f in new] == list(range(2, 11))
    assert {f.node for f in new} == {"w1", "w2", "w3"}
    assert all(a.node != b.node for a, b in itertools.pairwise(new))
    assert new[0].range_from is None and new[-1].range_to is None
    assert "90,000 rows (90 buildings counted)" in reason
    # the same layout again: nothing to do (idempotent)
    again, why = plan_presplit(_state(fragments=new, next_id=11), counts, BalancerPolicy())
    assert again is None and "already fits" in why


@pytest.mark.parametrize(
    ("kw", "counts", "why"),
    [
        ({"auto_layout": False}, {"a": 1, "b": 1}, "given by the user"),
        ({"empty": False}, {"a": 1, "b": 1}, "already hold rows"),
        ({}, {}, "no rows"),
        ({"workers": ()}, {"a": 1, "b": 1}, "no active worker"),
    ],
)
def test_plan_presplit_refusals(kw: dict[str, object], counts: dict[str, int], why: str) -> None:
    new, reason = plan_presplit(_state(**kw), counts, BalancerPolicy())
    assert new is None and why in reason


# ---------------------------------------------------------------- split points from statistics


def test_fraction_below_combines_mcv_and_histogram() -> None:
    stats = ColumnStats(0.0, 100.0, (("m", 0.4),), ("a", "c", "e", "g", "i"))
    assert fraction_below(stats, "a") == pytest.approx(0.0)
    assert fraction_below(stats, "e") == pytest.approx(0.3)  # half the histogram's 0.6
    assert fraction_below(stats, "g") == pytest.approx(0.45)
    assert fraction_below(stats, "n") == pytest.approx(1.0)  # everything below "n"
    assert building_split_point(stats, None, None) == "g"  # the building nearest one half


def test_building_split_point_isolates_a_dominant_building_and_respects_the_range() -> None:
    stats = ColumnStats(0.0, 3.0, (("big", 0.8), ("a", 0.1), ("c", 0.1)), ())
    at = building_split_point(stats, None, None)
    assert at in ("big", "c")  # cuts right before or right after the dominant building
    assert building_split_point(stats, "big", None) == "c"  # never at the lower bound itself
    assert building_split_point(ColumnStats(0.0, 1.0, (("x", 1.0),), ()), None, None) is None
    unicode_stats = ColumnStats(0.0, -0.5, (), tuple(sorted(ODD_IDS, key=c_order)))
    cut = building_split_point(unicode_stats, None, None)
    assert cut is not None and 0.3 < fraction_below(unicode_stats, cut) < 0.7


def test_time_split_point_falls_on_a_partition_bound() -> None:
    t0 = datetime(2023, 1, 1, tzinfo=UTC)
    months = [t0 + timedelta(days=31 * i) for i in range(12)]
    hist = tuple(t0 + timedelta(days=3.6 * i) for i in range(101))  # rows spread over the year
    stats = ColumnStats(0.0, -1.0, (), hist)
    at = time_split_point(stats, months, None, None)
    assert at in months and abs((at - (t0 + timedelta(days=182))).days) <= 31
    later = time_split_point(stats, months, at, None)  # within the later half only
    assert later is not None and later > at
    assert time_split_point(stats, [t0], None, None) is None  # nothing on both sides


# ---------------------------------------------------------------- the balancer's decisions


def _view(fid: int, node: str, mb: float, **kw: object) -> FragmentView:
    frag = Fragment(fid, f"b{fid:03d}" if fid > 1 else None, f"b{fid + 1:03d}", node)
    return FragmentView(frag, int(mb * MB), int(mb * 10_000), **kw)  # type: ignore[arg-type]


def _snap(views: list[FragmentView], **kw: object) -> BalanceSnapshot:
    base: dict[str, object] = {"fragments": tuple(views), "workers": ("w1", "w2", "w3"), "write_rate": 0.0}
    base.update(kw)
    return BalanceSnapshot(**base)  # type: ignore[arg-type]


def test_small_cluster_is_left_alone() -> None:
    d = decide(_snap([_view(1, "w1", 10)]), BalancerPolicy())
    assert d.action == "none" and "bytes are balanced from" in d.reason


def test_balanced_cluster_needs_nothing() -> None:
    views = [_view(i, f"w{(i - 1) % 3 + 1}", 100) for i in range(1, 10)]
    d = decide(_snap(views), BalancerPolicy())
    assert d.action == "none" and "within ±10%" in d.reason


def test_move_evens_bytes_and_says_why() -> None:
    views = [_view(1, "w1", 100), _view(2, "w1", 100), _view(3, "w2", 100), _view(4, "w3", 100), _view(5, "w1", 100)]
    d = decide(_snap(views), BalancerPolicy())
    assert d.action == "move" and d.target in ("w2", "w3") and d.fragment_id in (1, 2, 5)
    assert "w1 holds" in d.reason and d.purpose == "evenness"


def test_split_needs_statistics_first_then_splits() -> None:
    policy = BalancerPolicy(split_bytes=500 * MB)
    views = [_view(1, "w1", 800), _view(2, "w2", 300), _view(3, "w3", 300)]
    first = decide(_snap(views), policy)
    assert first.action == "analyze" and first.analyze == (1,)
    views[0] = _view(1, "w1", 800, stats_known=True, split_at="b001x")
    second = decide(_snap(views), policy)
    assert (second.action, second.fragment_id, second.at, second.purpose) == ("split", 1, "b001x", "size")


def test_one_building_is_split_by_time() -> None:
    at = datetime(2023, 7, 1, tzinfo=UTC)
    views = [_view(1, "w1", 800, stats_known=True, split_at=None, split_ts=at), _view(2, "w2", 50), _view(3, "w3", 50)]
    d = decide(_snap(views), BalancerPolicy())
    assert d.action == "time_split" and d.at_ts == at and "split by time" in d.reason


def test_unsplittable_fragment_is_left_with_a_reason() -> None:
    # one building in one time partition: statistics give no split point at all
    views = [_view(1, "w1", 800, stats_known=True), _view(2, "w2", 50), _view(3, "w3", 50)]
    d = decide(_snap(views), BalancerPolicy())
    assert d.action == "none" and "no move or split narrows it further" in d.reason


def test_loading_defers_evenness_and_paces_size_splits() -> None:
    policy = BalancerPolicy(split_bytes=500 * MB, min_split_bytes=400 * MB)
    views = [_view(1, "w1", 100), _view(2, "w1", 100), _view(3, "w2", 100), _view(4, "w3", 10)]
    busy = decide(_snap(views, write_rate=50_000.0, busy_for_s=30.0), policy)
    assert busy.action == "wait" and "waits for the load to end" in busy.reason
    long_busy = decide(_snap(views, write_rate=50_000.0, busy_for_s=policy.busy_defer_s + 1), policy)
    assert long_busy.action == "move"
    huge = [_view(1, "w1", 600, stats_known=True, split_at="b001x"), _view(2, "w2", 100), _view(3, "w3", 100)]
    paced = decide(_snap(huge, write_rate=50_000.0, last_operation_s=10.0, idle_s=5.0), policy)
    assert paced.action == "wait" and "25% of the time" in paced.reason
    go = decide(_snap(huge, write_rate=50_000.0, last_operation_s=10.0, idle_s=31.0), policy)
    assert go.action == "split" and go.purpose == "size"


def test_no_rates_yet_means_wait() -> None:
    views = [_view(1, "w1", 100), _view(2, "w1", 100), _view(3, "w2", 10)]
    d = decide(_snap(views, write_rate=None), BalancerPolicy())
    assert d.action == "wait" and "measuring" in d.reason


def test_balance_split_when_no_move_fits_and_cap_holds() -> None:
    views = [_view(1, "w1", 300, stats_known=True, split_at="b001x"), _view(2, "w2", 100), _view(3, "w3", 100)]
    d = decide(_snap(views), BalancerPolicy(split_bytes=10_000 * MB, min_split_bytes=1000 * MB))
    assert d.action == "split" and d.fragment_id == 1 and d.purpose == "evenness"
    capped = decide(_snap(views), BalancerPolicy(split_bytes=10_000 * MB, min_split_bytes=1000 * MB, max_fragments_per_worker=1))
    assert capped.action == "none" and "1 fragments per worker" in capped.reason


def test_hot_fragment_is_split_when_not_bulk_loading() -> None:
    views = [_view(1, "w1", 100, write_rate=9000.0, stats_known=True, split_at="b001x"), _view(2, "w2", 100, write_rate=500.0),
             _view(3, "w3", 100, write_rate=500.0)]  # fmt: skip
    d = decide(_snap(views, write_rate=10_000.0), BalancerPolicy())
    assert d.action == "split" and d.purpose == "writes" and "90%" in d.reason
    # the tail of a bulk load (busy less than a window ago) is not a hot spot
    tail = decide(_snap(views, write_rate=10_000.0, calm_for_s=20.0), BalancerPolicy())
    assert tail.purpose == "evenness"  # what is left to do has nothing to do with writes


def test_draining_worker_is_emptied_first() -> None:
    views = [_view(1, "w3", 100), _view(2, "w1", 100), _view(3, "w2", 100)]
    d = decide(_snap(views, workers=("w1", "w2"), draining=frozenset({"w3"})), BalancerPolicy())
    assert d.action == "move" and d.fragment_id == 1 and d.target in ("w1", "w2") and d.purpose == "drain"


def test_decide_is_pure() -> None:
    views = [_view(i, "w1", 50 * i) for i in range(1, 6)]
    assert decide(_snap(views), BalancerPolicy()) == decide(_snap(views), BalancerPolicy())


# ---------------------------------------------------------------- write rates


def _sample(at: float, writes: dict[int, int], version: int = 1) -> Sample:
    return Sample(at, version, tuple(FragmentSample(Fragment(f, None, None, "w1"), 0, 0, w, 1) for f, w in writes.items()))


def test_rates_over_the_window_and_after_a_counter_reset() -> None:
    h = deque([_sample(0.0, {1: 0, 2: 0}), _sample(10.0, {1: 1000, 2: 100}), _sample(20.0, {1: 3000, 2: 200})])
    per, total = rates(h, 60.0)
    assert per == {1: 150.0, 2: 10.0} and total == 160.0
    per, _ = rates(deque([_sample(0.0, {1: 5000}), _sample(10.0, {1: 100})]), 60.0)
    assert per == {1: 10.0}  # the counter restarted (failover): counted from zero
    assert rates(deque([_sample(0.0, {1: 1})]), 60.0) == ({}, None)


# ---------------------------------------------------------------- routing in a time group


def test_router_routes_a_time_split_building_by_timestamp() -> None:
    cut = datetime(2023, 7, 1, tzinfo=UTC)
    frags = [
        Fragment(1, None, "m", "w1"),
        Fragment(2, "m", "n", "w1", ts_to=cut, time_group="readings_g2"),
        Fragment(3, "m", "n", "w2", ts_from=cut, time_group="readings_g2"),
        Fragment(4, "n", None, "w2"),
    ]
    router = Router(frags)
    assert router.route("a").fragment_id == 1
    assert router.route_row(b"m1", b"m1,el,2023-06-30 23:00:00+00,1").fragment_id == 2
    assert router.route_row(b"m1", b"m1,el,2023-07-01 00:00:00+00,1").fragment_id == 3
    assert router.route_row(b"m1", b'"m1",el,2023-07-01 00:30:00+01,1').fragment_id == 2  # 23:30 UTC the day before
    assert router.route_row(b"m1", b'"m1",el,2023-07-01 01:00:00+01,1').fragment_id == 3  # exactly the cut
    assert router.route("m1", datetime(2024, 1, 1, tzinfo=UTC)).fragment_id == 3
    with pytest.raises(ConfigError, match="split by time"):
        router.route("m1")
    with pytest.raises(ConfigError, match="time gap"):
        Router([frags[0], frags[1], Fragment(3, "m", "n", "w2", ts_from=cut + timedelta(days=1), time_group="g"), frags[3]])


# ---------------------------------------------------------------- counting the input, settings


def test_count_buildings_plain_gzip_reordered_quoted_and_sampled(tmp_path: Path) -> None:
    lines = ["building,meter,ts,kwh"] + [f"b{i % 7},el,2023-01-01 00:00:00+00,{i}" for i in range(7000)]
    plain = tmp_path / "r.csv"
    plain.write_text("\n".join(lines) + "\n")
    assert count_buildings(plain) == {f"b{i}": 1000 for i in range(7)}
    gz = tmp_path / "r.csv.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    assert count_buildings(gz) == count_buildings(plain)
    reordered = tmp_path / "o.csv"
    reordered.write_text('ts,kwh,building,meter\n2023-01-01 00:00:00+00,1,"Hall, North",el\n2023-01-01 00:00:00+00,1,x,el\n')
    assert count_buildings(reordered) == {"Hall, North": 1, "x": 1}
    sampled = count_buildings(plain, sample_bytes=40_000, chunk_bytes=4096)  # every 5th chunk or so
    assert set(sampled) == {f"b{i}" for i in range(7)}
    assert abs(sum(sampled.values()) - 7000) < 7000 * 0.1
    assert all(abs(n - 1000) < 150 for n in sampled.values())
    jl = tmp_path / "r.jsonl"
    jl.write_text('{"building": "A B", "meter": "m", "ts": "2023-01-01T00:00:00Z", "kwh": 1}\n')
    assert count_buildings(jl) == {"A B": 1}


def test_policy_settings() -> None:
    assert parse_size("64MB") == 64 * MB and parse_size("1.5 GiB") == int(1.5 * 1024 * MB) and parse_size(10) == 10
    assert parse_settings({"split_bytes": "256MB", "tolerance": "0.05"}) == {"split_bytes": 256 * MB, "tolerance": 0.05}
    with pytest.raises(ConfigError, match="unknown"):
        parse_settings({"nope": 1})
    with pytest.raises(ConfigError):
        parse_settings({"tolerance": "abc"})
    p = BalancerPolicy()
    assert p.split_threshold(0, 3) == p.min_split_bytes
    assert p.split_threshold(100 * 1024 * MB, 3) == p.split_bytes
    assert p.split_threshold(9 * 300 * MB, 3) == 600 * MB

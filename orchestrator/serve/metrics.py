"""``/metrics`` in Prometheus' text format (prometheus_client), rendered from the one status
snapshot (orchestrator/serve/snapshot.py), plus what only this process sees: readings taken in
over HTTP and rejected, and HTTP request latency.

Why a custom collector: the snapshot is already a frozen value; each scrape turns it into gauges
as it is, so /metrics, the dashboard and ``buildsmart status`` can never disagree.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.serve.snapshot import StatusPoller

ROLES = ("primary", "replica")


class ClusterCollector(Collector):
    def __init__(self, poller: StatusPoller) -> None:
        self.poller = poller

    def collect(self) -> Iterator[Metric]:
        snap = self.poller.latest()
        age = GaugeMetricFamily("buildsmart_status_age_seconds", "Seconds since the status snapshot was collected")
        age.add_metric([], time.time() - snap.collected_at if snap.collected_at else float("inf"))
        yield age
        took = GaugeMetricFamily("buildsmart_status_collect_seconds", "How long the last status collection took")
        took.add_metric([], snap.seconds)
        yield took
        failed = GaugeMetricFamily("buildsmart_status_collect_failed", "1 when the last status collection failed")
        failed.add_metric([], 1.0 if snap.error else 0.0)
        yield failed
        s = snap.status
        if s is None:
            return
        yield from _nodes(s)
        yield from _fragments(s)
        yield from _jobs(s)
        yield from _mirror(s)
        yield from _check_and_backup(s)


def _nodes(s: Any) -> Iterator[Metric]:
    up = GaugeMetricFamily("buildsmart_node_up", "1 when the node group's primary answers", labels=["node", "role"])
    primary = GaugeMetricFamily(
        "buildsmart_node_primary", "1 when the node answers as a primary (not in recovery)", labels=["node"]
    )
    size = GaugeMetricFamily("buildsmart_node_database_bytes", "Size of the node's database", labels=["node"])
    member_up = GaugeMetricFamily(
        "buildsmart_member_up", "1 when the Patroni member is running", labels=["node", "member", "role", "state"]
    )
    lag = GaugeMetricFamily("buildsmart_member_replication_lag_bytes", "Replication lag of a member", labels=["node", "member"])
    timeline = GaugeMetricFamily("buildsmart_member_timeline", "Timeline of a member", labels=["node", "member"])
    sync = GaugeMetricFamily("buildsmart_member_sync", "1 for a synchronous standby", labels=["node", "member"])
    for n in s.nodes:
        up.add_metric([n.name, n.role], 1.0 if n.up else 0.0)
        primary.add_metric([n.name], 1.0 if n.up and n.in_recovery is False else 0.0)
        if n.size_bytes is not None:
            size.add_metric([n.name], float(n.size_bytes))
        for m in n.members:
            member_up.add_metric(
                [n.name, m.name, m.role or "unknown", m.state or "unknown"], 1.0 if m.state == "running" else 0.0
            )
            if m.lag_bytes is not None:
                lag.add_metric([n.name, m.name], float(m.lag_bytes))
            if m.timeline is not None:
                timeline.add_metric([n.name, m.name], float(m.timeline))
            sync.add_metric([n.name, m.name], 1.0 if m.sync else 0.0)
    yield from (up, primary, size, member_up, lag, timeline, sync)


def _fragments(s: Any) -> Iterator[Metric]:
    rows = GaugeMetricFamily(
        "buildsmart_fragment_rows",
        "Live rows of a fragment (statistics)",
        labels=["fragment", "shard", "node", "range_from", "range_to"],
    )
    size = GaugeMetricFamily(
        "buildsmart_fragment_bytes", "Bytes of a fragment (partitions and indexes)", labels=["fragment", "shard", "node"]
    )
    parts = GaugeMetricFamily(
        "buildsmart_fragment_time_partitions", "Time partitions of a fragment", labels=["fragment", "shard", "node"]
    )
    for f in s.fragments:
        labels = [str(f.fragment_id), f.shard_name, f.node]
        if f.rows is not None:
            rows.add_metric([*labels, f.range_from or "", f.range_to or ""], float(f.rows))
        if f.bytes is not None:
            size.add_metric(labels, float(f.bytes))
        if f.time_partitions is not None:
            parts.add_metric(labels, float(f.time_partitions))
    share = GaugeMetricFamily("buildsmart_worker_bytes", "Bytes of fragments per worker", labels=["node"])
    for w in s.workers:
        share.add_metric([w.node], float(w.bytes))
    yield from (rows, size, parts, share)


def _jobs(s: Any) -> Iterator[Metric]:
    jobs = GaugeMetricFamily("buildsmart_jobs", "Open long operations (moves, splits) by state", labels=["state"])
    counts = {"scheduled": 0, "running": 0}
    paused = GaugeMetricFamily("buildsmart_balancer_paused", "1 when the automatic balancer is paused")
    runner = GaugeMetricFamily("buildsmart_task_runner_elected", "1 when a task runner holds the election")
    tasks = GaugeMetricFamily("buildsmart_task_failures", "Failed runs of a periodic task", labels=["task"])
    if s.balancer is not None:
        for _, _, state, _ in s.balancer.open_jobs:
            counts[state] = counts.get(state, 0) + 1
        paused.add_metric([], 1.0 if s.balancer.paused else 0.0)
        runner.add_metric([], 1.0 if s.balancer.runner else 0.0)
    for state, n in sorted(counts.items()):
        jobs.add_metric([state], float(n))
    for t in s.tasks:
        tasks.add_metric([t.task], float(t.failures))
    yield from (jobs, paused, runner, tasks)


def _mirror(s: Any) -> Iterator[Metric]:
    lag = GaugeMetricFamily("buildsmart_mirror_lag_seconds", "Age of the oldest device change not yet in MongoDB")
    backlog = GaugeMetricFamily("buildsmart_mirror_backlog_events", "Device changes not yet in MongoDB")
    ok = GaugeMetricFamily("buildsmart_mirror_readable", "1 when the mirror's state could be read")
    ok.add_metric([], 0.0 if s.mirror_error else 1.0)
    if s.mirror:
        lag.add_metric([], float(s.mirror.get("seconds") or 0.0))
        backlog.add_metric([], float(s.mirror.get("events") or 0))
    yield from (lag, backlog, ok)


def _check_and_backup(s: Any) -> Iterator[Metric]:
    check_ok = GaugeMetricFamily("buildsmart_check_ok", "1 when the newest `buildsmart check` found nothing")
    check_at = GaugeMetricFamily("buildsmart_check_last_run_timestamp_seconds", "When the newest check finished")
    if s.last_check is not None:
        check_ok.add_metric([], 1.0 if s.last_check.ok else 0.0)
        check_at.add_metric([], s.last_check.finished_at.timestamp())
    configured = GaugeMetricFamily("buildsmart_backup_configured", "1 when a backup repository is set")
    ok = GaugeMetricFamily("buildsmart_backup_ok", "1 when backups are configured and have no problem")
    age = GaugeMetricFamily("buildsmart_backup_last_good_age_seconds", "Age of the newest good base backup of the cluster")
    problems = GaugeMetricFamily("buildsmart_backup_problems", "Backup problems (archiving failing, a group without backup)")
    b = s.backup
    if b is not None:
        configured.add_metric([], 1.0 if b.configured else 0.0)
        ok.add_metric([], 1.0 if b.ok else 0.0)
        problems.add_metric([], float(len(b.problems)))
        if b.last_good_backup_age_s is not None:
            age.add_metric([], float(b.last_good_backup_age_s))
    yield from (check_ok, check_at, configured, ok, age, problems)


class Metrics:
    """The registry of one server: the cluster collector and this process's own counters."""

    def __init__(self, poller: StatusPoller) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ClusterCollector(poller))
        self.ingest_rows = Counter(
            "buildsmart_http_ingest_rows", "Readings committed through this server", ["source"], registry=self.registry
        )
        self.ingest_rejects = Counter(
            "buildsmart_http_ingest_rejects", "Readings refused by the ingest checks", ["source"], registry=self.registry
        )
        self.requests = Histogram(
            "buildsmart_http_request_duration_seconds",
            "HTTP request latency",
            ["route", "method", "status"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )

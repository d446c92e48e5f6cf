"""Bringing planned hosts to a usable state: etcd answers, its authentication is on with every
planned user, and every group has its primary and synchronous standby.

Why here and not in ``orchestrator/hostinit.py``: ``host init`` (the whole cluster) and the
``hosts`` runtime's ``add_worker`` (``node add`` of a group added to the plan) both need these
steps, and runtimes must not import ``orchestrator/cluster.py``. Each step is safe to repeat:
users that exist are kept, a group that runs is not waited for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from orchestrator.exceptions import NodeError
from orchestrator.runtime import etcd, etcdcluster, ha
from orchestrator.runtime.hasettings import HaSettings
from orchestrator.runtime.hostfiles import Secrets
from orchestrator.runtime.hostplan import ClusterPlan
from orchestrator.topology import Group

log = logging.getLogger(__name__)

Report = Callable[[str], None]
PROGRESS_EVERY_S = 10.0


def wait_etcd(p: ClusterPlan, settings: HaSettings, deadline: float, report: Report, rerun: str) -> None:
    """Every planned etcd member answers its health check (over TLS, with our client certificate)."""
    context = settings.ssl_context()
    last = 0.0
    while True:
        missing = [e for e in p.etcd if not etcd.healthy(e.url, context)]
        if not missing:
            report(f"etcd: {len(p.etcd)} of {len(p.etcd)} members answer")
            return
        now = time.monotonic()
        names = ", ".join(f"{e.name} on {e.host} ({e.url})" for e in missing)
        if now >= deadline:
            raise NodeError(
                f"etcd: no answer from {names}: start the agent on those hosts "
                f"(`buildsmart host up --dir DIR --host NAME`) and {rerun}; nothing was changed yet"
            )
        if now - last >= PROGRESS_EVERY_S:
            report(f"etcd: {len(p.etcd) - len(missing)} of {len(p.etcd)} members answer; waiting for {names}")
            last = now
        time.sleep(0.5)


def ensure_auth(p: ClusterPlan, settings: HaSettings, secrets: Secrets, report: Report) -> None:
    """etcd's authentication on, with every planned user (each confined to the cluster's prefix)."""
    client = etcd.Client(tuple(e.url for e in p.etcd), settings.ssl_context())
    users = {u: (secrets.etcd_users[u], p.namespace) for u in p.etcd_users}
    if not etcdcluster.auth_enabled(client):
        etcdcluster.enable_auth(client, secrets.etcd_root, users)
        report(f"etcd: authentication on; {len(users)} users, each confined to {p.namespace}")
        return
    root = etcd.Client(client.urls, client.context, "root", secrets.etcd_root)
    added = etcdcluster.add_users(root, users)
    report(f"etcd: authentication was on; added users {', '.join(added)}" if added else "etcd: authentication on, users exist")


def group_state(settings: HaSettings, group: Group) -> tuple[str | None, bool]:
    """The running primary of ``group`` (None: none yet) and whether a synchronous standby streams."""
    members = ha.members_status(settings, group)
    primary = next((m["name"] for m in members if m["role"] == "leader" and m["state"] == "running"), None)
    synced = any(m["role"] == "sync_standby" and m["state"] in ("streaming", "running") for m in members)
    return primary, synced


def wait_groups(
    p: ClusterPlan, groups: Sequence[Group], settings: HaSettings, deadline: float, report: Report, rerun: str
) -> None:
    """Each of ``groups`` has its primary and (synchronous mode, two members or more) its
    synchronous standby."""
    pending = {g.name: g for g in groups}
    needs_sync = {g.name: p.spec.synchronous != "off" and len(g.members) > 1 for g in groups}
    last = time.monotonic()
    while pending:
        for name, group in list(pending.items()):
            primary, synced = group_state(settings, group)
            if primary is not None and (synced or not needs_sync[name]):
                report(f"{name}: primary {primary} running" + (", synchronous standby streaming" if needs_sync[name] else ""))
                del pending[name]
        if not pending:
            return
        now = time.monotonic()
        if now >= deadline:
            states = {n: group_state(settings, g) for n, g in pending.items()}
            what = "; ".join(
                f"{n}: " + ("no primary yet" if s[0] is None else f"primary {s[0]}, no synchronous standby yet")
                for n, s in states.items()
            )
            raise NodeError(
                f"timed out waiting for {what} (each host's agent log: DIR/agent-NAME.log; Patroni's: the member's "
                f"patroni.log); etcd authentication is on; {rerun} once they run"
            )
        if now - last >= PROGRESS_EVERY_S:
            report(f"waiting for {', '.join(pending)} (a primary and a synchronous standby each)")
            last = now
        time.sleep(1.0)

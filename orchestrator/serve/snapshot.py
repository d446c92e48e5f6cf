"""The one status snapshot (orchestrator.status.ClusterStatus) that the dashboard and /metrics
render, collected by a background thread every ``interval`` seconds.

Why a thread: collecting asks every node, every Patroni member, the mirror and the backup
repository (about a second); pages and scrapes must not wait for it, nor multiply it. A failed
collection keeps the previous snapshot and says so (``error``, ``age``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator import status
from orchestrator.exceptions import BuildSmartError

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 2.0


@dataclass(frozen=True)
class Snapshot:
    status: status.ClusterStatus | None
    collected_at: float  # time.time() of the last successful collection (0: never)
    seconds: float  # how long it took
    error: str | None  # the last collection's failure, if it failed


class StatusPoller:
    def __init__(self, directory: Path, interval: float = DEFAULT_INTERVAL_S) -> None:
        self.directory = directory
        self.interval = interval
        self._snapshot = Snapshot(None, 0.0, 0.0, None)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-poller", daemon=True)
        self._was_down: set[str] = set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def latest(self, wait_s: float = 0.0) -> Snapshot:
        if wait_s:
            self._ready.wait(wait_s)
        return self._snapshot

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.collect_once()
            self._stop.wait(max(0.2, self.interval - (time.monotonic() - started)))

    def collect_once(self) -> Snapshot:
        started = time.monotonic()
        try:
            data = status.collect(self.directory)
        except (BuildSmartError, OSError) as exc:
            prev = self._snapshot
            self._snapshot = Snapshot(prev.status, prev.collected_at, time.monotonic() - started, str(exc))
            log.warning("status collection failed: %s", exc)
        except Exception as exc:  # keep serving the last snapshot whatever went wrong
            prev = self._snapshot
            self._snapshot = Snapshot(prev.status, prev.collected_at, time.monotonic() - started, f"{type(exc).__name__}: {exc}")
            log.warning("status collection failed", exc_info=True)
        else:
            self._snapshot = Snapshot(data, time.time(), time.monotonic() - started, None)
            down = {n.name for n in data.nodes if not n.up}
            for name in sorted(down - self._was_down):
                log.info("node %s is down", name)
            for name in sorted(self._was_down - down):
                log.info("node %s is up again", name)
            self._was_down = down
        self._ready.set()
        return self._snapshot

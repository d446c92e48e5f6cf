"""The front door for the tests: one ``buildsmart serve --detach`` on the session's plain cluster
(a session fixture: the API and browser tests share it), with two users and a real Cambridge
meter, b0 electricity 2019-2023 (43,824 hourly readings), deleted again at the end."""

from __future__ import annotations

import base64
import gzip
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from phable import HaystackClient, Ref

from orchestrator import demo
from orchestrator.runtime.ports import free_port
from tests.harness import SHARED_DATA, ClusterHandle, make_tmp_dir

BUILDING, METER = "b0", "electricity"
POINT = Ref("pt:b0:electricity")
LONDON = ZoneInfo("Europe/London")
READER, WRITER, PASSWORD = "reader", "writer", "correct horse battery"


@dataclass(frozen=True)
class Front:
    handle: ClusterHandle
    url: str

    @property
    def api(self) -> str:
        return f"{self.url}/api"

    def client(self, user: str = READER, content_type: str = "json") -> HaystackClient:
        return HaystackClient.open(self.api, user, PASSWORD, content_type=content_type)

    def get(self, path: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {}, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


def basic(user: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{PASSWORD}".encode()).decode()}


def _meter_csv(path: Path) -> int:
    """b0's electricity meter, 2019-2023, from the shared Cambridge archive."""
    n = 0
    with gzip.open(SHARED_DATA / "cambridge-estates" / "readings-2019-2023.csv.gz", "rt") as src, path.open("w") as out:
        out.write(src.readline())
        for line in src:
            if line.startswith("b0,electricity,"):
                out.write(line)
                n += 1
            elif n:
                break  # the archive is sorted by building and meter
    return n


@pytest.fixture(scope="session")
def front(main_cluster: ClusterHandle) -> Iterator[Front]:
    tmp = make_tmp_dir("bs-serve-")
    assert _meter_csv(tmp / "b0.csv") == 43_824
    demo.load_buildings(main_cluster.directory, SHARED_DATA / "cambridge-estates" / "buildings.csv")
    main_cluster.run_cli("ingest", str(tmp / "b0.csv"))
    for user, rights in ((READER, "read"), (WRITER, "write")):
        main_cluster.run_cli("users", "add", user, "--rights", rights, "--password-stdin", stdin=PASSWORD + "\n")
    port = free_port()
    main_cluster.run_cli("serve", "--detach", "--port", str(port))
    try:
        yield Front(main_cluster, f"http://127.0.0.1:{port}")
    finally:
        main_cluster.run_cli("serve", "--stop")
        with main_cluster.coordinator() as conn:
            conn.execute("DELETE FROM public.readings WHERE building = %s", (BUILDING,))
            conn.execute("DELETE FROM buildsmart.http_users WHERE name IN (%s, %s)", (READER, WRITER))
        subprocess.run(["rm", "-rf", str(tmp)], check=False)

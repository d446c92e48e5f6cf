"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): log in, the cluster
page lists every node and fragment from the status snapshot, the building page draws its charts
from the real Cambridge meter, and a stopped worker shows as down within 10 s.

Screenshots go to a temporary folder (``BUILDSMART_SCREENSHOTS`` keeps them: scripts/screenshots
uses that to refresh the ones in docs/)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from orchestrator import cluster
from orchestrator.osuser import service_user
from orchestrator.runtime import local
from tests.front import LONDON, PASSWORD, READER, Front
from tests.harness import make_tmp_dir

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def shots() -> Path:
    wanted = os.environ.get("BUILDSMART_SCREENSHOTS")
    path = Path(wanted) if wanted else make_tmp_dir("bs-shots-")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def page(front: Front) -> Iterator[object]:
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: scripts/setup.sh installs it"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        pg = context.new_page()
        try:
            yield pg
        finally:
            browser.close()


def test_login_is_required_and_wrong_password_is_refused(front: Front, page) -> None:
    page.goto(f"{front.url}/ui/")
    assert "/ui/login" in page.url
    page.fill("#username", READER)
    page.fill("#password", "wrong password")
    page.click("#login")
    page.wait_for_selector("#failed:not([hidden])")
    page.fill("#username", READER)
    page.fill("#password", PASSWORD)
    page.click("#login")
    page.wait_for_url(f"{front.url}/ui/")


def test_cluster_page_shows_nodes_and_fragments(front: Front, page, shots: Path) -> None:
    started = time.monotonic()
    page.goto(f"{front.url}/ui/")
    page.wait_for_function("document.querySelectorAll('#fragments tbody tr').length > 0")
    load_s = time.monotonic() - started
    topo = front.handle.topology
    nodes = page.inner_text("#nodes tbody")
    for g in topo.groups:
        assert g.name in nodes
    assert "down" not in nodes
    with front.handle.coordinator() as conn:
        n_frag = conn.execute("SELECT count(*) FROM buildsmart.fragments").fetchone()
    assert page.locator("#fragments tbody tr").count() == n_frag[0]
    page.screenshot(path=str(shots / "dashboard-cluster.png"), full_page=True)
    print(f"cluster page load {load_s:.2f} s")


def test_building_page_draws_daily_and_hourly_charts(front: Front, page, shots: Path) -> None:
    started = time.monotonic()
    page.goto(f"{front.url}/ui/building?b=b0")
    page.wait_for_function("document.body.dataset.ready === '1'", timeout=30_000)
    load_s = time.monotonic() - started
    assert page.input_value("#year") == "2023"  # the year of the newest reading
    # a year of local days (2023 has 365) and a day of hours, drawn by uPlot on canvases
    assert page.get_attribute("#daily", "data-points") == "365"
    assert page.get_attribute("#hourly", "data-points") == "24"
    assert page.locator("#daily canvas").count() == 1 and page.locator("#hourly canvas").count() == 1
    drawn = page.evaluate(
        "() => { const c = document.querySelector('#daily canvas'); const d = c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data; let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }"
    )
    assert drawn > 5000  # pixels painted: bars, not an empty frame
    assert "electricity" in page.inner_text("#latest tbody")
    with front.handle.coordinator(admin=False) as conn:
        ts, kwh = conn.execute(
            "SELECT ts, kwh FROM readings WHERE building = 'b0' AND meter = 'electricity' ORDER BY ts DESC LIMIT 1"
        ).fetchone()
    latest = page.inner_text("#latest tbody")
    assert ts.astimezone(LONDON).isoformat() in latest and str(float(kwh)) in latest.replace(",", "")
    page.screenshot(path=str(shots / "dashboard-building.png"), full_page=True)

    page.fill("#day", "2021-03-28")  # the clocks go forward: 23 local hours
    page.dispatch_event("#day", "change")
    page.wait_for_function("document.querySelector('#hourly').dataset.points === '23'")
    print(f"building page load {load_s:.2f} s")


def test_a_stopped_worker_shows_as_down_within_10_s(front: Front, page, shots: Path) -> None:
    page.goto(f"{front.url}/ui/")
    page.wait_for_function("document.querySelectorAll('#nodes tbody tr').length > 0")
    user = service_user()
    handle = front.handle
    victim = [lm for g, lm in cluster.local_members(handle.directory, handle.topology, user) if g.name == "w2"]
    assert victim
    try:
        for lm in victim:
            local.stop(lm, user, mode="fast")
        stopped = time.monotonic()
        page.wait_for_function(
            "[...document.querySelectorAll('#nodes tbody tr')].some(r => r.cells[0].textContent === 'w2' "
            "&& r.cells[2].textContent === 'down')",
            timeout=10_000,
        )
        seen_s = time.monotonic() - stopped
        page.screenshot(path=str(shots / "dashboard-worker-down.png"), full_page=True)
        assert seen_s <= 10
    finally:
        for lm in victim:
            local.start(lm, user)
    page.wait_for_function(
        "![...document.querySelectorAll('#nodes tbody tr')].some(r => r.cells[2].textContent === 'down')", timeout=30_000
    )

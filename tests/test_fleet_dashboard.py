"""The fleet dashboard in headless Chromium (Debian's chromium + chromium-driver, via selenium):
device list, events chart and timeline, per-device detail; hostile strings stay text."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.telemetry.report import Report, encode_report
from fleet.ca import FleetHome
from fleet.dashboard import make_server
from fleet.monitor import ingest
from fleet.store import MonitorStore

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
HOSTILE = "<img src=x onerror=\"document.body.dataset.pwned='1'\">"


@pytest.fixture
def dashboard(tmp_path: Path, make_board: Any) -> Iterator[str]:
    """A fleet with one enrolled board whose signed reports are in the store; the server URL."""
    home = FleetHome(tmp_path / "fleet-home")
    home.init_ca(unencrypted=True)
    board = make_board("pi-001")
    home.enrol_device(board.enrolment.read_bytes(), "pi-001")
    signer = board.agent().store.unlock(board.keys).signer()
    now = datetime.now(UTC)
    reports = [
        Report(
            "pi-001",
            1,
            "status",
            now,
            {"state": "online", "models": [{"model_id": "digits", "version": 3}]},
        ),
        Report("pi-001", 2, "telemetry", now, {"counters": {"queries": 42}, "outbox": {}}),
        Report(
            "pi-001",
            3,
            "events",
            now,
            {"event": {"kind": "ood", "severity": "warning", "evidence": {"note": HOSTILE}}},
        ),
        Report(
            "pi-001",
            4,
            "events",
            now,
            {"event": {"kind": "extraction", "severity": "critical", "evidence": {}}},
        ),
    ]
    store = MonitorStore(home.monitor_db)
    msgs = [(r.topic, encode_report(r, signer)) for r in reports]
    msgs.append(
        (
            reports[2].topic,
            encode_report(Report("pi-001", 9, "events", now, {}), Ed25519PrivateKey.generate()),
        )
    )
    ingest(store, home.device_keys(), msgs, 80)
    server = make_server(home, store, "127.0.0.1", 0, 90.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    store.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    if CHROMIUM is None or DRIVER is None:
        pytest.skip(
            "chromium and chromium-driver are not installed (scripts/lib/env.sh ensure_chromium)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS:
        opts.add_argument(f)
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_dashboard_shows_devices_events_chart_and_detail(dashboard: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(dashboard)
    WebDriverWait(browser, 15).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1"
    )

    [row] = browser.find_elements(By.CSS_SELECTOR, "#devices tbody tr.device")
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    assert cells[0] == "pi-001" and cells[1] == "online" and cells[3] == "digits v3"
    assert cells[6] == "1"  # the forged report was flagged
    assert "queries=42" in cells[7]

    bars = browser.find_elements(By.CSS_SELECTOR, "#chart rect.bar")
    assert len(bars) == 24 and sum(int(b.get_attribute("data-count")) for b in bars) == 3
    timeline = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#timeline tbody tr.event")]
    assert len(timeline) == 3
    assert any("forged" in t for t in timeline) and any("extraction" in t for t in timeline)
    assert any("<img" in t for t in timeline)  # shown as text ...
    assert (
        browser.find_element(By.TAG_NAME, "body").get_attribute("data-pwned") is None
    )  # ... never run

    row.click()
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "detail").is_displayed())
    assert browser.find_element(By.ID, "detail-id").text == "pi-001"
    seqs = [
        r.find_element(By.TAG_NAME, "td").text
        for r in browser.find_elements(By.CSS_SELECTOR, "#detail-reports tr.report")
    ]
    assert seqs == ["4", "3", "2", "1"]

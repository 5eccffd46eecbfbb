"""The operator's console in headless Chromium (Debian's chromium + chromium-driver, via selenium):
the fleet's health at a glance, a board's page, event filtering, at a laptop's width and at a
375 px phone's, with screenshots written as test artefacts (``screenshots/`` under the test's
tmp dir) and every figure on the page checked against the store; the page with 1,000 boards;
hostile strings stay text."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.crypto import ed25519_public_raw
from device_agent.telemetry.report import NO_PREV, Report, encode_report, payload_digest
from fleet.ca import FleetHome
from fleet.dashboard import make_server
from fleet.monitor import ingest
from fleet.store import MonitorStore
from fleet.views import device_views

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
    "--hide-scrollbars",
]
HOSTILE = "<img src=x onerror=\"document.body.dataset.pwned='1'\">"
DESKTOP = (1280, 900)
PHONE = (375, 812)


@dataclass
class Console:
    url: str
    home: FleetHome
    store: MonitorStore
    shots: Path


def signed(device: str, key: Ed25519PrivateKey, items: list[tuple[str, datetime, dict[str, Any]]],
           start: int = 1) -> list[tuple[str, bytes]]:
    out, prev = [], NO_PREV
    for i, (kind, t, data) in enumerate(items):
        r = Report(device, start + i, kind, t, data)
        out.append((r.topic, encode_report(r, key, prev)))
        prev = payload_digest(out[-1][1])
    return out


def serve(home: FleetHome, store: MonitorStore) -> Iterator[str]:
    server = make_server(home, store, "127.0.0.1", 0, 90.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture
def console(tmp_path: Path, make_board: Any) -> Iterator[Console]:
    """A fleet of five boards: pi-001 (enrolled, online, telemetry over two hours, events of
    each severity, one carrying a hostile string), pi-002 (online), pi-003 (gone: last will),
    pi-004 (last heard 10 minutes ago: stale), pi-009 (enrolled, never seen); one forged report."""
    home = FleetHome(tmp_path / "fleet-home")
    home.init_ca(unencrypted=True)
    board = make_board("pi-001")
    home.enrol_device(board.enrolment.read_bytes(), "pi-001")
    home.enrol_device(make_board("pi-009").enrolment.read_bytes(), "pi-009")
    signer = board.agent().store.unlock(board.keys).signer()
    now = datetime.now(UTC)
    models = {"models": [{"model_id": "digits", "version": 3}]}
    items: list[tuple[str, datetime, dict[str, Any]]] = [
        ("status", now - timedelta(hours=2), {"state": "online"} | models)
    ]
    for i in range(5):
        counters = {"queries": 100 * (i + 1), "answered": 90 * (i + 1), "refused_429": 5 * i,
                    "detections_ood": i, "detections_extraction": i // 2}
        items.append(("telemetry", now - timedelta(minutes=120 - 30 * i), {"counters": counters, "outbox": {}}))
    items += [
        ("events", now - timedelta(hours=3), {"event": {"kind": "ood", "severity": "warning",
                                                         "evidence": {"note": HOSTILE}}}),
        ("events", now - timedelta(hours=1), {"event": {"kind": "extraction", "severity": "critical",
                                                         "evidence": {"queries": 812, "window_s": 3600}}}),
        ("events", now - timedelta(days=3), {"event": {"kind": "probing", "severity": "info", "evidence": {}}}),
        ("status", now, {"state": "online"} | models),
    ]
    keys = {"pi-001": home.device_keys()["pi-001"]}
    msgs = signed("pi-001", signer, items)
    others = {d: Ed25519PrivateKey.generate() for d in ("pi-002", "pi-003", "pi-004")}
    for d, k in others.items():
        keys[d] = ed25519_public_raw(k)
        rows: list[tuple[str, datetime, dict[str, Any]]] = [("status", now, {"state": "online"} | models)]
        if d == "pi-003":
            rows.append(("will", now, {"state": "offline"}))
        msgs += signed(d, k, rows)
    forged = encode_report(Report("pi-001", 99, "events", now, {}), Ed25519PrivateKey.generate())
    msgs.append(("edgeward/v1/pi-001/events", forged))
    store = MonitorStore(home.monitor_db)
    ingest(store, keys, msgs, 80)
    db = sqlite3.connect(home.monitor_db)
    old = (now - timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    db.execute("UPDATE devices SET last_seen = ? WHERE device_id = 'pi-004'", (old,))
    db.commit()
    db.close()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    for url in serve(home, store):
        yield Console(url, home, store, shots)
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


def viewport(driver: Any, size: tuple[int, int]) -> None:
    """The page's layout width exactly ``size`` (a phone: mobile emulation)."""
    w, h = size
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": w, "height": h, "deviceScaleFactor": 1, "mobile": w < 600},
    )


def load(driver: Any, url: str, view: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 20).until(
        lambda d: d.execute_script("return [document.body.dataset.view, document.body.dataset.ready]")
        in ([view, "1"], [view, "error"])
    )
    assert driver.execute_script("return document.body.dataset.ready") == "1", driver.find_element(
        "id", "updated").text


def fits(driver: Any, width: int) -> None:
    """Nothing wider than the screen: no sideways scrolling of the page itself."""
    assert driver.execute_script("return document.documentElement.scrollWidth") <= width


def shot(driver: Any, c: Console, name: str) -> None:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    w = driver.execute_script("return window.innerWidth")
    viewport(driver, (w, min(int(height), 4000)))
    path = c.shots / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 1000


def tiles(driver: Any) -> dict[str, int]:
    from selenium.webdriver.common.by import By

    return {t.get_attribute("data-state"): int(t.get_attribute("data-count"))
            for t in driver.find_elements(By.CSS_SELECTOR, "#states .tile")}


def check_fleet_view(driver: Any, c: Console) -> None:
    from selenium.webdriver.common.by import By

    now = datetime.now(UTC)
    views = {v["device_id"]: v["liveness"] for v in device_views(c.home, c.store, now, 90.0)}
    expected = {"online": 2, "stale": 1, "offline": 1, "never seen": 1, "decommissioned": 0, "wiped": 0, "other": 0}
    assert sorted(views.values()) == sorted(k for k, n in expected.items() for _ in range(n))
    assert tiles(driver) == expected

    # Security events by kind and severity, last day and last week, as the store counts them.
    for chart, since in (("events-day", timedelta(days=1)), ("events-week", timedelta(days=7))):
        shown: dict[tuple[str, str], int] = {}
        for r in driver.find_elements(By.CSS_SELECTOR, f"#{chart} rect.bar[data-kind]"):
            shown[(r.get_attribute("data-kind"), r.get_attribute("data-severity"))] = int(r.get_attribute("data-count"))
        stored = {(f"{e['kind']} ({e['source']})", e["severity"]): e["count"]
                  for e in c.store.event_counts(now - since)}
        assert shown == stored
        # The board's probing event of three days ago is in the week's figures, not the day's.
        assert (("probing (board)", "info") in shown) == (since.days == 7)
        assert sum(shown.values()) == len(c.store.events(since=now - since)) == (4 if since.days == 7 else 3)
    # Events per hour: every event of the last 24 hours, once.
    bars = driver.find_elements(By.CSS_SELECTOR, "#hourly rect.bar")
    day = c.store.events(since=now - timedelta(days=1))
    assert len(bars) == 24 and sum(int(b.get_attribute("data-count")) for b in bars) == len(day) == 3
    titles = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "svg .axis-title")]
    assert "time (UTC), 1-hour bins" in titles and "events per hour" in titles
    assert "security events (count)" in titles

    [model] = driver.find_elements(By.CSS_SELECTOR, "#models tr.model")
    assert [td.text for td in model.find_elements(By.TAG_NAME, "td")] == ["digits", "v3", "3 boards"]  # online + stale
    counters = {r.get_attribute("data-counter"): r.find_elements(By.TAG_NAME, "td")[1].text
                for r in driver.find_elements(By.CSS_SELECTOR, "#fleet-counters tr.counter")}
    assert counters["queries"] == "500" and counters["refused_429"] == "20"

    rows = driver.find_elements(By.CSS_SELECTOR, "#devices tbody tr.device")
    assert {r.get_attribute("data-device"): r.get_attribute("data-state") for r in rows} == {
        "pi-001": "online", "pi-002": "online", "pi-003": "offline", "pi-004": "stale", "pi-009": "never seen"}
    flagged = [r for r in rows if r.get_attribute("data-device") == "pi-001"][0]
    assert flagged.find_elements(By.TAG_NAME, "td")[-1].text == "1"  # the forged report


def check_board_view(driver: Any, c: Console) -> None:
    from selenium.webdriver.common.by import By

    assert driver.find_element(By.ID, "board-id").text == "pi-001"
    assert driver.find_element(By.ID, "board-state").text == "online"
    cert = x509.load_pem_x509_certificate((c.home.certs / "pi-001.crt").read_bytes())
    cert_text = driver.find_element(By.ID, "board-cert").text
    assert format(cert.serial_number, "x") in cert_text and "CN=pi-001" in cert_text
    assert [td.text for td in driver.find_elements(By.CSS_SELECTOR, "#board-models td")] == ["digits", "v3"]
    latest = c.store.reports("pi-001", "telemetry", limit=1)[0]["data"]["counters"]
    lines = {p.get_attribute("data-counter"): float(p.get_attribute("data-last"))
             for p in driver.find_elements(By.CSS_SELECTOR, "#board-counters path.series")}
    assert lines == {k: float(v) for k, v in latest.items()}
    legend = driver.find_element(By.ID, "board-counters-legend").text
    assert "throttled 20" in legend and "out-of-distribution 4" in legend and "extraction 2" in legend
    titles = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "#board-counters .axis-title")]
    assert titles == ["report time (UTC, MM-DD hh:mm)", "count since service start"]
    events = driver.find_elements(By.CSS_SELECTOR, "#board-events tr.event")
    assert len(events) == len(c.store.events(device_id="pi-001")) == 4
    # Detail rendered readably: the evidence's keys and values, not a JSON string.
    extraction = [e for e in events if e.get_attribute("data-kind") == "extraction"][0]
    assert [d.text for d in extraction.find_elements(By.CSS_SELECTOR, "dl.detail dt")] == ["queries", "window_s"]
    assert "{" not in extraction.text
    assert driver.find_element(By.ID, "board-commands").text.endswith("no commands issued")
    assert "no wipe attested" in driver.find_element(By.ID, "board-attestation").text


def check_filter(driver: Any, c: Console) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    Select(driver.find_element(By.ID, "f-severity")).select_by_visible_text("critical")
    driver.find_element(By.ID, "f-device").send_keys("pi-001")
    Select(driver.find_element(By.ID, "f-since")).select_by_visible_text("all time")
    driver.find_element(By.CSS_SELECTOR, "#event-filter button").click()
    WebDriverWait(driver, 20).until(lambda d: "severity=critical" in d.current_url
                                    and d.execute_script("return document.body.dataset.ready") == "1")
    rows = driver.find_elements(By.CSS_SELECTOR, "#events tr.event")
    stored = [e for e in c.store.events(device_id="pi-001") if e["severity"] == "critical"]
    assert len(rows) == len(stored) == 2  # the extraction event and the forged report
    assert {r.get_attribute("data-kind") for r in rows} == {"extraction", "forged"}
    assert driver.find_element(By.ID, "event-count").text == "2 events"


def test_console_fleet_board_and_filter_at_desktop_and_phone_widths(console: Console, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    for name, size in (("desktop", DESKTOP), ("phone", PHONE)):
        viewport(browser, size)
        load(browser, console.url, "fleet")
        check_fleet_view(browser, console)
        fits(browser, size[0])
        shot(browser, console, f"{name}-fleet")

        viewport(browser, size)
        browser.find_element(By.CSS_SELECTOR, "#devices tr[data-device='pi-001'] td.state").click()
        load_hash = browser.current_url
        assert load_hash.endswith("#/board/pi-001")
        load(browser, load_hash, "board")
        check_board_view(browser, console)
        fits(browser, size[0])
        shot(browser, console, f"{name}-board")

        viewport(browser, size)
        load(browser, console.url + "#/events", "events")
        # The default filter: the last 7 days, every event the store holds for them.
        week = console.store.events(since=datetime.now(UTC) - timedelta(days=7))
        assert len(browser.find_elements(By.CSS_SELECTOR, "#events tr.event")) == len(week) == 4
        check_filter(browser, console)
        fits(browser, size[0])
        shot(browser, console, f"{name}-events")

    assert sorted(p.name for p in console.shots.iterdir()) == sorted(
        f"{n}-{v}.png" for n in ("desktop", "phone") for v in ("fleet", "board", "events"))


def test_hostile_strings_stay_text(console: Console, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    load(browser, console.url + "#/events?since=", "events")
    text = browser.find_element(By.ID, "events").text
    assert "<img" in text  # shown as text ...
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-pwned") is None  # ... never run
    assert browser.find_elements(By.CSS_SELECTOR, "#events img") == []
    load(browser, console.url + "#/board/pi-001", "board")
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-pwned") is None


BOARDS = 1000


@pytest.fixture
def big_fleet(tmp_path: Path) -> Iterator[Console]:
    """1,000 boards, each with a signed status and telemetry report, in the store."""
    home = FleetHome(tmp_path / "fleet-home")
    home.init_ca(unencrypted=True)
    now = datetime.now(UTC)
    keys, msgs = {}, []
    for i in range(BOARDS):
        d = f"pi-{i:04d}"
        k = Ed25519PrivateKey.generate()
        keys[d] = ed25519_public_raw(k)
        status = {"state": "online", "models": [{"model_id": "digits", "version": 1 + i % 3}]}
        msgs += signed(d, k, [("status", now, status), ("telemetry", now, {"counters": {"queries": i}, "outbox": {}})])
    store = MonitorStore(home.monitor_db)
    for n in range(0, len(msgs), 500):
        ingest(store, keys, msgs[n:n + 500], 80)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    for url in serve(home, store):
        yield Console(url, home, store, shots)
    store.close()


def test_console_with_a_thousand_boards(big_fleet: Console, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    viewport(browser, PHONE)
    load(browser, big_fleet.url, "fleet")
    assert tiles(browser)["online"] == BOARDS
    assert len(browser.find_elements(By.CSS_SELECTOR, "#devices tr.device")) == BOARDS
    boards = {tr.find_elements(By.TAG_NAME, "td")[1].text: tr.find_elements(By.TAG_NAME, "td")[2].text
              for tr in browser.find_elements(By.CSS_SELECTOR, "#models tr.model")}
    assert boards == {"v1": "334 boards", "v2": "333 boards", "v3": "333 boards"}
    total = sum(range(BOARDS))
    queries = browser.find_element(By.CSS_SELECTOR, "#fleet-counters tr[data-counter='queries'] td.num")
    assert queries.text == f"{total:,}"
    browser.find_element(By.ID, "board-filter").send_keys("pi-0999")
    shown = browser.find_elements(By.CSS_SELECTOR, "#devices tr.device")
    assert [r.get_attribute("data-device") for r in shown] == ["pi-0999"]
    assert browser.find_element(By.ID, "board-count").text == "(1 of 1000 boards)"
    fits(browser, PHONE[0])
    shot(browser, big_fleet, "phone-1000-boards")

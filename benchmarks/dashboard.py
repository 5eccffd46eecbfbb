"""Operator's console render time with 1,000 boards in the store.

A fleet home and a SQLite monitor store with N boards (each a signed status and a signed
telemetry report, ingested by the monitor's own ``ingest``, and 2 board events each), served by
``fleet.dashboard.make_server`` on 127.0.0.1; headless Chromium (selenium) loads the fleet view
at a laptop's width and at 375 px. The clock runs from ``driver.get`` until the page has drawn
every view element (``body[data-ready=1]``): the JSON views, the tiles, three SVG charts and a
table row per board. Median of 5 loads each; the server's own time for each JSON view is
printed too.

Target: the fleet view renders in under 2 s with 1,000 boards.

    .venv/bin/python benchmarks/dashboard.py [--boards 1000] [--reps 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from benchmarks._results import record  # noqa: E402
from device_agent.crypto import ed25519_public_raw  # noqa: E402
from device_agent.telemetry.report import NO_PREV, Report, encode_report, payload_digest  # noqa: E402
from fleet.ca import FleetHome  # noqa: E402
from fleet.dashboard import make_server  # noqa: E402
from fleet.monitor import ingest  # noqa: E402
from fleet.store import MonitorStore  # noqa: E402

TARGET_S = 2.0


def fill(store: MonitorStore, boards: int) -> None:
    now = datetime.now(UTC)
    keys, msgs = {}, []
    for i in range(boards):
        d = f"pi-{i:04d}"
        k = Ed25519PrivateKey.generate()
        keys[d] = ed25519_public_raw(k)
        prev = NO_PREV
        items: list[tuple[str, dict[str, Any]]] = [
            ("status", {"state": "online", "models": [{"model_id": "digits", "version": 1 + i % 3}]}),
            ("telemetry", {"counters": {"queries": i, "answered": i, "detections_ood": i % 7}, "outbox": {}}),
            ("events", {"event": {"kind": "ood", "severity": "warning", "evidence": {"score": 1.5}}}),
            ("events", {"event": {"kind": "extraction", "severity": "critical", "evidence": {"queries": i}}}),
        ]
        for seq, (kind, data) in enumerate(items, start=1):
            r = Report(d, seq, kind, now, data)
            payload = encode_report(r, k, prev)
            msgs.append((r.topic, payload))
            prev = payload_digest(payload)
    for n in range(0, len(msgs), 500):
        ingest(store, keys, msgs[n:n + 500], 80)


def browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "chromium"
    for f in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run"):
        opts.add_argument(f)
    return webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver") or "chromedriver"))


def render(driver: Any, url: str, width: int) -> float:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 600})
    driver.get("about:blank")
    t0 = time.perf_counter()
    driver.get(url)
    while driver.execute_script("return document.body && document.body.dataset.ready") != "1":
        if time.perf_counter() - t0 > 60:
            raise SystemExit("the dashboard did not finish drawing in 60 s")
        time.sleep(0.005)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boards", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        print("chromium and chromium-driver are needed (scripts/lib/env.sh ensure_chromium)")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        home = FleetHome(Path(tmp) / "fleet-home")
        home.init_ca(unencrypted=True)
        store = MonitorStore(home.monitor_db)
        t = time.perf_counter()
        fill(store, args.boards)
        took = time.perf_counter() - t
        print(f"store: {args.boards} boards, {4 * args.boards} signed reports ingested in {took:.1f} s")
        record("dashboard", f"fill the store: {args.boards} boards, {4 * args.boards} signed reports (monitor ingest)",
               round(took, 1), "s")
        server = make_server(home, store, "127.0.0.1", 0, 90.0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        for view in ("api/summary", "api/devices", "api/events?since=24h"):
            times = []
            for _ in range(args.reps):
                t = time.perf_counter()
                with urllib.request.urlopen(url + view, timeout=60) as r:  # noqa: S310
                    size = len(r.read())
                times.append(time.perf_counter() - t)
            print(f"  server  /{view:<22} median {statistics.median(times) * 1000:7.1f} ms  ({size / 1024:.0f} KiB)")
            record("dashboard", f"server time for /{view}, {args.boards} boards",
                   round(statistics.median(times) * 1000, 1), "ms",
                   note=f"median of {args.reps}; {size / 1024:.0f} KiB")
        driver = browser()
        missed = False
        try:
            for width in (1280, 375):
                times = [render(driver, url, width) for _ in range(args.reps)]
                med = statistics.median(times)
                ok = med < TARGET_S
                missed |= not ok
                record("dashboard", f"render the fleet view, {args.boards} boards, {width} px wide", round(med, 2), "s",
                       f"< {TARGET_S:.0f}", ok,
                       f"median of {args.reps} loads in headless Chromium; range {min(times):.2f}-{max(times):.2f} s")
                print(f"render fleet view, {args.boards} boards, {width:4d} px: median {med:.2f} s "
                      f"(range {min(times):.2f}-{max(times):.2f} s)  target < {TARGET_S:.0f} s  "
                      f"{'PASS' if ok else 'MISS'}")
        finally:
            driver.quit()
            server.shutdown()
            server.server_close()
            store.close()
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

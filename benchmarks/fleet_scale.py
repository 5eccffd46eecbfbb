"""Fleet simulator: many enrolled boards against 1 and 2 monitors on PostgreSQL and 1 on SQLite.

One run, one private mosquitto started from the project's generated configuration (TLS, a
client certificate per board issued by the fleet CA, per-device ACLs), one throwaway PostgreSQL
cluster (initdb, fsync on, commit timestamps kept). Every board is its own enrolled identity: its
own Ed25519 key signing hash-chained reports, its own P-256 client certificate, its own TLS
connection. The boards live in a few processes, each holding many paho clients (``--procs``).

For each configuration (a fresh database each time, the monitors started as real
``edgeward fleet monitor`` processes sharing one subscription group):

* steady phase (``--duration`` s): every board sends a status, counters or detection report every
  ``--interval`` s (status 1/4, counters 1/2, detections 1/4); a share of the boards
  (``--offline``) goes offline once for ``--offline-for`` s, keeps what it reports meanwhile and
  sends it when it is back;
* burst: then every board sends ``--burst`` reports back to back (capacity).

Printed side by side: ingest per second (steady and burst), latency p50/p99 from the board's
report time to the commit (steady reports sent live; PostgreSQL: the transaction's commit
timestamp; SQLite: when a reader polling every 20 ms first saw the row, an upper bound), loss and
duplicates (must be zero: every report the broker acknowledged is stored exactly once, no
security event), monitor CPU seconds per report (monitor and helper process), database CPU per
report (every PostgreSQL server process) and broker CPU per report.

    .venv/bin/python benchmarks/fleet_scale.py [--boards 1000] [--procs 4] [--interval 5]
        [--duration 60] [--burst 10] [--offline 0.1] [--offline-for 10] [--json FILE]

Exit 1 if any configuration lost or duplicated a report (or flagged one).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import multiprocessing
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from benchmarks._results import record  # noqa: E402
from device_agent import crypto  # noqa: E402
from device_agent.bundle.enrolment import DOMAIN as ENROL_DOMAIN  # noqa: E402
from device_agent.bundle.enrolment import Enrolment  # noqa: E402
from device_agent.telemetry.mqtt import Broker, Link, Session  # noqa: E402
from device_agent.telemetry.report import NO_PREV, Report, encode_report, payload_digest  # noqa: E402
from device_agent.wire import canonical_json  # noqa: E402
from fleet.broker import write_broker_config  # noqa: E402
from fleet.ca import FleetHome  # noqa: E402
from tests.fixtures.fleet import MOSQUITTO, free_port, wait_until  # noqa: E402

OPERATOR = "ops"
TICK = os.sysconf("SC_CLK_TCK")
POLL_S = 0.02  # the SQLite commit observer's period
TARGET_ZERO = 0  # reports lost, duplicated, flagged or left unacknowledged, in every configuration


@dataclass(frozen=True)
class Plan:
    """What one run simulates."""

    boards: int = 1000
    procs: int = 4
    interval: float = 5.0  # seconds between one board's reports
    duration: float = 60.0  # steady phase per configuration
    burst: int = 10  # reports per board back to back after the steady phase
    offline: float = 0.1  # share of boards that go offline once in the steady phase
    offline_for: float = 10.0
    configs: tuple[str, ...] = ("postgresql:1", "postgresql:2", "sqlite:1")
    seed: int = 1


# --- boards ------------------------------------------------------------------------------------


def make_boards(home: FleetHome, n: int) -> list[tuple[str, bytes]]:
    """Enrol ``n`` boards (real signed enrolments, one client certificate each, the CA key
    loaded once); returns (device id, Ed25519 identity key seed) for each."""
    now = datetime.now(UTC)
    boards, files = [], []
    for i in range(n):
        device = f"sim-{i:05d}"
        signer = Ed25519PrivateKey.generate()
        _, box_public = crypto.new_box_keypair()
        e = Enrolment(device, box_public, crypto.ed25519_public_raw(signer), now)
        files.append((e.signed_bytes(crypto.sign(signer, ENROL_DOMAIN, canonical_json(e.body()))), device))
        boards.append((device, signer.private_bytes_raw()))
    home.enrol_devices(files)
    return boards


class SimBoard:
    """One simulated board: its identity, its hash chain, its own MQTT connection, and the
    reports it keeps until the broker has acknowledged them (or while it is offline)."""

    def __init__(self, device: str, seed: bytes, broker: Broker) -> None:
        self.device = device
        self.key = Ed25519PrivateKey.from_private_bytes(seed)
        self.broker = broker
        self.seq = 0
        self.prev = NO_PREV
        self.acks: deque[tuple[int, bool]] = deque()  # filled by paho's thread, drained by ours
        self.pending: dict[int, int] = {}  # mid -> seq, published, not acknowledged yet
        self.backlog: list[tuple[str, bytes]] = []  # reports made while offline
        self.state = "online"  # online | leaving | offline | joining
        self.nacked = 0
        self.link = self._link()
        self.first_seq = 1

    def _link(self) -> Link:
        return Link(self.broker, Session(self.device), on_ack=lambda mid, ok: self.acks.append((mid, ok)))

    def make(self, kind: str, tags: dict[str, Any]) -> tuple[str, bytes]:
        self.seq += 1
        data: dict[str, Any]
        if kind == "status":
            data = {"state": "online", "model_version": 3}
        elif kind == "telemetry":
            data = {"counters": {"predictions": self.seq * 7, "refused": 0, "throttled": self.seq % 3}}
        else:
            data = {"event": {"kind": "ood", "severity": "warning", "evidence": {"score": 0.93}}}
        data = data | tags | {"sent": time.time()}
        r = Report(self.device, self.seq, kind, datetime.now(UTC), data)
        payload = encode_report(r, self.key, self.prev)
        self.prev = payload_digest(payload)
        return r.topic, payload

    def send(self, message: tuple[str, bytes]) -> None:
        if self.state != "online":
            self.backlog.append(message)
            return
        mid = self.link.publish(*message)
        self.pending[mid] = self.seq

    def drain_acks(self) -> None:
        while self.acks:
            mid, ok = self.acks.popleft()
            self.pending.pop(mid, None)
            self.nacked += not ok


def run_phase(sims: list[SimBoard], plan: Plan, phase: str, rng: random.Random) -> dict[str, Any]:
    """The steady phase, the burst, then wait for every acknowledgement; what was sent."""
    for b in sims:
        b.first_seq = b.seq + 1
    t0 = time.monotonic()
    end = t0 + plan.duration
    kinds = ("status", "telemetry", "events", "telemetry")
    heap: list[tuple[float, int, str]] = [(t0 + rng.uniform(0, plan.interval), i, "report") for i in range(len(sims))]
    for i in rng.sample(range(len(sims)), round(plan.offline * len(sims))):
        off = t0 + rng.uniform(0.1, 0.5) * plan.duration
        heap.append((off, i, "leave"))
        heap.append((min(off + plan.offline_for, end - 1), i, "join"))
    heapq.heapify(heap)
    leaving: set[int] = set()
    joining: set[int] = set()
    while heap:
        due, i, what = heapq.heappop(heap)
        while (wait := due - time.monotonic()) > 0:
            time.sleep(min(wait, 0.05))
            _housekeeping(sims, leaving, joining)
        b = sims[i]
        if what == "report":
            if due < end:
                b.send(b.make(kinds[b.seq % 4], {"phase": phase, **({"queued": 1} if b.state != "online" else {})}))
                heapq.heappush(heap, (due + plan.interval, i, "report"))
        elif what == "leave" and b.state == "online":
            b.state = "leaving"  # sends nothing more; goes once the broker has everything
            leaving.add(i)
        elif what == "join":
            joining.add(i)
        _housekeeping(sims, leaving, joining)
    while leaving or joining or any(b.backlog for b in sims):
        time.sleep(0.05)
        _housekeeping(sims, leaving, joining)
    burst_start = time.time()
    for _ in range(plan.burst):
        for b in sims:
            b.send(b.make(kinds[b.seq % 4], {"phase": phase, "burst": 1}))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for b in sims:
            b.drain_acks()
        if not any(b.pending for b in sims):
            break
        time.sleep(0.05)
    return {
        "ranges": {b.device: (b.first_seq, b.seq) for b in sims},
        "unacked": sum(len(b.pending) for b in sims),
        "nacked": sum(b.nacked for b in sims),
        "burst_start": burst_start,
    }


def _housekeeping(sims: list[SimBoard], leaving: set[int], joining: set[int]) -> None:
    for i in list(leaving):
        b = sims[i]
        b.drain_acks()
        if not b.pending:
            b.link.stop()
            b.state = "offline"
            leaving.discard(i)
    for i in list(joining):
        b = sims[i]
        if b.state == "offline":
            b.link = b._link()
            b.link.start()
            b.state = "joining"
        elif b.state == "joining" and b.link.wait_connected(0):
            b.state = "online"
            backlog, b.backlog = b.backlog, []
            for topic_name, payload in backlog:
                b.pending[b.link.publish(topic_name, payload)] = -1
            joining.discard(i)


# --- processes and their CPU -------------------------------------------------------------------


def cpu_seconds(pid: int, children: bool = True) -> float:
    """CPU time of a process, the children it has waited for, and (``children``) the children
    it still has: utime + stime (+ cutime + cstime) from /proc."""
    def stat(p: int) -> list[str]:
        with open(f"/proc/{p}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()

    try:
        s = stat(pid)
    except OSError:
        return 0.0
    total = sum(int(x) for x in s[11:15])
    if children:
        for d in os.listdir("/proc"):
            if d.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    c = stat(int(d))
                    if int(c[1]) == pid:
                        total += int(c[11]) + int(c[12])
    return total / TICK


class MonitorProc:
    """``edgeward fleet monitor`` as its own process (it starts its helper process)."""

    def __init__(self, home: FleetHome, port: int, store: str, client_id: str, group: str,
                 extra: tuple[str, ...] = ()) -> None:
        self.client_id = client_id
        argv = [sys.executable, "-m", "packager.cli", "fleet", "monitor", "--fleet-dir", str(home.path),
                "--broker", f"127.0.0.1:{port}", "--operator", OPERATOR, "--store", store,
                "--client-id", client_id, "--group", group, *extra]
        env = os.environ | {"PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 120)
        line = self.proc.stdout.readline() if ready else b""
        if not line.startswith(b"monitoring"):
            self.proc.kill()
            raise SystemExit(f"monitor {client_id} did not start: {line!r} {self.proc.stderr.read()[-2000:]!r}"
                             if self.proc.stderr else "monitor did not start")

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.returncode != 0:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise SystemExit(f"monitor {self.client_id} exited {self.proc.returncode}: {err[-2000:]}")


def forget(operator: Broker, client_id: str) -> None:
    """End a monitor's persistent session so it collects nothing during later configurations."""
    link = Link(operator, Session(client_id, clean_start=True))
    link.start()
    link.require_connected(30)
    link.stop()


# --- stores: what is stored, when it was committed -----------------------------------------------


class SqliteObserver:
    """Polls the SQLite store every POLL_S for new rows (rowid order): the first time each row is
    seen is an upper bound on its commit time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: dict[tuple[str, int], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = 0
        db = None
        while not self._stop.is_set():
            if db is None and self.path.exists():
                with contextlib.suppress(sqlite3.Error):
                    db = sqlite3.connect(self.path)
            if db is not None:
                try:
                    rows = db.execute("SELECT rowid, device_id, seq FROM reports WHERE rowid > ? ORDER BY rowid",
                                      (last,)).fetchall()
                except sqlite3.Error:
                    rows = []
                now = time.time()
                for rowid, device, seq in rows:
                    self.seen.setdefault((device, seq), now)
                    last = rowid
            self._stop.wait(POLL_S)
        if db is not None:
            db.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def stored_sqlite(path: Path, observer: SqliteObserver) -> list[tuple[str, int, str, float]]:
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT device_id, seq, data FROM reports").fetchall()
    finally:
        db.close()
    return [(d, s, data, observer.seen.get((d, s), float("nan"))) for d, s, data in rows]


def stored_pg(url: str) -> list[tuple[str, int, str, float]]:
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT device_id, seq, data, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 "
            "FROM reports").fetchall()
    return [(d, int(s), data, float(t)) for d, s, data, t in rows]


def count_pg(conn: Any) -> int:
    row = conn.execute("SELECT count(*) FROM reports").fetchone()
    return int(row[0]) if row else 0


def flagged(store: str) -> int:
    from fleet.store import open_store

    s = open_store(store)
    try:
        return len([e for e in s.events(limit=100_000) if e["source"] == "monitor"])
    finally:
        s.close()


def redelivered(store: str) -> int:
    from fleet.store import open_store

    s = open_store(store)
    try:
        return sum(int(d["duplicates"]) for d in s.devices())
    finally:
        s.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# --- one configuration ---------------------------------------------------------------------------


@dataclass
class Result:
    config: str
    boards: int
    sent: int
    stored: int
    lost: int
    duplicated: int
    flagged: int
    unacked: int
    redelivered: int
    steady_ingest_per_s: float
    burst_ingest_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_reports: int
    latency_note: str
    monitor_cpu_s_per_report: float
    db_cpu_s_per_report: float | None
    broker_cpu_s_per_report: float
    queued_offline: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Sim:
    """The broker, the boards and (given) the PostgreSQL cluster, for several configurations."""

    def __init__(self, plan: Plan, tmp: Path, pg: Any) -> None:
        self.plan = plan
        self.tmp = tmp
        self.pg = pg
        self.home = FleetHome(tmp / "fleet")
        self.home.init_ca(unencrypted=True)
        self.home.enrol_operator(OPERATOR)
        self.port = free_port()
        files = write_broker_config(self.home, tmp / "broker", bind="127.0.0.1", port=self.port)
        t = time.perf_counter()
        self.boards = make_boards(self.home, plan.boards)
        self.enrol_s = time.perf_counter() - t
        assert MOSQUITTO is not None, "mosquitto is not installed (scripts/test.sh installs it)"
        self.broker_log = (tmp / "mosquitto.log").open("ab")
        self.mosquitto = subprocess.Popen([MOSQUITTO, "-c", str(files.conf)], stdout=subprocess.DEVNULL,
                                          stderr=self.broker_log)
        wait_until(self._listening, 10, "mosquitto to listen")
        c = self.home.certs
        self.operator = Broker("127.0.0.1", self.port, self.home.ca_cert, c / f"{OPERATOR}.crt", c / f"{OPERATOR}.key")
        self.workers: list[tuple[Any, Any]] = []
        t = time.perf_counter()
        self._start_workers()
        self.connect_s = time.perf_counter() - t

    def _listening(self) -> bool:
        import socket

        if self.mosquitto.poll() is not None:
            raise SystemExit("mosquitto exited; see its log")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def _start_workers(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        n = max(1, min(self.plan.procs, len(self.boards)))
        c = self.home.certs
        for k in range(n):
            mine = self.boards[k::n]
            parent, child = ctx.Pipe()
            # Each process gets one Broker per board (its own certificate): pass the paths.
            broker = Broker("127.0.0.1", self.port, self.home.ca_cert, c, c)
            p = ctx.Process(target=_worker_main, args=(child, broker, mine, self.plan.seed + k), daemon=True)
            p.start()
            child.close()
            self.workers.append((p, parent))
        for p, conn in self.workers:
            if not conn.poll(600):
                raise SystemExit("the boards did not connect within 600 s")
            what, ok = conn.recv()
            if not ok:
                raise SystemExit(f"board process {p.pid}: not every board connected")

    def run(self, config: str, index: int) -> Result:
        engine, _, count = config.partition(":")
        monitors = int(count or 1)
        if engine == "postgresql":
            store = self.pg.new_database()
            observer = None
        else:
            store = str(self.tmp / f"monitor-{index}.db")
            observer = SqliteObserver(Path(store))
        group = f"sim{index}"
        mons = [MonitorProc(self.home, self.port, store, f"sim{index}-mon{m}", group) for m in range(monitors)]
        pg_pid = self._postmaster() if engine == "postgresql" else None
        cpu0 = [m.cpu() for m in mons]
        db0 = cpu_seconds(pg_pid) if pg_pid else 0.0
        broker0 = cpu_seconds(self.mosquitto.pid, children=False)
        phase = f"c{index}"
        for _, conn in self.workers:
            conn.send((phase, asdict(self.plan)))
        outs = []
        for _, conn in self.workers:
            if not conn.poll(self.plan.duration + 900):
                raise SystemExit("a board process did not finish its phase")
            outs.append(conn.recv()[1])
        ranges: dict[str, tuple[int, int]] = {}
        for o in outs:
            ranges.update(o["ranges"])
        expected = {(d, s) for d, (a, b) in ranges.items() for s in range(a, b + 1)}
        burst_start = min(o["burst_start"] for o in outs)

        self._wait_stored(store, observer, len(expected))
        cpu1 = [m.cpu() for m in mons]
        db1 = cpu_seconds(pg_pid) if pg_pid else 0.0
        broker1 = cpu_seconds(self.mosquitto.pid, children=False)
        for m in mons:
            m.stop()
        for m in mons:
            forget(self.operator, m.client_id)
        if observer is not None:
            observer.stop()
            rows = stored_sqlite(Path(store), observer)
            note = f"first seen by a reader polling every {POLL_S * 1000:.0f} ms (upper bound)"
        else:
            rows = stored_pg(store)
            note = "transaction commit timestamp"
        keys = [(d, s) for d, s, _, _ in rows]
        stored = set(keys)
        latencies, steady_commits, burst_commits, queued = [], [], [], 0
        first_sent = float("inf")
        for _, _, data, committed in rows:
            doc = json.loads(data)
            first_sent = min(first_sent, doc["sent"])
            if doc.get("burst"):
                burst_commits.append(committed)
            else:
                steady_commits.append(committed)
                if doc.get("queued"):
                    queued += 1
                else:
                    latencies.append(committed - doc["sent"])
        n = len(rows)
        steady_span = (max(steady_commits) - first_sent) if steady_commits else float("nan")
        burst_span = (max(burst_commits) - burst_start) if burst_commits else float("nan")
        return Result(
            config=f"{monitors} monitor{'s' if monitors > 1 else ''} on {'PostgreSQL' if pg_pid else 'SQLite'}",
            boards=len(ranges),
            sent=len(expected),
            stored=n,
            lost=len(expected - stored),
            duplicated=len(keys) - len(stored) + len(stored - expected),
            flagged=flagged(store),
            unacked=sum(o["unacked"] for o in outs) + sum(o["nacked"] for o in outs),
            redelivered=redelivered(store),
            steady_ingest_per_s=len(steady_commits) / steady_span if steady_commits else 0.0,
            burst_ingest_per_s=len(burst_commits) / burst_span if burst_commits else 0.0,
            latency_p50_ms=1000 * percentile(latencies, 0.50),
            latency_p99_ms=1000 * percentile(latencies, 0.99),
            latency_reports=len(latencies),
            latency_note=note,
            monitor_cpu_s_per_report=(sum(cpu1) - sum(cpu0)) / max(n, 1),
            db_cpu_s_per_report=(db1 - db0) / max(n, 1) if pg_pid else None,
            broker_cpu_s_per_report=(broker1 - broker0) / max(n, 1),
            queued_offline=queued,
        )

    def _wait_stored(self, store: str, observer: SqliteObserver | None, expected: int) -> None:
        """Until every acknowledged report is stored, or nothing new arrived for a minute; then
        a second more, so anything stored twice or late shows up too."""
        import psycopg

        conn = None if observer is not None else psycopg.connect(store, autocommit=True)
        try:
            last, still = -1, time.monotonic()
            while True:
                n = len(observer.seen) if observer is not None else count_pg(conn)
                if n >= expected or time.monotonic() - still > 60:
                    break
                if n != last:
                    last, still = n, time.monotonic()
                time.sleep(0.5)
        finally:
            if conn is not None:
                conn.close()
        time.sleep(1.0)

    def _postmaster(self) -> int:
        return int((self.pg.data / "postmaster.pid").read_text().split()[0])

    def close(self) -> None:
        for _, conn in self.workers:
            with contextlib.suppress(OSError):
                conn.send(None)
        for p, _ in self.workers:
            p.join(60)
            if p.is_alive():
                p.kill()
        self.mosquitto.send_signal(signal.SIGTERM)
        try:
            self.mosquitto.wait(20)
        except subprocess.TimeoutExpired:
            self.mosquitto.kill()
        self.broker_log.close()


def _worker_main(conn: Any, certs: Broker, boards: list[tuple[str, bytes]], seed: int) -> None:
    """Spawned board process: one Broker per board, with that board's own certificate."""
    per_board = {d: Broker(certs.host, certs.port, certs.ca, certs.cert / f"{d}.crt", certs.key / f"{d}.key")
                 for d, _ in boards}
    _run_boards(conn, per_board, boards, seed)


def _run_boards(conn: Any, brokers: dict[str, Broker], boards: list[tuple[str, bytes]], seed: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sims = [SimBoard(d, s, brokers[d]) for d, s in boards]
    for i, b in enumerate(sims):
        b.link.start()
        if i % 25 == 24:
            time.sleep(0.05)  # a connection storm the broker's listen backlog can take
    ok = all(b.link.wait_connected(300) for b in sims)
    conn.send(("ready", ok))
    rng = random.Random(seed)
    while (cmd := conn.recv()) is not None:
        phase, plan = cmd
        plan["configs"] = tuple(plan["configs"])
        conn.send(("done", run_phase(sims, Plan(**plan), phase, rng)))
    for b in sims:
        b.link.stop()


def simulate(plan: Plan, tmp: Path, pg: Any) -> tuple[list[Result], dict[str, float]]:
    """Run every configuration of ``plan`` against one broker and one set of boards."""
    sim = Sim(plan, tmp, pg)
    try:
        results = [sim.run(c, i) for i, c in enumerate(plan.configs)]
    finally:
        sim.close()
    return results, {"enrol_s": sim.enrol_s, "connect_s": sim.connect_s}


# --- report ------------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    rows = [
        ("reports sent / stored", lambda r: f"{r.sent} / {r.stored}"),
        ("lost / duplicated / flagged", lambda r: f"{r.lost} / {r.duplicated} / {r.flagged}"),
        ("ingest/s steady", lambda r: f(r.steady_ingest_per_s, ",.0f")),
        ("ingest/s burst", lambda r: f(r.burst_ingest_per_s, ",.0f")),
        ("latency p50 ms", lambda r: f(r.latency_p50_ms, ",.0f")),
        ("latency p99 ms", lambda r: f(r.latency_p99_ms, ",.0f")),
        ("monitor CPU ms/report", lambda r: f(r.monitor_cpu_s_per_report * 1000, ".3f")),
        ("database CPU ms/report", lambda r: f(None if r.db_cpu_s_per_report is None
                                               else r.db_cpu_s_per_report * 1000, ".3f")),
        ("broker CPU ms/report", lambda r: f(r.broker_cpu_s_per_report * 1000, ".3f")),
        ("redelivered (recognised)", lambda r: str(r.redelivered)),
        ("sent after offline", lambda r: str(r.queued_offline)),
    ]
    width = max(len(r.config) for r in results) + 2
    lines = [" " * 28 + "".join(r.config.rjust(width) for r in results)]
    for name, get in rows:
        lines.append(name.ljust(28) + "".join(get(r).rjust(width) for r in results))
    return "\n".join(lines)


def _figure(v: float | None, digits: int) -> float | str:
    """A measured figure for the results file: rounded, or "-" when there is none (no report)."""
    if v is None or v != v:
        return "-"
    return round(v, digits) if digits else round(v)


def record_results(plan: Plan, results: list[Result], setup: dict[str, float], total: float) -> None:
    """One results row per figure printed: the set-up, then each configuration's column."""
    fleet = f"{plan.boards} boards"
    record("fleet_scale", f"{fleet}: enrol (signed enrolments, client certificates)", round(setup["enrol_s"], 1), "s")
    record("fleet_scale", f"{fleet}: connect over TLS in {plan.procs} processes", round(setup["connect_s"], 1), "s")
    record("fleet_scale", f"{fleet}: whole run, {len(results)} configurations", round(total), "s",
           note=f"a report every {plan.interval:g} s each for {plan.duration:g} s, {plan.burst} back to back; "
                f"{plan.offline:.0%} offline for {plan.offline_for:g} s once")
    for r in results:
        sent = f"{r.sent} sent, {r.stored} stored"
        rows: list[tuple[str, float | str, str, str]] = [
            ("ingest steady", _figure(r.steady_ingest_per_s, 0), "reports/s", ""),
            ("ingest burst", _figure(r.burst_ingest_per_s, 0), "reports/s", f"{plan.burst} per board back to back"),
            ("latency p50, report time to commit", _figure(r.latency_p50_ms, 0), "ms",
             f"{r.latency_reports} steady reports sent live; {r.latency_note}"),
            ("latency p99, report time to commit", _figure(r.latency_p99_ms, 0), "ms",
             f"{r.latency_reports} steady reports sent live; {r.latency_note}"),
            ("monitor CPU per report", _figure(r.monitor_cpu_s_per_report * 1000, 3), "ms",
             "monitor and helper processes"),
        ]
        if r.db_cpu_s_per_report is not None:
            rows.append(("database CPU per report", _figure(r.db_cpu_s_per_report * 1000, 3), "ms",
                         "every PostgreSQL server process"))
        rows += [
            ("broker CPU per report", _figure(r.broker_cpu_s_per_report * 1000, 3), "ms", "mosquitto"),
            ("redelivered (recognised)", r.redelivered, "reports", ""),
            ("sent after offline", r.queued_offline, "reports", ""),
        ]
        for name, value, unit, note in rows:
            record("fleet_scale", f"{fleet}, {r.config}: {name}", value, unit, note=note)
        for name, value in (("lost", r.lost), ("duplicated", r.duplicated), ("flagged", r.flagged),
                            ("unacknowledged by the broker", r.unacked)):
            record("fleet_scale", f"{fleet}, {r.config}: reports {name}", value, "reports", f"= {TARGET_ZERO}",
                   value == TARGET_ZERO, sent)


def main() -> int:
    d = Plan()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boards", type=int, default=d.boards)
    ap.add_argument("--procs", type=int, default=d.procs, help="board processes")
    ap.add_argument("--interval", type=float, default=d.interval, help="seconds between a board's reports")
    ap.add_argument("--duration", type=float, default=d.duration, help="steady phase per configuration (s)")
    ap.add_argument("--burst", type=int, default=d.burst, help="reports per board back to back at the end")
    ap.add_argument("--offline", type=float, default=d.offline, help="share of boards going offline once")
    ap.add_argument("--offline-for", type=float, default=d.offline_for)
    ap.add_argument("--configs", default=",".join(d.configs), help="ENGINE:MONITORS,... (postgresql, sqlite)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    plan = Plan(args.boards, args.procs, args.interval, args.duration, args.burst, args.offline,
                args.offline_for, tuple(args.configs.split(",")))
    from tests.fixtures.postgres import start_cluster

    with tempfile.TemporaryDirectory(prefix="edgeward-scale-") as tmp_s:
        tmp = Path(tmp_s)
        pg = start_cluster(durable=True)
        try:
            t = time.perf_counter()
            results, setup = simulate(plan, tmp, pg)
            total = time.perf_counter() - t
        finally:
            pg.remove()
    print(f"{plan.boards} boards in {plan.procs} processes, a report every {plan.interval:g} s each "
          f"for {plan.duration:g} s, {plan.burst} back to back; {plan.offline:.0%} offline for "
          f"{plan.offline_for:g} s once; enrolled in {setup['enrol_s']:.1f} s, connected in "
          f"{setup['connect_s']:.1f} s; whole run {total:.0f} s; {os.cpu_count()} cores")
    print(table(results))
    print(f"latency: PostgreSQL {results[0].latency_note if results else ''}; SQLite: first seen by a "
          f"reader polling every {POLL_S * 1000:.0f} ms (upper bound). Steady reports sent live only.")
    record_results(plan, results, setup, total)
    bad = [r for r in results if r.lost or r.duplicated or r.flagged or r.unacked or r.stored != r.sent]
    print(f"target: zero lost, zero duplicated, nothing flagged, in every configuration: "
          f"{'MISS' if bad else 'PASS'}")
    for r in bad:
        print(f"FAIL {r.config}: lost {r.lost}, duplicated {r.duplicated}, flagged {r.flagged}, "
              f"unacknowledged by the broker {r.unacked}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"plan": asdict(plan), "setup": setup,
                                               "results": [asdict(r) for r in results]}, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

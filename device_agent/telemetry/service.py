"""Board telemetry: signed status, counters and events over MQTT 5, through a durable outbox.

:class:`TelemetryService` runs one background thread that

1. forwards new events from the :class:`~device_agent.events.EventStore` into the outbox (the
   event-store cursor moves in the same transaction, so no event is lost or queued twice);
2. every ``heartbeat_s`` queues a ``status`` report (state, uptime, installed model versions) and
   a ``telemetry`` report (the serve loop's counters and the outbox's own numbers);
3. hands queued reports to MQTT in sequence order, at most ``window`` unacknowledged at a time,
   and deletes each from the outbox only when its PUBACK arrives -- or, when the board trusts a
   receipt key, only when a fleet monitor's signed receipt covers it (``docs/telemetry.md``,
   "Receipts"): a report the broker took but no receipt covers is sent again after
   ``receipt_timeout_s``, the wait doubling up to ``receipt_backoff_max_s``, and at most
   ``max_unreceipted`` sequence numbers are out without a receipt.

Every report is a :class:`~device_agent.report.Report` signed with the board's identity key.
A signed last will (kind ``will``, on the status topic) tells the fleet the board went away.
Reports carry summaries only, never an input (invariant 8). Topics: ``docs/telemetry.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from device_agent import crypto
from device_agent.commands.format import TIME_TOPIC, results_topic
from device_agent.config import DEFAULT_CONFIG, ReportLimits, TelemetryConfig
from device_agent.errors import EdgeWardError, FormatError, UsageError
from device_agent.service.events import Event, EventStore
from device_agent.store import layout
from device_agent.store.datadir import DataDir, utcnow
from device_agent.store.keys import KeySource
from device_agent.telemetry.mqtt import Broker, Link, Session
from device_agent.telemetry.outbox import HEARTBEAT, INFO_EVENT, SECURITY_EVENT, Item, Outbox
from device_agent.telemetry.receipt import receipt_topic, verify_receipt
from device_agent.telemetry.report import Report, check_summary, command_topic, encode_report, topic

_log = logging.getLogger(__name__)
EVENTS_CURSOR = "events_cursor"
MODEL_FIELDS = (
    "model_id",
    "version",
    "local_version",  # the local learnt version serving, if any (docs/learning.md)
    "previous_version",
    "highest_version",  # lets the fleet see a board's anti-rollback state go backwards
    "serving",
    "runtime",
    "profile",
    "end_of_life",
)


def event_data(event: Event, limits: ReportLimits = DEFAULT_CONFIG.telemetry.report) -> dict[str, Any]:
    """An event as report data; evidence that does not look like a summary is withheld."""
    doc = event.to_json()
    try:
        check_summary(doc, limits=limits)
    except FormatError:
        doc["evidence"] = {"withheld": "evidence did not look like a summary"}
    return {"event": doc}


def event_priority(event: Event) -> int:
    return SECURITY_EVENT if event.severity in ("warning", "critical") else INFO_EVENT


def status_data(status: dict[str, Any], state: str, uptime_s: float) -> dict[str, Any]:
    """The heartbeat: state, uptime and the installed models' ids and versions."""
    models = [{k: m.get(k) for k in MODEL_FIELDS if k in m} for m in status.get("models", [])]
    doc: dict[str, Any] = {"state": state, "uptime_s": round(uptime_s), "models": models}
    # What the fleet compares between heartbeats to see the board's keys or anchors change.
    for k in ("box_fingerprint", "trust_fingerprint"):
        if isinstance(status.get(k), str):
            doc[k] = status[k]
    return doc


def telemetry_data(
    status: dict[str, Any], outbox: dict[str, int], limits: ReportLimits = DEFAULT_CONFIG.telemetry.report
) -> dict[str, Any]:
    """Counters from the serve loop (numbers only, names cut to a report key) and the outbox's
    health."""
    counters = {
        str(k)[: limits.max_key_chars]: v
        for k, v in status.get("counters", {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    return {"counters": counters, "outbox": outbox}


def default_status_provider(data_dir: Path, keys: KeySource) -> Callable[[], dict[str, Any]]:
    """Agent.status() of the board."""
    from device_agent.agent import Agent

    agent = Agent(data_dir, keys)
    return lambda: agent.status(check_files=False)


class TelemetryService:
    """Publish the board's signed reports in a background thread (``start`` / ``stop``)."""

    def __init__(
        self,
        data_dir: str | Path,
        keys: KeySource,
        events: EventStore,
        broker: Broker,
        *,
        status_provider: Callable[[], dict[str, Any]] | None = None,
        commands: Callable[[bytes, Callable[[bytes, Any], None]], list[bytes]] | None = None,
        on_wiped: Callable[[], None] | None = None,
        wipe_publish_s: float = DEFAULT_CONFIG.commands.wipe_publish_s,
        config: TelemetryConfig = DEFAULT_CONFIG.telemetry,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = DataDir(data_dir)
        self.store.require_provisioned()
        identity = self.store.identity()
        self.device_id = identity.device_id
        self._identity_fpr = crypto.fingerprint(identity.sign_public)
        self.events = events
        self.config = config
        self._clock = clock
        self._status = status_provider or default_status_provider(self.store.path, keys)
        dk = self.store.unlock(keys)
        try:
            # Best-effort hygiene: the key object lives in memory for the service's lifetime.
            self._signer = dk.signer()
            # The key that opens the sealed trust anchors (to read the receipt keys, which a
            # rotate-key command may change while the service runs); None before an upgrade.
            self._seal: bytearray | None = (
                self.store.sealing_key(dk) if dk.board_secret is not None else None
            )
        finally:
            dk.wipe()
        self._anchors_seen: tuple[int, int, int] | None = None
        self._receipt_key_list: tuple[bytes, ...] = ()
        # Receipts (docs/telemetry.md): the service listens for them only if the board trusted a
        # receipt key when it started; until then, reports leave on the broker's acknowledgement.
        self._receipts_on = bool(self._receipt_keys())
        self._receipt_inbox: queue.Queue[bytes] = queue.Queue(maxsize=4)
        self._resend: dict[int, tuple[float, float]] = {}  # seq -> (when to send again, wait after it)
        self._sent_through = 0  # the highest sequence number handed to the broker in this run
        self._refused: list[int] = []  # refused by the broker since the last _settle
        self.receipts = {"applied": 0, "refused": 0, "resent": 0}
        self.outbox = Outbox(self.store.outbox_file, config.max_outbox)
        self._acks: queue.SimpleQueue[tuple[int, bool]] = queue.SimpleQueue()
        # Signed commands and time beacons (device_agent.commands): delivered by the broker as
        # one retained queue per board, handed to ``commands`` (the agent) from the loop thread.
        self._commands = commands
        self._on_wiped = on_wiped
        self._wipe_publish_s = wipe_publish_s
        self._inbox: queue.Queue[bytes] = queue.Queue(maxsize=16)
        self._wiped = False
        self.link = Link(
            broker,
            Session(
                client_id=self.device_id,
                max_inflight=config.window,
                keepalive=config.keepalive_s,
                backoff=config.backoff,
            ),
            on_ack=lambda mid, ok: self._acks.put((mid, ok)),
            on_message=self._on_message if commands is not None or self._receipts_on else None,
            will=self._will,
        )
        if commands is not None:
            self.link.subscribe(command_topic(self.device_id))
            self.link.subscribe(TIME_TOPIC)
        if self._receipts_on:
            self.link.subscribe(receipt_topic(self.device_id))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()
        self.rejected = 0
        self.last_error: str | None = None

    # --- reports -------------------------------------------------------------------------------
    def _item(
        self, kind: str, data: dict[str, Any], priority: int, when: datetime | None = None
    ) -> Item:
        def build(seq: int, prev: bytes) -> tuple[str, bytes]:
            r = Report(self.device_id, seq, kind, when or self._clock(), data, self.config.report)
            return r.topic, encode_report(r, self._signer, prev)

        return Item(priority, build)

    def _will(self) -> tuple[str, bytes]:
        seq, prev = self.outbox.reserve_seq()
        r = Report(self.device_id, seq, "will", self._clock(), {"state": "offline"}, self.config.report)
        return topic(self.device_id, "will"), encode_report(r, self._signer, prev)

    def heartbeat(self, state: str = "online") -> None:
        """Queue one status and one telemetry report now."""
        status = self._status()
        uptime = time.monotonic() - self._started
        self.outbox.add(
            [
                self._item("status", status_data(status, state, uptime), HEARTBEAT),
                self._item(
                    "telemetry",
                    telemetry_data(status, self.outbox_figures(), self.config.report),
                    HEARTBEAT,
                ),
            ]
        )

    def _forward_events(self) -> None:
        after = self.outbox.cursor(EVENTS_CURSOR)
        batch = self.events.list(after_seq=after, limit=self.config.event_batch)
        if batch:
            items = [
                self._item("events", event_data(e, self.config.report), event_priority(e), e.time)
                for e in batch
            ]
            self.outbox.add(items, cursor=(EVENTS_CURSOR, batch[-1].seq))

    def outbox_figures(self) -> dict[str, int]:
        """The outbox's health as the telemetry report carries it: ``queued`` counts every report
        still held (also those the broker took and no receipt covers yet); a board listening for
        receipts adds ``unreceipted`` (taken by the broker, waiting for a receipt), ``resent``,
        ``released`` (below a receipt's floor) and the receipts it verified and refused."""
        figures = self.outbox.stats()
        if self._receipts_on:
            figures.setdefault("released", 0)
            figures.update(
                unreceipted=len(self._resend),
                resent=self.receipts["resent"],
                receipts_verified=self.receipts["applied"],
                receipts_refused=self.receipts["refused"],
            )
        return figures

    # --- receipts --------------------------------------------------------------------------------
    def _receipt_keys(self) -> tuple[bytes, ...]:
        """The receipt keys of the board's trust anchors, read again when the sealed file changes
        (a rotate-key command); on a read error, the keys last read."""
        if self._seal is None:
            return ()
        try:
            st = self.store.layout.path(layout.TRUST).stat()
            seen = (st.st_mtime_ns, st.st_size, st.st_ino)
            if seen != self._anchors_seen:
                self._receipt_key_list = self.store.trust(self._seal).receipts
                self._anchors_seen = seen
        except (OSError, EdgeWardError) as e:
            self.last_error = f"cannot read the trust anchors for receipt keys: {e}"
        return self._receipt_key_list

    def _receipt_mode(self) -> bool:
        """Reports wait for a receipt: the service listens for receipts and trusts a key now."""
        return self._receipts_on and bool(self._receipt_keys())

    def apply_receipt(self, payload: bytes) -> bool:
        """Verify one receipt and delete what it covers from the outbox; a receipt that does not
        verify against a trusted receipt key, names another board or identity key, or is
        malformed changes nothing (logged and counted in ``receipts['refused']``)."""
        try:
            receipt = verify_receipt(
                payload, self._receipt_keys(), self.device_id, self._identity_fpr, self.config
            )
        except EdgeWardError as e:
            self.receipts["refused"] += 1
            self.last_error = f"receipt refused: {e}"
            _log.warning("receipt refused: %s", e)
            return False
        self.outbox.receipted(receipt, self._sent_through, results_topic(self.device_id))
        for seq in [s for s in self._resend if receipt.covers(s)]:
            del self._resend[seq]
        self.receipts["applied"] += 1
        return True

    def _take_receipts(self) -> None:
        while True:
            try:
                payload = self._receipt_inbox.get_nowait()
            except queue.Empty:
                return
            self.apply_receipt(payload)

    def _resend_due(self, inflight: dict[int, int], room: int) -> int:
        """Send again, oldest first, the reports the broker took that no receipt has covered in
        their wait; returns how many were handed over."""
        now = time.monotonic()
        busy = set(inflight.values())
        due = sorted(s for s, (when, _) in self._resend.items() if when <= now and s not in busy)[:room]
        sent = 0
        for p in self.outbox.get(due):
            inflight[self.link.publish(p.topic, p.payload)] = p.seq
            sent += 1
        for s in due:  # gone from the outbox (dropped when it was full): nothing to wait for
            if s not in inflight.values():
                self._resend.pop(s, None)
        self.receipts["resent"] += sent
        return sent

    def _settle(self, acked: list[int]) -> None:
        """What the broker acknowledged: deleted, or kept for a receipt with its resend time. A
        report the broker refused (ACL) is deleted either way: sending it again cannot help."""
        refused, self._refused = self._refused, []
        if refused:
            self.outbox.acked(refused)
            acked = [s for s in acked if s not in set(refused)]
            for seq in refused:
                self._resend.pop(seq, None)
        if not self._receipt_mode():
            self.outbox.acked(acked)
            self._resend.clear()
            return
        now = time.monotonic()
        for seq in self.outbox.acked(acked, only_topic=results_topic(self.device_id)):
            _, wait = self._resend.get(seq, (0.0, self.config.receipt_timeout_s))
            self._resend[seq] = (now + wait, min(2 * wait, self.config.receipt_backoff_max_s))

    # --- commands ----------------------------------------------------------------------------------
    def _on_message(self, topic_name: str, payload: bytes, _mid: int) -> None:
        """paho's thread: hand the delivery over, never block (a full inbox drops it; the
        retained queue, or receipt, is delivered again at the next connection or commit)."""
        if self._receipts_on and topic_name == receipt_topic(self.device_id):
            # When full, this one is dropped: the monitor sends another after its next commit.
            with contextlib.suppress(queue.Full):
                self._receipt_inbox.put_nowait(payload)
            return
        if self._commands is None:
            return
        try:
            self._inbox.put_nowait(payload)
        except queue.Full:
            self.last_error = "command inbox full; a delivery was dropped until the next connection"

    def redeliver(self, payload: bytes) -> None:
        """Hand a delivery back to the loop (the commands after an update, once it is done)."""
        self._on_message("", payload, 0)

    def _obey(self, inflight: dict[int, int]) -> None:
        """Carry out what arrived, from the loop thread (no paho lock is held here)."""
        while self._commands is not None and not self._wiped:
            try:
                payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                self._commands(payload, lambda data, result: self._send_result(data, result, inflight))
            except EdgeWardError as e:  # recorded as a security event by the agent; keep serving
                self.last_error = f"command refused: {e}"
            except Exception as e:  # never let one delivery stop the board's reports and commands
                _log.exception("carrying out a command delivery failed")
                self.last_error = f"command delivery failed: {type(e).__name__}: {e}"
            if self._wiped:
                if self._on_wiped is not None:
                    self._on_wiped()
                return

    def _send_result(self, data: bytes, result: Any, inflight: dict[int, int]) -> None:
        """Queue a signed result (durably, outside the report chain). A decommission's result is
        sent at once and waited for, since the wipe that follows removes the outbox."""
        item = Item(SECURITY_EVENT, lambda _seq, _prev: (results_topic(self.device_id), data), chained=False)
        self.outbox.add([item])
        if result.kind == "decommission" and result.outcome == "applied":
            end = time.monotonic() + self._wipe_publish_s
            handed = max(inflight.values(), default=0)
            while time.monotonic() < end and self.outbox.stats()["queued"]:
                for p in self.outbox.pending(handed, self.config.window):
                    inflight[self.link.publish(p.topic, p.payload)] = p.seq
                    handed = p.seq
                self.outbox.acked(self._collect_acks(inflight))
            self._wiped = True

    # --- the loop ------------------------------------------------------------------------------
    def start(self) -> None:
        self.link.start()
        self._thread = threading.Thread(target=self._run, name="edgeward-telemetry", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        inflight: dict[int, int] = {}  # paho message id -> outbox seq
        handed = 0
        next_beat = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_beat:
                    self.heartbeat()
                    next_beat = time.monotonic() + self.config.heartbeat_s
                self._obey(inflight)
                if not self._wiped and not self.store.is_provisioned():
                    self._wiped = True  # wiped by another process: nothing left to report from
                if self._wiped:
                    return
                self._forward_events()
                self._take_receipts()
                room = self.config.window - len(inflight)
                below = None
                if self._receipt_mode():
                    room -= self._resend_due(inflight, room) if room > 0 else 0
                    oldest = self.outbox.oldest()
                    below = oldest + self.config.max_unreceipted if oldest is not None else None
                for p in self.outbox.pending(handed, room, below) if room > 0 else []:
                    inflight[self.link.publish(p.topic, p.payload)] = p.seq
                    handed = p.seq
                    self._sent_through = max(self._sent_through, p.seq)
                self._settle(self._collect_acks(inflight))
                self.last_error = None
            except EdgeWardError as e:  # disk full, store locked: keep serving, retry later
                self.last_error = str(e)
                self._stop.wait(self.config.backoff[0])
            except Exception as e:  # a bug or a race must not end telemetry and commands for good
                _log.exception("telemetry loop failed; retrying")
                self.last_error = f"{type(e).__name__}: {e}"
                self._stop.wait(self.config.backoff[0])

    def _collect_acks(self, inflight: dict[int, int]) -> list[int]:
        """Wait up to poll_s for PUBACKs; the outbox seqs they acknowledge."""
        done = []
        try:
            item: tuple[int, bool] | None = self._acks.get(timeout=self.config.poll_s)
            while item is not None:
                mid, ok = item
                seq = inflight.pop(mid, None)
                if seq is not None:
                    done.append(seq)
                    if not ok:  # refused by the broker (ACL): resending cannot help
                        self.rejected += 1
                        self._refused.append(seq)
                item = self._acks.get_nowait()
        except queue.Empty:
            pass
        return done

    def flush(self, timeout: float) -> bool:
        """Wait until every queued report has been acknowledged (with a receipt key: covered by a
        receipt); False on timeout."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.outbox.stats()["queued"] == 0:
                return True
            time.sleep(0.05)
        return self.outbox.stats()["queued"] == 0

    def stop(self) -> None:
        """Say goodbye (a signed ``stopping`` status), drain briefly, disconnect cleanly."""
        if self._thread is not None and self._thread.is_alive() and not self._wiped:
            self.heartbeat("stopping")
            self.flush(self.config.drain_s)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.link.stop()
        self.outbox.close()
        crypto.wipe(self._seal)


# --- command line ---------------------------------------------------------------------------


def add_broker_arguments(sp: argparse.ArgumentParser, required: bool = True) -> None:
    """--broker/--ca/--cert/--key/--heartbeat: shared by ``telemetry`` and ``serve``."""
    sp.add_argument("--broker", required=required, help="HOST:PORT of the fleet broker (TLS)")
    sp.add_argument("--ca", required=required, help="fleet CA certificate (PEM)")
    sp.add_argument("--cert", required=required, help="this board's client certificate (PEM)")
    sp.add_argument("--key", required=required, help="this board's client private key (PEM)")
    sp.add_argument(
        "--heartbeat",
        type=float,
        default=DEFAULT_CONFIG.telemetry.heartbeat_s,
        help="seconds between status reports",
    )


def service_from_args(
    args: argparse.Namespace,
    events: EventStore,
    status_provider: Callable[[], dict[str, Any]] | None = None,
    config: TelemetryConfig = DEFAULT_CONFIG.telemetry,
    commands: Callable[[bytes, Callable[[bytes, Any], None]], list[bytes]] | None = None,
    on_wiped: Callable[[], None] | None = None,
    wipe_publish_s: float = DEFAULT_CONFIG.commands.wipe_publish_s,
) -> TelemetryService | None:
    """The telemetry service the command line asks for (``config`` with its ``--heartbeat``), or
    None when no --broker was given."""
    if not args.broker:
        return None
    broker = Broker.parse(args.broker, args.ca, args.cert, args.key)
    return TelemetryService(
        args.data_dir,
        KeySource.from_env(args.kek_file),
        events,
        broker,
        status_provider=status_provider,
        config=replace(config, heartbeat_s=args.heartbeat),
        commands=commands,
        on_wiped=on_wiped,
        wipe_publish_s=wipe_publish_s,
    )


def cmd_telemetry(args: argparse.Namespace) -> int:
    """Run telemetry for one board until SIGTERM / Ctrl-C."""
    store = DataDir(args.data_dir)
    store.require_provisioned()
    events = EventStore(store.events_file)
    svc = service_from_args(args, events)
    if svc is None:
        raise UsageError("telemetry needs --broker HOST:PORT")
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    svc.start()
    try:
        if args.connect_timeout:
            svc.link.require_connected(args.connect_timeout)
        elif not svc.link.wait_connected(5):
            print(
                f"edgeward-agent: broker {args.broker} not reachable yet "
                f"({svc.link.last_error or 'no answer'}); "
                "reports wait in the outbox and are sent when it is",
                file=sys.stderr,
            )
        print(f"telemetry for {svc.device_id} -> {args.broker} (Ctrl-C to stop)", flush=True)
        done.wait()
    finally:
        svc.stop()
        events.close()
    return 0


def register_cli(sub: Any) -> None:
    """Add ``edgeward-agent telemetry`` to the agent's command line."""
    sp = sub.add_parser(
        "telemetry",
        help="send this board's signed status, counters and events to the fleet broker",
        description="Publish signed reports over MQTT 5 (TLS, client certificate) until stopped.",
    )
    sp.add_argument("--data-dir", required=True, help="the board's data directory")
    sp.add_argument("--kek-file", help="32-byte key-encryption key file (instead of a passphrase)")
    add_broker_arguments(sp)
    sp.add_argument(
        "--connect-timeout",
        type=float,
        default=0,
        help="exit 4 if the broker is not reached within this many seconds (default: retry)",
    )
    sp.set_defaults(func=cmd_telemetry)

"""The agent as a guarded service: authenticate, bound, throttle, predict, detect, audit.

:class:`Service` is the whole decision path of one query and knows nothing about HTTP; the
HTTP adapter lives in :mod:`device_agent.api`. Background services (telemetry, command
listeners) attach with :meth:`Service.attach` and read counters from
:meth:`Service.status_provider`; they are started and stopped with the service.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from device_agent.agent import Agent, LoadedModel, model_feeds
from device_agent.config import DEFAULT_CONFIG, DEFAULT_LIMITS, BundleLimits, ServeConfig, ThrottleConfig
from device_agent.errors import (
    EdgeWardError,
    EnvironmentFault,
    Expired,
    FormatError,
    NotInstalled,
    SecurityRefusal,
    UsageError,
)
from device_agent.runtime.arrays import load_arrays
from device_agent.runtime.output import shape_output
from device_agent.service import clocks
from device_agent.service.audit import AuditLog, input_summary
from device_agent.service.budgets import BudgetFile, Saved
from device_agent.service.detect import Calibration, Detector, Signal
from device_agent.service.events import EventStore
from device_agent.service.throttle import Throttle
from device_agent.service.tokens import TokenRecord, TokenStore

_log = logging.getLogger(__name__)


class Unauthorized(SecurityRefusal):
    """No valid bearer token (HTTP 401)."""


class Forbidden(SecurityRefusal):
    """The token's role may not do this (HTTP 403)."""


class Throttled(SecurityRefusal):
    """Over a rate or budget (HTTP 429); ``retry_after`` says when to try again."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooLarge(FormatError):
    """The request is over a size or batch bound (HTTP 413)."""


class Background(Protocol):
    """What :meth:`Service.attach` takes, e.g. telemetry given status_provider and events."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def decode_inputs(
    body: bytes, content_type: str, limits: BundleLimits = DEFAULT_LIMITS
) -> np.ndarray | dict[str, np.ndarray]:
    """A request body as arrays: JSON ``{"inputs": ...}`` or an ``.npy``/``.npz`` (no pickles),
    read by :func:`~device_agent.runtime.arrays.load_arrays` within ``limits``."""
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            doc = json.loads(body)
            raw = doc["inputs"]
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError('the body must be JSON {"inputs": [...]}') from e
        if isinstance(raw, dict):
            return {str(k): _json_array(v) for k, v in raw.items()}
        return _json_array(raw)
    if ctype in ("application/x-npy", "application/octet-stream", "application/x-npz"):
        try:
            return load_arrays(body, limits)
        except FormatError as e:
            raise FormatError(
                f"the body is not a readable .npy/.npz array (pickles are refused): {e}"
            ) from e
    raise FormatError(
        f"unsupported content type {ctype!r}; send application/json or application/x-npy"
    )


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise FormatError("the body must be a JSON object") from e
    if not isinstance(doc, dict):
        raise FormatError("the body must be a JSON object")
    return doc


def _decode_feedback(body: bytes, content_type: str, limits: BundleLimits) -> tuple[np.ndarray, np.ndarray]:
    """Feedback as (inputs, labels): an .npz with exactly ``x`` and ``y``, or JSON
    ``{"inputs": [...], "labels": [...]}``."""
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == "application/json":
        doc = _json_object(body)
        if set(doc) != {"inputs", "labels"}:
            raise FormatError('the body must be JSON {"inputs": [...], "labels": [...]}')
        return _json_array(doc["inputs"]), _json_array(doc["labels"])
    arrays = decode_inputs(body, ctype, limits)
    if not isinstance(arrays, dict) or set(arrays) != {"x", "y"}:
        raise FormatError("feedback must be an .npz with exactly two arrays, x and y")
    return arrays["x"], arrays["y"]


def _json_array(raw: Any) -> np.ndarray:
    try:
        a = np.asarray(raw)
    except ValueError as e:
        raise FormatError(f"inputs are not a rectangular array: {e}") from e
    if a.dtype == object or a.dtype.kind not in "biuf":
        raise FormatError(f"inputs must be numbers, got {a.dtype}")
    return a


class Service:
    """One board's guarded prediction service over an :class:`Agent`.

    ``config`` defaults to the agent's (``agent.config.serve``); the throttle starts from
    ``agent.config.throttle`` where a bundle's sealed policy is silent.

    Two clocks (:mod:`device_agent.service.clocks`): ``clock`` returns seconds since the epoch and
    only stamps what an operator reads (audit records, events); ``monotonic`` returns boottime
    seconds and times everything that grants or withholds (rate buckets, daily budgets, detector
    windows and cool-downs), so stepping the wall clock refills nothing. ``boot_id`` names the
    current boot (None: unknown), which tells a restart from a reboot when the budgets are loaded
    from ``budgets.json``. Tests and the red team inject simulated ones.
    """

    def __init__(
        self,
        agent: Agent,
        config: ServeConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = clocks.boottime,
        boot_id: Callable[[], str | None] = clocks.boot_id,
        events: EventStore | None = None,
    ) -> None:
        self.agent = agent
        self.config = config or agent.config.serve
        self.clock = clock
        self.monotonic = monotonic
        data = agent.store
        self.tokens: TokenStore = agent.tokens()
        self.events = events or EventStore(data.events_file, self.config.max_evidence_bytes)
        self.audit = AuditLog(data.audit_dir, self.config.audit)
        self._throttle = Throttle(agent.config.throttle.tightest(self.config.throttle), self.config.budget)
        self._budgets = BudgetFile(data.budgets_file, data.limits.max_board_file_bytes)
        self._boot_id = boot_id()
        self._save_lock = threading.Lock()  # one budgets.json write at a time; taken before _lock
        self._budget_thread: threading.Thread | None = None
        self._audit_thread: threading.Thread | None = None
        self._detector = Detector(None, self.config.detect)
        self._lock = threading.Lock()
        self._model: LoadedModel | None = None
        self._integrity_failed: str | None = None
        self._background: list[Background] = []
        self._stop = threading.Event()
        self._integrity_thread: threading.Thread | None = None
        self._learning_thread: threading.Thread | None = None
        self._started = time.monotonic()
        self.counters: Counter[str] = Counter(queries=0, answered=0, rows=0)
        self._counter_lock = threading.Lock()
        self._load_budgets()

    # --- background services --------------------------------------------------------------------
    def attach(self, service: Background) -> None:
        """Register a background object (start()/stop()), run for the life of the service."""
        self._background.append(service)

    def start(self) -> None:
        self.end_of_life()
        self.check_integrity()
        self._integrity_thread = threading.Thread(
            target=self._integrity_loop, name="integrity", daemon=True
        )
        self._integrity_thread.start()
        self._budget_thread = threading.Thread(target=self._budget_loop, name="budgets", daemon=True)
        self._budget_thread.start()
        self._audit_thread = threading.Thread(target=self._audit_loop, name="audit", daemon=True)
        self._audit_thread.start()
        self._learning_thread = threading.Thread(target=self._learning_loop, name="learning", daemon=True)
        self._learning_thread.start()
        for b in self._background:
            b.start()

    def stop(self) -> None:
        self._stop.set()
        for b in reversed(self._background):
            b.stop()
        for t in (self._integrity_thread, self._budget_thread, self._audit_thread, self._learning_thread):
            if t is not None:
                t.join(timeout=5)
        # After a decommission the data dir holds only the attestation: nothing more is written.
        wiped = not self.agent.store.is_provisioned()
        if not wiped:
            try:
                self.save_budgets(clean=True)  # exact counts: a clean restart over-charges nobody
            except EdgeWardError as e:
                _log.warning("could not save the budgets at stop: %s", e)
        self.audit.close(checkpoint=not wiped, now=self.clock())

    def status_provider(self) -> dict[str, Any]:
        """Counters for telemetry and ``GET /v1/status``: no client ids, no inputs."""
        with self._lock:
            m = self._model
            return {
                "uptime_s": round(time.monotonic() - self._started, 1),
                "model": {"id": m.manifest.model_id, "version": m.manifest.model_version,
                          "local_version": m.local_version}
                if m
                else None,
                "integrity": "failed" if self._integrity_failed else "ok",
                "counters": self._counters_copy(),
            }

    # --- budgets on disk (budgets.py says what a power cut or a reboot can lose) ----------------
    def _load_budgets(self) -> None:
        now = self.monotonic()
        try:
            saved = self._budgets.load()
        except FormatError as e:
            # Unknown spending is not no spending: every client waits one whole window.
            with self._lock:
                self._throttle.lock_out(now)
            _log.error("%s; every client is refused for one budget window", e)
            self.events.record(
                "tamper",
                datetime.fromtimestamp(self.clock(), UTC),
                severity="critical",
                evidence={"problem": f"budgets refused: {str(e)[:200]}",
                          "every_client_refused_for_s": self.config.budget.window_seconds},
            )
            try:
                self.save_budgets()
            except EdgeWardError as fault:
                _log.warning("could not save the budgets: %s", fault)
            return
        if saved is not None:
            with self._lock:
                self._throttle.restore(saved.clients, saved.lockout, now, saved.elapsed(self._boot_id, now))

    def save_budgets(self, clean: bool = False) -> None:
        """Write the budgets durably now (``clean``: exact counts, at stop). Raises
        :class:`~device_agent.errors.EnvironmentFault` when the disk refuses."""
        with self._save_lock:
            with self._lock:
                now = self.monotonic()
                snap = self._throttle.snapshot(now, clean)
            self._budgets.save(Saved(self._boot_id, now, snap.lockout, snap.clients))
            with self._lock:
                self._throttle.saved(snap.generation)

    def _budget_loop(self) -> None:
        """Save the windows' countdown while any runs: a power cut then lengthens a window by at
        most ``save_seconds`` plus the time the board was off."""
        while not self._stop.wait(self.config.budget.save_seconds):
            with self._lock:
                due = self._throttle.unsaved or self._throttle.running(self.monotonic())
            if due:
                try:
                    self.save_budgets()
                except EdgeWardError as e:
                    _log.warning("could not save the budgets: %s", e)

    def _audit_loop(self) -> None:
        """Write the counted anonymous refusals once their window has ended, even if none follow."""
        while not self._stop.wait(self.audit.config.summary_seconds / 4):
            try:
                self.audit.flush(self.clock())
            except EdgeWardError as e:
                _log.warning("could not write the audit log: %s", e)

    # --- model and policy ---------------------------------------------------------------------
    def _current(self) -> LoadedModel:
        """The model to serve. Agent.model() re-reads the state only when state.json changes (an
        install by the CLI) and checks end of life on every call; a new bundle brings its policy."""
        if self._integrity_failed:
            raise NotInstalled(f"serving stopped: {self._integrity_failed}; reinstall the model")
        loaded = self.agent.model()
        if self._model is None or loaded.manifest.bundle_id != self._model.manifest.bundle_id:
            self._apply_policy(loaded)
        self._model = loaded  # the same bundle may serve a new local learnt head (device_agent.learning)
        return self._model

    def _apply_policy(self, loaded: LoadedModel) -> None:
        policy = loaded.sidecar.policy
        # The bundle policy sets the limits (the board's defaults where silent); local config only
        # tightens.
        self._throttle.config = ThrottleConfig.from_json(
            policy.get("throttle", {}), self.agent.config.throttle
        ).tightest(self.config.throttle)
        self._detector = Detector(Calibration.from_policy(policy), self.config.detect)
        retention = policy.get("audit", {}).get("retention_days")
        if retention is not None:
            try:
                self.audit.config = replace(self.audit.config, retention_days=float(retention))
            except (TypeError, ValueError, UsageError) as e:
                raise FormatError(
                    f"sealed policy audit.retention_days must be a positive number, got {retention!r}"
                ) from e

    def check_integrity(self) -> bool:
        """Re-check the served model against its sealed digest; on failure stop serving."""
        with self._lock:
            m = self._model
        if m is None:
            return True
        try:
            self.agent.recheck(m)
            return True
        except EdgeWardError as e:
            with self._lock:
                self._integrity_failed = str(e)
            self._record(
                [
                    Signal(
                        "integrity",
                        "",
                        1.0,
                        {"problem": str(e)[:200], "bundle_id": m.manifest.bundle_id},
                    )
                ],
                self.clock(),
                severity="critical",
            )
            return False

    def _integrity_loop(self) -> None:
        while not self._stop.wait(self.config.integrity_seconds):
            self.end_of_life()
            self.check_integrity()

    def end_of_life(self) -> list[str]:
        """Retire models whose end of life has passed (trusted time): they stop serving at once."""
        if not self.agent.store.is_provisioned():
            return []
        try:
            ended = self.agent.sweep_end_of_life()
        except EdgeWardError as e:
            self.agent.record_event("end-of-life", "warning", {"problem": str(e)[:300]})
            return []
        if ended:
            with self._lock:
                if self._model is not None and self._model.manifest.model_id in ended:
                    self._model = None
        return ended

    # --- queries -------------------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> TokenRecord:
        """The token record behind an ``Authorization: Bearer`` header, or Unauthorized."""
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthorized("missing bearer token; create one with 'edgeward-agent token add'")
        rec = self.tokens.authenticate(authorization[7:].strip())
        if rec is None:
            raise Unauthorized("unknown or revoked token")
        return rec

    def health(self) -> dict[str, Any]:
        with self._lock:
            self._current()
        return {"status": "serving"}

    def status(self, who: TokenRecord) -> dict[str, Any]:
        """The counters, for the admin role; every call is audited."""
        record: dict[str, Any] = {"event": "status", "client": who.id, "role": who.role, "status": 200}
        try:
            if who.role != "admin":
                raise Forbidden("the service status is for the admin role only")
            return self.status_provider()
        except EdgeWardError as e:
            record.update(status=http_status(e), error=type(e).__name__)
            self._count(f"refused_{record['status']}")
            raise
        finally:
            self.audit.append(record, self.clock())

    def predict(self, who: TokenRecord, body: bytes, content_type: str) -> dict[str, Any]:
        """One query, start to end; raises the error the API maps to a status code."""
        now = self.clock()  # wall: the audit record's and events' time
        mono = self.monotonic()  # boottime: throttle and detector intervals
        client = who.id
        record: dict[str, Any] = {"event": "predict", "client": client, "role": who.role}
        try:
            if len(body) > self.config.max_request_bytes:
                raise TooLarge(
                    f"request body is {len(body)} bytes, "
                    f"the limit is {self.config.max_request_bytes}"
                )
            with self._lock:
                loaded = self._current()
            feeds, batched = model_feeds(
                loaded, decode_inputs(body, content_type, self.agent.limits), who.role, self.agent.limits
            )
            first = next(iter(feeds.values()))
            record["input"] = input_summary(first, self.audit.key)
            rows = int(first.shape[0]) if first.ndim else 1
            if rows > self.config.max_rows:
                raise TooLarge(f"{rows} inputs in one request, the limit is {self.config.max_rows}")
            with self._lock:
                decision = self._throttle.decide(client, mono, rows, self._detector.anomaly(client, mono))
                signals = [] if decision.allowed else self._detector.refused(client, mono)
                must_save = decision.allowed and self._throttle.unsaved
            if not decision.allowed:
                self._record(signals, now)
                record["throttle"] = decision.reason
                if decision.reason == "batch":
                    raise TooLarge(f"{rows} inputs in one request exceed the rate limit's burst")
                raise Throttled(
                    f"over the {decision.reason.replace('_', ' ')} limit", decision.retry_after
                )
            if must_save:
                # The rows go beyond what budgets.json counts as spent: on disk before the answer.
                self.save_budgets()
            outputs = loaded.runner.run(feeds)
            try:
                answer = shape_output(
                    outputs, loaded.sidecar.task, loaded.sidecar.policy, who.role, batched
                )
            except UsageError as e:
                raise Forbidden(str(e)) from e
            if "outputs" in answer:  # raw outputs carry no label
                labels: list[Any] = [None] * rows
            else:
                labels = (
                    [r["label"] for r in answer["predictions"]] if batched else [answer["label"]]
                )
            with self._lock:
                for i, label in enumerate(labels):
                    signals += self._detector.observe(client, first[i], label, mono)
            self._record(signals, now)
            record.update(status=200, rows=rows, detections=sorted({s.kind for s in signals}))
            self._count("answered")
            self._count("rows", rows)
            return answer
        except EdgeWardError as e:
            record.update(status=http_status(e), error=type(e).__name__)
            self._count(f"refused_{record['status']}")
            raise
        finally:
            self._count("queries")
            self.audit.append(record, now)

    # --- local learning (device_agent.learning) ------------------------------------------------------
    def _engineer(self, who: TokenRecord) -> None:
        if who.role not in ("engineer", "admin"):
            raise Forbidden("local learning is for the engineer and admin roles only")

    def learning_admit(self, who: TokenRecord, what: str, length: int) -> None:
        """Before a learning request's body is read: the token's role, then the body's declared
        size; a refusal is audited like the request would have been."""
        try:
            self._engineer(who)
            if length > self.config.max_request_bytes:
                raise TooLarge(f"request body is {length} bytes, the limit is {self.config.max_request_bytes}")
        except EdgeWardError as e:
            record = {"event": what, "client": who.id, "role": who.role, "status": http_status(e),
                      "error": type(e).__name__}
            self.audit.append(record, self.clock())
            raise

    def _learning(self) -> tuple[Any, LoadedModel]:
        from device_agent.learning.cycle import Learning

        with self._lock:
            loaded = self._current()
        return Learning(self.agent), loaded

    def _learning_call(self, who: TokenRecord, what: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one learning request, audited (counts only: never an example)."""
        record: dict[str, Any] = {"event": what, "client": who.id, "role": who.role}
        try:
            self._engineer(who)
            doc = fn()
            record.update(status=200, **{k: doc[k] for k in ("kept", "received", "accepted") if k in doc})
            return doc
        except EdgeWardError as e:
            record.update(status=http_status(e), error=type(e).__name__)
            raise
        finally:
            self.audit.append(record, self.clock())

    def feedback(self, who: TokenRecord, body: bytes, content_type: str) -> dict[str, Any]:
        """``POST /v1/feedback``: labelled examples from this token (an .npz with ``x`` and ``y``, or
        JSON ``{"inputs": ..., "labels": ...}``), kept on the board encrypted; never sent anywhere."""

        def run() -> dict[str, Any]:
            from device_agent.learning.cycle import token_source

            if len(body) > self.config.max_request_bytes:
                raise TooLarge(f"request body is {len(body)} bytes, the limit is {self.config.max_request_bytes}")
            x, y = _decode_feedback(body, content_type, self.agent.limits)
            learning, loaded = self._learning()
            feeds, _ = model_feeds(loaded, x, who.role, self.agent.limits)
            rows = next(iter(feeds.values()))
            return dict(learning.intake(loaded, rows, y, token_source(who.id), datetime.fromtimestamp(self.clock(),
                                                                                                        UTC)))

        return self._learning_call(who, "feedback", run)

    def feedback_list(self, who: TokenRecord) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            learning, loaded = self._learning()
            return {"examples": learning.held(loaded, "held")}

        return self._learning_call(who, "feedback-list", run)

    def feedback_review(self, who: TokenRecord, body: bytes) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            doc = _json_object(body)
            accept, drop = doc.get("accept", []), doc.get("drop", [])
            if not all(isinstance(v, list) and all(isinstance(i, str) for i in v) for v in (accept, drop)):
                raise FormatError('the body must be JSON {"accept": [ids], "drop": [ids]}')
            learning, loaded = self._learning()
            return dict(learning.review(loaded, accept, drop))

        return self._learning_call(who, "feedback-review", run)

    def feedback_delete_source(self, who: TokenRecord, body: bytes) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            source = _json_object(body).get("source")
            if not isinstance(source, str) or not 1 <= len(source) <= 200:
                raise FormatError('the body must be JSON {"source": "token:ID" or "local:NAME"}')
            learning, loaded = self._learning()
            return dict(learning.delete_source(loaded, source))

        return self._learning_call(who, "feedback-delete-source", run)

    def learn(self, who: TokenRecord) -> dict[str, Any]:
        """``POST /v1/learn``: one update cycle now (``serve`` also runs one on its schedule)."""

        def run() -> dict[str, Any]:
            learning, loaded = self._learning()
            return dict(learning.cycle(datetime.fromtimestamp(self.clock(), UTC), loaded.manifest.model_id))

        return self._learning_call(who, "learn", run)

    def learning_status(self, who: TokenRecord) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            learning, loaded = self._learning()
            return dict(learning.status(loaded))

        return self._learning_call(who, "learning-status", run)

    def learning_cycle(self) -> dict[str, Any] | None:
        """The scheduled cycle: runs when the served bundle allows local learning."""
        from device_agent.learning.cycle import Learning, NotLearnable

        try:
            with self._lock:
                loaded = self._current()
            if "learning" not in loaded.sidecar.policy:
                return None
            return dict(Learning(self.agent).cycle(datetime.fromtimestamp(self.clock(), UTC),
                                                   loaded.manifest.model_id))
        except NotLearnable:
            return None

    def _learning_loop(self) -> None:
        while not self._stop.wait(self.agent.config.learning.cycle_seconds):
            try:
                self.learning_cycle()
            except EdgeWardError as e:
                _log.warning("the scheduled learning cycle failed: %s", e)

    def _counters_copy(self) -> dict[str, int]:
        with self._counter_lock:
            return dict(sorted(self.counters.items()))

    def _count(self, key: str, n: int = 1) -> None:
        with self._counter_lock:
            self.counters[key] += n

    def refused(self, who: TokenRecord | None, error: EdgeWardError) -> None:
        """Audit a prediction request refused before its body was read (401, 413): one record
        for a token holder, a count in the anonymous summary without a valid token."""
        status = http_status(error)
        self._count("queries")
        self._count(f"refused_{status}")
        if who is None:
            self._tally(status)
            return
        record = {"event": "predict", "client": who.id, "status": status, "error": type(error).__name__}
        self.audit.append(record, self.clock())

    def refused_request(self, status: int, counter: str | None = None) -> None:
        """Count a request or connection refused without a valid token checked: bad framing, no
        such endpoint or method, too slow, a 401 outside predict, no free connection (503; a
        connection closed to make room for another counts as one too). Anyone who can reach the
        socket can cause these by the million, so the audit log gets a count per status per
        window, never a record each. ``counter`` names the status counter (``refused_<status>``)."""
        self._count(counter or f"refused_{status}")
        self._tally(status)

    def _tally(self, status: int) -> None:
        try:
            self.audit.refused_anonymous(status, self.clock())
        except EdgeWardError as e:  # a full disk must not stop the door from answering
            _log.warning("could not write the audit log's anonymous summary: %s", e)

    def _record(self, signals: list[Signal], now: float, severity: str = "warning") -> None:
        when = datetime.fromtimestamp(now, UTC)
        for s in signals:
            self._count(f"detections_{s.kind}")
            self.events.record(
                s.kind,
                when,
                severity=severity,
                client=s.client or None,
                score=s.score,
                evidence=s.evidence,
            )


def http_status(e: EdgeWardError) -> int:
    """The HTTP status for an error raised on the query path."""
    from device_agent.learning.cycle import FeedbackRefused

    for cls, code in (
        (Unauthorized, 401),
        (FeedbackRefused, 429),
        (Forbidden, 403),
        (TooLarge, 413),
        (Throttled, 429),
        (NotInstalled, 503),
        (EnvironmentFault, 503),  # e.g. the disk refused to keep the budgets
        (Expired, 503),
        (FormatError, 422),
        (SecurityRefusal, 403),
        (
            UsageError,
            503,
        ),  # the board is set up wrongly (e.g. several models): not the caller's fault
    ):
        if isinstance(e, cls):
            return code
    return 500


def load_config(path: str | None) -> ServeConfig:
    """The local service settings in ``path`` (``--config``), the board's defaults without one."""
    if path is None:
        return DEFAULT_CONFIG.serve
    try:
        return ServeConfig.from_json(json.loads(Path(path).read_text()))
    except FileNotFoundError as e:
        raise UsageError(f"config file {path} does not exist") from e
    except ValueError as e:
        raise UsageError(f"config file {path} is not JSON: {e}") from e

"""Every limit and default of the board, in one frozen object validated once (python-tuf's
``UpdaterConfig`` habit).

:class:`AgentConfig` composes one group per part of the agent. Each group checks its own fields
when it is made, so a bad value is refused (:class:`~device_agent.errors.UsageError` naming the
field) before anything runs. The CLI builds one ``AgentConfig`` and passes it down:
``Agent(config=...)`` keeps it as ``agent.config`` (its bundle limits as ``agent.limits``), the
service takes ``config.serve`` and ``config.throttle``, telemetry ``config.telemetry``. Pure
parsers that the fleet and the packager call as well (bundles, enrolments, key files, reports,
pre-processing) take the group they need as a parameter defaulting to :data:`DEFAULT_CONFIG`'s.

Wire-format constants (magic bytes, header layouts, schema names, signing domains, digest and
key sizes, the 2**53 JSON integer range) are part of a format's definition, not limits: they stay
with their format. ``tests/test_config.py`` checks that every field here is read somewhere and
that no other board module defines a limit of its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

from device_agent.errors import FormatError, UsageError

# --- field checks ----------------------------------------------------------------------------------


def _refuse(group: Any, name: str, rule: str) -> UsageError:
    return UsageError(f"{group.WHERE}.{name} must be {rule}, got {getattr(group, name)!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _int(group: Any, name: str, lo: int = 1, hi: int | None = None) -> None:
    """``group.name`` is an integer in [lo, hi] (no upper end when ``hi`` is None)."""
    v = getattr(group, name)
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        raise _refuse(group, name, f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]")


def _positive(group: Any, name: str) -> None:
    """``group.name`` is a finite number above zero (seconds, rates, days)."""
    v = getattr(group, name)
    if not _is_number(v) or v <= 0:
        raise _refuse(group, name, "a positive number")


def _not_negative(group: Any, name: str) -> None:
    v = getattr(group, name)
    if not _is_number(v) or v < 0:
        raise _refuse(group, name, "a number >= 0")


# --- bundles, inputs and small documents -----------------------------------------------------------


@dataclass(frozen=True)
class BundleLimits:
    """Bounds checked while reading a bundle's untrusted bytes, and on the inputs it serves."""

    WHERE: ClassVar[str] = "bundle"

    max_manifest_bytes: int = 64 * 1024  # the signed manifest (the header's length field)
    max_bundle_bytes: int = 2 * 1024**3  # a whole bundle file, and its decompressed contents
    max_chunk_bytes: int = 16 * 1024**2  # largest payload chunk a manifest may declare
    min_chunk_bytes: int = 4 * 1024  # smallest payload chunk a manifest may declare
    max_sidecar_bytes: int = 16 * 1024**2  # the sealed sidecar inside the contents
    max_trusted_publishers: int = 16  # publisher keys a bundle is checked against
    max_input_bytes: int = 64 * 1024**2  # one input file or request array (float32: bytes / 4 elements)
    max_input_arrays: int = 16  # arrays (members) in one .npz input
    max_preprocess_side: int = 8192  # any image side, in the input, the spec and every step
    max_preprocess_elements: int = 16 * 1024**2  # any array a step makes, input to output
    max_preprocess_steps: int = 32  # steps of a sealed pre-processing spec
    max_preprocess_channels: int = 16  # normalize mean/std entries
    # sealed settings (device_agent/runtime/settings.py), checked at install and every load
    max_runtime_threads: int = 64  # the sealed runtime thread count (0: the runtime's default)
    max_sealed_labels: int = 65536  # labels of a sealed task (a text recogniser's dictionary)
    max_label_chars: int = 256  # one sealed label or confidence band name
    max_score_decimals: int = 12  # the sealed policy's score precision
    max_policy_bands: int = 16  # confidence bands of a sealed policy
    # format version 2 (a shared release payload and per-device envelopes)
    max_envelope_bytes: int = 4096  # one device's envelope (.ewe), its inclusion proof included
    max_release_head_bytes: int = 64 * 1024  # the signed release head at the start of payload.ewp
    max_release_devices: int = 1 << 24  # leaves of one release's Merkle tree (its proof: <= 24 hashes)

    def __post_init__(self) -> None:
        # The manifest length is a 32-bit header field and at least "{}" long.
        _int(self, "max_manifest_bytes", 2, 2**32 - 1)
        for name in (
            "max_bundle_bytes",
            "max_chunk_bytes",
            "max_sidecar_bytes",
            "max_trusted_publishers",
            "max_input_arrays",
            "max_preprocess_side",
            "max_preprocess_elements",
            "max_preprocess_steps",
            "max_preprocess_channels",
            "max_runtime_threads",
            "max_sealed_labels",
            "max_label_chars",
            "max_policy_bands",
        ):
            _int(self, name)
        _int(self, "max_release_head_bytes", 2, 2**32 - 1)  # a 32-bit header field, at least "{}"
        _int(self, "max_envelope_bytes", 1, 2**32 - 1)  # a 32-bit header field
        _int(self, "max_release_devices", 1, 2**32 - 1)  # leaf index and count are 32-bit fields
        _int(self, "min_chunk_bytes", 1, self.max_chunk_bytes)
        _int(self, "max_input_bytes", 4)  # at least one float32 element
        _int(self, "max_score_decimals", 0)


@dataclass(frozen=True)
class DocumentLimits:
    """Bounds on the small documents the board and its hosts exchange."""

    WHERE: ClassVar[str] = "documents"

    max_enrolment_bytes: int = 16 * 1024  # a device's enrolment file (edgeward.enrolment/1)
    max_key_file_bytes: int = 16 * 1024  # a PEM public key file
    max_passphrase_file_bytes: int = 4096  # EDGEWARD_DEVICE_PASSPHRASE_FILE (a systemd credential)
    max_string_field: int = 256  # any string field of a signed document (wire.str_field)
    # device.json, keys.wrapped, the sealed files (~10,000 tokens) and budgets.json
    max_board_file_bytes: int = 4 * 1024**2
    # Every JSON document is read through wire.loads_json, bounded before the parser recurses or
    # converts: arrays/objects nested at most this deep (Python's own json recursion limit is
    # ~1000 and raises RecursionError) ...
    max_json_depth: int = 64
    # ... and numbers of at most this many characters (a 5,000-digit integer costs a quadratic
    # conversion and Python refuses over 4,300 digits with a ValueError; 2**64 has 20 digits).
    max_json_number_chars: int = 40

    def __post_init__(self) -> None:
        for f in fields(self):
            _int(self, f.name)
        _int(self, "max_json_depth", 1, 500)  # well inside Python's recursion limit
        _int(self, "max_json_number_chars", 1, 4300)  # inside Python's int digit limit


# --- the local service --------------------------------------------------------------------------


@dataclass(frozen=True)
class ThrottleConfig:
    """Every throttling limit. Rates are rows per second; bursts and budgets are rows.

    A bundle's sealed policy sets these (``from_json``), the board's ``AgentConfig.throttle``
    where it is silent; the board's local ``serve.throttle`` can only tighten them (``tightest``).
    """

    WHERE: ClassVar[str] = "throttle"

    client_rate: float = 20.0  # rows per second per client
    client_burst: float = 40.0  # rows a client may send at once
    global_rate: float = 200.0  # rows per second, all clients together
    global_burst: float = 400.0  # rows all clients may send at once
    # rows per client per budget window: serve.budget.window_seconds of boottime (a day by default),
    # from the client's first query in the window; kept across restarts and reboots (budgets.json)
    daily_budget: int = 20000
    # An anomaly score a in [0, 1] divides the client's rate by (1 + anomaly_slowdown * a).
    anomaly_slowdown: float = 20.0

    def __post_init__(self) -> None:
        for f in fields(self):
            _positive(self, f.name)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], defaults: ThrottleConfig | None = None) -> ThrottleConfig:
        """The limits a document (sealed policy, local config) sets, ``defaults`` where it is
        silent; a malformed document is a :class:`FormatError`."""
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise FormatError(f"unknown throttle limits: {', '.join(sorted(unknown))}")
        try:
            return replace(defaults or cls(), **dict(raw))
        except UsageError as e:
            raise FormatError(str(e)) from None

    def tightest(self, other: Mapping[str, Any]) -> ThrottleConfig:
        """Combine with another source of limits (bundle policy vs local config): the stricter wins,
        so neither the publisher nor the board's owner can loosen what the other set."""
        other_cfg = ThrottleConfig.from_json(other)
        merged = {}
        for f in fields(self):
            name = f.name
            if name not in other:
                continue
            a, b = getattr(self, name), getattr(other_cfg, name)
            # a larger slowdown is stricter; for every other field the smaller value is.
            merged[name] = max(a, b) if name == "anomaly_slowdown" else min(a, b)
        return replace(self, **merged)


@dataclass(frozen=True)
class DetectConfig:
    """Every detection bound in one place."""

    WHERE: ClassVar[str] = "serve.detect"

    window: int = 50  # recent queries per client the ood and probing counts look at
    ood_count: int = 3  # out-of-distribution inputs in the window that make an event
    probe_count: int = 5  # near-duplicates in the window that make an event
    history: int = 100  # recent distinct queries kept per client for distances
    prada_window: int = 200  # distances kept per client for the normality test
    per_label_history: int = 50  # PRADA's growing set, per predicted label
    prada_min: int = 40  # distances needed before the normality test is trusted
    prada_w: float = 0.85  # Shapiro-Wilk W below this is an extraction event
    prada_every: int = 5  # run the normality test every this many queries (it costs ~50 us)
    rate_window: float = 60.0  # seconds over which throttle refusals are counted
    rate_refusals: int = 10  # refusals in rate_window that make a rate event
    cooldown: float = 60.0  # at most one event per kind and client in this many seconds
    # Least recently seen clients are forgotten beyond this (clients are tokens, made by an admin);
    # each costs up to ~2 MB with 1024-dim inputs, ~150 kB with the digits model.
    max_clients: int = 64
    # The board-wide index across every client (Sybil tokens): the last link_history distinct
    # inputs of all clients (link_history x input dims x 4 bytes: 512 kB with the digits model,
    # 8 MB at the 1024-dim cap). A *boundary link* is an input within the sealed probe_eps of an
    # indexed input that got a different label; link_count of them among the last link_window
    # distinct inputs of all clients make a "linked" event naming every client involved.
    link_history: int = 2048
    link_window: int = 200
    link_count: int = 6
    link_hold: float = 3600.0  # seconds a named client stays at full anomaly (slowed down)

    def __post_init__(self) -> None:
        for name in (
            "window",
            "history",
            "per_label_history",
            "prada_every",
            "rate_refusals",
            "max_clients",
            "link_window",
        ):
            _int(self, name)
        _int(self, "link_history", 1, 16384)  # 64 MB at the 1024-dim cap: the board's RAM is small
        _int(self, "link_count", 1, self.link_window)
        _positive(self, "link_hold")
        _int(self, "ood_count", 1, self.window)
        _int(self, "probe_count", 1, self.window)
        _int(self, "prada_window", 3)  # Shapiro-Wilk needs three values
        _int(self, "prada_min", 3, self.prada_window)
        if not _is_number(self.prada_w) or not 0 < self.prada_w <= 1:
            raise _refuse(self, "prada_w", "a number in (0, 1]")
        _positive(self, "rate_window")
        _not_negative(self, "cooldown")


@dataclass(frozen=True)
class AuditConfig:
    """Rotation, retention, size and checkpoint bounds of the audit log."""

    WHERE: ClassVar[str] = "serve.audit"

    max_segment_bytes: int = 4 * 1024**2  # a segment file, before the log rotates
    # All segments together: past it the oldest are deleted before their retention (and that is recorded)
    max_total_bytes: int = 256 * 1024**2
    retention_days: float = 90.0  # whole segments older than this are deleted (a sealed policy may set it)
    checkpoint_every: int = 256  # records between fsync + head checkpoint
    checkpoint_seconds: float = 5.0  # seconds between fsync + head checkpoint
    # Refusals of requests without a valid token are counted, one record per status per this many seconds
    summary_seconds: float = 60.0

    def __post_init__(self) -> None:
        _int(self, "max_segment_bytes")
        _int(self, "max_total_bytes")
        _positive(self, "retention_days")
        _int(self, "checkpoint_every")
        _positive(self, "checkpoint_seconds")
        _positive(self, "summary_seconds")
        if self.max_total_bytes < 2 * self.max_segment_bytes:
            # the current segment and the newest closed one are never deleted
            raise _refuse(self, "max_total_bytes", "at least twice max_segment_bytes")


@dataclass(frozen=True)
class BudgetConfig:
    """How daily budgets are timed and kept on disk (``budgets.json``; docs/agent-service.md).

    Windows are counted on CLOCK_BOOTTIME, never the wall clock, so stepping the clock refills
    nothing. Board-only: neither a sealed policy nor the local ``--config`` file sets these.
    """

    WHERE: ClassVar[str] = "serve.budget"

    window_seconds: float = 86400.0  # seconds of boottime a client's daily budget runs for
    # Rows written to disk as spent ahead of use, per client: one durable write per this many rows.
    # A power cut can charge a client up to this many rows it never used, and never gives any back.
    reserve_rows: int = 256
    # Seconds between saves of the windows' countdown while any runs. A power cut or reboot
    # lengthens a running window by up to this plus the time the agent was down; never shortens it.
    save_seconds: float = 60.0

    def __post_init__(self) -> None:
        _positive(self, "window_seconds")
        _int(self, "reserve_rows")
        _positive(self, "save_seconds")


@dataclass(frozen=True)
class HttpLimits:
    """Bounds of the HTTP adapter, checked before a request body is read (docs/agent-service.md,
    "HTTP framing and connection limits")."""

    WHERE: ClassVar[str] = "serve.http"

    read_timeout: float = 30.0  # seconds a connection may stay silent (idle keep-alive, a stalled read or write)
    # Seconds from a request's first byte until its line, headers and body have all arrived: a
    # client that trickles bytes gets a 408 and a closed connection
    request_timeout: float = 10.0
    # Connections that have not yet presented a valid token (at most serve.max_connections); past it
    # the oldest of them is closed to make room for a new connection
    max_unauthenticated: int = 16
    drain_factor: int = 16  # an unread body up to this many times max_request_bytes is read and dropped
    # Seconds a closing TCP connection keeps reading and dropping what the client still sends, so
    # the kernel does not reset it before the client has read the answer (Unix sockets need none)
    linger_seconds: float = 1.0
    max_header_line: int = 8192  # bytes in the request line and in each header line
    max_headers: int = 64  # request header lines

    def __post_init__(self) -> None:
        _positive(self, "read_timeout")
        _positive(self, "request_timeout")
        _int(self, "max_unauthenticated")
        _int(self, "drain_factor", 0)  # 0: never drain, close the connection at once
        _positive(self, "linger_seconds")
        _int(self, "max_header_line")
        _int(self, "max_headers")


@dataclass(frozen=True)
class ServeConfig:
    """Local bounds of the service; ``throttle`` can only tighten the bundle policy's limits.

    ``--config FILE`` sets the fields :meth:`from_json` knows; ``http``, ``budget`` and
    ``max_evidence_bytes`` are not settable there.
    """

    WHERE: ClassVar[str] = "serve"

    max_request_bytes: int = 1024 * 1024  # one request body
    max_rows: int = 32  # inputs in one request
    max_connections: int = 64  # each open connection holds a thread
    integrity_seconds: float = 300.0  # seconds between re-checks of the served model
    max_evidence_bytes: int = 4096  # an event's evidence JSON; larger evidence is replaced by its size
    throttle: Mapping[str, Any] = field(default_factory=dict)  # local tightening of the throttle
    detect: DetectConfig = field(default_factory=DetectConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    http: HttpLimits = field(default_factory=HttpLimits)
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_rows", "max_connections", "max_evidence_bytes"):
            _int(self, name)
        _positive(self, "integrity_seconds")
        if not isinstance(self.throttle, Mapping):
            raise _refuse(self, "throttle", "an object of throttle limits")
        try:
            ThrottleConfig.from_json(self.throttle)
        except FormatError as e:
            raise UsageError(f"serve.throttle is not a valid throttle: {e}") from None
        _group(self, "detect", DetectConfig)
        _group(self, "audit", AuditConfig)
        _group(self, "http", HttpLimits)
        _group(self, "budget", BudgetConfig)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ServeConfig:
        known = {
            "max_connections",
            "max_request_bytes",
            "max_rows",
            "integrity_seconds",
            "throttle",
            "detect",
            "audit",
        }
        unknown = set(raw) - known
        if unknown:
            raise UsageError(f"unknown service settings: {', '.join(sorted(unknown))}")
        try:
            kw = {k: raw[k] for k in known & set(raw) - {"detect", "audit", "throttle"}}
            ThrottleConfig.from_json(raw.get("throttle", {}))  # validate early
            return cls(
                **kw,
                throttle=dict(raw.get("throttle", {})),
                detect=DetectConfig(**raw.get("detect", {})),
                audit=AuditConfig(**raw.get("audit", {})),
            )
        except TypeError as e:
            raise UsageError(f"bad service settings: {e}") from e


# --- telemetry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportLimits:
    """Bounds of a signed telemetry report: what the board sends and the fleet accepts. Summaries
    are small, shallow objects, a structural guard against raw inputs (invariant 8)."""

    WHERE: ClassVar[str] = "telemetry.report"

    max_report_bytes: int = 16 * 1024  # one signed report payload
    max_depth: int = 5  # nesting of the report's data
    max_list_items: int = 64  # items in any list of the data
    max_string: int = 512  # characters in any string of the data
    max_key_chars: int = 64  # characters in any object key of the data

    def __post_init__(self) -> None:
        for f in fields(self):
            _int(self, f.name)


@dataclass(frozen=True)
class TelemetryConfig:
    """Every telemetry limit and period in one place."""

    WHERE: ClassVar[str] = "telemetry"

    heartbeat_s: float = 30.0  # seconds between status reports (--heartbeat)
    poll_s: float = 0.2  # seconds the loop waits for acknowledgements
    window: int = 20  # reports handed to MQTT and not yet acknowledged
    max_outbox: int = 20_000  # at most max_outbox * max_report_bytes on disk
    event_batch: int = 500  # events moved into the outbox per pass
    backoff: tuple[int, int] = (1, 30)  # reconnect delay in seconds, doubling from min to max
    drain_s: float = 2.0  # how long stop() waits for queued reports to be acknowledged
    keepalive_s: int = 30  # MQTT keep-alive in seconds
    # End-to-end receipts (docs/telemetry.md, "Receipts"), once the board trusts a receipt key: a
    # report the broker took stays in the outbox until a monitor's signed receipt covers it, and
    # is sent again receipt_timeout_s after the broker took it, the wait doubling up to
    # receipt_backoff_max_s.
    receipt_timeout_s: float = 30.0
    receipt_backoff_max_s: float = 480.0
    # Sequence numbers from the oldest report without a receipt to the newest handed to MQTT:
    # below the monitor's redelivery window (1,080), so a report sent again is judged a
    # duplicate, never a replay. New reports wait in the outbox while the span is full.
    max_unreceipted: int = 1000
    # One receipt lists every committed range of the monitor's whole redelivery window (1,080
    # numbers: at most 540 ranges, whatever the gaps), so the oldest report waiting for a receipt
    # is always covered once stored; the bytes hold that many ranges of 16-digit numbers.
    max_receipt_bytes: int = 24 * 1024  # one signed receipt message
    max_receipt_ranges: int = 544  # committed ranges one receipt lists
    report: ReportLimits = field(default_factory=ReportLimits)

    def __post_init__(self) -> None:
        _positive(self, "heartbeat_s")
        _positive(self, "poll_s")
        for name in ("window", "max_outbox", "event_batch", "keepalive_s", "max_unreceipted",
                     "max_receipt_bytes", "max_receipt_ranges"):
            _int(self, name)
        _positive(self, "receipt_timeout_s")
        if not _is_number(self.receipt_backoff_max_s) or self.receipt_backoff_max_s < self.receipt_timeout_s:
            raise _refuse(self, "receipt_backoff_max_s", "a number >= receipt_timeout_s")
        b = self.backoff
        if not (isinstance(b, tuple) and len(b) == 2 and all(_is_int(s) for s in b) and 1 <= b[0] <= b[1]):
            raise _refuse(self, "backoff", "a pair of whole seconds (min, max) with 1 <= min <= max")
        _not_negative(self, "drain_s")
        _group(self, "report", ReportLimits)


# --- remote commands and trusted time -------------------------------------------------------------


@dataclass(frozen=True)
class CommandLimits:
    """Bounds of signed commands, queues, beacons and results, and how the board judges their
    times (``docs/commands.md``)."""

    WHERE: ClassVar[str] = "commands"

    max_command_bytes: int = 16 * 1024  # one signed command or time beacon
    max_queue_items: int = 64  # commands (and beacons) in one board's retained queue
    max_queue_bytes: int = 512 * 1024  # one retained queue message
    max_result_bytes: int = 32 * 1024  # one signed command result
    max_anchors: int = 16  # keys a rotate-key command may install for one role
    future_skew_s: float = 300.0  # a command issued further ahead of the board's time is refused
    beacon_hold_s: float = 3 * 86400.0  # a beacon further ahead of every other time source is held
    wipe_publish_s: float = 10.0  # how long a decommission waits for the broker to take its result
    # over-the-air updates (docs/commands.md, "update")
    max_update_bytes: int = 2 * 1024**3  # a file an update names (BundleLimits.max_bundle_bytes' bound)
    max_update_url_chars: int = 2048  # an update's download address
    update_connect_s: float = 15.0  # to open a TCP+TLS connection to the file server
    update_read_s: float = 30.0  # the longest wait for the next bytes from the server
    update_deadline_s: float = 1800.0  # the whole download, every retry included
    update_attempts: int = 5  # connections per file; each resumes where the last one stopped (Range)
    update_ca_file: str | None = None  # CA certificates (PEM) for the file server; None: the system store

    def __post_init__(self) -> None:
        for name in ("max_command_bytes", "max_queue_items", "max_queue_bytes", "max_result_bytes", "max_anchors",
                     "max_update_bytes", "max_update_url_chars", "update_attempts"):
            _int(self, name)
        for name in ("future_skew_s", "beacon_hold_s", "wipe_publish_s", "update_connect_s", "update_read_s",
                     "update_deadline_s"):
            _positive(self, name)
        if self.update_ca_file is not None and (not isinstance(self.update_ca_file, str) or not self.update_ca_file):
            raise _refuse(self, "update_ca_file", "a path to a PEM file of CA certificates")


# --- local continual learning ----------------------------------------------------------------------


@dataclass(frozen=True)
class LearningConfig:
    """The board's own caps on local learning (``docs/learning.md``). A bundle's sealed learning
    policy sets the working values; these bound what any policy may ask for, and they bound the
    sealed arrays (gate, replay, canaries) before they are decoded."""

    WHERE: ClassVar[str] = "learning"

    max_examples: int = 20_000  # examples held on the board at once, whatever the policy says
    max_store_bytes: int = 64 * 1024**2  # the encrypted feedback store, plaintext bytes
    max_example_bytes: int = 1024**2  # one example's input, as float32
    max_per_request: int = 1024  # examples in one feedback request or file
    max_policy_elements: int = 4 * 1024**2  # float32 elements of every sealed learning array together
    max_versions: int = 16  # local versions kept, whatever the policy says
    max_steps: int = 5000  # optimisation steps of one refit
    max_log_entries: int = 100_000  # entries of the signed update log read back
    max_log_bytes: int = 64 * 1024**2  # the update log file
    max_review_ids: int = 1024  # ids in one review request
    cycle_seconds: float = 3600.0  # serve runs a learning cycle this often (when the policy allows)

    def __post_init__(self) -> None:
        for name in (
            "max_examples", "max_store_bytes", "max_example_bytes", "max_per_request", "max_policy_elements",
            "max_versions", "max_steps", "max_log_entries", "max_log_bytes", "max_review_ids",
        ):
            _int(self, name)
        _positive(self, "cycle_seconds")


# --- the whole board ----------------------------------------------------------------------------


def _group(owner: Any, name: str, cls: type) -> None:
    if not isinstance(getattr(owner, name), cls):
        raise _refuse(owner, name, f"a {cls.__name__}")


@dataclass(frozen=True)
class AgentConfig:
    """Every limit and default on the board; each group is validated when it is made."""

    WHERE: ClassVar[str] = "config"

    bundle: BundleLimits = field(default_factory=BundleLimits)  # bundles read and inputs served
    documents: DocumentLimits = field(default_factory=DocumentLimits)  # enrolments, key files, strings
    serve: ServeConfig = field(default_factory=ServeConfig)  # the local API, detection and audit
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)  # where a sealed policy is silent
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)  # reports, outbox and MQTT
    commands: CommandLimits = field(default_factory=CommandLimits)  # remote commands and time beacons
    learning: LearningConfig = field(default_factory=LearningConfig)  # local continual learning caps

    def __post_init__(self) -> None:
        _group(self, "bundle", BundleLimits)
        _group(self, "documents", DocumentLimits)
        _group(self, "serve", ServeConfig)
        _group(self, "throttle", ThrottleConfig)
        _group(self, "telemetry", TelemetryConfig)
        _group(self, "commands", CommandLimits)
        _group(self, "learning", LearningConfig)


DEFAULT_CONFIG = AgentConfig()
# The bundle limits of DEFAULT_CONFIG: the default of the parsers that take only those.
DEFAULT_LIMITS = DEFAULT_CONFIG.bundle

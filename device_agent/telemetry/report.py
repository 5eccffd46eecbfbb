"""The signed telemetry report: the one definition of what a board sends over MQTT.

The board writes reports with :func:`encode_report`; the fleet monitor cuts a received payload
with :func:`frame` and checks the signature over the exact received bytes with
:func:`verify_frame` *before* a single field is parsed (invariant 1), then parses the
authenticated body with :func:`parse_report`. Wire format (``docs/telemetry.md``)::

    b"EWT2" || Ed25519 signature (64 bytes) || prev (32 bytes) || body (canonical JSON, UTF-8)

The signature covers ``prev || body`` and uses :func:`device_agent.crypto.sign` with
:data:`DOMAIN`, so a report signature can never be confused with an enrolment or bundle
signature. ``prev`` is the SHA-256 of the board's previous report payload (zeros when there is
none to name): a report whose signature checks vouches for the exact bytes of its predecessor, so
the monitor can authenticate a burst of reports with one signature check (:func:`frame`,
:func:`payload_digest`; ``docs/telemetry.md``, "Hash chain"). The body carries the device id (it
must match the topic), a per-device sequence number that only moves forward, the kind (which is
also the last topic level) and a small JSON ``data`` object: summaries only, never a raw input
(invariant 8, enforced structurally by :func:`check_summary`).

The size and shape bounds are :class:`~device_agent.config.ReportLimits` (the board's
``config.telemetry.report``); the fleet reads with the defaults.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from device_agent import crypto
from device_agent.config import DEFAULT_CONFIG, ReportLimits
from device_agent.errors import FormatError
from device_agent.wire import (
    ID_RE,
    canonical_json,
    format_time,
    int_field,
    loads_json,
    obj_fields,
    parse_time,
    str_field,
)

SCHEMA = "edgeward.telemetry/1"
DOMAIN = b"edgeward/telemetry/v2"
MAGIC = b"EWT2"
DIGEST_BYTES = 32
NO_PREV = bytes(DIGEST_BYTES)  # the first report, or one whose predecessor the board cannot name
TOPIC_ROOT = "edgeward/v1"
KINDS = ("status", "telemetry", "events", "will")
# The last will is published by the broker on the status topic: the board is gone.
TOPIC_OF_KIND = {"status": "status", "telemetry": "telemetry", "events": "events", "will": "status"}
COMMAND_LEVEL = "commands"
MAX_SEQ = 2**53  # the JSON integer range every reader holds exactly: part of the format
DEFAULT_REPORT_LIMITS = DEFAULT_CONFIG.telemetry.report


def topic(device_id: str, kind: str) -> str:
    """The MQTT topic a report of ``kind`` from ``device_id`` is published on."""
    return f"{TOPIC_ROOT}/{device_id}/{TOPIC_OF_KIND[kind]}"


def command_topic(device_id: str) -> str:
    """The topic a board's signed commands arrive on (boards may read it, never write it)."""
    return f"{TOPIC_ROOT}/{device_id}/{COMMAND_LEVEL}"


def split_topic(name: str) -> tuple[str, str]:
    """``edgeward/v1/<device>/<level>`` -> (device id, level); anything else is malformed."""
    parts = name.split("/")
    if len(parts) != 4 or "/".join(parts[:2]) != TOPIC_ROOT or not ID_RE.match(parts[2]):
        raise FormatError(f"topic {name[:120]!r} is not {TOPIC_ROOT}/<device-id>/<kind>")
    return parts[2], parts[3]


def check_summary(value: Any, depth: int = 0, limits: ReportLimits = DEFAULT_REPORT_LIMITS) -> None:
    """Refuse anything shaped like a raw input (deep nesting, long arrays, long strings, bytes)
    and anything the fleet's JSON reader refuses (NaN and infinities, integers longer than its
    number bound, strings that are not Unicode), so that a board never signs what the monitor
    would have to flag."""
    if depth > limits.max_depth:
        raise FormatError("report data is nested too deeply to be a summary")
    # Leaves of exactly str / int / float / bool / None are checked in line (the same checks the
    # recursive call makes: most of a summary is leaves); anything else takes the recursive call.
    leaf_ok = depth < limits.max_depth
    if isinstance(value, dict | list):
        if isinstance(value, dict):
            for k in value:
                if not isinstance(k, str) or len(k) > limits.max_key_chars:
                    raise FormatError("report data keys must be short strings")
                _unicode(k)
            items: Any = value.values()
        else:
            if len(value) > limits.max_list_items:
                raise FormatError(
                    f"report data has a list of {len(value)} items: reports carry summaries, not inputs"
                )
            items = value
        for v in items:
            t = type(v)
            if leaf_ok and t is str:
                if len(v) > limits.max_string:
                    raise FormatError("report data has an over-long string")
                _unicode(v)
            elif not (leaf_ok and (v is None or t is bool or (t is int and -_INT_BOUND < v < _INT_BOUND)
                                   or (t is float and math.isfinite(v)))):
                check_summary(v, depth + 1, limits)
    elif isinstance(value, str):
        if len(value) > limits.max_string:
            raise FormatError("report data has an over-long string")
        _unicode(value)
    elif isinstance(value, float) and not math.isfinite(value):
        raise FormatError("report data holds NaN or an infinity: JSON readers refuse them")
    elif isinstance(value, int) and not isinstance(value, bool) and not -_INT_BOUND < value < _INT_BOUND:
        raise FormatError("report data holds an integer too long for the fleet's JSON reader")
    elif value is not None and not isinstance(value, bool | int | float):
        raise FormatError(f"report data may not hold {type(value).__name__} values")


# Integers whose text (sign included) fits the fleet's number bound (wire.loads_json).
_INT_BOUND = 10 ** (DEFAULT_CONFIG.documents.max_json_number_chars - 1)


def _unicode(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise FormatError("report data has a string that is not Unicode (a lone surrogate)") from e


@dataclass(frozen=True)
class Report:
    """One verified (or about to be signed) telemetry report; ``limits`` bound its data (and,
    when it is signed, its size) and are not part of it."""

    device_id: str
    seq: int
    kind: str
    time: datetime
    data: dict[str, Any]
    limits: ReportLimits = field(default=DEFAULT_REPORT_LIMITS, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not ID_RE.match(self.device_id):
            raise FormatError("report device id is not a valid id")
        if not 1 <= self.seq < MAX_SEQ:
            raise FormatError("report sequence number is out of range")
        if self.kind not in KINDS:
            raise FormatError(f"report kind must be one of {', '.join(KINDS)}")
        check_summary(self.data, limits=self.limits)

    @property
    def topic(self) -> str:
        return topic(self.device_id, self.kind)

    def body(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "device_id": self.device_id,
            "seq": self.seq,
            "kind": self.kind,
            "time": format_time(self.time),
            "data": self.data,
        }


def encode_report(report: Report, signer: Any, prev: bytes = NO_PREV) -> bytes:
    """Sign ``report`` with the board's identity key, chained to the payload whose
    :func:`payload_digest` is ``prev``; returns the exact bytes to publish."""
    if len(prev) != DIGEST_BYTES:
        raise FormatError(f"prev must be a {DIGEST_BYTES}-byte SHA-256 digest")
    signed = prev + canonical_json(report.body())
    most = report.limits.max_report_bytes
    if len(MAGIC) + crypto.SIGNATURE_BYTES + len(signed) > most:
        raise FormatError(f"report is larger than {most} bytes; send less")
    return MAGIC + crypto.sign(signer, DOMAIN, signed) + signed


def payload_digest(payload: bytes) -> bytes:
    """SHA-256 of one exact payload: what the next report names as ``prev``."""
    return hashlib.sha256(payload).digest()


_SIGNED = len(MAGIC) + crypto.SIGNATURE_BYTES  # where the signed bytes (prev || body) start
_HEAD = _SIGNED + DIGEST_BYTES
_FIELDS = frozenset({"schema", "device_id", "seq", "kind", "time", "data"})


@dataclass(frozen=True)
class Frame:
    """A payload cut at its fixed offsets; nothing in it is parsed or trusted yet."""

    signature: bytes
    prev: bytes
    body: bytes
    signed: bytes  # prev || body: what the signature covers


def frame(payload: bytes, limits: ReportLimits = DEFAULT_REPORT_LIMITS) -> Frame:
    """Cut ``payload`` at its fixed offsets (magic, signature, prev, body); no field is parsed."""
    if len(payload) > limits.max_report_bytes or len(payload) <= _HEAD or payload[: len(MAGIC)] != MAGIC:
        raise FormatError("payload is not an EdgeWard report (bad magic or length)")
    return Frame(payload[len(MAGIC) : _SIGNED], payload[_SIGNED:_HEAD], payload[_HEAD:], payload[_SIGNED:])


def verify_frame(f: Frame, sign_public: bytes) -> None:
    """Raise :class:`BadSignature` unless the frame's signature is ``sign_public``'s over
    ``prev || body``."""
    crypto.verify(sign_public, DOMAIN, f.signed, f.signature)


def parse_report(body: bytes, topic_name: str, limits: ReportLimits = DEFAULT_REPORT_LIMITS) -> Report:
    """The second half of reading a report: parse an authenticated body -- its signature checked
    by :func:`verify_frame`, or its payload vouched for by a later authenticated report's ``prev``
    (the fleet monitor's hash chain). Never call it with anything else. The body must name the
    topic's device and kind."""
    doc = loads_json(body, "report body")
    if not isinstance(doc, dict) or doc.keys() != _FIELDS:
        obj_fields(doc, "report body", set(_FIELDS), set(_FIELDS))  # raises the precise error
    if doc["schema"] != SCHEMA:
        raise FormatError(f"report schema is not {SCHEMA}")
    if not isinstance(doc["data"], dict):
        raise FormatError("report data must be an object")
    report = Report(
        device_id=str_field(doc["device_id"], "device_id", ID_RE),
        seq=int_field(doc["seq"], "seq", 1, MAX_SEQ - 1),
        kind=str_field(doc["kind"], "kind"),
        time=_time(doc["time"]),
        data=doc["data"],
        limits=limits,
    )
    device, level = split_topic(topic_name)
    if device != report.device_id or level != TOPIC_OF_KIND.get(report.kind):
        raise FormatError(f"report from {report.device_id} ({report.kind}) arrived on {topic_name}")
    return report


def _time(value: Any) -> datetime:
    return _parse_time(value) if isinstance(value, str) else parse_time(value, "time")


@functools.lru_cache(maxsize=1024)
def _parse_time(text: str) -> datetime:
    # Reports from one second share their time; datetimes are immutable. Errors are not cached.
    return parse_time(text, "time")

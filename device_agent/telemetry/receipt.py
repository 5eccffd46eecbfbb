"""The fleet's signed receipt: which of a board's reports the fleet has committed to its store.

A broker acknowledges a board's publish before any monitor has it, and mosquitto 2.0 keeps
neither a shared subscription's queue nor what it took since its last autosave across a crash: the
broker's PUBACK is not "the fleet has it". After every commit a monitor publishes one receipt per
board it touched (retained, on ``edgeward/v1/<device>/receipt``), signed with a *receipt key*: a
role of its own in the board's trust anchors, which can clear a board's outbox and nothing else.
The board keeps every report until a receipt covers it (``docs/telemetry.md``, "Receipts").

The monitor writes receipts with :func:`encode_receipt`; the board reads them with
:func:`verify_receipt`, which bounds the length, checks the signature over the exact received
bytes with its own signing domain, then parses the body strictly. Wire format::

    b"EWRCP1" || signer key id (16) || Ed25519 signature (64) || body (canonical JSON, UTF-8)

Body: ``schema``, ``device_id``, ``identity`` (the fingerprint of the board's identity key, so a
receipt for a board since re-enrolled under the same id clears nothing), ``top`` (the highest
sequence number the store holds for the board, 0 for none), ``floor`` (the lowest number the
receipt speaks for: the monitor judges nothing below it as new, so a report below it can never be
stored by sending it again), ``ranges`` (the committed numbers in ``[floor, top]`` as sorted,
disjoint, non-adjacent ``[first, last]`` pairs; the last wills' reserved numbers and dropped
reports are gaps) and ``time``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from device_agent import crypto
from device_agent.config import DEFAULT_CONFIG, TelemetryConfig
from device_agent.errors import BadSignature, FormatError, UnknownPublisher, WrongDevice
from device_agent.telemetry.report import MAX_SEQ, TOPIC_ROOT
from device_agent.wire import (
    FPR_RE,
    ID_RE,
    canonical_json,
    format_time,
    int_field,
    loads_json,
    obj_fields,
    parse_time,
    str_field,
)

RECEIPT_MAGIC = b"EWRCP1"
RECEIPT_DOMAIN = b"edgeward/receipt/v1"
RECEIPT_SCHEMA = "edgeward.receipt/1"
RECEIPT_LEVEL = "receipt"
_HEAD = len(RECEIPT_MAGIC) + crypto.KEY_ID_BYTES + crypto.SIGNATURE_BYTES
_FIELDS = frozenset({"schema", "device_id", "identity", "top", "floor", "ranges", "time"})


def receipt_topic(device_id: str) -> str:
    """Where the fleet publishes (retained) the receipt for ``device_id``."""
    return f"{TOPIC_ROOT}/{device_id}/{RECEIPT_LEVEL}"


@dataclass(frozen=True)
class Receipt:
    """What the fleet's store holds of one board's reports, in the window ``[floor, top]``."""

    device_id: str
    identity: str
    top: int
    floor: int
    ranges: tuple[tuple[int, int], ...]
    time: datetime

    def __post_init__(self) -> None:
        str_field(self.device_id, "receipt device_id", ID_RE)
        str_field(self.identity, "receipt identity", FPR_RE)
        int_field(self.top, "receipt top", 0, MAX_SEQ)
        int_field(self.floor, "receipt floor", 1, self.top + 1)
        last = self.floor - 2  # the previous range's end; a range starts at least 2 after it
        for first, end in self.ranges:
            if not (last + 2 <= first <= end <= self.top):
                raise FormatError(
                    "receipt ranges must be sorted, disjoint, non-adjacent and inside [floor, top]"
                )
            last = end

    def covers(self, seq: int) -> bool:
        """True if report ``seq`` is committed, or below the floor (sending it again cannot help)."""
        return seq < self.floor or any(a <= seq <= b for a, b in self.ranges)

    def body(self) -> dict[str, Any]:
        return {
            "schema": RECEIPT_SCHEMA,
            "device_id": self.device_id,
            "identity": self.identity,
            "top": self.top,
            "floor": self.floor,
            "ranges": [list(r) for r in self.ranges],
            "time": format_time(self.time),
        }

    @classmethod
    def from_json(cls, raw: Any, max_ranges: int) -> Receipt:
        d = obj_fields(raw, "receipt", set(_FIELDS), set(_FIELDS))
        if d["schema"] != RECEIPT_SCHEMA:
            raise FormatError(f"receipt schema is not {RECEIPT_SCHEMA}")
        ranges = d["ranges"]
        if not isinstance(ranges, list) or len(ranges) > max_ranges:
            raise FormatError(f"receipt ranges must be a list of at most {max_ranges}")
        pairs = []
        for r in ranges:
            if not isinstance(r, list) or len(r) != 2:
                raise FormatError("a receipt range is a [first, last] pair")
            pairs.append((int_field(r[0], "range first", 1, MAX_SEQ), int_field(r[1], "range last", 1, MAX_SEQ)))
        top = int_field(d["top"], "receipt top", 0, MAX_SEQ)
        return cls(
            device_id=str_field(d["device_id"], "receipt device_id", ID_RE),
            identity=str_field(d["identity"], "receipt identity", FPR_RE),
            top=top,
            floor=int_field(d["floor"], "receipt floor", 1, top + 1),
            ranges=tuple(pairs),
            time=parse_time(d["time"], "receipt time"),
        )

    @classmethod
    def of_seqs(
        cls,
        device_id: str,
        identity: str,
        top: int,
        window: int,
        seqs: Iterable[int],
        time: datetime,
        max_ranges: int = DEFAULT_CONFIG.telemetry.max_receipt_ranges,
    ) -> Receipt:
        """The receipt for the stored sequence numbers ``seqs`` of a board whose highest is
        ``top``, speaking for the last ``window`` numbers (the monitor's redelivery window).

        A window of ``n`` numbers holds at most ``(n + 1) // 2`` ranges, and the board's
        ``max_receipt_ranges`` is set so that the monitor's whole window always fits: every
        committed report in it is covered, whatever the gaps (command results, last wills'
        reserved numbers, dropped reports). Should a window hold more than ``max_ranges`` ranges
        all the same, the *oldest* are kept: the board's oldest committed reports are the ones
        that hold back its ``max_unreceipted`` span, so covering them lets it move on, and a
        newer report left out is sent again and judged a duplicate. (Keeping the newest would
        leave the board's oldest report uncovered for ever: the floor stays below it, since the
        board sends no number ``max_unreceipted`` or more past its oldest.)"""
        floor = max(1, top - window + 1)
        ranges: list[list[int]] = []
        for s in sorted(set(seqs)):
            if not floor <= s <= top:
                continue
            if ranges and s == ranges[-1][1] + 1:
                ranges[-1][1] = s
            else:
                ranges.append([s, s])
        kept = tuple((a, b) for a, b in ranges[:max_ranges])
        return cls(device_id, identity, top, floor, kept, time)


def encode_receipt(receipt: Receipt, signer: crypto.SigningKey, signer_public: bytes) -> bytes:
    """Sign ``receipt`` with a receipt key; the exact bytes to publish."""
    data = canonical_json(receipt.body())
    return RECEIPT_MAGIC + crypto.key_id(signer_public) + crypto.sign(signer, RECEIPT_DOMAIN, data) + data


def verify_receipt(
    payload: bytes,
    trusted: Iterable[bytes] | Mapping[bytes, bytes],
    device_id: str,
    identity: str,
    limits: TelemetryConfig = DEFAULT_CONFIG.telemetry,
) -> Receipt:
    """Verify, then parse, a receipt for this board (``device_id``, identity-key fingerprint
    ``identity``) signed by one of the ``trusted`` receipt keys. Raises a :class:`FormatError` or
    a :class:`~device_agent.errors.SecurityRefusal` naming what was wrong; returns only a receipt
    that verified and names this board."""
    if len(payload) > limits.max_receipt_bytes:
        raise FormatError(f"receipt is larger than {limits.max_receipt_bytes} bytes")
    if len(payload) <= _HEAD or payload[: len(RECEIPT_MAGIC)] != RECEIPT_MAGIC:
        raise FormatError("not an EdgeWard receipt (bad magic or truncated)")
    kid = payload[len(RECEIPT_MAGIC) : len(RECEIPT_MAGIC) + crypto.KEY_ID_BYTES]
    keys = crypto.keys_by_id(trusted)
    signer = keys.get(kid)
    if signer is None:
        raise UnknownPublisher(
            f"receipt is signed by key id {kid.hex()}, which this board does not trust as a receipt key; "
            "give the board the monitor's receipt key (provision --receipt-pub, or rotate-key --role receipt)"
        )
    body = payload[_HEAD:]
    try:
        crypto.verify(signer, RECEIPT_DOMAIN, body, payload[len(RECEIPT_MAGIC) + crypto.KEY_ID_BYTES : _HEAD])
    except BadSignature as e:
        raise BadSignature(
            f"receipt signature does not verify against receipt key {crypto.fingerprint(signer)}: "
            "it was altered or forged"
        ) from e
    receipt = Receipt.from_json(loads_json(body, "receipt body"), limits.max_receipt_ranges)
    if not crypto.constant_time_equal(receipt.device_id, device_id):
        raise WrongDevice(f"receipt is for device {receipt.device_id!r}, this board is {device_id!r}")
    if not crypto.constant_time_equal(receipt.identity, identity):
        raise WrongDevice(
            f"receipt names identity key {receipt.identity[:19]}..., not this board's {identity[:19]}...: "
            "it was made for an earlier enrolment of this device id"
        )
    return receipt

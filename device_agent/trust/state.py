"""The board's trusted state as values: its identity, its trust anchors and what it has installed.

Pure data with strict JSON forms; reading and writing the files (sealed, see
:mod:`device_agent.trust.sealed`) is the data directory's job (:mod:`device_agent.store`).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from device_agent import crypto
from device_agent.config import DEFAULT_CONFIG
from device_agent.errors import FormatError
from device_agent.wire import (
    FPR_RE,
    HEX32_RE,
    HEX64_RE,
    ID_RE,
    MAX_VERSION,
    format_time,
    int_field,
    obj_fields,
    parse_time,
    str_field,
)

STATE_SCHEMA = "edgeward.state/2"
STATE_SCHEMA_V1 = "edgeward.state/1"  # release 0.1: unsealed, no bundle digests
TRUST_SCHEMA = "edgeward.trust/2"
TRUST_SCHEMA_V1 = "edgeward.trust/1"
TOKENS_SCHEMA = "edgeward.tokens/2"  # the body of tokens.json (device_agent.service.tokens)
TOKENS_SCHEMA_V1 = "edgeward.tokens/1"


@dataclass(frozen=True)
class Identity:
    """The public half of the board's identity (its private keys never leave the key store)."""

    device_id: str
    box_public: bytes
    sign_public: bytes

    @property
    def box_fingerprint(self) -> str:
        return crypto.fingerprint(self.box_public)


@dataclass(frozen=True)
class InstalledRecord:
    """One installed bundle as the board accepted it; ``sha256`` is the digest of the stored file."""

    bundle_id: str
    model_version: int
    installed_at: datetime
    size: int
    sha256: str

    FIELDS = frozenset({"bundle_id", "model_version", "installed_at", "size", "sha256"})

    def to_json(self) -> dict[str, Any]:
        return {
            "bundle_id": self.bundle_id,
            "model_version": self.model_version,
            "installed_at": format_time(self.installed_at),
            "size": self.size,
            "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, raw: Any) -> InstalledRecord:
        r = obj_fields(raw, "installed record", set(cls.FIELDS), set(cls.FIELDS))
        return cls(
            bundle_id=str_field(r["bundle_id"], "bundle_id", HEX32_RE),
            model_version=int_field(r["model_version"], "model_version", 1, MAX_VERSION),
            installed_at=parse_time(r["installed_at"], "installed_at"),
            size=int_field(r["size"], "size", 0, 2**63),
            sha256=str_field(r["sha256"], "sha256", HEX64_RE),
        )


@dataclass(frozen=True)
class ModelSlot:
    current: InstalledRecord | None
    previous: InstalledRecord | None
    highest_version: int
    # The fingerprint of the publisher key that owns this model id: the one that first installed
    # it (None: not bound yet, as after an upgrade from release 0.1).
    publisher: str | None = None


@dataclass(frozen=True)
class Retired:
    """A model retired by a signed command or its end of life: it is never installed again."""

    at: datetime
    by: str  # "command #<seq>" or "end of life"


_STATE_FIELDS = {"schema", "clock_floor", "models", "command_seq", "retired", "rollback_permits", "held_beacon"}


@dataclass(frozen=True)
class State:
    """Installed models, the highest version ever accepted per model, the clock floor, and what
    signed commands have done: the highest command sequence number applied, retired models,
    signed permits to install one lower version, and a time beacon held for confirmation."""

    clock_floor: datetime | None
    models: dict[str, ModelSlot] = field(default_factory=dict)
    command_seq: int = 0
    retired: dict[str, Retired] = field(default_factory=dict)
    rollback_permits: dict[str, int] = field(default_factory=dict)
    held_beacon: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": STATE_SCHEMA,
            "clock_floor": format_time(self.clock_floor) if self.clock_floor else None,
            "command_seq": self.command_seq,
            "retired": {m: {"at": format_time(r.at), "by": r.by} for m, r in sorted(self.retired.items())},
            "rollback_permits": dict(sorted(self.rollback_permits.items())),
            "held_beacon": format_time(self.held_beacon) if self.held_beacon else None,
            "models": {
                mid: {
                    "current": s.current.to_json() if s.current else None,
                    "previous": s.previous.to_json() if s.previous else None,
                    "highest_version": s.highest_version,
                    "publisher": s.publisher,
                }
                for mid, s in sorted(self.models.items())
            },
        }

    @classmethod
    def from_json(cls, raw: Any) -> State:
        doc = obj_fields(raw, "state", _STATE_FIELDS, _STATE_FIELDS)
        if doc["schema"] != STATE_SCHEMA:
            raise FormatError(f"state is {str(doc['schema'])[:40]!r}, not {STATE_SCHEMA}")
        if not isinstance(doc["models"], dict):
            raise FormatError("state models must be an object")
        models = {}
        for mid, raw_slot in doc["models"].items():
            str_field(mid, "model id", ID_RE)
            slot_fields = {"current", "previous", "highest_version", "publisher"}
            s = obj_fields(raw_slot, f"state of model {mid}", slot_fields, slot_fields)
            models[mid] = ModelSlot(
                current=InstalledRecord.from_json(s["current"]) if s["current"] is not None else None,
                previous=InstalledRecord.from_json(s["previous"]) if s["previous"] is not None else None,
                highest_version=int_field(s["highest_version"], "highest_version", 1, MAX_VERSION),
                publisher=str_field(s["publisher"], "publisher", FPR_RE) if s["publisher"] is not None else None,
            )
        floor, held = doc["clock_floor"], doc["held_beacon"]
        if not isinstance(doc["retired"], dict) or not isinstance(doc["rollback_permits"], dict):
            raise FormatError("state retired and rollback_permits must be objects")
        retired = {}
        for mid, r in doc["retired"].items():
            str_field(mid, "model id", ID_RE)
            r = obj_fields(r, f"retirement of {mid}", {"at", "by"}, {"at", "by"})
            retired[mid] = Retired(parse_time(r["at"], "retired at"), str_field(r["by"], "retired by", limit=64))
        permits = {
            str_field(mid, "model id", ID_RE): int_field(v, "rollback permit", 1, MAX_VERSION)
            for mid, v in doc["rollback_permits"].items()
        }
        return cls(
            clock_floor=parse_time(floor, "clock_floor") if floor is not None else None,
            models=models,
            command_seq=int_field(doc["command_seq"], "command_seq", 0, MAX_VERSION),
            retired=retired,
            rollback_permits=permits,
            held_beacon=parse_time(held, "held_beacon") if held is not None else None,
        )

    @classmethod
    def from_v1(cls, raw: Any, digests: dict[str, str]) -> State:
        """Upgrade release 0.1's state: the same records, with the digest of each stored bundle
        (``digests``: bundle id -> SHA-256 of the file, taken once at the upgrade)."""
        if not isinstance(raw, dict) or raw.get("schema") != STATE_SCHEMA_V1:
            raise FormatError(f"state.json is not {STATE_SCHEMA_V1}")

        def record(r: Any) -> InstalledRecord | None:
            if not r:
                return None
            bundle_id = str_field(r.get("bundle_id"), "bundle_id", HEX32_RE)
            if bundle_id not in digests:
                raise FormatError(f"state.json names bundle {bundle_id}, which is not stored on the board")
            return InstalledRecord.from_json(
                {k: r.get(k) for k in ("bundle_id", "model_version", "installed_at", "size")}
                | {"sha256": digests[bundle_id]}
            )

        models = {}
        for mid, s in dict(raw.get("models") or {}).items():
            str_field(mid, "model id", ID_RE)
            models[mid] = ModelSlot(
                current=record(s.get("current")),
                previous=record(s.get("previous")),
                highest_version=int_field(s.get("highest_version"), "highest_version", 1, MAX_VERSION),
            )
        floor = raw.get("clock_floor")
        return cls(clock_floor=parse_time(floor, "clock_floor") if floor else None, models=models)

    @staticmethod
    def v1_bundle_ids(raw: Any) -> set[str]:
        """The bundle ids a release 0.1 state names (to digest their files before upgrading)."""
        ids = set()
        for s in dict(raw.get("models") or {}).values() if isinstance(raw, dict) else ():
            for r in (s.get("current"), s.get("previous")):
                if r:
                    ids.add(str_field(r.get("bundle_id"), "bundle_id", HEX32_RE))
        return ids

    def referenced_bundles(self) -> set[str]:
        return {r.bundle_id for s in self.models.values() for r in (s.current, s.previous) if r is not None}

    def with_slot(self, model_id: str, slot: ModelSlot) -> State:
        return replace(self, models={**self.models, model_id: slot})


@dataclass(frozen=True)
class TrustAnchors:
    """The keys the board trusts: publishers sign bundles, operators sign commands and time
    beacons, recovery keys (kept offline) sign only the rotation of the operator keys, and
    receipt keys (a monitor's) sign only receipts, which let reports leave the board's outbox
    (``docs/telemetry.md``, "Receipts"; none: the outbox drains on the broker's acknowledgement)."""

    publishers: tuple[bytes, ...]
    operators: tuple[bytes, ...] = ()
    recovery: tuple[bytes, ...] = ()
    receipts: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        most = DEFAULT_CONFIG.bundle.max_trusted_publishers  # the verifier tries no more than this
        for kind, keys in (("publisher", self.publishers), ("operator", self.operators), ("recovery", self.recovery),
                           ("receipt", self.receipts)):
            if len(keys) > most:
                raise FormatError(f"at most {most} {kind} keys can be trusted")
            if any(len(k) != crypto.KEY_BYTES for k in keys):
                raise FormatError(f"a {kind} key is not a 32-byte Ed25519 public key")

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": TRUST_SCHEMA,
            "publishers": [base64.b64encode(k).decode() for k in self.publishers],
            "operators": [base64.b64encode(k).decode() for k in self.operators],
            "recovery": [base64.b64encode(k).decode() for k in self.recovery],
        } | (
            # Written only when set: the anchors of a board without receipt keys read as before.
            {"receipts": [base64.b64encode(k).decode() for k in self.receipts]} if self.receipts else {}
        )

    @classmethod
    def from_json(cls, raw: Any, schema: str = TRUST_SCHEMA) -> TrustAnchors:
        known = {"schema", "publishers", "operators", "recovery", "receipts"}
        doc = obj_fields(raw, "trust anchors", known, {"schema", "publishers"})
        if doc["schema"] != schema:
            raise FormatError(f"trust anchors are {str(doc['schema'])[:40]!r}, not {schema}")

        def keys(value: Any, what: str) -> tuple[bytes, ...]:
            most = DEFAULT_CONFIG.bundle.max_trusted_publishers
            if not isinstance(value, list) or len(value) > most:
                raise FormatError(f"{what} keys must be a list of at most {most}")
            try:
                return tuple(base64.b64decode(str_field(k, f"{what} key", limit=64), validate=True) for k in value)
            except ValueError as e:
                raise FormatError(f"a {what} key is not base64") from e

        return cls(
            keys(doc["publishers"], "publisher"),
            keys(doc.get("operators", []), "operator"),
            keys(doc.get("recovery", []), "recovery"),
            keys(doc.get("receipts", []), "receipt"),
        )

"""Signed remote commands, time beacons and command results: the one definition of their bytes.

The fleet writes commands and beacons with :func:`encode_command` and :func:`encode_beacon`;
the board reads them with :func:`verify_command` and :func:`verify_beacon`, which check the
signature over the exact received bytes before a single field is parsed (invariant 1). The
board answers with a result signed by its identity key (:func:`encode_result`), which the fleet
reads with :func:`verify_result`. ``docs/commands.md`` is the specification.

Wire formats (every body is canonical JSON, UTF-8)::

    command  b"EWCMD1" || signer key id (16) || Ed25519 signature (64) || body
    beacon   b"EWTIM1" || signer key id (16) || Ed25519 signature (64) || body
    result   b"EWRES1" || Ed25519 signature (64, the board's identity key) || body
    queue    b"EWCQ1\\n" || count (u16) || count x (length (u32) || a command or a beacon)

A queue is not signed: every item in it is.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from device_agent import crypto
from device_agent.config import DEFAULT_CONFIG, CommandLimits
from device_agent.errors import BadSignature, FormatError, UnknownPublisher
from device_agent.wire import (
    HEX32_RE,
    HEX64_RE,
    ID_RE,
    MAX_VERSION,
    canonical_json,
    format_time,
    int_field,
    loads_json,
    obj_fields,
    parse_time,
    str_field,
)

COMMAND_MAGIC = b"EWCMD1"
BEACON_MAGIC = b"EWTIM1"
RESULT_MAGIC = b"EWRES1"
QUEUE_MAGIC = b"EWCQ1\n"
COMMAND_DOMAIN = b"edgeward/command/v1"
BEACON_DOMAIN = b"edgeward/time-beacon/v1"
RESULT_DOMAIN = b"edgeward/command-result/v1"
COMMAND_SCHEMA = "edgeward.command/1"
BEACON_SCHEMA = "edgeward.time-beacon/1"
RESULT_SCHEMA = "edgeward.command-result/1"
KINDS = ("decommission", "retire", "rollback", "rotate-key", "cancel", "update")
ROLES = ("publisher", "operator", "receipt")  # the anchors rotate-key may replace
OUTCOMES = ("applied", "refused", "cancelled")
_SIGNED_HEAD = len(COMMAND_MAGIC) + crypto.KEY_ID_BYTES + crypto.SIGNATURE_BYTES
RESULTS_LEVEL = "results"  # a board publishes its signed results on edgeward/v1/<device>/results
TIME_TOPIC = "edgeward/v1/_time"  # the fleet's retained time beacon (no device id starts with "_")


def results_topic(device_id: str) -> str:
    from device_agent.telemetry.report import TOPIC_ROOT

    return f"{TOPIC_ROOT}/{device_id}/{RESULTS_LEVEL}"


def _b64_key(value: Any, what: str) -> bytes:
    import base64

    try:
        key = base64.b64decode(str_field(value, what, limit=64), validate=True)
    except ValueError as e:
        raise FormatError(f"{what} is not base64") from e
    if len(key) != crypto.KEY_BYTES:
        raise FormatError(f"{what} is not a 32-byte Ed25519 public key")
    return key


_URL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~:/?#[]@!$&'()*+,;=%")


def https_url(value: Any, what: str, limits: CommandLimits = DEFAULT_CONFIG.commands) -> str:
    """An absolute ``https://`` address without credentials or fragment, in plain ASCII: what a
    board fetches an update from. The address is the operator's (signed); the server behind it
    is trusted for nothing (the bytes are checked against the signed length and digest)."""
    from urllib.parse import urlsplit

    url = str_field(value, what, limit=limits.max_update_url_chars)
    if not set(url) <= _URL_CHARS:
        raise FormatError(f"{what} must be plain ASCII without spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise FormatError(f"{what} is not a valid URL: {e}") from e
    if parts.scheme != "https":
        raise FormatError(f"{what} must be an https:// address (boards fetch updates over TLS only)")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise FormatError(f"{what} must name a host and carry no user name or password")
    if parts.fragment or "#" in url:
        raise FormatError(f"{what} must not carry a fragment")
    if port == 0:
        raise FormatError(f"{what} names port 0")
    if not parts.path.startswith("/"):
        raise FormatError(f"{what} must name a file on the server (a path after the host)")
    return url


def _artifact(raw: Any, what: str, limits: CommandLimits) -> dict[str, Any]:
    """One file an update downloads: its address, exact length and SHA-256, all signed."""
    a = obj_fields(raw, what, {"url", "length", "sha256"}, {"url", "length", "sha256"})
    return {
        "url": https_url(a["url"], f"{what} url", limits),
        "length": int_field(a["length"], f"{what} length", 1, limits.max_update_bytes),
        "sha256": str_field(a["sha256"], f"{what} sha256", HEX64_RE),
    }


UPDATE_FIELDS = {"release_id", "model_id", "model_version", "bundle", "payload"}


def update_args(raw: Any, limits: CommandLimits = DEFAULT_CONFIG.commands) -> dict[str, Any]:
    """The arguments of an ``update``: the release, the model and version it brings, the file to
    fetch (a version 1 bundle, or a version 2 envelope) and, for the shared layout, the payload."""
    a = obj_fields(raw, "update arguments", UPDATE_FIELDS, UPDATE_FIELDS - {"payload"})
    out = {
        "release_id": str_field(a["release_id"], "release_id", ID_RE),
        "model_id": str_field(a["model_id"], "model_id", ID_RE),
        "model_version": int_field(a["model_version"], "model_version", 1, MAX_VERSION),
        "bundle": _artifact(a["bundle"], "bundle", limits),
    }
    if "payload" in a:
        out["payload"] = _artifact(a["payload"], "payload", limits)
    return out


def _args(kind: str, raw: Any, limits: CommandLimits) -> dict[str, Any]:
    """The arguments of one kind of command, strictly: known fields only, each in range."""
    if kind == "decommission":
        obj_fields(raw, "decommission arguments", set(), set())
        return {}
    if kind == "retire":
        a = obj_fields(raw, "retire arguments", {"model_id"}, {"model_id"})
        return {"model_id": str_field(a["model_id"], "model_id", ID_RE)}
    if kind == "rollback":
        a = obj_fields(raw, "rollback arguments", {"model_id", "to_version", "local_version"},
                       {"model_id", "to_version"})
        out = {
            "model_id": str_field(a["model_id"], "model_id", ID_RE),
            "to_version": int_field(a["to_version"], "to_version", 1, MAX_VERSION),
        }
        if "local_version" in a:  # a local learnt version of that bundle version (0: the publisher's head)
            out["local_version"] = int_field(a["local_version"], "local_version", 0, MAX_VERSION)
        return out
    if kind == "rotate-key":
        a = obj_fields(raw, "rotate-key arguments", {"role", "keys"}, {"role", "keys"})
        if a["role"] not in ROLES:
            raise FormatError(f"rotate-key role must be one of {', '.join(ROLES)}")
        keys = a["keys"]
        if not isinstance(keys, list) or not 1 <= len(keys) <= limits.max_anchors:
            raise FormatError(f"rotate-key keys must list 1 to {limits.max_anchors} public keys")
        import base64

        return {"role": a["role"], "keys": [base64.b64encode(_b64_key(k, "rotate-key key")).decode() for k in keys]}
    if kind == "cancel":
        a = obj_fields(raw, "cancel arguments", {"seq"}, {"seq"})
        return {"seq": int_field(a["seq"], "cancelled seq", 1, MAX_VERSION)}
    if kind == "update":
        return update_args(raw, limits)
    raise FormatError(f"command kind must be one of {', '.join(KINDS)}")


@dataclass(frozen=True)
class Command:
    """One signed order for one board."""

    kind: str
    device_id: str
    seq: int
    issued: datetime
    expires: datetime
    args: dict[str, Any] = field(default_factory=dict)
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))

    FIELDS = frozenset({"schema", "kind", "device_id", "seq", "issued", "expires", "nonce", "args"})

    def __post_init__(self) -> None:
        str_field(self.device_id, "device_id", ID_RE)
        int_field(self.seq, "seq", 1, MAX_VERSION)
        str_field(self.nonce, "nonce", HEX32_RE)
        if self.expires <= self.issued:
            raise FormatError("a command must expire after it is issued")
        object.__setattr__(self, "args", _args(self.kind, self.args, DEFAULT_CONFIG.commands))

    def body(self) -> dict[str, Any]:
        return {
            "schema": COMMAND_SCHEMA,
            "kind": self.kind,
            "device_id": self.device_id,
            "seq": self.seq,
            "issued": format_time(self.issued),
            "expires": format_time(self.expires),
            "nonce": self.nonce,
            "args": self.args,
        }

    @classmethod
    def from_json(cls, raw: Any, limits: CommandLimits) -> Command:
        d = obj_fields(raw, "command", set(cls.FIELDS), set(cls.FIELDS))
        if d["schema"] != COMMAND_SCHEMA:
            raise FormatError(f"command schema is not {COMMAND_SCHEMA}")
        kind = str_field(d["kind"], "kind", limit=32)
        return cls(
            kind=kind,
            device_id=str_field(d["device_id"], "device_id", ID_RE),
            seq=int_field(d["seq"], "seq", 1, MAX_VERSION),
            issued=parse_time(d["issued"], "issued"),
            expires=parse_time(d["expires"], "expires"),
            args=_args(kind, d["args"], limits),
            nonce=str_field(d["nonce"], "nonce", HEX32_RE),
        )

    def describe(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.args.items() if k not in ("keys", "bundle", "payload"))
        return f"{self.kind} #{self.seq} for {self.device_id}" + (f" ({extra})" if extra else "")


@dataclass(frozen=True)
class Beacon:
    """A signed statement of the fleet's time: the only way the board's clock floor moves
    between installs and commands."""

    time: datetime
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))

    def body(self) -> dict[str, Any]:
        return {"schema": BEACON_SCHEMA, "time": format_time(self.time), "nonce": self.nonce}

    @classmethod
    def from_json(cls, raw: Any) -> Beacon:
        d = obj_fields(raw, "time beacon", {"schema", "time", "nonce"}, {"schema", "time", "nonce"})
        if d["schema"] != BEACON_SCHEMA:
            raise FormatError(f"time beacon schema is not {BEACON_SCHEMA}")
        return cls(parse_time(d["time"], "time"), str_field(d["nonce"], "nonce", HEX32_RE))


@dataclass(frozen=True)
class Signed:
    """A verified command or beacon, the key that signed it and the digest of its exact bytes."""

    item: Command | Beacon
    signer: bytes
    sha256: str


def _encode(magic: bytes, domain: bytes, body: dict[str, Any], signer: Any, signer_public: bytes) -> bytes:
    data = canonical_json(body)
    return magic + crypto.key_id(signer_public) + crypto.sign(signer, domain, data) + data


def encode_command(cmd: Command, signer: Any, signer_public: bytes) -> bytes:
    """Sign ``cmd`` with an operator (or recovery) key; returns the exact bytes to deliver."""
    return _encode(COMMAND_MAGIC, COMMAND_DOMAIN, cmd.body(), signer, signer_public)


def encode_beacon(beacon: Beacon, signer: Any, signer_public: bytes) -> bytes:
    return _encode(BEACON_MAGIC, BEACON_DOMAIN, beacon.body(), signer, signer_public)


def verify_signed(
    payload: bytes, trusted: Mapping[bytes, bytes] | list[bytes], limits: CommandLimits = DEFAULT_CONFIG.commands
) -> Signed:
    """Verify then parse a command or a beacon signed by one of the ``trusted`` keys (operator
    and recovery anchors). Nothing is parsed before the signature over the exact bytes checks."""
    if len(payload) > limits.max_command_bytes:
        raise FormatError(f"command is larger than {limits.max_command_bytes} bytes")
    if len(payload) <= _SIGNED_HEAD:
        raise FormatError("command is truncated")
    magic = payload[: len(COMMAND_MAGIC)]
    if magic not in (COMMAND_MAGIC, BEACON_MAGIC):
        raise FormatError("not an EdgeWard command or time beacon (bad magic)")
    kid = payload[len(COMMAND_MAGIC) : len(COMMAND_MAGIC) + crypto.KEY_ID_BYTES]
    keys = crypto.keys_by_id(trusted)
    signer = keys.get(kid)
    if signer is None:
        raise UnknownPublisher(
            f"command is signed by key id {kid.hex()}, which this board does not trust as an operator; "
            "sign with an operator key the board was provisioned with"
        )
    signature = payload[len(COMMAND_MAGIC) + crypto.KEY_ID_BYTES : _SIGNED_HEAD]
    body = payload[_SIGNED_HEAD:]
    domain = COMMAND_DOMAIN if magic == COMMAND_MAGIC else BEACON_DOMAIN
    try:
        crypto.verify(signer, domain, body, signature)
    except BadSignature as e:
        raise BadSignature(
            f"command signature does not verify against operator key {crypto.fingerprint(signer)}: "
            "it was altered or forged"
        ) from e
    doc = loads_json(body, "command body")  # verified: from here the bytes are the operator's
    item: Command | Beacon = Command.from_json(doc, limits) if magic == COMMAND_MAGIC else Beacon.from_json(doc)
    return Signed(item, signer, crypto.sha256_hex(payload))


# --- queues -----------------------------------------------------------------------------------------


def encode_queue(items: list[bytes], limits: CommandLimits = DEFAULT_CONFIG.commands) -> bytes:
    """One retained message holding every pending command (and a beacon) for one board, so that
    a board offline for a while receives all of them, none overwriting another."""
    if len(items) > limits.max_queue_items:
        raise FormatError(f"a command queue holds at most {limits.max_queue_items} items")
    out = bytearray(QUEUE_MAGIC + struct.pack(">H", len(items)))
    for item in items:
        out += struct.pack(">I", len(item)) + item
    if len(out) > limits.max_queue_bytes:
        raise FormatError(f"the command queue is larger than {limits.max_queue_bytes} bytes")
    return bytes(out)


def decode_queue(payload: bytes, limits: CommandLimits = DEFAULT_CONFIG.commands) -> list[bytes]:
    """The items of a queue (still unverified), every length bounded before it is read. A lone
    command or beacon is a queue of one."""
    if payload[: len(COMMAND_MAGIC)] in (COMMAND_MAGIC, BEACON_MAGIC):
        return [payload]
    if len(payload) > limits.max_queue_bytes:
        raise FormatError(f"the command queue is larger than {limits.max_queue_bytes} bytes")
    head = len(QUEUE_MAGIC) + 2
    if len(payload) < head or payload[: len(QUEUE_MAGIC)] != QUEUE_MAGIC:
        raise FormatError("not an EdgeWard command queue (bad magic)")
    (count,) = struct.unpack_from(">H", payload, len(QUEUE_MAGIC))
    if count > limits.max_queue_items:
        raise FormatError(f"a command queue holds at most {limits.max_queue_items} items")
    items, at = [], head
    for _ in range(count):
        if at + 4 > len(payload):
            raise FormatError("the command queue is truncated")
        (n,) = struct.unpack_from(">I", payload, at)
        at += 4
        if n > limits.max_command_bytes or at + n > len(payload):
            raise FormatError("a command in the queue is oversized or truncated")
        items.append(payload[at : at + n])
        at += n
    if at != len(payload):
        raise FormatError("the command queue has trailing bytes")
    return items


# --- results ----------------------------------------------------------------------------------------

_RESULT_FIELDS = frozenset(
    {"schema", "device_id", "seq", "kind", "command_sha256", "outcome", "detail", "time", "effects"}
)


@dataclass(frozen=True)
class Result:
    """The board's signed answer to one command: what it did, and the evidence."""

    device_id: str
    seq: int
    kind: str
    command_sha256: str
    outcome: str
    detail: str
    time: datetime
    effects: dict[str, Any] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {
            "schema": RESULT_SCHEMA,
            "device_id": self.device_id,
            "seq": self.seq,
            "kind": self.kind,
            "command_sha256": self.command_sha256,
            "outcome": self.outcome,
            "detail": self.detail,
            "time": format_time(self.time),
            "effects": self.effects,
        }

    @classmethod
    def from_json(cls, raw: Any) -> Result:
        d = obj_fields(raw, "command result", set(_RESULT_FIELDS), set(_RESULT_FIELDS))
        if d["schema"] != RESULT_SCHEMA:
            raise FormatError(f"command result schema is not {RESULT_SCHEMA}")
        if d["outcome"] not in OUTCOMES:
            raise FormatError(f"command result outcome must be one of {', '.join(OUTCOMES)}")
        if not isinstance(d["effects"], dict):
            raise FormatError("command result effects must be an object")
        return cls(
            device_id=str_field(d["device_id"], "device_id", ID_RE),
            seq=int_field(d["seq"], "seq", 0, MAX_VERSION),
            kind=str_field(d["kind"], "kind", limit=32),
            command_sha256=str_field(d["command_sha256"], "command_sha256", HEX64_RE),
            outcome=d["outcome"],
            detail=str_field(d["detail"], "detail", limit=512) if d["detail"] else "",
            time=parse_time(d["time"], "time"),
            effects=d["effects"],
        )


def encode_result(result: Result, signer: Any) -> bytes:
    """Sign a result with the board's identity key."""
    data = canonical_json(result.body())
    return RESULT_MAGIC + crypto.sign(signer, RESULT_DOMAIN, data) + data


def verify_result(payload: bytes, sign_public: bytes, limits: CommandLimits = DEFAULT_CONFIG.commands) -> Result:
    """Verify then parse a result against the board's enrolled identity key."""
    head = len(RESULT_MAGIC) + crypto.SIGNATURE_BYTES
    if len(payload) > limits.max_result_bytes or len(payload) <= head or payload[: len(RESULT_MAGIC)] != RESULT_MAGIC:
        raise FormatError("not an EdgeWard command result (bad magic or length)")
    try:
        crypto.verify(sign_public, RESULT_DOMAIN, payload[head:], payload[len(RESULT_MAGIC) : head])
    except BadSignature as e:
        raise BadSignature("command result signature does not verify against the board's identity key") from e
    return Result.from_json(loads_json(payload[head:], "command result"))

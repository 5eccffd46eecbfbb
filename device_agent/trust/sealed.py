"""The board's own trusted files, authenticated with a key only the unlocked device keys give.

A sealed file is one header line and the body's exact bytes::

    EWSEAL1 <HMAC-SHA256 hex over (file name, body)>\\n
    <body: JSON>

The MAC is checked over the exact bytes before the body is parsed, and it binds the file's
name, so a valid ``tokens.json`` cannot stand in for ``state.json``. Anyone who can write the
SD card but does not hold the device keys cannot edit a sealed file or plant a new one. What a
MAC cannot stop is putting back a whole older copy made by the agent itself (docs/threat-model.md).
"""

from __future__ import annotations

import json
from typing import Any

from device_agent import crypto
from device_agent.errors import TamperedState
from device_agent.wire import loads_json

MAGIC = b"EWSEAL1 "
DOMAIN = b"edgeward/board-file/v1"
PURPOSE = b"edgeward/board-files/v1"  # HKDF purpose of the sealing key, from the board secret
_HEAD = len(MAGIC) + 64 + 1


def sealing_key(board_secret: bytes | bytearray) -> bytearray:
    """The key that seals the board's trusted files, derived from the board secret."""
    return crypto.derive_key(board_secret, PURPOSE)


def _message(name: str, body: bytes | memoryview) -> bytes:
    return name.encode() + b"\0" + bytes(body)


def seal(key: bytes | bytearray, name: str, doc: Any) -> bytes:
    """The sealed bytes of ``doc`` stored under file ``name``."""
    body = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
    tag = crypto.mac(key, DOMAIN, _message(name, body))
    return MAGIC + tag.hex().encode() + b"\n" + body


def is_sealed(data: bytes) -> bool:
    return data.startswith(MAGIC)


def unseal(key: bytes | bytearray, name: str, data: bytes) -> Any:
    """The document in a sealed file, after its MAC checked; :class:`TamperedState` otherwise."""
    refusal = TamperedState(
        f"{name} fails its authentication check: it was edited or replaced outside the agent. "
        "Nothing was changed; restore the data dir from a trusted copy or re-provision the board"
    )
    if not is_sealed(data) or len(data) < _HEAD or data[_HEAD - 1 : _HEAD] != b"\n":
        raise refusal
    try:
        tag = bytes.fromhex(data[len(MAGIC) : _HEAD - 1].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise refusal from None
    body = memoryview(data)[_HEAD:]
    if not crypto.mac_ok(key, DOMAIN, _message(name, body), tag):
        raise refusal
    return loads_json(body, name)

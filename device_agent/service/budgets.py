"""``budgets.json``: the daily budgets, kept across agent restarts and reboots.

The file (``DataDir.budgets_file``, mode 0600, replaced atomically; not sealed: it is no trusted
state, see "Edited offline" below)::

    {"schema": "edgeward.budgets/1",
     "boot_id": "<the kernel's boot id when it was written, or null>",
     "boottime": <CLOCK_BOOTTIME seconds when it was written>,
     "lockout": <seconds left during which every client is refused; 0 for none>,
     "clients": {"<token id>": [<rows counted as spent>, <seconds left in its window>], ...}}

**Loading.** Each window continues from what the file says, counted down by the boottime that
has passed since it was written. That is known only within one boot: the same ``boot_id`` and a
boottime not below the saved one. Otherwise (a reboot restarted boottime from zero, or the kernel
gives no boot id) the time since the save is unknown and counted as none: the window resumes
exactly where the file left it, so a reboot never ends a window early, it only lengthens it by
the time since the last save plus the time the board was off. Windows only ever get longer this
way, never shorter.

**What a power cut can lose.** The service writes the file (fsync, rename, fsync the directory)
before answering any query that goes beyond the rows already written as spent, which it raises
``serve.budget.reserve_rows`` at a time (see :mod:`~device_agent.service.throttle`), and every
``serve.budget.save_seconds`` while a window runs, and at stop. A power cut can therefore (a)
charge a client up to ``reserve_rows`` rows it never used, and (b) lengthen running windows by up
to ``save_seconds`` plus the time the board was off. It never gives a row back and never ends a
window early. One durable write per ``reserve_rows`` rows per client, not one per query.

**An unreadable file** (malformed, oversized, not a regular file, a read error) is refused, not
repaired, and the service starts with every budget *exhausted* for one whole window: every client
is refused (429 ``daily_budget``) until ``window_seconds`` of boottime pass, and a critical
``tamper`` event is recorded. Refilling instead would let whoever can damage the file reset every
budget, the one control against natural-data extraction; the writes are atomic, so a power cut
leaves the old file or the new one and never a damaged one: a damaged file means a failing card
or tampering, both of which an operator should look at. After looking, the operator can delete
the file with the agent stopped, which resets every budget (``docs/operations.md``).

**Edited offline.** The file is not sealed: someone who can write the data dir while the agent
is stopped can lower the counts or delete the file, and so refill budgets. That is a known
residual risk (``docs/threat-model.md``); it needs the agent's own file access on the board.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.errors import FormatError
from device_agent.service.clocks import BOOT_ID_RE
from device_agent.store.fsutil import atomic_write, read_bounded
from device_agent.wire import MAX_VERSION, obj_fields

SCHEMA = "edgeward.budgets/1"
CLIENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a token id (wire.ID_RE's form)
FIELDS = {"schema", "boot_id", "boottime", "lockout", "clients"}


@dataclass(frozen=True)
class Saved:
    """What one ``budgets.json`` says."""

    boot_id: str | None
    boottime: float
    lockout: float
    clients: dict[str, tuple[int, float]]

    def elapsed(self, boot_id: str | None, now: float) -> float:
        """Boottime seconds since this was written, or 0 when that cannot be known (a reboot)."""
        if boot_id is None or boot_id != self.boot_id or now < self.boottime:
            return 0.0
        return now - self.boottime


def encode(saved: Saved) -> bytes:
    doc = {
        "schema": SCHEMA,
        "boot_id": saved.boot_id,
        "boottime": saved.boottime,
        "lockout": saved.lockout,
        "clients": {c: [used, left] for c, (used, left) in sorted(saved.clients.items())},
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise FormatError("budgets.json repeats a key")
    return out


def _refuse_constant(name: str) -> Any:
    raise FormatError(f"budgets.json holds {name}, not a number")


def _seconds(value: Any, what: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise FormatError(f"budgets.json {what} must be a finite number >= 0")
    return float(value)


def decode(data: bytes) -> Saved:
    """Parse a ``budgets.json`` strictly; anything else is a :class:`FormatError`."""
    try:
        raw = json.loads(
            data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"budgets.json is not UTF-8 JSON: {e}") from None
    doc = obj_fields(raw, "budgets.json", FIELDS, FIELDS)
    if doc["schema"] != SCHEMA:
        raise FormatError(f"budgets.json is not {SCHEMA}")
    boot_id = doc["boot_id"]
    if boot_id is not None and not (isinstance(boot_id, str) and BOOT_ID_RE.fullmatch(boot_id)):
        raise FormatError("budgets.json boot_id must be a boot id or null")
    if not isinstance(doc["clients"], dict):
        raise FormatError("budgets.json clients must be an object")
    clients: dict[str, tuple[int, float]] = {}
    for client, entry in doc["clients"].items():
        if not CLIENT_RE.fullmatch(client):
            raise FormatError(f"budgets.json names an invalid client {client[:80]!r}")
        if not (isinstance(entry, list) and len(entry) == 2):
            raise FormatError(f"budgets.json client {client} must be [rows, seconds]")
        used, left = entry
        if not isinstance(used, int) or isinstance(used, bool) or not 0 <= used <= MAX_VERSION:
            raise FormatError(f"budgets.json client {client} rows must be an integer in [0, 2**53]")
        clients[client] = (used, _seconds(left, f"client {client} seconds"))
    return Saved(boot_id, _seconds(doc["boottime"], "boottime"), _seconds(doc["lockout"], "lockout"), clients)


class BudgetFile:
    """Reads and writes one ``budgets.json`` (its path from the data dir's layout)."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit  # documents.max_board_file_bytes: checked before a byte is read

    def load(self) -> Saved | None:
        """What the file says; None when there is none (a new board, or after a wipe);
        :class:`FormatError` when it is there and cannot be read or parsed."""
        try:
            data = read_bounded(self.path, self.limit)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise FormatError(f"{self.path} cannot be read: {e.strerror}") from e
        return decode(data)

    def save(self, saved: Saved) -> None:
        """Replace the file durably (EnvironmentFault when the disk refuses)."""
        atomic_write(self.path, encode(saved), 0o600)

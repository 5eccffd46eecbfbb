"""The strict building blocks of every EdgeWard wire format (bundles, enrolments, reports,
commands) and of the board's own files: identifiers, times, canonical JSON and field readers that
refuse unknown fields and out-of-range values."""

from __future__ import annotations

import functools
import json
import math
import re
from datetime import UTC, datetime
from typing import Any

from device_agent.config import DEFAULT_CONFIG, DocumentLimits
from device_agent.errors import FormatError

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
HEX32_RE = re.compile(r"^[0-9a-f]{32}\Z")
HEX64_RE = re.compile(r"^[0-9a-f]{64}\Z")
FPR_RE = re.compile(r"^sha256:[0-9a-f]{64}\Z")
MAX_VERSION = 2**53  # the JSON integer range every reader holds exactly: part of every format


# Characters a terminal acts on or that change how a line reads: C0 controls (ESC, CR, LF, BS...),
# DEL, C1 controls (a one-character CSI), the line and paragraph separators, the bidirectional
# overrides and isolates, and lone surrogates (they cannot be written as UTF-8).
_UNPRINTABLE_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(value: object) -> str:
    """``value`` as text safe to print on one terminal line: every control or reordering
    character is shown as its escape (``\\x1b``, ``\\u202e``), so a string a board, a bundle or a
    file name supplied can neither move the cursor, rewrite earlier lines nor start a new one."""
    return _UNPRINTABLE_RE.sub(_escape, str(value))


# --- time -----------------------------------------------------------------------------------------


def format_time(t: datetime) -> str:
    """UTC, second precision, ``Z`` suffix: the only time format EdgeWard writes."""
    if t.tzinfo is None:
        raise ValueError("naive datetime")
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# Every time EdgeWard reads lies here: format_time writes four-digit years (strftime's %Y does
# not pad years before 1000, so they would not read back), and no board or fleet time is older
# than the Unix epoch (a Pi without a clock starts there).
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def parse_time(text: str, what: str) -> datetime:
    """Parse an ISO 8601 time between :data:`EARLIEST` and :data:`LATEST`; a time without a zone
    is refused rather than guessed."""
    if not isinstance(text, str) or len(text) > 40:
        raise FormatError(f"{what} must be an ISO 8601 time string")
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if t.tzinfo is None:
            raise FormatError(f"{what} has no time zone: {text!r}; add Z for UTC")
        t = t.astimezone(UTC)
    except (ValueError, OverflowError) as e:  # 0001-01-01T00:00:00+01:00 overflows in UTC
        raise FormatError(f"{what} is not an ISO 8601 time in range: {text!r}") from e
    if not EARLIEST <= t <= LATEST:
        raise FormatError(f"{what} is not an ISO 8601 time in range (1970 to 9999): {text!r}")
    return t


# --- strict field readers ---------------------------------------------------------------------------


def obj_fields(value: Any, what: str, known: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FormatError(f"{what} must be an object")
    unknown = set(value) - known
    if unknown:
        names = ", ".join(k[:64] for k in sorted(unknown)[:8])
        raise FormatError(f"{what} has unknown fields: {names}")
    missing = required - set(value)
    if missing:
        raise FormatError(f"{what} is missing fields: {', '.join(sorted(missing))}")
    return value


def str_field(
    value: Any,
    what: str,
    pattern: re.Pattern[str] | None = None,
    limit: int = DEFAULT_CONFIG.documents.max_string_field,
) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise FormatError(f"{what} must be a non-empty string of at most {limit} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise FormatError(f"{what} has an invalid value {value[:80]!r}")
    return value


def int_field(value: Any, what: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise FormatError(f"{what} must be an integer in [{lo}, {hi}]")
    return value


def choice_field(value: Any, what: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise FormatError(f"{what} must be one of {', '.join(choices)}; got {str(value)[:40]!r}")
    return str(value)


def canonical_json(obj: Any) -> bytes:
    """The one JSON encoding EdgeWard signs: sorted keys, no spaces, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def loads_json(data: bytes | memoryview, what: str, limits: DocumentLimits = DEFAULT_CONFIG.documents) -> Any:
    """The strict JSON reader of every wire format, enrolment and sealed file: strict UTF-8; nesting
    bounded before the parser recurses; every number at most ``max_json_number_chars`` long
    (checked before it is converted) and finite (no NaN, Infinity or 1e400); no key twice in an
    object; no lone surrogate escape (``"\\ud800"``: not Unicode, and no store can write it).
    Anything else is a :class:`FormatError` naming what was wrong, never another exception."""
    raw = bytes(data)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{what} is not valid UTF-8 JSON: {e}") from e
    _check_depth(raw, what, limits.max_json_depth)
    try:
        doc = _decoder(what, limits.max_json_number_chars).decode(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"{what} is not valid UTF-8 JSON: {e}") from e
    except (RecursionError, ValueError) as e:  # Python's own bounds, should ours ever be set past them
        raise FormatError(f"{what} could not be read as JSON: {e}") from e
    if _SURROGATE_ESCAPE.search(text):  # rare: only then look for a lone one in the result
        try:
            json.dumps(doc, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise FormatError(f"{what} has a string with a lone surrogate escape (not Unicode)") from e
    return doc


# A JSON string token (escapes included), and the characters other than brackets.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_depth(raw: bytes, what: str, most: int) -> None:
    """Refuse JSON text nested more than ``most`` deep, without recursing: no more opening
    brackets than that (the usual case, one pass in C), or peel innermost pairs off the brackets
    outside strings, one level per pass, at most ``most`` passes."""
    if raw.count(b"[") + raw.count(b"{") <= most:
        return
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    for _ in range(most):
        brackets, peeled = _INNERMOST.subn(b"", brackets)
        if not brackets:
            return
        if not peeled:
            raise FormatError(f"{what} is not valid JSON: its brackets do not match")
    raise FormatError(f"{what} is nested more than {most} levels deep")


@functools.lru_cache(maxsize=64)
def _decoder(what: str, most: int) -> json.JSONDecoder:
    """A decoder whose hooks refuse what loads_json refuses (built once: json.loads with hooks
    builds a decoder per call, which costs as much as decoding a report)."""

    def number(text: str) -> None:
        if len(text) > most:
            raise FormatError(f"{what} has a number of more than {most} characters")

    def as_int(text: str) -> int:
        number(text)
        return int(text)

    def as_float(text: str) -> float:
        number(text)
        value = float(text)
        if not math.isfinite(value):
            raise FormatError(f"{what} has {text[:40]}, which is not a finite number")
        return value

    def constant(text: str) -> None:
        raise FormatError(f"{what} has {text}, which is not a finite number")

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(items)
        if len(obj) != len(items):
            seen: set[str] = set()
            for k, _ in items:
                if k in seen:
                    raise FormatError(f"{what} has the key {k[:64]!r} twice in one object")
                seen.add(k)
        return obj

    return json.JSONDecoder(parse_int=as_int, parse_float=as_float, parse_constant=constant, object_pairs_hook=pairs)

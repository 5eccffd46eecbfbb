"""The strict building blocks of every EdgeWard wire format (bundles, enrolments, reports,
commands) and of the board's own files: identifiers, times, canonical JSON and field readers that
refuse unknown fields and out-of-range values."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from device_agent.config import DEFAULT_CONFIG
from device_agent.errors import FormatError

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
HEX32_RE = re.compile(r"^[0-9a-f]{32}\Z")
HEX64_RE = re.compile(r"^[0-9a-f]{64}\Z")
FPR_RE = re.compile(r"^sha256:[0-9a-f]{64}\Z")
MAX_VERSION = 2**53  # the JSON integer range every reader holds exactly: part of every format


# --- time -----------------------------------------------------------------------------------------


def format_time(t: datetime) -> str:
    """UTC, second precision, ``Z`` suffix: the only time format EdgeWard writes."""
    if t.tzinfo is None:
        raise ValueError("naive datetime")
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str, what: str) -> datetime:
    """Parse an ISO 8601 time; a time without a zone is refused rather than guessed."""
    if not isinstance(text, str) or len(text) > 40:
        raise FormatError(f"{what} must be an ISO 8601 time string")
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if t.tzinfo is None:
            raise FormatError(f"{what} has no time zone: {text!r}; add Z for UTC")
        return t.astimezone(UTC)
    except (ValueError, OverflowError) as e:  # 0001-01-01T00:00:00+01:00 overflows in UTC
        raise FormatError(f"{what} is not an ISO 8601 time in range: {text!r}") from e


# --- strict field readers ---------------------------------------------------------------------------


def obj_fields(value: Any, what: str, known: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FormatError(f"{what} must be an object")
    unknown = set(value) - known
    if unknown:
        raise FormatError(f"{what} has unknown fields: {', '.join(sorted(unknown))}")
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


def loads_json(data: bytes | memoryview, what: str) -> Any:
    try:
        return json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{what} is not valid UTF-8 JSON: {e}") from e

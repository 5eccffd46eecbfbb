"""Reading the small JSON documents the host CLI takes (--policy, --preprocess, harden outputs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from device_agent.errors import FormatError, UsageError

from .limits import HOST_LIMITS


def read_json_object(path: str | Path | None, what: str) -> dict[str, Any] | None:
    """The JSON object in ``path`` (None when no path was given).

    A missing file is a usage error (exit 2); a file that is not a JSON object, holds NaN or
    Infinity, or is oversized is malformed input (exit 3).
    """
    if path is None:
        return None

    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    p = Path(path)
    try:
        if p.stat().st_size > HOST_LIMITS.max_json_bytes:
            raise FormatError(f"{what} {path} is over {HOST_LIMITS.max_json_bytes} bytes")
        doc = json.loads(p.read_text(encoding="utf-8"), parse_constant=refuse_constant)
    except FileNotFoundError as e:
        raise UsageError(f"{what} {path} does not exist") from e
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FormatError(f"{what} {path} is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise FormatError(f"{what} {path} must hold a JSON object")
    return doc

"""Every bound the agent enforces, in one place (python-tuf's ``UpdaterConfig`` habit)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Bounds checked while reading untrusted bytes, before they are used."""

    max_manifest_bytes: int = 64 * 1024
    max_bundle_bytes: int = 2 * 1024**3
    max_chunk_bytes: int = 16 * 1024**2
    min_chunk_bytes: int = 4 * 1024
    max_sidecar_bytes: int = 16 * 1024**2
    max_trusted_publishers: int = 16
    max_input_bytes: int = 64 * 1024**2
    max_string_field: int = 256


DEFAULT_LIMITS = Limits()

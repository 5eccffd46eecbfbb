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
    # sealed pre-processing (device_agent.preprocess)
    max_preprocess_side: int = 8192  # any image side, in the input, the spec and every step
    max_preprocess_elements: int = 16 * 1024**2  # any array a step makes, input to output
    max_preprocess_steps: int = 32
    max_preprocess_channels: int = 16  # normalize mean/std entries


DEFAULT_LIMITS = Limits()

"""The host's own limits, in one place.

Where the host reads a board format (enrolments, public key files, bundles) the board's
:data:`device_agent.config.DEFAULT_CONFIG` bounds it: the parsers in ``device_agent`` take their
limits from there. The limits here bound only what the host alone reads.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from device_agent.errors import UsageError


@dataclass(frozen=True)
class HostLimits:
    """Bounds on the files only the host reads."""

    max_json_bytes: int = 16 * 1024**2  # a JSON document given to the CLI (--policy, --preprocess, harden outputs)
    max_model_bytes: int = 2**31 - 1  # a model file read without a profile's own max_model_bytes
    max_array_file_bytes: int = 1024**3  # an .npz of calibration, validation or test data
    max_array_file_members: int = 64  # arrays in one such .npz

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UsageError(f"host.{f.name} must be an integer >= 1, got {v!r}")


HOST_LIMITS = HostLimits()

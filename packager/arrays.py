"""The host's one reader of ``.npz`` data files (calibration, validation, red-team test sets).

It is the board's bounded reader (:func:`device_agent.runtime.arrays.load_arrays`) with the host's
limits: numeric arrays only, sizes checked before anything is allocated, and a refusal that
names the file and says how to write one. It never falls back to pickle and never suggests it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from device_agent.config import DEFAULT_LIMITS
from device_agent.errors import FormatError, UsageError
from device_agent.runtime.arrays import load_arrays
from device_agent.store.fsutil import read_bounded

from .limits import HOST_LIMITS, HostLimits

HOW = "save it with numpy.savez(FILE, x=inputs, y=labels)"


def load_npz(path: str | Path, what: str, limits: HostLimits = HOST_LIMITS) -> dict[str, np.ndarray]:
    """The named numeric arrays of the ``.npz`` file ``path`` (``what`` names the option it came
    from, for the messages). Missing file: :class:`UsageError`; anything else wrong with it:
    :class:`FormatError`."""
    p = Path(path)
    bounds = replace(
        DEFAULT_LIMITS,
        max_input_bytes=limits.max_array_file_bytes,
        max_input_arrays=limits.max_array_file_members,
    )
    try:
        if p.is_dir():
            raise UsageError(f"{what} {p} is a directory, not an .npz file")
        data = read_bounded(p, limits.max_array_file_bytes)
    except FileNotFoundError as e:
        raise UsageError(f"{what} {p} does not exist") from e
    except OSError as e:
        raise UsageError(f"{what} {p} cannot be read: {e.strerror}") from e
    except FormatError as e:
        raise FormatError(f"{what}: {e}") from e
    try:
        arrays = load_arrays(data, bounds)
    except FormatError as e:
        raise FormatError(f"{what} {p} is not a numeric .npz file ({e}); {HOW}") from e
    if not isinstance(arrays, dict):
        raise FormatError(f"{what} {p} is a single .npy array, not an .npz of named arrays; {HOW}")
    return arrays

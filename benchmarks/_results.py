"""One row per benchmark figure, for the report ``scripts/bench.sh`` writes (docs/benchmarks.md).

Each benchmark script prints its figures for people and also calls :func:`record` for each one
it reports. When ``EDGEWARD_BENCH_RESULTS`` names a file, the rows are appended to it as JSON
lines; otherwise :func:`record` does nothing, so the scripts run alone exactly as before.

A row's ``target`` is the text of the target stated in the benchmark script (None for a figure
given for information), and ``passed`` whether the figure met it (None without a target).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV = "EDGEWARD_BENCH_RESULTS"


def record(
    benchmark: str,
    figure: str,
    value: float | int | str,
    unit: str = "",
    target: str | None = None,
    passed: bool | None = None,
    note: str = "",
) -> None:
    """Append one figure (and its target and verdict) to the results file, if there is one."""
    path = os.environ.get(ENV)
    if not path:
        return
    row = {"benchmark": benchmark, "figure": figure, "value": value, "unit": unit, "target": target,
           "passed": passed, "note": note}
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")

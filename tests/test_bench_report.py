"""The benchmark report (docs/benchmarks.md): every benchmark records its figures, and the report
renders each benchmark's rows in a section of its own.

Nothing here is timed: the benchmarks themselves run only through benchmarks/run.sh.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from benchmarks import _report
from benchmarks._results import ENV, record

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_every_benchmark_records_its_figures_for_the_report(script: Path) -> None:
    tree = ast.parse(script.read_text())
    calls = [n for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "record"]
    assert calls, f"{script.name} prints figures but records none (benchmarks/_results.py record())"
    names = {c.args[0].value for c in calls if c.args and isinstance(c.args[0], ast.Constant)}
    assert names == {script.stem}, f"{script.name} records under {names}; the report expects {script.stem!r}"


def test_the_report_gives_each_benchmark_its_section_and_names_the_silent_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = tmp_path / "results.jsonl"
    monkeypatch.setenv(ENV, str(results))
    record("learning", "one update cycle, time", 0.66, "s", "< 10", True, "1000 examples held")
    record("fleet_scale", "20 boards, 1 monitor on SQLite: reports lost", 1, "reports", "= 0", False, "240 sent")
    record("fleet_scale", "20 boards, 1 monitor on SQLite: latency p50", "-", "ms")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    text = _report.render(rows, 1, 60.0)
    assert "1 of 2 targets met; 1 figures for information" in text
    learning, fleet_scale = text.index("### learning"), text.index("### fleet_scale")
    assert learning < fleet_scale
    assert "| one update cycle, time | 0.66 s | < 10 s | PASS | 1000 examples held |" in text[learning:fleet_scale]
    assert "| 20 boards, 1 monitor on SQLite: reports lost | 1 reports | = 0 reports | **MISS** | 240 sent |" \
        in text[fleet_scale:]
    silent = [b for b in _report.BENCHMARKS if b not in ("learning", "fleet_scale")]
    assert f"No figures from: {', '.join(silent)}" in text

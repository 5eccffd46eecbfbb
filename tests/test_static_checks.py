"""bandit over the code that ships (device_agent, packager, fleet), configured in pyproject.toml.

scripts/test.sh runs ruff, mypy and bandit as its first step; this test keeps the bandit part in
the pytest suite too, so a finding fails a plain pytest run. A finding is fixed, or justified on
its own line with ``# nosec BXXX # reason``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ["device_agent", "packager", "fleet"]


def _bandit(*args: str) -> dict:
    pytest.importorskip("bandit", reason="bandit is a dev dependency: pip install -e '.[dev]'")
    proc = subprocess.run(
        [sys.executable, "-m", "bandit", "-q", "-c", "pyproject.toml", "-f", "json", *args],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.stdout, proc.stderr
    return json.loads(proc.stdout)


def test_bandit_finds_nothing_in_the_product_packages() -> None:
    report = _bandit("-r", *PACKAGES)
    findings = [f"{r['filename']}:{r['line_number']} {r['test_id']} {r['issue_text']}" for r in report["results"]]
    assert not findings, "\n".join(findings)
    assert not report["errors"], report["errors"]
    # Every package was scanned (an exclude that swallowed one would pass vacuously).
    scanned = {Path(f).parts[0] for f in report["metrics"] if f != "_totals"}
    assert set(PACKAGES) <= scanned, scanned


def test_bandit_flags_an_assert_in_product_code(tmp_path: Path) -> None:
    """The configuration skips asserts only in tests: in the product, ``python -O`` removes them."""
    pkg = tmp_path / "device_agent_like"
    pkg.mkdir()
    (pkg / "check.py").write_text("def f(x):\n    assert x is not None\n    return x\n")
    report = _bandit("-r", str(pkg))
    assert [r["test_id"] for r in report["results"]] == ["B101"]

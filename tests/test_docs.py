"""The docs name the tests that show each claim (docs/principles.md, docs/threat-model.md, the attack
suite's index in tests/adversarial/README.md): every test they name must exist, or a claim points at nothing."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_the_docs_name_exists() -> None:
    tests = {
        p.relative_to(ROOT / "tests").as_posix(): set(re.findall(r"^def (test_\w+)", p.read_text(), re.M))
        for p in (ROOT / "tests").rglob("test_*.py")
    }
    missing, named = [], 0
    docs = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "tests" / "adversarial" / "README.md"]
    for doc in docs:
        for file, first, rest in re.findall(r"`((?:adversarial/)?test_\w+\.py)::(test_\w+)`((?:, `::test_\w+`)*)",
                                            doc.read_text()):
            for name in [first, *re.findall(r"::(test_\w+)", rest)]:
                named += 1
                if name not in tests.get(file, set()):
                    missing.append(f"{doc.name}: {file}::{name}")
    assert named > 50, "the docs should name the tests behind their claims"
    assert not missing, "docs name tests that do not exist:\n" + "\n".join(missing)

"""Coverage-guided fuzzing of one target in tests/fuzz/targets.py with atheris (libFuzzer).

    python -m tests.fuzz.run_atheris TARGET CORPUS_DIR [libFuzzer options, e.g. -runs=200000]

The device_agent modules are instrumented for coverage; the corpus directory is seeded with the
target's valid encodings. Any exception other than an EdgeWardError is a finding: libFuzzer
prints it, writes the input as crash-* in the working directory and exits non-zero.
tests/test_fuzz.py runs every target this way under ``scripts/test.sh --slow``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["device_agent"]):
    from tests.fuzz import targets


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] not in targets.TARGETS:
        sys.exit(f"usage: run_atheris.py {{{','.join(targets.TARGETS)}}} CORPUS_DIR [libFuzzer options]")
    name, corpus = sys.argv[1], Path(sys.argv[2])
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(targets.seeds(name)):
        (corpus / f"seed-{i}").write_bytes(seed)

    def one(data: bytes) -> None:
        targets.check(name, data)

    atheris.Setup([sys.argv[0], str(corpus), *sys.argv[3:]], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

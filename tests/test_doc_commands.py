"""Every shell block in README.md and docs/*.md runs as written (doctest, for shell).

A block fenced ```bash, ```sh or ```shell is run; one that cannot run here says why in the
line just before it: ``<!-- not-run: needs a real Raspberry Pi -->``. The runnable blocks of one
document run in order in one shell (``set -eo pipefail``), in a fresh directory that holds what
the docs call ``model.onnx`` (the digits MLP), ``x.npy``/``x.npz`` (digits inputs) and
``labels.txt``, with ``edgeward`` and ``edgeward-agent`` on the PATH and ``/var/lib`` a private
tmpfs (a mount namespace), so ``/var/lib/edgeward`` is the board's own. Nothing else is prepared:
passphrases and keys come from the blocks themselves. An unmarked block that fails fails the test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell"}
FENCE = re.compile(r"^```([A-Za-z]*)\s*$")
NOT_RUN = re.compile(r"^<!-- not-run: (\S.*\S) -->$")


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    text: str
    not_run: str | None  # the reason, if marked


def shell_blocks(doc: Path) -> list[Block]:
    lines = doc.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m[1]
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        if lang in SHELL:
            prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            marked = NOT_RUN.match(prev)
            blocks.append(Block(doc, start + 1, "\n".join(lines[start + 1 : i]), marked[1] if marked else None))
        i += 1
    return blocks


def test_blocks_are_found_and_every_skip_gives_a_reason() -> None:
    blocks = [b for d in DOCS for b in shell_blocks(d)]
    assert len(blocks) > 20
    assert sum(b.not_run is None for b in blocks) >= 8, "most commands should run as written"
    for d in DOCS:
        for n, line in enumerate(d.read_text(encoding="utf-8").splitlines(), 1):
            if "not-run" in line:
                assert NOT_RUN.match(line.strip()), f"{d.name}:{n}: write <!-- not-run: REASON -->"


@pytest.fixture(scope="module")
def sandbox_files(digits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("doc-files")
    shutil.copy(digits.onnx, d / "model.onnx")
    with np.load(digits.test) as z:
        x = z["x"]
    np.save(d / "x.npy", x[0])
    np.savez(d / "x.npz", x[:4])  # arr_0: the model's first input
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    (d / "labels.txt").write_text("\n".join(names) + "\n")
    bindir = d / "bin"
    bindir.mkdir()
    for name, module in (("edgeward", "packager.cli"), ("edgeward-agent", "device_agent.cli")):
        exe = bindir / name
        exe.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m {module} "$@"\n')
        exe.chmod(0o755)
    return d


def _runnable_docs() -> list[Path]:
    return [d for d in DOCS if any(b.not_run is None for b in shell_blocks(d))]


@pytest.mark.parametrize("doc", _runnable_docs(), ids=lambda p: p.name)
def test_the_shell_blocks_of_a_document_run_as_written(doc: Path, sandbox_files: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1): the blocks use /var/lib/edgeward, made private by a mount namespace")
    work = tmp_path / "work"
    shutil.copytree(sandbox_files, work, ignore=shutil.ignore_patterns("bin"))
    blocks = [b for b in shell_blocks(doc) if b.not_run is None]
    script = ["set -eo pipefail", "mount -t tmpfs -o mode=0755 tmpfs /var/lib", f"cd {work}"]
    for b in blocks:
        script += [f"echo '@@ {doc.name}:{b.line}' >&2", b.text]
    script.append("echo '@@ done' >&2")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWARD_")}
    env.update(PATH=f"{sandbox_files / 'bin'}:{os.environ['PATH']}", HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", "\n".join(script)],
                       cwd=work, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                       check=False)
    where = re.findall(r"^@@ (.*)$", r.stderr, re.M)
    failed = where[-1] if where else "set-up"
    tail = "\n".join(r.stderr.splitlines()[-15:])
    assert r.returncode == 0 and failed == "done", f"the block at {failed} failed (exit {r.returncode}):\n{tail}"

"""Power loss at every instant of the board's durable operations (docs/crash-consistency.md).

Each operation runs once under :class:`tests.crashsim.Recorder`; every state a power cut (or a
SIGKILL) could leave at any recorded point is then written out and opened by a fresh agent, as
the board would after a reboot, and judged against the operation's invariant: the state before
the step in progress or after it, never neither, never corrupt, and once a step returned it
survives. The recorder's ``fsync`` call sites are then removed one at a time: each removal must
make the checker find a broken state (a check that cannot fail proves nothing). Real SIGKILLs of
the CLI in a subprocess, just before each durable step, follow; thousands of random ones run
behind ``EDGEWARD_SLOW=1``.

Real keys, real bundles of the digits model, real onnxruntime, real SQLite; no mocks.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent import Agent
from device_agent.bundle.format import verify_bundle
from device_agent.bundle.keyfiles import load_public_key_file
from device_agent.config import AuditConfig
from device_agent.errors import SecurityRefusal
from device_agent.service import audit as audit_mod
from device_agent.service.audit import AuditLog
from device_agent.store import layout
from device_agent.store.datadir import DataDir, utcnow
from device_agent.store.keys import KEK_FILE_ENV, KeySource
from device_agent.telemetry import outbox as outbox_mod
from device_agent.telemetry.outbox import INFO_EVENT, Item, Outbox
from device_agent.telemetry.report import payload_digest
from device_agent.trust.state import TrustAnchors
from tests.conftest import Board
from tests.crashsim import Recorder, crash_states, outbox_build, volatile_state
from tests.test_wipe_faults import live_board, sign_public, wiped_problems

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "pi-power"
View = Callable[[Path], Any]


class Broken(Exception):
    """A state the board cannot come back from as it should."""


# --- what a restarted board finds ------------------------------------------------------------------


def _wipe_view(d: Path, kek: bytes, sign_pub: bytes, bundles: Any, x: Any) -> Any:
    """What a board left by a wipe cut short is: intact, or wiped with nothing of it left."""
    try:
        return ("intact", board_view(d, KeySource(kek=kek, kek_path=d / layout.KEK), x))
    except SecurityRefusal as e:
        if "was wiped" not in str(e):
            raise
    problems = wiped_problems(d, sign_pub, bundles)
    if problems:
        raise Broken(f"half wiped: {problems}")
    return ("wiped",)


def kek_source(data: Path) -> KeySource:
    kek = data / layout.KEK
    return KeySource(kek=kek.read_bytes(), kek_path=kek)


def board_view(data: Path, keys: KeySource, x: np.ndarray) -> tuple[Any, ...]:
    """Everything a restarted agent serves and trusts, each part authenticated and loaded: the
    current model of each slot answers a query (real onnxruntime), the previous one verifies and
    its content key opens, the tokens, anchors, clock floor, and the data dir's layout."""
    agent = Agent(data, keys)
    state = agent.state()
    models = []
    for mid, slot in sorted(state.models.items()):
        cur, prev = slot.current, slot.previous
        answer = agent.predict(x, model_id=mid) if cur is not None else None
        if prev is not None:
            vb = verify_bundle(agent.store.read_bundle(prev.bundle_id, agent.limits.max_bundle_bytes),
                               list(agent.trust_anchors().publishers))
            agent._open(vb, in_place=True, check_digest=True).wipe()
        models.append((mid, cur.model_version if cur else None, prev.model_version if prev else None,
                       slot.highest_version, json.dumps(answer, sort_keys=True)))
    tokens = tuple(sorted((t.role, t.revoked is not None) for t in agent.tokens().list()))  # ids are random
    anchors = agent.trust_anchors()
    problems = agent.store.layout.problems()
    if problems:
        raise Broken(f"data dir problems: {problems}")
    return ("board", tuple(models), tokens, len(anchors.publishers), state.clock_floor)


def stray_keys(data: Path, keys: KeySource) -> list[str]:
    """Sealed bundle keys on disk that the state no longer references (a shredding undone)."""
    state = Agent(data, keys).state()
    keep = state.referenced_bundles()
    return sorted(p.name for p in (data / layout.BUNDLES).glob("*.key") if p.stem not in keep)


# --- the judge ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Scenario:
    rec: Recorder
    view: View
    final: Callable[[Path], list[str]] | None = None  # extra checks once the operation returned
    secrets: tuple[bytes, ...] = ()  # contents the operation must leave nowhere on the disk
    accept: Callable[[Any, Any, Any], bool] | None = None  # (found, last step's view, next step's view)


def judge(sc: Scenario, work: Path, *, stop_at_first: bool = False) -> tuple[list[str], int]:
    """Every crash state of a recorded operation, opened and judged; returns (problems, states)."""
    rec = sc.rec
    assert not rec.unmodelled, f"writes the recorder does not model: {rec.unmodelled}"
    marks = [i for i, p in enumerate(rec.points) if p.is_milestone]
    work.mkdir(parents=True, exist_ok=True)
    expected: dict[int, Any] = {}
    for i in marks:
        d = volatile_state(rec, i).materialize(work / f"step-{i}")
        expected[i] = sc.view(d)
        shutil.rmtree(d)
    problems: list[str] = []
    n = 0
    states = list(crash_states(rec))
    if stop_at_first:  # the states once the operation returned first: most missing fsyncs show there
        states.reverse()
    for n, s in enumerate(states, 1):
        d = s.materialize(work / f"state-{n}")
        last = max(m for m in marks if m <= s.point)
        nxt = min((m for m in marks if m > s.point), default=None)
        try:
            if nxt is None and sc.final is not None:  # checked before a restarted agent repairs anything
                for p in sc.final(d):
                    raise Broken(p)
            got = sc.view(d)
            ok = (sc.accept(got, expected[last], expected.get(nxt)) if sc.accept
                  else got == expected[last] or (nxt is not None and got == expected[nxt]))
            if not ok:
                wanted = expected[last] if nxt is None else f"{expected[last]} or {expected[nxt]}"
                raise Broken(f"found {got}; expected {wanted}")
        except Exception as e:  # noqa: BLE001 - every failure to come back is the finding
            problems.append(f"{s.label}: {type(e).__name__}: {e}")
            if stop_at_first:
                break
        shutil.rmtree(d, ignore_errors=True)
    if sc.secrets:
        left = [i for i, blob in enumerate(sc.secrets) if blob in rec.durable_blobs()]
        if left:
            problems.append(f"{len(left)} shredded secret(s) still on the disk once the operation returned")
    return problems, n


# --- the operations ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    tmp: Path
    publisher: Path
    pack_for: Callable[..., Path]
    digits: Any
    x: np.ndarray
    mp: pytest.MonkeyPatch
    disabled: tuple[str, ...] = ()  # fsync call sites removed for this run
    release_for: Callable[..., Path] | None = None  # packs a version 2 release (tests/conftest.py)

    def board(self, name: str) -> Board:
        data = self.tmp / name
        data.mkdir(mode=0o700)
        (data / layout.KEK).write_bytes(os.urandom(32))
        os.chmod(data / layout.KEK, 0o600)
        src = kek_source(data)
        enrolment = self.tmp / f"{name}.json"
        enrolment.write_bytes(Agent.provision(data, DEVICE, [load_public_key_file(self.publisher / "publisher.pub")],
                                              [], src))
        return Board(data, enrolment, DEVICE, src)

    def bundle(self, board: Board, version: int) -> Path:
        return self.pack_for(self.digits.onnx, [board], version=version) / f"{DEVICE}.ewb"

    def view(self, d: Path) -> Any:
        return board_view(d, kek_source(d), self.x)

    def record(self, root: Path, *, start: bool = True) -> Recorder:
        rec = Recorder(root)
        rec.disabled = set(self.disabled)
        if start:
            rec.install(self.mp)
        return rec


def op_install(env: Env) -> Scenario:
    board = env.board("install")
    board.agent().install_file(env.bundle(board, 1))
    v2 = env.bundle(board, 2)
    rec = env.record(board.data_dir)
    board.agent().install_file(v2)
    rec.stop()
    rec.milestone()
    return Scenario(rec, env.view)


def op_install_release(env: Env) -> Scenario:
    """A version 2 release (envelope + shared payload) over a version 1 bundle: stored as a v2
    single file through the same writes."""
    board = env.board("install-release")
    board.agent().install_file(env.bundle(board, 1))
    assert env.release_for is not None
    out = env.release_for(env.digits.onnx, [board], version=2)
    rec = env.record(board.data_dir)
    board.agent().install_release(out / "envelopes" / f"{DEVICE}.ewe", out / "payload.ewp")
    rec.stop()
    rec.milestone()
    return Scenario(rec, env.view)


def op_rollback(env: Env) -> Scenario:
    board = env.board("rollback")
    agent = board.agent()
    agent.install_file(env.bundle(board, 1))
    agent.install_file(env.bundle(board, 2))
    dropped = (board.data_dir / layout.BUNDLES / f"{agent.state().models['digits'].current.bundle_id}.key")  # type: ignore[union-attr]
    secret = dropped.read_bytes()
    rec = env.record(board.data_dir)
    board.agent().rollback()
    rec.stop()
    rec.milestone()
    return Scenario(rec, env.view, final=lambda d: stray_keys(d, kek_source(d)), secrets=(secret,))


def op_tokens(env: Env) -> Scenario:
    board = env.board("tokens")
    first, _ = board.agent().tokens().add("user", utcnow())
    rec = env.record(board.data_dir)
    tokens = board.agent().tokens()
    tokens.add("admin", utcnow())
    rec.milestone()
    tokens.revoke(first.id, utcnow())
    rec.stop()
    rec.milestone()
    return Scenario(rec, env.view)


def op_sealed(env: Env) -> Scenario:
    """The sealed trusted files written in turn: trust anchors, then the state's clock floor."""
    board = env.board("sealed")
    board.agent().install_file(env.bundle(board, 1))
    rec = env.record(board.data_dir)
    agent = board.agent()
    key = agent._key()
    anchors = agent.trust_anchors()
    agent.store.save_trust(TrustAnchors((*anchors.publishers, os.urandom(32)), anchors.operators), key)
    rec.milestone()
    state = agent.state()
    agent.store.save_state(dataclasses.replace(state, clock_floor=utcnow() + timedelta(days=1)), key)
    rec.stop()
    rec.milestone()
    return Scenario(rec, env.view)


def op_provision(env: Env) -> Scenario:
    """Provisioning a board on an empty card: the data dir itself is created."""
    card = env.tmp / "card"
    card.mkdir()
    kek = env.tmp / "provision.kek"
    kek.write_bytes(os.urandom(32))
    src = KeySource(kek=kek.read_bytes(), kek_path=kek)
    rec = env.record(card)
    Agent.provision(card / "board", DEVICE, [load_public_key_file(env.publisher / "publisher.pub")], [], src)
    rec.stop()
    rec.milestone()

    def view(d: Path) -> Any:
        data = d / "board"
        if not DataDir(data).is_provisioned():
            return ("not provisioned",)  # provisioning runs again from the start
        return board_view(data, src, env.x)

    return Scenario(rec, view)


class RecordingConnection:
    """A SQLite connection that adds a crash point after each statement that commits."""

    def __init__(self, db: sqlite3.Connection, rec: Recorder) -> None:
        self._db, self._rec = db, rec

    def _after(self, sql: str) -> None:
        if not self._db.in_transaction and self._rec.active:
            self._rec.point(f"SQLite commit ({sql.split()[0]})")

    def execute(self, sql: str, *args: Any) -> Any:
        cur = self._db.execute(sql, *args)
        self._after(sql)
        return cur

    def executemany(self, sql: str, rows: Any) -> Any:
        cur = self._db.executemany(sql, rows)
        self._after(sql)
        return cur

    def executescript(self, sql: str) -> Any:
        cur = self._db.executescript(sql)
        self._after(sql)
        return cur

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def outbox_view(d: Path) -> Any:
    """The outbox as a restarted agent finds it: opens, and its hash chain holds."""
    box = Outbox(d / layout.OUTBOX, 100)
    try:
        rows = box.pending(0, 1000)
        head, next_seq = box._head(), box._meta("next_seq")
    finally:
        box.close()
    for a, b in zip(rows, rows[1:], strict=False):
        if b.payload.split(b":")[1] != payload_digest(a.payload).hex().encode():
            raise Broken(f"report {b.seq} does not name report {a.seq}")
    if rows and (head != payload_digest(rows[-1].payload) or next_seq <= rows[-1].seq):
        raise Broken("the chain head or the next sequence number is behind the stored reports")
    return ("outbox", tuple((r.seq, r.payload) for r in rows), head, next_seq)


def op_outbox(env: Env) -> Scenario:
    d = env.tmp / "outbox"
    d.mkdir(mode=0o700)
    box = Outbox(d / layout.OUTBOX, 100)
    box.add([Item(INFO_EVENT, outbox_build) for _ in range(3)])
    box.close()
    rec = env.record(d, start=False)
    real_open = outbox_mod.open_durable
    env.mp.setattr(outbox_mod, "open_durable", lambda *a, **kw: RecordingConnection(real_open(*a, **kw), rec))
    rec.install(env.mp)
    box = Outbox(d / layout.OUTBOX, 100)
    assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: what the model relies on
    box.add([Item(INFO_EVENT, outbox_build) for _ in range(3)])
    rec.milestone()
    box.acked([p.seq for p in box.pending(0, 2)])
    rec.milestone()
    box.close()
    rec.stop()
    rec.milestone()
    return Scenario(rec, outbox_view)


def op_audit(env: Env) -> Scenario:
    """Appends that rotate segments, checkpoint and prune old ones; a checkpointed record must
    survive, and the chain must verify after the restart."""
    d = env.tmp / "audit"
    config = AuditConfig(max_segment_bytes=600, retention_days=1.0, checkpoint_every=3, checkpoint_seconds=1e9)
    log = AuditLog(d, config)
    old = time.time() - 10 * 86400
    for i in range(4):
        log.append({"event": "predict", "n": i}, old)
    log.close()
    rec = env.record(d, start=False)
    real_checkpoint = AuditLog._checkpoint

    def checkpoint(self: AuditLog) -> None:
        real_checkpoint(self)
        rec.milestone(self._seq, "audit checkpoint")

    env.mp.setattr(AuditLog, "_checkpoint", checkpoint)
    rec.install(env.mp)
    log = AuditLog(d, config)
    for i in range(12):
        log.append({"event": "predict", "n": i}, time.time())
    log.close()
    rec.stop()

    def view(root: Path) -> Any:
        AuditLog(root, config).close(checkpoint=False)  # the restart: resume the chain
        report = audit_mod.verify(root)
        if not report.ok:
            raise Broken(f"the audit chain does not verify: {report.problems}")
        return report.last_seq or 0

    # a checkpointed record survives: at least as long as at the last checkpoint, and verifying
    def final(root: Path) -> list[str]:  # once the log is closed, it verifies without a repair
        return audit_mod.verify(root).problems

    return Scenario(rec, view, final=final, accept=lambda found, last, nxt: found >= last)


def op_wipe(env: Env) -> Scenario:
    board, bundles = live_board(env.tmp / "wipe", env.tmp / "wipe.json", env.publisher, env.pack_for,
                                env.digits.onnx, models=1)
    sign_pub = sign_public(board)
    data = board.data_dir
    secrets = tuple((data / f.rel).read_bytes() for f in layout.Layout(data).scan()
                    if f.entry is not None and f.entry.fate is layout.Fate.SHRED and f.kind == "file")
    kek = (data / layout.KEK).read_bytes()
    rec = env.record(data)
    board.agent().wipe()
    rec.stop()
    rec.milestone()

    def view(d: Path) -> Any:
        return _wipe_view(d, kek, sign_pub, bundles, env.x)

    return Scenario(rec, view, final=lambda d: wiped_problems(d, sign_pub, bundles), secrets=secrets)


OPERATIONS: dict[str, Callable[[Env], Scenario]] = {
    "install": op_install,
    "install-release": op_install_release,
    "rollback": op_rollback,
    "tokens": op_tokens,
    "sealed": op_sealed,
    "provision": op_provision,
    "outbox": op_outbox,
    "audit": op_audit,
    "wipe": op_wipe,
}


@pytest.fixture
def env(tmp_path: Path, publisher: Path, pack_for: Callable[..., Path], digits: Any,
        digits_test: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch,
        release_for: Callable[..., Path]) -> Env:
    return Env(tmp_path, publisher, pack_for, digits, digits_test[0][:1], monkeypatch, release_for=release_for)


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_a_power_cut_at_any_point_leaves_the_old_or_the_new_state(env: Env, operation: str) -> None:
    sc = OPERATIONS[operation](env)
    problems, states = judge(sc, env.tmp / "states")
    print(f"{operation}: {len(sc.rec.points)} crash points, {states} distinct states, fsync sites "
          f"{dict(sc.rec.sites)}")
    assert states >= 3
    assert not problems, f"{len(problems)} of {states} crash states are broken:\n" + "\n".join(problems[:12])


# --- every fsync is needed ------------------------------------------------------------------------------

# Each fsync call site of the durable-write paths (named by the recorder: the function calling
# os.fsync, or fsync_dir and its caller), and the operation whose invariant breaks without it.
SITES = {
    "fsutil.atomic_write": "install",  # the new file's data: state.json would come back empty
    "fsync_dir<fsutil.atomic_write": "install",  # the rename: an install that returned could be undone
    "fsync_dir<fsutil.make_private_dir": "provision",  # a new data dir: the whole board could vanish
    "fsutil.shred_file": "rollback",  # the overwrite: the dropped bundle's key would stay on the disk
    "fsync_dir<fsutil.shred_file": "rollback",  # the unlink: the dropped bundle's key would come back
    "audit.AuditLog._checkpoint": "audit",  # records before the head that names them
    "audit.AuditLog._open": "audit",  # the full segment, before the log moves to the next one
    "fsync_dir<audit.AuditLog._open": "audit",  # a new segment's name, before a checkpoint names its records
    "fsync_dir<wipe.complete": "wipe",  # the marker's removal: a completed wipe stays complete
}
# Sites the scenarios above do not reach; each has its own tests (tests/test_upgrade.py, the key
# rotation in tests/test_commands.py) and is listed here so that a new site fails the check below.
NOT_SIMULATED = {
    "datadir.DataDir.rotate_box_key", "fsync_dir<upgrade.upgrade", "fsync_dir<audit.AuditLog._finish_prune",
}


def test_every_fsync_site_the_operations_reach_has_a_removal_test(env: Env) -> None:
    seen: set[str] = set()
    for op in OPERATIONS.values():
        sc = op(env)
        seen |= set(sc.rec.sites)
        env.mp.undo()
    assert seen - set(SITES) - NOT_SIMULATED == set(), "a new fsync site: add it to SITES with what it protects"
    assert set(SITES) <= seen, f"sites no operation reaches any more: {set(SITES) - seen}"


@pytest.mark.parametrize("site", sorted(SITES))
def test_removing_any_fsync_makes_the_checker_find_a_broken_state(env: Env, site: str) -> None:
    env.disabled = (site,)
    sc = OPERATIONS[SITES[site]](env)
    assert sc.rec.skipped[site] > 0, f"{site} was not reached by the {SITES[site]} operation"
    problems, states = judge(sc, env.tmp / "states", stop_at_first=True)
    print(f"without {site}: {problems[:1]}")
    assert problems, f"without the fsync at {site}, all {states} crash states of {SITES[site]} still pass"


# --- real SIGKILLs at each durable step -------------------------------------------------------------------


@dataclasses.dataclass
class KillCase:
    base: Path  # the board before the operation (copied for each trial)
    argv: list[str]  # the child's command, with {D} for the trial's copy
    view: View
    between: tuple[Any, ...] = ()  # views of the states between the operation's steps, also acceptable


KILLED = ("install", "rollback", "token add", "token revoke", "wipe", "outbox")


def kill_case(env: Env, name: str) -> KillCase:
    """One of the board's operations as the CLI runs it (the outbox through its Python API)."""
    if name == "install":
        b = env.board("k-install")
        b.agent().install_file(env.bundle(b, 1))
        return KillCase(b.data_dir, ["install", str(env.bundle(b, 2)), "--data-dir", "{D}"], env.view)
    if name == "rollback":
        b = env.board("k-rollback")
        for v in (1, 2):
            b.agent().install_file(env.bundle(b, v))
        return KillCase(b.data_dir, ["rollback", "--data-dir", "{D}"], env.view)
    if name.startswith("token"):
        b = env.board("k-" + name.replace(" ", "-"))
        first, _ = b.agent().tokens().add("user", utcnow())
        argv = ["token", "add", "--role", "admin"] if name == "token add" else ["token", "revoke", first.id]
        return KillCase(b.data_dir, [*argv, "--data-dir", "{D}"], env.view)
    if name == "outbox":
        d = env.tmp / "k-outbox"
        d.mkdir(mode=0o700)
        box = Outbox(d / layout.OUTBOX, 100)
        box.add([Item(INFO_EVENT, outbox_build) for _ in range(3)])
        box.close()
        added = shutil.copytree(d, env.tmp / "k-outbox-added")  # the child adds three, then acks two
        box = Outbox(added / layout.OUTBOX, 100)
        box.add([Item(INFO_EVENT, outbox_build) for _ in range(3)])
        box.close()
        return KillCase(d, ["outbox", f"{{D}}/{layout.OUTBOX}", "3"], outbox_view, (outbox_view(added),))
    assert name == "wipe"
    board, bundles = live_board(env.tmp / "k-wipe", env.tmp / "k-wipe.json", env.publisher, env.pack_for,
                                env.digits.onnx, models=1)
    sign_pub, kek = sign_public(board), (board.data_dir / layout.KEK).read_bytes()

    def wipe_view(d: Path) -> Any:
        return _wipe_view(d, kek, sign_pub, bundles, env.x)

    return KillCase(board.data_dir, ["wipe", "--data-dir", "{D}", "--yes"], wipe_view)


_runs = itertools.count()


def run_child(case: KillCase, work: Path, kill_at: int, steps: str = "fsync") -> tuple[Path, int, int, str]:
    """Run the operation on a copy of its board, SIGKILLed before durable step ``kill_at`` (0:
    never) of kind ``steps`` (tests.crashsim.child_main); returns the copy, the exit status, the
    steps taken and stderr."""
    d = work / f"{case.base.name}-{kill_at}-{next(_runs)}"
    shutil.copytree(case.base, d, symlinks=True)
    count = work / f"{d.name}.steps"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWARD_")}
    env[KEK_FILE_ENV] = str(d / layout.KEK)
    env["PYTHONPATH"] = str(ROOT)
    argv = [a.replace("{D}", str(d)) for a in case.argv]
    r = subprocess.run([sys.executable, "-m", "tests.crashsim", f"{steps}:{kill_at}", str(count), "--", *argv], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    steps = int(count.read_text()) if count.exists() else 0
    return d, r.returncode, steps, r.stderr


def sigkill_trials(case: KillCase, work: Path, points: list[int], steps: str = "fsync") -> list[str]:
    """Kill the operation at each of ``points`` (parallel children); judge each board left."""
    before = case.view(case.base)
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda k: run_child(case, work, k, steps), points))
    after = None
    problems = []
    for k, (d, rc, _, err) in zip(points, runs, strict=True):
        if rc != -signal.SIGKILL:
            problems.append(f"killed before step {k}: exited {rc} by itself: {err[-300:]}")
            continue
        try:
            got = case.view(d)
        except Exception as e:  # noqa: BLE001 - every failure to come back is the finding
            problems.append(f"killed before step {k}: {type(e).__name__}: {e}")
            continue
        if got != before and got not in case.between:
            if after is None:
                d0, rc0, _, err0 = run_child(case, work, 0)
                assert rc0 == 0, err0
                after = case.view(d0)
            if got != after:
                problems.append(f"killed before step {k}: found {got}; expected {before} or {after}")
        shutil.rmtree(d)
    return problems


@pytest.mark.parametrize("operation", [
    # A wipe takes 16 fsyncs: killed at each one with EDGEWARD_SLOW=1; the default suite kills it
    # at random moments 60 times (tests/test_wipe_faults.py) and simulates every power cut above.
    pytest.param(op, marks=pytest.mark.slow) if op == "wipe" else op for op in KILLED
])
def test_sigkill_before_each_durable_step_leaves_the_old_or_the_new_state(env: Env, operation: str) -> None:
    case = kill_case(env, operation)
    work = env.tmp / "kills"
    work.mkdir()
    _, rc, steps, err = run_child(case, work, 0)
    assert rc == 0, err
    assert steps >= 2
    problems = sigkill_trials(case, work, list(range(1, steps + 1)))
    print(f"{operation}: {steps} durable steps, each killed")
    assert not problems, "\n".join(problems[:12])


SLOW_TRIALS = int(os.environ.get("EDGEWARD_POWERLOSS_TRIALS", "2000"))
SEED_ENV = "EDGEWARD_POWERLOSS_SEED"


@pytest.mark.slow
def test_thousands_of_random_sigkills_leave_the_old_or_the_new_state(env: Env) -> None:
    """Random operations killed at random durable steps (every ``os`` step counted, writes too
    through the SQLite statements of the outbox), by the thousand."""
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**32))
    print(f"\n{SEED_ENV}={seed}")
    rng = random.Random(seed)
    kill_env = {name: kill_case(env, name) for name in KILLED}
    work = env.tmp / "kills"
    work.mkdir()
    steps = {}
    for name, case in kill_env.items():
        d, rc, steps[name], err = run_child(case, work, 0, "all")
        assert rc == 0, err
        shutil.rmtree(d)
    plan: dict[str, list[int]] = {name: [] for name in kill_env}
    for _ in range(SLOW_TRIALS):
        name = rng.choice(sorted(kill_env))
        plan[name].append(rng.randint(1, steps[name]))
    problems = []
    for name, points in plan.items():
        problems += [f"{name} (seed {seed}): {p}" for p in sigkill_trials(kill_env[name], work, points, "all")]
    assert not problems, f"{len(problems)} of {SLOW_TRIALS} trials broken:\n" + "\n".join(problems[:20])


# --- SQLite's own part of the bargain ----------------------------------------------------------------------


def test_the_outbox_comes_back_at_a_committed_state_from_a_wal_cut_anywhere(tmp_path: Path) -> None:
    """The outbox model above takes SQLite's guarantee on trust (a returned COMMIT is durable, a
    torn one is ignored). Checked here on SQLite itself: the write-ahead log as it stood after
    five commits, cut at every frame boundary and in the middle of every frame (a power cut while
    SQLite wrote it), always opens at one of the committed states, with its hash chain intact."""
    live = tmp_path / "live"
    live.mkdir()
    box = Outbox(live / layout.OUTBOX, 100)

    def snapshot(name: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        for suffix in ("", "-wal"):
            if (live / f"{layout.OUTBOX}{suffix}").exists():
                shutil.copyfile(live / f"{layout.OUTBOX}{suffix}", d / f"{layout.OUTBOX}{suffix}")
        return d

    committed = [outbox_view(snapshot("commit-0"))]
    for i in range(1, 6):
        box.add([Item(INFO_EVENT, outbox_build), Item(INFO_EVENT, outbox_build)])
        committed.append(outbox_view(snapshot(f"commit-{i}")))
    page = box._db.execute("PRAGMA page_size").fetchone()[0]
    final = snapshot("final")
    box.close()
    wal = (final / f"{layout.OUTBOX}-wal").read_bytes()
    frame = 24 + page
    assert len(wal) > 32 + 5 * frame, "the commits are not in the write-ahead log"
    cuts = sorted({*range(32, len(wal) + 1, frame), *range(32 + frame // 2, len(wal), frame), 0, 7})
    seen = set()
    for cut in cuts:
        d = tmp_path / f"cut-{cut}"
        d.mkdir()
        shutil.copyfile(final / layout.OUTBOX, d / layout.OUTBOX)
        (d / f"{layout.OUTBOX}-wal").write_bytes(wal[:cut])
        got = outbox_view(d)
        assert got in committed, f"a WAL cut at byte {cut} of {len(wal)} opens at a state never committed"
        seen.add(committed.index(got))
    assert seen == set(range(len(committed))), f"cuts reached only the commits {sorted(seen)}"

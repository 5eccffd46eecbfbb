"""Faults during a wipe, and what a wiped board leaves on its disk.

1. SIGKILL at random points of ``edgeward-agent wipe``: whatever the moment, the next command
   leaves the board either untouched (the kill came before the ``WIPING`` marker) or wiped, with
   only a valid, signed ``wipe-attestation.json`` left.
2. The raw bytes of a real ext4 filesystem (a loop-mounted image file) after a wipe: no key the
   board held and no window of the model's plaintext are anywhere on it, and nothing that
   survives opens a copy of the old bundle.

Real keys, real bundles of the digits model, the real CLI in subprocesses; no mocks.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import pytest

from device_agent import Agent, crypto
from device_agent.bundle.format import verify_bundle
from device_agent.bundle.keyfiles import load_public_key_file
from device_agent.errors import EdgeWardError, SecurityRefusal
from device_agent.service.audit import AuditLog
from device_agent.store import layout
from device_agent.store.datadir import BUNDLE_KEYS_PURPOSE, DataDir, utcnow
from device_agent.store.keys import KEK_FILE_ENV, KeySource
from device_agent.store.wipe import verify_attestation
from device_agent.trust import sealed
from tests.conftest import Board, tree_snapshot

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "pi-wipe"
SEED_ENV = "EDGEWARD_WIPE_FAULT_SEED"  # set it to replay a run: the seed is printed and in every failure


def cli(env: dict[str, str], *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "device_agent.cli", *argv], env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=ROOT)


def board_env(kek: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWARD_")}
    env[KEK_FILE_ENV] = str(kek)
    return env


def live_board(
    data: Path, enrolment: Path, publisher: Path, pack_for: Callable[..., Path], model: Path, models: int,
    versions: int = 2,
) -> tuple[Board, list[str]]:
    """A board as it is in service: its key file in the data dir (so the wipe shreds it too),
    ``models`` models installed in ``versions`` versions each (a bundle and a sealed content key
    per version kept: the current and the previous), an API token, a security event and an audit
    log with its fingerprint key. Its public enrolment goes to ``enrolment``. Returns the board
    and the ids of its stored bundles."""
    data.mkdir(mode=0o700)
    kek = data / layout.KEK
    fd = os.open(kek, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(32))
    os.close(fd)
    src = KeySource(kek=kek.read_bytes(), kek_path=kek)
    enrolment.write_bytes(Agent.provision(data, DEVICE, [load_public_key_file(publisher / "publisher.pub")], [], src))
    board = Board(data, enrolment, DEVICE, src)
    agent = board.agent()
    for i in range(models):
        for v in range(1, versions + 1):
            agent.install((pack_for(model, [board], version=v, model_id=f"digits-{i}") / f"{DEVICE}.ewb").read_bytes())
    agent.tokens().add("user", utcnow())
    agent.record_event("tamper", "warning", {"problem": "a test event"})
    audit = AuditLog(agent.store.audit_dir)
    audit.append({"event": "predict", "model_id": "digits-0"}, time.time())
    audit.close()
    bundles = sorted(p.stem for p in agent.store.bundles.glob("*.ewb"))
    assert len(bundles) == models * min(versions, 2)
    assert agent.store.layout.problems() == []
    return board, bundles


def sign_public(board: Board) -> bytes:
    return base64.b64decode(json.loads(board.enrolment.read_text())["sign_public"])


def wiped_problems(data: Path, sign_pub: bytes, bundles: list[str]) -> list[str]:
    """What keeps ``data`` from being a completed wipe: exactly the attestation, valid and signed."""
    left = sorted(f.rel for f in layout.Layout(data).scan())
    if left != [layout.ATTESTATION]:
        strays = [rel for rel in left if rel != layout.ATTESTATION]
        return [f"{len(strays)} file(s) left besides the attestation, e.g. {strays[:6]}"
                + ("" if layout.ATTESTATION in left else "; no attestation")]
    doc = json.loads((data / layout.ATTESTATION).read_text())
    try:
        body = verify_attestation(doc, sign_pub)
    except EdgeWardError as e:
        return [f"the attestation does not verify: {e}"]
    problems = []
    if body["device_id"] != DEVICE or body["bundles_destroyed"] != bundles:
        problems.append(f"the attestation names {body['device_id']} and {body['bundles_destroyed']}")
    if body["key_encryption_key"] != "key file in the data dir" or not doc.get("completed"):
        problems.append(f"the attestation is incomplete: {doc}")
    return problems


# --- 1. SIGKILL during a wipe -----------------------------------------------------------------------

MODELS = 48  # x 2 versions: 96 bundles and 96 sealed content keys, so the wipe shreds ~100 files
TRIALS = 60
SPREAD = 1.2  # kill delays cover 0 .. 1.2 x a whole wipe command's run (before, during and after)


def test_sigkill_at_any_moment_of_a_wipe_leaves_the_board_untouched_or_wiped(
    tmp_path: Path, publisher: Path, pack_for: Callable[..., Path], digits: Any
) -> None:
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**32))
    print(f"\n{SEED_ENV}={seed}")
    rng = random.Random(seed)
    started = time.monotonic()
    board, bundles = live_board(
        tmp_path / "board", tmp_path / "enrolment.json", publisher, pack_for, digits.onnx, MODELS
    )
    sign_pub = sign_public(board)
    before = tree_snapshot(board.data_dir)
    prepared = time.monotonic() - started

    def copy(name: str) -> tuple[Path, dict[str, str]]:
        dst = tmp_path / name
        shutil.copytree(board.data_dir, dst, symlinks=True)
        return dst, board_env(dst / layout.KEK)

    # How long a whole `wipe` command runs (interpreter start to exit), and when its marker
    # exists, watched from outside on copies of the board (polled, leaving the CPU to the wipe).
    runs, windows = [], []
    for i in range(5):
        data, env = copy(f"calibrate-{i}")
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "device_agent.cli", "wipe", "--data-dir", str(data), "--yes"],
                                env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        seen: list[float] = []
        while proc.poll() is None:
            if (data / layout.WIPE_MARKER).exists():
                seen.append(time.monotonic() - t0)
            time.sleep(0.0005)
        runs.append(time.monotonic() - t0)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        proc.stderr.close()  # type: ignore[union-attr]
        assert wiped_problems(data, sign_pub, bundles) == []
        if seen:
            windows.append((seen[0], seen[-1]))
        shutil.rmtree(data)
    whole = median(runs)
    print(f"prepared {MODELS * 2} bundles in {prepared:.1f} s; a wipe command runs {whole * 1000:.0f} ms; its "
          f"marker was seen at " + ", ".join(f"{a * 1000:.0f}-{b * 1000:.0f} ms" for a, b in windows))

    # Stratified: one delay drawn at random in each of TRIALS equal slices of 0 .. SPREAD x whole.
    delays = [(i + rng.random()) / TRIALS * SPREAD * whole for i in range(TRIALS)]
    rng.shuffle(delays)
    phases: Counter[str] = Counter()
    mid_progress: Counter[str] = Counter()
    failures: list[str] = []
    def trial(n: int, delay: float) -> None:
        data, env = copy(f"trial-{n:03d}")
        proc = subprocess.Popen([sys.executable, "-m", "device_agent.cli", "wipe", "--data-dir", str(data), "--yes"],
                                env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        time.sleep(delay)
        exited_by_itself = proc.poll() is not None
        if not exited_by_itself:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        where = f"seed {seed}, trial {n}, killed after {delay * 1000:.1f} ms"
        if proc.returncode not in (0, -signal.SIGKILL):
            failures.append(f"{where}: the wipe failed by itself ({proc.returncode}): {err.decode()[-500:]}")
            return
        names = {f.rel for f in layout.Layout(data).scan()}
        if proc.returncode == 0 or (layout.ATTESTATION in names and layout.WIPE_MARKER not in names):
            phase = "after"  # the wipe had completed (and maybe exited)
        elif layout.WIPE_MARKER in names:
            phase = "during"
            mid_progress[
                "keys.wrapped not yet shredded" if layout.KEYS in names
                else "bundle keys being shredded" if any(name.endswith(".key") for name in names)
                else "files being deleted" if layout.DEVICE in names
                else "attestation being written" if layout.ATTESTATION not in names
                else "marker being removed"
            ] += 1
        else:
            phase = "before"
            if any(name.startswith(f".{layout.WIPE_MARKER}.tmp-") for name in names):
                mid_progress["(before) killed while writing the marker"] += 1
        phases[phase] += 1
        where += f" ({phase} the wipe)"

        if phase == "before":
            # Untouched: every file as it was (a marker's temporary file at most besides), status
            # works, and a second wipe completes.
            now = {k: v for k, v in tree_snapshot(data).items() if not k.startswith(f".{layout.WIPE_MARKER}.tmp-")}
            if now != before:
                changed = sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))
                failures.append(f"{where}: the board changed although the wipe had not started: "
                                f"{len(changed)} file(s), e.g. {changed[:6]}")
        r = cli(env, "status", "--data-dir", str(data), "--json")
        if r.returncode != 0:
            failures.append(f"{where}: 'status' after the kill failed ({r.returncode}): {r.stderr[-500:]}")
            return
        status = json.loads(r.stdout)
        if phase == "before":
            if status.get("wiped") or len(status["models"]) != MODELS or status["data_dir_problems"]:
                failures.append(f"{where}: the board is not intact: {status}")
            r = cli(env, "wipe", "--data-dir", str(data), "--yes")
            if r.returncode != 0:
                failures.append(f"{where}: a second wipe failed ({r.returncode}): {r.stderr[-500:]}")
        elif not status.get("wiped") or not status.get("signed"):
            failures.append(f"{where}: 'status' does not report a signed wipe: {status}")
        problems = wiped_problems(data, sign_pub, bundles)
        failures.extend(f"{where}: {p}" for p in problems)
        if not problems:
            shutil.rmtree(data)  # failed trials are kept for a look

    for n, delay in enumerate(delays):
        trial(n, delay)
    # On a loaded machine a wipe can run slower (or faster) than it did while calibrating, and the
    # slices can miss a phase: top up with kills aimed at the phase that is short (at most 12).
    marker_at = min((a for a, _ in windows), default=0.0)
    aims = {"before": lambda: rng.random() * 0.8 * marker_at,
            "during": lambda: rng.uniform(*(rng.choice(windows) if windows else (0.0, whole))),
            "after": lambda: whole * rng.uniform(1.5, 3.0)}
    for extra in range(12):
        short = [ph for ph in ("during", "before", "after") if phases[ph] < 3]
        if not short:
            break
        trial(TRIALS + extra, aims[short[0]]())

    took = time.monotonic() - started
    print(f"{sum(phases.values())} kills in {took:.1f} s: {dict(phases)}; during the wipe: {dict(mid_progress)}")
    assert not failures, f"{len(failures)} trial(s) did not end wiped or untouched:\n" + "\n".join(failures[:20])
    assert phases["during"] >= 3, (
        f"only {phases['during']} of {TRIALS} kills landed while the marker existed ({dict(phases)}, seed {seed}): "
        "the trial does not exercise a resumed wipe"
    )
    assert phases["before"] >= 3 and phases["after"] >= 3, f"kills too lopsided: {dict(phases)}, seed {seed}"


# --- 2. The raw disk after a wipe -------------------------------------------------------------------

IMAGE_BYTES = 64 * 1024**2
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def raw_disk_unavailable() -> str | None:
    """Why a loop-mounted ext4 image cannot be made here, or None."""
    if os.geteuid() != 0:
        return "not root: mounting a loop device needs root"
    for tool in ("mkfs.ext4", "losetup", "mount", "umount"):
        if shutil.which(tool, path=SBIN_PATH) is None:
            return f"{tool} is not installed (scripts/test.sh installs e2fsprogs and mount)"
    r = subprocess.run([shutil.which("losetup", path=SBIN_PATH) or "losetup", "--find"], capture_output=True,
                       text=True)
    if r.returncode != 0:
        return f"no free loop device: {r.stderr.strip()}"
    return None


def sbin(tool: str, *argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([shutil.which(tool, path=SBIN_PATH) or tool, *map(str, argv)], capture_output=True,
                          text=True, timeout=60)


@contextmanager
def mounted_image(image: Path, mnt: Path) -> Iterator[Callable[[], None]]:
    """A fresh ext4 filesystem in ``image`` mounted on ``mnt`` through a loop device, with the
    default options a board's card gets (no discard: freed blocks keep their bytes). Yields a
    function that unmounts and detaches it; whatever happens, both are undone on exit."""
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    r = sbin("mkfs.ext4", "-q", "-F", "-L", "edgeward-test", image)
    assert r.returncode == 0, r.stderr
    r = sbin("losetup", "--find", "--show", image)
    if r.returncode != 0:
        pytest.skip(f"no loop device could be attached: {r.stderr.strip()}")
    loop = r.stdout.strip()
    state = {"mounted": False, "attached": True}

    def release() -> None:
        if state["mounted"]:
            r = sbin("umount", mnt)
            assert r.returncode == 0, f"umount {mnt}: {r.stderr}"
            state["mounted"] = False
        if state["attached"]:
            r = sbin("losetup", "--detach", loop)
            assert r.returncode == 0, f"losetup --detach {loop}: {r.stderr}"
            state["attached"] = False

    try:
        mnt.mkdir()
        r = sbin("mount", "-t", "ext4", loop, mnt)
        if r.returncode != 0:
            pytest.skip(f"the loop device {loop} cannot be mounted here: {r.stderr.strip()}")
        state["mounted"] = True
        yield release
    finally:
        if state["mounted"]:
            sbin("umount", "--lazy", mnt)
        if state["attached"]:
            sbin("losetup", "--detach", loop)


def nonzero_regions(image: bytes, block: int = 4096) -> bytes:
    """The image with its runs of all-zero blocks left out, for faster searching, keeping every
    place a needle with a non-zero byte could be: all non-zero blocks and their neighbours (a
    64-byte needle spans at most two blocks), runs of adjacent kept blocks kept whole, and runs
    separated by 64 bytes of 0xA5 (no needle here can match across one but a random one could,
    with negligible odds; a false match would fail the test, never pass it)."""
    blocks = np.frombuffer(image, dtype=np.uint8).reshape(-1, block).any(axis=1)
    keep = blocks.copy()
    keep[1:] |= blocks[:-1]
    keep[:-1] |= blocks[1:]
    edges = np.flatnonzero(np.diff(np.concatenate(([0], keep.astype(np.int8), [0]))))
    return (b"\xa5" * 64).join(image[s * block : e * block] for s, e in zip(edges[::2], edges[1::2], strict=True))


def windows(plain: bytes, offsets: Iterable[int]) -> list[bytes]:
    """The 64-byte windows of ``plain`` at ``offsets``, less the low-entropy ones (runs of zeros,
    padding: such bytes are everywhere on a disk and prove nothing)."""
    return [w for w in (plain[o : o + 64] for o in offsets) if len(set(w)) >= 16]


def test_after_a_wipe_no_key_and_no_model_plaintext_is_on_the_raw_disk(
    tmp_path: Path, publisher: Path, pack_for: Callable[..., Path], digits: Any
) -> None:
    reason = raw_disk_unavailable()
    if reason:
        pytest.skip(reason)
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**32))
    print(f"\n{SEED_ENV}={seed}")
    rng = random.Random(seed)
    started = time.monotonic()
    image, mnt = tmp_path / "card.img", tmp_path / "mnt"
    with mounted_image(image, mnt) as release:
        # The enrolment is kept off the card: only what the agent writes is on it.
        board, bundles = live_board(
            mnt / "board", tmp_path / "enrolment.json", publisher, pack_for, digits.onnx, models=1
        )
        store = DataDir(board.data_dir)
        publishers = [load_public_key_file(publisher / "publisher.pub")]

        # Everything secret the board holds, unwrapped in this process before the wipe.
        keys = store.unlock(board.keys)
        key_material: dict[str, bytes] = {
            "key-encryption key (kek.bin)": bytes(board.keys.kek or b""),
            "X25519 box private key": bytes(keys.box_private),
            "Ed25519 identity seed": bytes(keys.sign_seed),
            "board secret": bytes(keys.board_secret or b""),
            "sealing key (from the board secret)": bytes(sealed.sealing_key(keys.board_secret or b"")),
            "bundle-keys key (from the board secret)": bytes(
                crypto.derive_key(keys.board_secret or b"", BUNDLE_KEYS_PURPOSE)),
            "audit fingerprint key": (store.audit_dir / "fingerprint.key").read_bytes(),
        }
        plaintexts = set()
        old_bundles: dict[str, bytes] = {}
        for bid in bundles:
            content_key = store.read_bundle_key(bid, keys)
            key_material[f"content key of bundle {bid}"] = bytes(content_key)
            old_bundles[bid] = store.bundle_path(bid).read_bytes()
            contents = verify_bundle(old_bundles[bid], publishers).decrypt_with(content_key, check_digest=True)
            plaintexts.add(bytes(contents.model))
            contents.wipe()
        keys.wipe()
        assert len(key_material) == 9 and all(len(k) == 32 for k in key_material.values())
        (plaintext,) = plaintexts  # the same model in both versions
        # The shredded files themselves: the key file, the wrapped keys, the audit key and the
        # sealed content keys.
        shredded = {
            f.rel: (board.data_dir / f.rel).read_bytes() for f in store.layout.scan()
            if f.entry is not None and f.entry.fate is layout.Fate.SHRED
        }
        assert len(shredded) == 3 + len(bundles), sorted(shredded)

        r = cli(board_env(board.data_dir / layout.KEK), "wipe", "--data-dir", str(board.data_dir), "--yes", "--json")
        assert r.returncode == 0, r.stderr
        assert wiped_problems(board.data_dir, sign_public(board), bundles) == []
        assert sorted(p.relative_to(mnt).as_posix() for p in mnt.rglob("*") if p.name != "lost+found") == [
            "board", f"board/{layout.ATTESTATION}"]

        # Nothing that survives opens the old bundles: no keys.wrapped, even for the key file's holder...
        with pytest.raises(SecurityRefusal, match="was wiped"):
            store.unlock(board.keys)
        # ... and no 32 bytes of the surviving file (raw, or a base64 field decoded) is a key that
        # opens a bundle's sealed content key, as the board's box key or its board secret.
        attestation = (board.data_dir / layout.ATTESTATION).read_bytes()
        candidates = {attestation[i : i + 32] for i in range(len(attestation) - 31)}
        for value in json.loads(attestation)["body"].values():
            try:
                decoded = base64.b64decode(str(value), validate=True)
            except ValueError:
                continue
            candidates |= {decoded[i : i + 32] for i in range(len(decoded) - 31)}
        for bid, data in old_bundles.items():
            vb = verify_bundle(data, publishers)
            for candidate in candidates:
                with pytest.raises(EdgeWardError):
                    vb.open_key(bytearray(candidate))
                with pytest.raises(EdgeWardError):
                    crypto.open_local(crypto.derive_key(candidate, BUNDLE_KEYS_PURPOSE), bid.encode(),
                                      shredded[f"{layout.BUNDLES}/{bid}.key"])

        # Control: a deleted file's bytes stay on the raw disk (no discard), and the scan finds them.
        canary = os.urandom(16 * 1024)
        (mnt / "canary").write_bytes(canary)
        os.sync()
        (mnt / "canary").unlink()
        release()

    raw = image.read_bytes()
    haystack = nonzero_regions(raw)
    assert canary[:64] in haystack and canary[-64:] in haystack, "control: a deleted file's bytes were not found"

    on_disk = [name for name, key in key_material.items() if key in haystack]
    assert not on_disk, f"key material found on the raw disk after the wipe: {on_disk}"
    left = [f"{rel} (bytes {i}-{i + 63})" for rel, data in shredded.items()
            for i in range(0, max(len(data) - 63, 1), 64) if data[i : i + 64] in haystack]
    assert not left, f"shredded files still readable on the raw disk: {left}"
    # Every 64-byte window of the model at an offset that is a multiple of 64, and some at random
    # offsets. That suffices: any run of 127 or more consecutive plaintext bytes, wherever it lies
    # on the disk and wherever it starts in the model, contains one whole aligned window. The
    # agent never writes a decrypted model at all (bundles are decrypted in memory), so a leak
    # would be a whole file, or a whole page swapped or cached to a file: data written in
    # filesystem blocks of 4 KiB, each holding 4 KiB of consecutive bytes, far more than 127.
    aligned = windows(plaintext, range(0, len(plaintext) - 63, 64))
    assert len(aligned) >= 0.9 * (len(plaintext) // 64), f"only {len(aligned)} windows of the model are searchable"
    searched = aligned + windows(plaintext, [rng.randrange(len(plaintext) - 63) for _ in range(32)])
    found = [w for w in searched if w in haystack]
    assert not found, f"{len(found)} of {len(searched)} 64-byte windows of the model's plaintext are on the raw disk"
    # A second control, and the reason for a cryptographic erase: the bundles the wipe deleted
    # are still on the raw disk (deleting frees blocks, it does not erase them), only unreadable.
    chunks = [data[i : i + 64] for data in old_bundles.values() for i in range(0, len(data) - 63, 4096)]
    assert any(c in haystack for c in chunks), (
        "control: none of the deleted bundles' ciphertext is on the raw disk; if the wipe now overwrites "
        "bundles too, this control no longer applies"
    )
    print(f"raw-disk scan of {len(raw) >> 20} MiB ({len(haystack) >> 10} KiB not zero) in "
          f"{time.monotonic() - started:.1f} s: {len(key_material)} keys, {len(shredded)} shredded files and "
          f"{len(searched)} plaintext windows absent; {sum(c in haystack for c in chunks)} of {len(chunks)} "
          "sampled chunks of the deleted bundles' ciphertext still there")
    image.unlink()  # 64 MiB; kept when the test fails, for a look

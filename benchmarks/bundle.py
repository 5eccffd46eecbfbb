#!/usr/bin/env python3
"""Bundle benchmarks: open throughput, open memory, pack time and pack memory.

Run from the repository root (``benchmarks/run.sh`` does it for every benchmark):

    .venv/bin/python benchmarks/bundle.py [--reps N] [--quick]

What it measures, each figure printed next to its target with PASS/MISS:

1. Bundle open throughput -- ``verify_bundle(data, publishers)`` then ``.decrypt(device_private)``
   -- as a ratio of the raw AEAD throughput (``cryptography``'s ``decrypt_into`` over the same
   1 MiB chunking, same cipher, same bytes, into a buffer allocated once), for ChaCha20-Poly1305
   and AES-256-GCM, on a 100 MiB random model with compression off. Median of ``--reps``
   interleaved runs. Target: ratio >= 0.7. A breakdown of where the open time goes follows.
2. Peak extra memory opening the 100 MiB model, each case in a fresh subprocess: VmHWM (peak
   RSS, reset through /proc/self/clear_refs just before) minus VmRSS before, divided by the model
   size. The target case reads the bundle with ``Path.read_bytes()`` as ``device_agent.agent``
   does. Informational rows: the same library calls on an ``mmap`` of the file, and the agent's
   full load path (which also copies the model with ``bytes(contents.model)`` for the runtime).
   Target: <= 1.5x the model size.
3. ``packager.pack.pack`` of a 5 MiB model for 1,000 devices (target < 60 s on 2 cores) and for
   100 devices, each in its own subprocess, with peak extra RSS for both (target: memory does not
   grow with the device count -- peak(1000) <= 1.1 x peak(100) + 1 MiB). Enrolments are real
   signed enrolment files (the format ``edgeward-agent provision --export`` writes), verified by
   ``load_enrolments``; they are made directly with ``Enrolment`` + Ed25519 because
   ``Agent.provision`` spends most of its time in Argon2 key wrapping.

Artefacts go to a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MIB = 1024 * 1024
OPEN_MODEL_BYTES = 100 * MIB
PACK_MODEL_BYTES = 5 * MIB
PACK_DEVICES = (1000, 100)

TARGET_RATIO = 0.7
TARGET_MEM = 1.5
TARGET_PACK_S = 60.0


# --- helpers used by the parent and the children --------------------------------------------------


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_since(before: dict[str, int], reset: bool) -> int:
    """Peak RSS reached since ``before`` was taken, in bytes."""
    if reset:
        return proc_status()["VmHWM"]
    # Fallback: ru_maxrss is the lifetime peak (KiB on Linux); only valid if nothing before peaked higher.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(args: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[:2]} failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- children ---------------------------------------------------------------------------------------


def child_open_memory(mode: str, bundle: str, keyfile: str) -> None:
    """Open one bundle in a fresh process and print peak extra memory as JSON."""
    import gc

    from device_agent.bundle import verify_bundle

    keys = json.loads(Path(keyfile).read_text())
    device_private = bytearray.fromhex(keys["device_private"])
    publisher = bytes.fromhex(keys["publisher_public"])
    path = Path(bundle)
    gc.collect()
    before = proc_status()
    reset = reset_peak()
    t0 = time.perf_counter()
    keep: list[object] = []
    if mode == "read_bytes":  # device_agent.agent: Store.read_bundle / CLI install -> read_bytes()
        data = path.read_bytes()
        contents = verify_bundle(data, [publisher]).decrypt(device_private)
        keep += [data, contents]
    elif mode == "mmap":  # the same library calls on a read-only mapping of the file
        f = open(path, "rb")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        contents = verify_bundle(mm, [publisher]).decrypt(device_private)
        keep += [f, mm, contents]
    elif mode == "agent_load":  # Agent._load / install: ... + bytes(contents.model) for load_runner
        data = path.read_bytes()
        contents = verify_bundle(data, [publisher]).decrypt(device_private)
        model_bytes = bytes(contents.model)
        keep += [data, contents, model_bytes]
    else:
        raise SystemExit(f"unknown mode {mode}")
    seconds = time.perf_counter() - t0
    after = proc_status()
    peak = peak_since(before, reset)
    print(
        json.dumps(
            {
                "mode": mode,
                "seconds": seconds,
                "model_bytes": len(contents.model),
                "extra_peak": peak - before["VmRSS"],
                "extra_anon_end": after["RssAnon"] - before["RssAnon"],
                "extra_file_end": after["RssFile"] - before["RssFile"],
                "hwm_reset": reset,
            }
        )
    )


def child_pack(devices_dir: str, count: int, out_dir: str) -> None:
    """Pack a 5 MiB random model for ``count`` enrolled devices; print time and peak memory."""
    import gc

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from packager.modelfile import ModelFile
    from packager.pack import PackOptions, load_enrolments, pack
    from packager.profiles import load_profile

    files = sorted(Path(devices_dir).glob("*.json"))[:count]
    assert len(files) == count, f"only {len(files)} enrolments"
    signer = Ed25519PrivateKey.generate()
    profile = load_profile("rpi4b")
    opts = PackOptions(model_id="bench", model_version=1, compress=False)
    model = ModelFile(Path("bench.onnx"), os.urandom(PACK_MODEL_BYTES), "onnx")
    gc.collect()
    before = proc_status()
    reset = reset_peak()
    t0 = time.perf_counter()
    enrolments = load_enrolments(files)
    t1 = time.perf_counter()
    result = pack(model, profile, signer, enrolments, opts, Path(out_dir))
    t2 = time.perf_counter()
    peak = peak_since(before, reset)
    written = sum(r["size"] for r in result.bundles)
    print(
        json.dumps(
            {
                "devices": count,
                "load_enrolments_s": t1 - t0,
                "pack_s": t2 - t1,
                "prepare_s": result.report["seconds"]["prepare"],
                "bundles_s": result.report["seconds"]["bundles"],
                "bytes_written": written,
                "extra_peak": peak - before["VmRSS"],
                "hwm_reset": reset,
                "cipher": profile.cipher,
            }
        )
    )


# --- parent: set-up ---------------------------------------------------------------------------------


def make_open_bundles(tmp: Path) -> dict:
    """A 100 MiB random model packed (compression off) for one device, once per cipher."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_agent import crypto
    from device_agent.enrolment import Enrolment
    from packager.modelfile import ModelFile
    from packager.pack import PackOptions, pack
    from packager.profiles import load_profile

    signer = Ed25519PrivateKey.generate()
    box_private, box_public = crypto.new_box_keypair()
    dev = Enrolment("bench-open", box_public, crypto.ed25519_public_raw(Ed25519PrivateKey.generate()),
                    datetime.now(UTC))
    model = ModelFile(Path("bench.onnx"), os.urandom(OPEN_MODEL_BYTES), "onnx")
    opts = PackOptions(model_id="bench", model_version=1, compress=False)
    bundles = {}
    # rpi4b has no AES instructions -> ChaCha20-Poly1305; rpi5 has them -> AES-256-GCM.
    for profile_name in ("rpi4b", "rpi5"):
        profile = load_profile(profile_name)
        out = tmp / f"open-{profile_name}"
        pack(model, profile, signer, [dev], opts, out)
        bundles[profile.cipher] = out / "bench-open.ewb"
    keyfile = tmp / "open-keys.json"
    keyfile.write_text(json.dumps({"device_private": box_private.hex(),
                                   "publisher_public": crypto.ed25519_public_raw(signer).hex()}))
    return {"bundles": bundles, "device_private": box_private,
            "publisher_public": crypto.ed25519_public_raw(signer), "keyfile": keyfile}


def make_enrolments(d: Path, count: int) -> float:
    """Write ``count`` real signed enrolment files (as Agent.provision exports them)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_agent import crypto
    from device_agent.bundle import canonical_json
    from device_agent.enrolment import DOMAIN, Enrolment

    t0 = time.perf_counter()
    d.mkdir(parents=True)
    now = datetime.now(UTC)
    for i in range(count):
        _, box_public = crypto.new_box_keypair()
        signer = Ed25519PrivateKey.generate()
        e = Enrolment(f"dev-{i:05d}", box_public, crypto.ed25519_public_raw(signer), now)
        sig = crypto.sign(signer, DOMAIN, canonical_json(e.body()))
        (d / f"dev-{i:05d}.json").write_bytes(e.signed_bytes(sig))
    return time.perf_counter() - t0


# --- parent: measurements ---------------------------------------------------------------------------


def raw_decrypt(suite: str, key: bytes, aad: bytes, payload: memoryview, layout, out: bytearray) -> None:
    """The baseline: cryptography's decrypt_into over the bundle's own chunks, nothing else."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    from device_agent import crypto

    aead = ChaCha20Poly1305(key) if suite == crypto.CHACHA20 else AESGCM(key)
    dst = memoryview(out)
    stride = layout.chunk_size + 16
    n = layout.chunks
    for i, start, length, final in layout.spans():
        nonce = i.to_bytes(11, "big") + (b"\x01" if i == n - 1 else b"\x00")
        at = i * stride
        aead.decrypt_into(nonce, payload[at : at + length + 16], aad, dst[start : start + length])


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def timed_unpack(plain: bytes, reps: int) -> float:
    """Median ms of unpack_contents alone (the copy it works on is made outside the timing)."""
    from device_agent.bundle import unpack_contents

    times = []
    for _ in range(reps):
        buf = bytearray(plain)
        t0 = time.perf_counter()
        unpack_contents(buf)
        times.append(time.perf_counter() - t0)
        del buf
    return statistics.median(times) * 1e3


def bench_open_throughput(setup: dict, reps: int) -> list[dict]:
    import gc

    from device_agent import crypto
    from device_agent.bundle import verify_bundle

    rows = []
    for suite, path in setup["bundles"].items():
        data = path.read_bytes()
        vb = verify_bundle(data, [setup["publisher_public"]])
        m = vb.manifest
        layout = m.layout
        key = bytes(crypto.open_content_key(setup["device_private"], m.sealed_key))
        out = bytearray(layout.plaintext_length)  # allocated (and faulted in) once
        raw_times, open_times = [], []
        for _ in range(reps):
            gc.collect()
            t0 = time.perf_counter()
            raw_decrypt(suite, key, m.payload_aad, vb.payload, layout, out)
            raw_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            contents = verify_bundle(data, [setup["publisher_public"]]).decrypt(setup["device_private"])
            open_times.append(time.perf_counter() - t0)
            assert bytes(contents.model[:64]) == bytes(out[len(out) - len(contents.model) :][:64])
            del contents
        n = layout.plaintext_length
        t_raw, t_open = statistics.median(raw_times), statistics.median(open_times)

        # Where the open time goes: the same steps the library runs, one by one.
        plain = bytes(out)
        breakdown = {
            "verify_bundle (Ed25519 + manifest parse)": median_ms(
                lambda: verify_bundle(data, [setup["publisher_public"]]), reps),
            "open sealed content key (X25519 box)": median_ms(
                lambda: crypto.open_content_key(setup["device_private"], m.sealed_key), reps),
            "tags digest (gather + SHA-256)": median_ms(
                lambda: crypto.tags_digest(b"".join(
                    bytes(vb.payload[i * (layout.chunk_size + 16) + ln : i * (layout.chunk_size + 16) + ln + 16])
                    for i, _s, ln, _f in layout.spans())), reps),
            "bytearray(n) for the plaintext (zero-fill + page faults)": median_ms(
                lambda: bytearray(n), reps),
            "AEAD decrypt_into, buffer already faulted (= raw)": t_raw * 1e3,
            "unpack_contents (SHA-256 of the whole model again)": timed_unpack(plain, reps),
        }
        del plain
        rows.append({"suite": suite, "bytes": n, "raw_ms": t_raw * 1e3, "open_ms": t_open * 1e3,
                     "raw_gbs": n / t_raw / 1e9, "open_gbs": n / t_open / 1e9,
                     "ratio": t_raw / t_open, "breakdown": breakdown})
        del data, vb, out
    return rows


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7, help="repetitions for the throughput medians")
    ap.add_argument("--quick", action="store_true", help="skip the 1,000-device pack")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        if a.child[0] == "open":
            child_open_memory(*a.child[1:4])
        elif a.child[0] == "pack":
            child_pack(a.child[1], int(a.child[2]), a.child[3])
        return 0

    import cryptography
    import nacl

    started = time.perf_counter()
    print("EdgeWard bundle benchmarks")
    print(f"  python {platform.python_version()}, cryptography {cryptography.__version__}, "
          f"PyNaCl {nacl.__version__}, {os.cpu_count()} CPUs, {platform.machine()}, "
          f"{datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}")
    tmp = Path(tempfile.mkdtemp(prefix="edgeward-bench-"))
    failures = 0
    try:
        t0 = time.perf_counter()
        setup = make_open_bundles(tmp)
        print(f"  set-up: 100 MiB random model packed for 1 device, both ciphers, in "
              f"{time.perf_counter() - t0:.1f} s (compression off, 1 MiB chunks)")

        # 1. throughput ---------------------------------------------------------------------------
        print(f"\n1. Bundle open throughput vs raw AEAD decrypt_into (100 MiB, median of {a.reps})")
        rows = bench_open_throughput(setup, a.reps)
        print(f"   {'cipher':30} {'raw AEAD':>10} {'bundle open':>12} {'ratio':>6}  {'target':>7}  result")
        for r in rows:
            ok = r["ratio"] >= TARGET_RATIO
            failures += not ok
            print(f"   {r['suite']:30} {r['raw_gbs']:6.2f} GB/s {r['open_gbs']:7.2f} GB/s "
                  f"{r['ratio']:6.2f}  >= {TARGET_RATIO:.1f}  {verdict(ok)}")
        for r in rows:
            print(f"   where the open time goes, {r['suite']} (median ms; open total "
                  f"{r['open_ms']:.1f} ms, raw {r['raw_ms']:.1f} ms):")
            for step, ms in r["breakdown"].items():
                print(f"     {ms:8.1f} ms  {step}")

        # 2. memory -------------------------------------------------------------------------------
        print("\n2. Peak extra memory opening the 100 MiB model (fresh subprocess each, VmHWM - VmRSS before)")
        print(f"   {'path':58} {'extra peak':>10} {'x model':>8}  {'target':>7}  result   anon/file at end")
        suite = next(iter(setup["bundles"]))  # ChaCha20 (rpi4b), the Pi default
        cases = [
            ("read_bytes", "agent path: read_bytes() + verify + decrypt", True),
            ("mmap", "mmap of the file + verify + decrypt (info)", False),
            ("agent_load", "agent _load/install: + bytes(contents.model) (info)", False),
        ]
        for mode, label, is_target in cases:
            res = run_child(["--child", "open", mode, str(setup["bundles"][suite]), str(setup["keyfile"])])
            x = res["extra_peak"] / res["model_bytes"]
            if is_target:
                ok = x <= TARGET_MEM
                failures += not ok
                result, target = verdict(ok), f"<= {TARGET_MEM}x"
            else:
                result, target = "info", ""
            note = "" if res["hwm_reset"] else "  (VmHWM reset unavailable: ru_maxrss used)"
            print(f"   {label:58} {res['extra_peak'] / MIB:6.0f} MiB {x:7.2f}x  {target:>7}  {result:7}"
                  f"  {res['extra_anon_end'] / MIB:.0f}/{res['extra_file_end'] / MIB:.0f} MiB"
                  f" ({res['seconds']:.2f} s){note}")
        print(f"   cipher {suite}; 'anon/file at end' = RssAnon/RssFile growth while the "
              "result is still held (file pages are clean page cache)")

        # 3. pack ---------------------------------------------------------------------------------
        counts = [c for c in PACK_DEVICES if not (a.quick and c == 1000)]
        print(f"\n3. packager.pack.pack, 5 MiB random model, compression off, profile rpi4b "
              f"(own subprocess per run)")
        t0 = time.perf_counter()
        made = make_enrolments(tmp / "devices", max(counts))
        print(f"   {max(counts)} signed enrolment files written in {made:.1f} s")
        results = {}
        for count in counts:
            out = tmp / f"pack-{count}"
            results[count] = res = run_child(["--child", "pack", str(tmp / "devices"), str(count), str(out)])
            shutil.rmtree(out, ignore_errors=True)
            line = (f"   {count:5d} devices: pack {res['pack_s']:6.1f} s "
                    f"(prepare {res['prepare_s']:.2f} s, bundles {res['bundles_s']:.1f} s, "
                    f"{res['bytes_written'] / 1e9:.2f} GB written; load_enrolments "
                    f"{res['load_enrolments_s']:.2f} s), peak extra RSS {res['extra_peak'] / MIB:.1f} MiB")
            if count == 1000:
                ok = res["pack_s"] < TARGET_PACK_S
                failures += not ok
                line += f"   target < {TARGET_PACK_S:.0f} s  {verdict(ok)}"
            print(line)
        if 1000 in results and 100 in results:
            p1000, p100 = results[1000]["extra_peak"], results[100]["extra_peak"]
            ok = p1000 <= 1.1 * p100 + MIB
            failures += not ok
            print(f"   peak RSS 1000 vs 100 devices: {p1000 / MIB:.1f} vs {p100 / MIB:.1f} MiB "
                  f"({(p1000 - p100) / MIB:+.1f} MiB)   target: independent of device count "
                  f"(<= 1.1x + 1 MiB)  {verdict(ok)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{failures} target(s) missed; total {time.perf_counter() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

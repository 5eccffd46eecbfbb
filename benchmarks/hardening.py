"""Hardening figures for the digits CNN (NCSC 2.6): size and accuracy after int8 and auto-pruning.

Targets: int8 size / fp32 size <= 0.35 with an accuracy drop <= 1 point; auto-prune + int8
compressed payload size / fp32 size <= 0.25 within the same bound. The payload is measured
exactly as ``edgeward pack`` seals it: the real sidecar (task, labels, pre-processing, policy and
the CycloneDX model card, which is often larger than a small model) with the model, compressed
only when that saves 5% (``packager.pack.seal``). The model's own compressed size is printed
beside it. Run: ``python -m benchmarks.hardening [CACHE_DIR]`` (exit 1 if a target is missed).
"""

from __future__ import annotations

import sys
import zlib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run by path from benchmarks/run.sh

from benchmarks._results import record
from packager.harden.pipeline import Hardened, HardenOptions, harden
from packager.modelfile import read_model
from packager.pack import PackOptions, build_sidecar, model_card, seal
from packager.profiles import Profile, load_profile
from tests.fixtures.cnn import PREPROCESS_NCHW, PREPROCESS_NHWC, build_digits_cnn

TARGET_INT8_RATIO = 0.35  # int8 model bytes / fp32 model bytes
TARGET_PRUNED_PAYLOAD_RATIO = 0.25  # auto-prune + int8 sealed payload bytes / fp32 model bytes
TARGET_DROP_POINTS = 1.0  # accuracy drop, percentage points, for both
LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _payload(h: Hardened, profile: Profile) -> int:
    """Bytes of the sealed contents exactly as ``pack`` encrypts them (sidecar with the model
    card, the model, compressed when that pays)."""
    opts = PackOptions(
        model_id="digits",
        model_version=1,
        task={**h.task, "labels": LABELS},
        preprocess=h.preprocess,
        card_facts=h.facts,
        hardening=h.report,
        created=datetime(2026, 1, 1, tzinfo=UTC),
    )
    card = model_card(h.model, profile, opts, opts.created or datetime.now(UTC))
    sealed, _ = seal(build_sidecar(h.model, profile, opts, card), h.model.data, "auto")
    return len(sealed)


def main(cache: Path) -> int:
    cnn = build_digits_cnn(cache)
    val = np.load(cnn.validation)
    base = {"calibration": np.load(cnn.calibration)["x"], "validation": (val["x"], val["y"])}
    rows, ok = [], True
    cases = [
        ("onnx", cnn.onnx, "rpi4b", PREPROCESS_NCHW),
        ("tflite", cnn.tflite, "rpi-zero2w", PREPROCESS_NHWC),
    ]
    for fmt, path, name, spec in cases:
        model, profile = read_model(path), load_profile(name)
        fp32 = len(model.data)
        for label, prune, target in (
            ("int8 model", None, TARGET_INT8_RATIO),
            ("auto-prune + int8, sealed payload", "auto", TARGET_PRUNED_PAYLOAD_RATIO),
        ):
            opts = HardenOptions(quantise="static", prune=prune, preprocess=spec, **base)
            h = harden(model, profile, opts)
            r = h.report
            model_z = len(zlib.compress(h.model.data, 6))
            size = r["size_bytes"]["output"] if prune is None else _payload(h, profile)
            ratio, drop = size / fp32, r["accuracy"]["drop_points"]
            passed = ratio <= target and drop <= TARGET_DROP_POINTS
            ok &= passed
            record("hardening", f"digits CNN ({fmt}, {name}): {label} / fp32 size", round(ratio, 3), "ratio",
                   f"<= {target:.2f}", ratio <= target, f"{size} of {fp32} bytes")
            record("hardening", f"digits CNN ({fmt}, {name}): {label}, accuracy drop", round(drop, 2), "points",
                   f"<= {TARGET_DROP_POINTS:.1f}", drop <= TARGET_DROP_POINTS,
                   f"accuracy {r['accuracy']['input']:.4f} -> {r['accuracy']['output']:.4f}")
            rows.append(
                (
                    fmt,
                    label,
                    fp32,
                    size,
                    model_z,
                    ratio,
                    target,
                    r["accuracy"]["input"],
                    r["accuracy"]["output"],
                    drop,
                    r["sparsity"]["chosen"],
                    "ok" if passed else "MISSED",
                )
            )
    print(
        f"{'format':<7}{'case':<36}{'fp32 B':>8}{'out B':>8}{'model.z':>8}{'ratio':>7}"
        f"{'target':>7}{'acc fp32':>9}{'acc out':>8}{'drop pt':>8}{'sparsity':>9}  result"
    )
    for f, c, a, b, z, ratio, t, ai, ao, d, sp, res in rows:
        print(
            f"{f:<7}{c:<36}{a:>8}{b:>8}{z:>8}{ratio:>7.3f}{t:>7.2f}{ai:>9.4f}{ao:>8.4f}{d:>8.2f}"
            f"{sp if sp is not None else '-':>9}  {res}"
        )
    print(
        "out B: the int8 model's bytes, or the whole sealed payload (sidecar with model card "
        "+ model, compressed as pack does); model.z: the model alone, zlib -6"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench-out/digits-cnn")))

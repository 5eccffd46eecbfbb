"""Hardening figures for the digits CNN (NCSC 2.6): size and accuracy after int8 and auto-pruning.

Targets: int8 size / fp32 size <= 0.35 with an accuracy drop <= 1 point; auto-prune + int8
compressed payload size / fp32 size <= 0.25 within the same bound. Run:
``python -m benchmarks.hardening [CACHE_DIR]`` (exit 1 if a target is missed).
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import numpy as np

from device_agent.bundle import Sidecar, pack_contents
from packager.harden.pipeline import HardenOptions, harden
from packager.modelfile import read_model
from packager.profiles import load_profile
from tests.fixtures.cnn import PREPROCESS_NCHW, PREPROCESS_NHWC, build_digits_cnn


def _payload(model: bytes, fmt: str, spec: dict) -> int:
    """Bytes of the zlib-compressed sealed contents (sidecar + model), as ``pack`` encrypts them."""
    sidecar = Sidecar(fmt, "0" * 64, len(model), {"kind": "classifier"}, preprocess=spec)
    return len(zlib.compress(bytes(pack_contents(sidecar, model)), 6))


def main(cache: Path) -> int:
    cnn = build_digits_cnn(cache)
    val = np.load(cnn.validation)
    base = {"calibration": np.load(cnn.calibration)["x"], "validation": (val["x"], val["y"])}
    rows, ok = [], True
    cases = [
        ("onnx", cnn.onnx, "rpi4b", PREPROCESS_NCHW),
        ("tflite", cnn.tflite, "rpi-zero2w", PREPROCESS_NHWC),
    ]
    for fmt, path, profile, spec in cases:
        model = read_model(path)
        fp32 = len(model.data)
        for label, prune, target in (
            ("int8", None, 0.35),
            ("auto-prune + int8, compressed", "auto", 0.25),
        ):
            opts = HardenOptions(quantise="static", prune=prune, preprocess=spec, **base)
            h = harden(model, load_profile(profile), opts)
            r = h.report
            size = r["size_bytes"]["output"] if prune is None else _payload(h.model.data, fmt, spec)
            ratio, drop = size / fp32, r["accuracy"]["drop_points"]
            passed = ratio <= target and drop <= 1.0
            ok &= passed
            rows.append(
                (
                    fmt,
                    label,
                    fp32,
                    size,
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
        f"{'format':<7}{'case':<32}{'fp32 B':>8}{'out B':>8}{'ratio':>7}{'target':>7}"
        f"{'acc fp32':>9}{'acc out':>8}{'drop pt':>8}{'sparsity':>9}  result"
    )
    for f, c, a, b, ratio, t, ai, ao, d, s, res in rows:
        print(
            f"{f:<7}{c:<32}{a:>8}{b:>8}{ratio:>7.3f}{t:>7.2f}{ai:>9.4f}{ao:>8.4f}{d:>8.2f}"
            f"{s if s is not None else '-':>9}  {res}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench-out/digits-cnn")))

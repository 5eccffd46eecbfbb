"""Stripping (NCSC 1.3, 3.3): no original name, doc string or metadata value survives in the
hardened bytes, and predictions are bit-for-bit unchanged. Real models only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agent.runtime import load_runner
from packager.harden.strip_onnx import strip_onnx
from packager.harden.strip_tflite import strip_tflite
from tests.fixtures.hardening import (
    digits_cnn,
    leaked,
    onnx_secrets,
    rapidocr_labels,
    rapidocr_rec_model,
    tflite_secrets,
)
from tests.fixtures.models import silero_vad_onnx


def _runtime_strings(data: bytes) -> set[str]:
    """Operator types and opset domains: the runtime needs them, they are not secrets."""
    import onnx

    m = onnx.load_from_string(data)
    ops = {n.op_type for n in m.graph.node} | {o.domain for o in m.opset_import}
    return ops | {d + ".ml" for d in ops if d == "ai.onnx"} | {"ai.onnx"}


def _run_all(data: bytes, runtime: str, feeds: list[np.ndarray]) -> list[np.ndarray]:
    runner = load_runner(runtime, data)
    return runner.run({spec.name: x for spec, x in zip(runner.inputs, feeds, strict=True)})


def _silero_feeds() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.standard_normal((1, 512)).astype(np.float32),
        np.zeros((2, 1, 128), np.float32),
        np.array(16000, np.int64),
    ]


@pytest.mark.parametrize("which", ["digits-mlp", "digits-cnn", "silero-vad"])
def test_harden_strip_onnx_leaves_no_names_and_same_predictions(
    which: str, digits, digits_test
) -> None:
    x, _ = digits_test
    cnn = digits_cnn()
    cnn_x = (np.load(cnn.validation)["x"] / 16).astype(np.float32)[:, None]
    path, feeds = {
        "digits-mlp": (digits.onnx, [x]),
        "digits-cnn": (cnn.onnx, [cnn_x]),
        "silero-vad": (silero_vad_onnx(), _silero_feeds()),
    }[which]
    data = path.read_bytes()
    stripped = strip_onnx(data)
    secrets = onnx_secrets(data)
    assert len(secrets) >= 5
    assert leaked(secrets, stripped, _runtime_strings(stripped)) == []
    for before, after in zip(
        _run_all(data, "onnxruntime", feeds), _run_all(stripped, "onnxruntime", feeds), strict=True
    ):
        np.testing.assert_array_equal(before, after)


def test_harden_strip_tflite_leaves_no_names_metadata_or_trailer() -> None:
    cnn = digits_cnn()
    data = cnn.tflite.read_bytes() + b"PK\x03\x04appended-labels-archive"
    stripped = strip_tflite(data)
    secrets = tflite_secrets(data) | {"appended-labels-archive"}
    assert {"TFLITE_METADATA", "serving_default"} <= secrets
    assert leaked(secrets, stripped) == []
    x = (np.load(cnn.validation)["x"] / 16).astype(np.float32)[..., None]
    np.testing.assert_array_equal(
        _run_all(data, "litert", [x])[0], _run_all(stripped, "litert", [x])[0]
    )


def test_harden_strip_rapidocr_dictionary_is_gone_from_model_bytes() -> None:
    path = rapidocr_rec_model()
    data = path.read_bytes()
    dictionary = "\n".join(rapidocr_labels(path)[1:-1])
    assert dictionary[1000:1016].encode() in data  # the original carries it
    stripped = strip_onnx(data)
    windows = {dictionary[i : i + 16] for i in range(0, len(dictionary) - 16, 97)}
    assert not [w for w in windows if w.encode() in stripped]
    assert b"character" not in stripped
    assert leaked(onnx_secrets(data), stripped, _runtime_strings(stripped)) == []


def test_harden_strip_is_idempotent_and_small(tmp_path: Path) -> None:
    data = digits_cnn().onnx.read_bytes()
    once = strip_onnx(data)
    assert strip_onnx(once) == once
    assert len(once) < len(data)

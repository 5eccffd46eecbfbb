"""Quantisation, pruning and the accuracy gate (NCSC 2.6) on real models and both runtimes."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.errors import AccuracyRefused, UsageError
from packager.harden.pipeline import HardenOptions, harden, summary
from packager.harden.prune import prune, search
from packager.harden.quantise import Unquantisable, quantise
from packager.modelfile import read_model
from packager.profiles import load_profile
from tests.fixtures.cnn import PREPROCESS_NCHW, PREPROCESS_NHWC
from tests.fixtures.hardening import (
    digits_cnn,
    leaked,
    onnx_leaks,
    tflite_secrets,
)
from tests.fixtures.models import silero_vad_onnx


def _cnn_options(**kw: object) -> HardenOptions:
    cnn = digits_cnn()
    val = np.load(cnn.validation)
    return HardenOptions(
        calibration=np.load(cnn.calibration)["x"], validation=(val["x"], val["y"]), **kw
    )  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fmt", "profile", "mode", "spec", "max_ratio"),
    [
        ("onnx", "rpi4b", "dynamic", PREPROCESS_NCHW, 0.4),
        ("onnx", "rpi4b", "static", PREPROCESS_NCHW, 0.35),
        ("tflite", "rpi-zero2w", "dynamic", PREPROCESS_NHWC, 0.35),
        ("tflite", "rpi-zero2w", "static", PREPROCESS_NHWC, 0.4),
    ],
)
def test_harden_quantise_cnn_shrinks_within_gate(
    fmt: str, profile: str, mode: str, spec: dict, max_ratio: float
) -> None:
    cnn = digits_cnn()
    model = read_model(cnn.onnx if fmt == "onnx" else cnn.tflite)
    h = harden(model, load_profile(profile), _cnn_options(quantise=mode, preprocess=spec))
    r = h.report
    assert r["quantisation"] == {"mode": mode, "status": "applied"}
    assert r["size_bytes"]["output"] / r["size_bytes"]["input"] <= max_ratio
    assert r["accuracy"]["input"] > 0.97
    assert r["accuracy"]["drop_points"] <= 1.0
    assert r["accuracy"]["agreement"] >= 0.98
    assert h.preprocess == spec and h.task["kind"] == "classifier"
    if fmt == "onnx":  # quantiser names are stripped too
        assert onnx_leaks(model.data, h.model.data) == []
    else:
        assert leaked(tflite_secrets(model.data), h.model.data) == []
    assert set(r["seconds"]) >= {"baseline", "quantise+strip", "gate"}
    assert "accuracy" in summary(r)


def test_harden_quantise_digits_mlp_dynamic(digits, digits_test) -> None:
    x, y = digits_test
    h = harden(read_model(digits.onnx), load_profile("rpi4b"), HardenOptions(validation=(x, y)))
    r = h.report
    assert r["quantisation"]["status"] == "applied"
    assert r["size_bytes"]["output"] < 0.7 * r["size_bytes"]["input"]
    assert r["accuracy"]["drop_points"] <= 1.0


def test_harden_unquantisable_control_flow_is_skipped_and_recorded() -> None:
    data = silero_vad_onnx().read_bytes()
    with pytest.raises(Unquantisable, match="control flow"):
        quantise(data, "onnx", "dynamic", None)
    h = harden(
        read_model(silero_vad_onnx()),
        load_profile("rpi4b"),
        HardenOptions(quantise="dynamic", no_accuracy_gate=True),
    )
    q = h.report["quantisation"]
    assert q["status"] == "skipped" and "control flow" in q["reason"]
    assert any("quantisation skipped" in lim for lim in h.facts.limitations)
    assert (
        h.report["size_bytes"]["output"] < h.report["size_bytes"]["input"]
    )  # stripped all the same


def test_harden_unquantisable_ai_onnx_ml_is_skipped(digits_test) -> None:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    x, y = digits_test
    clf = LogisticRegression(max_iter=200).fit(x, y)
    data = to_onnx(
        clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset=17
    ).SerializeToString()
    with pytest.raises(Unquantisable, match=r"ai\.onnx\.ml operators: LinearClassifier"):
        quantise(data, "onnx", "dynamic", None)


def test_harden_static_needs_calibration() -> None:
    with pytest.raises(UsageError, match="--calibration"):
        harden(
            read_model(digits_cnn().tflite),
            load_profile("rpi-zero2w"),
            HardenOptions(preprocess=PREPROCESS_NHWC),
        )


def test_harden_auto_prune_finds_sparsity_within_bound_and_shrinks() -> None:
    h = harden(
        read_model(digits_cnn().onnx),
        load_profile("rpi4b"),
        _cnn_options(quantise="static", prune="auto", preprocess=PREPROCESS_NCHW),
    )
    r = h.report
    assert r["sparsity"]["chosen"] >= 0.2
    assert r["sparsity"]["units_removed"] > 0
    assert r["parameters"]["output"] < r["parameters"]["input"]
    assert r["accuracy"]["drop_points"] <= 1.0
    assert r["size_bytes"]["compressed"] / r["size_bytes"]["input"] <= 0.25


def test_harden_auto_prune_tflite() -> None:
    h = harden(
        read_model(digits_cnn().tflite),
        load_profile("rpi-zero2w"),
        _cnn_options(quantise="none", prune="auto", preprocess=PREPROCESS_NHWC),
    )
    r = h.report
    assert r["sparsity"]["chosen"] >= 0.2 and r["sparsity"]["zero_fraction"] >= 0.2
    assert r["size_bytes"]["compressed"] < 0.9 * r["size_bytes"]["input"]
    assert r["accuracy"]["drop_points"] <= 1.0


def test_harden_gate_refuses_destructive_pruning(digits, digits_test) -> None:
    x, y = digits_test
    with pytest.raises(AccuracyRefused, match="max-accuracy-drop") as e:
        harden(
            read_model(digits.onnx),
            load_profile("rpi4b"),
            HardenOptions(quantise="none", prune=0.9, validation=(x, y)),
        )
    assert e.value.exit_code == 1


def test_harden_structured_pruning_removes_dead_units_exactly() -> None:
    """Units never active on the calibration data are cut; on that data the answer is identical."""
    import onnxruntime as ort

    cnn = digits_cnn()
    data = cnn.onnx.read_bytes()
    calib = (np.load(cnn.calibration)["x"] / 16).astype(np.float32)[:, None]
    out = prune(data, "onnx", 0.0, calib)
    assert out.units_removed > 0 and out.zero_fraction == 0
    assert len(out.data) < len(data)
    before = ort.InferenceSession(data).run(None, {"digit_image": calib})[0]
    after = ort.InferenceSession(out.data).run(None, {"digit_image": calib})[0]
    np.testing.assert_allclose(before, after, atol=1e-5)


def test_harden_search_is_a_binary_search_for_the_largest_passing_sparsity() -> None:
    tried: list[float] = []

    def attempt(s: float) -> tuple[str, bool]:
        tried.append(s)
        return f"model@{s}", s <= 0.6

    assert search(attempt) == (0.6, "model@0.6")
    assert len(tried) <= 5
    assert search(lambda s: (None, False)) is None


@pytest.mark.parametrize(
    "bad",
    [
        {"quantise": "int4"},
        {"prune": 0.99},
        {"prune": "most"},
        {"prune": "auto"},
        {"max_accuracy_drop": -1},
        {"training_samples": 0},
    ],
)
def test_harden_options_are_checked(bad: dict) -> None:
    with pytest.raises(UsageError):
        HardenOptions(**bad)

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


# --- F4: the gate cannot be bypassed -----------------------------------------------------------


def test_harden_lossy_stage_needs_validation_or_named_opt_out(digits) -> None:
    model, profile = read_model(digits.onnx), load_profile("rpi4b")
    with pytest.raises(UsageError, match="--validation"):
        harden(model, profile, HardenOptions(quantise="dynamic"))
    with pytest.raises(UsageError, match="--validation"):
        HardenOptions(quantise="none", prune=0.3)
    h = harden(model, profile, HardenOptions(quantise="dynamic", no_accuracy_gate=True))
    assert h.report["accuracy"]["gate"] == "disabled"
    assert h.report["accuracy"]["input"] is None and h.report["accuracy"]["output"] is None
    assert any("--no-accuracy-gate" in lim for lim in h.facts.limitations)
    assert "WARNING" in summary(h.report)
    plain = harden(model, profile, HardenOptions(quantise="none"))  # lossless: no gate needed
    assert plain.report["accuracy"]["gate"] == "not needed"


@pytest.mark.parametrize(
    ("make_y", "match"),
    [
        (lambda y: np.eye(10)[y], "one label per input"),  # one-hot
        (lambda y: y.astype(np.float32), "integer class indices"),
        (lambda y: y[:-1], "one label per input"),
        (lambda y: y + 10, r"outside \[0, 10\)"),
        (lambda y: -y - 1, r"outside \[0, 10\)"),
        (lambda y: (y + 1) % 10, "no better than always answering"),  # labels out of order
    ],
)
def test_harden_validation_labels_are_checked(digits, digits_test, make_y, match: str) -> None:
    from device_agent.errors import FormatError

    x, y = digits_test
    with pytest.raises(FormatError, match=match) as e:
        harden(
            read_model(digits.onnx),
            load_profile("rpi4b"),
            HardenOptions(quantise="none", validation=(x, make_y(y))),
        )
    assert e.value.exit_code == 3


def test_harden_empty_validation_is_format_error(digits, digits_test) -> None:
    from device_agent.errors import FormatError

    x, y = digits_test
    with pytest.raises(FormatError):
        harden(
            read_model(digits.onnx),
            load_profile("rpi4b"),
            HardenOptions(quantise="none", validation=(x[:0], y[:0])),
        )


def test_harden_gate_on_agreement_with_the_original(digits, digits_test) -> None:
    """Half the weights gone: refused on disagreement even with the accuracy bound opened."""
    x, y = digits_test
    with pytest.raises(AccuracyRefused, match="max-disagreement"):
        harden(
            read_model(digits.onnx),
            load_profile("rpi4b"),
            HardenOptions(
                quantise="none",
                prune=0.6,
                validation=(x, y),
                max_accuracy_drop=100,
                max_disagreement=1.0,
            ),
        )


def test_harden_raw_model_gated_on_output_closeness(digits, digits_test) -> None:
    x, _ = digits_test
    model, profile = read_model(digits.onnx), load_profile("rpi4b")
    raw = {"kind": "raw", "output": 1}
    with pytest.raises(AccuracyRefused, match="differently"):
        harden(
            model,
            profile,
            HardenOptions(quantise="none", prune=0.9, validation=(x, None), task=raw),
        )
    ok = harden(model, profile, HardenOptions(quantise="none", validation=(x, None), task=raw))
    assert ok.report["accuracy"]["agreement"] == 1.0 and ok.report["accuracy"]["gate"] == "checked"


def _ctc_model() -> tuple[bytes, list[str]]:
    """A tiny text recogniser: (batch, steps, features) -> MatMul -> Softmax over 5 classes."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(3)
    w = nh.from_array(rng.standard_normal((8, 5)).astype(np.float32), "w")
    g = h.make_graph(
        [h.make_node("MatMul", ["x", "w"], ["z"]), h.make_node("Softmax", ["z"], ["p"], axis=-1)],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [None, 12, 8])],
        [h.make_tensor_value_info("p", T.FLOAT, [None, 12, 5])],
        [w],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=9)
    return m.SerializeToString(), ["blank", "a", "b", "c", "d"]


def test_harden_ctc_model_gated_on_decoded_text(tmp_path) -> None:
    data, labels = _ctc_model()
    path = tmp_path / "rec.onnx"
    path.write_bytes(data)
    x = np.random.default_rng(4).standard_normal((64, 12, 8)).astype(np.float32)
    task = {"kind": "ctc", "labels": labels}
    model, profile = read_model(path), load_profile("rpi4b")
    with pytest.raises(AccuracyRefused, match="differently"):
        harden(
            model,
            profile,
            HardenOptions(quantise="none", prune=0.9, validation=(x, None), task=task),
        )
    from device_agent.runtime.sequence import decode_ctc
    from packager.harden.gate import predict_outputs

    texts = [
        r["label"]
        for r in decode_ctc(predict_outputs(data, "onnxruntime", None, x), task, {}, "user", True)[
            "predictions"
        ]
    ]
    ok = harden(
        model, profile, HardenOptions(quantise="none", validation=(x, np.array(texts)), task=task)
    )
    assert ok.report["accuracy"]["input"] == 1.0 and ok.report["accuracy"]["agreement"] == 1.0


def test_harden_constant_weights_are_folded_and_pruned() -> None:
    """RapidOCR keeps weights in Constant nodes; pruning must reach them, or say it did not."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from packager.harden.prune import fold_constant_weights

    w = nh.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "c")
    g = h.make_graph(
        [h.make_node("Constant", [], ["w"], value=w), h.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [None, 8])],
        [h.make_tensor_value_info("y", T.FLOAT, [None, 4])],
    )
    data = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=9).SerializeToString()
    assert prune(data, "onnx", 0.5, None).prunable == 0
    folded = fold_constant_weights(data)
    out = prune(folded, "onnx", 0.5, None)
    assert out.prunable == 32 and out.zero_fraction == 0.5


def test_harden_nothing_prunable_is_reported_skipped(tmp_path) -> None:
    from onnx import TensorProto as T
    from onnx import helper as h

    g = h.make_graph(
        [h.make_node("Relu", ["x"], ["y"])],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [None, 4])],
        [h.make_tensor_value_info("y", T.FLOAT, [None, 4])],
    )
    path = tmp_path / "relu.onnx"
    path.write_bytes(
        h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=9).SerializeToString()
    )
    x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    r = harden(
        read_model(path),
        load_profile("rpi4b"),
        HardenOptions(quantise="none", prune=0.5, validation=(x, None), task={"kind": "raw"}),
    ).report
    assert r["sparsity"]["status"] == "skipped" and "nothing prunable" in r["sparsity"]["reason"]
    assert r["sparsity"]["chosen"] is None and "pruning skipped" in summary(r)


def test_harden_one_failing_candidate_does_not_skip_quantisation_for_all(
    digits, digits_test, monkeypatch: pytest.MonkeyPatch
) -> None:
    from packager.harden import pipeline

    calls = {"n": 0}
    real = pipeline.quantise

    def flaky(data: bytes, fmt: str, mode: str, calibration: object) -> bytes:
        calls["n"] += 1
        if calls["n"] == 1:
            raise Unquantisable("first candidate only")
        return real(data, fmt, mode, calibration)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "quantise", flaky)
    x, y = digits_test
    r = harden(
        read_model(digits.onnx),
        load_profile("rpi4b"),
        HardenOptions(quantise="dynamic", prune="auto", validation=(x, y), max_accuracy_drop=2),
    ).report
    assert calls["n"] > 1
    assert r["quantisation"] == {"mode": "dynamic", "status": "applied"}


def test_harden_quantiser_failure_does_not_copy_tensor_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import onnxruntime.quantization as q

    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("node acme_secret_layer_7 has input acme_hidden_weights of bad shape")

    monkeypatch.setattr(q, "quantize_dynamic", boom)
    with pytest.raises(Unquantisable) as e:
        quantise(digits_cnn().onnx.read_bytes(), "onnx", "dynamic", None)
    assert "acme" not in str(e.value) and "RuntimeError" in str(e.value)


def test_harden_ml_classifier_string_labels_sealed_not_shipped(tmp_path) -> None:
    """skl2onnx LogisticRegression with string classes: the names leave the model for the
    sidecar; the board answers with them; the model bytes hold only indices."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    from device_agent.runtime.output import shape_output
    from packager.harden.gate import predict_outputs

    rng = np.random.default_rng(0)
    x = rng.standard_normal((90, 4)).astype(np.float32)
    names = np.array(["acme_defect_crack", "acme_defect_rust", "acme_ok"])
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    m = to_onnx(
        LogisticRegression().fit(x, names[y]),
        x[:1],
        options={"zipmap": False},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    path = tmp_path / "lr.onnx"
    path.write_bytes(m.SerializeToString())
    h = harden(
        read_model(path),
        load_profile("rpi4b"),
        HardenOptions(quantise="none", validation=(x, y)),
    )
    assert h.task["labels"] == list(names) and h.task["kind"] == "classifier"
    assert [n for n in names if n.encode() in h.model.data] == []
    assert onnx_leaks(path.read_bytes(), h.model.data) == []
    assert h.report["accuracy"]["agreement"] == 1.0
    outputs = predict_outputs(h.model.data, "onnxruntime", None, x[:5])
    answer = shape_output(outputs, h.task, {}, "user", True)["predictions"]
    assert [a["label"] for a in answer] == list(names[outputs[1].argmax(axis=1)])

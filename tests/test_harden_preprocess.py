"""The board's sealed pre-processing (NCSC 3.1, 3.3): raw input in, the model's tensor out."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.errors import FormatError
from device_agent.runtime.preprocess import SCHEMA, apply, validate
from tests.fixtures.cnn import PREPROCESS_NCHW
from tests.fixtures.hardening import RAPIDOCR_PREPROCESS


def _spec(*steps: dict, rank: int = 3) -> dict:
    return {"schema": SCHEMA, "sample_rank": rank, "steps": list(steps)}


def test_harden_preprocess_digits_single_and_batch() -> None:
    img = np.arange(64, dtype=np.uint8).reshape(8, 8) % 17
    x, single = apply(PREPROCESS_NCHW, img)
    assert single and x.shape == (1, 1, 8, 8) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0], img / 16, rtol=1e-6)
    xb, single = apply(PREPROCESS_NCHW, np.stack([img, img]))
    assert not single and xb.shape == (2, 1, 8, 8)


def test_harden_preprocess_ocr_any_width_becomes_model_tensor() -> None:
    img = np.full((30, 100, 3), 255, np.uint8)
    x, single = apply(RAPIDOCR_PREPROCESS, img)
    assert single and x.shape == (1, 3, 48, 320)
    assert (
        x[0, :, :, :160].max() == pytest.approx(1.0) and x[0, :, :, 161:].max() == 0
    )  # padded in normalised space
    wide, _ = apply(RAPIDOCR_PREPROCESS, np.zeros((48, 1000, 3), np.uint8))
    assert wide.shape == (1, 3, 48, 1000)


def test_harden_preprocess_resize_crop_normalize_flatten() -> None:
    img = np.linspace(0, 255, 16 * 16 * 3).reshape(16, 16, 3).astype(np.uint8)
    spec = _spec(
        {"op": "resize", "height": 12, "width": 12},
        {"op": "crop", "height": 8, "width": 8},
        {"op": "normalize", "mean": [1, 2, 3], "std": [2, 2, 2]},
        {"op": "flatten"},
        {"op": "dtype", "to": "float16"},
    )
    x, _ = apply(spec, img)
    assert x.shape == (1, 8 * 8 * 3) and x.dtype == np.float16
    same, _ = apply(_spec({"op": "resize", "height": 16, "width": 16}), img)
    np.testing.assert_array_equal(same[0], img.astype(np.float32))


def test_harden_preprocess_without_spec_is_identity() -> None:
    x = np.ones((2, 64), np.float32)
    assert apply(None, x) == (x, False)


@pytest.mark.parametrize(
    "spec",
    [
        {"schema": "other/1", "sample_rank": 2, "steps": []},
        {"schema": SCHEMA, "sample_rank": 5, "steps": []},
        _spec({"op": "exec", "code": "rm -rf /"}),
        _spec({"op": "resize", "height": 10**6, "width": 4}),
        _spec({"op": "normalize", "mean": [0], "std": [0]}),
        _spec({"op": "layout", "to": "CHWN"}),
        _spec({"op": "scale", "factor": "1/255"}),
        _spec({"op": "dtype", "to": "object"}),
        {"schema": SCHEMA, "sample_rank": 2, "steps": [], "extra": 1},
    ],
)
def test_harden_preprocess_spec_is_strict(spec: dict) -> None:
    with pytest.raises(FormatError):
        validate(spec)


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((2, 3, 8, 8, 1)),
        np.array([[np.nan] * 8] * 8),
        np.zeros((8, 8), dtype=object),
        np.zeros((3000, 3000)),
    ],
)
def test_harden_preprocess_refuses_bad_input(x: np.ndarray) -> None:
    with pytest.raises(FormatError):
        apply(PREPROCESS_NCHW, x, max_elements=4_000_000)


def test_harden_preprocess_output_is_bounded() -> None:
    spec = _spec({"op": "resize", "height": 4096, "width": 4096})
    with pytest.raises(FormatError, match="more than"):
        apply(spec, np.zeros((8, 8, 3), np.uint8), max_elements=1_000_000)


# --- F1: bounded memory whatever the input's aspect ratio -------------------------------------


def test_harden_preprocess_long_strip_refused_fast_without_allocating() -> None:
    """A 1xN strip (15 MiB, within max_input_bytes) once made a (1, 48, N, 3) float32
    intermediate: 3 GiB and a MemoryError, the OOM killer on a Pi."""
    import time
    import tracemalloc

    strip = np.zeros((1, 5_592_405, 3), np.uint8)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(FormatError, match="pixels on a side"):
            apply(RAPIDOCR_PREPROCESS, strip, 64 * 1024**2 // 4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 1.0
    assert peak < 1024**2


def test_harden_preprocess_resize_bounds_every_intermediate() -> None:
    """Resizing a wide strip to a small square: rows first would make (1, 48, 8000, 3) =
    1.15M elements; the most-shrinking axis goes first and nothing exceeds the bound."""
    import tracemalloc

    strip = (np.arange(8000 * 3) % 251).astype(np.uint8).reshape(1, 8000, 3)
    spec = _spec({"op": "resize", "height": 48, "width": 48})
    tracemalloc.start()
    try:
        x, _ = apply(spec, strip, max_elements=100_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert x.shape == (1, 48, 48, 3)
    assert peak < 4 * 100_000 * 3  # a few bounded float32 arrays, not a 4.6 MB intermediate


def test_harden_preprocess_resize_matches_rows_first_reference() -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (13, 29, 3)).astype(np.uint8)

    def reference(x: np.ndarray, height: int, width: int) -> np.ndarray:
        def axis(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
            lo = np.floor(pos).astype(np.intp)
            return lo, np.minimum(lo + 1, src - 1), pos - lo

        y0, y1, fy = axis(x.shape[0], height)
        x0, x1, fx = axis(x.shape[1], width)
        xf = x.astype(np.float64)
        top = xf[y0] * (1 - fy)[:, None, None] + xf[y1] * fy[:, None, None]
        return top[:, x0] * (1 - fx)[None, :, None] + top[:, x1] * fx[None, :, None]

    for height, width in ((7, 50), (40, 11), (13, 29)):
        x, _ = apply(_spec({"op": "resize", "height": height, "width": width}), img)
        np.testing.assert_allclose(x[0], reference(img, height, width), atol=1e-3)


def test_harden_preprocess_does_not_modify_the_callers_array() -> None:
    img = np.full((8, 8, 3), 10.0, np.float32)
    spec = _spec(
        {"op": "scale", "factor": 2.0, "offset": 1.0},
        {"op": "normalize", "mean": [1.0], "std": [2.0]},
    )
    x, _ = apply(spec, img)
    assert np.all(img == 10.0) and np.allclose(x, 10.0)


# --- F2: empty inputs are malformed input, not an internal error ------------------------------

DIGITS_RESIZE = _spec(
    {"op": "resize", "height": 8, "width": 8},
    {"op": "scale", "factor": 16 / 255},
    {"op": "flatten"},
    {"op": "dtype", "to": "float32"},
    rank=2,
)


@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        (DIGITS_RESIZE, (0, 10)),
        (DIGITS_RESIZE, (10, 0)),
        (DIGITS_RESIZE, (0, 8, 8)),
        (RAPIDOCR_PREPROCESS, (0, 10, 3)),
        (RAPIDOCR_PREPROCESS, (10, 0, 3)),
        (RAPIDOCR_PREPROCESS, (10, 10, 0)),
        (PREPROCESS_NCHW, (0, 8, 8)),
    ],
)
def test_harden_preprocess_empty_dimension_is_format_error(spec: dict, shape: tuple) -> None:
    with pytest.raises(FormatError, match="empty dimension") as e:
        apply(spec, np.zeros(shape, np.uint8))
    assert e.value.exit_code == 3


# --- F8: the spec is strict about every value and the order of steps ---------------------------


@pytest.mark.parametrize(
    "spec",
    [
        _spec({"op": "normalize", "mean": ["x"], "std": [1]}),
        _spec({"op": "normalize", "mean": [None], "std": [1]}),
        _spec({"op": "normalize", "mean": [0], "std": [True]}),
        _spec({"op": "normalize", "mean": [float("nan")], "std": [1]}),
        _spec({"op": "normalize", "mean": [0], "std": [float("inf")]}),
        _spec({"op": "normalize", "mean": [0] * 17, "std": [1] * 17}),
        _spec({"op": "pad", "min_width": 50, "value": "x"}),
        _spec({"op": "pad", "min_width": 50, "value": float("nan")}),
        _spec({"op": "pad", "min_width": True}),
        _spec({"op": "scale", "factor": True}),
        _spec({"op": "scale", "offset": float("-inf")}),
        _spec({"op": "resize", "height": 8, "width": 8.0}),
        {"schema": SCHEMA, "sample_rank": True, "steps": []},
        _spec({"op": "layout", "to": "NCHW"}, {"op": "resize", "height": 8, "width": 8}),
        _spec({"op": "layout", "to": "NCHW"}, {"op": "normalize", "mean": [0], "std": [1]}),
        _spec({"op": "flatten"}, {"op": "layout", "to": "NCHW"}),
        _spec({"op": "dtype", "to": "float32"}, {"op": "scale", "factor": 2}),
        _spec({"op": "layout", "to": "NCHW"}, {"op": "layout", "to": "NCHW"}),
        _spec(*[{"op": "scale", "factor": 1}] * 33),
    ],
)
def test_harden_preprocess_spec_values_and_order_are_strict(spec: dict) -> None:
    with pytest.raises(FormatError):
        validate(spec)


def test_harden_preprocess_nan_from_json_is_refused() -> None:
    import json

    text = (
        '{"schema":"edgeward.preprocess/1","sample_rank":3,'
        '"steps":[{"op":"scale","factor":NaN}]}'
    )
    with pytest.raises(FormatError, match="finite"):
        validate(json.loads(text))


def test_harden_preprocess_limits_come_from_limits() -> None:
    from dataclasses import replace

    from device_agent.config import DEFAULT_LIMITS

    tight = replace(DEFAULT_LIMITS, max_preprocess_side=16, max_preprocess_steps=1)
    with pytest.raises(FormatError, match=r"\[1, 16\]"):
        validate(_spec({"op": "resize", "height": 17, "width": 8}), tight)
    with pytest.raises(FormatError, match="at most 1 steps"):
        validate(_spec({"op": "flatten"}, {"op": "flatten"}), tight)
    with pytest.raises(FormatError, match="16 pixels"):
        apply(_spec({"op": "flatten"}), np.zeros((8, 17, 3), np.uint8), limits=tight)


# --- F9: a sealed spec's model shape does not leak through error messages ---------------------


def _conv_runner() -> object:
    from onnx import TensorProto, helper, numpy_helper

    from device_agent.runtime.runners import load_runner

    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return load_runner("onnxruntime", m.SerializeToString())


@pytest.mark.parametrize("channels", [1, 4])
def test_harden_preprocess_sealed_mismatch_is_generic_except_for_admin(
    channels: int, caplog: pytest.LogCaptureFixture
) -> None:
    from types import SimpleNamespace

    from device_agent.agent import SEALED_MISMATCH, model_feeds

    spec = _spec({"op": "resize", "height": 224, "width": 224}, {"op": "layout", "to": "NCHW"})
    loaded = SimpleNamespace(runner=_conv_runner(), sidecar=SimpleNamespace(preprocess=spec))
    img = np.zeros((50, 60, channels), np.uint8)
    for role in ("user", "engineer"):
        with (
            caplog.at_level("INFO", logger="device_agent.agent"),
            pytest.raises(FormatError) as e,
        ):
            model_feeds(loaded, img, role)  # type: ignore[arg-type]
        assert str(e.value) == SEALED_MISMATCH and e.value.exit_code == 3
        assert "224" not in str(e.value) and "3" not in str(e.value)
        assert "needs 3" in caplog.text  # the detail stays in the board's local log
    with pytest.raises(FormatError, match="the model needs 3"):
        model_feeds(loaded, img, "admin")  # type: ignore[arg-type]
    feeds, batched = model_feeds(loaded, np.zeros((50, 60, 3), np.uint8), "user")  # type: ignore[arg-type]
    assert next(iter(feeds.values())).shape == (1, 3, 224, 224) and not batched

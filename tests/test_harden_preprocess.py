"""The board's sealed pre-processing (NCSC 3.1, 3.3): raw input in, the model's tensor out."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.errors import FormatError
from device_agent.preprocess import SCHEMA, apply, validate
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

"""Pre-processing sealed in the bundle and run on the board, so applications send raw input.

NCSC principles 1.3 and 3.3: the model's input shape, normalisation and layout are the
publisher's secret; the application sends an image (or feature vector) as it has it and the
agent turns it into the model's tensor with the spec from the encrypted sidecar.

The spec (``schema`` ``edgeward.preprocess/1``) is declarative and small::

    {"schema": "edgeward.preprocess/1", "sample_rank": 3,
     "steps": [{"op": "resize", "height": 48, "width": null, "max_width": 2048},
               {"op": "pad", "min_width": 320},
               {"op": "scale", "factor": 0.00392156862745098},
               {"op": "normalize", "mean": [0.5], "std": [0.5]},
               {"op": "layout", "to": "NCHW"}, {"op": "dtype", "to": "float32"}]}

``sample_rank`` is the rank of one raw sample (2 for a grey image HxW or a feature vector
batch, 3 for HxWxC); one more axis is a batch. Images are handled as NHWC until ``layout``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import FormatError

SCHEMA = "edgeward.preprocess/1"
MAX_SIDE = 8192
TOP_FIELDS = frozenset({"schema", "sample_rank", "steps"})
OPS = ("resize", "crop", "pad", "scale", "normalize", "layout", "flatten", "dtype")
DTYPES = ("float32", "float16", "uint8", "int8", "int32", "int64")


def _side(value: Any, what: str, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SIDE:
        raise FormatError(f"preprocess {what} must be an integer in [1, {MAX_SIDE}]")
    return value


def validate(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Check a spec strictly (known ops and fields, bounded sizes) and return it as a plain dict."""
    if not isinstance(spec, Mapping) or spec.get("schema") != SCHEMA:
        raise FormatError(f"preprocess spec must be an object with schema {SCHEMA!r}")
    if set(spec) - TOP_FIELDS:
        raise FormatError(f"preprocess spec has unknown fields: {sorted(set(spec) - TOP_FIELDS)}")
    rank = spec.get("sample_rank")
    if rank not in (1, 2, 3):
        raise FormatError("preprocess sample_rank must be 1, 2 or 3")
    steps = spec.get("steps")
    if not isinstance(steps, list) or len(steps) > 32:
        raise FormatError("preprocess steps must be a list of at most 32 steps")
    fields = {
        "resize": {"height", "width", "max_width"},
        "crop": {"height", "width"},
        "pad": {"min_width", "value"},
        "scale": {"factor", "offset"},
        "normalize": {"mean", "std"},
        "layout": {"to"},
        "flatten": set(),
        "dtype": {"to"},
    }
    for step in steps:
        if not isinstance(step, Mapping) or step.get("op") not in OPS:
            raise FormatError(f"preprocess step must be an object with op one of {', '.join(OPS)}")
        extra = set(step) - {"op"} - fields[step["op"]]
        if extra:
            raise FormatError(f"preprocess {step['op']} step has unknown fields: {sorted(extra)}")
        op = step["op"]
        if op in ("resize", "crop"):
            _side(step.get("height"), f"{op}.height")
            _side(step.get("width"), f"{op}.width", optional=op == "resize")
            _side(step.get("max_width", MAX_SIDE), f"{op}.max_width")
        elif op == "pad":
            _side(step.get("min_width"), "pad.min_width")
        elif op == "scale" and not all(
            isinstance(step.get(k, d), int | float) for k, d in (("factor", 1.0), ("offset", 0.0))
        ):
            raise FormatError("preprocess scale.factor and scale.offset must be numbers")
        elif op == "normalize":
            mean, std = step.get("mean"), step.get("std")
            if not (
                isinstance(mean, list)
                and isinstance(std, list)
                and 1 <= len(mean) == len(std) <= 16
            ):
                raise FormatError(
                    "preprocess normalize needs mean and std lists of the same length (1-16)"
                )
            if any(not isinstance(s, int | float) or s == 0 for s in std):
                raise FormatError("preprocess normalize.std must be non-zero numbers")
        elif op == "layout" and step.get("to") not in ("NCHW", "NHWC"):
            raise FormatError("preprocess layout.to must be NCHW or NHWC")
        elif op == "dtype" and step.get("to") not in DTYPES:
            raise FormatError(f"preprocess dtype.to must be one of {', '.join(DTYPES)}")
    return {"schema": SCHEMA, "sample_rank": rank, "steps": [dict(s) for s in steps]}


def _resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an NHWC batch (half-pixel centres, like OpenCV's INTER_LINEAR)."""
    n, h, w, c = x.shape
    if (h, w) == (height, width):
        return x.astype(np.float32)

    def axis(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
        lo = np.floor(pos).astype(np.intp)
        hi = np.minimum(lo + 1, src - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    y0, y1, fy = axis(h, height)
    x0, x1, fx = axis(w, width)
    xf = x.astype(np.float32)
    top = xf[:, y0] * (1 - fy)[None, :, None, None] + xf[:, y1] * fy[None, :, None, None]
    return top[:, :, x0] * (1 - fx)[None, None, :, None] + top[:, :, x1] * fx[None, None, :, None]


def _too_big(shape: tuple[int, ...], max_elements: int) -> None:
    if int(np.prod(shape, dtype=np.int64)) > max_elements:
        raise FormatError(
            f"pre-processing this input makes more than {max_elements} elements; send a smaller one"
        )


def _step(x: np.ndarray, step: Mapping[str, Any], image: bool, max_elements: int) -> np.ndarray:
    op = step["op"]
    if op in ("resize", "crop", "pad") and not image:
        raise FormatError(f"preprocess {op} needs image input (sample_rank 2 or 3)")
    if op == "resize":
        h, w = x.shape[1:3]
        height = int(step["height"])
        width = min(
            int(step.get("width") or np.ceil(height * w / h)), int(step.get("max_width", MAX_SIDE))
        )
        _too_big((x.shape[0], height, width, x.shape[3]), max_elements)  # before allocating it
        return _resize(x, height, width)
    if op == "crop":
        h, w = x.shape[1:3]
        ch, cw = int(step["height"]), int(step["width"])
        if ch > h or cw > w:
            raise FormatError(
                f"input is {h}x{w}, smaller than the {ch}x{cw} crop; send a larger image"
            )
        top, left = (h - ch) // 2, (w - cw) // 2
        return x[:, top : top + ch, left : left + cw]
    if op == "pad":
        missing = int(step["min_width"]) - x.shape[2]
        if missing <= 0:
            return x
        _too_big((*x.shape[:2], x.shape[2] + missing, x.shape[3]), max_elements)
        return np.pad(
            x, ((0, 0), (0, 0), (0, missing), (0, 0)), constant_values=step.get("value", 0)
        )
    if op == "scale":
        return x.astype(np.float32) * np.float32(step.get("factor", 1.0)) + np.float32(
            step.get("offset", 0.0)
        )
    if op == "normalize":
        mean = np.asarray(step["mean"], np.float32)
        std = np.asarray(step["std"], np.float32)
        if len(mean) not in (1, x.shape[-1]):
            raise FormatError(
                f"input has {x.shape[-1]} channels, the sealed normalisation has {len(mean)}"
            )
        return (x.astype(np.float32) - mean) / std
    if op == "layout":
        if x.ndim != 4:
            raise FormatError("preprocess layout needs image input")
        return x.transpose(0, 3, 1, 2) if step["to"] == "NCHW" else x
    if op == "flatten":
        return x.reshape(x.shape[0], -1)
    return x.astype(np.dtype(step["to"]))


def apply(
    spec: Mapping[str, Any] | None, inputs: Any, max_elements: int = 16 * 1024**2
) -> tuple[Any, bool]:
    """Run the sealed spec on the caller's raw input; return (model input, single sample or not).

    Without a spec the input goes through unchanged (and ``False``: the model's own shape decides).
    """
    if spec is None:
        return inputs, False
    if not isinstance(inputs, np.ndarray):
        raise FormatError("this model takes one raw input array; send a single .npy")
    spec = validate(spec)
    if inputs.dtype == object or inputs.dtype.kind not in "biuf" or inputs.size > max_elements:
        raise FormatError(f"input must be a numeric array of at most {max_elements} elements")
    if inputs.dtype.kind == "f" and not np.all(np.isfinite(inputs)):
        raise FormatError("input contains NaN or Inf; send finite numbers")
    rank = spec["sample_rank"]
    if inputs.ndim not in (rank, rank + 1):
        raise FormatError(
            f"input has {inputs.ndim} dimensions; send one sample of rank {rank} or a batch"
        )
    single = inputs.ndim == rank
    x = inputs[np.newaxis] if single else inputs
    image = rank >= 2
    if rank == 2:
        x = x[..., np.newaxis]  # grey HxW -> HxWx1
    for step in spec["steps"]:
        x = _step(x, step, image, max_elements)
    return np.ascontiguousarray(x), single

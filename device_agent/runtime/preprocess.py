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

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from device_agent.config import DEFAULT_LIMITS, BundleLimits
from device_agent.errors import FormatError, InputMismatch

SCHEMA = "edgeward.preprocess/1"
TOP_FIELDS = frozenset({"schema", "sample_rank", "steps"})
OPS = ("resize", "crop", "pad", "scale", "normalize", "layout", "flatten", "dtype")
DTYPES = ("float32", "float16", "uint8", "int8", "int32", "int64")
FIELDS: dict[str, frozenset[str]] = {
    "resize": frozenset({"height", "width", "max_width"}),
    "crop": frozenset({"height", "width"}),
    "pad": frozenset({"min_width", "value"}),
    "scale": frozenset({"factor", "offset"}),
    "normalize": frozenset({"mean", "std"}),
    "layout": frozenset({"to"}),
    "flatten": frozenset(),
    "dtype": frozenset({"to"}),
}
# Steps run in phases: pixel work on NHWC (spatial ops, scale, normalize), then the layout
# change, then flatten/dtype. A spatial op after layout would resize the wrong axes.
PHASE = {"resize": 0, "crop": 0, "pad": 0, "scale": 0, "normalize": 0, "layout": 1}
PHASE.update(flatten=2, dtype=2)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite JSON number: not a bool (``True`` is an int), not NaN/Inf (json accepts them)."""
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _side(value: Any, what: str, limit: int, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not _is_int(value) or not 1 <= value <= limit:
        raise FormatError(f"preprocess {what} must be an integer in [1, {limit}]")
    return int(value)


def _numbers(step: Mapping[str, Any], what: str, keys: tuple[tuple[str, float], ...]) -> None:
    for key, default in keys:
        if not _is_number(step.get(key, default)):
            raise FormatError(f"preprocess {what}.{key} must be a finite number")


def validate(spec: Mapping[str, Any], limits: BundleLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Check a spec strictly (known ops and fields, finite numbers, bounded sizes, step order)
    and return it as a plain dict."""
    if not isinstance(spec, Mapping) or spec.get("schema") != SCHEMA:
        raise FormatError(f"preprocess spec must be an object with schema {SCHEMA!r}")
    if set(spec) - TOP_FIELDS:
        raise FormatError(f"preprocess spec has unknown fields: {sorted(set(spec) - TOP_FIELDS)}")
    rank = spec.get("sample_rank")
    if not _is_int(rank) or rank not in (1, 2, 3):
        raise FormatError("preprocess sample_rank must be 1, 2 or 3")
    steps = spec.get("steps")
    most = limits.max_preprocess_steps
    if not isinstance(steps, list) or len(steps) > most:
        raise FormatError(f"preprocess steps must be a list of at most {most} steps")
    side = limits.max_preprocess_side
    phase = 0
    for step in steps:
        if not isinstance(step, Mapping) or step.get("op") not in OPS:
            raise FormatError(f"preprocess step must be an object with op one of {', '.join(OPS)}")
        op = step["op"]
        extra = set(step) - {"op"} - FIELDS[op]
        if extra:
            raise FormatError(f"preprocess {op} step has unknown fields: {sorted(extra)}")
        if PHASE[op] < phase or (op == "layout" and phase == 1):
            raise FormatError(
                f"preprocess {op} step is out of order: put resize, crop, pad, scale and "
                "normalize first, then one layout, then flatten and dtype"
            )
        phase = max(phase, PHASE[op])
        if op in ("resize", "crop"):
            _side(step.get("height"), f"{op}.height", side)
            _side(step.get("width"), f"{op}.width", side, optional=op == "resize")
            _side(step.get("max_width", side), f"{op}.max_width", side)
        elif op == "pad":
            _side(step.get("min_width"), "pad.min_width", side)
            _numbers(step, "pad", (("value", 0.0),))
        elif op == "scale":
            _numbers(step, "scale", (("factor", 1.0), ("offset", 0.0)))
        elif op == "normalize":
            mean, std = step.get("mean"), step.get("std")
            most = limits.max_preprocess_channels
            if not (
                isinstance(mean, list)
                and isinstance(std, list)
                and 1 <= len(mean) == len(std) <= most
            ):
                raise FormatError(
                    f"preprocess normalize needs mean and std lists of the same length (1-{most})"
                )
            if not all(_is_number(m) for m in mean):
                raise FormatError("preprocess normalize.mean must be finite numbers")
            if not all(_is_number(s) and s != 0 for s in std):
                raise FormatError("preprocess normalize.std must be finite non-zero numbers")
        elif op == "layout" and step.get("to") not in ("NCHW", "NHWC"):
            raise FormatError("preprocess layout.to must be NCHW or NHWC")
        elif op == "dtype" and step.get("to") not in DTYPES:
            raise FormatError(f"preprocess dtype.to must be one of {', '.join(DTYPES)}")
    return {"schema": SCHEMA, "sample_rank": rank, "steps": [dict(s) for s in steps]}


def _too_big(shape: tuple[int, ...], max_elements: int) -> None:
    if math.prod(shape) > max_elements:
        raise FormatError(
            f"pre-processing this input makes more than {max_elements} elements; send a smaller one"
        )


def _lerp_axis(x: np.ndarray, axis: int, dst: int) -> np.ndarray:
    """Bilinear interpolation along one axis (half-pixel centres, like OpenCV's INTER_LINEAR),
    gathering from ``x`` in its own dtype and computing in float32 in place."""
    src = x.shape[axis]
    pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, src - 1)
    frac = (pos - lo).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = dst
    frac = frac.reshape(shape)
    out = np.take(x, lo, axis=axis).astype(np.float32, copy=False)
    if out is x or not out.flags.writeable:
        out = out.copy()
    out *= 1 - frac
    upper = np.take(x, hi, axis=axis).astype(np.float32, copy=False)
    upper *= frac  # np.take always returns a new array: safe to scale in place
    out += upper
    return out


def _resize(x: np.ndarray, height: int, width: int, max_elements: int) -> np.ndarray:
    """Bilinear resize of an NHWC batch, one axis at a time.

    The axis that shrinks most goes first, so the intermediate array is at most the geometric
    mean of input and output; every array is bounded by ``max_elements`` before it is made.
    """
    n, h, w, c = x.shape
    _too_big((n, height, width, c), max_elements)
    if (h, w) == (height, width):
        return x.astype(np.float32)
    rows_first = (n, height, w, c)
    cols_first = (n, h, width, c)
    first, second = (1, 2) if math.prod(rows_first) <= math.prod(cols_first) else (2, 1)
    _too_big(min(rows_first, cols_first, key=math.prod), max_elements)
    target = {1: height, 2: width}
    # each pass holds its result and one gathered temporary of the same shape
    for axis in (first, second):
        if x.shape[axis] != target[axis]:
            x = _lerp_axis(x, axis, target[axis])
    return x.astype(np.float32, copy=False)


def _float32(x: np.ndarray) -> np.ndarray:
    """A float32 array this module owns (never the caller's), so later steps can work in place."""
    return x.astype(np.float32, copy=True)


def _step(
    x: np.ndarray, step: Mapping[str, Any], image: bool, max_elements: int, max_side: int, owned: bool
) -> np.ndarray:
    op = step["op"]
    if op in ("resize", "crop", "pad") and not image:
        raise FormatError(f"preprocess {op} needs image input (sample_rank 2 or 3)")
    if op == "resize":
        h, w = x.shape[1:3]
        height = int(step["height"])
        max_width = int(step.get("max_width", max_side))
        width = min(int(step.get("width") or math.ceil(height * w / h)), max_width)
        return _resize(x, height, width, max_elements)
    if op == "crop":
        h, w = x.shape[1:3]
        ch, cw = int(step["height"]), int(step["width"])
        if ch > h or cw > w:
            raise InputMismatch(
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
        y = x if owned and x.dtype == np.float32 else _float32(x)
        y *= np.float32(step.get("factor", 1.0))
        y += np.float32(step.get("offset", 0.0))
        return y
    if op == "normalize":
        mean = np.asarray(step["mean"], np.float32)
        std = np.asarray(step["std"], np.float32)
        if len(mean) not in (1, x.shape[-1]):
            raise InputMismatch(
                f"input has {x.shape[-1]} channels, the sealed normalisation has {len(mean)}"
            )
        y = x if owned and x.dtype == np.float32 else _float32(x)
        y -= mean
        y /= std
        return y
    if op == "layout":
        if x.ndim != 4:
            raise FormatError("preprocess layout needs image input")
        return x.transpose(0, 3, 1, 2) if step["to"] == "NCHW" else x
    if op == "flatten":
        return x.reshape(x.shape[0], -1)
    return x.astype(np.dtype(step["to"]), copy=False)


def apply(
    spec: Mapping[str, Any] | None,
    inputs: Any,
    max_elements: int | None = None,
    limits: BundleLimits = DEFAULT_LIMITS,
) -> tuple[Any, bool]:
    """Run the sealed spec on the caller's raw input; return (model input, single sample or not).

    Without a spec the input goes through unchanged (and ``False``: the model's own shape decides).
    Every array a step makes is bounded by ``max_elements`` (default
    ``limits.max_preprocess_elements``) before it is allocated, and every image side by
    ``limits.max_preprocess_side``.
    """
    if spec is None:
        return inputs, False
    if max_elements is None:
        max_elements = limits.max_preprocess_elements
    if not isinstance(inputs, np.ndarray):
        raise FormatError("this model takes one raw input array; send a single .npy")
    spec = validate(spec, limits)
    if inputs.dtype == object or inputs.dtype.kind not in "biuf" or inputs.size > max_elements:
        raise FormatError(f"input must be a numeric array of at most {max_elements} elements")
    if 0 in inputs.shape:
        raise FormatError(f"input has an empty dimension (shape {inputs.shape}); send data")
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
    if image:
        side = limits.max_preprocess_side
        if max(x.shape[1:3]) > side:
            raise FormatError(
                f"input image is larger than {side} pixels on a side; send a smaller one"
            )
    if rank == 2:
        x = x[..., np.newaxis]  # grey HxW -> HxWx1
    for step in spec["steps"]:
        y = _step(x, step, image, max_elements, limits.max_preprocess_side, x is not inputs and x.base is None)
        x = y
    return np.ascontiguousarray(x), single

"""Inputs checked before inference, and outputs cut down to what the caller's role may see.

NCSC principle 3.3: the default answer is the least an application needs (a label); scores only
for roles the sealed policy allows. The task and policy come from the bundle's sealed sidecar.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from device_agent.errors import FormatError, InputMismatch, UsageError
from device_agent.runtime.runners import Runner, TensorSpec

ROLES = ("user", "engineer", "admin")
DEFAULT_POLICY: dict[str, Any] = {
    "roles": {"user": "label", "engineer": "band", "admin": "scores"},
    "score_decimals": 4,
    "bands": [[0.9, "high"], [0.6, "medium"], [0.0, "low"]],
}


def _coerce(x: np.ndarray, spec: TensorSpec, what: str) -> tuple[np.ndarray, bool]:
    """Cast to the model's dtype and add a batch axis for a single sample.

    Returns (array, batched)."""
    if x.dtype == object or x.dtype.kind not in "biuf":
        raise FormatError(f"{what}: dtype {x.dtype} is not numeric")
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        raise FormatError(f"{what}: contains NaN or Inf; send finite numbers")
    want = np.dtype(spec.dtype)
    if want.kind in "iu" and x.dtype.kind == "f":
        raise FormatError(f"{what}: the model takes integers, got {x.dtype}")
    if want.kind in "iu" and x.dtype.kind in "iu" and x.size:
        info = np.iinfo(want)
        if x.min() < info.min or x.max() > info.max:
            raise FormatError(f"{what}: values outside {want}'s range {info.min}..{info.max}")
    with np.errstate(over="ignore"):
        x = x.astype(want, copy=False)
    if want.kind == "f" and not np.all(np.isfinite(x)):
        raise FormatError(f"{what}: values too large for the model's {want}; send numbers in its range")
    batched = True
    if spec.shape and x.ndim == len(spec.shape) - 1:
        x = x[np.newaxis, ...]
        batched = False
    if spec.shape and x.ndim != len(spec.shape):
        raise InputMismatch(f"{what}: expected {len(spec.shape)} dimensions, got {x.ndim}")
    for i, (have, need) in enumerate(zip(x.shape, spec.shape, strict=False)):
        if need is not None and have != need and not (i == 0 and len(spec.shape) > 1):
            raise InputMismatch(f"{what}: dimension {i} is {have}, the model needs {need}")
    if not x.size:
        raise FormatError(f"{what}: has an empty dimension; send data")
    return np.ascontiguousarray(x), batched


def prepare_inputs(
    runner: Runner, inputs: np.ndarray | Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], bool]:
    """Map the caller's arrays to the model's inputs; returns (feeds, whether the caller
    batched)."""
    specs = runner.inputs
    if isinstance(inputs, np.ndarray):
        if len(specs) != 1:
            raise FormatError(
                f"the model takes {len(specs)} inputs; send an .npz with one array per input"
            )
        arrays = {specs[0].name: inputs}
    else:
        arrays = {}
        positional = [k for k in inputs if k.startswith("arr_")]
        for i, spec in enumerate(specs):
            key = (
                spec.name if spec.name in inputs else (f"arr_{i}" if f"arr_{i}" in inputs else None)
            )
            if key is None:
                raise FormatError(f"input {i} is missing; send it as arr_{i} (or by its name)")
            arrays[spec.name] = np.asarray(inputs[key])
        extra = set(inputs) - set(arrays) - set(positional[: len(specs)])
        if extra or len(inputs) > len(specs):
            raise FormatError(f"{len(inputs)} arrays sent, the model takes {len(specs)}")
    feeds: dict[str, np.ndarray] = {}
    batched = True
    for i, spec in enumerate(specs):
        feeds[spec.name], b = _coerce(np.asarray(arrays[spec.name]), spec, f"input {i}")
        if i == 0:
            batched = b
    return feeds, batched


def band(p: float, bands: list[list[Any]]) -> str:
    """The confidence band name for probability ``p`` (the policy's bands, highest first)."""
    for threshold, name in bands:
        if p >= float(threshold):
            return str(name)
    return str(bands[-1][1])


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def shape_output(
    outputs: list[np.ndarray],
    task: Mapping[str, Any],
    policy: Mapping[str, Any],
    role: str,
    batched: bool,
) -> dict[str, Any]:
    """Turn raw model outputs into the answer one role may see (every task kind, every caller)."""
    if role not in ROLES:
        raise UsageError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    if task.get("kind") == "ctc":
        from device_agent.runtime.sequence import decode_ctc  # sequence builds on this module's helpers

        return decode_ctc(outputs, task, policy, role, batched)
    pol = DEFAULT_POLICY if not policy else {**DEFAULT_POLICY, **policy}
    view = pol["roles"].get(role, "label")
    decimals = int(pol["score_decimals"])
    kind = task.get("kind", "classifier")
    labels = task.get("labels")
    y = np.asarray(outputs[int(task.get("output", 0))])
    conf: Any = None
    rows_scores: Any = None
    # Scores are computed only for the roles that may see them: the default path is an argmax.
    if kind == "classifier":
        y = y.reshape(y.shape[0], -1)
        top = y.argmax(axis=1)
        if view != "label":
            probs = _softmax(y.astype(np.float64)) if task.get("scores") == "logits" else y.astype(np.float64)
            conf = probs[np.arange(len(top)), top]
            if view == "scores":
                rows_scores = np.round(probs, decimals).tolist()
        if labels and int(top.max(initial=0)) >= len(labels):
            # Checked at install where the model declares its classes; this one declares none.
            raise FormatError(f"the model answered class {int(top.max())}; the sealed task has {len(labels)} labels")
        names = [labels[i] for i in top] if labels else top.tolist()
    elif kind == "binary":
        p = y.reshape(y.shape[0], -1)[:, 0].astype(np.float64)
        top = (p >= float(task.get("threshold", 0.5))).astype(int)
        names_pair = labels or [0, 1]
        names = [names_pair[i] for i in top]
        if view != "label":
            conf = np.where(top == 1, p, 1 - p)
            if view == "scores":
                rows_scores = np.round(p, decimals).tolist()
    elif kind == "raw":
        # Raw outputs have no label: every role but admin gets nothing it could fit a copy with.
        if view != "scores":
            raise UsageError("this model's policy shows raw outputs only to the admin role")
        return {
            "outputs": [
                np.round(np.asarray(o, dtype=np.float64), decimals).tolist() for o in outputs
            ]
        }
    else:
        raise FormatError(f"unknown task kind {kind!r} in the sealed sidecar")
    rows: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        row: dict[str, Any] = {"label": name}
        if view in ("band", "scores"):
            row["confidence"] = band(float(conf[i]), pol["bands"])
        if view == "scores":
            row["scores"] = rows_scores[i]
        rows.append(row)
    if not batched:
        return rows[0]
    return {"predictions": rows}

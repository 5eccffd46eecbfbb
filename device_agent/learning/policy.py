"""The sealed learning policy (``edgeward.learning/1``), carried in the bundle sidecar's
``policy.learning`` and read only from a verified, decrypted bundle.

It marks the model's learnable head (the final linear layer: weight and bias initializers, and the
tensor that feeds it, which the packager added as an extra output), carries the publisher's gate
set, canary inputs and replay set, and sets every bound of intake, filtering and the gate. The
board's :class:`~device_agent.config.LearningConfig` caps what a policy may ask for.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agent.config import DEFAULT_CONFIG, LearningConfig
from device_agent.errors import FormatError
from device_agent.wire import obj_fields

LEARNING_SCHEMA = "edgeward.learning/1"
ARRAY_DTYPES = {"float32": np.float32, "int64": np.int64}

# The tunable bounds and their defaults; each is (default, low, high).
BOUNDS: dict[str, tuple[float, float, float]] = {
    "max_gate_drop": (0.005, 0.0, 1.0),  # gate accuracy may fall at most this much below the publisher's model
    "max_class_drop": (0.05, 0.0, 1.0),  # nor any one class's recall by more than this
    "max_canary_changes": (0, 0, 10**6),  # canary answers that may change (0: none)
    "min_new_gain": (0.0, -1.0, 1.0),  # held-out new data must gain at least this much accuracy
    "retention_days": (30.0, 1e-6, 3650.0),  # feedback older than this is shredded
    "max_examples": (5000, 1, 10**9),  # examples held at once
    "source_daily_cap": (500, 1, 10**9),  # examples one source may send per day (rate cap)
    "max_source_share": (0.5, 0.01, 1.0),  # share of one update's examples one source may supply
    "min_sources": (2, 1, 1000),  # distinct sources an update needs
    "min_examples": (20, 1, 10**9),  # examples an update needs
    "near_duplicate_distance": (0.0, 0.0, 1e9),  # closer than this to a kept example: a near-duplicate
    "consistency_neighbours": (5, 1, 100),  # other sources' examples looked at per example
    "consistency_agreement": (0.8, 0.5, 1.0),  # share of those neighbours that must contradict
    "model_contradiction": (0.9, 0.5, 1.0),  # model probability of another label that contradicts
    "model_support": (0.9, 0.0, 1.0),  # below this probability for the given label, the model does not back it
    "holdout_fraction": (0.2, 0.0, 0.9),  # share of new examples kept out of training, to measure the gain
    "replay_weight": (3.0, 0.0, 1000.0),  # weight of keeping the publisher's answers on the replay set
    "l2": (0.0, 0.0, 1000.0),  # pull of the weights towards the publisher's
    "learning_rate": (0.2, 1e-6, 100.0),
    "steps": (800, 1, 10**9),
    "keep_versions": (3, 1, 10**6),  # local versions kept (previous ones for rollback)
}
INTEGER_BOUNDS = frozenset({"max_canary_changes", "max_examples", "source_daily_cap", "min_sources", "min_examples",
                            "consistency_neighbours", "steps", "keep_versions"})


@dataclass(frozen=True)
class Head:
    """Where the learnable head lies in the model: ``features @ weight + bias`` gives the scores."""

    weight: str
    bias: str
    features: str  # the tensor feeding the head, exposed as an extra model output
    output: int  # the model output that carries the class scores
    classes: int
    dims: int
    bias_shape: tuple[int, ...]


@dataclass(frozen=True)
class LearningPolicy:
    """Everything local learning on this bundle may do, sealed by the publisher."""

    enabled: bool  # whether local learning may run on this bundle at all
    carry_feedback: bool  # whether feedback held under an earlier bundle may be learnt on this one
    head: Head
    gate_x: np.ndarray
    gate_y: np.ndarray
    canary_x: np.ndarray
    canary_y: np.ndarray
    replay_x: np.ndarray
    base_weight: np.ndarray  # the publisher's head (features x classes): what every version starts from
    base_bias: np.ndarray
    bounds: Mapping[str, float]

    def int_bound(self, name: str) -> int:
        return int(self.bounds[name])

    @classmethod
    def from_policy(cls, policy: Mapping[str, Any], config: LearningConfig = DEFAULT_CONFIG.learning
                    ) -> LearningPolicy | None:
        """The learning policy in a sealed policy, or None if the bundle carries none."""
        raw = policy.get("learning")
        if raw is None:
            return None
        known = {"schema", "enabled", "carry_feedback", "head", "gate", "canaries", "replay", "bounds"}
        p = obj_fields(raw, "learning policy", known, {"schema", "head", "gate", "canaries", "replay"})
        if p["schema"] != LEARNING_SCHEMA:
            raise FormatError(f"the sealed learning policy is not {LEARNING_SCHEMA}")
        names = {"weight", "bias", "features", "output", "classes", "dims", "bias_shape", "base"}
        h = obj_fields(p["head"], "learning head", names, names)
        try:
            head = Head(str(h["weight"]), str(h["bias"]), str(h["features"]), int(h["output"]), int(h["classes"]),
                        int(h["dims"]), tuple(int(d) for d in h["bias_shape"]))
        except (TypeError, ValueError) as e:
            raise FormatError(f"the sealed learning head is malformed: {e}") from e
        if not (0 <= head.output < 16 and 2 <= head.classes <= 100_000 and 1 <= head.dims <= 1_000_000):
            raise FormatError("the sealed learning head is out of range")
        if any(d < 1 for d in head.bias_shape) or math.prod(head.bias_shape) != head.classes:
            raise FormatError("the sealed learning head's bias shape does not match its classes")
        budget = [config.max_policy_elements]
        gate = obj_fields(p["gate"], "learning gate", {"x", "y"}, {"x", "y"})
        can = obj_fields(p["canaries"], "learning canaries", {"x", "y"}, {"x", "y"})
        rep = obj_fields(p["replay"], "learning replay", {"x"}, {"x"})
        gate_x, gate_y = decode_array(gate["x"], budget), decode_array(gate["y"], budget)
        canary_x, canary_y = decode_array(can["x"], budget), decode_array(can["y"], budget)
        replay_x = decode_array(rep["x"], budget)
        base = obj_fields(h["base"], "learning head base", {"weight", "bias"}, {"weight", "bias"})
        base_weight, base_bias = decode_array(base["weight"], budget), decode_array(base["bias"], budget)
        if base_weight.shape != (head.dims, head.classes) or base_bias.size != head.classes:
            raise FormatError("the sealed learning head's weights do not match its dimensions")
        if replay_x.shape[1:] != gate_x.shape[1:] or canary_x.shape[1:] != gate_x.shape[1:]:
            raise FormatError("the sealed learning arrays do not share one input shape")
        for name, xs, ys in (("gate", gate_x, gate_y), ("canaries", canary_x, canary_y)):
            if ys.ndim != 1 or xs.shape[:1] != ys.shape or ys.dtype != np.int64:
                raise FormatError(f"the sealed learning {name} inputs and labels do not match")
            if ys.size and (ys.min() < 0 or ys.max() >= head.classes):
                raise FormatError(f"the sealed learning {name} labels are out of range")
        if gate_x.shape[0] < 1:
            raise FormatError("the sealed learning gate set is empty")
        return cls(
            enabled=bool(p.get("enabled", True)),
            carry_feedback=bool(p.get("carry_feedback", False)),
            head=head,
            gate_x=gate_x, gate_y=gate_y, canary_x=canary_x, canary_y=canary_y, replay_x=replay_x,
            base_weight=base_weight.astype(np.float32), base_bias=base_bias.astype(np.float32).reshape(-1),
            bounds=parse_bounds(p.get("bounds", {}), config),
        )


def parse_bounds(raw: Any, config: LearningConfig) -> dict[str, float]:
    """The policy's bounds, defaults where it is silent; the board's caps win."""
    if not isinstance(raw, Mapping):
        raise FormatError("learning bounds must be an object")
    unknown = set(raw) - set(BOUNDS)
    if unknown:
        raise FormatError(f"unknown learning bounds: {', '.join(sorted(unknown))}")
    out: dict[str, float] = {}
    for name, (default, lo, hi) in BOUNDS.items():
        v = raw.get(name, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
            raise FormatError(f"learning bound {name} must be a number in [{lo}, {hi}], got {v!r}")
        if name in INTEGER_BOUNDS and v != int(v):
            raise FormatError(f"learning bound {name} must be a whole number, got {v!r}")
        out[name] = v
    out["max_examples"] = min(out["max_examples"], config.max_examples)
    out["keep_versions"] = min(out["keep_versions"], config.max_versions)
    out["steps"] = min(out["steps"], config.max_steps)
    return out


def encode_array(a: np.ndarray) -> dict[str, Any]:
    """An array as the policy carries it: dtype, shape and the raw little-endian bytes in base64."""
    a = np.ascontiguousarray(a)
    name = {np.dtype(np.float32): "float32", np.dtype(np.int64): "int64"}.get(a.dtype)
    if name is None:
        raise FormatError(f"learning arrays are float32 or int64, not {a.dtype}")
    return {"dtype": name, "shape": list(a.shape), "data": base64.b64encode(a.astype(a.dtype.newbyteorder("<"),
                                                                                  copy=False).tobytes()).decode()}


def decode_array(raw: Any, budget: list[int]) -> np.ndarray:
    """One sealed array, its declared size checked against the bytes present and the remaining
    element budget before anything is allocated."""
    a = obj_fields(raw, "learning array", {"dtype", "shape", "data"}, {"dtype", "shape", "data"})
    dtype = ARRAY_DTYPES.get(a["dtype"]) if isinstance(a["dtype"], str) else None
    shape = a["shape"]
    # No dimension beyond the element budget: a zero elsewhere must not hide one numpy cannot make.
    if dtype is None or not isinstance(shape, list) or not 1 <= len(shape) <= 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= budget[0] for d in shape):
        raise FormatError("a sealed learning array has a bad dtype or shape")
    n = math.prod(shape)
    if n > budget[0]:
        raise FormatError("the sealed learning arrays exceed the board's limit (learning.max_policy_elements)")
    data = a["data"]
    if not isinstance(data, str) or len(data) != 4 * math.ceil(n * np.dtype(dtype).itemsize / 3):
        raise FormatError("a sealed learning array's data does not match its shape")
    try:
        raw_bytes = base64.b64decode(data, validate=True)
    except ValueError as e:
        raise FormatError("a sealed learning array is not base64") from e
    if len(raw_bytes) != n * np.dtype(dtype).itemsize:
        raise FormatError("a sealed learning array's data does not match its shape")
    budget[0] -= n
    out = np.frombuffer(raw_bytes, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(shape)
    if out.dtype.kind == "f" and not np.all(np.isfinite(out)):
        raise FormatError("a sealed learning array holds NaN or Inf")
    return out

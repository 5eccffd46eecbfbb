"""The accuracy gate: original and hardened model measured on the board's own runtime (NCSC 2.6).

Both models run through the agent's pre-processing and runtime adapter (onnxruntime or LiteRT, as
the profile says), because a converted model can load fine and still answer wrongly on one
runtime. A drop beyond the bound refuses the build.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from device_agent.errors import AccuracyRefused, FormatError
from device_agent.output import prepare_inputs
from device_agent.preprocess import apply as preprocess
from device_agent.runtime import load_runner

BATCH = 256


def predict_outputs(
    model: bytes, runtime: str, spec: Mapping[str, Any] | None, x: np.ndarray, threads: int = 0
) -> list[np.ndarray]:
    """Every model output for raw inputs ``x`` (a batch), as the board would compute them."""
    runner = load_runner(runtime, model, threads)
    parts: list[list[np.ndarray]] = []
    for start in range(0, len(x), BATCH):
        batch, _ = preprocess(spec, x[start : start + BATCH])
        feeds, _ = prepare_inputs(runner, batch)
        parts.append(runner.run(feeds))
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def labels_of(outputs: list[np.ndarray], task: Mapping[str, Any]) -> np.ndarray | None:
    """Predicted class indices for classifier and binary tasks; ``None`` for anything else."""
    y = np.asarray(outputs[int(task.get("output", 0))], dtype=np.float64)
    if task.get("kind") == "classifier":
        return y.reshape(len(y), -1).argmax(axis=1)
    if task.get("kind") == "binary":
        return (y.reshape(len(y), -1)[:, 0] >= float(task.get("threshold", 0.5))).astype(np.int64)
    return None


def predict_labels(
    model: bytes,
    runtime: str,
    task: Mapping[str, Any],
    spec: Mapping[str, Any] | None,
    x: np.ndarray,
) -> np.ndarray | None:
    """Predicted classes for raw inputs on the board's runtime; ``None`` for unlabelled tasks."""
    return labels_of(predict_outputs(model, runtime, spec, x), task)


def accuracy(predicted: np.ndarray | None, y: np.ndarray) -> float | None:
    """Top-1 accuracy against the validation labels, or ``None`` where there are no classes."""
    if predicted is None:
        return None
    if len(predicted) != len(y) or not len(y):
        raise FormatError(
            f"validation data has {len(predicted)} inputs and {len(y)} labels; "
            "they must match and not be empty"
        )
    return float((predicted == y.reshape(-1)).mean())


def within(before: float | None, after: float | None, max_drop_points: float) -> bool:
    """Whether the drop (in percentage points) stays within the bound; unmeasured passes."""
    return before is None or after is None or (before - after) * 100 <= max_drop_points + 1e-9


def check(before: float | None, after: float | None, max_drop_points: float, runtime: str) -> None:
    """Refuse the build when the hardened model is worse than allowed."""
    if not within(before, after, max_drop_points):
        assert before is not None and after is not None
        raise AccuracyRefused(
            f"hardened model accuracy {after:.4f} is {(before - after) * 100:.2f} points below the "
            f"original {before:.4f} on {runtime}, over --max-accuracy-drop {max_drop_points}; "
            "quantise less, prune less or give calibration data that matches real inputs"
        )

"""The accuracy gate: original and hardened model measured on the board's own runtime (NCSC 2.6).

Both models run through the agent's pre-processing and runtime adapter (onnxruntime or LiteRT, as
the profile says), because a converted model can load fine and still answer wrongly on one
runtime. Two bounds refuse the build: the accuracy drop against the validation labels
(classifiers and binary models; text recognisers when ``y`` holds the expected strings), and the
disagreement with the original model's own answers (every task: class labels, decoded strings
for ``ctc``, closeness of the outputs for ``raw``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agent.errors import AccuracyRefused, FormatError
from device_agent.runtime.output import prepare_inputs
from device_agent.runtime.preprocess import apply as preprocess
from device_agent.runtime.runners import load_runner
from device_agent.runtime.sequence import decode_ctc

BATCH = 256
RAW_TOLERANCE = 0.05  # a raw output agrees when within 5% of the original's largest magnitude


def predict_outputs(
    model: bytes, runtime: str, spec: Mapping[str, Any] | None, x: np.ndarray, threads: int = 0
) -> list[np.ndarray]:
    """Every model output for raw inputs ``x`` (a batch), as the board would compute them."""
    if not len(x):
        raise FormatError("--validation x is empty; give at least one input")
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


def classes_of(outputs: list[np.ndarray], task: Mapping[str, Any]) -> int | None:
    """How many classes the labels can take (2 for binary), or None for unlabelled tasks."""
    if task.get("kind") == "binary":
        return 2
    if task.get("kind") == "classifier":
        y = outputs[int(task.get("output", 0))]
        return int(np.prod(y.shape[1:])) if y.ndim > 1 else None
    return None


@dataclass(frozen=True)
class Answers:
    """What a model answers on the validation inputs: class indices, texts or raw outputs."""

    kind: str
    values: Any  # np.ndarray of ints, list[str], or list[np.ndarray]


def answers(outputs: list[np.ndarray], task: Mapping[str, Any]) -> Answers:
    kind = str(task.get("kind"))
    labels = labels_of(outputs, task)
    if labels is not None:
        return Answers("labels", labels)
    if kind == "ctc":
        rows = decode_ctc(outputs, task, {}, "user", True)["predictions"]
        return Answers("text", [r["label"] for r in rows])
    return Answers("raw", outputs)


def check_labels(y: np.ndarray | None, n: int, a: Answers, classes: int | None) -> None:
    """Validation labels must fit the task: integer classes in range (or strings for ctc)."""
    if n == 0:
        raise FormatError("--validation x is empty; give at least one input")
    if y is None:
        if a.kind == "labels":
            raise FormatError("--validation needs array y (integer labels) for this classifier")
        return
    if a.kind == "raw":
        return  # raw outputs have no labels: y is not used
    if y.ndim != 1 or len(y) != n:
        raise FormatError(
            f"--validation y has shape {y.shape}; it must be one label per input, shape ({n},) "
            "(class indices, not one-hot)"
        )
    if a.kind == "text":
        if y.dtype.kind != "U":
            raise FormatError("--validation y for a ctc model must hold the expected strings")
        return
    if y.dtype.kind not in "iu":
        raise FormatError(f"--validation y is {y.dtype}; give integer class indices")
    if classes is not None and (y.min() < 0 or y.max() >= classes):
        raise FormatError(
            f"--validation y has labels outside [0, {classes}) for this model's {classes} "
            "classes; give class indices in the model's output order"
        )


def accuracy(a: Answers, y: np.ndarray | None) -> float | None:
    """Top-1 accuracy (exact text for ctc) against the labels, or None where there are none."""
    if y is None or a.kind == "raw":
        return None
    if a.kind == "text":
        return float(np.mean([p == str(t) for p, t in zip(a.values, y, strict=True)]))
    return float((a.values == y).mean())


def agreement(before: Answers, after: Answers) -> float:
    """The fraction of inputs on which the hardened model answers as the original did."""
    if before.kind == "raw":
        agree = np.ones(len(before.values[0]), dtype=bool)
        for b, h in zip(before.values, after.values, strict=True):
            b64, h64 = np.asarray(b, np.float64), np.asarray(h, np.float64)
            if b64.shape != h64.shape:
                return 0.0
            scale = max(float(np.abs(b64).max()) if b64.size else 0.0, 1e-12)
            diff = np.abs(b64 - h64).reshape(len(b64), -1).max(axis=1, initial=0.0)
            agree &= diff <= RAW_TOLERANCE * scale
        return float(agree.mean())
    return float(np.mean([p == q for p, q in zip(before.values, after.values, strict=True)]))


def baseline_check(before: float | None, y: np.ndarray | None, a: Answers) -> None:
    """Refuse a baseline no better than always answering the most common label: the labels
    then do not match the model (wrong order, wrong data), and the gate would judge nothing."""
    if before is None or y is None or a.kind != "labels":
        return
    chance = float(np.bincount(y.astype(np.int64)).max() / len(y))
    if before <= chance:
        raise FormatError(
            f"the original model scores {before:.4f} on --validation, no better than always "
            f"answering the most common label ({chance:.4f}); check that y matches the model's "
            "classes and order"
        )


@dataclass(frozen=True)
class Bounds:
    max_drop_points: float
    max_disagreement_points: float


def within(
    before: float | None, after: float | None, agree: float | None, bounds: Bounds
) -> bool:
    """Whether the hardened model stays within both bounds; unmeasured parts pass."""
    drop_ok = before is None or after is None or (
        (before - after) * 100 <= bounds.max_drop_points + 1e-9
    )
    agree_ok = agree is None or (1 - agree) * 100 <= bounds.max_disagreement_points + 1e-9
    return drop_ok and agree_ok


def check(
    before: float | None, after: float | None, agree: float | None, bounds: Bounds, runtime: str
) -> None:
    """Refuse the build when the hardened model is worse than allowed."""
    if before is not None and after is not None and not within(before, after, None, bounds):
        raise AccuracyRefused(
            f"hardened model accuracy {after:.4f} is {(before - after) * 100:.2f} points below the "
            f"original {before:.4f} on {runtime}, over --max-accuracy-drop "
            f"{bounds.max_drop_points}; quantise less, prune less or give calibration data that "
            "matches real inputs"
        )
    if agree is not None and not within(None, None, agree, bounds):
        raise AccuracyRefused(
            f"hardened model answers differently from the original on {(1 - agree) * 100:.2f}% "
            f"of the validation inputs on {runtime}, over --max-disagreement "
            f"{bounds.max_disagreement_points}; quantise less or prune less"
        )

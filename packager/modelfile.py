"""Reading an input model: refuse unsafe formats, pin its digest, detect its format and task."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from device_agent.errors import FormatError, SecurityRefusal, UsageError
from device_agent.runtime.runners import load_runner

from .limits import HOST_LIMITS
from .scores import output_is_probability

# Formats that execute code when loaded (pickle and its wrappers): never packed (NCSC 2.2).
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".joblib", ".ckpt", ".bin")
ACCEPTED = {".onnx": "onnx", ".tflite": "tflite"}
SCORES = ("probabilities", "logits")  # what a classifier's output is (packager.scores)


@dataclass(frozen=True)
class ModelFile:
    path: Path
    data: bytes
    format: str

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def runtime(self) -> str:
        return "onnxruntime" if self.format == "onnx" else "litert"


def read_model(
    path: Path, expect_sha256: str | None = None, max_bytes: int = HOST_LIMITS.max_model_bytes
) -> ModelFile:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise SecurityRefusal(
            f"{path.name}: pickle-based model formats run code when loaded and are refused; "
            "export the model to ONNX or TFLite first"
        )
    if suffix not in ACCEPTED:
        raise UsageError(
            f"{path.name}: unsupported model format {suffix or '(none)'}; use .onnx or .tflite"
        )
    try:
        size = path.stat().st_size
    except FileNotFoundError as e:
        raise UsageError(f"model {path} does not exist") from e
    if size > max_bytes:
        raise FormatError(f"model {path} is {size} bytes, over the limit of {max_bytes}")
    data = path.read_bytes()
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise SecurityRefusal(f"{path.name} is a pickle stream whatever its name says; refused")
    fmt = ACCEPTED[suffix]
    if fmt == "tflite" and data[4:8] != b"TFL3":
        raise FormatError(f"{path.name} is not a TFLite flatbuffer (no TFL3 identifier)")
    m = ModelFile(path, data, fmt)
    if expect_sha256 is not None and m.sha256 != expect_sha256.lower():
        raise SecurityRefusal(
            f"{path.name} has SHA-256 {m.sha256}, not the pinned {expect_sha256}; "
            "the model is not the one you approved"
        )
    return m


def infer_task(model: ModelFile, override: dict[str, Any]) -> dict[str, Any]:
    """Choose what the agent reports: a classifier's label from the first float output of rank 2,
    unless the caller said otherwise. Loading the model here also proves it loads on the runtime."""
    runner = load_runner(model.runtime, model.data, prepack=False)  # the board loads without pre-packing too
    task = dict(override)
    kind = task.setdefault("kind", "auto")
    if "output" not in task:
        for i, o in enumerate(runner.outputs):
            if len(o.shape) == 2 and str(getattr(o.dtype, "__name__", o.dtype)).startswith("float"):
                task["output"] = i
                break
        else:
            task["output"] = 0
    out = runner.outputs[int(task["output"])]
    if kind == "auto":
        task["kind"] = (
            "classifier" if len(out.shape) == 2 and out.shape[1] not in (None, 1) else "raw"
        )
    if "scores" in task and task["kind"] != "classifier":
        raise UsageError(f"--scores applies to classifiers; this model's task is {task['kind']}")
    if "scores" in task and task["scores"] not in SCORES:
        raise UsageError(f"--scores must be one of {', '.join(SCORES)}")
    if task["kind"] == "classifier" and "scores" not in task:
        probability = output_is_probability(model.data, model.format, out.name, int(task["output"]))
        task["scores"] = "probabilities" if probability else "logits"
    labels = task.get("labels")
    classes = None
    if task["kind"] == "classifier" and out.shape and len(out.shape) == 2:
        classes = out.shape[1]
    elif task["kind"] == "ctc" and out.shape and len(out.shape) == 3:
        classes = out.shape[2]  # (batch, steps, classes): one label per class, blank included
    if labels is not None and classes and len(labels) != classes:
        raise UsageError(
            f"--labels has {len(labels)} labels, the model's output has {classes} classes"
        )
    return task

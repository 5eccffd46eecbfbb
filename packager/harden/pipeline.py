"""The hardening pipeline: prune -> quantise -> strip -> accuracy gate -> model card and report.

Pure with respect to the file system: it takes model bytes and arrays and returns the hardened
model, the sidecar facts and the report; the CLI adapter reads and writes files.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from device_agent.errors import UsageError
from device_agent.runtime.preprocess import apply as preprocess
from device_agent.runtime.preprocess import validate as validate_preprocess

from ..modelfile import ModelFile, infer_task
from ..profiles import Profile
from . import gate
from .modelcard import CardFacts
from .prune import fold_constant_weights, prune, search
from .quantise import MODES, Unquantisable, quantise
from .strip_onnx import onnx_class_labels, strip_onnx
from .strip_tflite import strip_tflite


@dataclass(frozen=True)
class HardenOptions:
    """What the publisher asked for; ``None`` means the profile's default."""

    quantise: str | None = None
    prune: float | str | None = None  # a sparsity in [0, 0.95] or "auto"
    calibration: np.ndarray | None = None  # raw inputs, as the application sends them
    validation: tuple[np.ndarray, np.ndarray | None] | None = None  # raw inputs and labels
    max_accuracy_drop: float = 1.0  # percentage points
    max_disagreement: float = 2.0  # percentage points of inputs answered differently
    no_accuracy_gate: bool = False  # ship lossy stages unchecked (warned, and on the card)
    task: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] | None = None
    training_samples: int | None = None
    training_data: str | None = None
    intended_use: str | None = None
    limitations: tuple[str, ...] = ()
    retention: str | None = None

    def __post_init__(self) -> None:
        if self.quantise is not None and self.quantise not in MODES:
            raise UsageError(f"--quantise must be one of {', '.join(MODES)}")
        if isinstance(self.prune, str) and self.prune != "auto":
            raise UsageError("--prune takes a sparsity between 0 and 0.95, or auto")
        if isinstance(self.prune, float) and not 0 <= self.prune <= 0.95:
            raise UsageError("--prune sparsity must be between 0 and 0.95")
        if not 0 <= self.max_accuracy_drop <= 100:
            raise UsageError("--max-accuracy-drop is in percentage points, between 0 and 100")
        if not 0 <= self.max_disagreement <= 100:
            raise UsageError("--max-disagreement is in percentage points, between 0 and 100")
        if self.prune == "auto" and self.validation is None:
            raise UsageError("--prune auto needs --validation FILE.npz to measure accuracy")
        if self.prune is not None and self.validation is None and not self.no_accuracy_gate:
            raise UsageError(
                "--prune changes the model's answers: give --validation FILE.npz for the "
                "accuracy gate, or --no-accuracy-gate to ship it unchecked"
            )
        if self.validation is not None and self.no_accuracy_gate:
            raise UsageError("--no-accuracy-gate and --validation contradict each other")
        if self.training_samples is not None and self.training_samples < 1:
            raise UsageError("--training-samples must be a positive integer")
        if self.preprocess is not None:
            object.__setattr__(self, "preprocess", validate_preprocess(self.preprocess))


@dataclass(frozen=True)
class Hardened:
    """The hardened model with what goes into its sealed sidecar and its report."""

    model: ModelFile
    task: dict[str, Any]
    preprocess: dict[str, Any] | None
    facts: CardFacts
    report: dict[str, Any]


NO_GATE = "accuracy not checked: hardened with --no-accuracy-gate (no validation data)"


def _strip(data: bytes, fmt: str) -> bytes:
    return strip_onnx(data) if fmt == "onnx" else strip_tflite(data)


def _labels_into_task(model: ModelFile, task: dict[str, Any]) -> dict[str, Any]:
    """ai.onnx.ml classifiers carry string labels; stripping turns them into indices, so the
    strings travel in the sealed sidecar instead (unless --labels gave them)."""
    if model.format != "onnx":
        return task
    names = onnx_class_labels(model.data)
    if names is None or task.get("kind") != "classifier":
        return task
    given = task.get("labels")
    if given is not None and len(given) != len(names):
        raise UsageError(
            f"--labels has {len(given)} labels, the model's classifier has {len(names)} classes"
        )
    return {**task, "labels": given or names}


def harden(model: ModelFile, profile: Profile, opts: HardenOptions) -> Hardened:
    """Run every stage on ``model`` for ``profile``; raise AccuracyRefused past the bounds."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(seconds.get(stage, 0.0) + now - clock, 4)
        clock = now

    fmt, runtime, spec = model.format, profile.runtime_for(model.format), opts.preprocess
    task = _labels_into_task(model, infer_task(model, opts.task))
    mode = opts.quantise or profile.quantisation
    calibration = preprocess(spec, opts.calibration)[0] if opts.calibration is not None else None
    if mode == "static" and calibration is None:
        raise UsageError(
            f"static quantisation (profile {profile.name}'s default) needs --calibration FILE.npz; "
            "or pass --quantise dynamic"
        )
    if mode != "none" and opts.validation is None and not opts.no_accuracy_gate:
        raise UsageError(
            f"quantisation ({mode}) changes the model's answers: give --validation FILE.npz for "
            "the accuracy gate, or --quantise none, or --no-accuracy-gate to ship it unchecked"
        )
    bounds = gate.Bounds(opts.max_accuracy_drop, opts.max_disagreement)
    vx, vy = opts.validation if opts.validation is not None else (None, None)

    def answers(data: bytes) -> gate.Answers | None:
        """What the model answers on the validation inputs, on the profile's runtime."""
        if vx is None:
            return None
        return gate.answers(gate.predict_outputs(data, runtime, spec, vx), task)

    base, before = None, None
    if vx is not None:
        outputs = gate.predict_outputs(model.data, runtime, spec, vx)
        base = gate.answers(outputs, task)
        classes = gate.classes_of(outputs, task)
        if task.get("labels") and task.get("kind") == "classifier":
            classes = len(task["labels"])
        gate.check_labels(vy, len(vx), base, classes)
        before = gate.accuracy(base, vy)
        gate.baseline_check(before, vy, base)
    lap("baseline")
    # Constant-node weights (RapidOCR) become initializers, where pruner and quantiser look.
    source = fold_constant_weights(model.data) if fmt == "onnx" else model.data

    def finish(data: bytes) -> tuple[bytes, dict[str, Any]]:
        """Quantise (skipping gracefully) and strip: the model as it will ship, and what
        quantisation did to this candidate."""
        quant: dict[str, Any] = {"mode": mode, "status": "none" if mode == "none" else "applied"}
        if mode != "none":
            try:
                data = quantise(data, fmt, mode, calibration)
            except Unquantisable as e:
                quant.update(status="skipped", reason=str(e))
        return _strip(data, fmt), quant

    def judge(shipped: bytes) -> tuple[float | None, float | None]:
        """(accuracy, agreement with the original) of a candidate."""
        got = answers(shipped)
        if got is None or base is None:
            return None, None
        return gate.accuracy(got, vy), gate.agreement(base, got)

    sparsity: dict[str, Any] = {
        "requested": opts.prune,
        "chosen": None,
        "zero_fraction": 0.0,
        "units_removed": 0,
        "status": "none",
    }
    unpruned = prune(source, fmt, 0.0, None)
    params_before = params_after = unpruned.parameters
    if opts.prune is None:
        out, quant = finish(source)
        lap("quantise+strip")
    elif unpruned.prunable == 0:
        sparsity.update(status="skipped", reason="nothing prunable (no Conv/MatMul/Gemm weights)")
        out, quant = finish(source)
        lap("prune+quantise+strip")
    else:

        def candidate(s: float) -> tuple[tuple[Any, bytes, dict[str, Any]], bool]:
            pruned = prune(source, fmt, s, calibration)
            shipped, q = finish(pruned.data)
            acc, agree = judge(shipped)
            return (pruned, shipped, q), gate.within(before, acc, agree, bounds)

        try_s: Callable[[float], tuple[tuple[Any, bytes, dict[str, Any]], bool]] = candidate
        found = (
            search(try_s)
            if opts.prune == "auto"
            else (float(opts.prune), try_s(float(opts.prune))[0])
        )
        if found is None:  # not even the lightest pruning fits: ship unpruned, say so
            sparsity.update(chosen=0.0, status="skipped", reason="no sparsity within the bounds")
            out, quant = finish(source)
        else:
            chosen, (pruned, out, quant) = found
            sparsity.update(
                chosen=chosen,
                zero_fraction=round(pruned.zero_fraction, 4),
                units_removed=pruned.units_removed,
                status="applied",
            )
            params_after = pruned.parameters
        lap("prune+quantise+strip")
    after, agree = judge(out)
    lossy = quant["status"] == "applied" or sparsity["status"] == "applied"
    gate.check(before, after, agree, bounds, runtime)
    gate_state = "checked" if base is not None else ("disabled" if lossy else "not needed")
    lap("gate")
    hardened = ModelFile(model.path.with_name(f"model.{fmt}"), out, fmt)
    params = {
        "quantisation": f"{mode} ({quant['status']})",
        "pruning": "none"
        if opts.prune is None
        else f"{opts.prune} -> {sparsity['chosen']} ({sparsity['status']})",
        "units_removed": str(sparsity["units_removed"]),
        "stripped": "names, doc strings, metadata",
        "preprocess": "sealed" if spec else "none",
        "max_accuracy_drop_points": str(opts.max_accuracy_drop),
        "max_disagreement_points": str(opts.max_disagreement),
        "accuracy_gate": gate_state,
    }
    notes = [f"quantisation skipped: {quant['reason']}"] if "reason" in quant else []
    if "reason" in sparsity:
        notes.append(f"pruning skipped: {sparsity['reason']}")
    if gate_state == "disabled":
        notes.append(NO_GATE)
    facts = CardFacts(
        input_sha256=model.sha256,
        input_name=model.path.name,
        input_bytes=len(model.data),
        output_sha256=hardened.sha256,
        output_bytes=len(out),
        model_format=fmt,
        task=str(task.get("kind")),
        scores=task.get("scores"),
        parameters_before=params_before,
        parameters_after=params_after,
        accuracy_before=before,
        accuracy_after=after,
        hardening=params,
        training_samples=opts.training_samples,
        training_data=opts.training_data,
        intended_use=opts.intended_use or CardFacts.intended_use,
        limitations=opts.limitations + tuple(notes),
        retention=opts.retention or CardFacts.retention,
    )
    report = {
        "schema": "edgeward.harden-report/1",
        "profile": profile.name,
        "runtime": runtime,
        "model": {
            "input": {"name": model.path.name, "sha256": model.sha256, "format": fmt},
            "output": {"sha256": hardened.sha256},
        },
        "size_bytes": {
            "input": len(model.data),
            "output": len(out),
            "compressed": len(zlib.compress(out, 6)),
        },
        "accuracy": {
            "gate": gate_state,
            "input": before,
            "output": after,
            "agreement": None if agree is None else round(agree, 4),
            "drop_points": None
            if before is None or after is None
            else round((before - after) * 100, 4),
            "max_drop_points": opts.max_accuracy_drop,
            "max_disagreement_points": opts.max_disagreement,
        },
        "parameters": {"input": params_before, "output": params_after},
        "sparsity": sparsity,
        "quantisation": quant,
        "stripped": True,
        "preprocess": "sealed" if spec else None,
        "seconds": seconds,
        "card_facts": asdict(facts),  # lets `edgeward pack DIR` write the same card later
    }
    return Hardened(hardened, task, spec, facts, report)


def summary(report: dict[str, Any]) -> str:
    """The readable table printed on the terminal."""

    def fmt(v: Any) -> str:
        return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    size, acc, q, sp = (
        report["size_bytes"],
        report["accuracy"],
        report["quantisation"],
        report["sparsity"],
    )
    rows = [
        ("size (bytes)", fmt(size["input"]), fmt(size["output"])),
        ("zlib-compressed", "", fmt(size["compressed"])),
        ("accuracy", fmt(acc["input"]), fmt(acc["output"])),
        ("parameters", fmt(report["parameters"]["input"]), fmt(report["parameters"]["output"])),
        ("quantisation", "", f"{q['mode']} ({q['status']})"),
        (
            "sparsity",
            "",
            f"{fmt(sp['chosen'])} (zeros {sp['zero_fraction']}, "
            f"units removed {sp['units_removed']})",
        ),
        ("stripped", "", "yes"),
    ]
    lines = [f"{'':<22}{'input':>14}  {'hardened':<40}"]
    lines += [f"{name:<22}{a:>14}  {b:<40}" for name, a, b in rows]
    if "reason" in q:
        lines.append(f"quantisation skipped: {q['reason']}")
    if "reason" in sp:
        lines.append(f"pruning skipped: {sp['reason']}")
    if acc.get("gate") == "disabled":
        lines.append(f"WARNING: {NO_GATE}")
    if acc["drop_points"] is not None:
        lines.append(
            f"accuracy drop {acc['drop_points']:.2f} points "
            f"(bound {acc['max_drop_points']}) on {report['runtime']}"
        )
    if acc.get("agreement") is not None:
        lines.append(
            f"answers as the original on {acc['agreement'] * 100:.2f}% of validation inputs "
            f"(bound {100 - acc['max_disagreement_points']:.2f}%)"
        )
    lines.append("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in report["seconds"].items()))
    return "\n".join(lines)

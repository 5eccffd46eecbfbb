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
from device_agent.preprocess import apply as preprocess
from device_agent.preprocess import validate as validate_preprocess

from ..modelfile import ModelFile, infer_task
from ..profiles import Profile
from . import gate
from .modelcard import CardFacts
from .prune import prune, search
from .quantise import MODES, Unquantisable, quantise
from .strip_onnx import strip_onnx
from .strip_tflite import strip_tflite


@dataclass(frozen=True)
class HardenOptions:
    """What the publisher asked for; ``None`` means the profile's default."""

    quantise: str | None = None
    prune: float | str | None = None  # a sparsity in [0, 0.95] or "auto"
    calibration: np.ndarray | None = None  # raw inputs, as the application sends them
    validation: tuple[np.ndarray, np.ndarray] | None = None  # raw inputs and labels
    max_accuracy_drop: float = 1.0  # percentage points
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
        if self.prune == "auto" and self.validation is None:
            raise UsageError("--prune auto needs --validation FILE.npz to measure accuracy")
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


def _strip(data: bytes, fmt: str) -> bytes:
    return strip_onnx(data) if fmt == "onnx" else strip_tflite(data)


def harden(model: ModelFile, profile: Profile, opts: HardenOptions) -> Hardened:
    """Run every stage on ``model`` for ``profile``; raise AccuracyRefused past the bound."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(seconds.get(stage, 0.0) + now - clock, 4)
        clock = now

    fmt, runtime, spec = model.format, profile.runtime, opts.preprocess
    task = infer_task(model, opts.task)
    mode = opts.quantise or profile.quantisation
    calibration = preprocess(spec, opts.calibration)[0] if opts.calibration is not None else None
    if mode == "static" and calibration is None:
        raise UsageError(
            f"static quantisation (profile {profile.name}'s default) needs --calibration FILE.npz; "
            "or pass --quantise dynamic"
        )
    validation = opts.validation

    def measure(data: bytes) -> tuple[np.ndarray | None, float | None]:
        """(predicted classes, accuracy) on the validation data, on the profile's runtime."""
        if validation is None:
            return None, None
        predicted = gate.predict_labels(data, runtime, task, spec, validation[0])
        return predicted, gate.accuracy(predicted, validation[1])

    labels_in, before = measure(model.data)
    lap("baseline")
    quant: dict[str, Any] = {"mode": mode, "status": "none" if mode == "none" else "applied"}

    def finish(data: bytes) -> bytes:
        """Quantise (skipping gracefully) and strip: the model as it will ship."""
        if quant["status"] == "applied":
            try:
                data = quantise(data, fmt, mode, calibration)
            except Unquantisable as e:
                quant.update(status="skipped", reason=str(e))
        return _strip(data, fmt)

    sparsity: dict[str, Any] = {
        "requested": opts.prune,
        "chosen": None,
        "zero_fraction": 0.0,
        "units_removed": 0,
    }
    params_before = prune(model.data, fmt, 0.0, None).parameters
    params_after = params_before
    if opts.prune is None:
        out = finish(model.data)
        lap("quantise+strip")
    else:

        def candidate(s: float) -> tuple[tuple[Any, bytes], bool]:
            pruned = prune(model.data, fmt, s, calibration)
            shipped = finish(pruned.data)
            return (pruned, shipped), gate.within(
                before, measure(shipped)[1], opts.max_accuracy_drop
            )

        try_s: Callable[[float], tuple[tuple[Any, bytes], bool]] = candidate
        found = (
            search(try_s)
            if opts.prune == "auto"
            else (float(opts.prune), try_s(float(opts.prune))[0])
        )
        if found is None:  # not even the lightest pruning fits: ship unpruned, say so
            sparsity["chosen"] = 0.0
            out = finish(model.data)
        else:
            chosen, (pruned, out) = found
            sparsity.update(
                chosen=chosen,
                zero_fraction=round(pruned.zero_fraction, 4),
                units_removed=pruned.units_removed,
            )
            params_after = pruned.parameters
        lap("prune+quantise+strip")
    labels_out, after = measure(out)
    agreement = None
    if labels_in is not None and labels_out is not None:
        agreement = round(float((labels_in == labels_out).mean()), 4)
    gate.check(before, after, opts.max_accuracy_drop, runtime)
    lap("gate")
    hardened = ModelFile(model.path.with_name(f"model.{fmt}"), out, fmt)
    params = {
        "quantisation": f"{mode} ({quant['status']})",
        "pruning": "none" if opts.prune is None else f"{opts.prune} -> {sparsity['chosen']}",
        "units_removed": str(sparsity["units_removed"]),
        "stripped": "names, doc strings, metadata",
        "preprocess": "sealed" if spec else "none",
        "max_accuracy_drop_points": str(opts.max_accuracy_drop),
    }
    facts = CardFacts(
        input_sha256=model.sha256,
        input_name=model.path.name,
        input_bytes=len(model.data),
        output_sha256=hardened.sha256,
        output_bytes=len(out),
        model_format=fmt,
        task=str(task.get("kind")),
        parameters_before=params_before,
        parameters_after=params_after,
        accuracy_before=before,
        accuracy_after=after,
        hardening=params,
        training_samples=opts.training_samples,
        training_data=opts.training_data,
        intended_use=opts.intended_use or CardFacts.intended_use,
        limitations=opts.limitations
        + ((f"quantisation skipped: {quant['reason']}",) if "reason" in quant else ()),
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
            "input": before,
            "output": after,
            "agreement": agreement,
            "drop_points": None
            if before is None or after is None
            else round((before - after) * 100, 4),
            "max_drop_points": opts.max_accuracy_drop,
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
    if acc["drop_points"] is not None:
        lines.append(
            f"accuracy drop {acc['drop_points']:.2f} points "
            f"(bound {acc['max_drop_points']}) on {report['runtime']}"
        )
    lines.append("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in report["seconds"].items()))
    return "\n".join(lines)

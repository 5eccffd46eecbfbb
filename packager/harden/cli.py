"""``edgeward harden`` and the hardening options of ``edgeward pack``: the file-system adapter."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.bundle.format import Sidecar
from device_agent.cliutil import emit
from device_agent.errors import EdgeWardError, FormatError, IntegrityError, SecurityRefusal, UsageError
from device_agent.runtime.preprocess import validate as validate_preprocess
from device_agent.store.fsutil import atomic_write

from ..jsonfile import read_json_object
from ..modelfile import ModelFile, infer_task, read_model
from ..profiles import Profile
from .modelcard import CardFacts
from .modelcard import build as build_card
from .pipeline import NO_GATE, Hardened, HardenOptions, harden, summary
from .strip_onnx import strip_onnx
from .strip_tflite import strip_tflite
from .supply import check_allowed, inline_external_data

HARDENING_FLAGS = ("quantise", "prune", "calibration", "validation", "preprocess")
# meaningful only while hardening runs: refused on plain `pack` and `pack DIR`
HARDENING_ONLY = (
    "max_accuracy_drop",
    "max_disagreement",
    "no_accuracy_gate",
    "training_samples",
    "training_data",
    "intended_use",
    "limitation",
    "retention",
)


def _sparsity(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError("expected a sparsity such as 0.5, or auto") from e


def add_options(p: argparse.ArgumentParser, *, for_pack: bool) -> None:
    """The hardening options; ``pack`` already has --labels, --expect-sha256 and --end-of-life."""
    g = p.add_argument_group("hardening")
    if for_pack:
        g.add_argument(
            "--harden",
            action="store_true",
            help="harden with the profile's defaults (implied by any option below)",
        )
    g.add_argument(
        "--quantise",
        choices=["none", "dynamic", "static"],
        help="int8 quantisation (default: the profile's)",
    )
    g.add_argument(
        "--prune",
        type=_sparsity,
        help="weight sparsity 0-0.95, or auto: the largest within the accuracy bound",
    )
    g.add_argument(
        "--calibration",
        help="FILE.npz with array x: representative raw inputs (static quantisation)",
    )
    g.add_argument(
        "--validation",
        help="FILE.npz with arrays x (raw inputs) and y (integer labels; strings for ctc; "
        "not needed for raw) for the accuracy gate",
    )
    g.add_argument(
        "--max-accuracy-drop",
        type=float,
        help="refuse past this accuracy drop, in points (default 1.0)",
    )
    g.add_argument(
        "--max-disagreement",
        type=float,
        help="refuse when the hardened model answers differently from the original on more "
        "than this many percent of the validation inputs (default 2.0)",
    )
    g.add_argument(
        "--no-accuracy-gate",
        action="store_true",
        help="UNSAFE: quantise/prune without --validation; warns and records the limitation "
        "in the model card",
    )
    g.add_argument("--preprocess", help="SPEC.json run on the board before the model (sealed)")
    g.add_argument("--allow-list", help="file of approved model SHA-256 digests (sha256sum format)")
    g.add_argument(
        "--training-samples", type=int, help="training-set size, for the capacity check (NCSC 2.6)"
    )
    g.add_argument("--training-data", help="reference to the training data set, for the model card")
    g.add_argument("--intended-use", help="intended use, for the model card")
    g.add_argument(
        "--limitation",
        action="append",
        default=[],
        help="known limitation, for the model card (repeatable)",
    )
    g.add_argument("--retention", help="retention statement for the model card")


def _npz(
    path: str | None, what: str, arrays: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, np.ndarray] | None:
    if path is None:
        return None
    from ..arrays import load_npz

    z = load_npz(path, what)
    missing = [a for a in arrays if a not in z]
    if missing:
        raise FormatError(f"{what} {path} has no array {', '.join(missing)}")
    return {a: np.asarray(z[a]) for a in (*arrays, *optional) if a in z}


def wants_hardening(args: argparse.Namespace) -> bool:
    """``pack`` hardens only when asked, so existing pipelines keep their exact model bytes."""
    return bool(getattr(args, "harden", False)) or any(
        getattr(args, f) is not None for f in HARDENING_FLAGS
    )


def _hardening_only_given(args: argparse.Namespace) -> list[str]:
    """Options that only mean something when hardening runs now."""
    given = [f for f in HARDENING_ONLY if getattr(args, f, None) not in (None, False, [])]
    return ["--" + f.replace("_", "-") for f in given]


def pin(model: ModelFile, expect_sha256: str | None, allow_list: str | None) -> None:
    """The digest pins (--expect-sha256, --allow-list) on exactly the bytes that will be used."""
    if expect_sha256 is not None and model.sha256 != expect_sha256.lower():
        raise SecurityRefusal(
            f"{model.path.name} has SHA-256 {model.sha256}, not the pinned {expect_sha256}; "
            "the model is not the one you approved"
        )
    if allow_list:
        check_allowed(model.sha256, model.path.name, Path(allow_list))


def read_input(
    path: Path, expect_sha256: str | None, allow_list: str | None, profile: Profile
) -> tuple[ModelFile, list[str]]:
    """Read a model once (pickle refused, size bounded), inline ONNX external data from the bytes
    read, pin the result, and check the profile's runtime can run it.

    Returns (model, external data file names). For a model with external data the pins cover
    the inlined model (graph and every weight), never the small graph file alone.
    """
    model = read_model(path, None, profile.max_model_bytes)
    external: list[str] = []
    if model.format == "onnx":
        data, external = inline_external_data(path, model.data, profile.max_model_bytes)
        model = ModelFile(model.path, data, model.format)
    pin(model, expect_sha256, allow_list)
    profile.runtime_for(model.format)  # the board must have the runtime the model's format needs
    return model, external


def _check_hardened(out: Path, model: ModelFile, sidecar: Sidecar, facts: CardFacts) -> None:
    """Everything ``edgeward harden`` guarantees about its output, checked again: the directory
    may have been edited since (CI artefacts are writable by many)."""
    if facts.output_sha256 != model.sha256 or facts.output_bytes != len(model.data):
        raise IntegrityError("its report.json card_facts describe another model")
    if facts.model_format != model.format:
        raise IntegrityError("its report.json card_facts give another model format")
    if sidecar.preprocess is not None:
        validate_preprocess(sidecar.preprocess)
    task = infer_task(model, sidecar.task)
    if task.get("kind") != sidecar.task.get("kind"):
        raise IntegrityError("its sidecar task does not fit the model")
    stripped = strip_onnx(model.data) if model.format == "onnx" else strip_tflite(model.data)
    if stripped != model.data:
        raise IntegrityError("its model still carries names or metadata that stripping removes")


def load_hardened(
    out: Path, expect_sha256: str | None, profile: Profile, allow_list: str | None = None
) -> Hardened:
    """Read an ``edgeward harden`` output directory back and check it as untrusted input: the
    model against its sidecar and card facts, the sidecar's pre-processing and task, that the
    model is stripped, and the pins (which cover the hardened model's bytes)."""
    models = [p for p in (out / "model.onnx", out / "model.tflite") if p.exists()]
    if len(models) != 1:
        raise UsageError(
            f"{out} is not an edgeward harden output: expected model.onnx or model.tflite"
        )
    model, _ = read_input(models[0], expect_sha256, allow_list, profile)
    sidecar = Sidecar.from_json(read_json_object(out / "sidecar.json", "harden output"))
    if sidecar.model_sha256 != model.sha256:
        raise IntegrityError(
            f"{models[0]} differs from {out}/sidecar.json; run edgeward harden again"
        )
    report = read_json_object(out / "report.json", "harden output") or {}
    try:
        raw = dict(report["card_facts"])
        facts = CardFacts(**{**raw, "limitations": tuple(raw.get("limitations", ()))})
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(
            f"{out}/report.json has no valid card_facts; run edgeward harden again"
        ) from e
    try:
        _check_hardened(out, model, sidecar, facts)
    except EdgeWardError as e:
        raise IntegrityError(
            f"{out} is not an untouched edgeward harden output: {e}; run edgeward harden again"
        ) from e
    return Hardened(model, sidecar.task, sidecar.preprocess, facts, report)


def model_for_pack(
    args: argparse.Namespace, profile: Profile, task: dict[str, Any]
) -> tuple[ModelFile, dict[str, Any], dict[str, Any]]:
    """What ``pack`` seals: a harden output directory as is, a model hardened now, or plain.
    The pins (--expect-sha256, --allow-list) apply on every path."""
    source = Path(args.model)
    allow_list = getattr(args, "allow_list", None)
    if source.is_dir():
        if wants_hardening(args) or task or _hardening_only_given(args):
            raise UsageError(
                f"{source} is already hardened; give task and hardening options to harden"
            )
        hardened = load_hardened(source, args.expect_sha256, profile, allow_list)
    else:
        hardening = wants_hardening(args)
        if not hardening and _hardening_only_given(args):
            raise UsageError(
                f"{', '.join(_hardening_only_given(args))} only apply when hardening; "
                "add --harden (or a hardening option) or drop them"
            )
        model, external = read_input(source, args.expect_sha256, allow_list, profile)
        if not hardening:
            return model, infer_task(model, task), {}
        hardened = run_from_args(args, model, profile, task, external)
    extra = {
        "preprocess": hardened.preprocess,
        "card_facts": hardened.facts,
        "hardening": hardened.report,
    }
    return hardened.model, hardened.task, extra


def run_from_args(
    args: argparse.Namespace,
    model: ModelFile,
    profile: Profile,
    task: dict[str, Any],
    external: list[str],
) -> Hardened:
    """The pipeline with the options on the command line (the model already read and pinned)."""
    calibration = _npz(args.calibration, "--calibration", ("x",))
    validation = _npz(args.validation, "--validation", ("x",), ("y",))
    opts = HardenOptions(
        quantise=args.quantise,
        prune=args.prune,
        calibration=calibration["x"] if calibration else None,
        validation=(validation["x"], validation.get("y")) if validation else None,
        max_accuracy_drop=1.0 if args.max_accuracy_drop is None else args.max_accuracy_drop,
        max_disagreement=2.0 if args.max_disagreement is None else args.max_disagreement,
        no_accuracy_gate=args.no_accuracy_gate,
        task=task,
        preprocess=read_json_object(args.preprocess, "--preprocess"),
        training_samples=args.training_samples,
        training_data=args.training_data,
        intended_use=args.intended_use,
        limitations=tuple(args.limitation),
        retention=args.retention,
    )
    hardened = harden(model, profile, opts)
    if hardened.report["accuracy"]["gate"] == "disabled":
        print(f"edgeward: warning: {NO_GATE}", file=sys.stderr)
    hardened.report["model"]["input"]["external_data"] = external
    return hardened


def _write(path: Path, data: bytes) -> None:
    atomic_write(path, data, 0o644)


def cmd_harden(args: argparse.Namespace) -> int:
    """Write the hardened model, its sidecar, model card and report into --out."""
    from .. import __version__
    from ..cli import _labels
    from ..pack import parse_cli_time
    from ..profiles import load_profile

    profile = load_profile(args.profile)
    model, external = read_input(Path(args.model), args.expect_sha256, args.allow_list, profile)
    labels = _labels(args.labels)
    task = {k: v for k, v in (("kind", args.task), ("labels", labels), ("scores", args.scores)) if v}
    h = run_from_args(args, model, profile, task, external)
    card = build_card(
        h.facts,
        model_id=args.model_id,
        model_version=args.model_version,
        profile=profile.name,
        runtime=profile.runtime_for(h.model.format),
        created=datetime.now(UTC),
        tool_version=__version__,
        end_of_life=parse_cli_time(args.end_of_life, "--end-of-life"),
    )
    sidecar = Sidecar(
        model_format=h.model.format,
        model_sha256=h.model.sha256,
        model_length=len(h.model.data),
        task=h.task,
        runtime={"threads": profile.threads},
        preprocess=h.preprocess,
        model_card=card,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True, mode=0o755)
    _write(out / f"model.{h.model.format}", h.model.data)
    _write(out / "sidecar.json", (json.dumps(sidecar.to_json(), indent=2) + "\n").encode())
    _write(out / "model-card.cdx.json", (json.dumps(card, indent=2) + "\n").encode())
    _write(out / "report.json", (json.dumps(h.report, indent=2) + "\n").encode())
    emit(
        args,
        h.report,
        lambda r: (
            summary(r) + f"\nmodel, sidecar.json, model-card.cdx.json and report.json in {out}"
        ),
    )
    return 0


def register_harden(sub: Any) -> None:
    """Add ``edgeward harden`` to the host CLI."""
    sp = sub.add_parser(
        "harden",
        help="quantise, prune and strip a model; seal its pre-processing; gate its accuracy",
        description="Harden MODEL for a board profile and write OUT/model.onnx|tflite, "
        "OUT/sidecar.json "
        "(sealed in every bundle), OUT/model-card.cdx.json and OUT/report.json. Exit 1 when the "
        "accuracy drop on the profile's runtime exceeds --max-accuracy-drop.",
    )
    sp.add_argument("model", help="model file (.onnx or .tflite); pickle formats are refused")
    sp.add_argument("--profile", required=True, help="board profile name or .toml file")
    sp.add_argument("--out", required=True, help="output directory")
    sp.add_argument(
        "--labels", help="class labels: JSON list or one per line (sealed, never in the model)"
    )
    sp.add_argument(
        "--task", choices=["classifier", "binary", "raw", "ctc"], help="how outputs become answers"
    )
    sp.add_argument(
        "--scores", choices=["probabilities", "logits"],
        help="a classifier's output is already probabilities, or logits the agent softmaxes "
        "(default: decided from the model's graph; sealed, and on the model card)",
    )
    sp.add_argument("--expect-sha256", help="refuse the model unless its SHA-256 is this")
    sp.add_argument("--model-id", default="model", help="model id for the model card")
    sp.add_argument("--model-version", type=int, help="model version for the model card")
    sp.add_argument("--end-of-life", help="end of life (ISO 8601) for the model card")
    sp.add_argument("--json", action="store_true", help="print the report as JSON")
    add_options(sp, for_pack=False)
    sp.set_defaults(func=cmd_harden)

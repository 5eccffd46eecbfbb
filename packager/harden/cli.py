"""``edgeward harden`` and the hardening options of ``edgeward pack``: the file-system adapter."""

from __future__ import annotations

import argparse
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.bundle import Sidecar
from device_agent.cliutil import emit
from device_agent.errors import FormatError, IntegrityError, UsageError

from ..modelfile import ModelFile, infer_task, read_model
from ..profiles import Profile
from .modelcard import CardFacts
from .modelcard import build as build_card
from .pipeline import Hardened, HardenOptions, harden, summary
from .supply import check_allowed, inline_external_data

HARDENING_FLAGS = ("quantise", "prune", "calibration", "validation", "preprocess")


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
        help="FILE.npz with arrays x (raw inputs) and y (labels) for the accuracy gate",
    )
    g.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=1.0,
        help="refuse past this drop, in points (default 1.0)",
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


def _npz(path: str | None, what: str, arrays: tuple[str, ...]) -> tuple[np.ndarray, ...] | None:
    if path is None:
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [a for a in arrays if a not in z.files]
            if missing:
                raise FormatError(f"{what} {path} has no array {', '.join(missing)}")
            return tuple(np.asarray(z[a]) for a in arrays)
    except FileNotFoundError as e:
        raise UsageError(f"{what} {path} does not exist") from e
    except ValueError as e:  # pickled object arrays or not an npz
        raise FormatError(f"{what} {path} is not a numeric .npz file: {e}") from e


def _json_file(path: str | None, what: str) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise UsageError(f"{what} {path} does not exist") from e
    except ValueError as e:
        raise FormatError(f"{what} {path} is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise FormatError(f"{what} {path} must hold a JSON object")
    return doc


def wants_hardening(args: argparse.Namespace) -> bool:
    """``pack`` hardens only when asked, so existing pipelines keep their exact model bytes."""
    return bool(getattr(args, "harden", False)) or any(
        getattr(args, f) is not None for f in HARDENING_FLAGS
    )


def read_for_profile(path: Path, expect_sha256: str | None, profile: Profile) -> ModelFile:
    """Read a model (pickle refused, digest pinned) and check the profile's runtime can run it."""
    model = read_model(path, expect_sha256, profile.max_model_bytes)
    if model.runtime != profile.runtime:
        raise UsageError(
            f"profile {profile.name} runs {profile.runtime}, "
            f"but {model.path.name} is a {model.format} model"
        )
    return model


def load_hardened(out: Path, expect_sha256: str | None, profile: Profile) -> Hardened:
    """Read an ``edgeward harden`` output directory back, checking the model against its sidecar."""
    models = [p for p in (out / "model.onnx", out / "model.tflite") if p.exists()]
    if len(models) != 1:
        raise UsageError(
            f"{out} is not an edgeward harden output: expected model.onnx or model.tflite"
        )
    model = read_for_profile(models[0], expect_sha256, profile)
    sidecar = Sidecar.from_json(_json_file(str(out / "sidecar.json"), "harden output"))
    if sidecar.model_sha256 != model.sha256:
        raise IntegrityError(
            f"{models[0]} differs from {out}/sidecar.json; run edgeward harden again"
        )
    report = _json_file(str(out / "report.json"), "harden output") or {}
    try:
        raw = dict(report["card_facts"])
        facts = CardFacts(**{**raw, "limitations": tuple(raw.get("limitations", ()))})
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(
            f"{out}/report.json has no valid card_facts; run edgeward harden again"
        ) from e
    return Hardened(model, sidecar.task, sidecar.preprocess, facts, report)


def model_for_pack(
    args: argparse.Namespace, profile: Profile, task: dict[str, Any]
) -> tuple[ModelFile, dict[str, Any], dict[str, Any]]:
    """What ``pack`` seals: a harden output directory as is, a model hardened now, or plain."""
    source = Path(args.model)
    if source.is_dir():
        if wants_hardening(args) or task:
            raise UsageError(
                f"{source} is already hardened; give task and hardening options to harden"
            )
        hardened = load_hardened(source, args.expect_sha256, profile)
    else:
        model = read_for_profile(source, args.expect_sha256, profile)
        if not wants_hardening(args):
            return model, infer_task(model, task), {}
        hardened = run_from_args(args, model, profile, task)
    extra = {
        "preprocess": hardened.preprocess,
        "card_facts": hardened.facts,
        "hardening": hardened.report,
    }
    return hardened.model, hardened.task, extra


def run_from_args(
    args: argparse.Namespace, model: ModelFile, profile: Profile, task: dict[str, Any]
) -> Hardened:
    """Supply-chain checks, then the pipeline with the options on the command line."""
    if args.allow_list:
        check_allowed(model.sha256, model.path.name, Path(args.allow_list))
    external: list[str] = []
    if model.format == "onnx":
        data, external = inline_external_data(model.path, model.data)
        model = ModelFile(model.path, data, model.format)
    calibration = _npz(args.calibration, "--calibration", ("x",))
    validation = _npz(args.validation, "--validation", ("x", "y"))
    opts = HardenOptions(
        quantise=args.quantise,
        prune=args.prune,
        calibration=calibration[0] if calibration else None,
        validation=(validation[0], validation[1]) if validation else None,
        max_accuracy_drop=args.max_accuracy_drop,
        task=task,
        preprocess=_json_file(args.preprocess, "--preprocess"),
        training_samples=args.training_samples,
        training_data=args.training_data,
        intended_use=args.intended_use,
        limitations=tuple(args.limitation),
        retention=args.retention,
    )
    hardened = harden(model, profile, opts)
    hardened.report["model"]["input"]["external_data"] = external
    return hardened


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def cmd_harden(args: argparse.Namespace) -> int:
    """Write the hardened model, its sidecar, model card and report into --out."""
    from .. import __version__
    from ..cli import _labels
    from ..pack import parse_cli_time
    from ..profiles import load_profile

    profile = load_profile(args.profile)
    model = read_for_profile(Path(args.model), args.expect_sha256, profile)
    labels = _labels(args.labels)
    task = {k: v for k, v in (("kind", args.task), ("labels", labels)) if v}
    h = run_from_args(args, model, profile, task)
    card = build_card(
        h.facts,
        model_id=args.model_id,
        model_version=args.model_version,
        profile=profile.name,
        runtime=profile.runtime,
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
    out.mkdir(parents=True, exist_ok=True)
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
    sp.add_argument("--expect-sha256", help="refuse the model unless its SHA-256 is this")
    sp.add_argument("--model-id", default="model", help="model id for the model card")
    sp.add_argument("--model-version", type=int, help="model version for the model card")
    sp.add_argument("--end-of-life", help="end of life (ISO 8601) for the model card")
    sp.add_argument("--json", action="store_true", help="print the report as JSON")
    add_options(sp, for_pack=False)
    sp.set_defaults(func=cmd_harden)

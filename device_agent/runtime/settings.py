"""The settings a publisher seals in a bundle's sidecar, checked like any other input.

A valid signature says who wrote the sidecar, not that its values are sane: a careless or
compromised publisher can seal a thread count of a million (which hangs the runtime), a task
kind no code knows, an output index or a label list that does not fit the model, a policy
whose roles, bands or limits crash the answer, or a pre-processing spec the agent cannot run.
The agent checks every sealed setting at install, against the model it came with, before the
state is committed (:class:`~device_agent.errors.FormatError`, exit 3, nothing changed), and
again whenever a stored bundle is loaded.

Pure functions over the sidecar's JSON values and the model's declared outputs; every bound
comes from :class:`~device_agent.config.BundleLimits`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from device_agent.config import DEFAULT_LIMITS, BundleLimits, ThrottleConfig
from device_agent.errors import FormatError
from device_agent.runtime import preprocess
from device_agent.runtime.output import ROLES
from device_agent.runtime.runners import TensorSpec

RUNTIME_FIELDS = frozenset({"threads"})
TASK_KINDS = ("classifier", "binary", "raw", "ctc")
TASK_FIELDS = frozenset({"kind", "output", "labels", "scores", "threshold", "blank"})
SCORES = ("probabilities", "logits")
POLICY_FIELDS = frozenset({"roles", "score_decimals", "bands", "throttle", "ood", "audit", "learning"})
VIEWS = ("label", "band", "scores")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _known(doc: Mapping[str, Any], what: str, known: frozenset[str]) -> None:
    unknown = set(doc) - known
    if unknown:
        raise FormatError(
            f"sealed {what} has unknown fields: {', '.join(sorted(map(str, unknown)))[:200]}; "
            "repack the model with this release's packager"
        )


def threads(runtime: Mapping[str, Any], limits: BundleLimits = DEFAULT_LIMITS) -> int:
    """The sealed thread count (0: the runtime's default), checked before a runtime sees it."""
    _known(runtime, "runtime", RUNTIME_FIELDS)
    n = runtime.get("threads", 0)
    if not _is_int(n) or not 0 <= n <= limits.max_runtime_threads:
        raise FormatError(
            f"sealed runtime.threads must be an integer in [0, {limits.max_runtime_threads}], "
            f"got {str(n)[:40]!r}; repack the model for this board's profile"
        )
    return int(n)


def _classes(spec: TensorSpec) -> int | None:
    """Classes of a classifier output: every axis after the batch, when all are declared."""
    dims = spec.shape[1:]
    if not dims or any(d is None for d in dims):
        return None
    return math.prod(d for d in dims if d is not None)


def check_task(
    task: Mapping[str, Any], outputs: Sequence[TensorSpec] | None, limits: BundleLimits = DEFAULT_LIMITS
) -> None:
    """The sealed task: a kind the agent answers, an output the model has, and labels that fit
    it. ``outputs`` (the loaded model's) is None where no model is at hand (the packager)."""
    _known(task, "task", TASK_FIELDS)
    kind = task.get("kind", "classifier")
    if kind not in TASK_KINDS:
        raise FormatError(f"sealed task.kind must be one of {', '.join(TASK_KINDS)}, got {str(kind)[:40]!r}")
    index = task.get("output", 0)
    count = len(outputs) if outputs is not None else None
    if not _is_int(index) or index < 0 or (count is not None and index >= count):
        raise FormatError(
            f"sealed task.output must be the index of one of the model's {count or 'outputs'} outputs, "
            f"got {str(index)[:40]!r}"
        )
    if task.get("scores", "probabilities") not in SCORES:
        raise FormatError(f"sealed task.scores must be one of {', '.join(SCORES)}")
    if "threshold" in task and not _is_number(task["threshold"]):
        raise FormatError("sealed task.threshold must be a finite number")
    labels = task.get("labels")
    if labels is not None:
        most = limits.max_sealed_labels
        if not isinstance(labels, list) or not 1 <= len(labels) <= most:
            raise FormatError(f"sealed task.labels must be a list of 1 to {most} labels")
        chars = limits.max_label_chars
        for label in labels:
            if not (_is_int(label) or (isinstance(label, str) and len(label) <= chars)):
                raise FormatError(f"sealed task.labels must be integers or strings of at most {chars} characters")
    spec = outputs[index] if outputs is not None else None
    classes = _classes(spec) if spec is not None else None
    if kind == "binary" and labels is not None and len(labels) != 2:
        raise FormatError(f"sealed binary task has {len(labels)} labels; it needs 2")
    if kind == "classifier" and labels is not None and classes is not None and len(labels) != classes:
        raise FormatError(f"sealed task has {len(labels)} labels, the model's output has {classes} classes")
    if kind == "ctc":
        if labels is None:
            raise FormatError("sealed ctc task needs one label per class")
        if spec is not None and spec.shape and len(spec.shape) != 3:
            raise FormatError("sealed ctc task needs a (batch, steps, classes) output")
        if spec is not None and len(spec.shape) == 3 and spec.shape[2] not in (None, len(labels)):
            raise FormatError(
                f"sealed ctc task has {len(labels)} labels, the model's output has {spec.shape[2]} classes"
            )
        blank = task.get("blank", 0)
        if not _is_int(blank) or not 0 <= blank < len(labels):
            raise FormatError("sealed task.blank must be the index of one of the labels")
    elif "blank" in task:
        raise FormatError("sealed task.blank is for ctc tasks only")


def check_policy(policy: Mapping[str, Any], limits: BundleLimits = DEFAULT_LIMITS) -> None:
    """The sealed policy: roles and views the agent knows, bands and precision in range, and the
    throttle, budget, audit and detection settings the service will apply."""
    _known(policy, "policy", POLICY_FIELDS)
    roles = policy.get("roles", {})
    if not isinstance(roles, dict) or any(r not in ROLES or v not in VIEWS for r, v in roles.items()):
        raise FormatError(
            f"sealed policy.roles must map roles ({', '.join(ROLES)}) to views ({', '.join(VIEWS)})"
        )
    decimals = policy.get("score_decimals", 4)
    if not _is_int(decimals) or not 0 <= decimals <= limits.max_score_decimals:
        raise FormatError(f"sealed policy.score_decimals must be an integer in [0, {limits.max_score_decimals}]")
    if "bands" in policy:
        bands, most = policy["bands"], limits.max_policy_bands
        if not (
            isinstance(bands, list)
            and 1 <= len(bands) <= most
            and all(
                isinstance(b, list) and len(b) == 2 and _is_number(b[0]) and isinstance(b[1], str)
                and len(b[1]) <= limits.max_label_chars
                for b in bands
            )
        ):
            raise FormatError(f"sealed policy.bands must be 1 to {most} [threshold, name] pairs")
    throttle = policy.get("throttle", {})
    if not isinstance(throttle, dict):
        raise FormatError("sealed policy.throttle must be an object")
    ThrottleConfig.from_json(throttle)  # FormatError naming the limit
    audit = policy.get("audit", {})
    if not isinstance(audit, dict) or set(audit) - {"retention_days"}:
        raise FormatError("sealed policy.audit may hold retention_days only")
    days = audit.get("retention_days", 1)
    if not _is_number(days) or days <= 0:
        raise FormatError("sealed policy audit.retention_days must be a positive number")
    if "ood" in policy:
        from device_agent.service.detect import MAX_DIMS, Calibration

        if not isinstance(policy["ood"], dict):
            raise FormatError("sealed OoD calibration must be an object")
        cal = Calibration.from_policy(policy)
        if cal is None:
            raise FormatError("sealed OoD calibration is incomplete")
        if cal.mean.size > MAX_DIMS or not (
            math.isfinite(cal.threshold) and cal.threshold >= 0 and math.isfinite(cal.probe_eps) and cal.probe_eps >= 0
        ):
            raise FormatError("sealed OoD calibration is out of range")
    if "learning" in policy:
        from device_agent.learning.policy import LearningPolicy

        LearningPolicy.from_policy(policy)  # FormatError naming the field (device_agent.learning)


def check(
    sidecar: Any, outputs: Sequence[TensorSpec] | None, limits: BundleLimits = DEFAULT_LIMITS
) -> None:
    """Every sealed setting of ``sidecar`` (a :class:`~device_agent.bundle.format.Sidecar`):
    runtime, task, policy and pre-processing."""
    threads(sidecar.runtime, limits)
    check_task(sidecar.task, outputs, limits)
    check_policy(sidecar.policy, limits)
    if sidecar.preprocess is not None:
        preprocess.validate(sidecar.preprocess, limits)

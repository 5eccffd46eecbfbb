"""The validation gate: whether a candidate head may serve, judged on the publisher's sealed gate
set and canaries against the publisher's own model (never against the previous local version,
so that many small accepted steps cannot add up to more than one bound)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device_agent.errors import FormatError


def accuracy(pred: np.ndarray, y: np.ndarray) -> float | None:
    return float((pred == y).mean()) if len(y) else None


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reasons: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)


def judge(
    bounds: Mapping[str, float],
    gate_y: np.ndarray,
    base_gate: np.ndarray,
    cand_gate: np.ndarray,
    canary_y: np.ndarray,
    cand_canary: np.ndarray,
    new_y: np.ndarray,
    base_new: np.ndarray,
    cand_new: np.ndarray,
) -> Verdict:
    """Accept only if gate accuracy falls by at most ``max_gate_drop`` below the publisher's model,
    no class's recall by more than ``max_class_drop``, at most ``max_canary_changes`` canary answers
    change, and the held-out new examples gain at least ``min_new_gain``."""
    reasons = []
    before, after = accuracy(base_gate, gate_y), accuracy(cand_gate, gate_y)
    if before is None or after is None:
        raise FormatError("the sealed gate set is empty: nothing to judge a local version on")
    if after < before - bounds["max_gate_drop"] - 1e-12:
        reasons.append(f"gate accuracy {after:.4f} is more than {bounds['max_gate_drop']} below {before:.4f}")
    worst_class, worst_drop = None, 0.0
    for c in np.unique(gate_y):
        m = gate_y == c
        drop = float((base_gate[m] == c).mean() - (cand_gate[m] == c).mean())
        if drop > worst_drop:
            worst_class, worst_drop = int(c), drop
    if worst_drop > bounds["max_class_drop"] + 1e-12:
        reasons.append(f"class {worst_class} recall fell by {worst_drop:.4f}, over {bounds['max_class_drop']}")
    changed = int((cand_canary != canary_y).sum())
    if changed > bounds["max_canary_changes"]:
        reasons.append(f"{changed} canary answer(s) changed, {int(bounds['max_canary_changes'])} allowed")
    new_before, new_after = accuracy(base_new, new_y), accuracy(cand_new, new_y)
    if new_before is not None and new_after is not None and new_after < new_before + bounds["min_new_gain"] - 1e-12:
        reasons.append(f"held-out new data accuracy {new_after:.4f} did not gain {bounds['min_new_gain']} "
                       f"over {new_before:.4f}")
    metrics = {
        "gate_before": round(before, 4),
        "gate_after": round(after, 4),
        "worst_class_drop": round(worst_drop, 4),
        "canary_changes": changed,
        "new_before": None if new_before is None else round(new_before, 4),
        "new_after": None if new_after is None else round(new_after, 4),
        "new_examples": int(len(new_y)),
    }
    return Verdict(not reasons, reasons, metrics)

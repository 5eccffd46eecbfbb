"""Sequence outputs turned into text on the board: greedy CTC decoding with sealed labels.

Text recognisers (e.g. PaddleOCR/RapidOCR) emit one class distribution per time step; the
character dictionary that maps classes to text travels in the encrypted sidecar (task
``{"kind": "ctc", "labels": [...], "blank": 0}``), never in the model file (NCSC 1.3).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from device_agent.errors import FormatError
from device_agent.runtime.output import DEFAULT_POLICY, band


def decode_ctc(
    outputs: list[np.ndarray],
    task: Mapping[str, Any],
    policy: Mapping[str, Any],
    role: str,
    batched: bool,
) -> dict[str, Any]:
    """Collapse repeats, drop blanks, map classes to the sealed labels; confidence by role.
    Called through :func:`output.shape_output`, which has checked ``role``."""
    labels = task.get("labels")
    y = np.asarray(outputs[int(task.get("output", 0))], dtype=np.float32)
    if not labels or y.ndim != 3 or y.shape[2] != len(labels):
        raise FormatError(
            "ctc task needs a (batch, steps, classes) output and one sealed label per class"
        )
    blank = int(task.get("blank", 0))
    pol = {**DEFAULT_POLICY, **policy}
    view = pol["roles"].get(role, "label")
    rows = []
    for seq in y:
        idx, prob = seq.argmax(axis=1), seq.max(axis=1)
        keep = (idx != blank) & np.concatenate([[True], idx[1:] != idx[:-1]])
        row: dict[str, Any] = {"label": "".join(str(labels[i]) for i in idx[keep])}
        if view in ("band", "scores"):
            row["confidence"] = band(float(prob[keep].mean()) if keep.any() else 0.0, pol["bands"])
        rows.append(row)
    return {"predictions": rows} if batched else rows[0]

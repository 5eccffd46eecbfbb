"""The filters every feedback example passes before it is learnt: pure functions over arrays.

In order (``docs/learning.md``, "Filters"):

1. **out of distribution**: the bundle's calibrated detector (Mahalanobis distance to the
   publisher's validation data) scores the input above its sealed threshold: *rejected*;
2. **exact duplicates** (same input bytes) and **near-duplicates** (closer than the sealed
   ``near_duplicate_distance`` to an earlier example): *rejected*, the first one kept;
3. **label consistency**: most of the other sources' nearest examples (in the model's own feature
   space) carry another label, and the model prefers that label to the given one (or the sources
   are near unanimous and the model does not strongly back the given one); or the model gives the
   label at most ``1 - model_contradiction`` and fewer than half of those neighbours back it; or,
   with no other source to judge, the model strongly predicts another label: *held* for an
   engineer's review, never learnt unreviewed;
4. **source caps**: no source may supply more than ``max_source_share`` of an update, and an
   update needs ``min_sources`` sources: the excess is *deferred* to a later cycle.

Every example ends in one of ``use``, ``held``, ``rejected`` or ``deferred``, with a reason; the
cycle counts and reports each, and nothing is dropped silently.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from device_agent.service.detect import Calibration

USE, HELD, REJECTED, DEFERRED = "use", "held", "rejected", "deferred"
_BLOCK = 256  # rows of the pairwise distance matrix computed at once (memory stays small)


@dataclass(frozen=True)
class Screening:
    decision: list[str]
    reason: list[str]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, Counter[str]] = {}
        for d, r in zip(self.decision, self.reason, strict=True):
            out.setdefault(d, Counter())[r] += 1
        return {d: dict(sorted(c.items())) for d, c in sorted(out.items())}

    def used(self) -> np.ndarray:
        return np.array([d == USE for d in self.decision], dtype=bool)


def nearest_earlier(x: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """For each row, the distance to the nearest earlier row that is ``alive`` (inf if none)."""
    n = len(x)
    out = np.full(n, np.inf)
    sq = np.einsum("ij,ij->i", x, x)
    for a in range(0, n, _BLOCK):
        b = min(n, a + _BLOCK)
        d2 = sq[a:b, None] + sq[None, :b] - 2.0 * (x[a:b] @ x[:b].T)
        rows = np.arange(a, b)[:, None]
        cols = np.arange(b)[None, :]
        d2[(cols >= rows) | ~alive[None, :b]] = np.inf
        out[a:b] = np.sqrt(np.maximum(d2.min(axis=1), 0.0)) if b else np.inf
    return out


def neighbour_votes(emb: np.ndarray, labels: np.ndarray, sources: Sequence[str], pool: np.ndarray, k: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each row: the label most of its ``k`` nearest rows from *other* sources (among ``pool``)
    carry, the share that carry it, the share that carry the row's own label, and whether ``k``
    such rows existed."""
    n = len(emb)
    vote = np.full(n, -1, dtype=np.int64)
    share = np.zeros(n)
    support = np.zeros(n)
    enough = np.zeros(n, dtype=bool)
    src = np.array(list(sources), dtype=object)
    sq = np.einsum("ij,ij->i", emb, emb)
    idx = np.flatnonzero(pool)
    if not len(idx):
        return vote, share, support, enough
    for a in range(0, n, _BLOCK):
        b = min(n, a + _BLOCK)
        d2 = sq[a:b, None] + sq[None, idx] - 2.0 * (emb[a:b] @ emb[idx].T)
        d2[src[a:b, None] == src[None, idx]] = np.inf
        for r in range(b - a):
            row = d2[r]
            m = int(np.isfinite(row).sum())
            if m < k:
                continue
            near = idx[np.argpartition(row, k - 1)[:k]]
            top, count = Counter(labels[near].tolist()).most_common(1)[0]
            vote[a + r], share[a + r], enough[a + r] = top, count / k, True
            support[a + r] = float((labels[near] == labels[a + r]).mean())
    return vote, share, support, enough


def share_cap(counts: Mapping[str, int], max_share: float) -> int:
    """The largest per-source count c such that no source supplying min(n_s, c) examples exceeds
    ``max_share`` of the total (water-filling over sources)."""
    lo, hi = 0, max(counts.values(), default=0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        total = sum(min(v, mid) for v in counts.values())
        if mid <= max_share * total + 1e-9:
            lo = mid
        else:
            hi = mid - 1
    return lo


def screen(
    inputs: np.ndarray,
    digests: Sequence[str],
    embeddings: np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray,
    sources: Sequence[str],
    reviewed: np.ndarray,
    calibration: Calibration | None,
    bounds: Mapping[str, float],
) -> Screening:
    """Decide every example (rows in the order they arrived). ``inputs`` are the flat vectors the
    OoD detector compares, ``embeddings`` the model's features, ``probs`` the installed model's
    class probabilities; ``reviewed`` marks examples an engineer accepted (they skip the label
    check, nothing else)."""
    n = len(labels)
    decision = [USE] * n
    reason = [""] * n
    alive = np.ones(n, dtype=bool)
    if calibration is not None and inputs.shape[1] == calibration.mean.size:
        for i in range(n):
            if calibration.score(inputs[i]) > calibration.threshold:
                decision[i], reason[i], alive[i] = REJECTED, "out-of-distribution", False
    seen: dict[str, int] = {}
    for i, d in enumerate(digests):
        if alive[i] and d in seen:
            decision[i], reason[i], alive[i] = REJECTED, "duplicate", False
        elif alive[i]:
            seen[d] = i
    eps = float(bounds["near_duplicate_distance"])
    if eps > 0:
        near = nearest_earlier(np.asarray(inputs, dtype=np.float64), alive.copy())
        for i in range(n):
            if alive[i] and near[i] < eps:
                decision[i], reason[i], alive[i] = REJECTED, "near-duplicate", False
    k = int(bounds["consistency_neighbours"])
    vote, share, support, enough = neighbour_votes(np.asarray(embeddings, dtype=np.float64), labels, sources, alive, k)
    for i in range(n):
        if not alive[i] or reviewed[i]:
            continue
        p_label = float(probs[i, labels[i]])
        top = int(probs[i].argmax())
        model_against = top != labels[i] and float(probs[i, top]) >= bounds["model_contradiction"]
        if enough[i]:
            # The other sources' majority says another label, and either they are near unanimous
            # while the model does not strongly back the given label, or the model prefers theirs.
            against = vote[i] != labels[i] and share[i] > 0.5
            strong = share[i] >= bounds["consistency_agreement"] and p_label < bounds["model_support"]
            if against and (strong or float(probs[i, vote[i]]) > p_label):
                decision[i], reason[i] = HELD, "contradicted by the model and other sources"
            elif p_label <= 1 - bounds["model_contradiction"] and support[i] < 0.5:
                decision[i], reason[i] = HELD, "backed by neither the model nor other sources"
        elif model_against:
            decision[i], reason[i] = HELD, "contradicted by the model (no other source to judge)"
    use = [i for i in range(n) if decision[i] == USE]
    per_source = Counter(sources[i] for i in use)
    max_share = float(bounds["max_source_share"])
    if len(per_source) < int(bounds["min_sources"]) or len(per_source) * max_share < 1 - 1e-9:
        for i in use:
            decision[i], reason[i] = DEFERRED, "too few sources"
        return Screening(decision, reason)
    cap = share_cap(per_source, max_share)
    taken: Counter[str] = Counter()
    for i in reversed(use):  # the newest examples of a source are learnt first
        if taken[sources[i]] >= cap:
            decision[i], reason[i] = DEFERRED, "source share cap"
        taken[sources[i]] += 1
    if sum(1 for d in decision if d == USE) < int(bounds["min_examples"]):
        for i in range(n):
            if decision[i] == USE:
                decision[i], reason[i] = DEFERRED, "too few examples"
    return Screening(decision, reason)


def holdout(digests: Sequence[str], used: np.ndarray, fraction: float) -> np.ndarray:
    """A fixed share of the used examples kept out of training to measure the gain on new data
    (chosen by digest, so the same example stays on the same side from cycle to cycle)."""
    mask = np.zeros(len(digests), dtype=bool)
    if fraction <= 0:
        return mask
    for i, d in enumerate(digests):
        if used[i] and int(d[:8], 16) / 0xFFFFFFFF < fraction:
            mask[i] = True
    return mask


def within_day(times: Sequence[float], sources: Sequence[str], now: float) -> Counter[str]:
    """Examples each source sent in the 24 hours before ``now`` (the daily rate cap)."""
    return Counter(s for t, s in zip(times, sources, strict=True) if now - 86400.0 < t <= now + 1e-9
                   and math.isfinite(t))

"""Refitting the model's final linear layer in numpy: no training framework on the board.

The candidate head minimises cross-entropy on the new examples plus ``replay_weight`` times the
divergence from the publisher's own answers on the sealed replay set (knowledge distillation:
what the model knew is kept without the publisher's training data), plus an optional L2 pull
towards the publisher's weights. Every version starts from the publisher's head and learns from
every example currently trusted, so a version never inherits a dropped example's influence.
Full-batch gradient descent; memory is a few copies of (examples x features).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HeadWeights:
    """A head's weight (features x classes) and bias (classes), float32 as the model stores them."""

    weight: np.ndarray
    bias: np.ndarray

    def scores(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, dtype=np.float32) @ self.weight + self.bias.reshape(-1)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def refit(
    base: HeadWeights,
    features: np.ndarray,
    labels: np.ndarray,
    replay_features: np.ndarray,
    *,
    replay_weight: float,
    l2: float,
    learning_rate: float,
    steps: int,
) -> HeadWeights:
    """The head fitted to ``features``/``labels`` while keeping the base head's answers on the
    replay features."""
    w0 = base.weight.astype(np.float64)
    b0 = base.bias.astype(np.float64).reshape(-1)
    w, b = w0.copy(), b0.copy()
    f = np.asarray(features, dtype=np.float64)
    r = np.asarray(replay_features, dtype=np.float64)
    target = np.zeros((len(f), w.shape[1]))
    target[np.arange(len(f)), labels] = 1.0
    keep = softmax(r @ w0 + b0) if len(r) else None
    n = max(len(f), 1)
    for _ in range(steps):
        g = (softmax(f @ w + b) - target) / n
        gw = f.T @ g + l2 * (w - w0)
        gb = g.sum(axis=0)
        if keep is not None and replay_weight > 0:
            gr = replay_weight * (softmax(r @ w + b) - keep) / len(r)
            gw += r.T @ gr
            gb += gr.sum(axis=0)
        w -= learning_rate * gw
        b -= learning_rate * gb
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
        raise ArithmeticError("the refit diverged")
    return HeadWeights(w.astype(np.float32), b.astype(np.float32).reshape(base.bias.shape))

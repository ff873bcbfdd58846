"""An independent NumPy float64 reference of δ-GClip, for the tests.

Written from the paper's formula, not from the library: no JAX, no optax.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def to_f64(x: Any) -> np.ndarray:
    """Any leaf (bfloat16 included) as a float64 NumPy array, exactly."""
    return np.asarray(np.asarray(x, dtype=np.float32), dtype=np.float64)


def norm(tree: Any) -> float:
    leaves = [to_f64(x) for x in jax.tree.leaves(tree)]
    return float(np.sqrt(sum(float(np.sum(x * x)) for x in leaves)))


def scale(grad_norm: float, gamma: float, delta: float) -> float:
    """s = min(1, max(delta, gamma / ||g||)), with s = 1 for ||g|| = 0."""
    if grad_norm == 0.0:
        return 1.0
    return min(1.0, max(delta, gamma / grad_norm))


def sgd_step(
    params: Any, grads: Any, lr: float, gamma: float, delta: float, wd: float = 0.0
) -> tuple[Any, float]:
    """One δ-GClip step in float64: returns (new params, h)."""
    h = lr * scale(norm(grads), gamma, delta)
    new = jax.tree.map(
        lambda p, g: to_f64(p) - h * (to_f64(g) + wd * to_f64(p)), params, grads
    )
    return new, h

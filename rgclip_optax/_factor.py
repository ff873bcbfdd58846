"""The δ-GClip factor and its regimes, on a norm or on a log of norms.

    s = min(1, max(delta, gamma / ||g||))

makes the step ``-eta * s * g`` a plain gradient step for small gradients, a
step of length ``eta * gamma`` (GClip) for larger ones, and never shorter than
``eta * delta`` times the gradient (the δ floor).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rgclip_optax._sums import NORM_DTYPE


def _is_array_like(x: Any) -> bool:
    """Whether ``x`` is one array for ``jnp.asarray`` (an array, a number, or a
    possibly nested list or tuple of Python numbers), not a pytree of them."""
    if isinstance(x, (numbers.Number, np.ndarray, np.generic, jax.Array)):
        return True
    return type(x) in (list, tuple) and all(
        isinstance(leaf, numbers.Number) for leaf in jax.tree.leaves(x)
    )


def _on_norms(fn: Callable[[Any], jax.Array], grad_norm: Any) -> Any:
    """``fn`` on one array of norms, or on each leaf of a tree of norms (the
    per-tensor ``grad_norm`` of the state), keeping the tree's structure."""
    if _is_array_like(grad_norm):
        return fn(grad_norm)
    return jax.tree.map(fn, grad_norm)


def delta_gclip_scale(grad_norm: Any, gamma: chex.Numeric, delta: chex.Numeric) -> Any:
    """The δ-GClip factor ``s = min(1, max(delta, gamma / grad_norm))``.

    Computed in float32 with ``jnp.where``/``minimum``/``maximum`` only, so it
    is jittable with traced hyperparameters. A zero norm (and any norm up to
    ``gamma``, ``gamma = inf`` included) gives ``s = 1`` with no division by
    zero; an infinite norm gives ``s = delta``; a NaN norm gives NaN.

    Args:
      grad_norm: the global norm of the gradient, an array of norms
        (elementwise), or a pytree of them such as the per-tensor
        ``grad_norm`` of :class:`DeltaGClipState` (leaf by leaf).
      gamma: the clipping threshold, > 0.
      delta: the floor, in [0, 1].

    Returns:
      Float32 values in ``[delta, 1]`` (NaN where ``grad_norm`` is NaN), of
      ``grad_norm``'s shape, or a pytree of them with its structure.
    """
    gamma = jnp.asarray(gamma, NORM_DTYPE)
    delta = jnp.asarray(delta, NORM_DTYPE)

    def factor(grad_norm: Any) -> jax.Array:
        norm = jnp.asarray(grad_norm, NORM_DTYPE)
        one = jnp.ones_like(norm)
        # Only an exact zero is replaced: a NaN norm must stay NaN. Selects
        # (not jnp.where, a nested jit): per-tensor norms build this per leaf.
        safe_norm = lax.select_n(norm == 0, norm, one)
        clipped = jnp.minimum(1.0, jnp.maximum(delta, gamma / safe_norm))
        return lax.select_n(norm <= gamma, clipped, one)

    return _on_norms(factor, grad_norm)


UNCLIPPED, CLIPPED, FLOOR, SKIPPED = 0, 1, 2, -1


def delta_gclip_regime(grad_norm: Any, gamma: chex.Numeric, delta: chex.Numeric) -> Any:
    r"""Which branch of the δ-GClip factor a gradient norm falls in.

    For logging how often the floor binds. Elementwise over ``grad_norm``, so a
    whole training log of norms is classified at once; leaf by leaf over a
    pytree of norms, such as the per-tensor ``grad_norm`` of
    ``norm="per_tensor"``.

    .. math::

      \text{regime}(\|g\|) =
      \begin{cases}
        0 \text{ (unclipped, } s = 1) & \|g\| \le \gamma \\
        2 \text{ (floor, } s = \delta) & \gamma / \|g\| < \delta \\
        1 \text{ (clipped, } s = \gamma / \|g\|) & \text{otherwise}
      \end{cases}

    and -1 for a NaN or infinite norm (a step that ``skip_nonfinite`` skips).
    The comparisons are those of :func:`delta_gclip_scale`, in float32, so the
    floor regime is exactly the steps whose factor is ``delta`` with
    ``delta < 1`` (with ``delta = 0``, GClip, it never occurs).

    Args:
      grad_norm: gradient norm(s), an array of any shape, or a pytree of them
        (for instance a per-tensor ``grad_norm``).
      gamma: the clipping threshold, > 0.
      delta: the floor, in [0, 1].

    Returns:
      An int32 array of ``grad_norm``'s shape with values in {-1, 0, 1, 2},
      or a pytree of them with ``grad_norm``'s structure.

    Example:
      >>> import jax.numpy as jnp
      >>> import rgclip_optax as rgc
      >>> rgc.delta_gclip_regime([0.5, 5.0, 500.0, float("nan")], 1.0, 0.1)
      Array([ 0,  1,  2, -1], dtype=int32)
      >>> per_tensor = {"w": jnp.array(50.0), "b": jnp.array(0.5)}
      >>> rgc.delta_gclip_regime(per_tensor, 1.0, 0.1)["w"]
      Array(2, dtype=int32)
    """
    gamma = jnp.asarray(gamma, NORM_DTYPE)
    delta = jnp.asarray(delta, NORM_DTYPE)

    def regime_of(grad_norm: Any) -> jax.Array:
        norm = jnp.asarray(grad_norm, NORM_DTYPE)
        regime = jnp.where(
            norm <= gamma,
            UNCLIPPED,
            jnp.where(gamma / norm < delta, FLOOR, CLIPPED),
        )
        return jnp.where(jnp.isfinite(norm), regime, SKIPPED).astype(jnp.int32)

    return _on_norms(regime_of, grad_norm)

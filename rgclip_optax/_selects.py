"""Selects of whole leaves on one scalar predicate: a skipped step's zero
updates.

On GPUs and TPUs they are ``lax.select_n``. On XLA:CPU a select inside the
fused update costs time: the VAE example's scanned training step was
1.10-1.16x SGD's with ``select_n`` against 1.01-1.03x with bit masks (AND of
the float's bits with all ones or all zeros, the same result bit for bit;
jax/jaxlib 0.10.2, ``benchmarks/step_overhead.py``'s end-to-end VAE step,
interleaved). A bit cast has no derivative, so there the masks carry one
``custom_jvp`` for all leaves together: the derivative of a select, which
sends exactly zero to the branch not taken (``tests/test_differentiation.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from rgclip_optax import _platform

_UNSIGNED = (None, jnp.uint8, jnp.uint16, None, jnp.uint32)


def _bits(dtype: Any) -> Any:
    """The unsigned type of a real float's bits (up to 32), or None."""
    if jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize <= 4:
        return _UNSIGNED[jnp.dtype(dtype).itemsize]
    return None


def _selected_zero(pred: jax.Array, x: Any) -> Any:
    """``x``, or +0 everywhere where ``pred`` holds, as one ``select_n``."""
    return lax.select_n(pred, x, lax.full_like(x, 0))


def _masked_zeros(pred: jax.Array, leaves: list[Any]) -> list[Any]:
    """Each leaf ANDed with a mask of all zeros (``pred``) or all ones; types
    with no bit mask here (complex, float64) take ``select_n``."""
    keep: dict[Any, jax.Array] = {}  # one mask per width, not one per leaf
    out = []
    for x in leaves:
        bits = _bits(x.dtype)
        if bits is None:
            out.append(_selected_zero(pred, x))
            continue
        if bits not in keep:
            keep[bits] = lax.select_n(
                pred, jnp.asarray(jnp.iinfo(bits).max, bits), jnp.zeros([], bits)
            )
        masked = lax.bitcast_convert_type(x, bits) & keep[bits]
        out.append(lax.bitcast_convert_type(masked, x.dtype))
    return out


@jax.custom_jvp
def _zeros_by_mask(pred: jax.Array, leaves: list[Any]) -> list[Any]:
    return _masked_zeros(pred, leaves)


@_zeros_by_mask.defjvp
def _zeros_by_mask_jvp(primals: Any, tangents: Any) -> tuple[list[Any], list[Any]]:
    pred, leaves = primals
    _, d_leaves = tangents
    return _zeros_by_mask(pred, leaves), [_selected_zero(pred, dx) for dx in d_leaves]


def zero_if(pred: jax.Array, leaves: Sequence[Any]) -> list[Any]:
    """Each leaf, or +0 everywhere (NaNs included) where the scalar ``pred``
    holds; ``None`` leaves stay ``None``."""
    present = [x for x in leaves if x is not None]
    if not present:
        zeroed: list[Any] = []
    elif _platform.norm_path() == "cpu":
        zeroed = _zeros_by_mask(pred, present)
    else:
        zeroed = [_selected_zero(pred, x) for x in present]
    it = iter(zeroed)
    return [None if x is None else next(it) for x in leaves]

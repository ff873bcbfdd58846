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


def _masked(pred: jax.Array, on_true: list[Any], on_false: list[Any]) -> list[Any]:
    """Bit-mask selects where the dtype allows, ``select_n`` elsewhere; a
    ``None`` in ``on_true`` stands for zeros."""
    out = []
    for t, f in zip(on_true, on_false, strict=True):
        bits = _bits(f.dtype)
        if bits is None:
            out.append(lax.select_n(pred, f, lax.full_like(f, 0) if t is None else t))
            continue
        ones = jnp.asarray(jnp.iinfo(bits).max, bits)
        keep = lax.select_n(pred, ones, jnp.zeros([], bits))
        kept = lax.bitcast_convert_type(f, bits) & keep
        if t is not None:
            kept = kept | (lax.bitcast_convert_type(t, bits) & ~keep)
        out.append(lax.bitcast_convert_type(kept, f.dtype))
    return out


@jax.custom_jvp
def _masked_selects(
    pred: jax.Array, on_true: list[Any], on_false: list[Any]
) -> list[Any]:
    return _masked(pred, on_true, on_false)


@_masked_selects.defjvp
def _masked_selects_jvp(primals: Any, tangents: Any) -> tuple[list[Any], list[Any]]:
    pred, on_true, on_false = primals
    _, d_true, d_false = tangents
    out = _masked_selects(pred, on_true, on_false)
    return out, [
        lax.select_n(pred, df, jnp.zeros_like(df) if dt is None else dt)
        for dt, df in zip(d_true, d_false, strict=True)
    ]


def select(pred: jax.Array, on_true: Sequence[Any], on_false: Sequence[Any]) -> list:
    """``on_true[i]`` where the scalar ``pred`` holds, else ``on_false[i]``,
    leaf by leaf (each pair of one shape and dtype; an ``on_true`` of
    ``None`` is zeros)."""
    on_true, on_false = list(on_true), list(on_false)
    if not on_false:
        return []
    if _platform.norm_path() == "cpu":
        return _masked_selects(pred, on_true, on_false)
    return [
        lax.select_n(pred, f, lax.full_like(f, 0) if t is None else t)
        for t, f in zip(on_true, on_false, strict=True)
    ]


def zero_if(pred: jax.Array, leaves: Sequence[Any]) -> list[Any]:
    """Each leaf, or +0 everywhere (NaNs included) where the scalar ``pred``
    holds; ``None`` leaves stay ``None``."""
    present = [x for x in leaves if x is not None]
    selected = iter(select(pred, [None] * len(present), present))
    return [None if x is None else next(selected) for x in leaves]

"""The pieces every implementation of the norm's sums of squares shares.

Each leaf is reduced to two float32 sums of squares: ``plain = sum(|x|**2)``
and ``scaled = sum(|x * 2**-SCALE_EXPONENT|**2)``, which cannot overflow for
finite entries (``_norm`` says how the norm is taken from them). This module
holds the portable form, which TPUs (and any other backend) compile, and the
helpers that the XLA:CPU and XLA:GPU forms (``_xla_cpu``, ``_xla_gpu``) use
too; it imports none of them.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

AxisName = Hashable | Sequence[Hashable] | None
# Leaves with the mesh axes their partial sums are added over.
Group = tuple[Sequence[jax.Array], AxisName]
# (plain, scaled) sums of one real array.
TwoSums = Callable[[jax.Array], tuple[jax.Array, jax.Array]]

# The norm, the factor and the flag are float32 whatever the leaves' dtypes
# (float64 leaves, with x64 enabled, accumulate in float64 first).
NORM_DTYPE = jnp.float32

# Entries are multiplied by 2**-96 in the second sum: float32's largest value
# becomes ~4.3e9, whose square (1.8e19) leaves room to add up 1.8e19 of them.
# Entries below ~8.7e9 then square to subnormals, but the scaled sum is used
# only when the plain one overflowed (norm > 1.8e19), where they weigh < 1e-19
# each relative to the total.
SCALE_EXPONENT = 96


def accumulation_dtype(dtype: Any) -> Any:
    """float32 for every real float up to 32 bits (float8 and float16 too),
    float64 for float64 and complex128 under x64."""
    return jnp.float64 if jnp.finfo(dtype).bits == 64 else jnp.float32


def two_sums(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum v**2, sum (v * 2**-SCALE_EXPONENT)**2)`` of a real array, as two
    reductions of the same read, which XLA:TPU fuses into one pass."""
    w = v * jnp.asarray(2.0**-SCALE_EXPONENT, v.dtype)
    return jnp.sum(v * v), jnp.sum(w * w)


def leaf_square_sums(x: jax.Array, sums: TwoSums = two_sums) -> tuple[Any, Any]:
    """``(sum |x|**2, sum |x * 2**-SCALE_EXPONENT|**2)`` over one leaf,
    converted to float32 (or float64) inside the reductions; ``sums`` takes
    both over one real array."""
    acc = accumulation_dtype(x.dtype)
    if not jnp.iscomplexobj(x):
        return sums(x.astype(acc))
    (p1, s1), (p2, s2) = sums(jnp.real(x).astype(acc)), sums(jnp.imag(x).astype(acc))
    return p1 + p2, s1 + s2


def stack(values: Sequence[Any], per_leaf: bool) -> jax.Array:
    """The float32 sums as one vector (``per_leaf``) or their total."""
    values = [jnp.asarray(x, NORM_DTYPE) for x in values]
    if per_leaf:
        return jnp.stack(values) if values else jnp.zeros([0], NORM_DTYPE)
    if not values:
        return jnp.zeros([], NORM_DTYPE)
    return functools.reduce(operator.add, values)


def psum(x: jax.Array, axis_name: AxisName) -> jax.Array:
    return x if axis_name is None else lax.psum(x, axis_name)


def join(parts: Sequence[jax.Array], per_leaf: bool) -> jax.Array:
    """The groups' sums: concatenated per leaf, else added."""
    # The start is float32: a bare jnp.zeros([]) is float64 under x64, and the
    # norm (and the state holding it) would change dtype after one step.
    if per_leaf:
        return jnp.concatenate(parts)
    return parts[0] if len(parts) == 1 else sum(parts, jnp.zeros([], NORM_DTYPE))


def group_sums(
    groups: Sequence[Group], per_leaf: bool, sums: TwoSums | None = None
) -> tuple[jax.Array, jax.Array]:
    """Both sums of every leaf in one read, one ``psum`` per group of leaves
    sharded over mesh axes: the portable path, and XLA:GPU's with its own
    ``sums`` (default: ``two_sums``)."""
    sums = sums or two_sums
    plains, scaleds = [], []
    for leaves, axis_name in groups:
        pairs = [leaf_square_sums(x, sums) for x in leaves]
        plain = stack([p for p, _ in pairs], per_leaf)
        scaled = stack([s for _, s in pairs], per_leaf)
        if axis_name is not None:  # one collective for both sums
            plain, scaled = psum(jnp.stack([plain, scaled]), axis_name)
        plains.append(plain)
        scaleds.append(scaled)
    return join(plains, per_leaf), join(scaleds, per_leaf)

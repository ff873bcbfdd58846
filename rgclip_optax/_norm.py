"""The L2 norm of a gradient pytree, accumulated in float32, with no branch.

Each leaf is read once and reduced to two float32 sums of squares:

* ``plain = sum(|x|**2)``, the usual one;
* ``scaled = sum(|x * 2**-SCALE_EXPONENT|**2)``, the same sum with every entry
  first multiplied by a fixed power of two. It cannot overflow for finite
  entries (float32's largest value becomes about 4e9), and the scaling is
  exact, so ``sqrt(scaled) * 2**SCALE_EXPONENT`` is the norm whenever the
  entries are finite.

The norm is ``sqrt(plain)`` where ``plain`` is finite and the rescaled
``scaled`` otherwise (entries above ~1e19, the exploding gradients clipping
exists for); a ``where`` picks it, so there is no conditional to sync a GPU's
host or to gather a sharded gradient. ``scaled`` is finite exactly when every
entry is, which gives the skip-on-NaN flag from the same read. Both sums go
through one fused reduction on TPU, and through one variadic reduce
instruction on GPUs (``_xla_gpu``); XLA:CPU reads the gradient once per sum,
so there the second sum runs only when needed (see ``_xla_cpu``).

Global and per-tensor norms share this code: ``per_leaf`` keeps one sum per
leaf instead of adding them up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rgclip_optax._validation import bool_flags, inexact_leaves

AxisName = Hashable | Sequence[Hashable] | None
# Leaves with the mesh axes their partial sums are added over.
Group = tuple[Sequence[jax.Array], AxisName]

# The norm, the scale and the flag are float32 whatever the leaves' dtypes
# (float64 leaves, with x64 enabled, accumulate in float64 first).
NORM_DTYPE = jnp.float32

# Entries are multiplied by 2**-96 in the second sum: float32's largest value
# becomes ~4.3e9, whose square (1.8e19) leaves room to add up 1.8e19 of them.
# Entries below ~8.7e9 then square to subnormals, but the scaled sum is used
# only when the plain one overflowed (norm > 1.8e19), where they weigh < 1e-19
# each relative to the total.
SCALE_EXPONENT = 96

# Which implementation lowers: "auto" (XLA:CPU and XLA:GPU their own, every
# other platform the portable one, chosen at lowering by
# lax.platform_dependent), or "portable", "gpu" or "cpu" everywhere. Read at
# trace time; the tests use it to run the accelerator paths on a CPU.
PATH_ENV = "RGCLIP_OPTAX_NORM_PATH"
PATHS = ("auto", "portable", "gpu", "cpu")


def accumulation_dtype(dtype: Any) -> Any:
    """float32 for every real float up to 32 bits (float8 and float16 too),
    float64 for float64 and complex128 under x64."""
    return jnp.float64 if jnp.finfo(dtype).bits == 64 else jnp.float32


def two_sums(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum v**2, sum (v * 2**-SCALE_EXPONENT)**2)`` of a real array, as two
    reductions of the same read, which XLA:TPU fuses into one pass."""
    c = jnp.asarray(2.0**-SCALE_EXPONENT, v.dtype)
    return jnp.sum(v * v), jnp.sum((v * c) * (v * c))


def leaf_square_sums(
    x: jax.Array,
    sums: Callable[[jax.Array], tuple[jax.Array, jax.Array]] = two_sums,
) -> tuple[jax.Array, jax.Array]:
    """``(sum |x|**2, sum |x * 2**-SCALE_EXPONENT|**2)`` over one leaf,
    converted to float32 (or float64) inside the reductions; ``sums`` takes
    both over one real array."""
    acc = accumulation_dtype(x.dtype)
    parts = [jnp.real(x), jnp.imag(x)] if jnp.iscomplexobj(x) else [x]
    pairs = [sums(p.astype(acc)) for p in parts]
    plain = sum(p for p, _ in pairs)
    small = sum(s for _, s in pairs)
    return jnp.asarray(plain), jnp.asarray(small)


def stack(values: Sequence[jax.Array], per_leaf: bool) -> jax.Array:
    """The float32 sums as one vector (``per_leaf``) or their total."""
    if not values:
        return jnp.zeros([0] if per_leaf else [], NORM_DTYPE)
    v = jnp.stack([jnp.asarray(x).astype(NORM_DTYPE) for x in values])
    return v if per_leaf else jnp.sum(v)


def psum(x: jax.Array, axis_name: AxisName) -> jax.Array:
    return x if axis_name is None else lax.psum(x, axis_name)


def _portable_sums(
    groups: Sequence[Group],
    per_leaf: bool,
    sums: Callable[[jax.Array], tuple[jax.Array, jax.Array]] = two_sums,
) -> tuple[jax.Array, jax.Array]:
    """Both sums in one read, one psum per group: the accelerator path."""
    plains, scaleds = [], []
    for leaves, axis_name in groups:
        pairs = [leaf_square_sums(x, sums) for x in leaves]
        both = jnp.stack([stack([p for p, _ in pairs], per_leaf),
                          stack([s for _, s in pairs], per_leaf)])  # fmt: skip
        both = psum(both, axis_name)
        plains.append(both[0])
        scaleds.append(both[1])
    return join(plains, per_leaf), join(scaleds, per_leaf)


def join(parts: Sequence[jax.Array], per_leaf: bool) -> jax.Array:
    """The groups' sums: concatenated per leaf, else added."""
    # The start is float32: a bare jnp.zeros([]) is float64 under x64, and the
    # norm (and the state holding it) would change dtype after one step.
    return jnp.concatenate(parts) if per_leaf else sum(parts, jnp.zeros([], NORM_DTYPE))


def _path() -> str:
    path = os.environ.get(PATH_ENV, "auto")
    if path not in PATHS:
        raise ValueError(f"{PATH_ENV} must be one of {PATHS}, got {path!r}.")
    return path


def square_sums(
    groups: Sequence[Group], *, per_leaf: bool = False
) -> tuple[jax.Array, jax.Array]:
    """``(plain, scaled)``: float32 sums of squares over the groups' leaves.

    Each group's partial sums are added over its mesh axes. ``per_leaf``
    gives vectors with one entry per leaf, in the groups' order; otherwise
    scalars. On XLA:CPU, ``scaled`` is exact only where ``plain`` is not
    finite (it is not needed elsewhere).
    """
    # The CPU and GPU paths build on this module.
    from rgclip_optax import _xla_cpu, _xla_gpu

    path = _path()
    flat = [list(leaves) for leaves, _ in groups]
    axes = [ax for _, ax in groups]

    def regrouped(flat: list[list[jax.Array]]) -> list[Group]:
        return list(zip(flat, axes, strict=True))

    def portable(flat: list[list[jax.Array]]) -> tuple[jax.Array, jax.Array]:
        return _portable_sums(regrouped(flat), per_leaf)

    def gpu(flat: list[list[jax.Array]]) -> tuple[jax.Array, jax.Array]:
        return _portable_sums(regrouped(flat), per_leaf, _xla_gpu.two_sums)

    def cpu(flat: list[list[jax.Array]]) -> tuple[jax.Array, jax.Array]:
        return _xla_cpu.square_sums(regrouped(flat), per_leaf)

    paths = {"portable": portable, "gpu": gpu, "cpu": cpu}
    if path != "auto":
        return paths[path](flat)
    return lax.platform_dependent(flat, cpu=cpu, cuda=gpu, rocm=gpu, default=portable)


def norm_from_sums(plain: jax.Array, scaled: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(norm, all_finite)`` from the two sums, elementwise.

    ``norm`` is ``inf`` where it exceeds float32's range (entries still
    finite), NaN if an entry is NaN and ``inf`` if an entry is infinite.
    """
    finite_sum = jnp.isfinite(plain)
    # The branch not taken gets a harmless operand, so that its derivative
    # (sqrt at an underflowed 0) cannot turn the gradient into NaN.
    one = jnp.ones_like(scaled)
    rescaled = jnp.sqrt(jnp.where(finite_sum, one, scaled)) * jnp.asarray(
        2.0**SCALE_EXPONENT, NORM_DTYPE
    )
    norm = jnp.where(finite_sum, jnp.sqrt(plain), rescaled)
    return norm, finite_sum | jnp.isfinite(scaled)


def per_leaf_map(
    fn: Callable[..., tuple[jax.Array, ...]], *vectors: jax.Array
) -> tuple[jax.Array, ...]:
    """``fn`` (elementwise, returning a tuple) on vectors of per-leaf values,
    materialized, for each leaf's update to read one entry of.

    Written on the vectors and then sliced per leaf, XLA copies the vectors'
    arithmetic into every leaf's update (compile time quadratic in the leaf
    count). On TPU and GPU the results go through an optimization barrier, so
    they are computed once; computed per leaf, they were 5,410 unfused scalar
    instructions on a 291-leaf model compiled for a TPU pod. XLA:CPU drops
    the barrier before fusing, so there each leaf's values are computed from
    its own scalars (500 leaves compiled 2.8x longer as vectors).
    """
    n = vectors[0].shape[0] if vectors[0].ndim else 0
    if n == 0:
        return fn(*vectors)

    def per_scalar(*vs: jax.Array) -> tuple[jax.Array, ...]:
        outs = [fn(*(v[k] for v in vs)) for k in range(n)]
        return tuple(jnp.stack(column) for column in zip(*outs, strict=True))

    def on_vectors(*vs: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(lax.optimization_barrier(fn(*vs)))

    path = _path()
    if path == "cpu":
        return per_scalar(*vectors)
    if path != "auto":
        return on_vectors(*vectors)
    return tuple(lax.platform_dependent(*vectors, cpu=per_scalar, default=on_vectors))


def leaf_norms(
    leaves: Sequence[Any],
    flags: Sequence[bool],
    axis_name: AxisName,
    *,
    per_leaf: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``(norm, all_finite)`` over the non-``None`` leaves.

    Leaves flagged replicated are counted once; the others are shards whose
    sums are added over ``axis_name``. ``norm`` is the global norm, or with
    ``per_leaf`` a float32 vector holding one norm per non-``None`` leaf, in
    order: the per-tensor norms are computed as one vector, not as a scalar
    computation per leaf (5,410 unfused scalar instructions on a 291-leaf
    model compiled for a TPU pod).
    """
    present = [i for i, x in enumerate(leaves) if x is not None]
    sharded = [i for i in present if not flags[i]]
    copies = [i for i in present if flags[i]]
    groups = [
        ([leaves[i] for i in sharded], axis_name),
        ([leaves[i] for i in copies], None),
    ]
    plain, scaled = square_sums(groups, per_leaf=per_leaf)
    if not per_leaf:
        return norm_from_sums(plain, scaled)
    # A reduction, which XLA computes once (a flag per leaf would be copied
    # into every leaf's update).
    finite = jnp.all(norm_from_sums(plain, scaled)[1])
    order = sharded + copies
    if order != present:
        # The sums come group by group; put them in the leaves' order.
        position = {i: k for k, i in enumerate(order)}
        index = np.array([position[i] for i in present], dtype=np.int32)
        plain, scaled = plain[index], scaled[index]
    (norm,) = per_leaf_map(lambda p, s: norm_from_sums(p, s)[:1], plain, scaled)
    return norm, finite


def global_norm(
    tree: Any, *, axis_name: AxisName = None, replicated: Any = None
) -> jax.Array:
    """The L2 norm of a whole pytree, over all leaves together.

    .. math::

      \\|g\\| = \\sqrt{\\textstyle\\sum_{\\text{leaves } x} \\sum_i |x_i|^2}

    The squares are accumulated in float32 whatever the leaves' dtype (float8,
    float16 and bfloat16 included), with no upcast copy of the leaves, and a
    finite gradient whose float32 sum of squares would overflow is rescaled
    so its norm stays right. There is no conditional: the program is the same
    for every gradient, on every backend. ``None`` leaves are ignored; an
    empty tree has norm 0. Works under ``jit`` with any sharding (Auto or
    Explicit mesh axes), ``vmap`` (per-example norms) and ``grad``.

    Args:
      tree: a pytree of floating-point (or complex) arrays.
      axis_name: inside ``shard_map`` or ``pmap``, the mesh axis name (or tuple
        of names) over which the leaves are sharded. The float32 partial sums of
        squares are added across those devices with a single ``psum``, so the
        result is the norm of the whole, unsharded tree. Leave it ``None``
        under plain ``jax.jit`` (with any sharding: XLA inserts the
        reduction) and for gradients already averaged with ``pmean``.
      replicated: with ``axis_name``, the leaves that every device of the axis
        holds in full (e.g. the gradient of a replicated parameter, which
        ``shard_map`` has already summed): a pytree of bools with ``tree``'s
        structure, or a callable taking ``tree`` and returning one. Those
        leaves are counted once instead of once per device. ``None``: every
        leaf is a shard.

    Returns:
      A float32 scalar: the norm. It is ``nan`` if an entry is NaN and ``inf``
      if an entry is infinite.

    Raises:
      TypeError: if a leaf is not floating point; the message names its path.

    Example:
      >>> import jax.numpy as jnp
      >>> import rgclip_optax as rgc
      >>> rgc.global_norm({"w": jnp.array([3.0, 0.0]), "b": jnp.array(4.0)})
      Array(5., dtype=float32)
      >>> # float16 entries of 300 overflow optax.tree.norm, not this one.
      >>> float(rgc.global_norm(jnp.full((4,), 300.0, jnp.float16)))
      600.0
    """
    inexact_leaves(tree)
    leaves = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is None)[0]
    flags = bool_flags("replicated", replicated, tree, "gradient")
    norm, _ = leaf_norms(leaves, flags, axis_name)
    return norm

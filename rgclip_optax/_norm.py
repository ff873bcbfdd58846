"""The L2 norm of a gradient pytree, accumulated in float32, with no branch.

Each leaf is read once and reduced to two float32 sums of squares (``_sums``):

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
entry is, which gives the skip-on-NaN flag from the same read.

The sums have three implementations with the same values, and only the one
for the compiler the step is built for is traced (``_platform``): TPUs fuse
the two portable reductions into one pass (``_sums``); XLA:GPU gets them as
one variadic reduce (``_xla_gpu``); XLA:CPU reads the gradient once per sum,
so there the second sum runs only when needed (``_xla_cpu``). All three share
one derivative, defined here: ``d plain = 2 sum(x dx)``, with non-finite
entries of ``x`` read as 0, so that a skipped step (a NaN or an infinity in
the gradient) has a zero derivative, not a NaN one.

Global and per-tensor norms share this code: ``per_leaf`` keeps one sum per
leaf instead of adding them up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rgclip_optax import _platform, _xla_cpu, _xla_gpu
from rgclip_optax._sums import (
    NORM_DTYPE,
    SCALE_EXPONENT,
    AxisName,
    Group,
    group_sums,
    join,
    psum,
    stack,
)
from rgclip_optax._validation import bool_flags, inexact_leaves

# (leaves in each group, the group's mesh axes), and per_leaf: what the sums'
# derivative rule needs to know besides the leaves.
_Layout = tuple[tuple[tuple[int, AxisName], ...], bool]


def _regroup(layout: _Layout, flat: Sequence[Any]) -> list[Group]:
    groups: list[Group] = []
    start = 0
    for n, axis_name in layout[0]:
        groups.append((list(flat[start : start + n]), axis_name))
        start += n
    return groups


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _square_sums(layout: _Layout, flat: list[jax.Array]) -> tuple[Any, Any]:
    groups, per_leaf = _regroup(layout, flat), layout[1]
    path = _platform.norm_path()
    if path == "cpu":
        return _xla_cpu.square_sums(groups, per_leaf)
    return group_sums(groups, per_leaf, _xla_gpu.two_sums if path == "gpu" else None)


@_square_sums.defjvp
def _square_sums_jvp(
    layout: _Layout, primals: Any, tangents: Any
) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    # The same derivative for every implementation (XLA:CPU's holds a
    # conditional and custom batching rules, XLA:GPU's a variadic reduce,
    # neither of which JAX can transpose). Non-finite entries count as 0, so a
    # skipped step's zero cotangent stays zero instead of 0 * NaN. The scaled
    # sum multiplies x and dx by c each: XLA folds (x dx c) c into x dx c**2,
    # and c**2 underflows float32.
    (flat,), (dflat,) = primals, tangents
    c = 2.0**-SCALE_EXPONENT
    d_plain, d_scaled = [], []
    for leaves, axis_name in _regroup(layout, [*zip(flat, dflat, strict=True)]):
        pairs = []
        for x, dx in leaves:
            acc = jnp.promote_types(x.dtype, jnp.float32)
            x = jnp.where(jnp.isfinite(x), x, jnp.zeros([], x.dtype)).astype(acc)
            dx = dx.astype(acc)
            plain = jnp.sum(jnp.real(jnp.conj(x) * dx))
            scaled = jnp.sum(jnp.real(jnp.conj(x * c) * (dx * c)))
            pairs.append((2 * plain, 2 * scaled))
        parts = [stack([p[k] for p in pairs], layout[1]) for k in (0, 1)]
        both = psum(jnp.stack(parts), axis_name)
        d_plain.append(both[0])
        d_scaled.append(both[1])
    out = _square_sums(layout, flat)
    return out, (join(d_plain, layout[1]), join(d_scaled, layout[1]))


def square_sums(
    groups: Sequence[Group], *, per_leaf: bool = False
) -> tuple[jax.Array, jax.Array]:
    """``(plain, scaled)``: float32 sums of squares over the groups' leaves.

    Each group's partial sums are added over its mesh axes. ``per_leaf``
    gives vectors with one entry per leaf, in the groups' order; otherwise
    scalars. On XLA:CPU, ``scaled`` is exact only where ``plain`` is not
    finite (it is not needed elsewhere).
    """
    layout = (
        tuple((len(leaves), _hashable(ax)) for leaves, ax in groups),
        per_leaf,
    )
    return _square_sums(layout, [x for leaves, _ in groups for x in leaves])


def _hashable(axis_name: AxisName) -> AxisName:
    return tuple(axis_name) if isinstance(axis_name, list) else axis_name


def select(pred: jax.Array, on_true: Any, on_false: Any) -> jax.Array:
    """``jnp.where`` as one ``select_n`` (a scalar ``pred`` is not broadcast):
    ``jnp.where`` traces a nested ``jit`` and conversions, and the norm and
    the factor are built from a dozen of them, once per leaf for per-tensor
    norms on XLA:CPU."""
    dtype = jnp.result_type(on_true, on_false)
    shape = jnp.broadcast_shapes(
        jnp.shape(pred), jnp.shape(on_true), jnp.shape(on_false)
    )
    t = jnp.broadcast_to(jnp.asarray(on_true, dtype), shape)
    f = jnp.broadcast_to(jnp.asarray(on_false, dtype), shape)
    if jnp.shape(pred) not in ((), shape):
        pred = jnp.broadcast_to(pred, shape)
    return lax.select_n(pred, f, t)


def norm_from_sums(plain: jax.Array, scaled: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(norm, all_finite)`` from the two sums, elementwise.

    ``norm`` is ``inf`` where it exceeds float32's range (entries still
    finite), NaN if an entry is NaN and ``inf`` if an entry is infinite. Each
    square root reads a harmless operand where its result is not taken (and
    a zero norm has derivative 0), so that no branch's derivative turns a
    zero cotangent into NaN.
    """
    finite_sum = jnp.isfinite(plain)
    finite_scaled = jnp.isfinite(scaled)

    def root(x: jax.Array, ok: jax.Array) -> jax.Array:
        ok = ok & (x > 0)
        return select(ok, jnp.sqrt(select(ok, x, 1.0)), 0.0)

    rescaled = root(scaled, finite_scaled) * jnp.asarray(
        2.0**SCALE_EXPONENT, NORM_DTYPE
    )
    # A NaN or an infinite entry: the norm is NaN or inf, with no derivative.
    nonfinite = lax.stop_gradient(scaled)
    norm = select(
        finite_sum,
        root(plain, finite_sum),
        select(finite_scaled, rescaled, nonfinite),
    )
    return norm, finite_sum | finite_scaled


def per_leaf_map(
    fn: Callable[..., tuple[jax.Array, ...]], *vectors: jax.Array
) -> tuple[list[jax.Array], ...]:
    """``fn`` (elementwise, returning a tuple) on vectors of per-leaf values;
    each of its outputs as a list of one scalar per leaf, for each leaf's
    update to read its own.

    Written on the vectors and then sliced per leaf, XLA copies the vectors'
    arithmetic into every leaf's update (compile time quadratic in the leaf
    count). On TPU and GPU the results go through an optimization barrier, so
    they are computed once; computed per leaf, they were 5,410 unfused scalar
    instructions on a 291-leaf model compiled for a TPU pod. XLA:CPU drops
    the barrier before fusing, so there each leaf's values are computed from
    its own scalars (jax 0.10.2, per-tensor steps as vectors compiled 1.7x
    longer on ResNet-18 and 2.4x on a 291-leaf decoder:
    ``benchmarks/build_cost.py``).
    """
    n = vectors[0].shape[0]
    if _platform.norm_path() != "cpu":
        outs = lax.optimization_barrier(fn(*vectors))
        return tuple(
            [x.reshape(()) for x in jnp.split(v, n)] if n else [] for v in outs
        )
    per_leaf = [fn(*(v[k] for v in vectors)) for k in range(n)]
    if not per_leaf:
        return tuple([] for _ in fn(*vectors))
    return tuple(list(column) for column in zip(*per_leaf, strict=True))


def leaf_sums(
    leaves: Sequence[Any], flags: Sequence[bool], axis_name: AxisName, per_leaf: bool
) -> tuple[list[int], jax.Array, jax.Array]:
    """``(present, plain, scaled)``: the indices of the non-``None`` leaves
    and their sums of squares (vectors in that order with ``per_leaf``).

    Leaves flagged replicated are counted once; the others are shards whose
    sums are added over ``axis_name``.
    """
    present = [i for i, x in enumerate(leaves) if x is not None]
    if axis_name is None:
        order = present
        groups: list[Group] = [([leaves[i] for i in present], None)]
    else:
        sharded = [i for i in present if not flags[i]]
        copies = [i for i in present if flags[i]]
        order = sharded + copies
        groups = [
            ([leaves[i] for i in sharded], axis_name),
            ([leaves[i] for i in copies], None),
        ]
    plain, scaled = square_sums(groups, per_leaf=per_leaf)
    if per_leaf and order != present:
        # The sums come group by group; put them in the leaves' order.
        position = {i: k for k, i in enumerate(order)}
        index = np.array([position[i] for i in present], dtype=np.int32)
        plain, scaled = plain[index], scaled[index]
    return present, plain, scaled


def leaf_norms(
    leaves: Sequence[Any], flags: Sequence[bool], axis_name: AxisName
) -> tuple[jax.Array, jax.Array]:
    """``(norm, all_finite)``: the global norm over the non-``None`` leaves."""
    _, plain, scaled = leaf_sums(leaves, flags, axis_name, per_leaf=False)
    return norm_from_sums(plain, scaled)


def per_tensor_norms(
    leaves: Sequence[Any],
    flags: Sequence[bool],
    axis_name: AxisName,
    then: Callable[[jax.Array, jax.Array], jax.Array],
) -> tuple[list[int], list[jax.Array], list[jax.Array], jax.Array]:
    """``(present, norms, thens, all_finite)``: each non-``None`` leaf's norm,
    and ``then(norm, all_finite)`` of it (the rule's factor), one scalar per
    leaf, computed in one pass (``per_leaf_map``)."""
    present, plain, scaled = leaf_sums(leaves, flags, axis_name, per_leaf=True)
    # A reduction, which XLA computes once (a flag per leaf would be copied
    # into every leaf's update).
    finite = jnp.all(jnp.isfinite(plain) | jnp.isfinite(scaled))

    def norm_and_then(p: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
        norm = norm_from_sums(p, s)[0]
        return norm, then(norm, finite)

    norms, thens = per_leaf_map(norm_and_then, plain, scaled)
    return present, norms, thens, finite


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
    return leaf_norms(leaves, flags, axis_name)[0]

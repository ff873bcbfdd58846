"""The global L2 norm of a gradient pytree, accumulated in float32.

This is the norm that the δ-GClip transformations use. It differs from
``optax.tree.norm`` in three ways that matter for clipping:

* Each leaf is converted to (at least) float32 *inside* its reduction, so the
  sum of squares never overflows in float16 (where ``256**2`` already exceeds
  the format's range) and never loses bits in bfloat16. XLA fuses the
  conversion into the reduction: no upcast copy of the gradient is made.
  Small leaves (biases, norm scales, up to ``SMALL_LEAF_SIZE`` entries) are
  first concatenated per dtype, in groups of up to ``PACK_GROUP_SIZE``
  entries, so a tree of thousands of small leaves is a few reductions, not
  thousands (compile time and kernel launches).
* If every entry is finite but the float32 sum of squares still overflows
  (entries above ~1e19, the exploding gradients clipping exists for), the norm
  is recomputed with the entries divided by their largest magnitude. That
  branch runs under ``lax.cond`` only when the fast sum is not finite, so the
  normal path costs one read of the gradient and nothing more.
* It also reports whether every entry was finite. The flag comes from the same
  sum (a NaN or an infinity makes it non-finite), so skipping bad steps costs
  no extra pass over memory.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

AxisName = Hashable | Sequence[Hashable] | None

# The norm, the scale and the flag are float32 scalars whatever the leaves'
# dtypes (float64 leaves, with x64 enabled, accumulate in float64 first).
NORM_DTYPE = jnp.float32

# Real leaves of at most this many entries are reduced together, concatenated
# flat per dtype. Reducing each leaf on its own made compile time grow steeply
# with the leaf count (76 s for 1,000 leaves of 100 on XLA:CPU) and costs one
# kernel per leaf on GPU. XLA:CPU materializes the concatenation, so the limit
# is kept small: the copy is of biases and norm scales only.
SMALL_LEAF_SIZE = 1 << 12


def inexact_leaves(tree: Any, *, what: str = "gradient") -> list[jax.Array]:
    """Returns the leaves of ``tree``, raising ``TypeError`` for non-float ones.

    ``None`` leaves (masked parameters) are skipped, as everywhere in JAX.

    Args:
      tree: a pytree of arrays.
      what: the word used for the tree in the error message.

    Raises:
      TypeError: naming the path of the first leaf whose dtype is not a
        floating or complex type (integers, booleans, ``float0``).
    """
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
    leaves = []
    for path, leaf in with_path:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            where = jax.tree_util.keystr(path) or "<root>"
            shown = dtype if dtype is not None else type(leaf).__name__
            raise TypeError(
                f"{what} leaf at {where} has dtype {shown}; δ-GClip needs floating "
                "point (or complex) leaves. Take gradients only with respect to "
                "floating-point parameters, or mask the others out with "
                "optax.masked / None leaves."
            )
        leaves.append(leaf)
    return leaves


def _accumulation_dtype(dtype: Any) -> Any:
    """float32, or float64 for float64/complex128 leaves under x64."""
    real = jnp.finfo(dtype).dtype
    return jnp.promote_types(real, jnp.float32)


def _abs_squared(x: jax.Array, acc: Any) -> jax.Array:
    if jnp.iscomplexobj(x):
        re = jnp.real(x).astype(acc)
        im = jnp.imag(x).astype(acc)
        return re * re + im * im
    x = x.astype(acc)
    return x * x


def leaf_sum_of_squares(x: jax.Array) -> jax.Array:
    """Sum of ``|x|**2`` over one leaf, accumulated in float32 (or wider)."""
    return jnp.sum(_abs_squared(x, _accumulation_dtype(x.dtype)))


def _leaf_max_abs(x: jax.Array) -> jax.Array:
    """Largest magnitude in one leaf; NaN if the leaf holds a NaN."""
    acc = _accumulation_dtype(x.dtype)
    if x.size == 0:
        return jnp.zeros([], acc)
    if jnp.iscomplexobj(x):
        return jnp.max(jnp.abs(x)).astype(acc)
    # max(max(x), -min(x)) reads x with no elementwise op in front of the
    # reductions, so XLA has no upcast copy of x to share between this and
    # the rescaled sum (that copy would count in the program's peak memory
    # even though this branch rarely runs).
    return jnp.maximum(jnp.max(x).astype(acc), -jnp.min(x).astype(acc))


def _scaled_sum_of_squares(x: jax.Array, scale: jax.Array) -> jax.Array:
    # Divide, not multiply by 1/scale: for scale near float32's maximum the
    # reciprocal is subnormal and XLA may flush it to zero. (Multiplying by
    # powers of two instead, exact as that is, got the factors broadcast to
    # each leaf's shape and written out on XLA:CPU: 25 MB for a bfloat16
    # ResNet-18.)
    acc = _accumulation_dtype(x.dtype)
    y = (
        x / scale.astype(acc)
        if jnp.iscomplexobj(x)
        else x.astype(acc) / scale.astype(acc)
    )
    return jnp.sum(_abs_squared(y, acc))


# The rare rescaled sum walks large leaves in chunks of this many entries.
RESCALE_CHUNK = 1 << 14


def _leaf_scaled_sum_of_squares(x: jax.Array, scale: jax.Array) -> jax.Array:
    """:func:`_scaled_sum_of_squares` over one leaf, with a bounded temporary.

    For float32 leaves XLA:CPU does not fuse the division into the reduction,
    so summing a whole large leaf at once reserves a buffer of the leaf's size
    for this rarely taken branch (12 MB on a ResNet-18 gradient). Large float32
    leaves are summed in chunks read with ``dynamic_slice`` from the flattened
    leaf (a free reshape), so the branch needs one chunk of temporary memory.
    Narrower leaves are summed at once: in a chunk loop XLA hoists their
    conversion out of the loop (a float32 copy of the leaf, 45 MB for a
    bfloat16 ResNet-18, even with a barrier on each chunk). At once, XLA:CPU
    still writes the divisor out broadcast to the leaf's shape when the tree
    has several large leaves (12.5 MB there); a known cost of this branch.
    """
    n = x.size
    acc = _accumulation_dtype(x.dtype)
    if n <= RESCALE_CHUNK or x.dtype != acc:
        return _scaled_sum_of_squares(x, scale)
    flat = jnp.ravel(x)
    full = n // RESCALE_CHUNK

    def body(i: jax.Array, total: jax.Array) -> jax.Array:
        chunk = lax.dynamic_slice(flat, (i * RESCALE_CHUNK,), (RESCALE_CHUNK,))
        return total + _scaled_sum_of_squares(chunk, scale)

    total = lax.fori_loop(0, full, body, jnp.zeros([], acc))
    if n > full * RESCALE_CHUNK:
        total = total + _scaled_sum_of_squares(flat[full * RESCALE_CHUNK :], scale)
    return total


def _unshared(leaves: Sequence[jax.Array]) -> list[jax.Array]:
    """The leaves, with the narrow (float16, bfloat16, ...) ones behind an
    ``optimization_barrier``.

    The clipped update converts the same gradient leaves to float32 as this
    norm does. XLA then merges the two identical conversions into one and, as
    that float32 array has two users, writes it out in full: a leaf-sized
    float32 copy of the gradient (on XLA:CPU, 200 MB and 4x the step time for
    a 50M bfloat16 gradient). Reading the leaves through the barrier makes the
    norm's conversion a different expression, which stays fused into its
    reduction. The barrier itself moves no data.
    """
    leaves = list(leaves)
    narrow = [
        i
        for i, x in enumerate(leaves)
        if not jnp.iscomplexobj(x)
        and jnp.dtype(x.dtype) != _accumulation_dtype(x.dtype)
    ]
    if narrow:
        hidden = lax.optimization_barrier([leaves[i] for i in narrow])
        for i, x in zip(narrow, hidden, strict=True):
            leaves[i] = x
    return leaves


# Small leaves are concatenated in groups of at most this many entries, reduced
# one group after the other. That bounds the rarely taken branch's temporaries
# to one group and lets XLA reuse a group's buffer for a later one. On XLA:CPU,
# for 1,000 leaves of 100, the step's temporaries are 442 KB in float32 and
# 270 KB in bfloat16 (optax's clip_by_global_norm + sgd: 448 KB for both);
# one concatenation per dtype gave 566 KB and about 850 KB.
PACK_GROUP_SIZE = 1 << 13


class _Operands(NamedTuple):
    """The reduction operands of a list of leaves."""

    large: list[jax.Array]  # reduced one by one (and complex leaves)
    groups: list[list[jax.Array]]  # small real leaves of one dtype per group


def _operands(leaves: Sequence[jax.Array]) -> _Operands:
    """Splits off the small real leaves, grouped by dtype and size."""
    large: list[jax.Array] = []
    small: dict[Any, list[jax.Array]] = {}
    for x in leaves:
        if 0 < x.size <= SMALL_LEAF_SIZE and not jnp.iscomplexobj(x):
            small.setdefault(jnp.dtype(x.dtype), []).append(x)
        else:
            large.append(x)
    groups: list[list[jax.Array]] = []
    for xs in small.values():
        group: list[jax.Array] = []
        size = 0
        for x in xs:
            if group and size + x.size > PACK_GROUP_SIZE:
                groups.append(group)
                group, size = [], 0
            group.append(x)
            size += x.size
        groups.append(group)
    return _Operands(large, groups)


def _concatenate(flat: Sequence[jax.Array]) -> jax.Array:
    """``jnp.concatenate`` of 1-D leaves, with the bits of narrow floats.

    XLA:CPU has no bfloat16 concatenation: it converts every leaf to float32,
    concatenates, and rounds back, so the buffer is twice the size and each
    leaf gets a converted copy. Moving the same bits as unsigned integers of
    the same width avoids that for every narrow float; the values are
    unchanged.
    """
    if len(flat) == 1:
        return flat[0]
    dtype = jnp.dtype(flat[0].dtype)
    if dtype.itemsize >= 4:
        return jnp.concatenate(flat)
    bits = jnp.dtype(f"uint{8 * dtype.itemsize}")
    joined = jnp.concatenate([lax.bitcast_convert_type(x, bits) for x in flat])
    return lax.bitcast_convert_type(joined, dtype)


def _reduce_groups(
    groups: Sequence[Sequence[jax.Array]],
    reduce: Callable[[jax.Array], jax.Array],
    combine: Callable[[jax.Array, jax.Array], jax.Array],
) -> list[jax.Array]:
    """``reduce`` of each group's concatenation, combined into one scalar.

    Each group is concatenated (a copy, on XLA:CPU) and reduced only once the
    group before it is done: the optimization barrier ties the group's leaves
    to the running result, so XLA can reuse one concatenation's buffer for
    the next. Returns ``[]`` for no groups, else ``[result]``.
    """
    acc = None
    for group in groups:
        if acc is not None:
            group, acc = lax.optimization_barrier((list(group), acc))
        flat = [jnp.ravel(x) for x in group]
        value = reduce(_concatenate(flat))
        value = value.astype(NORM_DTYPE)
        acc = value if acc is None else combine(acc, value)
    return [] if acc is None else [acc]


def _max_abs(ops: _Operands) -> jax.Array:
    """Largest magnitude over the operands; NaN if one holds a NaN."""
    # A concatenation is a fresh buffer already, so |x| costs no extra copy;
    # max(max(v), -min(v)) on a concatenation of many leaves compiled for
    # minutes on XLA:CPU.
    packed = _reduce_groups(ops.groups, lambda v: jnp.max(jnp.abs(v)), jnp.maximum)
    return _maximum([_leaf_max_abs(x) for x in ops.large] + packed)


def _sum_of_squares(ops: _Operands) -> jax.Array:
    packed = _reduce_groups(ops.groups, leaf_sum_of_squares, jnp.add)
    return _sum([leaf_sum_of_squares(x) for x in ops.large] + packed)


def _scaled_sum_of_squares_all(ops: _Operands, scale: jax.Array) -> jax.Array:
    packed = _reduce_groups(
        ops.groups, lambda v: _leaf_scaled_sum_of_squares(v, scale), jnp.add
    )
    return _sum([_leaf_scaled_sum_of_squares(x, scale) for x in ops.large] + packed)


def _sum(values: Sequence[jax.Array]) -> jax.Array:
    # One reduction over the stacked scalars, not a chain of n additions.
    if not values:
        return jnp.zeros([], NORM_DTYPE)
    return jnp.sum(jnp.stack([v.astype(NORM_DTYPE) for v in values]))


def _maximum(values: Sequence[jax.Array]) -> jax.Array:
    # NaN-propagating, as jnp.max is; the values are magnitudes (>= 0).
    if not values:
        return jnp.zeros([], NORM_DTYPE)
    return jnp.max(jnp.stack([v.astype(NORM_DTYPE) for v in values]))


def _psum(x: jax.Array, axis_name: AxisName) -> jax.Array:
    return x if axis_name is None else lax.psum(x, axis_name)


def _pmax(x: jax.Array, axis_name: AxisName) -> jax.Array:
    return x if axis_name is None else lax.pmax(x, axis_name)


def norms_and_finite(
    groups: Sequence[tuple[Sequence[jax.Array], AxisName]],
) -> tuple[jax.Array, jax.Array]:
    """The norm over several groups of leaves, and whether all are finite.

    Each group is a list of leaves with the mesh axes its partial sums are
    summed over (``None``: the group is counted as it is, e.g. replicated
    leaves). The result is ``sqrt(sum_g psum_g(sum_{x in g} |x|^2))``.

    Returns:
      ``(norm, all_finite)``: a float32 scalar and a bool scalar. ``norm`` is
      ``inf`` where it exceeds float32's range (all entries still finite), NaN
      if an entry is NaN, ``inf`` if an entry is infinite.
    """

    operands = [(_operands(_unshared(leaves)), ax) for leaves, ax in groups]
    total = _sum([_psum(_sum_of_squares(ops), ax) for ops, ax in operands])

    def fast(total: jax.Array) -> tuple[jax.Array, jax.Array]:
        # isfinite(total) is True here; deriving it from total (rather than a
        # constant) gives it total's device-variance type under shard_map, as
        # the other branch's flag has.
        return jnp.sqrt(total), jnp.isfinite(total)

    def rescaled(total: jax.Array) -> tuple[jax.Array, jax.Array]:
        # Rare path: the float32 sum is inf or NaN. Either some entry is not
        # finite, or the squares overflowed. Find the largest magnitude (NaN if
        # any entry is NaN) and, if it is finite, sum the squares of x / max.
        del total
        amax = _maximum([_pmax(_max_abs(ops), ax) for ops, ax in operands])
        finite = jnp.isfinite(amax)
        safe = jnp.where(finite & (amax > 0), amax, jnp.ones_like(amax))
        parts = [
            _psum(_scaled_sum_of_squares_all(ops, safe), ax) for ops, ax in operands
        ]
        scaled_norm = safe * jnp.sqrt(_sum(parts))
        # Non-finite entries: NaN if any NaN, else +inf.
        bad_norm = jnp.where(jnp.isnan(amax), jnp.nan, jnp.inf).astype(NORM_DTYPE)
        return jnp.where(finite, scaled_norm, bad_norm), finite

    return lax.cond(jnp.isfinite(total), fast, rescaled, total)


def replicated_flags(replicated: Any, tree: Any) -> list[bool]:
    """One bool per leaf of ``tree`` (``None`` leaves included, as False).

    ``replicated`` is ``None`` (nothing replicated), a pytree of bools with
    ``tree``'s structure, or a callable taking ``tree`` and returning one.
    """
    n_leaves = len(jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is None)[0])
    if replicated is None:
        return [False] * n_leaves
    mask = replicated(tree) if callable(replicated) else replicated
    flags = jax.tree_util.tree_flatten(mask, is_leaf=lambda x: x is None)[0]
    if len(flags) != n_leaves:
        raise ValueError(
            "replicated must be a pytree of bools with the gradient's structure "
            f"(or a callable returning one): got {len(flags)} flags for "
            f"{n_leaves} leaves."
        )
    return [bool(f) if f is not None else False for f in flags]


def norm_groups(
    leaves: Sequence[Any], flags: Sequence[bool], axis_name: AxisName
) -> list[tuple[list[jax.Array], AxisName]]:
    """Groups for :func:`norms_and_finite`: shards summed over ``axis_name``,
    replicated leaves counted once. ``None`` leaves are dropped."""
    pairs = list(zip(leaves, flags, strict=True))
    sharded = [x for x, f in pairs if x is not None and not f]
    copies = [x for x, f in pairs if x is not None and f]
    return [(sharded, axis_name), (copies, None)]


def global_norm(
    tree: Any, *, axis_name: AxisName = None, replicated: Any = None
) -> jax.Array:
    """The L2 norm of a whole pytree, over all leaves together.

    .. math::

      \\|g\\| = \\sqrt{\\textstyle\\sum_{\\text{leaves } x} \\sum_i |x_i|^2}

    The squares are accumulated in float32 whatever the leaves' dtype (float16
    and bfloat16 included), with no upcast copy of the leaves, and a finite
    gradient whose float32 sum of squares would overflow is rescaled so its norm
    stays right. ``None`` leaves are ignored; an empty tree has norm 0.

    Args:
      tree: a pytree of floating-point (or complex) arrays.
      axis_name: inside ``shard_map`` or ``pmap``, the mesh axis name (or tuple
        of names) over which the leaves are sharded. The float32 partial sums of
        squares are added across those devices with a single scalar ``psum``,
        so the result is the norm of the whole, unsharded tree. Leave it
        ``None`` under plain ``jax.jit`` (with any sharding: XLA inserts the
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
    flags = replicated_flags(replicated, tree)
    norm, _ = norms_and_finite(norm_groups(leaves, flags, axis_name))
    return norm

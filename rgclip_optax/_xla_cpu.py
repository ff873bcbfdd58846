"""The norm's sums of squares as XLA:CPU wants them.

``_norm`` traces this instead of the portable sums only for programs built
for XLA:CPU (``_platform``), so none of it reaches a GPU or TPU program. The
values are the same; three things differ, each measured on a 2-core x86-64
machine with jax and jaxlib 0.10.2 (their tests pass on 0.8.0 and 0.12.1):

1. **The scaled sum only when needed.** XLA:CPU does not fuse two reductions
   of one array into one loop, so the portable path reads the gradient twice
   (2.25x ``optax.sgd``'s step on a ResNet-18 tree). Here the plain sums come
   first and the scaled sums run under ``lax.cond`` only if their total is
   not finite; on CPU a conditional is an ordinary host branch.
2. **Small leaves packed.** Compile time grew steeply with the number of
   reductions (76 s for 1,000 leaves of 100 entries; Optax's
   ``clip_by_global_norm`` of 10,000 leaves did not compile in 20 minutes).
   Real leaves of at most ``SMALL_LEAF_SIZE`` entries are concatenated per
   dtype, in groups of at most ``PACK_GROUP_SIZE`` entries, and each group is
   reduced at once. Narrow floats are concatenated as unsigned bits on
   jaxlib < 0.11: XLA:CPU 0.10.2 turns a bfloat16 concatenation into a
   float32 one, with a converted copy of every leaf; 0.11.2 and 0.12.0.1 no
   longer do (``NARROW_CONCATENATION_WIDENS``). With several devices only
   trees of at least ``PACK_MIN_LEAVES`` small leaves are packed, and leaves
   sharded over explicit mesh axes never are (``jnp.ravel`` of them is a
   sharding error, and would gather them). Under ``vmap`` nothing is packed:
   each reduction then covers the whole batch, and the concatenation would
   copy the batched gradient (``_packed_unless_batched``).
3. **Narrow leaves behind an optimization barrier.** The clipped update
   converts the same bfloat16/float16 leaves to float32 as the norm does;
   XLA:CPU merged the two conversions and wrote a float32 copy of the whole
   gradient (200 MB and 4x the step time for 50M bfloat16 entries). Reading
   the leaves through ``lax.optimization_barrier`` keeps the norm's
   conversion inside its reduction; the barrier moves no data.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax

from rgclip_optax._sums import (
    SCALE_EXPONENT,
    Group,
    accumulation_dtype,
    join,
    psum,
    stack,
)


def _version(text: str) -> tuple[int, ...]:
    """``"0.12.0.1"`` -> ``(0, 12, 0, 1)``; a suffix such as ``.dev`` ends it."""
    parts = []
    for part in text.split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


JAXLIB_VERSION = _version(jaxlib.__version__)
# Whether XLA:CPU widens a bfloat16 concatenation to float32 (workaround 2).
NARROW_CONCATENATION_WIDENS = JAXLIB_VERSION < (0, 11)

SMALL_LEAF_SIZE = 1 << 12
# With several devices, packing starts at this many small leaves. Under jit
# with Auto-mode shardings the leaves' shardings are unknown while tracing,
# and concatenating an FSDP-sharded bias gathers it onto every device (82
# all-gathers in a ResNet-18 step with 41 small leaves); below this count the
# reductions compile in seconds anyway, as Optax's do. With one device nothing
# can be sharded, and every tree is packed: a reduction per small leaf cost
# 3.4 ms more than packing on a 55 ms GPT-2 step (100 biases and scales).
PACK_MIN_LEAVES = 256
# Groups bound the packed copies' memory and let XLA reuse one group's buffer
# for the next (1,000 leaves of 100: step temporaries 442 KB in float32 and
# 270 KB in bfloat16, against 566 and ~850 KB for one group per dtype).
PACK_GROUP_SIZE = 1 << 13


def _explicitly_sharded(x: jax.Array) -> bool:
    """Whether ``x``'s type names mesh axes (an Explicit-mode sharding)."""
    try:
        spec = jax.typeof(x).sharding.spec
    except AttributeError:  # no sharding in the type (older jax, tracers)
        return False
    return any(axis is not None for axis in spec)


def pack_plan(leaves: Sequence[jax.Array]) -> tuple[list[int], list[list[int]]]:
    """``(alone, groups)``: indices of the leaves reduced on their own, and
    of the small real leaves packed together, grouped by dtype and size."""
    alone: list[int] = []
    by_dtype: dict[Any, list[int]] = {}
    for i, x in enumerate(leaves):
        packable = (
            0 < x.size <= SMALL_LEAF_SIZE
            and not jnp.iscomplexobj(x)
            and not _explicitly_sharded(x)
        )
        if packable:
            by_dtype.setdefault(jnp.dtype(x.dtype), []).append(i)
        else:
            alone.append(i)
    min_leaves = PACK_MIN_LEAVES if jax.device_count() > 1 else 2
    if sum(len(idx) for idx in by_dtype.values()) < min_leaves:
        return list(range(len(leaves))), []
    groups: list[list[int]] = []
    for idx in by_dtype.values():
        group: list[int] = []
        size = 0
        for i in idx:
            if group and size + leaves[i].size > PACK_GROUP_SIZE:
                groups.append(group)
                group, size = [], 0
            group.append(i)
            size += leaves[i].size
        groups.append(group)
    return alone, groups


def concatenate(flat: Sequence[jax.Array]) -> jax.Array:
    """``jnp.concatenate`` of 1-D leaves, moving narrow floats as their bits
    where XLA:CPU would widen them (``NARROW_CONCATENATION_WIDENS``)."""
    if len(flat) == 1:
        return flat[0]
    dtype = jnp.dtype(flat[0].dtype)
    if dtype.itemsize >= 4 or not NARROW_CONCATENATION_WIDENS:
        return jnp.concatenate(flat)
    bits = jnp.dtype(f"uint{8 * dtype.itemsize}")
    joined = jnp.concatenate([lax.bitcast_convert_type(x, bits) for x in flat])
    return lax.bitcast_convert_type(joined, dtype)


def _wide(v: jax.Array, scaled: bool) -> bool:
    """Whether ``v``'s scaled sum is accumulated in float64. Squares of
    float16 and float8 entries cannot overflow float32; their scaled sum needs
    no float64 (and XLA:CPU, which upcasts float16 reductions through a
    float32 copy, would make a float64 copy instead)."""
    largest = float(jnp.finfo(v.dtype).max)
    return scaled and largest * largest * max(v.size, 1) > 1e38


def _x64(on: bool) -> Any:
    # Only ever switched on: enable_x64(False) would switch a user's global
    # x64 off here and truncate a float64 leaf's sum to float32. A context
    # (thread-local) setting, restored on exit.
    return jax.enable_x64(True) if on else contextlib.nullcontext()


def _scaled_down(total: jax.Array) -> jax.Array:
    """``total * 2**(-2 * SCALE_EXPONENT)`` as float32."""
    c = 2.0**-SCALE_EXPONENT
    # c**2 = 2**-192 is a float64 number, not a float32 one.
    with _x64(total.dtype == jnp.float64):
        out = total * (c * c) if total.dtype == jnp.float64 else total * c * c
        return out.astype(jnp.float32)


def _reduce(v: jax.Array, scaled: bool, sizes: Sequence[int] | None) -> jax.Array:
    """Sum of ``|v|**2`` (``sizes``: one sum per consecutive run of entries),
    in float64 for a scaled sum that could overflow float32 (``_wide``), not
    yet multiplied by ``2**(-2 * SCALE_EXPONENT)`` (``_scaled_down``).

    No float32 entry's square
    overflows float64, so this is the portable path's scaled sum to float32
    rounding. XLA:CPU fuses the float64 conversion into the reduction (8 bytes
    of temporaries for a 50M-entry leaf), where it wrote ``v * 2**-96`` (or
    ``v / max|v|``) out in full before reducing it: a leaf-sized buffer
    reserved every step.
    """
    wide = _wide(v, scaled)
    with _x64(wide):
        acc = jnp.float64 if wide else accumulation_dtype(v.dtype)
        if jnp.iscomplexobj(v):
            sq = jnp.square(jnp.real(v).astype(acc)) + jnp.square(
                jnp.imag(v).astype(acc)
            )
        else:
            sq = jnp.square(v.astype(acc))
        if sizes is None:
            total = jnp.sum(sq)
        else:
            ids = np.repeat(np.arange(len(sizes)), sizes)
            total = jax.ops.segment_sum(sq, ids, len(sizes), indices_are_sorted=True)
        return total


def _sums(
    leaves: Sequence[jax.Array], scaled: bool, per_leaf: bool, pack: bool = True
) -> jax.Array:
    """Plain or scaled sums of squares, packing the small leaves if ``pack``."""
    alone, groups = pack_plan(leaves) if pack else (list(range(len(leaves))), [])
    values: list[Any] = [None] * len(leaves)
    for i in alone:
        values[i] = _reduce(leaves[i], scaled, None)
    totals = []
    prev = None
    for idx in groups:
        group = [leaves[i] for i in idx]
        if prev is not None:
            # Reduce one group after the other, so XLA can reuse the buffer.
            group, prev = lax.optimization_barrier((group, prev))
        v = concatenate([jnp.ravel(x) for x in group])
        prev = _reduce(v, scaled, [x.size for x in group] if per_leaf else None)
        if per_leaf:
            for k, i in enumerate(idx):
                values[i] = prev[k]
        else:
            totals.append(prev)
    if per_leaf:
        if scaled:
            values = [_scaled_down(v) for v in values]
        return stack(values, per_leaf=True)
    parts = [values[i] for i in alone] + totals
    if not scaled:
        return stack(parts, per_leaf=False)
    # Added up in their own dtype, then scaled once per dtype.
    by_dtype: dict[Any, list[jax.Array]] = {}
    for x in parts:
        by_dtype.setdefault(jnp.dtype(x.dtype), []).append(x)
    return stack([_scaled_down(_added(xs)) for xs in by_dtype.values()], per_leaf=False)


def _added(xs: list[jax.Array]) -> jax.Array:
    with _x64(xs[0].dtype == jnp.float64):
        return functools.reduce(operator.add, xs)


def unshared(leaves: Sequence[jax.Array]) -> list[jax.Array]:
    """The leaves, the narrow real ones read through an optimization barrier."""
    leaves = list(leaves)
    narrow = [
        i
        for i, x in enumerate(leaves)
        if not jnp.iscomplexobj(x) and jnp.finfo(x.dtype).bits < 32
    ]
    if narrow:
        hidden = lax.optimization_barrier([leaves[i] for i in narrow])
        for i, x in zip(narrow, hidden, strict=True):
            leaves[i] = x
    return leaves


def square_sums(groups: Sequence[Group], per_leaf: bool) -> tuple[jax.Array, jax.Array]:
    """``_norm.square_sums`` for XLA:CPU: the scaled sums are exact only where
    the plain ones are not finite."""
    groups = [(unshared(leaves), ax) for leaves, ax in groups]
    axes = [ax for _, ax in groups]
    sizes = [len(xs) for xs, _ in groups]

    def sums(flat: Sequence[jax.Array], scaled: bool, pack: bool = True) -> jax.Array:
        parts, start = [], 0
        for n, ax in zip(sizes, axes, strict=True):
            leaves = flat[start : start + n]
            parts.append(psum(_sums(leaves, scaled, per_leaf, pack), ax))
            start += n
        return join(parts, per_leaf)

    flat = [x for xs, _ in groups for x in xs]
    if any(ax is not None for ax in axes):
        # Inside shard_map/pmap: the collectives stay in a plain conditional.
        plain = sums(flat, scaled=False)
        scaled = _unless_finite(plain, lambda: sums(flat, scaled=True))
    else:
        plain = _packed_unless_batched(lambda xs, pack: sums(xs, False, pack))(flat)
        scaled = _rescue(lambda xs: sums(xs, scaled=True))(plain, flat)
    return plain, scaled


def _packed_unless_batched(
    sums: Callable[[list[jax.Array], bool], jax.Array],
) -> Callable[[list[jax.Array]], jax.Array]:
    """``leaves -> sums(leaves, pack)``: small leaves packed, except under
    ``vmap``.

    Packing saves XLA:CPU a reduction per small leaf, each with a fixed cost
    that dominates small leaves. Under ``vmap`` each reduction covers the
    whole batch, so that cost is shared, and packing instead copies the whole
    batched gradient into a strided concatenation: on a 9k-parameter MLP's
    step vmapped over 16 seeds, packing made the step 1.25x clip+sgd's, and
    leaving the leaves alone 0.99x (one seed: packed 1.10x, alone 1.57x).
    The batching rule therefore reduces each leaf on its own. ``custom_vmap``
    has no reverse mode; ``_norm`` differentiates the sums by its own rule,
    so this is never differentiated.
    """

    def packed(leaves: list[jax.Array]) -> jax.Array:
        return sums(leaves, True)

    batched_sums = jax.custom_batching.custom_vmap(packed)

    @batched_sums.def_vmap
    def _vmap_rule(
        axis_size: int, in_batched: Any, leaves: list[jax.Array]
    ) -> tuple[jax.Array, bool]:
        (leaves_batched,) = in_batched
        axes = [0 if b else None for b in leaves_batched]
        alone = jax.vmap(
            lambda xs: sums(xs, False), in_axes=(axes,), axis_size=axis_size
        )
        return alone(leaves), True

    return batched_sums


def _unless_finite(plain: jax.Array, rescaled: Callable[[], jax.Array]) -> jax.Array:
    """``plain`` if every entry is finite, else ``rescaled()``, run only then."""
    return lax.cond(jnp.all(jnp.isfinite(plain)), lambda: plain, rescaled)


def _rescue(
    scaled_sums: Callable[[list[jax.Array]], jax.Array],
) -> Callable[[jax.Array, list[jax.Array]], jax.Array]:
    """``(plain, leaves) -> scaled``: ``plain`` if it is all finite, else the
    scaled sums of the leaves, read only then.

    Under ``vmap`` a conditional with a batched predicate becomes a select
    that runs both branches, a second (float64) read of the whole batch on
    every call (the vmapped norm took 4.3x ``optax.tree.norm``'s time). The
    batching rule asks once for the whole batch instead: the scaled sums of
    every example are read only if some example's plain sum is not finite.
    Never differentiated (``_norm`` has the sums' rule).
    """

    def guarded(plain: jax.Array, leaves: list[jax.Array]) -> jax.Array:
        return _unless_finite(plain, lambda: scaled_sums(leaves))

    batched_guard = jax.custom_batching.custom_vmap(guarded)

    @batched_guard.def_vmap
    def _vmap_rule(
        axis_size: int, in_batched: Any, plain: jax.Array, leaves: list[jax.Array]
    ) -> tuple[jax.Array, bool]:
        plain_batched, leaves_batched = in_batched
        if not plain_batched:
            plain = jnp.broadcast_to(plain, (axis_size, *plain.shape))
        axes = [0 if b else None for b in leaves_batched]
        batched = jax.vmap(scaled_sums, in_axes=(axes,), axis_size=axis_size)
        return _unless_finite(plain, lambda: batched(leaves)), True

    return batched_guard

"""The δ-GClip rule: ``scale_by_delta_gclip`` and its state.

The rule multiplies the whole gradient by one scalar,

    s = min(1, max(delta, gamma / ||g||)),

so that the step ``-eta * s * g`` is a plain gradient step for small
gradients, a step of length ``eta * gamma`` (GClip) for larger ones, and never
shorter than ``eta * delta`` times the gradient (the δ floor).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rgclip_optax import _skip_flag, _validation
from rgclip_optax._norm import (
    NORM_DTYPE,
    AxisName,
    accumulation_dtype,
    leaf_norms,
    per_leaf_map,
)
from rgclip_optax._select import zero_where
from rgclip_optax._validation import bool_flags, inexact_leaves


class DeltaGClipState(NamedTuple):
    """State of :func:`scale_by_delta_gclip`, for logging and checkpoints.

    The field names are distinct from every hyperparameter name, so
    ``optax.tree.get(opt_state, "grad_norm")`` finds them in any chain,
    including under :func:`optax.inject_hyperparams`.

    Attributes:
      grad_norm: float32 scalar, the norm of the raw gradient at the last step
        (before any scaling); NaN or inf on a step with non-finite entries.
        With ``norm="per_tensor"``, a pytree of such scalars, one per leaf.
      scale: float32 scalar, the factor ``s`` applied at the last step (so the
        step size was ``h = learning_rate * s``); 0 on a skipped step. With
        ``norm="per_tensor"``, a pytree of such scalars, one per leaf.
      nonfinite_count: int32 scalar, how many steps were skipped because the
        gradient held a NaN or an infinity.
    """

    grad_norm: jax.Array
    scale: jax.Array
    nonfinite_count: jax.Array


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
    one = jnp.ones([], NORM_DTYPE)

    def factor(grad_norm: Any) -> jax.Array:
        norm = jnp.asarray(grad_norm, NORM_DTYPE)
        # Only an exact zero is replaced: a NaN norm must stay NaN.
        safe_norm = jnp.where(norm == 0, one, norm)
        clipped = jnp.minimum(one, jnp.maximum(delta, gamma / safe_norm))
        return jnp.where(norm <= gamma, one, clipped)

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


def wide_dtype(dtype: Any) -> Any:
    """float32 (float64 under x64) for real leaves, the matching complex type
    for complex ones: float8 and float16 cannot be promoted implicitly."""
    real = accumulation_dtype(dtype)
    return (
        jnp.result_type(real, jnp.complex64)
        if jnp.issubdtype(dtype, jnp.complexfloating)
        else real
    )


def _is_float8(dtype: Any) -> bool:
    """8-bit (and narrower) floats, which JAX promotes to nothing implicitly."""
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits <= 8


def _scale_leaf(
    g: jax.Array, s: jax.Array, decay: Any = None, *, cast: bool = True
) -> jax.Array:
    """``s * (g + decay)`` computed in float32 (or wider), cast back to g's dtype
    unless ``cast`` is false."""
    acc = wide_dtype(g.dtype)
    real = accumulation_dtype(g.dtype)
    y = g.astype(acc)
    if decay is not None:
        y = y + decay.astype(acc)
    y = y * s.astype(real)
    return y.astype(g.dtype) if cast else y


def _is_static_zero(value: Any) -> bool:
    v = None if isinstance(value, jax.core.Tracer) else float(value)
    return v == 0.0


NORMS = ("global", "per_tensor")


def _per_leaf_tree(old: Any, n: int, present: list[int], values: jax.Array) -> Any:
    """``old`` (a per-tensor state field) with ``values[k]`` at the k-th leaf
    whose gradient is not ``None``; the other leaves keep their old value, so
    the state's structure does not change when a leaf gets no gradient (an
    Equinox integer buffer, say)."""
    leaves, treedef = jax.tree_util.tree_flatten(old, is_leaf=lambda x: x is None)
    if len(leaves) != n:
        raise ValueError(
            f"norm='per_tensor': the state holds {len(leaves)} per-leaf norms "
            f"but the gradient has {n} leaves; call init with parameters of "
            "the gradient's tree structure."
        )
    for k, i in enumerate(present):
        leaves[i] = values[k].astype(NORM_DTYPE)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def scale_by_delta_gclip(
    gamma: chex.Numeric,
    delta: chex.Numeric = 1e-3,
    *,
    skip_nonfinite: bool = True,
    norm: str = "global",
    axis_name: AxisName = None,
    replicated: Any = None,
    weight_decay: chex.Numeric | None = None,
    mask: Any = None,
    wide_updates: bool = False,
) -> optax.GradientTransformation:
    r"""Scales the updates by the δ-regularized clipping factor of their norm.

    The whole update pytree is multiplied by one scalar,

    .. math::

      s = \min\left(1,\ \max\left(\delta,\ \frac{\gamma}{\|g\|}\right)\right),

    where :math:`\|g\|` is the L2 norm of all leaves together (see
    :func:`rgclip_optax.global_norm`). No learning rate and no sign is applied,
    so it chains with anything; chained with ``optax.sgd(eta)`` it gives the
    δ-GClip step :math:`w \leftarrow w - \eta s g` of Tucat et al. The three
    regimes, for :math:`0 < \delta < 1`:

    * :math:`\|g\| \le \gamma`: :math:`s = 1`, a plain gradient step;
    * :math:`\gamma < \|g\| \le \gamma/\delta`: :math:`s = \gamma/\|g\|`, the
      update has norm :math:`\gamma` (GClip);
    * :math:`\|g\| > \gamma/\delta`: :math:`s = \delta`, the floor that makes
      the method provably converge on wide networks.

    ``delta = 0`` is plain GClip (``optax.clip_by_global_norm``), ``delta = 1``
    is the identity.

    Numerics: the norm is accumulated in float32 for every leaf dtype; each
    output leaf keeps its input dtype; a zero gradient gives a zero update and
    ``s = 1``. If the gradient holds a NaN or an infinity and
    ``skip_nonfinite`` is true, the updates are all zero and
    ``nonfinite_count`` grows by one (to also hold momentum and schedule state
    still, wrap the chain in :func:`rgclip_optax.skip_and_round`, as
    :func:`rgclip_optax.delta_gclip` does).

    Weight decay follows the authors' reference implementation: the norm is
    that of the raw gradient, and the decay is added afterwards and scaled by
    the same factor, :math:`s\,(g + \lambda w)`.

    Args:
      gamma: the clipping threshold :math:`\gamma > 0` on the gradient norm.
      delta: the floor :math:`\delta \in [0, 1]` on the factor.
      skip_nonfinite: if true (the default), a step whose gradient has a
        non-finite entry outputs zero updates and is counted; if false, the
        formula's result (NaN or inf) is propagated.
      norm: ``"global"`` (the default, the paper's method): one norm over all
        leaves and one factor for the whole tree. ``"per_tensor"``: each leaf
        uses its own norm and gets its own factor (the authors'
        ``deltaGClip_c`` variant); ``grad_norm`` and ``scale`` in the state
        are then pytrees of float32 scalars with the gradient's structure, and
        a step is still skipped as a whole if any leaf is not finite. The
        paper's convergence theorem covers only the global norm.
      axis_name: inside ``shard_map``/``pmap``, the mesh axis (or axes) over
        which the gradient leaves are sharded: the float32 partial sums of
        squares are added across it with one scalar ``psum``. Leave it
        ``None`` under ``jax.jit`` with shardings (XLA does the reduction) and
        when the gradients were already averaged with ``pmean``; see
        :func:`rgclip_optax.global_norm`.
      replicated: with ``axis_name``, which leaves are *replicated* on every
        device of the axis (so counted once, not once per device): a pytree of
        bools with the gradient's structure, or a callable taking the
        gradient and returning one. ``None``: every leaf is sharded.
      weight_decay: :math:`\lambda \ge 0`, or ``None`` (the default) for no
        weight decay. Unless it is ``None`` or a concrete 0, ``update`` needs
        ``params``. ``None`` is what keeps ``update(grads, state)`` without
        params working under :func:`optax.inject_hyperparams`, which traces
        every numeric argument, a ``0.0`` included.
      mask: which parameters are decayed, as in
        :func:`optax.add_decayed_weights`: a pytree of bools with the
        parameters' structure (``True``: decayed), or a callable taking the
        parameters and returning one. ``None`` (the default) decays every
        leaf. For example ``lambda p: jax.tree.map(lambda x: x.ndim > 1, p)``
        leaves biases and normalization scales undecayed.
        Only with ``weight_decay``.
      wide_updates: if false (the default), each update leaf has its
        gradient's dtype. If true, the updates are handed on unrounded, in
        float32 (float64 under x64, the matching complex type for complex
        leaves), for a chain that rounds once at its end:
        :func:`rgclip_optax.skip_and_round` casts back to the gradient's
        dtypes, so a bfloat16 update is rounded once and not after every link.
        (Widening the gradient in front of the rule instead would make XLA
        write a float32 copy of it.) 8-bit float leaves stay in their dtype:
        JAX promotes them to nothing implicitly, so the next link's
        arithmetic with its own float8 state (Adam's moments) would fail.

    Returns:
      An :class:`optax.GradientTransformation` whose state is a
      :class:`DeltaGClipState`.

    Raises:
      ValueError: for a concrete ``gamma <= 0``, ``delta`` outside [0, 1],
        ``weight_decay < 0``, a ``mask`` without ``weight_decay`` or an
        unknown ``norm``; in ``update``, for a ``mask`` that does not match
        the parameters, or for missing ``params`` when they are needed.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import rgclip_optax as rgc
      >>> tx = optax.chain(rgc.scale_by_delta_gclip(gamma=1.0, delta=0.1),
      ...                  optax.sgd(learning_rate=0.5))
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.array([30.0, 40.0])}  # norm 50 > gamma/delta = 10
      >>> updates, state = tx.update(grads, state)
      >>> updates["w"]  # -0.5 * 0.1 * g
      Array([-1.5, -2. ], dtype=float32)
      >>> float(state[0].grad_norm), float(state[0].scale)
      (50.0, 0.1...)

    References:
      Tucat, Mukherjee, Sen, Sun, Rivasplata, `Regularized Gradient Clipping
      Provably Trains Wide and Deep Neural Networks
      <https://arxiv.org/abs/2404.08624>`_, TMLR 2025.

      Zhang, He, Sra, Jadbabaie, `Why gradient clipping accelerates training: A
      theoretical justification for adaptivity
      <https://arxiv.org/abs/1905.11881>`_, ICLR 2020.
    """
    _validation.check_positive("gamma", gamma, allow_inf=True)
    _validation.check_interval("delta", delta, 0.0, 1.0)
    if weight_decay is not None:
        _validation.check_interval("weight_decay", weight_decay, 0.0, float("inf"))
    elif mask is not None:
        raise ValueError(
            "mask selects the parameters that weight_decay applies to, but "
            "weight_decay=None (no decay); pass weight_decay too, or drop mask."
        )
    _validation.check_bool("skip_nonfinite", skip_nonfinite)
    _validation.check_bool("wide_updates", wide_updates)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got norm={norm!r}.")
    if replicated is not None and axis_name is None:
        raise ValueError(
            "replicated only matters with axis_name (inside shard_map/pmap); "
            "got replicated without axis_name."
        )
    decays = weight_decay is not None and not _is_static_zero(weight_decay)
    per_tensor = norm == "per_tensor"

    def init_fn(params: Any) -> DeltaGClipState:
        # No computation on the params: works on ShapeDtypeStructs.
        if per_tensor:
            grad_norm = jax.tree.map(lambda _: jnp.zeros([], NORM_DTYPE), params)
            scale = jax.tree.map(lambda _: jnp.ones([], NORM_DTYPE), params)
        else:
            grad_norm = jnp.zeros([], NORM_DTYPE)
            scale = jnp.ones([], NORM_DTYPE)
        return DeltaGClipState(
            grad_norm=grad_norm,
            scale=scale,
            nonfinite_count=jnp.zeros([], jnp.int32),
        )

    def update_fn(
        updates: Any, state: DeltaGClipState, params: Any = None
    ) -> tuple[Any, DeltaGClipState]:
        inexact_leaves(updates)  # raises TypeError naming a bad leaf's path
        if decays and params is None:
            shown = (
                "traced"
                if isinstance(weight_decay, jax.core.Tracer)
                else repr(weight_decay)
            )
            raise ValueError(
                f"weight_decay is not statically 0 (it is {shown}), so "
                "update() needs params: call tx.update(grads, state, params). "
                "For no weight decay, leave weight_decay=None (under "
                "optax.inject_hyperparams a 0.0 is traced, so it is not static)."
            )
        grads, treedef = jax.tree_util.tree_flatten(
            updates, is_leaf=lambda x: x is None
        )
        rep = bool_flags("replicated", replicated, updates, "gradient")
        present = [i for i, g in enumerate(grads) if g is not None]

        # One pass over the leaves for both variants: per-tensor keeps one
        # norm per leaf (a vector) instead of their total.
        norms, finite = leaf_norms(grads, rep, axis_name, per_leaf=per_tensor)
        skip = jnp.logical_and(skip_nonfinite, jnp.logical_not(finite))

        def factor_and_logged(n: jax.Array) -> tuple[jax.Array, jax.Array]:
            # The factor applied, and the one the state logs (0 if skipped).
            f = delta_gclip_scale(n, gamma, delta)
            return f, jnp.where(skip, jnp.zeros([], NORM_DTYPE), f)

        if per_tensor:
            factors, new_scale = per_leaf_map(factor_and_logged, norms)
        else:
            factors, new_scale = factor_and_logged(norms)
        scales: list[Any] = [None] * len(grads)
        for k, i in enumerate(present):
            scales[i] = factors[k] if per_tensor else factors

        if decays:
            ps, _ = jax.tree_util.tree_flatten(params, is_leaf=lambda x: x is None)
            if len(ps) != len(grads):
                raise ValueError(
                    "params must have the same tree structure as the updates."
                )
            decayed = (
                [True] * len(ps)
                if mask is None
                else _validation.bool_flags("mask", mask, params, "parameters")
            )
        out: list[Any] = [None] * len(grads)
        for i in present:
            decay = None
            if decays and decayed[i]:
                p = ps[i]
                decay = jnp.asarray(weight_decay, NORM_DTYPE) * p.astype(
                    wide_dtype(p.dtype)
                )
            wide = wide_updates and not _is_float8(grads[i].dtype)
            y = _scale_leaf(grads[i], scales[i], decay, cast=not wide)
            if skip_nonfinite is not False:
                y = zero_where(skip, y)
            out[i] = y
        new_updates = jax.tree_util.tree_unflatten(treedef, out)

        if per_tensor:
            new_norm = _per_leaf_tree(state.grad_norm, len(grads), present, norms)
            new_scale = _per_leaf_tree(state.scale, len(grads), present, new_scale)
        else:
            # float32 whatever the leaves (a float64 leaf under x64 included):
            # the state must keep init's dtypes to be a scan or loop carry.
            new_norm = norms.astype(NORM_DTYPE)
            new_scale = new_scale.astype(NORM_DTYPE)
        new_state = DeltaGClipState(
            grad_norm=new_norm,
            scale=new_scale,
            nonfinite_count=state.nonfinite_count + skip.astype(jnp.int32),
        )
        _skip_flag.report(new_state, skip)
        return new_updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)

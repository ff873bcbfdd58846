"""``scale_by_delta_gclip``: the δ-GClip rule as an Optax transformation.

One step, in order (each a small function below):

1. the norm of the raw gradient: one over all leaves (``_norm.leaf_norms``),
   or one per leaf with ``norm="per_tensor"`` (``_norm.per_tensor_norms``,
   which computes each leaf's factor in the same pass);
2. the factor ``s = min(1, max(delta, gamma / ||g||))`` (``_factor``), 0 on a
   step that is skipped because the gradient is not finite;
3. the updates ``s * (g + weight_decay * w)``, each leaf in its own dtype (or
   widened, for :func:`skip_and_round`), zero on a skipped step;
4. the new :class:`DeltaGClipState`: the norm, the factor, the count of
   skipped steps and whether this one was.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from rgclip_optax import _validation
from rgclip_optax._adaptive import AdaptiveGamma
from rgclip_optax._factor import delta_gclip_scale
from rgclip_optax._norm import leaf_norms, per_tensor_norms, select
from rgclip_optax._selects import zero_if
from rgclip_optax._state import DeltaGClipState
from rgclip_optax._sums import NORM_DTYPE, AxisName, accumulation_dtype
from rgclip_optax._validation import bool_flags, inexact_leaves

NORMS = ("global", "per_tensor")


def wide_dtype(dtype: Any) -> Any:
    """float32 (float64 under x64) for real leaves, the matching complex type
    for complex ones: float8 and float16 cannot be promoted implicitly."""
    real = accumulation_dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.result_type(real, jnp.complex64)
    return real


def _is_float8(dtype: Any) -> bool:
    """8-bit (and narrower) floats, which JAX promotes to nothing implicitly."""
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits <= 8


def _is_static_zero(value: Any) -> bool:
    return not isinstance(value, jax.core.Tracer) and float(value) == 0.0


def _flat(tree: Any) -> tuple[list[Any], Any]:
    """Leaves with ``None`` kept in place, and the tree's structure."""
    return jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is None)


def _factor(
    norm: jax.Array, skip: jax.Array | None, gamma: Any, delta: Any
) -> jax.Array:
    """The factor applied (and logged): 0 on a skipped step. The formula then
    reads a norm of 1, not the NaN one, so its derivative stays finite and
    the select sends it a zero cotangent."""
    if skip is None:
        return delta_gclip_scale(norm, gamma, delta)
    factor = delta_gclip_scale(select(skip, 1.0, norm), gamma, delta)
    return select(skip, 0.0, factor)


def _skip_flag(skip_nonfinite: Any, finite: jax.Array) -> jax.Array | None:
    """Whether this step is skipped; ``None`` where it never is (a concrete
    ``skip_nonfinite=False``: no select is traced)."""
    if isinstance(skip_nonfinite, jax.core.Tracer):  # inject_hyperparams
        return jnp.logical_and(skip_nonfinite, jnp.logical_not(finite))
    return jnp.logical_not(finite) if skip_nonfinite else None


def _per_leaf_tree(old: Any, n: int, present: list[int], values: list[Any]) -> Any:
    """``old`` (a per-tensor state field) with ``values[k]`` at the k-th leaf
    whose gradient is not ``None``; the other leaves keep their old value, so
    the state's structure does not change when a leaf gets no gradient (an
    Equinox integer buffer, say)."""
    leaves, treedef = _flat(old)
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
    gamma: chex.Numeric | AdaptiveGamma,
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
      gamma: the clipping threshold :math:`\gamma > 0` on the gradient norm,
        or a threshold that adapts to the norm's history
        (:func:`rgclip_optax.zscore_gamma`, :func:`rgclip_optax.percentile_gamma`),
        whose running statistics the state keeps; the δ floor is then
        relative to the threshold of each step. Adaptive thresholds need
        ``norm="global"``.
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

    Derivatives through ``update`` (with respect to ``gamma``, ``delta``, the
    weight decay or the gradient, for meta-learning) are those of the
    formula; a skipped step's are zero.

    References:
      Tucat, Mukherjee, Sen, Sun, Rivasplata, `Regularized Gradient Clipping
      Provably Trains Wide and Deep Neural Networks
      <https://arxiv.org/abs/2404.08624>`_, TMLR 2025.

      Zhang, He, Sra, Jadbabaie, `Why gradient clipping accelerates training: A
      theoretical justification for adaptivity
      <https://arxiv.org/abs/1905.11881>`_, ICLR 2020.
    """
    _check_arguments(
        gamma, delta, skip_nonfinite, norm, axis_name, replicated,
        weight_decay, mask, wide_updates,
    )  # fmt: skip
    rule = _Rule(
        gamma=gamma,
        delta=delta,
        skip_nonfinite=skip_nonfinite,
        per_tensor=norm == "per_tensor",
        axis_name=axis_name,
        replicated=replicated,
        weight_decay=(
            None
            if weight_decay is None or _is_static_zero(weight_decay)
            else weight_decay
        ),
        mask=mask,
        wide_updates=wide_updates,
    )
    return optax.GradientTransformation(rule.init, rule.update)


@dataclasses.dataclass(frozen=True, eq=False)
class _Rule:
    """The rule's options, and its ``init`` and ``update`` as small steps.

    ``weight_decay`` is ``None`` unless it may be nonzero (a traced value
    under ``optax.inject_hyperparams`` may be).
    """

    gamma: Any
    delta: Any
    skip_nonfinite: Any
    per_tensor: bool
    axis_name: AxisName
    replicated: Any
    weight_decay: Any
    mask: Any
    wide_updates: bool

    def init(self, params: Any) -> DeltaGClipState:
        # No computation on the params: works on ShapeDtypeStructs.
        def scalar(value: float) -> Any:
            if self.per_tensor:
                return jax.tree.map(lambda _: jnp.full([], value, NORM_DTYPE), params)
            return jnp.full([], value, NORM_DTYPE)

        adaptive = isinstance(self.gamma, AdaptiveGamma)
        gamma = self.gamma.initial if adaptive else self.gamma
        return DeltaGClipState(
            grad_norm=scalar(0.0),
            scale=scalar(1.0),
            nonfinite_count=jnp.zeros([], jnp.int32),
            skipped=jnp.zeros([], jnp.bool_),
            threshold=jnp.asarray(gamma, NORM_DTYPE),
            threshold_stats=self.gamma.init() if adaptive else (),
        )

    def fixed_threshold(self, state: DeltaGClipState) -> jax.Array:
        """A fixed ``gamma`` to log: a JAX array (``inject_hyperparams``
        hands one over, traced or not; a meta-gradient traces it) as it is,
        a Python or NumPy number as ``init`` wrote it, carried unchanged. A
        constant written afresh on every step is one more output of the
        compiled step, and it moved XLA:TPU's prefetches to on-chip memory:
        1.056x clip+sgd's bytes against 1.021x (ResNet-18 on a v5e 2x2, jax
        0.10.2, libtpu 0.0.42.1, ``tests/test_xla_lowering.py``)."""
        if isinstance(self.gamma, jax.Array):
            return jnp.asarray(self.gamma, NORM_DTYPE)
        return state.threshold

    def decay_terms(self, grads: list[Any], params: Any) -> list[Any]:
        """``weight_decay * w`` (float32 or wider) per leaf, or ``None``."""
        wd = self.weight_decay
        if wd is None:
            return [None] * len(grads)
        if params is None:
            shown = "traced" if isinstance(wd, jax.core.Tracer) else repr(wd)
            raise ValueError(
                f"weight_decay is not statically 0 (it is {shown}), so "
                "update() needs params: call tx.update(grads, state, params). "
                "For no weight decay, leave weight_decay=None (under "
                "optax.inject_hyperparams a 0.0 is traced, so it is not static)."
            )
        ps, _ = _flat(params)
        if len(ps) != len(grads):
            raise ValueError("params must have the same tree structure as the updates.")
        decayed = (
            None
            if self.mask is None
            else bool_flags("mask", self.mask, params, "parameters")
        )
        wd = jnp.asarray(wd, NORM_DTYPE)
        return [
            None
            if p is None or (decayed is not None and not decayed[i])
            else wd * p.astype(wide_dtype(p.dtype))
            for i, p in enumerate(ps)
        ]

    def scaled(self, g: Any, s: Any, decay: Any) -> Any:
        """``s * (g + decay)`` in float32 or wider, in g's dtype unless the
        updates are wide."""
        if g is None:
            return None
        y = g.astype(wide_dtype(g.dtype))
        if decay is not None:
            y = y + decay.astype(y.dtype)
        y = y * s.astype(accumulation_dtype(g.dtype))
        if not (self.wide_updates and not _is_float8(g.dtype)):
            y = y.astype(g.dtype)
        return y

    def global_step(
        self, grads: list[Any], rep: list[bool], decay: list[Any], state: Any
    ) -> tuple[list[Any], tuple[Any, ...], Any]:
        """One norm and one factor: ``(updates, (norm, factor, threshold,
        stats), skip)``."""
        norm, finite = leaf_norms(grads, rep, self.axis_name)
        skip = _skip_flag(self.skip_nonfinite, finite)
        if isinstance(self.gamma, AdaptiveGamma):
            gamma, stats = self.gamma.step(state.threshold_stats, norm)
            threshold = gamma
        else:
            gamma, stats = self.gamma, ()
            threshold = self.fixed_threshold(state)
        factor = _factor(norm, skip, gamma, self.delta)
        out = [self.scaled(g, factor, d) for g, d in zip(grads, decay, strict=True)]
        # float32 whatever the leaves: the state must keep init's dtypes to be
        # a scan or loop carry.
        return out, (norm, factor.astype(NORM_DTYPE), threshold, stats), skip

    def per_tensor_step(
        self, grads: list[Any], rep: list[bool], decay: list[Any], state: Any
    ) -> tuple[list[Any], tuple[Any, ...], Any]:
        """A norm and a factor per leaf, computed in one pass."""

        def factor_of(norm: jax.Array, finite: jax.Array) -> jax.Array:
            skip = _skip_flag(self.skip_nonfinite, finite)
            return _factor(norm, skip, self.gamma, self.delta)

        present, norms, factors, finite = per_tensor_norms(
            grads, rep, self.axis_name, factor_of
        )
        skip = _skip_flag(self.skip_nonfinite, finite)
        leaf_factor = dict(zip(present, factors, strict=True))
        out = [
            self.scaled(g, leaf_factor.get(i), decay[i]) for i, g in enumerate(grads)
        ]
        logged_norm = _per_leaf_tree(state.grad_norm, len(grads), present, norms)
        logged_scale = _per_leaf_tree(state.scale, len(grads), present, factors)
        threshold = self.fixed_threshold(state)
        return out, (logged_norm, logged_scale, threshold, ()), skip

    def update(
        self, updates: Any, state: DeltaGClipState, params: Any = None
    ) -> tuple[Any, DeltaGClipState]:
        inexact_leaves(updates)  # raises TypeError naming a bad leaf's path
        grads, treedef = _flat(updates)
        decay = self.decay_terms(grads, params)
        rep = bool_flags("replicated", self.replicated, updates, "gradient")
        step = self.per_tensor_step if self.per_tensor else self.global_step
        out, (norm, scale, threshold, stats), skip = step(grads, rep, decay, state)
        if skip is not None:  # a skipped step's updates are zero
            out = zero_if(skip, out)
        skipped = jnp.zeros([], jnp.bool_) if skip is None else skip
        new_state = DeltaGClipState(
            grad_norm=norm,
            scale=scale,
            nonfinite_count=state.nonfinite_count + skipped.astype(jnp.int32),
            skipped=skipped,
            threshold=threshold,
            threshold_stats=stats,
        )
        return jax.tree_util.tree_unflatten(treedef, out), new_state


def _check_arguments(
    gamma: Any,
    delta: Any,
    skip_nonfinite: Any,
    norm: Any,
    axis_name: Any,
    replicated: Any,
    weight_decay: Any,
    mask: Any,
    wide_updates: Any,
) -> None:
    """``scale_by_delta_gclip``'s checks of its concrete arguments."""
    if isinstance(gamma, AdaptiveGamma):
        if norm != "global":
            raise ValueError(
                "an adaptive gamma keeps statistics of the global norm: it needs "
                f"norm='global', got norm={norm!r}."
            )
    else:
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

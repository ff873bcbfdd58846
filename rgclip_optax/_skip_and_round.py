"""``skip_and_round``: runs a δ-GClip chain as one step.

It does two things around a chain that holds one :func:`scale_by_delta_gclip`:
the whole step is skipped when the rule skips a non-finite gradient (every
other piece of state is held), and the chain runs in float32 so that a
low-precision update is rounded once, at the end (with the rule's
``wide_updates=True``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from rgclip_optax import _spikes
from rgclip_optax._selects import zero_if
from rgclip_optax._spikes import SpikeState
from rgclip_optax._state import find_rule_state, is_rule_state


class SkipAndRoundState(NamedTuple):
    """:func:`skip_and_round`'s state with spike skipping on: the inner
    chain's state, and the spike test's windows and count."""

    inner: Any
    spikes: SpikeState


def hold_state(skipped: jax.Array, new: Any, old: Any) -> Any:
    """Each leaf of ``old`` where the step was skipped, else of ``new`` cast to
    the old leaf's dtype; the rule's own state is always the new one.

    Where ``new`` has ``None`` and ``old`` an array, the old leaf is kept:
    ``optax.trace`` returns ``None`` for a parameter that got no gradient (an
    Equinox integer buffer, say) where ``init`` gave it an array, and the state
    must keep one structure to be a scan or loop carry."""

    def hold(n: Any, o: Any) -> Any:
        if n is None:
            return o
        if is_rule_state(n) or not hasattr(o, "dtype"):
            return n
        # select_n on every backend: the bit masks' measured gain is in the
        # updates (_selects), and masks on every held Adam moment made the
        # AdamW chain's jaxpr 1.7x Optax's (benchmarks/build_cost.py).
        return lax.select_n(skipped, n.astype(o.dtype), o)

    return jax.tree.map(hold, new, old, is_leaf=lambda x: x is None or is_rule_state(x))


def round_updates(skipped: jax.Array | None, new: Any, grads: Any) -> Any:
    """Each leaf of ``new`` cast once to its gradient leaf's dtype, and zero
    where the step was skipped (``None``: left as they are)."""
    gs, treedef = jax.tree_util.tree_flatten(grads, is_leaf=lambda x: x is None)
    ns = jax.tree_util.tree_flatten(new, is_leaf=lambda x: x is None)[0]
    cast = [
        None if g is None else n.astype(g.dtype) for n, g in zip(ns, gs, strict=True)
    ]
    if skipped is not None:
        cast = zero_if(skipped, cast)
    return jax.tree_util.tree_unflatten(treedef, cast)


def skip_and_round(
    inner: optax.GradientTransformation,
    *,
    spike_sigmas: float | None = None,
    spike_window: int = 128,
    spike_warmup: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Runs a chain around :func:`scale_by_delta_gclip` as one δ-GClip step.

    :func:`delta_gclip` is ``skip_and_round(optax.chain(scale_by_delta_gclip(...),
    [optax.trace(...)], optax.scale_by_learning_rate(...)))``; this is the
    wrapper, for building your own variant from public parts. Around
    ``inner`` it adds:

    * **Whole-step skips.** When the rule skips a gradient with a NaN or an
      infinity (its state's ``skipped`` flag), the updates are exact zeros and
      every other leaf of the state (momentum, schedule counts, Adam's moments)
      is held as it was, as :func:`optax.apply_if_finite` does, but reusing the
      finiteness flag that the norm already computed. Without the wrapper, the
      rule alone zeroes its own output, but a momentum after it decays and a
      schedule after it counts the step.
    * **One rounding.** The updates are cast to each gradient leaf's dtype
      once, at the end. With the rule built with ``wide_updates=True`` the
      chain after it runs in float32, so a bfloat16 update is rounded once,
      not after every link. Every state leaf is cast back to its dtype from
      the step before, so a float32 hyperparameter traced by
      :func:`optax.inject_hyperparams` cannot make the state's dtypes drift.

    With a rule built with ``skip_nonfinite=False`` no step is skipped and
    only the rounding applies.

    .. math::

      (u_t, S_t) =
      \begin{cases}
        (0,\ S_{t-1} \text{ with the rule's log updated}) & \text{if the rule
          skipped step } t \\
        (\operatorname{round}(\mathrm{inner}(g_t)),\ S_t) & \text{otherwise}
      \end{cases}

    The state is ``inner``'s own, unchanged in structure, so checkpoints and
    :func:`optax.tree.get` see the usual ``TraceState`` and schedule counts.

    **Spike skipping** (``spike_sigmas``, off by default): a step whose
    gradient norm, or whose loss when the update is given one as ``value``
    (``tx.update(grads, state, params, value=loss)``, as
    ``optax.contrib.reduce_on_plateau`` takes it), is more than
    ``spike_sigmas`` standard deviations above the mean of the last
    ``spike_window`` steps taken is skipped as a non-finite one is: zero
    updates, the rest of the state held. Skipped steps do not enter the
    windows (the rule's own state, its log and an adaptive threshold's
    statistics, still records a spike, as it records a non-finite step; a
    zscore threshold takes it in clipped). The state is then a
    :class:`SkipAndRoundState`: ``inner``'s
    state and a :class:`SpikeState` whose ``spike_count`` counts the spikes
    (apart from the rule's ``nonfinite_count``).

    Args:
      inner: an optax transformation whose state contains exactly one
        :class:`DeltaGClipState`, anywhere (found by type, not by position).
      spike_sigmas: how many standard deviations above the recent mean make
        a spike, > 0; ``None`` (the default): no spike skipping.
      spike_window: how many recent steps the mean and deviation are taken
        over, >= 2 (128, as Levanter's skip-step).
      spike_warmup: how many steps must be in the window before a spike can
        be called, in [2, ``spike_window``]; default ``spike_window``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with ``inner``'s state
      (with spike skipping, a :class:`SkipAndRoundState` around it).

    Raises:
      ValueError: from ``init`` or ``update``, if ``inner``'s state holds no
        :class:`DeltaGClipState` or more than one; at once, for spike options
        out of range.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import rgclip_optax as rgc
      >>> tx = rgc.skip_and_round(optax.chain(
      ...     rgc.scale_by_delta_gclip(gamma=1.0, delta=0.1, wide_updates=True),
      ...     optax.scale_by_adam(),
      ...     optax.scale_by_learning_rate(1e-3),
      ... ))
      >>> params = jnp.ones(3, jnp.bfloat16)
      >>> state = tx.init(params)
      >>> bad = jnp.array([1.0, jnp.nan, 2.0], jnp.bfloat16)
      >>> updates, new_state = tx.update(bad, state, params)
      >>> updates  # the step is skipped ...
      Array([0, 0, 0], dtype=bfloat16)
      >>> int(optax.tree.get(new_state, "nonfinite_count"))
      1
      >>> int(new_state[1].count)  # ... and Adam's count is held
      0
    """
    inner = optax.with_extra_args_support(inner)
    spikes = spike_sigmas is not None
    sigmas, warmup = 0.0, 0
    if spike_sigmas is not None:
        warmup = _spikes.check(spike_sigmas, spike_window, spike_warmup)
        sigmas = float(spike_sigmas)

    def init_fn(params: Any) -> Any:
        state = inner.init(params)
        find_rule_state(state, "skip_and_round")  # fail at init, not at a step
        if spikes:
            return SkipAndRoundState(state, _spikes.init(spike_window))
        return state

    def update_fn(
        updates: Any, state: Any, params: Any = None, **extra_args: Any
    ) -> tuple[Any, Any]:
        inner_state = state.inner if spikes else state
        new_updates, new_state = inner.update(
            updates, inner_state, params, **extra_args
        )
        rule = find_rule_state(new_state, "skip_and_round")
        skipped = rule.skipped
        if spikes:
            norm = _spikes.global_norm_of(rule.grad_norm)
            loss = extra_args.get("value")
            spike = _spikes.is_spike(
                state.spikes, norm, loss, sigmas, warmup
            ) & jnp.logical_not(skipped)
            skipped = skipped | spike
            spike_state = _spikes.update(state.spikes, norm, loss, skipped, spike)
        new_state = hold_state(skipped, new_state, inner_state)
        if spikes:
            new_state = SkipAndRoundState(new_state, spike_state)
        return round_updates(skipped, new_updates, updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

"""Loss and gradient-norm spikes: the rolling statistics that tell one.

A step is a spike when, with at least ``warmup`` recent values seen, its
gradient norm (or its loss, when ``skip_and_round``'s update is given one as
``value``) exceeds the mean of the last ``window`` values by more than
``sigmas`` standard deviations. :func:`skip_and_round` then skips it as it
skips a non-finite gradient. The values of skipped steps (spikes and
non-finite ones) are not taken into the window, so a run of spikes cannot
raise the bar it is judged by.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rgclip_optax import _validation
from rgclip_optax._sums import NORM_DTYPE


class SpikeState(NamedTuple):
    """The rolling windows of :func:`skip_and_round`'s spike test.

    Attributes:
      norms: float32 vector, the last ``window`` gradient norms of steps
        that were taken (a ring buffer, NaN where not yet filled).
      losses: float32 vector, their losses, where the update was given one
        (NaN otherwise).
      seen: int32, how many steps were taken into the windows.
      spike_count: int32, how many steps were skipped as spikes (counted
        apart from the rule's ``nonfinite_count``).
    """

    norms: jax.Array
    losses: jax.Array
    seen: jax.Array
    spike_count: jax.Array


def check(sigmas: Any, window: Any, warmup: Any) -> int:
    """Checks the spike options; returns the warm-up (default: ``window``)."""
    _validation.check_positive("spike_sigmas", sigmas)
    _validation.check_int("spike_window", window, 2)
    warmup = window if warmup is None else warmup
    _validation.check_int("spike_warmup", warmup, 2)
    if warmup > window:
        raise ValueError(
            f"spike_warmup must be in [2, spike_window={window}], got "
            f"spike_warmup={warmup!r}."
        )
    return warmup


def init(window: int) -> SpikeState:
    nan = jnp.full([window], jnp.nan, NORM_DTYPE)
    zero = jnp.zeros([], jnp.int32)
    return SpikeState(nan, nan, zero, zero)


def _above(history: jax.Array, x: jax.Array, sigmas: float) -> jax.Array:
    """Whether ``x`` is more than ``sigmas`` standard deviations above the
    mean of the (NaN-padded) history; False for a NaN ``x``."""
    mean = jnp.nanmean(history)
    std = jnp.nanstd(history)
    return x > mean + jnp.asarray(sigmas, NORM_DTYPE) * std


def is_spike(
    state: SpikeState, norm: jax.Array, loss: Any, sigmas: float, warmup: int
) -> jax.Array:
    """Whether this step's norm (or loss) is a spike."""
    spike = _above(state.norms, norm, sigmas)
    if loss is not None:
        spike = spike | _above(state.losses, loss, sigmas)
    return (state.seen >= warmup) & spike


def update(
    state: SpikeState, norm: jax.Array, loss: Any, skipped: jax.Array, spike: Any
) -> SpikeState:
    """The windows with this step's values, unless it was skipped."""
    slot = state.seen % state.norms.shape[0]
    value = jnp.nan if loss is None else jnp.asarray(loss, NORM_DTYPE)
    taken = SpikeState(
        state.norms.at[slot].set(norm),
        state.losses.at[slot].set(value),
        state.seen + 1,
        state.spike_count,
    )
    held = jax.tree.map(lambda t, s: jnp.where(skipped, s, t), taken, state)
    return held._replace(spike_count=state.spike_count + spike.astype(jnp.int32))


def global_norm_of(grad_norm: Any) -> jax.Array:
    """The global norm from the rule's logged one (per-tensor: a tree)."""
    if isinstance(grad_norm, jax.Array):
        return grad_norm.astype(NORM_DTYPE)
    leaves = jax.tree.leaves(grad_norm)
    return jnp.sqrt(sum(jnp.square(x.astype(NORM_DTYPE)) for x in leaves))

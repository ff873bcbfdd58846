"""A clipping threshold from the gradient norm's own history.

``scale_by_delta_gclip(gamma=...)`` takes a number, or one of these: each
keeps running statistics of the norms it has seen, in the rule's state, and
gives the threshold ``gamma_t`` for the next step from them. The δ floor
stays relative to the threshold in use, ``s = min(1, max(delta, gamma_t /
||g||))``, so ``eta * delta <= h <= eta`` holds on every step.

* :func:`zscore_gamma` (ZClip's rule): an exponential moving average of the
  norm's mean and variance, ``gamma_t = mean + z * std``.
* :func:`percentile_gamma` (AutoClip's rule): the ``q``-th percentile of the
  last ``window`` norms.

Both start with ``warmup`` steps at a fixed threshold (``initial``, by
default ``inf``: no clipping) while the statistics fill, and neither learns
from a skipped step (a non-finite norm leaves them as they were).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rgclip_optax import _validation
from rgclip_optax._sums import NORM_DTYPE


class ZScoreStats(NamedTuple):
    """Running statistics of :func:`zscore_gamma`.

    Attributes:
      seen: int32, how many norms were taken in (skipped steps excluded).
      mean: float32, the norm's mean: the plain mean of the warm-up norms,
        then an exponential moving average.
      var: float32, the norm's variance, likewise.
    """

    seen: jax.Array
    mean: jax.Array
    var: jax.Array


class PercentileStats(NamedTuple):
    """Running statistics of :func:`percentile_gamma`.

    Attributes:
      seen: int32, how many norms were taken in (skipped steps excluded).
      history: float32 vector of the last ``window`` norms (a ring buffer,
        NaN where not yet filled).
    """

    seen: jax.Array
    history: jax.Array


@dataclasses.dataclass(frozen=True)
class AdaptiveGamma:
    """Base of the adaptive thresholds: ``init``, ``gamma`` and ``update``.

    Subclasses are frozen dataclasses, so an optimizer built with one is
    hashable and can be a static argument (``optax.inject_hyperparams``
    passes it through unchanged).
    """

    warmup: int
    initial: float

    def init(self) -> Any:
        raise NotImplementedError

    def adaptive(self, stats: Any) -> jax.Array:
        """The threshold the statistics give, after the warm-up."""
        raise NotImplementedError

    def current(self, stats: Any) -> jax.Array:
        """The threshold for the step about to be taken."""
        initial = jnp.asarray(self.initial, NORM_DTYPE)
        return jnp.where(self._in_warmup(stats.seen), initial, self.adaptive(stats))

    def update(self, stats: Any, norm: jax.Array, gamma: jax.Array) -> Any:
        """The statistics after a step of norm ``norm`` (clipped at the
        threshold ``gamma`` it was taken with, where the rule says so)."""
        raise NotImplementedError

    def _in_warmup(self, count: jax.Array) -> jax.Array:
        return count < self.warmup

    def step(self, stats: Any, norm: jax.Array) -> tuple[jax.Array, Any]:
        """``(gamma_t, new stats)``; a non-finite ``norm`` changes nothing."""
        gamma = self.current(stats)
        new = self.update(stats, norm, gamma)
        finite = jnp.isfinite(norm)
        held = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, stats)
        return gamma, held


def _check(warmup: Any, initial: Any) -> None:
    _validation.check_int("warmup", warmup, 1)
    _validation.check_positive("initial", initial, allow_inf=True)


@dataclasses.dataclass(frozen=True)
class _ZScore(AdaptiveGamma):
    z: float
    decay: float

    def init(self) -> ZScoreStats:
        zero = jnp.zeros([], NORM_DTYPE)
        return ZScoreStats(jnp.zeros([], jnp.int32), zero, zero)

    def adaptive(self, stats: ZScoreStats) -> jax.Array:
        std = jnp.sqrt(jnp.maximum(stats.var, 0.0))
        return stats.mean + jnp.asarray(self.z, NORM_DTYPE) * std

    def update(self, stats: ZScoreStats, norm: jax.Array, gamma: jax.Array) -> Any:
        n = norm.astype(NORM_DTYPE)
        count = stats.seen + 1
        # Warm-up: the plain mean and (population) variance of the norms so
        # far, by Welford's update.
        w_mean = stats.mean + (n - stats.mean) / count.astype(NORM_DTYPE)
        w_m2 = stats.var * stats.seen.astype(NORM_DTYPE) + (n - stats.mean) * (
            n - w_mean
        )
        w_var = w_m2 / count.astype(NORM_DTYPE)
        # After it: moving averages of the norm as clipped (ZClip), so that a
        # spike does not inflate the threshold it is clipped at.
        a = jnp.asarray(self.decay, NORM_DTYPE)
        c = jnp.minimum(n, gamma)
        e_mean = a * stats.mean + (1 - a) * c
        e_var = a * stats.var + (1 - a) * (c - e_mean) ** 2
        warm = self._in_warmup(stats.seen)
        return ZScoreStats(
            count,
            jnp.where(warm, w_mean, e_mean),
            jnp.where(warm, w_var, e_var),
        )


@dataclasses.dataclass(frozen=True)
class _Percentile(AdaptiveGamma):
    q: float
    window: int

    def init(self) -> PercentileStats:
        return PercentileStats(
            jnp.zeros([], jnp.int32), jnp.full([self.window], jnp.nan, NORM_DTYPE)
        )

    def adaptive(self, stats: PercentileStats) -> jax.Array:
        return jnp.nanpercentile(stats.history, self.q).astype(NORM_DTYPE)

    def update(self, stats: PercentileStats, norm: jax.Array, gamma: jax.Array) -> Any:
        slot = stats.seen % self.window
        history = stats.history.at[slot].set(norm.astype(NORM_DTYPE))
        return PercentileStats(stats.seen + 1, history)


def zscore_gamma(
    z: float = 2.5, decay: float = 0.97, *, warmup: int = 25, initial: float = math.inf
) -> AdaptiveGamma:
    r"""A threshold ``z`` standard deviations above the norm's moving mean.

    ZClip's rule (Kumar et al., 2025): after ``warmup`` steps, whose norms
    give the plain mean :math:`\mu` and variance :math:`\sigma^2` to start
    from,

    .. math::

      \gamma_t = \mu_{t-1} + z\,\sigma_{t-1}, \qquad
      \mu_t = \alpha\mu_{t-1} + (1-\alpha)\,c_t, \qquad
      \sigma^2_t = \alpha\sigma^2_{t-1} + (1-\alpha)(c_t - \mu_t)^2,

    with :math:`c_t = \min(\|g_t\|, \gamma_t)` the norm as clipped, so a
    spike does not raise the threshold it is clipped at, and :math:`\alpha`
    the ``decay``. During the warm-up the threshold is ``initial``.

    Args:
      z: how many standard deviations above the mean the threshold sits, > 0.
      decay: the moving averages' :math:`\alpha`, in [0, 1).
      warmup: steps (with a finite gradient) before the threshold adapts,
        >= 1.
      initial: the threshold during the warm-up, > 0 (``inf``: no clipping).

    Returns:
      An :class:`AdaptiveGamma` to pass as ``gamma``.

    Example:
      >>> import jax.numpy as jnp
      >>> import rgclip_optax as rgc
      >>> tx = rgc.delta_gclip(0.1, gamma=rgc.zscore_gamma(warmup=2), delta=0.1)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> for norm in (3.0, 5.0, 100.0):
      ...     _, state = tx.update(jnp.array([norm, 0.0]), state, params)
      ...     print(float(rgc.read_clip_state(state).threshold))
      inf
      inf
      6.5

    References:
      Kumar, Owen, Ashraf, Ferrante, `ZClip: Adaptive Spike Mitigation for
      LLM Pre-Training <https://arxiv.org/abs/2504.02507>`_, 2025.
    """
    _validation.check_positive("z", z)
    _validation.check_interval("decay", decay, 0.0, 1.0, high_closed=False)
    _check(warmup, initial)
    return _ZScore(
        warmup=warmup, initial=float(initial), z=float(z), decay=float(decay)
    )


def percentile_gamma(
    q: float = 10.0, *, window: int = 1000, warmup: int = 25, initial: float = math.inf
) -> AdaptiveGamma:
    r"""A threshold at the ``q``-th percentile of the last ``window`` norms.

    AutoClip's rule (Seetharaman et al., 2020), over a window of the most
    recent norms (a fixed-size buffer in the state) instead of the whole
    history: after ``warmup`` steps,
    :math:`\gamma_t = \operatorname{percentile}_q(\|g_{t-W}\|, \dots,
    \|g_{t-1}\|)`, with the raw norms recorded. During the warm-up the
    threshold is ``initial``.

    Args:
      q: the percentile, in (0, 100].
      window: how many recent norms are kept, >= 1.
      warmup: steps (with a finite gradient) before the threshold adapts,
        >= 1.
      initial: the threshold during the warm-up, > 0 (``inf``: no clipping).

    Returns:
      An :class:`AdaptiveGamma` to pass as ``gamma``.

    Example:
      >>> import jax.numpy as jnp
      >>> import rgclip_optax as rgc
      >>> tx = rgc.delta_gclip(
      ...     0.1, gamma=rgc.percentile_gamma(50, window=4, warmup=3), delta=0.1)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> for norm in (1.0, 2.0, 3.0, 40.0):
      ...     _, state = tx.update(jnp.array([norm, 0.0]), state, params)
      >>> float(rgc.read_clip_state(state).threshold)  # the median of 1, 2, 3
      2.0

    References:
      Seetharaman, Wichern, Pardo, Le Roux, `AutoClip: Adaptive Gradient
      Clipping for Source Separation Networks
      <https://arxiv.org/abs/2007.14469>`_, MLSP 2020.
    """
    value = _validation.concrete_float("q", q)
    if value is None or not 0 < value <= 100:
        raise ValueError(f"q must be in (0, 100], got q={q!r}.")
    _validation.check_int("window", window, 1)
    _check(warmup, initial)
    return _Percentile(warmup=warmup, initial=float(initial), q=float(q), window=window)

"""δ-regularized gradient clipping (δ-GClip) for Optax.

Where to find things, in the order a step runs:

* the rule, :func:`scale_by_delta_gclip`, as a few small steps:
  ``_delta_gclip.py``; its factor and regimes (:func:`delta_gclip_scale`,
  :func:`delta_gclip_regime`): ``_factor.py``; its state
  (:class:`DeltaGClipState`) and finding it in any optimizer state
  (:func:`read_clip_state`): ``_state.py``;
* the norm (:func:`global_norm`) and its one derivative: ``_norm.py``; the
  sums of squares every backend shares: ``_sums.py``; the forms XLA:CPU and
  XLA:GPU are given instead, each workaround with its measurement:
  ``_xla_cpu.py``, ``_xla_gpu.py``; which one is traced
  (:func:`target_platform`): ``_platform.py``;
* a skipped step's zero updates (bit masks on XLA:CPU, ``select_n``
  elsewhere), with their derivative: ``_selects.py``;
* thresholds that adapt to the norm's history (:func:`zscore_gamma`,
  :func:`percentile_gamma`): ``_adaptive.py``;
* the whole-step skip and single rounding around a chain
  (:func:`skip_and_round`): ``_skip_and_round.py``; its optional spike test:
  ``_spikes.py``;
* the optimizers, chains of the above (:func:`delta_gclip`, :func:`gclip`):
  ``_alias.py``;
* hyperparameter and gradient-tree checks: ``_validation.py``.
"""

from rgclip_optax._adaptive import (
    AdaptiveGamma,
    PercentileStats,
    ZScoreStats,
    percentile_gamma,
    zscore_gamma,
)
from rgclip_optax._alias import delta_gclip, gclip
from rgclip_optax._delta_gclip import scale_by_delta_gclip
from rgclip_optax._factor import delta_gclip_regime, delta_gclip_scale
from rgclip_optax._norm import global_norm
from rgclip_optax._platform import target_platform
from rgclip_optax._skip_and_round import SkipAndRoundState, skip_and_round
from rgclip_optax._spikes import SpikeState
from rgclip_optax._state import DeltaGClipState, read_clip_state

__version__ = "0.1.0"

__all__ = [
    "AdaptiveGamma",
    "DeltaGClipState",
    "PercentileStats",
    "SkipAndRoundState",
    "SpikeState",
    "ZScoreStats",
    "delta_gclip",
    "delta_gclip_regime",
    "delta_gclip_scale",
    "gclip",
    "global_norm",
    "percentile_gamma",
    "read_clip_state",
    "scale_by_delta_gclip",
    "skip_and_round",
    "target_platform",
    "zscore_gamma",
]

"""δ-regularized gradient clipping (δ-GClip) for Optax.

Where to find things:

* the rule and its state: ``_delta_gclip.py`` (:func:`scale_by_delta_gclip`,
  :class:`DeltaGClipState`);
* the norm: ``_norm.py`` (:func:`global_norm`), and the form XLA:CPU is
  given instead: ``_xla_cpu.py``;
* the whole-step skip and single rounding around a chain:
  ``_skip_and_round.py`` (:func:`skip_and_round`);
* the optimizers, chains of the above: ``_alias.py`` (:func:`delta_gclip`,
  :func:`gclip`);
* hyperparameter and gradient-tree checks: ``_validation.py``;
* the bit-mask selects of skipped steps: ``_select.py``;
* finding the rule's state in any optimizer state, and reading it as arrays
  for logging: ``_state.py`` (:func:`read_clip_state`).
"""

from rgclip_optax._alias import delta_gclip, gclip
from rgclip_optax._delta_gclip import (
    DeltaGClipState,
    delta_gclip_regime,
    delta_gclip_scale,
    scale_by_delta_gclip,
)
from rgclip_optax._norm import global_norm
from rgclip_optax._skip_and_round import skip_and_round
from rgclip_optax._state import read_clip_state

__version__ = "0.1.0"

__all__ = [
    "DeltaGClipState",
    "delta_gclip",
    "delta_gclip_regime",
    "delta_gclip_scale",
    "gclip",
    "global_norm",
    "read_clip_state",
    "scale_by_delta_gclip",
    "skip_and_round",
]

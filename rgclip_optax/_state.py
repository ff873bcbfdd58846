"""The rule's state, :class:`DeltaGClipState`, and finding it in any optimizer state.

The rule's state is found by its type, not by a position or a field name: in a
chain, under :func:`optax.inject_hyperparams` or :class:`optax.MultiSteps`, in
a Flax NNX optimizer (whose state leaves are ``nnx.Variable``\\ s) or a Linen
``TrainState``. ``optax.tree.get(state, "scale")`` finds a field by name,
which also matches a LayerNorm's ``scale`` parameter in Adam's moments.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


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
      skipped: bool scalar, whether the last step was skipped. Wrappers such
        as :func:`skip_and_round` hold the rest of the state on it: read from
        the new state, it costs no copy of the carried count in a compiled
        training loop, as comparing the old and new counts did.
      threshold: float32 scalar, the clipping threshold ``gamma`` used at the
        last step: an adaptive one's (its initial value before the first
        step), a traced one's (under :func:`optax.inject_hyperparams`), or a
        fixed one as ``init`` wrote it, carried unchanged.
      threshold_stats: an adaptive threshold's running statistics
        (:class:`ZScoreStats` or :class:`PercentileStats`), or ``()``.
    """

    grad_norm: jax.Array
    scale: jax.Array
    nonfinite_count: jax.Array
    skipped: jax.Array
    threshold: jax.Array
    threshold_stats: Any = ()


def is_rule_state(x: Any) -> bool:
    return isinstance(x, DeltaGClipState)


def find_rule_state(state: Any, who: str) -> DeltaGClipState:
    """The one :class:`DeltaGClipState` inside ``state``, found by type.

    Raises:
      ValueError: naming ``who`` needs it, if ``state`` holds none or several.
    """
    found = [
        x for x in jax.tree.leaves(state, is_leaf=is_rule_state) if is_rule_state(x)
    ]
    if len(found) != 1:
        raise ValueError(
            f"{who} needs an optimizer state with exactly one DeltaGClipState "
            "(one rgclip_optax.scale_by_delta_gclip rule); this one holds "
            f"{len(found)}."
        )
    return found[0]


def _is_variable(x: Any) -> bool:
    """A box around an array, such as a Flax ``nnx.Variable`` (duck-typed, so
    that Flax stays optional)."""
    return not isinstance(x, jax.Array) and (
        hasattr(x, "get_value") or hasattr(x, "value")
    )


def _unboxed(x: Any) -> jax.Array:
    if _is_variable(x):
        # Flax >= 0.12 deprecates .value in favour of get_value().
        get = getattr(x, "get_value", None)
        x = get() if get is not None else x.value
    return jnp.asarray(x)


def read_clip_state(opt_state: Any) -> DeltaGClipState:
    """The rule's ``grad_norm``, ``scale``, ``nonfinite_count`` and ``skipped``
    as arrays.

    Finds the one :class:`DeltaGClipState` inside any optimizer state, by its
    type, and returns it with plain arrays in its fields: from an Optax state
    (a chain, :func:`optax.inject_hyperparams`, :class:`optax.MultiSteps`), a
    Flax Linen ``TrainState.opt_state`` or a Flax NNX ``Optimizer.opt_state``,
    whose leaves are ``nnx.Variable`` boxes. Returning a box from a jitted
    NNX step hands back the optimizer's live variable, so a log of several
    steps would show the last value several times; the arrays returned here
    are each step's own values.

    .. math::

      \\text{opt\\_state} \\mapsto (\\|g_t\\|,\\ s_t,\\ n_t)

    with :math:`\\|g_t\\|` the last step's gradient norm, :math:`s_t` its
    factor (``h = learning_rate * s``) and :math:`n_t` the number of skipped
    steps so far.

    Args:
      opt_state: any optimizer state holding exactly one
        :class:`DeltaGClipState`.

    Returns:
      A :class:`DeltaGClipState` of arrays (with ``norm="per_tensor"``,
      ``grad_norm`` and ``scale`` are pytrees of float32 scalars).

    Raises:
      ValueError: if ``opt_state`` holds no :class:`DeltaGClipState`, or more
        than one.

    Example:
      >>> import jax.numpy as jnp
      >>> import rgclip_optax as rgc
      >>> tx = rgc.delta_gclip(0.1, gamma=1.0, delta=0.1)
      >>> params = jnp.zeros(2)
      >>> _, state = tx.update(jnp.array([30.0, 40.0]), tx.init(params), params)
      >>> log = rgc.read_clip_state(state)
      >>> float(log.grad_norm), round(float(log.scale), 6), int(log.nonfinite_count)
      (50.0, 0.1, 0)
      >>> bool(log.skipped)
      False
    """
    found = find_rule_state(opt_state, "read_clip_state")
    return DeltaGClipState(
        *(jax.tree.map(_unboxed, field, is_leaf=_is_variable) for field in found)
    )

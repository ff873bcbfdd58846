"""Finding the rule's :class:`DeltaGClipState` inside any optimizer state.

The rule's state is found by its type, not by a position or a field name: in a
chain, under :func:`optax.inject_hyperparams` or :class:`optax.MultiSteps`, in
a Flax NNX optimizer (whose state leaves are ``nnx.Variable``\\ s) or a Linen
``TrainState``. ``optax.tree.get(state, "scale")`` finds a field by name,
which also matches a LayerNorm's ``scale`` parameter in Adam's moments.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rgclip_optax._delta_gclip import DeltaGClipState


def is_rule_state(x: Any) -> bool:
    return isinstance(x, DeltaGClipState)


def rule_states(state: Any) -> list[DeltaGClipState]:
    """Every :class:`DeltaGClipState` inside ``state``, in tree order."""
    return [
        x for x in jax.tree.leaves(state, is_leaf=is_rule_state) if is_rule_state(x)
    ]


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
    """The rule's ``grad_norm``, ``scale`` and ``nonfinite_count`` as arrays.

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
    """
    found = rule_states(opt_state)
    if len(found) != 1:
        raise ValueError(
            "read_clip_state needs an optimizer state with exactly one "
            f"DeltaGClipState (one rgclip_optax rule); this one holds {len(found)}."
        )
    return DeltaGClipState(
        *(jax.tree.map(_unboxed, field, is_leaf=_is_variable) for field in found[0])
    )

"""Checks of hyperparameters at construction time, and of gradient trees.

Only concrete values are checked. A traced value (for example a
hyperparameter injected by :func:`optax.inject_hyperparams` and read under
:func:`jax.jit`) cannot be inspected without a host round-trip, so it passes
through unchecked and never triggers a ``TracerBoolConversionError``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_float(name: str, value: Any) -> float | None:
    """Returns ``value`` as a Python float, or ``None`` if it is traced.

    Raises:
      TypeError: if ``value`` is neither a real number nor a scalar array.
      ValueError: if ``value`` is an array with more than one element.
    """
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {name}={value!r} (a bool).")
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        if np.ndim(value) != 0:
            raise ValueError(
                f"{name} must be a scalar, got an array of shape {np.shape(value)}."
            )
        if not np.issubdtype(np.asarray(value).dtype, np.number) or np.iscomplexobj(
            value
        ):
            raise TypeError(
                f"{name} must be a real number, got an array of dtype "
                f"{np.asarray(value).dtype}."
            )
        return float(value)
    raise TypeError(
        f"{name} must be a real number or a scalar array, got "
        f"{name}={value!r} of type {type(value).__name__}."
    )


def check_positive(name: str, value: Any, *, allow_inf: bool = False) -> None:
    """Raises ``ValueError`` unless ``value > 0`` (and finite, unless allowed)."""
    v = concrete_float(name, value)
    if v is None:
        return
    upper = "inf]" if allow_inf else "inf)"
    if not v > 0 or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{name} must be in (0, {upper}, got {name}={v!r}.")


def check_interval(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    high_closed: bool = True,
) -> None:
    """Raises ``ValueError`` unless ``low <= value <= high`` (or ``< high``)."""
    v = concrete_float(name, value)
    if v is None:
        return
    ok = low <= v <= high if high_closed else low <= v < high
    if not ok:
        right = "]" if high_closed else ")"
        raise ValueError(
            f"{name} must be in [{low:g}, {high:g}{right}, got {name}={v!r}."
        )


def check_int(name: str, value: Any, low: int) -> None:
    """Raises ``ValueError`` unless ``value`` is an int (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {name}={value!r}.")


def check_learning_rate(value: Any) -> None:
    """A learning rate is a finite number > 0, or a schedule (not checked)."""
    if callable(value):
        return
    check_positive("learning_rate", value)


def check_bool(name: str, value: Any) -> None:
    """Static switches must be Python bools (or traced booleans)."""
    if isinstance(value, jax.core.Tracer):
        return
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {name}={value!r}.")


def inexact_leaves(tree: Any, *, what: str = "gradient") -> list[jax.Array]:
    """Returns the leaves of ``tree``, raising ``TypeError`` for non-float ones.

    ``None`` leaves (masked parameters) are skipped, as everywhere in JAX.

    Raises:
      TypeError: naming the path of the first leaf whose dtype is not a
        floating or complex type (integers, booleans, ``float0``).
    """
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
    leaves = []
    for path, leaf in with_path:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            where = jax.tree_util.keystr(path) or "<root>"
            shown = dtype if dtype is not None else type(leaf).__name__
            raise TypeError(
                f"{what} leaf at {where} has dtype {shown}; δ-GClip needs floating "
                "point (or complex) leaves. Take gradients only with respect to "
                "floating-point parameters, or mask the others out with "
                "optax.masked / None leaves (with Equinox, filter the model "
                "with eqx.is_inexact_array)."
            )
        leaves.append(leaf)
    return leaves


def _is_concrete_bool(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return True
    if isinstance(value, (np.ndarray, jax.Array)) and not isinstance(
        value, jax.core.Tracer
    ):
        return value.shape == () and value.dtype == np.bool_
    return False


def bool_flags(name: str, spec: Any, tree: Any, what: str) -> list[bool]:
    """One bool per leaf of ``tree`` (``None`` leaves included, as False).

    ``spec`` is ``None`` (all False), a pytree of bools with ``tree``'s
    structure, or a callable taking ``tree`` and returning one; ``name`` and
    ``what`` (which tree that is) go into the error.

    Raises:
      ValueError: if the flags do not match ``tree``'s leaves one to one.
      TypeError: if a flag is not a bool.
    """
    n_leaves = len(jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is None)[0])
    if spec is None:
        return [False] * n_leaves
    flags_tree = spec(tree) if callable(spec) else spec
    flags = jax.tree_util.tree_flatten(flags_tree, is_leaf=lambda x: x is None)[0]
    if len(flags) != n_leaves:
        raise ValueError(
            f"{name} must be a pytree of bools with the {what}'s structure "
            f"(or a callable returning one): got {len(flags)} flags for "
            f"{n_leaves} leaves."
        )
    for f in flags:
        if f is not None and not _is_concrete_bool(f):
            raise TypeError(
                f"{name} must hold Python bools (one per leaf of the {what}), "
                f"got a leaf {f!r} of type {type(f).__name__}."
            )
    return [bool(f) if f is not None else False for f in flags]

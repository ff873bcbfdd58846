"""Every public factory with its main options, for the Optax-harness tests.

Each case is ``(id, factory, kwargs)``; ``factory(**kwargs)`` is a full
optimizer (the rule alone is chained with ``optax.sgd`` where a test needs an
optimizer, and wrapped on its own where it tests the rule). Shared by
tests/test_optax_harness.py and the 8-device cases in
tests/multidevice_cases.py.
"""

from collections.abc import Callable
from typing import Any

import jax
import optax

import rgclip_optax as rgc


def decayed_kernels(params: Any) -> Any:
    """The weight-decay mask of the cases: leaves of two or more dimensions."""
    return jax.tree.map(lambda x: x.ndim > 1, params)


def delta_gclip_in_front_of_adam(
    learning_rate: float, gamma: float, delta: float = 1e-3
) -> optax.GradientTransformationExtraArgs:
    """The documented chain of public parts: the rule in front of Adam."""
    return rgc.skip_and_round(
        optax.chain(
            rgc.scale_by_delta_gclip(gamma, delta, wide_updates=True),
            optax.scale_by_adam(),
            optax.scale_by_learning_rate(learning_rate),
        )
    )


def rule_then_sgd(
    gamma: float, delta: float = 1e-3, learning_rate: float = 0.1, **kw: Any
) -> optax.GradientTransformation:
    """The rule alone in a plain Optax chain."""
    return optax.chain(
        rgc.scale_by_delta_gclip(gamma, delta, **kw), optax.sgd(learning_rate)
    )


Case = tuple[str, Callable[..., optax.GradientTransformation], dict[str, Any]]

# Optimizers: learning rates and thresholds that solve the parabola and the
# Rosenbrock function of the harness (|g| up to ~20 at the start).
OPTIMIZERS: list[Case] = [
    (
        "delta_gclip",
        rgc.delta_gclip,
        {"learning_rate": 1e-3, "gamma": 1.0, "delta": 0.1},
    ),
    (
        "delta_gclip_momentum",
        rgc.delta_gclip,
        {"learning_rate": 1e-3, "gamma": 1.0, "delta": 0.1, "momentum": 0.9},
    ),
    (
        "delta_gclip_nesterov",
        rgc.delta_gclip,
        {
            "learning_rate": 1e-3,
            "gamma": 1.0,
            "delta": 0.1,
            "momentum": 0.9,
            "nesterov": True,
        },
    ),
    (
        "delta_gclip_per_tensor",
        rgc.delta_gclip,
        {"learning_rate": 1e-3, "gamma": 1.0, "delta": 0.1, "norm": "per_tensor"},
    ),
    (
        "delta_gclip_masked_decay",
        rgc.delta_gclip,
        {
            "learning_rate": 1e-3,
            "gamma": 1.0,
            "delta": 0.1,
            "weight_decay": 1e-6,
            "mask": decayed_kernels,
        },
    ),
    (
        "delta_gclip_no_skip",
        rgc.delta_gclip,
        {"learning_rate": 1e-3, "gamma": 1.0, "delta": 0.1, "skip_nonfinite": False},
    ),
    ("gclip", rgc.gclip, {"learning_rate": 1e-3, "gamma": 1.0, "momentum": 0.9}),
    (
        "rule_then_sgd",
        rule_then_sgd,
        {"gamma": 1.0, "delta": 0.1, "learning_rate": 1e-3},
    ),
    (
        "in_front_of_adam",
        delta_gclip_in_front_of_adam,
        {"learning_rate": 3e-2, "gamma": 1.0, "delta": 0.1},
    ),
    (
        "delta_gclip_zscore_gamma",
        rgc.delta_gclip,
        {
            "learning_rate": 1e-3,
            "gamma": rgc.zscore_gamma(warmup=2, initial=1.0),
            "delta": 0.1,
            "momentum": 0.9,
        },
    ),
    (
        "delta_gclip_percentile_gamma",
        rgc.delta_gclip,
        {
            "learning_rate": 1e-3,
            "gamma": rgc.percentile_gamma(50, window=8, warmup=2, initial=1.0),
            "delta": 0.1,
        },
    ),
]

# The public factories themselves, for inject_hyperparams (whose arguments
# it traces): each with its defaults and with its main options.
FACTORIES: list[Case] = [
    ("scale_by_delta_gclip", rgc.scale_by_delta_gclip, {"gamma": 1.0}),
    (
        "scale_by_delta_gclip_options",
        rgc.scale_by_delta_gclip,
        {"gamma": 1.0, "delta": 0.1, "norm": "per_tensor", "skip_nonfinite": False},
    ),
    ("delta_gclip", rgc.delta_gclip, {"learning_rate": 0.1, "gamma": 1.0}),
    (
        "delta_gclip_zscore_gamma",
        rgc.delta_gclip,
        {"learning_rate": 0.1, "gamma": rgc.zscore_gamma(warmup=2), "delta": 0.1},
    ),
    (
        "delta_gclip_momentum",
        rgc.delta_gclip,
        {"learning_rate": 0.1, "gamma": 1.0, "momentum": 0.9},
    ),
    (
        "delta_gclip_nesterov_per_tensor",
        rgc.delta_gclip,
        {
            "learning_rate": 0.1,
            "gamma": 1.0,
            "momentum": 0.9,
            "nesterov": True,
            "norm": "per_tensor",
        },
    ),
    (
        "delta_gclip_masked_decay",
        rgc.delta_gclip,
        {
            "learning_rate": 0.1,
            "gamma": 1.0,
            "weight_decay": 1e-2,
            "mask": decayed_kernels,
        },
    ),
    ("gclip", rgc.gclip, {"learning_rate": 0.1, "gamma": 1.0}),
    (
        "gclip_momentum",
        rgc.gclip,
        {"learning_rate": 0.1, "gamma": 1.0, "momentum": 0.5},
    ),
]


def needs_params(kwargs: dict[str, Any]) -> bool:
    """Whether a case's update needs params (it decays weights)."""
    return kwargs.get("weight_decay") is not None

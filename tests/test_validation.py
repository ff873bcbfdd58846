"""Bad input gets a clear error naming the parameter, its value and the range."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rgclip_optax as rgc

BAD_HYPERPARAMS = [
    (dict(gamma=0.0), r"gamma must be in \(0, inf\], got gamma=0.0"),
    (dict(gamma=-1.0), r"gamma must be in \(0, inf\], got gamma=-1.0"),
    (dict(gamma=float("nan")), r"gamma must be in \(0, inf\], got gamma=nan"),
    (dict(delta=-0.1), r"delta must be in \[0, 1\], got delta=-0.1"),
    (dict(delta=1.5), r"delta must be in \[0, 1\], got delta=1.5"),
    (
        dict(learning_rate=0.0),
        r"learning_rate must be in \(0, inf\), got learning_rate=0.0",
    ),
    (
        dict(learning_rate=-0.1),
        r"learning_rate must be in \(0, inf\), got learning_rate=-0.1",
    ),
    (dict(learning_rate=float("inf")), r"learning_rate must be in \(0, inf\), got "),
    (
        dict(weight_decay=-1e-4),
        r"weight_decay must be in \[0, inf\], got weight_decay=-0.0001",
    ),
    (dict(momentum=1.0), r"momentum must be in \[0, 1\), got momentum=1.0"),
    (dict(momentum=-0.5), r"momentum must be in \[0, 1\), got momentum=-0.5"),
]


@pytest.mark.parametrize("bad, message", BAD_HYPERPARAMS)
def test_delta_gclip_rejects_out_of_range_hyperparameters(bad, message):
    kwargs = dict(learning_rate=0.1, gamma=1.0, delta=0.01) | bad
    with pytest.raises(ValueError, match=message):
        rgc.delta_gclip(**kwargs)


@pytest.mark.parametrize(
    "bad, message", [b for b in BAD_HYPERPARAMS if "delta=" not in b[1]]
)
def test_gclip_rejects_out_of_range_hyperparameters(bad, message):
    with pytest.raises(ValueError, match=message):
        rgc.gclip(**(dict(learning_rate=0.1, gamma=1.0) | bad))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gamma=0.0), "gamma"),
        (dict(gamma=1.0, delta=2.0), "delta"),
        (dict(gamma=np.float32(-3.0)), r"gamma=-3.0"),
        (dict(gamma=jnp.array(-3.0)), "gamma"),
    ],
)
def test_scale_by_delta_gclip_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rgc.scale_by_delta_gclip(**kwargs)


def test_wrong_types_and_shapes():
    with pytest.raises(TypeError, match=r"gamma must be a real number.*str"):
        rgc.scale_by_delta_gclip("1.0")
    with pytest.raises(TypeError, match=r"gamma must be a real number.*bool"):
        rgc.scale_by_delta_gclip(True)
    with pytest.raises(ValueError, match=r"delta must be a scalar.*\(2,\)"):
        rgc.scale_by_delta_gclip(1.0, jnp.array([0.1, 0.2]))
    with pytest.raises(TypeError, match="skip_nonfinite must be a bool"):
        rgc.scale_by_delta_gclip(1.0, skip_nonfinite="yes")
    with pytest.raises(ValueError, match="nesterov=True needs momentum"):
        rgc.delta_gclip(0.1, 1.0, nesterov=True)


def test_schedules_are_accepted_unchecked():
    tx = rgc.delta_gclip(optax.constant_schedule(0.1), 1.0)
    assert tx.init(jnp.zeros(1)) is not None


def test_traced_hyperparameters_are_not_checked_and_do_not_raise():
    # Under jit the values are tracers: no TracerBoolConversionError.
    @jax.jit
    def f(gamma, delta, lr, wd, mom, g, p):
        tx = rgc.delta_gclip(lr, gamma, delta, weight_decay=wd, momentum=mom)
        return tx.update(g, tx.init(p), p)[0]

    out = f(1.0, 0.1, 0.5, 0.0, 0.9, jnp.array([30.0, 40.0]), jnp.zeros(2))
    np.testing.assert_allclose(out, [-1.5, -2.0], rtol=1e-6)


def test_inject_hyperparams_under_jit_with_momentum_and_weight_decay():
    tx = optax.inject_hyperparams(rgc.delta_gclip)(
        learning_rate=0.5, gamma=1.0, delta=0.1, weight_decay=0.0, momentum=0.9
    )
    p = jnp.zeros(2)
    u, _ = jax.jit(tx.update)(jnp.array([30.0, 40.0]), tx.init(p), p)
    np.testing.assert_allclose(u, [-1.5, -2.0], rtol=1e-6)


def test_inject_hyperparams_validates_concrete_initial_values():
    with pytest.raises(ValueError, match="gamma"):
        optax.inject_hyperparams(rgc.delta_gclip)(learning_rate=0.1, gamma=-1.0).init(
            jnp.zeros(1)
        )

"""delta_gclip / gclip as full optimizers: composition, schedules, skipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rgclip_optax as rgc
from tests import reference as ref


def quadratic_problem(scale=100.0):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.zeros(3)}
    x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 3)) * scale, jnp.float32)

    def loss(p):
        return jnp.mean(jnp.sum((x @ p["w"] + p["b"] - y) ** 2, axis=-1))

    return params, loss


def run(tx, params, loss, steps):
    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    s = tx.init(params)
    for _ in range(steps):
        params, s = step(params, s)
    return params, s


def test_jitted_train_steps_match_the_float64_reference_with_weight_decay():
    params, loss = quadratic_problem()
    lr, gamma, delta, wd = 0.05, 5.0, 0.01, 0.1
    tx = rgc.delta_gclip(lr, gamma, delta, weight_decay=wd)
    p_ref = jax.tree.map(ref.to_f64, params)
    p, s = params, tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    for _ in range(5):
        g = jax.grad(loss)(p)
        # The reference starts from the library's own params each step, so
        # float32 rounding does not accumulate differently on the two sides.
        p_ref, h = ref.sgd_step(p, g, lr, gamma, delta, wd)
        u, s = step(p, s, g)
        p = optax.apply_updates(p, u)
        np.testing.assert_allclose(float(optax.tree.get(s, "scale")) * lr, h, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref), strict=True):
            np.testing.assert_allclose(ref.to_f64(a), b, rtol=1e-5, atol=1e-6)


def test_weight_decay_is_scaled_by_h_not_by_lr_alone():
    # update = -h * (g + wd * w), with ||g|| from the raw gradient only.
    w = jnp.array([1.0, 2.0])
    g = jnp.array([300.0, 400.0])  # ||g|| = 500
    tx = rgc.delta_gclip(0.5, gamma=1.0, delta=0.01, weight_decay=0.1)
    u, s = tx.update(g, tx.init(w), w)
    h = 0.5 * 0.01  # gamma/||g|| = 0.002 < delta
    np.testing.assert_allclose(u, -h * (g + 0.1 * w), rtol=1e-6)
    assert float(optax.tree.get(s, "grad_norm")) == pytest.approx(500.0, rel=1e-6)


def test_weight_decay_needs_params():
    tx = rgc.delta_gclip(0.1, 1.0, weight_decay=0.1)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)))


def test_delta_gclip_step_equals_momentum_free_formula_in_all_regimes():
    for g_norm in [0.5, 3.0, 1000.0]:
        g = jnp.array([g_norm, 0.0])
        tx = rgc.delta_gclip(0.1, gamma=1.0, delta=0.01)
        u, _ = tx.update(g, tx.init(g))
        h = 0.1 * ref.scale(g_norm, 1.0, 0.01)
        np.testing.assert_allclose(u, -h * np.asarray(g), rtol=1e-6)


def test_gclip_equals_optax_clip_then_sgd():
    params, loss = quadratic_problem()
    ours, _ = run(rgc.gclip(0.05, 2.0), params, loss, 20)
    theirs, _ = run(
        optax.chain(optax.clip_by_global_norm(2.0), optax.sgd(0.05)), params, loss, 20
    )
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_matches_clip_then_optax_sgd_with_momentum(nesterov):
    params, loss = quadratic_problem()
    kw = dict(momentum=0.9, nesterov=nesterov)
    ours, _ = run(rgc.gclip(0.01, 2.0, **kw), params, loss, 15)
    theirs, _ = run(
        optax.chain(optax.clip_by_global_norm(2.0), optax.sgd(0.01, **kw)),
        params,
        loss,
        15,
    )
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chains_before_adam():
    params, loss = quadratic_problem()
    params, loss = quadratic_problem(scale=1.0)
    tx = optax.chain(rgc.scale_by_delta_gclip(1.0, 0.1), optax.adam(0.05))
    p, s = run(tx, params, loss, 100)
    assert float(loss(p)) < 0.5 * float(loss(params))
    assert float(optax.tree.get(s, "grad_norm")) > 0


def test_paper_piecewise_schedule_drops_lr_tenfold_at_epochs_100_and_150():
    steps_per_epoch = 2
    sched = optax.piecewise_constant_schedule(
        1.0, {100 * steps_per_epoch: 0.1, 150 * steps_per_epoch: 0.1}
    )
    tx = rgc.delta_gclip(sched, gamma=1e6, delta=0.5)  # gamma huge: h = lr
    g = jnp.array([1.0])
    s = tx.init(g)
    update = jax.jit(tx.update)
    seen = {}
    for t in range(160 * steps_per_epoch):
        u, s = update(g, s)
        seen[t] = -float(u[0])
    assert seen[0] == pytest.approx(1.0)
    assert seen[100 * steps_per_epoch - 1] == pytest.approx(1.0)
    assert seen[100 * steps_per_epoch] == pytest.approx(0.1)
    assert seen[150 * steps_per_epoch] == pytest.approx(0.01)


def test_inject_hyperparams_changes_take_effect_without_recompiling():
    tx = optax.inject_hyperparams(rgc.delta_gclip)(
        learning_rate=0.1, gamma=1.0, delta=0.01
    )
    g = jnp.array([300.0, 400.0])  # ||g|| = 500
    params = jnp.zeros(2)
    traces = []

    @jax.jit
    def step(g, s, p):
        traces.append(1)
        return tx.update(g, s, p)

    s = tx.init(params)
    u, s = step(g, s, params)
    np.testing.assert_allclose(u, -0.1 * 0.01 * g, rtol=1e-6)  # floor
    s.hyperparams["delta"] = jnp.asarray(0.5, jnp.float32)
    s.hyperparams["learning_rate"] = jnp.asarray(0.2, jnp.float32)
    u, s = step(g, s, params)
    np.testing.assert_allclose(u, -0.2 * 0.5 * g, rtol=1e-6)
    s.hyperparams["gamma"] = jnp.asarray(1000.0, jnp.float32)
    u, s = step(g, s, params)
    np.testing.assert_allclose(u, -0.2 * g, rtol=1e-6)
    assert len(traces) == 1


def test_inject_hyperparams_with_a_schedule_for_gamma():
    tx = optax.inject_hyperparams(rgc.delta_gclip)(
        learning_rate=1.0, gamma=optax.linear_schedule(1.0, 100.0, 1), delta=0.0
    )
    g = jnp.array([30.0, 40.0])
    s = tx.init(jnp.zeros(2))
    u0, s = jax.jit(tx.update)(g, s, jnp.zeros(2))
    u1, s = jax.jit(tx.update)(g, s, jnp.zeros(2))
    np.testing.assert_allclose(u0, -g / 50.0, rtol=1e-6)  # gamma = 1
    np.testing.assert_allclose(u1, -g, rtol=1e-6)  # gamma = 100 > ||g||


@pytest.mark.parametrize("alias", ["delta_gclip", "gclip"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_nonfinite_step_leaves_params_and_all_state_untouched(alias, nesterov):
    params, loss = quadratic_problem()
    sched = optax.exponential_decay(0.1, 1, 0.5)
    tx = getattr(rgc, alias)(
        sched, gamma=1.0, momentum=0.9, nesterov=nesterov, weight_decay=1e-3
    )
    p, s = run(tx, params, loss, 3)
    bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), jax.grad(loss)(p))
    u, s2 = jax.jit(tx.update)(bad, s, p)
    p2 = optax.apply_updates(p, u)
    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p), strict=True):
        np.testing.assert_array_equal(a, b)
    # Everything but the rule's own log is unchanged: momentum, schedule count.
    for a, b in zip(jax.tree.leaves(s2[1:]), jax.tree.leaves(s[1:]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(optax.tree.get(s2, "nonfinite_count")) == 1
    assert np.isnan(float(optax.tree.get(s2, "grad_norm")))
    # The next finite step continues exactly where the run was.
    p3, _ = jax.jit(
        lambda p, s: (optax.apply_updates(p, tx.update(jax.grad(loss)(p), s, p)[0]), 0)
    )(p2, s2)
    p3_ref, _ = jax.jit(
        lambda p, s: (optax.apply_updates(p, tx.update(jax.grad(loss)(p), s, p)[0]), 0)
    )(p, s)
    for a, b in zip(jax.tree.leaves(p3), jax.tree.leaves(p3_ref), strict=True):
        np.testing.assert_array_equal(a, b)


def test_skip_nonfinite_false_lets_nan_through():
    tx = rgc.delta_gclip(0.1, 1.0, skip_nonfinite=False)
    u, s = tx.update(jnp.array([jnp.nan, 1.0]), tx.init(jnp.zeros(2)))
    assert bool(jnp.all(jnp.isnan(u)))
    assert int(optax.tree.get(s, "nonfinite_count")) == 0


def test_mixed_dtype_params_under_inject_hyperparams_and_jit():
    params = {"w": jnp.ones((3,), jnp.bfloat16), "b": jnp.ones((2,), jnp.float32)}
    tx = optax.inject_hyperparams(rgc.delta_gclip)(
        learning_rate=0.1, gamma=1.0, delta=0.1, momentum=0.9
    )
    g = jax.tree.map(lambda x: 100 * x, params)
    s = tx.init(params)
    u, s = jax.jit(tx.update)(g, s, params)
    assert u["w"].dtype == jnp.bfloat16 and u["b"].dtype == jnp.float32
    new = optax.apply_updates(params, u)
    assert new["w"].dtype == jnp.bfloat16
    # The momentum buffer keeps its dtype, so the state is stable under jit.
    u, s2 = jax.jit(tx.update)(g, s, params)
    assert jax.tree.map(lambda a: a.dtype, s2) == jax.tree.map(lambda a: a.dtype, s)


def test_extra_args_pass_through_chains():
    tx = optax.chain(rgc.delta_gclip(0.1, 10.0), optax.identity())
    u, _ = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), value=jnp.array(1.0))
    np.testing.assert_allclose(u, -0.1 * np.ones(2), rtol=1e-6)


def _bf16_ulp(x: np.ndarray) -> np.ndarray:
    # bfloat16 keeps 8 significant bits: one unit in the last place of |x|.
    return np.exp2(np.floor(np.log2(np.abs(x))) - 7)


def test_bfloat16_update_is_rounded_once_after_the_learning_rate():
    # The rule hands float32 updates down the chain, so the bfloat16 update is
    # the exact -h*g rounded once (within half a unit in the last place). Chained
    # as scale_by_delta_gclip + optax.sgd, it is rounded after the rule and
    # again after a bfloat16-rounded learning rate, and is measurably worse.
    rng = np.random.default_rng(3)
    g = jnp.asarray(rng.normal(size=(4096,)) * 30.0, jnp.bfloat16)
    lr, gamma, delta = 0.3, 1.0, 1e-3  # 0.3 is not a bfloat16 number
    exact = -lr * ref.scale(ref.norm(g), gamma, delta) * ref.to_f64(g)

    tx = rgc.delta_gclip(lr, gamma, delta)
    u, _ = tx.update(g, tx.init(g))
    assert u.dtype == jnp.bfloat16
    err_ulps = np.abs(ref.to_f64(u) - exact) / _bf16_ulp(exact)
    assert err_ulps.max() <= 0.5 + 1e-3

    chained = optax.chain(rgc.scale_by_delta_gclip(gamma, delta), optax.sgd(lr))
    u2, _ = chained.update(g, chained.init(g))
    assert (np.abs(ref.to_f64(u2) - exact) / _bf16_ulp(exact)).max() > 0.5 + 1e-3


def test_complex_params_keep_their_imaginary_part_under_weight_decay():
    p = jnp.array([1 + 2j, 3 - 1j], jnp.complex64)
    g = p * 2
    tx = rgc.delta_gclip(0.1, gamma=1.0, delta=0.1, weight_decay=0.5)
    u, _ = tx.update(g, tx.init(p), p)
    h = 0.1 * ref.scale(float(np.sqrt(np.sum(np.abs(np.asarray(g)) ** 2))), 1.0, 0.1)
    expected = -h * (np.asarray(g, np.complex128) + 0.5 * np.asarray(p, np.complex128))
    assert u.dtype == jnp.complex64
    np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_float8_params_step_with_weight_decay_and_keep_their_dtype(dtype):
    p = jnp.asarray([1.0, -2.0, 0.5, 4.0], dtype)
    g = jnp.asarray([8.0, 8.0, -8.0, 0.0], dtype)
    tx = rgc.delta_gclip(0.5, gamma=1.0, delta=0.1, weight_decay=0.25)
    u, s = jax.jit(tx.update)(g, tx.init(p), p)
    assert u.dtype == dtype
    exact = (
        -0.5 * ref.scale(ref.norm(g), 1.0, 0.1) * (ref.to_f64(g) + 0.25 * ref.to_f64(p))
    )
    # Rounded once to the float8 format (3 or 2 mantissa bits).
    np.testing.assert_allclose(ref.to_f64(u), exact, rtol=0.25)
    assert float(optax.tree.get(s, "grad_norm")) == pytest.approx(ref.norm(g))

"""skip_and_round: whole-step skips and one rounding around any chain."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rgclip_optax as rgc
from tests import reference as ref


def _params():
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
    }


def _grads(seed, scale=50.0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(4, 3)) * scale, jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3,)) * scale, jnp.float32),
    }


def _nan_like(g):
    return jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), g)


def _public_chain(lr, gamma, delta, momentum=None, nesterov=False, wd=0.0):
    links = [rgc.scale_by_delta_gclip(gamma, delta, weight_decay=wd, wide_updates=True)]
    if momentum is not None:
        links.append(optax.trace(decay=momentum, nesterov=nesterov))
    links.append(optax.scale_by_learning_rate(lr))
    return rgc.skip_and_round(optax.chain(*links))


def _run(tx, params, grads_seq):
    step = jax.jit(tx.update)
    state = tx.init(params)
    out = []
    for g in grads_seq:
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
        out.append((params, state))
    return out


@pytest.mark.parametrize(
    "momentum,nesterov", [(None, False), (0.9, False), (0.9, True)]
)
def test_delta_gclip_is_the_chain_of_public_parts(momentum, nesterov):
    # With momentum, delta_gclip holds the trace in the same pass (faster on
    # XLA:CPU); it must give the public chain's results, skipped step included,
    # up to XLA's rounding of a differently fused program (1 ulp seen).
    sched = optax.exponential_decay(0.1, 1, 0.7)
    params = _params()
    seq = [_grads(1), _grads(2), _nan_like(_grads(3)), _grads(4), _grads(5, 0.01)]
    kw = dict(momentum=momentum, nesterov=nesterov)
    ours = _run(rgc.delta_gclip(sched, 1.0, 0.05, weight_decay=1e-2, **kw), params, seq)
    chain = _run(_public_chain(sched, 1.0, 0.05, wd=1e-2, **kw), params, seq)
    for (p1, s1), (p2, s2) in zip(ours, chain, strict=True):
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # The skipped step (the third) left both runs' parameters where they were.
    for (p_before, _), (p_skip, _) in [(ours[1], ours[2]), (chain[1], chain[2])]:
        for a, b in zip(
            jax.tree.leaves(p_skip), jax.tree.leaves(p_before), strict=True
        ):
            np.testing.assert_array_equal(a, b)


def test_a_skipped_step_holds_adam_and_the_schedule_and_zeroes_the_updates():
    sched = optax.linear_schedule(1e-2, 1e-3, 10)
    tx = rgc.skip_and_round(
        optax.chain(
            rgc.scale_by_delta_gclip(1.0, 0.1, wide_updates=True),
            optax.scale_by_adam(),
            optax.scale_by_learning_rate(sched),
        )
    )
    params = _params()
    (p1, s1), (p2, s2), (p3, s3) = _run(
        tx, params, [_grads(1), _nan_like(_grads(2)), _grads(3)]
    )
    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1), strict=True):
        np.testing.assert_array_equal(a, b)
    # Adam's moments and count, and the schedule's count, are held.
    for a, b in zip(jax.tree.leaves(s2[1:]), jax.tree.leaves(s1[1:]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(optax.tree.get(s2, "nonfinite_count")) == 1
    # The next step is the step the run would have taken without the NaN one.
    (_, _), (p3_ref, s3_ref) = _run(tx, params, [_grads(1), _grads(3)])
    for a, b in zip(jax.tree.leaves(p3), jax.tree.leaves(p3_ref), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(s3[1].count) == int(s3_ref[1].count) == 2


def _rule_inside_cond(rule):
    """The rule's update run in a lax.cond branch: the state it returns is
    rebuilt from the branch's outputs (a side channel keyed on the state
    object, as this library once had, lost the skip there)."""

    def update(g, s, p=None):
        return jax.lax.cond(True, lambda: rule.update(g, s, p), lambda: (g, s))

    return optax.GradientTransformation(rule.init, update)


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "inside_cond"])
def test_a_rule_inside_a_conditional_holds_the_same_steps(wrapped):
    rule = rgc.scale_by_delta_gclip(1.0, 0.1, wide_updates=True)
    if wrapped:
        rule = _rule_inside_cond(rule)
    tx = rgc.skip_and_round(
        optax.chain(rule, optax.scale_by_adam(), optax.scale_by_learning_rate(1e-2))
    )
    grads = [_grads(1), _nan_like(_grads(2)), _grads(3)]
    got = _run(tx, _params(), grads)
    plain = rgc.scale_by_delta_gclip(1.0, 0.1, wide_updates=True)
    want = _run(
        rgc.skip_and_round(
            optax.chain(
                plain, optax.scale_by_adam(), optax.scale_by_learning_rate(1e-2)
            )
        ),
        _params(),
        grads,
    )
    for (p, s), (p_ref, s_ref) in zip(got, want, strict=True):
        for a, b in zip(
            jax.tree.leaves((p, s)), jax.tree.leaves((p_ref, s_ref)), strict=True
        ):
            # A rule inside a conditional is fused differently: ulps apart.
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
    (_, s1), (_, s2), _ = got
    assert int(s2[1].count) == int(s1[1].count) == 1  # Adam held on the NaN step
    assert int(optax.tree.get(s2, "nonfinite_count")) == 1


@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_the_state_says_which_step_was_skipped(skip_nonfinite):
    # The flag that skip_and_round holds the state on: set on the NaN step
    # only, never without skip_nonfinite; a bool scalar on every step.
    rule = rgc.scale_by_delta_gclip(1.0, 0.1, skip_nonfinite=skip_nonfinite)
    state = rule.init(_params())
    flags = []
    for g in (_grads(1), _nan_like(_grads(2)), _grads(3)):
        _, state = jax.jit(rule.update)(g, state)
        assert state.skipped.dtype == jnp.bool_ and state.skipped.shape == ()
        flags.append(bool(state.skipped))
    assert flags == [False, skip_nonfinite, False]
    assert int(state.nonfinite_count) == int(skip_nonfinite)


def test_without_the_wrapper_adam_would_count_the_skipped_step():
    # What the wrapper is for: the rule alone zeroes its output, but the links
    # after it still advance.
    chain = optax.chain(rgc.scale_by_delta_gclip(1.0, 0.1), optax.adam(1e-2))
    params = _params()
    _, (_, s2) = _run(chain, params, [_grads(1), _nan_like(_grads(2))])
    assert int(s2[1][0].count) == 2


def test_the_rule_state_is_found_by_type_anywhere_in_the_chain():
    # The rule second in the chain, and nested inside inject_hyperparams.
    inner = optax.chain(
        optax.identity(),
        optax.inject_hyperparams(rgc.scale_by_delta_gclip)(
            gamma=1.0, delta=0.1, wide_updates=True
        ),
        optax.trace(decay=0.9),
        optax.scale_by_learning_rate(0.1),
    )
    tx = rgc.skip_and_round(inner)
    params = _params()
    (p1, s1), (p2, s2) = _run(tx, params, [_grads(1), _nan_like(_grads(2))])
    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(s2[2].trace["w"], s1[2].trace["w"])
    assert int(optax.tree.get(s2, "nonfinite_count")) == 1


@pytest.mark.parametrize("rules", [0, 2])
def test_a_chain_without_exactly_one_rule_is_refused_at_init(rules):
    links = [rgc.scale_by_delta_gclip(1.0, 0.1) for _ in range(rules)]
    tx = rgc.skip_and_round(optax.chain(*links, optax.sgd(0.1)))
    with pytest.raises(ValueError, match=rf"exactly one.*holds {rules}"):
        tx.init(_params())


def test_init_does_no_computation():
    tx = _public_chain(0.1, 1.0, 0.1, momentum=0.9)
    shapes = jax.eval_shape(tx.init, jax.eval_shape(_params))
    assert shapes[1].trace["w"].shape == (4, 3)


def test_bfloat16_update_is_rounded_once_with_wide_updates():
    rng = np.random.default_rng(3)
    g = jnp.asarray(rng.normal(size=(4096,)) * 30.0, jnp.bfloat16)
    lr, gamma, delta = 0.3, 1.0, 1e-3  # 0.3 is not a bfloat16 number
    exact = -lr * ref.scale(ref.norm(g), gamma, delta) * ref.to_f64(g)
    tx = _public_chain(lr, gamma, delta)
    u, _ = tx.update(g, tx.init(g))
    assert u.dtype == jnp.bfloat16
    ulp = np.exp2(np.floor(np.log2(np.abs(exact))) - 7)
    assert (np.abs(ref.to_f64(u) - exact) / ulp).max() <= 0.5 + 1e-3


def test_state_dtypes_are_stable_under_inject_hyperparams():
    params = {"w": jnp.ones((3,), jnp.bfloat16), "b": jnp.ones((2,), jnp.float32)}

    def make(learning_rate, gamma):
        return _public_chain(learning_rate, gamma, 0.1, momentum=0.9)

    tx = optax.inject_hyperparams(make)(learning_rate=0.1, gamma=1.0)
    g = jax.tree.map(lambda x: 100 * x, params)
    s = tx.init(params)
    u, s2 = jax.jit(tx.update)(g, s, params)
    assert u["w"].dtype == jnp.bfloat16 and u["b"].dtype == jnp.float32
    assert jax.tree.map(lambda a: a.dtype, s2) == jax.tree.map(lambda a: a.dtype, s)


def test_a_rule_that_does_not_skip_lets_nan_through():
    tx = rgc.skip_and_round(
        optax.chain(rgc.scale_by_delta_gclip(1.0, skip_nonfinite=False), optax.sgd(1.0))
    )
    u, s = tx.update(jnp.array([jnp.nan, 1.0]), tx.init(jnp.zeros(2)))
    assert bool(jnp.all(jnp.isnan(u)))
    assert int(optax.tree.get(s, "nonfinite_count")) == 0


def test_wide_updates_hand_float32_on_and_must_be_a_bool():
    g = jnp.ones(3, jnp.bfloat16)
    rule = rgc.scale_by_delta_gclip(1.0, 0.1, wide_updates=True)
    u, _ = rule.update(g, rule.init(g))
    assert u.dtype == jnp.float32
    with pytest.raises(TypeError, match="wide_updates must be a bool, got"):
        rgc.scale_by_delta_gclip(1.0, wide_updates="yes")

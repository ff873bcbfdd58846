"""Gradient accumulation, optax wrappers, per-tensor norm, Flax NNX and Linen."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rgclip_optax as rgc
from tests import reference as ref


def problem(n=32):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32), "b": jnp.zeros(3)}
    x = jnp.asarray(rng.normal(size=(n, 6)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(n, 3)) * 50, jnp.float32)

    def loss(p, x, y):
        return jnp.mean(jnp.sum((x @ p["w"] + p["b"] - y) ** 2, -1))

    return params, x, y, loss


def test_multisteps_takes_the_norm_once_on_the_accumulated_gradient():
    params, x, y, loss = problem()
    k = 4
    big = rgc.delta_gclip(0.05, gamma=1.0, delta=0.05, momentum=0.9)
    acc = optax.MultiSteps(
        rgc.delta_gclip(0.05, gamma=1.0, delta=0.05, momentum=0.9), k
    )
    p_big, s_big = params, big.init(params)
    p_acc, s_acc = params, acc.init(params)
    for _ in range(3):
        u, s_big = big.update(jax.grad(loss)(p_big, x, y), s_big, p_big)
        p_big = optax.apply_updates(p_big, u)
        for xb, yb in zip(jnp.split(x, k), jnp.split(y, k), strict=True):
            u, s_acc = acc.update(jax.grad(loss)(p_acc, xb, yb), s_acc, p_acc)
            p_acc = optax.apply_updates(p_acc, u)
    for a, b in zip(jax.tree.leaves(p_acc), jax.tree.leaves(p_big), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        float(optax.tree.get(s_acc.inner_opt_state, "grad_norm")),
        float(optax.tree.get(s_big, "grad_norm")),
        rtol=1e-5,
    )


def test_apply_if_finite_wrapping_skips_and_counts():
    tx = optax.apply_if_finite(rgc.delta_gclip(0.1, 1.0, skip_nonfinite=False), 3)
    p = jnp.zeros(2)
    s = tx.init(p)
    u, s = tx.update(jnp.array([jnp.nan, 1.0]), s, p)
    assert bool(jnp.all(u == 0)) and int(s.notfinite_count) == 1
    u, s = tx.update(jnp.array([30.0, 40.0]), s, p)
    np.testing.assert_allclose(u, [-0.1 * 0.6, -0.1 * 0.8], rtol=1e-6)


def test_masked_uses_the_norm_of_the_subset_alone():
    g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([100.0])}
    tx = optax.masked(
        rgc.delta_gclip(1.0, gamma=1.0, delta=0.0), {"a": True, "b": False}
    )
    u, s = tx.update(g, tx.init(g), g)
    np.testing.assert_allclose(float(optax.tree.get(s, "grad_norm")), 5.0, rtol=1e-6)
    np.testing.assert_allclose(u["a"], [-0.6, -0.8], rtol=1e-6)
    np.testing.assert_allclose(u["b"], [100.0])  # untouched by the masked part


@pytest.mark.parametrize("api", ["multi_transform", "partition"])
def test_multi_transform_and_partition_clip_a_subset(api):
    g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([100.0])}
    labels = {"a": "clip", "b": "sgd"}
    txs = {"clip": rgc.delta_gclip(1.0, gamma=1.0, delta=0.0), "sgd": optax.sgd(1.0)}
    make = getattr(optax, api, None)
    if make is None:
        pytest.skip(f"optax.{api} is not in this optax version")
    tx = make(txs, labels)
    u, s = tx.update(g, tx.init(g), g)
    np.testing.assert_allclose(float(optax.tree.get(s, "grad_norm")), 5.0, rtol=1e-6)
    np.testing.assert_allclose(u["a"], [-0.6, -0.8], rtol=1e-6)
    np.testing.assert_allclose(u["b"], [-100.0])


def test_inject_hyperparams_with_a_schedule_for_delta():
    tx = optax.inject_hyperparams(rgc.delta_gclip)(
        learning_rate=1.0, gamma=1.0, delta=optax.linear_schedule(0.0, 1.0, 1)
    )
    g, p = jnp.array([300.0, 400.0]), jnp.zeros(2)
    s = tx.init(p)
    u0, s = jax.jit(tx.update)(g, s, p)
    u1, s = jax.jit(tx.update)(g, s, p)
    np.testing.assert_allclose(u0, -g / 500.0, rtol=1e-6)  # delta = 0: GClip
    np.testing.assert_allclose(u1, -g, rtol=1e-6)  # delta = 1: SGD


# ---- per-tensor variant ------------------------------------------------------


def test_per_tensor_uses_each_leafs_own_norm():
    g = {"small": jnp.array([0.3, 0.4]), "big": jnp.array([300.0, 400.0]), "none": None}
    tx = rgc.scale_by_delta_gclip(1.0, 0.01, norm="per_tensor")
    out, s = jax.jit(tx.update)(g, tx.init(g))
    np.testing.assert_allclose(out["small"], [0.3, 0.4], rtol=1e-6)  # ||.|| <= gamma
    np.testing.assert_allclose(out["big"], [3.0, 4.0], rtol=1e-6)  # floor: delta * g
    assert out["none"] is None
    assert float(s.grad_norm["big"]) == pytest.approx(500.0)
    assert float(s.scale["small"]) == 1.0 and float(s.scale["big"]) == pytest.approx(
        0.01
    )
    for k in ("small", "big"):
        np.testing.assert_allclose(
            float(s.scale[k]), ref.scale(ref.norm(g[k]), 1.0, 0.01), rtol=1e-6
        )


def test_per_tensor_numerics_nonfinite_and_dtypes():
    tx = rgc.delta_gclip(0.1, 1.0, 0.1, norm="per_tensor", momentum=0.9)
    p = {"a": jnp.ones(2, jnp.bfloat16), "b": jnp.ones(3, jnp.float16)}
    s = tx.init(p)
    g = {
        "a": jnp.full((2,), 300.0, jnp.bfloat16),
        "b": jnp.full((3,), 300.0, jnp.float16),
    }
    u, s = jax.jit(tx.update)(g, s, p)
    assert u["a"].dtype == jnp.bfloat16 and u["b"].dtype == jnp.float16
    np.testing.assert_allclose(
        float(optax.tree.get(s, "grad_norm")["b"]), 300 * np.sqrt(3), rtol=1e-6
    )
    bad = {"a": jnp.array([jnp.nan, 1.0], jnp.bfloat16), "b": g["b"]}
    u2, s2 = jax.jit(tx.update)(bad, s, p)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u2))
    assert int(optax.tree.get(s2, "nonfinite_count")) == 1
    for a, b in zip(jax.tree.leaves(s2[1:]), jax.tree.leaves(s[1:]), strict=True):
        np.testing.assert_array_equal(a, b)
    # init works on abstract params.
    shapes = jax.eval_shape(
        tx.init, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), p)
    )
    assert shapes[0].grad_norm["a"].shape == ()


def test_per_tensor_with_one_leaf_equals_global():
    g = jnp.array([30.0, 40.0])
    a, _ = rgc.gclip(0.5, 1.0, norm="per_tensor").update(g, rgc.gclip(0.5, 1.0).init(g))
    b, _ = rgc.gclip(0.5, 1.0).update(g, rgc.gclip(0.5, 1.0).init(g))
    np.testing.assert_array_equal(a, b)


def test_bad_norm_and_replicated_arguments():
    with pytest.raises(
        ValueError,
        match=r"norm must be one of \('global', 'per_tensor'\), got norm='layer'",
    ):
        rgc.delta_gclip(0.1, 1.0, norm="layer")
    with pytest.raises(ValueError, match="replicated only matters with axis_name"):
        rgc.scale_by_delta_gclip(1.0, replicated={"a": True})


# ---- Flax --------------------------------------------------------------------


def test_flax_nnx_optimizer_trains_and_logs():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(6, 32, rngs=rngs)
            self.l2 = nnx.Linear(32, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    _, x, y, _ = problem()
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, rgc.delta_gclip(0.2, gamma=1.0, delta=0.05), wrt=nnx.Param
    )

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(m):
            return jnp.mean(jnp.sum((m(x) - y) ** 2, -1))

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses, norms, scales = [], [], []
    for _ in range(50):
        losses.append(float(train_step(model, optimizer, x, y)))
        norms.append(float(optax.tree.get(optimizer.opt_state, "grad_norm")))
        scales.append(float(optax.tree.get(optimizer.opt_state, "scale")))
    assert losses[-1] < 0.5 * losses[0]
    assert norms[0] > 1.0 / 0.05 and scales[0] == pytest.approx(0.05)
    assert all(0.05 * (1 - 1e-6) <= s <= 1.0 for s in scales)


def test_flax_linen_train_state_apply_gradients():
    import flax.linen as nn
    from flax.training import train_state

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(jnp.tanh(nn.Dense(32)(x)))

    _, x, y, _ = problem()
    model = MLP()
    variables = model.init(jax.random.PRNGKey(0), x)
    state = train_state.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=rgc.delta_gclip(0.2, 1.0, 0.05),
    )

    @jax.jit
    def step(state):
        def loss_fn(p):
            return jnp.mean(jnp.sum((state.apply_fn({"params": p}, x) - y) ** 2, -1))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    losses = []
    for _ in range(50):
        state, loss = step(state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    assert float(optax.tree.get(state.opt_state, "grad_norm")) > 0
    assert int(state.step) == 50


def test_replicated_mask_with_the_wrong_structure_is_a_clear_error():
    with pytest.raises(ValueError, match="replicated must be a pytree of bools"):
        rgc.global_norm(
            {"a": jnp.ones(2), "b": jnp.ones(2)}, axis_name="x", replicated=[True]
        )


def test_per_example_clipping_recipe_matches_the_float64_reference():
    # The README's recipe: the rule vmapped over per-example gradients, then
    # averaged (δ-GClip per example, as in DP-SGD-style clipping).
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(16, 4)) * 10, jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)

    def loss(p, xi, yi):
        return jnp.sum((xi @ p["w"] - yi) ** 2)

    rule = rgc.scale_by_delta_gclip(gamma=1.0, delta=0.05)
    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)
    clipped = jax.vmap(lambda g: rule.update(g, rule.init(g))[0])(grads)
    mean = jax.jit(lambda c: jax.tree.map(lambda a: a.mean(0), c))(clipped)

    expected = np.zeros((4, 3))
    for i in range(16):
        gi = {"w": np.asarray(grads["w"][i], np.float64)}
        expected += ref.scale(ref.norm(gi), 1.0, 0.05) * gi["w"] / 16
    np.testing.assert_allclose(np.asarray(mean["w"]), expected, rtol=1e-5)

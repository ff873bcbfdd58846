"""The library in code we did not write: the documented Flax recipes run as
written for several steps, Equinox models with integer buffers, per-tensor
logs, and reading the rule's state out of any optimizer state."""

import re
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import rgclip_optax as rgc

ROOT = Path(__file__).resolve().parents[1]


def _code_block_after(text: str, marker: str) -> str:
    block = re.search(r"```python\n(.*?)```", text.split(marker, 1)[1], re.DOTALL)
    assert block is not None, marker
    return block.group(1)


def _norm64(tree) -> float:
    return float(
        np.sqrt(
            sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))
        )
    )


def test_readme_nnx_recipe_logs_each_steps_own_norm():
    readme = (ROOT / "README.md").read_text()
    namespace: dict = {}
    # As a reader runs them: the usage block, then the NNX one.
    exec(
        compile(_code_block_after(readme, "## Use it"), "README.md", "exec"), namespace
    )
    exec(
        compile(_code_block_after(readme, "With Flax NNX"), "README.md", "exec"),
        namespace,
    )
    model = namespace["model"]
    optimizer = namespace["optimizer"]
    train_step = namespace["train_step"]
    x = jnp.ones((8, 4))
    logged, expected = [], []
    for k in range(1, 6):
        y = jnp.full((8, 2), 30.0 * k)
        # The norm of this step's gradient, from a copy of the model.
        grads = nnx.grad(lambda m: ((m(x) - y) ** 2).mean())(nnx.clone(model))
        expected.append(_norm64(nnx.state(grads)))
        _, grad_norm, scale = train_step(model, optimizer, x, y)
        logged.append((grad_norm, scale))
    norms = [float(n) for n, _ in logged]
    np.testing.assert_allclose(norms, expected, rtol=1e-5)
    assert len(set(norms)) == 5  # not the last step's value five times
    assert all(isinstance(n, jax.Array) for n, _ in logged)
    np.testing.assert_allclose(
        [float(s) for _, s in logged], [max(1e-3, 1.0 / n) for n in expected], rtol=1e-5
    )


def test_docs_linen_recipe_logs_each_steps_own_norm():
    import flax.linen as nn
    from flax.training import train_state

    text = (ROOT / "docs" / "flax.md").read_text()
    model = nn.Dense(2)
    x = jnp.ones((8, 3))
    params = model.init(jax.random.key(0), x)

    def loss_fn(params, batch):
        x, y = batch
        return jnp.mean((model.apply(params, x) - y) ** 2)

    namespace = {"jax": jax, "optax": optax, "rgc": rgc, "model": model,
                 "params": params, "loss_fn": loss_fn}  # fmt: skip
    exec(compile(_code_block_after(text, "## Linen"), "flax.md", "exec"), namespace)
    assert isinstance(namespace["state"], train_state.TrainState)
    state, train_step = namespace["state"], namespace["train_step"]
    for k in range(1, 4):
        batch = (x, jnp.full((8, 2), 40.0 * k))
        expected = _norm64(jax.grad(loss_fn)(state.params, batch))
        state, grad_norm = train_step(state, batch)
        np.testing.assert_allclose(float(grad_norm), expected, rtol=1e-5)


def test_read_clip_state_finds_the_rule_anywhere():
    params = {"w": jnp.ones((2, 3)), "scale": jnp.ones(3)}  # a LayerNorm-like name
    grads = jax.tree.map(lambda p: 40.0 * p, params)
    norm = _norm64(grads)
    chains = {
        "delta_gclip": rgc.delta_gclip(0.1, 1.0, 0.1),
        "in_front_of_adam": rgc.skip_and_round(optax.chain(
            rgc.scale_by_delta_gclip(1.0, 0.1, wide_updates=True),
            optax.scale_by_adam(), optax.scale_by_learning_rate(1e-3))),
        "inject_hyperparams": optax.inject_hyperparams(rgc.delta_gclip)(0.1, 1.0, 0.1),
        "multisteps": optax.MultiSteps(rgc.delta_gclip(0.1, 1.0, 0.1), 1),
    }  # fmt: skip
    for name, tx in chains.items():
        _, state = jax.jit(tx.update)(grads, tx.init(params), params)
        log = rgc.read_clip_state(state)
        assert isinstance(log, rgc.DeltaGClipState), name
        np.testing.assert_allclose(float(log.grad_norm), norm, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(float(log.scale), 0.1, rtol=1e-6, err_msg=name)
        assert int(log.nonfinite_count) == 0
    # optax.tree.get by name is ambiguous here: Adam's moments have a "scale".
    adam = chains["in_front_of_adam"]
    _, state = adam.update(grads, adam.init(params), params)
    with pytest.raises(KeyError):
        optax.tree.get(state, "scale")


def test_read_clip_state_refuses_zero_or_two_rules():
    params = jnp.ones(3)
    with pytest.raises(ValueError, match="holds 0"):
        rgc.read_clip_state(optax.sgd(0.1).init(params))
    two = optax.chain(rgc.scale_by_delta_gclip(1.0), rgc.scale_by_delta_gclip(2.0))
    with pytest.raises(ValueError, match="holds 2"):
        rgc.read_clip_state(two.init(params))


def test_per_tensor_norms_give_per_tensor_regimes_and_factors():
    tx = rgc.delta_gclip(0.1, gamma=1.0, delta=0.1, norm="per_tensor")
    params = {"w": jnp.zeros(4), "b": jnp.zeros(2), "u": jnp.zeros(1)}
    grads = {"w": jnp.full(4, 50.0), "b": jnp.full(2, 2.0), "u": jnp.full(1, 0.5)}
    _, state = tx.update(grads, tx.init(params), params)
    norms = optax.tree.get(state, "grad_norm")  # as the user called it
    regimes = rgc.delta_gclip_regime(norms, 1.0, 0.1)
    assert jax.tree.structure(regimes) == jax.tree.structure(params)
    assert {k: int(v) for k, v in regimes.items()} == {"w": 2, "b": 1, "u": 0}
    factors = rgc.delta_gclip_scale(norms, 1.0, 0.1)
    np.testing.assert_allclose(
        [float(factors[k]) for k in "wbu"], [0.1, 1.0 / np.sqrt(8.0), 1.0], rtol=1e-6
    )
    # The state's own per-tensor scale agrees.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
        factors,
        rgc.read_clip_state(state).scale,
    )
    # Arrays (a log of global norms) are still classified elementwise.
    np.testing.assert_array_equal(
        rgc.delta_gclip_regime(np.array([0.5, 5.0, 50.0]), 1.0, 0.1), [0, 1, 2]
    )


class _Counted(eqx.Module):
    mlp: eqx.nn.MLP
    calls: jax.Array  # an integer buffer, as Equinox models carry

    def __call__(self, x):
        return jax.vmap(self.mlp)(x)


def _equinox_run(tx, param_filter, steps=4):
    model = _Counted(eqx.nn.MLP(3, 2, 8, 2, key=jax.random.key(0)), jnp.array(0))
    x, y = jnp.ones((8, 3)), jnp.full((8, 2), 50.0)
    state = tx.init(eqx.filter(model, param_filter))
    dynamic, static = eqx.partition(model, eqx.is_array)

    def step(carry, _):
        dynamic, state = carry
        model = eqx.combine(dynamic, static)
        loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)  # noqa: E731
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, state = tx.update(grads, state, eqx.filter(model, param_filter))
        model = eqx.apply_updates(model, updates)
        return (eqx.filter(model, eqx.is_array), state), loss

    # A scan carry: the state must keep one structure from step to step.
    run = jax.jit(lambda carry: jax.lax.scan(step, carry, None, length=steps))
    (dynamic, state), losses = run((dynamic, state))
    return eqx.combine(dynamic, static), state, losses


EQUINOX_OPTIMIZERS = {
    "issue_chain": lambda: rgc.skip_and_round(
        optax.chain(
            rgc.scale_by_delta_gclip(1.0, 0.1, wide_updates=True),
            optax.trace(0.9),
            optax.scale_by_learning_rate(0.01),
        )
    ),
    "delta_gclip_momentum": lambda: rgc.delta_gclip(0.01, 1.0, 0.1, momentum=0.9),
    "per_tensor": lambda: rgc.delta_gclip(0.01, 1.0, 0.1, norm="per_tensor"),
}
# Not Adam: optax.scale_by_adam itself fails on an integer parameter whose
# gradient is None (optax 0.2.8), with or without the rule in front of it.


@pytest.mark.parametrize("name", list(EQUINOX_OPTIMIZERS))
def test_equinox_integer_buffers_train_like_filtered_models(name):
    # eqx.is_array hands the integer buffer to init; its gradient is None.
    model, _, losses = _equinox_run(EQUINOX_OPTIMIZERS[name](), eqx.is_array)
    make = EQUINOX_OPTIMIZERS[name]
    ref_model, _, ref_losses = _equinox_run(make(), eqx.is_inexact_array)
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
        eqx.filter(model, eqx.is_inexact_array),
        eqx.filter(ref_model, eqx.is_inexact_array),
    )
    assert int(model.calls) == 0


def test_an_integer_gradient_leaf_is_refused_by_name():
    tx = rgc.delta_gclip(0.1, 1.0)
    grads = {"w": jnp.ones(2), "calls": jnp.array(3)}
    with pytest.raises(TypeError, match=r"\['calls'\].*int32.*eqx.is_inexact_array"):
        tx.update(grads, tx.init(grads))


def test_mask_without_weight_decay_is_refused():
    with pytest.raises(ValueError, match=r"mask.*weight_decay=None"):
        rgc.delta_gclip(0.1, 1.0, mask=lambda p: jax.tree.map(lambda x: True, p))

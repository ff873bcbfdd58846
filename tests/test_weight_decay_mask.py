"""weight_decay's mask: which parameters are decayed, as in optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rgclip_optax as rgc
from tests import reference as ref

PARAMS = {
    "dense": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.full((2,), 3.0)},
    "norm": {"scale": jnp.full((2,), 5.0)},
}
GRADS = jax.tree.map(lambda p: jnp.full(p.shape, 40.0), PARAMS)
MASK = {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False}}


def kernels_only(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


@pytest.mark.parametrize("mask", [MASK, kernels_only], ids=["pytree", "callable"])
def test_masked_leaves_are_not_decayed_against_float64(mask):
    lr, gamma, delta, wd = 0.5, 1.0, 0.01, 0.1
    tx = rgc.delta_gclip(lr, gamma, delta, weight_decay=wd, mask=mask)
    u, s = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    # The norm is that of the raw gradient, mask or not.
    norm = ref.norm(GRADS)
    assert float(optax.tree.get(s, "grad_norm")) == pytest.approx(norm, rel=1e-6)
    h = lr * ref.scale(norm, gamma, delta)
    flags = MASK
    for path, leaf in jax.tree_util.tree_flatten_with_path(u)[0]:
        keys = [k.key for k in path]
        g = ref.to_f64(GRADS[keys[0]][keys[1]])
        p = ref.to_f64(PARAMS[keys[0]][keys[1]])
        decayed = flags[keys[0]][keys[1]]
        expected = -h * (g + (wd * p if decayed else 0.0))
        np.testing.assert_allclose(ref.to_f64(leaf), expected, rtol=1e-6)


def test_at_delta_one_it_is_optax_add_decayed_weights_then_sgd():
    lr, wd = 0.05, 0.3
    ours = rgc.delta_gclip(lr, gamma=1.0, delta=1.0, weight_decay=wd, mask=MASK)
    theirs = optax.chain(optax.add_decayed_weights(wd, mask=MASK), optax.sgd(lr))
    u1, _ = ours.update(GRADS, ours.init(PARAMS), PARAMS)
    u2, _ = theirs.update(GRADS, theirs.init(PARAMS), PARAMS)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("factory", ["scale_by_delta_gclip", "gclip", "delta_gclip"])
def test_every_factory_takes_the_mask(factory):
    if factory == "scale_by_delta_gclip":
        tx = rgc.scale_by_delta_gclip(1.0, 1.0, weight_decay=0.5, mask=MASK)
    else:
        tx = getattr(rgc, factory)(1.0, gamma=1e9, weight_decay=0.5, mask=MASK)
    u, _ = jax.jit(tx.update)(GRADS, tx.init(PARAMS), PARAMS)
    sign = 1.0 if factory == "scale_by_delta_gclip" else -1.0
    np.testing.assert_allclose(u["dense"]["bias"], sign * 40.0)
    np.testing.assert_allclose(u["norm"]["scale"], sign * 40.0)
    np.testing.assert_allclose(u["dense"]["kernel"], sign * 41.0)


def test_mask_with_momentum_matches_the_masked_optax_chain():
    lr, wd, mu = 0.1, 0.2, 0.9
    ours = rgc.delta_gclip(
        lr, gamma=1e9, delta=1.0, weight_decay=wd, mask=kernels_only, momentum=mu
    )
    theirs = optax.chain(
        optax.add_decayed_weights(wd, mask=kernels_only), optax.sgd(lr, momentum=mu)
    )
    s1, s2, p1, p2 = ours.init(PARAMS), theirs.init(PARAMS), PARAMS, PARAMS
    for _ in range(3):
        u1, s1 = ours.update(GRADS, s1, p1)
        u2, s2 = theirs.update(GRADS, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_mask_of_the_wrong_structure_names_mask():
    tx = rgc.delta_gclip(0.1, 1.0, weight_decay=0.1, mask={"dense": True})
    with pytest.raises(ValueError, match="mask must be a pytree of bools with the"):
        tx.update(GRADS, tx.init(PARAMS), PARAMS)


def test_a_mask_of_non_bools_names_mask_and_the_leaf():
    bad = jax.tree.map(lambda _: 1, PARAMS)
    tx = rgc.delta_gclip(0.1, 1.0, weight_decay=0.1, mask=bad)
    with pytest.raises(TypeError, match=r"mask must hold Python bools.*got a leaf 1"):
        tx.update(GRADS, tx.init(PARAMS), PARAMS)

"""Property-based tests (hypothesis) of δ-GClip's invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import rgclip_optax as rgc
from tests import reference as ref

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
leaf = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=0, max_dims=2, max_side=5), elements=finite
)
trees = st.one_of(
    st.lists(leaf, min_size=1, max_size=4),
    st.dictionaries(st.sampled_from(list("abcd")), leaf, min_size=1, max_size=4),
)
lrs = st.floats(1e-3, 10.0)
gammas = st.floats(1e-3, 1e3)
deltas = st.floats(0.0, 1.0)
dtypes = st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16])


def cast(tree, dtype):
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def step(tx, g):
    params = jax.tree.map(jnp.zeros_like, g)
    return tx.update(g, tx.init(params), params)


@given(trees, lrs, gammas, deltas, dtypes)
def test_step_size_stays_in_eta_delta_to_eta(g, lr, gamma, delta, dtype):
    g = cast(g, dtype)
    _, state = step(rgc.delta_gclip(lr, gamma, delta), g)
    h = lr * float(optax.tree.get(state, "scale"))
    # float32 rounding of lr * s: allow one part in 1e6.
    assert lr * delta * (1 - 1e-6) <= h <= lr * (1 + 1e-6)


@given(trees, lrs, gammas, deltas)
def test_update_norm_is_h_times_gradient_norm(g, lr, gamma, delta):
    g = cast(g, jnp.float32)
    updates, state = step(rgc.delta_gclip(lr, gamma, delta), g)
    g_norm = ref.norm(g)
    h = lr * ref.scale(g_norm, gamma, delta)
    np.testing.assert_allclose(ref.norm(updates), h * g_norm, rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(
        float(optax.tree.get(state, "grad_norm")), g_norm, rtol=1e-5, atol=1e-30
    )


@given(trees, lrs, gammas)
def test_delta_zero_equals_optax_clip_by_global_norm_then_sgd(g, lr, gamma):
    g = cast(g, jnp.float32)
    ours, _ = step(rgc.delta_gclip(lr, gamma, 0.0), g)
    theirs, _ = step(optax.chain(optax.clip_by_global_norm(gamma), optax.sgd(lr)), g)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-30)


@given(trees, lrs, gammas, dtypes)
def test_delta_one_equals_optax_sgd(g, lr, gamma, dtype):
    g = cast(g, dtype)
    ours, _ = step(rgc.delta_gclip(lr, gamma, 1.0), g)
    theirs, _ = step(optax.sgd(lr), g)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(ref.to_f64(a), ref.to_f64(b), rtol=2**-7, atol=0)


@given(trees, gammas, deltas, dtypes)
def test_scale_is_in_delta_to_one_and_matches_reference(g, gamma, delta, dtype):
    g = cast(g, dtype)
    tx = rgc.scale_by_delta_gclip(gamma, delta)
    out, state = tx.update(g, tx.init(g))
    s = float(state.scale)
    assert delta * (1 - 1e-6) <= s <= 1.0
    np.testing.assert_allclose(s, ref.scale(ref.norm(g), gamma, delta), rtol=1e-5)
    assert jax.tree.map(lambda x: x.dtype, out) == jax.tree.map(lambda x: x.dtype, g)


@given(
    st.lists(
        st.floats(0, 2.0**100, allow_nan=False, width=32) | st.sampled_from([np.inf]),
        min_size=1,
        max_size=20,
    ),
    gammas,
    deltas,
)
def test_regime_names_the_branch_the_factor_took(norms, gamma, delta):
    norms = np.asarray(norms, np.float32)
    regime = np.asarray(rgc.delta_gclip_regime(norms, gamma, delta))
    s = np.asarray(rgc.delta_gclip_scale(norms, gamma, delta))
    finite = np.isfinite(norms)
    assert np.all(regime[~finite] == -1)
    r, n, s = regime[finite], norms[finite], s[finite]
    assert np.all((r == 0) == (n <= np.float32(gamma)))
    assert np.all(s[r == 0] == 1)
    assert np.all(s[r == 2] == np.float32(delta))
    np.testing.assert_array_equal(
        s[r == 1], np.float32(gamma) / n[r == 1]
    )  # clipped: exactly gamma/||g||, not the floor
    if delta == 0:
        assert not np.any(r == 2)

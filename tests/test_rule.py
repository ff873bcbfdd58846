"""scale_by_delta_gclip against the float64 reference, numerics and state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rgclip_optax as rgc
from tests import reference as ref

# Output tolerance per dtype: the norm and s are float32 (rel. error ~1e-7);
# the only larger error is the final rounding to the leaf's dtype.
RTOL = {jnp.float32: 2e-6, jnp.bfloat16: 2**-8, jnp.float16: 2**-10}
GAMMA, DELTA = 2.0, 0.1


def tree_with_norm(target_norm, dtype):
    """A nested tree (dict, list, tuple, scalar, None) with a given norm."""
    rng = np.random.default_rng(42)
    leaves = {
        "conv": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": None},
        "stack": [
            rng.normal(size=(5,)),
            (rng.normal(size=()), rng.normal(size=(2, 2))),
        ],
    }
    n = ref.norm(leaves)
    return jax.tree.map(lambda x: jnp.asarray(x * (target_norm / n), dtype), leaves)


REGIMES = {
    "plain_step": 0.5 * GAMMA,
    "at_gamma": GAMMA,
    "clipped": 0.5 * (GAMMA + GAMMA / DELTA),
    "at_gamma_over_delta": GAMMA / DELTA,
    "floor": 30 * GAMMA / DELTA,
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("regime", list(REGIMES))
def test_matches_float64_reference(regime, dtype):
    g = tree_with_norm(REGIMES[regime], dtype)
    tx = rgc.scale_by_delta_gclip(GAMMA, DELTA)
    out, state = jax.jit(tx.update)(g, tx.init(g))
    s_ref = ref.scale(ref.norm(g), GAMMA, DELTA)
    np.testing.assert_allclose(float(state.grad_norm), ref.norm(g), rtol=1e-6)
    np.testing.assert_allclose(float(state.scale), s_ref, rtol=1e-6)
    assert jax.tree.structure(out) == jax.tree.structure(g)
    for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(g), strict=True):
        assert o.dtype == x.dtype
        np.testing.assert_allclose(
            ref.to_f64(o), s_ref * ref.to_f64(x), rtol=RTOL[dtype], atol=0
        )


def test_regimes_give_the_expected_factor():
    tx = rgc.scale_by_delta_gclip(GAMMA, DELTA)
    for norm, expected in [(1.0, 1.0), (4.0, GAMMA / 4.0), (100.0, DELTA)]:
        _, st = tx.update(jnp.array([norm]), tx.init(None))
        np.testing.assert_allclose(float(st.scale), expected, rtol=1e-7)


def test_regime_matches_float64_definition_on_a_log_of_norms():
    norms = np.array(
        [0.0, GAMMA, 1.01 * GAMMA, GAMMA / DELTA, 1.01 * GAMMA / DELTA, np.nan, np.inf]
    )
    # float64: 0 when ||g|| <= gamma, 2 when gamma/||g|| < delta, else 1.
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = np.where(norms <= GAMMA, 0, np.where(GAMMA / norms < DELTA, 2, 1))
    expected[~np.isfinite(norms)] = -1
    got = jax.jit(rgc.delta_gclip_regime)(norms.reshape(7, 1), GAMMA, DELTA)
    assert got.shape == (7, 1) and got.dtype == jnp.int32
    np.testing.assert_array_equal(got[:, 0], expected)
    # delta = 0 is GClip: no floor; delta = 1 is GD: every large norm is "floor".
    np.testing.assert_array_equal(
        rgc.delta_gclip_regime(norms, GAMMA, 0.0), np.minimum(expected, 1)
    )
    assert rgc.delta_gclip_regime(1e30, GAMMA, 1.0) == 2


def test_zero_gradient_gives_zero_update_and_scale_one():
    g = {"a": jnp.zeros((3,)), "b": jnp.zeros((), jnp.bfloat16)}
    tx = rgc.scale_by_delta_gclip(GAMMA, DELTA)
    out, st = jax.jit(tx.update)(g, tx.init(g))
    assert float(st.scale) == 1.0 and float(st.grad_norm) == 0.0
    assert all(bool(jnp.all(o == 0)) for o in jax.tree.leaves(out))
    assert not any(bool(jnp.any(jnp.isnan(o))) for o in jax.tree.leaves(out))


@pytest.mark.parametrize("gamma", [1e-30, 1e30, float("inf")])
def test_gamma_edge_values_stay_finite(gamma):
    tx = rgc.scale_by_delta_gclip(gamma, DELTA)
    for g in [jnp.zeros(3), jnp.array([1e-20, 0.0]), jnp.array([3e38, 3e38])]:
        out, st = tx.update(g, tx.init(g))
        assert np.isfinite(float(st.scale))
        assert DELTA <= float(st.scale) <= 1.0
        assert bool(jnp.all(jnp.isfinite(out)))


def test_empty_tree_and_none_leaves():
    tx = rgc.scale_by_delta_gclip(GAMMA, DELTA)
    out, st = tx.update({}, tx.init({}))
    assert out == {} and float(st.scale) == 1.0
    g = {"w": jnp.array([30.0, 40.0]), "frozen": None}
    out, st = tx.update(g, tx.init(g))
    assert out["frozen"] is None
    np.testing.assert_allclose(out["w"], np.array([30.0, 40.0]) * DELTA, rtol=1e-6)


def test_overflowing_but_finite_gradient_gets_the_right_scale():
    g = [jnp.full((8,), 1e20, jnp.float32)]  # float32 sum of squares overflows
    tx = rgc.scale_by_delta_gclip(1e20, 1e-3)
    out, st = jax.jit(tx.update)(g, tx.init(g))
    norm = 1e20 * np.sqrt(8)
    np.testing.assert_allclose(float(st.grad_norm), norm, rtol=1e-6)
    np.testing.assert_allclose(float(st.scale), 1e20 / norm, rtol=1e-6)
    assert int(st.nonfinite_count) == 0
    np.testing.assert_allclose(ref.to_f64(out[0]), 1e20 * 1e20 / norm, rtol=1e-6)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_nonfinite_gradient_is_skipped_and_counted(bad):
    g = {"a": jnp.array([1.0, bad]), "b": jnp.ones((2,), jnp.bfloat16)}
    tx = rgc.scale_by_delta_gclip(GAMMA, DELTA)
    state = tx.init(g)
    out, state = jax.jit(tx.update)(g, state)
    assert all(bool(jnp.all(o == 0)) for o in jax.tree.leaves(out))
    assert int(state.nonfinite_count) == 1 and float(state.scale) == 0.0
    assert not np.isfinite(float(state.grad_norm))
    # A finite step afterwards works and keeps the count.
    out, state = tx.update({"a": jnp.ones(2), "b": jnp.ones((2,), jnp.bfloat16)}, state)
    assert int(state.nonfinite_count) == 1 and float(state.scale) == 1.0


def test_skip_nonfinite_false_propagates_the_formula():
    g = jnp.array([1.0, jnp.nan])
    tx = rgc.scale_by_delta_gclip(GAMMA, DELTA, skip_nonfinite=False)
    out, st = tx.update(g, tx.init(g))
    assert bool(jnp.isnan(out).all()) and int(st.nonfinite_count) == 0
    g = jnp.array([1.0, jnp.inf])
    out, st = tx.update(g, tx.init(g))
    # ||g|| = inf gives s = delta; the formula's result is delta * g.
    assert float(st.scale) == pytest.approx(DELTA)
    assert float(out[0]) == pytest.approx(DELTA) and float(out[1]) == np.inf


def test_mixed_dtype_tree_keeps_each_dtype():
    g = {
        "f32": jnp.ones((3,), jnp.float32),
        "bf16": jnp.full((4,), 50.0, jnp.bfloat16),
        "f16": jnp.full((2,), 300.0, jnp.float16),
    }
    tx = rgc.scale_by_delta_gclip(GAMMA, DELTA)
    out, st = jax.jit(tx.update)(g, tx.init(g))
    for k in g:
        assert out[k].dtype == g[k].dtype
    np.testing.assert_allclose(float(st.grad_norm), ref.norm(g), rtol=1e-6)


def test_mixed_dtypes_under_inject_hyperparams_where_optax_fails():
    g = {"w": jnp.full((4,), 50.0, jnp.bfloat16), "b": jnp.ones((2,), jnp.float32)}
    params = jax.tree.map(jnp.zeros_like, g)
    ours = optax.inject_hyperparams(rgc.scale_by_delta_gclip)(gamma=1.0, delta=0.1)
    out, _ = jax.jit(ours.update)(g, ours.init(params), params)
    assert out["w"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.float32
    # optax's own clip_by_global_norm raises TypeError on the same tree.
    theirs = optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=1.0)
    with pytest.raises(TypeError):
        jax.jit(theirs.update)(g, theirs.init(params), params)


def test_init_does_no_computation_on_params():
    params = {"w": jax.ShapeDtypeStruct((10**9,), jnp.float32), "b": None}
    tx = rgc.scale_by_delta_gclip(GAMMA, DELTA)
    st = tx.init(params)  # a ShapeDtypeStruct cannot be computed on
    assert st.grad_norm.dtype == jnp.float32 and st.scale.dtype == jnp.float32
    assert st.nonfinite_count.dtype == jnp.int32
    shapes = jax.eval_shape(tx.init, params)
    assert shapes.grad_norm.shape == () and shapes.nonfinite_count.dtype == jnp.int32


def test_state_dtypes_are_stable_across_steps():
    g = {"w": jnp.ones((3,), jnp.bfloat16)}
    tx = rgc.scale_by_delta_gclip(GAMMA, DELTA)
    st0 = tx.init(g)
    _, st1 = jax.jit(tx.update)(g, st0)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), st0) == jax.tree.map(
        lambda a: (a.shape, a.dtype), st1
    )


def test_state_fields_are_findable_by_name_in_any_chain():
    tx = optax.chain(
        optax.inject_hyperparams(rgc.scale_by_delta_gclip)(gamma=1.0, delta=0.1),
        optax.add_decayed_weights(1e-4),
        optax.adam(1e-3),
    )
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    _, state = tx.update({"w": jnp.array([30.0, 40.0, 0.0])}, state, params)
    assert float(optax.tree.get(state, "grad_norm")) == pytest.approx(50.0, rel=1e-6)
    assert float(optax.tree.get(state, "scale")) == pytest.approx(0.1, rel=1e-6)
    assert int(optax.tree.get(state, "nonfinite_count")) == 0
    assert float(optax.tree.get(state, "gamma")) == 1.0  # no name collision


def test_complex_gradients():
    g = jnp.array([30.0 + 40.0j], jnp.complex64)
    tx = rgc.scale_by_delta_gclip(1.0, 0.0)
    out, _ = tx.update(g, tx.init(g))
    assert out.dtype == jnp.complex64
    np.testing.assert_allclose(np.asarray(out), np.array([0.6 + 0.8j]), rtol=1e-6)


def test_non_floating_gradient_leaf_raises_type_error_with_path():
    tx = rgc.scale_by_delta_gclip(GAMMA, DELTA)
    g = {"layer": [jnp.ones(2), jnp.arange(3)]}
    with pytest.raises(TypeError, match=r"\['layer'\]\[1\].*int32"):
        tx.update(g, tx.init(g))

"""The global norm: float32 accumulation, overflow safety, odd trees."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rgclip_optax as rgc
from tests import reference as ref

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
FLOAT8 = [jnp.float8_e4m3fn, jnp.float8_e5m2]


@pytest.fixture(autouse=True, params=["cpu", "tpu", "gpu"])
def norm_path(request):
    """Every test here runs on the three implementations of the sums: XLA:CPU's,
    the portable one that TPUs compile, and GPUs' one variadic reduce (both
    forced on this CPU)."""
    with rgc.target_platform(request.param):
        yield request.param


@pytest.fixture
def rtol(norm_path):
    """Relative tolerance of a float32 sum of thousands of squares: XLA:CPU
    runs the GPU path's variadic reduce as one sequential loop (error ~n*eps,
    2e-5 for 4,096 entries), where XLA:GPU reduces in a tree, as jnp.sum is
    everywhere."""
    return 1e-4 if norm_path == "gpu" else 1e-6


def nested_tree(dtype):
    rng = np.random.default_rng(0)
    return {
        "dense": {"w": jnp.asarray(rng.normal(size=(7, 5)), dtype), "b": None},
        "list": [jnp.asarray(rng.normal(size=(3,)), dtype), (jnp.asarray(2.5, dtype),)],
        "scalar": jnp.asarray(-1.25, dtype),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64_reference_on_nested_trees(dtype):
    tree = nested_tree(dtype)
    got = rgc.global_norm(tree)
    assert got.dtype == jnp.float32
    # Inputs are exact in float64; the only error is float32 accumulation.
    np.testing.assert_allclose(float(got), ref.norm(tree), rtol=1e-6)


def test_empty_tree_and_all_none_tree_have_norm_zero():
    assert float(rgc.global_norm({})) == 0.0
    assert float(rgc.global_norm({"a": None, "b": [None]})) == 0.0
    assert float(rgc.global_norm({"a": jnp.zeros((0, 3))})) == 0.0


def test_float16_norm_above_256_does_not_overflow_unlike_optax():
    g = {"w": jnp.full((16,), 300.0, jnp.float16)}  # ||g|| = 1200
    # optax reduces in float16: 300**2 = 90000 > 65504 overflows.
    assert not np.isfinite(float(optax.tree.norm(g)))
    np.testing.assert_allclose(float(rgc.global_norm(g)), 1200.0, rtol=1e-6)


def test_bfloat16_many_leaves_keep_float32_precision():
    rng = np.random.default_rng(1)
    tree = [jnp.asarray(rng.normal(size=(1000,)), jnp.bfloat16) for _ in range(50)]
    exact = ref.norm(tree)
    np.testing.assert_allclose(float(rgc.global_norm(tree)), exact, rtol=1e-6)
    # optax's bfloat16 reduction is measurably worse on the same tree.
    optax_err = abs(float(optax.tree.norm(tree)) - exact) / exact
    ours_err = abs(float(rgc.global_norm(tree)) - exact) / exact
    assert ours_err < optax_err


@pytest.mark.parametrize("magnitude", [1e19, 1e25, 1e36, 3e38])
def test_finite_entries_whose_squares_overflow_float32_are_rescaled(magnitude):
    x = np.array([magnitude, -magnitude / 2, 3.0, 0.0], np.float32)
    tree = {"a": jnp.asarray(x), "b": jnp.asarray(x[:2] / 4)}
    exact = ref.norm(tree)
    got = float(jax.jit(rgc.global_norm)(tree))
    if exact > float(np.finfo(np.float32).max):
        assert got == np.inf  # the norm itself is beyond float32's range
    else:
        np.testing.assert_allclose(got, exact, rtol=1e-6)


def test_overflow_rescaling_in_float16(rtol):
    g = jnp.full((4096,), 60000.0, jnp.float16)  # sum of squares 1.5e13, fine
    np.testing.assert_allclose(float(rgc.global_norm(g)), 60000.0 * 64, rtol=rtol)


def test_nonfinite_entries_give_nan_or_inf():
    assert np.isnan(float(rgc.global_norm([jnp.array([1.0, jnp.nan]), jnp.ones(2)])))
    assert float(rgc.global_norm([jnp.array([1.0, jnp.inf])])) == np.inf
    assert float(rgc.global_norm([jnp.array([-jnp.inf]), jnp.array([1e30])])) == np.inf
    # NaN wins over inf.
    assert np.isnan(float(rgc.global_norm([jnp.array([jnp.inf, jnp.nan])])))


def test_complex_leaves_use_modulus():
    z = jnp.array([3.0 + 4.0j, 0.0 + 1.0j], jnp.complex64)
    np.testing.assert_allclose(float(rgc.global_norm(z)), np.sqrt(26.0), rtol=1e-6)


@pytest.mark.parametrize(
    "leaf, dtype_name",
    [(jnp.arange(3), "int32"), (jnp.array([True]), "bool")],
)
def test_non_floating_leaf_raises_type_error_naming_its_path(leaf, dtype_name):
    tree = {"params": {"ok": jnp.ones(2), "step": leaf}}
    with pytest.raises(TypeError, match=r"\['params'\]\['step'\].*" + dtype_name):
        rgc.global_norm(tree)


def test_float0_gradient_leaf_raises_type_error():
    # jax.grad with allow_int gives float0 cotangents for integer inputs.
    g = jax.grad(lambda p: p["w"].sum(), allow_int=True)(
        {"w": jnp.ones(2), "n": jnp.array(3)}
    )
    with pytest.raises(TypeError, match=r"\['n'\]"):
        rgc.global_norm(g)


def mixed_tree(big_value=None, small_value=None):
    """Large leaves (reduced one by one) and many small leaves of three dtypes
    (on the CPU path, reduced packed together per dtype), as in a network."""
    rng = np.random.default_rng(1)
    big = rng.normal(size=(300, 300))  # 90,000 > SMALL_LEAF_SIZE
    if big_value is not None:
        big[7, 11] = big_value
    small = {
        f"s{i}": jnp.asarray(rng.normal(size=(i % 7 + 1, 3)), dt)
        for i, dt in enumerate([jnp.float32, jnp.bfloat16, jnp.float16] * 40)
    }
    if small_value is not None:
        small["s4"] = small["s4"].at[0, 0].set(small_value)
    return {"big": jnp.asarray(big, jnp.float32), "small": small}


@pytest.fixture(params=[1 << 13, 16], ids=["one_group", "many_groups"])
def pack_group_size(request, monkeypatch):
    """Runs a test with the small leaves packed (on the CPU path), in the
    default groups and in groups of 16 entries, so the small leaves of each
    dtype are split over several concatenations."""
    from rgclip_optax import _xla_cpu

    monkeypatch.setattr(_xla_cpu, "PACK_GROUP_SIZE", request.param)
    monkeypatch.setattr(_xla_cpu, "PACK_MIN_LEAVES", 1)
    return request.param


def test_large_and_packed_small_leaves_of_mixed_dtypes_match_reference(
    rtol,
    pack_group_size,
):
    from rgclip_optax._xla_cpu import SMALL_LEAF_SIZE

    tree = mixed_tree()
    assert tree["big"].size > SMALL_LEAF_SIZE
    np.testing.assert_allclose(float(rgc.global_norm(tree)), ref.norm(tree), rtol=rtol)
    got = float(jax.jit(rgc.global_norm)(tree))
    np.testing.assert_allclose(got, ref.norm(tree), rtol=rtol)


def test_packed_small_leaves_rescale_and_flag_like_single_leaves(pack_group_size):
    # Overflow in the large leaf: the rescaled branch handles both kinds.
    tree = mixed_tree(big_value=3e30)
    np.testing.assert_allclose(float(rgc.global_norm(tree)), ref.norm(tree), rtol=1e-6)
    # A NaN or an infinity inside a packed bfloat16 leaf.
    assert np.isnan(float(rgc.global_norm(mixed_tree(small_value=np.nan))))
    assert float(rgc.global_norm(mixed_tree(small_value=np.inf))) == np.inf
    assert float(rgc.global_norm(mixed_tree(small_value=-np.inf))) == np.inf


@pytest.mark.parametrize("per_tensor", [False, True])
def test_per_leaf_norms_match_reference_with_packing_and_overflow(
    pack_group_size, per_tensor
):
    from rgclip_optax import _norm

    tree = mixed_tree(big_value=3e30)
    leaves = jax.tree.leaves(tree)
    _, norms, twice, finite = jax.jit(
        lambda xs: _norm.per_tensor_norms(
            xs, [False] * len(xs), None, lambda n, ok: 2 * n
        )
    )(leaves)
    assert bool(finite)
    expected = [ref.norm(x) for x in leaves]
    np.testing.assert_allclose(np.asarray(norms), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(twice), 2 * np.asarray(expected), rtol=1e-6)


@pytest.mark.parametrize("dtype", FLOAT8)
def test_float8_leaves_are_accumulated_in_float32(dtype):
    x = jnp.asarray(np.linspace(-4, 4, 64), dtype)
    tree = {"f8": x, "f32": jnp.ones(3)}
    np.testing.assert_allclose(float(rgc.global_norm(tree)), ref.norm(tree), rtol=1e-6)
    # 64 entries of 448 (float8_e4m3fn's largest value): 448**2 is far beyond
    # the format's range, not beyond float32's.
    big = jnp.full((64,), float(jnp.finfo(dtype).max), dtype)
    np.testing.assert_allclose(
        float(rgc.global_norm(big)), float(jnp.finfo(dtype).max) * 8, rtol=1e-6
    )


def test_norm_is_differentiable_also_where_the_float32_sum_overflows():
    # d||x||/dx = x/||x||, on both paths, for a gradient whose float32 sum of
    # squares overflows (the rescaled sum carries the derivative).
    for x in (jnp.array([3.0, 4.0]), jnp.array([3e30, 4e30])):
        got = jax.jit(jax.grad(rgc.global_norm))(x)
        np.testing.assert_allclose(np.asarray(got), [0.6, 0.8], rtol=1e-6)


def test_vmapped_norm_equals_per_example_norms():
    rng = np.random.default_rng(3)
    batch = {
        "w": jnp.asarray(rng.normal(size=(6, 5, 4)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(6, 4)), jnp.bfloat16),
    }
    batch["w"] = batch["w"].at[2, 0, 0].set(1e30)  # overflow in one example
    batch["w"] = batch["w"].at[4, 1, 1].set(jnp.nan)  # NaN in another
    got = np.asarray(jax.jit(jax.vmap(rgc.global_norm))(batch))
    expected = [ref.norm(jax.tree.map(lambda a, i=i: a[i], batch)) for i in range(6)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.isnan(got[4])


def test_vmap_and_grad_compose_in_both_orders():
    # Per-example norms differentiated, and per-example gradients of the norm,
    # with one example whose float32 sum of squares overflows.
    x = jnp.array([[3.0, 4.0], [3e30, 4e30], [0.6, 0.8]])
    expected = np.array([[0.6, 0.8]] * 3)
    g1 = jax.jit(jax.grad(lambda x: jnp.sum(jax.vmap(rgc.global_norm)(x))))(x)
    g2 = jax.jit(jax.vmap(jax.grad(rgc.global_norm)))(x)
    np.testing.assert_allclose(np.asarray(g1), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g2), expected, rtol=1e-6)
    # vmap of vmap: a batch of batches.
    xx = jnp.stack([x, 2 * x])
    got = jax.jit(jax.vmap(jax.vmap(rgc.global_norm)))(xx)
    np.testing.assert_allclose(
        np.asarray(got), [[5.0, 5e30, 1.0], [10.0, 1e31, 2.0]], rtol=1e-6
    )

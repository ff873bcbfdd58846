"""The global norm: float32 accumulation, overflow safety, odd trees."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rgclip_optax as rgc
from tests import reference as ref

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


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


def test_overflow_rescaling_in_float16():
    g = jnp.full((4096,), 60000.0, jnp.float16)  # sum of squares 1.5e13, fine
    np.testing.assert_allclose(float(rgc.global_norm(g)), 60000.0 * 64, rtol=1e-6)


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


def _temp_bytes(fn, x):
    mem = jax.jit(fn).lower(x).compile().memory_analysis()
    assert mem is not None
    return mem.temp_size_in_bytes


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_no_upcast_copy_of_the_gradient_is_materialized(dtype):
    # The float32 conversion is fused into the reduction (and into the rare
    # rescaling branch): no temporary buffer near the size of an f32 copy.
    g = jnp.ones((1024, 1024), dtype)
    assert _temp_bytes(rgc.global_norm, g) < g.size


def test_rescale_branch_of_a_float32_tree_reserves_no_leaf_sized_buffer(
    monkeypatch,
):
    # Several large float32 leaves (as in a CNN): the rarely taken rescaled
    # sum must not reserve a temporary of a leaf's size.
    from rgclip_optax import _norm

    tree = [jnp.ones((3, 3, 256, 256)) for _ in range(4)]  # 2.4 MB each
    leaf_bytes = tree[0].size * 4
    # A fresh function each time, so jit traces anew instead of reusing its cache.
    assert _temp_bytes(lambda t: rgc.global_norm(t), tree) < leaf_bytes // 4
    # Without the chunked loop the same tree does reserve one (the regression
    # this guards against).
    monkeypatch.setattr(_norm, "RESCALE_CHUNK", 1 << 30)
    assert _temp_bytes(lambda t: rgc.global_norm(t), tree) >= leaf_bytes


def test_float16_on_cpu_uses_no_more_memory_than_optax():
    # XLA:CPU has no float16 arithmetic and upcasts any float16 reduction,
    # optax's included; we must not add a second copy on top of that.
    g = jnp.ones((1024, 1024), jnp.float16)
    assert _temp_bytes(rgc.global_norm, g) <= _temp_bytes(optax.tree.norm, g) + 1024


def mixed_tree(big_value=None, small_value=None):
    """Large leaves (reduced one by one) and many small leaves of three dtypes
    (reduced packed together per dtype), as in a real network."""
    rng = np.random.default_rng(1)
    big = rng.normal(size=(300, 300))  # 90,000 > SMALL_LEAF_SIZE, RESCALE_CHUNK
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
    """Runs a test with the default packing and with groups of 16 entries, so
    the small leaves of each dtype are split over several concatenations."""
    from rgclip_optax import _norm

    monkeypatch.setattr(_norm, "PACK_GROUP_SIZE", request.param)
    return request.param


def test_large_and_packed_small_leaves_of_mixed_dtypes_match_reference(
    pack_group_size,
):
    from rgclip_optax._norm import SMALL_LEAF_SIZE

    tree = mixed_tree()
    assert tree["big"].size > SMALL_LEAF_SIZE
    np.testing.assert_allclose(float(rgc.global_norm(tree)), ref.norm(tree), rtol=1e-6)
    got = float(jax.jit(rgc.global_norm)(tree))
    np.testing.assert_allclose(got, ref.norm(tree), rtol=1e-6)


def test_packed_small_leaves_rescale_and_flag_like_single_leaves(pack_group_size):
    # Overflow in the large leaf: the rescaled branch handles both kinds.
    tree = mixed_tree(big_value=3e30)
    np.testing.assert_allclose(float(rgc.global_norm(tree)), ref.norm(tree), rtol=1e-6)
    # A NaN or an infinity inside a packed bfloat16 leaf.
    assert np.isnan(float(rgc.global_norm(mixed_tree(small_value=np.nan))))
    assert float(rgc.global_norm(mixed_tree(small_value=np.inf))) == np.inf
    assert float(rgc.global_norm(mixed_tree(small_value=-np.inf))) == np.inf


def test_leaves_are_grouped_by_dtype_within_the_group_size(monkeypatch):
    from rgclip_optax import _norm

    monkeypatch.setattr(_norm, "PACK_GROUP_SIZE", 10)
    leaves = [jnp.ones(4), jnp.ones(4, jnp.bfloat16), jnp.ones(5), jnp.ones(3)]
    leaves += [jnp.ones(5000), jnp.ones(2, jnp.complex64), jnp.ones(0)]
    ops = _norm._operands(leaves)
    sizes = [[(x.dtype, x.size) for x in g] for g in ops.groups]
    f32, bf16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
    assert sizes == [[(f32, 4), (f32, 5)], [(f32, 3)], [(bf16, 4)]]
    # Large, complex and empty leaves are reduced on their own.
    assert [x.size for x in ops.large] == [5000, 2, 0]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_narrow_small_leaves_are_packed_without_a_float32_concatenation(
    dtype, monkeypatch
):
    # XLA:CPU turns a bfloat16 concatenation into a float32 one (twice the
    # memory, plus a converted copy of every leaf); packing the bits as
    # unsigned integers avoids it. Checked on the compiled program, and for
    # bfloat16 shown to happen with a plain concatenation.
    from rgclip_optax import _norm

    tree = [jnp.ones((100,), dtype) for _ in range(50)]

    def float32_concatenations():
        text = jax.jit(lambda t: rgc.global_norm(t)).lower(tree).compile().as_text()
        return [
            line
            for line in text.splitlines()
            if "= f32[" in line and "concatenate(" in line
        ]

    assert float32_concatenations() == []
    if dtype == jnp.bfloat16:
        monkeypatch.setattr(_norm, "_concatenate", jnp.concatenate)
        assert float32_concatenations() != []

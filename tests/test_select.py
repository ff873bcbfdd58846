"""The bit-mask selects that zero skipped updates and hold momentum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rgclip_optax._select import select, zero_where

# Any float32 bit pattern: NaNs (with payloads), infinities, -0.0, subnormals.
any_float32 = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=0, max_dims=2, max_side=6),
    elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
)
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
# Casting large float32 values to float16 gives infinities, on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast")


def bits(x):
    """The raw bytes of an array, to compare NaN payloads and signed zeros."""
    return np.asarray(x).tobytes()


@given(any_float32, st.booleans(), st.sampled_from(DTYPES))
def test_select_equals_where_bit_for_bit(a, pred, dtype):
    x = jnp.asarray(a, dtype)
    y = jnp.asarray(a[::-1] if a.ndim else -a, dtype)
    got = jax.jit(select)(jnp.asarray(pred), x, y)
    assert got.dtype == x.dtype
    assert bits(got) == bits(jnp.where(pred, x, y))


@given(any_float32, st.booleans(), st.sampled_from(DTYPES))
def test_zero_where_gives_positive_zeros_or_the_input_unchanged(a, pred, dtype):
    x = jnp.asarray(a, dtype)
    got = jax.jit(zero_where)(jnp.asarray(pred), x)
    assert got.dtype == x.dtype
    expected = jnp.zeros_like(x) if pred else x  # +0.0, even for NaN or -0.0
    assert bits(got) == bits(expected)


@pytest.mark.parametrize(
    "dtype", [jnp.complex64, jnp.int32, jnp.bool_], ids=["complex", "int", "bool"]
)
def test_other_dtypes_fall_back_to_where(dtype):
    x = jnp.asarray([1, 0, 1], dtype)
    y = jnp.asarray([0, 1, 1], dtype)
    for pred in (True, False):
        np.testing.assert_array_equal(
            select(jnp.asarray(pred), x, y), jnp.where(pred, x, y)
        )
        np.testing.assert_array_equal(
            zero_where(jnp.asarray(pred), x), jnp.where(pred, jnp.zeros_like(x), x)
        )


def test_select_under_vmap_with_a_batched_predicate():
    preds = jnp.array([True, False, True])
    x = jnp.arange(6.0).reshape(3, 2)
    got = jax.vmap(select)(preds, x, -x)
    np.testing.assert_array_equal(got, jnp.where(preds[:, None], x, -x))

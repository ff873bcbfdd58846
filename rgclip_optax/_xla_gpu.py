"""The norm's two sums of squares as XLA:GPU wants them.

``_norm`` traces this for CUDA and ROCm programs (``_platform``) and the
portable sums of ``_sums`` for TPUs; the values are the same. One
thing differs, measured on the deviceless H100 target (``jax[cuda12]`` 0.10.2,
``benchmarks/whole_program.py --compile-for gpu``):

* **One reduce instruction for both sums.** Written as two ``jnp.sum`` calls
  of the same leaf, XLA:GPU fuses them into one kernel for a gradient on its
  own, but not inside a scan-compiled training loop, where the gradient
  comes out of a matmul: every 2-D leaf was then read by two reduction
  kernels (the step loop's bytes were 1.048x clip+sgd's on a 9k-parameter
  MLP; 1.001x as one variadic reduce). XLA:TPU does the opposite: the
  variadic reduce cost it four more fusions in the same loop (1.088x against
  1.037x), so TPU keeps the two sums. XLA:CPU runs a variadic reduce as a
  scalar loop (8x one sum on 50M entries) and has its own path (``_xla_cpu``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from rgclip_optax._sums import SCALE_EXPONENT


def two_sums(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum v**2, sum (v * 2**-SCALE_EXPONENT)**2)`` of a real array, as one
    variadic reduction: one read of ``v`` whatever the fusion passes decide.

    Not differentiated: ``_norm`` gives the sums one derivative for every
    implementation (JAX would differentiate a variadic reduce through a tree
    of pairwise reductions, and cannot transpose it).
    """
    w = v * jnp.asarray(2.0**-SCALE_EXPONENT, v.dtype)
    zero = jnp.zeros([], v.dtype)
    plain, scaled = lax.reduce(
        (v * v, w * w),
        (zero, zero),
        lambda a, b: (a[0] + b[0], a[1] + b[1]),
        tuple(range(v.ndim)),
    )
    return plain, scaled

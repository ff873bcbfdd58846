"""The paper's claim, in seconds on CPU.

A wide two-layer tanh network with squared loss, trained full-batch, with the
targets scaled so that the gradient norm starts far above gamma/delta: the δ
floor keeps the step size at least eta*delta and δ-GClip converges
geometrically to a global minimum, while plain GClip (delta = 0) takes steps
of length eta*gamma and stalls (Tucat et al. 2025, Section 5).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rgclip_optax as rgc

WIDTH, N, D, STEPS = 2048, 16, 8, 3000
ETA, GAMMA, DELTA = 1.0, 0.01, 0.1


def make_problem():
    kx, ky, kw, ka = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(kx, (N, D))
    x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    y = 100.0 * jax.random.normal(ky, (N,))  # targets x100
    params = {
        "W": jax.random.normal(kw, (D, WIDTH)),
        "a": jax.random.normal(ka, (WIDTH,)),
    }

    def loss(p):
        pred = jnp.tanh(x @ p["W"]) @ p["a"] / jnp.sqrt(WIDTH)
        return 0.5 * jnp.mean((pred - y) ** 2)

    return params, loss


def train(tx, params, loss):
    def body(carry, _):
        p, s = carry
        value, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), (value, optax.tree.get(s, "grad_norm"))

    with jax.default_matmul_precision("highest"):
        _, (losses, norms) = jax.jit(
            lambda p: jax.lax.scan(body, (p, tx.init(p)), None, length=STEPS)
        )(params)
    return np.asarray(losses), np.asarray(norms)


def test_delta_gclip_converges_where_gclip_stalls():
    params, loss = make_problem()
    d_loss, d_norm = train(rgc.delta_gclip(ETA, GAMMA, DELTA), params, loss)
    g_loss, _ = train(rgc.gclip(ETA, GAMMA), params, loss)

    start = d_loss[0]
    assert d_norm[0] > 100 * GAMMA / DELTA  # the δ floor is active at the start
    # δ-GClip: geometric decrease to <= 1e-6 of the start within the budget.
    assert d_loss.min() <= 1e-6 * start
    first = int(np.argmax(d_loss <= 1e-6 * start))
    assert first < STEPS
    # Geometric: the log-loss falls roughly linearly, so the first thousandth
    # is reached in well under half the steps needed for the first millionth.
    third = int(np.argmax(d_loss <= 1e-3 * start))
    assert third < 0.7 * first
    # GClip, same eta and gamma: still above half of its start.
    assert g_loss[0] == start
    assert g_loss[-1] > 0.5 * start

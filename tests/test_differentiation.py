"""Derivatives through the update: meta-gradients, hypergradients and MAML.

A meta-loss runs a few updates from a fixed start and returns the loss at
the end; its derivative with respect to a hyperparameter (the learning rate,
``gamma``, ``delta``, the momentum, the weight decay) or to the starting
parameters must be the formula's. Independent references:

* Optax: ``clip_by_global_norm + sgd`` at δ = 0, ``sgd`` at δ = 1 (rtol 1e-5);
* the formula written out plainly in float64 (``reference_step``) and
  differentiated by JAX, and central finite differences of our optimizer in
  float64 (rtol 1e-4).

Every test runs on the three implementations of the norm (XLA:CPU's, the
portable one TPUs compile, XLA:GPU's), forced on this CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rgclip_optax as rgc

# No entry at the minimum (w = 0.3): Adam's sqrt(nu) has no derivative at a
# zero gradient entry, and Optax's Adam gives NaN there too.
W0 = (np.arange(12.0).reshape(4, 3) - 4.5) / 10.0
B0 = np.array([1.0, -2.0, 0.5])


@pytest.fixture(autouse=True, params=["cpu", "tpu", "gpu"])
def path(request):
    with rgc.target_platform(request.param):
        yield request.param


def loss(p):
    # Steep in w (its gradient's norm is ~240 at the start), mild in b.
    mild = jnp.sum(p["b"] ** 2) if "b" in p else 0.0
    return 50.0 * jnp.sum((p["w"] - 0.3) ** 2) + mild


def start(dtype=jnp.float32):
    return {"w": jnp.asarray(W0, dtype), "b": jnp.asarray(B0, dtype)}


def meta_loss(tx, params, steps=3, nan_at=None, **extra):
    """The loss after ``steps`` updates; ``nan_at``: that step's gradient
    gets a NaN (from outside the loss, like a corrupt batch)."""
    state = tx.init(params)
    for t in range(steps):
        g = jax.grad(loss)(params)
        if t == nan_at:
            g = {**g, "b": g["b"].at[1].add(jnp.nan)}
        u, state = tx.update(g, state, params, **extra)
        params = optax.apply_updates(params, u)
    return loss(params)


def reference_step(g, p, trace, lr, gamma, delta, wd=0.0, momentum=None):
    """δ-GClip written out: s = min(1, max(delta, gamma/||g||)),
    u = -lr * s * (g + wd * p) (through a heavy-ball trace with momentum)."""
    norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
    s = jnp.minimum(1.0, jnp.maximum(delta, gamma / norm))
    d = jax.tree.map(lambda a, b: s * (a + wd * b), g, p)
    if momentum is not None:
        d = trace = jax.tree.map(lambda a, t: a + momentum * t, d, trace)
    return jax.tree.map(lambda a: -lr * a, d), trace


def reference_meta_loss(params, lr, gamma, delta, steps=3, **kw):
    trace = jax.tree.map(jnp.zeros_like, params)
    for _ in range(steps):
        g = jax.grad(loss)(params)
        u, trace = reference_step(g, params, trace, lr, gamma, delta, **kw)
        params = optax.apply_updates(params, u)
    return loss(params)


def close(a, b, rtol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=1e-6)


# -- against Optax -------------------------------------------------------------

OPTAX_PAIRS = {
    # name: (ours(lr, gamma), Optax's(lr, gamma))
    "gclip": (
        lambda lr, g: rgc.gclip(lr, g),
        lambda lr, g: optax.chain(optax.clip_by_global_norm(g), optax.sgd(lr)),
    ),
    "gclip_momentum": (
        lambda lr, g: rgc.gclip(lr, g, momentum=0.9),
        lambda lr, g: optax.chain(
            optax.clip_by_global_norm(g), optax.sgd(lr, momentum=0.9)
        ),
    ),
    "gclip_nesterov": (
        lambda lr, g: rgc.gclip(lr, g, momentum=0.9, nesterov=True),
        lambda lr, g: optax.chain(
            optax.clip_by_global_norm(g), optax.sgd(lr, momentum=0.9, nesterov=True)
        ),
    ),
    "gclip_per_tensor_one_leaf": (
        lambda lr, g: rgc.gclip(lr, g, norm="per_tensor"),
        lambda lr, g: optax.chain(optax.clip_by_global_norm(g), optax.sgd(lr)),
    ),
    "rule_skip_off": (
        lambda lr, g: optax.chain(
            rgc.scale_by_delta_gclip(g, 0.0, skip_nonfinite=False), optax.sgd(lr)
        ),
        lambda lr, g: optax.chain(optax.clip_by_global_norm(g), optax.sgd(lr)),
    ),
    "rule_skip_on": (
        lambda lr, g: optax.chain(rgc.scale_by_delta_gclip(g, 0.0), optax.sgd(lr)),
        lambda lr, g: optax.chain(optax.clip_by_global_norm(g), optax.sgd(lr)),
    ),
    "wide_in_skip_and_round": (
        lambda lr, g: rgc.skip_and_round(
            optax.chain(
                rgc.scale_by_delta_gclip(g, 0.0, wide_updates=True),
                optax.scale_by_adam(),
                optax.scale_by_learning_rate(lr),
            )
        ),
        lambda lr, g: optax.chain(optax.clip_by_global_norm(g), optax.adam(lr)),
    ),
    "sgd_at_delta_1": (
        lambda lr, g: rgc.delta_gclip(lr, g, 1.0),
        lambda lr, g: optax.sgd(lr),
    ),
}


def _params_for(name):
    # Per-tensor norms equal the global norm on a one-leaf tree.
    p = start()
    return {"w": p["w"]} if name == "gclip_per_tensor_one_leaf" else p


def _meta(make, p):
    return lambda h: meta_loss(make(h[0], h[1]), p)


@pytest.mark.parametrize("name", OPTAX_PAIRS)
def test_hypergradients_equal_optax(name):
    # With respect to the learning rate and gamma together.
    ours, theirs = OPTAX_PAIRS[name]
    p = _params_for(name)
    h = jnp.array([0.01, 1.0])
    got = jax.jit(jax.grad(_meta(ours, p)))(h)
    close(got, jax.jit(jax.grad(_meta(theirs, p)))(h), 1e-5)
    # A nonzero derivative: the path through the update is there (gamma has
    # none at delta = 1, and next to none in front of scale-invariant Adam).
    assert abs(float(got[0])) > 1.0
    if name not in ("sgd_at_delta_1", "wide_in_skip_and_round"):
        assert abs(float(got[1])) > 1e-3


@pytest.mark.parametrize("name", ["gclip_momentum", "wide_in_skip_and_round"])
def test_jvp_and_vjp_equal_optax(name):
    ours, theirs = OPTAX_PAIRS[name]
    h, v = jnp.array([0.01, 1.0]), jnp.array([1.0, -0.5])

    @jax.jit
    def both(h, v):
        return [
            (jax.jvp(_meta(make, start()), (h,), (v,))[1],
             jax.vjp(_meta(make, start()), h)[1](jnp.float32(2.0))[0])
            for make in (ours, theirs)
        ]  # fmt: skip

    (jvp, vjp), (jvp_ref, vjp_ref) = both(h, v)
    close(jvp, jvp_ref, 1e-5)
    close(vjp, vjp_ref, 1e-5)


@pytest.mark.parametrize("name", ["gclip", "gclip_momentum", "wide_in_skip_and_round"])
def test_maml_derivative_with_respect_to_the_start_equals_optax(name):
    # MAML: the derivative of the loss after the updates with respect to the
    # parameters they started from, through every update (second order).
    ours, theirs = OPTAX_PAIRS[name]
    g_ours = jax.jit(jax.grad(lambda p: meta_loss(ours(0.01, 1.0), p)))(start())
    g_ref = jax.jit(jax.grad(lambda p: meta_loss(theirs(0.01, 1.0), p)))(start())
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref), strict=True):
        close(a, b, 1e-5)


def test_hessian_with_respect_to_the_hyperparameters_equals_optax():
    ours, theirs = OPTAX_PAIRS["gclip_momentum"]

    def f(make):
        return lambda h: meta_loss(make(h[0], h[1]), start(), steps=2)

    h = jnp.array([0.01, 1.0])
    close(jax.jit(jax.hessian(f(ours)))(h), jax.jit(jax.hessian(f(theirs)))(h), 1e-4)


def test_hypergradients_under_vmap_equal_optax():
    ours, theirs = OPTAX_PAIRS["gclip"]
    lrs = jnp.array([0.001, 0.01, 0.05])

    def per_lr(make):
        return jax.jit(jax.vmap(jax.grad(lambda lr: meta_loss(make(lr, 1.0), start()))))

    close(per_lr(ours)(lrs), per_lr(theirs)(lrs), 1e-5)


# -- against the formula and finite differences, with the δ floor -------------

CASES = {
    # name: (optimizer(lr, gamma, delta), reference keyword arguments)
    "floor": (lambda lr, g, d: rgc.delta_gclip(lr, g, d), {}),
    "momentum": (
        lambda lr, g, d: rgc.delta_gclip(lr, g, d, momentum=0.5),
        {"momentum": 0.5},
    ),
    "weight_decay": (
        lambda lr, g, d: rgc.delta_gclip(lr, g, d, weight_decay=0.1),
        {"wd": 0.1},
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_derivatives_at_the_floor_equal_the_formula(name):
    # gamma / ||g|| = 1/240 < delta = 0.05 on the first step: the floor binds,
    # and the derivative with respect to delta is not zero.
    make, kw = CASES[name]

    def ours(h):
        return meta_loss(make(h[0], h[1], h[2]), start())

    def ref(h):
        return reference_meta_loss(start(), h[0], h[1], h[2], **kw)

    h = jnp.array([0.01, 1.0, 0.05])
    got, want = jax.jit(jax.grad(ours))(h), jax.jit(jax.grad(ref))(h)
    close(got, want, 1e-5)
    assert abs(float(got[2])) > 1.0  # through the floor


# Each hyperparameter where it matters: gamma in the clipped regime (small
# delta), delta at the floor (gamma / ||g|| = 1/240 < 0.05).
FD_POINTS = {
    "learning_rate": {"learning_rate": 0.01, "gamma": 1.0, "delta": 0.05},
    "gamma": {"learning_rate": 0.01, "gamma": 1.0, "delta": 0.001},
    "delta": {"learning_rate": 0.01, "gamma": 1.0, "delta": 0.05},
}


@pytest.mark.parametrize("hyper", FD_POINTS)
def test_derivatives_equal_float64_finite_differences(hyper):
    # Central differences with a 1% step: the factor is float32 whatever the
    # leaves (a 0.01% step sees its rounding), and the meta-loss is smooth
    # within each regime, so the difference's own error is ~1e-6.
    values = FD_POINTS[hyper]
    with jax.enable_x64(True):
        p = start(jnp.float64)

        def f(x):
            kw = {**values, hyper: x}
            return meta_loss(rgc.delta_gclip(**kw, momentum=0.5), p, steps=2)

        def ref(x):
            kw = {**values, hyper: x}
            return reference_meta_loss(
                p, kw["learning_rate"], kw["gamma"], kw["delta"], steps=2,
                momentum=0.5,
            )  # fmt: skip

        x = jnp.float64(values[hyper])
        eps = 1e-2 * x
        fd = (f(x + eps) - f(x - eps)) / (2 * eps)
        got = jax.jit(jax.grad(f))(x)
        np.testing.assert_allclose(float(got), float(fd), rtol=1e-4)
        np.testing.assert_allclose(float(got), float(jax.grad(ref)(x)), rtol=1e-6)
        assert abs(float(got)) > 1.0


def test_masked_weight_decay_derivative_equals_the_formula():
    # Decay on the kernel only: d/d(weight_decay) through two updates.
    def mask(p):
        return {"w": True, "b": False}

    def ours(wd):
        tx = rgc.delta_gclip(0.01, 1.0, 0.05, weight_decay=wd, mask=mask)
        return meta_loss(tx, start(), steps=2)

    def ref(wd):
        p, trace = start(), None
        for _ in range(2):
            g = jax.grad(loss)(p)
            u, trace = reference_step(
                g, {"w": p["w"], "b": jnp.zeros_like(p["b"])}, trace, 0.01, 1.0,
                0.05, wd=wd,
            )  # fmt: skip
            p = optax.apply_updates(p, u)
        return loss(p)

    close(jax.grad(ours)(0.1), jax.grad(ref)(0.1), 1e-5)


def test_inject_hyperparams_log_learning_rate_gradient_equals_the_formula():
    # Optax's meta-learning recipe: the learning rate in the state, set from
    # its logarithm, differentiated through three updates.
    tx = optax.inject_hyperparams(rgc.delta_gclip)(
        learning_rate=0.01, gamma=1.0, delta=0.05
    )

    def ours(log_lr):
        p = start()
        state = tx.init(p)
        state.hyperparams["learning_rate"] = jnp.exp(log_lr)
        for _ in range(3):
            u, state = tx.update(jax.grad(loss)(p), state, p)
            p = optax.apply_updates(p, u)
        return loss(p)

    def ref(log_lr):
        return reference_meta_loss(start(), jnp.exp(log_lr), 1.0, 0.05)

    x = jnp.log(0.01)
    got = jax.jit(jax.grad(ours))(x)
    close(got, jax.grad(ref)(x), 1e-5)
    assert abs(float(got)) > 1.0


# -- a skipped step ------------------------------------------------------------

SKIPPING = {
    "delta_gclip": lambda h: rgc.delta_gclip(h[0], h[1], h[2]),
    "momentum": lambda h: rgc.delta_gclip(h[0], h[1], h[2], momentum=0.5),
    "per_tensor": lambda h: rgc.delta_gclip(h[0], h[1], h[2], norm="per_tensor"),
    "weight_decay": lambda h: rgc.delta_gclip(h[0], h[1], h[2], weight_decay=0.1),
    "adam_chain": lambda h: rgc.skip_and_round(
        optax.chain(
            rgc.scale_by_delta_gclip(h[1], h[2], wide_updates=True),
            optax.scale_by_adam(),
            optax.scale_by_learning_rate(h[0]),
        )
    ),
}


@pytest.mark.parametrize("name", SKIPPING)
def test_a_skipped_step_has_a_zero_derivative_not_a_nan(name):
    # One update from a NaN gradient: the parameters are left as they were,
    # so the derivative with respect to every hyperparameter is exactly 0.
    make = SKIPPING[name]
    h = jnp.array([0.01, 1.0, 0.05])
    g = jax.jit(jax.grad(lambda h: meta_loss(make(h), start(), 1, nan_at=0)))(h)
    np.testing.assert_array_equal(np.asarray(g), np.zeros(3))


@pytest.mark.parametrize("name", SKIPPING)
def test_a_skipped_step_in_a_run_is_as_if_it_never_happened(name):
    # Three updates with a NaN at the second: value and derivatives (with
    # respect to the hyperparameters and to the start) are those of the two
    # finite updates alone.
    make = SKIPPING[name]
    h = jnp.array([0.01, 1.0, 0.05])

    def with_nan(h, p):
        return meta_loss(make(h), p, 3, nan_at=1)

    def without(h, p):
        return meta_loss(make(h), p, 2)

    got = jax.jit(jax.value_and_grad(with_nan, argnums=(0, 1)))(h, start())
    want = jax.jit(jax.value_and_grad(without, argnums=(0, 1)))(h, start())
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.all(np.isfinite(np.asarray(a)))
        # An entry that is ~0 next to large ones (Adam's derivative with
        # respect to delta, next to the learning rate's ~765) is known to
        # float32 rounding at the large ones' scale: one ulp of the largest.
        scale = float(np.max(np.abs(np.asarray(b))))
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 + 1.2e-7 * scale
        )


# -- Optax's wrappers, checkpointing and export --------------------------------


def _wrappers():
    labels = {"w": "clipped", "b": "plain"}
    return {
        "lookahead": lambda tx: optax.lookahead(tx, sync_period=2, slow_step_size=0.5),
        "multi_transform": lambda tx: optax.multi_transform(
            {"clipped": tx, "plain": optax.sgd(0.01)}, labels
        ),
        "masked": lambda tx: optax.masked(tx, {"w": True, "b": False}),
        "apply_if_finite": lambda tx: optax.apply_if_finite(tx, 3),
        "multi_steps": lambda tx: optax.MultiSteps(tx, every_k_schedule=2),
        "named_chain": lambda tx: optax.named_chain(("opt", tx)),
        "schedule_free": lambda tx: optax.contrib.schedule_free(tx, 0.01),
        "sam": lambda tx: optax.contrib.sam(tx, optax.sgd(0.05), sync_period=2),
        "reduce_on_plateau": lambda tx: optax.chain(
            tx, optax.contrib.reduce_on_plateau(patience=1, cooldown=0)
        ),
    }


WRAPPERS = list(_wrappers())


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_optax_wrappers_give_the_same_derivative_as_around_optax_clip(wrapper):
    wrap = _wrappers()[wrapper]

    def run(make, lr):
        tx = wrap(make(lr))
        p = start()
        if wrapper == "lookahead":
            p = optax.LookaheadParams.init_synced(p)
        state = tx.init(p)
        for _ in range(4):
            fast = p.fast if wrapper == "lookahead" else p
            g = jax.grad(loss)(fast)
            extra = {"value": loss(fast)} if wrapper == "reduce_on_plateau" else {}
            u, state = tx.update(g, state, p, **extra)
            p = optax.apply_updates(p, u)
        return loss(p.fast if wrapper == "lookahead" else p)

    def ours(lr):
        return rgc.gclip(lr, 1.0)

    def theirs(lr):
        return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(lr))

    got = jax.jit(jax.value_and_grad(lambda lr: run(ours, lr)))(0.01)
    want = jax.jit(jax.value_and_grad(lambda lr: run(theirs, lr)))(0.01)
    close(got[0], want[0], 1e-5)
    close(got[1], want[1], 1e-5)
    assert abs(float(got[1])) > 0.1


def test_checkpointed_step_gives_the_same_derivatives():
    def run(lr, remat):
        tx = rgc.delta_gclip(lr, 1.0, 0.05, momentum=0.5)
        p = start()
        state = tx.init(p)

        def step(p, state):
            u, state = tx.update(jax.grad(loss)(p), state, p)
            return optax.apply_updates(p, u), state

        step = jax.checkpoint(step) if remat else step
        for _ in range(3):
            p, state = step(p, state)
        return loss(p)

    close(
        jax.jit(jax.grad(lambda lr: run(lr, True)))(0.01),
        jax.jit(jax.grad(lambda lr: run(lr, False)))(0.01),
        1e-6,
    )


def test_export_for_several_platforms_runs_and_differentiates(path):
    # jax.export for CPU, CUDA and TPU at once; the exported function runs
    # here, and its derivative is the jitted one's.
    from jax import export

    def meta(lr):
        tx = rgc.delta_gclip(lr, 1.0, 0.05, momentum=0.5)
        return meta_loss(tx, start(), 2)

    exported = export.export(jax.jit(meta), platforms=("cpu", "cuda", "tpu"))(
        jax.ShapeDtypeStruct((), jnp.float32)
    )
    assert exported.platforms == ("cpu", "cuda", "tpu")
    lr = jnp.float32(0.01)
    close(exported.call(lr), meta(lr), 1e-6)
    close(jax.grad(exported.call)(lr), jax.grad(meta)(lr), 1e-5)

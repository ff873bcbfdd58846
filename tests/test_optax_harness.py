"""Our public factories held to what Optax's own tests demand of its optimizers.

Written after reading Optax 0.2.8's ``optax/_src/alias_test.py`` (the generic
optimizer tests), ``optax/_src/float64_test.py``, ``optax/schedules/
_inject_test.py``, ``optax/transforms/_clipping_test.py`` and
``optax/_src/sharding_test.py`` (whose 8-device cases run in
tests/multidevice_cases.py): optimization of a parabola and the Rosenbrock
function, extra arguments, ``inject_hyperparams`` (with default arguments and
without params), ``MultiSteps``, dtype preservation, state shape/dtype
stability across steps for every leaf dtype with and without x64, mixed
float32/float64 leaves, abstract init, and ``tree_map_params``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rgclip_optax as rgc
from tests import factories
from tests.factories import FACTORIES, OPTIMIZERS

OPT_IDS = [c[0] for c in OPTIMIZERS]
FACTORY_IDS = [c[0] for c in FACTORIES]


def make(case):
    _, factory, kwargs = case
    return factory(**kwargs)


def parabola(dtype):
    start = jnp.array([-1.0, 10.0, 1.0], dtype)
    target = jnp.array([1.0, -1.0, 1.0], dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        target = target * (1 + 1j)
    return start, target, lambda p: jnp.sum(jnp.abs(p - target) ** 2)


def rosenbrock(dtype):
    a = 1.0 + 1j if jnp.issubdtype(dtype, jnp.complexfloating) else 1.0
    start = jnp.zeros(2, dtype)
    target = jnp.array([a, a**2], dtype)

    def objective(p):
        return jnp.abs(a - p[0]) ** 2 + 100.0 * jnp.abs(p[1] - p[0] ** 2) ** 2

    return start, target, objective


def grad_step(tx, objective):
    def step(params, state):
        # Complex gradients are conjugated before they are applied (as in
        # Optax's own tests).
        g = jax.tree.map(jnp.conj, jax.grad(objective)(params))
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    return step


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex64])
@pytest.mark.parametrize("target", [parabola, rosenbrock])
@pytest.mark.parametrize("case", OPTIMIZERS, ids=OPT_IDS)
def test_optimization(case, target, dtype):
    tx = make(case)
    start, final, objective = target(dtype)
    state = tx.init(start)
    # A no-op map over the params-shaped parts of the state must work.
    state = optax.tree_utils.tree_map_params(tx, lambda v: v, state)
    step = grad_step(tx, objective)
    params, _ = jax.jit(
        lambda p, s: jax.lax.fori_loop(0, 20_000, lambda _, c: step(*c), (p, s))
    )(start, state)
    np.testing.assert_allclose(params, final, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("case", OPTIMIZERS, ids=OPT_IDS)
def test_update_accepts_extra_args(case):
    tx = make(case)
    params, _, objective = rosenbrock(jnp.float32)
    state = tx.init(params)
    g = jax.grad(objective)(params)
    updates, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, unexpected_arg=1))(
        g, state, params
    )
    assert jnp.all(jnp.isfinite(updates)) and jnp.any(updates != 0)


def _dtypes(tree):
    return jax.tree.map(lambda x: x.dtype, tree)


def _inject(factory, kwargs, **options):
    """``optax.inject_hyperparams`` of a factory; a callable ``mask`` is kept
    static (Optax would take any callable for a schedule), as Optax's own
    ``add_decayed_weights`` needs."""
    static = ("mask",) if callable(kwargs.get("mask")) else ()
    return optax.inject_hyperparams(factory, static_args=static, **options)(**kwargs)


def _tree_params():
    return [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]


def _tree_grads():
    # norm sqrt(6 * 4 + 20 * 900) ~ 134, so every threshold clips.
    return [jnp.full((2, 3), 2.0), jnp.full((2, 5, 2), -30.0)]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", FACTORIES, ids=FACTORY_IDS)
def test_inject_hyperparams_with_defaults_matches_the_plain_factory(case, jit):
    _, factory, kwargs = case
    plain = factory(**kwargs)
    injected = _inject(factory, kwargs)
    wrap = jax.jit if jit else (lambda f: f)
    params, grads = _tree_params(), _tree_grads()
    args = (params,) if factories.needs_params(kwargs) else ()

    u, s = wrap(plain.update)(grads, wrap(plain.init)(params), *args)
    ui, si = wrap(injected.update)(grads, wrap(injected.init)(params), *args)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ui, u
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), si.inner_state, s
    )
    # And a second step from the injected state keeps every dtype.
    _, si2 = wrap(injected.update)(grads, si, *args)
    assert _dtypes(si2) == _dtypes(si)


@pytest.mark.parametrize(
    "factory", [rgc.scale_by_delta_gclip, rgc.delta_gclip, rgc.gclip]
)
def test_inject_hyperparams_update_needs_no_params_without_decay(factory):
    # Optax's pattern for scheduling a clipping threshold: every numeric default
    # is traced, and update is called without params.
    kwargs = {"gamma": 0.1}
    if factory is not rgc.scale_by_delta_gclip:
        kwargs["learning_rate"] = 1.0
    tx = optax.inject_hyperparams(factory)(**kwargs)
    params = jnp.zeros((3, 5, 7))
    state = jax.jit(tx.init)(params)
    assert set(state.hyperparams) >= {"gamma"}
    assert "weight_decay" not in state.hyperparams  # None stays static
    update = jax.jit(tx.update)
    grads = jnp.ones_like(params)
    for gamma in [1.0, 2.0, 3.0]:
        state.hyperparams["gamma"] = jnp.asarray(gamma)
        updates, state = update(grads, state)
        # |g| = sqrt(105) ~ 10.2 lies between gamma and gamma / delta (the
        # default delta is 1e-3): every step is clipped to norm gamma * lr.
        np.testing.assert_allclose(jnp.linalg.norm(updates.ravel()), gamma, rtol=1e-5)


def test_inject_hyperparams_can_schedule_gamma():
    schedule = optax.piecewise_constant_schedule(1.0, {2: 3.0})
    tx = optax.inject_hyperparams(rgc.scale_by_delta_gclip)(gamma=schedule, delta=0.0)
    state = tx.init(jnp.zeros(4))
    norms = []
    for _ in range(4):
        u, state = jax.jit(tx.update)(jnp.full(4, 50.0), state)
        norms.append(float(jnp.linalg.norm(u)))
    np.testing.assert_allclose(norms, [1.0, 1.0, 3.0, 3.0], rtol=1e-6)


def test_inject_hyperparams_rejects_a_traced_decay_without_params():
    # An explicit weight_decay=0.0 is traced by inject_hyperparams, so it is not
    # known to be zero: update without params says what to do.
    tx = optax.inject_hyperparams(rgc.delta_gclip)(0.1, 1.0, weight_decay=0.0)
    state = tx.init(jnp.ones(2))
    tx.update(jnp.ones(2), state)  # eagerly the 0.0 is concrete: no decay
    with pytest.raises(ValueError, match="weight_decay=None"):
        jax.jit(tx.update)(jnp.ones(2), state)


@pytest.mark.parametrize("hyperparam_dtype", [None, jnp.bfloat16])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", FACTORIES, ids=FACTORY_IDS)
def test_inject_hyperparams_state_dtypes_are_stable(
    case, param_dtype, hyperparam_dtype
):
    # inject_hyperparams gives the hyperparameters the params' dtype (or an
    # explicit one); the state must keep its dtypes across steps regardless.
    _, factory, kwargs = case
    tx = _inject(factory, kwargs, hyperparam_dtype=hyperparam_dtype)
    params = [p.astype(param_dtype) for p in _tree_params()]
    grads = [g.astype(param_dtype) for g in _tree_grads()]
    state0 = jax.jit(tx.init)(params)
    step = jax.jit(tx.update)
    u, state1 = step(grads, state0, params)
    _, state2 = step(grads, state1, params)
    dtypes = _dtypes(state0)
    assert _dtypes(state1) == dtypes
    assert _dtypes(state2) == dtypes
    assert [x.dtype for x in u] == [g.dtype for g in grads]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("case", OPTIMIZERS, ids=OPT_IDS)
def test_multisteps_accumulates_and_then_steps_once(case, dtype):
    k = 4
    inner = make(case)
    tx = optax.MultiSteps(inner, every_k_schedule=k)
    params = jnp.array([1.0, 2.0], dtype)
    grads = [jnp.array([3.0, -4.0], dtype) * (i + 1) for i in range(k)]
    state = jax.jit(tx.init)(params)
    update = jax.jit(tx.update)
    for g in grads[:-1]:
        u, state = update(g, state, params)
        np.testing.assert_array_equal(u, jnp.zeros_like(g))
        assert u.dtype == g.dtype
    u, state = update(grads[-1], state, params)
    # The k-th call steps once, with the mean gradient.
    mean = sum(g.astype(jnp.float32) for g in grads) / k
    expected, _ = inner.update(mean.astype(dtype), inner.init(params), params)
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(
        np.asarray(u, np.float32), np.asarray(expected, np.float32), rtol=tol, atol=tol
    )
    assert u.dtype == dtype


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
    "dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.complex64]
)
@pytest.mark.parametrize("case", OPTIMIZERS, ids=OPT_IDS)
def test_updates_keep_the_gradient_dtype(case, dtype, jit):
    tx = make(case)
    wrap = jax.jit if jit else (lambda f: f)
    params = jnp.array([1.0, 2.0], dtype)
    grads = jax.grad(lambda x: jnp.sum(jnp.abs(x) ** 2).real)(params)
    updates, _ = wrap(tx.update)(grads, wrap(tx.init)(params), params)
    assert updates.dtype == grads.dtype


LEAF_DTYPES = [
    jnp.float8_e4m3fn,
    jnp.float8_e5m2,
    jnp.float16,
    jnp.bfloat16,
    jnp.float32,
    jnp.float64,
    jnp.complex64,
    jnp.complex128,
]


def _types(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.dtype(x.dtype)), tree)


# Every leaf dtype with x64 on, and those that exist without it with x64 off.
DTYPE_X64 = [
    pytest.param(dtype, x64, id=f"{jnp.dtype(dtype).name}-{'x64' if x64 else 'x32'}")
    for dtype in LEAF_DTYPES
    for x64 in (False, True)
    if x64 or jnp.dtype(dtype) not in (jnp.float64, jnp.complex128)
]


@pytest.mark.parametrize(("dtype", "x64"), DTYPE_X64)
@pytest.mark.parametrize("case", OPTIMIZERS, ids=OPT_IDS)
def test_state_shape_and_dtype_are_stable_across_steps(case, dtype, x64):
    with jax.enable_x64(x64):
        tx = make(case)
        start = jnp.array([-1.0, 10.0, 1.0], jnp.float32)
        target = jnp.array([1.0, -1.0, 1.0], jnp.float32)
        params = start.astype(dtype)

        @jax.jit
        def step(params, state, key):
            # The parabola's gradient, computed in float32 and cast (float8
            # has no arithmetic of its own).
            wide = jnp.complex64 if jnp.iscomplexobj(params) else jnp.float32
            g = (2.0 * (params.astype(wide) - target)).astype(dtype)
            # As Optax's test does: a conditional whose branches must agree
            # on the state's types, so any drift fails to trace.
            updates, state = jax.lax.cond(
                jax.random.bernoulli(key),
                lambda: tx.update(g, state, params),
                lambda: (jnp.zeros_like(params), state),
            )
            return optax.apply_updates(params, updates), state

        state0 = tx.init(params)
        types = _types(state0)
        state = state0
        for i in range(3):
            params, state = step(params, state, jax.random.key(i))
            assert params.dtype == dtype
            assert _types(state) == types
        # Unjitted, one step: the same types.
        _, state_eager = tx.update(params, state0, params)
        assert _types(state_eager) == types


@pytest.mark.parametrize("case", OPTIMIZERS, ids=OPT_IDS)
def test_mixed_float32_and_float64_leaves_under_x64(case):
    with jax.enable_x64(True):
        tx = make(case)
        params = (
            jnp.array([1.0, 2.0], jnp.float32),
            jnp.array([3.0, 4.0], jnp.float64),
        )
        grads = (
            jnp.array([10.0, 21.0], jnp.float32),
            jnp.array([33.0, 42.0], jnp.float64),
        )
        for update in (tx.update, jax.jit(tx.update)):
            state = tx.init(params)
            updates, new_state = update(grads, state, params)
            assert _types(new_state) == _types(state)
            new_params = optax.apply_updates(params, updates)
            assert [p.dtype for p in new_params] == [jnp.float32, jnp.float64]
        # The float64 leaf's sum of squares is not truncated to float32 on the
        # way (x64 must not be switched off inside the norm).
        norm = rgc.global_norm(grads)
        exact = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads))
        np.testing.assert_allclose(float(norm), exact, rtol=1e-7)


def test_the_norm_of_float64_leaves_keeps_x64_on(recwarn):
    # Regression: the XLA:CPU path switched x64 off around each reduction, so a
    # float64 leaf was summed in float32 (JAX warned it truncated the dtype).
    with jax.enable_x64(True):
        jax.jit(rgc.global_norm)([jnp.ones(3, jnp.float64)]).block_until_ready()
    assert not [w for w in recwarn if "truncated" in str(w.message)]


@pytest.mark.parametrize("case", OPTIMIZERS, ids=OPT_IDS)
def test_init_works_on_abstract_params(case):
    tx = make(case)
    params = {"w": jax.ShapeDtypeStruct((2, 4, 8), jnp.float32),
              "b": jax.ShapeDtypeStruct((8,), jnp.bfloat16)}  # fmt: skip
    direct = tx.init(params)  # Optax's optimizers accept ShapeDtypeStructs
    abstract = jax.eval_shape(tx.init, params)
    assert jax.tree.structure(direct) == jax.tree.structure(abstract)
    concrete = tx.init(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params))
    assert jax.tree.map(lambda s: (s.shape, s.dtype), abstract) == jax.tree.map(
        lambda x: (x.shape, x.dtype), concrete
    )

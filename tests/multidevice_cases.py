"""Multi-device checks, run by tests/test_multidevice.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before jax loads).

Usage: python tests/multidevice_cases.py CASE
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rgclip_optax as rgc

jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8, jax.devices()
MESH = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def problem():
    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(rng.normal(size=(16, 64)) / 4, jnp.float32),
        "b1": jnp.zeros((64,), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(64, 8)) / 8, jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(64, 8)) * 30, jnp.float32)
    return params, x, y


def loss_fn(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean(jnp.sum((h @ p["w2"] - y) ** 2, -1))


def make_tx():
    return rgc.delta_gclip(0.05, gamma=1.0, delta=0.05, momentum=0.9)


def train(params, x, y, steps, shardings=None):
    tx = make_tx()

    def step(p, s, x, y):
        g = jax.grad(loss_fn)(p, x, y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    if shardings is None:
        step = jax.jit(step, donate_argnums=(0, 1))
    else:
        p_sh, s_sh, x_sh = shardings
        step = jax.jit(
            step,
            in_shardings=(p_sh, s_sh, x_sh, x_sh),
            out_shardings=(p_sh, s_sh),
            donate_argnums=(0, 1),
        )
    params = jax.tree.map(jnp.copy, params)  # donated below; keep the caller's
    state = tx.init(params)
    if shardings is not None:
        state = jax.device_put(state, shardings[1])
    kinds, norms = [], []
    for _ in range(steps):
        params, state = step(params, state, x, y)
        kinds.append(jax.tree.map(lambda a: a.sharding, state))
        norms.append(float(optax.tree.get(state, "grad_norm")))
    return params, state, kinds, norms


def compare_to_single_device(params_spec):
    params, x, y = problem()
    ref_p, _, _, ref_norms = train(jax.device_put(params, jax.devices()[0]), x, y, 5)

    p_sh = jax.tree.map(lambda spec: NamedSharding(MESH, spec), params_spec)
    x_sh = NamedSharding(MESH, P("data"))
    abstract = jax.eval_shape(make_tx().init, params)
    # The optimizer state follows the params: momentum leaves get the param
    # sharding; the rule's scalars and the schedule's count are replicated.
    s_sh = optax.tree_map_params(
        make_tx().init,
        lambda _, spec: NamedSharding(MESH, spec),
        abstract,
        params_spec,
        transform_non_params=lambda _: NamedSharding(MESH, P()),
    )
    sharded_params = jax.device_put(params, p_sh)
    xs, ys = jax.device_put(x, x_sh), jax.device_put(y, x_sh)
    new_p, state, kinds, norms = train(sharded_params, xs, ys, 5, (p_sh, s_sh, x_sh))

    for a, b in zip(jax.tree.leaves(new_p), jax.tree.leaves(ref_p), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-6)
    assert all(k == kinds[0] for k in kinds), "state shardings changed across steps"
    # The momentum buffers keep the parameters' shardings: no gather.
    trace = state[1].trace
    for name, spec in params_spec.items():
        assert trace[name].sharding.spec == spec, (name, trace[name].sharding)
        assert new_p[name].sharding.spec == spec
    return norms


def case_data_parallel():
    norms = compare_to_single_device({"w1": P(), "b1": P(), "w2": P()})
    assert max(norms) > 1.0 / 0.05  # the δ floor was active


def case_fsdp():
    compare_to_single_device(
        {"w1": P(None, "data"), "b1": P("data"), "w2": P("data", None)}
    )


def put(tree, specs):
    return jax.device_put(tree, jax.tree.map(lambda sp: NamedSharding(MESH, sp), specs))


def case_shard_map_axis_name():
    rng = np.random.default_rng(1)
    g = {
        "sharded": jnp.asarray(rng.normal(size=(64,)) * 10, jnp.float32),
        "rep": jnp.asarray(rng.normal(size=(5,)) * 10, jnp.float32),
    }
    specs = {"sharded": P("data"), "rep": P()}
    mask = {"sharded": False, "rep": True}
    expected_norm = float(rgc.global_norm(g))
    g_host = g
    g = put(g, specs)

    def norm_in(gs, replicated):
        return rgc.global_norm(gs, axis_name="data", replicated=replicated)

    f = jax.jit(
        jax.shard_map(
            lambda gs: norm_in(gs, mask), mesh=MESH, in_specs=(specs,), out_specs=P()
        )
    )
    np.testing.assert_allclose(float(f(g)), expected_norm, rtol=1e-6)
    # A callable mask works too; with no mask, the replicated leaf would be
    # counted 8 times (documented pitfall), so the norm is larger.
    f2 = jax.jit(
        jax.shard_map(
            lambda gs: norm_in(gs, lambda t: {"sharded": False, "rep": True}),
            mesh=MESH,
            in_specs=(specs,),
            out_specs=P(),
        )
    )
    np.testing.assert_allclose(float(f2(g)), expected_norm, rtol=1e-6)
    naive = np.sqrt(
        np.sum(np.asarray(g_host["sharded"]) ** 2)
        + 8 * np.sum(np.asarray(g_host["rep"]) ** 2)
    )
    f3 = jax.jit(
        jax.shard_map(
            lambda gs: (
                jax.lax.psum(rgc.global_norm(gs["sharded"]) ** 2, "data")
                + 8 * rgc.global_norm(gs["rep"]) ** 2
            ),
            mesh=MESH,
            in_specs=(specs,),
            out_specs=P(),
        )
    )
    np.testing.assert_allclose(np.sqrt(float(f3(g))), naive, rtol=1e-6)

    # The whole update inside shard_map equals the single-device update.
    for name, kw in [("global", {}), ("per_tensor", {"norm": "per_tensor"})]:
        tx_local = rgc.delta_gclip(
            0.1, 1.0, 0.05, axis_name="data", replicated=mask, **kw
        )
        tx_ref = rgc.delta_gclip(0.1, 1.0, 0.05, **kw)
        ref_u, ref_s = tx_ref.update(g_host, tx_ref.init(g_host))

        def upd(gs, tx=tx_local):
            u, s = tx.update(gs, tx.init(gs))
            return u, optax.tree.get(s, "grad_norm")

        out_norm_spec = P() if name == "global" else {"sharded": P(), "rep": P()}
        fu = jax.jit(
            jax.shard_map(
                upd, mesh=MESH, in_specs=(specs,), out_specs=(specs, out_norm_spec)
            )
        )
        u, n = fu(g)
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ref_u), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
        for a, b in zip(
            jax.tree.leaves(n),
            jax.tree.leaves(optax.tree.get(ref_s, "grad_norm")),
            strict=True,
        ):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def case_pmean_needs_no_axis_name():
    params, x, y = problem()
    tx = make_tx()

    def local_step(p, s, xb, yb):
        g = jax.grad(loss_fn)(p, xb, yb)
        g = jax.lax.pmean(g, "data")  # replicated, averaged gradient
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    rep = jax.tree.map(lambda _: P(), params)
    state = tx.init(params)
    state_spec = jax.tree.map(lambda _: P(), state)
    f = jax.jit(
        jax.shard_map(
            local_step,
            mesh=MESH,
            in_specs=(rep, state_spec, P("data"), P("data")),
            out_specs=(rep, state_spec),
            # Classic pmap-style data parallelism: local gradients, then pmean.
            check_vma=False,
        )
    )
    p, s = put(params, rep), put(state, state_spec)
    xs, ys = put(x, P("data")), put(y, P("data"))
    for _ in range(5):
        p, s = f(p, s, xs, ys)
    ref_p, _, _, ref_norms = train(params, x, y, 5)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_p), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        float(optax.tree.get(s, "grad_norm")), ref_norms[-1], rtol=1e-6
    )


def case_pmap_axis_name():
    g = jnp.arange(8 * 4, dtype=jnp.float32).reshape(8, 4)
    out = jax.pmap(lambda x: rgc.global_norm(x, axis_name="i"), axis_name="i")(g)
    np.testing.assert_allclose(
        np.asarray(out), np.full(8, np.linalg.norm(np.asarray(g))), rtol=1e-6
    )


def case_explicit_sharding():
    # jax.make_mesh as a user writes it: in jax 0.10 its axes are Explicit, so
    # shardings are part of the types. Leaves sharded along any axis.
    from jax.sharding import AxisType

    mesh = jax.make_mesh((4, 2), ("x", "y"))
    if mesh.axis_types != (AxisType.Explicit, AxisType.Explicit):
        mesh = jax.make_mesh((4, 2), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)
    rng = np.random.default_rng(2)
    specs = {
        "last": P(None, "x"),
        "first": P("x", None),
        "both": P("y", "x"),
        "vec": P("x"),
        "rep": P(),
        "bf16": P(None, "y"),
    }
    host = {
        "last": rng.normal(size=(6, 8)) * 20,
        "first": rng.normal(size=(8, 3)) * 20,
        "both": rng.normal(size=(4, 8)) * 20,
        "vec": rng.normal(size=(16,)) * 20,
        "rep": rng.normal(size=(5,)) * 20,
        "bf16": rng.normal(size=(3, 4)) * 20,
    }
    host = {
        k: jnp.asarray(v, jnp.bfloat16 if k == "bf16" else jnp.float32)
        for k, v in host.items()
    }
    shard = {k: NamedSharding(mesh, sp) for k, sp in specs.items()}
    params = jax.device_put(host, shard)
    grads = jax.device_put(jax.tree.map(lambda a: a * 3 + 1, host), shard)
    with jax.set_mesh(mesh):
        expected = np.sqrt(
            sum(
                float(np.sum(np.asarray(g, np.float64) ** 2))
                for g in jax.tree.leaves(jax.tree.map(lambda a: a * 3 + 1, host))
            )
        )
        for path in ("cpu", "tpu", "gpu"):
            with rgc.target_platform(path):
                got = jax.jit(lambda t: rgc.global_norm(t))(grads)
                np.testing.assert_allclose(float(got), expected, rtol=1e-6)
                for kw in ({"momentum": 0.9}, {"norm": "per_tensor"}):
                    tx = rgc.delta_gclip(0.1, 1.0, 0.05, **kw)
                    state = tx.init(params)
                    types0 = [jax.typeof(a).sharding for a in jax.tree.leaves(state)]

                    @jax.jit
                    def step(p, s, g, tx=tx):
                        u, s = tx.update(g, s, p)
                        return optax.apply_updates(p, u), s

                    p, s = params, state
                    for _ in range(2):
                        p, s = step(p, s, grads)
                        types = [jax.typeof(a).sharding for a in jax.tree.leaves(s)]
                        assert types == types0, (types, types0)
                    for k in specs:
                        assert p[k].sharding.is_equivalent_to(shard[k], p[k].ndim), k
                    # The same two steps on one device, unsharded.
                    ref_p, ref_s = host, tx.init(host)
                    for _ in range(2):
                        u, ref_s = tx.update(
                            jax.tree.map(lambda a: a * 3 + 1, host), ref_s, ref_p
                        )
                        ref_p = optax.apply_updates(ref_p, u)
                    for k in specs:
                        np.testing.assert_allclose(
                            np.asarray(p[k], np.float32),
                            np.asarray(ref_p[k], np.float32),
                            rtol=1e-2 if k == "bf16" else 1e-6,
                            atol=1e-6,
                        )


def case_state_sharding_types():
    # Optax's sharding tests, for every public factory and option: with an
    # Explicit mesh the state's types (dtype, shape and sharding) are the same
    # after init, jit(init), update and jit(update), step after step.
    from jax.sharding import AxisType

    from tests.factories import OPTIMIZERS

    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
    sharding = NamedSharding(mesh, P(None, "x"))
    with jax.set_mesh(mesh):
        for dtype in (jnp.float16, jnp.float32):
            params = jax.device_put(jnp.full((2, 8, 4), 0.5, dtype), sharding)
            grads = jax.device_put(jnp.full((2, 8, 4), 30.0, dtype), sharding)
            for name, factory, kwargs in OPTIMIZERS:
                tx = factory(**kwargs)
                state0 = tx.init(params)
                types = jax.tree.map(jax.typeof, state0)
                assert jax.tree.map(jax.typeof, jax.jit(tx.init)(params)) == types
                _, eager = tx.update(grads, state0, params)
                assert jax.tree.map(jax.typeof, eager) == types, name
                step = jax.jit(tx.update)
                state = state0
                for _ in range(2):
                    updates, state = step(grads, state, params)
                    assert jax.tree.map(jax.typeof, state) == types, name
                    assert jax.typeof(updates) == jax.typeof(grads), name


if __name__ == "__main__":
    globals()["case_" + sys.argv[1]]()
    print("ok", sys.argv[1])

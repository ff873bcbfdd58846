"""One process of a 2-process CPU "cluster", run by tests/test_multihost.py.

Each process has 4 simulated CPU devices; ``jax.distributed`` joins them over
127.0.0.1 with gloo collectives into one 8-device mesh. The FSDP-sharded
δ-GClip steps must equal the same steps on one device.

Usage: python tests/multihost_cases.py PROCESS_ID PORT
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rgclip_optax as rgc


def main() -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    # Importing creates no backend; this must come before the first device query.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    process_id, port = int(sys.argv[1]), int(sys.argv[2])
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=120,
    )
    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    rng = np.random.default_rng(0)  # the same data on both processes
    host = {
        "w1": (rng.normal(size=(16, 64)) / 4).astype(np.float32),
        "b1": np.zeros((64,), np.float32),
        "w2": (rng.normal(size=(64, 8)) / 8).astype(np.float32),
    }
    x = rng.normal(size=(64, 16)).astype(np.float32)
    y = (rng.normal(size=(64, 8)) * 30).astype(np.float32)
    specs = {"w1": P(None, "data"), "b1": P("data"), "w2": P("data", None)}

    def loss_fn(p, x, y):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return jnp.mean(jnp.sum((h @ p["w2"] - y) ** 2, -1))

    tx = rgc.delta_gclip(0.05, gamma=1.0, delta=0.05, momentum=0.9)

    def step(p, s, x, y):
        g = jax.grad(loss_fn)(p, x, y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    def global_array(a, spec):
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    params = {k: global_array(v, specs[k]) for k, v in host.items()}
    xs, ys = global_array(x, P("data")), global_array(y, P("data"))
    state = tx.init(params)
    norms = []
    sharded_step = jax.jit(step)
    for _ in range(5):
        params, state = sharded_step(params, state, xs, ys)
        norms.append(float(state[0].grad_norm.addressable_data(0)))  # replicated
    got = multihost_utils.process_allgather(params, tiled=True)

    # The same five steps on one local device.
    local = jax.local_devices()[0]
    p1 = jax.device_put(host, local)
    s1 = tx.init(p1)
    x1, y1 = jax.device_put(x, local), jax.device_put(y, local)
    ref_norms = []
    for _ in range(5):
        p1, s1 = jax.jit(step)(p1, s1, x1, y1)
        ref_norms.append(float(s1[0].grad_norm))

    np.testing.assert_allclose(norms, ref_norms, rtol=1e-6)
    assert max(norms) > 1.0 / 0.05  # the δ floor was active
    for k in host:
        np.testing.assert_allclose(
            np.asarray(got[k]), np.asarray(p1[k]), rtol=1e-6, atol=1e-7
        )
    print(f"ok process {process_id}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()

"""Orbax checkpoint round trip, run by tests/test_checkpoint.py in fresh processes.

Usage: python tests/checkpoint_cases.py {full,first,resume} DIR [fixed|adaptive]
  full:   10 steps uninterrupted, final params and state to DIR/full.npz
  first:  5 steps, then an Orbax checkpoint of params + optimizer state in DIR/ckpt
  resume: restore DIR/ckpt (in a new process), 5 more steps, to DIR/resumed.npz
Step 2 has a NaN gradient, so nonfinite_count, the schedule's step and the
momentum all matter; ``adaptive`` uses ``zscore_gamma`` (its statistics in
the state) inside ``skip_and_round`` with spike skipping (its windows too),
and an outlier gradient at step 7, after the checkpoint.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import rgclip_optax as rgc

TOTAL, SPLIT = 10, 5


def setup(variant="fixed"):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "b": jnp.zeros(4)}
    x = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(32, 4)) * 40, jnp.float32)
    sched = optax.exponential_decay(0.05, transition_steps=1, decay_rate=0.9)
    if variant == "fixed":
        tx = rgc.delta_gclip(sched, gamma=1.0, delta=0.05, momentum=0.9)
    else:
        tx = rgc.skip_and_round(
            optax.chain(
                rgc.scale_by_delta_gclip(
                    rgc.zscore_gamma(warmup=2), 0.05, wide_updates=True
                ),
                optax.trace(0.9),
                optax.scale_by_learning_rate(sched),
            ),
            spike_sigmas=3.0, spike_window=4, spike_warmup=3,
        )  # fmt: skip

    @jax.jit
    def step(p, s, t):
        g = jax.grad(lambda p: jnp.mean(jnp.sum((x @ p["w"] + p["b"] - y) ** 2, -1)))(p)
        g = jax.tree.map(lambda a: jnp.where(t == 2, jnp.nan, a), g)
        g = jax.tree.map(lambda a: jnp.where(t == 7, 1e3 * a, a), g)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return params, tx, step


def run(p, s, step, start, stop):
    for t in range(start, stop):
        p, s = step(p, s, jnp.asarray(t))
    return p, s


def save_npz(path, p, s):
    leaves = jax.tree.leaves((p, s))
    np.savez(path, *[np.asarray(a) for a in leaves])


def main(mode, out, variant="fixed"):
    params, tx, step = setup(variant)
    ckpt_dir = (out / "ckpt").resolve()
    if mode == "full":
        p, s = run(params, tx.init(params), step, 0, TOTAL)
        if variant == "adaptive":  # the outlier at step 7 was a spike
            assert int(optax.tree.get(s, "spike_count")) == 1
            # The NaN step is not taken in; the spike is, clipped (the rule logs
            # every step it sees).
            assert int(rgc.read_clip_state(s).threshold_stats.seen) == 9
        save_npz(out / "full.npz", p, s)
    elif mode == "first":
        p, s = run(params, tx.init(params), step, 0, SPLIT)
        assert int(optax.tree.get(s, "nonfinite_count")) == 1
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(ckpt_dir, {"params": p, "opt_state": s})
    elif mode == "resume":
        # The target is abstract: init works under eval_shape.
        abstract = jax.eval_shape(
            lambda p: {"params": p, "opt_state": tx.init(p)}, params
        )
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(ckpt_dir, abstract)
        p, s = restored["params"], restored["opt_state"]
        assert int(optax.tree.get(s, "nonfinite_count")) == 1
        p, s = run(p, s, step, SPLIT, TOTAL)
        save_npz(out / "resumed.npz", p, s)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:])
    print("ok", sys.argv[1])

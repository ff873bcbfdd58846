"""The declared minimum versions, for CI.

    python .ci/minimum.py pins    # pyproject's minimums as == pins
    python .ci/minimum.py smoke   # import, and a few steps of each optimizer

``pins`` prints the library's dependencies and the test extra's Flax and
Equinox with ``>=`` read as ``==``, so CI installs exactly what
pyproject.toml declares (Python 3.11 reads it with tomllib).
"""

from __future__ import annotations

import sys
from pathlib import Path

PINNED_EXTRAS = ("flax", "equinox")


def pins() -> str:
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    project = tomllib.loads(pyproject.read_text())["project"]
    test = project["optional-dependencies"]["test"]
    reqs = project["dependencies"] + [r for r in test if r.startswith(PINNED_EXTRAS)]
    assert all(">=" in r for r in reqs), reqs
    return " ".join(r.replace(">=", "==") for r in reqs)


def smoke() -> None:
    import jax
    import jax.numpy as jnp
    import jaxlib
    import optax

    import rgclip_optax as rgc

    print(
        "jax", jax.__version__, "jaxlib", jaxlib.__version__, "optax", optax.__version__
    )
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}

    def loss(p: dict) -> jax.Array:
        return 100.0 * jnp.sum((p["w"].sum(0) + p["b"] - 1.0) ** 2)

    optimizers = {
        "delta_gclip": rgc.delta_gclip(0.01, 1.0, 0.01),
        "momentum": rgc.delta_gclip(0.01, 1.0, 0.01, momentum=0.9),
        "per_tensor": rgc.delta_gclip(0.01, 1.0, 0.01, norm="per_tensor"),
        "inject_hyperparams": optax.inject_hyperparams(rgc.delta_gclip)(0.01, 1.0),
        "in_front_of_adam": rgc.skip_and_round(
            optax.chain(
                rgc.scale_by_delta_gclip(1.0, 0.01, wide_updates=True),
                optax.scale_by_adam(),
                optax.scale_by_learning_rate(0.05),
            )
        ),
    }
    for name, tx in optimizers.items():

        def step(p: dict, s: object, tx: optax.GradientTransformation = tx) -> tuple:
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, u), s

        p, state = params, tx.init(params)
        losses = [float(loss(p))]
        for _ in range(5):
            p, state = jax.jit(step)(p, state)
            losses.append(float(loss(p)))
        assert losses[-1] < losses[0], (name, losses)
        log = rgc.read_clip_state(state)
        print(
            f"{name}: loss {losses[0]:.1f} -> {losses[-1]:.1f}, grad_norm",
            log.grad_norm,
        )


if __name__ == "__main__":
    if sys.argv[1:] == ["pins"]:
        print(pins())
    elif sys.argv[1:] == ["smoke"]:
        smoke()
    else:
        sys.exit("usage: python .ci/minimum.py pins|smoke")

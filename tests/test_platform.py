"""Which implementation of the norm a step is built with (``_platform``)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rgclip_optax as rgc
from rgclip_optax import _platform


def _has_conditional(fn, *args):
    return "conditional" in jax.jit(fn).lower(*args).as_text("hlo")


def test_auto_takes_the_default_backend():
    assert jax.default_backend() == "cpu"
    assert _platform.norm_path() == "cpu"
    for platform, path in (("cpu", "cpu"), ("gpu", "gpu"), ("tpu", "portable")):
        with rgc.target_platform(platform):
            assert _platform.norm_path() == path
    assert _platform.norm_path() == "cpu"


@pytest.mark.parametrize("bad", ["cuda", "TPU", "", None, 1])
def test_an_unknown_platform_is_refused_with_the_allowed_values(bad):
    with pytest.raises(ValueError, match=r"target_platform must be one of .*got"):
        with rgc.target_platform(bad):
            pass


def test_only_the_chosen_implementation_is_traced():
    # The step's jaxpr holds one implementation: no platform switch, and the
    # CPU path's rescue conditional only when built for XLA:CPU.
    tree = [jnp.ones((8, 8)), jnp.ones(3)]
    tx = rgc.delta_gclip(0.1, 1.0, 0.01)
    state = tx.init(tree)

    def step(g, s):
        return tx.update(g, s, g)

    for platform, conds in (("cpu", 1), ("tpu", 0), ("gpu", 0)):
        with rgc.target_platform(platform):
            text = str(jax.make_jaxpr(step)(tree, state))
        assert "platform_index" not in text
        assert text.count("cond[") == conds, (platform, text)


def test_a_jitted_step_is_traced_again_under_another_setting():
    # The setting is in jit's cache key: no stale program is reused.
    traces = []

    @jax.jit
    def norm(t):
        traces.append(_platform.norm_path())
        return rgc.global_norm(t)

    x = jnp.array([3.0, 4.0])
    for platform in ("auto", "tpu", "auto", "gpu", "tpu"):
        with rgc.target_platform(platform):
            np.testing.assert_allclose(float(norm(x)), 5.0)
    assert traces == ["cpu", "portable", "gpu"]
    with rgc.target_platform("tpu"):
        assert not _has_conditional(rgc.global_norm, x)
    assert _has_conditional(rgc.global_norm, x)


def test_every_implementation_gives_the_same_step():
    g = {"w": jnp.linspace(-3.0, 5.0, 12).reshape(3, 4), "b": jnp.full(3, 1e30)}
    tx = rgc.delta_gclip(0.1, 1.0, 0.01, momentum=0.9)
    out = {}
    for platform in ("cpu", "tpu", "gpu"):
        with rgc.target_platform(platform):
            out[platform] = jax.jit(tx.update)(g, tx.init(g), g)
    for platform in ("tpu", "gpu"):
        for a, b in zip(
            jax.tree.leaves(out["cpu"]), jax.tree.leaves(out[platform]), strict=True
        ):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_the_environment_variable_sets_the_default():
    code = (
        "import jax.numpy as jnp, rgclip_optax as rgc\n"
        "from rgclip_optax import _platform\n"
        "print(_platform.norm_path())\n"
    )
    env = dict(os.environ, RGCLIP_OPTAX_TARGET_PLATFORM="tpu", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "portable"
    env["RGCLIP_OPTAX_TARGET_PLATFORM"] = "metal"
    bad = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert bad.returncode != 0
    assert "rgclip_optax_target_platform" in bad.stderr


@pytest.mark.skipif(
    not hasattr(getattr(jax.sharding, "AbstractDevice", object), "platform")
    and jax.__version_info__ < (0, 10),
    reason="AbstractDevice.platform comes with jax 0.10",
)
def test_auto_follows_the_platform_of_the_mesh_in_context(monkeypatch):
    # A deviceless TPU mesh says "tpu" while the default backend is the CPU;
    # here the mesh's platform is stood in for.
    monkeypatch.setattr(_platform, "_mesh_platform", lambda: "tpu")
    assert _platform.norm_path() == "portable"
    with rgc.target_platform("cpu"):  # the override wins
        assert _platform.norm_path() == "cpu"
    monkeypatch.setattr(_platform, "_mesh_platform", lambda: "cuda")
    assert _platform.norm_path() == "gpu"
    monkeypatch.undo()
    with jax.set_mesh(jax.make_mesh((1,), ("d",))):
        assert _platform._mesh_platform() == "cpu"
    assert _platform._mesh_platform() is None

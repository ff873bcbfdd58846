"""Which compiler the norm is built for: chosen once per trace, one path traced.

The norm has three implementations with the same values (``_norm`` says
why): XLA:CPU's (``_xla_cpu``), XLA:GPU's (``_xla_gpu``) and the portable one
that TPUs and every other backend get. Only the one that will be compiled is
traced, chosen from the devices of the mesh in context (``jax.set_mesh``),
else from the default backend, or from :func:`target_platform` where the
program is compiled for another platform than the one it is traced on and no
mesh says so (a deviceless, ahead-of-time compile for a TPU or a GPU).

The setting is a JAX configuration state that is part of ``jit``'s cache key
and trace context, so a step traced under one setting is never reused under
another (a plain environment variable read while tracing was: ``jit`` cached
the first program it traced). ``RGCLIP_OPTAX_TARGET_PLATFORM`` sets its
default when the library is imported. It uses ``jax._src.config.enum_state``,
the constructor of JAX's own context-manager flags, which is not public API:
tested on jax 0.8.0, 0.10.2 and 0.12.1 (``tests/test_platform.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
from jax._src import config as _jax_config

PLATFORMS = ("auto", "cpu", "gpu", "tpu")

_TARGET = _jax_config.enum_state(
    "rgclip_optax_target_platform",
    list(PLATFORMS),
    "auto",
    help="The compiler rgclip_optax builds its steps for: 'auto' (the default "
    "backend), 'cpu', 'gpu' (CUDA and ROCm) or 'tpu' (and every other "
    "backend).",
    include_in_jit_key=True,
    include_in_trace_context=True,
)


@contextlib.contextmanager
def target_platform(platform: str) -> Iterator[None]:
    """Builds the steps traced inside the block for ``platform``'s compiler.

    Only needed to compile for another platform than the default backend,
    ahead of time and without the device, outside ``jax.set_mesh``: for
    example a step lowered on a CPU host for a TPU topology
    (``jax.experimental.topologies``) or for an H100 target config, with
    shardings passed to ``jit`` only. Everywhere else the default,
    ``"auto"``, takes the platform of the mesh set with ``jax.set_mesh``
    (jax 0.10 and newer), else the default backend. The choice changes how
    the gradient norm is computed, never its value; a program built for
    another platform still runs and is correct, only slower.

    The setting is part of ``jit``'s cache key, so a step jitted once is
    traced again, not reused, under another setting. The environment variable
    ``RGCLIP_OPTAX_TARGET_PLATFORM`` sets the default before the library is
    imported.

    Args:
      platform: ``"auto"``, ``"cpu"``, ``"gpu"`` (CUDA and ROCm) or ``"tpu"``
        (also any other backend: the portable implementation).

    Raises:
      ValueError: for any other value.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import rgclip_optax as rgc
      >>> with rgc.target_platform("tpu"):
      ...     lowered = jax.jit(rgc.global_norm).lower(jnp.ones(4))
      >>> "conditional" in lowered.as_text()  # the CPU path's rescue branch
      False
    """
    if platform not in PLATFORMS:
        raise ValueError(
            f"target_platform must be one of {PLATFORMS}, got platform={platform!r}."
        )
    with _TARGET(platform):
        yield


def _mesh_platform() -> str | None:
    """The platform of the mesh set in context (``jax.set_mesh``), if any.

    ``AbstractDevice.platform`` exists from jax 0.10 (not in 0.8.0, where
    this falls back on the default backend); a mesh of deviceless TPU
    devices says ``"tpu"`` while the default backend is the CPU.
    """
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return getattr(device, "platform", None)


def norm_path() -> str:
    """``"cpu"``, ``"gpu"`` or ``"portable"``: the implementation to trace."""
    platform = _TARGET.value
    if platform == "auto":
        found = _mesh_platform() or jax.default_backend()
        platform = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(
            found, "tpu"
        )
    return {"cpu": "cpu", "gpu": "gpu", "tpu": "portable"}[platform]

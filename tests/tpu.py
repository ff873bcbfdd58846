"""Running a benchmark compiled for a TPU, without one, from a test.

libtpu comes from PyPI in its own environment (``jax[tpu]`` replaces the CPU
plugin's role), so the benchmark runs there as a subprocess; ``.ci/run`` sets
``RGCLIP_TPU_PYTHON`` to that environment's Python.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

needs_tpu_python = pytest.mark.skipif(
    not os.environ.get("RGCLIP_TPU_PYTHON"),
    reason="set RGCLIP_TPU_PYTHON to a Python with jax[tpu] (.ci/run does)",
)


def run_benchmark(script: str, out: Path, *args: str) -> dict:
    """``benchmarks/<script> ... --out out`` under ``RGCLIP_TPU_PYTHON``, on
    the library's own norm path selection; returns the JSON it wrote."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RGCLIP_OPTAX_TARGET_PLATFORM", None)
    # Deviceless compiles hold no TPU: tests running side by side (xdist)
    # need not wait for libtpu's one-process lock.
    env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    proc = subprocess.run(
        [os.environ["RGCLIP_TPU_PYTHON"], str(ROOT / "benchmarks" / script),
         *args, "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.with_suffix(".json").read_text())

"""The norm is global however the gradient is laid out, on 8 simulated devices.

Each case runs in its own process so that XLA_FLAGS can give it 8 CPU devices
before JAX starts; the cases live in tests/multidevice_cases.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES = [
    "data_parallel",
    "fsdp",
    "shard_map_axis_name",
    "pmean_needs_no_axis_name",
    "pmap_axis_name",
    "explicit_sharding",
    "state_sharding_types",
]


@pytest.mark.parametrize("case", CASES)
def test_multidevice(case):
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multidevice_cases.py"), case],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"ok {case}" in proc.stdout

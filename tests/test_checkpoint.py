"""A run resumed from an Orbax checkpoint in a fresh process is bit-identical."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_case(mode, out, variant):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    script = str(ROOT / "tests" / "checkpoint_cases.py")
    proc = subprocess.run(
        [sys.executable, script, mode, str(out), variant],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("variant", ["fixed", "adaptive"])
def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path, variant):
    # adaptive: zscore_gamma's statistics and the spike windows in the state.
    run_case("full", tmp_path, variant)
    run_case("first", tmp_path, variant)
    run_case("resume", tmp_path, variant)  # a new process: only the files survive
    full = np.load(tmp_path / "full.npz")
    resumed = np.load(tmp_path / "resumed.npz")
    assert len(full.files) == len(resumed.files) > 0
    for k in full.files:
        assert full[k].dtype == resumed[k].dtype
        np.testing.assert_array_equal(full[k], resumed[k])
    # The state holds the skipped step, the schedule's count and the momentum.
    counts = [full[k] for k in full.files if full[k].dtype == np.int32]
    assert any(int(c) == 1 for c in counts)  # nonfinite_count

"""Multi-host for real: 2 processes x 4 CPU devices, joined by jax.distributed.

The processes talk over 127.0.0.1 only (gloo collectives); the case lives in
tests/multihost_cases.py.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_steps_across_two_processes_equal_one_device():
    port = _free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "multihost_cases.py"),
                str(i),
                str(port),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=300)
            outputs.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (code, out) in enumerate(outputs):
        assert code == 0, out[-4000:]
        assert f"ok process {i}" in out

"""An example whose extra is not installed says which one, in one line."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (example, a module it needs, the extra that brings it)
CASES = [
    ("ppo", "gymnax", "rl"),
    ("ppo", "six", "rl"),
    ("quickstart", "sklearn", "examples"),
    ("vae_fashion_mnist", "flax", "examples"),
    ("resnet18_cifar10", "tqdm", "examples"),
    ("vit_cifar10", "flax", "examples"),
    ("char_lm", "matplotlib", "examples"),
]

# Runs the example as `python examples/NAME.py --help` would, with one module
# made unimportable (None in sys.modules raises ModuleNotFoundError).
RUNNER = """
import runpy, sys
sys.modules[sys.argv[2]] = None
sys.path.insert(0, sys.argv[1])
script = sys.argv[1] + "/" + sys.argv[3] + ".py"
sys.argv = [script, "--help"]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize(("example", "module", "extra"), CASES)
def test_a_missing_extra_is_one_line_naming_it(example, module, extra):
    if module == "six":
        pytest.importorskip("gymnax", reason="gymnax imports six")
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(ROOT / "examples"), module, example],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert module in lines[0]
    assert f'pip install -e ".[{extra}]"' in lines[0]
    assert proc.stdout == ""

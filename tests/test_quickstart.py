"""Smoke test of examples/quickstart.py: a few steps, files written."""

import importlib.util
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_quickstart():
    spec = importlib.util.spec_from_file_location(
        "quickstart", ROOT / "examples" / "quickstart.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_trains_and_writes_json_and_png(tmp_path):
    qs = load_quickstart()
    record = qs.main(
        ["--steps", "60", "--chunk", "20", "--width", "64", "--out", str(tmp_path)]
    )
    results = record["results"]
    assert set(results) == {"delta_gclip", "gclip", "sgd", "adam"}
    for name in ("delta_gclip", "gclip", "adam"):
        loss = np.asarray(results[name]["loss"])
        assert len(loss) == 60
        assert loss[-1] < loss[0], name
    # h is logged per step and stays within [eta*delta, eta] for δ-GClip.
    h = np.asarray(results["delta_gclip"]["h"])
    eta, delta = 0.3, 0.1
    assert np.all(h >= eta * delta * (1 - 1e-6)) and np.all(h <= eta * (1 + 1e-6))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (
        saved["results"]["gclip"]["final_train_loss"]
        == results["gclip"]["final_train_loss"]
    )
    png = (tmp_path / "quickstart.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

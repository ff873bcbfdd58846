"""Smoke test of examples/quickstart.py: a few steps, files written."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_quickstart():
    sys.path.insert(0, str(ROOT / "examples"))  # as when run as a script
    spec = importlib.util.spec_from_file_location(
        "quickstart", ROOT / "examples" / "quickstart.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_shows_the_floor_and_writes_json_and_png(tmp_path, capsys):
    qs = load_quickstart()
    record = qs.main(
        ["--steps", "150", "--chunk", "50", "--width", "128", "--out", str(tmp_path)]
    )
    results = record["results"]
    assert set(results) == {"delta_gclip", "gclip", "sgd", "adam"}
    final = {k: r["final_train_loss"] for k, r in results.items()}
    # The paper's story on a short run: δ-GClip far below GClip (10x; the full
    # run gives over 100x), SGD at the same eta no better than δ-GClip.
    assert final["delta_gclip"] * 10 < final["gclip"]
    assert not final["sgd"] < final["delta_gclip"]  # diverged (nan) or worse
    for name in ("delta_gclip", "gclip", "adam"):
        loss = np.asarray(results[name]["loss"])
        assert len(loss) == 150 and loss[-1] < loss[0], name
    # h is logged per step and stays within [eta*delta, eta] for δ-GClip.
    h = np.asarray(results["delta_gclip"]["h"])
    eta, delta = 0.3, 0.1
    assert np.all(h >= eta * delta * (1 - 1e-6)) and np.all(h <= eta * (1 + 1e-6))
    # Regime fractions add up to 1 and agree with the logged step sizes.
    for name, d in (("delta_gclip", delta), ("gclip", 0.0)):
        fr = results[name]["regime_fractions"]
        assert sum(fr.values()) == pytest.approx(1.0)
        s = np.asarray(results[name]["h"]) / eta
        assert fr["unclipped"] == pytest.approx(np.mean(s >= 1 - 1e-6))
        if d:
            assert fr["floor"] == pytest.approx(np.mean(s <= d * (1 + 1e-6)))
    assert results["delta_gclip"]["regime_fractions"]["floor"] > 0.5
    assert results["gclip"]["regime_fractions"]["floor"] == 0.0
    assert results["sgd"]["regime_fractions"] is None
    table = capsys.readouterr().out
    assert "unclipped" in table and "floor" in table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"]["gclip"]["final_train_loss"] == final["gclip"]
    assert (
        saved["results"]["delta_gclip"]["regime_fractions"]
        == (results["delta_gclip"]["regime_fractions"])
    )
    png = (tmp_path / "quickstart.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_regime_fractions_follow_the_rule():
    qs = load_quickstart()
    g = np.array([0.01, 0.05, 0.2, 0.5, 0.6, 10.0])  # gamma 0.05, delta 0.1
    fr = qs.regime_fractions(g, 0.05, 0.1)
    # <= gamma: 2; (gamma, gamma/delta = 0.5]: 2; > 0.5: 2.
    assert fr == pytest.approx({"unclipped": 2 / 6, "clipped": 2 / 6, "floor": 2 / 6})
    assert qs.regime_fractions(g, 0.05, 0.0)["floor"] == 0.0

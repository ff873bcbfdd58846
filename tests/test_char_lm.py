"""Smoke tests of the character-level language model on a tiny fortune corpus
that the test writes itself, in the fortune file format."""

import json
import sys
import zlib
from pathlib import Path

import numpy as np
import optax
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import char_lm  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--width", "32", "--layers", "1", "--heads", "2", "--context", "16"]


def write_fortunes(root: Path, n_files: int = 2, records: int = 30) -> Path:
    """Fortune files: records separated by lines holding a single %, plus the
    .dat index and .u8 files the package also ships (to be ignored)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and ran to see my dog who is not here".split()
    for f in range(n_files):
        text = "\n%\n".join(
            " ".join(rng.choice(words, 12)) + f"\n\t\t-- record {i}"
            for i in range(records)
        )
        (root / f"topic{f}").write_text(text + "\n%\n")
        (root / f"topic{f}.dat").write_bytes(b"\x00\x02binary index")
        (root / f"topic{f}.u8").write_text("ignored\n%\n")
    return root


def test_split_is_by_file_and_record_and_deterministic(tmp_path):
    root = write_fortunes(tmp_path / "f")
    data = char_lm.load_fortunes(root)
    train = bytes(data["train"]).split(b"\n%\n")[:-1]
    val = bytes(data["validation"]).split(b"\n%\n")[:-1]
    assert len(train) + len(val) == 60 and b"binary" not in bytes(data["train"])
    expect_val = sum(
        zlib.crc32(f"topic{f}:{i}".encode()) % 10 == 0
        for f in range(2)
        for i in range(30)
    )
    assert len(val) == expect_val > 0
    again = char_lm.load_fortunes(root)
    assert bytes(again["validation"]) == bytes(data["validation"])


@pytest.mark.parametrize("optimizer", ["adamw_delta_gclip", "delta_gclip"])
def test_loss_falls_and_files_are_written(tmp_path, optimizer):
    root = write_fortunes(tmp_path / "f")
    out = tmp_path / "out"
    lr = "3e-3" if optimizer.startswith("adamw") else "0.5"
    record = char_lm.main(
        [
            *TINY, "--optimizer", optimizer, "--learning-rate", lr,
            "--steps", "60", "--warmup", "5", "--eval-every", "20",
            "--batch-size", "16", "--eval-windows", "8", "--steps-per-call", "10",
            "--data-dir", str(root), "--out", str(out),
        ]
    )  # fmt: skip
    ev = record["history"]["evaluations"]
    assert [e["step"] for e in ev] == [0, 20, 40, 60]
    # Uniform over 256 bytes is 8 bits; the tiny vocabulary is learned fast.
    assert ev[0]["val_bpc"] > 7.0 and ev[-1]["val_bpc"] < ev[0]["val_bpc"] - 2.0
    steps = record["history"]["steps"]
    assert len(steps["loss"]) == len(steps["grad_norm"]) == len(steps["h"]) == 60
    assert np.mean(steps["loss"][-10:]) < np.mean(steps["loss"][:10])
    fr = record["summary"]["regime_fractions"]
    assert sum(fr.values()) == pytest.approx(1.0)
    # eta(t) * delta <= h <= eta(t) for the warmup-cosine schedule's eta(t).
    eta = np.asarray(
        optax.warmup_cosine_decay_schedule(0.0, float(lr), 5, 60)(np.arange(60))
    )
    h = np.asarray(steps["h"])
    assert np.all(h >= 1e-3 * eta * (1 - 1e-5)) and np.all(h <= eta * (1 + 1e-5))
    assert np.any(h < eta * (1 - 1e-3))  # the clipping acted on some steps
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["summary"] == record["summary"]
    assert saved["hyperparameters"]["params"] > 10_000
    assert (out / "curves.png").read_bytes()[:8] == PNG


def test_missing_corpus_stops_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        char_lm.main([*TINY, "--data-dir", str(tmp_path / "nowhere")])
    assert "apt-get install fortunes" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizer", "sgd", "--delta", "0.1"], "--delta=0.1 does not apply"),
        (["--delta", "2"], "delta"),
        (["--learning-rate", "0"], "--learning-rate must be > 0, got 0.0"),
        (["--heads", "5"], "--heads=5 must divide --width=192"),
        (["--steps", "100", "--eval-every", "30"], "--eval-every=30 must divide"),
        (["--warmup", "600"], "--warmup must be in [0, --steps=600), got 600"),
        (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    ],
)
def test_bad_command_lines_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        char_lm.parse_args(argv)
    assert message in capsys.readouterr().err


def test_runner_tables_the_char_lm_runs(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import paper_experiments

    root = write_fortunes(tmp_path / "f")
    md = paper_experiments.main(
        [
            "char_lm", "--seeds", "0", "1", "--jobs", "2",
            "--optimizers", "adamw_clip", "delta_gclip:learning_rate=0.5",
            "--runs-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "results"),
            *TINY, "--steps", "20", "--warmup", "2", "--eval-every", "10",
            "--eval-windows", "4", "--steps-per-call", "10",
            "--data-dir", str(root),
        ]
    )  # fmt: skip
    table = md.read_text()
    assert md.name == "char_lm.md" and "**Model:**" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    finals = [
        json.loads(
            (
                tmp_path
                / "runs"
                / f"delta_gclip-learning_rate=0.5_seed{s}"
                / "metrics.json"
            ).read_text()
        )["summary"]["final_val_bpc"]
        for s in (0, 1)
    ]
    row = next(r for r in rows if r.startswith("| δ-GClip (η=0.5) |"))
    num = paper_experiments._num
    assert f"{num(np.mean(finals))} ± {num(np.std(finals, ddof=1))}" in row
    assert "η=0.5, γ=1, δ=0.001" in row
    assert md.with_suffix(".png").read_bytes()[:8] == PNG

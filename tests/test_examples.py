"""Smoke tests of the paper examples and the comparison runner on tiny data.

The data are written by the tests in the official formats (see
``tests/dataset_files.py``), so the loaders are exercised end to end.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.dataset_files import write_cifar10, write_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import paper_experiments  # noqa: E402
import resnet18_cifar10  # noqa: E402
import vae_fashion_mnist  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def test_vae_trains_and_writes_metrics_and_plot(tmp_path):
    data = write_fashion_mnist(tmp_path / "fmnist", n_train=200, n_test=50)
    out = tmp_path / "out"
    record = vae_fashion_mnist.main(
        [
            "--data-dir",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "3",
            "--batch-size",
            "20",
            "--steps-per-call",
            "4",
            "--schedule",
            "--learning-rate",
            "0.005",
        ]
    )
    epochs = record["history"]["epochs"]
    assert [m["epoch"] for m in epochs] == [0, 1, 2, 3]
    # Tiny noisy images: the loss falls by ~1.7 of 46 nats in 30 steps.
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"] - 1.0
    assert epochs[-1]["test_loss"] < epochs[0]["test_loss"] - 1.0
    steps = record["history"]["steps"]
    assert len(steps["h"]) == len(steps["grad_norm"]) == 3 * 10
    # δ-GClip's logged h lies in [eta*delta, eta] for the scheduled eta:
    # 0.005, x0.1 after round(50% of 3) = 2 epochs and x0.1 again after
    # round(75% of 3) = 2 epochs: 20 steps at 0.005, then 10 at 5e-5 (both
    # decays apply even though they fall on the same step).
    h = np.asarray(steps["h"])
    eta = np.where(np.arange(30) < 20, 0.005, 0.005 * 0.1 * 0.1)
    assert np.all(h >= 0.1 * eta * (1 - 1e-6)) and np.all(h <= eta * (1 + 1e-6))
    # h is the rule applied to the logged norm.
    g = np.asarray(steps["grad_norm"])
    np.testing.assert_allclose(h, eta * np.clip(200.0 / g, 0.1, 1.0), rtol=1e-5)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["summary"]["final_test_loss"] == pytest.approx(epochs[-1]["test_loss"])
    assert saved["hyperparameters"]["gamma"] == 200.0
    assert saved["device"]["platform"] == "cpu"
    assert saved["history"]["wall_seconds"] > 0
    assert (out / "curves.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "gclip"])
def test_vae_other_optimizers_log_h_and_norm(tmp_path, optimizer):
    data = write_fashion_mnist(tmp_path / "fmnist", n_train=100, n_test=20)
    record = vae_fashion_mnist.main(
        [
            "--data-dir",
            str(data),
            "--out",
            str(tmp_path),
            "--epochs",
            "1",
            "--batch-size",
            "25",
            "--optimizer",
            optimizer,
            "--no-plot",
        ]
    )
    steps = record["history"]["steps"]
    lr = vae_fashion_mnist.DEFAULTS[optimizer]["learning_rate"]
    h, g = np.asarray(steps["h"]), np.asarray(steps["grad_norm"])
    assert len(h) == 4 and np.all(g > 0)
    if optimizer == "gclip":
        np.testing.assert_allclose(h, lr * np.minimum(1.0, 200.0 / g), rtol=1e-5)
    else:
        np.testing.assert_allclose(h, lr)
    assert not (tmp_path / "curves.png").exists()


def test_resnet18_trains_and_writes_metrics_and_plot(tmp_path):
    data = write_cifar10(tmp_path / "cifar", per_batch=16)
    out = tmp_path / "out"
    record = resnet18_cifar10.main(
        [
            "--data-dir",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "3",
            "--train-subset",
            "32",
            "--batch-size",
            "16",
            "--optimizer",
            "adam",
            "--learning-rate",
            "1e-3",
        ]
    )
    assert record["data"]["train"] == 32 and record["data"]["test"] == 16
    loss = np.asarray(record["history"]["steps"]["loss"])
    assert len(loss) == 6
    assert loss[-2:].mean() < loss[0]
    epochs = record["history"]["epochs"]
    assert [m["epoch"] for m in epochs] == [0, 1, 2, 3]
    for m in epochs:
        assert 0.0 <= m["test_accuracy"] <= 1.0 and np.isfinite(m["test_loss"])
    assert (out / "curves.png").read_bytes()[:8] == PNG
    assert (
        json.loads((out / "metrics.json").read_text())["hyperparameters"]["bf16"]
        is False
    )


def test_resnet18_bf16_delta_gclip_step_sizes(tmp_path):
    data = write_cifar10(tmp_path / "cifar", per_batch=8)
    record = resnet18_cifar10.main(
        [
            "--data-dir",
            str(data),
            "--out",
            str(tmp_path),
            "--epochs",
            "1",
            "--train-subset",
            "16",
            "--batch-size",
            "8",
            "--bf16",
            "--no-plot",
        ]
    )
    h = np.asarray(record["history"]["steps"]["h"])
    g = np.asarray(record["history"]["steps"]["grad_norm"])
    np.testing.assert_allclose(h, 5.0 * np.clip(0.25 / g, 1e-3, 1.0), rtol=1e-5)
    assert np.isfinite(record["history"]["epochs"][-1]["test_loss"])


def test_resnet18_bf16_inference_matches_float32():
    # The same variables through the float32 and the bfloat16 model, at
    # inference: on XLA:CPU from jaxlib 0.11 the bfloat16 logits were all NaN
    # (the pool's YNNPACK fusion; see ResNet18.__call__).
    import jax
    import jax.numpy as jnp

    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    f32 = resnet18_cifar10.ResNet18(stages=(1, 1))
    bf16 = resnet18_cifar10.ResNet18(stages=(1, 1), dtype=jnp.bfloat16)
    variables = f32.init(jax.random.key(0), x, train=False)
    want = jax.jit(lambda v, x: f32.apply(v, x, train=False))(variables, x)
    got = jax.jit(lambda v, x: bf16.apply(v, x, train=False))(variables, x)
    np.testing.assert_allclose(got, want, rtol=0.1, atol=0.05)


@pytest.mark.parametrize(
    "module, argv, message",
    [
        (
            vae_fashion_mnist,
            ["--optimizer", "sgd", "--gamma", "1"],
            "--gamma=1.0 does not apply to --optimizer=sgd; it takes --learning-rate",
        ),
        (vae_fashion_mnist, ["--delta", "1.5"], "delta"),
        (vae_fashion_mnist, ["--learning-rate", "-1"], "learning_rate"),
        (
            vae_fashion_mnist,
            ["--epochs", "0"],
            "--epochs must be a positive integer, got 0",
        ),
        (vae_fashion_mnist, ["--optimizer", "lion"], "invalid choice: 'lion'"),
        (
            resnet18_cifar10,
            ["--data-dir", "x", "--train-subset", "0"],
            "--train-subset must be a positive integer, got 0",
        ),
        (resnet18_cifar10, [], "the following arguments are required: --data-dir"),
    ],
)
def test_bad_command_lines_exit_with_a_message(module, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        module.main([*argv, "--out", "/nonexistent/never-written"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_exits_with_instructions(tmp_path):
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        vae_fashion_mnist.main(["--data-dir", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match=r"cifar-10-python\.tar\.gz"):
        resnet18_cifar10.main(["--data-dir", str(tmp_path / "none")])


def test_batch_larger_than_data_is_refused(tmp_path):
    data = write_fashion_mnist(tmp_path / "f", n_train=10, n_test=5)
    with pytest.raises(SystemExit, match="--batch-size=100 exceeds the 10 training"):
        vae_fashion_mnist.main(["--data-dir", str(data)])


def test_runner_writes_table_plot_and_summary(tmp_path):
    data = write_fashion_mnist(tmp_path / "fmnist", n_train=60, n_test=20)
    md = paper_experiments.main(
        [
            "vae",
            "--optimizers",
            "sgd",
            "delta_gclip:delta=0.5",
            "--seeds",
            "0",
            "1",
            "--jobs",
            "2",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--results-dir",
            str(tmp_path / "results"),
            "--data-dir",
            str(data),
            "--epochs",
            "2",
            "--batch-size",
            "20",
            "--no-plot",
        ]
    )
    table = md.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith(
        "| optimizer | hyperparameters | seeds | final train loss"
    )
    assert rows[1].startswith("| SGD | η=0.0001 | 2 |")
    assert rows[2].startswith("| δ-GClip (δ=0.5) | η=0.001, γ=200, δ=0.5 | 2 |")
    assert "**Machine:** cpu" in table and "60 training and 20 test" in table
    # mean ± std of the runs' own final losses
    finals = [
        json.loads(
            (
                tmp_path / "runs" / f"delta_gclip-delta=0.5_seed{s}" / "metrics.json"
            ).read_text()
        )["summary"]["final_train_loss"]
        for s in (0, 1)
    ]
    num = paper_experiments._num
    assert f"{num(np.mean(finals))} ± {num(np.std(finals, ddof=1))}" in rows[2]
    summary = json.loads(md.with_suffix(".json").read_text())
    assert [r["seed"] for r in summary["runs"]["sgd"]] == [0, 1]
    assert md.with_suffix(".png").read_bytes()[:8] == PNG
    # finished runs are reused, not rerun
    log = tmp_path / "runs" / "sgd_seed0" / "log.txt"
    before = log.stat().st_mtime_ns
    paper_experiments.main(
        [
            "vae",
            "--optimizers",
            "sgd",
            "--seeds",
            "0",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--results-dir",
            str(tmp_path / "r2"),
            "--data-dir",
            str(data),
        ]
    )
    assert log.stat().st_mtime_ns == before


def test_runner_reports_failed_runs(tmp_path):
    with pytest.raises(SystemExit, match="runs failed: sgd_seed0"):
        paper_experiments.main(
            [
                "vae",
                "--optimizers",
                "sgd",
                "--seeds",
                "0",
                "--runs-dir",
                str(tmp_path / "runs"),
                "--results-dir",
                str(tmp_path),
                "--data-dir",
                str(tmp_path / "missing"),
            ]
        )
    assert "does not exist" in (tmp_path / "runs" / "sgd_seed0" / "log.txt").read_text()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("lion", "optimizer 'lion' is not one of sgd, adam, gclip, delta_gclip"),
        ("sgd:beta=1", "'beta=1' in 'sgd:beta=1': overrides are key=value with key"),
        ("gclip:gamma=big", "'gamma=big' in 'gclip:gamma=big': 'big' is not a number"),
    ],
)
def test_runner_rejects_bad_optimizer_specs(spec, message, capsys):
    with pytest.raises(SystemExit):
        paper_experiments.main(["vae", "--optimizers", spec])
    assert message in capsys.readouterr().err

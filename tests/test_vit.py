"""Smoke tests of the ViT example on a few CIFAR-10 images written by the
test in the official pickle layout, and of its augmentation."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tests.dataset_files import write_cifar10

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import vit_cifar10  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def test_random_resized_crop_shapes_range_and_randomness():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (6, 32, 32, 3)), jnp.uint8)
    out = vit_cifar10.random_resized_crop(jax.random.key(0), images)
    assert out.shape == (6, 64, 64, 3) and out.dtype == jnp.float32
    # Bilinear resampling of a crop: every output pixel lies within its
    # image's range.
    lo = images.min(axis=(1, 2, 3)).astype(np.float32)
    hi = images.max(axis=(1, 2, 3)).astype(np.float32)
    assert np.all(out.min(axis=(1, 2, 3)) >= lo - 1e-3)
    assert np.all(out.max(axis=(1, 2, 3)) <= hi + 1e-3)
    again = vit_cifar10.random_resized_crop(jax.random.key(1), images)
    assert not np.allclose(out, again)
    # A constant image stays constant whatever the crop.
    flat = jnp.full((2, 32, 32, 3), 77, jnp.uint8)
    np.testing.assert_allclose(
        vit_cifar10.random_resized_crop(jax.random.key(2), flat), 77.0, atol=1e-3
    )
    assert vit_cifar10.resize(images).shape == (6, 64, 64, 3)


def test_vit_trains_and_writes_metrics_and_plot(tmp_path):
    data = write_cifar10(tmp_path / "cifar", per_batch=16)
    out = tmp_path / "out"
    record = vit_cifar10.main(
        [
            "--data-dir", str(data), "--out", str(out), "--model", "micro",
            "--epochs", "4", "--train-subset", "64", "--batch-size", "16",
            "--optimizer", "adam", "--learning-rate", "3e-3",
        ]
    )  # fmt: skip
    assert record["data"]["train"] == 64 and record["data"]["test"] == 16
    assert len(record["history"]["steps"]["loss"]) == 16
    epochs = record["history"]["epochs"]
    assert [m["epoch"] for m in epochs] == [0, 1, 2, 3, 4]
    # The class shows in each image's brightness pattern: the (unaugmented)
    # training loss falls.
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"] - 0.1
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["hyperparameters"]["weight_decay"] == 1e-5
    assert saved["summary"]["params"] > 10_000
    assert (out / "curves.png").read_bytes()[:8] == PNG


def test_vit_bf16_delta_gclip_step_sizes(tmp_path):
    data = write_cifar10(tmp_path / "cifar", per_batch=8)
    record = vit_cifar10.main(
        [
            "--data-dir", str(data), "--out", str(tmp_path / "o"), "--model",
            "micro", "--epochs", "1", "--train-subset", "32", "--batch-size", "8",
            "--optimizer", "delta_gclip", "--learning-rate", "0.5", "--bf16",
            "--no-plot",
        ]
    )  # fmt: skip
    assert record["hyperparameters"]["bf16"] is True
    steps = record["history"]["steps"]
    assert np.all(np.isfinite(steps["loss"]))
    # eta * delta <= h <= eta, and h is the rule applied to the logged norm.
    h, norm = np.asarray(steps["h"]), np.asarray(steps["grad_norm"])
    assert np.all(h >= 0.5 * 1e-3 * (1 - 1e-6)) and np.all(h <= 0.5 * (1 + 1e-6))
    expect = 0.5 * np.minimum(1, np.maximum(1e-3, 1.0 / norm))
    np.testing.assert_allclose(h, expect, rtol=1e-5)

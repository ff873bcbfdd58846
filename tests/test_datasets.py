"""The dataset loaders read the official formats and reject bad files clearly."""

import gzip
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.dataset_files import (
    cifar_batch,
    idx_bytes,
    write_cifar10,
    write_fashion_mnist,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from data_loaders import DatasetError, load_cifar10, load_fashion_mnist


def test_fashion_mnist_round_trip(tmp_path):
    d = write_fashion_mnist(tmp_path, n_train=30, n_test=10)
    data = load_fashion_mnist(d)
    assert data["x_train"].shape == (30, 784) and data["x_test"].shape == (10, 784)
    assert data["x_train"].dtype == np.float32
    assert 0.0 <= data["x_train"].min() and data["x_train"].max() <= 1.0
    with gzip.open(d / "train-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read()[16:], np.uint8).reshape(30, 784)
    np.testing.assert_array_equal(data["x_train"], raw / np.float32(255))
    with gzip.open(d / "t10k-labels-idx1-ubyte.gz") as f:
        np.testing.assert_array_equal(
            data["y_test"], np.frombuffer(f.read()[8:], np.uint8)
        )


def test_fashion_mnist_reads_uncompressed_files(tmp_path):
    d = write_fashion_mnist(tmp_path, n_train=12, n_test=4)
    for gz in d.glob("*.gz"):
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    assert load_fashion_mnist(d)["y_train"].shape == (12,)


def _replace(path: Path, payload: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (
            lambda d: (d / "train-images-idx3-ubyte.gz").unlink(),
            r"missing file .*train-images-idx3-ubyte\.gz.*"
            r"apt-get install dataset-fashion-mnist",
        ),
        (
            lambda d: _replace(
                d / "train-labels-idx1-ubyte.gz",
                idx_bytes(np.zeros(12, np.uint8), magic=0x0803),
            ),
            r"magic number 0x00000803, expected 0x00000801",
        ),
        (
            lambda d: _replace(
                d / "t10k-images-idx3-ubyte.gz",
                idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-100],
            ),
            r"declares shape \(4, 28, 28\).*holds 3036.*truncated",
        ),
        (
            lambda d: (d / "t10k-images-idx3-ubyte.gz").write_bytes(
                (d / "t10k-images-idx3-ubyte.gz").read_bytes()[:200]
            ),
            r"cannot read .*t10k-images-idx3-ubyte\.gz.*truncated or corrupt",
        ),
        (
            lambda d: _replace(
                d / "train-labels-idx1-ubyte.gz", idx_bytes(np.zeros(11, np.uint8))
            ),
            r"12 images but 11 labels",
        ),
        (
            lambda d: _replace(
                d / "train-labels-idx1-ubyte.gz", idx_bytes(np.full(12, 10, np.uint8))
            ),
            r"labels must lie in 0\.\.9, found 10\.\.10",
        ),
        (
            lambda d: _replace(
                d / "train-images-idx3-ubyte.gz",
                idx_bytes(np.zeros((12, 32, 32), np.uint8)),
            ),
            r"images have shape \(32, 32\), expected \(28, 28\)",
        ),
        (
            lambda d: _replace(d / "train-images-idx3-ubyte.gz", b"\x00\x00"),
            r"too short for an IDX header",
        ),
    ],
)
def test_fashion_mnist_bad_files(tmp_path, corrupt, message):
    d = write_fashion_mnist(tmp_path, n_train=12, n_test=4)
    corrupt(d)
    with pytest.raises(DatasetError, match=message):
        load_fashion_mnist(d)


def test_fashion_mnist_missing_directory(tmp_path):
    with pytest.raises(
        DatasetError, match=r"nowhere does not exist.*dataset-fashion-mnist"
    ):
        load_fashion_mnist(tmp_path / "nowhere")


def test_cifar10_round_trip(tmp_path):
    d = write_cifar10(tmp_path, per_batch=8)
    data = load_cifar10(d)
    assert (
        data["x_train"].shape == (40, 32, 32, 3) and data["x_train"].dtype == np.uint8
    )
    assert data["x_test"].shape == (8, 32, 32, 3)
    with open(d / "data_batch_2", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    # Pixel (row 5, col 7) of image 3 of batch 2: R, G, B at plane offsets.
    row = batch[b"data"][3]
    expected = [row[c * 1024 + 5 * 32 + 7] for c in range(3)]
    np.testing.assert_array_equal(data["x_train"][8 + 3, 5, 7], expected)
    np.testing.assert_array_equal(data["y_train"][8:16], batch[b"labels"])


def _pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (
            lambda d: (d / "data_batch_3").unlink(),
            r"missing file .*data_batch_3.*cifar-10-python\.tar\.gz",
        ),
        (
            lambda d: (d / "test_batch").write_bytes(
                (d / "test_batch").read_bytes()[:500]
            ),
            r"test_batch is not a CIFAR-10 pickle.*truncated or corrupt",
        ),
        (
            lambda d: _pickle(d / "data_batch_1", {b"images": 1}),
            r"data_batch_1 should hold a dict with keys b'data' and b'labels'",
        ),
        (
            lambda d: _pickle(
                d / "data_batch_1",
                {b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4},
            ),
            r"b'data' is uint8 of shape \(4, 3000\), "
            r"expected uint8 of shape \(N, 3072\)",
        ),
        (
            lambda d: _pickle(
                d / "data_batch_1",
                {**cifar_batch(np.random.default_rng(0), 4), b"labels": [1, 2, 3]},
            ),
            r"4 images but 3 labels",
        ),
    ],
)
def test_cifar10_bad_files(tmp_path, corrupt, message):
    d = write_cifar10(tmp_path, per_batch=4)
    corrupt(d)
    with pytest.raises(DatasetError, match=message):
        load_cifar10(d)


def test_cifar10_missing_directory(tmp_path):
    with pytest.raises(DatasetError, match=r"CIFAR-10 directory .* does not exist"):
        load_cifar10(tmp_path / "nope")

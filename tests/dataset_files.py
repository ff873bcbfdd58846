"""Writers of tiny datasets in the official on-disk formats, for the tests.

These are written independently of ``examples/data_loaders.py`` (from the format
specifications: IDX headers are a big-endian magic number and dimension sizes;
CIFAR-10 batches are pickled dicts of ``b"data"`` rows of R, G, B planes and
``b"labels"``), so the loaders are checked against the formats, not themselves.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray, *, magic: int | None = None) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim  # 0x08: unsigned byte
    header = struct.pack(">I", magic) + b"".join(
        struct.pack(">I", d) for d in array.shape
    )
    return header + array.tobytes()


def class_images(
    rng: np.random.Generator, labels: np.ndarray, shape: tuple
) -> np.ndarray:
    """Images whose brightness pattern depends on the class, plus noise."""
    n = len(labels)
    base = np.linspace(0, 1, int(np.prod(shape)), dtype=np.float32).reshape(shape)
    images = np.stack([np.roll(base, 3 * int(y), axis=0) for y in labels])
    images = 0.8 * images + 0.2 * rng.random((n, *shape), dtype=np.float32)
    return (255 * images).astype(np.uint8)


def write_fashion_mnist(
    directory: Path, n_train: int = 200, n_test: int = 50, seed: int = 0
) -> Path:
    """The four gzipped IDX files, as Zalando publishes them."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = class_images(rng, labels, (28, 28))
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            with gzip.open(directory / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(idx_bytes(array))
    return directory


def cifar_batch(rng: np.random.Generator, n: int) -> dict[bytes, object]:
    labels = rng.integers(0, 10, n)
    hwc = class_images(rng, labels, (32, 32, 3))
    data = hwc.transpose(0, 3, 1, 2).reshape(n, 3072)  # R plane, G plane, B plane
    return {b"batch_label": b"tiny", b"labels": [int(y) for y in labels], b"data": data}


def write_cifar10(directory: Path, per_batch: int = 32, seed: int = 0) -> Path:
    """``cifar-10-batches-py``: five training batches and a test batch."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(directory / name, "wb") as f:
            pickle.dump(cifar_batch(rng, per_batch), f, protocol=2)
    return directory

"""Loaders for the paper's datasets in their official on-disk formats.

* Fashion-MNIST: the four IDX files (``train-images-idx3-ubyte.gz`` ...), as
  published by Zalando and as Debian's ``dataset-fashion-mnist`` installs them
  in ``/usr/share/datasets/fashion-mnist``. Gzipped or not.
* CIFAR-10: the ``cifar-10-batches-py`` directory of pickled batches
  (``data_batch_1`` ... ``data_batch_5``, ``test_batch``).

Every problem with the files (missing, truncated, wrong magic number, wrong
shape, image and label counts that disagree, labels out of range) raises
:class:`DatasetError` with a message that says which file, what was expected
and how to get the data. The example scripts turn it into a one-line exit.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HOWTO = (
    "Install it with `apt-get install dataset-fashion-mnist` (files land in "
    "/usr/share/datasets/fashion-mnist) or download the four *-ubyte.gz files "
    "from https://github.com/zalandoresearch/fashion-mnist and pass --data-dir."
)
CIFAR10_HOWTO = (
    "Download and unpack cifar-10-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html and pass the "
    "cifar-10-batches-py directory as --data-dir."
)

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
NUM_CLASSES = 10


class DatasetError(Exception):
    """The dataset files are missing or not in the expected format."""


def _read_bytes(path: Path, howto: str) -> bytes:
    """Read a file, transparently un-gzipping ``.gz``; clear errors."""
    if not path.is_file():
        raise DatasetError(f"missing file {path}. {howto}")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetError(
            f"cannot read {path}: {e} (truncated or corrupt download?). {howto}"
        ) from None


def _find_idx(data_dir: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    return data_dir / f"{stem}.gz"  # reported as missing by _read_bytes


def read_idx(path: Path, *, magic: int, howto: str = "") -> np.ndarray:
    """One IDX file of unsigned bytes -> uint8 array of the declared shape."""
    raw = _read_bytes(path, howto)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(
            f"{path} is {len(raw)} bytes, too short for an IDX header of "
            f"{header} bytes (truncated?). {howto}"
        )
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DatasetError(
            f"{path} has IDX magic number 0x{found:08x}, expected 0x{magic:08x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''}). "
            f"Is it the right file? {howto}"
        )
    shape = tuple(
        int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DatasetError(
            f"{path} declares shape {shape} ({expected} bytes of data) but holds "
            f"{len(raw) - header} (truncated or corrupt?). {howto}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _check_split(
    images: np.ndarray, labels: np.ndarray, where: str, image_shape: tuple[int, ...]
) -> None:
    if images.shape[1:] != image_shape:
        raise DatasetError(
            f"{where}: images have shape {images.shape[1:]}, expected {image_shape}"
        )
    if len(images) != len(labels):
        raise DatasetError(
            f"{where}: {len(images)} images but {len(labels)} labels; the counts "
            "must match"
        )
    if len(labels) == 0:
        raise DatasetError(f"{where}: no examples")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DatasetError(
            f"{where}: labels must lie in 0..{NUM_CLASSES - 1}, found "
            f"{labels.min()}..{labels.max()}"
        )


def load_fashion_mnist(data_dir: Path = FASHION_MNIST_DIR) -> dict[str, np.ndarray]:
    """Fashion-MNIST as ``x_train, y_train, x_test, y_test``.

    Images are float32 in [0, 1], flattened to 784; labels are int32.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(
            f"Fashion-MNIST directory {data_dir} does not exist. {FASHION_MNIST_HOWTO}"
        )
    out: dict[str, np.ndarray] = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(
            _find_idx(data_dir, f"{prefix}-images-idx3-ubyte"),
            magic=_IDX_IMAGES_MAGIC,
            howto=FASHION_MNIST_HOWTO,
        )
        labels = read_idx(
            _find_idx(data_dir, f"{prefix}-labels-idx1-ubyte"),
            magic=_IDX_LABELS_MAGIC,
            howto=FASHION_MNIST_HOWTO,
        )
        _check_split(images, labels, f"Fashion-MNIST {split} in {data_dir}", (28, 28))
        out[f"x_{split}"] = images.reshape(len(images), -1).astype(np.float32) / 255.0
        out[f"y_{split}"] = labels.astype(np.int32)
    return out


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = _read_bytes(path, CIFAR10_HOWTO)
    try:
        batch = pickle.loads(raw, encoding="bytes")
    except Exception as e:  # any unpickling failure means a bad file
        raise DatasetError(
            f"{path} is not a CIFAR-10 pickle ({type(e).__name__}: {e}); "
            f"truncated or corrupt? {CIFAR10_HOWTO}"
        ) from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DatasetError(
            f"{path} should hold a dict with keys b'data' and b'labels' "
            f"(the official cifar-10-batches-py layout). {CIFAR10_HOWTO}"
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(
            f"{path}: b'data' is {data.dtype} of shape {data.shape}, expected "
            f"uint8 of shape (N, 3072). {CIFAR10_HOWTO}"
        )
    # Each row is the R, G and B planes of a 32x32 image, in turn.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    _check_split(images, labels, str(path), (32, 32, 3))
    return images, labels.astype(np.int32)


def load_cifar10(data_dir: Path) -> dict[str, np.ndarray]:
    """CIFAR-10 as ``x_train, y_train, x_test, y_test``: uint8 NHWC, int32."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(
            f"CIFAR-10 directory {data_dir} does not exist. {CIFAR10_HOWTO}"
        )
    train = [_load_cifar_batch(data_dir / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = _load_cifar_batch(data_dir / "test_batch")
    return {
        "x_train": np.concatenate([x for x, _ in train]),
        "y_train": np.concatenate([y for _, y in train]),
        "x_test": x_test,
        "y_test": y_test,
    }

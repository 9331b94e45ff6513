"""Fashion-MNIST as Debian's `dataset-fashion-mnist` package ships it (idx files, gzipped).

Why a package: no data set may be downloaded at run time, and the package installs offline
from the distribution's mirror (`apt-get install dataset-fashion-mnist`, which the project's
setup does where training or the quality harness needs it).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Where the Debian package puts the files; `STEPFLEET_FASHION_MNIST` overrides it.
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The ten classes in label order, named as a caption says them.
CLASS_NAMES: tuple[str, ...] = (
    "t-shirt", "trousers", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetMissing(FileNotFoundError):
    """The data set is not installed; the message says how to install it."""


@dataclass(frozen=True)
class FashionSplit:
    """One split: `images` (N, 28, 28) uint8, `labels` (N,) int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def data_dir() -> Path:
    return Path(os.environ.get("STEPFLEET_FASHION_MNIST") or DEFAULT_DIR)


def _read_idx(path: Path) -> np.ndarray:
    """An idx file: magic (2 zero bytes, dtype 0x08 = uint8, ndim), big-endian dims, data."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(dims)


def load_split(split: str, directory: Path | None = None) -> FashionSplit:
    """Load `train` (60k) or `test` (10k); `DatasetMissing` says how to install it if absent."""
    root = directory or data_dir()
    images_name, labels_name = _FILES[split]
    images_path, labels_path = root / images_name, root / labels_name
    if not images_path.exists() or not labels_path.exists():
        raise DatasetMissing(
            f"Fashion-MNIST not found in {root}: install Debian's package "
            "(`apt-get install dataset-fashion-mnist`) or set STEPFLEET_FASHION_MNIST to a "
            "directory holding the four idx .gz files"
        )
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    return FashionSplit(images=images, labels=labels.astype(np.int64))

"""The built-in datasets: Fashion-MNIST from its IDX files, CIFAR-10/100 and STL-10 through torchvision.

Each is small enough to be held whole in memory as one ``uint8`` tensor ``(N, C, H, W)``
(:class:`~simclrv2.data.base.InMemoryDataset`), at its native size (METHOD.md 5).
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import InMemoryDataset
from .images import DatasetError

__all__ = [
    "DEFAULT_DATA_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_SYSTEM_DIR",
    "STL10_CLASSES",
    "STL10_SPLITS",
    "load_cifar",
    "load_fashion_mnist",
    "load_stl10",
    "read_idx",
]

# Where the Debian/Ubuntu package `dataset-fashion-mnist` installs the original IDX files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

# torchvision reads STL-10's names from class_names.txt; this is its content, for copies without it.
STL10_CLASSES: list[str] = [
    "airplane",
    "bird",
    "car",
    "cat",
    "deer",
    "dog",
    "horse",
    "monkey",
    "ship",
    "truck",
]

# Default root for torchvision downloads when no data_dir is given (relative to the working dir).
DEFAULT_DATA_DIR = Path("data")

# "unlabeled" is the 100,000 images without labels; "train+unlabeled" both, the labelled ones first.
STL10_SPLITS: tuple[str, ...] = ("train", "test", "unlabeled", "train+unlabeled")


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST: the original IDX files
# --------------------------------------------------------------------------------------------------

# IDX magic: two zero bytes, a type code (0x08 = unsigned byte), and the number of dimensions.
_IDX_UBYTE = 0x08


def _open_maybe_gzip(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | os.PathLike[str], expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (``.gz`` or uncompressed) into a read-only ``uint8`` array, checking magic
    and size.

    Raises :class:`DatasetError` naming the file for a bad magic number, a truncated or corrupt file,
    or trailing bytes. A file read before in this process, unchanged since (same inode, size and
    times), is not decompressed again: the pipeline's 15 stages each open both splits.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return _parse_idx(path, expected_ndim)  # raises the error that names the file
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return _read_idx_cached(key, path, expected_ndim)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(key: tuple[Any, ...], path: Path, expected_ndim: int | None) -> np.ndarray:
    return _parse_idx(path, expected_ndim)


def _parse_idx(path: Path, expected_ndim: int | None) -> np.ndarray:
    fix = "fix: re-install it (apt-get install --reinstall dataset-fashion-mnist) or delete it and pass download=true"
    try:
        with _open_maybe_gzip(path) as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:  # truncated gzip raises EOFError
        raise DatasetError(f"{path}: unreadable or truncated IDX file ({exc}); {fix}") from exc
    if len(raw) < 4:
        raise DatasetError(f"{path}: too short for an IDX header ({len(raw)} bytes); {fix}")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != _IDX_UBYTE or ndim == 0 or (expected_ndim and ndim != expected_ndim):
        raise DatasetError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x000008"
            f"{expected_ndim or ndim:02x}, unsigned bytes); {fix}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header; {fix}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    got = len(raw) - header
    if got != expected:
        raise DatasetError(
            f"{path}: IDX header says shape {shape} = {expected} bytes but the file holds {got}; {fix}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _fashion_mnist_dirs(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    dirs: list[Path] = []
    if data_dir is not None:
        d = Path(data_dir)
        dirs += [d, d / "fashion-mnist", d / "FashionMNIST" / "raw"]
    dirs.append(FASHION_MNIST_SYSTEM_DIR)
    return dirs


def load_fashion_mnist(
    split: str = "train", data_dir: str | os.PathLike[str] | None = None, download: bool = False
) -> InMemoryDataset:
    """Fashion-MNIST from the original IDX files (``train-*`` or ``t10k-*``), 1 x 28 x 28, 10 classes.

    Search order: ``data_dir``, ``data_dir/fashion-mnist``, ``data_dir/FashionMNIST/raw``, then
    :data:`FASHION_MNIST_SYSTEM_DIR`; with ``download=True`` and nothing found, torchvision downloads
    the same IDX files into ``data_dir/FashionMNIST/raw`` (``data_dir`` defaults to ``./data``).
    """
    if split not in ("train", "test"):
        raise DatasetError(f"fashion_mnist has splits 'train' and 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    img_stem, lbl_stem = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"

    searched = _fashion_mnist_dirs(data_dir)
    found: tuple[Path, Path] | None = None
    for d in searched:
        img, lbl = _find_idx(d, img_stem), _find_idx(d, lbl_stem)
        if img is not None and lbl is not None:
            found = (img, lbl)
            break
    if found is None and download:
        from torchvision.datasets import FashionMNIST

        root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
        FashionMNIST(str(root), train=split == "train", download=True)
        raw = root / "FashionMNIST" / "raw"
        img, lbl = _find_idx(raw, img_stem), _find_idx(raw, lbl_stem)
        if img is not None and lbl is not None:
            found = (img, lbl)
    if found is None:
        raise DatasetError(
            f"Fashion-MNIST {img_stem}[.gz] not found (searched: {', '.join(map(str, searched))}); "
            "fix: `apt-get install dataset-fashion-mnist`, or pass download=true with a data_dir"
        )
    images = read_idx(found[0], expected_ndim=3)  # (N, 28, 28)
    labels = read_idx(found[1], expected_ndim=1)  # (N,)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{found[0]} holds {images.shape[0]} images but {found[1]} holds {labels.shape[0]} labels; "
            "fix: use image and label files from the same release"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DatasetError(
            f"{found[1]}: label {int(labels.max())} out of range 0-9; fix: re-install the files"
        )
    # np.frombuffer is read-only; copy into a tensor that owns its memory.
    images_t = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28)
    return InMemoryDataset(images_t, torch.from_numpy(labels.astype(np.int64)), FASHION_MNIST_CLASSES)


# --------------------------------------------------------------------------------------------------
# CIFAR-10/100 and STL-10 through torchvision
# --------------------------------------------------------------------------------------------------


def _torchvision_root(data_dir: str | os.PathLike[str] | None) -> str:
    return str(Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR)


def _not_found(name: str, root: str, exc: Exception) -> DatasetError:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return DatasetError(
        f"{name} not found or corrupt under {root} ({msg}); fix: pass download=true, or point data_dir at "
        "the folder holding the torchvision copy"
    )


def load_cifar(
    name: str = "cifar10",
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> InMemoryDataset:
    """CIFAR-10 or CIFAR-100 (3 x 32 x 32) via torchvision, converted to one ``uint8`` tensor."""
    from torchvision.datasets import CIFAR10, CIFAR100

    if split not in ("train", "test"):
        raise DatasetError(f"{name} has splits 'train' and 'test', got {split!r}")
    cls = {"cifar10": CIFAR10, "cifar100": CIFAR100}[name]
    root = _torchvision_root(data_dir)
    try:
        ds = cls(root, train=split == "train", download=download)
    except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted."
        raise _not_found(name, root, exc) from exc
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)  # (N, 32, 32, 3) -> NCHW
    return InMemoryDataset(images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64), ds.classes)


def load_stl10(
    split: str = "train", data_dir: str | os.PathLike[str] | None = None, download: bool = False
) -> InMemoryDataset:
    """STL-10 (3 x 96 x 96) via torchvision; the ``unlabeled`` images get label -1."""
    from torchvision.datasets import STL10

    if split not in STL10_SPLITS:
        raise DatasetError(f"stl10 has splits {', '.join(STL10_SPLITS)}, got {split!r}")
    root = _torchvision_root(data_dir)
    try:
        ds = STL10(root, split=split, download=download)
    except RuntimeError as exc:
        raise _not_found("stl10", root, exc) from exc
    images = torch.from_numpy(np.ascontiguousarray(ds.data))  # already (N, 3, 96, 96)
    labels = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))  # -1 for the unlabeled split
    return InMemoryDataset(images, labels, list(getattr(ds, "classes", STL10_CLASSES)))

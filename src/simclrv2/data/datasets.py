"""Image datasets behind one interface (DESIGN.md "Images"; METHOD.md 5).

Every dataset yields ``(image, label, index)`` where ``image`` is a ``uint8`` tensor ``(C, H, W)``,
``label`` an ``int`` (``-1`` = unlabeled) and ``index`` the position in the dataset. Small datasets
(Fashion-MNIST, CIFAR, STL-10) are held whole in memory as one ``uint8`` tensor ``(N, C, H, W)``
(:class:`InMemoryDataset`); user image folders (ImageNet layout) decode lazily with PIL so that
DataLoader workers can share the work (:class:`ImageFolderDataset`). No normalisation happens here:
augmentations turn ``uint8`` batches into ``float32`` in [0, 1] on the training device.
"""

from __future__ import annotations

import abc
import functools
import gzip
import os
import struct
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, DatasetError, to_rgb, too_large

__all__ = [
    "DATASET_NAMES",
    "DatasetError",
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "FASHION_MNIST_SYSTEM_DIR",
    "ImageDataset",
    "FolderPaths",
    "ImageFolderDataset",
    "InMemoryDataset",
    "UNLABELED_DIR",
    "UnlabeledFolderDataset",
    "dataset_info",
    "has_unlabeled",
    "load_few_labels",
    "load_cifar",
    "load_dataset",
    "load_fashion_mnist",
    "load_stl10",
    "read_idx",
]

DATASET_NAMES: tuple[str, ...] = ("fashion_mnist", "cifar10", "cifar100", "stl10", "imagefolder")

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

_INFO: dict[str, dict[str, int | None]] = {
    "fashion_mnist": {"image_size": 28, "channels": 1, "num_classes": 10},
    "cifar10": {"image_size": 32, "channels": 3, "num_classes": 10},
    "cifar100": {"image_size": 32, "channels": 3, "num_classes": 100},
    "stl10": {"image_size": 96, "channels": 3, "num_classes": 10},
    # User data: the size is chosen at load time, the classes are the folder names.
    "imagefolder": {"image_size": None, "channels": 3, "num_classes": None},
}

_SPLITS: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("train", "test"),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "stl10": ("train", "test", "unlabeled", "train+unlabeled"),
}


T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------------


class ImageDataset(Dataset, abc.ABC):
    """Common interface: ``ds[i] -> (uint8 image (C, H, W), label int (-1 = unlabeled), i)``.

    Attributes: ``classes`` (class names), ``num_classes``, ``channels``, ``labels`` (int64 tensor
    ``(N,)``, -1 where unlabeled) and ``filenames`` (list of file base names, or ``None`` where the
    source has none; file-list subsets need them, METHOD.md 6).
    """

    classes: list[str]
    channels: int
    labels: torch.Tensor
    filenames: list[str] | None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.labels.numel())

    @abc.abstractmethod
    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        """``(uint8 image (C, H, W), label, index)``."""


class InMemoryDataset(ImageDataset):
    """A whole dataset held as one ``uint8`` tensor ``images`` of shape ``(N, C, H, W)``.

    Training code may index ``images`` directly (``images[idx].to(device)``) and skip the DataLoader.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | np.ndarray | Sequence[int],
        classes: Sequence[str],
        filenames: Sequence[str] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DatasetError(
                f"InMemoryDataset needs a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
        if labels_t.numel() != images.shape[0]:
            raise DatasetError(f"{images.shape[0]} images but {labels_t.numel()} labels")
        if filenames is not None and len(filenames) != images.shape[0]:
            raise DatasetError(f"{images.shape[0]} images but {len(filenames)} file names")
        if labels_t.numel() and int(labels_t.max()) >= len(classes):
            raise DatasetError(f"label {int(labels_t.max())} out of range for {len(classes)} classes")
        self.images = images.contiguous()
        self.labels = labels_t
        self.classes = list(classes)
        self.channels = int(images.shape[1])
        self.filenames = list(filenames) if filenames is not None else None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.images[index], int(self.labels[index]), int(index)

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> InMemoryDataset:
        """A new in-memory dataset holding only ``indices`` (renumbered from 0)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        names = [self.filenames[i] for i in idx.tolist()] if self.filenames is not None else None
        return InMemoryDataset(self.images[idx], self.labels[idx], self.classes, names)


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

    if split not in _SPLITS["stl10"]:
        raise DatasetError(f"stl10 has splits {', '.join(_SPLITS['stl10'])}, got {split!r}")
    root = _torchvision_root(data_dir)
    try:
        ds = STL10(root, split=split, download=download)
    except RuntimeError as exc:
        raise _not_found("stl10", root, exc) from exc
    images = torch.from_numpy(np.ascontiguousarray(ds.data))  # already (N, 3, 96, 96)
    labels = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))  # -1 for the unlabeled split
    return InMemoryDataset(images, labels, list(getattr(ds, "classes", STL10_CLASSES)))


# --------------------------------------------------------------------------------------------------
# ImageFolder (ImageNet layout) for user data
# --------------------------------------------------------------------------------------------------


# Substitutes tried for one bad file before giving up: more bad files in a row than this means the
# folder itself is gone (an unmounted disk), not a stray corrupt file.
MAX_SUBSTITUTES = 16

# Paths whose decode failure this process has already warned about (one warning per file, even
# when every stage reopens the folder).
_WARNED_BAD: set[str] = set()


class FolderPaths(Sequence[Path]):
    """The full paths of a folder's images, made when asked for from the relative ones.

    A list of ImageNet's 1.28M ``Path`` objects takes seconds to build and about half a gigabyte
    in every DataLoader worker; the relative strings are what the index holds anyway.
    """

    def __init__(self, root: Path, files: list[str]) -> None:
        self._root = str(root)
        self._files = files

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index):  # int -> Path, slice -> list[Path]
        if isinstance(index, slice):
            return [Path(f"{self._root}/{f}") for f in self._files[index]]
        return Path(f"{self._root}/{self._files[index]}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"FolderPaths({self._root!r}, {len(self)} files)"


class ImageFolderDataset(ImageDataset):
    """User images in ImageNet layout ``root/<class>/<file>``, decoded with PIL in ``__getitem__``.

    Each image becomes RGB, its shorter side is resized (bicubic, PIL's antialiased resize) to
    ``image_size`` and the centre ``image_size`` square is kept, so batches stack. ``filenames`` are
    the file base names (what official subset lists name, METHOD.md 6); ``paths`` the full paths;
    ``sizes`` an int64 array ``(N, 2)``: each image's upright width and height, from its header.

    The folder is indexed once (:mod:`simclrv2.data.index`): later opens, and the other ranks, read
    the manifest. A file whose header cannot be read raises :class:`DatasetError` naming it, or with
    ``skip_bad_images=True`` is dropped with one warning that counts the dropped files (``skipped``).
    A class folder without images raises :class:`DatasetError`. Pixel data is checked when an image is
    decoded, by :meth:`open_image`.
    """

    def __init__(
        self, root: str | os.PathLike[str], image_size: int | None = 224, skip_bad_images: bool = False
    ) -> None:
        from .index import open_index  # index builds on this module's errors and limits

        root = _image_folder(root, "image folder", "set data_dir to root/<class>/<image>")
        self._setup(root, open_index(root), image_size, skip_bad_images)

    @classmethod
    def from_index(cls, root: Path, index: Any, image_size: int | None = 224, skip_bad_images: bool = False,
                   filenames: list[str] | None = None) -> ImageFolderDataset:
        """A dataset over an index already opened (:class:`~simclrv2.data.index.FolderIndex`, paths
        relative to ``root``); ``filenames`` default to the files' base names."""
        ds = cls.__new__(cls)
        ds._setup(Path(root), index, image_size, skip_bad_images, filenames)
        return ds

    def _setup(self, root: Path, index: Any, image_size: int | None, skip_bad_images: bool,
               filenames: list[str] | None = None) -> None:
        self.root = root
        if image_size is not None and image_size < 1:
            raise DatasetError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size or 0)  # None: the images' own size, set once they are indexed
        self.channels = 3
        self.skip_bad_images = skip_bad_images
        if index.dropped and not skip_bad_images:
            rel, reason = index.dropped[0]
            raise DatasetError(
                f"unusable image {self.root / rel} ({reason}); fix: delete, replace or repoint it, "
                "or pass skip_bad_images=true"
            )
        if index.dropped:
            warnings.warn(
                f"skipped {len(index.dropped)} corrupt image(s) under {self.root} "
                f"(first: {self.root / index.dropped[0][0]}: {index.dropped[0][1]})",
                stacklevel=3,
            )
        self.classes = index.classes
        self.skipped = [str(self.root / rel) for rel, _ in index.dropped]
        self.files = index.files  # paths relative to root, in index order
        self.paths = FolderPaths(self.root, index.files)
        self.filenames = filenames if filenames is not None else [rel.rsplit("/", 1)[-1] for rel in index.files]
        self.labels = torch.from_numpy(index.labels)
        self.sizes = index.sizes  # (N, 2) int64: width, height
        self._stamps = index.stamps  # (N, 2) int64: st_size, st_mtime_ns when indexed
        # path -> reason, for every file this process found unusable when decoding it (DataLoader
        # workers keep their own: each holds a copy of the dataset)
        self.bad_decodes: dict[str, str] = {}
        if not self.image_size:
            self.image_size = native_size(self.sizes)

    def _decode(self, index: int, view: Callable[[Image.Image], T]) -> tuple[T | None, str, str]:
        """``view`` of the image at ``index``, or ``None`` with the reason and the fix."""
        path = self.paths[index]
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None, "indexed but is gone now (deleted or moved)", "restore it or rerun to index the folder again"
        except OSError as exc:
            return None, f"{type(exc).__name__}: {exc}".splitlines()[0], "check the file's permissions"
        size, mtime = (int(v) for v in self._stamps[index])
        if (st.st_size, st.st_mtime_ns) != (size, mtime):
            # never use bytes that were not indexed: its size, or even its class, may differ now
            what = f"{size} -> {st.st_size} bytes" if st.st_size != size else "modified time"
            return None, f"changed since the folder was indexed ({what})", "rerun to index the folder again"
        try:
            with Image.open(path) as img:
                # the header was checked when indexed, but the limit is a guard before any decode
                refused = too_large(img.size)
                if refused:
                    return None, refused, "downscale or delete it"
                return view(img), "", ""
        except Exception as exc:  # PIL raises many types (OSError for truncated data, SyntaxError, ...)
            return None, f"{type(exc).__name__}: {exc}".splitlines()[0], "delete or replace it"

    def open_image(self, index: int) -> tuple[Image.Image, int]:
        """Decode image ``index`` as an upright RGB PIL image; return it and the index actually used
        (see :meth:`read`)."""
        return self.read(index, to_rgb)  # to_rgb returns a new, fully decoded image

    def read(self, index: int, view: Callable[[Image.Image], T]) -> tuple[T, int]:
        """``view(img)`` of image ``index``, opened but not yet decoded (so ``view`` may ask for a
        reduced-scale JPEG decode, :mod:`simclrv2.data.decode`); returns it and the index used.

        A bad file (it fails to decode, or it disappeared or changed since the folder was indexed)
        raises :class:`DatasetError` naming it and the fix. With ``skip_bad_images=True`` it is
        instead recorded in ``bad_decodes``, warned about once per file in this process, and the
        next index takes its place (wrapping around; after :data:`MAX_SUBSTITUTES` bad files in a
        row, :class:`DatasetError`).
        """
        n = len(self)
        i = int(index)
        for _ in range(min(MAX_SUBSTITUTES, n)):
            out, reason, fix = self._decode(i, view)
            if out is not None:
                return out, i
            path = str(self.paths[i])
            if not self.skip_bad_images:
                raise DatasetError(f"unusable image {path} ({reason}); fix: {fix}, or pass skip_bad_images=true")
            self.bad_decodes[path] = reason
            if path not in _WARNED_BAD:
                _WARNED_BAD.add(path)
                warnings.warn(f"skipped unusable image {path} ({reason}); the next image takes its place",
                              stacklevel=2)
            i = (i + 1) % n
        raise DatasetError(
            f"{min(MAX_SUBSTITUTES, n)} images in a row from {self.paths[index]} are unusable (last: {path}: "
            f"{reason}); fix: check that the folder {self.root} is still there and readable, then rerun"
        )

    def _stored(self, index: int) -> tuple[torch.Tensor, int]:
        """``(uint8 (3, image_size, image_size), index actually used)``."""
        img, used = self.open_image(index)
        s = self.image_size
        w, h = img.size
        scale = s / min(w, h)
        # Shorter side -> s; the longer side is rounded and never below s.
        new_w, new_h = max(s, round(w * scale)), max(s, round(h * scale))
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - s) // 2, (new_h - s) // 2
        arr = np.asarray(img.crop((left, top, left + s, top + s)), dtype=np.uint8)  # (s, s, 3)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(), used

    def load_image(self, index: int) -> torch.Tensor:
        """Decode one image to ``uint8`` ``(3, image_size, image_size)`` (through :meth:`open_image`,
        so a bad file may be replaced by the next one; ``__getitem__`` says which was used)."""
        return self._stored(index)[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        """``(image, label, index used)``: the index used differs from ``index`` only when the file
        at ``index`` was bad and ``skip_bad_images`` put the next one in its place; the label is
        that image's own."""
        x, used = self._stored(index)
        return x, int(self.labels[used]), used

    def to_memory(self, num_workers: int = 0, max_bytes: int | None = None) -> InMemoryDataset:
        """Decode every image into one :class:`InMemoryDataset`.

        Files found bad when decoded (``skip_bad_images=True``) are left out of it, with a warning,
        rather than held twice under two labels. ``max_bytes`` defaults to half the physical
        memory; a larger dataset raises :class:`DatasetError` instead of swapping the machine to death.
        """
        s = self.image_size
        need = len(self) * 3 * s * s
        if max_bytes is None:
            try:
                max_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
            except (ValueError, OSError, AttributeError):  # not POSIX: do not guess
                max_bytes = need
        if need > max_bytes:
            raise DatasetError(
                f"{self.root}: {len(self)} images at {s}px need {need / 2**30:.1f} GiB, over the "
                f"{max_bytes / 2**30:.1f} GiB limit; fix: lower image_size or keep decoding in DataLoader workers"
            )
        images = torch.empty((len(self), 3, s, s), dtype=torch.uint8)
        keep = torch.ones(len(self), dtype=torch.bool)
        if num_workers > 0:
            batch = 64
            loader = torch.utils.data.DataLoader(self, batch_size=batch, num_workers=num_workers)
            for k, (x, _, used) in enumerate(loader):  # in order: batch k asked for k*64, k*64+1, ...
                asked = torch.arange(k * batch, k * batch + len(used))
                images[asked] = x
                keep[asked] = used == asked
        else:
            for i in range(len(self)):
                images[i], used = self._stored(i)
                keep[i] = used == i
        if keep.all():
            return InMemoryDataset(images, self.labels.clone(), self.classes, self.filenames)
        left_out = torch.nonzero(~keep).flatten().tolist()
        for i in left_out:  # a worker found these; its own bad_decodes holds the reason
            self.bad_decodes.setdefault(str(self.paths[i]), "unusable when decoded (see the warning)")
        warnings.warn(
            f"left {len(left_out)} unusable image(s) of {self.root} out of the decoded copy "
            f"(first: {self.paths[left_out[0]]})",
            stacklevel=2,
        )
        names = [self.filenames[i] for i in torch.nonzero(keep).flatten().tolist()]
        return InMemoryDataset(images[keep], self.labels[keep], self.classes, names)


def native_size(sizes: np.ndarray, largest: int = 224) -> int:
    """The stored size for images of their own size: the median shorter side of the images
    (``sizes`` is ``(N, 2)`` width, height from the index), at most ``largest``.

    28 px images stay at 28 px instead of being upscaled 8x to 224 px (64 times the pixels to
    train on, for no information); photographs are stored at 224 px as before.
    """
    if len(sizes) == 0:
        return largest
    return int(min(largest, max(1, int(np.median(np.asarray(sizes).min(axis=1))))))

def _image_folder(root: str | os.PathLike[str], what: str, fix: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{what} {root} does not exist; fix: {fix}")
    return root


class UnlabeledFolderDataset(ImageFolderDataset):
    """Images without classes: every image under ``root``, in any sub-folders, with label -1.

    Indexed by :func:`~simclrv2.data.index.open_unlabeled_index` (hidden entries ignored, symlink
    loops named and not walked, a manifest of its own); decoded, streamed, held in memory
    (:meth:`to_memory`) and bad files handled exactly as :class:`ImageFolderDataset`. ``classes``
    are the names its predictions will use (a labelled folder's), empty by default. ``filenames``
    are the paths relative to ``root`` (``a/b/x.png``), not base names: two sub-folders may each
    hold an ``x.png``, and a prediction must name the one it is for.
    """

    def __init__(self, root: str | os.PathLike[str], image_size: int | None = 224, skip_bad_images: bool = False,
                 classes: Sequence[str] = ()) -> None:
        from .index import open_unlabeled_index

        root = _image_folder(root, "unlabeled folder", "point it at a folder of images (any sub-folders)")
        index = open_unlabeled_index(root)
        index.classes = list(classes)
        self._setup(root, index, image_size, skip_bad_images, list(index.files))


# The few-labels layout: data_dir/unlabeled/ (any images, no classes), data_dir/train/<class>/ (the
# labelled images), data_dir/test/<class>/ (optional).
UNLABELED_DIR = "unlabeled"


def has_unlabeled(data_dir: str | os.PathLike[str] | None) -> bool:
    """True when ``data_dir`` is in the few-labels layout (it holds an ``unlabeled/`` folder)."""
    return data_dir is not None and (Path(data_dir) / UNLABELED_DIR).is_dir()


def load_few_labels(data_dir: str | os.PathLike[str], image_size: int | None = 224,
                    skip_bad_images: bool = False) -> ImageFolderDataset:
    """``data_dir/train/<class>/`` then ``data_dir/unlabeled/**`` as one dataset rooted at ``data_dir``.

    The labelled images come first, in the order (and with the indices) they have alone, so the
    validation split and the labelled subsets are drawn from them exactly as from ``train/``; the
    unlabeled images follow with label -1. ``filenames``: base names for the labelled images (what
    subset lists name), ``unlabeled/<path>`` for the others.
    """
    from .index import FolderIndex, open_index, open_unlabeled_index

    root = Path(data_dir)
    train = _image_folder(root / "train", "labelled folder",
                          f"put the labelled images in {root / 'train'}/<class>/ next to {root / UNLABELED_DIR}")
    lab, unl = open_index(train), open_unlabeled_index(root / UNLABELED_DIR)
    joined = FolderIndex(
        classes=lab.classes,
        files=[f"train/{f}" for f in lab.files] + [f"{UNLABELED_DIR}/{f}" for f in unl.files],
        labels=np.concatenate([lab.labels, unl.labels]),
        sizes=np.concatenate([lab.sizes, unl.sizes]).reshape(-1, 2),
        stamps=np.concatenate([lab.stamps, unl.stamps]).reshape(-1, 2),
        dropped=[(f"train/{f}", r) for f, r in lab.dropped] + [(f"{UNLABELED_DIR}/{f}", r) for f, r in unl.dropped],
        fingerprint=f"{lab.fingerprint}+{unl.fingerprint}",
    )
    names = [f.rsplit("/", 1)[-1] for f in lab.files] + [f"{UNLABELED_DIR}/{f}" for f in unl.files]
    return ImageFolderDataset.from_index(root, joined, image_size, skip_bad_images, names)


# --------------------------------------------------------------------------------------------------
# Front door
# --------------------------------------------------------------------------------------------------


def dataset_info(name: str) -> dict[str, int | None]:
    """Native ``image_size``, ``channels`` and ``num_classes`` of a named dataset (None = set by user data)."""
    if name not in _INFO:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return dict(_INFO[name])


def _few_labels_split(root: Path, split: str, image_size: int | None, skip_bad_images: bool) -> ImageFolderDataset:
    """A split of the few-labels layout: ``train`` (or ``train+unlabeled``) is ``train/`` followed by
    ``unlabeled/`` (:func:`load_few_labels`); ``unlabeled`` is ``unlabeled/`` alone, named with
    ``train/``'s classes; any other split is ``root/<split>/<class>/``, as outside this layout."""
    if split in ("train", "train+unlabeled"):
        return load_few_labels(root, image_size, skip_bad_images)
    if split == UNLABELED_DIR:
        from .index import open_index

        classes = open_index(root / "train").classes if (root / "train").is_dir() else []
        return UnlabeledFolderDataset(root / UNLABELED_DIR, image_size, skip_bad_images, classes)
    folder = _image_folder(root / split, f"split folder {split!r}:",
                           f"create {root / split}/<class>/ or choose another split")
    return ImageFolderDataset(folder, image_size=image_size, skip_bad_images=skip_bad_images)


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int | None = None,
    skip_bad_images: bool = False,
) -> ImageDataset:
    """Load a dataset by name: ``fashion_mnist``, ``cifar10``, ``cifar100``, ``stl10`` or ``imagefolder``.

    ``imagefolder`` reads ``data_dir/<split>/<class>/<file>`` when that folder exists, else
    ``data_dir/<class>/<file>``. A ``data_dir`` holding ``unlabeled/`` is in the few-labels layout
    (:func:`_few_labels_split`): ``train`` is then the labelled and the unlabeled images together; ``image_size`` is its stored size (None: the images' median shorter
    side, at most 224, see :func:`native_size`). The built-in datasets
    keep their native size (``image_size`` must be None or equal to it; augmentations resize).
    """
    if name not in DATASET_NAMES:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if name == "imagefolder":
        if data_dir is None:
            raise DatasetError(
                "dataset 'imagefolder' needs data_dir (root/<class>/<image>); fix: set data_dir"
            )
        root = Path(data_dir)
        if has_unlabeled(root):
            return _few_labels_split(root, split, image_size or None, skip_bad_images)
        if split and (root / split).is_dir():
            root = root / split
        return ImageFolderDataset(root, image_size=image_size or None, skip_bad_images=skip_bad_images)

    native = _INFO[name]["image_size"]
    if image_size is not None and image_size != native:
        raise DatasetError(
            f"{name} is stored at its native {native}px, got image_size={image_size}; fix: leave image_size "
            "unset and set the augmentation's output size instead"
        )
    if split not in _SPLITS[name]:
        raise DatasetError(f"{name} has splits {', '.join(_SPLITS[name])}, got {split!r}")
    if name == "fashion_mnist":
        return load_fashion_mnist(split, data_dir, download)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, split, data_dir, download)
    return load_stl10(split, data_dir, download)

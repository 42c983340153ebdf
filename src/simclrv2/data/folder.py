"""User image folders: the ImageNet layout ``root/<class>/<file>``, class-less folders and the
few-labels layout (``unlabeled/`` next to ``train/<class>/``), decoded lazily with PIL.

Each image is decoded in ``__getitem__`` so that DataLoader workers share the work; the folder is
indexed once by :mod:`simclrv2.data.index`, and bad files are named or, when asked, replaced.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from .base import ImageDataset, InMemoryDataset
from .images import DatasetError, to_rgb, too_large

__all__ = [
    "MAX_SUBSTITUTES",
    "UNLABELED_DIR",
    "FolderPaths",
    "ImageFolderDataset",
    "UnlabeledFolderDataset",
    "few_labels_split",
    "has_unlabeled",
    "load_few_labels",
    "native_size",
]

T = TypeVar("T")


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
        from .index import open_index  # loaded only when a folder is opened (and with it distributed)

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


def few_labels_split(root: Path, split: str, image_size: int | None, skip_bad_images: bool) -> ImageFolderDataset:
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

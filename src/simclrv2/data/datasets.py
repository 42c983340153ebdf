"""The front door to the datasets: build one by name from a config (DESIGN.md "Images"; METHOD.md 5).

:func:`load_dataset` picks the built-in dataset (:mod:`simclrv2.data.builtin`: Fashion-MNIST,
CIFAR, STL-10, held in memory) or the user image folder (:mod:`simclrv2.data.folder`: ImageNet or
few-labels layout, decoded lazily); either yields ``(uint8 image (C, H, W), label, index)``
(:class:`~simclrv2.data.base.ImageDataset`). :func:`dataset_info` gives a named dataset's native
size, channels and classes without loading it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import ImageDataset
from .builtin import STL10_SPLITS, load_cifar, load_fashion_mnist, load_stl10
from .folder import ImageFolderDataset, few_labels_split, has_unlabeled
from .images import DatasetError

__all__ = ["DATASET_NAMES", "dataset_info", "load_dataset"]

DATASET_NAMES: tuple[str, ...] = ("fashion_mnist", "cifar10", "cifar100", "stl10", "imagefolder")

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
    "stl10": STL10_SPLITS,
}


def dataset_info(name: str) -> dict[str, int | None]:
    """Native ``image_size``, ``channels`` and ``num_classes`` of a named dataset (None = set by user data)."""
    if name not in _INFO:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return dict(_INFO[name])


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
    (:func:`~simclrv2.data.folder.few_labels_split`): ``train`` is then the labelled and the
    unlabeled images together. ``image_size`` is a folder's stored size (None: the images' median
    shorter side, at most 224, see :func:`~simclrv2.data.folder.native_size`). The built-in datasets
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
            return few_labels_split(root, split, image_size or None, skip_bad_images)
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

"""The interface every dataset shares, and the one that holds a whole dataset in memory (DESIGN.md "Images").

Every dataset yields ``(image, label, index)`` where ``image`` is a ``uint8`` tensor ``(C, H, W)``,
``label`` an ``int`` (``-1`` = unlabeled) and ``index`` the position in the dataset. No
normalisation happens here: augmentations turn ``uint8`` batches into ``float32`` in [0, 1] on the
training device.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import DatasetError

__all__ = ["ImageDataset", "InMemoryDataset"]


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

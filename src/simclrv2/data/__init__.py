"""Data: datasets behind one interface, labelled subsets, batched SimCLR augmentations (METHOD.md 5, 6)."""

from .augment import CropFlipAugment, EvalTransform, SimCLRAugment, torchvision_simclr_transform
from .base import ImageDataset, InMemoryDataset
from .builtin import read_idx
from .datasets import DATASET_NAMES, dataset_info, load_dataset
from .folder import ImageFolderDataset, UnlabeledFolderDataset
from .images import DatasetError
from .subsets import balanced_subset, read_subset, subset_from_file_list, unlabeled_indices, write_subset

__all__ = [
    "DATASET_NAMES",
    "CropFlipAugment",
    "DatasetError",
    "EvalTransform",
    "ImageDataset",
    "ImageFolderDataset",
    "InMemoryDataset",
    "SimCLRAugment",
    "UnlabeledFolderDataset",
    "balanced_subset",
    "dataset_info",
    "load_dataset",
    "read_idx",
    "read_subset",
    "subset_from_file_list",
    "torchvision_simclr_transform",
    "unlabeled_indices",
    "write_subset",
]

"""The images each stage may learn from: the validation split, the unlabeled pool, the labelled subset.

Every stage draws the same validation split from the same seed and leaves it out, so choices made
on it (the pipeline's learning-rate search) never see a training image or the test split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed as dist
from ..data.datasets import ImageDataset
from ..data.subsets import balanced_subset, subset_from_file_list, validation_split, write_subset
from .runfolder import RunError


def validation_indices(cfg: Any, ds: ImageDataset) -> np.ndarray:
    """The validation split held out of ``train_split`` (``val_fraction``; empty when 0).

    Every stage draws the same images from the same seed, so none of them ever trains on it:
    the labelled subsets, the unlabeled pool and the pretraining pool all leave it out.
    """
    if cfg.val_fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    return validation_split(ds.labels, cfg.val_fraction, cfg.val_seed)


def training_pool(cfg: Any, ds: ImageDataset) -> torch.Tensor:
    """Indices a stage may train on without labels: the training split minus the validation split."""
    keep = torch.ones(len(ds), dtype=torch.bool)
    keep[torch.from_numpy(validation_indices(cfg, ds))] = False
    return torch.nonzero(keep).flatten()


def labelled_indices(cfg: Any, ds: ImageDataset, run_dir: Path | None) -> np.ndarray:
    """The labelled subset (fraction with a seed, or an official file list), never overlapping the
    validation split; written to the run folder with the validation split beside it."""
    val = validation_indices(cfg, ds)
    if cfg.label_list:
        idx = np.setdiff1d(subset_from_file_list(ds.filenames, cfg.label_list), val)
    elif cfg.label_fraction >= 1.0:
        idx = np.setdiff1d(np.flatnonzero(ds.labels.numpy() >= 0), val)
    else:
        idx = balanced_subset(ds.labels, cfg.label_fraction, cfg.label_seed, exclude=val)
    if len(idx) == 0:
        raise RunError("the labelled subset is empty; raise label_fraction or check label_list")
    if run_dir is not None and dist.is_main():
        write_subset(run_dir / "labelled_subset.txt", idx, ds.filenames)
        if len(val):
            write_subset(run_dir / "validation_subset.txt", val, ds.filenames)
    return idx

"""The images each stage may learn from: the validation split, the unlabeled pool, the labelled subset.

Every stage draws the same validation split from the same seed and leaves it out, so choices made
on it (the pipeline's learning-rate search) never see a training image or the test split. With
``val_folds`` the validation split is one fold of a k-fold split of the labelled subset (the
search with few labels), and the stage trains on the other folds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed as dist
from ..data.base import ImageDataset
from ..data.folder import has_unlabeled
from ..data.subsets import balanced_subset, kfold_split, subset_from_file_list, validation_split, write_subset
from .runfolder import RunError


def validation_indices(cfg: Any, ds: ImageDataset) -> np.ndarray:
    """The validation split held out of ``train_split`` (``val_fraction``; empty when 0).

    Every stage draws the same images from the same seed, so none of them ever trains on it:
    the labelled subsets, the unlabeled pool and the pretraining pool all leave it out.
    """
    if cfg.val_folds > 0:
        return kfold_split(ds.labels, label_subset(cfg, ds), cfg.val_folds, cfg.val_fold, cfg.val_seed)
    if cfg.val_fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    return validation_split(ds.labels, cfg.val_fraction, cfg.val_seed)


def few_labels_layout(cfg: Any) -> bool:
    """True for an image folder with ``unlabeled/`` next to ``train/<class>/`` (the few-labels layout)."""
    return cfg.dataset == "imagefolder" and has_unlabeled(cfg.data_dir or None)


def has_test_split(cfg: Any) -> bool:
    """False only in the few-labels layout without ``test/``: elsewhere a missing test split is the
    error it always was."""
    return not (few_labels_layout(cfg) and not (Path(cfg.data_dir) / cfg.test_split).is_dir())


def label_subset(cfg: Any, ds: ImageDataset) -> np.ndarray:
    """The labelled subset that ``val_folds`` folds are cut from: ``label_fraction`` of every
    class's labels (``label_seed``), or all of them."""
    fraction = getattr(cfg, "label_fraction", 1.0)
    if fraction >= 1.0:
        return np.flatnonzero(ds.labels.numpy() >= 0)
    return balanced_subset(ds.labels, fraction, getattr(cfg, "label_seed", 0))


def check_fraction(cfg: Any, ds: ImageDataset) -> None:
    """In the few-labels layout a ``label_fraction`` that would leave a class without a label is an
    error: there the labels are all the user has, and no class may silently lose its last one."""
    labels = ds.labels.numpy()
    counts = np.bincount(labels[labels >= 0], minlength=ds.num_classes)
    for c, n in enumerate(counts.tolist()):
        if np.floor(cfg.label_fraction * n + 0.5) < 1:
            raise RunError(f"label_fraction={cfg.label_fraction:g} leaves class '{ds.classes[c]}' ({n} label(s)) "
                           f"without a label; fix: raise label_fraction or add labels to train/{ds.classes[c]}/")


def training_pool(cfg: Any, ds: ImageDataset) -> torch.Tensor:
    """Indices a stage may train on without labels: the training split minus the validation split."""
    keep = torch.ones(len(ds), dtype=torch.bool)
    keep[torch.from_numpy(validation_indices(cfg, ds))] = False
    return torch.nonzero(keep).flatten()


def labelled_indices(cfg: Any, ds: ImageDataset, run_dir: Path | None) -> np.ndarray:
    """The labelled subset (fraction with a seed, or an official file list), never overlapping the
    validation split; written to the run folder with the validation split beside it."""
    if few_labels_layout(cfg) and not cfg.label_list:
        check_fraction(cfg, ds)
    val = validation_indices(cfg, ds)
    if cfg.val_folds > 0:  # the other folds of the subset the folds were cut from
        idx = np.setdiff1d(label_subset(cfg, ds), val)
    elif cfg.label_list:
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

"""The labelled subset a stage trains on, chosen by ``label_selection`` (benchmark mode).

- ``balanced``: the class-balanced draw of :func:`splits.labelled_indices` (the default, unchanged);
  it needs every image's label before labelling, which a real user does not have.
- ``random``: as many images, drawn without looking at classes, as a user would pick.
- ``typical``: as many images, picked by TypiClust (:mod:`simclrv2.selection`) on the pretrained
  encoder's embedding of the training pool; only then are their (hidden) labels read.
- ``probcover``: the same with ProbCover's coverage of that embedding (pseudo-labels from k-means
  with as many clusters as the dataset has classes, the one fact about the labels it uses).

All four leave the validation split out and get the same number of labels, so the comparison is
of the choice alone. The subset is written to the run folder as ``labelled_subset.txt``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed as dist
from ..data.base import ImageDataset
from ..data.subsets import write_subset
from ..modelfile import load_model
from ..selection import random_picks, select_picks
from .batches import BatchSource
from .evaluate import extract
from .runfolder import RunError
from .splits import labelled_indices, validation_indices

# (encoder, its state, dataset, size, pool, budget, seed) -> picks: a pipeline's learning-rate search
# runs a stage several times on the same subset, and embedding the training split each time would
# cost more than the fine-tuning at a few labels
_PICKS_CACHE: dict[tuple, np.ndarray] = {}


def labelled_subset(cfg: Any, ds: ImageDataset, source: BatchSource, image_size: int,
                    run_dir: Path | None) -> np.ndarray:
    """Sorted dataset indices of the labelled images, by ``cfg.label_selection`` (module docstring)."""
    if cfg.label_selection == "balanced" or cfg.label_list or cfg.label_fraction >= 1.0:
        return labelled_indices(cfg, ds, run_dir)
    budget = len(labelled_indices(cfg, ds, None))  # the balanced draw's size: the same number of labels
    labels = ds.labels.numpy()
    keep = labels >= 0
    keep[validation_indices(cfg, ds)] = False
    pool = np.flatnonzero(keep)  # (P,) the images a user could label: not validation, not unlabeled
    if cfg.label_selection == "random":
        idx = pool[random_picks(len(pool), budget, cfg.label_seed)]
    else:
        idx = pool[_picked(cfg, source, pool, budget, image_size, ds.num_classes)]
    idx = np.sort(idx).astype(np.int64)
    if run_dir is not None and dist.is_main():
        write_subset(run_dir / "labelled_subset.txt", idx, ds.filenames)
    return idx


def classes_covered(ds: ImageDataset, idx: np.ndarray | torch.Tensor) -> int:
    """How many classes the labelled images cover (what a selection that ignores classes can miss)."""
    return int(torch.as_tensor(ds.labels)[torch.as_tensor(idx)].unique().numel())


def selection_metrics(cfg: Any, ds: ImageDataset, idx: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """What a stage's metrics say about its labels: the selection and the classes it covers."""
    return {"label_selection": cfg.label_selection, "labelled_classes": classes_covered(ds, idx)}


def encoder_of(cfg: Any) -> str:
    """The model ``typical`` and ``probcover`` embed with: ``label_encoder``, else the stage's own."""
    path = cfg.label_encoder or getattr(cfg, "init_checkpoint", "") or getattr(cfg, "student_init", "") \
        or getattr(cfg, "checkpoint", "")
    if not path:
        raise RunError(f"label_selection={cfg.label_selection} needs a pretrained encoder to embed with; "
                       "set label_encoder=PATH (a pretraining run folder or a model file)")
    return path


def _picked(cfg: Any, source: BatchSource, pool: np.ndarray, budget: int, image_size: int,
            n_classes: int) -> np.ndarray:
    """Rows of ``pool`` TypiClust or ProbCover picks on the encoder's backbone features."""
    path = encoder_of(cfg)
    state = os.stat(path).st_mtime_ns if os.path.exists(path) else 0
    key = (os.path.realpath(path), state, cfg.dataset, cfg.data_dir, cfg.train_split, len(source.labels),
           image_size, pool.tobytes(), budget, cfg.label_seed, cfg.label_selection)
    if key not in _PICKS_CACHE:
        model, _ = load_model(path, source.device)
        feats, _ = extract(model, source, torch.from_numpy(pool), image_size, 512, "features", cfg.precision)
        method = "typiclust" if cfg.label_selection == "typical" else "probcover"
        picks = select_picks(method, feats, budget, seed=cfg.label_seed, n_classes=n_classes, device=source.device)
        _PICKS_CACHE[key] = picks.indices
    return _PICKS_CACHE[key]

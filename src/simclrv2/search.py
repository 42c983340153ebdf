"""How the pipeline chooses each learning rate, from the labels there are.

The learning-rate search never trains on the images it scores (issue 29):

- with enough labels, on a held-out validation split (``val_fraction``), as the benchmark mode
  always did;
- in the few-labels layout (``data_dir/unlabeled/`` next to ``data_dir/train/<class>/``), when the
  validation split would hold fewer than :data:`MIN_HELD_OUT` images of some class, by k-fold
  cross-validation over the labelled images: each candidate rate trains once per fold on the other
  folds and is scored on its fold, and the chosen rate then trains on every label;
- with one label in some class, not at all: no image can be held out without taking a class's only
  label, so every stage trains at its config's ``base_lr`` (the centre of the search), and the
  report says so.

The choice is made once per label fraction, before anything trains, from the folder's index.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import config as C

# A held-out split with fewer validation images of some class than this is too small to choose on:
# with 4 labels a class, val_fraction 0.1 holds out one image a class, and one image decides a rate.
MIN_HELD_OUT = 10

HELD_OUT, CROSS_VALIDATION, CENTRE, CONFIG = "validation split", "cross-validation", "centre rate", "config"


@dataclass
class SearchMode:
    """How one label fraction's rates are chosen (recorded in ``results.json`` as ``rate_choice``)."""

    how: str  # HELD_OUT | CROSS_VALIDATION | CENTRE | CONFIG (no lr_search: each stage's base_lr)
    folds: int = 0  # cross-validation folds
    labels_per_class: int | None = None  # fewest labels of a class at this fraction (few-labels layout)
    reason: str = ""

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, "", 0)}


def few_labels_dir(common: dict[str, Any]) -> Path | None:
    """``data_dir`` when the pipeline's data is in the few-labels layout, else None."""
    from .data.folder import has_unlabeled

    data_dir = common.get("data_dir") or None
    if common.get("dataset") == "imagefolder" and has_unlabeled(data_dir):
        return Path(data_dir)
    return None


def label_counts(data_dir: Path) -> tuple[list[str], np.ndarray]:
    """Class names and labelled images per class of ``data_dir/train/`` (from its index: no image is read)."""
    from .data.images import DatasetError
    from .data.index import open_index

    try:
        index = open_index(data_dir / "train")
    except DatasetError as e:
        raise C.ConfigError(str(e)) from e
    return index.classes, np.bincount(index.labels, minlength=len(index.classes))


def per_class(fraction: float, counts: np.ndarray) -> np.ndarray:
    """Labels a class keeps at ``fraction`` (``balanced_subset``'s count, before the max(1, .))."""
    return np.floor(fraction * counts + 0.5).astype(np.int64)


def search_modes(pc: Any) -> dict[float, SearchMode]:
    """The :class:`SearchMode` of every label fraction of the pipeline config ``pc``.

    Outside the few-labels layout nothing changes: a held-out split when ``lr_search`` is set, the
    config's rates otherwise. In the layout, one kind of split serves the whole run (pretraining
    leaves the validation split out, so every fraction must agree on it): held out when every
    fraction keeps at least :data:`MIN_HELD_OUT` validation images a class, else folds.
    """
    data_dir = few_labels_dir(pc.common)
    if data_dir is None:
        return {f: SearchMode(HELD_OUT if pc.lr_search else CONFIG) for f in pc.label_fractions}
    classes, counts = label_counts(data_dir)
    val_fraction = float(pc.common.get("val_fraction", 0.0))
    modes: dict[float, SearchMode] = {}
    held_out_everywhere = True
    for f in pc.label_fractions:
        kept = per_class(f, counts)
        if kept.min() < 1:
            c = int(kept.argmin())
            raise C.ConfigError(f"label_fraction {f:g} leaves class '{classes[c]}' ({counts[c]} label(s)) without "
                                f"a label; fix: raise the fraction or add labels to {data_dir / 'train' / classes[c]}/")
        n = int(kept.min())
        held = per_class(val_fraction, kept).min() if val_fraction > 0 else 0
        held_out_everywhere &= held >= MIN_HELD_OUT
        modes[f] = SearchMode(CONFIG, 0, n)
    for mode in modes.values():
        n = mode.labels_per_class or 0
        if held_out_everywhere:
            mode.how = HELD_OUT if pc.lr_search else CONFIG
        elif n >= 2:
            mode.how, mode.folds = CROSS_VALIDATION, min(pc.cv_folds, n)
            mode.reason = (f"{n} labels in the smallest class: a held-out split of {val_fraction:g} would keep "
                           f"fewer than {MIN_HELD_OUT} validation images a class, so {mode.folds}-fold "
                           "cross-validation over the labelled images")
        else:
            mode.how = CENTRE
            mode.reason = ("one label in the smallest class: no image can be held out without taking a class's "
                           "only label, so no search was run and every stage trains at its config's base_lr "
                           "(the centre of lr_search)")
    return modes


def spread(values: list[float]) -> float:
    """Sample standard deviation of fold scores (0 for one value)."""
    if len(values) < 2:
        return 0.0
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def binomial_spread(top1: float, n: int) -> float:
    """Standard error, in points, of an accuracy of ``top1`` % measured on ``n`` images."""
    p = top1 / 100.0
    return 100.0 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))

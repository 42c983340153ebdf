"""Labelled subsets for semi-supervised fine-tuning (METHOD.md 6).

Two ways to pick the labelled images: a class-balanced random fraction that is the same on every
machine (:func:`balanced_subset`), or an official list of ImageNet train file names
(:func:`subset_from_file_list`, the ``1percent.txt`` / ``10percent.txt`` format). Indices are
``np.int64`` arrays sorted ascending, into the dataset's order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..host import atomic_write_text
from .images import DatasetError

__all__ = [
    "balanced_subset", "kfold_split", "read_subset", "subset_from_file_list", "unlabeled_indices", "validation_split", "write_subset",
]


def _as_numpy_labels(labels: torch.Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels, dtype=np.int64).reshape(-1)


def balanced_subset(
    labels: torch.Tensor | np.ndarray | Sequence[int],
    fraction: float,
    seed: int = 0,
    exclude: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Sorted indices of a class-balanced random ``fraction`` of the labelled images.

    Per class ``c`` with ``n_c`` images: ``k_c = max(1, floor(fraction * n_c + 0.5))`` (round half up,
    not Python's round-half-even) images, the first ``k_c`` of a permutation drawn by
    ``np.random.default_rng(SeedSequence([seed, c]))``. NumPy's PCG64 generator and its permutation
    are specified bit for bit, so the subset is the same on every platform and NumPy >= 1.17, and a
    class's pick does not depend on the other classes. Unlabeled entries (label -1) are never picked.

    ``exclude`` (e.g. the validation split) is never picked; ``k_c`` still counts every image of
    the class, so "1% of the labels" means the same number of images with or without a
    validation split, drawn from the images that remain.

    Fashion-MNIST train (6,000 per class): 1% -> 60 per class, 0.1% -> 6, 10% -> 600.
    """
    return _balanced(labels, fraction, [seed], exclude)


def validation_split(labels: torch.Tensor | np.ndarray | Sequence[int], fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of the validation split: a class-balanced ``fraction`` of the labelled images.

    Drawn like :func:`balanced_subset` but from its own random stream (``SeedSequence([seed, c,
    1])``), so it does not coincide with the labelled subset of the same seed; pass it to
    :func:`balanced_subset` as ``exclude`` to keep the two disjoint.
    """
    return _balanced(labels, fraction, [seed], None, stream=1)


def kfold_split(labels: torch.Tensor | np.ndarray | Sequence[int], indices: np.ndarray, folds: int, fold: int,
                seed: int = 0) -> np.ndarray:
    """Sorted indices of fold ``fold`` of a class-stratified ``folds``-fold split of ``indices``.

    Each class's members among ``indices`` are permuted (``SeedSequence([seed, c, 2])``, a stream
    of its own) and dealt round-robin: position j goes to fold ``j % folds``. So the folds are
    disjoint, cover ``indices``, and every fold holds a member of every class with at least
    ``folds`` members.
    """
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in [0, {folds}), got {fold}")
    y = _as_numpy_labels(labels)
    idx = np.asarray(indices, dtype=np.int64)
    picked: list[np.ndarray] = []
    for c in np.unique(y[idx][y[idx] >= 0]):
        members = np.sort(idx[y[idx] == c])
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(c), 2]))
        members = members[rng.permutation(members.size)]
        picked.append(members[fold::folds])
    return np.sort(np.concatenate(picked)).astype(np.int64) if picked else np.zeros(0, dtype=np.int64)


def _balanced(labels, fraction, seed: list[int], exclude, stream: int | None = None) -> np.ndarray:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating, np.integer)):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    fraction = float(fraction)
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1] (e.g. 0.01 for 1%), got {fraction}")
    (s,) = seed
    if int(s) != s or s < 0:
        raise ValueError(f"seed must be a non-negative integer, got {s!r}")
    y = _as_numpy_labels(labels)
    allowed = np.ones(y.size, dtype=bool)
    if exclude is not None:
        allowed[np.asarray(exclude, dtype=np.int64)] = False
    picked: list[np.ndarray] = []
    for c in np.unique(y[y >= 0]):
        members = np.flatnonzero(y == c)  # ascending dataset order
        k = max(1, math.floor(fraction * members.size + 0.5))
        members = members[allowed[members]]
        entropy = [int(s), int(c)] + ([] if stream is None else [stream])
        rng = np.random.default_rng(np.random.SeedSequence(entropy))
        picked.append(members[rng.permutation(members.size)[:k]])
    if not picked:
        raise ValueError("balanced_subset: the dataset has no labelled images (all labels are -1)")
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _read_names(list_path: Path) -> list[str]:
    """Names in a subset file: one per line; a line ``<index>\\t<name>`` (from :func:`write_subset`) gives
    its last field. Blank lines and ``#`` comments are skipped."""
    names: list[str] = []
    with open(list_path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                names.append(line.split()[-1])
    return names


def subset_from_file_list(filenames: Sequence[str] | None, list_path: str | os.PathLike[str]) -> np.ndarray:
    """Sorted indices of the images named in ``list_path`` (official ImageNet subset format, METHOD.md 6).

    ``filenames`` are the dataset's file base names (``ImageFolderDataset.filenames``), e.g.
    ``n01440764_10026.JPEG``. Any listed name missing from the dataset is an error that counts them.
    """
    list_path = Path(list_path)
    if filenames is None:
        raise DatasetError(
            f"{list_path}: this dataset has no file names; fix: file-list subsets need dataset=imagefolder"
        )
    if not list_path.is_file():
        raise DatasetError(f"subset list {list_path} not found; fix: pass the path of e.g. 1percent.txt")
    names = _read_names(list_path)
    if not names:
        raise DatasetError(f"subset list {list_path} is empty; fix: one train file name per line")
    index: dict[str, int] = {}
    dup_in_dataset: set[str] = set()
    for i, name in enumerate(filenames):
        if name in index:
            dup_in_dataset.add(name)
        index.setdefault(name, i)
    wanted = list(dict.fromkeys(names))  # drop repeated lines, keep order
    ambiguous = [n for n in wanted if n in dup_in_dataset]
    if ambiguous:
        raise DatasetError(
            f"{list_path}: {len(ambiguous)} listed name(s) occur more than once in the dataset "
            f"(first: {', '.join(ambiguous[:3])}); fix: make file names unique across class folders"
        )
    missing = [n for n in wanted if n not in index]
    if missing:
        raise DatasetError(
            f"{list_path}: {len(missing)} of {len(wanted)} listed file(s) are not in the dataset "
            f"(first: {', '.join(missing[:5])}); fix: point data_dir at the train folder the list was made "
            "for, or regenerate the list"
        )
    return np.sort(np.fromiter((index[n] for n in wanted), dtype=np.int64, count=len(wanted)))


def unlabeled_indices(n: int, labelled_idx: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Sorted indices in ``range(n)`` that are not in ``labelled_idx`` (the rest, e.g. for distillation)."""
    lab = np.asarray(
        labelled_idx.cpu() if isinstance(labelled_idx, torch.Tensor) else labelled_idx, dtype=np.int64
    )
    if lab.size and (lab.min() < 0 or lab.max() >= n):
        raise ValueError(f"labelled indices must lie in [0, {n}), got range [{lab.min()}, {lab.max()}]")
    keep = np.ones(n, dtype=bool)
    keep[lab] = False
    return np.flatnonzero(keep).astype(np.int64)


def write_subset(
    path: str | os.PathLike[str],
    indices: Sequence[int] | np.ndarray | torch.Tensor,
    filenames: Sequence[str] | None = None,
) -> Path:
    """Write the chosen indices, one per line, atomically (temporary file + ``os.replace``).

    With ``filenames`` each line is ``<index>\\t<file name>``; :func:`subset_from_file_list` reads such a
    file back by name and :func:`read_subset` by index.
    """
    path = Path(path)
    idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64).reshape(
        -1
    )
    if filenames is not None:
        lines = [f"{i}\t{filenames[i]}\n" for i in idx.tolist()]
    else:
        lines = [f"{i}\n" for i in idx.tolist()]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(lines))
    return path


def read_subset(path: str | os.PathLike[str]) -> np.ndarray:
    """Indices from a file written by :func:`write_subset` (first field of each line)."""
    out: list[int] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                out.append(int(line.split()[0]))
            except ValueError as exc:
                raise DatasetError(
                    f"{path}:{line_no}: expected '<index>[\\t<file name>]', got {line[:60]!r}; fix: for official "
                    "name lists use subset_from_file_list"
                ) from exc
    return np.asarray(out, dtype=np.int64)

"""Which images to label first, from a pretrained embedding: TypiClust, then the least certain images.

TypiClust (Hacohen, Dekel and Weinshall, "Active Learning on a Budget", ICML 2022, Sec. 4): with
``L`` images labelled and a budget of ``B``, cluster the self-supervised embedding into ``L + B``
clusters with k-means, then repeatedly take the largest cluster that holds no labelled image and,
in it, the most *typical* image: the inverse of its mean distance to its ``k`` (20) nearest
neighbours inside the cluster. Clusters under 5 images are left out, as in the paper (outliers).

A second round passes the images already labelled. Their clusters are covered, so the new picks go
to the regions no label speaks for. When every usable cluster is covered (the number of clusters is
capped, ``max_clusters``), the rest of the budget goes to the images the current labels are least
sure about: a nearest-class-mean classifier on the embedding (cosine similarity / 0.1, softmax),
lowest margin between its two best classes first.

Everything here works on a feature matrix; ``simclrv2.select`` computes it from an encoder and an
image folder, and ``simclrv2.engine.labels`` from a dataset split. k-means is scikit-learn's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Selection", "SelectionError", "cluster_features", "least_certain", "random_picks", "typical_picks",
           "typicality"]

MIN_CLUSTER_SIZE = 5  # TypiClust leaves smaller clusters out: they are outliers, not typical of anything
NEIGHBOURS = 20  # TypiClust's k for typicality
# Above this many points x clusters, Lloyd's k-means costs more than embedding the images on a CPU;
# MiniBatchKMeans (TypiClust's choice for many clusters) stays a small share of it (docs/BENCHMARKS.md)
_FULL_KMEANS_MAX_WORK = 5_000_000


class SelectionError(ValueError):
    """A selection that cannot be made (a budget larger than the images left, ...), in one line."""


@dataclass
class Selection:
    """The picks in labelling order; one entry per pick in each array."""

    indices: np.ndarray  # (B,) int64 rows of the feature matrix
    cluster: np.ndarray  # (B,) int64 k-means cluster of each pick
    score: np.ndarray  # (B,) float64: typicality of an "uncovered" pick, 1 - margin of an "uncertain" one
    reason: list[str] = field(default_factory=list)  # "uncovered" | "uncertain" | "typical" (a covered cluster)
    n_clusters: int = 0


def _normalised(features: torch.Tensor | np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(features).float()
    return F.normalize(x, dim=1)  # SimCLR's geometry is the cosine one


def cluster_features(features: torch.Tensor | np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """k-means cluster (int64, (N,)) of each L2-normalised row, scikit-learn, seeded."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    x = _normalised(features).cpu().numpy()
    n_clusters = max(1, min(n_clusters, len(x)))
    if len(x) * n_clusters <= _FULL_KMEANS_MAX_WORK:
        km = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed)
    else:
        km = MiniBatchKMeans(n_clusters=n_clusters, n_init=1, batch_size=4096, random_state=seed)
    return km.fit_predict(x).astype(np.int64)


def typicality(features: torch.Tensor, k: int = NEIGHBOURS, chunk: int = 2048) -> torch.Tensor:
    """Typicality of each row among the rows (one cluster): 1 / mean distance to its ``k`` nearest
    others (TypiClust eq. 2), (M,) float64 on the CPU; 0 for a cluster of one."""
    m = len(features)
    k = min(k, m - 1)
    if k < 1:
        return torch.zeros(m, dtype=torch.float64)
    out = []
    for start in range(0, m, chunk):  # (chunk, M) distances at a time, never (M, M)
        d = torch.cdist(features[start : start + chunk], features)
        nearest = d.topk(k + 1, dim=1, largest=False).values[:, 1:]  # the first is the row itself
        out.append(1.0 / (nearest.double().mean(1).cpu() + 1e-12))
    return torch.cat(out)


def least_certain(features: torch.Tensor | np.ndarray, labelled: np.ndarray, classes: np.ndarray,
                  candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``candidates`` ordered from the least certain, and each one's 1 - margin.

    The model is the labels' nearest class mean on the normalised embedding (softmax of cosine
    similarity / 0.1); the margin is between its two most probable classes. With a single class
    labelled there is no margin: the farthest from every labelled image comes first instead.
    """
    x = _normalised(features)
    cand = x[torch.from_numpy(candidates)]
    known = np.array([c is not None and c != "" for c in classes], dtype=bool)  # "": seen, not labelled
    names = np.unique(classes[known]) if known.any() else []
    if len(names) < 2:
        nearest = torch.cdist(cand, x[torch.from_numpy(labelled)]).min(1).values.double()
        score = nearest / (nearest.max() + 1e-12)
    else:
        means = torch.stack([x[torch.from_numpy(labelled[known & (classes == c)])].mean(0) for c in names])
        probs = (cand @ F.normalize(means, dim=1).T / 0.1).softmax(1)
        top2 = probs.topk(2, dim=1).values.double()
        score = 1.0 - (top2[:, 0] - top2[:, 1])
    order = np.lexsort((candidates, -score.numpy()))  # least certain first, ties by index
    return candidates[order], score.numpy()[order]


def random_picks(n: int, budget: int, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """``budget`` rows of ``range(n)`` drawn uniformly without looking at anything, ``exclude`` never."""
    pool = np.setdiff1d(np.arange(n), np.asarray(exclude if exclude is not None else [], dtype=np.int64))
    _check_budget(budget, len(pool), n)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))  # its own stream, apart from the balanced draws
    return pool[rng.permutation(len(pool))[:budget]].astype(np.int64)


def _check_budget(budget: int, left: int, total: int) -> None:
    if budget < 1:
        raise SelectionError(f"budget must be at least 1, got {budget}")
    if budget > left:
        raise SelectionError(f"budget={budget} is more than the {left} of {total} images not yet labelled; "
                             f"lower budget to at most {left} or add images")


def typical_picks(features: torch.Tensor | np.ndarray, budget: int, seed: int = 0,
                  labelled: np.ndarray | None = None, labelled_classes: np.ndarray | None = None,
                  max_clusters: int = 500, device: torch.device | str = "cpu") -> Selection:
    """TypiClust's ``budget`` picks (module docstring), never one of ``labelled``.

    ``labelled_classes`` (one per ``labelled`` image) lets the picks beyond the uncovered clusters go
    to the least certain images; without them those picks continue TypiClust's rule (the largest
    cluster with the fewest picks, its most typical image left). ``device`` computes typicality.
    """
    n = len(features)
    lab = np.unique(np.asarray(labelled if labelled is not None else [], dtype=np.int64))
    _check_budget(budget, n - len(lab), n)
    k = min(len(lab) + budget, max_clusters, n)
    cluster = cluster_features(features, k, seed)
    x = _normalised(features).to(device)
    sizes = np.bincount(cluster, minlength=k)
    counts = np.bincount(cluster[lab], minlength=k)  # labelled images per cluster, picks added as made
    taken = np.zeros(n, dtype=bool)
    taken[lab] = True
    usable = sizes >= MIN_CLUSTER_SIZE
    if not usable.any():
        usable[:] = True
    typical: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # cluster -> (members, typicality)
    has_classes = labelled_classes is not None and any(c is not None and c != "" for c in labelled_classes)
    picks: list[tuple[int, int, float, str]] = []
    while len(picks) < budget:
        free = sizes - counts > 0  # every labelled image and pick is counted in its cluster
        open_ = usable & free
        uncovered = open_ & (counts == 0)
        if not uncovered.any() and has_classes:
            break  # the rest go to the least certain images
        if not open_.any():
            open_ = free  # only clusters too small to be used are left
        pool = np.flatnonzero(uncovered if uncovered.any() else open_)
        c = int(pool[np.lexsort((pool, -sizes[pool], counts[pool]))[0]])  # fewest labels, then largest
        if c not in typical:
            members = np.flatnonzero(cluster == c)
            typical[c] = members, typicality(x[torch.from_numpy(members).to(x.device)]).numpy()
        members, score = typical[c]
        left = ~taken[members]
        best = int(np.flatnonzero(left)[np.argmax(score[left])])
        i = int(members[best])
        picks.append((i, c, float(score[best]), "uncovered" if counts[c] == 0 else "typical"))
        taken[i] = True
        counts[c] += 1
    if len(picks) < budget:
        classes = _classes_of(labelled, labelled_classes, lab)
        rest, doubt = least_certain(features, lab, classes, np.flatnonzero(~taken))
        for i, s in zip(rest[: budget - len(picks)], doubt):
            picks.append((int(i), int(cluster[i]), float(s), "uncertain"))
    idx, cl, sc, why = zip(*picks)
    return Selection(np.array(idx, dtype=np.int64), np.array(cl, dtype=np.int64), np.array(sc), list(why), k)


def _classes_of(labelled: np.ndarray | None, classes: np.ndarray | None, unique_lab: np.ndarray) -> np.ndarray:
    """The class of each of ``unique_lab`` from the caller's (maybe repeated, unsorted) pairs."""
    table = dict(zip(np.asarray(labelled, dtype=np.int64).tolist(), list(classes)))
    return np.array([table[i] for i in unique_lab.tolist()], dtype=object)

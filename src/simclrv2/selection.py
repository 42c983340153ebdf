"""Which images to label first, from a pretrained embedding: TypiClust or ProbCover, then the least certain.

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

ProbCover (Yehuda, Dekel, Hacohen and Weinshall, "Active Learning Through a Covering Lens", NeurIPS
2022, Sec. 4): k-means with as many clusters as classes gives pseudo-labels; the ball radius delta
is the largest at which ``alpha`` (0.95) of the images' balls are pure (one pseudo-label); the
picks greedily cover the most images of the delta-ball graph (cosine embedding) that no labelled
image's ball covers. The graph is built in blocks and kept as sparse edges, so 100,000 images fit.

**Why TypiClust is the default.** Chosen on validation top-1 after fine-tuning on the picks, with
the same recipe and learning-rate search for both, at 4 to 6 labels a class (docs/EXPERIMENTS.md,
"TypiClust or ProbCover"): Fashion-MNIST with the demo encoder, 60 labels, 68.10 against 50.85; the
held-out fmnist4k, 40 labels, 66.75 against 58.25; digits, 40 labels, 75.69 against 65.28. ProbCover
was below the random picks' mean on all three. On our short pretrainings the k-means clusters have
many images near their borders, so 95% purity allows only a small radius (0.10 and 0.19 on the
held-out folders), and the greedy cover spends the budget in the densest classes: ProbCover's 60
Fashion-MNIST labels held no pullover, coat or shirt, and its first 10 picks on the held-out folders
covered 4 and 5 classes, against TypiClust's 9. ProbCover stays available as ``method=probcover``
(it is built for an embedding whose clusters are cleaner).

Everything here works on a feature matrix; ``simclrv2.select`` computes it from an encoder and an
image folder, and ``simclrv2.engine.labels`` from a dataset split. k-means is faiss's on a CUDA
device when faiss with GPU support is installed, scikit-learn's otherwise (:func:`kmeans_backend`).
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
_SEEDING_ROWS = 10_000  # rows the k-means++ seeding of the faiss path reads (it runs on the CPU)
PURITY_ALPHA = 0.95  # ProbCover's alpha: the share of pure balls its radius keeps
PURITY_SAMPLE = 20_000  # images whose balls estimate the purity above this many
MAX_EDGES = 200_000_000  # ProbCover's graph, about 24 bytes an edge while it is built: 5 GB
METHODS = ("typiclust", "probcover")
DEFAULT_METHOD = "typiclust"  # chosen on validation top-1 (module docstring)


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
    method: str = "typiclust"  # "typiclust" | "probcover"
    kmeans: str = "scikit-learn"  # the k-means that ran: "scikit-learn" | "faiss-gpu"
    delta: float = 0.0  # ProbCover's ball radius (cosine embedding); 0 for TypiClust


def _normalised(features: torch.Tensor | np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(features).float()
    return F.normalize(x, dim=1)  # SimCLR's geometry is the cosine one


def faiss_gpu_available() -> bool:
    """faiss is installed with GPU support and sees a GPU (``pip install simclrv2[select-gpu]``)."""
    try:
        import faiss
    except ImportError:
        return False
    return bool(getattr(faiss, "get_num_gpus", lambda: 0)() > 0)


def kmeans_backend(device: torch.device | str = "cpu") -> str:
    """``"faiss-gpu"`` on a CUDA device when faiss with GPU support is importable, else ``"scikit-learn"``."""
    return "faiss-gpu" if torch.device(device).type == "cuda" and faiss_gpu_available() else "scikit-learn"


def faiss_kmeans(x: np.ndarray, n_clusters: int, seed: int, gpu: bool, n_init: int = 3) -> np.ndarray:
    """faiss's k-means (Lloyd's iterations) from scikit-learn's k-means++ seeding, ``n_init`` seeds,
    the lowest objective kept: the cluster (int64, (N,)) of each row of ``x``. ``gpu=False`` runs
    faiss-cpu, the same code the tests check. faiss alone seeds with random rows, which on a few
    well-separated clusters often merges two of them (k-means++ is what scikit-learn uses). The
    seeding runs on the CPU, so it reads at most ``_SEEDING_ROWS`` seeded rows: on all 100,000 it
    took most of the time at 100 clusters (docs/BENCHMARKS.md)."""
    import faiss
    from sklearn.cluster import kmeans_plusplus

    x = np.ascontiguousarray(x, dtype=np.float32)
    best, best_obj = None, np.inf
    for r in range(n_init):
        rows = x
        if len(x) > _SEEDING_ROWS:
            rows = x[np.sort(np.random.default_rng(seed + r).choice(len(x), _SEEDING_ROWS, replace=False))]
        init, _ = kmeans_plusplus(rows, n_clusters, random_state=seed + r)
        km = faiss.Kmeans(x.shape[1], n_clusters, niter=50, seed=seed + r, gpu=gpu,
                          max_points_per_centroid=max(256, -(-len(x) // n_clusters)))  # no silent subsampling
        km.train(x, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
        if km.obj[-1] < best_obj:
            best, best_obj = km, km.obj[-1]
    return best.index.search(x, 1)[1][:, 0].astype(np.int64)


def cluster_features(features: torch.Tensor | np.ndarray, n_clusters: int, seed: int,
                     backend: str = "scikit-learn") -> np.ndarray:
    """k-means cluster (int64, (N,)) of each L2-normalised row, seeded, with ``backend``
    (:func:`kmeans_backend`): faiss on the GPU, or scikit-learn on the CPU."""
    x = _normalised(features).cpu().numpy()
    n_clusters = max(1, min(n_clusters, len(x)))
    if backend.startswith("faiss"):
        return faiss_kmeans(x, n_clusters, seed, gpu=backend == "faiss-gpu")
    from sklearn.cluster import KMeans, MiniBatchKMeans

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
    backend = kmeans_backend(device)
    cluster = cluster_features(features, k, seed, backend)
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
    return Selection(np.array(idx, dtype=np.int64), np.array(cl, dtype=np.int64), np.array(sc), list(why), k,
                     "typiclust", backend)


def _classes_of(labelled: np.ndarray | None, classes: np.ndarray | None, unique_lab: np.ndarray) -> np.ndarray:
    """The class of each of ``unique_lab`` from the caller's (maybe repeated, unsorted) pairs."""
    table = dict(zip(np.asarray(labelled, dtype=np.int64).tolist(), list(classes)))
    return np.array([table[i] for i in unique_lab.tolist()], dtype=object)


# ------------------------------------------------------------------------------------------ ProbCover


def _row_chunk(n: int) -> int:
    """Rows per block of an (rows, N) similarity matrix: about 32 M entries (128 MB) at a time."""
    return max(64, min(2048, (1 << 25) // max(n, 1)))


def distance_to_other_clusters(x: torch.Tensor, pseudo: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each of ``rows``: the distance from ``x[row]`` (unit rows, (N, D)) to the nearest row of
    another ``pseudo`` cluster, (R,) float64; ``inf`` when there is no other cluster.

    The ball of radius ``delta`` around a row is pure (ProbCover Sec. 4.1) exactly when this
    distance is at least ``delta``, so one pass over the pairs gives the purity of every radius."""
    labels = torch.from_numpy(np.asarray(pseudo, dtype=np.int64)).to(x.device)
    out = []
    step = _row_chunk(len(x))
    for start in range(0, len(rows), step):
        r = torch.from_numpy(np.asarray(rows[start : start + step], dtype=np.int64)).to(x.device)
        sim = x[r] @ x.T  # (chunk, N) cosine similarity
        sim.masked_fill_(labels[r][:, None] == labels[None, :], -float("inf"))  # same cluster: not a rival
        best = sim.max(1).values.double()
        d = torch.sqrt((2.0 - 2.0 * best).clamp_min(0.0))  # |a - b|^2 = 2 - 2 a.b for unit rows
        out.append(torch.where(torch.isinf(best), torch.full_like(d, float("inf")), d).cpu())
    return torch.cat(out).numpy()


def coverage_radius(features: torch.Tensor | np.ndarray, pseudo: np.ndarray, alpha: float = PURITY_ALPHA,
                    sample: int = PURITY_SAMPLE, seed: int = 0, device: torch.device | str = "cpu") -> float:
    """ProbCover's delta: the largest radius at which at least ``alpha`` of the balls around the
    images are pure, i.e. hold one ``pseudo`` (k-means) cluster only (Yehuda et al., Sec. 4.1).

    The paper scans a grid of radii; purity(delta) is the share of images whose nearest image of
    another cluster is at least delta away, so the largest pure-enough radius is read off that
    distance's sorted values exactly. Above ``sample`` images the share is estimated on ``sample``
    seeded rows (against every image); its standard error at 0.95 is 0.0015 for 20,000 rows."""
    x = _normalised(features).to(device)
    n = len(x)
    rows = np.arange(n)
    if n > sample:
        rows = np.sort(np.random.default_rng(np.random.SeedSequence([seed, 3])).choice(n, sample, replace=False))
    r = np.sort(distance_to_other_clusters(x, pseudo, rows))
    m = int(np.ceil(alpha * len(r) - 1e-9))  # at least m balls pure: delta = the m-th largest distance
    delta = float(r[len(r) - m])
    return delta if np.isfinite(delta) else 2.0 + 1e-6  # one cluster: a ball of radius > 2 holds every unit row


def ball_graph(features: torch.Tensor | np.ndarray, delta: float,
               device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The delta-ball graph of the normalised rows as CSR: ``indices[indptr[i]:indptr[i + 1]]`` are
    the rows ``j`` with ``|x_i - x_j| < delta`` (ProbCover's edges), ``i`` itself included, sorted.

    Built in row blocks against the rows after them (each pair once, then mirrored, so the graph
    is symmetric bit for bit), on ``device``; only the edges are kept, int32, never the (N, N) matrix."""
    x = _normalised(features).to(device)
    n = len(x)
    threshold = 1.0 - delta * delta / 2.0  # |a - b| < delta  <=>  a.b > 1 - delta^2 / 2 for unit rows
    upper: list[tuple[torch.Tensor, torch.Tensor]] = []  # (i, j), j > i, in (i, j) order
    edges = n
    step = _row_chunk(n)
    for start in range(0, n, step):
        sim = x[start : start + step] @ x[start:].T  # (chunk, N - start): pairs i <= j only
        i, j = (sim > threshold).nonzero(as_tuple=True)
        keep = j > i  # the diagonal is added below, whatever the rounding
        upper.append(((i[keep] + start).int().cpu(), (j[keep] + start).int().cpu()))
        edges += 2 * len(upper[-1][0])
        if edges > MAX_EDGES:
            raise SelectionError(f"the delta-ball graph (delta={delta:.4g}) has over {MAX_EDGES:,} edges: the embedding "
                                 "is too crowded for ProbCover at this size; use method=typiclust")
    centre = torch.arange(n, dtype=torch.int32)
    # row r: the mirrored pairs (columns < r, arriving in increasing order), r itself, then the pairs
    # above it, so a stable sort by row alone leaves every row's columns sorted
    src = torch.cat([j for _, j in upper] + [centre] + [i for i, _ in upper])
    dst = torch.cat([i for i, _ in upper] + [centre] + [j for _, j in upper])
    del upper
    order = torch.sort(src, stable=True).indices
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(src.numpy(), minlength=n), out=indptr[1:])
    return indptr, dst[order].numpy()


def _neighbours(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The concatenated CSR rows ``rows`` (with repeats across rows), without a Python loop."""
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    first = np.cumsum(lengths) - lengths  # where each row starts in the output
    return indices[np.repeat(starts - first, lengths) + np.arange(int(lengths.sum()))]


def greedy_cover(indptr: np.ndarray, indices: np.ndarray, budget: int,
                 labelled: np.ndarray) -> tuple[list[int], list[int], np.ndarray]:
    """ProbCover's greedy max coverage (Sec. 4.2): up to ``budget`` times, the ball that covers most
    images no labelled or picked ball covers yet; it stops early when a pick would cover nothing.

    Returns the picks, each one's gain (images newly covered) and the covered mask. The balls of the
    ``labelled`` images are covered first (the second round). Each step updates the degrees of the
    balls that hold a newly covered image only (the graph is symmetric), O(edges) over all steps."""
    n = len(indptr) - 1
    covered = np.zeros(n, dtype=bool)
    if len(labelled):
        covered[_neighbours(indptr, indices, labelled)] = True
    row_of = np.repeat(np.arange(n), np.diff(indptr))
    degree = np.bincount(row_of[~covered[indices]], minlength=n)  # (N,) images each ball would newly cover
    taken = np.zeros(n, dtype=bool)
    taken[labelled] = True
    degree[taken] = -1
    picks, gains = [], []
    while len(picks) < budget:
        cur = int(np.argmax(degree))  # ties: the lowest index, so the same features give the same picks
        if degree[cur] <= 0:
            break
        ball = indices[indptr[cur] : indptr[cur + 1]]
        new = ball[~covered[ball]]
        covered[new] = True
        degree -= np.bincount(_neighbours(indptr, indices, new), minlength=n)
        taken[cur] = True
        degree[taken] = -1
        picks.append(cur)
        gains.append(len(new))
    return picks, gains, covered


def probcover_picks(features: torch.Tensor | np.ndarray, budget: int, seed: int = 0,
                    labelled: np.ndarray | None = None, labelled_classes: np.ndarray | None = None,
                    n_classes: int = 10, alpha: float = PURITY_ALPHA,
                    device: torch.device | str = "cpu") -> Selection:
    """ProbCover's ``budget`` picks (Yehuda et al., NeurIPS 2022), never one of ``labelled``.

    k-means with ``n_classes`` clusters gives pseudo-labels; delta is the largest radius whose balls
    are pure for ``alpha`` of the images (:func:`coverage_radius`); the picks greedily cover the
    most images of the delta-ball graph not covered yet (:func:`greedy_cover`; the labelled images'
    balls count as covered). When every image is covered, the rest go to the least certain images
    if ``labelled_classes`` are given, else the cover goes on with balls of half the radius."""
    n = len(features)
    lab = np.unique(np.asarray(labelled if labelled is not None else [], dtype=np.int64))
    _check_budget(budget, n - len(lab), n)
    backend = kmeans_backend(device)
    pseudo = cluster_features(features, n_classes, seed, backend)
    delta = coverage_radius(features, pseudo, alpha, seed=seed, device=device)
    has_classes = labelled_classes is not None and any(c is not None and c != "" for c in labelled_classes)
    picks: list[tuple[int, int, float, str]] = []
    radius = delta
    while len(picks) < budget:
        indptr, indices = ball_graph(features, radius, device)
        done = np.concatenate([lab, np.array([p[0] for p in picks], dtype=np.int64)])
        found, gains, _ = greedy_cover(indptr, indices, budget - len(picks), done)
        picks += [(i, int(pseudo[i]), float(g), "uncovered") for i, g in zip(found, gains)]
        if len(picks) < budget and has_classes:
            taken = np.zeros(n, dtype=bool)
            taken[done] = True
            taken[found] = True
            rest, doubt = least_certain(features, lab, _classes_of(labelled, labelled_classes, lab),
                                        np.flatnonzero(~taken))
            picks += [(int(i), int(pseudo[i]), float(s), "uncertain") for i, s in zip(rest[: budget - len(picks)], doubt)]
        if len(picks) < budget and radius < 1e-6:  # only duplicates of picked images are left
            taken = np.zeros(n, dtype=bool)
            taken[np.concatenate([done, np.asarray(found, dtype=np.int64)])] = True
            picks += [(int(i), int(pseudo[i]), 0.0, "covered") for i in np.flatnonzero(~taken)[: budget - len(picks)]]
        radius /= 2  # every image covered and no labels to rank doubt by: smaller balls
    idx, cl, sc, why = zip(*picks)
    return Selection(np.array(idx, dtype=np.int64), np.array(cl, dtype=np.int64), np.array(sc), list(why),
                     int(pseudo.max()) + 1, "probcover", backend, delta)


def select_picks(method: str, features: torch.Tensor | np.ndarray, budget: int, seed: int = 0,
                 labelled: np.ndarray | None = None, labelled_classes: np.ndarray | None = None,
                 n_classes: int = 10, max_clusters: int = 500, device: torch.device | str = "cpu") -> Selection:
    """``method`` ("typiclust" or "probcover", :data:`METHODS`) on a feature matrix, one signature."""
    if method == "typiclust":
        return typical_picks(features, budget, seed, labelled, labelled_classes, max_clusters, device)
    if method == "probcover":
        return probcover_picks(features, budget, seed, labelled, labelled_classes, n_classes, device=device)
    raise SelectionError(f"method must be one of {', '.join(METHODS)}, got '{method}'")

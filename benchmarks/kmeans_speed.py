"""k-means for ``simclrv2 select``: scikit-learn against faiss on the CPU, on one feature matrix, in one run.

    python benchmarks/kmeans_speed.py [--images 100000] [--dim 512] [--clusters 10,100]

The features are a seeded mixture of 50 Gaussian blobs (``--images`` x ``--dim``, L2-normalised
inside :func:`simclrv2.selection.cluster_features`). For each cluster count it times
``cluster_features`` with ``backend="scikit-learn"`` (Lloyd's KMeans, or MiniBatchKMeans above 5
million points x clusters, as ``select`` runs it on a CPU) and ``backend="faiss-cpu"`` (the faiss
code that ``select`` runs on a GPU, here on the CPU: k-means++ seeding, faiss's Lloyd's
iterations), and gives their agreement (adjusted Rand index). Needs faiss-cpu (the dev extra).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=lambda s: [int(v) for v in s.split(",")], default=[10, 100])
    args = parser.parse_args(argv)
    import faiss
    from sklearn.metrics import adjusted_rand_score

    from simclrv2.host import cpu_name
    from simclrv2.selection import cluster_features

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, args.dim)).astype(np.float32)
    x = centres[rng.integers(0, 50, args.images)] + rng.normal(scale=0.8, size=(args.images, args.dim)).astype(np.float32)
    cpu = cpu_name()
    print(f"{args.images:,} x {args.dim} features; {cpu}, torch threads "
          f"{torch.get_num_threads()}, faiss {faiss.__version__} threads {faiss.omp_get_max_threads()}", flush=True)
    print("| clusters | scikit-learn | faiss-cpu | faiss / scikit-learn | adjusted Rand index |\n|---:|---:|---:|---:|---:|")
    for k in args.clusters:
        seconds, labels = {}, {}
        for backend in ("scikit-learn", "faiss-cpu"):
            t = time.perf_counter()
            labels[backend] = cluster_features(x, k, seed=0, backend=backend)
            seconds[backend] = time.perf_counter() - t
        ari = adjusted_rand_score(labels["scikit-learn"], labels["faiss-cpu"])
        print(f"| {k} | {seconds['scikit-learn']:.1f} s | {seconds['faiss-cpu']:.1f} s | "
              f"{seconds['faiss-cpu'] / seconds['scikit-learn']:.2f} | {ari:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

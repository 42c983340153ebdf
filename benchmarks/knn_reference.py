"""Reference points for the pretraining kNN monitor: raw pixels and randomly initialised encoders.

    python benchmarks/knn_reference.py                     # Fashion-MNIST, the monitor's protocol
    python benchmarks/knn_reference.py --models r10_0.25x_sk0:small

The same protocol as ``simclrv2 pretrain``'s kNN monitor with its defaults (seed 0): a bank of
10,000 training images and 2,000 test images drawn with ``torch.randperm``, cosine similarity,
k = 200, weights exp(sim / 0.1). An encoder that learned something useful must beat the pixels.
A random encoder's BatchNorm statistics are first estimated in train mode on the bank.
"""

from __future__ import annotations

import argparse

import torch

from simclrv2.data.datasets import load_dataset
from simclrv2.engine.batches import BatchSource
from simclrv2.engine.evaluate import extract, knn_monitor_indices, knn_predict
from simclrv2.engine.models import new_model


def knn_top1(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
             num_classes: int, k: int) -> float:
    scores = knn_predict(train_f, train_y, test_f, num_classes, k, 0.1)
    return round(100.0 * (scores.argmax(1) == test_y).float().mean().item(), 2)


def main(argv: list[str] | None = None) -> list[tuple[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--models", default="r18_0.25x_sk0:imagenet,r10_0.25x_sk0:small",
                        help="comma-separated registry_name:stem pairs, random init")
    parser.add_argument("--bank", type=int, default=10000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train, test = load_dataset(args.dataset, "train"), load_dataset(args.dataset, "test")
    bank, tst = knn_monitor_indices(train.labels, len(test), args.bank, args.test, args.seed)
    ytr, yte, n_cls = train.labels[bank], test.labels[tst], train.num_classes
    px_tr = train.images[bank].flatten(1).float()
    px_te = test.images[tst].flatten(1).float()
    mean = px_tr.mean(0)
    rows = [("raw pixels", knn_top1(px_tr, ytr, px_te, yte, n_cls, args.k)),
            ("pixels minus the bank mean", knn_top1(px_tr - mean, ytr, px_te - mean, yte, n_cls, args.k))]
    size = int(train.images.shape[-1])
    for spec in args.models.split(","):
        name, stem = spec.split(":")
        torch.manual_seed(args.seed)
        model = new_model(name, train, size, stem).train()
        with torch.no_grad():  # BN running statistics of the random network
            for idx in torch.split(bank, 500):
                model.features(train.images[idx].float() / 255)
        cpu = torch.device("cpu")
        f_tr, _ = extract(model, BatchSource(train, cpu, 0), bank, size)
        f_te, _ = extract(model, BatchSource(test, cpu, 0), tst, size)
        rows.append((f"random-init {name} ({stem} stem)", knn_top1(f_tr, ytr, f_te, yte, n_cls, args.k)))

    print(f"kNN monitor protocol: {args.dataset}, bank {len(bank)}, test {len(tst)}, k {args.k}, seed {args.seed}")
    print("\n| features | kNN top-1 (%) |\n|---|---:|")
    for label, acc in rows:
        print(f"| {label} | {acc:.2f} |")
    return rows


if __name__ == "__main__":
    main()

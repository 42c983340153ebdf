"""What a linear classifier gets from raw pixels at the pipeline's label fractions, next to an encoder.

    python benchmarks/linear_reference.py                                  # pixels only
    python benchmarks/linear_reference.py --checkpoint runs/fashion_mnist_demo/pretrain

For each label fraction, the pipeline's labelled subset (``balanced_subset`` with ``--label-seed``,
the same images that ``finetune`` and ``supervised`` train on) trains an L2-regularised multinomial
logistic regression (scikit-learn, lbfgs, at most 300 iterations) on standardised inputs; C is
chosen by 3-fold cross-validation on the labelled images only, from ``--cs``. Test top-1 is on the whole test split.
Rows: raw pixels, and with ``--checkpoint`` the frozen encoder's pooled features (eval-mode BN,
the evaluation resize). A pretrained encoder that fine-tuning can build on should beat the pixels
here; when it does not, neither its fine-tuned model nor its students have much to add over a
supervised baseline trained on the same labels.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

from simclrv2.data.datasets import load_dataset
from simclrv2.data.subsets import balanced_subset
from simclrv2.engine.batches import BatchSource
from simclrv2.engine.evaluate import extract
from simclrv2.modelfile import load_model


def logistic_top1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                  cs: list[float], seed: int = 0, max_iter: int = 300) -> tuple[float, float]:
    """(test top-1 %, chosen C): C with the best mean accuracy over 3 stratified folds of the
    training rows (standardised on each fold's training part), then a refit on all of them."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit(x: np.ndarray, y: np.ndarray, c: float):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter)).fit(x, y)

    folds = list(StratifiedKFold(n_splits=3, shuffle=True, random_state=seed).split(train_x, train_y))
    cv = [np.mean([(fit(train_x[a], train_y[a], c).predict(train_x[b]) == train_y[b]).mean() for a, b in folds])
          for c in cs]
    best = cs[int(np.argmax(cv))]
    top1 = 100.0 * float((fit(train_x, train_y, best).predict(test_x) == test_y).mean())
    return round(top1, 2), best


def main(argv: list[str] | None = None) -> list[tuple[str, float, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--checkpoint", default="", help="a pretraining run folder, checkpoint or model file")
    parser.add_argument("--fractions", default="0.001,0.01,0.1")
    parser.add_argument("--label-seed", type=int, default=0)
    parser.add_argument("--cs", default="0.01,0.1,1", help="inverse L2 strengths to cross-validate")
    parser.add_argument("--test-limit", type=int, default=0, help="first N test images only (0 = all)")
    args = parser.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    cs = [float(c) for c in args.cs.split(",")]

    train = load_dataset(args.dataset, "train", data_dir=args.data_dir)
    test = load_dataset(args.dataset, "test", data_dir=args.data_dir)
    n_test = args.test_limit or len(test)
    subsets = {f: torch.from_numpy(balanced_subset(train.labels, f, args.label_seed)) for f in fractions}
    test_idx = torch.arange(n_test)
    ytr, yte = train.labels.numpy(), test.labels[:n_test].numpy()
    inputs = {"raw pixels": (train.images.flatten(1).float().numpy() / 255.0,
                             test.images[:n_test].flatten(1).float().numpy() / 255.0)}
    if args.checkpoint:
        cpu = torch.device("cpu")
        model, meta = load_model(args.checkpoint, cpu, num_classes=0)
        model.eval().requires_grad_(False)
        size = int(meta.get("image_size") or train.images.shape[-1])
        every = torch.unique(torch.cat(list(subsets.values())))
        f_tr, _ = extract(model, BatchSource(train, cpu, 0), every, size)
        full = np.zeros((len(train), f_tr.shape[1]), dtype=np.float32)
        full[every.numpy()] = f_tr.numpy()
        f_te, _ = extract(model, BatchSource(test, cpu, 0), test_idx, size)
        inputs[f"{meta.get('model_name', 'encoder')} features ({args.checkpoint})"] = (full, f_te.numpy())

    rows = []
    print(f"{args.dataset}: logistic regression, C by 3-fold CV from {cs}, label seed {args.label_seed}, "
          f"{n_test} test images")
    print("\n| input | " + " | ".join(f"{100 * f:g}% labels" for f in fractions) + " |")
    print("|---|" + "---:|" * len(fractions))
    for name, (x_tr, x_te) in inputs.items():
        cells = []
        for f in fractions:
            idx = subsets[f].numpy()
            top1, c = logistic_top1(x_tr[idx], ytr[idx], x_te, yte, cs, args.label_seed)
            cells.append((top1, c))
        rows.append((name, *[t for t, _ in cells]))
        print(f"| {name} | " + " | ".join(f"{t:.2f} (C {c:g})" for t, c in cells) + " |", flush=True)
    return rows


if __name__ == "__main__":
    main()

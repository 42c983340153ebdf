"""How far a classifier on the frozen pretrained encoder could go, beside what the pipeline's models reach.

    python benchmarks/frozen_ceiling.py RUN_DIR DATA_DIR TRUTH_CSV

``RUN_DIR`` is a finished ``simclrv2 pipeline`` run on a few-labels folder ``DATA_DIR`` (``train/``
and ``unlabeled/``), and ``TRUTH_CSV`` the hidden classes of its unlabeled images, as
``benchmarks/heldout_datasets.py --layout fewlabels`` writes them. Every number is accuracy on
those unlabeled images, whose classes no stage saw:

- each model the pipeline chose (fine-tuned, distilled, the supervised baseline), from its own
  stage folder;
- a logistic-regression probe on the pretrained encoder's pooled features, fitted on the labelled
  images of ``train/`` (features standardised), for a few regularisation strengths. The best of
  them is read off the hidden classes, so it is a ceiling for what a linear head on this frozen
  encoder can do, not a result of the method;
- the same probe on the raw pixels (the encoder's input, flattened), as a reference: an encoder
  whose probe is no better than the pixels' has learnt nothing a linear head could use from so
  few labels.

When the probe's ceiling is itself within a few points of the baseline, no head and no choice of
rate on these labels can put fine-tuning far above it: the encoder is what limits the run.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
from few_label_probe import features_and_pixels, labelled  # beside this file
from sklearn.linear_model import LogisticRegression

from simclrv2.serve import folder_batches, load_for_serving, run_on_batches

PROBE_C = (0.01, 0.1, 1.0, 10.0)


def outputs(model_dir: Path, file_lists: list[list[Path]], output: str) -> tuple[list[np.ndarray], list[str]]:
    """The model's ``output`` for each file of each list (the model loaded once), and its class names."""
    model, info = load_for_serving(model_dir)
    out = [run_on_batches(model, folder_batches(files, info.channels, info.image_size, 256), output,
                          torch.device("cpu")).numpy() for files in file_lists]
    return out, info.classes


def probe_rows(run: Path, data: Path, unlabeled: list[Path], truth: list[str]) -> list[tuple[str, float]]:
    """A logistic-regression probe per strength in ``PROBE_C``, fitted on ``train/``'s labelled images,
    on the frozen encoder's features and on the pixels it reads (features standardised)."""
    train_files, y_train, classes = labelled(data / "train")
    (x_train, x_unl), (p_train, p_unl) = features_and_pixels(run / "pretrain", [train_files, unlabeled])
    rows = []
    for name, (xt, xu) in (("the frozen encoder", (x_train, x_unl)), ("the raw pixels", (p_train, p_unl))):
        mu, sd = xt.mean(0), xt.std(0) + 1e-6
        for c in PROBE_C:
            clf = LogisticRegression(C=c, max_iter=5000).fit((xt - mu) / sd, np.asarray(classes)[y_train])
            pred = clf.predict((xu - mu) / sd)
            rows.append((f"linear probe on {name}, C={c:g}", 100.0 * float(np.mean(pred == np.asarray(truth)))))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("truth", type=Path)
    args = ap.parse_args()
    with open(args.truth, newline="") as f:
        hidden = list(csv.DictReader(f))
    unlabeled = [args.data / "unlabeled" / r["file"] for r in hidden]
    truth = [r["class"] for r in hidden]
    results = json.loads((args.run / "results.json").read_text())["results"]
    rows = []
    for r in results:
        if r["method"] in ("linear-eval", "knn"):
            continue
        (logits,), classes = outputs(Path(r["run_dir"]), [unlabeled], "logits")
        pred = [classes[k] for k in logits.argmax(1)]
        rows.append((f"{r['method']} ({r['model']}, {r['label_fraction']:g} of the labels)",
                     100.0 * float(np.mean(np.asarray(pred) == np.asarray(truth)))))
    rows += probe_rows(args.run, args.data, unlabeled, truth)
    print(f"{len(unlabeled)} unlabeled images of {args.data.name}, pretraining of {args.run}\n")
    print("| Model | Accuracy on the unlabeled images (%) |\n|---|---|")
    for name, acc in rows:
        print(f"| {name} | {acc:.2f} |")


if __name__ == "__main__":
    main()

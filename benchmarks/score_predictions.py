"""Score a ``predictions.csv`` against classes that were kept out of the data folder.

    python benchmarks/score_predictions.py RUN_DIR/predictions.csv OUT_DIR/<name>_fewlabels_truth.csv

``predictions.csv`` may also be what ``simclrv2 predict checkpoint=STAGE_DIR
images=DIR/unlabeled out=F.csv`` writes for any one stage folder. The truth file (``file,class``,
written by ``benchmarks/heldout_datasets.py --layout fewlabels``) names every unlabeled image; the
score is the share of them whose predicted class is right, with the files that have no prediction
counted as wrong, plus the accuracy and coverage of the rows at or above a few confidence
thresholds.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV; those of ``simclrv2 predict --images UNLABELED_DIR`` (``image``,
    ``pred_class``) are read as the pipeline's (``file``, ``class``), so one model's stage folder
    can be scored the same way."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [dict(r, file=r["image"], **{"class": r["pred_class"]}) if "pred_class" in r else r for r in rows]


def score(predictions: list[dict[str, str]], truth: dict[str, str],
          thresholds: tuple[float, ...] = (0.5, 0.7, 0.9)) -> dict[str, object]:
    """Accuracy over every file of ``truth`` (a missing prediction is wrong), and per threshold."""
    by_file = {r["file"]: r for r in predictions}
    right = sum(1 for f, c in truth.items() if f in by_file and by_file[f]["class"] == c)
    out: dict[str, object] = {
        "files": len(truth), "predicted": sum(1 for f in truth if f in by_file),
        "unknown_rows": sum(1 for f in by_file if f not in truth),
        "accuracy": round(100.0 * right / max(len(truth), 1), 2),
    }
    for t in thresholds:
        sure = [f for f in truth if f in by_file and float(by_file[f]["confidence"]) >= t]
        ok = sum(1 for f in sure if by_file[f]["class"] == truth[f])
        out[f"at_least_{t:g}"] = {"images": len(sure), "accuracy": round(100.0 * ok / len(sure), 2) if sure else None}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", type=Path)
    parser.add_argument("truth", type=Path)
    args = parser.parse_args()
    for path in (args.predictions, args.truth):
        if not path.is_file():
            parser.error(f"{path}: no such file; pass a finished run's predictions.csv and the truth CSV "
                         "that benchmarks/heldout_datasets.py --layout fewlabels wrote")
    truth = {r["file"]: r["class"] for r in read_rows(args.truth)}
    print(json.dumps(score(read_rows(args.predictions), truth), indent=1))


if __name__ == "__main__":
    main()

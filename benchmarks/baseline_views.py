"""Whether a baseline's held-out images can tell its two views apart: crops and flips against the
pretraining's colour distortion, each at its best rate, compared image by image.

    python benchmarks/baseline_views.py RUN/supervised_100pct [RUN2/supervised_1pct ...]

Each folder is a baseline stage as the pipeline lays it out: ``lr_<rate>_fold<k>/`` (or
``lr_<rate>/`` on a validation split) for crops and flips, and the same under ``color/``, each with
the ``validation.npz`` its run wrote. For each view the best rate is the one with the most held-out
images right (ties: the smaller rate), as the pipeline's search counts them. On the images both best
rates scored, the table gives how many only crops and flips got right, how many only colour
distortion did, and the one-sided exact p-value of the first being so many or more if the views
were equally good (McNemar's test: a binomial on the images the two got differently). Where the
runs were also tested (``simclrv2 supervised`` by hand; the pipeline tests only the chosen rate's
run on every label), the last column is each best rate's mean test top-1 over its runs: on a tuning
folder whose ``test/`` serves as its validation data, what the choice would have cost.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

_RUN = re.compile(r"^lr_([0-9.e+-]+?)(?:_fold\d+)?$")


class Runs:
    """The held-out runs of one rate in a folder: whether each held-out image (by dataset index) was
    right, over every run of that rate that wrote ``validation.npz``, and each run's test top-1
    (None where it was not tested)."""

    def __init__(self) -> None:
        self.right: dict[int, bool] = {}
        self.tests: list[float | None] = []

    def test_top1(self) -> float | None:
        """The mean test top-1 of the runs; None where one of them was not tested."""
        return None if not self.tests or None in self.tests else sum(self.tests) / len(self.tests)


def runs_by_rate(folder: Path) -> dict[float, Runs]:
    """The held-out runs in ``folder``, by rate, each read once."""
    rates: dict[float, Runs] = {}
    for run in sorted(p for p in folder.iterdir() if p.is_dir()):
        match = _RUN.match(run.name)
        if match is None or not (run / "validation.npz").is_file():
            continue
        runs = rates.setdefault(float(match.group(1)), Runs())
        with np.load(run / "validation.npz") as z:
            runs.right.update(zip(z["index"].tolist(), (z["probs"].argmax(1) == z["label"]).tolist()))
        metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
        runs.tests.append(metrics.get("top1"))
    return rates


def best(rates: dict[float, Runs]) -> tuple[float, Runs]:
    """The rate with the most images right, with the pipeline's own tie rule (the smaller rate;
    ``pipeline.best_rates``), and its runs."""
    from simclrv2.pipeline import best_rates

    rate = best_rates({r: 100.0 * sum(runs.right.values()) / len(runs.right) for r, runs in rates.items()})[0]
    return rate, rates[rate]


def compare(folder: Path) -> dict[str, object]:
    """Both views' best rates in the baseline stage ``folder``, and the paired test between them."""
    views = {}
    for name, where in (("crops and flips", folder), ("colour distortion", folder / "color")):
        rates = runs_by_rate(where) if where.is_dir() else {}
        if not rates:
            raise SystemExit(f"{where}: no lr_<rate>[_fold<k>] run with a validation.npz ({name}); "
                             "give a baseline stage folder of a pipeline run, such as RUN/supervised_100pct")
        views[name] = best(rates)
    (plain_rate, plain_runs), (colour_rate, colour_runs) = views.values()
    plain, colour = plain_runs.right, colour_runs.right
    shared = sorted(plain.keys() & colour.keys())
    if not shared:
        raise SystemExit(f"{folder}: the two views scored no image in common; both searches must hold out the same images")
    only_plain = sum(plain[i] and not colour[i] for i in shared)
    only_colour = sum(colour[i] and not plain[i] for i in shared)
    differ = only_plain + only_colour
    p = binomtest(only_plain, differ, 0.5, alternative="greater").pvalue if differ else 1.0
    return {"images": len(shared), "plain_rate": plain_rate, "plain_top1": 100.0 * sum(plain[i] for i in shared) / len(shared),
            "colour_rate": colour_rate, "colour_top1": 100.0 * sum(colour[i] for i in shared) / len(shared),
            "only_plain": only_plain, "only_colour": only_colour, "p_plain_better": float(p),
            "plain_test": plain_runs.test_top1(), "colour_test": colour_runs.test_top1()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="baseline stage folders (RUN/supervised_<f>)")
    args = parser.parse_args()
    print("| Folder | Images | Crops and flips: rate, top-1 | Colour distortion: rate, top-1 "
          "| Only crops and flips right | Only colour right | p (crops and flips better) "
          "| Test top-1, crops and flips / colour |")
    print("|---|---|---|---|---|---|---|---|")
    for folder in args.folders:
        r = compare(folder)
        print(f"| {folder} | {r['images']} | {r['plain_rate']:g}, {r['plain_top1']:.2f} | {r['colour_rate']:g}, "
              f"{r['colour_top1']:.2f} | {r['only_plain']} | {r['only_colour']} | {r['p_plain_better']:.3f} | "
              + ("-" if r["plain_test"] is None or r["colour_test"] is None
                 else f"{r['plain_test']:.2f} / {r['colour_test']:.2f}") + " |")


if __name__ == "__main__":
    main()

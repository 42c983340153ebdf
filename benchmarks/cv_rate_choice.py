"""What choosing a learning rate on a few labels' folds costs, and how other ways of scoring the folds would choose.

    python benchmarks/cv_rate_choice.py OUT --draw DRAW [--draw DRAW ...] \
        --finetune FT_CONFIG --finetune-lr 0.01 --encoder ENC --supervised SUP_CONFIG --supervised-lr 0.1 \
        [--folds 4] [--min-steps 300]

Each ``DRAW`` is a folder in the few-labels layout with a ``test/`` split that is validation data
(the tuning folder of ``few_label_probe.py``, laid out by ``heldout_datasets.few_labels``; never a
held-out test split). For every draw, arm (fine-tuning from ``ENC`` with ``FT_CONFIG``, the
supervised baseline with ``SUP_CONFIG``) and rate of the arm's grid (its centre, ``--finetune-lr``
or ``--supervised-lr``, times 1/16, 1/4, 1, 4, 16), the real stage runs once per fold
(``val_folds``/``val_fold``: trained on the other folds, scored on its own) and once on every
label (scored on ``test/``), in ``OUT/<draw>_<stage>_<rate>`` (``_f<k>`` for a fold); a run with
``metrics.json`` already there is read, not run again.

Prints two markdown tables: each rate's top-1 on ``test/``, with in brackets its folds' mean top-1
on their held-out labels and the fold models' mean top-1 on ``test/``; and, for
each way of scoring the folds (top-1, as the pipeline does; cross-entropy; Brier score; mean
probability of the true class; the centre unless a rate beats it by two paired standard errors),
the rate it chooses on the pipeline's grid of three (one step beyond an edge, as
``pipeline.run_cv_search`` does) and that rate's top-1 on ``test/``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

FACTORS = (1 / 16, 1 / 4, 1.0, 4.0, 16.0)  # the pipeline's grid is the middle three; the others are one step beyond


def run(out: Path, stage: str, config: str, draw: Path, lr: float, fold: int | None, folds: int, min_steps: int,
        extra: list[str]) -> Path:
    """One stage run (a fold, or every label when ``fold`` is None); returns its folder."""
    name = f"{draw.name}_{stage}_{lr:.6g}" + ("" if fold is None else f"_f{fold}")
    run_dir = out / name
    if not (run_dir / "metrics.json").exists():
        cmd = [sys.executable, "-m", "simclrv2", stage, "--config", config, f"data_dir={draw}",
               f"run_dir={run_dir}", "progress=off", "epochs=1", f"min_steps={min_steps}", "num_workers=0",
               f"base_lr={lr:.6g}", "resume=false", *extra]
        if fold is not None:
            cmd += [f"val_folds={folds}", f"val_fold={fold}"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return run_dir


def fold_scores(dirs: list[Path]) -> dict[str, Any]:
    """Mean over folds of each score (higher is better) from the folds' ``validation.npz``, plus
    each image's correctness (``correct``, by dataset index) for the paired rule."""
    acc, ce, brier, true_p, correct = [], [], [], [], {}
    for d in dirs:
        with np.load(d / "validation.npz") as z:
            probs, labels, index = z["probs"].astype(np.float64), z["label"], z["index"]
        p_true = probs[np.arange(len(labels)), labels]
        hit = probs.argmax(1) == labels
        acc.append(100 * hit.mean())
        ce.append(-np.log(np.clip(p_true, 1e-12, 1.0)).mean())
        brier.append(((probs - np.eye(probs.shape[1])[labels]) ** 2).sum(1).mean())
        true_p.append(p_true.mean())
        correct.update({int(i): float(h) for i, h in zip(index, hit)})
    return {"top-1": float(np.mean(acc)), "cross-entropy": -float(np.mean(ce)), "Brier score": -float(np.mean(brier)),
            "mean probability of the true class": float(np.mean(true_p)), "correct": correct}


def choose(scores: dict[float, dict], key: str, centre: float) -> float:
    """The rate the pipeline's search would choose scoring the folds by ``key``: the best of the
    grid of three around ``centre``, ties to the smaller rate, plus the rate that
    :func:`simclrv2.pipeline.beyond_edge` adds when the best is alone at an edge."""
    from simclrv2.config import FinetuneConfig
    from simclrv2.pipeline import beyond_edge
    from simclrv2.plan import StagePlan, fold_candidates

    plan = StagePlan(name="grid", stage="finetune", method="finetune", label_fraction=1.0,
                     cfg=FinetuneConfig(run_dir="unused", base_lr=centre))
    plan.candidates = [c for lr in (centre / 4, centre, centre * 4) for c in fold_candidates(plan, lr, 2)]
    pick = {lr: scores[lr][key] for lr in (centre / 4, centre, centre * 4)}
    extra = beyond_edge(plan, pick)
    if extra is not None:  # the same rate as a key of ``scores``, up to float rounding
        beyond = min(scores, key=lambda lr: abs(np.log(lr / extra)))
        pick[beyond] = scores[beyond][key]
    best = max(pick.values())
    return min(lr for lr in pick if pick[lr] == best)


def beats(a: dict, b: dict, k: float) -> bool:
    """``a`` is right on more of the same images than ``b`` by more than ``k`` paired standard errors."""
    ids = sorted(a["correct"])
    d = np.array([a["correct"][i] - b["correct"][i] for i in ids])
    return d.mean() > k * d.std(ddof=1) / np.sqrt(len(d))


def choose_centre(scores: dict[float, dict], centre: float, k: float = 2.0) -> float:
    """The centre, unless the grid's best (on top-1) beats it by more than ``k`` paired standard errors."""
    grid = [centre / 4, centre, centre * 4]
    best = max(grid, key=lambda lr: (scores[lr]["top-1"], -lr))
    return best if best != centre and beats(scores[best], scores[centre], k) else centre


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--draw", type=Path, action="append", required=True)
    ap.add_argument("--finetune", required=True, help="a finetune config.yaml (its paths are overridden)")
    ap.add_argument("--encoder", required=True, help="the pretraining run folder to fine-tune")
    ap.add_argument("--finetune-lr", type=float, required=True, help="the centre of fine-tuning's grid")
    ap.add_argument("--supervised", required=True, help="a supervised config.yaml (its paths are overridden)")
    ap.add_argument("--supervised-lr", type=float, required=True, help="the centre of the baseline's grid")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--min-steps", type=int, default=300)
    args = ap.parse_args(argv)
    arms = {"finetune": (args.finetune, args.finetune_lr, [f"init_checkpoint={args.encoder}"]),
            "supervised": (args.supervised, args.supervised_lr, [])}
    rows, choices = [], {}
    for arm, (config, centre, extra) in arms.items():
        for draw in args.draw:
            scores, tests = {}, {}
            for f in FACTORS:
                lr = centre * f
                dirs = [run(args.out, arm, config, draw, lr, k, args.folds, args.min_steps, extra)
                        for k in range(args.folds)]
                scores[lr] = fold_scores(dirs)
                final = run(args.out, arm, config, draw, lr, None, args.folds, args.min_steps, extra)
                tests[lr] = json.loads((final / "metrics.json").read_text())["top1"]
                fold_tests = [json.loads((d / "metrics.json").read_text()).get("top1") for d in dirs]
                fold_test = float(np.mean(fold_tests)) if None not in fold_tests else float("nan")
                rows.append((arm, lr, draw.name, tests[lr], scores[lr]["top-1"], fold_test))
            for key in ("top-1", "cross-entropy", "Brier score", "mean probability of the true class"):
                lr = choose(scores, key, centre)
                choices.setdefault((arm, key), []).append((lr, tests[lr]))
            lr = choose_centre(scores, centre)
            choices.setdefault((arm, "the centre unless a rate beats it by 2 paired standard errors"), []).append(
                (lr, tests[lr]))
            choices.setdefault((arm, "the best rate on test/ (not a choice)"), []).append(
                (max(tests, key=tests.get), max(tests.values())))
    names = [d.name for d in args.draw]
    print(f"| Arm | base_lr | {' | '.join(names)} |")
    print("|---|---|" + "---|" * len(names))
    for arm in arms:
        for lr in sorted({r[1] for r in rows if r[0] == arm}):
            cells = {r[2]: f"{r[3]:.2f} ({r[4]:.1f} / {r[5]:.1f})" for r in rows if r[0] == arm and r[1] == lr}
            print(f"| {arm} | {lr:g} | {' | '.join(cells[n] for n in names)} |")
    print()
    print("| Folds scored by | Arm | chosen rate: test top-1, per draw | mean |")
    print("|---|---|---|---|")
    for (arm, key), picks in choices.items():
        cells = " / ".join(f"{lr:g}: {t:.2f}" for lr, t in picks)
        print(f"| {key} | {arm} | {cells} | {np.mean([t for _, t in picks]):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

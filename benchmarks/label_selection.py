"""Does choosing the labelled images pay? Fine-tuning on balanced, random, typical and probcover labels.

    python benchmarks/label_selection.py finetune --config PIPELINE.yaml --pretrain RUN --fraction F \\
        --out DIR [--arms balanced,typical,probcover,random] [pipeline key=value ...]
    python benchmarks/label_selection.py coverage --pretrain RUN --images FOLDER/train --budgets 10,40 \\
        [--methods typiclust,probcover]

``finetune`` runs the pipeline's fine-tuning stage at label fraction ``F`` from the pretraining run
folder ``RUN``, once per label selection in ``--arms``: ``balanced`` (the class-balanced draw),
``typical`` (TypiClust on RUN's embedding), ``probcover`` (ProbCover on it) and ``random`` with
label seeds 0, 1, 2. Each gets the pipeline's recipe and its learning-rate search on the validation
split (``lr_search``); the table gives the validation and test top-1 of the rate chosen there and
the classes the labels cover. Choose between methods on the validation column only.

``coverage`` runs ``simclrv2.select``'s methods on every image under an ``ImageFolder``'s train
folder, read as unlabeled, and counts the classes (the first sub-folder of each pick) that N picks
cover, beside the mean over 1,000 seeds of N uniformly random picks. ProbCover's pseudo-classes are
``select``'s default (10), as for a user who does not know the class count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from simclrv2 import config as C
from simclrv2.pipeline import run_search
from simclrv2.plan import PipelineConfig, StagePlan, _with_search, fraction_tag, plan_stages


def finetune_arms(args: argparse.Namespace) -> list[dict]:
    pc = C.build(PipelineConfig, C.apply_overrides(C.load_yaml(args.config), args.overrides + [
        f"run_dir={args.out}", "budget_minutes=0", f"label_fractions=[{args.fraction}]"]))
    plan = next(p for p in plan_stages(pc) if p.name == f"finetune_{fraction_tag(args.fraction)}")
    arms = [(a, 0) for a in args.arms if a != "random"]
    arms += [("random", s) for s in args.random_seeds] if "random" in args.arms else []
    rows = []
    for selection, seed in arms:
        name = f"{selection}_{seed}"
        cfg = dataclasses.replace(plan.cfg, init_checkpoint=args.pretrain, label_selection=selection,
                                  label_seed=seed, run_dir=str(Path(args.out) / name))
        arm = _with_search(StagePlan(name, "finetune", cfg, "finetune", args.fraction), pc.lr_search)
        chosen, result, seconds, _ = run_search(arm, None)
        rows.append({"selection": selection, "label_seed": seed, "test_top1": result["top1"],
                     "val_top1": result["val_top1"], "base_lr": chosen.cfg.base_lr,
                     "labelled_images": result["labelled_images"], "labelled_classes": result["labelled_classes"],
                     "seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def finetune_table(rows: list[dict]) -> str:
    lines = ["| labels chosen | label seed | labelled images | classes covered | base_lr (val) | val top-1 | test top-1 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['selection']} | {r['label_seed']} | {r['labelled_images']} | {r['labelled_classes']} | "
                     f"{r['base_lr']:g} | {r['val_top1']:.2f} | {r['test_top1']:.2f} |")
    for split in ("val", "test"):
        rand = np.array([r[f"{split}_top1"] for r in rows if r["selection"] == "random"])
        if len(rand):
            spread = rand.std(ddof=1) if len(rand) > 1 else 0.0
            lines.append(f"\n{split}: random over {len(rand)} seeds {rand.mean():.2f} +- {spread:.2f} "
                         f"(min {rand.min():.2f}, max {rand.max():.2f})" + "".join(
                             f"; {r['selection']} - random mean = {r[f'{split}_top1'] - rand.mean():+.2f}"
                             for r in rows if r["selection"] in ("typical", "probcover")))
    return "\n".join(lines)


def coverage(args: argparse.Namespace) -> str:
    from simclrv2.data.folder import UnlabeledFolderDataset
    from simclrv2.select import embed_dataset
    from simclrv2.selection import select_picks
    from simclrv2.serve import load_for_serving

    model, info = load_for_serving(args.pretrain, "cpu")
    ds = UnlabeledFolderDataset(args.images, image_size=info.image_size)
    classes = np.array([f.split("/", 1)[0] for f in ds.files])  # the hidden label: the class folder
    feats = embed_dataset(model, ds, info.image_size, torch.device("cpu"), num_workers=2)
    lines = [f"{len(ds)} images, {len(set(classes))} classes under {args.images}", "",
             "| N | " + " | ".join(f"{m}: classes covered" for m in args.methods)
             + " | random: mean classes covered (1,000 seeds) |", "|---" * (len(args.methods) + 2) + "|"]
    notes = []
    for n in args.budgets:
        picks = [select_picks(m, feats, n, seed=0) for m in args.methods]
        rng = np.random.default_rng(0)
        rand = np.mean([len(set(classes[rng.choice(len(ds), n, replace=False)])) for _ in range(1000)])
        lines.append(f"| {n} | " + " | ".join(str(len(set(classes[p.indices]))) for p in picks) + f" | {rand:.2f} |")
        notes += [f"probcover N={n}: delta {p.delta:.4f}, its balls cover {p.score.sum() / len(ds):.1%} of the images"
                  for p in picks if p.method == "probcover"]
    return "\n".join(lines + [""] + notes)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    ft = sub.add_parser("finetune")
    ft.add_argument("--config", required=True)
    ft.add_argument("--pretrain", required=True)
    ft.add_argument("--fraction", type=float, required=True)
    ft.add_argument("--out", required=True)
    ft.add_argument("--random-seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    ft.add_argument("--arms", type=lambda s: s.split(","), default=["balanced", "typical", "probcover", "random"],
                    help="the label selections to run, comma-separated (random: once per --random-seeds)")
    ft.add_argument("overrides", nargs="*")
    cov = sub.add_parser("coverage")
    cov.add_argument("--pretrain", required=True)
    cov.add_argument("--images", required=True)
    cov.add_argument("--budgets", type=lambda s: [int(v) for v in s.split(",")], default=[10, 40])
    cov.add_argument("--methods", type=lambda s: s.split(","), default=["typiclust", "probcover"])
    args = parser.parse_args(argv)
    if args.mode == "coverage":
        print(coverage(args))
        return 0
    rows = finetune_arms(args)
    Path(args.out, "label_selection.json").write_text(json.dumps(rows, indent=1))
    print(finetune_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

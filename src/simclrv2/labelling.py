"""Labels for the unlabeled images: which model writes them, ``predictions.csv``, and how far to trust it.

The few-labels layout (issue 29) ends here. :func:`choose_model` picks the model on the
validation or cross-validation score, never on the test split; :func:`label_folder` runs it over
every image of ``data_dir/unlabeled/`` and writes one row per usable file (``file, class,
confidence, margin``), naming the files it had to skip; :func:`calibration` turns held-out
predictions into accuracy per confidence bin, so that a user can pick a threshold and see how many
unlabeled images clear it. ``simclrv2 predict`` with a stage folder and nothing else calls
:func:`label_folder` too.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import config as C
from . import distributed as dist
from .stages import STAGES

# models that can label images, in the order that breaks a tie (the paper's final model first)
LABELLERS = ("distill-self", "finetune", "distill-small", "supervised")
# lower edges of the confidence bins of the calibration table (the last bin ends at 1.0)
CONFIDENCE_EDGES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def choose_model(results: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    """The ``results.json`` row whose model labels the unlabeled images, and why.

    Among the models trained on the most labels: the best validation or cross-validation top-1
    when every one of them has such an estimate; otherwise the self-distilled student (the
    paper's final model), since no honest comparison exists. The test split is never read.
    """
    rows = [r for r in results if r["method"] in LABELLERS]
    if not rows:
        return None, "no classifier was trained"
    most = max(r["label_fraction"] for r in rows)
    rows = sorted((r for r in rows if r["label_fraction"] == most), key=lambda r: LABELLERS.index(r["method"]))
    estimated = [r for r in rows if r.get("estimate")]
    if len(estimated) == len(rows):
        best = max(rows, key=lambda r: r["estimate"]["top1"])  # max keeps the first of equals
        scores = ", ".join(f"{r['method']} {r['estimate']['top1']:.2f}" for r in rows)
        return best, f"the best {best['estimate']['kind']} top-1 of the models trained on every label ({scores})"
    missing = ", ".join(r["method"] for r in rows if not r.get("estimate"))
    how = next((r["rate_choice"]["how"] for r in rows if r["method"] in ("finetune", "supervised")
                and r.get("rate_choice")), "")
    why = ("with one label in a class nothing can be held out" if how == "centre rate" else
           "a student learns from a teacher that trained on every label, so no held-out label is unseen by it")
    fallback = next((r for r in rows if r["method"] == "distill-self"), rows[0])
    which = ("the self-distilled student, the paper's final model" if fallback["method"] == "distill-self"
             else f"the {fallback['method']} model (no self-distilled student was trained)")
    return fallback, f"no honest comparison between the models exists ({missing}: no held-out estimate; {why}), so {which}"


def stage_config(stage_dir: str | Path) -> Any:
    """The resolved config of a stage folder (its ``config.yaml``; a searched stage: the chosen run's)."""
    folder = Path(stage_dir)
    chosen = folder / "chosen.json"
    if chosen.is_file():
        folder = folder / json.loads(chosen.read_text())["chosen"]
    values = C.load_yaml(folder / "config.yaml")
    stage = values.pop("stage", None)
    if stage not in STAGES:
        raise C.ConfigError(f"{folder / 'config.yaml'} names no stage; pass a pipeline stage folder")
    return C.build(STAGES[stage].config, values)


def label_folder(cfg: Any, model_dir: str | Path, out_csv: Path) -> dict[str, Any]:
    """Run the classifier of ``model_dir`` over ``cfg.data_dir/unlabeled/`` and write ``out_csv``.

    Every torchrun process takes its share of the images (:func:`~simclrv2.engine.evaluate.extract`);
    the main one writes the file, atomically. Files that cannot be read (found when indexed or when
    decoded) get no row and are returned, named, in ``skipped``. Returns a summary: rows, skipped,
    the file, and each row's confidence (``confidence``, for :func:`calibration`).
    """
    from .checkpoint import atomic_write_text
    from .data.folder import UNLABELED_DIR
    from .data.index import open_unlabeled_index
    from .engine.batches import open_split
    from .engine.device import resolve_device
    from .engine.evaluate import extract
    from .modelfile import load_model

    device = resolve_device(cfg.device)
    model, meta = load_model(str(model_dir), device)
    if model.classifier is None:
        raise C.ConfigError(f"'{model_dir}' has no classifier to label images with; pass a fine-tuned or distilled stage")
    size = int(meta.get("image_size") or cfg.image_size)
    ds, source = open_split(dataclasses.replace(cfg, image_size=size), "unlabeled", device)
    logits, _ = extract(model, source, torch.arange(len(ds)), size, 256, "logits", cfg.precision)
    replaced = _gathered(sorted(source.replaced))  # streamed files found bad: another image took their place
    keep = np.setdiff1d(np.arange(len(ds)), np.asarray(replaced, dtype=np.int64))
    names = [ds.filenames[i] for i in keep.tolist()]
    # every file the folder holds and got no row, with why: dropped when indexed, or when decoded
    # (an in-memory copy leaves those out; a stream replaces them)
    index_root = Path(cfg.data_dir) / UNLABELED_DIR
    index = open_unlabeled_index(index_root)
    reasons = dict(index.dropped)
    written = set(names)
    skipped = {f: reasons.get(f, "unusable when decoded") for f in [*index.files, *reasons] if f not in written}
    probs = torch.softmax(logits[torch.from_numpy(keep)].float(), 1)
    top2 = probs.topk(min(2, probs.shape[1]), dim=1).values
    confidence = top2[:, 0]
    margin = top2[:, 0] - top2[:, 1] if top2.shape[1] > 1 else top2[:, 0]
    classes = list(meta.get("classes") or ds.classes)
    if dist.is_main():
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["file", "class", "confidence", "margin"])
        for name, k, c, m in zip(names, probs.argmax(1).tolist(), confidence.tolist(), margin.tolist(), strict=True):
            w.writerow([name, classes[k], f"{c:.6f}", f"{m:.6f}"])
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_csv, buf.getvalue())
        for name, why in sorted(skipped.items()):
            print(f"predictions: skipped unusable image {index_root / name} ({why})", flush=True)
    dist.barrier()
    return {"file": str(out_csv), "rows": len(keep), "skipped": sorted(skipped),
            "confidence": [round(float(c), 6) for c in confidence.tolist()]}


def _gathered(items: list[int]) -> list[int]:
    """Every process's ``items``, together (the single-process list without torchrun)."""
    if not dist.is_dist():
        return items
    parts: list[list[int] | None] = [None] * dist.world_size()
    torch.distributed.all_gather_object(parts, items)
    return sorted({i for p in parts for i in (p or [])})


def held_out_predictions(row: dict[str, Any], results: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, str]:
    """(probabilities (N, C), labels (N,), whose) of held-out labelled images for ``row``'s model:
    its validation split or out-of-fold predictions, else its teacher's (the fine-tuned model's at
    the same fraction); empty arrays when nothing was held out."""
    def load(r: dict[str, Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        probs, labels = [], []
        for folder in r.get("fold_dirs") or [r["run_dir"]]:
            path = Path(folder) / "validation.npz"
            if path.is_file():
                with np.load(path) as z:
                    probs.append(z["probs"])
                    labels.append(z["label"])
        return probs, labels

    probs, labels = load(row)
    whose = f"the {row['method']} model's own"
    if not probs:
        teacher = next((r for r in results if r["method"] == "finetune"
                        and r["label_fraction"] == row["label_fraction"]), None)
        if teacher is not None:
            probs, labels = load(teacher)
            whose = "its teacher's (the fine-tuned model's: the student has none)"
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), ""
    return np.concatenate(probs), np.concatenate(labels), whose


def calibration(val_probs: np.ndarray, val_labels: np.ndarray, unlabeled_confidence: list[float]) -> list[dict[str, Any]]:
    """Accuracy per confidence bin of held-out predictions, and the unlabeled images in each bin and
    at or above its lower edge (a threshold a user may pick)."""
    conf = val_probs.max(1) if len(val_probs) else np.zeros(0)
    right = (val_probs.argmax(1) == val_labels) if len(val_probs) else np.zeros(0, bool)
    unl = np.asarray(unlabeled_confidence, dtype=np.float64)
    rows = []
    for j, lo in enumerate(CONFIDENCE_EDGES):
        hi = CONFIDENCE_EDGES[j + 1] if j + 1 < len(CONFIDENCE_EDGES) else 1.0
        inside = (conf >= lo) & ((conf < hi) if hi < 1.0 else (conf <= 1.0))
        above = conf >= lo
        rows.append({
            "from": lo, "to": hi,
            "held_out": int(inside.sum()),
            "accuracy": round(100.0 * float(right[inside].mean()), 2) if inside.any() else None,
            "accuracy_at_least": round(100.0 * float(right[above].mean()), 2) if above.any() else None,
            "unlabeled": int(((unl >= lo) & ((unl < hi) if hi < 1.0 else (unl <= 1.0))).sum()),
            "unlabeled_at_least": int((unl >= lo).sum()),
        })
    return rows

"""report.md and plots for a pipeline run, built from results.json and the stage folders only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

METHOD_ROWS = [
    ("supervised", "Supervised baseline (same labels)"),
    ("finetune", "SimCLRv2 fine-tuned (from head layer)"),
    ("distill-self", "SimCLRv2 self-distilled"),
    ("distill-small", "SimCLRv2 distilled into small student"),
]


def _fractions(out: dict[str, Any]) -> list[float]:
    fr = {r["label_fraction"] for r in out["results"] if r["method"] in dict(METHOD_ROWS)}
    return sorted(fr)


def _tag(f: float) -> str:
    return f"{f * 100:g}%"


def _lookup(out: dict[str, Any], method: str, f: float | None = None) -> dict[str, Any] | None:
    for r in out["results"]:
        if r["method"] == method and (f is None or abs(r["label_fraction"] - f) < 1e-12):
            return r
    return None


def tested(out: dict[str, Any]) -> bool:
    """True when the run had a test split (the few-labels layout may have none)."""
    return any(r.get("top1") is not None for r in out["results"])


def score(r: dict[str, Any]) -> float | None:
    """A row's test top-1, or without a test split its validation or cross-validation estimate."""
    if r.get("top1") is not None:
        return r["top1"]
    return (r.get("estimate") or {}).get("top1")


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    if r.get("top1") is not None:
        return f"{r['top1']:.2f}"
    est = r.get("estimate")
    if est is None:
        return "no estimate (nothing held out)"
    return f"{est['top1']:.2f} ± {est['spread']:.2f} ({_kind(est)} estimate)"


def _kind(est: dict[str, Any]) -> str:
    """How an estimate was held out, as a cell names it."""
    return "CV" if "cross-validation" in est.get("kind", "") else "val"


def results_table(out: dict[str, Any]) -> str:
    """The paper-shaped table: rows are methods, columns are label fractions (top-1 %). Without a
    test split each cell is the validation or cross-validation estimate, marked, with its spread."""
    fr = _fractions(out)
    head = "| Method | Model | " + " | ".join(f"{_tag(f)} labels" for f in fr) + " |"
    lines = [head, "|" + "---|" * (len(fr) + 2)]
    for method, title in METHOD_ROWS:
        cells = []
        model = ""
        for f in fr:
            r = _lookup(out, method, f)
            cells.append(_cell(r))
            model = model or (r["model"] if r else "")
        if any(c != "-" for c in cells):
            lines.append(f"| {title} | {model} | " + " | ".join(cells) + " |")
    for method, title in (("linear-eval", "Linear eval (frozen encoder)"), ("knn", "kNN (frozen encoder)")):
        r = _lookup(out, method)
        if r:
            lines.append(f"| {title}, {_tag(r['label_fraction'])} labels | {r['model']} | "
                         + " | ".join(_cell(r) for _ in fr) + " |")
    return "\n".join(lines)


def _gain_cell(r: dict[str, Any], base: dict[str, Any]) -> str:
    """The difference of two test top-1, or of two estimates, marked, with a bound on its spread:
    the standard deviation of a difference is at most the sum of the two standard deviations."""
    gain = f"{score(r) - score(base):+.2f}"
    if r.get("top1") is not None and base.get("top1") is not None:
        return gain
    bound = sum((x.get("estimate") or {}).get("spread", 0.0) for x in (r, base))
    return f"{gain} ± {bound:.2f} at most ({_kind(r.get('estimate') or base.get('estimate') or {})} estimates)"


def gains_table(out: dict[str, Any]) -> str:
    """Points over the supervised baseline at each label fraction; without a test split each cell
    is the difference of the two estimates, marked as such."""
    fr = _fractions(out)
    lines = ["| Method | " + " | ".join(f"{_tag(f)} labels" for f in fr) + " |", "|" + "---|" * (len(fr) + 1)]
    for method, title in METHOD_ROWS[1:]:
        cells = []
        for f in fr:
            r, base = _lookup(out, method, f), _lookup(out, "supervised", f)
            ok = r and base and score(r) is not None and score(base) is not None
            cells.append(_gain_cell(r, base) if ok else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
    if len(lines) == 2:
        return "No gain can be given: neither a test split nor a held-out label measured the models."
    return "\n".join(lines)


# A result this close to chance (in points) is reported as a failure to learn.
CHANCE_MARGIN = 5.0
# Fewer optimizer steps than this are named as a likely cause of a weak classifier.
FEW_STEPS = 100
# the kNN monitor must end more than this many points above its best over the first half of
# pretraining for "too short" to be advice: on a few thousand images it flattens by epoch 25-35
# (docs/EXPERIMENTS.md, "The encoder against the pixels over 20 draws"), where the budget may
# still give 200
KNN_RISE = 1.0


def near_chance(row: dict[str, Any], top1: float) -> bool:
    """Whether ``top1`` lies within :data:`CHANCE_MARGIN` points of chance for ``row``'s classes."""
    return bool(row.get("num_classes")) and top1 < 100.0 / row["num_classes"] + CHANCE_MARGIN


def _causes(row: dict[str, Any], out: dict[str, Any]) -> list[str]:
    """Likely causes of a weak result, from what results.json knows about the run."""
    causes = []
    if row.get("lr_at_edge"):  # the best rate at an edge and tied with no other (pipeline.at_edge)
        rates = sorted(float(r) for r in row["lr_search"])
        causes.append(f"base_lr {row['base_lr']:g} is at the edge of the search ({rates[0]:g}-{rates[-1]:g}): "
                      "widen lr_search")
    if row.get("steps") is not None and row["steps"] < FEW_STEPS:
        causes.append(f"too few steps ({row['steps']}): raise min_steps or epochs")
    search = [float(v) for v in (row.get("lr_search") or {}).values()]
    retry = row.get("color_retry")
    # the pipeline's binomial test of the search kept; results.json from before both searches always
    # ran has no such key, and there a second search ran only where the first had learned nothing
    found_nothing = retry is not None and retry.get("learned_nothing", not retry["kept"])
    if row["method"] == "supervised" and search and (near_chance(row, max(search)) or found_nothing):
        # held-out shapes (docs/EXPERIMENTS.md): from random weights, 4 labels a class of six shapes
        # in random colours scored 8.33-16.67 on the folds at every rate from 0.025 to 1.6
        tried = (f", with crops and flips {retry['best_without']:.2f}, with colour distortion {retry['best_with']:.2f}"
                 if found_nothing else "")
        causes.append(f"no rate of the search learned on the held-out labels (best {max(search):.2f}{tried}): "
                      "from random weights these labels are likely too few for this model; the SimCLRv2 rows "
                      "start from the pretrained encoder")
    if row["method"] != "supervised" and not causes:
        pre = out.get("pretrain", {})
        if pre.get("epochs") is not None and pre.get("knn_top1") is not None:
            early = pre.get("knn_first_half")
            # the monitor logs 3 decimals: rounded, a rise of exactly KNN_RISE is not one float above it
            if early is not None and round(pre["knn_top1"] - early["top1"], 3) <= KNN_RISE:
                causes.append(f"pretraining had stopped improving (kNN monitor {early['top1']:.1f}% at epoch "
                              f"{early['epoch']:g}, {pre['knn_top1']:.1f}% at the end, epoch {pre['epochs']:g}): "
                              "a longer one is unlikely to help")
            else:
                causes.append(f"pretraining may be too short ({pre['epochs']:g} epochs, kNN monitor "
                              f"{pre['knn_top1']:.1f}%): raise budget_minutes or pretrain.epochs")
        probe = _best_probe(out, row["label_fraction"])
        base = _lookup(out, "supervised", row["label_fraction"])
        base_top1 = score(base) if base is not None else None
        if probe is not None and base_top1 is not None and probe < base_top1:
            causes.append(f"the frozen encoder's best probe ({probe:.2f}) is below the baseline: pretraining's "
                          "augmentations may remove what tells these classes apart; where brightness or "
                          "contrast differ by class (grey photographs, say), try pretrain.color_strength=0")
    return causes or ["no simple cause found: read the stage's metrics.jsonl"]


def _best_probe(out: dict[str, Any], fraction: float) -> float | None:
    """The better of linear eval and kNN on the frozen encoder at ``fraction``, if either ran."""
    found = [s for m in ("linear-eval", "knn") if (r := _lookup(out, m, fraction)) and (s := score(r)) is not None]
    return max(found, default=None)


def warnings(out: dict[str, Any]) -> list[str]:
    """One line per result that signals a problem, each with its likely causes.

    - a result within ``CHANCE_MARGIN`` points of chance (100 / number of classes);
    - a student more than 1 point below its teacher;
    - a fine-tuned model below the supervised baseline on the same labels.
    """
    lines = []
    for r in out["results"]:
        where = f"{r['method']} at {_tag(r['label_fraction'])} labels"
        top1 = score(r)
        if top1 is None:
            continue
        if near_chance(r, top1):
            lines.append(f"{where}: top-1 {top1:.2f} is within {CHANCE_MARGIN:g} points of chance "
                         f"({100.0 / r['num_classes']:.1f}); " + "; ".join(_causes(r, out)))
            continue
        if "teacher_top1" in r and top1 < r["teacher_top1"] - 1.0:
            lines.append(f"{where}: the student ({top1:.2f}) ends {r['teacher_top1'] - top1:.2f} points "
                         f"below its teacher ({r['teacher_top1']:.2f}); " + "; ".join(_causes(r, out)))
        base = _lookup(out, "supervised", r["label_fraction"]) if r["method"] == "finetune" else None
        if base is not None and score(base) is not None and top1 < score(base):
            lines.append(f"{where}: fine-tuned ({top1:.2f}) is below the supervised baseline "
                         f"({score(base):.2f}); " + "; ".join(_causes(r, out)))
    return lines


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def knn_curve(rows: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """``(epoch, kNN top-1)`` at each monitored epoch, from a pretraining run's metrics rows."""
    return [(r["epoch"], r["knn_top1"]) for r in rows if "knn_top1" in r]


def pretraining_metrics(pretrain_dir: Path) -> list[dict[str, Any]]:
    """The rows of a pretraining run's ``metrics.jsonl`` (none if it has no such file)."""
    return _read_jsonl(pretrain_dir / "metrics.jsonl")


def knn_first_half(curve: list[tuple[float, float]]) -> dict[str, float] | None:
    """The best kNN top-1 at an epoch in the first half of pretraining, with its epoch; ``None``
    when no monitored epoch lies there."""
    half = max((e for e, _ in curve), default=0.0) / 2
    early = [p for p in curve if p[0] <= half]
    if not early:
        return None
    epoch, top1 = max(early, key=lambda p: p[1])
    return {"epoch": epoch, "top1": top1}


def plot_pretraining(run_dir: Path, dest: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = pretraining_metrics(run_dir / "pretrain")
    # the NT-Xent term alone: "loss" also holds the online probe's cross-entropy
    key = "contrastive_loss" if any("contrastive_loss" in r for r in rows) else "loss"
    loss = [(r["epoch"], r[key]) for r in rows if key in r]
    knn = knn_curve(rows)
    if not loss:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(*zip(*loss), color="tab:blue", label="NT-Xent loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("contrastive loss", color="tab:blue")
    if knn:
        ax2 = ax.twinx()
        ax2.plot(*zip(*knn), "o-", color="tab:red", label="kNN top-1")
        ax2.set_ylabel("kNN top-1 (%)", color="tab:red")
    ax.set_title("Pretraining: loss and kNN monitor")
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return True


def plot_fractions(out: dict[str, Any], dest: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fr = _fractions(out)
    if not fr:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, title in METHOD_ROWS:
        pts = [(f * 100, score(r)) for f in fr if (r := _lookup(out, method, f)) and score(r) is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", label=title)
    le = _lookup(out, "linear-eval")
    if le and score(le) is not None:
        ax.axhline(score(le), color="gray", ls="--", label=f"linear eval ({_tag(le['label_fraction'])} labels)")
    ax.set_xscale("log")
    ax.set_xlabel("labelled fraction of the training set (%)")
    ax.set_ylabel("test top-1 (%)" if tested(out) else "estimated top-1 (%), no test split")
    ax.set_title("Accuracy against label fraction")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return True


def plot_confusion(metrics_path: Path, classes: list[str], title: str, dest: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.is_file():
        return False
    cm = np.array(json.loads(metrics_path.read_text())["confusion_matrix"], dtype=float)
    norm = cm / cm.sum(1, keepdims=True).clip(min=1)
    fig, ax = plt.subplots(figsize=(6, 5.4))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    n = len(cm)
    labels = classes if len(classes) == n else [str(i) for i in range(n)]
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    for i in range(n):
        for j in range(n):
            if n <= 20:
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, fraction=0.046)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return True


def plot_embedding(pretrain_dir: Path, pc: Any, dest: Path) -> bool:
    """t-SNE of pretrained test features coloured by class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from sklearn.manifold import TSNE

    from .config import PretrainConfig, build
    from .engine.batches import image_size_of, open_split
    from .engine.evaluate import extract
    from .modelfile import load_model

    cfg = build(PretrainConfig, {k: v for k, v in {**pc.common, **pc.pretrain}.items()
                                 if k in PretrainConfig.__dataclass_fields__})
    device = torch.device("cpu")
    model, meta = load_model(str(pretrain_dir), device)
    ds, source = open_split(cfg, cfg.test_split, device)
    n = min(pc.embedding_points, len(ds))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].sort().values
    # the report is written on rank 0 alone: no sharding, whose gather would wait for the other ranks
    feats, labels = extract(model, source, idx, image_size_of(cfg, ds), sharded=False)
    xy = TSNE(n_components=2, init="pca", perplexity=30, random_state=0).fit_transform(feats.numpy())
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels.numpy(), cmap="tab10", s=4)
    handles = [plt.Line2D([], [], marker="o", ls="", color=sc.cmap(sc.norm(c)), label=name)
               for c, name in enumerate(ds.classes)]
    ax.legend(handles=handles, fontsize=7, loc="best", markerscale=1.2)
    ax.set_title(f"t-SNE of pretrained features ({n} test images)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return True


def labels_section(out: dict[str, Any]) -> list[str]:
    """How each stage's labelled images were chosen (``label_selection``) and how many classes they
    cover: a selection that ignores classes (random, typical) can leave some out."""
    rows = [r for r in out["results"] if "labelled_classes" in r and r["method"] not in ("knn", "linear-eval")]
    if not rows:
        return []
    lines = ["## Labelled images", "", "| Method | Labels | Chosen by | Images | Classes covered |", "|---|---|---|---|---|"]
    for r in rows:
        of = f" of {r['num_classes']}" if r.get("num_classes") else ""
        lines.append(f"| {r['method']} | {_tag(r['label_fraction'])} | {r['label_selection']} | "
                     f"{r.get('labelled_images', '')} | {r['labelled_classes']}{of} |")
    return lines + [""]


def _plots(run_dir: Path, out: dict[str, Any], pc: Any) -> list[tuple[str, str]]:
    plots: list[tuple[str, str]] = []
    if not pc.plots:
        return plots
    if plot_pretraining(run_dir, run_dir / "pretraining.png"):
        plots.append(("Pretraining loss and kNN accuracy", "pretraining.png"))
    if plot_fractions(out, run_dir / "accuracy_vs_labels.png"):
        plots.append(("Accuracy against label fraction", "accuracy_vs_labels.png"))
    if not tested(out):  # the embedding and the confusion matrix are of the test split
        return plots
    if pc.embedding_points > 0 and plot_embedding(run_dir / "pretrain", pc, run_dir / "embedding_tsne.png"):
        plots.append(("t-SNE of pretrained test features", "embedding_tsne.png"))
    candidates = [r for r in out["results"] if r["method"] not in ("knn", "linear-eval")]
    if candidates:
        best = max(candidates, key=lambda r: r["top1"])
        meta_classes = _classes(Path(best["run_dir"]))
        title = f"Confusion matrix: {best['method']} {_tag(best['label_fraction'])} ({best['top1']:.2f}%)"
        if plot_confusion(Path(best["run_dir"]) / "metrics.json", meta_classes, title,
                          run_dir / "confusion_best.png"):
            plots.append((title, "confusion_best.png"))
    return plots


def _accuracy_heading(out: dict[str, Any]) -> list[str]:
    if tested(out):
        return ["## Test top-1 accuracy (%)", ""]
    kinds = sorted({r["estimate"]["kind"] for r in out["results"] if r.get("estimate")})
    return ["## Estimated top-1 accuracy (%): no test split", "",
            "There is no `test/` folder, so every number below is an estimate from labelled images the model "
            f"did not train on ({', '.join(kinds) or 'none could be held out'}), marked as such, ± its spread "
            "(over folds: their standard deviation; on a validation split: the binomial standard error). "
            "Rates chosen on the same images make the fine-tuned and supervised estimates somewhat optimistic.", ""]


def _search_section(out: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    choices = {(r["method"], r["label_fraction"]): r["rate_choice"] for r in out["results"] if r.get("rate_choice")}
    notes = sorted({c["reason"] for c in choices.values() if c.get("reason")})
    if notes:
        lines += ["## How the learning rates were chosen", ""] + [f"- {n[0].upper()}{n[1:]}." for n in notes] + [""]
    searched = [r for r in out["results"] if "lr_search" in r]
    for folds in sorted({r.get("folds", 0) for r in searched}):
        rows = [r for r in searched if r.get("folds", 0) == folds]
        heading, column = (("the validation split", "Validation top-1") if not folds else
                           (f"{folds}-fold cross-validation", "Mean top-1 of the folds"))
        lines += [f"## Learning rates chosen on {heading}", "",
                  f"| Method | Labels | {column} per base_lr | Chosen |", "|---|---|---|---|"]
        for r in rows:
            tried = ", ".join(f"{lr}: {v:.2f}" for lr, v in r["lr_search"].items())
            lines.append(f"| {r['method']} | {_tag(r['label_fraction'])} | {tried} | {r['base_lr']:g} |")
        lines.append("")
        if any(r.get("lr_extended") for r in rows):
            lines += ["A rate outside lr_search was tried where the best planned rate was at an edge of the "
                      "grid: one grid step beyond it, scored on the same validation images or folds.", ""]
        lines += _close_calls(rows)
        lines += _colour_retries(rows)
    return lines


def _colour_retries(rows: list[dict[str, Any]]) -> list[str]:
    """The baseline's two searches, with crops and flips and with colour-distorted views, and the
    one it kept (pipeline.run_retry)."""
    lines = []
    for r in rows:
        retry = r.get("color_retry")
        if not retry:
            continue
        rates = ", ".join(f"{lr}: {v:.2f}" for lr, v in retry["lr_search"].items())
        verdict = "so it trains with colour distortion" if retry["kept"] else "so it keeps crops and flips"
        scored = f" on {retry['images']} held-out images" if retry.get("images") else ""
        lines.append(f"- {r['method']} ({_tag(r['label_fraction'])}): best {retry['best_without']:.2f} with crops and "
                     f"flips{scored}; with the pretraining's colour distortion (strength "
                     f"{retry['color_strength']:g}) {rates}; {verdict}.")
    if not lines:
        return []
    return ["The baseline searched its rates twice, with crops and flips and with colour distortion, and kept the "
            "better on the same held-out labels: colour distortion can help it or remove what tells the classes "
            "apart.", ""] + lines + [""]


def _close_calls(rows: list[dict[str, Any]]) -> list[str]:
    """A warning for each search whose chosen rate leads the runner-up by less than the standard
    error of a top-1 on the images it was scored on: those images cannot tell the rates apart."""
    from .search import binomial_spread

    close = []
    for r in rows:
        scores = sorted(r["lr_search"].values(), reverse=True)
        images = (r.get("estimate") or {}).get("images") or 0
        if len(scores) < 2 or not images:
            continue
        se = binomial_spread(scores[0], images)
        if scores[0] - scores[1] < se:
            close.append(f"- {r['method']} ({_tag(r['label_fraction'])}): the chosen rate leads the next by "
                         f"{scores[0] - scores[1]:.2f} points, less than the standard error of a top-1 on "
                         f"{images} held-out images ({se:.2f}).")
    if not close:
        return []
    return ["Close calls: the images these rates were scored on cannot tell them apart, and another draw of as "
            "many could have chosen another rate. More held-out images (more labels) make the choice firmer.",
            ""] + close + [""]


def _distill_section(out: dict[str, Any]) -> list[str]:
    distilled = [r for r in out["results"] if "teacher_top1" in r]
    if not distilled:
        return []
    lines = ["## Distillation: student against teacher", "",
             "| Method | Labels | Student | Teacher top-1 | Student top-1 | Agreement | Student's view | Rounds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in distilled:
        earlier = "".join(f", round {k} {e['top1']:.2f}" for k, e in enumerate(r.get("earlier_rounds", []), 1)
                          if e.get("top1") is not None)
        lines.append(f"| {r['method']} | {_tag(r['label_fraction'])} | {r['model']} | {r['teacher_top1']:.2f} | "
                     f"{r['top1']:.2f} | {r['teacher_agreement']:.2f} | {r.get('student_view', 'same')} | "
                     f"{r.get('rounds', 1)}{earlier} |")
    note = ("Student's view: `same` is the teacher's crop (the paper); `strong` the student's own crop with "
            "colour distortion (a noisy student).")
    if any(r.get("rounds", 1) > 1 for r in distilled):
        note += " With 2 rounds the second student learns from the first, whose top-1 follows the count."
    return lines + ["", note, ""]


def predictions_section(out: dict[str, Any]) -> list[str]:
    """Which model labelled ``unlabeled/``, why, and accuracy per confidence bin with the unlabeled
    images that clear each threshold."""
    pred = out.get("predictions")
    if not pred:
        return []
    lines = ["## Labels for the unlabeled images", "",
             f"`predictions.csv` holds {pred['rows']} rows (file, class, confidence, margin to the second class), "
             f"written by the {pred['method']} model in `{pred['model_dir']}`: {pred['reason']}.", ""]
    if pred["skipped"]:
        lines += [f"Skipped {len(pred['skipped'])} unusable file(s), with no row: "
                  + ", ".join(f"`{f}`" for f in pred["skipped"][:20]) + ("..." if len(pred["skipped"]) > 20 else ""), ""]
    if out.get("to_label"):
        lines += [f"`to_label.csv` proposes the {out['to_label']['images']} unlabeled images to label next "
                  "(typical images of clusters no label covers, then the least certain; `simclrv2 select` "
                  "takes the next round).", ""]
    if pred.get("calibration_from"):
        lines += [f"Accuracy per confidence bin, measured on {pred['calibration_from']} predictions for labelled "
                  "images it did not train on (never the test split); pick a threshold, and the last column says how "
                  "many unlabeled images clear it.", ""]
    else:
        lines += ["No labelled image was held out (one label a class), so the accuracy of a confidence cannot be "
                  "measured; the counts of unlabeled images per confidence are below.", ""]
    lines += ["| Confidence | Held-out images | Their accuracy | Accuracy at or above | Unlabeled images | "
              "Unlabeled at or above |", "|---|---|---|---|---|---|"]
    for b in pred["calibration"]:
        acc = f"{b['accuracy']:.1f}" if b["accuracy"] is not None else "-"
        above = f"{b['accuracy_at_least']:.1f}" if b["accuracy_at_least"] is not None else "-"
        lines.append(f"| {b['from']:.2f}-{b['to']:.2f} | {b['held_out']} | {acc} | {above} | {b['unlabeled']} | "
                     f"{b['unlabeled_at_least']} |")
    return lines + [""]


def _later_steps(budget: dict[str, Any]) -> str:
    """How much of their configured steps the stages after pretraining trained, under the budget."""
    if "regrown_scale" in budget:
        return (f"; the budget gave the later stages {budget['other_scale']:.0%} of their configured steps, and "
                f"{budget['regrown_scale']:.0%} once pretraining had ended ahead of its estimate")
    return f"; the later stages trained {budget['other_scale']:.0%} of their configured steps, as the budget planned"


def write_report(run_dir: Path, out: dict[str, Any], pc: Any) -> Path:
    plots = _plots(run_dir, out, pc)
    lines = [
        "# SimCLRv2 pipeline report",
        "",
        f"Run folder: `{run_dir}`. Config hash `{out['config_hash']}`. Every number below is read from "
        "`results.json`, which this report was generated from.",
        "",
        *_accuracy_heading(out),
        results_table(out),
        "",
        "## Gain over the supervised baseline (points)" if tested(out) else
        "## Estimated gain over the supervised baseline (points): no test split",
        "",
        gains_table(out),
        "",
    ]
    lines += labels_section(out)
    warned = warnings(out)
    if warned:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warned] + [""]
    lines += predictions_section(out) + _search_section(out)
    if tested(out):
        lines += _distill_section(out)
    lines += ["## Stage timings", "", f"Machine: {out['machine']}", ""]
    pre, budget = out.get("pretrain") or {}, out.get("budget")
    if pre.get("epochs") is not None:
        knn = f", kNN monitor {pre['knn_top1']:.2f}% at the end" if pre.get("knn_top1") is not None else ""
        chosen = (f", chosen to fit a {budget['budget_minutes']:g}-minute budget (estimates on this machine: "
                  f"{budget['epoch_seconds']:.1f} s an epoch, {budget['other_seconds']:.0f} s for the other "
                  "stages)" if budget else "")
        if budget and "cv_folds" in budget:
            chosen += (f"; the search cross-validated over {budget['cv_folds']} folds, as "
                       f"{budget['cv_folds_wanted']} would not fit")
        if budget and "native_image_size" in budget:
            chosen += (f"; every stage trained at {budget['image_size']} px, as the images' own "
                       f"{budget['native_image_size']} px would not fit")
        if budget and budget.get("other_scale", 1.0) < 1.0:
            chosen += _later_steps(budget)
        if pre.get("planned_epochs") is not None:
            chosen += (f"; the budget had planned {pre['planned_epochs']:g} epochs, and pretraining ended early "
                       "because this machine ran slower than measured at the start")
        lines += [f"Pretraining: {pre['epochs']:g} epochs, {pre['steps']} steps{knn}{chosen}.", ""]
    lines += ["| Stage | Seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in out["stages"].items()]
    lines += [f"| **total** | {out['total_seconds']:.1f} |", ""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"- [{title}]({name})\n\n  ![{title}]({name})" for title, name in plots]
    path = run_dir / "report.md"
    from .checkpoint import atomic_write_text

    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _classes(stage_dir: Path) -> list[str]:
    from .checkpoint import latest_checkpoint, read_meta

    last = latest_checkpoint(stage_dir)
    return list(read_meta(last).get("classes", [])) if last else []

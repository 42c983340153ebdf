"""End-to-end: ``simclrv2 pipeline`` on a tiny subset of Fashion-MNIST with a tiny model (issue 7).

The subset is written as original-format IDX ``.gz`` files (2,000 training and 500 test images of
the real data), so the run goes through the same loader as ``make demo``. The test checks that every
artefact exists, that ``results.json`` has the documented shape, and that every number in
``report.md`` is the one in ``results.json``.
"""

from __future__ import annotations

import gzip
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from simclrv2.cli import main
from simclrv2.data.builtin import load_fashion_mnist

N_TRAIN, N_TEST = 2000, 500


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format of the original files: magic (0, 0, type 0x08 = uint8, ndim), sizes, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def tiny_fashion_mnist(folder: Path) -> Path:
    """A class-stratified subset of the real Fashion-MNIST, in its original file names."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, prefix, n in (("train", "train", N_TRAIN), ("test", "t10k", N_TEST)):
        ds = load_fashion_mnist(split)
        labels = ds.labels.numpy()
        pick = np.concatenate([rng.choice(np.flatnonzero(labels == c), n // 10, replace=False) for c in range(10)])
        pick.sort()
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", ds.images[pick, 0].numpy())
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels[pick].astype(np.uint8))
    return folder


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("pipeline")
    data = tiny_fashion_mnist(root / "fmnist")
    run = root / "run"
    config = root / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(run),
        "label_fractions": [0.01, 0.1],
        "self_distill": True,
        "small_student": "r10_0.25x_sk0",
        "embedding_points": 300,
        "common": {"dataset": "fashion_mnist", "data_dir": str(data), "model": "r18_0.25x_sk0",
                   "stem": "imagenet", "batch_size": 128, "log_every": 10},  # progress: auto
        "pretrain": {"epochs": 2, "knn_every": 1, "knn_train_size": 1000, "knn_test_size": 500,
                     "temperature": 0.2, "warmup_epochs": 0.5},
        "finetune": {"epochs": 4, "batch_size": 32, "min_steps": 0},
        "supervised": {"epochs": 4, "batch_size": 32, "min_steps": 0},
        "distill_self": {"epochs": 1, "min_steps": 0},
        "distill_small": {"epochs": 1, "min_steps": 0},
        "linear_eval": {"epochs": 10},
    }))
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["pipeline", "--config", str(config)]) == 0
    return run, buf.getvalue()


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_every_artefact_exists(pipeline_run: tuple[Path, str]) -> None:
    run, _ = pipeline_run
    for name in ("results.json", "report.md", "pipeline.yaml", "pretraining.png", "accuracy_vs_labels.png",
                 "embedding_tsne.png", "confusion_best.png"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    stages = ["pretrain", "finetune_1pct", "distill_self_1pct", "distill_small_1pct", "finetune_10pct",
              "distill_self_10pct", "distill_small_10pct", "linear_eval", "knn", "supervised_1pct",
              "supervised_10pct"]
    for stage in stages:
        assert (run / stage / "done.json").is_file(), stage
        assert (run / stage / "config.yaml").is_file(), stage
    for png in run.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_results_json_shape(pipeline_run: tuple[Path, str]) -> None:
    run, _ = pipeline_run
    out = json.loads((run / "results.json").read_text())
    assert isinstance(out["config_hash"], str) and out["config_hash"]
    got = {(r["method"], r["label_fraction"]) for r in out["results"]}
    want = {(m, f) for m in ("supervised", "finetune", "distill-self", "distill-small") for f in (0.01, 0.1)}
    want |= {("linear-eval", 1.0), ("knn", 1.0)}
    assert got == want
    for r in out["results"]:
        assert 0.0 <= r["top1"] <= 100.0 and r["seconds"] > 0
        assert r["model"] == ("r10_0.25x_sk0" if r["method"] == "distill-small" else "r18_0.25x_sk0")
        assert r["seconds"] == out["stages"][Path(r["run_dir"]).name]
    assert set(out["stages"]) == {p.name for p in run.iterdir() if (p / "done.json").is_file()}
    # the frozen encoder after 2 short epochs is far better than chance (10 classes); the label-subset
    # stages train for a few steps only, so they are not checked for accuracy here
    assert min(r["top1"] for r in out["results"] if r["method"] in ("linear-eval", "knn")) > 30.0
    # the monitor's best over the first half of the two epochs, read back from pretraining's own log
    rows = [json.loads(line) for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    first = max(r["knn_top1"] for r in rows if "knn_top1" in r and r["epoch"] <= 1.0)
    assert out["pretrain"]["knn_first_half"] == {"epoch": 1.0, "top1": first}


def _table_rows(report: str, heading: str) -> list[list[str]]:
    section = report.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows[2:]]


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_report_numbers_equal_results_json(pipeline_run: tuple[Path, str]) -> None:
    run, stdout = pipeline_run
    out = json.loads((run / "results.json").read_text())
    report = (run / "report.md").read_text()
    by_key = {(r["method"], r["label_fraction"]): r for r in out["results"]}

    titles = {"Supervised baseline": "supervised", "SimCLRv2 fine-tuned": "finetune",
              "SimCLRv2 self-distilled": "distill-self", "SimCLRv2 distilled into small": "distill-small"}
    rows = _table_rows(report, "Test top-1 accuracy (%)")
    seen = set()
    for cells in rows:
        method = next((m for t, m in titles.items() if cells[0].startswith(t)), None)
        if method is None:
            kind = "linear-eval" if cells[0].startswith("Linear eval") else "knn"
            assert cells[0].startswith(("Linear eval", "kNN")), cells
            assert cells[2] == f"{by_key[(kind, 1.0)]['top1']:.2f}"
            seen.add(kind)
            continue
        assert cells[1] == by_key[(method, 0.01)]["model"]
        assert cells[2:] == [f"{by_key[(method, f)]['top1']:.2f}" for f in (0.01, 0.1)], cells
        seen.add(method)
    assert seen == {m for m, _ in by_key}

    for cells in _table_rows(report, "Gain over the supervised baseline (points)"):
        method = next(m for t, m in titles.items() if cells[0].startswith(t))
        want = [f"{by_key[(method, f)]['top1'] - by_key[('supervised', f)]['top1']:+.2f}" for f in (0.01, 0.1)]
        assert cells[1:] == want, cells

    timing = {c[0]: c[1] for c in _table_rows(report, "Stage timings") if not c[0].startswith("**")}
    assert timing == {k: f"{v:.1f}" for k, v in out["stages"].items()}
    assert f"Machine: {out['machine']}" in report

    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (run / image).is_file(), image

    # the summary table on stdout is the report's table
    table = report.split("## Test top-1 accuracy (%)\n\n", 1)[1].split("\n\n", 1)[0]
    assert table in stdout


def test_pretraining_plot_draws_the_contrastive_term(tmp_path, monkeypatch):
    """The left axis says "contrastive loss": it plots ``contrastive_loss``, not ``loss`` (which adds
    the online probe's cross-entropy)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from simclrv2.report import plot_pretraining

    (tmp_path / "pretrain").mkdir()
    rows = [{"step": 1, "epoch": 0.5, "loss": 9.0, "contrastive_loss": 7.0},
            {"step": 2, "epoch": 1.0, "loss": 8.0, "contrastive_loss": 6.5},
            {"step": 2, "epoch": 1.0, "knn_top1": 50.0}]
    (tmp_path / "pretrain" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = []
    real = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: (drawn.append(a), real(self, *a, **k))[1])
    assert plot_pretraining(tmp_path, tmp_path / "p.png")
    assert (tmp_path / "p.png").is_file()
    assert list(drawn[0][1]) == [7.0, 6.5]  # the contrastive term; then the kNN line
    assert list(drawn[1][1]) == [50.0]


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_stdout_gets_plain_progress_lines_with_the_pipeline_position(pipeline_run: tuple[Path, str]) -> None:
    """stdout is not a terminal here: each training stage prints a line every log_every steps (and
    at its last step), labelled with its place in the pipeline."""
    _, stdout = pipeline_run
    lines = re.findall(r"^\[(\d+)/\d+\] (\w+) step (\d+)/(\d+) loss [\d.]+ lr \S+ \d+ img/s ETA [\d:]+$",
                       stdout, re.M)
    steps: dict[str, list[int]] = {}
    for _, name, step, _ in lines:
        steps.setdefault(name, []).append(int(step))
    assert lines[0][:3] == ("1", "pretrain", "10") and "\r" not in stdout
    assert steps["pretrain"][:3] == [10, 20, 30]
    assert steps["supervised_1pct"] == [4]  # 20 images, batch 32, 4 epochs: under log_every, only the end
    assert {"finetune_10pct", "distill_self_1pct", "distill_small_10pct"} <= set(steps)

"""Smoke tests of the benchmarks (issue 9: throughput.py, gpu_benchmark.py; issue 19: dataloading.py).

Tiny models, batches and step counts: they check that the three pipelines still run and train, that
the table is built from what was measured, and the batch-size search logic, not any speed. Computed
numbers (the step's loss, FLOP counts, the kNN and linear reference rows) are compared with naive
references computed here.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import budget_precision as bp  # noqa: E402
import dataloading as dl  # noqa: E402
import gpu_benchmark as gb  # noqa: E402
import knn_reference as kr  # noqa: E402
import throughput as tp  # noqa: E402

TINY = dict(model="r10_0.25x_sk0", image_size=16, channels=1, batch_size=8, steps=1, warmup=1,
            workers=0, pool_size=32)


def naive_nt_xent(z: torch.Tensor, temperature: float) -> float:
    """The official SimCLR loss one anchor at a time, in float64: each of the 2N views (view 1 then
    view 2) against its partner among the other 2N - 1; the two directions summed, each a mean over N."""
    z = torch.nn.functional.normalize(z.double(), dim=1)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        logits = {j: float(z[i] @ z[j]) / temperature for j in range(n2) if j != i}
        total -= logits[(i + n2 // 2) % n2] - math.log(sum(math.exp(v) for v in logits.values()))
    return total / (n2 // 2)


def naive_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    rows = [math.log(sum(math.exp(v) for v in row)) - row[t] for row, t in zip(logits.double().tolist(), targets.tolist())]
    return sum(rows) / len(rows)


def test_ours_step_trains_like_pretraining():
    ours = tp.OursStep(tp.BenchConfig(**TINY), torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in ours.step_module.named_parameters()}
    views, y = ours.views(0)
    assert views.shape == (16, 1, 16, 16) and views.dtype == torch.float32 and y.shape == (8,)
    assert 0.0 <= float(views.min()) and float(views.max()) <= 1.0
    # the loss the step should see: NT-Xent of the projections plus the probe's cross-entropy on both views
    with torch.no_grad():
        _, z, logits = copy.deepcopy(ours.step_module).train()(views)
    expected = naive_nt_xent(z, tp.TEMPERATURE) + naive_cross_entropy(logits, y.repeat(2))
    ours.update(views, y, 20)  # past the 10-step warmup: lr > 0
    changed = [n for n, p in ours.step_module.named_parameters() if not torch.equal(p, before[n])]
    # backbone, head and the online probe all got a LARS update
    assert any(n.startswith("model.backbone.") for n in changed)
    assert any(n.startswith("model.proj_head.") for n in changed)
    assert any(n.startswith("classifier.") for n in changed)
    assert bool(ours.finite)
    assert {"loss", "probe_loss", "contrastive_acc"} <= set(ours.sums)
    assert float(ours.sums["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(ours.sums["probe_loss"]) == pytest.approx(naive_cross_entropy(logits, y.repeat(2)), rel=1e-5)
    # the batch-size search asks for other batch sizes, past the pool size too
    big, y_big = ours.views(1, batch=40)
    assert big.shape[0] == 80 and y_big.shape == (40,)


def test_pipelines_run_and_table_reports_them(capsys):
    """ours and the backbone ceiling always; lightly's row too where lightly is installed (it is an
    optional comparison, not a dependency)."""
    cfg = tp.BenchConfig(**TINY, stem="cifar")
    which = ["ours", "lightly", "ceiling"] if tp.lightly_available() else ["ours", "ceiling"]
    rows = tp.run_benchmark(cfg, rounds=1, which=which)
    assert [r.name for r in rows] == which
    for r in rows:
        assert len(r.seconds_per_step) == 1 and r.seconds_per_step[0] > 0 and r.cpu_per_step[0] > 0
    table = tp.format_table(rows, cfg.batch_size)
    lines = table.splitlines()
    assert len(lines) == 2 + len(which)
    ours_rate = rows[0].median_rate(cfg.batch_size)
    assert lines[2].startswith(f"| ours | {tp._num(ours_rate)} |")
    ratio = rows[-1].median_rate(cfg.batch_size) / ours_rate
    assert f"| {ratio:.2f}x |" in lines[2]  # "ceiling faster by" for ours


def test_number_format():
    assert [tp._num(v) for v in (1234.5, 123.4, 12.345, 1.2345, 0.12345, 0.0)] == [
        "1234", "123", "12.3", "1.23", "0.123", "0"]


def test_lightly_transform_gives_two_normalised_views():
    pytest.importorskip("lightly")
    images = tp.synthetic_images(4, 3, 20, seed=0)
    ds = tp.PILImages(images, tp.lightly_transform(20, 3), length=6)
    assert len(ds) == 6
    v0, v1 = ds[5]  # index wraps around the 4 images
    assert v0.shape == v1.shape == (3, 20, 20)
    gray = tp.PILImages(tp.synthetic_images(2, 1, 20, seed=0), tp.lightly_transform(20, 1), length=2)
    assert gray[0][0].shape == (1, 20, 20)


def _search(limit: int, **kw):
    tried: list[int] = []

    def fits(b: int) -> str | None:
        tried.append(b)
        return None if b <= limit else "OOM: fake"

    return gb.largest_batch(fits, **kw), tried


def test_largest_batch_doubles_then_bisects():
    s, tried = _search(300, start=16, max_batch=4096, budget_s=60)
    assert tried[:6] == [16, 32, 64, 128, 256, 512]
    assert s.complete and s.largest <= 300 < s.first_failure
    assert s.first_failure - s.largest <= max(8, s.largest / 16)
    assert s.reason == "OOM: fake" and s.tries == len(tried)
    # everything fits: stops at max_batch
    s, tried = _search(10**9, start=16, max_batch=100, budget_s=60)
    assert s.largest == 100 and s.first_failure is None and s.complete and tried[-1] == 100
    # even the first batch fails: bisects below it
    s, _ = _search(20, start=256, max_batch=4096, budget_s=60)
    assert s.complete and 12 <= s.largest <= 20 < s.first_failure
    # no time: one try, reported as incomplete
    ticks = iter(range(0, 1000, 10))
    s, tried = _search(300, start=16, max_batch=4096, budget_s=5, clock=lambda: next(ticks))
    assert not s.complete and len(tried) == 1


# bf16 tensor-core peaks as NVIDIA prints them: with 2:4 sparsity (TFLOP/s). H100 whitepaper for the
# SXM5 card (the H200 SXM has the same GH100 at the same clocks), datasheets for the others.
SPARSE_BF16_TFLOPS = {"H100 SXM": 1978.9, "H200 SXM": 1978.9, "H100 PCIe": 1513.0, "H100 NVL": 1671.0,
                      "H200 NVL": 1671.0}
# what torch.cuda.get_device_name reports -> the card
DEVICE_NAMES = {"NVIDIA H100 80GB HBM3": "H100 SXM", "NVIDIA H200": "H200 SXM", "NVIDIA H100 PCIe": "H100 PCIe",
                "NVIDIA H100 NVL": "H100 NVL", "NVIDIA H200 NVL": "H200 NVL"}


def test_peak_table():
    """Each card's dense bf16 peak is half its sparse figure, found under the name torch reports;
    every table entry is reachable (no earlier, shorter key shadows it); unknown cards give None."""
    for device_name, card in DEVICE_NAMES.items():
        # 0.1: the sparse figures and the table are both rounded to one decimal
        assert gb.peak_tflops(device_name) == pytest.approx(SPARSE_BF16_TFLOPS[card] / 2, abs=0.1), device_name
        assert gb.peak_tflops(device_name.lower()) == gb.peak_tflops(device_name)
    # the SXM5 figure from first principles: 132 SMs x 4 tensor cores x 512 dense bf16 FMAs (1024
    # FLOPs) per clock x 1.83 GHz
    assert gb.peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(132 * 4 * 1024 * 1.83e9 / 1e12, abs=0.05)
    for key, peak in gb.PEAK_BF16_TFLOPS:
        assert gb.peak_tflops(f"NVIDIA {key}") == peak, f"'{key}' is shadowed by an earlier entry"
    assert gb.peak_tflops("NVIDIA A100-SXM4-80GB") is None and gb.peak_tflops("cpu") is None


def forward_flops(module: torch.nn.Module, x: torch.Tensor) -> list[int]:
    """2 x the multiply-adds of each Conv2d and Linear of one forward pass, in the order they run,
    from the output shapes that forward hooks see."""
    flops: list[int] = []

    def count(m, inputs, out):
        if isinstance(m, torch.nn.Conv2d):
            flops.append(2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1])
        else:
            flops.append(2 * out.numel() * m.in_features)

    hooks = [m.register_forward_hook(count) for m in module.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in hooks:
            h.remove()
    return flops


def naive_ceiling_step_flops(cfg: tp.BenchConfig) -> int:
    """FLOPs of the ceiling row's step (forward + backward of the backbone on 2N views): each layer
    forward, then its input gradient and its weight gradient at the same cost, except the input
    gradient of the first layer, which the images do not need."""
    step = tp.CeilingStep(cfg, torch.device("cpu"))
    flops = forward_flops(step.backbone, step.inputs)
    return 3 * sum(flops) - flops[0]


def test_flop_count_of_the_ceiling_step_matches_the_layer_shapes():
    for stem in ("imagenet", "cifar"):
        cfg = tp.BenchConfig(**dict(TINY, channels=3), stem=stem)
        assert gb.count_flops(tp.CeilingStep(cfg, torch.device("cpu"))) == naive_ceiling_step_flops(cfg), stem


@pytest.mark.slow
def test_gpu_benchmark_smoke_on_cpu(capsys):
    gb.main(["--smoke", "--only", "ours,ceiling", "--model", "r10_0.25x_sk0", "--image-size", "16", "--max-batch", "16",
             "--search-seconds", "0.5"])
    out = capsys.readouterr().out
    assert "| ours |" in out and "| ceiling |" in out
    row = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ")}
    assert float(row["ours"][4]) > 0  # FlopCounterMode saw the convolutions
    # the ceiling's GFLOP/image: its step's FLOPs over the batch of 8 images (16 views), as printed
    cfg = tp.BenchConfig(model="r10_0.25x_sk0", image_size=16, channels=3, batch_size=8, stem="imagenet")
    assert row["ceiling"][4].strip() == f"{naive_ceiling_step_flops(cfg) / 8 / 1e9:.2f}"
    assert "| off |" in out and "| on |" in out  # both batch searches ran


def test_bf16_channels_last_step_runs():
    cfg = tp.BenchConfig(**dict(TINY, channels=3, precision="bf16", channels_last=True))
    for runner in (tp.OursStep(cfg, torch.device("cpu")), tp.CeilingStep(cfg, torch.device("cpu"))):
        runner(20)
    ours_views, _ = tp.OursStep(cfg, torch.device("cpu")).views(0)
    assert ours_views.dtype == torch.float32  # augmentation stays fp32 under autocast
    assert ours_views.is_contiguous(memory_format=torch.channels_last)


def naive_knn_top1(bank_x: torch.Tensor, bank_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   k: int = 20, temperature: float = 0.1, num_classes: int = 10) -> float:
    """kNN top-1 (%) one query at a time, in float64: cosine similarity to every bank row, the top
    ``k``, votes weighted by exp(sim / temperature)."""
    bank_x, test_x = bank_x.double(), test_x.double()
    correct = 0
    for q, label in zip(test_x, test_y.tolist()):
        sims = [(float(q @ b) / float(q.norm() * b.norm()), int(y)) for b, y in zip(bank_x, bank_y.tolist())]
        votes = [0.0] * num_classes
        for sim, y in sorted(sims, reverse=True)[:k]:
            votes[y] += math.exp(sim / temperature)
        correct += int(max(range(num_classes), key=votes.__getitem__) == label)
    return round(100.0 * correct / len(test_y), 2)


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_knn_reference_rows_match_a_naive_knn(capsys):
    """Every row of benchmarks/knn_reference.py equals a naive kNN on features computed here: raw
    pixels, pixels minus the bank mean, and a random-init encoder whose BN statistics were
    estimated on the bank in train mode.

    The encoder has the small stem: at 28 px the ImageNet stem's random r10_0.25x_sk0 gives many
    images the very same features, so its top-20 depends on how ``topk`` breaks ties."""
    from simclrv2.data.datasets import load_dataset
    from simclrv2.models import create_model

    rows = dict(kr.main(["--bank", "300", "--test", "50", "--k", "20", "--models", "r10_0.25x_sk0:small"]))
    assert "| raw pixels |" in capsys.readouterr().out
    train, test = load_dataset("fashion_mnist", "train"), load_dataset("fashion_mnist", "test")
    g = torch.Generator().manual_seed(0)  # the monitor's draw: the bank, then the test images
    bank = torch.randperm(len(train), generator=g)[:300].sort().values
    tst = torch.randperm(len(test), generator=g)[:50].sort().values
    bank_images, test_images = train.images[bank].float(), test.images[tst].float()
    bank_y, test_y = train.labels[bank], test.labels[tst]

    pixels = naive_knn_top1(bank_images.flatten(1), bank_y, test_images.flatten(1), test_y)
    mean = bank_images.flatten(1).double().mean(0)
    centred = naive_knn_top1(bank_images.flatten(1) - mean, bank_y, test_images.flatten(1) - mean, test_y)
    torch.manual_seed(0)
    model = create_model("r10_0.25x_sk0", in_chans=1, cifar_stem=True, stem_stride=2)  # the small stem
    with torch.no_grad():
        model.train().features(bank_images / 255)  # BN running statistics of the random network: one batch
        model.eval()
        bank_f, test_f = model.features(bank_images / 255), model.features(test_images / 255)
    assert len({tuple(f) for f in bank_f.tolist()}) == len(bank)  # no tied neighbours
    random_init = naive_knn_top1(bank_f, bank_y, test_f, test_y)
    assert rows == {"raw pixels": pixels, "pixels minus the bank mean": centred,
                    "random-init r10_0.25x_sk0 (small stem)": random_init}


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_linear_reference_cross_validates_c_on_the_pipelines_subset(capsys, tmp_path):
    """benchmarks/linear_reference.py: the 0.1% subset is the one ``finetune`` writes, C comes from 3-fold
    CV on those labelled images only (no test image), and the encoder row runs a real checkpoint."""
    import linear_reference as lr
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    from simclrv2.cli import main as cli_main
    from simclrv2.data.datasets import load_dataset
    from simclrv2.data.subsets import balanced_subset

    run = tmp_path / "pre"
    assert cli_main(["pretrain", "model=r10_0.25x_sk0", "stem=imagenet", "max_steps=1", "batch_size=16",
                     "knn_every=0", "progress=false", "device=cpu", f"run_dir={run}"]) == 0
    rows = lr.main(["--fractions", "0.001", "--test-limit", "300", "--checkpoint", str(run)])
    out = capsys.readouterr().out
    assert "| raw pixels |" in out and "r10_0.25x_sk0 features" in out
    train, test = load_dataset("fashion_mnist", "train"), load_dataset("fashion_mnist", "test")
    idx = balanced_subset(train.labels, 0.001, 0)
    assert len(idx) == 60
    x = train.images[idx].flatten(1).numpy() / 255.0
    y = train.labels[idx].numpy()
    xt, yt = test.images[:300].flatten(1).numpy() / 255.0, test.labels[:300].numpy()
    # the naive version: every C on every fold, one scaler per fold, the best mean, a refit
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(x, y))
    scores = {}
    for c in (0.01, 0.1, 1.0):
        accs = []
        for a, b in folds:
            sc = StandardScaler().fit(x[a])
            m = LogisticRegression(C=c, max_iter=300).fit(sc.transform(x[a]), y[a])
            accs.append((m.predict(sc.transform(x[b])) == y[b]).mean())
        scores[c] = np.mean(accs)
    best = max(scores, key=scores.get)
    sc = StandardScaler().fit(x)
    m = LogisticRegression(C=best, max_iter=300).fit(sc.transform(x), y)
    pixels = dict((r[0], r[1]) for r in rows)["raw pixels"]
    assert pixels == round(100.0 * float((m.predict(sc.transform(xt)) == yt).mean()), 2)
    assert f"(C {best:g})" in out
    assert pixels > 50.0  # 6 labels per class: pixels alone reach about 68% on the full test split


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_dataloading_generator_writes_a_class_folder_of_jpegs(tmp_path, capsys):
    """benchmarks/dataloading.py's folder: valid 300-500 px RGB JPEGs of photo-like weight, one folder
    per Fashion-MNIST class holding the images made from that class, the same bytes for any number of
    generating processes, and files that exist are kept."""
    import numpy as np
    from PIL import Image

    from simclrv2.data.builtin import FASHION_MNIST_CLASSES, load_fashion_mnist

    dl.main(["--root", str(tmp_path / "a"), "--images", "20", "--parts", "", "--gen-workers", "2"])
    assert "20 JPEGs" in capsys.readouterr().out
    train = tmp_path / "a" / "train"
    assert sorted(p.name for p in train.iterdir()) == sorted(c.replace("/", "-") for c in FASHION_MNIST_CLASSES)
    files = sorted(train.rglob("*"))
    jpegs = [p for p in files if p.is_file()]
    assert len(jpegs) == 20 and all(p.suffix == ".jpg" for p in jpegs)  # no temporary file left behind
    labels = load_fashion_mnist("train").labels.numpy()
    for p in jpegs:
        i = int(p.stem)
        assert p.parent.name == FASHION_MNIST_CLASSES[labels[i]].replace("/", "-")
        with Image.open(p) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert all(300 <= side <= 500 for side in img.size)
            img.verify()
        with Image.open(p) as img:
            assert np.asarray(img).std() > 10  # a picture, not a flat colour
        assert 10_000 < p.stat().st_size < 150_000
    # one process writes the same bytes as two
    dl.generate(tmp_path / "b", 20, workers=1, quiet=True)
    for p in jpegs:
        assert (tmp_path / "b" / "train" / p.relative_to(train)).read_bytes() == p.read_bytes()
    # a second call keeps what exists and only adds what is missing
    before = {p: p.stat().st_mtime_ns for p in jpegs}
    jpegs[0].unlink()
    dl.generate(tmp_path / "a", 22, quiet=True)
    assert len(list(train.rglob("*.jpg"))) == 22
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p != jpegs[0])
    assert jpegs[0].read_bytes() == (tmp_path / "b" / "train" / jpegs[0].relative_to(train)).read_bytes()


def test_dataloading_rate_from_metrics_leaves_out_the_first_line(tmp_path):
    """Each metric line's images/s covers the steps since the line before: the rate over lines is the
    images over the summed seconds, and the first line (warm-up) does not count."""
    import json

    lines = [dict(step=4, loss=1.0, images_per_s=5.0), dict(step=5, knn_top1=10.0),
             dict(step=8, loss=1.0, images_per_s=20.0), dict(step=12, loss=1.0, images_per_s=40.0)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    rate, steps = dl.metrics_rate(tmp_path, batch=8)
    assert steps == 8
    assert rate == pytest.approx(64 / (32 / 20 + 32 / 40))
    table = dl.train_table([(96, "r18_1x_sk0", 32, 2, 45.0, 100.0, 50.0)])
    # shared-CPU bound: 1 / (1/100 + 1/50) = 33.3 images/s
    assert table.splitlines()[2] == "| 96 | r18_1x_sk0 | 32 | 2 | 45.0 | 100 | 50.0 | 90% | 33.3 | 135% |"


def test_table_survives_a_cpu_time_of_zero():
    """A clock too coarse for the step gives 0 CPU seconds: the table prints "-", not a crash."""
    rows = [tp.Row("ours", [0.01], [0.0]), tp.Row("ceiling", [0.005], [0.004])]
    lines = tp.format_table(rows, 8).splitlines()
    assert lines[2].startswith("| ours | 800 |") and lines[2].endswith("| 0 | - | - |")
    assert "| 2000 | - | 1.00x |" in lines[3]


@pytest.mark.fashion_mnist
def test_budget_precision_times_each_precision_through_the_stage_step(tmp_path, capsys, monkeypatch):
    """benchmarks/budget_precision.py: one row per precision, each timed through the pretraining
    stage's own step under that precision's autocast, and an epoch estimate of at least its steps."""
    import yaml

    from simclrv2.engine import pretrain

    seen = []
    stage_autocast = pretrain.autocast
    monkeypatch.setattr(pretrain, "autocast", lambda device, prec: seen.append(prec) or stage_autocast(device, prec))
    config = tmp_path / "tiny.yaml"
    values = yaml.safe_load(Path("configs/fashion_mnist_demo.yaml").read_text())
    values["common"]["model"] = "r10_0.25x_sk0"
    values["pretrain"].update(batch_size=8, knn_every=0)
    config.write_text(yaml.safe_dump(values))
    rows = bp.main(["--config", str(config)])
    assert set(rows) == {"fp32", "bf16"} and sorted(set(seen)) == ["bf16", "fp32"]
    steps = 54_000 // 8  # the demo's pool: 60,000 images less the 10% validation split
    for step, epoch in rows.values():
        assert epoch >= steps * step > 0
    assert "| bf16 | 8 | 6750 |" in capsys.readouterr().out


def test_score_predictions_reads_the_pipelines_csv_and_predicts_csv_alike(tmp_path):
    """benchmarks/score_predictions.py: the pipeline's predictions.csv (file, class, confidence) and
    `simclrv2 predict`'s CSV (image, pred_class, confidence) score the same, against a count by hand."""
    import score_predictions as sp

    truth = {"a/1.png": "cat", "a/2.png": "dog", "b/3.png": "cat", "b/4.png": "dog"}
    pipeline = tmp_path / "pipeline.csv"
    pipeline.write_text("file,class,confidence,margin\na/1.png,cat,0.9,0.8\na/2.png,cat,0.6,0.2\n"
                        "b/3.png,cat,0.95,0.9\n")  # b/4.png has no row: counted wrong
    predict = tmp_path / "predict.csv"
    predict.write_text("image,label,pred_index,pred_class,confidence,p_cat,p_dog\n"
                       "a/1.png,,0,cat,0.9,0.9,0.1\na/2.png,,0,cat,0.6,0.6,0.4\nb/3.png,,0,cat,0.95,0.95,0.05\n")
    scores = [sp.score(sp.read_rows(p), truth) for p in (pipeline, predict)]
    assert scores[0] == scores[1]
    assert scores[0]["accuracy"] == 50.0 and scores[0]["predicted"] == 3  # 2 right of 4 files
    assert scores[0]["at_least_0.7"] == {"images": 2, "accuracy": 100.0}


def test_score_predictions_names_a_missing_file_in_one_line(tmp_path, capsys, monkeypatch):
    import score_predictions as sp

    truth = tmp_path / "truth.csv"
    truth.write_text("file,class\na/1.png,cat\n")
    monkeypatch.setattr(sys, "argv", ["score_predictions.py", str(tmp_path / "run" / "predictions.csv"), str(truth)])
    with pytest.raises(SystemExit) as exit_:
        sp.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "predictions.csv: no such file" in err and "Traceback" not in err


def test_heldout_datasets_seed_draws_other_labels_and_zero_is_the_default(tmp_path, monkeypatch):
    """``--seed`` draws another split and other labelled images; no ``--seed`` is ``--seed 0``."""
    import heldout_datasets as hd

    def write(out: Path, *seed: str) -> tuple[list[str], str]:
        monkeypatch.setattr(sys, "argv", ["heldout_datasets.py", str(out), "--layout", "fewlabels",
                                          "--only", "digits", *seed])
        hd.main()
        train = sorted(str(p.relative_to(out)) for p in (out / "digits_fewlabels" / "train").rglob("*.png"))
        return train, (out / "digits_fewlabels_truth.csv").read_text()

    default, zero, one = write(tmp_path / "a"), write(tmp_path / "b", "--seed", "0"), write(tmp_path / "c", "--seed", "1")
    assert default == zero
    assert len(one[0]) == len(zero[0]) == 40 and one[0] != zero[0] and one[1] != zero[1]


def _stand_in_photographs(monkeypatch, names, photo=None) -> None:
    """A stand-in ``skimage.data`` whose photographs ``names`` are ``photo``, by default 100 x 240
    with each pixel its column index, so a patch's values tell where it was cut (the cut is at
    column 180)."""
    import types

    import numpy as np

    columns = np.tile(np.arange(240, dtype=np.uint8), (100, 1)) if photo is None else photo
    fake = types.ModuleType("skimage.data")
    for name in names:
        setattr(fake, name, lambda c=columns: c.copy())
    package = types.ModuleType("skimage")
    package.data = fake
    monkeypatch.setitem(sys.modules, "skimage", package)
    monkeypatch.setitem(sys.modules, "skimage.data", fake)


def _assert_patches(root: Path, classes, splits) -> None:
    """``root/<split>/<class>/`` holds ``n`` grey 32 px patches for each (split, n, lo, hi) of
    ``splits``, with every pixel (a column index) in ``[lo, hi]``."""
    import numpy as np
    from PIL import Image

    for split, n, lo, hi in splits:
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(classes)
        for c in classes:
            files = sorted((root / split / c).glob("*.png"))
            assert len(files) == n
            for f in files[:20]:
                img = np.asarray(Image.open(f))
                assert img.shape == (32, 32) and lo <= img.min() and img.max() <= hi


def test_heldout_textures_cut_test_patches_from_other_blocks_drawn_for_each_photograph(tmp_path, monkeypatch):
    """``textures`` on stand-in photographs of 2 x 4 blocks, each block one grey level: every patch
    lies inside one block, a class's test patches come from two blocks and its training patches from
    the six others, and the test blocks differ between photographs (not one region of each, which
    made the unlabeled patches unlike the test ones); 375 and 75 grey 32 px patches a class, in the
    few-labels layout too."""
    import heldout_datasets as hd
    import numpy as np
    from PIL import Image

    levels = (np.arange(8, dtype=np.uint8) * 30).reshape(2, 4)
    _stand_in_photographs(monkeypatch, hd.TEXTURES, np.kron(levels, np.ones((50, 60), dtype=np.uint8)))
    monkeypatch.setattr(sys, "argv", ["heldout_datasets.py", str(tmp_path), "--layout", "fewlabels", "--only", "textures"])
    hd.main()
    _assert_patches(tmp_path / "textures", hd.TEXTURES, (("train", 375, 0, 210), ("test", 75, 0, 210)))
    test_blocks = set()
    for c in hd.TEXTURES:
        seen = {}
        for split in ("train", "test"):
            patches = [np.asarray(Image.open(f)) for f in (tmp_path / "textures" / split / c).glob("*.png")]
            assert all(p.min() == p.max() for p in patches)  # inside one block
            seen[split] = {int(p[0, 0]) for p in patches}
        assert len(seen["test"]) == 2 and len(seen["train"]) == 6 and not seen["train"] & seen["test"]
        test_blocks.add(frozenset(seen["test"]))
    assert len(test_blocks) > 1
    few = tmp_path / "textures_fewlabels"
    assert len(list((few / "train").rglob("*.png"))) == 32 and len(list((few / "unlabeled").rglob("*.png"))) == 2968


def test_few_label_probe_photos_are_not_the_held_out_textures_and_val_is_another_region(tmp_path, monkeypatch):
    """``--make-photos`` on stand-in photographs whose pixels are their column index: none of its
    photographs is a held-out ``textures`` one, every ``train/`` patch comes from the left three
    quarters and every ``val/`` patch from the right quarter, 400 and 200 grey 32 px patches a class."""
    import few_label_probe as flp
    import heldout_datasets as hd

    assert not set(flp.PHOTOS) & set(hd.TEXTURES)
    _stand_in_photographs(monkeypatch, flp.PHOTOS)
    assert flp.main([str(tmp_path / "photos"), "--make-photos"]) == 0
    _assert_patches(tmp_path / "photos", flp.PHOTOS, (("train", 400, 0, 179), ("val", 200, 180, 239)))
    with pytest.raises(SystemExit) as exit_:
        flp.main([str(tmp_path / "photos"), "--make-photos"])
    assert exit_.value.code == 2


def test_few_label_probe_pairs_its_draws_and_reads_a_class_from_the_pixels(tmp_path, capsys):
    """benchmarks/few_label_probe.py on dark against bright images: the pixel probe separates them
    from 2 labels a class; an encoder probed twice gives the same row (the same draws); a missing
    val/ is a one-line error."""
    import few_label_probe as flp
    import numpy as np
    from PIL import Image

    from simclrv2.checkpoint import write_model_file
    from simclrv2.models import create_model

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 4)):
        for k, (lo, hi) in enumerate(((0, 60), (190, 256))):
            (tmp_path / "data" / split / f"c{k}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(lo, hi, (28, 28), dtype=np.uint8), "L").save(
                    tmp_path / "data" / split / f"c{k}" / f"{i}.png")
    torch.manual_seed(0)
    model = create_model("r10_0.25x_sk0", in_chans=1, cifar_stem=True, num_classes=0, ft_proj_selector=-1,
                         proj_out_dim=16)
    enc = tmp_path / "enc.safetensors"
    write_model_file(enc, model.eval().state_dict(), {"model_name": model.name, "model_config": model.config,
                                                      "image_size": 28, "classes": [], "num_classes": 0})
    assert flp.main([str(tmp_path / "data"), str(enc), str(enc), "--per-class", "2", "--draws", "3"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "Features" not in ln]
    assert len(rows) == 3 and rows[0] == rows[1]
    assert rows[2].startswith("| raw pixels | 100.00 ± 0.00") and rows[2].endswith("| 100.00 |")
    (tmp_path / "data" / "val").rename(tmp_path / "elsewhere")
    with pytest.raises(SystemExit) as exit_:
        flp.main([str(tmp_path / "data"), str(enc)])
    assert exit_.value.code == 2 and "val is missing" in capsys.readouterr().err


def test_cv_rate_choice_scores_folds_and_chooses_as_the_pipeline_does(tmp_path):
    """benchmarks/cv_rate_choice.py: each score of a fold's ``validation.npz`` against a naive
    computation, the pipeline's grid of three with one step beyond an edge, and the paired rule."""
    import cv_rate_choice as cv
    import numpy as np

    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.5, 0.25, 0.25], [0.2, 0.6, 0.2]], dtype=np.float32)
    labels = np.array([0, 1, 2, 1])
    for k, rows in enumerate(([0, 1], [2, 3])):
        (tmp_path / f"f{k}").mkdir()
        np.savez(tmp_path / f"f{k}" / "validation.npz", index=np.array(rows), label=labels[rows], probs=probs[rows])
    s = cv.fold_scores([tmp_path / "f0", tmp_path / "f1"])
    p_true = [0.7, 0.1, 0.25, 0.6]
    assert s["top-1"] == pytest.approx((50.0 + 50.0) / 2)
    assert s["cross-entropy"] == pytest.approx(-np.mean([-np.mean(np.log(p_true[:2])), -np.mean(np.log(p_true[2:]))]))
    brier = [sum((p - (c == y)) ** 2 for c, p in enumerate(row)) for row, y in zip(probs.tolist(), labels)]
    assert s["Brier score"] == pytest.approx(-np.mean([np.mean(brier[:2]), np.mean(brier[2:])]), rel=1e-6)
    assert s["mean probability of the true class"] == pytest.approx(np.mean(p_true), rel=1e-6)
    assert s["correct"] == {0: 1.0, 1: 0.0, 2: 0.0, 3: 1.0}

    def grid(*top1):  # scores of the rates 1/16 .. 16 of a centre of 1.0
        return {lr: {"top-1": t} for lr, t in zip((1 / 16, 1 / 4, 1.0, 4.0, 16.0), top1)}

    assert cv.choose(grid(90, 50, 60, 55, 99), "top-1", 1.0) == 1.0  # the centre wins; 1/16 and 16 never run
    assert cv.choose(grid(40, 60, 50, 55, 99), "top-1", 1.0) == 1 / 4  # the low edge, and 1/16 is worse
    assert cv.choose(grid(70, 60, 50, 55, 99), "top-1", 1.0) == 1 / 16  # one step beyond the low edge
    assert cv.choose(grid(0, 50, 50, 60, 70), "top-1", 1.0) == 16.0
    assert cv.choose(grid(99, 60, 50, 60, 99), "top-1", 1.0) == 1 / 4  # a tie of the edges: no step, the smaller
    right, wrong = {i: 1.0 for i in range(40)}, {i: float(i % 2) for i in range(40)}
    assert cv.beats({"correct": right}, {"correct": wrong}, 2.0)
    assert not cv.beats({"correct": wrong}, {"correct": right}, 2.0)
    noisy = {i: float(i % 2 == 0 or i == 1) for i in range(40)}  # one image more than `wrong`
    assert not cv.beats({"correct": noisy}, {"correct": wrong}, 2.0)
    scores = {1 / 4: {"top-1": 60.0, "correct": noisy}, 1.0: {"top-1": 50.0, "correct": wrong},
              4.0: {"top-1": 40.0, "correct": wrong}}
    assert cv.choose_centre(scores, 1.0) == 1.0
    scores[1 / 4]["correct"] = right
    assert cv.choose_centre(scores, 1.0) == 1 / 4


def test_baseline_views_pairs_the_best_rates_on_the_same_images(tmp_path, capsys, monkeypatch):
    """baseline_views.py reads a baseline stage's fold runs of both views, takes each view's best
    rate, and tests the images the two got differently against a naive sign test; the final run on
    every label (no validation.npz) is left out."""
    import baseline_views as bv
    import numpy as np

    def plant(run: Path, right: list[bool], fold: int) -> None:
        run.mkdir(parents=True)
        labels = np.zeros(len(right), dtype=np.int64)
        probs = np.eye(2, dtype=np.float32)[[0 if r else 1 for r in right]]
        np.savez(run / "validation.npz", index=np.arange(len(right)) + 10 * fold, label=labels, probs=probs)

    stage = tmp_path / "supervised_100pct"
    for fold in range(2):  # crops and flips: 0.1 right on 4 + 4 of 5 + 5, 0.4 on 1 + 1
        plant(stage / f"lr_0.1_fold{fold}", [True] * 4 + [False], fold)
        plant(stage / f"lr_0.4_fold{fold}", [True] + [False] * 4, fold)
        plant(stage / "color" / f"lr_0.025_fold{fold}", [False, True, False, False, False], fold)
        plant(stage / "color" / f"lr_0.1_fold{fold}", [True, True, False, False, False], fold)
    (stage / "lr_0.1").mkdir()  # the chosen rate on every label: nothing held out
    r = bv.compare(stage)
    assert (r["images"], r["plain_rate"], r["colour_rate"]) == (10, 0.1, 0.1)
    assert (r["plain_top1"], r["colour_top1"], r["only_plain"], r["only_colour"]) == (80.0, 40.0, 4, 0)
    assert r["p_plain_better"] == pytest.approx(1 / 16)  # four heads in four tosses
    assert r["plain_test"] is None  # the pipeline tests no fold run
    monkeypatch.setattr(sys, "argv", ["baseline_views.py", str(stage)])
    bv.main()
    assert f"| {stage} | 10 | 0.1, 80.00 | 0.1, 40.00 | 4 | 0 | 0.062 | - |" in capsys.readouterr().out
    for fold, (plain, colour) in enumerate(((60.0, 70.0), (62.0, 71.0))):  # runs tested by hand
        (stage / f"lr_0.1_fold{fold}" / "metrics.json").write_text(json.dumps({"top1": plain}))
        (stage / "color" / f"lr_0.1_fold{fold}" / "metrics.json").write_text(json.dumps({"top1": colour}))
    (stage / "lr_0.4_fold0" / "metrics.json").write_text(json.dumps({"top1": 10.0}))
    assert (bv.compare(stage)["plain_test"], bv.compare(stage)["colour_test"]) == (61.0, 70.5)
    with pytest.raises(SystemExit, match="no lr_<rate>.*colour distortion"):
        bv.compare(stage / "color")  # no color/ inside it

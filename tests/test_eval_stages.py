"""Issue 5 through the real stages, on a few hundred real Fashion-MNIST images and a few steps:

- fine-tuning puts the classifier where ``ft_proj_selector`` says, and the head layers after it
  stay exactly as pretrained;
- linear evaluation leaves every encoder tensor (weights and BN buffers) bitwise unchanged;
- the supervised baseline starts from a fresh random initialisation, not from the pretrained one;
- every evaluation writes ``metrics.json`` and ``predictions.npy`` that agree with each other;
- kNN evaluation classifies planted images (class = colour) all right, as a naive kNN over features
  extracted in the test does, and ``knn_predict`` equals a naive loop.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclrv2 import checkpoint as ckpt
from simclrv2 import load_pretrained
from simclrv2.cli import main as cli_main
from simclrv2.config import KnnEvalConfig, LinearEvalConfig, SupervisedConfig, load_config
from simclrv2.data.builtin import FASHION_MNIST_SYSTEM_DIR, read_idx
from simclrv2.engine import distill, evaluate, finetune, probe, supervised
from simclrv2.engine.evaluate import knn_predict
from simclrv2.models import create_model

FMNIST_DIR = FASHION_MNIST_SYSTEM_DIR
N_TRAIN, N_TEST = 300, 100  # first images of the real splits; 0.2 labels -> ~60 labelled images
MODEL = "r10_0.25x_sk0"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning threads make small convs
    many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_idx(path: Path, arr: np.ndarray) -> None:
    # IDX: 0x0000, type 0x08 (ubyte), ndim, then each dim as big-endian uint32, then the bytes
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes())


def write_small_fmnist(root: Path, n_train: int, n_test: int) -> Path:
    """A small Fashion-MNIST in ``root``: the first n_train / n_test images of the real IDX files."""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            _write_idx(root / f"{prefix}-{kind}", read_idx(FMNIST_DIR / f"{prefix}-{kind}.gz")[:n])
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A small Fashion-MNIST: the first N_TRAIN / N_TEST images of the real IDX files."""
    return write_small_fmnist(tmp_path_factory.mktemp("fmnist"), N_TRAIN, N_TEST)


@pytest.fixture(scope="module")
def test_labels(data_dir) -> np.ndarray:
    return read_idx(data_dir / "t10k-labels-idx1-ubyte").astype(np.int64)


def _common(data_dir: Path, run_dir: Path) -> list[str]:
    return [f"model={MODEL}", "dataset=fashion_mnist", f"data_dir={data_dir}", "batch_size=32",
            "progress=false", "device=cpu", "num_workers=0", "seed=0", f"run_dir={run_dir}"]


@pytest.fixture(scope="module")
def pretrain_dir(data_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pretrain")
    # seed 1: under the other stages' seed 0 its random start would be the supervised baseline's
    # start too, and two steps barely move it, so "not the pretrained weights" would test little
    code = cli_main(["pretrain", *_common(data_dir, run_dir), "seed=1", "max_steps=2", "warmup_epochs=0",
                     "knn_every=0", "proj_out_dim=16"])
    assert code == 0
    return run_dir


def _state(path: Path) -> dict[str, torch.Tensor]:
    return ckpt.read_model_file(path)[0]


def _file_digest(run_dir: Path) -> str:
    return hashlib.sha256((ckpt.resolve_checkpoint(run_dir) / "model.safetensors").read_bytes()).hexdigest()


def check_eval_outputs(run_dir: Path, labels: np.ndarray) -> dict:
    """metrics.json (top1, top5, per-class accuracy, confusion matrix) agrees with predictions.npy."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    pred = np.load(run_dir / "predictions.npy")
    assert pred.shape == labels.shape and pred.dtype == np.int64
    cm = np.zeros((10, 10), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    assert metrics["confusion_matrix"] == cm.tolist()
    assert metrics["top1"] == pytest.approx(100.0 * (pred == labels).mean(), abs=1e-3)
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 100.0  # 10 classes: top-5 is reported
    per_class = 100.0 * np.diag(cm) / np.maximum(cm.sum(1), 1)
    np.testing.assert_allclose(metrics["per_class_accuracy"], per_class, atol=1e-3)
    return metrics


@pytest.mark.slow
@pytest.mark.fashion_mnist
@pytest.mark.parametrize("selector", [0, 1])
def test_finetune_classifier_placement(pretrain_dir, data_dir, test_labels, tmp_path, selector):
    run_dir = tmp_path / f"ft{selector}"
    code = cli_main(["finetune", *_common(data_dir, run_dir), f"init_checkpoint={pretrain_dir}",
                     f"ft_proj_selector={selector}", "label_fraction=0.2", "max_steps=3"])
    assert code == 0
    before, (after, meta) = _state(pretrain_dir), ckpt.read_model_file(run_dir)
    assert meta["model_config"]["ft_proj_selector"] == selector
    model = load_pretrained(run_dir)
    # in_features: backbone feature_dim (0) or the first head layer's width (1); in the SimCLRv2
    # head both are d, so the placement itself is checked on the forward pass below
    width = model.backbone.feature_dim if selector == 0 else model.proj_head.layers[0].linear.out_features
    assert after["classifier.weight"].shape == (10, width)
    assert after["classifier.weight"].abs().sum() > 0  # trained away from its zero init
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = model.features(x)
        first = model.proj_head.layers[0](h)
        placed, other = (h, first) if selector == 0 else (first, h)
        logits = model(x)["logits"]
        torch.testing.assert_close(logits, model.classifier(placed))
        assert not torch.allclose(logits, model.classifier(other), atol=1e-4)
    # head layers from `selector` on never ran: weights and BN buffers exactly as pretrained;
    # the layers before it (and the backbone) were fine-tuned
    head = {k: v for k, v in before.items() if k.startswith("proj_head.layers.")}
    assert head
    for k, v in head.items():
        layer = int(k.split(".")[2])
        if layer >= selector:
            assert torch.equal(after[k], v), k
        elif k.endswith(("linear.weight", "running_mean")):
            assert not torch.equal(after[k], v), k
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("backbone.") and
               k.endswith("weight"))
    metrics = check_eval_outputs(run_dir, test_labels)
    assert metrics["stage"] == "finetune" and metrics["labelled_images"] == len(
        (run_dir / "labelled_subset.txt").read_text().splitlines())


def capture_loaded_models(monkeypatch, module) -> list:
    """Patch ``module.load_model`` to also record every model it returns."""
    loaded = []
    original = module.load_model

    def capture(*args, **kwargs):
        model, meta = original(*args, **kwargs)
        loaded.append(model)
        return model, meta

    monkeypatch.setattr(module, "load_model", capture)
    return loaded


@pytest.mark.fashion_mnist
@pytest.mark.parametrize("method", ["cached", "sgd"])
@pytest.mark.parametrize("scaling", ["linear", "sqrt", "none"])
def test_linear_eval_peak_lr_is_scaled_lr(pretrain_dir, data_dir, tmp_path, monkeypatch, method, scaling):
    """Both linear probes peak at ``scaled_lr(base_lr, batch_size, lr_scaling)`` and decay along
    ``optim.Schedule``: the first step's rate, read off the head's optimizer, is the scaled rate."""
    first_lrs: list[float] = []
    real_set_lr = probe.set_lr if method == "sgd" else evaluate.set_lr

    def record(optimizer, lr):
        if not first_lrs:
            first_lrs.append(lr)
        real_set_lr(optimizer, lr)

    monkeypatch.setattr(probe if method == "sgd" else evaluate, "set_lr", record)
    cfg = load_config(LinearEvalConfig, None, [*_common(data_dir, tmp_path / "run"), f"checkpoint={pretrain_dir}",
                                               f"method={method}", "epochs=1", "label_fraction=0.2",
                                               "base_lr=0.3", f"lr_scaling={scaling}"])
    probe.run_linear_eval(cfg)
    expected = {"linear": 0.3 * 32 / 256, "sqrt": 0.3 * math.sqrt(32), "none": 0.3}[scaling]
    assert first_lrs == [pytest.approx(expected, rel=1e-12)]


@pytest.mark.fashion_mnist
@pytest.mark.parametrize("method", ["cached", "sgd"])
def test_linear_eval_keeps_encoder_frozen(pretrain_dir, data_dir, test_labels, tmp_path, monkeypatch, method):
    loaded = capture_loaded_models(monkeypatch, probe)
    digest = _file_digest(pretrain_dir)
    before = _state(pretrain_dir)
    cfg = load_config(LinearEvalConfig, None, [*_common(data_dir, tmp_path / method), f"checkpoint={pretrain_dir}",
                                               f"method={method}", "epochs=2", "label_fraction=0.2"])
    probe.run_linear_eval(cfg)
    (model,) = loaded
    assert not model.training
    state = model.state_dict()
    assert state.keys() == before.keys()
    assert any(k.endswith("num_batches_tracked") for k in state)
    for k, v in before.items():  # weights, running_mean, running_var, num_batches_tracked
        assert torch.equal(state[k].cpu(), v), k
    assert _file_digest(pretrain_dir) == digest
    metrics = check_eval_outputs(tmp_path / method, test_labels)
    assert metrics["method"] == method


@pytest.mark.fashion_mnist
def test_supervised_starts_from_random_init(pretrain_dir, data_dir, test_labels, tmp_path, monkeypatch):
    initial = []

    def capture(*args, **kwargs):
        model = new_model(*args, **kwargs)
        initial.append(copy.deepcopy(model.state_dict()))
        return model

    new_model = supervised.new_model
    monkeypatch.setattr(supervised, "new_model", capture)
    cfg = load_config(SupervisedConfig, None, [*_common(data_dir, tmp_path / "sup"), "label_fraction=0.2",
                                               "max_steps=2", "warmup_epochs=0"])
    supervised.run(cfg)
    (init,) = initial
    # the same draw as a fresh model under the run's seed ...
    torch.manual_seed(cfg.seed)
    fresh = create_model(MODEL, in_chans=1, cifar_stem=True, proj_head_mode="none", ft_proj_selector=0,
                         num_classes=10).state_dict()
    assert init.keys() == fresh.keys()
    for k, v in fresh.items():
        assert torch.equal(init[k], v), k
    # ... and nothing taken from the pretrained encoder
    pretrained = _state(pretrain_dir)
    conv = [k for k in init if k.startswith("backbone.") and k.endswith("weight") and init[k].dim() == 4]
    assert conv and all(not torch.equal(init[k], pretrained[k]) for k in conv)
    # after two steps the weights are still near their random start, far from the pretrained ones
    trained = _state(tmp_path / "sup")
    dist_init = sum((trained[k] - init[k]).norm() for k in conv)
    dist_pre = sum((trained[k] - pretrained[k]).norm() for k in conv)
    assert dist_init < 0.5 * dist_pre
    check_eval_outputs(tmp_path / "sup", test_labels)


@pytest.mark.fashion_mnist
def test_knn_eval_writes_metrics(pretrain_dir, data_dir, test_labels, tmp_path):
    code = cli_main(["knn-eval", *_common(data_dir, tmp_path / "knn"), f"checkpoint={pretrain_dir}", "k=20",
                     "label_fraction=0.2"])
    assert code == 0
    metrics = check_eval_outputs(tmp_path / "knn", test_labels)
    assert metrics["stage"] == "knn-eval" and metrics["k"] == 20


def naive_knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                     k: int, temperature: float) -> torch.Tensor:
    """Weighted kNN one query at a time, in float64: cosine similarity to every bank row, the ``k``
    most similar, each voting exp(sim / temperature) for its class. Returns (N, C) scores."""
    bank, queries = bank.double(), queries.double()
    scores = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    for i, q in enumerate(queries):
        sims = sorted(((float(q @ b) / float(q.norm() * b.norm()), int(y)) for b, y in zip(bank, bank_labels)),
                      reverse=True)
        for sim, y in sims[:k]:
            scores[i, y] += math.exp(sim / temperature)
    return scores


@pytest.mark.parametrize("k", [1, 7, 40])
def test_knn_predict_matches_a_naive_loop(k):
    """Chunked queries (chunk 4 of 10), k of 1, some and more than the 30 bank rows (all of them)."""
    g = torch.Generator().manual_seed(k)
    bank, queries = torch.randn(30, 6, generator=g), torch.randn(10, 6, generator=g)
    labels = torch.randint(0, 4, (30,), generator=g)
    scores = knn_predict(bank, labels, queries, 4, k=k, temperature=0.2, chunk=4)
    torch.testing.assert_close(scores.double(), naive_knn_scores(bank, labels, queries, 4, k, 0.2), rtol=1e-5, atol=0)


PLANTED_COLOURS = {"blue": (0, 0, 1), "green": (0, 1, 0), "red": (1, 0, 0)}  # class folders, in sorted order


def make_planted_folder(root: Path, n_train: int = 8, n_test: int = 4, side: int = 16, seed: int = 0) -> Path:
    """root/<split>/<colour>/*.png: every image one colour at a random brightness, plus pixel noise."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for name, rgb in PLANTED_COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                img = np.array(rgb) * rng.uniform(120, 255) + rng.normal(0, 8, (side, side, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    return root


def read_planted(split_dir: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(N, 3, S, S) floats in [0, 1], labels and file names, class folders and files in sorted order."""
    images, labels, names = [], [], []
    for label, name in enumerate(sorted(PLANTED_COLOURS)):
        for path in sorted((split_dir / name).iterdir()):
            images.append(torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1))
            labels.append(label)
            names.append(path.name)
    return torch.stack(images).float() / 255, torch.tensor(labels), names


def test_knn_eval_on_planted_separable_images(tmp_path):
    """knn-eval through the CLI on images whose class is their colour: every test image is classified
    right, and the predictions equal a naive kNN over features extracted here from the same checkpoint."""
    data = make_planted_folder(tmp_path / "planted")
    common = ["model=r10_0.25x_sk0", "dataset=imagefolder", f"data_dir={data}", "image_size=16", "progress=false",
              "device=cpu", "num_workers=0", "seed=0"]
    pre = tmp_path / "pre"
    assert cli_main(["pretrain", *common, "batch_size=8", "max_steps=1", "knn_every=0", f"run_dir={pre}"]) == 0
    out = tmp_path / "knn"
    assert cli_main(["knn-eval", *common, f"checkpoint={pre}", "k=5", "label_fraction=1.0", f"run_dir={out}"]) == 0

    train_x, train_y, train_names = read_planted(data / "train")
    test_x, test_y, _ = read_planted(data / "test")
    subset = [line.split("\t") for line in (out / "labelled_subset.txt").read_text().splitlines()]
    assert subset == [[str(i), name] for i, name in enumerate(train_names)]  # the bank: every training image
    model = load_pretrained(pre)
    with torch.no_grad():
        train_f, test_f = model.features(train_x), model.features(test_x)
    expected = naive_knn_scores(train_f, train_y, test_f, 3, k=5, temperature=0.1).argmax(1)
    assert torch.equal(expected, test_y)  # planted: the answer is known
    assert np.load(out / "predictions.npy").tolist() == expected.tolist()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["top1"] == 100.0 and metrics["per_class_accuracy"] == [100.0] * 3
    assert metrics["confusion_matrix"] == (4 * np.eye(3, dtype=int)).tolist()


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_shared_features_extract_each_split_once_with_the_same_results(pretrain_dir, data_dir, tmp_path,
                                                                      monkeypatch):
    """The pipeline's linear eval + kNN: inside ``shared_features`` the two stages run the encoder over
    the train and test splits once each (not twice each), and give the same numbers as alone."""
    def cfgs(tag: str):
        lin = load_config(LinearEvalConfig, None, [*_common(data_dir, tmp_path / f"lin_{tag}"),
                                                   f"checkpoint={pretrain_dir}", "epochs=2"])
        knn = load_config(KnnEvalConfig, None, [*_common(data_dir, tmp_path / f"knn_{tag}"),
                                                f"checkpoint={pretrain_dir}", "k=20"])
        return lin, knn

    alone = [probe.run_linear_eval(cfgs("alone")[0]), probe.run_knn_eval(cfgs("alone")[1])]
    calls = []
    extract = probe.extract

    def counting(model, source, indices, *args, **kwargs):
        calls.append(len(indices))
        return extract(model, source, indices, *args, **kwargs)

    monkeypatch.setattr(probe, "extract", counting)
    lin, knn = cfgs("shared")
    with probe.shared_features():
        shared = [probe.run_linear_eval(lin), probe.run_knn_eval(knn)]
    assert sorted(calls) == [N_TEST, N_TRAIN]
    for a, b in zip(alone, shared):
        assert a["top1"] == b["top1"] and a["confusion_matrix"] == b["confusion_matrix"]
    # outside the block nothing is cached
    calls.clear()
    probe.run_knn_eval(cfgs("after")[1])
    assert sorted(calls) == [N_TEST, N_TRAIN]


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_distill_teacher_gets_no_gradient_and_keeps_bn_statistics(pretrain_dir, data_dir, test_labels, tmp_path,
                                                                  monkeypatch):
    """Issue 6: through the real distill stage, the teacher is never updated: no gradient reaches
    it, and its weights and BN buffers (running mean/var, batch counter) are bitwise unchanged,
    and the teacher's model file is not rewritten."""
    from simclrv2.config import DistillConfig, FinetuneConfig

    teacher_dir = tmp_path / "teacher"
    ft = load_config(FinetuneConfig, None, [*_common(data_dir, teacher_dir), f"init_checkpoint={pretrain_dir}",
                                            "label_fraction=0.2", "max_steps=2"])
    finetune.run(ft)
    loaded = capture_loaded_models(monkeypatch, distill)
    before = _state(teacher_dir)
    digest = _file_digest(teacher_dir)
    cfg = load_config(DistillConfig, None, [*_common(data_dir, tmp_path / "student"),
                                            f"teacher_checkpoint={teacher_dir}", "max_steps=3",
                                            "warmup_epochs=0", "tau=1.0"])
    result = distill.run(cfg)
    teacher = loaded[0]
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    state = teacher.state_dict()
    assert any(k.endswith("running_mean") for k in state)
    for k, v in before.items():
        assert torch.equal(state[k].cpu(), v), k
    assert _file_digest(teacher_dir) == digest
    assert result["teacher_top1"] == pytest.approx(json.loads((teacher_dir / "metrics.json").read_text())["top1"])
    check_eval_outputs(tmp_path / "student", test_labels)


@pytest.mark.fashion_mnist
@pytest.mark.parametrize("view, length, expected", [
    ("same", [], "same"),
    ("strong", [], "strong"),
    ("auto", ["epochs=1", "min_steps=0"], "same"),  # about one pass over the pool
    ("auto", ["epochs=1", "min_steps=300"], "strong"),  # 300 steps: many passes
])
def test_distill_student_view(pretrain_dir, data_dir, tmp_path, monkeypatch, view, length, expected):
    """Through the real distill stage: with ``student_view=same`` the student's input at every step is
    the teacher's; with ``strong`` it is ``student_augment`` of the same images the teacher's view was
    cut from (its own crop, flip and colour distortion), drawn from the step's generator with salt 1,
    and differs from the teacher's. ``auto`` is ``strong`` from 10 planned passes over the pool (the
    schedule's, not ``max_steps``'s, so a resumed run chooses as the whole one did)."""
    from simclrv2.config import DistillConfig, FinetuneConfig
    from simclrv2.data.augment import CropFlipAugment
    from simclrv2.engine.device import step_generator

    teacher_dir = tmp_path / "teacher"
    finetune.run(load_config(FinetuneConfig, None, [*_common(data_dir, teacher_dir), f"init_checkpoint={pretrain_dir}",
                                                    "label_fraction=0.2", "max_steps=1"]))
    seen: dict[str, list[torch.Tensor]] = {"teacher": [], "student": [], "images": []}

    def recorder(name):
        def hook(module, args):
            if module.training or name == "teacher":  # the student's evaluation passes are not steps
                seen[name].append(args[0].detach().clone())
        return hook

    load, make_student, augment = distill.load_model, distill._student, distill.augment

    def load_teacher(*args, **kwargs):
        model, meta = load(*args, **kwargs)
        model.register_forward_pre_hook(recorder("teacher"))
        return model, meta

    def student(*args, **kwargs):
        model = make_student(*args, **kwargs)
        model.register_forward_pre_hook(recorder("student"))
        return model

    def recording_augment(aug, x, *args, **kwargs):
        if isinstance(aug, CropFlipAugment):  # the teacher's view: cut from the step's stored images
            seen["images"].append(x.clone())
        return augment(aug, x, *args, **kwargs)

    monkeypatch.setattr(distill, "load_model", load_teacher)
    monkeypatch.setattr(distill, "_student", student)
    monkeypatch.setattr(distill, "augment", recording_augment)
    cfg = load_config(DistillConfig, None, [*_common(data_dir, tmp_path / "student"), f"teacher_checkpoint={teacher_dir}",
                                            "max_steps=2", "warmup_epochs=0", "tau=1.0", f"student_view={view}",
                                            "student_crop_min_scale=0.3", "student_color_strength=1.0",
                                            "channels_last=false", *length])
    metrics = distill.run(cfg, test=False)
    assert metrics["student_view"] == expected
    if view == "auto":
        assert (metrics["passes"] >= distill.STRONG_VIEW_MIN_PASSES) == (expected == "strong")
    assert len(seen["student"]) == len(seen["images"]) == 2
    for step, (t, s, x) in enumerate(zip(seen["teacher"], seen["student"], seen["images"])):
        if expected == "same":
            assert torch.equal(s, t)
            continue
        reference = distill.student_augment(cfg, t.shape[-1], "strong")(
            x, generator=step_generator(torch.device("cpu"), 0, step, salt=1))
        assert s.shape == t.shape and not torch.allclose(s, t)
        torch.testing.assert_close(s, reference)


@pytest.mark.fashion_mnist
def test_distill_warmup_keeps_its_share_when_min_steps_stretches_the_run(pretrain_dir, data_dir, tmp_path):
    """Through the real distill stage: ``epochs`` that give two steps, stretched to 300 by
    ``min_steps``, with a warmup of a fraction of a step in epochs: the warmup stretches 150-fold,
    so the first step runs well below the peak rate (unstretched it would run at the peak, where a
    random student can diverge)."""
    from simclrv2.config import DistillConfig, FinetuneConfig

    teacher_dir = tmp_path / "teacher"
    finetune.run(load_config(FinetuneConfig, None, [*_common(data_dir, teacher_dir), f"init_checkpoint={pretrain_dir}",
                                                    "label_fraction=0.2", "max_steps=1"]))
    run_dir = tmp_path / "student"
    keys = [*_common(data_dir, run_dir), f"teacher_checkpoint={teacher_dir}", "max_steps=2", "log_every=1",
            "lr_scaling=none", "base_lr=1.0", "student_view=same", "rounds=1", "channels_last=false"]
    cfg = load_config(DistillConfig, None, keys)
    pool = len(distill.training_pool(cfg, distill.open_split(cfg, cfg.train_split, torch.device("cpu"))[0]))
    steps_per_epoch = pool // cfg.batch_size
    epochs = 1.5 / steps_per_epoch  # two steps
    warmup_epochs = 0.4 / steps_per_epoch  # 0.4 steps: no warmup at all unstretched
    cfg = load_config(DistillConfig, None, [*keys, f"epochs={epochs}", "min_steps=300", f"warmup_epochs={warmup_epochs}"])
    distill.run(cfg, test=False)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    warmup = round(0.4 * 300 / 2)  # 60 steps: 0.4 steps stretched as 2 steps are to 300
    # each line's rate is its last step's: step k (from 0) of the warmup runs at k / warmup of the peak
    assert [(m["step"], m["lr"]) for m in lines[:2]] == [(1, 0.0), (2, pytest.approx(1.0 / warmup, rel=1e-6))]


@pytest.mark.parametrize("rounds, length, expected", [
    ("2", [], 2),
    ("0", ["epochs=1", "min_steps=0"], 1),  # auto, about one pass over the pool: the teacher's view, one round
    ("0", ["epochs=1", "min_steps=300"], 2),  # auto, many passes: the strong view, two rounds
])
def test_distill_rounds(pretrain_dir, data_dir, tmp_path, monkeypatch, rounds, length, expected):
    """Through the real distill stage: round 1 learns from the stage's teacher in ``run_dir/round1``,
    the last round from round 1's trained student, and the stage is scored against its own teacher;
    ``rounds=0`` takes two rounds where the student's view resolves to strong. A rerun trains
    nothing again."""
    from simclrv2.config import DistillConfig, FinetuneConfig
    from simclrv2.modelfile import load_model

    teacher_dir = tmp_path / "teacher"
    tuned = finetune.run(load_config(FinetuneConfig, None, [*_common(data_dir, teacher_dir),
                                                            f"init_checkpoint={pretrain_dir}",
                                                            "label_fraction=0.2", "max_steps=1"]))
    labellers: list[tuple[Path, torch.nn.Module]] = []
    train = distill._train

    def recording_train(cfg, teacher, *args, **kwargs):
        labellers.append((Path(cfg.run_dir), copy.deepcopy(teacher)))
        return train(cfg, teacher, *args, **kwargs)

    monkeypatch.setattr(distill, "_train", recording_train)
    student_dir = tmp_path / "student"
    cfg = load_config(DistillConfig, None, [*_common(data_dir, student_dir), f"teacher_checkpoint={teacher_dir}",
                                            "max_steps=2", "warmup_epochs=0", "tau=1.0", "student_view=auto",
                                            f"rounds={rounds}", *length])
    metrics = distill.run(cfg)
    assert metrics["rounds"] == expected
    assert [d for d, _ in labellers] == [student_dir / "round1", student_dir][2 - expected:]
    assert (student_dir / "round1").is_dir() == (expected == 2)
    # the stage is scored against the teacher it was given, whatever taught its last round
    assert metrics["teacher_top1"] == tuned["top1"]

    def same_weights(model, path):
        loaded, _ = load_model(str(path), torch.device("cpu"))
        want = loaded.state_dict()
        return all(torch.equal(v, want[k]) for k, v in model.state_dict().items())

    assert same_weights(labellers[0][1], teacher_dir)
    if expected == 2:
        first = json.loads((student_dir / "round1" / "metrics.json").read_text())
        assert metrics["earlier_rounds"] == [{"top1": first["top1"]}]
        assert first["student_view"] == metrics["student_view"] == "strong" or rounds == "2"
        assert same_weights(labellers[1][1], student_dir / "round1")
        assert not same_weights(labellers[1][1], teacher_dir)

    def checkpoints():
        return sorted((str(p), p.stat().st_mtime_ns) for p in student_dir.rglob("*")
                      if "checkpoints" in p.parts and p.is_file())

    saved = checkpoints()
    assert len({Path(p).parts[len(student_dir.parts)] for p, _ in saved}) == expected  # round1/ and checkpoints/
    assert distill.run(cfg)["top1"] == metrics["top1"]  # resumed at the last step of each round
    assert checkpoints() == saved

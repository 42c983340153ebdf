"""Stopping and resuming a run changes nothing: bitwise-equal weights on the CPU (issue 10).

Each test runs the real CLI in-process (``simclrv2.cli.main``) twice: once uninterrupted, once
stopped after ``k`` steps by ``max_steps=k`` and resumed by the same command without the cap
(``max_steps`` is a resume-safe key, and the learning-rate schedule follows ``epochs`` only).
The final checkpoints must hold bitwise-equal model weights, extra state (memory queue, EMA
encoder, online probe) and optimizer state, and the metrics files must describe the same run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclrv2 import checkpoint as ckpt
from simclrv2 import config as C
from simclrv2.cli import main
from simclrv2.config import PretrainConfig
from simclrv2.data.builtin import load_fashion_mnist
from simclrv2.engine.batches import StepPlan
from simclrv2.engine.checkpointer import Checkpointer
from simclrv2.engine.models import model_meta
from simclrv2.engine.pretrain import ContrastiveStep, OnlineProbe
from simclrv2.memory import MomentumMemory
from simclrv2.modelfile import load_model
from simclrv2.optim import build_optimizer

pytestmark = pytest.mark.fashion_mnist

# Fashion-MNIST train at batch 16: 3750 steps per epoch, so epochs=0.002 plans 8 steps; a warmup of
# 0.0008 epochs is 3 steps, so steps 3-4 of the first part run on the cosine decay, which depends
# on the planned length (8 steps, not the cap of 5).
PRETRAIN = [
    "pretrain", "model=r10_0.25x_sk0", "dataset=fashion_mnist", "batch_size=16", "epochs=0.002",
    "warmup_epochs=0.0008", "knn_every=0", "progress=false", "log_every=1", "checkpoint_every=3",
]


@pytest.fixture(autouse=True)
def one_thread():
    # one intra-op thread: bitwise comparisons within a process, and fast on a shared 2-core box
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cli(*argv: str) -> None:
    assert main(list(argv)) == 0, f"simclrv2 {' '.join(argv)} failed"


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Bitwise-equal tensors in every file of two checkpoint folders."""
    assert a.name == b.name
    for name in ("model.safetensors", "state.safetensors"):
        if not (a / name).is_file():
            assert not (b / name).is_file()
            continue
        ta, tb = ckpt.load_tensors(a / name), ckpt.load_tensors(b / name)
        assert ta.keys() == tb.keys(), name
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}: {k} differs"
    oa, ob = ckpt.load_optimizer_state(a), ckpt.load_optimizer_state(b)
    sa, sb = oa["optimizer"]["state"], ob["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k, v in sa[i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[i][k])), f"optimizer state {i}.{k}"
    assert ckpt.read_meta(a)["step"] == ckpt.read_meta(b)["step"]


def metric_lines(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("time"), rec.pop("images_per_s", None)
        out.append(rec)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("memory", [False, True], ids=["plain", "memory"])
def test_pretrain_stop_and_resume_is_bitwise_identical(tmp_path: Path, memory: bool, capsys) -> None:
    extra = ["memory.enabled=true", "memory.size=128"] if memory else []
    whole, split = tmp_path / "whole", tmp_path / "split"
    cli(*PRETRAIN, *extra, f"run_dir={whole}")
    cli(*PRETRAIN, *extra, f"run_dir={split}", "max_steps=5")
    assert ckpt.read_meta(ckpt.latest_checkpoint(split))["step"] == 5
    capsys.readouterr()
    cli(*PRETRAIN, *extra, f"run_dir={split}")  # the same command, cap removed: resumes at step 5
    assert f"resuming from {split / 'checkpoints' / 'step-00000005'} at step 5" in capsys.readouterr().err

    last_whole, last_split = ckpt.latest_checkpoint(whole), ckpt.latest_checkpoint(split)
    assert last_whole.name == "step-00000008"
    assert_same_checkpoint(last_whole, last_split)
    if memory:  # the queue was restored and kept filling: 8 steps x 32 keys wrapped a 128-slot queue
        state = ckpt.load_tensors(last_split / "state.safetensors")
        assert int(state["memory/filled"]) == 128 and state["memory/queue"].abs().sum() > 0
    # the resumed run's metrics file reads as one uninterrupted run
    assert metric_lines(whole) == metric_lines(split)
    assert [r["step"] for r in metric_lines(split)] == list(range(1, 9))


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")  # meta weights hold no values
def test_resumed_state_lives_on_each_parameters_device(tmp_path: Path) -> None:
    """Every optimizer and extra state tensor a resume restores sits on its parameter's device
    (issue 30, defect 1: the online probe's momentum came back on the CPU under a CUDA model).

    The state files are read onto the CPU; the model is moved to the ``meta`` device, so the check
    sees two devices on any machine, a GPU or not.
    """
    run = tmp_path / "run"
    args = [*PRETRAIN[1:], "memory.enabled=true", "memory.size=64", f"run_dir={run}"]
    cli("pretrain", *args, "max_steps=3")  # the online probe is on (Fashion-MNIST has labels)
    cfg = C.load_config(PretrainConfig, None, args, stage="pretrain")
    model, _ = load_model(str(run), torch.device("cpu"))
    step_module = ContrastiveStep(model, 10, probe=True).to("meta")
    optimizer = build_optimizer(cfg.optimizer, model, 1.0, cfg.weight_decay)
    probe = OnlineProbe(step_module.classifier)
    memory = MomentumMemory(model, cfg.memory.size, cfg.proj_out_dim, cfg.memory.momentum)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    plan = StepPlan.make(60000, cfg.batch_size, cfg.epochs, 0)
    checkpointer = Checkpointer("pretrain", cfg, run, plan, model, optimizer, scaler, model_meta(model),
                                {"memory": memory, "probe": probe})
    assert checkpointer.resume() == 3

    restored = {"model": 0, "probe": 0}
    for name, opt in (("model", optimizer), ("probe", probe.optimizer)):
        for p, state in opt.state.items():
            for key, v in state.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0:  # a scalar step count may stay on the host
                    assert v.device == p.device, f"{name} optimizer's {key} is on {v.device}, its parameter on {p.device}"
                    restored[name] += 1
    assert restored["model"] > 0 and restored["probe"] == 2  # the probe's weight and bias momentum
    assert memory.queue.device.type == "meta"
    assert {t.device.type for t in memory.ema_model.state_dict().values()} == {"meta"}


def make_image_folder(root: Path, n_train: int = 24, n_test: int = 4, classes: tuple[int, ...] = (0, 1),
                      side: int = 28) -> Path:
    """A small ImageNet-layout folder (root/<split>/<class>/<file>.png) of Fashion-MNIST images,
    scaled to ``side`` px."""
    ds = load_fashion_mnist("test")
    labels = ds.labels.numpy()
    for split, offset, n in (("train", 0, n_train), ("test", n_train, n_test)):
        for c in classes:
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in np.flatnonzero(labels == c)[offset : offset + n]:
                Image.fromarray(ds.images[i, 0].numpy()).resize((side, side)).save(folder / f"img{i:05d}.png")
    return root


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.mark.slow
def test_finetune_stop_and_resume_is_bitwise_identical(tmp_path: Path, image_data: Path, capsys) -> None:
    data = ["dataset=imagefolder", f"data_dir={image_data}", "image_size=16", "num_workers=0",
            "progress=false"]
    torch.set_num_threads(1)
    pre = tmp_path / "pre"
    cli("pretrain", "model=r10_0.25x_sk0", *data, "batch_size=8", "max_steps=2", "knn_every=0",
        f"run_dir={pre}")
    # 48 labelled images at batch 8: 6 steps per epoch, 1.5 epochs = 9 steps; no warmup, so every
    # step's learning rate depends on the planned length (the cosine decay)
    finetune = ["finetune", f"init_checkpoint={pre}", *data, "label_fraction=1.0", "batch_size=8",
                "epochs=1.5", "min_steps=0", "warmup_epochs=0", "log_every=1"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    cli(*finetune, f"run_dir={whole}")
    cli(*finetune, f"run_dir={split}", "max_steps=4")
    capsys.readouterr()
    cli(*finetune, f"run_dir={split}")
    assert "finetune: resuming from" in capsys.readouterr().err
    assert_same_checkpoint(ckpt.latest_checkpoint(whole), ckpt.latest_checkpoint(split))
    assert ckpt.latest_checkpoint(split).name == "step-00000009"
    assert metric_lines(whole) == metric_lines(split)
    # the evaluation after the resumed run equals the uninterrupted one
    assert np.array_equal(np.load(whole / "predictions.npy"), np.load(split / "predictions.npy"))


@pytest.mark.slow
@pytest.mark.parametrize("min_seconds, expected", [(None, [12]), ("0", list(range(1, 13)))])
def test_epoch_checkpoints_are_spaced_in_time(tmp_path, monkeypatch, min_seconds, expected):
    """checkpoint_every=0 saves at epoch ends, but not twice within checkpoint_min_seconds (30 s by
    default): 12 one-step epochs (20 labelled images, batch 16) take a few seconds, so only the last
    step is saved; checkpoint_min_seconds=0 saves at every epoch end."""
    from simclrv2.engine.checkpointer import Checkpointer

    saved = []
    real = Checkpointer.save
    monkeypatch.setattr(Checkpointer, "save", lambda self, step: (saved.append(step), real(self, step)))
    extra = [] if min_seconds is None else [f"checkpoint_min_seconds={min_seconds}"]
    cli("supervised", "model=r10_0.25x_sk0", "dataset=fashion_mnist", "label_fraction=0.0003",
        "batch_size=16", "epochs=12", "min_steps=0", "warmup_epochs=0", "progress=false", f"run_dir={tmp_path / 'run'}", *extra)
    assert saved == expected
    assert ckpt.read_meta(ckpt.latest_checkpoint(tmp_path / "run"))["step"] == 12

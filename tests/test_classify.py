"""The classifier stages' step loop (``engine.classify``), on a tiny network and synthetic images.

The loop is checked against a naive reference written out step by step: the batch each step
draws, its crop-and-flip views, cross-entropy as ``-log(softmax)`` by hand and the SGD update
``p -= lr * grad``. A run stopped and resumed from its checkpoint ends where one run ends.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from simclrv2 import checkpoint as ckpt
from simclrv2.config import SupervisedConfig
from simclrv2.data.augment import CropFlipAugment
from simclrv2.engine.batches import BatchSource, StepPlan, batch_indices
from simclrv2.engine.classify import train_classifier
from simclrv2.engine.device import step_generator

SIDE, CLASSES, SEED = 12, 3, 5


class Tiny(nn.Module):
    """A linear classifier on batch-normalised pixels: the output mapping the stages' models give."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(SIDE * SIDE)
        self.classifier = nn.Linear(SIDE * SIDE, CLASSES)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.classifier(self.norm(x.flatten(1)))}


@pytest.fixture
def source() -> BatchSource:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 1, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, CLASSES, (20,), generator=g)
    return BatchSource(SimpleNamespace(images=images, labels=labels), torch.device("cpu"), num_workers=0)


def _run(source: BatchSource, run_dir: Path, model: nn.Module, momentum: float, max_steps: int = 0) -> None:
    cfg = SupervisedConfig(run_dir=str(run_dir), device="cpu", seed=SEED, progress=False, log_every=1,
                           checkpoint_every=2)
    run_dir.mkdir(exist_ok=True)
    pool = torch.arange(2, 20)  # 18 images at batch 8: 2 steps an epoch, the last 2 images left out
    plan = StepPlan.make(len(pool), batch_size=8, epochs=3, max_steps=max_steps)
    schedule = plan.schedule(base_lr=0.5, lr_scaling="none", warmup_epochs=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=momentum)
    aug = CropFlipAugment(SIDE, crop_scale=(0.5, 1.0))
    model.eval()  # the loop must put it in train mode: BN on the batch's statistics
    train_classifier("supervised", cfg, model, model, optimizer, aug, source, pool, plan, schedule, run_dir,
                     {"model_name": "tiny"})


def test_train_classifier_takes_the_naive_steps(source: BatchSource, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tiny()
    ref = copy.deepcopy(model).train()
    _run(source, tmp_path / "run", model, momentum=0.0)

    pool = torch.arange(2, 20)
    plan = StepPlan.make(len(pool), batch_size=8, epochs=3, max_steps=0)
    schedule = plan.schedule(base_lr=0.5, lr_scaling="none", warmup_epochs=1)
    aug = CropFlipAugment(SIDE, crop_scale=(0.5, 1.0))
    losses = []
    for step in range(plan.total_steps):
        idx = batch_indices(pool, plan, SEED, step)
        views = aug(source.images[idx], generator=step_generator(torch.device("cpu"), SEED, step))
        logits = ref(views)["logits"]
        p = logits.exp() / logits.exp().sum(1, keepdim=True)
        loss = -p[torch.arange(len(idx)), source.labels[idx]].log().mean()
        grads = torch.autograd.grad(loss, list(ref.parameters()))
        with torch.no_grad():
            for w, g in zip(ref.parameters(), grads):
                w -= schedule(step) * g
        losses.append(loss.item())

    assert plan.total_steps == 6 and schedule.warmup_steps == 2
    for name, want in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], want, rtol=1e-5, atol=1e-6, msg=name)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in logged] == pytest.approx(losses, abs=1e-5)
    assert [r["lr"] for r in logged] == pytest.approx([schedule(s) for s in range(6)])
    saved = ckpt.load_tensors(ckpt.latest_checkpoint(tmp_path / "run") / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_a_run_stopped_and_resumed_ends_where_one_run_ends(source: BatchSource, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tiny()
    once, twice = copy.deepcopy(model), copy.deepcopy(model)
    _run(source, tmp_path / "once", once, momentum=0.9)
    _run(source, tmp_path / "twice", twice, momentum=0.9, max_steps=3)  # stops after step 3, saved there
    twice = copy.deepcopy(model)  # a new process: the initial weights, then the checkpoint's
    _run(source, tmp_path / "twice", twice, momentum=0.9)
    for name, want in once.state_dict().items():
        assert torch.equal(twice.state_dict()[name], want), name


def test_a_stretched_warmup_keeps_its_share_of_the_schedule() -> None:
    """``min_steps`` stretches 2 steps by epochs to 300: the warmup of 0.4 steps stays 0 unless
    ``stretch_warmup``, which stretches it 150-fold; an unstretched plan is the same either way,
    and the warmup is never more than half the schedule."""
    plan = StepPlan.make(100, batch_size=50, epochs=1.0, max_steps=0, min_steps=300)
    assert (plan.steps_per_epoch, plan.epoch_steps, plan.schedule_steps) == (2, 2, 300)
    assert plan.schedule(1.0, "none", warmup_epochs=0.2).warmup_steps == 0
    assert plan.schedule(1.0, "none", warmup_epochs=0.2, stretch_warmup=True).warmup_steps == 60
    assert plan.schedule(1.0, "none", warmup_epochs=5.0, stretch_warmup=True).warmup_steps == 150
    long = StepPlan.make(1000, batch_size=50, epochs=20.0, max_steps=0, min_steps=300)  # 400 steps: not stretched
    assert long.epoch_steps == long.schedule_steps == 400
    for stretch in (False, True):
        assert long.schedule(1.0, "none", warmup_epochs=0.5, stretch_warmup=stretch).warmup_steps == 10

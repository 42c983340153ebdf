"""The step loop of the classifier stages: cross-entropy on crop-and-flip views of labelled images.

Fine-tuning (:mod:`.finetune`) and the supervised baseline (:mod:`.supervised`) train through
:func:`train_classifier`; each stage builds its own model, chooses which parameters train and
builds the optimizer, as MAE's ``engine_finetune.train_one_epoch`` serves its fine-tuning and its
linear probe. :func:`classifier_step` is one optimisation step of that loop, public so that a
budget can time the very step the stages run.

The linear probe's ``method=sgd`` loop (:func:`.probe._linear_sgd`) stays apart: it trains a bare
head on features that a frozen encoder computes without gradients, with its own permutation per
epoch, crops drawn for the global batch and split over the ranks, and gradients summed by hand,
without checkpoints, autocast or a gradient scaler; folding it in would take a switch for each.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as dist
from ..data.augment import CropFlipAugment, SimCLRAugment
from ..optim import Schedule, set_lr
from .batches import BatchSource, StepPlan, crop_spec
from .checkpointer import Checkpointer
from .device import augment, autocast, step_generator
from .metrics import TrainLog


def training_view(cfg: Any, size: int) -> CropFlipAugment | SimCLRAugment:
    """A classifier's training view (fine-tuning, the baseline): crop and flip, colour-distorted too
    where ``cfg.color_strength`` > 0 (SimCLR's jitter and grayscale, no blur)."""
    crop = (cfg.crop_min_scale, 1.0)
    if cfg.color_strength > 0:
        return SimCLRAugment(size, color_strength=cfg.color_strength, blur=False, crop_scale=crop)
    return CropFlipAugment(size, crop_scale=crop)


def classifier_step(train_module: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    aug: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                    generator: torch.Generator | None, *, precision: str, channels_last: bool = False,
                    cropped: bool = False) -> torch.Tensor:
    """One optimizer step on a batch: views of ``x`` (``aug`` drawing from ``generator``), the
    cross-entropy of ``train_module``'s logits against ``y``, backward and update; returns the loss.

    The loss is computed under autocast (``precision``), the views in float32 outside it
    (:func:`.device.augment`); ``cropped``: ``x`` holds crops already cut by a streaming source's
    workers, which ``aug`` only flips. ``scaler`` is a pass-through unless fp16.
    """
    with autocast(x.device, precision):
        views = augment(aug, x, generator, cropped=cropped)
        if channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(train_module(views)["logits"].float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss


def train_classifier(stage: str, cfg: Any, model: nn.Module, train_module: nn.Module,
                     optimizer: torch.optim.Optimizer, aug: SimCLRAugment, source: BatchSource, pool: torch.Tensor,
                     plan: StepPlan, schedule: Schedule, run_dir: Path, meta: dict[str, Any]) -> None:
    """Train ``model`` for ``plan``'s steps on batches of ``pool`` (indices into ``source``).

    ``model`` is the unwrapped network the checkpoints hold; ``train_module`` is what runs each step
    (``model`` or a wrapper of it, under DDP or ``torch.compile``), put in train mode before each
    step, so a wrapper may keep frozen layers in eval mode. Resumes from the run folder's last
    checkpoint, logs and checkpoints as ``cfg`` says; ``stage`` names the stage in both.
    """
    device = source.device
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")  # a pass-through unless fp16
    checkpointer = Checkpointer(stage, cfg, run_dir, plan, model, optimizer, scaler, meta)
    start = checkpointer.resume()
    log = TrainLog(stage, cfg, run_dir, plan, start, device)
    batches = source.train_batches(plan.steps(pool, cfg.seed, start), crop_spec(aug), 1, cfg.seed)
    for step, (x, y) in zip(range(start, plan.total_steps), batches):
        train_module.train()
        lr = schedule(step)
        set_lr(optimizer, lr)
        loss = classifier_step(train_module, optimizer, scaler, aug, x, y, step_generator(device, cfg.seed, step),
                               precision=cfg.precision, channels_last=cfg.channels_last, cropped=source.streams)
        log.add(loss)
        done = step + 1
        if log.due(done, checkpointer.due(done)):
            log.write(done, lr)
        checkpointer.save_if_due(done)
    batches.close()  # stops the workers
    log.close(source)
    dist.barrier()

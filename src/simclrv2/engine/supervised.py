"""``simclrv2 supervised``: the baseline, the same architecture from random weights on the same labels.

It trains like fine-tuning (crop-and-flip views, cross-entropy, the same schedule and optimizer
choices), so the two differ only in where the weights start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as dist
from ..config import SupervisedConfig
from ..data.augment import CropFlipAugment
from ..optim import Schedule, build_optimizer, set_lr
from .batches import BatchSource, StepPlan, crop_spec, image_size_of, open_split
from .checkpointer import Checkpointer
from .device import augment, autocast, resolve_device, seed_everything, step_generator
from .evaluate import evaluate_stage
from .labels import labelled_subset, selection_metrics
from .metrics import TrainLog
from .models import distribute, model_meta, new_model
from .runfolder import prepare_run_dir


def run(cfg: SupervisedConfig, test: bool = True) -> dict[str, Any]:
    """Train ``model`` from random weights on the labelled subset; evaluate as fine-tuning does.

    ``test=False`` evaluates on the validation split only (a learning-rate search candidate)."""
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    run_dir = prepare_run_dir(cfg, "supervised")
    ds, source = open_split(cfg, cfg.train_split, device)
    size = image_size_of(cfg, ds)
    labelled = torch.from_numpy(labelled_subset(cfg, ds, source, size, run_dir))
    model = new_model(cfg.model, ds, size, cfg.stem, proj_head_mode="none", ft_proj_selector=0,
                      num_classes=ds.num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_module = distribute(model, device, cfg.global_bn)
    if cfg.compile:
        train_module = torch.compile(train_module)
    plan = StepPlan.make(len(labelled), cfg.batch_size, cfg.epochs, cfg.max_steps, cfg.min_steps)
    schedule = plan.schedule(cfg.base_lr, cfg.lr_scaling, cfg.warmup_epochs)
    optimizer = build_optimizer(cfg.optimizer, model, schedule.peak_lr, cfg.weight_decay)
    aug = CropFlipAugment(size, crop_scale=(cfg.crop_min_scale, 1.0))
    meta = model_meta(model, ds, image_size=size)
    _train(cfg, model, train_module, optimizer, aug, source, labelled, plan, schedule, run_dir, meta)
    metrics: dict[str, Any] = dict(stage="supervised", model=model.name, label_fraction=cfg.label_fraction,
                                   labelled_images=len(labelled), steps=plan.total_steps, peak_lr=schedule.peak_lr,
                                   **selection_metrics(cfg, ds, labelled))
    return evaluate_stage(cfg, model, ds, source, size, run_dir, metrics, test)


def _train(cfg: SupervisedConfig, model: nn.Module, train_module: nn.Module, optimizer: torch.optim.Optimizer,
           aug: CropFlipAugment, source: BatchSource, pool: torch.Tensor, plan: StepPlan, schedule: Schedule,
           run_dir: Path, meta: dict[str, Any]) -> None:
    """The step loop: cross-entropy on crop-and-flip views of the labelled images."""
    device = source.device
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")  # a pass-through unless fp16
    checkpointer = Checkpointer("supervised", cfg, run_dir, plan, model, optimizer, scaler, meta)
    start = checkpointer.resume()
    log = TrainLog("supervised", cfg, run_dir, plan, start, device)
    batches = source.train_batches(plan.steps(pool, cfg.seed, start), crop_spec(aug), 1, cfg.seed)
    for step, (x, y) in zip(range(start, plan.total_steps), batches):
        model.train()
        lr = schedule(step)
        set_lr(optimizer, lr)
        with autocast(device, cfg.precision):
            # fp32 views, outside autocast; a streaming source has cut the crops in its workers
            views = augment(aug, x, step_generator(device, cfg.seed, step), cropped=source.streams)
            if cfg.channels_last:
                views = views.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(train_module(views)["logits"].float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        log.add(loss)
        done = step + 1
        if log.due(done, checkpointer.due(done)):
            log.write(done, lr)
        checkpointer.save_if_due(done)
    batches.close()  # stops the workers
    log.close(source)
    dist.barrier()

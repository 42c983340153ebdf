"""``simclrv2 supervised``: the baseline, the same architecture from random weights on the same labels.

It trains through fine-tuning's loop (:func:`.classify.train_classifier`: crop-and-flip views,
cross-entropy) with the same schedule and optimizer choices, so the two differ only in where the
weights start. ``color_strength`` > 0 adds SimCLR's colour distortion to those views: from random
weights, a few labels of objects in random colours can teach colour alone.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import SupervisedConfig
from ..optim import build_optimizer
from .batches import StepPlan, image_size_of, open_split
from .classify import train_classifier, training_view
from .device import resolve_device, seed_everything
from .evaluate import evaluate_stage
from .labels import labelled_subset, selection_metrics
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
    aug = training_view(cfg, size)
    meta = model_meta(model, ds, image_size=size)
    train_classifier("supervised", cfg, model, train_module, optimizer, aug, source, labelled, plan, schedule,
                     run_dir, meta)
    metrics: dict[str, Any] = dict(stage="supervised", model=model.name, label_fraction=cfg.label_fraction,
                                   labelled_images=len(labelled), steps=plan.total_steps, peak_lr=schedule.peak_lr,
                                   color_strength=cfg.color_strength, num_classes=ds.num_classes,
                                   **selection_metrics(cfg, ds, labelled))
    return evaluate_stage(cfg, model, ds, source, size, run_dir, metrics, test)

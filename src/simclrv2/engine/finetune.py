"""``simclrv2 finetune``: fine-tune a pretrained model from a projection-head layer (METHOD.md 6).

The classifier sits on head layer ``ft_proj_selector`` and the whole network below it trains on
the labelled subset with crop-and-flip views (colour-distorted too where ``color_strength`` > 0:
:func:`.classify.training_view`, as the baseline's); layers the classifier does not use are frozen.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .. import checkpoint as ckpt
from .. import distributed as dist
from ..config import CommonConfig, FinetuneConfig
from ..modelfile import load_model
from ..models import SimCLRModel
from ..optim import build_optimizer
from .batches import StepPlan, image_size_of, open_split
from .classify import train_classifier, training_view
from .device import resolve_device, seed_everything
from .evaluate import evaluate_stage
from .labels import labelled_subset, selection_metrics
from .models import distribute, freeze_unused_head, model_meta
from .runfolder import RunError, prepare_run_dir


def run(cfg: FinetuneConfig, test: bool = True) -> dict[str, Any]:
    """Fine-tune ``init_checkpoint`` on the labelled subset; evaluate on the validation and test splits.

    ``test=False`` evaluates on the validation split only (a learning-rate search candidate)."""
    if not cfg.init_checkpoint:
        raise RunError("finetune needs init_checkpoint=PATH (a pretraining run folder or a model file)")
    device = resolve_device(cfg.device)  # joins the process group first, so that only rank 0 logs
    check_finetune_model(cfg)
    seed_everything(cfg.seed)
    run_dir = prepare_run_dir(cfg, "finetune")
    ds, source = open_split(cfg, cfg.train_split, device)
    size = image_size_of(cfg, ds)
    labelled = torch.from_numpy(labelled_subset(cfg, ds, source, size, run_dir))
    model, _ = load_model(cfg.init_checkpoint, device, ft_proj_selector=cfg.ft_proj_selector,
                          num_classes=ds.num_classes)
    model.reset_classifier(ds.num_classes, zero_init=cfg.zero_init_classifier)
    model.to(device)
    frozen = freeze_for_finetune(model, cfg.fine_tune_after_block)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainable = FrozenInEval(model, frozen)
    train_module = distribute(trainable, device, cfg.global_bn)
    if cfg.compile:
        train_module = torch.compile(train_module)
    plan = StepPlan.make(len(labelled), cfg.batch_size, cfg.epochs, cfg.max_steps, cfg.min_steps)
    schedule = plan.schedule(cfg.base_lr, cfg.lr_scaling, cfg.warmup_epochs)
    optimizer = build_optimizer(cfg.optimizer, trainable, schedule.peak_lr, cfg.weight_decay)
    aug = training_view(cfg, size)
    meta = model_meta(model, ds, image_size=size, init_checkpoint=cfg.init_checkpoint)
    train_classifier("finetune", cfg, model, train_module, optimizer, aug, source, labelled, plan, schedule,
                     run_dir, meta)
    metrics: dict[str, Any] = dict(stage="finetune", model=model.name, label_fraction=cfg.label_fraction,
                                   labelled_images=len(labelled), steps=plan.total_steps, peak_lr=schedule.peak_lr,
                                   color_strength=cfg.color_strength, **selection_metrics(cfg, ds, labelled))
    return evaluate_stage(cfg, model, ds, source, size, run_dir, metrics, test)


def freeze_for_finetune(model: SimCLRModel, after_block: int) -> list[nn.Module]:
    """Freeze what fine-tuning must not change; return the frozen modules.

    Head layers after the one ``ft_proj_selector`` picks never run, so they get no gradient and are
    excluded from the optimizer. ``after_block = k >= 0`` also freezes the stem and stages 1..k
    (METHOD.md 6, ``fine_tune_after_block``; 4 freezes the whole backbone).
    """
    frozen = freeze_unused_head(model)
    if after_block >= 0:
        frozen.append(model.backbone.stem)
        frozen += [getattr(model.backbone, f"layer{i}") for i in range(1, min(after_block, 4) + 1)]
    for m in frozen:
        m.requires_grad_(False)
    return frozen


class FrozenInEval(nn.Module):
    """Wraps a model so that frozen parts stay in eval mode (BN statistics fixed) during training."""

    def __init__(self, model: SimCLRModel, frozen: list[nn.Module]) -> None:
        super().__init__()
        self.model = model
        self.frozen = frozen

    def train(self, mode: bool = True) -> FrozenInEval:
        super().train(mode)
        for m in self.frozen:
            m.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(x)


def check_finetune_model(cfg: FinetuneConfig) -> None:
    """The architecture comes from ``init_checkpoint``; ``model=`` may only repeat it.

    A ``model`` other than the checkpoint's is an error, unless it is the ``CommonConfig`` default,
    which is taken as "not set" (a single-stage command without ``model=``): then one line says
    which model is used. Runs before the run folder is written.
    """
    ckpt_model = ckpt.read_model_meta(cfg.init_checkpoint).get("model_name")
    if ckpt_model is None or cfg.model == ckpt_model:
        return
    if cfg.model != CommonConfig.model:
        raise RunError(
            f"finetune: model={cfg.model} differs from the checkpoint's model {ckpt_model}; "
            f"drop model= or set model={ckpt_model}"
        )
    if dist.is_main():
        print(f"finetune: using the checkpoint's model {ckpt_model}", file=sys.stderr, flush=True)

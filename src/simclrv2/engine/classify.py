"""Stages that train a classifier: fine-tuning (METHOD.md 6), supervised baselines, distillation (METHOD.md 7).

All three share one shape: a model with a classifier, crop-and-flip views, a loss on logits, then
an evaluation on the test split that writes ``metrics.json`` and ``predictions.npy``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint as ckpt
from .. import distributed as dist
from ..config import CommonConfig, DistillConfig, FinetuneConfig, SupervisedConfig
from ..data.augment import CropFlipAugment
from ..losses import mixed_distillation_loss
from ..models import SimCLRModel
from . import loop
from .evaluate import evaluate_classifier, write_eval, write_json
from .runtime import (
    RunError,
    StepPlan,
    augment,
    autocast,
    crop_spec,
    prepare_run_dir,
    resolve_device,
    step_generator,
)
from .setup import (
    distribute,
    image_size_of,
    labelled_indices,
    load_model,
    make_optimizer,
    model_meta,
    new_model,
    open_split,
    seed_everything,
    training_pool,
    validation_indices,
)


class _Trainable(nn.Module):
    """Wraps a model so that frozen parts stay in eval mode (BN statistics fixed) during training."""

    def __init__(self, model: SimCLRModel, frozen: list[nn.Module]) -> None:
        super().__init__()
        self.model = model
        self.frozen = frozen

    def train(self, mode: bool = True) -> _Trainable:
        super().train(mode)
        for m in self.frozen:
            m.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(x)


def freeze_for_finetune(model: SimCLRModel, after_block: int) -> list[nn.Module]:
    """Freeze what fine-tuning must not change; return the frozen modules.

    Head layers after the one ``ft_proj_selector`` picks never run, so they get no gradient and are
    excluded from the optimizer. ``after_block = k >= 0`` also freezes the stem and stages 1..k
    (METHOD.md 6, ``fine_tune_after_block``; 4 freezes the whole backbone).
    """
    frozen: list[nn.Module] = []
    used = model.proj_head.resolve_index(model.ft_proj_selector)
    for j, layer in enumerate(getattr(model.proj_head, "layers", [])):
        if j >= used:
            frozen.append(layer)
    if after_block >= 0:
        frozen.append(model.backbone.stem)
        frozen += [getattr(model.backbone, f"layer{i}") for i in range(1, min(after_block, 4) + 1)]
    for m in frozen:
        m.requires_grad_(False)
    return frozen


def _train_and_evaluate(
    cfg: Any,
    stage: str,
    build: Callable[[Any, int, torch.device], tuple[SimCLRModel, list[nn.Module], dict[str, Any]]],
    make_loss: Callable[[SimCLRModel, nn.Module], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    pool_kind: str,
    extra_eval: Callable[[SimCLRModel, Any, torch.Tensor, int, torch.Tensor], dict[str, Any]] | None = None,
    test: bool = True,
) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    run_dir = prepare_run_dir(cfg, stage)
    ds, source = open_split(cfg, cfg.train_split, device)
    size = image_size_of(cfg, ds)
    labelled = torch.from_numpy(labelled_indices(cfg, ds, run_dir))
    model, frozen, meta_extra = build(ds, size, device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    wrapper = _Trainable(model, frozen)
    train_module = distribute(wrapper, device, cfg.global_bn)
    if cfg.compile:
        train_module = torch.compile(train_module)
    if pool_kind == "labelled":
        pool = labelled
        targets = source.labels
    else:  # distillation: every training image but the validation split; labels only for the subset
        pool = training_pool(cfg, ds)
        targets = torch.full_like(source.labels, -1)
        targets[labelled.to(targets.device)] = source.labels[labelled.to(targets.device)]
    plan = StepPlan.make(len(pool), cfg.batch_size, cfg.epochs, cfg.max_steps, cfg.min_steps)
    optimizer, peak_lr, warmup = make_optimizer(cfg, wrapper, plan)
    aug = CropFlipAugment(size, crop_scale=(cfg.crop_min_scale, 1.0))
    loss_of = make_loss(model, train_module)

    def loss_fn(x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # fp32, outside autocast; a streaming source has cut the crops in its workers
        views = augment(aug, x, step_generator(device, cfg.seed, step), cropped=source.streams)
        if cfg.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        return loss_of(views, y), {}

    job = loop.TrainJob(
        stage=stage, cfg=cfg, run_dir=run_dir, device=device, model=model, optimizer=optimizer,
        loss_fn=loss_fn, pool=pool, source=source, crop=crop_spec(aug), targets=targets, plan=plan,
        peak_lr=peak_lr, warmup_steps=warmup, meta=model_meta(model, ds, image_size=size, **meta_extra),
        train_modules=[wrapper],
    )
    loop.run(job)
    metrics: dict[str, Any] = dict(stage=stage, model=model.name, label_fraction=cfg.label_fraction,
                                   labelled_images=len(labelled), steps=plan.total_steps, peak_lr=peak_lr)
    val_idx = torch.from_numpy(validation_indices(cfg, ds))
    if len(val_idx):  # the split that choices are made on
        val, _ = evaluate_classifier(model, source, val_idx, size, ds.num_classes, precision=cfg.precision)
        metrics.update(val_top1=val["top1"], val_images=len(val_idx))
    if test:  # the test split: reporting only
        test_ds, test_source = open_split(cfg, cfg.test_split, device)
        test_idx = torch.arange(len(test_ds))
        tested, logits = evaluate_classifier(model, test_source, test_idx, size, test_ds.num_classes,
                                             precision=cfg.precision)
        metrics.update(tested)
        if extra_eval is not None:
            metrics.update(extra_eval(model, test_source, test_idx, size, logits))
    if dist.is_main():
        if test:
            write_eval(run_dir, metrics, logits)
        else:
            write_json(run_dir / "metrics.json", metrics)
    dist.barrier()
    return metrics


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


def run_finetune(cfg: FinetuneConfig, test: bool = True) -> dict[str, Any]:
    """Fine-tune a pretrained model from head layer ``ft_proj_selector`` (METHOD.md 6).

    ``test=False`` evaluates on the validation split only (a learning-rate search candidate)."""
    if not cfg.init_checkpoint:
        raise RunError("finetune needs init_checkpoint=PATH (a pretraining run folder or a model file)")
    resolve_device(cfg.device)  # joins the process group first, so that only rank 0 logs
    check_finetune_model(cfg)

    def build(ds: Any, size: int, device: torch.device):
        model, meta = load_model(cfg.init_checkpoint, device, ft_proj_selector=cfg.ft_proj_selector,
                                 num_classes=ds.num_classes)
        model.reset_classifier(ds.num_classes, zero_init=cfg.zero_init_classifier)
        model.to(device)
        frozen = freeze_for_finetune(model, cfg.fine_tune_after_block)
        return model, frozen, {"init_checkpoint": cfg.init_checkpoint}

    def make_loss(model: SimCLRModel, module: nn.Module):
        return lambda x, y: F.cross_entropy(module(x)["logits"].float(), y)

    return _train_and_evaluate(cfg, "finetune", build, make_loss, "labelled", test=test)


def run_supervised(cfg: SupervisedConfig, test: bool = True) -> dict[str, Any]:
    """The baseline: the same architecture from random initialisation on the same labels."""

    def build(ds: Any, size: int, device: torch.device):
        model = new_model(cfg.model, ds, size, cfg.stem, proj_head_mode="none", ft_proj_selector=0,
                          num_classes=ds.num_classes).to(device)
        return model, [], {}

    def make_loss(model: SimCLRModel, module: nn.Module):
        return lambda x, y: F.cross_entropy(module(x)["logits"].float(), y)

    return _train_and_evaluate(cfg, "supervised", build, make_loss, "labelled", test=test)


def run_distill(cfg: DistillConfig, test: bool = True) -> dict[str, Any]:
    """Distil a frozen fine-tuned teacher into a student on every training image (METHOD.md 7).

    The teacher runs in eval mode, without gradients, outside DDP, under autocast where the config
    asks for it. The student has no projection head (METHOD.md 7) and starts from random weights, or
    from ``student_init``.
    """
    if not cfg.teacher_checkpoint:
        raise RunError("distill needs teacher_checkpoint=PATH (a fine-tuned run folder or model file)")
    device = resolve_device(cfg.device)
    teacher, teacher_meta = load_model(cfg.teacher_checkpoint, device)
    if teacher.classifier is None:
        raise RunError(f"teacher '{cfg.teacher_checkpoint}' has no classifier; fine-tune it first")
    teacher.eval().requires_grad_(False)

    def build(ds: Any, size: int, dev: torch.device):
        if cfg.student_init:
            student, _ = load_model(cfg.student_init, dev, ft_proj_selector=0, num_classes=ds.num_classes)
            student.reset_classifier(ds.num_classes, zero_init=True)
        else:
            student = new_model(cfg.model, ds, size, cfg.stem, proj_head_mode="none", ft_proj_selector=0,
                                num_classes=ds.num_classes)
        return student.to(dev), [], {"teacher_checkpoint": cfg.teacher_checkpoint,
                                     "teacher_model": teacher_meta.get("model_name")}

    def make_loss(model: SimCLRModel, module: nn.Module):
        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), autocast(device, cfg.precision):
                t_logits = teacher(x)["logits"].float()
            s_logits = module(x)["logits"].float()
            return mixed_distillation_loss(s_logits, t_logits, y, cfg.tau, cfg.alpha,
                                           scale_by_tau_sq=cfg.scale_by_tau_sq)
        return loss

    def agreement(model: SimCLRModel, source: Any, idx: torch.Tensor, size: int, logits: torch.Tensor):
        t_metrics, t_logits = evaluate_classifier(teacher, source, idx, size, logits.shape[1],
                                                  precision=cfg.precision)
        agree = (t_logits.argmax(1) == logits.argmax(1)).float().mean().item() * 100
        return {"teacher_top1": t_metrics["top1"], "teacher_agreement": round(agree, 4)}

    return _train_and_evaluate(cfg, "distill", build, make_loss, "all", agreement, test=test)

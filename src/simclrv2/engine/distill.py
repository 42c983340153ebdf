"""``simclrv2 distill``: distil a frozen fine-tuned teacher into a student (METHOD.md 7).

The student learns the teacher's temperature-softened predictions on every training image but
the validation split (labels unseen), plus, with ``alpha < 1``, cross-entropy on the labelled
subset. The teacher labels a crop-and-flip view; the student learns on that view (the paper) or,
with ``student_view: strong`` (or ``auto`` over enough passes), on its own crop of the same image
with colour distortion. The teacher runs in eval mode, without gradients, outside DDP, under
autocast where the config asks for it. The student has no projection head and starts from random
weights, or from ``student_init``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed as dist
from ..config import DistillConfig
from ..data.augment import CropFlipAugment, SimCLRAugment
from ..losses import mixed_distillation_loss
from ..modelfile import load_model
from ..models import SimCLRModel
from ..optim import Schedule, build_optimizer, set_lr
from .batches import BatchSource, StepPlan, crop_spec, image_size_of, open_split
from .checkpointer import Checkpointer
from .device import augment, autocast, resolve_device, seed_everything, step_generator
from .evaluate import evaluate_stage
from .labels import labelled_subset, selection_metrics
from .metrics import TrainLog
from .models import distribute, freeze_unused_head, model_meta, new_model
from .runfolder import RunError, prepare_run_dir
from .splits import training_pool


def run(cfg: DistillConfig, test: bool = True) -> dict[str, Any]:
    """Distil ``teacher_checkpoint`` into a student; evaluate as fine-tuning does, plus agreement.

    ``test=False`` evaluates on the validation split only (a learning-rate search candidate)."""
    if not cfg.teacher_checkpoint:
        raise RunError("distill needs teacher_checkpoint=PATH (a fine-tuned run folder or model file)")
    device = resolve_device(cfg.device)
    teacher, teacher_meta = load_model(cfg.teacher_checkpoint, device)
    if teacher.classifier is None:
        raise RunError(f"teacher '{cfg.teacher_checkpoint}' has no classifier; fine-tune it first")
    _frozen(teacher)
    seed_everything(cfg.seed)
    run_dir = prepare_run_dir(cfg, "distill")
    ds, source = open_split(cfg, cfg.train_split, device)
    size = image_size_of(cfg, ds)
    labelled = torch.from_numpy(labelled_subset(cfg, ds, source, size, run_dir)).to(source.labels.device)
    student = _student(cfg, ds, size, device)
    if cfg.channels_last:
        student = student.to(memory_format=torch.channels_last)
    train_module = distribute(student, device, cfg.global_bn)
    if cfg.compile:
        train_module = torch.compile(train_module)
    pool = training_pool(cfg, ds)  # every training image but the validation split
    targets = torch.full_like(source.labels, -1)  # labels only for the labelled subset
    targets[labelled] = source.labels[labelled]
    plan = StepPlan.make(len(pool), cfg.batch_size, cfg.epochs, cfg.max_steps, cfg.min_steps)
    # a student from random weights (the default) diverges at the peak rate without a warmup: the
    # warmup keeps its share of the schedule when min_steps stretches the run
    schedule = plan.schedule(cfg.base_lr, cfg.lr_scaling, cfg.warmup_epochs, stretch_warmup=True)
    optimizer = build_optimizer(cfg.optimizer, student, schedule.peak_lr, cfg.weight_decay)
    aug = CropFlipAugment(size, crop_scale=(cfg.crop_min_scale, 1.0))
    passes = plan.schedule_steps * plan.global_batch / len(pool)  # the planned length: resume-safe
    view = student_view_for(cfg, passes)
    student_aug = student_augment(cfg, size, view)
    rounds = rounds_for(cfg, view)
    configs = earlier_rounds(cfg, rounds, view)
    earlier = [run(c, test) for c in configs]  # each in its own folder, resumed on its own
    # the last round learns from the round before it; the stage's teacher stays the one it is scored against
    labeller = _frozen(load_model(configs[-1].run_dir, device)[0]) if configs else teacher
    meta = model_meta(student, ds, image_size=size, teacher_checkpoint=cfg.teacher_checkpoint,
                      teacher_model=teacher_meta.get("model_name"))
    _train(cfg, labeller, student, train_module, optimizer, (aug, student_aug), source, pool, targets, plan, schedule,
           run_dir, meta)
    metrics: dict[str, Any] = dict(stage="distill", model=student.name, label_fraction=cfg.label_fraction,
                                   labelled_images=len(labelled), steps=plan.total_steps, peak_lr=schedule.peak_lr,
                                   student_view=view, passes=round(passes, 2), rounds=rounds,
                                   **selection_metrics(cfg, ds, labelled.cpu()))
    if earlier:  # each earlier round's student, scored as the last one is
        metrics["earlier_rounds"] = [{k: m[k] for k in ("top1", "val_top1") if k in m} for m in earlier]
    return evaluate_stage(cfg, student, ds, source, size, run_dir, metrics, test, teacher=teacher)


def _frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


# ``rounds: 0`` (auto) iterates a noisy student once: with the strong view, a second round from the
# first round's student gained 0.35 / 1.35 / 3.20 points on the tuning folder's three draws, where one
# round of twice the steps gained 0.50 / -0.45 / 0.20 and a third round lost 1.05 on the first draw
# (docs/EXPERIMENTS.md, "Few labels: a noisy student, iterated").
AUTO_STRONG_ROUNDS = 2


def rounds_for(cfg: DistillConfig, view: str) -> int:
    """The config's ``rounds``, or for 0 (auto) ``AUTO_STRONG_ROUNDS`` where the student's view is
    strong, else 1."""
    if cfg.rounds > 0:
        return cfg.rounds
    return AUTO_STRONG_ROUNDS if view == "strong" else 1


def earlier_rounds(cfg: DistillConfig, rounds: int, view: str) -> list[DistillConfig]:
    """The configs of every round but the last, in ``run_dir/round<k>``: round 1 learns from the
    stage's teacher, round k from round k-1's student; each trains as the stage does, on the view
    the stage resolved."""
    configs: list[DistillConfig] = []
    for k in range(1, rounds):
        teacher = configs[-1].run_dir if configs else cfg.teacher_checkpoint
        configs.append(dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir) / f"round{k}"), rounds=1,
                                           student_view=view, teacher_checkpoint=teacher))
    return configs


# ``student_view: auto`` takes the strong view from this many passes over the pool. A student on a
# harder view than its teacher's needs many passes to profit: on the tuning folder (docs/
# EXPERIMENTS.md, "Few labels: a noisy student") it lost 2.35-12.85 points at 2.6 passes, moved by
# -0.10 to +1.70 at 9.6 and gained 1.85-2.70 at 38; on the demo's 1.8 passes over 54,000 images it
# ended about 1.5 points lower against its teacher.
STRONG_VIEW_MIN_PASSES = 10.0


def student_view_for(cfg: DistillConfig, passes: float) -> str:
    """``same`` or ``strong``: the config's, or for ``auto`` strong from ``STRONG_VIEW_MIN_PASSES``
    passes over the pool (the distillation's planned steps times its global batch, over the pool)."""
    if cfg.student_view != "auto":
        return cfg.student_view
    return "strong" if passes >= STRONG_VIEW_MIN_PASSES else "same"


def student_augment(cfg: DistillConfig, size: int, view: str) -> SimCLRAugment | None:
    """The student's own view for ``student_view: strong``: a crop of the image from
    ``student_crop_min_scale`` of it (not of the teacher's view: a crop of a 28 px view resized back
    up is blurred), a flip, and SimCLR's colour distortion at ``student_color_strength`` (no blur).
    ``None`` for ``same``: the student sees the teacher's view."""
    if view == "same":
        return None
    return SimCLRAugment(size, color_strength=cfg.student_color_strength, blur=False,
                         crop_scale=(cfg.student_crop_min_scale, 1.0))


def _student(cfg: DistillConfig, ds: Any, size: int, device: torch.device) -> SimCLRModel:
    """A student with a zero-initialised classifier on the features: ``student_init``'s weights (its
    head, if it has one, frozen: it never runs), or new ones without a head."""
    if cfg.student_init:
        student, _ = load_model(cfg.student_init, device, ft_proj_selector=0, num_classes=ds.num_classes)
        student.reset_classifier(ds.num_classes, zero_init=True)
        freeze_unused_head(student)  # the classifier sits on h: the init's head never runs
    else:
        student = new_model(cfg.model, ds, size, cfg.stem, proj_head_mode="none", ft_proj_selector=0,
                            num_classes=ds.num_classes)
    return student.to(device)


def _train(cfg: DistillConfig, teacher: nn.Module, student: nn.Module, train_module: nn.Module,
           optimizer: torch.optim.Optimizer, augs: tuple[CropFlipAugment, SimCLRAugment | None],
           source: BatchSource, pool: torch.Tensor, targets: torch.Tensor, plan: StepPlan, schedule: Schedule, run_dir: Path, meta: dict[str, Any]) -> None:
    """The step loop: the teacher's soft labels (and the labelled subset's labels) on crop-and-flip views.

    ``augs``: the crop-and-flip view the teacher labels, and the student's own view of the same
    image (``None``: the student sees the teacher's view). ``targets`` holds each training image's
    label, -1 where the student may not see it.
    """
    aug, student_aug = augs
    device = source.device
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")  # a pass-through unless fp16
    checkpointer = Checkpointer("distill", cfg, run_dir, plan, student, optimizer, scaler, meta)
    start = checkpointer.resume()
    log = TrainLog("distill", cfg, run_dir, plan, start, device)
    # a streaming source cuts both crops in its workers: the teacher's, then the student's
    crops = crop_spec(aug) if student_aug is None else (crop_spec(aug), crop_spec(student_aug))
    batches = source.train_batches(plan.steps(pool, cfg.seed, start), crops, 1 if student_aug is None else 2, cfg.seed,
                                   targets)
    for step, (x, y) in zip(range(start, plan.total_steps), batches):
        student.train()
        lr = schedule(step)
        set_lr(optimizer, lr)
        with autocast(device, cfg.precision):
            # fp32 views, outside autocast; a streaming source has cut the crops in its workers
            x_teacher, x_student = (x, x) if student_aug is None or not source.streams else x.chunk(2)
            views = augment(aug, x_teacher, step_generator(device, cfg.seed, step), cropped=source.streams)
            if cfg.channels_last:
                views = views.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                t_logits = teacher(views)["logits"].float()
            if student_aug is not None:  # its own draw (salt 1), so the two views' parameters differ
                views = augment(student_aug, x_student, step_generator(device, cfg.seed, step, salt=1),
                                cropped=source.streams)
                if cfg.channels_last:
                    views = views.contiguous(memory_format=torch.channels_last)
            s_logits = train_module(views)["logits"].float()
            loss = mixed_distillation_loss(s_logits, t_logits, y, cfg.tau, cfg.alpha,
                                           scale_by_tau_sq=cfg.scale_by_tau_sq)
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

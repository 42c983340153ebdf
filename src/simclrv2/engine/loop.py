"""The step loop shared by every training stage: schedule, step, log, checkpoint, resume."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .. import checkpoint as ckpt
from .. import distributed as dist
from ..data.decode import CropSpec
from ..optim import lr_at, set_lr
from .progress import Progress
from .runtime import MetricsLogger, RunError, StepPlan, autocast, batch_indices, set_aside_previous_run


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


LossFn = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class TrainJob:
    """Everything the loop needs; the stage builds it and keeps the meaning of the loss."""

    stage: str
    cfg: Any
    run_dir: Path
    device: torch.device
    model: nn.Module  # unwrapped model: its state_dict is the checkpoint's model.safetensors
    optimizer: torch.optim.Optimizer  # the model's: the loop sets its learning rate each step
    loss_fn: LossFn  # (uint8 images, labels, step) -> (loss, stats)
    pool: torch.Tensor  # dataset indices this stage trains on
    source: Any  # BatchSource
    crop: CropSpec  # the view's random resized crop, cut in workers when the source streams
    plan: StepPlan
    peak_lr: float
    warmup_steps: int
    meta: dict[str, Any] = field(default_factory=dict)  # model name/config etc. for meta.json
    extra_state: dict[str, Stateful] = field(default_factory=dict)  # memory, online probe, ...
    after_step: Callable[[int], None] | None = None  # e.g. the memory's EMA update
    on_epoch_end: Callable[[int, int], dict[str, float]] | None = None  # (epoch, step) -> metrics
    train_modules: list[nn.Module] = field(default_factory=list)  # set to train() each step
    views: int = 1  # views of each image a streaming source cuts (2 for contrastive pairs)
    targets: torch.Tensor | None = None  # labels the stage may see (-1: unlabeled); None = the dataset's
    # optimizers of other parameters that the same loss trains (the online probe's), each with its
    # own learning rate; the loop steps them after ``optimizer``, through the gradient scaler under
    # fp16, and ``extra_state`` saves their state
    extra_optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    scaler: torch.amp.GradScaler | None = None  # set by run() for precision=fp16
    # training seconds before this process: read from the checkpoint resumed from, and carried on
    # in each new checkpoint's meta.json as train_seconds, so a resumed run reports its whole time
    resumed_seconds: float = 0.0
    started: float = field(default_factory=time.time)


# Extra state lives in one safetensors file under keys "<name>/<key>" ("<name>/<sub>/<key>" for
# nested dicts). "/" separates levels because the state's own keys hold dots (a memory's
# "ema_model.backbone.stem.conv1.weight"), which must come back unsplit.
_SEP = "/"


def _flatten(prefix: str, state: dict[str, Any], out: dict[str, torch.Tensor]) -> None:
    for k, v in state.items():
        key = f"{prefix}{_SEP}{k}"
        if isinstance(v, torch.Tensor):
            out[key] = v
        elif isinstance(v, (int, float)):
            out[key] = torch.tensor(v)
        elif isinstance(v, dict):
            _flatten(key, v, out)
        else:
            raise TypeError(f"state entry {key} of type {type(v).__name__} is not a tensor")


def _unflatten(prefix: str, flat: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The inverse of :func:`_flatten` for one top-level name."""
    out: dict[str, Any] = {}
    for k, v in flat.items():
        if not k.startswith(prefix + _SEP):
            continue
        parts = k[len(prefix) + 1 :].split(_SEP)
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def save(job: TrainJob, step: int, epoch: float) -> None:
    if not dist.is_main():
        return
    extra: dict[str, torch.Tensor] = {}
    for name, obj in job.extra_state.items():
        _flatten(name, obj.state_dict(), extra)
    state: dict[str, Any] = {"optimizer": job.optimizer.state_dict()}
    if job.scaler is not None:  # its scale and growth tracker: a resumed fp16 run scales as an uninterrupted one
        state["scaler"] = job.scaler.state_dict()
    ckpt.save_checkpoint(
        job.run_dir, step, job.model.state_dict(),
        meta=dict(job.meta, stage=job.stage, epoch=epoch, config=_cfg_dict(job.cfg),
                  train_seconds=round(job.resumed_seconds + time.time() - job.started, 2)),
        extra_tensors=extra, optimizer_state=state, keep=job.cfg.keep_checkpoints,
    )


def _cfg_dict(cfg: Any) -> dict[str, Any]:
    from ..config import to_dict

    return to_dict(cfg)


def try_resume(job: TrainJob) -> int:
    """Load the run folder's newest checkpoint that verifies; return the step to continue from.

    A checkpoint whose files do not match their recorded checksums is skipped, with one line that
    names it, and left on disk (the run writes that step again when it gets there).
    """
    if not job.cfg.resume:
        return 0
    last, damaged = ckpt.newest_sound_checkpoint(job.run_dir)
    if last is None:
        if damaged:
            raise RunError(f"no checkpoint in '{job.run_dir / 'checkpoints'}' verifies ({damaged[0][1]}); "
                           "use resume=false to start over (the damaged checkpoints are set aside)")
        return 0
    if damaged and dist.is_main():
        names = ", ".join(bad.name for bad, _ in damaged)
        why = damaged[0][1].split(";")[0]  # the file and what is wrong with it, without the advice
        print(f"{job.stage}: newer checkpoint {names} failed verification ({why}); falling back to the "
              f"newest one that verifies, {last.name}", file=sys.stderr, flush=True)
    meta = ckpt.read_meta(last)
    if meta.get("model_name") != job.meta.get("model_name") or meta.get("stage") != job.stage:
        raise RunError(
            f"checkpoint '{last}' is a {meta.get('stage')} run of {meta.get('model_name')}, not a "
            f"{job.stage} run of {job.meta.get('model_name')}; use a new run_dir or resume=false"
        )
    state = ckpt.load_tensors(last / "model.safetensors")
    try:
        job.model.load_state_dict(state)
    except RuntimeError as e:
        raise RunError(f"checkpoint '{last}' does not fit this model ({str(e).splitlines()[0]})") from e
    opt = ckpt.load_optimizer_state(last)
    try:
        if opt is not None:
            job.optimizer.load_state_dict(opt["optimizer"])
            if job.scaler is not None and "scaler" in opt:
                job.scaler.load_state_dict(opt["scaler"])
        extra_path = last / "state.safetensors"
        if extra_path.is_file():
            flat = ckpt.load_tensors(extra_path)
            for name, obj in job.extra_state.items():
                obj.load_state_dict(_unflatten(name, flat))
    except (ValueError, KeyError, RuntimeError) as e:  # torch's messages for a state of another shape
        raise RunError(
            f"the optimizer or training state in '{last}' does not fit this run ({str(e).splitlines()[0]}); "
            "it was written by another simclrv2 version or setup: use a new run_dir, or resume=false"
        ) from e
    step = int(meta["step"])
    job.resumed_seconds = float(meta.get("train_seconds", 0.0))
    if dist.is_main():
        # one line per restart; tests/test_reliability.py parses it to check where a run resumed
        print(f"{job.stage}: resuming from {last} at step {step}", file=sys.stderr, flush=True)
    return step


def _weights_finite(model: nn.Module) -> bool:
    """One host sync per checkpoint: are all floating-point weights and buffers finite?"""
    flags = [torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _raise_non_finite(job: TrainJob, done: int, what: str) -> None:
    kept = ckpt.latest_checkpoint(job.run_dir)
    raise RunError(
        f"{job.stage}: the {what} became non-finite before step {done}; "
        + (f"the last good checkpoint '{kept}' is kept" if kept else "no checkpoint was written")
        + "; lower the learning rate (base_lr) or use precision=fp32"
    )


def run(job: TrainJob) -> dict[str, Any]:
    """Train from the last checkpoint (or step 0) to ``plan.total_steps``; return the last metrics."""
    cfg, plan = job.cfg, job.plan
    if not cfg.resume and dist.is_main():
        set_aside_previous_run(job.run_dir)  # starting over: keep, but never resume, the old run
    job.started = time.time()
    # fp16: the loss is scaled before backward, so every gradient of the step is scaled, and every
    # optimizer steps through the scaler, which unscales it (skipping the step on inf/NaN)
    job.scaler = torch.amp.GradScaler(job.device.type) if cfg.precision == "fp16" else None
    optimizers = [job.optimizer, *job.extra_optimizers]
    start = try_resume(job)
    logger = MetricsLogger(job.run_dir, resume_step=start)
    every = cfg.checkpoint_every or plan.steps_per_epoch
    # epoch-end checkpoints at most every checkpoint_min_seconds: with 60 labelled images an epoch
    # is one step, and a checkpoint per step cost a third of a short fine-tuning run
    min_gap = 0.0 if cfg.checkpoint_every else cfg.checkpoint_min_seconds
    last_save = time.time()
    progress = Progress(job.stage, cfg.progress, plan.total_steps, start, cfg.log_every, enabled=dist.is_main())
    finite = torch.ones((), dtype=torch.bool, device=job.device)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    last: dict[str, Any] = {}
    t0 = time.time()
    steps = range(start, plan.total_steps)
    batches = job.source.train_batches(
        ((step, batch_indices(job.pool, plan, cfg.seed, step)) for step in steps),
        job.crop, job.views, cfg.seed, job.targets,
    )
    for step, (x, y) in zip(steps, batches):
        for m in job.train_modules:
            m.train()
        # the schedule follows the planned length, so a max_steps cap does not reshape it
        lr = lr_at(step, plan.schedule_steps, job.warmup_steps, job.peak_lr)
        set_lr(job.optimizer, lr)
        with autocast(job.device, cfg.precision):
            loss, stats = job.loss_fn(x, y, step)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if job.scaler is not None:
            job.scaler.scale(loss).backward()
            for opt in optimizers:
                job.scaler.step(opt)
            job.scaler.update()  # once per step, after every optimizer (torch's AMP recipe)
        else:
            loss.backward()
            for opt in optimizers:
                opt.step()
        if job.after_step is not None:
            job.after_step(step)
        # no host sync per step: flags and sums stay on the device until a log line
        finite &= torch.isfinite(loss.detach())
        for k, v in dict(stats, loss=loss.detach()).items():
            sums[k] = sums.get(k, 0) + v.float()
        count += 1
        done = step + 1
        progress.step()
        boundary = done % every == 0 or done == plan.total_steps
        if done % cfg.log_every == 0 or boundary:
            if not bool(finite):  # checked before any save: non-finite values never reach disk
                _raise_non_finite(job, done, "loss")
            last = {k: round(float(v) / count, 6) for k, v in sums.items()}
            rec = dict(step=done, epoch=round(done / plan.steps_per_epoch, 4), lr=lr, **last)
            rec["images_per_s"] = round(count * plan.global_batch / max(time.time() - t0, 1e-9), 1)
            logger.log(rec)
            progress.metrics(done, last["loss"], lr, rec["images_per_s"])
            sums, count, t0 = {}, 0, time.time()
        if done % plan.steps_per_epoch == 0 and job.on_epoch_end is not None:
            extra = job.on_epoch_end(done // plan.steps_per_epoch, done)
            if extra:
                logger.log(dict(step=done, epoch=done / plan.steps_per_epoch, **extra))
                last.update(extra)
        if boundary:
            if not _weights_finite(job.model):  # a finite loss can still come with an overflowing update
                _raise_non_finite(job, done, "weights")
            if done == plan.total_steps or time.time() - last_save >= min_gap:
                save(job, done, done / plan.steps_per_epoch)
                last_save = time.time()
    batches.close()  # stops the workers
    if job.source.replaced:
        last["bad_images"] = len(job.source.replaced)
        if dist.is_main():
            print(f"{job.stage}: {len(job.source.replaced)} unusable image(s) were replaced by the next one "
                  "(skip_bad_images; the workers' warnings name them)", file=sys.stderr, flush=True)
    progress.close()
    logger.close()
    dist.barrier()
    return last

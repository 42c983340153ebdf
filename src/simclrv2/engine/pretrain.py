"""``simclrv2 pretrain``: contrastive pretraining (METHOD.md 3-5).

Two augmented views of each image, NT-Xent over the global batch (plus the memory queue's
negatives when it is on), LARS, warmup then cosine. An online linear probe on detached features
and a kNN monitor on the validation split show progress without shaping the representation.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as dist
from ..config import PretrainConfig
from ..data.augment import SimCLRAugment
from ..data.base import ImageDataset
from ..losses import nt_xent
from ..memory import MomentumMemory
from ..optim import Schedule, build_optimizer, set_lr
from . import deadline, gradcache
from .batches import BatchSource, StepPlan, crop_spec, image_size_of, open_split
from .checkpointer import Checkpointer
from .deadline import ScheduleCuts
from .device import (
    augment,
    autocast,
    choose_precision,
    grad_scaler,
    resolve_device,
    seed_everything,
    step_generator,
)
from .evaluate import extract, knn_monitor_indices, knn_predict_sharded
from .metrics import TrainLog
from .models import distribute, model_meta, new_model
from .runfolder import prepare_run_dir, write_json
from .splits import has_test_split, training_pool, validation_indices


def run(cfg: PretrainConfig) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    run_dir = prepare_run_dir(cfg, "pretrain")
    ds, source = open_split(cfg, cfg.train_split, device)
    pool = training_pool(cfg, ds)  # never the validation split
    plan = StepPlan.make(len(pool), cfg.batch_size, cfg.epochs, cfg.max_steps)
    schedule = plan.schedule(cfg.base_lr, cfg.lr_scaling, cfg.warmup_epochs)
    p = build_parts(cfg, ds, source, schedule.peak_lr, device)
    views_shape = (2 * plan.local_batch, ds.channels, p.size, p.size)
    cfg, precision = resolve_precision(cfg, run_dir, p, views_shape, device)
    if cfg.knn_every > 0 and bool((ds.labels >= 0).any()):
        p.monitor = KnnMonitor.make(cfg, ds, source, pool, device)
    meta = model_meta(p.model, ds, image_size=p.size)
    last = _train(cfg, p, run_dir, pool, plan, schedule, meta, device)
    summary = {"stage": "pretrain", "steps": plan.total_steps, "peak_lr": schedule.peak_lr,
               "global_batch": plan.global_batch, "precision": precision["precision"],
               "precision_reason": precision["reason"], **last}
    write_json(run_dir / "summary.json", summary)
    dist.barrier()
    return summary


def build_parts(cfg: PretrainConfig, ds: ImageDataset, source: BatchSource, peak_lr: float,
                device: torch.device) -> PretrainParts:
    """The model, its step module (DDP, torch.compile), optimizer, probe, memory and augmentation
    of a run (no kNN monitor); also what the budget and the benchmarks time. The model's initial
    weights are drawn from torch's global generator."""
    size = image_size_of(cfg, ds)
    model = new_model(
        cfg.model, ds, size, cfg.stem, proj_head_mode=cfg.proj_head_mode, num_proj_layers=cfg.num_proj_layers,
        proj_out_dim=cfg.proj_out_dim, ft_proj_selector=-1, num_classes=0,
    ).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    labelled = bool((ds.labels >= 0).any())
    step_module = ContrastiveStep(model, max(ds.num_classes, 1), cfg.online_probe and labelled).to(device)
    train_module = distribute(step_module, device, cfg.global_bn)
    if cfg.compile:
        train_module = torch.compile(train_module)
    optimizer = build_optimizer(cfg.optimizer, model, peak_lr, cfg.weight_decay)
    probe = OnlineProbe(step_module.classifier) if step_module.classifier is not None else None
    aug = SimCLRAugment(
        size, color_strength=cfg.color_strength, blur=cfg.blur, crop_scale=(cfg.crop_min_scale, 1.0)
    )
    memory = (
        MomentumMemory(model, cfg.memory.size, cfg.proj_out_dim, cfg.memory.momentum)
        if cfg.memory.enabled else None
    )
    return PretrainParts(model, step_module, train_module, optimizer, probe, memory, aug, source, None, size)


def resolve_precision(cfg: PretrainConfig, run_dir: Path, p: PretrainParts, views_shape: tuple[int, ...],
                      device: torch.device, keep: bool = True) -> tuple[PretrainConfig, dict[str, Any]]:
    """``cfg`` with the precision the run trains in (``auto``: the one measured on ``p``'s step
    module with views of ``views_shape``, or kept in ``run_dir``), and the record of why
    (:func:`~simclrv2.engine.device.choose_precision`; ``keep=False`` writes no record). The run's
    config.yaml keeps ``auto``."""
    precision = choose_precision(cfg.precision, run_dir, p.step_module, views_shape, device, cfg.channels_last,
                                 keep=keep)
    return dataclasses.replace(cfg, precision=precision["precision"]), precision


@dataclass
class PretrainParts:
    """What one pretraining step touches, built by :func:`run`."""

    model: nn.Module  # the encoder + head, unwrapped: the checkpoint's weights
    step_module: ContrastiveStep  # model + online probe
    train_module: nn.Module  # step_module, under DDP and torch.compile when asked for
    optimizer: torch.optim.Optimizer  # the model's (LARS by default)
    probe: OnlineProbe | None
    memory: MomentumMemory | None
    aug: SimCLRAugment
    source: BatchSource
    monitor: KnnMonitor | None
    size: int  # training resolution


def _train(cfg: PretrainConfig, p: PretrainParts, run_dir: Path, pool: torch.Tensor, plan: StepPlan,
           schedule: Schedule, meta: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The step loop, from the newest checkpoint (or step 0) to ``plan.total_steps``, which a
    :mod:`~simclrv2.engine.deadline` may shorten (``plan`` then holds the new length)."""
    scaler = grad_scaler(cfg.precision, device)
    cuts = ScheduleCuts(schedule)
    extra = {name: obj for name, obj in (("memory", p.memory), ("probe", p.probe)) if obj is not None}
    checkpointer = Checkpointer("pretrain", cfg, run_dir, plan, p.model, p.optimizer, scaler, meta,
                                dict(extra, schedule=cuts))
    start = checkpointer.resume()
    schedule = cuts.schedule  # a resumed run that was cut goes on with the shortened schedule
    plan.total_steps = min(plan.total_steps, schedule.end)  # and a max_steps cap below its end holds
    log = TrainLog("pretrain", cfg, run_dir, plan, start, device)
    clock = _Clock(deadline.current(), start, plan.total_steps)
    batches = p.source.train_batches(plan.steps(pool, cfg.seed, start), crop_spec(p.aug), 2, cfg.seed)
    for step, (x, y) in zip(range(start, plan.total_steps), batches):
        lr = schedule(step)
        views = contrastive_views(cfg, p, x, step_generator(device, cfg.seed, step))
        loss, stats = train_step(cfg, p, views, y, lr, scaler)
        log.add(loss, stats)
        done = step + 1
        if log.due(done, checkpointer.due(done)):
            log.write(done, lr)
        if plan.is_epoch_end(done) and p.monitor is not None:
            log.extra(done, p.monitor.measure(p.model, done // plan.steps_per_epoch, done == plan.total_steps))
        total = clock.steps_that_fit(done, plan, schedule)
        if total < plan.total_steps:
            schedule = cuts.schedule = schedule.shorten(done, total)
            plan.total_steps = total
            log.shorten(total)
        checkpointer.save_if_due(done)
        if done >= plan.total_steps:
            break
    batches.close()  # stops the workers
    last = log.close(p.source)
    clock.close(plan, schedule)
    if start:  # resumed: this run's seconds cover only the steps after it (the budget's pace skips it)
        last["resumed_at"] = start
    if schedule.shortened:
        last["shortened"] = {"planned_epochs": schedule.total_steps / plan.steps_per_epoch,
                             "epochs": plan.total_steps / plan.steps_per_epoch,
                             "cuts": [list(c) for c in schedule.shortened]}
    dist.barrier()
    return last


class _Clock:
    """The pace of this process's recent steps, and the deadline's answer to it at epoch ends."""

    def __init__(self, end: deadline.Deadline | None, start: int, planned: int) -> None:
        self.deadline, self.start, self.planned = end, start, planned
        self.marks = [(start, time.time())]  # (steps done, time) at each epoch end
        self.cuts = 0

    def steps_that_fit(self, done: int, plan: StepPlan, schedule: Schedule) -> int:
        """``plan.total_steps``, or fewer where the deadline says so. Asked at epoch ends past the
        warmup, at the pace of the last tenth of the steps planned at the start (at least an
        epoch): recent enough to see a machine slow down, long enough not to chase one slow step.
        Rank 0 answers for every process."""
        if self.deadline is None or not plan.is_epoch_end(done):
            return plan.total_steps
        now = time.time()
        self.marks.append((done, now))
        window = max(plan.steps_per_epoch, (self.planned - self.start) // 10)
        if done >= plan.total_steps or done < schedule.warmup_steps or done - self.start < window:
            return plan.total_steps
        total = plan.total_steps
        if dist.is_main():
            since, then = next((d, t) for d, t in reversed(self.marks) if done - d >= window)
            pace = (now - then) / (done - since)
            total = self.deadline.steps_that_fit(done, plan.total_steps, pace, plan.steps_per_epoch, now)
            if total < plan.total_steps and not self.cuts:  # later cuts: one line at the end (close)
                print(f"pretrain: {pace * plan.steps_per_epoch:.1f} s an epoch where the budget measured "
                      f"{self.deadline.epoch_seconds:.1f}; ending at epoch {total / plan.steps_per_epoch:.2f} "
                      f"instead of {plan.total_steps / plan.steps_per_epoch:.2f} to end within budget_minutes",
                      file=sys.stderr, flush=True)
        total = dist.broadcast_object(total)
        self.cuts += total < plan.total_steps
        return total

    def close(self, plan: StepPlan, schedule: Schedule) -> None:
        if self.cuts > 1 and dist.is_main():
            print(f"pretrain: ended at epoch {plan.total_steps / plan.steps_per_epoch:.2f} of the "
                  f"{schedule.total_steps / plan.steps_per_epoch:.2f} planned, cut {self.cuts} times as the "
                  "pace kept falling, to end within budget_minutes", file=sys.stderr, flush=True)


def train_step(cfg: PretrainConfig, p: PretrainParts, views: torch.Tensor, y: torch.Tensor, lr: float,
               scaler: torch.amp.GradScaler) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step on a batch's views (:func:`contrastive_views`): the step loop's body. The
    loss and backward run in one pass, or with ``chunk_size`` through the gradient cache.

    Returns the loss and its statistics, still on the device (the loop syncs only to log).
    The budget (simclrv2.budget), benchmarks/throughput.py, gpu_benchmark.py and gradcache_memory.py
    time this function on parts from :func:`build_parts`, not a copy.
    """
    p.step_module.train()
    set_lr(p.optimizer, lr)
    optimizers = [p.optimizer] + ([p.probe.optimizer] if p.probe is not None else [])
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if cfg.chunk_size > 0:  # forward and backward through the gradient cache
        loss, stats, keys = chunked_contrastive_step(cfg, p, views, y, scaler)
    else:
        with autocast(views.device, cfg.precision):
            loss, stats, keys = contrastive_loss(cfg, p, views, y)
        scaler.scale(loss).backward()
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()  # once per step, after every optimizer (torch's AMP recipe)
    if p.memory is not None:
        p.memory.update_ema(p.model)
        p.memory.enqueue(keys)
    return loss, stats


def contrastive_views(cfg: PretrainConfig, p: PretrainParts, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """(2N, C, S, S) float32 views of one batch, view 1 then view 2.

    ``x`` is (N, C, H, W) stored images, of which two independent views are made here, or, from a
    streaming source, (2N, C, S, S) crops already cut in the workers, view 1 then view 2.
    """
    if p.source.streams:
        views = augment(p.aug, x, g, cropped=True)
    else:
        views = torch.cat([augment(p.aug, x, g), augment(p.aug, x, g)])
    if cfg.channels_last:
        views = views.contiguous(memory_format=torch.channels_last)
    return views


def contrastive_loss(cfg: PretrainConfig, p: PretrainParts, views: torch.Tensor, y: torch.Tensor,
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """(loss, statistics, the memory's keys of this batch) for one batch's ``views`` and labels ``y``."""
    _, z, logits = p.train_module(views)
    z1, z2 = z.float().chunk(2)
    negatives = p.memory.negatives() if p.memory is not None else None
    loss, stats = nt_xent(z1, z2, cfg.temperature, extra_negatives=negatives, directions=cfg.loss_directions)
    keys = p.memory.keys(views) if p.memory is not None else None
    if logits is not None:
        probe_loss, probe_acc = online_probe_loss(logits.float(), y.repeat(2))
        stats = dict(stats, contrastive_loss=loss.detach(), probe_loss=probe_loss.detach(), probe_acc=probe_acc)
        loss = loss + probe_loss
    return loss, stats, keys


def online_probe_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, top-1 in %) of the online probe over the labelled rows (``targets >= 0``).

    ``cross_entropy(ignore_index=-1)``'s mean is 0/0 = NaN when no row of this rank's batch is
    labelled (likely with a few percent of labels and a small batch per GPU), and that rank alone
    would stop on a non-finite loss. The sum over labelled rows divided by ``max(count, 1)`` is that
    mean otherwise and 0 then, with zero gradients that DDP averages like any others; no host sync.
    """
    labelled = targets >= 0
    count = labelled.sum().clamp(min=1)
    loss = F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum") / count
    correct = ((logits.argmax(1) == targets) & labelled).sum()
    return loss, (correct / count * 100).detach()


def chunked_contrastive_step(cfg: PretrainConfig, p: PretrainParts, views: torch.Tensor, y: torch.Tensor,
                             scaler: torch.amp.GradScaler,
                             ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """:func:`contrastive_loss` and its backward, in chunks of ``cfg.chunk_size`` images through a
    gradient cache (Gao et al. 2021, ``engine.gradcache``); returns what it returns, detached.

    The loss is NT-Xent over every projection of the global batch (gathered across processes, with
    the memory queue's negatives), as in one pass; BN normalises each chunk with its own statistics
    (ghost BN, METHOD.md 3.2). The memory's keys come from the whole batch at once, exactly as
    without chunks. The online probe standardises each chunk's features with the whole batch's
    mean and std, so its loss and gradient are those of one pass too. Under fp16 the cached
    gradients are those of the scaled loss, so the second pass backpropagates scaled gradients
    like ``scaler.scale(loss).backward()`` does.
    """
    device = views.device  # both passes see these same views (:func:`contrastive_views`)
    with autocast(device, cfg.precision):
        chunks = gradcache.chunk_rows(views.shape[0] // 2, cfg.chunk_size, views.device)
        feats, z = gradcache.encode_without_grad(p.step_module.contrastive, p.model, views, chunks, cfg.channels_last)
        z_cached = z.float().requires_grad_()  # (2N, D), the loss's leaf
        z1, z2 = z_cached.chunk(2)
        negatives = p.memory.negatives() if p.memory is not None else None
        loss, stats = nt_xent(z1, z2, cfg.temperature, extra_negatives=negatives, directions=cfg.loss_directions)
        (z_grad,) = torch.autograd.grad(scaler.scale(loss), z_cached)  # (2N, D)
        keys = p.memory.keys(views) if p.memory is not None else None
        probe = _ChunkedProbe.make(p, feats, y) if p.probe is not None else None
    loss = loss.detach()

    def surrogate(rows: torch.Tensor) -> torch.Tensor:
        """A scalar whose gradient w.r.t. the chunk's projections (and probe logits) is the cached one."""
        with autocast(device, cfg.precision):
            chunk = gradcache.take_rows(views, rows, cfg.channels_last)
            _, z_chunk, logits = p.train_module(chunk, probe.standardize if probe is not None else None)
            out = (z_chunk.float() * z_grad[rows]).sum()
            return out if probe is None else out + scaler.scale(probe.loss_sum(logits, rows) / probe.labelled)

    gradcache.backward_through_chunks(p.train_module, chunks, surrogate)
    if probe is not None:
        stats = dict(stats, contrastive_loss=loss, **probe.stats)
        loss = loss + probe.stats["probe_loss"]
    return loss, stats, keys


@dataclass
class _ChunkedProbe:
    """The online probe's share of a chunked step: the whole batch's feature statistics, targets
    and (for the log) loss and accuracy, from the first pass's features."""

    standardize: tuple[torch.Tensor, torch.Tensor]  # (D,) mean and std over the 2N local features
    targets: torch.Tensor  # (2N,) labels of both views, -1 = unlabelled
    labelled: torch.Tensor  # number of labelled rows: cross_entropy's mean divides by it
    stats: dict[str, torch.Tensor]

    @classmethod
    @torch.no_grad()
    def make(cls, p: PretrainParts, feats: torch.Tensor, y: torch.Tensor) -> _ChunkedProbe:
        f = feats.float()
        standardize = (f.mean(0), f.std(0))
        logits = p.step_module.probe_logits(f, standardize)
        targets = y.repeat(2)
        stats = {"probe_loss": F.cross_entropy(logits.float(), targets, ignore_index=-1),
                 "probe_acc": (logits.argmax(1) == targets).float().mean() * 100}
        return cls(standardize, targets, (targets != -1).sum(), stats)

    def loss_sum(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of a chunk's rows; over all chunks, divided by ``labelled``, the
        probe loss of the whole batch."""
        return F.cross_entropy(logits.float(), self.targets[rows], ignore_index=-1, reduction="sum")


class KnnMonitor:
    """Weighted kNN top-1 of the encoder's features every ``knn_every`` epochs and at the end.

    The bank is labelled training images and the queries come from the validation split, so
    choices made from the monitor never see the test split; without a validation split they come
    from the test split.
    """

    def __init__(self, cfg: PretrainConfig, bank: tuple[BatchSource, torch.Tensor],
                 queries: tuple[BatchSource, torch.Tensor], num_classes: int, size: int) -> None:
        self.cfg, self.bank, self.queries, self.num_classes, self.size = cfg, bank, queries, num_classes, size

    @classmethod
    def make(cls, cfg: PretrainConfig, ds: ImageDataset, source: BatchSource, pool: torch.Tensor,
             device: torch.device) -> KnnMonitor | None:
        size = image_size_of(cfg, ds)
        val_idx = torch.from_numpy(validation_indices(cfg, ds))
        if len(val_idx):
            bank_labels = torch.full_like(ds.labels, -1)
            bank_labels[pool] = ds.labels[pool]
            bank_idx, pick = knn_monitor_indices(bank_labels, len(val_idx), cfg.knn_train_size,
                                                 cfg.knn_test_size, cfg.seed)
            return cls(cfg, (source, bank_idx), (source, val_idx[pick]), ds.num_classes, size)
        if not has_test_split(cfg):  # the few-labels layout with neither: nothing to monitor on
            return None
        test_ds, test_source = open_split(cfg, cfg.test_split, device)
        bank_idx, test_idx = knn_monitor_indices(ds.labels, len(test_ds), cfg.knn_train_size,
                                                 cfg.knn_test_size, cfg.seed)
        return cls(cfg, (source, bank_idx), (test_source, test_idx), test_ds.num_classes, size)

    def measure(self, model: nn.Module, epoch: int, last: bool) -> dict[str, float]:
        """``{"knn_top1": ...}`` at a monitored epoch or the last step, else ``{}``."""
        if epoch % self.cfg.knn_every != 0 and not last:
            return {}
        cfg = self.cfg
        # each rank keeps its share of the bank (evaluate.knn_predict_sharded)
        train_f, train_y = extract(model, *self.bank, self.size, precision=cfg.precision, gather=False)
        test_f, test_y = extract(model, *self.queries, self.size, precision=cfg.precision)
        scores = knn_predict_sharded(train_f, train_y, test_f, self.num_classes, cfg.knn_k, cfg.knn_temperature)
        return {"knn_top1": round(100.0 * (scores.argmax(1) == test_y).float().mean().item(), 3)}


class ContrastiveStep(nn.Module):
    """The module DDP wraps: encoder + head, and the online linear probe on detached features.

    forward(x (2N, C, H, W), views 1 then 2) -> (features (2N, D), z (2N, proj_out_dim), probe logits).
    The probe sees ``features.detach()``, so it never shapes the representation (solo-learn, TF2).
    It has its own small SGD optimizer: the pretraining LR (e.g. 4.8 with LARS) would make a plain
    linear layer diverge.
    """

    def __init__(self, model: nn.Module, num_classes: int, probe: bool) -> None:
        super().__init__()
        self.model = model
        self.classifier = nn.Linear(model.backbone.feature_dim, num_classes) if probe else None

    def contrastive(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, z) of ``x``: the backbone under the step's autocast (bf16 / fp16 where asked
        for), the projection head in fp32. Its matmuls are small, and the casts around them cost more
        than bf16 saves (issue 30: in bf16 on a CPU our step took 1.74x the backbone's time, 1.36x
        with the head in fp32). In an fp32 run these are the ops of ``model.contrastive``."""
        feats = self.model.features(x)
        with torch.autocast(x.device.type, enabled=False):
            return feats, self.model.proj_head(feats.float())[-1]

    def forward(self, x: torch.Tensor, standardize: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``standardize``: the probe's feature (mean, std); ``None`` = those of ``x`` (a gradient
        cache's chunk passes the whole batch's)."""
        feats, z = self.contrastive(x)
        logits = None
        if self.classifier is not None:
            with torch.autocast(x.device.type, enabled=False):
                logits = self.probe_logits(feats.detach().float(), standardize)
        return feats, z, logits

    def probe_logits(self, f: torch.Tensor, standardize: tuple[torch.Tensor, torch.Tensor] | None = None,
                     ) -> torch.Tensor:
        """The probe's logits of float32 features ``f``, standardised (a scale-free input for a fixed LR)."""
        assert self.classifier is not None
        mean, std = (f.mean(0), f.std(0)) if standardize is None else standardize
        return self.classifier((f - mean) / (std + 1e-5))


PROBE_LR = 0.1  # online probe: SGD with momentum 0.9 on standardised features


class OnlineProbe:
    """The probe's weights and optimizer; saved in the checkpoint's state file, not the model file.

    The step loop steps ``optimizer`` after the encoder's, through the same gradient scaler, so
    under fp16 the probe's gradients are unscaled like every other.
    """

    def __init__(self, probe: nn.Linear) -> None:
        self.probe = probe
        self.optimizer = torch.optim.SGD(probe.parameters(), lr=PROBE_LR, momentum=0.9)

    def state_dict(self) -> dict[str, Any]:
        momentum = {}
        for i, p in enumerate(self.probe.parameters()):
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                momentum[str(i)] = buf
        return {"weights": self.probe.state_dict(), "momentum": momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.probe.load_state_dict(state["weights"])
        momentum = state.get("momentum", {})
        opt_state = self.optimizer.state_dict()
        opt_state["state"] = {i: {"momentum_buffer": momentum[str(i)]}
                              for i in opt_state["param_groups"][0]["params"] if str(i) in momentum}
        # through the optimizer's own loader, which puts each buffer on its parameter's device and
        # dtype: the state file is read onto the CPU, the probe may live on a GPU
        self.optimizer.load_state_dict(opt_state)

"""Contrastive pretraining (METHOD.md 3-5): two augmented views, NT-Xent over the global batch."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as dist
from ..config import PretrainConfig
from ..data.augment import SimCLRAugment
from ..losses import nt_xent
from ..memory import MomentumMemory
from . import loop
from .evaluate import extract, knn_monitor_indices, knn_predict
from .runtime import StepPlan, augment, crop_spec, prepare_run_dir, resolve_device, step_generator, write_json
from .setup import (
    distribute,
    image_size_of,
    make_optimizer,
    model_meta,
    new_model,
    open_split,
    seed_everything,
    training_pool,
    validation_indices,
)


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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        feats, z = self.model.contrastive(x)
        logits = None
        if self.classifier is not None:
            f = feats.detach().float()
            logits = self.classifier((f - f.mean(0)) / (f.std(0) + 1e-5))  # scale-free input for a fixed LR
        return feats, z, logits


PROBE_LR = 0.1  # online probe: SGD with momentum 0.9 on standardised features


class OnlineProbe:
    """The probe's weights and optimizer; saved in the checkpoint's state file, not the model file.

    The step loop steps ``optimizer`` with the encoder's (``TrainJob.extra_optimizers``), so under
    fp16 the probe's gradients are unscaled like every other.
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
        for i, p in enumerate(self.probe.parameters()):
            if "momentum" in state and str(i) in state["momentum"]:
                self.optimizer.state[p]["momentum_buffer"] = state["momentum"][str(i)].clone()


def run(cfg: PretrainConfig) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    run_dir = prepare_run_dir(cfg, "pretrain")
    ds, source = open_split(cfg, cfg.train_split, device)
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
    pool = training_pool(cfg, ds)  # never the validation split
    plan = StepPlan.make(len(pool), cfg.batch_size, cfg.epochs, cfg.max_steps)
    optimizer, peak_lr, warmup = make_optimizer(cfg, model, plan)
    probe = OnlineProbe(step_module.classifier) if step_module.classifier is not None else None
    aug = SimCLRAugment(
        size, color_strength=cfg.color_strength, blur=cfg.blur, crop_scale=(cfg.crop_min_scale, 1.0)
    )
    memory = (
        MomentumMemory(model, cfg.memory.size, cfg.proj_out_dim, cfg.memory.momentum)
        if cfg.memory.enabled else None
    )
    pending_keys: list[torch.Tensor] = []

    def loss_fn(x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = step_generator(device, cfg.seed, step)
        if source.streams:  # x: (2N, C, S, S) crops cut in the workers, view 1 then view 2
            views = augment(aug, x, g, cropped=True)
        else:  # x: (N, C, H, W) stored images; two independent views of each
            views = torch.cat([augment(aug, x, g), augment(aug, x, g)])  # (2N, C, S, S), fp32 outside autocast
        if cfg.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        _, z, logits = train_module(views)
        z1, z2 = z.float().chunk(2)
        negatives = memory.negatives() if memory is not None else None
        loss, stats = nt_xent(
            z1, z2, cfg.temperature, extra_negatives=negatives, directions=cfg.loss_directions
        )
        if memory is not None:
            pending_keys.append(memory.keys(views))
        if logits is not None:
            targets = y.repeat(2)
            probe_loss = F.cross_entropy(logits.float(), targets, ignore_index=-1)
            stats = dict(stats, contrastive_loss=loss.detach(), probe_loss=probe_loss.detach(),
                         probe_acc=(logits.argmax(1) == targets).float().mean() * 100)
            loss = loss + probe_loss
        return loss, stats

    def after_step(step: int) -> None:
        if memory is not None:
            memory.update_ema(model)
            memory.enqueue(pending_keys.pop())

    knn_bank = None
    if cfg.knn_every > 0 and labelled:
        val_idx = torch.from_numpy(validation_indices(cfg, ds))
        if len(val_idx):  # monitor on the validation split: choices made from it never see the test split
            bank_labels = torch.full_like(ds.labels, -1)
            bank_labels[pool] = ds.labels[pool]
            bank_idx, pick = knn_monitor_indices(bank_labels, len(val_idx), cfg.knn_train_size,
                                                 cfg.knn_test_size, cfg.seed)
            knn_bank = (bank_idx, val_idx[pick], source, ds.num_classes)
        else:
            test_ds, test_source = open_split(cfg, cfg.test_split, device)
            bank_idx, test_idx = knn_monitor_indices(ds.labels, len(test_ds), cfg.knn_train_size,
                                                     cfg.knn_test_size, cfg.seed)
            knn_bank = (bank_idx, test_idx, test_source, test_ds.num_classes)

    def on_epoch_end(epoch: int, step: int) -> dict[str, float]:
        if knn_bank is None or (epoch % cfg.knn_every != 0 and step != plan.total_steps):
            return {}
        bank_idx, test_idx, test_source, n_cls = knn_bank
        train_f, train_y = extract(model, source, bank_idx, size, precision=cfg.precision)
        test_f, test_y = extract(model, test_source, test_idx, size, precision=cfg.precision)
        scores = knn_predict(train_f, train_y, test_f, n_cls, cfg.knn_k, cfg.knn_temperature)
        return {"knn_top1": round(100.0 * (scores.argmax(1) == test_y).float().mean().item(), 3)}

    extra_state: dict[str, Any] = {}
    if memory is not None:
        extra_state["memory"] = memory
    if probe is not None:
        extra_state["probe"] = probe
    job = loop.TrainJob(
        stage="pretrain", cfg=cfg, run_dir=run_dir, device=device, model=model, optimizer=optimizer,
        loss_fn=loss_fn, pool=pool, source=source, crop=crop_spec(aug), views=2, plan=plan, peak_lr=peak_lr,
        warmup_steps=warmup, meta=model_meta(model, ds, image_size=size), extra_state=extra_state,
        after_step=after_step, on_epoch_end=on_epoch_end, train_modules=[step_module],
        extra_optimizers=[probe.optimizer] if probe is not None else [],
    )
    last = loop.run(job)
    summary = {"stage": "pretrain", "steps": plan.total_steps, "peak_lr": peak_lr,
               "global_batch": plan.global_batch, **last}
    write_json(run_dir / "summary.json", summary)
    dist.barrier()
    return summary

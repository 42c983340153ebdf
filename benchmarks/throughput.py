"""Pretraining throughput: our SimCLR step vs lightly's building blocks vs the bare backbone (issue 9).

    python benchmarks/throughput.py --threads 1,2                      # demo: r18_0.25x, 28 px, 1 channel
    python benchmarks/throughput.py --model r18_1x_sk0 --image-size 96 --channels 3 --stem cifar

Three pipelines run in the same process on the same machine, one after the other, ``--rounds`` times:

- ``ours``: ``simclrv2.engine.pretrain``'s own step functions, as its step loop calls them
  (``contrastive_views`` then ``train_step``), on the parts ``build_parts`` builds from a
  ``PretrainConfig`` (the stage's defaults with the case's model, size, batch and precision): a
  uint8 batch gathered by the stage's in-memory ``BatchSource``, two views from the batched
  ``SimCLRAugment`` (METHOD.md 5.1), ``ContrastiveStep`` (encoder + 3-layer head + online probe on
  detached features) on the 2N
  batch, ``nt_xent`` (METHOD.md 3), backward, ``LARS`` over ``param_groups`` (METHOD.md 4.1) and
  the probe's SGD, with ``set_lr``/``lr_at`` per step, the loop's on-device finite flag and metric
  sums; no host sync.
- ``lightly``: the same backbone variant with lightly's ``SimCLRProjectionHead`` (3 layers, the same
  widths) and ``NTXentLoss``; lightly's own ``SimCLRTransform`` (PIL, per image, two views) in a
  ``DataLoader`` over PIL images with ``--workers`` worker processes, the two views through the
  model one after the other, as lightly's SimCLR example does; lightly's ``LARS`` (or ours with
  ``--lightly-optimizer ours``) over the same parameter groups.
- ``ceiling``: forward + backward of the backbone alone on pre-made float tensors (2N of them), the
  sum of the features as the loss, no augmentation, no head, no optimizer step.

Images per second count source images. Every image gives two views, so a step of batch N pushes 2N
views through the network in all three rows and ``views/s = 2 * images/s``.

Timing: after ``--warmup`` untimed steps (DataLoader workers started, allocator and kernels warm),
``--steps`` steps are timed with one device sync at the end. lightly's workers only run while
lightly is measured, so they never steal CPU from the other rows. On a shared machine, run several
rounds: the table gives the median over rounds and the range.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from simclrv2.config import PretrainConfig
from simclrv2.data.base import InMemoryDataset
from simclrv2.engine.batches import BatchSource
from simclrv2.engine.device import autocast, grad_scaler, step_generator
from simclrv2.engine.models import stem_overrides
from simclrv2.engine.pretrain import build_parts, contrastive_views, train_step
from simclrv2.host import cpu_name
from simclrv2.models import create_model
from simclrv2.optim import LARS, lr_at, param_groups, scaled_lr

PROBE_CLASSES = 10  # labels of the synthetic data, for the online probe (as with Fashion-MNIST)
# the pretraining stage's defaults, which the lightly row uses too (its lr with sqrt scaling)
TEMPERATURE, BASE_LR, WEIGHT_DECAY = PretrainConfig.temperature, PretrainConfig.base_lr, PretrainConfig.weight_decay


@dataclass
class BenchConfig:
    """One benchmark case. Defaults: the issue-9 demo case (Fashion-MNIST size, ImageNet stem)."""

    model: str = "r18_0.25x_sk0"
    image_size: int = 28
    channels: int = 1
    batch_size: int = 256
    stem: str = "imagenet"  # imagenet | cifar | small (CIFAR stem with stride 2)
    device: str = "cpu"
    steps: int = 10
    warmup: int = 3
    precision: str = "fp32"  # fp32 | bf16
    compile: bool = False
    channels_last: bool = False
    workers: int = 2  # lightly's DataLoader workers
    pool_size: int = 2048  # synthetic images held in memory
    probe: bool = True  # ours: the online linear probe that pretraining runs by default
    lars_foreach: bool | None = None  # ours: LARS multi-tensor path (None = library default)
    lightly_optimizer: str = "lightly"  # lightly | ours: which LARS the lightly row uses
    seed: int = 0

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.stem not in ("imagenet", "cifar", "small"):
            raise ValueError(f"stem must be imagenet, cifar or small, got {self.stem!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.lightly_optimizer not in ("lightly", "ours"):
            raise ValueError(f"lightly_optimizer must be lightly or ours, got {self.lightly_optimizer!r}")
        if self.batch_size < 2 or self.steps < 1 or self.warmup < 0:
            raise ValueError("need batch_size >= 2, steps >= 1, warmup >= 0")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_images(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """(n, C, size, size) uint8 noise: augmentation and network cost do not depend on the content."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)


def make_model(cfg: BenchConfig, device: torch.device) -> nn.Module:
    """The registry variant with the benchmark's input channels and stem (engine.models.new_model)."""
    model = create_model(cfg.model, in_chans=cfg.channels, **stem_overrides(cfg.stem, cfg.image_size)).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _maybe_compile(module: nn.Module, cfg: BenchConfig) -> nn.Module:
    return torch.compile(module) if cfg.compile else module  # type: ignore[return-value]


def stage_config(cfg: BenchConfig) -> PretrainConfig:
    """The pretraining config whose step ``ours`` times: the stage's defaults (LARS, the 3-layer
    head, NT-Xent at its temperature, blur) with the case's model, size, batch and precision."""
    return PretrainConfig(model=cfg.model, image_size=cfg.image_size, stem=cfg.stem, batch_size=cfg.batch_size,
                          precision=cfg.precision, compile=cfg.compile, channels_last=cfg.channels_last,
                          online_probe=cfg.probe, seed=cfg.seed, device=cfg.device, knn_every=0)


# --------------------------------------------------------------------------------------------------
# ours
# --------------------------------------------------------------------------------------------------


class OursStep:
    """Our pretraining step: ``simclrv2.engine.pretrain``'s own ``contrastive_views`` and
    ``train_step`` (what its step loop calls), on the parts its ``build_parts`` makes from
    :func:`stage_config`.

    ``views(step)`` is the data part (the in-memory ``BatchSource`` gather + two batched views),
    ``update(views, y, step)`` the model part (forward, NT-Xent, probe, backward, LARS and the
    probe's SGD); ``self(step)`` runs both. ``timer``, when set to a dict, collects per-phase
    seconds (with device syncs, so only for breakdowns).
    """

    name = "ours"

    def __init__(self, cfg: BenchConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        images = synthetic_images(cfg.pool_size, cfg.channels, cfg.image_size, cfg.seed)
        labels = torch.randint(0, PROBE_CLASSES, (cfg.pool_size,), generator=torch.Generator().manual_seed(1))
        dataset = InMemoryDataset(images, labels, [str(c) for c in range(PROBE_CLASSES)])
        # the whole in-memory dataset on the device, as the stage's BatchSource holds Fashion-MNIST
        source = BatchSource(dataset, device, num_workers=0)
        self.stage_cfg = stage_config(cfg)
        self.peak_lr = scaled_lr(self.stage_cfg.base_lr, cfg.batch_size, self.stage_cfg.lr_scaling)
        # the stage's own parts (engine.pretrain.build_parts, as pretrain.run builds them)
        self.parts = build_parts(self.stage_cfg, dataset, source, self.peak_lr, device)
        self.model, self.step_module, self.optimizer = self.parts.model, self.parts.step_module, self.parts.optimizer
        if cfg.lars_foreach is not None:
            for group in self.optimizer.param_groups:
                group["foreach"] = cfg.lars_foreach
        self.scaler = grad_scaler(self.stage_cfg.precision, device)  # bf16 and fp32: a pass-through
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.sums: dict[str, torch.Tensor] = {}
        self.timer: dict[str, float] | None = None

    def _mark(self, phase: str, t0: float) -> float:
        if self.timer is None:
            return t0
        sync(self.device)
        t1 = time.perf_counter()
        self.timer[phase] = self.timer.get(phase, 0.0) + t1 - t0
        return t1

    def views(self, step: int, batch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(2N, C, S, S) float views (view 1 then view 2) and the (N,) labels of one step's batch.

        ``batch`` overrides ``cfg.batch_size`` (the batch-size search); past the pool size the
        indices repeat.
        """
        t0 = time.perf_counter()
        n = batch or self.cfg.batch_size
        # engine.batches.batch_indices: a slice of a seeded permutation, gathered on the device
        perm = torch.randperm(self.cfg.pool_size, generator=torch.Generator().manual_seed(step))
        x, y = self.parts.source.get(perm.repeat(-(-n // self.cfg.pool_size))[:n])
        g = step_generator(self.device, self.cfg.seed, step)
        views = contrastive_views(self.stage_cfg, self.parts, x, g)
        self._mark("augment", t0)
        return views, y

    def update(self, views: torch.Tensor, y: torch.Tensor, step: int) -> None:
        t0 = time.perf_counter()
        lr = lr_at(step, 100 * (self.cfg.steps + self.cfg.warmup), 10, self.peak_lr)
        loss, stats = train_step(self.stage_cfg, self.parts, views, y, lr, self.scaler)
        # engine/metrics.TrainLog: the finite flag and metric sums stay on the device between log lines
        self.finite &= torch.isfinite(loss.detach())
        for k, v in dict(stats, loss=loss.detach()).items():
            self.sums[k] = self.sums.get(k, 0) + v.float()
        self._mark("step", t0)

    def __call__(self, step: int) -> None:
        views, y = self.views(step)
        self.update(views, y, step)

    def premade(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views and labels for FLOP counting of :meth:`update` alone."""
        return self.views(0)

    def flop_step(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.update(inputs[0], inputs[1], 0)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# lightly
# --------------------------------------------------------------------------------------------------


class PILImages(Dataset):
    """In-memory uint8 images handed out as PIL images, as torchvision's FashionMNIST/CIFAR10 do.

    ``length`` may exceed the number of images (the index wraps), so one DataLoader epoch covers a
    whole benchmark round.
    """

    def __init__(self, images: torch.Tensor, transform: Callable[[Any], Any], length: int) -> None:
        arr = images.numpy()  # (N, C, H, W)
        self.arrays = arr[:, 0] if arr.shape[1] == 1 else np.ascontiguousarray(arr.transpose(0, 2, 3, 1))
        self.transform = transform
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        from PIL import Image

        return self.transform(Image.fromarray(self.arrays[i % len(self.arrays)]))


def lightly_transform(image_size: int, channels: int) -> Callable[[Any], Any]:
    """lightly's SimCLRTransform (two views). ImageNet normalisation is 3-channel, so one-channel
    images get the single-channel equivalent (the grey mean/std of its three values)."""
    from lightly.transforms import SimCLRTransform
    from lightly.transforms.utils import IMAGENET_NORMALIZE

    normalize = IMAGENET_NORMALIZE
    if channels == 1:
        normalize = {"mean": [sum(normalize["mean"]) / 3], "std": [sum(normalize["std"]) / 3]}
    return SimCLRTransform(input_size=image_size, normalize=normalize)


class LightlySimCLR(nn.Module):
    """The backbone with lightly's SimCLRProjectionHead, as in lightly's SimCLR example."""

    def __init__(self, backbone: nn.Module, feature_dim: int, out_dim: int = 128, num_layers: int = 3) -> None:
        super().__init__()
        from lightly.models.modules import SimCLRProjectionHead

        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(feature_dim, feature_dim, out_dim, num_layers=num_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x))


class LightlyStep:
    """A SimCLR step built from lightly's pieces with a per-image DataLoader pipeline."""

    name = "lightly"
    uses_workers = True  # its DataLoader workers' CPU time counts (time_steps)

    def __init__(self, cfg: BenchConfig, device: torch.device, rounds: int = 1) -> None:
        from lightly.loss import NTXentLoss
        from lightly.utils.lars import LARS as LightlyLARS

        self.cfg, self.device = cfg, device
        images = synthetic_images(cfg.pool_size, cfg.channels, cfg.image_size, cfg.seed)
        # One DataLoader epoch is exactly one round's batches, so the workers make no batch that is
        # not used and their CPU time divides evenly over the round's steps (see time_steps).
        length = sum(lightly_schedule(cfg)) * cfg.batch_size
        self.dataset = PILImages(images, lightly_transform(cfg.image_size, cfg.channels), length)
        backbone = make_model(cfg, device).backbone
        self.model = LightlySimCLR(backbone, backbone.feature_dim).to(device)
        self.train_module = _maybe_compile(self.model, cfg)
        self.criterion = NTXentLoss(temperature=TEMPERATURE)
        lr = scaled_lr(BASE_LR, cfg.batch_size, "sqrt")
        groups = param_groups(self.model, WEIGHT_DECAY)  # lightly's LARS skips adaptation where wd == 0
        if cfg.lightly_optimizer == "lightly":
            self.optimizer: torch.optim.Optimizer = LightlyLARS(groups, lr=lr, momentum=0.9)
        else:
            self.optimizer = LARS(groups, lr=lr, momentum=0.9, weight_decay=WEIGHT_DECAY)
        self._it: Any = None

    def start(self) -> None:
        loader = DataLoader(
            self.dataset, batch_size=self.cfg.batch_size, shuffle=True, drop_last=True,
            num_workers=self.cfg.workers, pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        self._it = iter(loader)

    def stop(self) -> None:
        self._it = None  # drops the iterator: its worker processes exit

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def train(self, x0: torch.Tensor, x1: torch.Tensor) -> None:
        self.model.train()
        with autocast(self.device, self.cfg.precision):
            z0 = self.train_module(x0)
            z1 = self.train_module(x1)
            loss = self.criterion(z0.float(), z1.float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def __call__(self, step: int) -> None:
        if self._it is None:
            self.start()
        x0, x1 = next(self._it)
        self.train(self._to_device(x0), self._to_device(x1))

    def premade(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.cfg.batch_size, self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
        return self._to_device(torch.randn(shape)), self._to_device(torch.randn(shape))

    def flop_step(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.train(*inputs)


# --------------------------------------------------------------------------------------------------
# ceiling
# --------------------------------------------------------------------------------------------------


class CeilingStep:
    """Forward + backward of the backbone alone on 2N pre-made views; no augmentation, no loss."""

    name = "ceiling"

    def __init__(self, cfg: BenchConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.backbone = make_model(cfg, device).backbone
        self.train_module = _maybe_compile(self.backbone, cfg)
        g = torch.Generator().manual_seed(cfg.seed)
        shape = (2 * cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size)
        self.inputs = torch.rand(shape, generator=g).to(device)  # (2N, C, S, S): both views' worth
        if cfg.channels_last:
            self.inputs = self.inputs.contiguous(memory_format=torch.channels_last)

    def train(self, x: torch.Tensor) -> None:
        self.backbone.train()
        for p in self.backbone.parameters():
            p.grad = None
        with autocast(self.device, self.cfg.precision):
            feats = self.train_module(x)
        feats.float().sum().backward()

    def __call__(self, step: int) -> None:
        self.train(self.inputs)

    def premade(self) -> torch.Tensor:
        return self.inputs

    def flop_step(self, inputs: torch.Tensor) -> None:
        self.train(inputs)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# timing and report
# --------------------------------------------------------------------------------------------------


def _own_cpu() -> float:
    """This process's CPU seconds, all threads, at the clock's own resolution (nanoseconds on
    Linux; ``os.times`` counts in 10 ms ticks, coarser than one step of a tiny model)."""
    return time.process_time()


def _children_cpu() -> float:
    """CPU seconds of the waited-for child processes (DataLoader workers), in microseconds where
    ``resource`` exists, else in ``os.times`` ticks."""
    try:
        import resource
    except ImportError:  # Windows
        t = os.times()
        return t.children_user + t.children_system
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def time_steps(
    runner: Any, warmup: int, steps: int, device: torch.device, offset: int = 0
) -> tuple[float, float]:
    """(wall seconds, CPU seconds) per step over ``steps`` timed steps after ``warmup`` untimed ones.

    Wall time has one device sync at the end. CPU time is this process's user + system time over
    the timed steps (all its threads) plus, for a runner with ``uses_workers``, the CPU time of its
    DataLoader workers (counted when they exit in ``runner.stop()``), spread over all
    ``warmup + steps`` steps, the batches they made. Other child processes (torch.compile's) are
    not counted. CPU time moves far less than wall time when other jobs load the machine.
    """
    children0 = _children_cpu()
    runner.start()
    try:
        for i in range(warmup):
            runner(offset + i)
        sync(device)
        t0, c0 = time.perf_counter(), _own_cpu()
        for i in range(steps):
            runner(offset + warmup + i)
        sync(device)
        wall, cpu = time.perf_counter() - t0, _own_cpu() - c0
    finally:
        runner.stop()
    workers = _children_cpu() - children0 if getattr(runner, "uses_workers", False) else 0.0
    return wall / steps, cpu / steps + workers / (warmup + steps)


@dataclass
class Row:
    name: str
    seconds_per_step: list[float] = field(default_factory=list)  # wall, one entry per round
    cpu_per_step: list[float] = field(default_factory=list)  # CPU seconds (workers included)

    def images_per_s(self, batch: int) -> list[float]:
        return [batch / s for s in self.seconds_per_step]

    def median_rate(self, batch: int) -> float:
        return statistics.median(self.images_per_s(batch))

    def images_per_cpu_s(self, batch: int) -> float:
        """Images per CPU-second; 0 when the CPU time measured nothing (a clock too coarse for the
        step), which the table prints as 0 and its ratios as "-"."""
        cpu = statistics.median(self.cpu_per_step)
        return batch / cpu if cpu > 0 else 0.0


def machine_info(device: torch.device) -> dict[str, str]:
    """CPU model, cores, load, torch version, threads (and the GPU when there is one)."""
    info = {
        "cpu": cpu_name(),
        "cores": f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}",
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
    }
    if hasattr(os, "getloadavg"):
        info["load (1/5/15 min)"] = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import lightly

        info["lightly"] = lightly.__version__
    except ImportError:
        pass
    return info


def _num(v: float) -> str:
    """Three significant figures, no exponent: 1234, 123, 12.3, 1.23, 0.123."""
    return f"{v:.0f}" if v >= 100 else f"{v:.{2 - math.floor(math.log10(v))}f}" if v > 0 else "0"


def format_table(rows: Sequence[Row], batch: int) -> str:
    """Markdown table: wall-clock images/s (median over rounds, range), ms/step and the ratios, then
    images per CPU-second (workers included) and the same ratios on CPU time."""
    rates = {r.name: r.median_rate(batch) for r in rows}
    cpu = {r.name: r.images_per_cpu_s(batch) for r in rows}

    def ratios(table: dict[str, float], name: str) -> tuple[str, str]:
        def ratio(top: str) -> str:
            return f"{table[top] / table[name]:.2f}x" if table.get(top, 0) > 0 and table[name] > 0 else "-"

        return ratio("ours"), ratio("ceiling")

    lines = [
        "| pipeline | images/s | range over rounds | ms/step | ours faster by | ceiling faster by "
        "| images/CPU-s | ours faster by (CPU) | ceiling faster by (CPU) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rate, per = rates[r.name], r.images_per_s(batch)
        wall_ours, wall_ceil = ratios(rates, r.name)
        cpu_ours, cpu_ceil = ratios(cpu, r.name)
        lines.append(
            f"| {r.name} | {_num(rate)} | {_num(min(per))}-{_num(max(per))} | {1000 * batch / rate:.1f} | "
            f"{wall_ours} | {wall_ceil} | {_num(cpu[r.name])} | {cpu_ours} | {cpu_ceil} |"
        )
    return "\n".join(lines)


def run_benchmark(
    cfg: BenchConfig, rounds: int = 1, which: Sequence[str] = ("ours", "lightly", "ceiling")
) -> list[Row]:
    """Build the pipelines once, then time each of them ``rounds`` times, interleaved."""
    device = torch.device(cfg.device)
    builders: dict[str, Callable[[], Any]] = {
        "ours": lambda: OursStep(cfg, device),
        "lightly": lambda: LightlyStep(cfg, device),
        "ceiling": lambda: CeilingStep(cfg, device),
    }
    runners = {name: builders[name]() for name in which}
    rows = {name: Row(name) for name in which}
    for rnd in range(rounds):
        for name, runner in runners.items():
            warmup, steps = lightly_schedule(cfg) if name == "lightly" else (cfg.warmup, cfg.steps)
            offset = rnd * (warmup + steps)
            wall, cpu = time_steps(runner, warmup, steps, device, offset)
            rows[name].seconds_per_step.append(wall)
            rows[name].cpu_per_step.append(cpu)
    return list(rows.values())


def lightly_available() -> bool:
    """Whether the optional ``lightly`` package (the comparison row) can be imported."""
    import importlib.util

    return importlib.util.find_spec("lightly") is not None


def lightly_schedule(cfg: BenchConfig) -> tuple[int, int]:
    """(warmup, timed) steps for the DataLoader row.

    The first batches of all workers arrive together after one batch's latency, and batches in
    flight when the clock starts were partly made during warm-up. Warming up for ``workers + 1``
    steps drains the first burst, and timing at least ``4 * workers`` steps keeps the head start of
    the in-flight batches (at most one batch per worker) a small part of the measurement.
    """
    return max(cfg.warmup, cfg.workers + 1), max(cfg.steps, 4 * cfg.workers)


def breakdown(cfg: BenchConfig, steps: int = 5) -> dict[str, float]:
    """Milliseconds per step in each phase of our step (synced between phases)."""
    device = torch.device(cfg.device)
    ours = OursStep(cfg, device)
    for i in range(max(cfg.warmup, 1)):
        ours(i)
    ours.timer = {}
    for i in range(steps):
        ours(100 + i)
    return {k: 1000 * v / steps for k, v in ours.timer.items()}


def profile_ours(cfg: BenchConfig, steps: int = 3, rows: int = 25) -> str:
    """torch.profiler table of our step's ops, sorted by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(cfg.device)
    ours = OursStep(cfg, device)
    for i in range(max(cfg.warmup, 1)):
        ours(i)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            ours(100 + i)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def _parse_threads(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()] if text else []


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = BenchConfig()
    p.add_argument("--model", default=d.model)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--channels", type=int, default=d.channels, choices=(1, 3))
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--stem", default=d.stem, choices=("imagenet", "cifar", "small"))
    p.add_argument("--device", default=d.device)
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps per round")
    p.add_argument("--rounds", type=int, default=1, help="interleaved repetitions (median reported)")
    p.add_argument("--precision", default=d.precision, choices=("fp32", "bf16"))
    p.add_argument("--compile", action="store_true", help="torch.compile every pipeline's model")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", default="", help="torch threads, comma-separated list (e.g. 1,2)")
    p.add_argument("--workers", type=int, default=d.workers, help="lightly DataLoader workers")
    p.add_argument("--pool-size", type=int, default=d.pool_size)
    p.add_argument("--no-probe", action="store_true", help="ours without the online linear probe")
    p.add_argument("--lars-foreach", choices=("auto", "on", "off"), default="auto",
                   help="ours: LARS multi-tensor path (auto = library default: CUDA only)")
    p.add_argument("--lightly-optimizer", default=d.lightly_optimizer, choices=("lightly", "ours"))
    p.add_argument("--only", default="ours,lightly,ceiling", help="comma-separated subset of pipelines")
    p.add_argument("--breakdown", action="store_true", help="also print ours' per-phase ms/step")
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler table of ours")
    a = p.parse_args(argv)
    cfg = BenchConfig(
        model=a.model, image_size=a.image_size, channels=a.channels, batch_size=a.batch_size, stem=a.stem,
        device=a.device, steps=a.steps, warmup=a.warmup, precision=a.precision, compile=a.compile,
        channels_last=a.channels_last, workers=a.workers, pool_size=a.pool_size, probe=not a.no_probe,
        lars_foreach={"auto": None, "on": True, "off": False}[a.lars_foreach],
        lightly_optimizer=a.lightly_optimizer,
    )
    return cfg, a


def main(argv: Sequence[str] | None = None) -> None:
    cfg, a = parse_args(argv)
    device = torch.device(cfg.device)
    which = [w.strip() for w in a.only.split(",") if w.strip()]
    if "lightly" in which and not lightly_available():
        print("lightly is not installed, so its row is skipped; install it with: pip install lightly",
              file=sys.stderr)
        which.remove("lightly")
    for threads in _parse_threads(a.threads) or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        info = machine_info(device)
        print("\n" + "  ".join(f"{k}: {v}" for k, v in info.items()))
        print(
            f"model {cfg.model} ({cfg.stem} stem, {cfg.channels} ch), {cfg.image_size} px, batch {cfg.batch_size} "
            f"images = {2 * cfg.batch_size} views/step, {cfg.precision}, compile={cfg.compile}, "
            f"channels_last={cfg.channels_last}, lightly workers={cfg.workers}, lightly LARS="
            f"{cfg.lightly_optimizer}, {a.rounds} round(s) x ({cfg.warmup} warmup + {cfg.steps} timed) steps "
            f"(lightly: {' + '.join(map(str, lightly_schedule(cfg)))})\n"
        )
        rows = run_benchmark(cfg, a.rounds, which)
        print(format_table(rows, cfg.batch_size))
        if a.breakdown:
            parts = breakdown(cfg)
            print("\nours, ms/step by phase (synced): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
                  + f"; total {sum(parts.values()):.1f}")
        if a.profile:
            print("\n" + profile_ours(cfg))


if __name__ == "__main__":
    main()

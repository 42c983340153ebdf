"""Which images each step sees, and how they reach the training device.

``open_split`` opens a dataset split with its :class:`BatchSource`; :class:`StepPlan` says how many
steps a stage takes over its pool of images, and :func:`batch_indices` which images a step takes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .. import distributed as dist
from ..data.augment import to_device
from ..data.base import ImageDataset
from ..data.datasets import load_dataset
from ..data.decode import CropSpec, ViewDataset
from ..data.folder import ImageFolderDataset
from ..host import usable_cores
from ..optim import Schedule, scaled_lr
from .runfolder import RunError


@dataclass
class StepPlan:
    """How many steps a stage takes over ``pool_size`` images at a global batch size."""

    global_batch: int  # images per optimizer step, all processes together
    local_batch: int  # images per step on this process
    steps_per_epoch: int
    total_steps: int  # steps this run takes (``epochs``, capped by ``max_steps``)
    schedule_steps: int = 0  # length of the learning-rate schedule; 0 = total_steps
    epoch_steps: int = 0  # what ``epochs`` alone would give, before ``min_steps``; 0 = schedule_steps

    def __post_init__(self) -> None:
        if self.schedule_steps <= 0:
            self.schedule_steps = self.total_steps
        if self.epoch_steps <= 0:
            self.epoch_steps = self.schedule_steps

    @classmethod
    def make(cls, pool_size: int, batch_size: int, epochs: float, max_steps: int, min_steps: int = 0) -> StepPlan:
        """``epochs`` sets the learning-rate schedule; ``max_steps`` only stops the run early.

        ``min_steps`` lengthens the schedule when ``epochs`` over a small pool would give fewer
        steps (40 labelled images at batch 64 make one step an epoch), so a stage's length
        follows the data rather than a per-dataset epoch table.

        The schedule therefore does not depend on ``max_steps``: a run stopped by ``max_steps=k``
        and resumed with a larger (or no) cap takes exactly the steps of an uninterrupted run,
        which is what makes ``max_steps`` a resume-safe key. With ``epochs=0`` the schedule is
        ``max_steps`` long.
        """
        ws = dist.world_size()
        global_batch = min(batch_size, pool_size)  # tiny label sets: a batch is the whole set
        global_batch -= global_batch % ws
        if global_batch <= 0:
            raise RunError(f"{pool_size} training images cannot be split over {ws} processes")
        steps_per_epoch = max(1, pool_size // global_batch)
        by_epochs = max(1, math.ceil(epochs * steps_per_epoch) if epochs > 0 else max_steps)
        planned = max(by_epochs, min_steps)
        total = min(planned, max_steps) if max_steps > 0 else planned
        return cls(global_batch, global_batch // ws, steps_per_epoch, total, planned, by_epochs)

    def schedule(self, base_lr: float, lr_scaling: str, warmup_epochs: float,
                 stretch_warmup: bool = False) -> Schedule:
        """Warmup then cosine over the planned length, peaking at ``base_lr`` scaled to the global batch.

        The warmup is at most half the schedule: when ``min_steps`` stretches a stage over a small
        pool, ``warmup_epochs`` of a large one would otherwise leave no steps at the peak. With
        ``stretch_warmup`` the warmup stretches as the schedule does, keeping its share of it: a
        student from random weights at LARS's peak rate after a warmup of one step (0.1 epoch of
        3,000 images) can diverge and stay at chance (docs/EXPERIMENTS.md, "A distillation that
        never warmed up").
        """
        warmup_steps = warmup_epochs * self.steps_per_epoch
        if stretch_warmup:
            warmup_steps *= self.schedule_steps / self.epoch_steps
        warmup = min(round(warmup_steps), self.schedule_steps // 2)
        return Schedule(scaled_lr(base_lr, self.global_batch, lr_scaling), warmup, self.schedule_steps)

    def is_epoch_end(self, done: int) -> bool:
        """After ``done`` steps: has an epoch, or the run, just ended?"""
        return done % self.steps_per_epoch == 0 or done == self.total_steps

    def steps(self, pool: torch.Tensor, seed: int, start: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(step, this process's dataset indices)`` from ``start`` to the end of the run."""
        for step in range(start, self.total_steps):
            yield step, batch_indices(pool, self, seed, step)


def batch_indices(pool: torch.Tensor, plan: StepPlan, seed: int, step: int) -> torch.Tensor:
    """This process's dataset indices for ``step``: slice of the epoch's global permutation."""
    epoch, within = divmod(step, plan.steps_per_epoch)
    g = torch.Generator().manual_seed(seed * 9_999_991 + epoch)
    perm = torch.randperm(len(pool), generator=g)
    start = within * plan.global_batch + dist.rank() * plan.local_batch
    return pool[perm[start : start + plan.local_batch]]


class BatchSource:
    """uint8 image batches on the training device.

    In-memory datasets are moved to the device once and indexed there; the stage's augmentation
    then crops and resizes on the device. File-backed datasets (image folders too large for memory)
    *stream*: DataLoader workers decode each file and cut the view from the original image
    (:mod:`simclrv2.data.decode`), so batches arrive already at the training size.
    """

    def __init__(self, dataset: Any, device: torch.device, num_workers: int = 4) -> None:
        self.dataset = dataset
        self.device = device
        # no more workers than cores: torch warns on every loader, and they would only contend
        self.num_workers = min(num_workers, usable_cores())
        images = getattr(dataset, "images", None)
        self.images = images.to(device) if isinstance(images, torch.Tensor) else None
        self.labels = dataset.labels.to(device)
        # dataset indices whose file was unusable when a worker read it (skip_bad_images replaced it
        # with the next image); each worker warns with the path, the loop reports the count
        self.replaced: set[int] = set()

    @property
    def streams(self) -> bool:
        """True when views are cut from the files in workers (``cropped`` views for the augmentation)."""
        return self.images is None

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored images of ``idx`` (an image folder's: decoded at its stored size) and labels."""
        if self.images is not None:
            idx = self._indices(idx)
            return self.images[idx], self.labels[idx]
        items = [self.dataset[int(i)] for i in idx]  # (image, label, index used: a bad file's replacement)
        x = torch.stack([it[0] for it in items])
        used = torch.tensor([it[2] for it in items], dtype=torch.int64)
        x, used = to_device([x, used], self.device)
        return x, self.labels[used]

    def _indices(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx`` on the device: one copy, asynchronous from pinned memory on a GPU."""
        return to_device([idx], self.device)[0]

    def train_batches(self, batches: Iterable[tuple[int, torch.Tensor]], crop: CropSpec | tuple[CropSpec, ...],
                      views: int = 1, seed: int = 0, targets: torch.Tensor | None = None,
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, y)`` for each ``(step, indices)`` of ``batches``, in order.

        In memory: ``x`` is the stored images (N, C, H, W), which the stage's augmentation crops.
        Streaming: ``views`` random resized crops (``crop``, or ``crop[v]`` for view v) of each
        image, cut from the original files in workers with randomness drawn from (seed, step,
        index, view): (views * N, C, S, S), view 1 of every image, then view 2. ``targets``
        replaces the dataset's labels (-1 for images a stage may not see the label of).
        """
        labels = self.labels if targets is None else targets.to(self.device)
        if not self.streams:
            for _, idx in batches:
                idx = self._indices(idx)  # once, not once for the images and again for the labels
                yield self.images[idx], labels[idx]
            return
        size = crop[0].size if isinstance(crop, tuple) else crop.size
        data = ViewDataset(self.dataset, size, crop, views, seed)
        yield from self._stream(data, ([(int(i), step) for i in idx] for step, idx in batches), labels)

    def eval_batches(self, batches: Iterable[torch.Tensor], size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, y)`` for each index batch. In memory: the stored images, for EvalTransform on the
        device; streaming: the evaluation view (:func:`~simclrv2.data.decode.eval_view`) at ``size``."""
        if not self.streams:
            for idx in batches:
                yield self.get(idx)
            return
        data = ViewDataset(self.dataset, size, None)
        yield from self._stream(data, ([(int(i), -1) for i in idx] for idx in batches), self.labels)

    def _stream(self, data: ViewDataset, keys: Iterator[list[tuple[int, int]]],
                labels: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        workers = self.num_workers
        loader = torch.utils.data.DataLoader(
            data, batch_sampler=_Batches(keys), num_workers=workers, pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
        )
        for x, used, asked in loader:  # x (N, views, C, S, S); used: the index read (a bad file's replacement)
            if not torch.equal(used, asked):
                self.replaced.update(asked[used != asked].tolist())
            # copy first, then reorder on the device: reshaping on the host would make an unpinned
            # copy, and the copy from it a blocking one
            x, used = x.to(self.device, non_blocking=True), used.to(self.device, non_blocking=True)
            yield x.transpose(0, 1).reshape(-1, *x.shape[2:]), labels[used]


class _Batches:
    """A batch sampler over precomputed key lists, drawn lazily (a run's steps need not be listed)."""

    def __init__(self, keys: Iterator[list[tuple[int, int]]]) -> None:
        self.keys = keys

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return self.keys


def open_split(cfg: Any, split: str, device: torch.device) -> tuple[ImageDataset, BatchSource]:
    """A split and its batch source. ``image_size`` is the stored size of an image folder; the
    built-in datasets stay at their native size and the stage's views are resized to
    ``image_size`` (e.g. 224 for the released checkpoints on 28 px Fashion-MNIST)."""
    stored = (cfg.image_size or None) if cfg.dataset == "imagefolder" else None
    ds = load_dataset(
        cfg.dataset, split, data_dir=cfg.data_dir or None, download=cfg.download,
        image_size=stored, skip_bad_images=cfg.skip_bad_images,
    )
    small = isinstance(ds, ImageFolderDataset) and len(ds) * 3 * ds.image_size**2 <= MEMORY_CACHE_BYTES
    if small and cfg.cache_images:
        # a small folder is decoded once (each image's centre square at the stored size): every
        # stage then indexes memory instead of decoding each batch again (a few thousand 32 px PNGs:
        # 12 MB). Larger folders stream, their views cut from the original files in workers.
        ds = ds.to_memory(num_workers=min(cfg.num_workers, usable_cores()))
    return ds, BatchSource(ds, device, cfg.num_workers)


# Image folders up to this size, decoded, are held in memory (ImageNet at 224 px is 190 GB: it is not).
MEMORY_CACHE_BYTES = 2 * 2**30


def image_size_of(cfg: Any, ds: ImageDataset) -> int:
    """The training resolution: the config's, or the dataset's native side."""
    if cfg.image_size:
        return cfg.image_size
    images = getattr(ds, "images", None)
    if isinstance(images, torch.Tensor):
        return int(images.shape[-1])
    x, _, _ = ds[0]
    return int(x.shape[-1])


def crop_spec(aug: Any) -> CropSpec:
    """The random resized crop of a :class:`~simclrv2.data.augment.SimCLRAugment`, for workers to cut."""
    return CropSpec(aug.image_size, aug.crop_scale, aug.ratio,
                    "bicubic" if aug.interpolation == "bicubic" else "bilinear")

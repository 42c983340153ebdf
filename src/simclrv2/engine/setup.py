"""Building blocks the stages share: data, labelled subsets, models from checkpoints, optimizers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import checkpoint as ckpt
from .. import distributed as dist
from ..data.datasets import ImageDataset, ImageFolderDataset, load_dataset
from ..data.subsets import balanced_subset, subset_from_file_list, validation_split, write_subset
from ..models import SimCLRModel, create_model
from ..optim import build_optimizer, scaled_lr
from .runtime import BatchSource, RunError, StepPlan, usable_cores


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


def validation_indices(cfg: Any, ds: ImageDataset) -> np.ndarray:
    """The validation split held out of ``train_split`` (``val_fraction``; empty when 0).

    Every stage draws the same images from the same seed, so none of them ever trains on it:
    the labelled subsets, the unlabeled pool and the pretraining pool all leave it out.
    """
    if cfg.val_fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    return validation_split(ds.labels, cfg.val_fraction, cfg.val_seed)


def training_pool(cfg: Any, ds: ImageDataset) -> torch.Tensor:
    """Indices a stage may train on without labels: the training split minus the validation split."""
    keep = torch.ones(len(ds), dtype=torch.bool)
    keep[torch.from_numpy(validation_indices(cfg, ds))] = False
    return torch.nonzero(keep).flatten()


def labelled_indices(cfg: Any, ds: ImageDataset, run_dir: Path | None) -> np.ndarray:
    """The labelled subset (fraction with a seed, or an official file list), never overlapping the
    validation split; written to the run folder with the validation split beside it."""
    val = validation_indices(cfg, ds)
    if cfg.label_list:
        idx = np.setdiff1d(subset_from_file_list(ds.filenames, cfg.label_list), val)
    elif cfg.label_fraction >= 1.0:
        idx = np.setdiff1d(np.flatnonzero(ds.labels.numpy() >= 0), val)
    else:
        idx = balanced_subset(ds.labels, cfg.label_fraction, cfg.label_seed, exclude=val)
    if len(idx) == 0:
        raise RunError("the labelled subset is empty; raise label_fraction or check label_list")
    if run_dir is not None and dist.is_main():
        write_subset(run_dir / "labelled_subset.txt", idx, ds.filenames)
        if len(val):
            write_subset(run_dir / "validation_subset.txt", val, ds.filenames)
    return idx


def new_model(name: str, ds: ImageDataset, image_size: int, stem: str = "auto", **overrides: Any) -> SimCLRModel:
    """A registry model adapted to the data: input channels and stem.

    ``stem="auto"`` keeps the registry's stem but uses the CIFAR stem at <= 32 px (METHOD.md 1.4);
    ``cifar`` / ``imagenet`` force one (the ImageNet stem downsamples 4x first: far cheaper on a CPU);
    ``small`` is the CIFAR stem with stride 2 (2x downsampling, no max-pool).
    """
    return create_model(name, in_chans=ds.channels, **stem_overrides(stem, image_size), **overrides)


def stem_overrides(stem: str, image_size: int) -> dict[str, Any]:
    """``create_model`` keyword arguments for a config's ``stem`` key ({} keeps the registry's)."""
    if stem == "small":
        return {"cifar_stem": True, "stem_stride": 2}
    if stem == "cifar" or (stem == "auto" and image_size <= 32):
        return {"cifar_stem": True}
    if stem == "imagenet":
        return {"cifar_stem": False}
    return {}


def load_model(path: str, device: torch.device, **overrides: Any) -> tuple[SimCLRModel, dict[str, Any]]:
    """A model from a run folder, a checkpoint folder or a model file, with config overrides."""
    state, meta = ckpt.read_model_file(path)
    if "model_config" not in meta:
        raise RunError(f"'{path}' has no model_config in its metadata; it was not written by simclrv2")
    config = dict(meta["model_config"], **overrides)
    model = SimCLRModel(**config)
    if "classifier.weight" not in state and model.classifier is not None:
        # a pretraining checkpoint: the classifier is new (zero-initialised by the caller)
        keep = {k: v for k, v in model.state_dict().items() if k.startswith("classifier.")}
        state = dict(state, **keep)
    if "classifier.weight" in state and model.classifier is None:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    if "classifier.weight" in state and model.classifier is not None and (
        state["classifier.weight"].shape != model.classifier.weight.shape
    ):
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("classifier.")})
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise RunError(
            f"checkpoint '{path}' does not fit model {meta.get('model_name')} "
            f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})"
        ) from e
    model.name = meta.get("model_name", getattr(model, "name", "model"))
    return model.to(device), meta


def model_meta(model: SimCLRModel, ds: ImageDataset | None = None, **extra: Any) -> dict[str, Any]:
    meta = {"model_name": model.name, "model_config": model.config}
    if ds is not None:
        meta.update(classes=list(ds.classes), num_classes=ds.num_classes)
    meta.update(extra)
    return meta


def distribute(module: nn.Module, device: torch.device, global_bn: bool) -> nn.Module:
    """SyncBatchNorm (global BN, METHOD.md 1.6) and DDP when running under torchrun; else unchanged."""
    if dist.world_size() == 1:
        return module
    if global_bn and device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    elif global_bn and dist.is_main():
        # torch's SyncBatchNorm runs on CUDA only; gloo processes on CPUs keep per-process BN
        print("note: global_bn needs GPUs (SyncBatchNorm is CUDA-only); on CPUs each process "
              "normalises over its own share of the batch", file=sys.stderr, flush=True)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def make_optimizer(cfg: Any, module: nn.Module, plan: StepPlan) -> tuple[torch.optim.Optimizer, float, int]:
    """Optimizer, the peak learning rate after batch scaling, and the warmup length in steps.

    The warmup is at most half the schedule: when ``min_steps`` stretches a stage over a small
    pool, ``warmup_epochs`` of a large one would otherwise leave no steps at the peak.
    """
    peak_lr = scaled_lr(cfg.base_lr, plan.global_batch, cfg.lr_scaling)
    opt = build_optimizer(cfg.optimizer, module, peak_lr, cfg.weight_decay)
    warmup = min(round(cfg.warmup_epochs * plan.steps_per_epoch), plan.schedule_steps // 2)
    return opt, peak_lr, warmup


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed + dist.rank())
    np.random.seed(seed + dist.rank())

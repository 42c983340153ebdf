"""The model a stage trains: built for the data, wrapped for DDP (``modelfile.load_model`` reads one from a file)."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .. import distributed as dist
from ..data.base import ImageDataset
from ..models import SimCLRModel, create_model


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


def model_meta(model: SimCLRModel, ds: ImageDataset | None = None, **extra: Any) -> dict[str, Any]:
    meta = {"model_name": model.name, "model_config": model.config}
    if ds is not None:
        meta.update(classes=list(ds.classes), num_classes=ds.num_classes)
    meta.update(extra)
    return meta


def freeze_unused_head(model: SimCLRModel) -> list[nn.Module]:
    """Freeze the head layers after the one ``ft_proj_selector`` picks; return them.

    They never run in ``forward``, so they never get a gradient. Left trainable, DDP waits for
    their gradients and fails on the next step ("Expected to have finished reduction in the prior
    iteration"); frozen, DDP and the optimizer leave them out. ``find_unused_parameters=True``
    would also work, at the cost of a walk over the autograd graph every step, and would hide a
    layer that stopped running by mistake.
    """
    used = model.proj_head.resolve_index(model.ft_proj_selector)
    unused: list[nn.Module] = [layer for j, layer in enumerate(getattr(model.proj_head, "layers", [])) if j >= used]
    for layer in unused:
        layer.requires_grad_(False)
    return unused


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

"""Device, precision and randomness of a run.

Randomness is a pure function of ``(seed, step, rank)``: the batch order of an epoch comes from a
generator seeded with ``(seed, epoch)`` (:func:`~simclrv2.engine.batches.batch_indices`) and the
augmentation of a step from one seeded with ``(seed, step, rank)`` (:func:`step_generator`).
Resuming therefore needs no RNG state and reproduces an uninterrupted run bit for bit on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .. import distributed as dist
from .runfolder import RunError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; under torchrun the local rank picks the GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"device '{name}' was asked for but CUDA is not available; use device=cpu")
    device = dist.setup_distributed(name)
    fast_cuda_settings(device)
    return device


def fast_cuda_settings(device: torch.device) -> None:
    """On a GPU: cuDNN autotuning (``cudnn.benchmark``) and TF32 matmuls and convolutions.

    A training step's shapes are fixed, so cuDNN's search for the fastest convolution algorithm
    pays for itself after the first step. TF32 keeps fp32's range with a 10-bit mantissa on
    Ampere and later cards (what ``torch.set_float32_matmul_precision("high")`` selects); it only
    changes fp32 runs (bf16 and fp16 autocast do not use it), and fp32 GPU results were never
    bitwise those of the CPU. Nothing changes on the CPU.
    """
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")  # = torch.backends.cuda.matmul.allow_tf32 = True


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CPU and GPU, fp16 on GPU only; fp32 is a no-op context."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if precision == "fp16" and device.type != "cuda":
        raise RunError("precision=fp16 needs a GPU; use precision=bf16 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def augment(aug: Callable[..., torch.Tensor], x: torch.Tensor,
            generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor:
    """``aug(x)`` computed in float32 even inside an autocast region.

    The step loops compute the loss under autocast, augmentation included. Under bf16
    autocast the resize and blur run in bf16: crops lose precision (the views differ from an fp32
    run) and the blur's bf16 output cannot be written back into the fp32 batch (an error).
    """
    with torch.autocast(x.device.type, enabled=False):
        return aug(x, **kwargs) if generator is None else aug(x, generator=generator, **kwargs)


def step_generator(device: torch.device, seed: int, step: int, salt: int = 0) -> torch.Generator:
    """The augmentation generator of one step on one rank (pure function of its arguments).

    Always a CPU generator, whatever ``device`` (the training device) is: the augmentations draw
    their parameters on the CPU (``SimCLRAugment.sample_params`` refuses a CUDA generator) and move
    them to the images, so a seed gives the same views on the CPU and on a GPU.
    """
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + step * 7919 + dist.rank() * 104_729 + salt * 15_485_863) % (2**63 - 1))
    return g


def seed_everything(seed: int) -> None:
    """Seed torch's and numpy's global generators (model initialisation draws from them)."""
    torch.manual_seed(seed + dist.rank())
    np.random.seed(seed + dist.rank())

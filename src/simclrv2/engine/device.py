"""Device, precision and randomness of a run.

Randomness is a pure function of ``(seed, step, rank)``: the batch order of an epoch comes from a
generator seeded with ``(seed, epoch)`` (:func:`~simclrv2.engine.batches.batch_indices`) and the
augmentation of a step from one seeded with ``(seed, step, rank)`` (:func:`step_generator`; linear
eval's ``sgd`` head draws for the global batch with rank 0's and each rank keeps its rows).
Resuming therefore needs no RNG state and reproduces an uninterrupted run bit for bit on the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed as dist
from .runfolder import RunError, write_json

# The NVIDIA driver's control node: present where a driver is loaded, whether or not torch can use it.
NVIDIA_CONTROL_NODE = Path("/dev/nvidiactl")
_warned_no_gpu = False  # the warning of resolve_device, once per process


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; under torchrun the local rank picks the GPU.

    Where ``auto`` finds no usable GPU although the machine says it has some (the launcher's
    ``CUDA_VISIBLE_DEVICES``, the container's ``NVIDIA_VISIBLE_DEVICES``, a loaded driver), it
    warns once: the CUDA build of torch quietly takes the CPU when the driver is too old for it.
    Under torchrun, ranks that resolve different devices all stop (``setup_distributed``).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cpu":
            _warn_if_gpus_expected()
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


def _gpu_hint() -> str | None:
    """What says this machine has GPUs for this process, or None."""
    for var in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        value = os.environ.get(var, "").strip()
        if value and value.lower() not in ("-1", "none", "void"):
            return f"{var}={value}"
    return f"{NVIDIA_CONTROL_NODE} exists" if NVIDIA_CONTROL_NODE.exists() else None


def _warn_if_gpus_expected() -> None:
    global _warned_no_gpu
    hint = _gpu_hint()
    if hint is None or _warned_no_gpu or dist.launch_rank() != 0:
        return
    _warned_no_gpu = True
    if torch.version.cuda:
        cause = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, and the NVIDIA driver is likely "
                 "older than that needs (nvidia-smi shows the CUDA version it supports): update the driver or "
                 "install the torch wheel for that CUDA version")
    else:
        cause = f"torch {torch.__version__} is a CPU-only build: install a CUDA build of torch"
    print(f"warning: device=auto found no usable GPU although {hint}; {cause}; running on the CPU "
          "(set device=cpu to run there without this warning)", file=sys.stderr, flush=True)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CPU and GPU, fp16 on GPU only; fp32 is a no-op context."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if precision == "fp16" and device.type != "cuda":
        raise RunError("precision=fp16 needs a GPU; use precision=bf16 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A step's gradient scaler. Under fp16 the loss is scaled before backward and each optimizer
    steps through the scaler, which unscales its gradients (skipping the step on inf/NaN); in any
    other precision it is a pass-through."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def augment(aug: Callable[..., torch.Tensor], x: torch.Tensor,
            generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor:
    """``aug(x)`` computed in float32 even inside an autocast region.

    The step loops compute the loss under autocast, augmentation included. Under bf16
    autocast the resize and blur run in bf16: crops lose precision (the views differ from an fp32
    run) and the blur's bf16 output cannot be written back into the fp32 batch (an error).
    """
    with torch.autocast(x.device.type, enabled=False):
        return aug(x, **kwargs) if generator is None else aug(x, generator=generator, **kwargs)


def step_generator(device: torch.device, seed: int, step: int, salt: int = 0,
                   per_rank: bool = True) -> torch.Generator:
    """The augmentation generator of one step on one rank (pure function of its arguments).

    Always a CPU generator, whatever ``device`` (the training device) is: the augmentations draw
    their parameters on the CPU (``SimCLRAugment.sample_params`` refuses a CUDA generator) and move
    them to the images, so a seed gives the same views on the CPU and on a GPU. ``per_rank=False``
    gives every rank rank 0's generator (one process's): for a stage that draws a step's parameters
    for the global batch and keeps its own rows, so that its views do not depend on the world size.
    """
    r = dist.rank() if per_rank else 0
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + step * 7919 + r * 104_729 + salt * 15_485_863) % (2**63 - 1))
    return g


def seed_everything(seed: int) -> None:
    """Seed torch's and numpy's global generators (model initialisation draws from them)."""
    torch.manual_seed(seed + dist.rank())
    np.random.seed(seed + dist.rank())


@contextlib.contextmanager
def global_rng_kept(device: torch.device) -> Iterator[None]:
    """Within it, code may draw from the global generators (torch's on the CPU and on ``device``,
    numpy's, Python's); on leaving they are as they were. For work done before a run that must not
    change what the run draws, such as the budget building and timing a stage's step."""
    state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            np.random.set_state(state[0])
            random.setstate(state[1])


# precision=auto takes bf16 only when it is at least this much faster: the measurement's own spread
# on a loaded machine is a few percent, and bf16 costs accuracy headroom for nothing below that.
BF16_SPEEDUP_NEEDED = 1.10
AUTO_TIMED_STEPS = 3  # after one warm-up step each; the fastest counts (as budget.TIMED_STEPS)


def choose_precision(asked: str, run_dir: Path, module: nn.Module, views_shape: tuple[int, ...],
                     device: torch.device, channels_last: bool, keep: bool = True) -> dict[str, Any]:
    """The precision a run trains in, and why: ``{"precision", "reason", ...measurements}``.

    ``asked`` other than ``auto`` is taken as it is. ``auto`` times forward + backward of a copy of
    ``module`` (the model and its heads; the run's own weights and batch-norm statistics are not
    touched) on random views of ``views_shape`` in fp32 and in bf16 autocast, and takes bf16 when it
    is at least ``BF16_SPEEDUP_NEEDED`` times faster. Rank 0 measures and every process takes its
    answer; the choice is kept in ``<run_dir>/precision.json``, so a resumed run trains on in the
    precision it started in. ``keep=False`` (the budget, foreseeing a run's choice before the run)
    reads a kept choice but neither writes nor prints one.
    """
    if asked != "auto":
        return {"precision": asked, "reason": "precision set in the config"}
    path = run_dir / "precision.json"
    rec = None
    if dist.is_main():
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            rec = _measure_precision(module, views_shape, device, channels_last)
            if keep:
                write_json(path, rec)
        if keep:
            print(f"precision=auto: {rec['precision']} ({rec['reason']})", flush=True)
    return dist.broadcast_object(rec)


def _measure_precision(module: nn.Module, views_shape: tuple[int, ...], device: torch.device,
                       channels_last: bool) -> dict[str, Any]:
    trial = copy.deepcopy(module).train()
    views = torch.rand(views_shape, generator=torch.Generator().manual_seed(0)).to(device)
    if channels_last:
        views = views.contiguous(memory_format=torch.channels_last)
    rate = {prec: _views_per_s(trial, views, device, prec) for prec in ("fp32", "bf16")}
    speedup = rate["bf16"] / rate["fp32"]
    chosen = "bf16" if speedup >= BF16_SPEEDUP_NEEDED else "fp32"
    reason = (f"measured on {device.type}: bf16 {rate['bf16']:.0f} views/s, fp32 {rate['fp32']:.0f} views/s, "
              f"{speedup:.2f}x; bf16 needs >= {BF16_SPEEDUP_NEEDED:.2f}x")
    return {"precision": chosen, "reason": reason, "fp32_views_per_s": round(rate["fp32"], 1),
            "bf16_views_per_s": round(rate["bf16"], 1), "bf16_speedup": round(speedup, 3),
            "device": str(device), "views": list(views_shape)}


def _views_per_s(module: nn.Module, views: torch.Tensor, device: torch.device, precision: str) -> float:
    """Views per second of forward + backward, the fastest of ``AUTO_TIMED_STEPS`` after a warm-up."""
    best = float("inf")
    for i in range(1 + AUTO_TIMED_STEPS):
        t0 = time.perf_counter()
        with autocast(device, precision):
            out = module(views)
        out[1].float().square().mean().backward()  # (features, z, probe logits): z, as NT-Xent would
        module.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return len(views) / best

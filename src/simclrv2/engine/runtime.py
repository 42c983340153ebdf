"""What every stage needs around its step loop: the run folder, the device, logging, batches.

Randomness is a pure function of ``(seed, step, rank)``: the batch order of an epoch comes from a
generator seeded with ``(seed, epoch)`` and the augmentation of a step from one seeded with
``(seed, step, rank)``. Resuming therefore needs no RNG state and reproduces an uninterrupted run
bit for bit on the CPU.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import platform
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import config as C
from .. import distributed as dist
from .. import runlock
from ..checkpoint import atomic_write_text
from ..data.decode import CropSpec, ViewDataset


class RunError(RuntimeError):
    """A run that cannot start or go on; the message is one line that names the fix."""


# ---------------------------------------------------------------- run folder and config

# Keys that may change between a run and its resumption without changing its results.
RESUME_SAFE_KEYS = {
    "resume", "progress", "log_every", "num_workers", "device", "data_dir", "download",
    "max_steps", "run_dir", "checkpoint_every", "checkpoint_min_seconds", "keep_checkpoints", "knn_every",
}


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, prefix + k + ".")
        elif a != b and (prefix + k) not in RESUME_SAFE_KEYS:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def config_changes(cfg: Any, stage: str) -> list[str]:
    """What differs between ``cfg`` and the run already in its folder (``config.yaml``), as
    ``"key: old -> new"`` lines, ignoring :data:`RESUME_SAFE_KEYS`; ``[]`` when there is no run."""
    cfg_path = Path(cfg.run_dir) / "config.yaml"
    if not cfg_path.is_file():
        return []
    return _diff(C.load_yaml(cfg_path), dict(C.to_dict(cfg), stage=stage))


def prepare_run_dir(cfg: Any, stage: str) -> Path:
    """Create (or reopen) the run folder and write ``config.yaml``.

    A folder that already holds a run with a different config is never overwritten silently:
    with ``resume=true`` that is an error; with ``resume=false`` the old config is kept as
    ``config.previous.yaml`` and the run starts over (the step loop then sets the old checkpoints
    aside, :func:`set_aside_previous_run`).

    The folder is locked first (:mod:`simclrv2.runlock`, rank 0 only): a second run into a folder
    that a live process writes stops here, before it has written anything, with one line naming
    the holder. The lock is held until the command ends (``simclrv2.cli``) or the process exits.
    """
    run_dir = Path(cfg.run_dir)
    error = None
    if dist.is_main():
        try:
            _open_run_dir(cfg, stage, run_dir)
        except RunError as e:
            error = str(e)
    # every rank stops with rank 0's line instead of waiting at the barrier for a rank that left
    error = dist.broadcast_from_main(error)
    if error is not None:
        raise RunError(error) if dist.is_main() else RunError(f"rank 0 stopped: {error}")
    dist.barrier()
    return run_dir


def _open_run_dir(cfg: Any, stage: str, run_dir: Path) -> None:
    """Rank 0's part of :func:`prepare_run_dir`: create, lock, check and write ``config.yaml``."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        runlock.acquire(run_dir)  # before anything is written: a refused run leaves no trace
    except OSError as e:
        raise RunError(
            f"run folder '{run_dir}' is not writable ({e.strerror}); choose another with run_dir=PATH"
        ) from e
    except runlock.RunFolderBusy as e:
        raise RunError(str(e)) from e
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        changed = config_changes(cfg, stage)
        if changed and cfg.resume:
            raise RunError(
                f"run folder '{run_dir}' holds a run with a different config ({changed[0]}"
                + (f" and {len(changed) - 1} more" if len(changed) > 1 else "")
                + "); use a new run_dir, or resume=false to start over there"
            )
        with _writing(run_dir / "config.previous.yaml"):
            if changed:
                atomic_write_text(run_dir / "config.previous.yaml", cfg_path.read_text())
    with _writing(cfg_path):
        atomic_write_text(cfg_path, C.dump_yaml(dict(C.to_dict(cfg), stage=stage)))


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an OSError while writing ``path`` (full disk, permissions) into a one-line RunError."""
    try:
        yield
    except OSError as e:
        fix = "free disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix the folder's permissions"
        raise RunError(
            f"cannot write '{path}' ({e.strerror or e}); {fix}, then rerun the same command "
            "(a training run resumes from its last complete checkpoint)"
        ) from e


def set_aside_previous_run(run_dir: Path) -> None:
    """Keep the last run's checkpoints and metrics under ``*.previous`` names (one generation).

    Called when a run starts over (``resume=false``) just before its first step. Left in place,
    an old run's later-step checkpoints would win over the new run's (pruning keeps the highest
    steps) and a later resume would pick them up with the new config.
    """
    ckpts = run_dir / "checkpoints"
    with _writing(run_dir):
        if ckpts.is_dir() and any(ckpts.iterdir()):
            previous = run_dir / "checkpoints.previous"
            if previous.exists():
                doomed = run_dir / f".checkpoints.previous.del-{os.getpid()}"
                os.replace(previous, doomed)  # atomic: no half-deleted folder under a real name
                shutil.rmtree(doomed, ignore_errors=True)
            os.replace(ckpts, previous)
            print(f"resume=false: the previous run's checkpoints were moved to '{previous}'", file=sys.stderr)
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and metrics.stat().st_size > 0:
            os.replace(metrics, run_dir / "metrics.previous.jsonl")


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{socket.gethostname()}: {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}"
    if torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return desc


# ---------------------------------------------------------------- device and precision

def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; under torchrun the local rank picks the GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"device '{name}' was asked for but CUDA is not available; use device=cpu")
    return dist.setup_distributed(name)


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

    The step loop enters autocast around the whole ``loss_fn``, augmentation included. Under bf16
    autocast the resize and blur run in bf16: crops lose precision (the views differ from an fp32
    run) and the blur's bf16 output cannot be written back into the fp32 batch (an error).
    """
    with torch.autocast(x.device.type, enabled=False):
        return aug(x, **kwargs) if generator is None else aug(x, generator=generator, **kwargs)


def crop_spec(aug: Any) -> CropSpec:
    """The random resized crop of a :class:`~simclrv2.data.augment.SimCLRAugment`, for workers to cut."""
    return CropSpec(aug.image_size, aug.crop_scale, aug.ratio,
                    "bicubic" if aug.interpolation == "bicubic" else "bilinear")


def step_generator(device: torch.device, seed: int, step: int, salt: int = 0) -> torch.Generator:
    """The augmentation generator of one step on one rank (pure function of its arguments).

    Always a CPU generator, whatever ``device`` (the training device) is: the augmentations draw
    their parameters on the CPU (``SimCLRAugment.sample_params`` refuses a CUDA generator) and move
    them to the images, so a seed gives the same views on the CPU and on a GPU.
    """
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + step * 7919 + dist.rank() * 104_729 + salt * 15_485_863) % (2**63 - 1))
    return g


# ---------------------------------------------------------------- batches

@dataclass
class StepPlan:
    """How many steps a stage takes over ``pool_size`` images at a global batch size."""

    global_batch: int  # images per optimizer step, all processes together
    local_batch: int  # images per step on this process
    steps_per_epoch: int
    total_steps: int  # steps this run takes (``epochs``, capped by ``max_steps``)
    schedule_steps: int = 0  # length of the learning-rate schedule; 0 = total_steps

    def __post_init__(self) -> None:
        if self.schedule_steps <= 0:
            self.schedule_steps = self.total_steps

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
        planned = math.ceil(epochs * steps_per_epoch) if epochs > 0 else max_steps
        planned = max(1, planned, min_steps)
        total = min(planned, max_steps) if max_steps > 0 else planned
        return cls(global_batch, global_batch // ws, steps_per_epoch, total, planned)


def batch_indices(pool: torch.Tensor, plan: StepPlan, seed: int, step: int) -> torch.Tensor:
    """This process's dataset indices for ``step``: slice of the epoch's global permutation."""
    epoch, within = divmod(step, plan.steps_per_epoch)
    g = torch.Generator().manual_seed(seed * 9_999_991 + epoch)
    perm = torch.randperm(len(pool), generator=g)
    start = within * plan.global_batch + dist.rank() * plan.local_batch
    return pool[perm[start : start + plan.local_batch]]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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
            idx = idx.to(self.device)
            return self.images[idx], self.labels[idx]
        items = [self.dataset[int(i)] for i in idx]  # (image, label, index used: a bad file's replacement)
        x = torch.stack([it[0] for it in items])
        used = torch.tensor([it[2] for it in items], dtype=torch.int64)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), self.labels[used.to(self.device)]

    def train_batches(self, batches: Iterable[tuple[int, torch.Tensor]], crop: CropSpec, views: int = 1,
                      seed: int = 0, targets: torch.Tensor | None = None,
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, y)`` for each ``(step, indices)`` of ``batches``, in order.

        In memory: ``x`` is the stored images (N, C, H, W), which the stage's augmentation crops.
        Streaming: ``views`` random resized crops (``crop``) of each image, cut from the original
        files in workers with randomness drawn from (seed, step, index, view): (views * N, C, S, S),
        view 1 of every image, then view 2. ``targets`` replaces the dataset's labels (-1 for images
        a stage may not see the label of).
        """
        labels = self.labels if targets is None else targets.to(self.device)
        if not self.streams:
            for _, idx in batches:
                x, _ = self.get(idx)
                yield x, labels[idx.to(self.device)]
            return
        data = ViewDataset(self.dataset, crop.size, crop, views, seed)
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
            x = x.transpose(0, 1).reshape(-1, *x.shape[2:])
            yield x.to(self.device, non_blocking=True), labels[used.to(self.device)]


class _Batches:
    """A batch sampler over precomputed key lists, drawn lazily (a run's steps need not be listed)."""

    def __init__(self, keys: Iterator[list[tuple[int, int]]]) -> None:
        self.keys = keys

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return self.keys


# ---------------------------------------------------------------- logging

class MetricsLogger:
    """JSON lines in ``metrics.jsonl`` (+ TensorBoard when installed) on rank 0.

    On resume, lines logged after the checkpoint being resumed are dropped, so the file describes
    exactly one uninterrupted run.
    """

    def __init__(self, run_dir: Path, resume_step: int = 0, tensorboard: bool = True) -> None:
        self.enabled = dist.is_main()
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not self.enabled:
            return
        if self.path.is_file():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("step", 0) <= resume_step and resume_step > 0:
                    keep.append(line)
            with _writing(self.path):
                atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step or None)
            except Exception:  # tensorboard is an optional extra
                self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        rec["time"] = round(time.time(), 3)
        with _writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            step = rec.get("step", 0)
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def write_json(path: Path, data: dict[str, Any]) -> None:
    if dist.is_main():
        with _writing(path):
            atomic_write_text(path, json.dumps(data, indent=1))

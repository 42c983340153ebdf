"""The checkpointer of a training stage: when to save, what goes in a checkpoint, and resuming.

A checkpoint (:mod:`simclrv2.checkpoint` writes it atomically) holds the model's weights, the
optimizer's and the gradient scaler's state, the state of named extra objects (the memory queue,
the online probe) and ``meta.json`` (stage, step, epoch, resolved config, training seconds).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .. import checkpoint as ckpt
from .. import distributed as dist
from ..config import to_dict
from .batches import StepPlan
from .runfolder import RunError, set_aside_previous_run


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


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


def non_finite_error(stage: str, run_dir: Path, done: int, what: str) -> RunError:
    """The error of a run whose loss or weights stopped being finite; the last good checkpoint stays."""
    kept = ckpt.latest_checkpoint(run_dir)
    return RunError(
        f"{stage}: the {what} became non-finite before step {done}; "
        + (f"the last good checkpoint '{kept}' is kept" if kept else "no checkpoint was written")
        + "; lower the learning rate (base_lr) or use precision=fp32"
    )


class Checkpointer:
    """Saves and restores one stage's training state in ``run_dir/checkpoints``.

    ``model`` is the unwrapped model (its ``state_dict`` is ``model.safetensors``), ``optimizer`` the
    model's, ``scaler`` the fp16 gradient scaler (its state is kept only when it is enabled), and
    ``extra`` maps names to other stateful objects (memory queue, online probe).

    Checkpoints are written at the end of each epoch (or every ``checkpoint_every`` steps), but
    epoch-end ones at most every ``checkpoint_min_seconds``: over a few labelled images an epoch
    is one step. The last step is always saved.
    """

    def __init__(self, stage: str, cfg: Any, run_dir: Path, plan: StepPlan, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, meta: dict[str, Any],
                 extra: dict[str, Stateful] | None = None) -> None:
        self.stage, self.cfg, self.run_dir, self.plan = stage, cfg, run_dir, plan
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.meta, self.extra = meta, extra or {}
        self.every = cfg.checkpoint_every or plan.steps_per_epoch
        self.min_gap = 0.0 if cfg.checkpoint_every else cfg.checkpoint_min_seconds
        self.resumed_seconds = 0.0  # training seconds before this process, from the checkpoint resumed
        self.started = self.last_save = time.time()

    def due(self, done: int) -> bool:
        """After ``done`` steps: a checkpoint boundary (the loop also logs there)?"""
        return done % self.every == 0 or done == self.plan.total_steps

    def save_if_due(self, done: int) -> None:
        """At a boundary: stop on non-finite weights, else save unless the last save is too recent."""
        if not self.due(done):
            return
        if not _weights_finite(self.model):  # a finite loss can still come with an overflowing update
            raise non_finite_error(self.stage, self.run_dir, done, "weights")
        if done == self.plan.total_steps or time.time() - self.last_save >= self.min_gap:
            self.save(done)
            self.last_save = time.time()

    def save(self, step: int) -> None:
        if not dist.is_main():
            return
        extra: dict[str, torch.Tensor] = {}
        for name, obj in self.extra.items():
            _flatten(name, obj.state_dict(), extra)
        state: dict[str, Any] = {"optimizer": self.optimizer.state_dict()}
        if self.scaler.is_enabled():  # a resumed fp16 run scales as an uninterrupted one
            state["scaler"] = self.scaler.state_dict()
        seconds = round(self.resumed_seconds + time.time() - self.started, 2)
        meta = dict(self.meta, stage=self.stage, epoch=step / self.plan.steps_per_epoch,
                    config=to_dict(self.cfg), train_seconds=seconds)
        ckpt.save_checkpoint(self.run_dir, step, self.model.state_dict(), meta=meta, extra_tensors=extra,
                             optimizer_state=state, keep=self.cfg.keep_checkpoints)

    def resume(self) -> int:
        """The step to start from: 0 for a new run, else the step of the newest sound checkpoint,
        whose state is loaded. ``resume=false`` sets the folder's previous run aside first."""
        if not self.cfg.resume:
            if dist.is_main():
                set_aside_previous_run(self.run_dir)  # starting over: keep, but never resume, the old run
            return 0
        last = self._newest_sound()
        if last is None:
            return 0
        self._load(last)
        meta = ckpt.read_meta(last)
        self.resumed_seconds = float(meta.get("train_seconds", 0.0))
        if dist.is_main():
            print(f"{self.stage}: resuming from {last} at step {meta['step']}", file=sys.stderr, flush=True)
        return int(meta["step"])

    def _newest_sound(self) -> Path | None:
        """The newest checkpoint whose files match their checksums and that belongs to this stage.

        A damaged one is skipped, with one line that names it, and left on disk (the run writes
        that step again when it gets there).
        """
        last, damaged = ckpt.newest_sound_checkpoint(self.run_dir)
        if last is None:
            if damaged:
                raise RunError(f"no checkpoint in '{self.run_dir / 'checkpoints'}' verifies ({damaged[0][1]}); "
                               "use resume=false to start over (the damaged checkpoints are set aside)")
            return None
        if damaged and dist.is_main():
            names = ", ".join(bad.name for bad, _ in damaged)
            why = damaged[0][1].split(";")[0]  # the file and what is wrong with it, without the advice
            print(f"{self.stage}: newer checkpoint {names} failed verification ({why}); falling back to the "
                  f"newest one that verifies, {last.name}", file=sys.stderr, flush=True)
        meta = ckpt.read_meta(last)
        if meta.get("model_name") != self.meta.get("model_name") or meta.get("stage") != self.stage:
            raise RunError(
                f"checkpoint '{last}' is a {meta.get('stage')} run of {meta.get('model_name')}, not a "
                f"{self.stage} run of {self.meta.get('model_name')}; use a new run_dir or resume=false"
            )
        return last

    def _load(self, last: Path) -> None:
        state = ckpt.load_tensors(last / "model.safetensors")
        try:
            self.model.load_state_dict(state)
        except RuntimeError as e:
            raise RunError(f"checkpoint '{last}' does not fit this model ({str(e).splitlines()[0]})") from e
        opt = ckpt.load_optimizer_state(last)
        try:
            if opt is not None:
                self.optimizer.load_state_dict(opt["optimizer"])
                if self.scaler.is_enabled() and "scaler" in opt:
                    self.scaler.load_state_dict(opt["scaler"])
            extra_path = last / "state.safetensors"
            if extra_path.is_file():
                flat = ckpt.load_tensors(extra_path)
                for name, obj in self.extra.items():
                    obj.load_state_dict(_unflatten(name, flat))
        except (ValueError, KeyError, RuntimeError) as e:  # torch's messages for a state of another shape
            raise RunError(
                f"the optimizer or training state in '{last}' does not fit this run ({str(e).splitlines()[0]}); "
                "it was written by another simclrv2 version or setup: use a new run_dir, or resume=false"
            ) from e


def _weights_finite(model: nn.Module) -> bool:
    """One host sync per checkpoint: are all floating-point weights and buffers finite?"""
    flags = [torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True

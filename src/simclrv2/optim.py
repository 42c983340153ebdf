"""LARS, parameter groups, learning-rate scaling and the warmup + cosine schedule (METHOD.md 4)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------
# LARS (METHOD.md 4.1)
# ---------------------------------------------------------------------------------------------


class LARS(torch.optim.Optimizer):
    """LARS with classic (non-Nesterov) momentum, as in the official code (METHOD.md 4.1).

    Per parameter ``w`` with gradient ``g``::

        if weight decay applies:  g <- g + wd * w
        if adaptation applies:    trust = eta * ||w|| / ||g||   (decayed g; 1 if either norm is 0)
        else:                     trust = 1
        v <- momentum * v + lr * trust * g        (v starts at 0, as TF's slot)
        w <- w - v

    Groups with ``lars_exclude=True`` (BN, biases, supervised head; see ``param_groups``) get no
    trust ratio: plain momentum SGD at the group's lr, with their ``weight_decay`` entry added to
    the gradient as an L2 term (``param_groups`` sets it to 0 for BN and biases, and to the
    weight decay for the supervised head, METHOD.md 4.1).

    ``foreach=None`` uses the multi-tensor path when all of a group's parameters are on one CUDA
    device with one dtype, else the per-parameter reference path (``_step_reference``); both
    compute the same update and neither synchronises with the host.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        foreach: bool | None = None,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(f"invalid LARS hyper-parameters: lr={lr} momentum={momentum} wd={weight_decay}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            lars_exclude=False,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("LARS does not support sparse gradients")
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            foreach = group["foreach"]
            if foreach is None:
                foreach = all(p.is_cuda for p in params) and len({(p.device, p.dtype) for p in params}) == 1
            if foreach:
                self._step_foreach(group, params, bufs)
            else:
                self._step_reference(group, params, bufs)
        return loss

    @staticmethod
    def _step_reference(group: dict[str, Any], params: list[torch.Tensor], bufs: list[torch.Tensor]) -> None:
        """Per-parameter update: the readable definition of the step."""
        lr, momentum, eta = group["lr"], group["momentum"], group["trust_coefficient"]
        exclude, wd = group["lars_exclude"], group["weight_decay"]
        for p, buf in zip(params, bufs):
            g = p.grad
            if wd != 0:
                g = g.add(p, alpha=wd)
            if not exclude:
                w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                trust = torch.where(
                    (w_norm > 0) & (g_norm > 0), eta * w_norm / g_norm, torch.ones_like(w_norm)
                )
                g = g * trust
            buf.mul_(momentum).add_(g, alpha=lr)
            p.sub_(buf)

    @staticmethod
    def _step_foreach(group: dict[str, Any], params: list[torch.Tensor], bufs: list[torch.Tensor]) -> None:
        """Multi-tensor version of ``_step_reference`` (same math, a few kernel launches per group)."""
        lr, momentum, eta = group["lr"], group["momentum"], group["trust_coefficient"]
        exclude, wd = group["lars_exclude"], group["weight_decay"]
        grads = torch._foreach_add([p.grad for p in params], params, alpha=wd) if wd != 0 else [
            p.grad for p in params]
        if not exclude:
            w_norms = torch._foreach_norm(params)  # list of 0-dim tensors
            g_norms = torch._foreach_norm(grads)
            # Stack the per-tensor norms to compute every trust ratio in one go: (P,)
            w_n, g_n = torch.stack(w_norms), torch.stack(g_norms)
            trust = torch.where((w_n > 0) & (g_n > 0), eta * w_n / g_n, torch.ones_like(w_n))
            grads = torch._foreach_mul(grads, list(trust.unbind(0)))
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads, alpha=lr)
        torch._foreach_sub_(params, bufs)


# ---------------------------------------------------------------------------------------------
# Parameter groups and optimiser factory
# ---------------------------------------------------------------------------------------------


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into the three groups of METHOD.md 4.1, by module type and shape.

    - ``decay``: conv and linear weights; weight decay and the LARS trust ratio.
    - ``head``: the supervised head's weight (any ``SupervisedHead`` module); no trust ratio, but
      the spec's L2 term wd * sum w^2 / 2, i.e. ``weight_decay`` added to its gradient.
    - ``excluded``: normalisation parameters and every bias (any parameter of fewer than two
      dimensions); neither weight decay nor trust ratio.

    Names never decide the group, so a wrapper's prefix (``module.``, ``_orig_mod.``,
    ``model.``) changes nothing. Returns the non-empty groups as dicts with keys ``params``,
    ``names`` (for inspection), ``weight_decay`` and ``lars_exclude``; frozen parameters
    (``requires_grad=False``) are left out.
    """
    from .models.heads import SupervisedHead  # models does not import optim: no cycle

    groups = {
        "decay": {"params": [], "names": [], "weight_decay": weight_decay, "lars_exclude": False},
        "head": {"params": [], "names": [], "weight_decay": weight_decay, "lars_exclude": True},
        "excluded": {"params": [], "names": [], "weight_decay": 0.0, "lars_exclude": True},
    }
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if _is_norm(module) or p.ndim < 2:
                key = "excluded"
            elif isinstance(module, SupervisedHead):
                key = "head"
            else:
                key = "decay"
            groups[key]["params"].append(p)
            groups[key]["names"].append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return [g for g in groups.values() if g["params"]]


def build_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """Build ``"lars"``, ``"sgd"`` (momentum, optional Nesterov) or ``"adamw"`` over ``param_groups``.

    Each group carries its own weight decay (``param_groups``: BN and biases get none). SGD's
    weight decay is the coupled L2 gradient term (the spec's wd * sum w^2 / 2 loss term); AdamW's
    is decoupled.
    """
    groups = param_groups(model, weight_decay)
    if name == "lars":
        if nesterov:
            raise ValueError("LARS uses classic momentum (METHOD.md 4.1); nesterov is not supported")
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose from 'lars', 'sgd', 'adamw'")


# ---------------------------------------------------------------------------------------------
# Learning rate (METHOD.md 4.2)
# ---------------------------------------------------------------------------------------------


def scaled_lr(base_lr: float, batch_size: int, scaling: str) -> float:
    """Effective peak lr: ``linear`` base*B/256, ``sqrt`` base*sqrt(B), ``none`` base (METHOD.md 4.2)."""
    if scaling == "linear":
        return base_lr * batch_size / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if scaling == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling {scaling!r}; choose from 'linear', 'sqrt', 'none'")


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Learning rate at ``step`` (METHOD.md 4.2): linear warmup from 0 over ``warmup_steps``, then cosine
    decay from ``peak_lr`` to 0 at ``total_steps``. A pure function of the step, so resuming needs
    no scheduler state.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """A stage's learning rate: :func:`lr_at` with its peak, warmup and length fixed.

    ``schedule(step)`` is the rate of ``step``; every stage and the linear probes use this one
    schedule (the probes with ``warmup_steps=0``, plain cosine decay).
    """

    peak_lr: float
    warmup_steps: int
    total_steps: int
    # (step, new total) of each time a run was cut short (``engine.deadline``), in order
    shortened: tuple[tuple[int, int], ...] = ()

    def __call__(self, step: int) -> float:
        if not self.shortened or step < self.shortened[0][0]:
            return lr_at(step, self.total_steps, self.warmup_steps, self.peak_lr)
        return self.peak_lr * 0.5 * (1.0 + math.cos(math.pi * self._progress(step)))

    def shorten(self, at: int, total: int) -> Schedule:
        """The schedule of a run cut at step ``at`` (after the warmup) to end at ``total``: the same
        rates before ``at``; from there the cosine goes on from where it was and reaches 0 at
        ``total`` instead, so the rate has no jump. A pure function of the step, as before."""
        if at < self.warmup_steps or not at < total < self.end:
            raise ValueError(f"cannot cut a schedule ending at {self.end} to {total} at step {at}")
        return dataclasses.replace(self, shortened=(*self.shortened, (at, total)))

    @property
    def end(self) -> int:
        """The step at which the rate reaches 0: the total, or the last cut's."""
        return self.shortened[-1][1] if self.shortened else self.total_steps

    def _progress(self, step: int) -> float:
        """The cosine's progress (0 after the warmup, 1 at the end) at ``step``, through the cuts."""
        anchor, progress, end = self.warmup_steps, 0.0, self.total_steps
        for at, total in self.shortened:
            if step < at:
                break
            progress += (1.0 - progress) * (at - anchor) / max(end - anchor, 1)
            anchor, end = at, total
        return min(progress + (1.0 - progress) * (step - anchor) / max(end - anchor, 1), 1.0)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set ``lr`` on every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr

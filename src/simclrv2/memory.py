"""SimCLRv2 memory: a momentum (EMA) encoder and a queue of its projections as extra negatives.

METHOD.md 3.1: the paper adds a momentum-averaged "memory network" whose outputs are buffered as
extra negatives (64K buffer, EMA decay 0.999), worth about +1% linear eval; the official code
never released it and the exact mechanics are UNVERIFIED. This module follows MoCo v2, and is
off by default. Design choices (each one is ours, not the official code's):

- EMA model: a deep copy of the whole ``SimCLRModel`` (backbone + projection head, and the
  classifier if present, so its state matches the online model's keys), with
  ``requires_grad=False``. Only parameters are averaged,
  ``ema <- momentum * ema + (1 - momentum) * online`` with momentum 0.999, called after every
  optimizer step. Buffers (BN running statistics) are not averaged: as in MoCo's key encoder they
  evolve through the EMA model's own forward passes.
- BN mode: the EMA model always runs in train mode (batch statistics), as MoCo's key encoder
  does, so its projections are normalised like the online model's; a SyncBatchNorm online model
  gives a SyncBatchNorm EMA model (then every rank must call ``keys`` together).
- Which views: both views' EMA projections are enqueued (``keys(torch.cat([x1, x2]))``), i.e.
  2N keys per rank per step, gathered from all ranks (2N*R per step).
- Use: the queue supplies negatives only, for both loss directions (``nt_xent(...,
  extra_negatives=memory.negatives())``). Positives stay the online model's other view, exactly
  as in SimCLR; the EMA model is never used for anchors or positives.
- Order within a step: loss with the current queue -> backward -> optimizer step ->
  ``update_ema(model)`` -> ``enqueue(keys(x))``. The current batch's keys are therefore never
  negatives for their own images; they serve from the next step on.
- Queue: a ring buffer of L2-normalised float32 keys, 65536 slots on ImageNet, starting empty;
  ``negatives()`` returns only filled slots, so early steps do not see random vectors.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from simclrv2.distributed import all_gather


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


class MomentumMemory:
    """EMA copy of a ``SimCLRModel`` plus a ring buffer of its projections (module docstring).

    Args:
        model: the online model (may be wrapped in DDP); it is deep-copied.
        queue_size: number of stored negatives K (65536 on ImageNet).
        dim: projection dimension D (the head's output, 128).
        momentum: EMA decay (0.999).
    """

    def __init__(self, model: nn.Module, queue_size: int, dim: int, momentum: float = 0.999) -> None:
        if queue_size <= 0 or dim <= 0 or not 0.0 <= momentum <= 1.0:
            raise ValueError(
                f"invalid memory settings: queue_size={queue_size} dim={dim} momentum={momentum}"
            )
        self.ema_model = copy.deepcopy(_unwrap(model))
        self.ema_model.requires_grad_(False)
        self.ema_model.train()
        self.queue_size, self.dim, self.momentum = queue_size, dim, momentum
        device = next(self.ema_model.parameters()).device
        self.queue = torch.zeros(queue_size, dim, device=device)  # (K, D) ring buffer
        # Host-side counters: reading them needs no device sync; state_dict stores them as tensors.
        self.ptr = 0  # next slot to write
        self.filled = 0  # number of valid slots (== queue_size once it has wrapped)

    @torch.no_grad()
    def update_ema(self, model: nn.Module) -> None:
        """``ema <- momentum * ema + (1 - momentum) * online`` over parameters (after the optimizer step)."""
        online = [p.detach() for p in _unwrap(model).parameters()]
        ema = list(self.ema_model.parameters())
        if len(online) != len(ema):
            raise ValueError("model does not match the EMA model's architecture")
        torch._foreach_lerp_(ema, online, 1.0 - self.momentum)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` L2-normalised float32 projections of images ``x`` from the EMA model."""
        self.ema_model.train()  # batch-statistics BN, whatever mode a caller left it in
        _, z = self.ema_model.contrastive(x)
        return F.normalize(z.float(), dim=1)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Gather ``keys`` ``(B, D)`` from all ranks (rank order) and write them into the ring buffer.

        Handles batches that do not divide the queue size (the write wraps around) and batches
        larger than the queue (only the newest ``queue_size`` keys are kept).
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be (B, {self.dim}), got {tuple(keys.shape)}")
        keys = all_gather(keys.detach()).to(self.queue.dtype)  # (B*R, D), same on every rank
        b = keys.shape[0]
        if b >= self.queue_size:
            # Keep the newest keys at the slots a sequential write would have left them in.
            self.ptr = (self.ptr + b - self.queue_size) % self.queue_size
            keys, b = keys[-self.queue_size :], self.queue_size
        first = min(b, self.queue_size - self.ptr)
        self.queue[self.ptr : self.ptr + first] = keys[:first]
        if first < b:  # wrap around to the start
            self.queue[: b - first] = keys[first:]
        self.ptr = (self.ptr + b) % self.queue_size
        self.filled = min(self.filled + b, self.queue_size)

    def negatives(self) -> torch.Tensor:
        """``(K_filled, D)`` stored keys; before the first wrap only slots ``[0, filled)`` are valid."""
        return self.queue if self.filled == self.queue_size else self.queue[: self.filled]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat dict of tensors only (safetensors / ``torch.load(weights_only=True)`` friendly)."""
        state = {f"ema_model.{k}": v.detach().clone() for k, v in self.ema_model.state_dict().items()}
        state["queue"] = self.queue.clone()
        state["ptr"] = torch.tensor(self.ptr, dtype=torch.int64)
        state["filled"] = torch.tensor(self.filled, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from ``state_dict()`` output; the queue shape must match this memory's."""
        prefix = "ema_model."
        ema_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        self.ema_model.load_state_dict(ema_state, strict=True)
        if tuple(state["queue"].shape) != tuple(self.queue.shape):
            raise ValueError(f"queue shape {tuple(state['queue'].shape)} != {tuple(self.queue.shape)}")
        self.queue.copy_(state["queue"])
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])

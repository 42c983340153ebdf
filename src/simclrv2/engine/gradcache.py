"""Gradient cache: a contrastive step over a large batch in the memory of a small one.

Gao, Zhang, Han and Callan 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup" (arXiv:2101.06983). A contrastive loss couples every image of the batch, so
accumulating gradients over small batches changes the loss (fewer negatives). The cache keeps it:

1. encode the batch chunk by chunk without autograd, keeping only the outputs (projections);
2. compute the loss once over all of them, and its gradient w.r.t. each output;
3. encode each chunk again with autograd and backpropagate the cached gradient through it.

The loss and parameter gradients are those of the whole batch, for one extra forward pass.

BatchNorm (METHOD.md 3.2): a chunk is normalised with its own batch statistics in both passes
(ghost BN, the chunk being the ghost batch), and the running statistics are updated once per
chunk, in the second pass only: :func:`batch_stats_without_update` keeps the first pass from
touching them. Under SyncBatchNorm, every chunk's statistics are synchronised across processes.

This module holds the model-agnostic parts; ``engine.pretrain.chunked_contrastive_step`` wires
them to NT-Xent, the memory queue and the online probe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn


def chunk_rows(n_images: int, chunk_size: int, device: torch.device | None = None) -> list[torch.Tensor]:
    """Row indices into a view-major ``(2N, ...)`` batch (view 1 of N images, then view 2), one
    tensor per chunk: both views of ``chunk_size`` consecutive images (the last chunk may be
    smaller). A chunk is thus what a step at batch ``chunk_size`` would encode in one pass.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    out = []
    for start in range(0, n_images, chunk_size):
        images = torch.arange(start, min(start + chunk_size, n_images), device=device)
        out.append(torch.cat([images, images + n_images]))  # (2c,) view 1 rows, then view 2 rows
    return out


def take_rows(x: torch.Tensor, rows: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """``x[rows]``, kept in channels_last layout when the run asks for it (indexing may drop it)."""
    out = x.index_select(0, rows)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def scatter_rows(parts: Sequence[torch.Tensor], chunks: Sequence[torch.Tensor], n_rows: int) -> torch.Tensor:
    """The inverse of :func:`take_rows` over all chunks: ``(n_rows, ...)`` with ``parts[k]`` at ``chunks[k]``."""
    first = parts[0]
    out = first.new_empty((n_rows, *first.shape[1:]))
    out.index_copy_(0, torch.cat(list(chunks)), torch.cat(list(parts)))
    return out


@contextlib.contextmanager
def batch_stats_without_update(module: nn.Module) -> Iterator[None]:
    """BN layers in train mode normalise with batch statistics but leave their running statistics
    (and ``num_batches_tracked``) untouched, for the gradient cache's first pass.

    torch's BN (SyncBatchNorm included) passes no running buffers to the kernel when
    ``track_running_stats`` is off in train mode, so batch statistics are computed exactly as
    usual and nothing is written. Layers in eval mode keep using their running statistics.
    """
    switched = [m for m in module.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


def sync_unless_last(module: nn.Module, last: bool) -> contextlib.AbstractContextManager[None]:
    """DDP's ``no_sync()`` for every chunk's backward but the last: gradients accumulate locally
    and the last backward all-reduces their sum once, as in one backward over the whole batch."""
    no_sync: Callable[[], contextlib.AbstractContextManager[None]] | None = getattr(module, "no_sync", None)
    return contextlib.nullcontext() if last or no_sync is None else no_sync()


@torch.no_grad()
def encode_without_grad(encode: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], module: nn.Module,
                        views: torch.Tensor, chunks: Sequence[torch.Tensor], channels_last: bool = False,
                        ) -> tuple[torch.Tensor, ...]:
    """Step 1: ``encode`` (a forward of ``module``) over each chunk of ``views`` without autograd,
    BN running statistics untouched; returns each output reassembled in the rows of ``views``."""
    outs = []
    with batch_stats_without_update(module):
        for rows in chunks:
            outs.append(encode(take_rows(views, rows, channels_last)))
    return tuple(scatter_rows([o[i] for o in outs], chunks, views.shape[0]) for i in range(len(outs[0])))


def backward_through_chunks(module: nn.Module, chunks: Sequence[torch.Tensor],
                            surrogate: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Step 3: for each chunk, ``surrogate(rows)`` runs ``module`` on the chunk with autograd and
    returns a scalar whose gradient w.r.t. the chunk's outputs is the cached one (typically
    ``(z_chunk * cached_grad[rows]).sum()``); its backward accumulates into the parameters'
    ``.grad``. Under DDP only the last chunk's backward all-reduces (:func:`sync_unless_last`)."""
    for k, rows in enumerate(chunks):
        with sync_unless_last(module, last=k == len(chunks) - 1):
            surrogate(rows).backward()

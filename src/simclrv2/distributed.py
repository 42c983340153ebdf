"""Distributed helpers that degrade to one process.

Every helper returns the single-process answer when no process group is initialised, so library
code (losses, memory, engine) can call them unconditionally. ``setup_distributed`` is the only
function in the package that reads the torchrun environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), apart from ``launch_rank``, which reads ``RANK``
before a process group exists; launch multi-process runs with ``torchrun``.

Gradient convention (METHOD.md 3, step 3 and step 7). The official TF code gathers embeddings with a
differentiable all-reduce, divides each replica's loss by the replica count and *sums* gradients
across replicas. PyTorch DDP instead *averages* gradients. Both give the gradient of

    L = (1/R) * sum_r L_r,   L_r = mean over rank r's local anchors,

which equals the single-process loss on the full global batch (equal local batch sizes). To get
there with DDP, each rank's loss is NOT divided by the world size, and ``gather_with_grad`` sums
the incoming gradient over ranks in backward (see its docstring).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# Set by setup_distributed (the torchrun LOCAL_RANK); the process group does not know it.
_LOCAL_RANK = 0
# The gloo group that ranks wait in while rank 0 works alone (run_on_main), made on first use.
_WAIT_GROUP: Any = None
# Set inside alone(): the helpers answer as one process although a process group exists.
_ALONE = False


class DeviceMismatchError(RuntimeError):
    """The ranks of one job resolved different kinds of device; the message is one line with the fix."""


def _group_exists() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_dist() -> bool:
    """True when a default process group exists (and this process is not working :func:`alone`)."""
    return not _ALONE and _group_exists()


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Within it, every helper here answers as one process (rank 0 of 1, no collective), whether or
    not a process group exists; on leaving, as before.

    For work that one rank does by itself while the others wait, such as the budget's measurement
    of a training step: built inside, the step has no DDP wrapper and gathers nothing across ranks,
    so it makes no collective call that the waiting ranks would have to join. The process group
    itself is not touched.
    """
    global _ALONE
    before, _ALONE = _ALONE, True
    try:
        yield
    finally:
        _ALONE = before


def rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    """Rank on this node, as given by torchrun to ``setup_distributed`` (0 otherwise)."""
    return _LOCAL_RANK if is_dist() else 0


def is_main() -> bool:
    """True on the process that logs and writes checkpoints."""
    return rank() == 0


def launch_rank() -> int:
    """Global rank, also before the process group exists: torchrun's ``RANK`` (0 without torchrun).

    The pipeline takes its run folder's lock before any stage initialises the process group.
    """
    return rank() if is_dist() else int(os.environ.get("RANK", "0"))


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects); ``obj`` itself in one process."""
    if not is_dist() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for all processes; no-op in one process."""
    if is_dist():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (picklable); ``obj`` itself in one process."""
    if not (is_dist() and world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's (picklable) ``obj``, in rank order; ``[obj]`` in one process."""
    if not (is_dist() and world_size() > 1):
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def run_on_main(work: Callable[[], T], wait: datetime.timedelta = datetime.timedelta(days=1)) -> T:
    """``work()`` on rank 0 alone, its (picklable) result on every rank; ``work()`` in one process.

    For work that is done once (training a linear-eval head) while the other ranks wait. They wait
    in a gloo group of their own, for up to ``wait``: in the default group, NCCL's 10-minute timeout
    would kill them during an hour-long evaluation. An exception on rank 0 is raised there and, as
    a one-line RuntimeError, on the others.
    """
    global _WAIT_GROUP
    if not is_dist() or world_size() == 1:
        return work()
    if _WAIT_GROUP is None:  # collective: every rank gets here, in the same order
        _WAIT_GROUP = dist.new_group(backend="gloo", timeout=wait)
    box: list[Any] = [None]
    error: BaseException | None = None
    if is_main():
        try:
            box = [("ok", work())]
        except BaseException as e:  # sent on, then raised here too: the others must not wait on
            error, box = e, [("error", f"{type(e).__name__}: {e}")]
    dist.broadcast_object_list(box, src=0, group=_WAIT_GROUP)
    if error is not None:
        raise error
    kind, value = box[0]
    if kind == "error":
        raise RuntimeError(f"rank 0 stopped: {value}")
    return value


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over all processes, for metrics (not differentiable; ``t`` is not modified)."""
    out = t.detach().clone()
    if is_dist() and world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= world_size()
    return out


@torch.no_grad()
def sum_grads(params: Iterable[torch.Tensor]) -> None:
    """Each parameter's ``.grad`` replaced by its sum over all processes, in one collective.

    For a small model that every rank holds and steps alike, each rank computing its gradient from
    its share of the batch (what DDP does, without the wrapper: a rank whose share is empty runs no
    forward, and its missing gradients count as zeros). In one process the gradients stay as they are.
    """
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not is_dist() or world_size() == 1:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for p, summed in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(summed.view_as(p.grad))


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks in rank order; no gradient."""
    if not is_dist() or world_size() == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def collective_device() -> torch.device:
    """Where tensors for a collective must live: the bound GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_range(n: int) -> range:
    """This rank's contiguous share of ``range(n)``: ranks in order, ``ceil(n / R)`` each, the last
    ones shorter (or empty); the whole range in one process."""
    per = -(-n // world_size())
    return range(min(rank() * per, n), min((rank() + 1) * per, n))


@torch.no_grad()
def gather_rows(x: torch.Tensor, chunk_rows: int = 16384) -> torch.Tensor:
    """Rows of ``x`` from every rank, concatenated in rank order, on the CPU; ``x`` itself in one process.

    Ranks may hold different numbers of rows (``shard_range``'s last shares are shorter); the other
    dimensions and the dtype must agree. Each collective moves at most ``chunk_rows`` rows per rank
    (padded to equal length), so a large gather never holds the whole result on a GPU.
    """
    if not is_dist() or world_size() == 1:
        return x
    device = collective_device()
    counts = all_gather(torch.tensor([len(x)], device=device)).tolist()  # rows per rank
    parts: list[list[torch.Tensor]] = [[] for _ in counts]
    for start in range(0, max(counts), chunk_rows):
        rows = min(chunk_rows, max(counts) - start)
        block = torch.zeros((rows, *x.shape[1:]), dtype=x.dtype, device=device)
        mine = x[start : start + rows]
        block[: len(mine)] = mine.to(device)
        for r, got in enumerate(all_gather(block).split(rows)):
            parts[r].append(got[: max(0, min(counts[r] - start, rows))].cpu())
    return torch.cat([p for rank_parts in parts for p in rank_parts])


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums gradients over ranks and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ws = world_size()
        ctx.rank, ctx.n = rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ws)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # (R*N, ...) rank 0 rows first

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # grad_out on rank r is dL_r/d(gathered). Rows of rank s's slice are rank s's x, so the
        # gradient of sum_r L_r w.r.t. x_s is the sum over ranks of that slice.
        grad = grad_out.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Differentiable all-gather: ``(N, ...)`` per rank -> ``(R*N, ...)`` in rank order (METHOD.md 3, step 3).

    Forward concatenates every rank's tensor (all ranks must pass the same shape, hence
    ``drop_last`` in the sampler). Backward all-reduces (sums) the incoming gradient and returns
    this rank's slice, so ``x.grad`` on rank s is ``sum_r dL_r/dx_s``: negatives that rank r drew
    from rank s's batch pass their gradient back to rank s, as the TF all-reduce gather does.

    Why this is correct with DDP: DDP averages parameter gradients, so the update follows
    ``(1/R) sum_s sum_r dL_r/dx_s * dx_s/dtheta = d/dtheta [(1/R) sum_r L_r]``, i.e. the gradient of
    the mean of the per-rank losses, which is the full-batch loss of one process. Hence each rank
    must NOT divide its loss by R (TF divides because it sums gradients instead of averaging).
    Note ``x.grad`` itself is R times the full-batch gradient of that slice; only after DDP's
    averaging of parameter gradients does everything match the single-process run.

    Without a process group (or with one rank) this is the identity.
    """
    if not is_dist() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def setup_distributed(device: str) -> torch.device:
    """Initialise from the torchrun environment; return the device this process should use.

    ``device`` is ``"cuda"``, ``"cpu"``, ``"cuda:k"`` or ``"auto"`` (cuda when available).
    With ``WORLD_SIZE > 1`` this calls ``init_process_group`` (nccl on cuda, gloo on cpu; the
    ``env://`` method reads ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``) and binds the
    process to ``cuda:LOCAL_RANK``. Otherwise it only resolves the device. Before choosing the
    backend, the ranks compare their devices through the rendezvous store
    (:func:`_agree_on_device`): a job never mixes GPU and CPU ranks.
    """
    global _LOCAL_RANK
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return torch.device(device)
    _LOCAL_RANK = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = torch.device(device).type == "cuda"
    if not _group_exists():
        rank_ = int(os.environ["RANK"])
        store, _, _ = next(dist.rendezvous("env://", rank=rank_, world_size=ws))  # what init_method="env://" reads
        _agree_on_device(store, torch.device(device).type, rank_, ws)
        if on_cuda:
            torch.cuda.set_device(_LOCAL_RANK)
        # device_id binds NCCL to our GPU up front (avoids barrier() guessing the device).
        extra = {"device_id": torch.device("cuda", _LOCAL_RANK)} if on_cuda else {}
        dist.init_process_group(
            backend="nccl" if on_cuda else "gloo",
            store=dist.PrefixStore("default_pg", store),  # the prefix init_method="env://" would give it
            rank=rank_,
            world_size=ws,
            **extra,
        )
    elif on_cuda:
        torch.cuda.set_device(_LOCAL_RANK)
    return torch.device("cuda", _LOCAL_RANK) if on_cuda else torch.device("cpu")


def _agree_on_device(store: Any, kind: str, rank_: int, ws: int) -> None:
    """Every rank's device kind through the rendezvous store, before the process group exists.

    Ranks that resolved different devices (``device=auto`` on a node whose driver is too old for
    this torch build, say) would pick NCCL on some and gloo on others and wait for each other until
    the timeout. They all stop here instead, with one line naming which rank took which.
    """
    prefix = f"simclrv2/device/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    store.set(f"{prefix}{rank_}", f"{kind} {socket.gethostname()}")
    seen = [store.get(f"{prefix}{r}").decode().split(" ", 1) for r in range(ws)]  # waits for every rank
    kinds = sorted({k for k, _ in seen})
    if len(kinds) == 1:
        return
    where = "; ".join(
        f"{k} on rank(s) {','.join(str(r) for r, (kr, _) in enumerate(seen) if kr == k)} "
        f"(host {','.join(sorted({h for kr, h in seen if kr == k}))})" for k in kinds
    )
    raise DeviceMismatchError(
        f"the ranks resolved different devices ({where}); every rank must train on the same kind: "
        "make the GPUs usable on every node (nvidia-smi; a torch build that matches the driver) or set device=cpu"
    )


def cleanup_distributed() -> None:
    """Destroy the process group (and run_on_main's) if one exists."""
    global _WAIT_GROUP
    if _group_exists():
        dist.destroy_process_group()
    _WAIT_GROUP = None

"""Chunked contrastive steps through a gradient cache (issue 32, Gao et al. 2021).

Every comparison runs a real pretraining step (``engine.pretrain``'s functions) on a tiny ResNet
and real Fashion-MNIST images, against a reference that never chunks (BN in eval mode, where a
chunk changes nothing) or that runs the model on each chunk separately with autograd (BN in train
mode: ghost BN, the definition the cache must reproduce). "Relative" differences are
``|a - b| / |b|`` over whole tensors (Frobenius norms).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from simclrv2 import checkpoint as ckpt
from simclrv2 import config as C
from simclrv2 import distributed as sdist
from simclrv2.config import PretrainConfig
from simclrv2.data.augment import SimCLRAugment
from simclrv2.data.builtin import load_fashion_mnist
from simclrv2.engine import gradcache
from simclrv2.engine.device import step_generator
from simclrv2.engine.pretrain import (
    ContrastiveStep,
    OnlineProbe,
    PretrainParts,
    chunked_contrastive_step,
    contrastive_loss,
    contrastive_views,
)
from simclrv2.losses import nt_xent
from simclrv2.memory import MomentumMemory
from simclrv2.models.registry import create_model
from simclrv2.optim import build_optimizer

pytestmark = pytest.mark.fashion_mnist

BATCH, QUEUE, MODEL = 16, 48, "r10_0.25x_sk0"
CPU = torch.device("cpu")
NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)


def images(n: int = BATCH, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ds = load_fashion_mnist("test")
    return ds.images[offset : offset + n], ds.labels[offset : offset + n]


def make_parts(probe: bool, memory: bool, aug=None, streams: bool = False) -> PretrainParts:
    """What ``pretrain.run`` builds, for a 28 px one-channel model; the same weights on every call."""
    torch.manual_seed(0)
    model = create_model(MODEL, in_chans=1, cifar_stem=False)
    step_module = ContrastiveStep(model, 10, probe)
    mem = None
    if memory:  # a queue already holding negatives, the same on every rank
        mem = MomentumMemory(model, QUEUE, PretrainConfig().proj_out_dim, momentum=0.9)
        filled = QUEUE // 2  # written directly: enqueue would gather from every rank
        mem.queue[:filled] = F.normalize(torch.randn(filled, mem.dim, generator=torch.Generator().manual_seed(1)), dim=1)
        mem.ptr = mem.filled = filled
    return PretrainParts(
        model=model, step_module=step_module, train_module=step_module,
        optimizer=build_optimizer("lars", model, 0.3, 1e-4),
        probe=OnlineProbe(step_module.classifier) if probe else None, memory=mem,
        aug=aug if aug is not None else SimCLRAugment(28, crop_scale=(0.2, 1.0)),
        source=SimpleNamespace(streams=streams), monitor=None, size=28,
    )


@torch.no_grad()
def bn_eval(p: PretrainParts) -> None:
    """Train mode everywhere but BN, which normalises with running statistics (chunks then change
    nothing). The statistics are first set to those of 64 other images, so that activations and
    gradients have their usual scale (with the initial mean 0 / variance 1 the loss saturates and
    the gradients are rounding noise)."""
    bns = [m for m in p.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    p.step_module.train()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: one batch sets the statistics
    p.model.contrastive(images(64, offset=1000)[0].float() / 255)
    for m in bns:
        m.eval()


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in module.named_parameters() if p.grad is not None}


def single_pass(cfg: PretrainConfig, p: PretrainParts, x, y, step: int = 0):
    p.step_module.zero_grad(set_to_none=True)
    loss, stats, keys = contrastive_loss(cfg, p, contrastive_views(cfg, p, x, step_generator(CPU, cfg.seed, step)), y)
    loss.backward()
    return loss.detach(), stats, keys, grads(p.step_module)


def chunked(cfg: PretrainConfig, p: PretrainParts, x, y, step: int = 0):
    p.step_module.zero_grad(set_to_none=True)
    loss, stats, keys = chunked_contrastive_step(cfg, p, contrastive_views(cfg, p, x, step_generator(CPU, cfg.seed, step)), y, NO_SCALER)
    return loss, stats, keys, grads(p.step_module)


def rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(floor))


def assert_close_rel(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float) -> None:
    """Every tensor within ``tol`` relative; tensors that are numerically zero (e.g. the bias of a
    zero-initialised residual BN, ~1e-14) are measured against 1e-6 of the largest tensor instead."""
    assert got.keys() == want.keys()
    floor = 1e-6 * max(float(v.double().norm()) for v in want.values())
    worst = max(got, key=lambda k: rel(got[k], want[k], floor))
    assert rel(got[worst], want[worst], floor) <= tol, \
        f"{worst}: relative difference {rel(got[worst], want[worst], floor):.2e}"


@pytest.mark.parametrize("memory", [False, True], ids=["plain", "memory"])
def test_chunked_step_equals_single_pass_with_bn_in_eval_mode(memory: bool) -> None:
    x, y = images()
    p = make_parts(probe=True, memory=memory)
    bn_eval(p)
    want_loss, want_stats, want_keys, want = single_pass(PretrainConfig(), p, x, y)
    assert len(want) == len(list(p.step_module.parameters()))  # encoder, head and probe
    for chunks in (2, 4):
        cfg = PretrainConfig(chunk_size=BATCH // chunks)
        loss, stats, keys, got = chunked(cfg, p, x, y)
        assert rel(loss, want_loss) <= 1e-5
        assert_close_rel(got, want, 1e-5)
        assert stats.keys() == want_stats.keys()
        for k in stats:
            torch.testing.assert_close(stats[k], want_stats[k].detach(), rtol=1e-4, atol=1e-4)
        if memory:  # what enters the queue is what a single pass computes
            assert torch.equal(keys, want_keys)


def ghost_bn_reference(cfg: PretrainConfig, p: PretrainParts, x, y, chunk: int):
    """The definition: the model run on each chunk (both views of ``chunk`` images) separately
    with autograd, the projections put back in batch order, one loss, one backward."""
    p.step_module.zero_grad(set_to_none=True)
    views = contrastive_views(cfg, p, x, step_generator(CPU, cfg.seed, 0))
    n = x.shape[0]
    feats, z = torch.zeros(2 * n, p.model.backbone.feature_dim), torch.zeros(2 * n, cfg.proj_out_dim)
    for start in range(0, n, chunk):
        rows = list(range(start, start + chunk)) + list(range(n + start, n + start + chunk))
        feats[rows], z[rows] = p.model.contrastive(views[rows])
    loss, _ = nt_xent(*z.chunk(2), cfg.temperature, extra_negatives=p.memory.negatives() if p.memory else None)
    f = feats.detach()
    logits = p.step_module.classifier((f - f.mean(0)) / (f.std(0) + 1e-5))
    loss = loss + F.cross_entropy(logits, y.repeat(2))
    loss.backward()
    return loss.detach(), grads(p.step_module)


def bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.named_buffers() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("memory", [False, True], ids=["plain", "memory"])
def test_chunked_step_in_train_mode_is_ghost_bn_with_one_update_per_chunk(memory: bool) -> None:
    x, y = images()
    chunk = BATCH // 4
    p, ref = make_parts(probe=True, memory=memory), make_parts(probe=True, memory=memory)
    before = bn_buffers(p.model)
    loss, _, _, got = chunked(PretrainConfig(chunk_size=chunk), p, x, y)
    want_loss, want = ghost_bn_reference(PretrainConfig(), ref, x, y, chunk)
    assert rel(loss, want_loss) <= 1e-5
    assert_close_rel(got, want, 1e-5)
    after, want_after = bn_buffers(p.model), bn_buffers(ref.model)
    assert all(int(v) == 4 for k, v in after.items() if k.endswith("num_batches_tracked"))  # 4 chunks, not 8
    assert_close_rel({k: v - before[k] for k, v in after.items() if "running" in k},
                     {k: v - before[k] for k, v in want_after.items() if "running" in k}, 1e-5)
    # and not the single pass's statistics: the chunk is the BN batch
    single = make_parts(probe=True, memory=memory)
    single_loss, *_ = single_pass(PretrainConfig(), single, x, y)
    assert rel(loss, single_loss) > 1e-4


def test_first_pass_leaves_running_statistics_alone() -> None:
    model = create_model(MODEL, in_chans=1, cifar_stem=False).train()
    before = bn_buffers(model)
    x = images(8)[0].float() / 255
    with gradcache.batch_stats_without_update(model), torch.no_grad():
        z_free = model.contrastive(x)[1]
    assert all(torch.equal(v, before[k]) for k, v in bn_buffers(model).items())
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    with torch.no_grad():
        assert torch.equal(model.contrastive(x)[1], z_free)  # the same batch statistics


def test_bf16_and_channels_last_chunked_step_matches_single_pass() -> None:
    from simclrv2.engine.device import autocast

    x, y = images()
    p = make_parts(probe=True, memory=True)
    bn_eval(p)
    p.model.to(memory_format=torch.channels_last)
    cfg = PretrainConfig(chunk_size=4, precision="bf16", channels_last=True)
    with autocast(CPU, "bf16"):
        p.step_module.zero_grad(set_to_none=True)
        want_loss, _, _ = contrastive_loss(cfg, p, contrastive_views(cfg, p, x, step_generator(CPU, cfg.seed, 0)), y)
    want_loss.backward()
    want = grads(p.step_module)
    loss, _, _, got = chunked(cfg, p, x, y)
    assert got["model.backbone.stem.conv1.weight"].dtype == torch.float32
    assert rel(loss, want_loss.detach()) <= 1e-3
    assert_close_rel(got, want, 2e-2)  # bf16 activations of other batch shapes: close, not equal


@pytest.mark.slow
def test_thirty_lars_steps_reach_the_single_pass_weights() -> None:
    x_all, y_all = images(30 * 8)
    runs = {}
    for chunk_size in (0, 2):  # batch 8 in 4 chunks of 2 images
        p = make_parts(probe=True, memory=False)
        cfg = PretrainConfig(chunk_size=chunk_size)
        bn_eval(p)
        for step in range(30):
            x, y = x_all[step * 8 : (step + 1) * 8], y_all[step * 8 : (step + 1) * 8]
            (chunked if chunk_size else single_pass)(cfg, p, x, y, step)
            p.optimizer.step()
            p.probe.optimizer.step()
        runs[chunk_size] = {k: v.detach().clone() for k, v in p.step_module.state_dict().items()}
    start = make_parts(probe=True, memory=False).step_module.state_dict()
    moved = [k for k in start if k in runs[0] and not torch.equal(start[k], runs[0][k])]
    assert len(moved) > 10  # the run trained
    assert_close_rel(runs[2], runs[0], 1e-4)


def test_grad_accum_error_names_chunk_size() -> None:
    with pytest.raises(C.ConfigError, match="chunk_size"):
        C.validate(PretrainConfig(grad_accum_steps=2))
    with pytest.raises(C.ConfigError, match="chunk_size must be >= 0"):
        C.validate(PretrainConfig(chunk_size=-1))


@pytest.mark.slow
def test_resume_mid_run_with_chunks_is_bitwise(tmp_path: Path, capsys) -> None:
    from test_resume import PRETRAIN, assert_same_checkpoint, cli, metric_lines

    extra = ["chunk_size=4", "memory.enabled=true", "memory.size=128"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    cli(*PRETRAIN, *extra, f"run_dir={whole}")
    cli(*PRETRAIN, *extra, f"run_dir={split}", "max_steps=5")
    cli(*PRETRAIN, *extra, f"run_dir={split}")
    assert f"resuming from {split / 'checkpoints' / 'step-00000005'} at step 5" in capsys.readouterr().err
    assert_same_checkpoint(ckpt.latest_checkpoint(whole), ckpt.latest_checkpoint(split))
    assert metric_lines(whole) == metric_lines(split)


# Two gloo processes, each with half of the batch, against one process with all of it. The views
# are cut once here and handed to the step as a streaming source's crops, so that both halves see
# exactly the views of the whole batch.
WORLD = 2


def fixed_views(x: torch.Tensor, generator: torch.Generator | None = None, cropped: bool = True) -> torch.Tensor:
    return x  # the crops are already the views


def whole_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """``(2N, 1, 28, 28)`` views (view 1 of every image, then view 2) and ``(N,)`` labels."""
    x, y = images()
    aug, g = SimCLRAugment(28, crop_scale=(0.2, 1.0)), torch.Generator().manual_seed(5)
    return torch.cat([aug(x, generator=g), aug(x, generator=g)]), y


def local_half(views: torch.Tensor, y: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = BATCH // WORLD
    mine = slice(rank * n, (rank + 1) * n)
    return torch.cat([views[:BATCH][mine], views[BATCH:][mine]]), y[mine]


def ddp_worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sdist.setup_distributed("cpu")
    x, y = local_half(*whole_batch(), rank)
    result = {}
    for memory in (False, True):
        p = make_parts(probe=False, memory=memory, aug=fixed_views, streams=True)
        bn_eval(p)
        p.train_module = nn.parallel.DistributedDataParallel(p.step_module)
        reductions = []  # one call per gradient bucket all-reduced

        def counting_hook(state, bucket, calls=reductions):
            calls.append(1)
            return allreduce_hook(state, bucket)

        p.train_module.register_comm_hook(None, counting_hook)
        for chunk_size in (0, 0, 4, 2):  # one pass twice (DDP settles its buckets after the first)
            reductions.clear()
            step = chunked if chunk_size else single_pass
            loss, _, _, got = step(PretrainConfig(chunk_size=chunk_size), p, x, y)
            result[memory, chunk_size] = {"loss": sdist.all_reduce_mean(loss), "grads": got,
                                          "reductions": len(reductions)}
    sdist.barrier()
    sdist.cleanup_distributed()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_processes_in_chunks_equal_one_process_with_the_whole_batch(tmp_path: Path) -> None:
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method=method)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    x, y = whole_batch()
    for memory in (False, True):
        p = make_parts(probe=False, memory=memory, aug=fixed_views, streams=True)
        bn_eval(p)
        want_loss, _, _, want = single_pass(PretrainConfig(), p, x, y)
        for res in results:
            one_pass = res[memory, 0]["reductions"]
            assert one_pass >= 1
            for chunk_size in (4, 2):  # 2 and 4 chunks of each process's 8 images
                got = res[memory, chunk_size]
                assert rel(got["loss"], want_loss) <= 1e-5
                assert_close_rel(got["grads"], want, 1e-5)
                assert got["reductions"] == one_pass  # one all-reduce per step, not one per chunk


@pytest.mark.slow
def test_memory_benchmark_measures_both_steps_and_refuses_what_cannot_fit(capsys) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gradcache_memory as bench

    tiny = ["--model", MODEL, "--image-size", "16", "--channels", "1", "--batch", "16", "--chunk", "4"]
    bench.main(tiny)
    out = capsys.readouterr().out
    assert "chunk_size=4: peak" in out and "no chunks: peak" in out and "chunks / no chunks:" in out
    bench.main([*tiny, "--memory-limit-gb", "0.1"])  # a Python process with torch alone is larger
    out = capsys.readouterr().out
    assert "chunk_size=4: peak" in out and "estimated at" in out
    assert "not run: the estimate" in out and "no chunks: peak" not in out


def test_scaled_cached_gradients_unscale_to_the_single_pass_ones() -> None:
    """fp16's scaler, on the CPU in fp32: the cached gradients are those of the scaled loss, so the
    whole step's gradients are scaled once, and unscaling gives the unscaled step's."""
    x, y = images()
    p = make_parts(probe=True, memory=True)
    bn_eval(p)
    _, _, _, want = single_pass(PretrainConfig(), p, x, y)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    p.step_module.zero_grad(set_to_none=True)
    chunked_contrastive_step(PretrainConfig(chunk_size=4), p, contrastive_views(PretrainConfig(chunk_size=4), p, x, step_generator(CPU, 0, 0)), y, scaler)
    scaled = grads(p.step_module)
    assert_close_rel({k: v / 2.0**10 for k, v in scaled.items()}, want, 1e-5)
    scaler.unscale_(p.optimizer)
    scaler.unscale_(p.probe.optimizer)
    assert_close_rel(grads(p.step_module), want, 1e-5)

"""GPU pretraining benchmark: ResNet-50 1x, 224 px, batch 256, ours vs lightly vs the backbone (issue 9).

    python benchmarks/gpu_benchmark.py            # one H100/H200: about 3 minutes
    python benchmarks/gpu_benchmark.py --smoke    # CPU: tiny model and batch (what the tests run)

The rows are benchmarks/throughput.py's pipelines on synthetic in-memory 224 px images (ours: the
pretraining stage's own step, ``engine.pretrain.contrastive_views`` and ``train_step``, with the
uint8 pool on the GPU and batched augmentation there; lightly, when it is installed (the row is
skipped with a note otherwise): per-image PIL transforms in DataLoader
workers, pinned memory, non-blocking copies). For each row it reports images/s (two views each),
the model FLOPs of one step counted with ``torch.utils.flop_counter.FlopCounterMode`` (forward +
backward of backbone, head and loss on pre-made views: the augmentation is not counted), the
achieved TFLOP/s, MFU against the card's dense bf16 peak (``PEAK_BF16_TFLOPS``) and the peak GPU
memory. Then it searches the largest batch of our full step (augmentation included) that fits, with
and without activation checkpointing: doubling from the benchmark batch, then bisecting, with OOM
handling and a time budget per search.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

from simclrv2.engine.device import fast_cuda_settings  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's H100 / H200 datasheets (the datasheets
# print the 2:4-sparsity numbers; dense is half): SXM 1979 -> 989.4, NVL 1671 -> 835.5 (both cards),
# H100 PCIe 1513 -> 756.5 TFLOP/s. Matched against torch.cuda.get_device_name, most specific first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.5),
    ("H100 NVL", 835.5),
    ("H200 NVL", 835.5),
    ("H100", 989.4),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4),  # SXM
)


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a known card, or None."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def count_flops(runner: Any) -> int:
    """FLOPs of one model step (forward + backward, optimizer excluded) on pre-made inputs."""
    inputs = runner.premade()
    runner.flop_step(inputs)  # warm: lazy state (LARS buffers, cuDNN plans) is not part of the count
    counter = FlopCounterMode(display=False)
    with counter:
        runner.flop_step(inputs)
    return counter.get_total_flops()


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class BatchSearch:
    largest: int  # largest batch that ran a full step (0: not even the first try)
    first_failure: int | None  # smallest batch seen to fail (None: none failed)
    reason: str  # why first_failure failed ("" if none did)
    tries: int
    seconds: float
    complete: bool  # False: the time budget or max_batch stopped the search first


def largest_batch(
    fits: Callable[[int], str | None],
    start: int,
    max_batch: int,
    budget_s: float,
    granularity: int = 8,
    resolution: float = 1 / 16,
    clock: Callable[[], float] = time.monotonic,
) -> BatchSearch:
    """Largest batch for which ``fits(b)`` returns None (else a failure reason).

    Doubles from ``start`` until a failure or ``max_batch``, then bisects between the largest
    success and the smallest failure until they are ``max(granularity, resolution * good)`` apart,
    trying multiples of ``granularity``. Stops when ``budget_s`` is spent (after the running try; the
    first try always runs).
    """
    t0 = clock()
    good, bad, reason, tries = 0, None, "", 0
    spent = False

    def attempt(b: int) -> bool:
        nonlocal good, bad, reason, tries
        tries += 1
        why = fits(b)
        if why is None:
            good = max(good, b)
            return True
        if bad is None or b < bad:
            bad, reason = b, why
        return False

    b = max(1, min(start, max_batch))
    while True:
        if tries and clock() - t0 > budget_s:  # the first try always runs
            spent = True
            break
        if not attempt(b) or b >= max_batch:
            break
        b = min(2 * b, max_batch)
    while bad is not None and not spent and bad - good > max(granularity, resolution * good):
        if clock() - t0 > budget_s:
            spent = True
            break
        mid = (good + bad) // 2
        mid = max(good + 1, mid - mid % granularity) if mid > granularity else mid
        if mid >= bad or mid <= good:
            break
        attempt(mid)
    complete = not spent and (good >= max_batch or bad is not None)
    return BatchSearch(good, bad, reason, tries, clock() - t0, complete)


def batch_search(
    ours: tp.OursStep, checkpointing: bool, max_batch: int, budget_s: float
) -> tuple[BatchSearch, dict[int, float]]:
    """Largest batch of our full step (augmentation + update) with checkpointing on or off.

    Returns the search and the peak memory (GiB) of every batch that fitted.
    """
    device = ours.device
    ours.model.set_grad_checkpointing(checkpointing)
    # every try is a new shape: cuDNN autotuning would re-run (and allocate workspaces) for each
    benchmark_mode = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    peaks: dict[int, float] = {}
    step = [1000]

    def fits(b: int) -> str | None:
        step[0] += 1
        free_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            views, y = ours.views(step[0], batch=b)
            ours.update(views, y, step[0])
            del views, y
            tp.sync(device)
        except Exception as err:  # OOM, or a kernel's size limit at huge batches: both "do not fit"
            kind = "OOM" if is_oom(err) else type(err).__name__
            why = f"{kind}: {str(err).splitlines()[0][:120]}"
        else:
            why = None
            if device.type == "cuda":
                peaks[b] = torch.cuda.max_memory_allocated(device) / 2**30
        ours.optimizer.zero_grad(set_to_none=True)
        free_memory(device)
        return why

    try:
        return largest_batch(fits, ours.cfg.batch_size, max_batch, budget_s), peaks
    finally:
        ours.model.set_grad_checkpointing(False)
        torch.backends.cudnn.benchmark = benchmark_mode


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU-sized run: tiny model, batch 8, 1 step")
    p.add_argument("--model", default="r50_1x_sk0")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 4) - 2),
                   help="lightly DataLoader workers (default: all cores but two)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--max-batch", type=int, default=16384)
    p.add_argument("--search-seconds", type=float, default=60.0, help="time budget of each batch search")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="override the card's dense bf16 peak")
    p.add_argument("--only", default="ours,lightly,ceiling")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    if p.parse_known_args(argv)[0].smoke:  # smoke defaults; flags given explicitly still win
        p.set_defaults(model="r18_0.25x_sk0", image_size=32, batch_size=8, device="cpu", steps=1, warmup=1,
                       workers=0, max_batch=32, precision="fp32", threads=1, search_seconds=10.0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = tp.BenchConfig(
        model=a.model, image_size=a.image_size, channels=3, batch_size=a.batch_size, stem="imagenet",
        device=a.device, steps=a.steps, warmup=a.warmup, precision=a.precision, compile=a.compile,
        channels_last=not a.no_channels_last and a.device != "cpu", workers=a.workers,
        pool_size=max(a.batch_size, 64 if a.smoke else 1024),
    )
    device = torch.device(cfg.device)
    fast_cuda_settings(device)  # as every stage runs on a GPU: cuDNN autotuning and TF32 matmuls
    info = tp.machine_info(device)
    name = info.get("gpu", info["cpu"])
    peak = a.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)
    print("  ".join(f"{k}: {v}" for k, v in info.items()))
    print(f"{cfg.model}, {cfg.image_size} px, batch {cfg.batch_size} images ({2 * cfg.batch_size} views)/step, "
          f"{cfg.precision}, channels_last={cfg.channels_last}, compile={cfg.compile}, lightly workers="
          f"{cfg.workers}, peak for MFU: {_fmt(peak, '.1f')} TFLOP/s dense bf16\n")

    builders: dict[str, Callable[[], Any]] = {
        "ours": lambda: tp.OursStep(cfg, device),
        "lightly": lambda: tp.LightlyStep(cfg, device),
        "ceiling": lambda: tp.CeilingStep(cfg, device),
    }
    results: list[tuple[str, float, int, float | None]] = []
    ours = None
    t_start = time.perf_counter()
    wanted = [w.strip() for w in a.only.split(",") if w.strip()]
    if "lightly" in wanted and not tp.lightly_available():  # an optional comparison, not a dependency
        print("lightly is not installed, so its row is skipped; install it with: pip install lightly\n")
        wanted.remove("lightly")
    # ours runs last, so no other pipeline's tensors sit in its peak memory (it stays for the search)
    for row in sorted(wanted, key=lambda r: r == "ours"):
        runner = builders[row]()
        warmup, steps = tp.lightly_schedule(cfg) if row == "lightly" else (cfg.warmup, cfg.steps)
        if device.type == "cuda":
            tp.sync(device)
            torch.cuda.reset_peak_memory_stats(device)
        sec, _ = tp.time_steps(runner, warmup, steps, device)
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        flops = count_flops(runner)
        results.append((row, sec, flops, mem))
        if row == "ours":
            ours = runner
        else:
            del runner
            free_memory(device)

    results.sort(key=lambda r: wanted.index(r[0]))
    rates = {r: cfg.batch_size / s for r, s, _, _ in results}
    print("| pipeline | images/s | ms/step | GFLOP/image | TFLOP/s | MFU | peak mem (GiB) | ours / this |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r, sec, flops, mem in results:
        tflops = flops / sec / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "-"
        ratio = f"{rates['ours'] / rates[r]:.2f}x" if "ours" in rates else "-"
        print(f"| {r} | {rates[r]:.0f} | {1000 * sec:.1f} | {flops / cfg.batch_size / 1e9:.2f} | {tflops:.1f} | "
              f"{mfu} | {_fmt(mem, '.1f')} | {ratio} |")

    if ours is not None:
        print("\nlargest batch of our full step (augmentation + forward + backward + LARS):")
        print("| activation checkpointing | largest batch | first failure | peak mem at largest (GiB) "
              "| tries | seconds | search |")
        print("|---|---:|---:|---:|---:|---:|---|")
        reasons = []
        for ckpt in (False, True):
            search, peaks = batch_search(ours, ckpt, a.max_batch, a.search_seconds)
            status = "complete" if search.complete else "stopped (time or --max-batch)"
            print(f"| {'on' if ckpt else 'off'} | {search.largest} | {_fmt(search.first_failure, 'd')} | "
                  f"{_fmt(peaks.get(search.largest), '.1f')} | {search.tries} | {search.seconds:.0f} | {status} |")
            if search.reason:
                reasons.append(f"checkpointing {'on' if ckpt else 'off'}, batch {search.first_failure}: "
                               f"{search.reason}")
        for line in reasons:
            print(line)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

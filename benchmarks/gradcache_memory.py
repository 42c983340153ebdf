"""Peak memory and time of one pretraining step with and without the gradient cache (issue 32).

    python benchmarks/gradcache_memory.py --model r50_1x_sk0 --image-size 64 --batch 4096 --chunk 256
    python benchmarks/gradcache_memory.py --model r18_0.25x_sk0 --image-size 28 --channels 1 \\
        --batch 512 --chunk 128 --warmup 1 --steps 3

Each configuration runs in a fresh process (``--child``), so that its peak memory is its own: on
the CPU the child's maximum resident set size (``os.wait4``'s ``ru_maxrss``, the import of torch
included), on a GPU ``torch.cuda.max_memory_allocated``. The step is the stage's own:
``engine.pretrain.build_parts`` builds the model, online probe, LARS and augmentation from a
``PretrainConfig``, and ``engine.pretrain.train_step`` runs it (views, forward, NT-Xent, backward,
optimizer steps), on random uint8 images with 10 labels.

The step without chunks runs only where it fits: its peak is first estimated from two fresh runs
without chunks at ``chunk`` and ``2 * chunk`` images (peak memory grows linearly with the batch),
and if the estimate at ``--batch`` exceeds ``--memory-limit-gb`` (default: this machine's RAM or
the GPU's memory) the row says so, with the estimate, instead of running it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

LIMIT_MARGIN = 0.9  # a run estimated above 90% of the limit is not started


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="r50_1x_sk0")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4096, help="images per step (two views each)")
    ap.add_argument("--chunk", type=int, default=256, help="chunk_size of the chunked run (images)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps before the timed ones")
    ap.add_argument("--steps", type=int, default=1, help="timed steps")
    ap.add_argument("--memory-limit-gb", type=float, default=0.0, help="0 = this machine's RAM (or the GPU's)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-batch", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child-chunk", type=int, default=0, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def child(args: argparse.Namespace) -> None:
    """One configuration: build the stage's parts, run the steps, print one JSON line."""
    from simclrv2.config import PretrainConfig
    from simclrv2.data.base import InMemoryDataset
    from simclrv2.engine.batches import BatchSource
    from simclrv2.engine.device import grad_scaler, resolve_device, step_generator
    from simclrv2.engine.pretrain import build_parts, contrastive_views, train_step
    from simclrv2.optim import scaled_lr

    batch = args.child_batch
    cfg = PretrainConfig(model=args.model, batch_size=batch, chunk_size=args.child_chunk, precision=args.precision,
                         device=args.device, knn_every=0, image_size=args.image_size)
    device = resolve_device(cfg.device)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, args.channels, args.image_size, args.image_size), dtype=torch.uint8,
                           generator=g)
    ds = InMemoryDataset(images, torch.randint(0, 10, (batch,), generator=g), [str(c) for c in range(10)])
    source = BatchSource(ds, device)
    lr = scaled_lr(cfg.base_lr, batch, cfg.lr_scaling)
    p = build_parts(cfg, ds, source, lr, device)
    scaler = grad_scaler(cfg.precision, device)
    x, y = source.images, source.labels
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        views = contrastive_views(cfg, p, x, step_generator(device, cfg.seed, step))
        loss, _ = train_step(cfg, p, views, y, lr, scaler)
        loss_value = float(loss)  # waits for the device
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    out = {"step_s": times, "loss": loss_value}
    if device.type == "cuda":
        out["peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(json.dumps(out), flush=True)


def run_child(args: argparse.Namespace, batch: int, chunk: int, steps: int, warmup: int) -> dict:
    """A fresh process for one configuration; its peak memory and step times."""
    cmd = [sys.executable, __file__, "--child", f"--child-batch={batch}", f"--child-chunk={chunk}",
           f"--model={args.model}", f"--image-size={args.image_size}", f"--channels={args.channels}",
           f"--precision={args.precision}", f"--device={args.device}", f"--warmup={warmup}", f"--steps={steps}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read(), proc.stderr.read()
    if proc.returncode != 0:
        reason = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        raise SystemExit(f"batch {batch}, chunk {chunk}: the step failed ({reason}): {err.strip()[-500:]}")
    rec = json.loads(out.strip().splitlines()[-1])
    rec.setdefault("peak_gb", usage.ru_maxrss * 1024 / 2**30)  # Linux: ru_maxrss in KiB
    return rec


def memory_limit_gb(args: argparse.Namespace) -> float:
    if args.memory_limit_gb > 0:
        return args.memory_limit_gb
    if args.device.startswith("cuda"):
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def describe(rec: dict) -> str:
    step = sum(rec["step_s"]) / len(rec["step_s"])
    return f"peak {rec['peak_gb']:.2f} GB, {step:.2f} s/step (mean of {len(rec['step_s'])})"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    if args.chunk <= 0 or args.batch % args.chunk:
        raise SystemExit(f"--chunk must be a positive divisor of --batch, got {args.chunk} for batch {args.batch}")
    limit = memory_limit_gb(args)
    from simclrv2.host import cpu_name

    cpu = cpu_name()
    print(f"# {args.model} at {args.image_size} px, batch {args.batch}, {args.precision} on {args.device} "
          f"({cpu}, {os.cpu_count()} cores, torch {torch.__version__}); memory limit {limit:.1f} GB", flush=True)
    chunked = run_child(args, args.batch, args.chunk, args.steps, args.warmup)
    print(f"chunk_size={args.chunk}: {describe(chunked)}", flush=True)
    small = run_child(args, args.chunk, 0, 1, 0)
    double = run_child(args, 2 * args.chunk, 0, 1, 0)
    per_image = (double["peak_gb"] - small["peak_gb"]) / args.chunk
    estimate = small["peak_gb"] + per_image * (args.batch - args.chunk)
    print(f"no chunks: batch {args.chunk} peaks at {small['peak_gb']:.2f} GB, batch {2 * args.chunk} at "
          f"{double['peak_gb']:.2f} GB -> batch {args.batch} estimated at {estimate:.1f} GB", flush=True)
    if estimate > LIMIT_MARGIN * limit:
        print(f"no chunks: not run: the estimate {estimate:.1f} GB exceeds {LIMIT_MARGIN:.0%} of the "
              f"{limit:.1f} GB limit", flush=True)
        return
    whole = run_child(args, args.batch, 0, args.steps, args.warmup)
    ratio = (sum(chunked["step_s"]) / len(chunked["step_s"])) / (sum(whole["step_s"]) / len(whole["step_s"]))
    print(f"no chunks: {describe(whole)}", flush=True)
    print(f"time per step, chunks / no chunks: {ratio:.2f}x; peak memory: "
          f"{chunked['peak_gb'] / whole['peak_gb']:.2f}x", flush=True)


if __name__ == "__main__":
    main()

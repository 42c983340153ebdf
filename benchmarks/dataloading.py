"""Data loading from a folder of JPEGs: index, per-worker decode, and a training run (issue 19).

    python benchmarks/dataloading.py --root DIR                 # 50,000 JPEGs, then every report
    python benchmarks/dataloading.py --root DIR --images 2000 --parts decode

The first call writes ``DIR/train/<class>/<n>.jpg`` (later calls keep the files that exist): at least
``--images`` JPEGs of 300-500 px per side with a random aspect ratio, quality 90, made from
Fashion-MNIST (the IDX files): each garment upscaled, tinted and laid on a smooth random colour
field with fine grain, so the files weigh about 20-70 KB like photographs of that size rather than
the few KB of a flat picture. 10 classes, the Fashion-MNIST labels (70,000 images: train then
test, repeated on new backgrounds past that). Every image comes from its own seed, so the folder is
the same on every machine and for any number of generating processes.

Then three reports, each a markdown table on stdout (progress goes to stderr):

- ``open``: the first open of ``ImageFolderDataset(DIR/train)`` with an empty index cache (it scans
  the folder and writes the manifest) and a re-open (it reads the manifest), each in a fresh process
  with ``SIMCLRV2_CACHE`` pointing at a new temporary folder.
- ``decode``: decode + random-resized crop + resize, images/s in one process with one torch thread
  (= per DataLoader worker), ours (``simclrv2.data.decode.decode_train_view``: the crop is taken
  from the original image, then resized, with JPEG draft decoding where the crop allows it) against
  ``torchvision.datasets.ImageFolder`` with ``Compose([RandomResizedCrop(S), PILToTensor()])``, both
  returning uint8 tensors, over the same ``--decode-files`` files whose bytes were read beforehand
  (warm page cache: decoding is measured, not the disk). Timed per image, and with every
  ``--decode-batch`` outputs stacked as a worker's collate stacks them (``PILToTensor`` returns an
  HWC array seen as CHW, so torchvision pays the transposing copy there; ours pays it per image).
  Interleaved over ``--rounds``; median.
- ``train``: a pretraining run's images/s (``simclrv2.engine.pretrain.run`` on ``DIR/train``,
  ``cache_images=False`` so the images stream through ``--workers`` DataLoader workers) against
  the data path alone (``BatchSource.train_batches`` with the same workers, crop and batch size,
  without a model) and the model step alone (the same ``pretrain.run`` with the batch source
  replaying its first batch, already decoded, at every step: the same loop, device augmentation
  (flip, colour, blur), model, loss and optimizer, with no decoding). Both runs read their rate
  from ``metrics.jsonl``, leaving out the first log line (workers starting, allocator warming up).
  ``--threads 2,1`` repeats both runs with each number of torch threads in the training process.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

MIN_SIDE, MAX_SIDE = 300, 500  # pixels per side of the generated JPEGs
JPEG_QUALITY = 90

# --------------------------------------------------------------------------------------------------
# The folder of JPEGs
# --------------------------------------------------------------------------------------------------

_SOURCE: tuple[np.ndarray, np.ndarray] | None = None  # (N, 28, 28) uint8 garments, (N,) labels


def _source() -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST train then test, read once per process (forked workers inherit it)."""
    global _SOURCE
    if _SOURCE is None:
        from simclrv2.data.builtin import load_fashion_mnist

        parts = [load_fashion_mnist(split) for split in ("train", "test")]
        _SOURCE = (np.concatenate([p.images[:, 0].numpy() for p in parts]),
                   np.concatenate([p.labels.numpy() for p in parts]))
    return _SOURCE


def class_names() -> list[str]:
    from simclrv2.data.builtin import FASHION_MNIST_CLASSES

    return [c.replace("/", "-") for c in FASHION_MNIST_CLASSES]  # "T-shirt/top" is no folder name


def synthetic_photo(garment: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One RGB image of 300-500 px per side: ``garment`` (28 x 28 grey) upscaled and tinted, on a
    smooth random colour field with fine grain (without the grain a JPEG of it would be a few KB)."""
    w, h = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, 2))
    grid = rng.integers(0, 256, (int(rng.integers(2, 7)), int(rng.integers(2, 7)), 3), dtype=np.uint8)
    background = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    grain = np.asarray(Image.effect_noise((w, h), float(rng.uniform(3, 9))), dtype=np.float32) - 128.0
    canvas = background + grain[..., None]  # (h, w, 3)
    side = int(min(w, h) * rng.uniform(0.5, 0.95))
    shade = np.asarray(Image.fromarray(garment).resize((side, side), Image.Resampling.BICUBIC),
                       dtype=np.float32)[..., None] / 255.0  # (side, side, 1): garment brightness = opacity
    tint = rng.integers(0, 256, 3).astype(np.float32)
    x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    region = canvas[y0:y0 + side, x0:x0 + side]
    canvas[y0:y0 + side, x0:x0 + side] = region * (1 - shade) + tint * (0.4 + 0.6 * shade) * shade
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


def image_path(train_dir: Path, i: int) -> Path:
    """Where image ``i`` goes: its class is the label of the garment it is made from."""
    garments, labels = _source()
    return train_dir / class_names()[int(labels[i % len(labels)])] / f"{i:06d}.jpg"


def _write_image(job: tuple[str, int, int]) -> int:
    """Write image ``i`` unless it exists; returns its size in bytes (0 if it was kept)."""
    train_dir, i, seed = Path(job[0]), job[1], job[2]
    path = image_path(train_dir, i)
    if path.exists():
        return 0
    garments, _ = _source()
    photo = synthetic_photo(garments[i % len(garments)], np.random.default_rng([seed, i]))
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=JPEG_QUALITY)
    # write then rename: a generation stopped half-way leaves no truncated JPEG behind
    tmp = path.with_name(f".{path.name}.tmp")  # hidden: no image folder reader lists it
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return len(buf.getvalue())


def generate(root: Path, images: int, seed: int = 0, workers: int = 0, quiet: bool = False) -> Path:
    """Write the missing images of ``root/train`` with a process pool; returns ``root/train``."""
    train_dir = root / "train"
    _source()  # read before forking: every worker shares the arrays
    for name in class_names():
        (train_dir / name).mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(images) if not image_path(train_dir, i).exists()]
    if not todo:
        if not quiet:
            print(f"{train_dir}: all {images:,} images exist, kept", file=sys.stderr)
        return train_dir
    workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    t0 = last = time.perf_counter()
    written = total_bytes = 0
    # fork: the workers inherit the garments instead of each reading the IDX files again
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(min(workers, len(todo))) as pool:
        for n in pool.imap_unordered(_write_image, [(str(train_dir), i, seed) for i in todo], chunksize=32):
            written += 1
            total_bytes += n
            now = time.perf_counter()
            if not quiet and (now - last > 5 or written == len(todo)):
                last = now
                print(f"generated {written:,} / {len(todo):,} images ({100 * written / len(todo):.0f}%), "
                      f"{written / (now - t0):.0f} images/s, {total_bytes / max(written, 1) / 1024:.0f} KB "
                      "average", file=sys.stderr, flush=True)
    return train_dir


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def _num(v: float) -> str:
    """Three significant figures, no exponent: 1234, 123, 12.3, 1.23, 0.123."""
    return f"{v:.0f}" if v >= 100 else f"{v:.{2 - math.floor(math.log10(v))}f}" if v > 0 else "0"


_OPEN_SNIPPET = """
import sys, time
from simclrv2.data.folder import ImageFolderDataset
t1 = time.perf_counter()
ds = ImageFolderDataset(sys.argv[1])
print(len(ds), time.perf_counter() - t1)
"""


def time_open(train_dir: Path) -> list[tuple[str, int, float, int]]:
    """(what, images found, seconds to open, bytes in the index cache after it) for a first open with
    an empty index cache and a re-open, each in a fresh process (no state of an earlier open in memory)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="simclrv2-index-") as cache:
        env = dict(os.environ, SIMCLRV2_CACHE=cache)
        for what in ("first open (scan, write the manifest)", "re-open (read the manifest)"):
            out = subprocess.run([sys.executable, "-c", _OPEN_SNIPPET, str(train_dir)], env=env, check=True,
                                 capture_output=True, text=True).stdout.split()
            cached = sum(p.stat().st_size for p in Path(cache).rglob("*") if p.is_file())
            rows.append((what, int(out[0]), float(out[1]), cached))
    return rows


def open_table(rows: Sequence[tuple[str, int, float, int]]) -> str:
    lines = ["| open | images | seconds | index cache after it |", "|---|---:|---:|---:|"]
    lines += [f"| {what} | {n:,} | {_num(s)} | {size / 2**20:.1f} MiB |" for what, n, s, size in rows]
    return "\n".join(lines)


def decode_sample(train_dir: Path, count: int) -> tuple[object, list[int]]:
    """torchvision's ImageFolder over the folder, and ``count`` indices spread evenly over it."""
    from torchvision.datasets import ImageFolder

    tv = ImageFolder(str(train_dir))
    step = max(1, len(tv) // count)
    return tv, list(range(0, len(tv), step))[:count]


def _time_loop(fn: Callable[[Any], torch.Tensor], items: Sequence[Any], batch: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process) over ``items``.

    ``batch`` 0: one call per item, nothing else. Otherwise every ``batch`` outputs are stacked into
    one (batch, C, S, S) tensor, as a DataLoader worker's collate does before it hands a batch over.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    if batch:
        for k in range(0, len(items), batch):
            torch.stack([fn(it) for it in items[k:k + batch]])
    else:
        for it in items:
            fn(it)
    return len(items) / (time.perf_counter() - t0), len(items) / (time.process_time() - c0)


DecodeResults = dict[tuple[int, str, int], list[tuple[float, float]]]


def decode_rates(train_dir: Path, count: int, sizes: Sequence[int], rounds: int, batch: int,
                 seed: int = 0) -> DecodeResults:
    """{(size, pipeline, batch): [(images/s, images/CPU-s) per round]} for ``ours`` and
    ``torchvision``, per image (batch 0) and with ``batch`` outputs collated."""
    from torchvision import transforms

    from simclrv2.data.decode import CropSpec, decode_train_view

    tv, idx = decode_sample(train_dir, count)
    paths = [tv.samples[i][0] for i in idx]
    for p in paths:  # warm the page cache: the table compares decoding, not the disk
        Path(p).read_bytes()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs with one torch thread
    results: DecodeResults = {}
    try:
        for rnd in range(rounds):
            for size in sizes:
                tv.transform = transforms.Compose([transforms.RandomResizedCrop(size), transforms.PILToTensor()])
                spec = CropSpec(size)
                rng = np.random.default_rng([seed, rnd, size])
                torch.manual_seed(seed * 1000 + rnd)  # torchvision's RandomResizedCrop draws from torch
                runs = {
                    "ours": (lambda p, spec=spec, rng=rng: decode_train_view(p, spec, rng), paths),
                    "torchvision": (lambda i: tv[i][0], idx),
                }
                for name, (fn, items) in runs.items():
                    for it in items[:20]:  # untimed: first calls import and allocate
                        fn(it)
                    for b in (0, batch):
                        results.setdefault((size, name, b), []).append(_time_loop(fn, items, b))
    finally:
        torch.set_num_threads(threads)
    return results


def decode_table(results: DecodeResults) -> str:
    batch = max(b for _, _, b in results)
    lines = ["| size | pipeline | per image: images/s | range over rounds | ours / torchvision "
             f"| batches of {batch}: images/s | range over rounds | ours / torchvision | images/CPU-s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for size, name in dict.fromkeys((s, n) for s, n, _ in results):
        cells = []
        for b in (0, batch):
            rates = [r for r, _ in results[(size, name, b)]]
            med = statistics.median(rates)
            tv = statistics.median(r for r, _ in results[(size, "torchvision", b)])
            cells.append(f"{_num(med)} | {_num(min(rates))}-{_num(max(rates))} | {med / tv:.2f}x")
        cpu = statistics.median(c for _, c in results[(size, name, batch)])
        lines.append(f"| {size} | {name} | {' | '.join(cells)} | {_num(cpu)} |")
    return "\n".join(lines)


def metrics_rate(run_dir: Path, batch: int) -> tuple[float, int]:
    """(images/s, steps) over the log lines of ``metrics.jsonl`` after the first one.

    Each line's ``images_per_s`` covers the steps since the previous line, so the rate over
    several lines is their images over their summed seconds (not the mean of the rates).
    """
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if "images_per_s" in r]
    if len(records) < 2:
        raise SystemExit(f"{run_dir}/metrics.jsonl has {len(records)} metric line(s), need 2 or more; "
                         "fix: raise --train-steps or lower --log-every")
    images = seconds = 0.0
    for prev, rec in zip(records, records[1:]):
        steps = rec["step"] - prev["step"]
        n = steps * batch
        images += n
        seconds += n / rec["images_per_s"]
    return images / seconds, records[-1]["step"] - records[0]["step"]


def pretrain_rate(data_dir: Path, size: int, model: str, stem: str, batch: int, steps: int, log_every: int,
                  workers: int, run_dir: Path, decode: bool = True) -> float:
    """images/s of ``simclrv2.engine.pretrain.run`` on the streamed folder, after its first log line.

    ``decode=False`` times the model step alone: the batch source decodes the first batch and
    replays it at every step, so the loop, the device augmentation, the model, the loss and the
    optimizer are those of the streamed run and only the decoding is gone.
    """
    from unittest import mock

    from simclrv2.config import PretrainConfig
    from simclrv2.engine import pretrain
    from simclrv2.engine.batches import BatchSource

    cfg = PretrainConfig(
        model=model, dataset="imagefolder", data_dir=str(data_dir), image_size=size, stem=stem,
        batch_size=batch, max_steps=steps, log_every=log_every, num_workers=workers, cache_images=False,
        online_probe=False, knn_every=0, run_dir=str(run_dir), device="cpu", progress=False, resume=False,
        checkpoint_min_seconds=1e9,
    )
    streamed = BatchSource.train_batches

    def replay(self: BatchSource, batches: Any, *args: Any, **kwargs: Any) -> Any:
        first = None
        for step, idx in batches:
            if first is None:
                decoded = streamed(self, iter([(step, idx)]), *args, **kwargs)
                first = next(decoded)
                decoded.close()  # stops its workers: nothing decodes while the model trains
            yield first

    with mock.patch.object(BatchSource, "train_batches", streamed if decode else replay):
        pretrain.run(cfg)
    return metrics_rate(run_dir, batch)[0]


def data_path_rate(train_dir: Path, size: int, batch: int, steps: int, warmup: int, workers: int,
                   seed: int = 0) -> float:
    """images/s of ``BatchSource.train_batches`` alone, as a pretraining run draws its batches (two
    views of each image, cut in ``workers`` DataLoader workers): ``warmup`` untimed batches, then
    ``steps`` timed ones."""
    from simclrv2.data.decode import CropSpec
    from simclrv2.data.folder import ImageFolderDataset
    from simclrv2.engine.batches import BatchSource, StepPlan, batch_indices

    ds = ImageFolderDataset(train_dir)
    source = BatchSource(ds, torch.device("cpu"), num_workers=workers)
    pool = torch.arange(len(ds))
    plan = StepPlan.make(len(pool), batch, epochs=0, max_steps=warmup + steps)
    keys = ((step, batch_indices(pool, plan, seed, step)) for step in range(plan.total_steps))
    batches = source.train_batches(keys, CropSpec(size), views=2, seed=seed)
    t0 = time.perf_counter()
    for i, (x, _) in enumerate(batches):
        if x.shape != (2 * batch, 3, size, size):
            raise RuntimeError(f"the data path gave a batch of shape {tuple(x.shape)}, expected "
                               f"{(2 * batch, 3, size, size)}")
        if i + 1 == warmup:
            t0 = time.perf_counter()
    return steps * batch / (time.perf_counter() - t0)


def shared_cpu_bound(data: float, step: float) -> float:
    """images/s when the data path and the model step share the same cores with no overlap of their
    work: each image costs the CPU time of both (1 / (1/data + 1/step)). Only meaningful where the
    model step runs on the CPU too; on a GPU the model's time does not take the workers' cores."""
    return 1.0 / (1.0 / data + 1.0 / step)


def train_table(rows: Sequence[tuple[int, str, int, int, float, float, float]]) -> str:
    lines = ["| size | model | batch | torch threads | pretraining run | data path alone | model step alone "
             "| run / slower | shared-CPU bound | run / bound |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for size, model, batch, threads, run, data, step in rows:
        bound = shared_cpu_bound(data, step)
        lines.append(f"| {size} | {model} | {batch} | {threads} | {_num(run)} | {_num(data)} | {_num(step)} | "
                     f"{100 * run / min(data, step):.0f}% | {_num(bound)} | {100 * run / bound:.0f}% |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

PARTS = ("open", "decode", "train")


def _cases(text: str) -> list[tuple[int, str, int, str]]:
    """``224:r18_0.25x_sk0:32,224:r50_1x_sk1:8:auto`` -> [(size, model, batch, stem), ...]; the stem
    (a config's ``stem`` key) is ``imagenet`` unless a fourth field names it."""
    cases = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        size, model, batch, *stem = item.split(":")
        cases.append((int(size), model, int(batch), stem[0] if stem else "imagenet"))
    return cases


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True, help="folder for train/<class>/<n>.jpg (created)")
    p.add_argument("--images", type=int, default=50_000, help="JPEGs in the folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gen-workers", type=int, default=0, help="generating processes (0 = one per core)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated reports to run: {', '.join(PARTS)}")
    p.add_argument("--decode-files", type=int, default=2000, help="files the decode report goes over")
    p.add_argument("--decode-sizes", default="224,96", help="output sizes of the decode report")
    p.add_argument("--decode-batch", type=int, default=32, help="decode report: images a collated batch holds")
    p.add_argument("--rounds", type=int, default=3, help="decode report: interleaved repetitions")
    p.add_argument("--cases", default="224:r18_0.25x_sk0:32,224:r50_1x_sk1:8:auto,96:r18_0.5x_sk0:64,96:r50_1x_sk0:16:auto",
                   help="train report: size:model:batch[:stem], comma-separated")
    p.add_argument("--workers", type=int, default=2, help="train report: DataLoader workers")
    p.add_argument("--threads", default="", help="train report: torch threads of the training process, "
                   "comma-separated (default: torch's, one per core)")
    p.add_argument("--log-every", type=int, default=4, help="train report: steps per metric line (the first is warm-up)")
    p.add_argument("--train-steps", type=int, default=12, help="train report: timed steps after the first log line")
    a = p.parse_args(argv)
    a.parts = [t.strip() for t in a.parts.split(",") if t.strip()]
    unknown = sorted(set(a.parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; valid: {', '.join(PARTS)}")
    if min(a.images, a.decode_files, a.decode_batch, a.rounds, a.train_steps, a.log_every) < 1:
        p.error("--images, --decode-files, --decode-batch, --rounds, --train-steps and --log-every must be positive")
    return a


def main(argv: Sequence[str] | None = None) -> None:
    a = parse_args(argv)
    from simclrv2.engine.runfolder import machine_description

    train_dir = generate(a.root, a.images, a.seed, a.gen_workers)
    print(f"\n{machine_description()}; load average "
          + " / ".join(f"{v:.1f}" for v in os.getloadavg()) + f"\nfolder: {train_dir}, {a.images:,} JPEGs\n")
    if "open" in a.parts:
        print(open_table(time_open(train_dir)) + "\n", flush=True)
    if "decode" in a.parts:
        sizes = [int(s) for s in a.decode_sizes.split(",") if s.strip()]
        print(f"decode + random-resized crop + resize to uint8 (3, S, S), one process, one torch thread, "
              f"{a.decode_files} files (bytes read beforehand: warm page cache), median of {a.rounds} round(s); "
              f"per image, and with every {a.decode_batch} stacked as a worker's collate does:\n")
        print(decode_table(decode_rates(train_dir, a.decode_files, sizes, a.rounds, a.decode_batch, a.seed)) + "\n",
              flush=True)
    if "train" in a.parts:
        steps = a.log_every + a.train_steps
        rows = []
        cache = tempfile.TemporaryDirectory(prefix="simclrv2-index-")  # the runs' folder indexes, removed after
        os.environ["SIMCLRV2_CACHE"] = cache.name
        default_threads = torch.get_num_threads()
        for size, model, batch, stem in _cases(a.cases):
            data = data_path_rate(train_dir, size, batch, a.train_steps, a.log_every, a.workers, a.seed)
            for threads in [int(t) for t in a.threads.split(",") if t.strip()] or [default_threads]:
                torch.set_num_threads(threads)  # the training process's; each worker runs with one
                with tempfile.TemporaryDirectory(prefix="simclrv2-bench-") as tmp:
                    run = pretrain_rate(a.root, size, model, stem, batch, steps, a.log_every, a.workers,
                                        Path(tmp) / "run")
                    step = pretrain_rate(a.root, size, model, stem, batch, steps, a.log_every, a.workers,
                                         Path(tmp) / "model", decode=False)
                rows.append((size, model, batch, threads, run, data, step))
                print(f"{size} px {model} batch {batch}, {threads} torch threads: run {run:.1f}, data path "
                      f"{data:.1f}, model step {step:.1f} images/s", file=sys.stderr, flush=True)
        torch.set_num_threads(default_threads)
        print(f"pretraining images/s, {a.workers} DataLoader workers, fp32, "
              f"over {a.train_steps} steps after {a.log_every} warm-up steps:\n")
        print(train_table(rows), flush=True)
        cache.cleanup()


if __name__ == "__main__":
    main()

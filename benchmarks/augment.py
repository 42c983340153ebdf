"""Views per second: batched on-device SimCLR augmentation vs the per-image torchvision pipeline.

    python benchmarks/augment.py                 # CPU, about a minute on 2 cores
    python benchmarks/augment.py --device cuda   # the batched path on a GPU (torchvision stays on CPU)

The batched path (simclrv2.data.SimCLRAugment, METHOD.md 5.1) gets a uint8 batch already on the device and
returns float32 views there. The torchvision path runs torchvision_simclr_transform image by image in
a DataLoader with worker processes, as a conventional input pipeline does. Each cell runs for about
--seconds after one warm-up batch (worker start-up excluded).

The batched path is timed with 1 torch thread and with --threads threads: on a shared, oversubscribed
CPU, OpenMP threads that wait for each other can make the multi-threaded run several times slower.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, Dataset

from simclrv2.data import SimCLRAugment, torchvision_simclr_transform


class _PerImage(Dataset):
    def __init__(self, images: torch.Tensor, transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return 1 << 30  # endless; the benchmark stops on time

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.images[i % len(self.images)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_batched(images: torch.Tensor, batch: int, size: int, device: torch.device, seconds: float) -> float:
    aug = SimCLRAugment(size)
    x = images[:batch].to(device)
    gen = torch.Generator().manual_seed(0)
    aug(x, generator=gen)  # warm-up (kernel selection, allocator)
    _sync(device)
    views, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        aug(x, generator=gen)
        views += batch
    _sync(device)
    return views / (time.perf_counter() - start)


def bench_torchvision(images: torch.Tensor, batch: int, size: int, workers: int, seconds: float) -> float:
    loader = DataLoader(
        _PerImage(images, torchvision_simclr_transform(size)), batch_size=batch, num_workers=workers
    )
    it = iter(loader)
    next(it)  # warm-up: workers started, first batch built
    views, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        views += next(it).shape[0]
    rate = views / (time.perf_counter() - start)
    del it  # shut the workers down
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per cell")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, batched")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for torchvision")
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)

    # (label, image side, channels, batch): Fashion-MNIST-like, CIFAR-like colour at 28 px, ImageNet size.
    cases = [("28px 1ch", 28, 1, 512), ("28px 3ch", 28, 3, 512), ("224px 3ch", 224, 3, 64)]
    print(f"device={device}  torchvision DataLoader workers={args.workers}")
    print(
        f"{'input':<10} {'batch':>5} {'batched 1 thread':>17} {f'batched {args.threads} threads':>19} "
        f"{'torchvision/image':>18}   views per second"
    )
    for label, side, channels, batch in cases:
        images = torch.randint(0, 256, (batch, channels, side, side), dtype=torch.uint8, generator=gen)
        rates = []
        for threads in (1, args.threads):
            torch.set_num_threads(threads)
            rates.append(bench_batched(images, batch, side, device, args.seconds))
        ref = bench_torchvision(images, batch, side, args.workers, args.seconds)
        print(f"{label:<10} {batch:>5} {rates[0]:>17.0f} {rates[1]:>19.0f} {ref:>18.0f}")


if __name__ == "__main__":
    main()

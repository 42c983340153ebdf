"""``simclrv2 select`` on a large folder against embedding the same images alone, in one run.

    python benchmarks/select_speed.py OUT_DIR [--images 100000] [--budget 100] [--size 32] \\
        [--methods typiclust,probcover]

Writes ``--images`` small PNGs (``--size`` px, RGB: one of 50 random patterns, shifted and with
noise, so the embedding has structure) under ``OUT_DIR/images`` in 100 sub-folders, once; saves a
freshly initialised ``r18_0.25x_sk0`` (stem small) as the encoder; indexes the folder; then times, on
the CPU, (1) embedding every image alone (:func:`simclrv2.select.embed_dataset`, the streaming path
``select`` uses) and (2) the whole ``simclrv2 select`` command with ``budget``: opening the indexed
folder, embedding, k-means, picks and ``to_label.csv``, once per ``--methods`` (``method=``). The
ratio (2) / (1) is the row of docs/BENCHMARKS.md (issue 31: at most 1.5).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_folder(root: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` PNGs in 100 sub-folders; skipped when the folder already holds them."""
    done = root / ".complete"
    if done.exists() and done.read_text() == f"{n} {size}":
        return
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 256, size=(50, size, size, 3))
    for i in range(n):
        folder = root / f"part{i % 100:03d}"
        if i < 100:
            folder.mkdir(parents=True, exist_ok=True)
        shift = rng.integers(-3, 4, size=2)
        img = np.roll(patterns[i % 50], tuple(shift), axis=(0, 1)) + rng.normal(scale=20, size=(size, size, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img{i:06d}.png", compress_level=1)
    done.write_text(f"{n} {size}")


def write_encoder(path: Path, size: int) -> None:
    from simclrv2.checkpoint import write_model_file
    from simclrv2.models import create_model

    torch.manual_seed(0)
    model = create_model("r18_0.25x_sk0", in_chans=3, cifar_stem=True, stem_stride=2, num_classes=0)
    write_model_file(path, model.eval().state_dict(), {"model_name": model.name, "model_config": model.config,
                                                        "image_size": size})


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--methods", type=lambda s: s.split(","), default=["typiclust", "probcover"])
    args = parser.parse_args(argv)
    from simclrv2.cli import main as cli_main
    from simclrv2.data.folder import UnlabeledFolderDataset
    from simclrv2.host import cpu_name
    from simclrv2.select import embed_dataset
    from simclrv2.serve import load_for_serving

    images, encoder = args.out / "images", args.out / "encoder.safetensors"
    t = time.perf_counter()
    write_folder(images, args.images, args.size)
    write_encoder(encoder, args.size)
    print(f"folder and encoder ready in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    UnlabeledFolderDataset(images, image_size=args.size)  # the index, built once and cached, as for any folder
    print(f"indexed {args.images} images in {time.perf_counter() - t:.0f} s", flush=True)
    model, info = load_for_serving(encoder, "cpu")
    t = time.perf_counter()
    ds = UnlabeledFolderDataset(images, image_size=info.image_size)
    feats = embed_dataset(model, ds, info.image_size, torch.device("cpu"), 256, args.num_workers)
    embed_s = time.perf_counter() - t
    print(f"embedding alone: {embed_s:.1f} s ({feats.shape[0] / embed_s:.0f} images/s)", flush=True)
    cpu = cpu_name()
    for method in args.methods:
        t = time.perf_counter()
        rc = cli_main(["select", f"checkpoint={encoder}", f"images={images}", f"budget={args.budget}",
                       f"out={args.out / f'to_label_{method}.csv'}", "device=cpu", f"num_workers={args.num_workers}",
                       f"method={method}"])
        select_s = time.perf_counter() - t
        assert rc == 0, f"select method={method} failed"
        print(f"| select method={method}, {args.images:,} images of {args.size} px, N={args.budget}, CPU | "
              f"{embed_s:.1f} s | {select_s:.1f} s | {select_s / embed_s:.2f} | {cpu}, {torch.get_num_threads()} threads |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

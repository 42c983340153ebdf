"""How well pretrained encoders do with a few labels a class, against the raw pixels, on validation data.

    python benchmarks/few_label_probe.py --make-fmnist DATA   (or --make-photos DATA)
    simclrv2 pretrain --config RUN/pretrain/config.yaml data_dir=DATA test_split=val run_dir=ENC [key=value ...]
    python benchmarks/few_label_probe.py DATA ENC [ENC ...] [--per-class 4] [--draws 20]

``DATA`` holds ``train/<class>/`` and ``val/<class>/``. ``--make-fmnist`` writes one from
Fashion-MNIST's training split only (400 images a class in ``train/`` to pretrain on, 200 other
images a class in ``val/``; no test image), so that a pretraining setting can be chosen on it
without the test split. ``--make-photos`` writes grey photographs instead: 32 px patches of eight
photographs that ship with scikit-image, none of them among ``heldout_datasets.py``'s ``textures``
(400 patches a class from the left three quarters of each photograph in ``train/``, 200 from the
right quarter in ``val/``). Each ``ENC`` is a pretraining folder (or a model file).

For each encoder, and for the pixels it reads (flattened), a logistic-regression probe (features
standardised on ``train/``, C = 0.1) is fitted on ``--per-class`` labelled images a class of
``train/``, drawn ``--draws`` times, and scored on ``val/``. Every row uses the same draws, so
two rows differ by the encoder alone. Prints a markdown table: the mean over draws with its
standard error and spread, and the same probe fitted on every image of ``train/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from simclrv2.serve import folder_batches, list_images, load_for_serving, run_on_batches

PROBE_C = 0.1


def labelled(folder: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """The image files under ``folder/<class>/``, their class indices, and the classes (sorted by name)."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    pairs = [(f, k) for k, c in enumerate(classes) for f in list_images(folder / c)]
    return [f for f, _ in pairs], np.array([k for _, k in pairs]), classes


def features_and_pixels(encoder: Path, file_lists: list[list[Path]],
                        decoded: dict | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The encoder's pooled features and the flattened pixels it reads, for each list of files: the
    encoder loaded once, each image decoded once (``decoded`` keeps the decoded batches for the next
    encoder of the same input size)."""
    model, info = load_for_serving(encoder)
    decoded = {} if decoded is None else decoded
    key = (info.channels, info.image_size)
    if key not in decoded:
        decoded[key] = [list(folder_batches(fs, info.channels, info.image_size, 256)) for fs in file_lists]
    batches = decoded[key]
    feats = [run_on_batches(model, iter(b), "features", torch.device("cpu")).numpy() for b in batches]
    return feats, [torch.cat(b).flatten(1).numpy() for b in batches]


def probe_scores(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                 draws: list[np.ndarray]) -> tuple[list[float], float]:
    """Validation top-1 (%) of the probe fitted on each draw of ``x_train``'s rows, and on all of them."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xt, xv = (x_train - mu) / sd, (x_val - mu) / sd

    def fit(rows: np.ndarray) -> float:
        clf = LogisticRegression(C=PROBE_C, max_iter=5000).fit(xt[rows], y_train[rows])
        return 100.0 * float(np.mean(clf.predict(xv) == y_val))

    return [fit(rows) for rows in draws], fit(np.arange(len(y_train)))


def draw_labels(y: np.ndarray, per_class: int, draws: int, seed: int = 0) -> list[np.ndarray]:
    """``draws`` class-balanced picks of ``per_class`` row indices a class."""
    rng = np.random.default_rng(seed)
    return [np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in np.unique(y)])
            for _ in range(draws)]


def table(data: Path, encoders: list[Path], per_class: int, draws: int) -> str:
    train_files, y_train, _ = labelled(data / "train")
    val_files, y_val, _ = labelled(data / "val")
    picks = draw_labels(y_train, per_class, draws)
    lines = [f"{per_class} labels a class of {data / 'train'}, {draws} draws; scored on {len(val_files)} images of "
             f"{data / 'val'}\n", f"| Features | {per_class} a class: mean ± s.e. (spread) | every label ({len(y_train)}) |",
             "|---|---|---|"]
    pixels, decoded = None, {}
    for enc in encoders:
        feats, enc_pixels = features_and_pixels(enc, [train_files, val_files], decoded)
        pixels = pixels or enc_pixels  # the first encoder's input size
        lines.append(_row(str(enc), *probe_scores(feats[0], y_train, feats[1], y_val, picks)))
    assert pixels is not None, "argparse asks for at least one encoder"
    lines.append(_row("raw pixels", *probe_scores(pixels[0], y_train, pixels[1], y_val, picks)))
    return "\n".join(lines)


def _row(name: str, scores: list[float], every: float) -> str:
    s = np.asarray(scores)
    return f"| {name} | {s.mean():.2f} ± {s.std() / np.sqrt(len(s)):.2f} ({s.std():.2f}) | {every:.2f} |"


def make_fmnist(out: Path, train_per_class: int = 400, val_per_class: int = 200, seed: int = 12345) -> None:
    from PIL import Image

    from simclrv2.data.builtin import load_fashion_mnist

    ds = load_fashion_mnist("train")
    y = ds.labels.numpy()
    rng = np.random.default_rng(seed)
    for c in range(10):
        order = rng.permutation(np.flatnonzero(y == c))
        for split, rows in (("train", order[:train_per_class]), ("val", order[train_per_class:train_per_class + val_per_class])):
            folder = out / split / f"{c}-{ds.classes[c].replace('/', '-')}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in rows:
                Image.fromarray(ds.images[i, 0].numpy()).save(folder / f"{i:05d}.png")


PHOTOS = ("camera", "astronaut", "coffee", "chelsea", "rocket", "cell", "clock", "retina")


def make_photos(out: Path, train_per_class: int = 400, val_per_class: int = 200, seed: int = 12345) -> None:
    from heldout_datasets import TEXTURES, photo_patches

    assert not set(PHOTOS) & set(TEXTURES), "the tuning photographs must not be the held-out ones"
    photo_patches(out, PHOTOS, (("train", train_per_class), ("val", val_per_class)), np.random.default_rng(seed),
                  shuffle=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="folder with train/<class>/ and val/<class>/")
    ap.add_argument("encoders", type=Path, nargs="*", help="pretraining folders or model files")
    ap.add_argument("--make-fmnist", action="store_true", help="write DATA from Fashion-MNIST's training split, then stop")
    ap.add_argument("--make-photos", action="store_true",
                    help="write DATA from scikit-image's photographs (not the held-out textures), then stop")
    ap.add_argument("--per-class", type=int, default=4)
    ap.add_argument("--draws", type=int, default=20)
    args = ap.parse_args(argv)
    if args.make_fmnist or args.make_photos:
        if args.data.exists():
            ap.error(f"{args.data} exists; pass a new folder to write")
        (make_fmnist if args.make_fmnist else make_photos)(args.data)
        print(f"{args.data}: train/ and val/ from " + ("Fashion-MNIST's training split" if args.make_fmnist
                                                        else "scikit-image's photographs"))
        return 0
    if not args.encoders:
        ap.error("name at least one pretraining folder to probe")
    for split in ("train", "val"):
        if not (args.data / split).is_dir():
            ap.error(f"{args.data / split} is missing; DATA needs train/<class>/ and val/<class>/ (--make-fmnist writes one)")
    print(table(args.data, args.encoders, args.per_class, args.draws))
    return 0


if __name__ == "__main__":
    sys.exit(main())

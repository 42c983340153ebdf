"""Write small ImageFolder datasets that no config was written for, to check recipes on them.

    python benchmarks/heldout_datasets.py OUT_DIR

writes four datasets, each as ``OUT_DIR/<name>/{train,test}/<class>/<file>.png``:

- ``fmnist4k``: 4,000 training and 1,000 test images of Fashion-MNIST (grey, 28 px, 10 classes), a
  subset drawn with a fixed seed: 400 images a class, so the demo's label fractions give 1, 4 and
  40 labels a class;
- ``digits``: scikit-learn's 1,797 handwritten digits (8x8 grey, 16 levels) upscaled to 24 px, 10
  classes, 1,437 training and 360 test images;
- ``shapes``: 3,000 training and 600 test RGB images of 32 px drawn here: six shape classes
  (disc, square, triangle, cross, ring, bar) in random colours, sizes and places on a noisy
  background of another random colour;
- ``textures``: 3,000 training and 600 test grey 32 px patches of eight photographs that ship with
  scikit-image (``pip install scikit-image``): brick, grass, gravel, the moon's surface, coins, a
  printed page, the Hubble deep field and a stained tissue section. Each patch is a square of 40-80
  px (at most the block's size) at a random place inside one block of a 2 x 4 grid over the
  photograph, mirrored at random and scaled to 32 px; two blocks of each photograph, drawn at
  random, give the test patches and the other six the training ones, so that no test patch overlaps
  a training one and both come from all over the photographs (a test region of its own would make
  ``unlabeled/`` unlike ``test/``, and ``predictions.csv`` then not comparable with the test split).

Then run the demo recipe on one of them as a user would::

    simclrv2 pipeline --config configs/fashion_mnist_demo.yaml common.dataset=imagefolder \\
        common.data_dir=OUT_DIR/shapes run_dir=runs/heldout_shapes

With ``--layout fewlabels`` each dataset is also written in the few-labels layout a user has
(issue 29), as ``OUT_DIR/<name>_fewlabels/``: ``train/<class>/`` holds ``--labels-per-class``
training images a class (4 by default), ``unlabeled/<group>/`` every other training image with its
class hidden (the file names carry no class), ``test/<class>/`` the test images. The hidden classes
go to ``OUT_DIR/<name>_fewlabels_truth.csv``, outside the data folder, for
``benchmarks/score_predictions.py``; ``OUT_DIR/<name>_fewlabels_notest/`` is the same folder
without ``test/``::

    simclrv2 pipeline --config configs/fashion_mnist_demo.yaml common.dataset=imagefolder \
        common.data_dir=OUT_DIR/fmnist4k_fewlabels common.image_size=28 'label_fractions=[1.0]' \
        run_dir=runs/fewlabels_fmnist

Every draw uses a fixed seed (``--seed``, 0 by default), so the folders are the same on every
machine; another seed draws another subset and other labelled images, to see how much a result
owes to the draw.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disc", "square", "triangle", "cross", "ring", "bar")


def _write(root: Path, split: str, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    for i, (img, y) in enumerate(zip(images, labels)):
        folder = root / split / classes[int(y)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{split}_{i:05d}.png")


def fmnist4k(root: Path, rng: np.random.Generator) -> None:
    from simclrv2.data.builtin import load_fashion_mnist

    for split, per_class in (("train", 400), ("test", 100)):
        ds = load_fashion_mnist(split)
        labels = ds.labels.numpy()
        pick = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                                       for c in range(10)]))
        classes = [c.replace("/", "-") for c in ds.classes]  # "T-shirt/top" is no folder name
        _write(root, split, ds.images[pick, 0].numpy(), labels[pick], classes)


def digits(root: Path, rng: np.random.Generator) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0 * 255).round().astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(im).resize((24, 24), Image.BILINEAR)) for im in images])
    order = rng.permutation(len(images))
    cut = int(0.8 * len(images))
    classes = [str(c) for c in range(10)]
    _write(root, "train", images[order[:cut]], d.target[order[:cut]], classes)
    _write(root, "test", images[order[cut:]], d.target[order[cut:]], classes)


def _shape(rng: np.random.Generator, kind: str, size: int = 32) -> np.ndarray:
    bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    while np.abs(bg.astype(int) - fg).sum() < 150:  # keep the shape visible
        fg = rng.integers(0, 256, 3)
    noise = rng.normal(0, 12, (size, size, 3))
    img = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    r = rng.uniform(6, 12)
    cx, cy = rng.uniform(r + 1, size - r - 1, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    colour = tuple(int(v) for v in fg)
    if kind == "disc":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif kind == "cross":
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    elif kind == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    else:  # bar: a long thin rectangle, horizontal or vertical
        w = r / 4
        draw.rectangle((cx - r, cy - w, cx + r, cy + w) if rng.random() < 0.5 else (cx - w, cy - r, cx + w, cy + r),
                       fill=colour)
    return np.asarray(img)


def shapes(root: Path, rng: np.random.Generator) -> None:
    for split, n in (("train", 3000), ("test", 600)):
        labels = np.arange(n) % len(SHAPES)
        images = np.stack([_shape(rng, SHAPES[y]) for y in labels])
        _write(root, split, images, labels, list(SHAPES))


TEXTURES = ("brick", "grass", "gravel", "moon", "coins", "page", "hubble_deep_field", "immunohistochemistry")


def _patches(photo: np.ndarray, n: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """``n`` grey ``size`` px patches of ``photo`` (H x W), each a random square of 40-80 px (at most
    the photo's size), mirrored at random."""
    h, w = photo.shape
    out = []
    for _ in range(n):
        side = int(rng.integers(min(40, h, w), min(80, h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        patch = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
        out.append(np.asarray(patch.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else patch))
    return np.stack(out)


GRID = (2, 4)  # rows and columns of blocks over a photograph, for ``photo_patches(blocks=True)``
TEST_BLOCKS = 2  # of the grid's eight: a quarter of each photograph, as the right quarter was


def _block_patches(photo: np.ndarray, blocks: list[int], n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` patches (:func:`_patches`) of ``photo``, each inside one of ``blocks`` (indices into
    the :data:`GRID` over it, row by row), the block drawn at random for each patch."""
    h, w = photo.shape[0] // GRID[0], photo.shape[1] // GRID[1]
    out = []
    for b in rng.choice(blocks, n):
        row, col = divmod(int(b), GRID[1])
        out.append(_patches(photo[row * h:(row + 1) * h, col * w:(col + 1) * w], 1, rng))
    return np.concatenate(out)


def _regions(photo: np.ndarray, splits: tuple[tuple[str, int], tuple[str, int]], rng: np.random.Generator,
             blocks: bool) -> list[np.ndarray]:
    """Patches of ``photo`` for each of ``splits``: from the left three quarters and the right
    quarter, or (``blocks``) from :data:`TEST_BLOCKS` blocks of the grid drawn for the second split
    and the other blocks for the first."""
    (_, n), (_, m) = splits
    if not blocks:
        cut = photo.shape[1] * 3 // 4
        return [_patches(photo[:, :cut], n, rng), _patches(photo[:, cut:], m, rng)]
    second = set(rng.choice(GRID[0] * GRID[1], TEST_BLOCKS, replace=False).tolist())
    first = [b for b in range(GRID[0] * GRID[1]) if b not in second]
    return [_block_patches(photo, first, n, rng), _block_patches(photo, sorted(second), m, rng)]


def photo_patches(root: Path, names: tuple[str, ...], splits: tuple[tuple[str, int], tuple[str, int]],
                  rng: np.random.Generator, shuffle: bool = True, blocks: bool = False) -> None:
    """Grey 32 px patches of the scikit-image photographs ``names``, one class each, written under
    ``root``: for ``splits`` ((first, n), (second, m)), n patches a photograph from its left three
    quarters and m from its right quarter, or (``blocks``) from blocks of a grid over it drawn for
    each split (:func:`_regions`), so that no patch of one split overlaps one of the other.
    ``shuffle``: file names hold an index, not the class."""
    try:
        import skimage.data
    except ImportError:
        raise SystemExit("these photographs need scikit-image: pip install scikit-image (or '.[bench]')") from None
    images, labels = {s: [] for s, _ in splits}, {s: [] for s, _ in splits}
    for y, name in enumerate(names):
        photo = np.asarray(Image.fromarray(getattr(skimage.data, name)()).convert("L"))
        for (split, n), patches in zip(splits, _regions(photo, splits, rng, blocks)):
            images[split].append(patches)
            labels[split] += [y] * n
    for split, _ in splits:
        order = rng.permutation(len(labels[split])) if shuffle else np.arange(len(labels[split]))
        _write(root, split, np.concatenate(images[split])[order], np.array(labels[split])[order], list(names))


def textures(root: Path, rng: np.random.Generator) -> None:
    photo_patches(root, TEXTURES, (("train", 375), ("test", 75)), rng, blocks=True)


UNLABELED_GROUP = 1000  # unlabeled images a sub-folder: the layout allows any sub-folders


def few_labels(source: Path, target: Path, truth: Path, per_class: int, rng: np.random.Generator) -> None:
    """``source`` (``train/`` and ``test/`` by class) in the few-labels layout: ``per_class`` labelled
    images a class in ``train/``, the others in ``unlabeled/`` with their classes written to ``truth``."""
    rows = []
    for class_dir in sorted(p for p in (source / "train").iterdir() if p.is_dir()):
        files = sorted(class_dir.glob("*.png"))
        keep = set(rng.choice(len(files), per_class, replace=False).tolist())
        (target / "train" / class_dir.name).mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(files):
            if i in keep:
                shutil.copy2(f, target / "train" / class_dir.name / f.name)
            else:
                rows.append((f, class_dir.name))
    rows.sort(key=lambda r: r[0].name)  # the file names hold an index, not the class
    with open(truth, "w", newline="") as out:
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["file", "class"])
        for j, (f, cls) in enumerate(rows):
            rel = f"{j // UNLABELED_GROUP:02d}/{f.name}"
            (target / "unlabeled" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target / "unlabeled" / rel)
            w.writerow([rel, cls])
    shutil.copytree(source / "test", target / "test")
    notest = target.with_name(target.name + "_notest")
    shutil.copytree(target, notest, ignore=lambda folder, names: ["test"] if Path(folder) == target else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the datasets into")
    parser.add_argument("--layout", choices=("benchmark", "fewlabels"), default="benchmark",
                        help="fewlabels: also write <name>_fewlabels/ (train/ with a few labels, unlabeled/, test/)")
    parser.add_argument("--labels-per-class", type=int, default=4, help="labelled images a class (fewlabels)")
    parser.add_argument("--only", nargs="*", default=None, help="names of the datasets to write (default: all)")
    parser.add_argument("--seed", type=int, default=0,
                        help="draw other images (fmnist4k, shapes, textures, the digits' split) and other labels (fewlabels)")
    args = parser.parse_args()
    for name, make in (("fmnist4k", fmnist4k), ("digits", digits), ("shapes", shapes),
                       ("textures", textures)):
        if args.only and name not in args.only:
            continue
        target = args.out / name
        if target.exists():
            print(f"{target}: exists, kept")
        else:
            make(target, np.random.default_rng(args.seed))
            counts = {s: sum(1 for _ in (target / s).rglob("*.png")) for s in ("train", "test")}
            print(f"{target}: {counts['train']} training and {counts['test']} test images")
        if args.layout == "fewlabels":
            few = args.out / f"{name}_fewlabels"
            if few.exists():
                print(f"{few}: exists, kept")
                continue
            truth = args.out / f"{name}_fewlabels_truth.csv"
            few_labels(target, few, truth, args.labels_per_class, np.random.default_rng(args.seed + 1))
            n = sum(1 for _ in (few / "unlabeled").rglob("*.png"))
            print(f"{few}: {args.labels_per_class} labels a class in train/, {n} images in unlabeled/ (their classes "
                  f"in {truth}), test/; and {few}_notest without test/")


if __name__ == "__main__":
    main()

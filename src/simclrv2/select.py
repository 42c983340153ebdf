"""``simclrv2 select``: the images of an unlabeled folder worth a person's time to label, in order.

The pretrained encoder embeds every image (streamed through the folder index, never all held), and
:func:`simclrv2.selection.select_picks` chooses by ``method``: TypiClust's most typical image of
each cluster with no label yet, or ProbCover's balls that cover most images no label covers; then,
in a second round, the images the labels given so far are least sure about. ``to_label.csv`` lists
the picks in labelling order with their cluster, score and reason, and an empty ``label`` column:
fill it in and pass the file back as ``labels=`` for the next round. :func:`select_to_label` is the
same choice for any dataset (the pipeline's, a test's).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import atomic_write_text
from .config import parse_tool_args
from .data.base import ImageDataset
from .data.folder import UnlabeledFolderDataset
from .engine.batches import BatchSource
from .engine.device import resolve_device
from .engine.evaluate import extract
from .engine.runfolder import RunError
from .selection import DEFAULT_METHOD, METHODS, Selection, SelectionError, select_picks

CSV_COLUMNS = ["rank", "file", "cluster", "score", "reason", "label"]
PSEUDO_CLASSES = 10  # ProbCover's k-means clusters when the class count is unknown (classes=0)


class _GreyInput(nn.Module):
    """A one-channel encoder (Fashion-MNIST) fed RGB views: their mean is its grey input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x.mean(1, keepdim=True))


@torch.no_grad()
def embed_dataset(encoder: nn.Module, dataset: ImageDataset, image_size: int, device: torch.device,
                  batch_size: int = 256, num_workers: int = 2) -> torch.Tensor:
    """Pooled backbone features ``(N, D)`` float32 on the CPU of every image, in dataset order.

    An image folder streams (DataLoader workers decode each file to its evaluation view), so only
    a batch of images is held at a time; an in-memory dataset is read from its tensor."""
    model = encoder
    if getattr(encoder, "config", {}).get("in_chans") == 1 and dataset.channels == 3:
        model = _GreyInput(encoder)
    source = BatchSource(dataset, device, num_workers)
    feats, _ = extract(model, source, torch.arange(len(dataset)), image_size, batch_size, "features", sharded=False)
    return feats


def select_to_label(encoder: nn.Module, dataset: ImageDataset, budget: int, seed: int = 0,
                    labelled: np.ndarray | None = None, labelled_classes: np.ndarray | None = None,
                    image_size: int = 0, device: torch.device | None = None, batch_size: int = 256,
                    num_workers: int = 2, max_clusters: int = 500, method: str = DEFAULT_METHOD,
                    n_classes: int = 0) -> Selection:
    """The ``budget`` images of ``dataset`` to label next (indices into it, in labelling order).

    ``labelled`` (dataset indices already labelled, never picked again) and ``labelled_classes``
    (their classes, any hashable; "" for a file seen but left unlabeled) make it a later round.
    ``method`` is "typiclust" or "probcover"; ``n_classes`` (ProbCover's k-means pseudo-classes)
    0 = the classes among ``labelled_classes``, at least :data:`PSEUDO_CLASSES`.
    ``image_size`` 0 = the dataset's stored size."""
    device = device or next(encoder.parameters()).device
    size = image_size or int(getattr(dataset, "image_size", 0) or dataset[0][0].shape[-1])
    feats = embed_dataset(encoder, dataset, size, device, batch_size, num_workers)
    if not n_classes:
        named = {c for c in (labelled_classes if labelled_classes is not None else []) if c is not None and c != ""}
        n_classes = max(PSEUDO_CLASSES, len(named))
    return select_picks(method, feats, budget, seed, labelled, labelled_classes, n_classes, max_clusters, device)


def propose_for_folder(checkpoint: str, data_dir: str | Path, budget: int, out: str | Path, seed: int = 0,
                       device: str = "auto", num_workers: int = 2) -> Selection:
    """The next ``budget`` images of ``data_dir/unlabeled/`` to label, in the few-labels layout
    (``data_dir/train/<class>/`` labelled, ``data_dir/unlabeled/**`` not): the labelled images
    cover their clusters and their classes name the least certain images. Writes ``out`` as
    ``simclrv2 select`` does, file names relative to ``data_dir/unlabeled`` (a pipeline's last step)."""
    from .data.folder import UNLABELED_DIR, load_few_labels
    from .serve import load_for_serving

    torch_device = resolve_device(device)
    model, info = load_for_serving(checkpoint, torch_device)
    ds = load_few_labels(data_dir, image_size=info.image_size, skip_bad_images=True)
    labels = ds.labels.numpy()
    labelled = np.flatnonzero(labels >= 0)
    picks = select_to_label(model, ds, budget, seed, labelled, labels[labelled], info.image_size, torch_device,
                            num_workers=num_workers)
    prefix = f"{UNLABELED_DIR}/"
    write_to_label(Path(out), [f.removeprefix(prefix) for f in ds.files], picks)
    return picks


def read_labels(path: str | Path, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(indices into files, their labels)`` from a CSV with ``file`` and ``label`` columns.

    ``to_label.csv`` with its ``label`` column filled in is such a file; a file listed with an empty
    label counts as seen (never proposed again) but gives no class. Files are relative to the folder."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"labels file '{path}' not found; pass labels=CSV with columns file,label (to_label.csv filled in)")
    position = {name: i for i, name in enumerate(files)}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"file", "label"} <= set(reader.fieldnames):
            raise RunError(f"{path}: needs a header with columns file and label (got {reader.fieldnames}); "
                           "fill in the label column of to_label.csv")
        pairs = {row["file"]: (row["label"] or "").strip() for row in reader}  # the last line of a file wins
    unknown = [name for name in pairs if name not in position]
    if unknown:
        raise RunError(f"{path}: {len(unknown)} file(s) are not in the image folder (first: {unknown[0]}); "
                       "names are paths relative to images=FOLDER, as to_label.csv writes them")
    idx = np.array([position[n] for n in pairs], dtype=np.int64)
    return idx, np.array(list(pairs.values()), dtype=object)


def write_to_label(out: Path, files: list[str], picks: Selection) -> None:
    """``to_label.csv``: rank, file, cluster, score, reason and an empty label column, atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    for rank, (i, c, s, why) in enumerate(zip(picks.indices, picks.cluster, picks.score, picks.reason), 1):
        writer.writerow([rank, files[int(i)], int(c), f"{float(s):.6g}", why, ""])
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, buf.getvalue())


def write_links(folder: Path, paths: list[Path]) -> None:
    """A folder of symbolic links ``0001_<name>`` to the picks, in labelling order, ready to sort
    into class folders. The folder must be new or empty: links of an older round are not mixed in."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise RunError(f"links folder '{folder}' already exists and is not empty; give a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(len(paths))))
    for rank, p in enumerate(paths, 1):
        os.symlink(p.resolve(), folder / f"{rank:0{width}d}_{p.name}")


def select_main(argv: list[str]) -> int:
    """``simclrv2 select``: wiring from the command line to :func:`select_to_label`."""
    parser = argparse.ArgumentParser(
        prog="simclrv2 select",
        description="Choose the images of an unlabeled folder to label first, from a pretrained encoder: "
        "the most typical image of each cluster of the embedding (TypiClust), and in a later round "
        "(labels=CSV) the regions no label covers, then the images those labels are least sure about. "
        "Writes OUT (rank, file, cluster, score, reason, label): fill in label and pass it back as labels=.",
    )
    parser.add_argument("--checkpoint", required=True, help="pretraining run folder, checkpoint folder or model file")
    parser.add_argument("--images", required=True, help="folder of unlabeled images (any sub-folders)")
    parser.add_argument("--budget", type=int, required=True, help="how many images to label in this round")
    parser.add_argument("--out", default="to_label.csv", help="the CSV of picks to write")
    parser.add_argument("--labels", default="", help="CSV of file,label given so far (to_label.csv filled in)")
    parser.add_argument("--links", default="", help="a new folder of links to the picks, in labelling order")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed; the same seed gives the same picks")
    parser.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS,
                        help="typiclust (typical images of k-means clusters) or probcover (greedy coverage "
                        "of balls of the embedding); the default won on validation (docs/EXPERIMENTS.md)")
    parser.add_argument("--max-clusters", type=int, default=500, help="cap on the clusters (TypiClust's 500)")
    parser.add_argument("--classes", type=int, default=0,
                        help="probcover: k-means pseudo-classes that set the ball radius; the number of classes "
                        f"if known, 0 = those in labels=, at least {PSEUDO_CLASSES}")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=2, help="image decoding workers")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    args = parse_tool_args(parser, argv)
    out = Path(args.out)
    if out.suffix != ".csv":
        raise RunError(f"out must end in .csv, got '{out}'")
    from .serve import load_for_serving

    device = resolve_device(args.device)
    model, info = load_for_serving(args.checkpoint, device)
    ds = UnlabeledFolderDataset(args.images, image_size=info.image_size, skip_bad_images=True)
    labelled, classes = read_labels(args.labels, ds.files) if args.labels else (None, None)
    left = len(ds) - (0 if labelled is None else len(set(labelled.tolist())))
    if args.budget > left:  # before the embedding, which is most of the time
        raise SelectionError(f"budget={args.budget} is more than the {left} unlabelled images in '{args.images}'; "
                             f"lower budget to at most {left}")
    picks = select_to_label(model, ds, args.budget, args.seed, labelled, classes, info.image_size, device,
                            args.batch_size, args.num_workers, args.max_clusters, args.method, args.classes)
    write_to_label(out, ds.files, picks)
    if args.links:
        write_links(Path(args.links), [Path(ds.paths[int(i)]) for i in picks.indices])
    reasons = {r: picks.reason.count(r) for r in dict.fromkeys(picks.reason)}
    how = f"delta {picks.delta:.4g}, " if picks.method == "probcover" else ""
    print(f"wrote {len(picks.indices)} images to label to {out} ({picks.method}, {how}k-means by {picks.kmeans}: "
          f"{picks.n_clusters} clusters of {len(ds)} images; " + ", ".join(f"{n} {r}" for r, n in reasons.items()) + ")")
    return 0

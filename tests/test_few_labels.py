"""The few-labels layout (issue 29): ``unlabeled/`` (any images, any sub-folders, no classes) next to
``train/<class>/`` and an optional ``test/<class>/``.

Folders are tiny PNGs written here. Listings are checked against a naive reference, ``os.walk``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclrv2.data import index
from simclrv2.data.datasets import (
    DatasetError,
    ImageFolderDataset,
    UnlabeledFolderDataset,
    load_dataset,
)

S = 8


def png(path: Path, seed: int, label: int = 0, size: int = 12) -> None:
    """A noise image whose mean brightness says its class (so a classifier can tell them apart)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = (rng.integers(0, 60, (size, size, 3)) + 190 * (label % 2)).astype(np.uint8)
    Image.fromarray(arr).save(path)


def make_unlabeled(root: Path) -> list[str]:
    """Images at three depths, hidden entries, another extension; returns the image paths it wrote."""
    rels = ["a.png", "x/b.png", "x/y/c.png", "x/y/z/d.png", "w/a.png"]  # two a.png: names need their folder
    for i, rel in enumerate(rels):
        png(root / rel, seed=i)
    png(root / ".hidden" / "e.png", seed=9)
    png(root / "x" / "._f.png", seed=10)
    (root / "x" / "notes.txt").write_text("not an image")
    return rels


def walk_reference(root: Path) -> list[str]:
    """Naive reference: every visible image file under root, by os.walk."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if not f.startswith(".") and f.endswith(".png"):
                out.append(str(Path(folder, f).relative_to(root)).replace(os.sep, "/"))
    return sorted(out)


def make_layout(root: Path, per_class: int = 2, unlabeled: int = 6, test: bool = True) -> Path:
    for c in range(2):
        for i in range(per_class):
            png(root / "train" / f"c{c}" / f"t{c}_{i}.png", seed=100 + 10 * c + i, label=c)
            if test:
                png(root / "test" / f"c{c}" / f"s{c}_{i}.png", seed=200 + 10 * c + i, label=c)
    for i in range(unlabeled):
        png(root / "unlabeled" / f"part{i % 2}" / f"u{i}.png", seed=300 + i, label=i)
    return root


def test_unlabeled_index_walks_sub_folders_and_ignores_hidden_entries(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    make_unlabeled(root)
    idx = index.open_unlabeled_index(root)
    assert sorted(idx.files) == walk_reference(root)
    assert idx.classes == [] and idx.labels.tolist() == [-1] * 5 and idx.dropped == []
    assert idx.sizes.tolist() == [[12, 12]] * 5
    ds = UnlabeledFolderDataset(root, S, classes=["c0", "c1"])
    assert ds.filenames == idx.files and ds.classes == ["c0", "c1"] and ds.num_classes == 2
    assert len(set(ds.filenames)) == len(ds)  # the two a.png are told apart by their folder


def test_unlabeled_manifest_is_keyed_apart_from_the_labelled_index(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "both"
    for c in ("c0", "c1"):
        png(root / c / "i.png", seed=len(c))
    labelled = ImageFolderDataset(root, S)
    unlabeled = UnlabeledFolderDataset(root, S)
    assert labelled.labels.tolist() == [0, 1] and unlabeled.labels.tolist() == [-1, -1]
    assert index.manifest_path(root) != index.manifest_path(root, "unlabeled")
    assert index.manifest_path(root, "unlabeled").exists() and index.manifest_path(root).exists()

    def no_open(*args, **kwargs):
        raise AssertionError("a re-open read an image")

    monkeypatch.setattr(Image, "open", no_open)  # both reopen from their own manifests
    assert UnlabeledFolderDataset(root, S).labels.tolist() == [-1, -1]
    assert ImageFolderDataset(root, S).labels.tolist() == [0, 1]


def test_symlink_loop_in_unlabeled_is_named_and_not_walked(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    make_unlabeled(root)
    os.symlink(root / "x", root / "x" / "y" / "back")  # x/y/back -> x: a loop
    os.symlink(root / "gone.png", root / "broken.png")
    idx = index.open_unlabeled_index(root)
    assert sorted(idx.files) == sorted(["a.png", "x/b.png", "x/y/c.png", "x/y/z/d.png", "w/a.png"])
    reasons = dict(idx.dropped)
    assert "symlink loop" in reasons["x/y/back"] and "broken symlink" in reasons["broken.png"]
    with pytest.raises(DatasetError, match="broken.png|back"):
        UnlabeledFolderDataset(root, S)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = UnlabeledFolderDataset(root, S, skip_bad_images=True)
    assert len(ds) == 5 and any("skipped 2" in str(w.message) for w in caught)


def test_corrupt_unlabeled_file_is_named_and_dropped(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    make_unlabeled(root)
    (root / "x" / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=r"junk\.png"):
        UnlabeledFolderDataset(root, S)
    ds = UnlabeledFolderDataset(root, S, skip_bad_images=True)
    assert [Path(p).name for p in ds.skipped] == ["junk.png"] and "x/junk.png" not in ds.filenames


def test_empty_unlabeled_folder_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "pool" / "sub").mkdir(parents=True)
    with pytest.raises(DatasetError, match="holds no images") as err:
        UnlabeledFolderDataset(tmp_path / "pool")
    assert "\n" not in str(err.value)


def test_layout_train_split_is_labelled_then_unlabeled(tmp_path: Path) -> None:
    root = make_layout(tmp_path / "data")
    train = load_dataset("imagefolder", "train", data_dir=root, image_size=S)
    alone = ImageFolderDataset(root / "train", S)
    assert train.classes == alone.classes == ["c0", "c1"]
    assert train.labels[: len(alone)].tolist() == alone.labels.tolist()  # same indices as train/ alone
    assert train.labels[len(alone):].tolist() == [-1] * 6
    assert train.filenames[len(alone):] == [f"unlabeled/part{i % 2}/u{i}.png" for i in (0, 2, 4, 1, 3, 5)]
    test = load_dataset("imagefolder", "test", data_dir=root, image_size=S)
    assert test.labels.tolist() == [0, 0, 1, 1]
    unl = load_dataset("imagefolder", "unlabeled", data_dir=root, image_size=S)
    assert unl.classes == ["c0", "c1"] and len(unl) == 6
    # streaming and in memory give the same pixels, names and labels
    mem = train.to_memory()
    assert mem.filenames == train.filenames and torch.equal(mem.labels, train.labels)
    assert torch.equal(mem.images[-1], train[len(train) - 1][0])


def test_layout_without_unlabeled_is_unchanged(tmp_path: Path) -> None:
    root = make_layout(tmp_path / "data")
    (root / "unlabeled").rename(tmp_path / "elsewhere")
    train = load_dataset("imagefolder", "train", data_dir=root, image_size=S)
    assert train.root == root / "train" and train.labels.tolist() == [0, 0, 1, 1]
    with pytest.raises(DatasetError, match="train"):
        load_dataset("imagefolder", "train", data_dir=make_layout(tmp_path / "nolab", per_class=0, test=False))

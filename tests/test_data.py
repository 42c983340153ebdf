"""Datasets (IDX, ImageFolder, front door) and labelled subsets (METHOD.md 5, 6)."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclrv2.data import (
    DATASET_NAMES,
    DatasetError,
    ImageFolderDataset,
    InMemoryDataset,
    balanced_subset,
    builtin,
    dataset_info,
    load_dataset,
    read_idx,
    read_subset,
    subset_from_file_list,
    unlabeled_indices,
    write_subset,
)

FMNIST_DIR = builtin.FASHION_MNIST_SYSTEM_DIR
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def fmnist_train() -> InMemoryDataset:
    return load_dataset("fashion_mnist", "train")


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST IDX
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fashion_mnist_tests_skip_with_the_reason_where_the_files_are_absent(tmp_path: Path) -> None:
    """The ``fashion_mnist`` marker (tests/_fashion_mnist.py), in a pytest run whose Fashion-MNIST
    folder holds three of the four IDX files: the marked tests (one by decorator, one by a class
    mark) are skipped, naming the folder and the package; the unmarked test runs."""
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        (folder / f"{stem}.gz").write_bytes(b"")
    run = tmp_path / "run"
    run.mkdir()
    (run / "conftest.py").write_text(
        "from pathlib import Path\n\nimport _fashion_mnist\n"
        "from _fashion_mnist import pytest_collection_modifyitems, pytest_configure  # noqa: F401\n\n"
        f"_fashion_mnist.FASHION_MNIST_DIR = Path({str(folder)!r})\n")
    (run / "test_marked.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.fashion_mnist\ndef test_needs_it():\n    raise AssertionError('ran')\n\n"
        "@pytest.mark.fashion_mnist\nclass TestNeedsIt:\n    def test_too(self):\n        raise AssertionError('ran')\n\n"
        "def test_without():\n    pass\n")
    (run / "pytest.ini").write_text("[pytest]\n")
    tests_dir = str(Path(__file__).resolve().parent)
    out = subprocess.run([sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", "-c", str(run / "pytest.ini"),
                          str(run / "test_marked.py")],
                         capture_output=True, text=True, cwd=run,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([tests_dir, SRC])})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed, 2 skipped" in out.stdout, out.stdout
    reason = f"Fashion-MNIST IDX files not found under {folder}; apt install dataset-fashion-mnist"
    assert out.stdout.count(reason) == 2, out.stdout


@pytest.mark.fashion_mnist
def test_fashion_mnist_train_from_system_idx(fmnist_train: InMemoryDataset) -> None:
    ds = fmnist_train
    assert len(ds) == 60000
    assert ds.images.shape == (60000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64
    assert torch.bincount(ds.labels).tolist() == [6000] * 10
    assert ds.num_classes == 10 and ds.channels == 1 and ds.filenames is None
    img, label, index = ds[123]
    assert img.shape == (1, 28, 28) and label == int(ds.labels[123]) and index == 123
    assert 0 < img.float().mean() < 255  # real pixels, not zeros


@pytest.mark.fashion_mnist
def test_fashion_mnist_test_split_and_data_dir_search(tmp_path: Path) -> None:
    # Uncompressed copies under data_dir/fashion-mnist must be found before the system folder.
    local = tmp_path / "fashion-mnist"
    local.mkdir()
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(FMNIST_DIR / f"{stem}.gz") as src, open(local / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    # Truncate the local labels by one byte: if the loader used the local copy, it must fail.
    raw = (local / "t10k-labels-idx1-ubyte").read_bytes()
    (local / "t10k-labels-idx1-ubyte").write_bytes(raw[:-1])
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte"):
        load_dataset("fashion_mnist", "test", data_dir=tmp_path)
    (local / "t10k-labels-idx1-ubyte").write_bytes(raw)
    ds = load_dataset("fashion_mnist", "test", data_dir=tmp_path)
    assert ds.images.shape == (10000, 1, 28, 28)
    assert ds.labels.min() == 0 and ds.labels.max() == 9
    assert torch.equal(ds.images, load_dataset("fashion_mnist", "test").images)


@pytest.mark.fashion_mnist
def test_truncated_gzip_idx_raises_dataset_error(tmp_path: Path) -> None:
    raw = (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").read_bytes()
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError) as info:
        read_idx(bad)
    msg = str(info.value)
    assert str(bad) in msg and "\n" not in msg and "fix" in msg
    assert isinstance(info.value, ValueError)


def test_idx_size_and_magic_checks(tmp_path: Path) -> None:
    good = b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") * 2 + bytes(range(18))
    (tmp_path / "ok").write_bytes(good)
    arr = read_idx(tmp_path / "ok", expected_ndim=3)
    assert arr.shape == (2, 3, 3) and arr[1, 2, 2] == 17
    (tmp_path / "short").write_bytes(good[:-1])
    with pytest.raises(DatasetError, match=r"shape \(2, 3, 3\) = 18 bytes but the file holds 17"):
        read_idx(tmp_path / "short")
    (tmp_path / "long").write_bytes(good + b"\x00")
    with pytest.raises(DatasetError, match="holds 19"):
        read_idx(tmp_path / "long")
    (tmp_path / "magic").write_bytes(b"\x00\x00\x0d\x03" + good[4:])  # 0x0d = float, not ubyte
    with pytest.raises(DatasetError, match="bad IDX magic"):
        read_idx(tmp_path / "magic")
    with pytest.raises(DatasetError, match="bad IDX magic"):
        read_idx(tmp_path / "ok", expected_ndim=1)  # an image file where labels were expected


def test_fashion_mnist_missing_names_paths_and_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(DatasetError) as info:
        load_dataset("fashion_mnist", "train", data_dir=tmp_path / "mine")
    msg = str(info.value)
    assert "\n" not in msg
    assert str(tmp_path / "mine" / "FashionMNIST" / "raw") in msg and str(tmp_path / "nowhere") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "download=true" in msg


# ------------------------------------------------------------------------------------------------
# Front door
# ------------------------------------------------------------------------------------------------


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset("imagenet21k")
    for name in DATASET_NAMES:
        assert name in str(info.value)
    with pytest.raises(DatasetError, match="valid names"):
        dataset_info("mnist")


def test_dataset_info() -> None:
    assert dataset_info("fashion_mnist") == {"image_size": 28, "channels": 1, "num_classes": 10}
    assert dataset_info("cifar100")["num_classes"] == 100
    assert dataset_info("stl10")["image_size"] == 96


def test_bad_split_and_image_size() -> None:
    with pytest.raises(DatasetError, match="unlabeled"):
        load_dataset("stl10", "validation")
    with pytest.raises(DatasetError, match="native 28px"):
        load_dataset("fashion_mnist", "train", image_size=32)


def test_cifar_missing_without_download_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", "train", data_dir=tmp_path)
    assert str(tmp_path) in str(info.value) and "download=true" in str(info.value)
    assert "\n" not in str(info.value)


def test_in_memory_dataset_contract() -> None:
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    ds = InMemoryDataset(images, [0, 1, -1, 1, 0], ["a", "b"], filenames=list("vwxyz"))
    assert len(ds) == 5 and ds.num_classes == 2 and ds.channels == 3
    img, label, index = ds[2]
    assert torch.equal(img, images[2]) and label == -1 and index == 2
    sub = ds.subset([4, 1])
    assert torch.equal(sub.images, images[[4, 1]]) and sub.filenames == ["z", "w"]
    with pytest.raises(DatasetError, match="labels"):
        InMemoryDataset(images, [0, 1], ["a", "b"])
    with pytest.raises(DatasetError, match="uint8"):
        InMemoryDataset(images.float(), [0] * 5, ["a"])


# ------------------------------------------------------------------------------------------------
# ImageFolder
# ------------------------------------------------------------------------------------------------


def _make_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    sizes = {"cat": [(40, 30), (30, 40), (33, 33)], "dog": [(50, 20), (24, 24)]}
    for cls, shapes in sizes.items():
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(shapes):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            ext = "png" if i % 2 else "JPEG"
            Image.fromarray(arr).save(root / cls / f"{cls}_{i}.{ext}")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "dog" / "gray.png")  # mode L -> RGB
    (root / "dog" / "notes.txt").write_text("not an image, ignored by extension")


def test_image_folder_loads_and_crops(tmp_path: Path) -> None:
    _make_folder(tmp_path)
    ds = load_dataset("imagefolder", "train", data_dir=tmp_path, image_size=16)
    assert isinstance(ds, ImageFolderDataset)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6 and ds.channels == 3
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.filenames == ["cat_0.JPEG", "cat_1.png", "cat_2.JPEG", "dog_0.JPEG", "dog_1.png", "gray.png"]
    for i in range(len(ds)):
        img, label, index = ds[i]
        assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and index == i
    # Centre crop of the resized PNG (lossless): compare with PIL done by hand.
    src = Image.open(tmp_path / "cat" / "cat_1.png").convert("RGB")  # 30 x 40 (w x h)
    ref = src.resize((16, round(40 * 16 / 30)), Image.Resampling.BICUBIC)
    top = (ref.size[1] - 16) // 2
    ref = np.asarray(ref.crop((0, top, 16, top + 16)))
    assert np.array_equal(ds[1][0].permute(1, 2, 0).numpy(), ref)
    mem = ds.to_memory()
    assert mem.images.shape == (6, 3, 16, 16) and mem.filenames == ds.filenames
    assert torch.equal(mem.images[4], ds[4][0])
    with pytest.raises(DatasetError, match="GiB"):
        ds.to_memory(max_bytes=100)


@pytest.mark.parametrize("kind", ["garbage", "truncated_jpeg", "truncated_png"])
def test_image_folder_bad_file_raises_with_path(tmp_path: Path, kind: str) -> None:
    _make_folder(tmp_path)
    if kind == "garbage":
        bad = tmp_path / "cat" / "bad.jpg"
        bad.write_bytes(b"definitely not a jpeg")
    else:
        good = tmp_path / "cat" / ("cat_0.JPEG" if kind == "truncated_jpeg" else "cat_1.png")
        bad = tmp_path / "cat" / ("trunc.jpg" if kind == "truncated_jpeg" else "trunc.png")
        raw = good.read_bytes()
        bad.write_bytes(raw[: len(raw) * 2 // 3])
    if kind == "garbage":  # no image header: refused when the folder is opened
        with pytest.raises(DatasetError) as info:
            ImageFolderDataset(tmp_path, image_size=16)
    else:  # the header is intact, the pixel data is cut: refused when it is decoded
        ds = ImageFolderDataset(tmp_path, image_size=16)
        with pytest.raises(DatasetError) as info:
            ds[ds.filenames.index(bad.name)]
    assert str(bad) in str(info.value) and "skip_bad_images" in str(info.value)


def test_image_folder_skip_bad_images_warns_with_count(tmp_path: Path) -> None:
    _make_folder(tmp_path)
    (tmp_path / "cat" / "bad1.jpg").write_bytes(b"junk")
    raw = (tmp_path / "dog" / "dog_1.png").read_bytes()
    (tmp_path / "dog" / "bad2.png").write_bytes(raw[: len(raw) // 2])  # the header survives, the pixels do not
    with pytest.warns(UserWarning, match="skipped 1 corrupt image"):
        ds = load_dataset("imagefolder", data_dir=tmp_path, image_size=8, skip_bad_images=True)
    assert len(ds) == 7 and "bad1.jpg" not in ds.filenames and ds.skipped == [str(tmp_path / "cat" / "bad1.jpg")]
    with pytest.warns(UserWarning, match="bad2.png"):
        mem = ds.to_memory()
    assert len(mem) == 6 and "bad2.png" not in mem.filenames
    assert list(ds.bad_decodes) == [str(tmp_path / "dog" / "bad2.png")]


def test_image_folder_empty_class_names_it(tmp_path: Path) -> None:
    _make_folder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetError, match="empty_class"):
        ImageFolderDataset(tmp_path, image_size=8)


# ------------------------------------------------------------------------------------------------
# Subsets
# ------------------------------------------------------------------------------------------------


@pytest.mark.fashion_mnist
@pytest.mark.parametrize("fraction,per_class", [(0.01, 60), (0.001, 6), (0.1, 600)])
def test_balanced_subset_fashion_mnist_counts(
    fmnist_train: InMemoryDataset, fraction: float, per_class: int
) -> None:
    idx = balanced_subset(fmnist_train.labels, fraction, seed=0)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)  # sorted, unique
    counts = np.bincount(fmnist_train.labels.numpy()[idx], minlength=10)
    assert counts.tolist() == [per_class] * 10


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_balanced_subset_same_in_another_process(fmnist_train: InMemoryDataset) -> None:
    here = balanced_subset(fmnist_train.labels, 0.01, seed=7)
    code = (
        f"import sys; sys.path.insert(0, {SRC!r});"
        "from simclrv2.data import load_dataset, balanced_subset;"
        "ds = load_dataset('fashion_mnist', 'train');"
        "print(','.join(map(str, balanced_subset(ds.labels, 0.01, seed=7))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    there = np.array([int(v) for v in out.stdout.strip().split(",")])
    assert np.array_equal(here, there)
    assert not np.array_equal(here, balanced_subset(fmnist_train.labels, 0.01, seed=8))


def test_balanced_subset_small_and_unlabeled() -> None:
    labels = np.array([0] * 10 + [1] * 3 + [-1] * 5 + [2] * 1)
    idx = balanced_subset(torch.from_numpy(labels), 0.25, seed=1)
    picked = labels[idx]
    # 0.25*10 = 2.5 -> 3 (half up), 0.25*3 = 0.75 -> 1, 0.25*1 -> at least 1; never the -1 entries.
    assert np.bincount(picked).tolist() == [3, 1, 1]
    assert np.array_equal(balanced_subset(labels, 1.0, seed=3), np.flatnonzero(labels >= 0))
    # Each class's pick depends only on (seed, class): adding a class does not change the others.
    more = np.concatenate([labels, [3] * 4])
    assert np.array_equal(balanced_subset(more, 0.25, seed=1)[:5], idx)


@pytest.mark.parametrize("bad", [0, 0.0, -0.01, 1.5, float("nan")])
def test_balanced_subset_rejects_bad_fraction(bad: float) -> None:
    with pytest.raises(ValueError) as info:
        balanced_subset(np.arange(10) % 2, bad, seed=0)
    assert "(0, 1]" in str(info.value) and str(float(bad)) in str(info.value)


def test_file_list_subsets(tmp_path: Path) -> None:
    names = ["n01440764_10026.JPEG", "n01440764_1.JPEG", "n02102040_7.JPEG", "n02102040_99.JPEG"]
    lst = tmp_path / "1percent.txt"
    lst.write_text("n02102040_7.JPEG\nn01440764_10026.JPEG\n\n")
    assert subset_from_file_list(names, lst).tolist() == [0, 2]
    lst.write_text("n02102040_7.JPEG\nn09999999_1.JPEG\nn09999999_2.JPEG\n")
    with pytest.raises(DatasetError) as info:
        subset_from_file_list(names, lst)
    msg = str(info.value)
    assert "2 of 3" in msg and "n09999999_1.JPEG" in msg and "fix" in msg
    with pytest.raises(DatasetError, match="imagefolder"):
        subset_from_file_list(None, lst)
    with pytest.raises(DatasetError, match="more than once"):
        subset_from_file_list(names + ["n02102040_7.JPEG"], tmp_path / "1percent.txt")


def test_write_subset_round_trip_and_unlabeled(tmp_path: Path) -> None:
    names = [f"img_{i}.png" for i in range(10)]
    idx = np.array([1, 4, 7])
    out = write_subset(tmp_path / "sub" / "labelled.txt", idx, names)
    assert out.read_text().splitlines() == ["1\timg_1.png", "4\timg_4.png", "7\timg_7.png"]
    assert list((tmp_path / "sub").iterdir()) == [out]  # no temporary file left behind
    assert read_subset(out).tolist() == [1, 4, 7]
    assert subset_from_file_list(names, out).tolist() == [1, 4, 7]
    write_subset(out, torch.tensor([2, 3]))
    assert read_subset(out).tolist() == [2, 3]
    assert unlabeled_indices(10, idx).tolist() == [0, 2, 3, 5, 6, 8, 9]
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        unlabeled_indices(10, [3, 10])


class _FakeTorchvisionSet:
    """Stands in for torchvision's CIFAR10 / STL10 (their files cannot be made up: md5 checks)."""

    def __init__(self, root: str, train: bool = True, split: str = "train", download: bool = False) -> None:
        rng = np.random.default_rng(0)
        self.args = (root, train, split, download)
        if split == "unlabeled":  # STL-10 layout: NCHW already, labels -1
            self.data = rng.integers(0, 256, (4, 3, 96, 96), dtype=np.uint8)
            self.labels = np.full(4, -1)
        else:  # CIFAR layout: NHWC, targets list
            self.data = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
            self.targets = [0, 1, 2, 0, 1, 2]
            self.classes = ["x", "y", "z"]


def test_torchvision_sets_convert_to_nchw(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeTorchvisionSet)
    monkeypatch.setattr(torchvision.datasets, "STL10", _FakeTorchvisionSet)
    cifar = load_dataset("cifar10", "test", data_dir=tmp_path, download=True)
    fake = _FakeTorchvisionSet(str(tmp_path), train=False)
    assert cifar.images.shape == (6, 3, 32, 32) and cifar.classes == ["x", "y", "z"]
    assert torch.equal(cifar.images[2].permute(1, 2, 0), torch.from_numpy(fake.data[2]))
    assert cifar.labels.tolist() == fake.targets
    stl = load_dataset("stl10", "unlabeled", data_dir=tmp_path)
    assert stl.images.shape == (4, 3, 96, 96) and stl.labels.tolist() == [-1] * 4
    assert stl.num_classes == 10 and stl[0][1] == -1  # class names fall back to STL-10's own


def test_read_idx_reuses_an_unchanged_file_and_rereads_a_changed_one(tmp_path: Path) -> None:
    """The pipeline's stages each load both splits; an unchanged file is decoded once per process,
    and a rewritten one (new bytes, same name) is read again."""
    good = b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([1, 2, 3])
    path = tmp_path / "labels"
    path.write_bytes(good)
    first = read_idx(path, expected_ndim=1)
    hits = builtin._read_idx_cached.cache_info().hits
    again = read_idx(path, expected_ndim=1)
    assert again is first and builtin._read_idx_cached.cache_info().hits == hits + 1
    assert not first.flags.writeable  # shared between callers, so nobody may write into it
    new = tmp_path / "labels.new"  # same size, replaced by a rename (a new inode)
    new.write_bytes(good[:-3] + bytes([7, 8, 9]))
    new.replace(path)
    assert read_idx(path, expected_ndim=1).tolist() == [7, 8, 9]
    path.write_bytes(good[:-1])  # now truncated: the error is raised, not an old cached array
    with pytest.raises(DatasetError, match="holds 2"):
        read_idx(path, expected_ndim=1)

"""The image folder index (issue 19, "An index built once") and the decode-time bad-file policy.

Folders are a few tiny PNGs and JPEGs written here; ``SIMCLRV2_CACHE`` points into ``tmp_path``, so
every test starts without a manifest. Image sizes are checked against PIL opening each file.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image, ImageOps

from simclrv2 import distributed as sdist
from simclrv2.data import index
from simclrv2.data.folder import ImageFolderDataset
from simclrv2.data.images import DatasetError

S = 8  # stored size: every image is at least this large


def write_image(path: Path, w: int, h: int, seed: int, **save: object) -> None:
    # noise does not compress: a JPEG body is many times its header, so half the file keeps the header
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, **save)


def make_folder(root: Path) -> Path:
    """root/cat: 3 images, root/dog: 2, of distinct sizes; PNG and JPEG mixed."""
    for c, n in (("cat", 3), ("dog", 2)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            ext = "png" if i % 2 else "jpg"
            write_image(root / c / f"{c}{i}.{ext}", 20 + i + 3 * len(c), 16 + i, seed=i + 10 * ord(c[0]))
    return root


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SIMCLRV2_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "index"


def reference_sizes(ds: ImageFolderDataset) -> list[tuple[int, int]]:
    """Each file fully decoded and turned upright by PIL: the naive reference for ``sizes``."""
    out = []
    for p in ds.paths:
        with Image.open(p) as img:
            out.append(ImageOps.exif_transpose(img).size)
    return out


def test_second_open_reads_the_manifest_and_opens_no_image(tmp_path: Path, cache: Path, monkeypatch) -> None:
    root = make_folder(tmp_path / "data")
    # a phone photo stored sideways: its upright size is the stored one turned
    exif = Image.Exif()
    exif[0x0112] = 6
    write_image(root / "dog" / "phone.jpg", 30, 12, seed=5, exif=exif)
    first = ImageFolderDataset(root, S)
    assert first.classes == ["cat", "dog"] and len(first) == 6
    assert first.sizes.dtype == np.int64 and first.sizes.shape == (6, 2)
    assert [tuple(s) for s in first.sizes.tolist()] == reference_sizes(first)
    assert tuple(first.sizes[first.filenames.index("phone.jpg")]) == (12, 30)
    assert len(list(cache.glob("data-*.json"))) == 1

    def no_open(*args, **kwargs):
        raise AssertionError(f"an image file was opened on a re-open: {args[0]}")

    monkeypatch.setattr(Image, "open", no_open)
    second = ImageFolderDataset(root, S)
    assert second.paths == first.paths and second.filenames == first.filenames
    assert torch.equal(second.labels, first.labels) and np.array_equal(second.sizes, first.sizes)
    assert ImageFolderDataset(root, None).image_size == int(np.median(first.sizes.min(axis=1)))


@pytest.mark.parametrize("change", ["add", "delete", "rewrite", "touch"])
def test_a_changed_folder_is_indexed_again(tmp_path: Path, cache: Path, change: str) -> None:
    root = make_folder(tmp_path / "data")
    before = ImageFolderDataset(root, S)
    fingerprint = index.scan_folder(root).fingerprint
    target = root / "cat" / "cat1.png"
    if change == "add":
        write_image(root / "dog" / "new.png", 33, 17, seed=99)
    elif change == "delete":
        target.unlink()
    elif change == "rewrite":  # a different image under the same name: another size on disk
        write_image(target, 41, 19, seed=98, format="PNG")
    else:  # the same bytes, a new modification time
        st = target.stat()
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert index.scan_folder(root).fingerprint != fingerprint
    after = ImageFolderDataset(root, S)
    names = set(after.filenames)
    if change == "add":
        assert len(after) == len(before) + 1 and "new.png" in names
        assert tuple(after.sizes[after.filenames.index("new.png")]) == (33, 17)
        assert int(after.labels[after.filenames.index("new.png")]) == 1
    elif change == "delete":
        assert len(after) == len(before) - 1 and "cat1.png" not in names
    elif change == "rewrite":
        assert tuple(after.sizes[after.filenames.index("cat1.png")]) == (41, 19)
    else:
        assert after.paths == before.paths
    assert [tuple(s) for s in after.sizes.tolist()] == reference_sizes(after)
    assert len(list(cache.glob("data-*.json"))) == 1  # rewritten in place, not one file per state
    assert after[len(after) - 1][2] == len(after) - 1  # the new index decodes without substitutes


def plant_truncated_jpeg(root: Path) -> Path:
    """A valid JPEG cut to half its bytes: its header reads, its pixels do not."""
    bad = root / "cat" / "cat1b.jpg"  # sorts right after cat1.png
    write_image(bad, 64, 48, seed=7)
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    return bad


def test_truncated_jpeg_is_skipped_when_decoded_and_training_goes_on(tmp_path: Path, cache: Path) -> None:
    root = make_folder(tmp_path / "data")
    bad = plant_truncated_jpeg(root)
    ds = ImageFolderDataset(root, S, skip_bad_images=True)
    assert ds.skipped == [] and str(bad) in map(str, ds.paths)  # found by decoding, not at open
    i_bad = ds.filenames.index("cat1b.jpg")
    with pytest.warns(UserWarning, match="skipped unusable image .*cat1b.jpg.*truncated"):
        x, label, used = ds[i_bad]
    assert used == i_bad + 1 and label == int(ds.labels[used])
    assert torch.equal(x, ds[i_bad + 1][0])
    assert list(ds.bad_decodes) == [str(bad)] and "truncated" in ds.bad_decodes[str(bad)]
    # an epoch as training reads it: every index gives an image, the bad one its substitute
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, num_workers=0)
    used_all = torch.cat([u for _, _, u in loader]).tolist()
    expected = list(range(len(ds)))
    expected[i_bad] = i_bad + 1
    assert used_all == expected and len(ds.bad_decodes) == 1

    strict = ImageFolderDataset(root, S, skip_bad_images=False)
    with pytest.raises(DatasetError) as exc:
        strict[i_bad]
    msg = str(exc.value)
    assert str(bad) in msg and "truncated" in msg and "skip_bad_images=true" in msg and "\n" not in msg


def test_substitutes_wrap_around_and_give_up(tmp_path: Path, cache: Path, monkeypatch) -> None:
    root = make_folder(tmp_path / "data")
    ds = ImageFolderDataset(root, S, skip_bad_images=True)
    last = ds.paths[-1]
    last.write_bytes(last.read_bytes()[:40])
    with pytest.warns(UserWarning):
        assert ds[len(ds) - 1][2] == 0  # the last file's substitute is the first
    for p in ds.paths:  # a whole folder unreadable (say, a network mount dropped): an error
        p.unlink()
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match=r"5 images in a row from .* are unusable"):
        ds[0]


@pytest.mark.parametrize("change", ["deleted", "replaced", "same_size"])
def test_file_changed_after_indexing_is_never_silently_used(tmp_path: Path, cache: Path, change: str) -> None:
    root = make_folder(tmp_path / "data")
    ds = ImageFolderDataset(root, S, skip_bad_images=True)
    strict = ImageFolderDataset(root, S)
    i = 1
    victim = ds.paths[i]
    if change == "deleted":
        victim.unlink()
    elif change == "replaced":  # another picture under the same name
        write_image(victim, 50, 50, seed=123, format="PNG")
    else:  # written again later with the same byte count (here the same bytes, a later mtime)
        victim.write_bytes(victim.read_bytes())
        st = victim.stat()
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.warns(UserWarning, match=str(victim)):
        x, _, used = ds[i]
    assert used == i + 1 and torch.equal(x, ds[i + 1][0])
    reason = ds.bad_decodes[str(victim)]
    assert ("gone now" in reason) if change == "deleted" else ("changed since the folder was indexed" in reason)
    with pytest.raises(DatasetError) as exc:
        strict[i]
    assert str(victim) in str(exc.value) and "skip_bad_images=true" in str(exc.value)
    # reopened, the folder is indexed again and the new file is used as it is now
    if change != "deleted":
        fresh = ImageFolderDataset(root, S)
        assert fresh[i][2] == i and fresh.bad_decodes == {}


def test_unwritable_cache_warns_once_and_works(tmp_path: Path, monkeypatch) -> None:
    root = make_folder(tmp_path / "data")
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("SIMCLRV2_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(index, "_UNWRITABLE_WARNED", set())
    with pytest.warns(UserWarning, match="cannot write the image folder index .*SIMCLRV2_CACHE"):
        ds = ImageFolderDataset(root, S)
    assert len(ds) == 5 and ds[0][0].shape == (3, S, S)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second open works and does not warn again
        assert ImageFolderDataset(root, S).paths == ds.paths


def test_damaged_manifest_is_rebuilt(tmp_path: Path, cache: Path) -> None:
    root = make_folder(tmp_path / "data")
    ds = ImageFolderDataset(root, S)
    manifest = index.manifest_path(root)
    manifest.write_text(manifest.read_text()[:100])  # as a killed writer without os.replace would leave it
    again = ImageFolderDataset(root, S)
    assert again.paths == ds.paths and np.array_equal(again.sizes, ds.sizes)
    assert json.loads(manifest.read_text())["files"] == ["cat/cat0.jpg", "cat/cat1.png", "cat/cat2.jpg",
                                                         "dog/dog0.jpg", "dog/dog1.png"]


def test_progress_lines_when_not_on_a_terminal(tmp_path: Path, cache: Path, capsys, monkeypatch) -> None:
    root = make_folder(tmp_path / "data")
    monkeypatch.setattr(index, "PROGRESS_MIN_FILES", 1)
    ImageFolderDataset(root, S)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1] == f"indexing {root}: 5/5 files"
    ImageFolderDataset(root, S)  # read from the manifest: nothing to show
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------- two processes

WORLD = 2


def dist_worker(rank: int, port: int, root: str, broken: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sdist.setup_distributed("cpu")
    calls: list[str] = []
    scan, build = index.scan_folder, index.build_index

    def slow_build(*args, **kwargs):
        calls.append("build")
        time.sleep(1.0)  # rank 1 is surely waiting by now: the wait is what is tested
        return build(*args, **kwargs)

    index.scan_folder = lambda *a: (calls.append("scan"), scan(*a))[1]  # type: ignore[assignment]
    index.build_index = slow_build  # type: ignore[assignment]
    ds = ImageFolderDataset(root, S)
    try:
        ImageFolderDataset(broken, S)
        error = ""
    except DatasetError as exc:
        error = str(exc)
    sdist.barrier()
    sdist.cleanup_distributed()
    result = {"calls": calls, "files": [str(p) for p in ds.paths], "labels": ds.labels.tolist(),
              "sizes": ds.sizes.tolist(), "error": error}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_processes_rank0_builds_the_others_read(tmp_path: Path, cache: Path) -> None:
    root = make_folder(tmp_path / "data")
    broken = make_folder(tmp_path / "broken")
    (broken / "empty").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(dist_worker, args=(port, str(root), str(broken), str(tmp_path)), nprocs=WORLD,
                       join=True, start_method=method)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert r0["calls"] == ["scan", "build", "scan"]  # the data folder, then the broken one
    assert r1["calls"] == ["scan", "scan"]  # listed the folders, read no header: it waited for rank 0
    assert r0["files"] == r1["files"] and r0["labels"] == r1["labels"] and r0["sizes"] == r1["sizes"]
    assert len(r0["files"]) == 5 and not list(cache.glob("*.building"))
    for r in (r0, r1):  # each rank finds the wrong layout itself, with the same message
        assert str(broken / "empty") in r["error"] and "holds no images" in r["error"]


def test_a_waiting_process_builds_when_no_builder_comes(tmp_path: Path, cache: Path, monkeypatch) -> None:
    root = make_folder(tmp_path / "data")
    monkeypatch.setattr(sdist, "local_rank", lambda: 1)  # not the builder of its node
    monkeypatch.setattr(index, "GRACE_SECONDS", 0.3)
    marker = index.manifest_path(root).with_name(index.manifest_path(root).name + ".building")
    marker.parent.mkdir(parents=True)
    marker.touch()
    old = time.time() - index.STALE_SECONDS - 1
    os.utime(marker, (old, old))  # left by a builder that was killed
    t0 = time.monotonic()
    ds = ImageFolderDataset(root, S)
    waited = time.monotonic() - t0
    assert len(ds) == 5 and index.manifest_path(root).exists() and not marker.exists()
    assert 0.3 <= waited < 5, waited

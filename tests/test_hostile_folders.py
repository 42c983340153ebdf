"""Hostile image folders (issue 20): what real users' ImageFolder trees hold.

Each case either loads correctly (pixels checked against a plain reference computed here) or
fails with one line that names the file. Images are 16 x 16 px and loaded at ``image_size=16``,
where the resize and the centre crop are the identity, so decoded pixels compare exactly.
"""

from __future__ import annotations

import os
import resource
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclrv2.cli import error_line
from simclrv2.data import images
from simclrv2.data.folder import ImageFolderDataset
from simclrv2.data.images import DatasetError

S = 16


def gradient_rgb(seed: int = 0) -> np.ndarray:
    """(S, S, 3) uint8 with distinct values per pixel and channel."""
    return np.random.default_rng(seed).integers(0, 256, (S, S, 3), dtype=np.uint8)


def base_folder(root: Path) -> Path:
    """root/a/0.png and root/b/0.png: an ordinary two-class folder that each test then spoils."""
    for i, c in enumerate("ab"):
        (root / c).mkdir(parents=True)
        Image.fromarray(gradient_rgb(i)).save(root / c / "0.png")
    return root


def pixels(ds: ImageFolderDataset, name: str) -> np.ndarray:
    """(S, S, 3) as decoded by the dataset."""
    i = ds.filenames.index(name)
    return ds[i][0].permute(1, 2, 0).numpy()


def one_line(exc: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_grayscale_png(tmp_path: Path) -> None:
    root = base_folder(tmp_path)
    gray = gradient_rgb(5)[:, :, 0]
    Image.fromarray(gray, mode="L").save(root / "a" / "gray.png")
    out = pixels(ImageFolderDataset(root, S), "gray.png")
    assert np.array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))


def test_palette_png_with_and_without_transparency(tmp_path: Path) -> None:
    root = base_folder(tmp_path)
    palette = np.random.default_rng(1).integers(0, 256, (256, 3), dtype=np.uint8)
    index = gradient_rgb(2)[:, :, 0]
    img = Image.fromarray(index, mode="P")
    img.putpalette(palette.reshape(-1).tolist())
    img.save(root / "a" / "palette.png")
    img.save(root / "a" / "palette_transparent.png", transparency=7)
    ds = ImageFolderDataset(root, S)
    for name in ("palette.png", "palette_transparent.png"):
        assert np.array_equal(pixels(ds, name), palette[index]), name


def test_cmyk_jpeg_and_tiff(tmp_path: Path) -> None:
    root = base_folder(tmp_path)
    rgb = gradient_rgb(3)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(root / "a" / "cmyk.tif")
    cmyk.save(root / "a" / "cmyk.jpg", quality=100)
    ds = ImageFolderDataset(root, S)
    assert ds.channels == 3
    assert np.array_equal(pixels(ds, "cmyk.tif"), rgb)  # lossless: exact
    jpeg = pixels(ds, "cmyk.jpg").astype(int)
    assert np.abs(jpeg - rgb.astype(int)).mean() < 4  # lossy, but the colours, not their inverse


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    root = base_folder(tmp_path)
    wide = (np.arange(S * S, dtype=np.uint32).reshape(S, S) * 257).astype(np.uint16)  # 0 .. 65535
    Image.fromarray(wide).save(root / "a" / "deep.png")
    assert Image.open(root / "a" / "deep.png").mode.startswith("I")
    out = pixels(ImageFolderDataset(root, S), "deep.png")
    expected = np.round(wide / 257).astype(np.uint8)  # == the 8-bit value each pixel was made from
    assert np.array_equal(out, np.repeat(expected[:, :, None], 3, axis=2))
    assert out.min() == 0 and out.max() == 255


def test_exif_rotated_jpeg_is_shown_upright(tmp_path: Path) -> None:
    root = base_folder(tmp_path)
    stored = np.zeros((S, S, 3), dtype=np.uint8)
    stored[: S // 2, : S // 2] = 255  # bright top-left quadrant as stored in the file
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: the viewer rotates the stored image 90 degrees clockwise
    Image.fromarray(stored).save(root / "a" / "phone.jpg", exif=exif, quality=100)
    out = pixels(ImageFolderDataset(root, S), "phone.jpg").astype(int)
    upright = np.rot90(stored, k=-1)  # clockwise: the bright quadrant goes to the top right
    assert np.abs(out - upright).mean() < 8
    assert out[: S // 2, S // 2 :].mean() > 200 and out[: S // 2, : S // 2].mean() < 50


def png_bomb(path: Path, width: int, height: int) -> None:
    """A valid PNG header for a width x height RGB image with almost no data: decoding it would
    allocate width * height * 3 bytes before noticing that the pixels are missing."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))


def test_images_over_the_pixel_limit_are_refused_undecoded(tmp_path: Path, monkeypatch) -> None:
    root = base_folder(tmp_path)
    huge = root / "a" / "scan.png"
    for side in (20_000, 12_000):  # over twice PIL's own limit (PIL refuses too), and just over ours
        png_bomb(huge, side, side)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
        with pytest.raises(DatasetError) as exc:
            ImageFolderDataset(root, S)
        one_line(exc, str(huge), "over the limit of 89,478,485 pixels", "downscale")
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        assert grown_mib < 100, f"{grown_mib:.0f} MiB: the image was decoded"
    ds = ImageFolderDataset(root, S, skip_bad_images=True)
    assert str(huge) in ds.skipped
    huge.unlink()
    # an image over the limit when it is read is refused before decoding (the limit is lowered
    # here; a file swapped after indexing is caught earlier, by its changed size)
    strict = ImageFolderDataset(root, S)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", S * S - 1)
    with pytest.raises(DatasetError) as exc:
        strict[0]
    one_line(exc, str(strict.paths[0]), "16 x 16 px is over the limit", "skip_bad_images=true")


def test_zero_byte_file(tmp_path: Path) -> None:
    root = base_folder(tmp_path)
    (root / "b" / "empty.jpg").write_bytes(b"")
    with pytest.raises(DatasetError) as exc:
        ImageFolderDataset(root, S)
    one_line(exc, str(root / "b" / "empty.jpg"), "empty file (0 bytes)", "skip_bad_images=true")
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(ImageFolderDataset(root, S, skip_bad_images=True)) == 2


def test_non_image_files_next_to_images(tmp_path: Path) -> None:
    root = base_folder(tmp_path)
    (root / "a" / "notes.txt").write_text("labelled by Ann")
    (root / "a" / "Thumbs.db").write_bytes(os.urandom(64))
    (root / "a" / "labels.csv").write_text("0.png,a\n")
    (root / "README.md").write_text("my dataset")  # a file beside the class folders
    ds = ImageFolderDataset(root, S)
    assert ds.filenames == ["0.png", "0.png"] and ds.classes == ["a", "b"]
    # a non-image under an image name is not ignored: it is named
    (root / "b" / "photo.jpg").write_text("<html>403 Forbidden</html>")
    with pytest.raises(DatasetError) as exc:
        ImageFolderDataset(root, S)
    one_line(exc, str(root / "b" / "photo.jpg"))


def test_hidden_files_and_folders_are_ignored(tmp_path: Path) -> None:
    root = base_folder(tmp_path)
    (root / "a" / ".DS_Store").write_bytes(os.urandom(32))
    (root / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07" + os.urandom(60))  # macOS AppleDouble companion
    (root / ".ipynb_checkpoints").mkdir()
    Image.fromarray(gradient_rgb(9)).save(root / ".ipynb_checkpoints" / "x.png")
    ds = ImageFolderDataset(root, S)
    assert ds.classes == ["a", "b"] and len(ds) == 2


def test_symlinks_to_images_and_class_folders_are_followed(tmp_path: Path) -> None:
    root = base_folder(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "c").mkdir(parents=True)
    img = gradient_rgb(4)
    Image.fromarray(img).save(elsewhere / "c" / "shared.png")
    (root / "a" / "link.png").symlink_to(elsewhere / "c" / "shared.png")
    (root / "c").symlink_to(elsewhere / "c", target_is_directory=True)
    ds = ImageFolderDataset(root, S)
    assert ds.classes == ["a", "b", "c"]
    assert np.array_equal(pixels(ds, "link.png"), img)
    assert int(ds.labels[ds.filenames.index("shared.png")]) == 2
    (root / "b" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DatasetError) as exc:
        ImageFolderDataset(root, S)
    one_line(exc, str(root / "b" / "gone.png"), "broken symlink")


def test_symlink_loops(tmp_path: Path) -> None:
    root = base_folder(tmp_path)
    (root / "a" / "x.png").symlink_to(root / "a" / "y.png")
    (root / "a" / "y.png").symlink_to(root / "a" / "x.png")
    with pytest.raises(DatasetError) as exc:
        ImageFolderDataset(root, S)
    one_line(exc, str(root / "a" / "x.png"), "symlink loop")
    with pytest.warns(UserWarning, match="skipped 2"):
        assert len(ImageFolderDataset(root, S, skip_bad_images=True)) == 2
    # a class folder that points at itself
    for p in ("x.png", "y.png"):
        (root / "a" / p).unlink()
    (root / "loop").symlink_to(root / "loop", target_is_directory=True)
    with pytest.raises(DatasetError) as exc:
        ImageFolderDataset(root, S)
    one_line(exc, str(root / "loop"), "symlink loop")
    # a sub-folder linking back to its parent is never walked (images sit one level deep)
    (root / "loop").unlink()
    (root / "a" / "again").symlink_to(root, target_is_directory=True)
    assert len(ImageFolderDataset(root, S)) == 2


def test_class_folder_with_only_subfolders(tmp_path: Path) -> None:
    root = base_folder(tmp_path)
    for sub in ("2019", "2020"):
        (root / "c" / sub).mkdir(parents=True)
        Image.fromarray(gradient_rgb(6)).save(root / "c" / sub / "0.png")
    with pytest.raises(DatasetError) as exc:
        ImageFolderDataset(root, S)
    one_line(exc, str(root / "c"), "holds only sub-folders (2019, 2020)", "data_dir one level deeper")


def test_file_deleted_between_indexing_and_reading(tmp_path: Path) -> None:
    root = base_folder(tmp_path)
    ds = ImageFolderDataset(root, S)
    victim = ds.paths[1]
    victim.unlink()
    assert torch.equal(ds[0][0], torch.from_numpy(gradient_rgb(0)).permute(2, 0, 1))  # the others still load
    with pytest.raises(DatasetError) as exc:
        ds[1]
    one_line(exc, str(victim), "is gone now")
    # in a DataLoader worker the error comes back wrapped; the CLI still shows the file in one line
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    with pytest.raises(DatasetError) as exc:
        next(iter(loader))
    line = error_line(exc.value)
    assert str(victim) in line and "is gone now" in line and "\n" not in line, line

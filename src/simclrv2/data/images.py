"""What counts as an image file, how large one may be, and how any one becomes 8-bit RGB.

The bottom of the data layer (DESIGN.md "Layers"): numpy and PIL only, nothing of ours. The
dataset, the folder index and the per-image views all build on it, so none needs another.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
)

# Images with more pixels than this are refused from their header, before any decoding: a
# 20,000 x 20,000 px file would take 1.2 GB as RGB (PIL itself only warns below twice its limit).
# The same number as PIL's own default limit (about 9,459 x 9,459 px).
MAX_IMAGE_PIXELS = 89_478_485


class DatasetError(ValueError):
    """A dataset is missing, corrupt or malformed. The message is one line that names the file and the fix."""


def too_large(size: tuple[int, int]) -> str | None:
    """Why an image of ``size`` (width, height) is refused, or ``None`` when it is within the limit."""
    w, h = size
    if w * h > MAX_IMAGE_PIXELS:
        return f"{w} x {h} px is over the limit of {MAX_IMAGE_PIXELS:,} pixels; downscale it"
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, upright.

    EXIF orientation is applied (phone photos are stored sideways with a rotation tag). 16-bit
    greyscale (PNG mode ``I;16``/``I``) is scaled to 8 bits: PIL's own ``convert`` clips it, which
    turns almost every pixel white. Palette images with a transparent colour go through RGBA, as
    PIL asks; CMYK, greyscale and the rest use PIL's conversion.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        wide = np.asarray(img).astype(np.int64)
        img = Image.fromarray(np.clip((wide + 128) // 257, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")

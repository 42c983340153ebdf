"""Decoding image files into training and evaluation views, in DataLoader workers (METHOD.md 5).

Image folders too large to hold in memory are decoded while training. Each worker opens a file,
takes the view's geometry from the *original* image and resizes once:

- training (:func:`train_view`): a random resized crop (area ``scale``, aspect ratio ``ratio``,
  torchvision's sampling, METHOD.md 5.1) cut from the full image, then resized to ``size``. Flip,
  colour and blur stay batched on the device (:class:`~simclrv2.data.augment.SimCLRAugment` with
  ``cropped=True``).
- evaluation (:func:`eval_view`): the centre square of ``0.875 x`` the shorter side, resized to
  ``size``, which is "resize to ``size / 0.875``, then centre crop" in one resampling (METHOD.md
  5.3). Images with a shorter side under 64 px keep their whole centre square, as
  :class:`~simclrv2.data.augment.EvalTransform` does for in-memory data. ``simclrv2 predict`` and
  ``embed`` call the same function on image files.

JPEGs are decoded with PIL's draft mode when the view allows it: libjpeg scales the DCT by 1/2, 1/4
or 1/8 while decoding, as long as the crop keeps at least ``size`` pixels on each side, which skips
most of the decoding work for small views of large photographs.

The randomness of a training view comes from :func:`view_rng`, a function of (seed, step, dataset
index, view), so the batch is the same with any number of workers and after a resume mid-epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .augment import fallback_crop
from .images import to_rgb

EVAL_CROP = 0.875  # METHOD.md 5.3: centre crop of 87.5% of the shorter side
MIN_CROP_SIDE = 64  # smaller images are not centre-cropped for evaluation (as EvalTransform)


@dataclass(frozen=True)
class CropSpec:
    """A random resized crop taken in the worker: output side ``size``, area and aspect ranges."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    resample: str = "bilinear"  # bilinear | bicubic (PIL's, antialiased when shrinking)


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}


def view_rng(seed: int, step: int, index: int, view: int) -> np.random.Generator:
    """The random stream of one view of one image at one step (independent of workers and ranks)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, step, index, view, 0x5EED])


def crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
             rng: np.random.Generator, attempts: int = 10) -> tuple[float, float, float, float]:
    """``(x0, y0, w, h)`` in pixels of a random resized crop, torchvision's sampling.

    Up to ``attempts`` draws of area fraction in ``scale`` and log-uniform aspect ratio in ``ratio``;
    the first that fits is placed uniformly. If none fits: the whole image, its aspect ratio clamped
    into ``ratio`` and centred.
    """
    area = width * height
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if 0 < w <= width and 0 < h <= height:
            x0 = rng.uniform(0.0, width - w)
            y0 = rng.uniform(0.0, height - h)
            return x0, y0, w, h
    w, h = fallback_crop(width, height, ratio)
    return (width - w) / 2, (height - h) / 2, w, h


def eval_box(width: int, height: int) -> tuple[int, int, int]:
    """``(left, top, side)`` of the evaluation crop, rounded as EvalTransform rounds it."""
    short = min(width, height)
    side = round(EVAL_CROP * short) if short >= MIN_CROP_SIDE else short
    return (width - side + 1) // 2, (height - side + 1) // 2, side


def _draft(img: Image.Image, boxes: list[tuple[float, float, float, float]], size: int) -> tuple[float, float]:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale when every crop keeps ``size`` pixels a side.

    Returns the factors by which the image's width and height shrank (1.0 when it did not)."""
    width, height = img.size
    if img.format != "JPEG":
        return 1.0, 1.0
    need = (max(math.ceil(width * size / w) for _, _, w, _ in boxes),
            max(math.ceil(height * size / h) for _, _, _, h in boxes))
    img.draft(img.mode, need)  # PIL keeps the smallest scale at which the image is still >= need
    return img.size[0] / width, img.size[1] / height


_ORIENTATION = 0x0112  # EXIF tag; values 2-8 flip or rotate the stored pixels


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the opened image as shown, its EXIF rotation applied (phone photos)."""
    width, height = img.size
    if img.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):  # a quarter turn swaps the sides
        return height, width
    return width, height


def crop_resize(img: Image.Image, boxes: list[tuple[float, float, float, float]], size: int,
                resample: Image.Resampling, channels: int = 3) -> torch.Tensor:
    """Decode the opened ``img`` once and cut every box ``(x0, y0, w, h)`` (pixels of the upright
    full-size image), each resized to ``size`` -> ``uint8`` (len(boxes), channels, S, S).

    The result is a channels-last array seen as (N, C, S, S), not a contiguous copy: the
    DataLoader's collate, which stacks it into the batch anyway, does the transposing copy once.
    """
    sx = sy = 1.0
    upright = img.getexif().get(_ORIENTATION, 1) == 1
    if upright:  # rotated images decode in full, then turn
        sx, sy = _draft(img, boxes, size)
    rgb = img if upright and img.mode == "RGB" else to_rgb(img)  # to_rgb would copy an RGB image twice
    if channels == 1:
        rgb = rgb.convert("L")
    width, height = rgb.size
    out = np.empty((len(boxes), size, size, channels), np.uint8)
    for k, (x0, y0, w, h) in enumerate(boxes):
        # in the decoded image's pixels; rounding of the reduced size may leave a box a hair outside
        left, top = max(0.0, x0 * sx), max(0.0, y0 * sy)
        right, bottom = min(float(width), (x0 + w) * sx), min(float(height), (y0 + h) * sy)
        view = rgb.resize((size, size), resample, box=(left, top, right, bottom))
        out[k] = np.asarray(view).reshape(size, size, channels)
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def train_views(img: Image.Image, spec: CropSpec | tuple[CropSpec, ...],
                rngs: list[np.random.Generator]) -> torch.Tensor:
    """One random resized crop per generator of the opened (not yet decoded) ``img``
    -> ``uint8`` (len(rngs), 3, S, S). A tuple of specs gives each view its own area and aspect
    ranges (one spec a generator; the first spec's side and resampling for all)."""
    specs = spec if isinstance(spec, tuple) else (spec,) * len(rngs)
    width, height = upright_size(img)
    boxes = [crop_box(width, height, s.scale, s.ratio, rng) for s, rng in zip(specs, rngs, strict=True)]
    return crop_resize(img, boxes, specs[0].size, _RESAMPLE[specs[0].resample])


def train_view(img: Image.Image, spec: CropSpec, rng: np.random.Generator) -> torch.Tensor:
    """A random resized crop of the opened (not yet decoded) ``img`` -> ``uint8`` (3, S, S)."""
    return train_views(img, spec, [rng])[0]


def eval_view(img: Image.Image, size: int, channels: int = 3) -> torch.Tensor:
    """The evaluation view of the opened ``img`` -> ``uint8`` (channels, S, S) (METHOD.md 5.3)."""
    left, top, side = eval_box(*upright_size(img))
    return crop_resize(img, [(left, top, side, side)], size, Image.Resampling.BICUBIC, channels)[0]


def decode_train_view(path: str | Path, spec: CropSpec, rng: np.random.Generator) -> torch.Tensor:
    """:func:`train_view` of an image file."""
    with Image.open(path) as img:
        return train_view(img, spec, rng)


def decode_eval_view(path: str | Path, size: int, channels: int = 3) -> torch.Tensor:
    """:func:`eval_view` of an image file."""
    with Image.open(path) as img:
        return eval_view(img, size, channels)


class ViewDataset(torch.utils.data.Dataset):
    """Views of an image folder, cut in DataLoader workers (keys from ``BatchSource``).

    Training (``crop`` given): ``dataset[(index, step)]`` -> (``uint8`` (views, 3, S, S), index used,
    index), each view from :func:`train_views` with :func:`view_rng` (``crop`` a tuple: one spec a
    view). Evaluation (``crop=None``):
    ``dataset[(index, -1)]`` -> (``uint8`` (1, 3, S, S) from :func:`eval_view`, index used, index).
    The index used differs from the one asked for only when a bad file was replaced
    (``skip_bad_images``).
    """

    def __init__(self, folder: Any, size: int, crop: CropSpec | tuple[CropSpec, ...] | None, views: int = 1,
                 seed: int = 0) -> None:
        self.folder = folder
        self.size = size
        self.crop = crop
        self.views = views
        self.seed = seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        index, step = key
        if self.crop is None:
            x, used = self.folder.read(index, lambda img: eval_view(img, self.size))
            return x.unsqueeze(0), used, index
        rngs = [view_rng(self.seed, step, index, v) for v in range(self.views)]
        x, used = self.folder.read(index, lambda img: train_views(img, self.crop, rngs))
        return x, used, index

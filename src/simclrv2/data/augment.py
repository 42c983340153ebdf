"""Batched SimCLR augmentations on the training device (METHOD.md 5).

Every transform takes a whole batch ``(N, C, H, W)`` (``uint8`` 0..255 or float in [0, 1]) on any
device and returns ``float32`` in [0, 1] of shape ``(N, C, S, S)``. Random parameters are drawn per
sample, on the CPU from an optional ``torch.Generator``, so that a seed gives the same views on CPU
and GPU; :meth:`SimCLRAugment.sample_params` returns them as a dict so tests can check their
distributions, and :meth:`SimCLRAugment.apply` runs the batch ops for given parameters.

Why not torchvision.transforms.v2 on the batch: its batched functional ops take one factor (one crop
box, one hue shift, one blur sigma) for the whole batch, and SimCLR needs independent parameters per
image (METHOD.md 5.1 "each view independently"). So the ops here are small batched re-writes:

- crop + resize + flip in one ``grid_sample`` call with a per-sample affine grid;
- colour jitter with TF's definitions (``tf.image.adjust_*``, the reference code) and per-sample
  factors and per-sample random order;
- grayscale with ITU-R 601 weights (TF ``rgb_to_grayscale``);
- separable Gaussian blur as a grouped convolution, one kernel per image.

Deviations from the TF reference, on purpose:

- Resize is bilinear by default (``interpolation="bicubic"`` gives the reference's bicubic, clipped to
  [0, 1]; on 28-96 px images the difference is below the noise of the augmentation). ``grid_sample``
  does not antialias, so a crop much larger than the output aliases a little; store big images near
  the training size (``ImageFolderDataset(image_size=...)``).
- Crop boxes follow torchvision's ``RandomResizedCrop`` sampling (area fraction ~ U[scale], log aspect
  ratio uniform, 10 attempts, then a whole-image box with the ratio clamped) with continuous, not
  integer, box coordinates. TF's ``min_object_covered=0.1`` is not modelled; pass
  ``crop_scale=(0.1, 1.0)`` to get its effective minimum area.
- Blur draws one sigma per image, not one per batch as the TF code does (METHOD.md 5.1 item 4); the
  kernel size (``2 * ((S // 10) // 2) + 1`` taps: 23 at 224 px, 3 at 28-39 px) and the zero padding
  follow the reference.
- One-channel images (Fashion-MNIST): brightness and contrast apply; saturation, hue and grayscale
  are no-ops (there is no colour to change).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CropFlipAugment",
    "EvalTransform",
    "SimCLRAugment",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "blur_kernel_size",
    "gaussian_blur",
    "rgb_to_grayscale",
    "to_device",
    "to_float",
    "torchvision_simclr_transform",
]

# Indices of the four jitter ops in ``params["order"]``.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


def to_float(x: torch.Tensor) -> torch.Tensor:
    """``uint8`` 0..255 -> float32 0..1; float input is cast to float32 unchanged."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    if not x.is_floating_point():
        raise TypeError(f"expected uint8 or float images, got {x.dtype}")
    return x.to(torch.float32)


def to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``[t.to(device) for t in tensors]`` in one host-to-device copy.

    A batch's augmentation parameters and indices are a few dozen small CPU tensors; moved one at
    a time, each is a blocking copy (about 75 a pretraining step on a GPU, issue 30). Their bytes
    are packed into one buffer instead, pinned on CUDA so that the copy is asynchronous, and viewed
    back as the original dtypes and shapes on the device. For the CPU (and when none of them is on
    the host) it is ``t.to(device)`` each, which returns a tensor already there as it is.
    """
    if device.type == "cpu" or not any(t.device.type == "cpu" for t in tensors):
        return [t.to(device) for t in tensors]
    return _packed_copy(tensors, device)


def _packed_copy(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """:func:`to_device` without its shortcut: CPU tensors, one buffer, one copy."""
    flat = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    starts, total = [], 0
    for b in flat:
        total += -total % 8  # 8-byte aligned, so each part can be viewed back as int64 / float64
        starts.append(total)
        total += b.numel()
    buf = torch.empty(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
    for start, b in zip(starts, flat):
        buf[start : start + b.numel()] = b  # a device tensor among them would be copied back: pass CPU ones
    moved = buf.to(device, non_blocking=True)
    return [
        moved[start : start + b.numel()].view(t.dtype).view(t.shape)
        for start, b, t in zip(starts, flat, tensors)
    ]


def _check_batch(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected a batch (N, C, H, W) with C in (1, 3), got shape {tuple(x.shape)}")


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


# --------------------------------------------------------------------------------------------------
# Colour ops, per-sample factors. x: float (M, C, H, W) in [0, 1]; factors (M,). Each clips to [0, 1].
# --------------------------------------------------------------------------------------------------


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Multiplicative brightness (SimCLRv2 variant, METHOD.md 5.1): ``x * factor``."""
    return (x * _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """TF ``adjust_contrast``: ``(x - mean) * factor + mean`` with the mean per image and channel.

    (torchvision blends with the mean of the grayscale image instead; we follow the reference code.)
    """
    mean = x.mean(dim=(2, 3), keepdim=True)  # (M, C, 1, 1)
    return ((x - mean) * _per_sample(factor) + mean).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """TF ``adjust_saturation`` (HSV: ``s <- clip(s * factor, 0, 1)``) without the HSV round trip.

    With hue and value fixed, every channel is ``c = v - (v - c0) * s / s0``, so scaling saturation is
    ``v - (v - x) * k`` with ``k = min(factor, 1 / s) = min(factor, v / (v - min))``. Exact up to float
    rounding, and a few times cheaper than converting to HSV and back. No-op for 1 channel.
    """
    if x.shape[1] == 1:
        return x
    v = x.amax(dim=1, keepdim=True)  # (M, 1, H, W)
    chroma = v - x.amin(dim=1, keepdim=True)
    # Where chroma == 0 all channels equal v and (v - x) == 0, so any finite k gives the right answer.
    k = torch.minimum(_per_sample(factor), v / chroma.clamp_min(1e-12))
    return (v - (v - x) * k).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """TF ``adjust_hue``: rotate hue by ``delta`` turns (``delta`` in [-0.5, 0.5]). No-op for 1 channel.

    A hue rotation keeps value ``v = max`` and chroma ``v - min``, so instead of a full RGB -> HSV -> RGB
    round trip we compute the hue (in sixths of a turn) and go straight back with the branch-free
    formula ``channel_n = v - chroma * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6h) mod 6``, n = 5, 3, 1
    for r, g, b.
    """
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)  # each (M, H, W)
    v = torch.maximum(torch.maximum(r, g), b)
    chroma = v - torch.minimum(torch.minimum(r, g), b)
    inv = chroma.clamp_min(1e-12).reciprocal()  # gray pixels: numerators are 0, so the hue is 0
    # Hue sector by which channel holds the maximum (r wins ties, then g), in sixths of a turn.
    h6 = torch.where(v == r, (g - b) * inv, torch.where(v == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0))
    h6 = h6 + 6.0 * delta.view(-1, 1, 1).to(h6)
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1: no copy
    k = (n + h6.unsqueeze(1)).remainder_(6.0)  # (M, 3, H, W)
    w = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (v.unsqueeze(1) - chroma.unsqueeze(1) * w).clamp_(0.0, 1.0)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """TF ``rgb_to_grayscale`` weights, repeated to 3 identical channels. No-op for 1 channel."""
    if x.shape[1] == 1:
        return x
    w = _gray_weights(x.device, x.dtype)
    return (x * w).sum(dim=1, keepdim=True).expand_as(x).contiguous()


@functools.lru_cache(maxsize=8)
def _gray_weights(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, 3, 1, 1) ITU-R 601 weights, copied to each device once (not once a batch)."""
    return torch.tensor([0.2989, 0.5870, 0.1140], dtype=dtype).view(1, 3, 1, 1).to(device)


# --------------------------------------------------------------------------------------------------
# Blur
# --------------------------------------------------------------------------------------------------


def blur_kernel_size(image_size: int) -> int:
    """Taps of the blur kernel, as in the reference: radius ``(S // 10) // 2``, ``2 * radius + 1`` taps."""
    return 2 * ((image_size // 10) // 2) + 1


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one ``sigma`` per image and zero padding (METHOD.md 5.1 item 4).

    x: (M, C, H, W) float; sigma: (M,). torchvision's ``gaussian_blur`` takes one sigma per call, so we
    fold the images into the channel axis and run one grouped convolution per direction.
    """
    if kernel_size <= 1 or x.shape[0] == 0:
        return x
    m, c, h, w = x.shape
    radius = kernel_size // 2
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)  # (T,)
    kern = torch.exp(-(t**2) / (2.0 * sigma.to(x).view(-1, 1) ** 2))  # (M, T)
    kern = (kern / kern.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (M*C, T), image-major
    y = x.reshape(1, m * c, h, w)
    y = F.conv2d(y, kern.view(m * c, 1, 1, kernel_size), padding=(0, radius), groups=m * c)
    y = F.conv2d(y, kern.view(m * c, 1, kernel_size, 1), padding=(radius, 0), groups=m * c)
    return y.view(m, c, h, w).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Crop boxes
# --------------------------------------------------------------------------------------------------


def fallback_crop(width: int, height: int, ratio: tuple[float, float]) -> tuple[float, float]:
    """(w, h) of a random resized crop when no draw fits (torchvision): the whole image, its aspect
    ratio clamped into ``ratio``."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return float(width), width / ratio[0]
    if in_ratio > ratio[1]:
        return height * ratio[1], float(height)
    return float(width), float(height)


def _sample_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
    attempts: int = 10,
) -> torch.Tensor:
    """(n, 4) boxes ``[x0, y0, w, h]`` in input pixels, torchvision RandomResizedCrop sampling, vectorised.

    All ``attempts`` candidates are drawn for every sample at once; each sample keeps its first box
    that fits in the image, or falls back to the whole image with the aspect ratio clamped to ``ratio``.
    """
    area = height * width
    frac = torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)  # w / h
    w = torch.sqrt(frac * area * aspect)
    h = torch.sqrt(frac * area / aspect)
    fits = (w <= width) & (h <= height)
    first = fits.to(torch.int8).argmax(dim=1)  # index of the first fitting attempt (0 if none fits)
    ok = fits.any(dim=1)
    w = w.gather(1, first[:, None]).squeeze(1)
    h = h.gather(1, first[:, None]).squeeze(1)
    fw, fh = fallback_crop(width, height, ratio)
    w = torch.where(ok, w, torch.full_like(w, fw))
    h = torch.where(ok, h, torch.full_like(h, fh))
    pos = torch.rand(n, 2, generator=generator)
    x0 = pos[:, 0] * (width - w)
    y0 = pos[:, 1] * (height - h)
    return torch.stack([x0, y0, w, h], dim=1)


def _crop_resize_flip(
    x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, out_size: int, mode: str
) -> torch.Tensor:
    """Crop ``boxes`` (N, 4) ``[x0, y0, w, h]`` pixels, resize to ``out_size``, mirror where ``flip``.

    One ``affine_grid`` + ``grid_sample`` for the whole batch. With ``align_corners=False`` the
    normalised coordinate -1 / +1 is the outer edge of the first / last pixel, so output coordinate
    u in [-1, 1] maps to input ``(2 * x0 + w) / W - 1 + u * w / W``; flipping negates the u term.
    """
    n, c, height, width = x.shape
    x0, y0, w, h = boxes.to(x.device, torch.float32).unbind(dim=1)
    sx = w / width
    sy = h / height
    sx = torch.where(flip.to(x.device), -sx, sx)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=torch.float32)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (2.0 * x0 + w) / width - 1.0
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = (2.0 * y0 + h) / height - 1.0
    grid = F.affine_grid(theta, [n, c, out_size, out_size], align_corners=False)  # (N, S, S, 2)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0) if mode == "bicubic" else out


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------


class SimCLRAugment(nn.Module):
    """SimCLR pretraining view (METHOD.md 5.1), one independent draw per image.

    Order: random resized crop (area ``crop_scale``, aspect ``ratio``) + horizontal flip (``flip_p``)
    -> with ``jitter_p`` colour jitter of strength ``color_strength`` (brightness x U[max(0, 1-0.8s),
    1+0.8s], contrast and saturation x U[1-0.8s, 1+0.8s], hue + U[-0.2s, 0.2s] turns, in a random
    order per image, clipped after each) -> independently with ``gray_p`` grayscale -> with ``blur_p``
    Gaussian blur, sigma ~ U[0.1, 2.0] (only when ``blur``).

    ``aug(x, generator=g)`` gives one view; call it twice (or :meth:`two_views`) for the pair.
    """

    def __init__(
        self,
        image_size: int,
        color_strength: float = 1.0,
        blur: bool = True,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        interpolation: str = "bilinear",
    ) -> None:
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        for name, p in (("flip_p", flip_p), ("jitter_p", jitter_p), ("gray_p", gray_p), ("blur_p", blur_p)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if color_strength < 0:
            raise ValueError(f"color_strength must be >= 0, got {color_strength}")
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"interpolation must be bilinear, bicubic or nearest, got {interpolation!r}")
        self.image_size = int(image_size)
        self.color_strength = float(color_strength)
        self.blur = bool(blur)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip_p = float(flip_p)
        self.jitter_p = float(jitter_p)
        self.gray_p = float(gray_p)
        self.blur_p = float(blur_p) if blur else 0.0
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.interpolation = interpolation

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, color_strength={self.color_strength}, blur={self.blur}, "
            f"crop_scale={self.crop_scale}, interpolation={self.interpolation}"
        )

    def sample_params(
        self, n: int, height: int, width: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Draw the random parameters of ``n`` views of ``height x width`` images (CPU tensors).

        Keys: ``crop`` (n, 4) ``[x0, y0, w, h]`` pixels; ``area`` (n,) crop area / image area; ``flip``,
        ``jitter``, ``gray``, ``blur`` (n,) bool; ``brightness``, ``contrast``, ``saturation`` (n,)
        factors; ``hue`` (n,) shift in turns; ``order`` (n, 4) a permutation of the jitter ops
        (0 brightness, 1 contrast, 2 saturation, 3 hue); ``sigma`` (n,) blur sigma.
        The same numbers are drawn whatever the probabilities, so a seed's stream is stable.
        """
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(
                "pass a CPU torch.Generator: parameters are drawn on the CPU for reproducibility"
            )
        s = self.color_strength
        boxes = _sample_boxes(n, height, width, self.crop_scale, self.ratio, generator)
        u = torch.rand(n, 4, generator=generator)  # flip, jitter, gray, blur coins
        factors = torch.rand(n, 4, generator=generator)
        order = torch.rand(n, 4, generator=generator).argsort(dim=1)

        def span(lo: float, hi: float, col: int) -> torch.Tensor:
            return lo + (hi - lo) * factors[:, col]

        sigma = torch.empty(n).uniform_(self.blur_sigma[0], self.blur_sigma[1], generator=generator)
        return {
            "crop": boxes,
            "area": boxes[:, 2] * boxes[:, 3] / (height * width),
            "flip": u[:, 0] < self.flip_p,
            "jitter": u[:, 1] < self.jitter_p,
            "gray": u[:, 2] < self.gray_p,
            "blur": u[:, 3] < self.blur_p,
            "brightness": span(max(0.0, 1.0 - 0.8 * s), 1.0 + 0.8 * s, 0),
            "contrast": span(1.0 - 0.8 * s, 1.0 + 0.8 * s, 1),
            "saturation": span(1.0 - 0.8 * s, 1.0 + 0.8 * s, 2),
            "hue": span(-0.2 * s, 0.2 * s, 3),
            "order": order,
            "sigma": sigma,
        }

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor], cropped: bool = False) -> torch.Tensor:
        """Run the augmentation with given parameters. x: (N, C, H, W) -> float32 (N, C, S, S) in [0, 1].

        ``cropped``: ``x`` holds views already cut and resized to ``image_size`` (in DataLoader
        workers, from the original files, :mod:`simclrv2.data.decode`); only the flip is left of the
        geometry.
        """
        _check_batch(x)
        channels = x.shape[1]
        # Every index and factor is picked on the CPU first, then all of them move in one copy
        # (:func:`to_device`): the batch ops below then run on the device without waiting on the host.
        jitter = self._jitter_plan(params, channels)  # [(op, image indices, their factors)]
        gray = torch.nonzero(params["gray"]).squeeze(1) if channels == 3 else torch.zeros(0, dtype=torch.int64)
        k = blur_kernel_size(self.image_size)
        blur_idx = torch.nonzero(params["blur"]).squeeze(1) if k > 1 else torch.zeros(0, dtype=torch.int64)
        host = [params["crop"], params["flip"], gray, blur_idx, params["sigma"][blur_idx]]
        host += [t for _, idx, factor in jitter for t in (idx, factor)]
        crop, flip, gray, blur_idx, sigma, *rest = to_device(host, x.device)
        if cropped:
            if x.shape[2] != self.image_size or x.shape[3] != self.image_size:
                raise ValueError(f"cropped views must be {self.image_size} px, got {tuple(x.shape[2:])}")
            out = to_float(x)
            out = torch.where(_per_sample(flip), out.flip(3), out)
        else:
            out = _crop_resize_flip(to_float(x), crop, flip, self.image_size, self.interpolation)
        for (op, _, _), idx, factor in zip(jitter, rest[0::2], rest[1::2]):
            out[idx] = op(out[idx], factor)
        if gray.numel():
            out[gray] = rgb_to_grayscale(out[gray])
        if blur_idx.numel():
            out[blur_idx] = gaussian_blur(out[blur_idx], sigma, k)
        return out

    def _jitter_plan(self, params: dict[str, torch.Tensor], channels: int) -> list[tuple[Any, torch.Tensor, torch.Tensor]]:
        """Colour jitter in a per-image random order, as CPU work: at each of the 4 positions, every
        op runs once on the images that have it there (same total work as a fixed order).

        Returns ``(op, image indices, their factors)`` in the order they run; ops that would touch no
        image, and saturation and hue on one channel (no colour to change), are left out.
        """
        jitter = params["jitter"]
        if not bool(jitter.any()):
            return []
        ops = (
            (adjust_brightness, params["brightness"]),
            (adjust_contrast, params["contrast"]),
            (adjust_saturation, params["saturation"]),
            (adjust_hue, params["hue"]),
        )
        plan = []
        for pos in range(4):
            for op_id, (op, factor) in enumerate(ops):
                if channels == 1 and op_id in (SATURATION, HUE):
                    continue
                idx = torch.nonzero(jitter & (params["order"][:, pos] == op_id)).squeeze(1)
                if idx.numel():
                    plan.append((op, idx, factor[idx]))
        return plan

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                cropped: bool = False) -> torch.Tensor:
        """One augmented view of every image in ``x`` (N, C, H, W) -> float32 (N, C, S, S) in [0, 1].

        ``cropped=True``: ``x`` are views already cropped and resized (see :meth:`apply`)."""
        _check_batch(x)
        params = self.sample_params(x.shape[0], x.shape[2], x.shape[3], generator)
        return self.apply(x, params, cropped=cropped)

    def two_views(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent views (METHOD.md 5.1), each (N, C, S, S)."""
        return self(x, generator), self(x, generator)


class CropFlipAugment(SimCLRAugment):
    """Fine-tuning / distillation / linear-eval training view (METHOD.md 5.2): random resized crop + flip only."""

    def __init__(
        self,
        image_size: int,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        interpolation: str = "bilinear",
    ) -> None:
        super().__init__(
            image_size,
            color_strength=0.0,
            blur=False,
            crop_scale=crop_scale,
            ratio=ratio,
            flip_p=flip_p,
            jitter_p=0.0,
            gray_p=0.0,
            blur_p=0.0,
            interpolation=interpolation,
        )


class EvalTransform(nn.Module):
    """Deterministic evaluation view (METHOD.md 5.3).

    Images with a shorter side >= ``min_crop_side`` (64) get the reference's centre crop: a square of
    ``rint(0.875 * min(H, W))`` pixels, offsets rounded up, then a bicubic resize to ``image_size``
    (antialiased when shrinking) clipped to [0, 1]. Smaller images (CIFAR, Fashion-MNIST) are only
    converted to float and resized when their size differs.
    """

    def __init__(self, image_size: int, crop_proportion: float = 0.875, min_crop_side: int = 64) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.crop_proportion = float(crop_proportion)
        self.min_crop_side = int(min_crop_side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_batch(x)
        x = to_float(x)
        height, width = x.shape[2], x.shape[3]
        if min(height, width) >= self.min_crop_side:
            # round() is round-half-even like TF's rint.
            side = round(self.crop_proportion * min(height, width))
            top, left = (height - side + 1) // 2, (width - side + 1) // 2
            x = x[:, :, top : top + side, left : left + side]
        if x.shape[2] != self.image_size or x.shape[3] != self.image_size:
            shrink = x.shape[2] > self.image_size or x.shape[3] > self.image_size
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bicubic",
                align_corners=False,
                antialias=shrink,
            ).clamp_(0.0, 1.0)
        return x.contiguous()


def torchvision_simclr_transform(
    image_size: int,
    color_strength: float = 1.0,
    blur: bool = True,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
):
    """The same augmentation as a per-image torchvision v2 pipeline (for the benchmark and comparisons).

    Takes one ``uint8`` image (C, H, W), returns float32 (C, S, S) in [0, 1]. Differences from
    :class:`SimCLRAugment`: torchvision's contrast/saturation definitions, a fixed jitter order per
    call chosen by ``ColorJitter`` (random per image, as here), reflect padding in the blur.
    """
    from torchvision.transforms import v2

    s = color_strength
    steps: list = [
        v2.RandomResizedCrop(image_size, scale=crop_scale, ratio=ratio, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    k = blur_kernel_size(image_size)
    if blur and k > 1:
        steps.append(v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5))
    return v2.Compose(steps)

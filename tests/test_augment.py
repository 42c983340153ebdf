"""Batched SimCLR augmentations (METHOD.md 5): parameter distributions, ops vs naive references."""

from __future__ import annotations

import colorsys
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from simclrv2.data import CropFlipAugment, EvalTransform, SimCLRAugment, torchvision_simclr_transform
from simclrv2.data.augment import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    gaussian_blur,
    rgb_to_grayscale,
)

N_PARAMS = 20000


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def params() -> dict[str, torch.Tensor]:
    return SimCLRAugment(32).sample_params(N_PARAMS, 32, 32, _gen(0))


# ------------------------------------------------------------------------------------------------
# Parameter distributions (METHOD.md 5.1)
# ------------------------------------------------------------------------------------------------


def test_probabilities_match_spec(params: dict[str, torch.Tensor]) -> None:
    tol = 4 * math.sqrt(0.25 / N_PARAMS)  # 4 sigma of a Bernoulli mean
    for key, p in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.5)):
        assert abs(params[key].float().mean().item() - p) < tol, key
    # Grayscale is independent of jitter (METHOD.md 5.1 item 3): p=0.2 whether or not jitter ran.
    jit = params["jitter"]
    assert abs(params["gray"][jit].float().mean().item() - 0.2) < 2 * tol
    assert abs(params["gray"][~jit].float().mean().item() - 0.2) < 3 * tol


def test_jitter_factor_ranges(params: dict[str, torch.Tensor]) -> None:
    # s = 1: brightness U[0.2, 1.8], contrast and saturation U[0.2, 1.8], hue U[-0.2, 0.2].
    for key, lo, hi in (
        ("brightness", 0.2, 1.8),
        ("contrast", 0.2, 1.8),
        ("saturation", 0.2, 1.8),
        ("hue", -0.2, 0.2),
    ):
        v = params[key]
        assert v.min() >= lo and v.max() <= hi, key
        assert v.min() < lo + 0.01 * (hi - lo) and v.max() > hi - 0.01 * (hi - lo), key  # range is used
        assert abs(v.mean().item() - (lo + hi) / 2) < 0.02 * (hi - lo), key  # uniform: centred
        q = torch.quantile(v, torch.tensor([0.25, 0.75]))
        assert torch.allclose(
            q, torch.tensor([lo + 0.25 * (hi - lo), lo + 0.75 * (hi - lo)]), atol=0.02 * (hi - lo)
        )
    # Strong colour: brightness lower bound clamps at 0 (max(0, 1 - 0.8 s)), contrast goes negative.
    p = SimCLRAugment(32, color_strength=1.5).sample_params(5000, 32, 32, _gen(1))
    assert p["brightness"].min() >= 0.0 and p["brightness"].min() < 0.01 and p["brightness"].max() <= 2.2
    assert p["contrast"].min() < -0.1
    # Weak colour (CIFAR, s = 0.5): brightness U[0.6, 1.4], hue U[-0.1, 0.1].
    p = SimCLRAugment(32, color_strength=0.5).sample_params(5000, 32, 32, _gen(2))
    assert p["brightness"].min() >= 0.6 and p["brightness"].max() <= 1.4
    assert p["hue"].abs().max() <= 0.1


def test_jitter_order_is_a_random_permutation_per_image(params: dict[str, torch.Tensor]) -> None:
    order = params["order"]
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand_as(order))
    counts = {perm: 0 for perm in itertools.permutations(range(4))}
    for row in order.tolist():
        counts[tuple(row)] += 1
    expected = N_PARAMS / 24
    assert all(abs(c - expected) < 5 * math.sqrt(expected) for c in counts.values())


def test_blur_sigma_range(params: dict[str, torch.Tensor]) -> None:
    sigma = params["sigma"]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean().item() - 1.05) < 0.02
    assert not SimCLRAugment(32, blur=False).sample_params(100, 32, 32, _gen(0))["blur"].any()


def test_crop_boxes_inside_image_with_spec_area_and_ratio(params: dict[str, torch.Tensor]) -> None:
    x0, y0, w, h = params["crop"].unbind(1)
    eps = 1e-4
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 32 + eps).all() and (y0 + h <= 32 + eps).all()
    area = params["area"]
    assert area.min() >= 0.08 - eps and area.max() <= 1.0 + eps
    aspect = w / h
    assert aspect.min() >= 3 / 4 - eps and aspect.max() <= 4 / 3 + eps


def test_crop_area_distribution_matches_torchvision() -> None:
    # Naive reference: torchvision's RandomResizedCrop.get_params, one image at a time, on a large
    # image so its integer rounding is negligible. Two-sample Kolmogorov-Smirnov distance.
    n, side = 4000, 1000
    torch.manual_seed(0)
    dummy = torch.empty(1, side, side)
    ref = []
    for _ in range(n):
        _, _, h, w = v2.RandomResizedCrop.get_params(dummy, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3])
        ref.append(h * w / side**2)
    ours = SimCLRAugment(224).sample_params(n, side, side, _gen(3))["area"].numpy()
    ref_sorted, ours_sorted = np.sort(ref), np.sort(ours)
    grid = np.linspace(0.08, 1.0, 200)
    ks = np.max(np.abs(np.searchsorted(ref_sorted, grid) / n - np.searchsorted(ours_sorted, grid) / n))
    assert ks < 0.04  # 1% critical value for n = m = 4000 is 0.036
    # Uniform in area up to ~0.75 of the image; above, boxes with aspect ratios far from the image's
    # do not fit and are redrawn, so the top quarter holds about half as many (as in torchvision).
    hist = np.histogram(ours, bins=4, range=(0.08, 1.0))[0] / n
    ref_hist = np.histogram(ref, bins=4, range=(0.08, 1.0))[0] / n
    assert np.all(np.abs(hist - ref_hist) < 0.03)
    assert np.all(np.abs(hist[:3] - hist[:3].mean()) < 0.02) and 0.08 < hist[3] < 0.2


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_output_shape_range_dtype(channels: int, dtype: torch.dtype) -> None:
    x = torch.randint(0, 256, (12, channels, 30, 26), dtype=torch.uint8)
    if dtype == torch.float32:
        x = x.float() / 255
    for aug in (SimCLRAugment(24), SimCLRAugment(24, interpolation="bicubic"), CropFlipAugment(20)):
        out = aug(x, generator=_gen(0))
        assert out.dtype == torch.float32 and out.shape == (12, channels, aug.image_size, aug.image_size)
        assert out.min() >= 0.0 and out.max() <= 1.0
    assert EvalTransform(28)(x).shape == (12, channels, 28, 28)


def test_determinism_with_seeded_generator() -> None:
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    aug = SimCLRAugment(32)
    a, b = aug(x, generator=_gen(5)), aug(x, generator=_gen(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(x, generator=_gen(6)))
    v1, v2_ = aug.two_views(x, generator=_gen(5))
    assert torch.equal(v1, a) and not torch.equal(v1, v2_)  # the two views differ


def test_one_channel_input_has_no_colour_ops() -> None:
    x = torch.rand(64, 1, 28, 28)
    aug = SimCLRAugment(28)
    p = aug.sample_params(64, 28, 28, _gen(0))
    out = aug.apply(x, p)
    assert out.shape == (64, 1, 28, 28)
    # Saturation, hue and grayscale leave one channel alone; brightness and contrast act.
    f = torch.full((64,), 1.7)
    assert torch.equal(adjust_saturation(x, f), x) and torch.equal(adjust_hue(x, f - 1.5), x)
    assert torch.equal(rgb_to_grayscale(x), x)
    assert not torch.equal(adjust_brightness(x, f), x)


# ------------------------------------------------------------------------------------------------
# Ops against naive references
# ------------------------------------------------------------------------------------------------


def _identity_geometry(**kw) -> SimCLRAugment:
    return SimCLRAugment(8, crop_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, **kw)


def test_crop_resize_and_flip_match_slicing() -> None:
    x = torch.rand(2, 3, 12, 12)
    aug = CropFlipAugment(4)
    p = aug.sample_params(2, 12, 12, _gen(0))
    # A 4x4 box at (x0, y0) = (3, 5) resized to 4x4: output pixel centres land on input pixel centres.
    p["crop"] = torch.tensor([[3.0, 5.0, 4.0, 4.0], [0.0, 8.0, 4.0, 4.0]])
    p["flip"] = torch.tensor([False, True])
    out = aug.apply(x, p)
    assert torch.allclose(out[0], x[0, :, 5:9, 3:7], atol=1e-5)
    assert torch.allclose(out[1], x[1, :, 8:12, 0:4].flip(-1), atol=1e-5)
    # Whole image, no flip, no colour: the identity.
    ident = CropFlipAugment(12, crop_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    assert torch.allclose(ident(x, generator=_gen(1)), x, atol=1e-5)


def test_crop_resize_against_torchvision_resized_crop() -> None:
    # Downscale an 8x8 box of a 32x32 image to 4x4: bilinear with align_corners=False averages 2x2
    # blocks exactly, as torchvision's resized_crop without antialias does.
    x = torch.rand(1, 3, 32, 32)
    aug = CropFlipAugment(4)
    p = aug.sample_params(1, 32, 32, _gen(0))
    p["crop"], p["flip"] = torch.tensor([[10.0, 6.0, 8.0, 8.0]]), torch.tensor([False])
    ref = TF.resized_crop(x[0], top=6, left=10, height=8, width=8, size=[4, 4], antialias=False)
    assert torch.allclose(aug.apply(x, p)[0], ref, atol=1e-5)


def _hsv_reference(x: torch.Tensor, fn) -> torch.Tensor:
    """Per-pixel colorsys round trip: fn(h, s, v) -> (h, s, v)."""
    out = torch.empty_like(x)
    for i, j in itertools.product(range(x.shape[1]), range(x.shape[2])):
        h, s, v = colorsys.rgb_to_hsv(*x[:, i, j].tolist())
        out[:, i, j] = torch.tensor(colorsys.hsv_to_rgb(*fn(h, s, v)))
    return out


def test_colour_ops_against_naive_references() -> None:
    x = torch.rand(3, 3, 5, 6, generator=_gen(0))
    x[0, :, 0, 0] = 0.5  # a gray pixel (zero chroma)
    f = torch.tensor([0.3, 1.0, 1.7])
    d = torch.tensor([-0.2, 0.05, 0.45])
    assert torch.allclose(adjust_brightness(x, f), (x * f.view(-1, 1, 1, 1)).clamp(0, 1))
    mean = x.mean(dim=(2, 3), keepdim=True)  # TF adjust_contrast: per-channel mean
    assert torch.allclose(adjust_contrast(x, f), ((x - mean) * f.view(-1, 1, 1, 1) + mean).clamp(0, 1))
    for k in range(3):
        ref_s = _hsv_reference(x[k], lambda h, s, v, k=k: (h, min(1.0, s * float(f[k])), v))
        assert torch.allclose(adjust_saturation(x, f)[k], ref_s, atol=1e-5)
        ref_h = _hsv_reference(x[k], lambda h, s, v, k=k: ((h + float(d[k])) % 1.0, s, v))
        assert torch.allclose(adjust_hue(x, d)[k], ref_h, atol=1e-5)
        assert torch.allclose(adjust_hue(x, d)[k], TF.adjust_hue(x[k], float(d[k])), atol=1e-5)
    gray = rgb_to_grayscale(x)
    assert torch.allclose(gray[:, 0], 0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])
    assert torch.equal(gray[:, 0], gray[:, 2])


def test_batched_jitter_follows_each_images_order() -> None:
    # Naive reference: apply the four ops one image at a time in that image's order.
    n = 24
    x = torch.rand(n, 3, 8, 8, generator=_gen(1))
    aug = _identity_geometry(gray_p=0.0, blur=False, jitter_p=0.7)
    p = aug.sample_params(n, 8, 8, _gen(2))
    p["order"] = torch.tensor(list(itertools.permutations(range(4))))  # all 24 orders appear
    out = aug.apply(x, p)
    ops = [
        (adjust_brightness, "brightness"),
        (adjust_contrast, "contrast"),
        (adjust_saturation, "saturation"),
        (adjust_hue, "hue"),
    ]
    for i in range(n):
        ref = x[i : i + 1]
        if p["jitter"][i]:
            for op_id in p["order"][i].tolist():
                op, key = ops[op_id]
                ref = op(ref, p[key][i : i + 1])
        assert torch.allclose(out[i], ref[0], atol=1e-5), i
    # The order matters for these factors, so the check above can tell orders apart.
    a = adjust_contrast(adjust_brightness(x[:1], torch.tensor([1.8])), torch.tensor([0.3]))
    b = adjust_brightness(adjust_contrast(x[:1], torch.tensor([0.3])), torch.tensor([1.8]))
    assert not torch.allclose(a, b, atol=1e-3)


def test_grayscale_and_blur_applied_per_image() -> None:
    n = 16
    x = torch.rand(n, 3, 8, 8, generator=_gen(3))
    aug = _identity_geometry(jitter_p=0.0, gray_p=0.5, blur=False)
    p = aug.sample_params(n, 8, 8, _gen(4))
    out = aug.apply(x, p)
    is_gray = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
    assert torch.equal(is_gray, p["gray"]) and 0 < int(p["gray"].sum()) < n
    assert torch.allclose(out[~p["gray"]], x[~p["gray"]], atol=1e-5)


def test_gaussian_blur_against_naive_2d_conv() -> None:
    x = torch.rand(3, 2, 30, 30, generator=_gen(5))
    sigma = torch.tensor([0.1, 1.0, 2.0])
    k = blur_kernel_size(30)  # 3 // 2 = 1 -> 3 taps, as the reference for 30 px
    assert k == 3 and blur_kernel_size(224) == 23 and blur_kernel_size(28) == 3 and blur_kernel_size(96) == 9
    out = gaussian_blur(x, sigma, 9)
    for i in range(3):
        t = torch.arange(-4, 5, dtype=torch.float32)
        g = torch.exp(-(t**2) / (2 * sigma[i] ** 2))
        g = g / g.sum()
        kernel2d = (g[:, None] * g[None, :]).expand(2, 1, 9, 9)
        ref = F.conv2d(x[i : i + 1], kernel2d, padding=4, groups=2)  # zero padding, as TF "SAME"
        assert torch.allclose(out[i], ref[0].clamp(0, 1), atol=1e-5)
    assert torch.allclose(out[0], x[0], atol=1e-4)  # sigma 0.1 is (almost) the identity


def test_blur_only_where_sampled() -> None:
    n = 12
    x = torch.rand(n, 3, 40, 40, generator=_gen(6))
    aug = SimCLRAugment(40, crop_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0)
    p = aug.sample_params(n, 40, 40, _gen(7))
    out = aug.apply(x, p)
    changed = (out - x).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert torch.equal(changed, p["blur"]) and 0 < int(p["blur"].sum()) < n


def test_eval_transform_centre_crop() -> None:
    x = torch.randint(0, 256, (2, 3, 256, 300), dtype=torch.uint8)
    out = EvalTransform(224)(x)
    # rint(0.875 * 256) = 224 -> no resize; offsets rounded up: (256-224+1)//2 = 16, (300-224+1)//2 = 38.
    assert torch.equal(out, x[:, :, 16:240, 38:262].float() / 255)
    small = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(EvalTransform(28)(small), small.float() / 255)  # small images: no crop
    up = EvalTransform(32)(small)
    assert up.shape == (2, 1, 32, 32) and up.min() >= 0 and up.max() <= 1


def test_torchvision_pipeline_runs_on_one_and_three_channels() -> None:
    torch.manual_seed(0)
    for c in (1, 3):
        out = torchvision_simclr_transform(32)(torch.randint(0, 256, (c, 40, 40), dtype=torch.uint8))
        assert out.shape == (c, 32, 32) and out.dtype == torch.float32 and 0 <= out.min() <= out.max() <= 1


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="crop_scale"):
        SimCLRAugment(32, crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="jitter_p"):
        SimCLRAugment(32, jitter_p=1.5)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        SimCLRAugment(32)(torch.rand(3, 32, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_matches_cpu() -> None:
    x = torch.randint(0, 256, (32, 3, 40, 40), dtype=torch.uint8)
    aug = SimCLRAugment(32)
    cpu = aug(x, generator=_gen(9))
    gpu = aug(x.cuda(), generator=_gen(9))
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)

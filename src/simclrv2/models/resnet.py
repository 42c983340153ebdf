"""ResNet v1 (post-activation) backbone with optional Selective Kernel, as in SimCLRv2.

Follows METHOD.md 1 (architecture, init) and section 8.2 (module registration order): the
i-th ``nn.Conv2d`` / ``nn.BatchNorm2d`` in ``modules()`` order is the i-th ``conv2d_*`` /
``batch_normalization_*`` variable of the released TF1 checkpoints, so a converter can map
weights by position.

Two padding modes (METHOD.md 1.5):

* ``tf_padding=False`` (default): ordinary PyTorch padding -- max-pool ``padding=1`` on both
  sides, and the SK avg-pool shortcut zero-pads bottom/right and counts the zeros in the mean
  (the layout of the usual PyTorch port of the released weights).
* ``tf_padding=True``: exact TF "SAME" semantics -- max-pool pads by the SAME formula (on an
  even input only bottom/right, with -inf), and the stride-1 SK avg-pool excludes padded cells
  from the mean.

Convolutions are identical in both modes: TF pads strided convs explicitly by (k-1)//2 before
and the remainder after (symmetric for the odd kernels used here), and stride-1 "SAME" convs
with odd kernels are symmetric too.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

BN_EPS = 1e-5  # METHOD.md 1.6
BN_MOMENTUM = 0.1  # TF decay 0.9 -> PyTorch momentum 0.1 (METHOD.md 1.6)
SK_MIN_DIM = 32  # METHOD.md 1.3: floor on the SK mixing width

# depth -> (block type, blocks per stage). METHOD.md 1.1; depth 10 ([1,1,1,1] basic blocks) is a
# project extension used as a tiny CPU distillation student.
RESNET_LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}


def sk_mid_dim(filters: int, sk_ratio: float, min_dim: int = SK_MIN_DIM) -> int:
    """Width of the SK mixing bottleneck: ``max(int(filters * sk_ratio), min_dim)`` (METHOD.md 1.3)."""
    return max(int(filters * sk_ratio), min_dim)


def tf_same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding TF "SAME" applies along one spatial dim of length ``size``.

    TF makes the output ``ceil(size / stride)`` long and puts the odd pixel of padding after.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv2d(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    """Bias-free conv with symmetric ``(k-1)//2`` padding, exact for TF's padding of odd k (METHOD.md 1.5)."""
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=(kernel - 1) // 2, bias=False)


def batch_norm2d(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def variance_scaling_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """TF ``variance_scaling_initializer()``: fan_in, truncated normal, scale 1.0 (METHOD.md 1.6).

    TF truncates at two standard deviations and divides the std by 0.8796... (the std of a unit
    normal truncated to [-2, 2]) so the truncated samples have variance ``scale / fan_in``.
    """
    fan_in = weight.shape[1] * math.prod(weight.shape[2:])
    std = math.sqrt(scale / fan_in) / 0.87962566103423978
    return truncated_normal_(weight, std)


@torch.no_grad()
def truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Fill with normal(0, std) samples truncated to [-2 std, 2 std], by redrawing the ~4.6%
    that fall outside (the scheme TF uses). Same distribution as ``nn.init.trunc_normal_``,
    whose inverse-CDF sampler is ~20x slower on CPU (seconds for a ResNet-50)."""
    if tensor.is_meta:
        return tensor
    flat = tensor.view(-1)
    flat.normal_(0.0, std)
    bound = 2.0 * std
    redraw = (flat.abs() > bound).nonzero().squeeze(1)  # one full pass; then only the rejects
    while redraw.numel() > 0:
        samples = flat.new_empty(redraw.numel()).normal_(0.0, std)
        flat[redraw] = samples
        redraw = redraw[samples.abs() > bound]
    return tensor


class MaxPoolSame(nn.Module):
    """Stem max-pool 3x3 stride 2 (METHOD.md 1.4, 1.5).

    TF mode pads by the SAME formula with -inf (on an even input: 0 before, 1 after), so every
    window covers the same pixels as in TF. Default mode uses PyTorch's symmetric ``padding=1``,
    which on even inputs shifts every window by one pixel.
    """

    def __init__(self, tf_padding: bool = False) -> None:
        super().__init__()
        self.tf_padding = tf_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tf_padding:
            return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        top, bottom = tf_same_pads(x.shape[-2], 3, 2)
        left, right = tf_same_pads(x.shape[-1], 3, 2)
        x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, kernel_size=3, stride=2)


class AvgPoolShortcut(nn.Module):
    """2x2 average pool of the SK (ResNet-D) projection shortcut (METHOD.md 1.4, 1.5).

    Stride 2: pad bottom/right by one zero row/column, then a VALID 2x2/2 pool -- what TF does
    explicitly, identical in both modes. Stride 1 (first block of stage 1): TF uses a SAME 2x2/1
    pool, which pads bottom/right by one and averages only over real cells; default mode
    zero-pads and divides by 4 (counting the padded zeros).
    """

    def __init__(self, stride: int, tf_padding: bool = False) -> None:
        super().__init__()
        self.stride = stride
        self.tf_padding = tf_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), kernel_size=2, stride=self.stride)
        if self.stride == 1 and self.tf_padding:
            # (1, 1, H, W) fraction of real cells in each window: 1 inside, 1/2 on the last
            # row/column, 1/4 in the corner; dividing by it turns the zero-padded mean into
            # the mean over real cells only.
            ones = torch.ones((1, 1, *x.shape[-2:]), dtype=x.dtype, device=x.device)
            pooled = pooled / F.avg_pool2d(F.pad(ones, (0, 1, 0, 1)), kernel_size=2, stride=1)
        return pooled


class Stem(nn.Module):
    """Network input layers (METHOD.md 1.4).

    * ``cifar_stem``: 3x3 conv (stride ``stem_stride``, 1 for CIFAR) -> BN -> ReLU, no pooling
      (small images; stride 2 halves the resolution for 4x fewer FLOPs).
    * SK on (ImageNet): conv3x3/2 (c/2) -> BN-ReLU -> conv3x3 (c/2) -> BN-ReLU -> conv3x3 (c)
      -> BN-ReLU -> max-pool 3x3/2.
    * SK off (ImageNet): conv7x7/2 (c) -> BN-ReLU -> max-pool 3x3/2.
    """

    def __init__(self, in_chans: int, channels: int, deep: bool, cifar_stem: bool, tf_padding: bool,
                 stem_stride: int = 1) -> None:
        super().__init__()
        # Attribute order = TF creation order: conv, bn, conv_1, bn_1, ... (METHOD.md 8.2).
        self.deep = deep and not cifar_stem
        if cifar_stem:
            self.conv1 = conv2d(in_chans, channels, 3, stride=stem_stride)
            self.bn1 = batch_norm2d(channels)
        elif deep:
            self.conv1 = conv2d(in_chans, channels // 2, 3, stride=2)
            self.bn1 = batch_norm2d(channels // 2)
            self.conv2 = conv2d(channels // 2, channels // 2, 3, stride=1)
            self.bn2 = batch_norm2d(channels // 2)
            self.conv3 = conv2d(channels // 2, channels, 3, stride=1)
            self.bn3 = batch_norm2d(channels)
        else:
            self.conv1 = conv2d(in_chans, channels, 7, stride=2)
            self.bn1 = batch_norm2d(channels)
        self.pool = None if cifar_stem else MaxPoolSame(tf_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        if self.deep:
            x = F.relu(self.bn2(self.conv2(x)))
            x = F.relu(self.bn3(self.conv3(x)))
        if self.pool is not None:
            x = self.pool(x)
        return x


class Projection(nn.Module):
    """Projection shortcut of the first block in a stage (METHOD.md 1.2, 1.4).

    SK off: 1x1 conv with the block stride -> BN. SK on (ResNet-D): 2x2 avg pool with the block
    stride -> 1x1 stride-1 conv -> BN. No ReLU; BN gamma starts at 1.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, avg_down: bool, tf_padding: bool) -> None:
        super().__init__()
        self.pool = AvgPoolShortcut(stride, tf_padding) if avg_down else None
        self.conv = conv2d(in_ch, out_ch, 1, stride=1 if avg_down else stride)
        self.bn = batch_norm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = self.pool(x)
        return self.bn(self.conv(x))


class SelectiveKernel(nn.Module):
    """SimCLRv2's Selective Kernel conv replacing the bottleneck 3x3 conv + BN + ReLU (METHOD.md 1.3).

    One 3x3 conv to ``2f`` channels -> BN-ReLU, split into two f-channel branches A, B; the
    spatial mean of A + B goes through 1x1 (f -> mid) -> BN-ReLU -> 1x1 (mid -> 2f); a softmax
    over the two halves weights A and B per channel. Output ``(N, f, H', W')``.
    """

    def __init__(self, in_ch: int, filters: int, stride: int, sk_ratio: float) -> None:
        super().__init__()
        mid = sk_mid_dim(filters, sk_ratio)
        # Order = TF creation order: 3x3 conv, BN, 1x1 f->mid, BN, 1x1 mid->2f (METHOD.md 8.2).
        self.conv = conv2d(in_ch, 2 * filters, 3, stride=stride)
        self.bn = batch_norm2d(2 * filters)
        self.fc1 = nn.Conv2d(filters, mid, 1, bias=False)
        self.fc_bn = batch_norm2d(mid)
        self.fc2 = nn.Conv2d(mid, 2 * filters, 1, bias=False)
        self.mid_dim = mid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        branches = torch.stack(x.chunk(2, dim=1))  # (2, N, f, H, W): branch A, branch B
        desc = branches.sum(0).mean((2, 3), keepdim=True)  # (N, f, 1, 1) global descriptor
        mix = self.fc2(F.relu(self.fc_bn(self.fc1(desc))))  # (N, 2f, 1, 1)
        weights = torch.stack(mix.chunk(2, dim=1)).softmax(dim=0)  # (2, N, f, 1, 1)
        return (branches * weights).sum(0)


class BasicBlock(nn.Module):
    """Two 3x3 convs (stride on the first); the second BN starts at gamma 0 (METHOD.md 1.2)."""

    expansion = 1

    def __init__(self, in_ch: int, filters: int, stride: int, use_projection: bool,
                 sk_ratio: float = 0.0, tf_padding: bool = False) -> None:
        super().__init__()
        if sk_ratio > 0:
            raise ValueError("Selective Kernel applies to bottleneck blocks only (depth >= 50)")
        # Projection first: TF creates the shortcut variables before the main path (METHOD.md 8.2).
        self.shortcut = Projection(in_ch, filters, stride, False, tf_padding) if use_projection else None
        self.conv1 = conv2d(in_ch, filters, 3, stride=stride)
        self.bn1 = batch_norm2d(filters)
        self.conv2 = conv2d(filters, filters, 3)
        self.bn2 = batch_norm2d(filters)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 (f) -> 3x3 or SK (f, stride s) -> 1x1 (4f), BN after each; last BN gamma 0 (METHOD.md 1.2-1.4)."""

    expansion = 4

    def __init__(self, in_ch: int, filters: int, stride: int, use_projection: bool,
                 sk_ratio: float = 0.0, tf_padding: bool = False) -> None:
        super().__init__()
        out_ch = filters * self.expansion
        self.shortcut = (Projection(in_ch, out_ch, stride, sk_ratio > 0, tf_padding)
                         if use_projection else None)
        self.conv1 = conv2d(in_ch, filters, 1)
        self.bn1 = batch_norm2d(filters)
        self.use_sk = sk_ratio > 0
        if self.use_sk:
            self.sk = SelectiveKernel(filters, filters, stride, sk_ratio)
        else:
            self.conv2 = conv2d(filters, filters, 3, stride=stride)
            self.bn2 = batch_norm2d(filters)
        self.conv3 = conv2d(filters, out_ch, 1)
        self.bn3 = batch_norm2d(out_ch)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.sk(out) if self.use_sk else F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + shortcut)


class _FreezeBNStats:
    """Context that keeps BN running statistics unchanged while a checkpointed block recomputes.

    Without it a block run under ``torch.utils.checkpoint`` updates its running mean/var twice
    per step (forward, then again in the backward recomputation). Momentum 0 makes the second
    update a no-op; ``num_batches_tracked`` is restored on exit.
    """

    def __init__(self, module: nn.Module) -> None:
        self.bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.saved: list[tuple[float | None, torch.Tensor | None]] = []

    def __enter__(self) -> None:
        self.saved = []
        for bn in self.bns:
            tracked = None if bn.num_batches_tracked is None else bn.num_batches_tracked.clone()
            self.saved.append((bn.momentum, tracked))
            bn.momentum = 0.0
        return None

    def __exit__(self, *exc: object) -> None:
        for bn, (momentum, tracked) in zip(self.bns, self.saved):
            bn.momentum = momentum
            if tracked is not None:
                bn.num_batches_tracked.copy_(tracked)


def _checkpoint_contexts(block: nn.Module) -> tuple[contextlib.AbstractContextManager, _FreezeBNStats]:
    return contextlib.nullcontext(), _FreezeBNStats(block)


class ResNet(nn.Module):
    """ResNet v1 backbone returning globally average-pooled features ``(N, feature_dim)`` (METHOD.md 1).

    Args:
        depth: 10, 18, 34 (basic blocks) or 50, 101, 152, 200 (bottleneck blocks).
        width: width multiplier; may be fractional (channels = ``int(64 * width)`` etc.).
        sk_ratio: > 0 turns on Selective Kernel (bottleneck only) together with the deep stem
            and the avg-pool projection shortcut (METHOD.md 1.3, 1.4). Released models use 0.0625.
        cifar_stem: 3x3 stride-1 stem without max-pool, for images of about 32 px or less.
        stem_stride: stride of the CIFAR stem's conv (2: the "small" stem, 4x cheaper).
        in_chans: input channels (1 for grayscale Fashion-MNIST).
        tf_padding: exact TF "SAME" pooling semantics (METHOD.md 1.5); see the module docstring.

    ``feature_dim`` is ``4 * int(512 * width)`` for bottleneck nets (2048 at 1x) and
    ``int(512 * width)`` for basic-block nets.
    """

    def __init__(self, depth: int = 50, width: float = 1.0, sk_ratio: float = 0.0,
                 cifar_stem: bool = False, in_chans: int = 3, tf_padding: bool = False,
                 stem_stride: int = 1) -> None:
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"unsupported ResNet depth {depth}; choose from {sorted(RESNET_LAYOUTS)}")
        if width <= 0 or int(64 * width) < 2:
            raise ValueError(f"width multiplier {width} gives fewer than 2 stem channels")
        kind, layers = RESNET_LAYOUTS[depth]
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock if kind == "basic" else Bottleneck
        if sk_ratio > 0 and block is BasicBlock:
            raise ValueError(f"Selective Kernel needs bottleneck blocks (depth >= 50), got depth {depth}")
        self.depth = depth
        self.width = width
        self.sk_ratio = sk_ratio
        self.grad_checkpointing = False

        stem_ch = int(64 * width)
        if stem_stride not in (1, 2) or (stem_stride != 1 and not cifar_stem):
            raise ValueError(f"stem_stride must be 1 or 2, and 2 only with the CIFAR stem; got {stem_stride}")
        self.stem = Stem(in_chans, stem_ch, deep=sk_ratio > 0, cifar_stem=cifar_stem, tf_padding=tf_padding,
                         stem_stride=stem_stride)
        in_ch = stem_ch
        stages = []
        for i, (n_blocks, stage_stride) in enumerate(zip(layers, (1, 2, 2, 2))):
            filters = int(64 * width) * 2**i
            blocks = []
            for j in range(n_blocks):
                # Only the first block of a stage has the projection shortcut and the stride
                # (TF block_group: also in stage 1, stride 1).
                blocks.append(block(in_ch, filters, stage_stride if j == 0 else 1, j == 0,
                                    sk_ratio=sk_ratio, tf_padding=tf_padding))
                in_ch = filters * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = in_ch
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Conv: variance scaling (scale 1, fan_in, truncated). BN: gamma 1, beta 0, except the
        last BN of every residual block, gamma 0 (METHOD.md 1.6)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                variance_scaling_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
                m.reset_running_stats()
        for blk in self.blocks():
            nn.init.zeros_(blk.last_bn.weight)

    def blocks(self) -> Iterator[BasicBlock | Bottleneck]:
        """All residual blocks, input to output."""
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            yield from stage  # type: ignore[misc]

    def set_grad_checkpointing(self, on: bool = True) -> None:
        """Recompute each residual block in backward instead of storing its activations."""
        self.grad_checkpointing = on

    def forward_maps(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images -> (N, feature_dim, H', W') last-stage feature maps."""
        x = self.stem(x)
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks():
            if use_ckpt:
                x = checkpoint(blk, x, use_reentrant=False, context_fn=partial(_checkpoint_contexts, blk))
            else:
                x = blk(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images in [0, 1] -> (N, feature_dim) globally pooled features."""
        return self.forward_maps(x).mean((2, 3))

"""The SimCLRv2 model (backbone + projection head + optional classifier) and its named variants.

Variant names follow the released checkpoints (METHOD.md 8.1): ``r{depth}_{width}x_sk{0|1}``, where
sk1 means Selective Kernel with sk_ratio 0.0625. The 13 Table-1 models use the ImageNet stem;
the small variants (depth 10-50, widths 0.25-1) default to the CIFAR stem for 28-96 px images.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from simclrv2.models.heads import ProjectionHead, make_classifier
from simclrv2.models.resnet import ResNet

SK_RATIO = 0.0625  # released SK models (METHOD.md 1.3, issue #147)


class SimCLRModel(nn.Module):
    """Backbone f(.), projection head g(.) and an optional supervised head (METHOD.md 1, 2).

    Args:
        depth, width, sk_ratio, cifar_stem, in_chans, tf_padding, stem_stride: backbone, see ``ResNet``.
        proj_head_mode, num_proj_layers, proj_out_dim: head, see ``ProjectionHead``.
        ft_proj_selector: which entry of the head's list ``[h, out_1, ..., out_L]`` feeds the
            classifier and is returned as ``proj`` by ``forward``: 0 = backbone features h
            (SimCLRv1-style fine-tuning), 1 = output of the first head layer (SimCLRv2
            fine-tuning), -1 = final ``proj_out_dim`` output (the pretraining default). Only head
            layers up to the selected one run in ``forward``, so later layers get no gradient.
            Call ``reset_classifier`` after changing it if the selected width changes.
        num_classes: classifier outputs; 0 = no classifier.
        zero_init_classifier: start the classifier at zero (``zero_init_logits_layer``).
        grad_checkpointing: recompute each residual block in backward (for the big variants).
        channels_last: keep conv weights and inputs in NHWC memory format (faster on GPUs).
        name: registry name, kept for logs and checkpoints.

    ``SimCLRModel(**model.config)`` rebuilds an identically shaped model.
    """

    def __init__(
        self,
        depth: int = 50,
        width: float = 1,
        sk_ratio: float = 0.0,
        cifar_stem: bool = False,
        in_chans: int = 3,
        stem_stride: int = 1,
        proj_head_mode: str = "nonlinear",
        num_proj_layers: int = 3,
        proj_out_dim: int = 128,
        ft_proj_selector: int = -1,
        num_classes: int = 0,
        zero_init_classifier: bool = False,
        tf_padding: bool = False,
        grad_checkpointing: bool = False,
        channels_last: bool = False,
        name: str = "custom",
    ) -> None:
        super().__init__()
        self.name = name
        self._arch: dict[str, Any] = dict(
            depth=depth, width=width, sk_ratio=sk_ratio, cifar_stem=cifar_stem, in_chans=in_chans,
            stem_stride=stem_stride, proj_head_mode=proj_head_mode, num_proj_layers=num_proj_layers,
            proj_out_dim=proj_out_dim, tf_padding=tf_padding, channels_last=channels_last,
        )
        self.backbone = ResNet(depth, width, sk_ratio, cifar_stem=cifar_stem, in_chans=in_chans,
                               tf_padding=tf_padding, stem_stride=stem_stride)
        self.proj_head = ProjectionHead(self.backbone.feature_dim, proj_head_mode, num_proj_layers, proj_out_dim)
        self.proj_head.resolve_index(ft_proj_selector)  # fail early on an out-of-range selector
        self.ft_proj_selector = ft_proj_selector
        self.classifier: nn.Linear | None = None
        self.zero_init_classifier = zero_init_classifier
        self.reset_classifier(num_classes, zero_init=zero_init_classifier)
        self.set_grad_checkpointing(grad_checkpointing)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor kwargs describing the current model (classifier and selector included)."""
        return dict(
            **self._arch,
            ft_proj_selector=self.ft_proj_selector,
            num_classes=0 if self.classifier is None else self.classifier.out_features,
            zero_init_classifier=self.zero_init_classifier,
            grad_checkpointing=self.backbone.grad_checkpointing,
            name=self.name,
        )

    @property
    def selected_dim(self) -> int:
        """Width of the head output picked by ``ft_proj_selector`` (the classifier's input)."""
        return self.proj_head.dims[self.proj_head.resolve_index(self.ft_proj_selector)]

    def reset_classifier(self, num_classes: int, zero_init: bool = True) -> None:
        """Replace the supervised head by a fresh Linear(selected_dim -> num_classes) with bias
        (0 removes it). Init normal(0, 0.01), or zeros with ``zero_init`` (METHOD.md 2)."""
        self.zero_init_classifier = zero_init
        if num_classes <= 0:
            self.classifier = None
            return
        ref = next(self.backbone.parameters())
        self.classifier = make_classifier(self.selected_dim, num_classes, zero_init).to(ref.device)

    def set_grad_checkpointing(self, on: bool = True) -> None:
        """Turn per-block activation checkpointing of the backbone on or off."""
        self.backbone.set_grad_checkpointing(on)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images in [0, 1] -> (N, feature_dim) pooled backbone features.

        Grey images (C = 1) on a model built for colour (released ImageNet weights fine-tuned on
        Fashion-MNIST) are repeated to every input channel, as PIL's ``convert("RGB")`` does; for
        the stem conv this equals timm's ``adapt_input_conv`` (its kernel summed over input
        channels), and the model keeps taking colour images as well.
        """
        in_chans = self._arch["in_chans"]
        # a trace (ONNX/TorchScript export) records one input shape, the model's own: no check
        if not torch.jit.is_tracing() and x.shape[1] != in_chans:
            if x.ndim != 4 or x.shape[1] != 1:
                raise ValueError(f"model {self.name} takes {in_chans}-channel images, got shape {tuple(x.shape)}; "
                                 f"convert the images to {in_chans} channels (or to grey)")
            x = x.expand(-1, in_chans, -1, -1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def contrastive(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (features (N, feature_dim), z (N, proj_out_dim)) through the whole head."""
        h = self.features(x)
        return h, self.proj_head(h)[-1]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images -> ``dict(features, proj[, logits])``; ``proj`` is the head output chosen by
        ``ft_proj_selector`` and ``logits`` (only with a classifier) are computed from it."""
        h = self.features(x)
        proj = self.proj_head(h, upto=self.ft_proj_selector)[-1]
        out = {"features": h, "proj": proj}
        if self.classifier is not None:
            out["logits"] = self.classifier(proj)
        return out


def _variant(depth: int, width: float, sk: bool, cifar_stem: bool) -> dict[str, Any]:
    return dict(depth=depth, width=width, sk_ratio=SK_RATIO if sk else 0.0, cifar_stem=cifar_stem)


def _variant_name(depth: int, width: float, sk: bool) -> str:
    return f"r{depth}_{width:g}x_sk{int(sk)}"


def _build_variants() -> dict[str, dict[str, Any]]:
    variants: dict[str, dict[str, Any]] = {}
    # Paper Table 1 / released checkpoints (METHOD.md 8.1, 9.1): ImageNet stem.
    imagenet = [(50, 1), (50, 2), (101, 1), (101, 2), (152, 1), (152, 2)]
    for depth, width in imagenet:
        for sk in (False, True):
            variants[_variant_name(depth, width, sk)] = _variant(depth, width, sk, cifar_stem=False)
    variants[_variant_name(152, 3, True)] = _variant(152, 3, True, cifar_stem=False)
    variants[_variant_name(200, 1, False)] = _variant(200, 1, False, cifar_stem=False)
    # Small-image variants (28-96 px): CIFAR stem by default. r18_0.25x is the tiny CPU teacher,
    # r10_0.25x ([1,1,1,1] basic blocks) the tiny CPU student for 28 px Fashion-MNIST.
    small = [(18, 1, False), (18, 0.5, False), (18, 0.25, False), (10, 0.25, False), (34, 1, False),
             (50, 0.5, False), (50, 0.5, True)]
    for depth, width, sk in small:
        variants[_variant_name(depth, width, sk)] = _variant(depth, width, sk, cifar_stem=True)
    return variants


VARIANTS: dict[str, dict[str, Any]] = _build_variants()
_MODEL_KWARGS = tuple(p for p in inspect.signature(SimCLRModel.__init__).parameters if p != "self")


def list_models() -> list[str]:
    """Registered variant names, in registry order (Table 1 first, then small-image variants)."""
    return list(VARIANTS)


def _lookup(name: str) -> dict[str, Any]:
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(VARIANTS)} (see `simclrv2 models`)")
    return VARIANTS[name]


def create_model(name: str, **overrides: Any) -> SimCLRModel:
    """Build the registered variant ``name``; ``overrides`` replace any ``SimCLRModel`` kwarg
    (e.g. ``in_chans=1``, ``num_classes=10``, ``ft_proj_selector=1``, ``cifar_stem=False``)."""
    kwargs = dict(_lookup(name), name=name)
    unknown = sorted(set(overrides) - set(_MODEL_KWARGS))
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(unknown)}; valid: {', '.join(_MODEL_KWARGS)}")
    kwargs.update(overrides)
    return SimCLRModel(**kwargs)


def count_backbone_params(model: nn.Module, include_bn_stats: bool = True) -> int:
    """Size of the backbone as the paper counts it: every conv + BN variable, heads excluded
    (METHOD.md 1.7, 9.1). Accepts a ``SimCLRModel`` or a bare ``ResNet``.

    With ``include_bn_stats`` (default) the BN moving mean and variance count too, as they do
    among the checkpoint variables the Table-1 numbers were taken from; only then do all 13
    round to Table 1 (without them R152 2x gives 232M and 2x+SK 353M instead of 233M and 354M).
    ``include_bn_stats=False`` gives the trainable parameter count.
    """
    backbone = model.backbone if isinstance(model, SimCLRModel) else model
    count = sum(p.numel() for p in backbone.parameters())
    if include_bn_stats:
        count += sum(m.running_mean.numel() + m.running_var.numel() for m in backbone.modules()
                     if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None)
    return count


@functools.cache
def _info(name: str) -> tuple[tuple[str, Any], ...]:
    # Built on the meta device: shapes only, no memory, so even r152_3x_sk1 (795M) is instant.
    with torch.device("meta"):
        model = create_model(name)
    spec = VARIANTS[name]
    info = dict(
        name=name, depth=spec["depth"], width=spec["width"], sk_ratio=spec["sk_ratio"],
        cifar_stem=spec["cifar_stem"], feature_dim=model.backbone.feature_dim,
        backbone_params=count_backbone_params(model),
        backbone_trainable_params=count_backbone_params(model, include_bn_stats=False),
    )
    info["backbone_params_m"] = info["backbone_params"] / 1e6
    return tuple(info.items())


def model_info(name: str) -> dict[str, Any]:
    """Architecture summary of a registered variant: depth, width, sk_ratio, cifar_stem,
    feature_dim, backbone_params (conv + BN variables, the Table-1 count), backbone_params_m
    (the same in millions) and backbone_trainable_params."""
    _lookup(name)
    return dict(_info(name))


def format_models_table() -> str:
    """Plain-text table of every registered variant (printed by ``simclrv2 models``)."""
    header = f"{'name':<16}{'depth':>6}{'width':>7}{'SK':>5}{'stem':>10}{'params (M)':>12}{'feature dim':>13}"
    lines = [header, "-" * len(header)]
    for name in VARIANTS:
        info = model_info(name)
        lines.append(
            f"{name:<16}{info['depth']:>6}{info['width']:>6g}x{'yes' if info['sk_ratio'] > 0 else 'no':>5}"
            f"{'cifar' if info['cifar_stem'] else 'imagenet':>10}{info['backbone_params_m']:>12.1f}"
            f"{info['feature_dim']:>13}"
        )
    return "\n".join(lines)

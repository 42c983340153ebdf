"""Released SimCLRv2 TF1 checkpoints -> our ``SimCLRModel`` (METHOD.md 8), with TF output parity.

The released checkpoints (METHOD.md 8.1; google-research/simclr README) live in
``gs://simclr-checkpoints/simclrv2/<category>/<model>/``. Their variables (METHOD.md 8.2) are

- ``base_model/conv2d[_N]/kernel`` (HWIO) and ``base_model/batch_normalization[_N]/{gamma,beta,
  moving_mean,moving_variance}``, auto-numbered in creation order with one counter for all convs
  and one for all BNs;
- ``head_contrastive/nl_J/dense/kernel`` and ``head_contrastive/nl_J/batch_normalization/...``
  (no ``beta`` in the last layer);
- ``head_supervised/linear_layer/dense/{kernel,bias}``;
- ``ema_model/...`` (EMA copies of base_model and head_contrastive), ``.../Momentum`` optimizer
  slots, ``global_step`` and ``memory`` variables, which are not part of the network.

The architecture (depth, width, SK, stem) is read from the shapes and counts, matched to a
registered variant, and every tensor is copied by position: the backbone registers its modules
in TF creation order (``simclrv2.models.resnet``), so the i-th TF conv / BN is the i-th
``nn.Conv2d`` / ``nn.BatchNorm2d``; every shape is checked. Converted models use the exact TF
"SAME" pooling (``tf_padding=True``, METHOD.md 1.5) and expect RGB inputs in [0, 1] with no mean/std
normalisation (METHOD.md 5).

This module only maps tensors; ``modelfile.save_converted`` writes the result and
``convert_command`` is ``simclrv2 convert`` (a release folder in, a model file out).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from simclrv2.models.registry import VARIANTS, SimCLRModel, create_model
from simclrv2.models.resnet import RESNET_LAYOUTS
from simclrv2.tfcheckpoint import TFCheckpoint

__all__ = [
    "ConversionError",
    "ConversionReport",
    "TFArchitecture",
    "convert_checkpoint",
    "guess_ft_proj_selector",
    "infer_architecture",
]

BACKBONE_SCOPE = "base_model/"
CONTRASTIVE_SCOPE = "head_contrastive/"
SUPERVISED_KERNEL = "head_supervised/linear_layer/dense/kernel"
SUPERVISED_BIAS = "head_supervised/linear_layer/dense/bias"
EMA_SCOPE = "ema_model/"
BN_FIELDS = ("gamma", "beta", "moving_mean", "moving_variance")
# TF BN variable -> torch BatchNorm state (METHOD.md 8.3 rule 5)
BN_TO_TORCH = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}

_CONV_RE = re.compile(r"^conv2d(?:_(\d+))?/kernel$")
_BN_RE = re.compile(r"^batch_normalization(?:_(\d+))?/(gamma|beta|moving_mean|moving_variance)$")
_HEAD_RE = re.compile(r"^(nl|l)_(\d+)/(dense/kernel|batch_normalization/(?:gamma|beta|moving_mean|moving_variance))$")
_OPTIMIZER_SLOTS = ("Momentum", "LARSOptimizer")
# Release category -> the head output its classifier reads (see guess_ft_proj_selector).
RELEASE_SELECTORS = {"finetuned_1pct": 1, "finetuned_10pct": 1, "finetuned_100pct": 0, "pretrained": 0,
                     "supervised": 0}
SELECTOR_ADVICE = ("pass ft_proj_selector=1 for a finetuned_1pct/finetuned_10pct checkpoint, "
                   "0 for finetuned_100pct, pretrained or supervised")


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message is one line saying why."""


@dataclass(frozen=True)
class TFArchitecture:
    """What the backbone variables say about the network (METHOD.md 1.1-1.4)."""

    depth: int
    width: float
    sk: bool
    cifar_stem: bool
    in_chans: int
    num_convs: int
    num_bns: int

    def describe(self) -> str:
        stem = "CIFAR 3x3" if self.cifar_stem else ("3-conv SK" if self.sk else "7x7")
        return f"ResNet-{self.depth} {self.width:g}x {'with' if self.sk else 'without'} SK ({stem} stem)"


@dataclass
class ConversionReport:
    """Where every checkpoint tensor went.

    ``mapping``: TF name -> our state-dict key. ``ignored``: TF name -> reason (optimizer slots,
    ``global_step``, memory, the EMA or non-EMA copy not chosen). ``unused``: tensors neither
    mapped nor ignored (unexpected variables). ``missing``: state-dict entries no tensor filled
    (BN ``num_batches_tracked`` and the zero ``bias`` of beta-less BNs are not counted).
    ``ema_fallback``: with ``ema=True``, tensors that had no ``ema_model/`` copy and were taken
    from the live model.
    """

    model_name: str
    architecture: TFArchitecture
    ema: bool
    proj_head_mode: str
    num_proj_layers: int
    ft_proj_selector: int
    num_classes: int
    mapping: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    ema_fallback: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"model: {self.model_name} ({self.architecture.describe()}), tf_padding=True",
            f"heads: projection {self.proj_head_mode} x{self.num_proj_layers}, "
            f"classifier {self.num_classes or 'none'}, ft_proj_selector={self.ft_proj_selector}",
            f"tensors: {len(self.mapping)} mapped, {len(self.ignored)} ignored, "
            f"{len(self.unused)} unused, {len(self.missing)} missing" + (" (EMA weights)" if self.ema else ""),
        ]
        reasons: dict[str, int] = {}
        for reason in self.ignored.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        lines += [f"  ignored: {n} x {reason}" for reason, n in sorted(reasons.items())]
        lines += [f"  unused: {name}" for name in self.unused]
        lines += [f"  missing: {key}" for key in self.missing]
        if self.ema_fallback:
            lines.append(f"  {len(self.ema_fallback)} tensors had no ema_model/ copy; live values used")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["mapping_count"] = len(self.mapping)
        return data


# --------------------------------------------------------------------------------------------
# Reading the layout
# --------------------------------------------------------------------------------------------


def _shapes_of(tensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    if isinstance(tensors, TFCheckpoint):
        return tensors.shapes  # no tensor data read
    return {name: tuple(np.shape(value)) for name, value in tensors.items()}


def _backbone_variables(shapes: Mapping[str, tuple[int, ...]], scope: str) -> tuple[list[str], list[str]]:
    """(conv kernel names, BN base names) under ``scope``, each in TF creation order."""
    convs: dict[int, str] = {}
    bns: dict[int, str] = {}
    for name in shapes:
        if not name.startswith(scope):
            continue
        rel = name[len(scope):]
        if (m := _CONV_RE.match(rel)) is not None:
            convs[int(m.group(1) or 0)] = name
        elif (m := _BN_RE.match(rel)) is not None:
            bns[int(m.group(1) or 0)] = scope + rel.rsplit("/", 1)[0]
    for kind, found in (("conv2d", convs), ("batch_normalization", bns)):
        gaps = sorted(set(range(len(found))) - set(found))
        if gaps:
            raise ConversionError(f"{scope}{kind}_{gaps[0]} is absent although higher-numbered {kind} "
                                  f"variables exist; the checkpoint is incomplete")
    return [convs[i] for i in range(len(convs))], [bns[i] for i in range(len(bns))]


def _is_optimizer_slot(name: str) -> bool:
    return name.rsplit("/", 1)[-1] in _OPTIMIZER_SLOTS or any(f"/{s}/" in name for s in _OPTIMIZER_SLOTS)


def infer_architecture(shapes: Mapping[str, tuple[int, ...]], scope: str = BACKBONE_SCOPE) -> TFArchitecture:
    """Depth, width, SK and stem of a TF1 SimCLR backbone from its variable shapes (METHOD.md 1, 8.2).

    Stem: a 7x7 first conv (no SK), three 3x3 convs with the first two at half width (SK deep
    stem) or a single 3x3 conv (CIFAR stem); width = stem channels / 64. The first block tells
    the block type (its conv after the projection is 1x1 in a bottleneck, 3x3 in a basic block)
    and SK (its 3x3 conv has 2f outputs). Depth follows from the number of blocks, counted from
    the convs: stem + 4 projections + blocks x (2 basic, 3 bottleneck, 5 SK bottleneck).
    """
    conv_names, bn_names = _backbone_variables(shapes, scope)
    if not conv_names:
        raise ConversionError(f"no {scope}conv2d*/kernel variables: not a SimCLR TF1 checkpoint "
                              f"(or it uses another scope)")
    convs = [shapes[n] for n in conv_names]
    if any(len(c) != 4 for c in convs):
        raise ConversionError("conv kernels must be 4-D (HWIO)")
    k0, _, in_chans, c0 = convs[0]
    if k0 == 7:
        cifar_stem, deep, stem_convs, stem_ch = False, False, 1, c0
    elif k0 == 3 and len(convs) > 2 and convs[1] == (3, 3, c0, c0) and convs[2][:3] == (3, 3, c0):
        cifar_stem, deep, stem_convs, stem_ch = False, True, 3, convs[2][3]
    elif k0 == 3:
        cifar_stem, deep, stem_convs, stem_ch = True, False, 1, c0
    else:
        raise ConversionError(f"unrecognised stem: first conv kernel {convs[0]} is neither 7x7 nor 3x3")
    width = stem_ch / 64
    if len(convs) < stem_convs + 3:
        raise ConversionError(f"only {len(convs)} convs: too few for a ResNet")
    first = convs[stem_convs + 1]  # first block's conv after its projection shortcut
    if first[:2] == (1, 1):
        block = "bottleneck"
        mid = convs[stem_convs + 2]
        sk = mid[3] == 2 * mid[2]
        per_block_convs, per_block_bns = (5, 4) if sk else (3, 3)
    elif first[:2] == (3, 3):
        block, sk = "basic", False
        per_block_convs, per_block_bns = 2, 2
    else:
        raise ConversionError(f"unrecognised first block: conv {conv_names[stem_convs + 1]} has shape {first}")
    if sk != deep and not cifar_stem:
        raise ConversionError(
            f"inconsistent checkpoint: {'SK blocks' if sk else 'plain blocks'} with a "
            f"{'3-conv' if deep else '7x7'} stem (TF SimCLR turns both on together with sk_ratio > 0)"
        )
    n_blocks, rem = divmod(len(convs) - stem_convs - 4, per_block_convs)
    expected_bns = stem_convs + 4 + n_blocks * per_block_bns
    if rem or len(bn_names) != expected_bns:
        raise ConversionError(
            f"{len(convs)} convs and {len(bn_names)} BNs fit no {block}{' SK' if sk else ''} ResNet "
            f"(expected stem + 4 projections + whole blocks; extra layers such as squeeze-excitation "
            f"are not supported)"
        )
    depths = [d for d, (kind, layers) in RESNET_LAYOUTS.items() if kind == block and sum(layers) == n_blocks]
    if not depths:
        known = ", ".join(f"{sum(layers)} (ResNet-{d})" for d, (kind, layers) in RESNET_LAYOUTS.items() if kind == block)
        raise ConversionError(f"{n_blocks} {block} blocks match no ResNet depth; known block counts: {known}")
    return TFArchitecture(depths[0], width, sk, cifar_stem, in_chans, len(convs), len(bn_names))


def _registry_name(arch: TFArchitecture) -> str:
    """The registered variant with this depth, width and SK (the stem is an override)."""
    for name, spec in VARIANTS.items():
        if spec["depth"] == arch.depth and float(spec["width"]) == arch.width and (spec["sk_ratio"] > 0) == arch.sk:
            return name
    known = ", ".join(VARIANTS)
    raise ConversionError(f"the checkpoint holds a {arch.describe()}, which matches no registered model ({known})")


def _head_layout(shapes: Mapping[str, tuple[int, ...]], scope: str) -> tuple[str, list[str]]:
    """(proj_head_mode, layer prefixes in order) of the contrastive head under ``scope``."""
    layers: dict[int, str] = {}
    modes = set()
    for name in shapes:
        if not name.startswith(scope):
            continue
        m = _HEAD_RE.match(name[len(scope):])
        if m is not None:
            modes.add(m.group(1))
            layers[int(m.group(2))] = f"{scope}{m.group(1)}_{m.group(2)}/"
    if not layers:
        return "none", []
    if len(modes) > 1:
        raise ConversionError(f"{scope} mixes nl_* and l_* layers")
    if sorted(layers) != list(range(len(layers))):
        raise ConversionError(f"{scope} layers are not numbered 0..{len(layers) - 1}: {sorted(layers)}")
    mode = "nonlinear" if modes == {"nl"} else "linear"
    if mode == "linear" and len(layers) != 1:
        raise ConversionError(f"linear projection head with {len(layers)} layers (expected l_0 only)")
    return mode, [layers[j] for j in range(len(layers))]


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _to_torch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def guess_ft_proj_selector(path: str | os.PathLike[str]) -> int | None:
    """``ft_proj_selector`` of a released checkpoint, from the bucket category in its path.

    The paper fine-tunes from the first projection-head layer with 1% and 10% labels and from
    the head input with 100% (google-research/simclr issue #109), so ``finetuned_1pct`` and
    ``finetuned_10pct`` give 1 and ``finetuned_100pct`` 0; ``pretrained`` (linear-eval head) and
    ``supervised`` checkpoints put the classifier on the backbone features, 0. ``None`` when the
    path names no category, e.g. a folder fetched with ``gsutil cp -r .../<model> .``.
    """
    for part in reversed(Path(os.path.abspath(path)).parts):
        if part in RELEASE_SELECTORS:
            return RELEASE_SELECTORS[part]
    return None


def convert_checkpoint(
    tensors: Mapping[str, np.ndarray],
    ema: bool = False,
    ft_proj_selector: int | None = None,
    strict: bool = True,
    allow_short_head: bool = False,
) -> tuple[SimCLRModel, ConversionReport]:
    """Build the registry model a TF1 SimCLR checkpoint holds and copy every tensor into it.

    Args:
        tensors: name -> array, e.g. ``TFCheckpoint(path)`` (read lazily) or
            ``read_tf_checkpoint(path)``.
        ema: take ``ema_model/base_model`` and ``ema_model/head_contrastive`` (the EMA weights);
            the supervised head has no EMA copy and is always the live one.
        ft_proj_selector: which entry of ``[h, out_1, ..., out_L]`` feeds the classifier and
            is returned as ``proj`` (METHOD.md 2). ``None``: 0 without a classifier, else the one
            head output whose width fits the classifier input; when several fit (the released
            checkpoints: features and middle layers are all as wide), the checkpoint cannot
            tell, and ``ConversionError`` asks for it (``guess_ft_proj_selector`` reads it
            from a release path).
        strict: raise when a state-dict entry received no tensor, or when a tensor under
            ``base_model/`` has no place in the model (else list them in the report as missing
            and unused).
        allow_short_head: convert a projection head whose final layer is missing (its last
            layer present still has a ``beta``, which only middle layers have); else an error.

    Returns the model in eval mode with ``tf_padding=True``, and a ``ConversionReport``.
    Conv kernels go HWIO -> OIHW, dense kernels are transposed, BN gamma/beta/moving_mean/
    moving_variance become weight/bias/running_mean/running_var (METHOD.md 8.3).
    """
    shapes = _shapes_of(tensors)
    layout = _read_layout(shapes, ema, allow_short_head)
    ft_proj_selector, notes = _choose_selector(layout, ft_proj_selector)
    options = dict(tf_padding=True, **_network_options(layout), ft_proj_selector=ft_proj_selector,
                   num_classes=layout.num_classes)
    with torch.device("meta"):  # no random init: every tensor is overwritten (see _load_converted)
        model = create_model(layout.model_name, **options)
    copier = _TensorCopier(tensors, shapes, model, ema)
    copier.copy_backbone(layout.conv_names, layout.bn_names)
    copier.copy_projection_head(layout.head_layers)
    copier.copy_classifier()
    ignored, unused = _classify_unmapped(shapes, copier.mapping, ema)
    _check_backbone_accounted(unused, layout.model_name, strict)
    model, missing = _load_converted(model, copier.state, options, strict)
    model.eval()
    if layout.short_head:
        notes.append(f"short head (--allow-short-head): {layout.head_layers[-1].rstrip('/')} was a middle layer "
                     "in TF; its beta is unused and its output differs, so select an earlier output")
    if layout.head_mode == "none":
        notes.append("no head_contrastive variables (supervised checkpoint): projection head mode 'none'")
    report = ConversionReport(
        model_name=layout.model_name, architecture=layout.arch, ema=ema, proj_head_mode=layout.head_mode,
        num_proj_layers=len(layout.head_layers), ft_proj_selector=ft_proj_selector,
        num_classes=layout.num_classes, mapping=copier.mapping, ignored=ignored, unused=unused,
        missing=missing, ema_fallback=copier.fallback, notes=notes,
    )
    return model, report


@dataclass(frozen=True)
class _CheckpointLayout:
    """The network a checkpoint holds, with its variables named as in the live (non-EMA) model.

    With ``ema`` the layout is read from the ``ema_model/`` copy, whose architecture is the one
    converted; ``_source_name`` maps each live name back to the copy to read.
    """

    arch: TFArchitecture
    model_name: str  # the registered variant
    conv_names: list[str]  # backbone conv kernels, in TF creation order
    bn_names: list[str]  # backbone BN scopes, in TF creation order
    head_mode: str  # proj_head_mode: "nonlinear", "linear" or "none"
    head_layers: list[str]  # projection-head layer scopes, in order
    short_head: bool  # the head's final layer is missing (see _read_head)
    proj_out_dim: int
    num_classes: int  # 0 without a supervised head
    classifier_inputs: int  # 0 without a supervised head


def _source_name(name: str, shapes: Mapping[str, tuple[int, ...]], ema: bool) -> str:
    """The checkpoint tensor to read for the live-model variable ``name``: its EMA copy when
    ``ema`` asks for it and the checkpoint has one (the supervised head never does)."""
    if ema and not name.startswith("head_supervised/") and EMA_SCOPE + name in shapes:
        return EMA_SCOPE + name
    return name


def _read_layout(shapes: Mapping[str, tuple[int, ...]], ema: bool, allow_short_head: bool) -> _CheckpointLayout:
    """Architecture, backbone variable order, projection head and classifier of the copy ``ema`` selects."""
    # The architecture must agree between the live and EMA copies; read it from the one used.
    backbone_scope = (EMA_SCOPE + BACKBONE_SCOPE) if ema else BACKBONE_SCOPE
    if ema and not any(n.startswith(backbone_scope) for n in shapes):
        raise ConversionError("--ema asked for, but the checkpoint has no ema_model/base_model/ variables")
    arch = infer_architecture(shapes, backbone_scope)
    conv_names, bn_names = _backbone_variables(shapes, backbone_scope)
    strip = len(EMA_SCOPE) if ema else 0
    model_name = _registry_name(arch)
    head_mode, head_layers, short_head = _read_head(shapes, ema, allow_short_head)
    proj_out_dim = shapes[_source_name(head_layers[-1] + "dense/kernel", shapes, ema)][1] if head_layers else 128
    classifier_inputs, num_classes = shapes[SUPERVISED_KERNEL] if SUPERVISED_KERNEL in shapes else (0, 0)
    return _CheckpointLayout(
        arch=arch, model_name=model_name, conv_names=[n[strip:] for n in conv_names],
        bn_names=[n[strip:] for n in bn_names], head_mode=head_mode, head_layers=head_layers,
        short_head=short_head, proj_out_dim=proj_out_dim, num_classes=num_classes,
        classifier_inputs=classifier_inputs,
    )


def _read_head(shapes: Mapping[str, tuple[int, ...]], ema: bool, allow_short_head: bool) -> tuple[str, list[str], bool]:
    """(proj_head_mode, layer scopes in live-model names, short) of the projection head.

    TF builds every head layer but the last with a BN beta (center=True); a final layer that
    still has one means the real final layer was lost (a truncated copy or export), an error
    unless ``allow_short_head``.
    """
    ema_scope = EMA_SCOPE + CONTRASTIVE_SCOPE
    scope = ema_scope if ema and any(n.startswith(ema_scope) for n in shapes) else CONTRASTIVE_SCOPE
    mode, layers = _head_layout(shapes, scope)
    layers = [p.removeprefix(EMA_SCOPE) for p in layers]
    short = bool(layers) and _source_name(layers[-1] + "batch_normalization/beta", shapes, ema) in shapes
    if short and not allow_short_head:
        raise ConversionError(
            f"the projection head stops at {layers[-1].rstrip('/')}, which has a BN beta, so its final "
            f"layer is missing; re-download the checkpoint, or pass allow_short_head=true to convert the "
            f"{len(layers)} layers present")
    return mode, layers, short


def _network_options(layout: _CheckpointLayout) -> dict[str, Any]:
    """``create_model`` options that give the layout's stem, input channels and projection head."""
    return dict(cifar_stem=layout.arch.cifar_stem, in_chans=layout.arch.in_chans, proj_head_mode=layout.head_mode,
                num_proj_layers=max(len(layout.head_layers), 1), proj_out_dim=layout.proj_out_dim)


def _choose_selector(layout: _CheckpointLayout, requested: int | None) -> tuple[int, list[str]]:
    """``ft_proj_selector`` (``requested``, or inferred when ``None``) checked against the classifier
    width, and the report note saying how an inferred one was chosen."""
    with torch.device("meta"):  # shapes only, to pick the selector before allocating weights
        probe = create_model(layout.model_name, **_network_options(layout))
    dims = probe.proj_head.dims
    cls_in = layout.classifier_inputs
    notes: list[str] = []
    selector = requested
    if selector is None:
        selector = _selector_from_widths(dims, cls_in) if layout.num_classes else 0
        if layout.num_classes:
            notes.append(f"ft_proj_selector={selector}: the only head output as wide as the classifier input")
    try:
        selected = dims[probe.proj_head.resolve_index(selector)]
    except ValueError as e:
        raise ConversionError(str(e)) from e
    if layout.num_classes and selected != cls_in:
        raise ConversionError(f"ft_proj_selector={selector} selects a {selected}-wide head output, "
                              f"but the classifier in the checkpoint takes {cls_in} inputs")
    return selector, notes


def _selector_from_widths(dims: Sequence[int], cls_in: int) -> int:
    """The one head output (index into ``[h, out_1, ..., out_L]``) as wide as the classifier input."""
    fits = [j for j, d in enumerate(dims) if d == cls_in]
    if not fits:
        raise ConversionError(f"the classifier takes {cls_in} inputs, which no head output has (widths {dims})")
    if len(fits) > 1:
        listed = ", ".join(map(str, fits[:-1])) + f" and {fits[-1]}"
        raise ConversionError(
            f"cannot tell which head output feeds the classifier: its {cls_in} inputs fit outputs {listed}, "
            f"and the path names no release category; {SELECTOR_ADVICE}")
    return fits[0]


class _TensorCopier:
    """Copies checkpoint tensors into a state dict for ``model``, checking every shape.

    ``mapping``: checkpoint name -> state-dict key of each tensor copied. ``fallback``: with
    ``ema``, the live-model variables read because they had no ``ema_model/`` copy.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]],
                 model: SimCLRModel, ema: bool) -> None:
        self.tensors = tensors
        self.shapes = shapes
        self.model = model
        self.ema = ema
        self.module_names = {m: n for n, m in model.named_modules()}
        self.state: dict[str, torch.Tensor] = {}
        self.mapping: dict[str, str] = {}
        self.fallback: list[str] = []

    def take(self, tf_name: str, key: str, expected: torch.Size, transform: str = "") -> None:
        """Copy live variable ``tf_name`` (or its EMA copy) to ``key``; ``transform`` is ``"hwio"``
        for conv kernels, ``"dense"`` for dense kernels. An absent variable is left to ``missing``."""
        src = _source_name(tf_name, self.shapes, self.ema)
        if src not in self.shapes:
            return
        if self.ema and src == tf_name and not tf_name.startswith("head_supervised/"):
            self.fallback.append(tf_name)
        value = _to_torch(self.tensors[src])
        if transform == "hwio":
            value = value.permute(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)
        elif transform == "dense":
            value = value.t()  # (in, out) -> (out, in)
        if value.shape != expected:
            raise ConversionError(f"{src} has shape {tuple(self.shapes[src])}, which does not fit {key} "
                                  f"{tuple(expected)} of {self.model.name}")
        self.state[key] = value.contiguous()
        self.mapping[src] = key

    def take_bn(self, tf_base: str, bn: nn.Module) -> None:
        """Copy the BN variables under ``tf_base`` into ``bn``, a BatchNorm module or a composite one
        (the head's beta-less BN) whose gamma/beta and statistics are found by their last name."""
        prefix = self.module_names[bn]
        found = {k.rsplit(".", 1)[-1]: (k, v) for k, v in [*bn.named_parameters(), *bn.named_buffers()]}
        for tf_field, torch_field in BN_TO_TORCH.items():
            if torch_field not in found or (torch_field == "bias" and not isinstance(found["bias"][1], nn.Parameter)):
                continue  # BN without beta (TF center=False): a TF beta would show up as unused
            rel, tensor = found[torch_field]
            self.take(f"{tf_base}/{tf_field}", f"{prefix}.{rel}", tensor.shape)

    def copy_backbone(self, conv_names: Sequence[str], bn_names: Sequence[str]) -> None:
        """The i-th TF conv / BN is the i-th Conv2d / BatchNorm2d (creation order, METHOD.md 8.2)."""
        backbone = self.model.backbone
        convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
        bns = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
        if (len(convs), len(bns)) != (len(conv_names), len(bn_names)):
            raise ConversionError(f"{self.model.name} has {len(convs)} convs / {len(bns)} BNs, the checkpoint "
                                  f"{len(conv_names)} / {len(bn_names)}")
        for tf_name, conv in zip(conv_names, convs):
            self.take(tf_name, f"{self.module_names[conv]}.weight", conv.weight.shape, "hwio")
        for tf_base, bn in zip(bn_names, bns):
            self.take_bn(tf_base, bn)

    def copy_projection_head(self, head_layers: Sequence[str]) -> None:
        """nl_j -> layer j: a Linear without bias and a BN1d (the last one without beta)."""
        for j, prefix in enumerate(head_layers):
            layer = self.model.proj_head.layers[j]
            linear = next(m for m in layer.children() if isinstance(m, nn.Linear))
            norm = [m for m in layer.children() if m is not linear]  # the layer's BN unit
            if len(norm) != 1:
                raise ConversionError(f"projection layer {j} has {len(norm)} non-linear submodules "
                                      f"(expected one BN)")
            self.take(prefix + "dense/kernel", f"{self.module_names[linear]}.weight", linear.weight.shape, "dense")
            self.take_bn(prefix + "batch_normalization", norm[0])

    def copy_classifier(self) -> None:
        """The supervised head, when the model has one."""
        classifier = self.model.classifier
        if classifier is not None:
            self.take(SUPERVISED_KERNEL, "classifier.weight", classifier.weight.shape, "dense")
            self.take(SUPERVISED_BIAS, "classifier.bias", classifier.bias.shape)


def _ignore_reason(tf_name: str, mapping: Mapping[str, str], ema: bool) -> str | None:
    """Why an uncopied checkpoint tensor is not part of the network; ``None`` for an unexpected one."""
    if tf_name == "global_step":
        return "global_step"
    if _is_optimizer_slot(tf_name):
        return "optimizer slot"
    if any(p.startswith("memory") for p in tf_name.split("/")):
        return "memory (negatives queue)"
    if not ema and tf_name.startswith(EMA_SCOPE):
        return "EMA copy (convert with --ema to use it)"
    if ema and EMA_SCOPE + tf_name in mapping:
        return "live copy (EMA weights used)"
    return None


def _classify_unmapped(shapes: Mapping[str, tuple[int, ...]], mapping: Mapping[str, str],
                   ema: bool) -> tuple[dict[str, str], list[str]]:
    """(ignored: name -> reason, sorted unused names): every checkpoint tensor is mapped, ignored
    or unused."""
    ignored: dict[str, str] = {}
    unused: list[str] = []
    for tf_name in shapes:
        if tf_name in mapping:
            continue
        reason = _ignore_reason(tf_name, mapping, ema)
        if reason is None:
            unused.append(tf_name)
        else:
            ignored[tf_name] = reason
    return ignored, sorted(unused)


def _check_backbone_accounted(unused: Sequence[str], model_name: str, strict: bool) -> None:
    """A backbone tensor with no place in the model built means the checkpoint's network is not
    that model: an error when ``strict``, like a model tensor the checkpoint lacks."""
    extra = [n for n in unused if n.startswith((BACKBONE_SCOPE, EMA_SCOPE + BACKBONE_SCOPE))]
    if extra and strict:
        raise ConversionError(f"{len(extra)} checkpoint tensors under {BACKBONE_SCOPE} have no place in {model_name}, "
                              f"first {extra[0]}, so its architecture differs; pass strict=false (Python: "
                              "strict=False) to convert it anyway and list them as unused")


def _zero_initialised_keys(model: SimCLRModel) -> set[str]:
    """State entries no checkpoint holds that start at 0: BN batch counters and beta-less BN biases."""
    keys = {k for k in model.state_dict() if k.endswith("num_batches_tracked")}
    keys |= {f"{name}.bias" for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and "bias" in m._buffers}
    return keys


def _load_converted(model: SimCLRModel, state: dict[str, torch.Tensor], options: dict[str, Any],
                    strict: bool) -> tuple[SimCLRModel, list[str]]:
    """``model`` (built on the meta device) holding ``state``, and the entries ``state`` lacks.

    Missing entries are an error when ``strict``; else the model is rebuilt with its normal
    initialisation (``options`` as for ``create_model``), which the missing entries keep.
    """
    zeros = _zero_initialised_keys(model)
    missing = [k for k in model.state_dict() if k not in state and k not in zeros]
    if missing and strict:
        raise ConversionError(f"{len(missing)} model tensors have no counterpart in the checkpoint, "
                              f"first {missing[0]}; pass strict=False to keep their fresh initialisation")
    if missing:
        model = create_model(model.name, **options)
        model.load_state_dict(state, strict=False)
        return model, missing
    model.load_state_dict(state, strict=False, assign=True)
    for module_name, module in model.named_modules():
        for buffer_name, buffer in list(module._buffers.items()):
            if buffer is not None and f"{module_name}.{buffer_name}" in zeros:
                module._buffers[buffer_name] = torch.zeros(buffer.shape, dtype=buffer.dtype)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ConversionError(f"internal error: {leftover[0]} was not filled")
    return model, missing

"""SimCLRv2 projection head and supervised head (spec section 2)."""

from __future__ import annotations

import torch
from torch import nn

from simclrv2.models.resnet import BN_EPS, BN_MOMENTUM

HEAD_MODES = ("nonlinear", "linear", "none")


class BatchNorm1dNoBeta(nn.Module):
    """BatchNorm1d with a learned scale but no shift (TF ``center=False``, spec 2).

    An affine-free ``BatchNorm1d`` (``self.bn``: running statistics) times a learned ``weight``
    (gamma). There is no beta at all, rather than a zero beta that an optimizer, a
    ``requires_grad_(True)`` or ``nn.SyncBatchNorm.convert_sync_batchnorm`` could bring back to
    life; the conversion turns ``self.bn`` into a synchronized BN and leaves ``weight`` alone.
    State dict: ``weight``, ``bn.running_mean``, ``bn.running_var``, ``bn.num_batches_tracked``.
    """

    def __init__(self, num_features: int, eps: float = BN_EPS, momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, eps=eps, momentum=momentum, affine=False)
        self.weight = nn.Parameter(torch.ones(num_features))

    @property
    def num_features(self) -> int:
        return self.weight.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * self.weight  # (N, C) normalised, scaled per channel


class ProjectionLayer(nn.Module):
    """One head layer: Linear (no bias) -> BN1d -> optional ReLU (spec 2).

    Middle layers have BN with beta and a ReLU; the last layer has BN without beta and no ReLU.
    """

    def __init__(self, in_dim: int, out_dim: int, last: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=False)
        self.bn: nn.Module = (BatchNorm1dNoBeta(out_dim) if last
                              else nn.BatchNorm1d(out_dim, eps=BN_EPS, momentum=BN_MOMENTUM))
        self.relu = not last
        nn.init.normal_(self.linear.weight, std=0.01)  # dense init normal(0, 0.01), spec 1.6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.linear(x))
        return torch.relu(x) if self.relu else x


class ProjectionHead(nn.Module):
    """SimCLRv2 projection head g(.) (spec 2).

    Args:
        in_dim: backbone feature dim d.
        mode: ``"nonlinear"`` -- ``num_layers`` layers, d -> d for all but the last, which maps
            d -> ``out_dim``; ``"linear"`` -- one d -> ``out_dim`` layer (Linear + BN without
            beta); ``"none"`` -- no layers, the head returns its input.
        num_layers: number of layers in nonlinear mode (3 in SimCLRv2, 2 in SimCLRv1).
        out_dim: contrastive embedding size (128).

    ``forward(h, upto)`` returns the list ``[h, out_1, ..., out_upto]`` that
    ``ft_proj_selector`` indexes; ``out_j`` of a middle layer is taken after its ReLU.
    """

    def __init__(self, in_dim: int, mode: str = "nonlinear", num_layers: int = 3, out_dim: int = 128) -> None:
        super().__init__()
        if mode not in HEAD_MODES:
            raise ValueError(f"unknown proj_head_mode {mode!r}; choose from {', '.join(HEAD_MODES)}")
        if mode == "nonlinear" and num_layers < 1:
            raise ValueError(f"nonlinear projection head needs num_layers >= 1, got {num_layers}")
        self.in_dim = in_dim
        self.mode = mode
        self.out_dim = out_dim
        if mode == "none":
            dims = [in_dim]
        elif mode == "linear":
            dims = [in_dim, out_dim]
        else:
            dims = [in_dim] * num_layers + [out_dim]
        self.layers = nn.ModuleList(
            ProjectionLayer(dims[j], dims[j + 1], last=j == len(dims) - 2) for j in range(len(dims) - 1)
        )
        # dims[j] is the width of entry j of the forward() list.
        self.dims: list[int] = dims

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def resolve_index(self, selector: int) -> int:
        """Map a (possibly negative) index into ``[h, out_1, ..., out_L]`` to 0..L."""
        n = self.num_layers + 1
        if not -n <= selector < n:
            raise ValueError(f"head output index {selector} out of range for a head with "
                             f"{self.num_layers} layers (valid: {-n}..{n - 1})")
        return selector % n

    def forward(self, h: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """(N, in_dim) -> ``[h, out_1, ..., out_upto]``; ``upto=None`` runs every layer.

        Negative ``upto`` counts from the end of the list as ``ft_proj_selector`` does
        (-1 = final output). Layers after ``upto`` are not run.
        """
        stop = self.num_layers if upto is None else self.resolve_index(upto)
        outputs = [h]
        for layer in self.layers[:stop]:
            outputs.append(layer(outputs[-1]))
        return outputs


class SupervisedHead(nn.Linear):
    """The supervised head: a plain Linear whose type tells the optimizer what it is.

    ``optim.param_groups`` finds it by type, whatever prefix a wrapper (DDP, ``torch.compile``, a
    stage's own module) puts before its parameter names, and gives it no LARS trust ratio and an
    L2 term instead of weight decay (spec 4.1). Its state_dict keys are those of ``nn.Linear``.
    """


def make_classifier(in_dim: int, num_classes: int, zero_init: bool = False) -> nn.Linear:
    """Supervised head: one Linear with bias, no BN (spec 2).

    Weights normal(0, 0.01) and bias 0 (TF dense defaults), or all zeros with ``zero_init``
    (``zero_init_logits_layer`` at the start of fine-tuning).
    """
    classifier = SupervisedHead(in_dim, num_classes, bias=True)
    if zero_init:
        nn.init.zeros_(classifier.weight)
    else:
        nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)
    return classifier

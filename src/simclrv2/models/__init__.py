"""Model zoo: ResNet v1 (+SK) backbones, the SimCLRv2 projection head and named variants (METHOD.md 1, 2)."""

from simclrv2.models.heads import ProjectionHead
from simclrv2.models.registry import (
    SimCLRModel,
    count_backbone_params,
    create_model,
    format_models_table,
    list_models,
    model_info,
)
from simclrv2.models.resnet import ResNet

__all__ = [
    "ProjectionHead",
    "ResNet",
    "SimCLRModel",
    "count_backbone_params",
    "create_model",
    "format_models_table",
    "list_models",
    "model_info",
]

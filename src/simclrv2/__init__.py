"""SimCLRv2 in PyTorch: contrastive pretraining, fine-tuning from the projection head, distillation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_pretrained"]

if TYPE_CHECKING:
    from .pretrained import load_pretrained


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): `import simclrv2` stays cheap; torch is imported on first use of load_pretrained.
    if name == "load_pretrained":
        from .pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

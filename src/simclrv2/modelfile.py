"""Model files: the one loader of a model from a file or folder, and the converted-model writer.

``load_model`` reads a run folder, a checkpoint folder or a standalone ``.safetensors`` model file
(``checkpoint.read_model_file``), checks it, builds the model its metadata describes and loads the
weights; the stages, the tools and ``load_pretrained`` all call it. ``save_converted`` writes the
file ``simclrv2 convert`` produces. Every error here is a one-line ``CheckpointError``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import CheckpointError, atomic_write_text, read_model_file, write_model_file
from .models.registry import SimCLRModel

if TYPE_CHECKING:
    from .convert import ConversionReport

__all__ = ["EVAL_PREPROCESSING", "MODEL_FORMAT", "MODEL_FORMAT_VERSION", "load_model", "save_converted"]

MODEL_FORMAT = "simclrv2-model"
MODEL_FORMAT_VERSION = 1

EVAL_PREPROCESSING = {
    # METHOD.md 5 / 5.3: what the released models expect.
    "input": "RGB float in [0, 1], no mean/std normalisation",
    "center_crop_fraction": 0.875,
    "resize": "bicubic",
    "image_size": 224,
}


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu", *, random_init: bool = True,
               **overrides: Any) -> tuple[SimCLRModel, dict[str, Any]]:
    """The model in ``path`` (a run folder, a checkpoint folder or a model file) on ``device``, and
    the file's metadata; ``overrides`` change its ``model_config`` (e.g. ``num_classes``).

    ``random_init=True`` builds the model with its usual random initialisation before the weights
    overwrite it, as the stages always have: that draws from the global RNG, so a run's later
    draws stay the same. A classifier the file lacks, or one of another width, keeps that fresh
    initialisation (a pretraining checkpoint under a fine-tuning stage); one the model has no
    place for is dropped. ``random_init=False`` builds on the meta device and draws nothing;
    the file must then fill every tensor of the model.
    """
    p = Path(path)
    if p.is_dir() and any(p.glob("*.index")):
        raise CheckpointError(f"'{p}' is a TF checkpoint folder; convert it first (simclrv2 convert "
                              f"tf_checkpoint={p} out={p.name}.safetensors) and load the .safetensors")
    state, meta = read_model_file(p)
    if "model_config" not in meta:
        raise CheckpointError(f"'{path}' has no model_config in its metadata; it was not written by simclrv2")
    config = dict(meta["model_config"], **overrides)
    if random_init:
        model = SimCLRModel(**config)
        state = _fit_classifier(state, model)
    else:
        with torch.device("meta"):  # no random init: the file fills every tensor
            model = SimCLRModel(**config)
    try:
        model.load_state_dict(state, assign=not random_init)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise CheckpointError(f"checkpoint '{path}' does not fit model {meta.get('model_name')} ({first}); "
                              "its weights and model_config disagree, so write it again") from e
    model.name = meta.get("model_name", model.name)
    return model.to(device), meta


def _fit_classifier(state: dict[str, torch.Tensor], model: SimCLRModel) -> dict[str, torch.Tensor]:
    """``state`` with the classifier entries ``model`` takes: its own fresh ones where the file has
    none or ones of another shape, none where the model has no classifier."""
    theirs = state.get("classifier.weight")
    if model.classifier is None:
        return state if theirs is None else {k: v for k, v in state.items() if not k.startswith("classifier.")}
    if theirs is None or theirs.shape != model.classifier.weight.shape:
        own = {k: v for k, v in model.state_dict().items() if k.startswith("classifier.")}
        state = dict({k: v for k, v in state.items() if not k.startswith("classifier.")}, **own)
    return state


def save_converted(model: SimCLRModel, report: ConversionReport, out: str | os.PathLike[str],
                   source: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``OUT.safetensors`` (state dict of the model) and the sidecar ``OUT.json`` metadata.

    The metadata is what ``load_model`` (so ``load_pretrained`` and the stages' ``init_checkpoint``)
    reads: ``format``, ``format_version``, ``model_name``, ``model_config`` (``SimCLRModel(**config)``
    rebuilds the model), ``num_classes``, ``ft_proj_selector``, ``source`` and the conversion
    report. The same JSON also goes into the safetensors header (key ``simclrv2``) so the
    weights file alone stays self-describing.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"--out must end in .safetensors, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "model_name": model.name,
        "model_config": model.config,
        "num_classes": report.num_classes,
        "ft_proj_selector": report.ft_proj_selector,
        "feature_dim": model.backbone.feature_dim,
        "tf_padding": True,
        "preprocessing": EVAL_PREPROCESSING,
        "source": dict(source or {}, ema=report.ema),
        "conversion": {
            "mapped": len(report.mapping), "ignored": len(report.ignored), "unused": report.unused,
            "missing": report.missing, "ema_fallback": report.ema_fallback, "notes": report.notes,
        },
    }
    write_model_file(out, model.state_dict(), meta)  # atomic; metadata also in the header
    sidecar = out.with_suffix(".json")
    atomic_write_text(sidecar, json.dumps(meta, indent=1, default=str) + "\n")
    return out, sidecar

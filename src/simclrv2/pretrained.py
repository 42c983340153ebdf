"""Released models by name and model files by path: download (``released``), then convert
(``convert_command``), then load (``modelfile``).

Above both: ``released`` only downloads and ``convert`` only maps TF tensors to ours, so neither
imports the other's work (DESIGN.md "Layers"); ``simclrv2 convert`` is ``convert_command.main``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import released
from .convert_command import convert_release_folder
from .modelfile import load_model
from .models.registry import SimCLRModel

__all__ = ["load_pretrained", "release_model_file"]


def release_model_file(model: str, category: str = "pretrained", ema: bool = False, progress: bool = True) -> Path:
    """``<cache>/<category>/<model>[_ema].safetensors``: the release, fetched and converted once.

    The classifier's head output comes from the category (``convert.RELEASE_SELECTORS``).
    """
    released.check_names(model, category)
    out = released.cache_dir() / category / f"{model}{'_ema' if ema else ''}.safetensors"
    if out.is_file() and out.with_suffix(".json").is_file():
        return out
    folder = released.fetch_release(model, category, progress=progress)
    convert_release_folder(folder, out, category=category, ema=ema, quiet=not progress)
    return out


def load_pretrained(
    name_or_path: str | os.PathLike[str],
    category: str | None = None,
    *,
    device: str | torch.device = "cpu",
    ema: bool = False,
) -> SimCLRModel:
    """A model with its heads, in eval mode, from a file, a run folder or a released model's name.

    ``name_or_path``: ``FILE.safetensors`` written by ``simclrv2 convert`` (metadata in ``FILE.json``
    or the file header), a run / checkpoint folder of ours, or a released model such as
    ``"r50_1x_sk1"`` with ``category`` (``pretrained`` by default, ``finetuned_1pct``,
    ``finetuned_10pct``, ``finetuned_100pct``, ``supervised``): downloaded once into the cache
    (``simclrv2.released``) and converted, with ``ema`` choosing the EMA weights.
    ``model(x)`` on float ``(N, 3, H, W)`` in [0, 1] returns ``dict(features, proj[, logits])``:
    pooled backbone features, the head output chosen by ``ft_proj_selector`` and the classifier logits.
    """
    path = Path(name_or_path)
    if not path.exists() and released.is_release_name(str(name_or_path)):
        path = release_model_file(str(name_or_path), category or "pretrained", ema=ema)
    elif category is not None or ema:
        raise ValueError(f"category= and ema= apply to released model names ({', '.join(released.MODELS)}), "
                         f"not to the file '{name_or_path}'")
    elif not path.exists():
        raise FileNotFoundError(f"'{name_or_path}' is neither a file nor a released model name "
                                f"({', '.join(released.MODELS)})")
    model, _ = load_model(path, device, random_init=False)
    return model.eval()

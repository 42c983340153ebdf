"""Serving a trained model: ``simclrv2 predict``, ``simclrv2 embed`` and ``simclrv2 export``.

Every entry point feeds the model what evaluation fed it (METHOD.md 5, 5.3): the centre square of
0.875 x the shorter side (the whole square below 64 px), bicubic resize to the checkpoint's
``image_size`` -> float32 in [0, 1], no mean/std. Image files go through
:func:`~simclrv2.data.decode.eval_view`, dataset splits through the stage evaluation's path.
Exported models take that float input, ``(N, C, S, S)``, and leave the preprocessing to the caller.
"""

from __future__ import annotations

import argparse
import csv
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import atomic_write_text
from .config import parse_tool_args
from .data.datasets import DATASET_NAMES, load_dataset
from .data.decode import decode_eval_view
from .data.images import IMAGE_EXTENSIONS
from .engine.batches import BatchSource
from .engine.device import resolve_device
from .engine.evaluate import extract
from .engine.runfolder import RunError
from .modelfile import load_model
from .models import SimCLRModel

_PIL_MODES = {1: "L", 3: "RGB"}


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


@dataclass
class ServingInfo:
    """What serving needs besides the weights, read from the checkpoint metadata."""

    image_size: int  # side S of the square model input
    channels: int  # 1 (grayscale) or 3 (RGB)
    classes: list[str]  # class names, index = logit index ([] without a classifier)


def serving_info(model: SimCLRModel, meta: dict[str, Any]) -> ServingInfo:
    """Input size, channels and class names of a loaded model.

    ``image_size`` comes from our checkpoints' ``image_size``, a converted file's
    ``preprocessing.image_size``, or else the stem's usual size (32 CIFAR stem, 224 ImageNet stem).
    Class names default to ``"0".."K-1"`` when the metadata has none (converted ImageNet models).
    """
    size = meta.get("image_size") or (meta.get("preprocessing") or {}).get("image_size")
    if not size:
        size = 32 if model.config.get("cifar_stem") else 224
    k = model.classifier.out_features if model.classifier is not None else 0
    classes = [str(c) for c in meta.get("classes") or []]
    if len(classes) != k:
        classes = [str(i) for i in range(k)]
    return ServingInfo(image_size=int(size), channels=int(model.config["in_chans"]), classes=classes)


def load_for_serving(path: str | Path, device: str | torch.device = "cpu") -> tuple[SimCLRModel, ServingInfo]:
    """Model in eval mode (gradients off) and its :class:`ServingInfo`."""
    model, meta = load_model(str(path), torch.device(device))
    model.set_grad_checkpointing(False)  # activation recomputation is a training-only trick
    model.eval().requires_grad_(False)
    return model, serving_info(model, meta)


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (sub-folders included), sorted by relative path."""
    root = Path(folder)
    if not root.is_dir():
        raise RunError(f"image folder '{folder}' does not exist; pass --images FOLDER")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise RunError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under '{folder}'")
    return files


def folder_batches(
    paths: Sequence[Path], channels: int, image_size: int, batch_size: int
) -> Iterator[torch.Tensor]:
    """Preprocessed float batches ``(n, C, S, S)`` in [0, 1] of image files of any size (METHOD.md 5.3).

    Each file goes through :func:`~simclrv2.data.decode.eval_view`, the function a stage's
    evaluation runs on a streamed image folder: the same pixels a model was tested on.
    """
    if channels not in _PIL_MODES:
        raise RunError(f"models with {channels} input channels cannot read image files (only 1 or 3)")
    for start in range(0, len(paths), batch_size):
        views = []
        for p in paths[start : start + batch_size]:
            try:
                views.append(decode_eval_view(p, image_size, channels))
            except Exception as e:  # PIL raises many types for a bad file
                raise RunError(f"cannot decode image '{p}' ({type(e).__name__}: {e}); replace or remove it") from e
        yield torch.stack(views).float().div_(255.0)


@torch.no_grad()
def run_on_batches(model: SimCLRModel, batches: Iterator[torch.Tensor], output: str,
                   device: torch.device) -> torch.Tensor:
    """Model ``output`` (``features``, ``proj`` or ``logits``) for every batch, float32 on the CPU."""
    outs = []
    for x in batches:
        x = x.to(device)
        out = model.features(x) if output == "features" else model(x)[output]
        outs.append(out.float().cpu())
    return torch.cat(outs)


def _dataset_outputs(model: SimCLRModel, info: ServingInfo, args: argparse.Namespace, output: str,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Outputs, labels and row names for the first ``--limit`` images of a dataset split."""
    # image folders are stored at the checkpoint's size; built-in datasets only at their native one
    stored = info.image_size if args.dataset == "imagefolder" else None
    ds = load_dataset(args.dataset, args.split, data_dir=args.data_dir or None, image_size=stored)
    if ds.channels != info.channels and ds.channels != 1:  # grey is repeated to RGB by the model
        raise RunError(f"{args.dataset} has {ds.channels}-channel images but the model takes {info.channels}")
    n = len(ds) if args.limit <= 0 else min(args.limit, len(ds))
    source = BatchSource(ds, device, num_workers=args.num_workers)
    outs, labels = extract(model, source, torch.arange(n), info.image_size, args.batch_size, output)
    names = list(ds.filenames[:n]) if ds.filenames is not None else [str(i) for i in range(n)]
    return outs, labels.cpu(), names


def _folder_outputs(model: SimCLRModel, info: ServingInfo, args: argparse.Namespace, output: str,
                    device: torch.device) -> tuple[torch.Tensor, list[str]]:
    paths = list_images(args.images)
    if args.limit > 0:
        paths = paths[: args.limit]
    batches = folder_batches(paths, info.channels, info.image_size, args.batch_size)
    names = [p.relative_to(args.images).as_posix() for p in paths]
    return run_on_batches(model, batches, output, device), names


# --------------------------------------------------------------------------------------------------
# predict / embed
# --------------------------------------------------------------------------------------------------


def write_predictions_csv(path: Path, names: Sequence[str], probs: torch.Tensor, classes: Sequence[str],
                          labels: torch.Tensor | None = None) -> None:
    """One row per image: ``image, label, pred_index, pred_class, confidence, p_<class>...``.

    ``label`` is the true class index for dataset splits and empty for image files (or unlabeled).
    """
    pred = probs.argmax(1)
    rows = [["image", "label", "pred_index", "pred_class", "confidence", *[f"p_{c}" for c in classes]]]
    for i, name in enumerate(names):
        label = "" if labels is None or int(labels[i]) < 0 else str(int(labels[i]))
        p = probs[i].tolist()
        k = int(pred[i])
        rows.append([name, label, str(k), classes[k], f"{p[k]:.7g}", *[f"{v:.7g}" for v in p]])
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _add_source_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="run folder, checkpoint folder (step-*) or model .safetensors file")
    src = parser.add_mutually_exclusive_group(required=required)
    src.add_argument("--images", help="folder of image files (sub-folders included)")
    src.add_argument("--dataset", choices=DATASET_NAMES, help="a dataset split instead of image files")
    parser.add_argument("--split", default="test", help="dataset split (default: test)")
    parser.add_argument("--data-dir", default="", help="where the dataset lives (default: its usual places)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N images (0 = all)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--num-workers", type=int, default=0, help="decoding workers for image-folder datasets")


def predict_main(argv: list[str]) -> int:
    """``simclrv2 predict``: class index, class name and probabilities per image."""
    parser = argparse.ArgumentParser(
        prog="simclrv2 predict",
        description="Classify images (a folder or a dataset split) with a model that has a classifier. "
        "Writes a CSV (image, label, pred_index, pred_class, confidence, one probability column per "
        "class) and the probabilities as OUT.npy (float32, (N, classes)). Preprocessing is the "
        "evaluation one (METHOD.md 5.3): centre crop 0.875 for images of 64 px and more, bicubic resize to "
        "the checkpoint's image size, inputs in [0, 1].",
    )
    _add_source_args(parser, required=False)
    parser.add_argument("--out", help="output CSV file (default with a stage folder alone: "
                        "predictions.csv in that folder)")
    args = parse_tool_args(parser, argv)
    if not args.images and not args.dataset:
        return _label_stage_folder(args)
    if not args.out:
        raise RunError("--out is required with --images or --dataset; pass e.g. --out predictions.csv")
    out = Path(args.out)
    if out.suffix == ".npy":
        raise RunError(f"out='{out}' is the probabilities file name; give a .csv name")
    device = resolve_device(args.device)
    model, info = load_for_serving(args.checkpoint, device)
    if model.classifier is None:
        raise RunError(f"'{args.checkpoint}' has no classifier; fine-tune it first, or use `simclrv2 embed`")
    labels = None
    if args.dataset:
        logits, labels, names = _dataset_outputs(model, info, args, "logits", device)
    else:
        logits, names = _folder_outputs(model, info, args, "logits", device)
    probs = logits.softmax(1)  # (N, classes)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_predictions_csv(out, names, probs, info.classes, labels)
    np.save(out.with_suffix(".npy"), probs.numpy().astype(np.float32))
    msg = f"wrote {len(names)} predictions to {out} (probabilities: {out.with_suffix('.npy')})"
    if labels is not None and bool((labels >= 0).all()):
        msg += f"; top-1 {100.0 * (probs.argmax(1) == labels).float().mean().item():.2f}%"
    print(msg)
    return 0


def _label_stage_folder(args: argparse.Namespace) -> int:
    """``simclrv2 predict --checkpoint STAGE_FOLDER``: what the pipeline ends with, from any stage of
    a run on the few-labels layout: ``predictions.csv`` (file, class, confidence, margin) for every
    image of the stage's ``data_dir/unlabeled/``."""
    from .engine.splits import few_labels_layout
    from .labelling import label_folder, stage_config

    folder = Path(args.checkpoint)
    if not folder.is_dir() or not ((folder / "config.yaml").is_file() or (folder / "chosen.json").is_file()):
        raise RunError(f"'{args.checkpoint}' is no stage folder; pass --images FOLDER or --dataset NAME, or a "
                       "stage folder of a run whose data_dir holds unlabeled/")
    cfg = stage_config(folder)
    if not few_labels_layout(cfg):
        raise RunError(f"the data of '{folder}' ({cfg.data_dir or cfg.dataset}) has no unlabeled/ folder to label; "
                       "pass --images FOLDER or --dataset NAME")
    import dataclasses

    cfg = dataclasses.replace(cfg, device=args.device)
    out = Path(args.out) if args.out else folder / "predictions.csv"
    summary = label_folder(cfg, folder, out)
    print(f"wrote {summary['rows']} predictions to {out}"
          + (f"; skipped {len(summary['skipped'])} unusable file(s)" if summary["skipped"] else ""))
    return 0


def embed_main(argv: list[str]) -> int:
    """``simclrv2 embed``: features (or head outputs) of a split as ``.npy``."""
    parser = argparse.ArgumentParser(
        prog="simclrv2 embed",
        description="Write the features of a dataset split (or an image folder) to OUT.npy "
        "(float32, (N, D)) and, for datasets, the labels to OUT.labels.npy (int64, (N,)). "
        "features = pooled backbone output; proj = the head output the checkpoint's "
        "ft_proj_selector picks (the final 128-d output for a pretraining checkpoint).",
    )
    _add_source_args(parser)
    parser.add_argument("--out", required=True, help="output .npy file")
    parser.add_argument("--output", choices=("features", "proj"), default="features")
    args = parse_tool_args(parser, argv)
    out = Path(args.out)
    if out.suffix != ".npy":
        raise RunError(f"out must end in .npy, got '{out}'")
    device = resolve_device(args.device)
    model, info = load_for_serving(args.checkpoint, device)
    if args.dataset:
        feats, labels, _ = _dataset_outputs(model, info, args, args.output, device)
    else:
        feats, names = _folder_outputs(model, info, args, args.output, device)
        labels = None
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, feats.numpy().astype(np.float32))
    msg = f"wrote {args.output} {tuple(feats.shape)} to {out}"
    if labels is not None:
        labels_path = out.with_name(out.stem + ".labels.npy")
        np.save(labels_path, labels.numpy().astype(np.int64))
        msg += f" and labels to {labels_path}"
    else:
        names_path = out.with_name(out.stem + ".files.txt")
        atomic_write_text(names_path, "".join(n + "\n" for n in names))
        msg += f" and the file names (row order) to {names_path}"
    print(msg)
    return 0


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------


class ServingModule(nn.Module):
    """Encoder + classifier as one tensor-in, tensor-out module for export.

    forward(images float (N, C, S, S) in [0, 1]) -> logits (N, classes) when the model has a
    classifier, else pooled features (N, feature_dim).
    """

    def __init__(self, model: SimCLRModel) -> None:
        super().__init__()
        self.model = model
        self.output = "logits" if model.classifier is not None else "features"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.output == "features":
            return self.model.features(images)
        return self.model(images)["logits"]


def export_onnx(module: ServingModule, path: Path, example: torch.Tensor, opset: int = 17) -> str:
    """ONNX file with a dynamic batch axis; returns which exporter wrote it.

    The TorchScript-based exporter (``dynamo=False``) needs nothing beyond torch; the
    ``torch.export`` one is the fallback where the legacy one is gone (it needs ``onnxscript``).
    """
    names = dict(input_names=["images"], output_names=[module.output])
    try:
        with warnings.catch_warnings():
            # the legacy exporter and torch.jit announce their deprecation on every call
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message=".*will be removed.*")
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated.*")
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                              dynamic_axes={"images": {0: "batch"}, module.output: {0: "batch"}}, **names)
        return "torchscript-onnx"
    except (TypeError, RuntimeError, NotImplementedError) as legacy_error:
        try:
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=max(opset, 18),
                              dynamic_shapes=({0: batch},), **names)
        except ImportError as e:
            raise RunError(
                f"ONNX export failed ({legacy_error}); the torch.export-based exporter needs "
                f"onnxscript ({e}); `pip install onnxscript`"
            ) from e
        return "dynamo"


def export_torchscript(module: ServingModule, path: Path, example: torch.Tensor) -> None:
    """Traced TorchScript file (``torch.jit.load`` + call); the batch size stays free."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated.*")
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path))


def onnx_max_error(path: Path, module: ServingModule, x: torch.Tensor) -> float:
    """Largest |ONNX Runtime - PyTorch| output difference on ``x`` (needs ``onnxruntime``)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        ref = module(x).numpy()
    return float(np.abs(got - ref).max())


def export_main(argv: list[str]) -> int:
    """``simclrv2 export``: encoder + classifier to ONNX or TorchScript for serving."""
    parser = argparse.ArgumentParser(
        prog="simclrv2 export",
        description="Export encoder + classifier for serving. The exported model takes float32 "
        "images (N, C, S, S) in [0, 1], already preprocessed as in evaluation (METHOD.md 5.3), with a "
        "free batch size, and returns logits (N, classes), or pooled features (N, D) when the "
        "checkpoint has no classifier. OUT.json beside the file records the input size, channels, "
        "class names and preprocessing.",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="run folder, checkpoint folder (step-*) or model .safetensors file")
    parser.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    parser.add_argument("--out", required=True, help="output file (.onnx / .pt)")
    parser.add_argument("--image-size", type=int, default=0, help="input side S (default: the checkpoint's)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    parser.add_argument("--verify", action="store_true",
                        help="ONNX: compare ONNX Runtime with PyTorch on a random batch and print the error")
    args = parse_tool_args(parser, argv)
    out = Path(args.out)
    if out.suffix == ".json":
        raise RunError(f"out='{out}' is the metadata file name; give an .onnx or .pt name")
    model, info = load_for_serving(args.checkpoint, "cpu")
    size = args.image_size or info.image_size
    module = ServingModule(model).eval()
    example = torch.rand(2, info.channels, size, size)  # batch of 2: the batch axis is exported dynamic
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "onnx":
        exporter = export_onnx(module, out, example, args.opset)
    else:
        export_torchscript(module, out, example)
        exporter = "torch.jit.trace"
    sidecar = {
        "format": args.format, "exporter": exporter, "model_name": model.name,
        "input": {"name": "images", "shape": ["batch", info.channels, size, size], "dtype": "float32",
                  "range": [0.0, 1.0]},
        "output": {"name": module.output, "classes": info.classes},
        "preprocessing": {"center_crop_fraction": 0.875, "crop_min_side": 64, "resize": "bicubic",
                          "image_size": size, "mean_std_normalisation": False},
    }
    atomic_write_text(out.with_suffix(".json"), json.dumps(sidecar, indent=1))
    msg = f"wrote {args.format} ({exporter}) to {out}, metadata to {out.with_suffix('.json')}"
    if args.verify and args.format == "onnx":
        err = onnx_max_error(out, module, torch.rand(3, info.channels, size, size))
        msg += f"; ONNX Runtime vs PyTorch max |diff| {err:.3g}"
    print(msg)
    return 0

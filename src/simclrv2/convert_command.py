"""``simclrv2 convert``: a released TF1 checkpoint folder in, a simclrv2 model file out.

The wiring of the command: its argument parser, ``convert_release_folder`` (read the folder,
map it with ``convert``, write it with ``modelfile``, print the report) and ``main``, which
first downloads a release asked for by name (``released``). ``pretrained`` uses
``convert_release_folder`` to fill its cache; nothing else imports this module.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np

from . import released
from .config import parse_tool_args  # key=value and --config, the grammar of every command
from .convert import RELEASE_SELECTORS, ConversionReport, convert_checkpoint
from .modelfile import save_converted
from .tfcheckpoint import TFCheckpoint

__all__ = ["build_parser", "convert_release_folder", "main"]

HELP_EPILOG = """\
By name: `simclrv2 convert r50_1x_sk1 category=finetuned_10pct` downloads the release from
https://storage.googleapis.com/simclr-checkpoints/simclrv2/<category>/<model>/ into the cache
($SIMCLRV2_CACHE, default ~/.cache/simclrv2; resumable) and converts it.

Where the released checkpoints live (google-research/simclr README, "Pre-trained models for
SimCLRv2"): gs://simclr-checkpoints/simclrv2/<category>/<model>/
  category: pretrained (with a linear-eval head), finetuned_1pct, finetuned_10pct,
            finetuned_100pct, supervised
  model:    r50_1x_sk0 r50_1x_sk1 r50_2x_sk0 r50_2x_sk1 r101_1x_sk0 r101_1x_sk1 r101_2x_sk0
            r101_2x_sk1 r152_1x_sk0 r152_1x_sk1 r152_2x_sk0 r152_2x_sk1 r152_3x_sk1
Each folder holds `checkpoint`, `model.ckpt-<step>.index`, `model.ckpt-<step>.data-00000-of-00001`
(and graph/hub files that are not needed). TensorFlow is not needed to convert.

From download to fine-tuning:
  gsutil -m cp -r gs://simclr-checkpoints/simclrv2/pretrained/r50_1x_sk1 .
  simclrv2 convert tf_checkpoint=r50_1x_sk1 out=r50_1x_sk1.safetensors ft_proj_selector=0
  simclrv2 finetune init_checkpoint=r50_1x_sk1.safetensors dataset=imagefolder data_dir=DIR label_fraction=0.01

A folder copied that way has lost its category, which sets ft_proj_selector (1 for
finetuned_1pct/10pct, 0 otherwise); convert asks for it rather than guess.
The output (r50_1x_sk1.safetensors + r50_1x_sk1.json) is accepted by finetune, distill,
linear-eval, predict and embed as init_checkpoint / checkpoint, and from Python by
simclrv2.load_pretrained(path). Inputs are RGB in [0, 1] without mean/std normalisation (grey
images are repeated to RGB); evaluation crops the central 87.5% and resizes to 224 with bicubic
interpolation. The converted model uses exact TF "SAME" pooling (tf_padding=True), so its
outputs match TensorFlow's. Details: docs/CONVERT.md.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simclrv2 convert",
        description="Convert a released SimCLRv2 TF1 checkpoint into a simclrv2 model file "
                    "(safetensors + JSON metadata), with every tensor accounted for.",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="a released model (r50_1x_sk0 ... r152_3x_sk1): downloaded into the cache "
                             "($SIMCLRV2_CACHE, default ~/.cache/simclrv2), then converted")
    parser.add_argument("--category", default="pretrained", choices=released.CATEGORIES,
                        help="release category of MODEL (default: pretrained)")
    parser.add_argument("--tf-checkpoint", metavar="DIR_OR_PREFIX",
                        help="checkpoint folder (with a `checkpoint` file) or prefix such as "
                             "r50_1x_sk1/model.ckpt-250228")
    parser.add_argument("--out", metavar="FILE.safetensors",
                        help="output weights; FILE.json is written next to it (default with MODEL: "
                             "MODEL_CATEGORY.safetensors)")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights (ema_model/...) of the backbone and projection head")
    parser.add_argument("--ft-proj-selector", type=int, default=None, metavar="N",
                        help="head output feeding the classifier: 0 = backbone features, 1 = first head layer, "
                             "-1 = final output (default: from the release category in the path, 1 for "
                             "finetuned_1pct/10pct, 0 for finetuned_100pct/pretrained/supervised; required "
                             "when the path names none and the checkpoint cannot tell)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="write the model even if some of its tensors are not in the checkpoint "
                             "(implies strict=false)")
    parser.add_argument("--no-strict", dest="strict", action="store_false",
                        help="strict=false: write the model even if some of its tensors are not in the checkpoint, "
                             "or the checkpoint holds base_model/ tensors it has no place for (listed as unused)")
    parser.add_argument("--allow-short-head", action="store_true",
                        help="convert a projection head whose final layer is missing (else an error)")
    parser.add_argument("--no-verify", action="store_true", help="skip the CRC-32C check of the tensor data")
    return parser


def convert_release_folder(
    tf_checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    category: str | None = None,
    ema: bool = False,
    ft_proj_selector: int | None = None,
    strict: bool = True,
    allow_short_head: bool = False,
    verify: bool = True,
    quiet: bool = False,
) -> ConversionReport:
    """Convert a TF checkpoint folder or prefix to ``out`` (+ ``.json``), printing the report.

    Without ``ft_proj_selector`` it comes from ``category`` (a release category such as
    ``finetuned_10pct``), else from a category in the path, else from the checkpoint itself
    (``convert_checkpoint`` raises when that cannot tell).
    """
    ckpt = TFCheckpoint(tf_checkpoint, verify=verify)
    selector = ft_proj_selector
    if selector is None:
        if category is None:
            category = next((p for p in reversed(ckpt.prefix.absolute().parts) if p in RELEASE_SELECTORS), None)
        selector = RELEASE_SELECTORS.get(category) if category is not None else None
    model, report = convert_checkpoint(ckpt, ema=ema, ft_proj_selector=selector, strict=strict,
                                       allow_short_head=allow_short_head)
    if ft_proj_selector is None and category is not None and report.num_classes:
        report.notes.append(f"ft_proj_selector={selector} for a {category} checkpoint; "
                            "ft_proj_selector=N overrides it")
    step = None
    if "global_step" in ckpt:
        step = int(np.asarray(ckpt["global_step"]).reshape(()))
    written, sidecar = save_converted(model, report, out, source={
        "tf_checkpoint": str(ckpt.prefix), "global_step": step, "category": category})
    ckpt.close()
    if not quiet:
        print(report.summary())
        print(f"wrote {written} and {sidecar}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``simclrv2 convert (MODEL [category=C] | tf_checkpoint=DIR_OR_PREFIX) [out=FILE.safetensors] ...``."""
    parser = build_parser()
    args = parse_tool_args(parser, argv)
    if (args.model is None) == (args.tf_checkpoint is None):
        parser.error("give a released model name (e.g. r50_1x_sk1) or --tf-checkpoint DIR, not both or neither")
    if args.model is not None:
        folder = released.fetch_release(args.model, args.category)
        out = args.out or f"{args.model}_{args.category}{'_ema' if args.ema else ''}.safetensors"
        category: str | None = args.category
    else:
        if args.out is None:
            parser.error("--out FILE.safetensors is needed with --tf-checkpoint")
        folder, out, category = args.tf_checkpoint, args.out, None
    convert_release_folder(folder, out, category=category, ema=args.ema, ft_proj_selector=args.ft_proj_selector,
                           strict=args.strict and not args.allow_missing, allow_short_head=args.allow_short_head,
                           verify=not args.no_verify)
    return 0

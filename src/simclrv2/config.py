"""Typed configuration: one dataclass per stage, loaded from YAML, overridden by ``key=value``.

Every stage shares the keys of :class:`CommonConfig`. A config is never mutated at run time:
derived values (the effective learning rate, step counts) are computed into their own variables
and logged. The resolved config is written as ``config.yaml`` into the run folder and into every
checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import re
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem; its message is one line that names the key and the fix."""


@dataclass
class MemoryConfig:
    """SimCLRv2 memory (METHOD.md 3.1): EMA encoder whose projections fill a queue of negatives."""

    enabled: bool = False
    size: int = 4096  # queue length; 65536 on ImageNet
    momentum: float = 0.999  # EMA decay of the memory network


@dataclass
class CommonConfig:
    """Keys that every stage understands."""

    model: str = "r18_0.25x_sk0"  # registry name, see `simclrv2 models`
    dataset: str = "fashion_mnist"  # fashion_mnist | cifar10 | cifar100 | stl10 | imagefolder
    data_dir: str = ""  # where the data lives; "" = the dataset's default places
    download: bool = False  # allow torchvision downloads (needs a network)
    train_split: str = "train"  # split used for training (stl10: train+unlabeled for pretraining)
    test_split: str = "test"  # split used for evaluation (reporting only)
    val_fraction: float = 0.0  # class-balanced share of train_split held out for validation; 0 = none
    val_seed: int = 0  # seed of the validation draw (same seed -> same images in every stage)
    # k-fold cross-validation over the labelled subset (the pipeline's search with few labels): the
    # validation split is fold val_fold of val_folds, drawn class by class from val_seed; 0 = off
    val_folds: int = 0
    val_fold: int = 0
    image_size: int = 0  # training resolution; 0 = native (image folders: median shorter side, <= 224)
    stem: str = "auto"  # auto (CIFAR stem at <= 32 px, METHOD.md 1.4) | cifar | small (CIFAR stem, stride 2) | imagenet
    batch_size: int = 256  # global batch size (split across processes)
    epochs: float = 10.0  # passes over the training set (fractional allowed)
    max_steps: int = 0  # cap on optimizer steps for quick runs; 0 = no cap
    run_dir: str = "runs/default"  # run folder: config.yaml, metrics.jsonl, checkpoints/
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 only on GPU, with a gradient scaler) | auto (pretraining: bf16 where measured faster)
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    num_workers: int = 4  # DataLoader workers for data that is not held in memory
    cache_images: bool = True  # decode an image folder once and hold it in memory when it fits in 2 GiB
    skip_bad_images: bool = True  # ImageFolder: skip and count undecodable or changed files; false: stop
    resume: bool = True  # resume from the run folder's last complete checkpoint
    checkpoint_every: int = 0  # steps between checkpoints; 0 = at epoch ends (see checkpoint_min_seconds)
    checkpoint_min_seconds: float = 30.0  # checkpoint_every=0: skip epoch ends < this after the last save
    keep_checkpoints: int = 2  # complete checkpoints kept on disk
    log_every: int = 20  # steps between metric lines
    progress: bool | str = "auto"  # auto: a bar on a terminal, a line every log_every steps otherwise | true (bar) | false


@dataclass
class LabelConfig:
    """Which labels a stage may use (METHOD.md 6)."""

    label_fraction: float = 0.01  # class-balanced fraction of the train split, in (0, 1]
    label_seed: int = 0  # seed of the subset draw; same seed -> same images everywhere
    label_list: str = ""  # official ImageNet subset file (one filename per line); overrides fraction
    # how the labelled images are chosen (benchmark mode, all get as many labels as balanced draws):
    # balanced (per class, needs the labels first) | random (ignores classes, as a user would) |
    # typical (TypiClust on label_encoder's embedding, then the hidden labels are read) |
    # probcover (ProbCover's coverage on that embedding, likewise)
    label_selection: str = "balanced"
    label_encoder: str = ""  # typical/probcover: model to embed with; "" = the stage's own pretrained one


@dataclass
class PretrainConfig(CommonConfig):
    """Contrastive pretraining (METHOD.md 3-5)."""

    run_dir: str = "runs/pretrain"
    epochs: float = 100.0
    temperature: float = 0.1
    loss_directions: str = "sum"  # sum (official: loss_A + loss_B) | mean
    proj_head_mode: str = "nonlinear"  # nonlinear | linear | none
    num_proj_layers: int = 3
    proj_out_dim: int = 128
    optimizer: str = "lars"  # lars | sgd | adamw
    base_lr: float = 0.1  # peak lr = scaled(base_lr, batch_size, lr_scaling)
    lr_scaling: str = "sqrt"  # sqrt (base*sqrt(B)) | linear (base*B/256) | none
    weight_decay: float = 1e-4
    warmup_epochs: float = 5.0
    color_strength: float = 1.0
    blur: bool = True
    crop_min_scale: float = 0.08
    global_bn: bool = True  # SyncBatchNorm when running with several processes
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    knn_every: int = 1  # epochs between kNN monitor evaluations; 0 = off
    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_train_size: int = 10000  # labelled bank size for the kNN monitor (0 = whole split)
    knn_test_size: int = 2000  # held-out images for the kNN monitor (0 = whole split)
    online_probe: bool = True  # linear probe on detached features, trained alongside
    grad_accum_steps: int = 1  # must be 1: see docs/USAGE.md, pretrain (use chunk_size or the memory)
    # > 0: encode each process's batch in chunks of this many images (both views) through a
    # gradient cache: the loss and gradients of the whole batch in a chunk's memory, BN per chunk
    # (engine/gradcache.py, METHOD.md 3.2); 0 = one pass over the batch
    chunk_size: int = 0


@dataclass
class FinetuneConfig(CommonConfig, LabelConfig):
    """Fine-tuning from a projection-head layer on a labelled subset (METHOD.md 4.3, 6)."""

    run_dir: str = "runs/finetune"
    init_checkpoint: str = ""  # pretraining run folder, checkpoint folder or .safetensors file
    ft_proj_selector: int = 1  # 0 = backbone features, 1 = first head layer, -1 = head output
    fine_tune_after_block: int = -1  # -1 = train everything; k freezes the stem and stages <= k
    batch_size: int = 64
    epochs: float = 60.0  # official: 60 for 1% labels, 30 for 10%
    min_steps: int = 300  # at least this many steps, however few the labelled images
    optimizer: str = "lars"
    base_lr: float = 0.005
    lr_scaling: str = "sqrt"
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    crop_min_scale: float = 0.08
    # 0: crop-and-flip views (the paper). > 0: SimCLR's colour jitter and grayscale at this strength
    # on them as well (no blur), as the baseline's color_strength
    color_strength: float = 0.0
    zero_init_classifier: bool = True
    global_bn: bool = True


@dataclass
class SupervisedConfig(CommonConfig, LabelConfig):
    """Supervised baseline from random initialisation on the same labelled subset."""

    run_dir: str = "runs/supervised"
    batch_size: int = 64
    epochs: float = 60.0
    min_steps: int = 300  # at least this many steps, however few the labelled images
    optimizer: str = "lars"
    base_lr: float = 0.05
    lr_scaling: str = "sqrt"
    weight_decay: float = 1e-4
    warmup_epochs: float = 2.0
    crop_min_scale: float = 0.08
    # 0: fine-tuning's crop-and-flip views. > 0: SimCLR's colour jitter and grayscale at this
    # strength on them as well (no blur). The pipeline tries the pretraining's strength when no
    # rate learned anything with crops and flips (pipeline.learned_nothing, run_retry)
    color_strength: float = 0.0
    global_bn: bool = True


@dataclass
class DistillConfig(CommonConfig, LabelConfig):
    """Distillation on the unlabeled pool (METHOD.md 7). `model` is the student."""

    run_dir: str = "runs/distill"
    teacher_checkpoint: str = ""  # fine-tuned teacher: run folder, checkpoint folder or file
    student_init: str = ""  # "" = random init; else a pretraining checkpoint for the student
    tau: float = 0.1  # 0.1 for self-distillation, 1.0 for big-to-small
    alpha: float = 1.0  # weight of the distillation term; 1.0 = unlabeled distillation only
    scale_by_tau_sq: bool = False  # multiply the distillation term by tau^2 (official colab)
    batch_size: int = 256
    epochs: float = 10.0
    min_steps: int = 300  # at least this many steps, however small the unlabeled pool
    optimizer: str = "lars"
    base_lr: float = 0.1
    lr_scaling: str = "sqrt"
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    crop_min_scale: float = 0.08
    # "same": the student learns on the teacher's crop-and-flip view (the paper). "strong": the
    # teacher labels that view and the student sees its own crop of the image (from
    # student_crop_min_scale of it), colour-distorted (SimCLR's jitter and grayscale at
    # student_color_strength, no blur). "auto": strong from 10 passes over the pool, else same
    student_view: str = "same"
    student_crop_min_scale: float = 0.5
    student_color_strength: float = 1.0
    # rounds of distillation: each round's student is the next round's teacher, and the last round's
    # is the stage's student (earlier rounds in run_dir/round<k>). 0 = auto: 2 where the student's
    # view is strong (a noisy student iterated), else 1
    rounds: int = 1
    global_bn: bool = True


@dataclass
class LinearEvalConfig(CommonConfig, LabelConfig):
    """Linear evaluation on frozen features (eval-mode BN)."""

    run_dir: str = "runs/linear_eval"
    checkpoint: str = ""  # model to evaluate
    label_fraction: float = 1.0
    ft_proj_selector: int = 0  # 0 = backbone features (the usual linear-eval protocol)
    method: str = "cached"  # cached: features computed once; sgd: SGD-Nesterov on augmented crops
    epochs: float = 90.0
    base_lr: float = 0.1
    lr_scaling: str = "linear"
    weight_decay: float = 1e-6
    batch_size: int = 512


@dataclass
class KnnEvalConfig(CommonConfig, LabelConfig):
    """Weighted kNN classification on frozen features."""

    run_dir: str = "runs/knn"
    checkpoint: str = ""
    label_fraction: float = 1.0
    k: int = 200
    temperature: float = 0.1
    batch_size: int = 512


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check (and gently convert) one value against its declared type."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(typ):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}' must be {typ}, got {value!r}")
    if typ is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key '{key}' must be null, got {value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(typ) or (Any,)
        return [v if item is Any else _coerce(v, item, key) for v in value]
    if origin is dict or typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(typ):
        if isinstance(typ, type) and isinstance(value, typ):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return build(typ, value, prefix=f"{key}.")
    return value


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    kwargs = {k: _coerce(v, t, prefix + k) for k, v, t in checked_items(cls, values, prefix)}
    return cls(**kwargs)


def unknown_key(key: str, valid: list[str], prefix: str = "") -> ConfigError:
    """The one-line error for an unknown key: the closest valid key, or every valid key when
    none is close (a synonym such as learning_rate for base_lr is not a typo)."""
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    where = f" of {prefix.rstrip('.')}" if prefix else ""
    hint = f"did you mean {prefix}{close[0]}?" if close else f"valid keys{where}: " + ", ".join(valid)
    return ConfigError(f"unknown config key '{prefix}{key}'; {hint}")


def checked_items(cls: type, values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(key, value, declared type)`` for each key of ``values``; an unknown key is a
    :func:`unknown_key` error."""
    types_ = _field_types(cls)
    for k in values:
        if k not in types_:
            raise unknown_key(k, list(types_), prefix)
    return [(k, v, types_[k]) for k, v in values.items()]


def check_partial(cls: type, values: dict[str, Any], prefix: str = "") -> None:
    """Check the keys and value types of a partial mapping (some keys of ``cls``, the rest left to
    defaults and other layers), e.g. one stage section of a pipeline config."""
    for k, v, t in checked_items(cls, values, prefix):
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            check_partial(t, v, f"{prefix}{k}.")
        else:
            _coerce(v, t, prefix + k)


def parse_value(text: str) -> Any:
    """Parse the value of a ``key=value`` override with YAML rules (1e-4, true, [1, 2])."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys for nested sections) to a plain mapping."""
    out = json.loads(json.dumps(values))  # deep copy of plain data; number keys become strings
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value; write it as e.g. epochs=10")
        key, _, raw = item.partition("=")
        parts = split_key(key.strip())
        node = out
        for p in parts[:-1]:
            node = node.setdefault(_same_key(node, p), {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
        node[_same_key(node, parts[-1])] = parse_value(raw)
    return out


# A dotted key splits at its dots, except inside a number: in by_fraction.0.01.finetune.epochs the
# label fraction 0.01 is one key (so is 1e-3).
_KEY_PART = re.compile(r"\d+\.\d+(?:[eE][-+]?\d+)?|[^.]+")


def split_key(key: str) -> list[str]:
    """``"by_fraction.0.01.finetune.epochs"`` -> ``["by_fraction", "0.01", "finetune", "epochs"]``."""
    return _KEY_PART.findall(key)


def as_number(text: str) -> float | None:
    """The number that ``text`` spells (``"0.01"``, ``"1e-3"``), or None."""
    try:
        return float(text)
    except ValueError:
        return None


def _same_key(node: dict[str, Any], part: str) -> str:
    """The key of ``node`` that ``part`` names: a number matches the key of the same value
    (``0.010`` and ``1e-2`` name the YAML key ``0.01``)."""
    value = as_number(part)
    if value is not None and part not in node:
        for k in node:
            if as_number(str(k)) == value:
                return k
    return part


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' not found; pass an existing YAML file with --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of key: value")
    return data


def load_config(
    cls: type, path: str | Path | None = None, overrides: list[str] | None = None, stage: str = ""
) -> Any:
    """YAML file (optional) + overrides -> a validated config dataclass.

    A run folder's ``config.yaml`` names its stage (``stage: finetune``); with ``stage`` given, that
    key is accepted when it names the same stage, so a run can be repeated from its own config.
    """
    values = load_yaml(path) if path else {}
    if stage and "stage" in values:
        written = values.pop("stage")
        if written != stage:
            raise ConfigError(
                f"config file '{path}' is the config of a {written} run, not {stage}; "
                f"run it with 'simclrv2 {written} --config {path}'"
            )
    values = apply_overrides(values, overrides or [])
    cfg = build(cls, values)
    validate(cfg)
    return cfg


def validate(cfg: Any) -> None:
    """Range checks that the type system cannot express."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    _check_model_name(cfg.model)
    need(cfg.batch_size > 0, f"batch_size must be positive, got {cfg.batch_size}")
    need(cfg.epochs > 0 or cfg.max_steps > 0, "epochs must be positive (or set max_steps)")
    need(cfg.max_steps >= 0, f"max_steps must be >= 0, got {cfg.max_steps}")
    need(getattr(cfg, "min_steps", 0) >= 0, f"min_steps must be >= 0, got {getattr(cfg, 'min_steps', 0)}")
    need(0.0 <= cfg.val_fraction < 1.0,
         f"val_fraction must be in [0, 1), got {cfg.val_fraction}; e.g. val_fraction=0.1 holds out 10%")
    need(cfg.val_folds >= 0 and (cfg.val_folds == 0 or 0 <= cfg.val_fold < cfg.val_folds),
         f"val_fold must be in [0, val_folds), got val_fold={cfg.val_fold} with val_folds={cfg.val_folds}")
    need(cfg.val_folds == 0 or cfg.val_fraction == 0,
         "val_folds and val_fraction both choose the validation split; set one of them to 0")
    need(cfg.val_folds != 1, "val_folds=1 would hold out every label; use 2 or more folds, or 0")
    need(cfg.checkpoint_min_seconds >= 0,
         f"checkpoint_min_seconds must be >= 0 (0 = every epoch), got {cfg.checkpoint_min_seconds}")
    need(cfg.stem in ("auto", "cifar", "small", "imagenet"),
         f"stem must be auto, cifar, small or imagenet, got '{cfg.stem}'")
    need(cfg.progress in (True, False, "auto"), f"progress must be auto, true or false, got '{cfg.progress}'")
    need(cfg.log_every > 0, f"log_every must be positive, got {cfg.log_every}")
    if isinstance(cfg, PretrainConfig):  # auto: measured at the start of the run (engine.device.choose_precision)
        need(cfg.precision in ("fp32", "bf16", "fp16", "auto"),
             f"precision must be fp32, bf16, fp16 or auto, got '{cfg.precision}'")
    else:
        need(cfg.precision in ("fp32", "bf16", "fp16"),
             f"precision must be fp32, bf16 or fp16, got '{cfg.precision}' (auto is for pretraining only: "
             "pretrain.precision=auto)")
    if isinstance(cfg, LabelConfig) and not cfg.label_list:
        need(
            0.0 < cfg.label_fraction <= 1.0,
            f"label_fraction must be in (0, 1], got {cfg.label_fraction}; e.g. label_fraction=0.01 for 1% labels",
        )
    if isinstance(cfg, LabelConfig):
        need(cfg.label_selection in ("balanced", "random", "typical", "probcover"),
             f"label_selection must be balanced, random, typical or probcover, got '{cfg.label_selection}'")
        need(not (cfg.label_list and cfg.label_selection != "balanced"),
             "label_list names the labelled images itself; drop label_selection or label_list")
    if hasattr(cfg, "optimizer"):
        need(cfg.optimizer in ("lars", "sgd", "adamw"), f"optimizer must be lars, sgd or adamw, got '{cfg.optimizer}'")
    if hasattr(cfg, "lr_scaling"):
        need(cfg.lr_scaling in ("sqrt", "linear", "none"), f"lr_scaling must be sqrt, linear or none, got '{cfg.lr_scaling}'")
    if isinstance(cfg, PretrainConfig):
        need(cfg.temperature > 0, f"temperature must be positive, got {cfg.temperature}")
        need(cfg.loss_directions in ("sum", "mean"), "loss_directions must be sum or mean")
        need(
            cfg.grad_accum_steps == 1,
            "grad_accum_steps must be 1: accumulating small batches changes the negatives of a "
            "contrastive loss; for a batch too large for memory set chunk_size (e.g. chunk_size=256: "
            "the exact large-batch loss through a gradient cache), or memory.enabled=true for a queue of negatives",
        )
        need(cfg.chunk_size >= 0, f"chunk_size must be >= 0 (0 = off), got {cfg.chunk_size}")
    if isinstance(cfg, (PretrainConfig, SupervisedConfig, FinetuneConfig)):
        need(cfg.color_strength >= 0.0, f"color_strength must be >= 0 (0 = none), got {cfg.color_strength}")
    if isinstance(cfg, LinearEvalConfig):
        need(cfg.method in ("cached", "sgd"), f"method must be cached or sgd, got '{cfg.method}'")
    if isinstance(cfg, DistillConfig):
        need(cfg.tau > 0, f"tau must be positive, got {cfg.tau}")
        need(0.0 <= cfg.alpha <= 1.0, f"alpha must be in [0, 1], got {cfg.alpha}")
        need(cfg.student_view in ("same", "strong", "auto"),
             f"student_view must be same, strong or auto, got '{cfg.student_view}'")
        need(0.0 < cfg.student_crop_min_scale <= 1.0,
             f"student_crop_min_scale must be in (0, 1], got {cfg.student_crop_min_scale}")
        need(cfg.student_color_strength >= 0.0,
             f"student_color_strength must be >= 0, got {cfg.student_color_strength}")
        need(cfg.rounds >= 0, f"rounds must be 1 or more, or 0 for auto, got {cfg.rounds}")


def _check_model_name(name: str) -> None:
    """An unknown ``model`` fails here, before a stage or the pipeline writes its run folder."""
    from .models.registry import list_models  # torch: imported only when a config is validated

    names = list_models()
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"closest: {', '.join(close)}; " if close else ""
    raise ConfigError(f"unknown model '{name}'; {hint}`simclrv2 models` lists every registered name")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_hash(values: dict[str, Any]) -> str:
    """Short stable hash of a config mapping (key order does not matter)."""
    blob = json.dumps(values, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def dump_yaml(values: dict[str, Any]) -> str:
    return yaml.safe_dump(values, sort_keys=False)


def describe(cls: type) -> str:
    """Every key with its type and default, for ``--help``."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            for sub, val in dataclasses.asdict(default).items():
                lines.append(f"  {f.name}.{sub} = {val!r}")
        else:
            lines.append(f"  {f.name} = {default!r}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the tools' grammar
# `simclrv2 convert`, `predict`, `embed`, `select`, `export` and `models` share one grammar with the
# stages (--config FILE, key=value); it lives here, with the keys, so that no tool imports the CLI.

_KEY_VALUE = re.compile(r"([A-Za-z_][\w-]*)=(.*)", re.S)


def parse_tool_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The grammar of every command for a tool's argparse ``parser``: ``--config FILE`` (YAML of
    key: value) and ``key=value``, the key being an option's name with underscores
    (``tf_checkpoint=DIR`` for ``--tf-checkpoint DIR``, ``verify=true`` for a switch). The old
    ``--flags`` still parse, with one deprecation line on stderr. A bad key or a missing one is a
    :class:`~simclrv2.config.ConfigError` in key=value words."""
    argv = list(sys.argv[1:] if argv is None else argv)
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    flags = {opt: a for a in actions.values() for opt in a.option_strings}
    _describe_keys(parser, actions)
    settings: list[tuple[str, Any]] = []  # (key, value) from --config, then from the command line
    passed: list[str] = []  # tokens argparse reads as they are: old flags with their values, positionals
    old: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--config" or tok.startswith("--config="):
            path = tok.partition("=")[2] if "=" in tok else (argv[i + 1] if i + 1 < len(argv) else "")
            if not path:
                raise ConfigError(f"{parser.prog}: --config needs a YAML file, e.g. --config options.yaml")
            settings[:0] = [(k, v) for k, v in load_yaml(path).items()]  # the command line wins
            i += 1 if "=" in tok else 2
            continue
        match = _KEY_VALUE.fullmatch(tok)
        if match and not tok.startswith("-"):
            settings.append((match.group(1), match.group(2)))  # the text as typed: a path stays a path
            i += 1
            continue
        flag = tok.partition("=")[0]
        if flag in flags and flag not in ("-h", "--help"):
            old.append(flag)
            takes_value = flags[flag].nargs != 0 and "=" not in tok
            passed += argv[i : i + 1 + takes_value]  # a flag's value (maybe "a=b") is not a key=value
            i += 1 + takes_value
            continue
        passed.append(tok)
        i += 1
    tokens = []
    for key, value in settings:
        action = actions.get(key.replace("-", "_"))
        if action is None and not actions:
            raise ConfigError(f"{parser.prog} takes no options, got '{key}'")
        if action is None:
            raise unknown_key(key, list(actions))
        tokens += _as_tokens(parser.prog, key, value, action)
    if old:
        spelled = ", ".join(f"{f} -> {flags[f].dest}=..." for f in dict.fromkeys(old))
        print(f"note: {parser.prog}: the --flags are deprecated and go in the next release; write key=value "
              f"({spelled})", file=sys.stderr)

    def error(message: str) -> None:
        for opt, action in sorted(flags.items(), key=lambda kv: -len(kv[0])):
            message = message.replace(opt, action.dest)
        raise ConfigError(f"{parser.prog}: {message}; options are key=value, see --help")

    parser.error = error  # type: ignore[method-assign]  # argparse's usage-and-exit, as one line
    return parser.parse_args(tokens + passed)


def _as_tokens(prog: str, key: str, value: Any, action: argparse.Action) -> list[str]:
    """``key=value`` as the argparse tokens of ``action``."""
    if action.nargs == 0:  # a switch (store_true / store_false)
        value = parse_value(value) if isinstance(value, str) else value
        if not isinstance(value, bool):
            raise ConfigError(f"{prog}: '{key}' must be true or false, got {value!r}")
        on = value != bool(action.default)
        return [action.option_strings[0]] if on else []
    if value is None:
        return []
    text = value if isinstance(value, str) else str(value)
    if not action.option_strings:  # a positional named by its key
        return [text]
    return [f"{action.option_strings[0]}={text}"]  # one token, so a value such as -1 is not a flag


def _describe_keys(parser: argparse.ArgumentParser, actions: dict[str, argparse.Action]) -> None:
    """--help ends with the key=value spelling of every option; argparse's list keeps the old flags."""
    if parser.usage is not None:
        return
    parser.usage = f"{parser.prog} [--config FILE] key=value ..."
    lines = []
    for key, a in actions.items():
        if a.nargs == 0:
            value = "true|false"
        elif a.choices:
            value = "|".join(map(str, a.choices))
        else:
            value = a.metavar or key.upper()
        default = "" if a.required or a.default in (None, "", False) else f" (default: {a.default})"
        lines.append(f"  {key}={value}{default}" + (" [required]" if a.required else ""))
    keys = "\nkeys (key=value, or key: value in a --config YAML file):\n" + "\n".join(lines)
    keys += "\nThe --flags above are the old spelling of the same keys, kept for this release.\n"
    help_text = parser.format_help
    parser.format_help = lambda: help_text() + keys  # type: ignore[method-assign]

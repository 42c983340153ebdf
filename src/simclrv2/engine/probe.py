"""Linear evaluation and kNN evaluation of a frozen encoder.

The encoder stays in eval mode throughout (BN statistics are not updated) and no gradient reaches
it: the linear classifier is trained on cached features (``method=cached``) or on features of
crop-and-flip views computed under ``torch.no_grad`` (``method=sgd``, SGD-Nesterov).

Under torchrun, features are extracted sharded across ranks (:func:`evaluate.extract`); the head
is trained on rank 0 alone and broadcast, so every rank reports rank 0's numbers, which equal a
one-process run's. The kNN bank stays sharded: each rank holds its share and the neighbours are
merged across ranks (:func:`evaluate.knn_predict_sharded`).

Limits at ImageNet scale (issue 30): ``method=sgd`` runs the frozen encoder over every step's views
on rank 0 alone (90 epochs of ImageNet on one GPU); the other ranks wait in a gloo group of their
own (:func:`distributed.run_on_main`, a one-day limit), not in the NCCL group, so no collective
times out, but they do no work. Prefer ``method=cached`` there: the features are extracted sharded
once, and the head trains on them in minutes (rank 0 then holds the labelled set's features).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint as ckpt
from .. import distributed as dist
from ..config import KnnEvalConfig, LinearEvalConfig
from ..data.augment import CropFlipAugment
from ..optim import Schedule, scaled_lr, set_lr
from .batches import crop_spec, image_size_of, open_split
from .device import augment, autocast, resolve_device, seed_everything, step_generator
from .evaluate import (
    classification_metrics,
    extract,
    knn_predict_sharded,
    train_linear_on_features,
    write_eval,
)
from .labels import labelled_subset, selection_metrics
from .models import load_model
from .runfolder import RunError, prepare_run_dir
from .splits import has_test_split, validation_indices

_SHARED: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] | None = None


@contextlib.contextmanager
def shared_features() -> Iterator[None]:
    """Within this block, linear-eval and knn-eval extract the features of a split once.

    The pipeline evaluates one frozen encoder both ways; each stage alone would run the encoder over
    the same training and test images. Features are kept in memory, keyed by the checkpoint file
    (path, size, mtime), dataset, split, output, image size, precision and the image indices, and
    are dropped when the block ends.
    """
    global _SHARED
    outer, _SHARED = _SHARED, {}
    try:
        yield
    finally:
        _SHARED = outer


def _features(cfg: Any, model: nn.Module, source: Any, split: str, idx: torch.Tensor, size: int,
              out: str, gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``extract`` over ``idx``, through the :func:`shared_features` cache when one is open.
    ``gather=False``: this rank's share only (the same thing in one process)."""
    gather = gather or dist.world_size() == 1

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        return extract(model, source, idx, size, cfg.batch_size, out, cfg.precision, gather=gather)

    if _SHARED is None:
        return run()
    weights = ckpt.model_weights_file(cfg.checkpoint).resolve()
    stat = weights.stat()
    key = (str(weights), stat.st_size, stat.st_mtime_ns, cfg.dataset, str(cfg.data_dir), split, out, size,
           cfg.precision, hashlib.sha1(idx.numpy().tobytes()).hexdigest(), gather)
    if key not in _SHARED:
        _SHARED[key] = run()
    return _SHARED[key]


def _eval_set(cfg: Any, ds: Any, source: Any, device: torch.device) -> tuple[Any, Any, torch.Tensor, str]:
    """What a probe is scored on: the test split, or, in the few-labels layout without ``test/``,
    the validation split (a held-out share or a fold of the labels); (dataset, source, indices, split name)."""
    if has_test_split(cfg):
        test_ds, test_source = open_split(cfg, cfg.test_split, device)
        return test_ds, test_source, torch.arange(len(test_ds)), cfg.test_split
    val = torch.from_numpy(validation_indices(cfg, ds))
    if not len(val):
        raise RunError(f"{cfg.data_dir} has no {cfg.test_split}/ and no validation split to score the probe on; "
                       "fix: add test/<class>/ images, or set val_fraction or val_folds")
    return ds, source, val, "validation"


def _frozen_encoder(cfg: Any, device: torch.device) -> nn.Module:
    if not cfg.checkpoint:
        raise RunError(f"{type(cfg).__name__} needs checkpoint=PATH (a run folder or a model file)")
    model, _ = load_model(cfg.checkpoint, device, ft_proj_selector=cfg.ft_proj_selector
                          if hasattr(cfg, "ft_proj_selector") else 0, num_classes=0)
    return model.eval().requires_grad_(False)


def _output(cfg: Any) -> str:
    return "features" if getattr(cfg, "ft_proj_selector", 0) == 0 else "proj"


def run_linear_eval(cfg: LinearEvalConfig) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    run_dir = prepare_run_dir(cfg, "linear-eval")
    model = _frozen_encoder(cfg, device)
    ds, source = open_split(cfg, cfg.train_split, device)
    test_ds, test_source, test_idx, test_split = _eval_set(cfg, ds, source, device)
    size = image_size_of(cfg, ds)
    train_idx = torch.from_numpy(labelled_subset(cfg, ds, source, size, run_dir))
    out = _output(cfg)
    test_x, test_y = _features(cfg, model, test_source, test_split, test_idx, size, out)
    epochs = max(1, math.ceil(cfg.epochs))
    if cfg.method not in ("cached", "sgd"):
        raise RunError(f"linear-eval method must be cached or sgd, got '{cfg.method}'")
    if cfg.method == "cached":  # every rank takes part in the sharded extraction
        train_x, train_y = _features(cfg, model, source, cfg.train_split, train_idx, size, out)
    def train_head() -> dict[str, torch.Tensor]:
        if cfg.method == "cached":
            lr = scaled_lr(cfg.base_lr, cfg.batch_size, cfg.lr_scaling)
            head = train_linear_on_features(train_x, train_y, ds.num_classes, epochs, lr, cfg.weight_decay,
                                            cfg.batch_size, cfg.seed)
        else:
            head = _linear_sgd(cfg, model, source, train_idx, size, ds.num_classes, epochs, out, device)
        return head.state_dict()

    # the head is trained once, on rank 0, and sent to the others, which wait: every rank would
    # otherwise train the same head (method=sgd, a pass of the encoder per step, on each rank)
    try:
        state = dist.run_on_main(train_head)
    except RuntimeError as e:
        if dist.is_main():
            raise
        raise RunError(str(e).splitlines()[0]) from e
    head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    with torch.no_grad():
        scores = head(test_x)
    metrics = classification_metrics(scores, test_y, test_ds.num_classes)
    metrics.update(stage="linear-eval", model=model.name, method=cfg.method, label_fraction=cfg.label_fraction,
                   labelled_images=len(train_idx), features=out, **selection_metrics(cfg, ds, train_idx))
    if test_split == "validation":
        metrics = {"val_top1": metrics["top1"], "val_images": len(test_idx), "stage": "linear-eval",
                   **{k: v for k, v in metrics.items() if k not in ("top1", "top5")}}
    if dist.is_main():
        write_eval(run_dir, metrics, scores)
    return metrics


def _linear_sgd(cfg: LinearEvalConfig, model: nn.Module, source: Any, idx: torch.Tensor, size: int,
                num_classes: int, epochs: int, out: str, device: torch.device) -> nn.Linear:
    """SGD-Nesterov on crop-and-flip views through the frozen encoder (zero-initialised head)."""
    dim = model.selected_dim if out == "proj" else model.backbone.feature_dim
    head = nn.Linear(dim, num_classes).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    lr = scaled_lr(cfg.base_lr, cfg.batch_size, cfg.lr_scaling)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    aug = CropFlipAugment(size)
    bs = min(cfg.batch_size, len(idx))
    steps_per_epoch = max(1, len(idx) // bs)
    total = epochs * steps_per_epoch
    schedule = Schedule(lr, 0, total)  # cosine decay, no warmup

    def batches() -> Iterator[tuple[int, torch.Tensor]]:
        for step in range(total):
            epoch, within = divmod(step, steps_per_epoch)
            perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(cfg.seed + epoch))
            yield step, idx[perm[within * bs : (within + 1) * bs]]

    for step, (x, y) in enumerate(source.train_batches(batches(), crop_spec(aug), seed=cfg.seed)):
        with torch.no_grad(), autocast(device, cfg.precision):
            # fp32, outside autocast; a streaming source has cut the crops in its workers
            v = augment(aug, x, step_generator(device, cfg.seed, step), cropped=source.streams)
            f = model.features(v) if out == "features" else model(v)["proj"]
        set_lr(opt, schedule(step))
        loss = F.cross_entropy(head(f.float()), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.cpu()


def run_knn_eval(cfg: KnnEvalConfig) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    run_dir = prepare_run_dir(cfg, "knn-eval")
    model = _frozen_encoder(cfg, device)
    ds, source = open_split(cfg, cfg.train_split, device)
    test_ds, test_source, test_idx, test_split = _eval_set(cfg, ds, source, device)
    size = image_size_of(cfg, ds)
    train_idx = torch.from_numpy(labelled_subset(cfg, ds, source, size, run_dir))
    # each rank keeps its share of the bank (ImageNet's is 10 GB); the queries are on every rank
    train_x, train_y = _features(cfg, model, source, cfg.train_split, train_idx, size, "features", gather=False)
    test_x, test_y = _features(cfg, model, test_source, test_split, test_idx, size, "features")
    scores = knn_predict_sharded(train_x, train_y, test_x, test_ds.num_classes, cfg.k, cfg.temperature)
    metrics = classification_metrics(scores, test_y, test_ds.num_classes)
    metrics.update(stage="knn-eval", model=model.name, k=cfg.k, temperature=cfg.temperature,
                   label_fraction=cfg.label_fraction, labelled_images=len(train_idx),
                   **selection_metrics(cfg, ds, train_idx))
    if test_split == "validation":
        metrics = {"val_top1": metrics["top1"], "val_images": len(test_idx),
                   **{k: v for k, v in metrics.items() if k not in ("top1", "top5")}}
    if dist.is_main():
        write_eval(run_dir, metrics, scores)
    return metrics

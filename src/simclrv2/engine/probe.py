"""Linear evaluation and kNN evaluation of a frozen encoder.

The encoder stays in eval mode throughout (BN statistics are not updated) and no gradient reaches
it: the linear classifier is trained on cached features (``method=cached``) or on features of
crop-and-flip views computed under ``torch.no_grad`` (``method=sgd``, SGD-Nesterov).

Under torchrun, features are extracted sharded across ranks (:func:`evaluate.extract`). With
``method=sgd`` every rank trains the head on its share of each step's batch and the gradients are
summed across ranks (:func:`_linear_sgd`); with ``method=cached`` the head is trained on rank 0
alone and broadcast. Either way every rank ends with the head a one-process run trains (up to float
noise) and reports its numbers. The kNN bank stays sharded: each rank holds its share and the
neighbours are merged across ranks (:func:`evaluate.knn_predict_sharded`).

Limits at ImageNet scale (issue 30): ``method=sgd`` runs the frozen encoder over 1/R of every
step's views on each of the R ranks, so 90 epochs of ImageNet take about 1/R of one GPU's time; the
ranks meet once a step, in one all-reduce of the head's gradients (2048 x 1000 + 1000 floats for
R50-1x) in the default group, and none waits longer than a step. ``method=cached`` extracts
the features sharded once and gathers them onto every rank (1.28M x 2048 fp32 is 10 GB of host
memory per rank); rank 0 then trains the head on them in minutes while the others wait in a gloo
group of their own (:func:`distributed.run_on_main`, a one-day limit), not in the NCCL group.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
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
from ..modelfile import load_model
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
    if cfg.method == "sgd":  # every rank trains on its share of each batch and holds the same head
        head = _linear_sgd(cfg, model, source, train_idx, size, ds.num_classes, epochs, out, device)
    else:
        train_x, train_y = _features(cfg, model, source, cfg.train_split, train_idx, size, out)
        head = _head_on_main(cfg, train_x, train_y, ds.num_classes, epochs)
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


def _head_on_main(cfg: LinearEvalConfig, train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int,
                  epochs: int) -> nn.Linear:
    """The head on cached features, trained once, on rank 0, and sent to the other ranks, which wait.

    Training on features takes minutes at most: not worth sharding, and the broadcast makes every
    rank's head rank 0's bit for bit.
    """
    def train() -> dict[str, torch.Tensor]:
        lr = scaled_lr(cfg.base_lr, cfg.batch_size, cfg.lr_scaling)
        return train_linear_on_features(train_x, train_y, num_classes, epochs, lr, cfg.weight_decay,
                                        cfg.batch_size, cfg.seed).state_dict()

    try:
        state = dist.run_on_main(train)
    except RuntimeError as e:
        if dist.is_main():
            raise
        raise RunError(str(e).splitlines()[0]) from e
    head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    return head


def _linear_sgd(cfg: LinearEvalConfig, model: nn.Module, source: Any, idx: torch.Tensor, size: int,
                num_classes: int, epochs: int, out: str, device: torch.device) -> nn.Linear:
    """SGD-Nesterov on crop-and-flip views through the frozen encoder (zero-initialised head).

    Under torchrun every rank runs this. Each step's batch (one permutation of ``idx`` per epoch, the
    same on every rank) is split over the ranks (:func:`distributed.shard_range`); each rank runs the
    encoder over its share only, and the head's gradients are summed across ranks, each rank's loss
    divided by the global batch size. So every rank takes one process's step, and ends with its head
    up to float noise: each image also gets its one-process view (:func:`_share_features`).
    """
    dim = model.selected_dim if out == "proj" else model.backbone.feature_dim
    head = nn.Linear(dim, num_classes).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    lr = scaled_lr(cfg.base_lr, cfg.batch_size, cfg.lr_scaling)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    bs = min(cfg.batch_size, len(idx))  # the global batch: every step has this many images
    steps_per_epoch = max(1, len(idx) // bs)
    total = epochs * steps_per_epoch
    schedule = Schedule(lr, 0, total)  # cosine decay, no warmup
    share = dist.shard_range(bs)  # this rank's rows of every step's batch; empty on a last rank when bs < R

    def batches() -> Iterator[tuple[int, torch.Tensor]]:
        for step in range(total):
            epoch, within = divmod(step, steps_per_epoch)
            perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(cfg.seed + epoch))
            yield step, idx[perm[within * bs : (within + 1) * bs]][share.start : share.stop]

    # a rank with no share loads nothing (a streaming loader cannot batch zero images) and adds zeros
    feats = _share_features(cfg, model, source, batches(), size, bs, share, out, device) if len(share) else (
        itertools.repeat(None, total))
    for step, batch in enumerate(feats):
        set_lr(opt, schedule(step))
        opt.zero_grad(set_to_none=True)
        if batch is not None:
            f, y = batch
            # this rank's sum over the global batch size: the ranks' parts add up to the batch mean
            (F.cross_entropy(head(f.float()), y, reduction="sum") / bs).backward()
        dist.sum_grads(head.parameters())
        opt.step()
    return head.cpu()


def _share_features(cfg: LinearEvalConfig, model: nn.Module, source: Any, batches: Iterator[tuple[int, torch.Tensor]],
                    size: int, bs: int, share: range, out: str, device: torch.device,
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(encoder outputs, labels)`` of this rank's views, one pair per step of ``batches``.

    Each image's crop and flip are those it gets in one process: the step's parameters are drawn
    for the whole global batch of ``bs`` images from rank 0's generator, and this rank keeps the rows
    of its ``share``. A streaming source cuts the crops in workers from (seed, step, image), which
    does not depend on the rank either; the parameters then only flip.
    """
    aug = CropFlipAugment(size)
    for step, (x, y) in enumerate(source.train_batches(batches, crop_spec(aug), seed=cfg.seed)):
        g = step_generator(device, cfg.seed, step, per_rank=False)
        params = aug.sample_params(bs, x.shape[2], x.shape[3], g)
        mine = {k: v[share.start : share.stop] for k, v in params.items()}
        with torch.no_grad(), autocast(device, cfg.precision):
            # fp32, outside autocast; a streaming source has cut the crops in its workers
            v = augment(aug.apply, x, params=mine, cropped=source.streams)
            f = model.features(v) if out == "features" else model(v)["proj"]
        yield f, y  # outside the block: no_grad and autocast would hold in the caller while suspended


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

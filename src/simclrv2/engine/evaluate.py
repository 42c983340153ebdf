"""Evaluation on frozen models: features, classifier metrics, weighted kNN, linear probes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as dist
from ..data.augment import EvalTransform, to_float
from ..optim import Schedule, set_lr
from .batches import BatchSource, open_split
from .device import augment, autocast
from .runfolder import write_json
from .splits import has_test_split, validation_indices


@torch.no_grad()
def extract(
    model: nn.Module,
    source: BatchSource,
    indices: torch.Tensor,
    image_size: int,
    batch_size: int = 512,
    output: str = "features",
    precision: str = "fp32",
    sharded: bool = True,
    gather: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a frozen model in eval mode over ``indices``.

    ``output`` is ``features`` (pooled backbone, (N, D)), ``proj`` (the head output picked by
    ``ft_proj_selector``) or ``logits``. Returns (outputs (N, D) float32 on CPU, labels (N,)).
    The model's train/eval mode is restored afterwards.

    Under torchrun every rank must call this with the same ``indices``: each runs the model on its
    contiguous share (:func:`distributed.shard_range`) and every rank gets all outputs back in the
    order of ``indices``. In eval mode an image's output does not depend on its batch, so the result
    is the one-process result, up to float noise. ``sharded=False`` runs all of ``indices`` here,
    for a caller on one rank only (a collective would wait for the others forever). ``gather=False``
    returns this rank's share only (rows ``shard_range(len(indices))`` of the answer): a kNN bank
    of ImageNet's 1.28M x 2048 features is 10 GB, too much to hold on every rank.
    """
    was_training = model.training
    model.eval()
    tf = EvalTransform(image_size)
    share = dist.shard_range(len(indices)) if sharded else range(len(indices))
    # a rank with no share runs one image, not kept, so that it knows the outputs' width and dtype
    mine = indices[share.start : share.stop] if len(share) or not len(indices) else indices[:1]
    outs, labels = [], []
    batches = list(torch.split(mine, batch_size))
    try:
        for x, y in source.eval_batches(batches, image_size):
            with autocast(source.device, precision):
                # fp32 crop and resize, outside autocast; a streaming source has cut the view already
                v = to_float(x) if source.streams else augment(tf, x)
                out = model.features(v) if output == "features" else model(v)[output]
            outs.append(out.float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    outs_t, labels_t = torch.cat(outs)[: len(share)], torch.cat(labels)[: len(share)]
    if not sharded or not gather:
        return outs_t, labels_t
    return dist.gather_rows(outs_t), dist.gather_rows(labels_t)


def knn_monitor_indices(
    train_labels: torch.Tensor, n_test: int, train_size: int, test_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pretraining kNN monitor's images: (bank indices, test indices), each sorted.

    The bank is ``train_size`` labelled training images and the test set ``test_size`` test images
    (0 = all), both drawn with one ``torch.Generator`` seeded with ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    bank = torch.nonzero(train_labels >= 0).flatten()
    bank = bank[torch.randperm(len(bank), generator=g)[: train_size or None]]
    test = torch.randperm(n_test, generator=g)[: test_size or None]
    return bank.sort().values, test.sort().values


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted kNN (InstDisc-style): cosine similarity, weights exp(sim / T). Returns (N, C) scores."""
    train = F.normalize(train_feats.float(), dim=1)
    k = min(k, len(train))
    scores = []
    for q in torch.split(F.normalize(test_feats.float(), dim=1), chunk):
        sim = q @ train.T  # (n, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        onehot = F.one_hot(train_labels[top_idx], num_classes).float()  # (n, k, C)
        scores.append((weights.unsqueeze(-1) * onehot).sum(1))
    return torch.cat(scores)


def knn_predict_sharded(
    bank_feats: torch.Tensor,
    bank_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """:func:`knn_predict` with the bank split over the ranks: each passes its own share.

    Each rank finds the ``k`` most similar rows of its share for every query (all ranks pass the
    same queries), the candidates of all ranks are gathered, ``(n, ranks * k)`` per chunk of
    queries, and the ``k`` best of them vote as in :func:`knn_predict`. No rank holds more of the
    bank than its share; the scores are the one-process scores up to the order of a float sum
    (and the order of exactly tied similarities). One process: :func:`knn_predict` itself.
    """
    if dist.world_size() == 1:
        return knn_predict(bank_feats, bank_labels, test_feats, num_classes, k, temperature, chunk)
    bank = F.normalize(bank_feats.float(), dim=1)
    total = int(dist.all_gather(torch.tensor([len(bank)], device=dist.collective_device())).sum())
    k = min(k, total)
    mine = min(k, len(bank))
    device = dist.collective_device()
    scores = []
    for q in torch.split(F.normalize(test_feats.float(), dim=1), chunk):
        sim, idx = (q @ bank.T).topk(mine, dim=1)
        # (n, k) candidates of this rank, padded where its share has fewer than k rows
        cand_sim = torch.full((len(q), k), -math.inf)
        cand_y = torch.zeros((len(q), k), dtype=torch.int64)
        cand_sim[:, :mine], cand_y[:, :mine] = sim, bank_labels[idx]
        every_sim = dist.all_gather(cand_sim.to(device)).cpu().view(-1, len(q), k).permute(1, 0, 2)
        every_y = dist.all_gather(cand_y.to(device)).cpu().view(-1, len(q), k).permute(1, 0, 2)
        top_sim, pick = every_sim.reshape(len(q), -1).topk(k, dim=1)
        weights = (top_sim / temperature).exp()  # padding: exp(-inf) = 0, no vote
        onehot = F.one_hot(every_y.reshape(len(q), -1).gather(1, pick), num_classes).float()
        scores.append((weights.unsqueeze(-1) * onehot).sum(1))
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """top-1, top-5 (more than 5 classes), per-class accuracy and the confusion matrix."""
    pred = scores.argmax(1)
    labels = labels.long()
    out: dict[str, Any] = {"top1": round(100.0 * (pred == labels).float().mean().item(), 4), "n": len(labels)}
    if num_classes > 5:
        top5 = scores.topk(5, dim=1).indices
        out["top5"] = round(100.0 * (top5 == labels[:, None]).any(1).float().mean().item(), 4)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    cm.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_class = cm.diag().float() / cm.sum(1).clamp(min=1).float()
    out["per_class_accuracy"] = [round(100.0 * v, 4) for v in per_class.tolist()]
    out["confusion_matrix"] = cm.tolist()
    return out


def write_eval(run_dir: Path, metrics: dict[str, Any], scores: torch.Tensor) -> None:
    """``metrics.json`` and ``predictions.npy`` (predicted class per test image)."""
    write_json(run_dir / "metrics.json", metrics)
    np.save(run_dir / "predictions.npy", scores.argmax(1).numpy().astype(np.int64))


def write_validation(run_dir: Path, idx: torch.Tensor, logits: torch.Tensor, ds: Any) -> None:
    """``validation.npz``: each validation image's dataset index, label and class probabilities
    (N, C), for the pipeline's calibration table (how often a prediction of a given confidence is right)."""
    import os

    probs = torch.softmax(logits.float(), 1).numpy().astype(np.float32)
    labels = ds.labels[idx].numpy().astype(np.int64)
    path = run_dir / "validation.npz"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:  # then renamed: a reader never sees half a file
        np.savez(f, index=idx.numpy().astype(np.int64), label=labels, probs=probs)
    os.replace(tmp, path)


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, source: BatchSource, indices: torch.Tensor, image_size: int, num_classes: int,
    batch_size: int = 512, precision: str = "fp32",
) -> tuple[dict[str, Any], torch.Tensor]:
    logits, labels = extract(model, source, indices, image_size, batch_size, "logits", precision)
    return classification_metrics(logits, labels, num_classes), logits


def train_linear_on_features(
    train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, epochs: int = 100,
    lr: float = 0.1, weight_decay: float = 1e-6, batch_size: int = 512, seed: int = 0,
) -> nn.Linear:
    """Linear classifier on cached features with SGD-Nesterov and cosine decay.

    Features are standardised by the training mean/std first (folded back into the returned
    layer, so it applies to raw features), which makes one learning rate work across encoders.
    """
    g = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    xs = (train_x - mean) / std
    layer = nn.Linear(train_x.shape[1], num_classes)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    n = len(xs)
    steps_per_epoch = max(1, (n + batch_size - 1) // batch_size)
    schedule = Schedule(lr, 0, epochs * steps_per_epoch)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for idx in torch.split(perm, batch_size):
            set_lr(opt, schedule(step))
            loss = F.cross_entropy(layer(xs[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():  # fold the standardisation into the layer: W (x - m)/s + b
        w = layer.weight / std
        b = layer.bias - (w * mean).sum(1)
        out = nn.Linear(train_x.shape[1], num_classes)
        out.weight.copy_(w)
        out.bias.copy_(b)
    return out


def evaluate_stage(cfg: Any, model: nn.Module, ds: Any, source: BatchSource, size: int, run_dir: Path,
                   metrics: dict[str, Any], test: bool = True, teacher: nn.Module | None = None) -> dict[str, Any]:
    """The end of a classifier stage: validation top-1, then the test split; writes ``metrics.json``.

    The validation split is where choices are made (the pipeline's learning-rate search); the test
    split is for reporting only, and ``test=False`` (a search candidate) skips it. With a
    ``teacher`` (distillation), its test top-1 and the share of test images on which the two agree
    are added.
    """
    val_idx = torch.from_numpy(validation_indices(cfg, ds))
    if len(val_idx):
        val, val_logits = evaluate_classifier(model, source, val_idx, size, ds.num_classes, precision=cfg.precision)
        metrics.update(val_top1=val["top1"], val_images=len(val_idx))
        if dist.is_main():
            write_validation(run_dir, val_idx, val_logits, ds)
    if not has_test_split(cfg):  # the few-labels layout without test/: the validation split is all there is
        test = False
    if not test:
        write_json(run_dir / "metrics.json", metrics)
        dist.barrier()
        return metrics
    test_ds, test_source = open_split(cfg, cfg.test_split, source.device)
    test_idx = torch.arange(len(test_ds))
    tested, logits = evaluate_classifier(model, test_source, test_idx, size, test_ds.num_classes,
                                         precision=cfg.precision)
    metrics.update(tested)
    if teacher is not None:
        t_metrics, t_logits = evaluate_classifier(teacher, test_source, test_idx, size, logits.shape[1],
                                                  precision=cfg.precision)
        agree = (t_logits.argmax(1) == logits.argmax(1)).float().mean().item() * 100
        metrics.update(teacher_top1=t_metrics["top1"], teacher_agreement=round(agree, 4))
    if dist.is_main():
        write_eval(run_dir, metrics, logits)
    dist.barrier()
    return metrics

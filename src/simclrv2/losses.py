"""Loss functions: NT-Xent (METHOD.md 3) and distillation (METHOD.md 7).

Losses take tensors and return tensors; state such as a negatives queue lives in
``simclrv2.memory.MomentumMemory`` and is passed in as ``extra_negatives``. The distillation losses
are pure; ``nt_xent`` under torchrun gathers both views from every rank (a collective) and reads
the rank to place each anchor's positive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from simclrv2.distributed import gather_with_grad, rank, world_size

# Subtracted from the self-similarity logits (METHOD.md 3, step 5, the official LARGE_NUM). Logits are
# computed in float32, so 1e9 is exact enough and exp(-1e9) underflows to 0 in the softmax.
LARGE_NUM = 1e9


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.1,
    gather: bool | None = None,
    extra_negatives: torch.Tensor | None = None,
    directions: str = "sum",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """NT-Xent contrastive loss over the global batch, as in the official code (METHOD.md 3).

    Args:
        z1, z2: ``(N, D)`` projection-head outputs of view 1 and view 2 of the same N local images.
        temperature: tau; logits are cosine similarities divided by it.
        gather: gather both views from all processes with ``gather_with_grad`` so that every
            anchor sees ``2*N*R - 2`` negatives; ``None`` means "on when world_size() > 1".
        extra_negatives: optional ``(K, D)`` extra negatives (e.g. the memory queue), assumed
            already L2-normalised and identical on every rank; no gradient flows into them. They
            add K columns to both directions.
        directions: ``"sum"`` (official: loss_A + loss_B, METHOD.md 3, step 7) or ``"mean"`` (their average,
            the textbook normalisation; half the official value).

    Returns:
        ``(loss, stats)``: scalar loss = mean over the N local anchors; ``stats``: this rank's
        ``contrastive_acc`` and ``entropy`` (``_contrastive_stats``), not averaged over ranks.

    Distributed: the loss is NOT divided by the world size. TF divides each replica's loss by the
    replica count because it sums gradients over replicas; DDP averages them instead, which gives
    the same full-batch gradient (see ``simclrv2.distributed``).

    Computed in float32 regardless of autocast (autocast is switched off inside, the inputs are
    upcast): with tau = 0.1 the logits span [-10, 10], bf16 would round them to about 0.04, and
    the masking constant must not overflow fp16.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (N, D); got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if directions not in ("sum", "mean"):
        raise ValueError(f"directions must be 'sum' or 'mean', got {directions!r}")
    if gather is None:
        gather = world_size() > 1
    # autocast would run the matmuls below in bf16/fp16 again, whatever the inputs' dtype
    with torch.autocast(z1.device.type, enabled=False):
        return _nt_xent_fp32(z1.float(), z2.float(), temperature, gather, extra_negatives, directions)


def _nt_xent_fp32(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather: bool,
                  extra_negatives: torch.Tensor | None, directions: str,
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`nt_xent`'s body on float32 inputs, outside autocast."""
    h1 = F.normalize(z1, dim=1)  # (N, D)
    h2 = F.normalize(z2, dim=1)  # (N, D)
    n = h1.shape[0]
    if gather:
        h1_large = gather_with_grad(h1)  # (N*R, D) in rank order
        h2_large = gather_with_grad(h2)
        offset = rank() * n
    else:
        h1_large, h2_large, offset = h1, h2, 0
    n_large = h1_large.shape[0]

    # Local anchor i has global column i + rank*N: the positive in ab/ba, itself in aa/bb.
    labels = torch.arange(n, device=h1.device) + offset  # (N,)
    self_mask = F.one_hot(labels, n_large).to(h1.dtype)  # (N, N*R)

    logits_aa = h1 @ h1_large.T / temperature - self_mask * LARGE_NUM  # (N, N*R)
    logits_bb = h2 @ h2_large.T / temperature - self_mask * LARGE_NUM
    logits_ab = h1 @ h2_large.T / temperature
    logits_ba = h2 @ h1_large.T / temperature

    blocks_a = [logits_ab, logits_aa]
    blocks_b = [logits_ba, logits_bb]
    if extra_negatives is not None:
        if extra_negatives.dim() != 2 or extra_negatives.shape[1] != h1.shape[1]:
            raise ValueError(
                f"extra_negatives must be (K, {h1.shape[1]}), got {tuple(extra_negatives.shape)}"
            )
        neg = extra_negatives.detach().to(device=h1.device, dtype=h1.dtype)  # (K, D)
        blocks_a.append(h1 @ neg.T / temperature)  # (N, K)
        blocks_b.append(h2 @ neg.T / temperature)

    # (N, 2*N*R [+ K]) each; the target column index is the same in both directions.
    loss_a = F.cross_entropy(torch.cat(blocks_a, dim=1), labels, reduction="none")  # (N,)
    loss_b = F.cross_entropy(torch.cat(blocks_b, dim=1), labels, reduction="none")
    per_anchor = loss_a + loss_b
    if directions == "mean":
        per_anchor = per_anchor / 2
    return per_anchor.mean(), _contrastive_stats(logits_ab, labels)


@torch.no_grad()
def _contrastive_stats(logits_ab: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the official code logs: the local ``contrastive_acc`` (the argmax of an ab row is the
    positive) and ``entropy`` (mean entropy of softmax(ab)), detached."""
    logp_ab = F.log_softmax(logits_ab, dim=1)
    return {
        "contrastive_acc": (logits_ab.argmax(dim=1) == labels).float().mean(),
        "entropy": -(logp_ab.exp() * logp_ab).sum(dim=1).mean(),
    }


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tau: float,
    scale_by_tau_sq: bool = False,
) -> torch.Tensor:
    """Soft-label distillation loss (METHOD.md 7): mean over the batch of
    ``-sum_y softmax(teacher/tau)_y * log_softmax(student/tau)_y``.

    The teacher is fixed: its logits are detached. ``scale_by_tau_sq`` multiplies by tau**2 as the
    official colab does (Hinton et al.'s gradient-scale correction); the paper's formula has no
    such factor, so the default is False. With tau = 1 (the colab's value) both agree.

    Args:
        student_logits, teacher_logits: ``(N, C)``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"shape mismatch: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    p_teacher = F.softmax(teacher_logits.detach().float() / tau, dim=1)  # (N, C)
    log_p_student = F.log_softmax(student_logits.float() / tau, dim=1)  # (N, C)
    loss = -(p_teacher * log_p_student).sum(dim=1).mean()
    if scale_by_tau_sq:
        loss = loss * tau**2
    return loss


def mixed_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
    alpha: float,
    scale_by_tau_sq: bool = False,
) -> torch.Tensor:
    """Distillation with labels (METHOD.md 7): the paper's
    ``-(1 - alpha) * sum_labelled log P_S(y|x) - alpha * sum_all sum_y P_T log P_S``, divided by N.

    ``labels`` is ``(N,)`` int64; negative values (-1) mark unlabeled samples. Both sums run over
    the batch and are divided by its size N, as the paper's sums over the data are: each labelled
    image weighs ``1 - alpha`` and each image ``alpha``, whatever share of the batch is labelled.
    (Dividing the CE by the labelled count instead would weigh the two or three labelled images of a
    batch drawn from 40 labels among 4,000 images about a hundred times more than an unlabeled one.)
    The CE is at temperature 1, as ``log P_S(y_i|x_i)`` in the formula, and 0 when no row is
    labelled. The paper's main results use alpha = 1 (distillation only).
    """
    distill = distillation_loss(student_logits, teacher_logits, tau, scale_by_tau_sq)
    labeled = labels >= 0  # (N,) bool
    # Per-sample CE (unlabeled rows get a dummy class 0 and are masked out), summed, over N.
    ce_each = F.cross_entropy(student_logits.float(), labels.clamp(min=0), reduction="none")  # (N,)
    ce = (ce_each * labeled).sum() / len(labels)
    return (1.0 - alpha) * ce + alpha * distill

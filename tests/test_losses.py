"""NT-Xent and distillation losses against naive references (METHOD.md 3, METHOD.md 7)."""

import math

import pytest
import torch
import torch.nn.functional as F

from simclrv2.losses import distillation_loss, mixed_distillation_loss, nt_xent


def naive_nt_xent(z1, z2, temperature, extra_negatives=None, directions="sum"):
    """Double loop over anchors and candidates, straight from METHOD.md 3 steps 1-7."""
    h1 = [v / v.norm() for v in z1]
    h2 = [v / v.norm() for v in z2]
    negs = [] if extra_negatives is None else list(extra_negatives)
    n = len(h1)
    total = 0.0
    for i in range(n):
        per_anchor = 0.0
        for anchor, same_view, other_view in ((h1[i], h1, h2), (h2[i], h2, h1)):
            pos = torch.dot(anchor, other_view[i]) / temperature
            denom = 0.0
            for j in range(n):  # the other view: positive plus N-1 negatives
                denom = denom + torch.exp(torch.dot(anchor, other_view[j]) / temperature)
            for j in range(n):  # the same view, skipping the anchor itself
                if j != i:
                    denom = denom + torch.exp(torch.dot(anchor, same_view[j]) / temperature)
            for q in negs:
                denom = denom + torch.exp(torch.dot(anchor, q) / temperature)
            per_anchor = per_anchor - torch.log(torch.exp(pos) / denom)
        if directions == "mean":
            per_anchor = per_anchor / 2
        total = total + per_anchor
    return total / n


@pytest.mark.parametrize("directions", ["sum", "mean"])
@pytest.mark.parametrize("with_queue", [False, True])
def test_nt_xent_matches_double_loop_loss_and_grads(directions, with_queue):
    g = torch.Generator().manual_seed(0)
    n, d, temp = 6, 5, 0.5
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = torch.randn(n, d, generator=g, dtype=torch.float64)
    queue = F.normalize(torch.randn(4, d, generator=g, dtype=torch.float64), dim=1) if with_queue else None

    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss, stats = nt_xent(a1, a2, temperature=temp, extra_negatives=queue, directions=directions)
    loss.backward()

    b1, b2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ref = naive_nt_xent(b1, b2, temp, extra_negatives=queue, directions=directions)
    ref.backward()

    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(a1.grad.double(), b1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a2.grad.double(), b2.grad, rtol=1e-4, atol=1e-6)
    assert 0.0 <= stats["contrastive_acc"].item() <= 1.0
    assert 0.0 <= stats["entropy"].item() <= math.log(n) + 1e-5
    assert not stats["entropy"].requires_grad


def test_nt_xent_sum_is_twice_mean_and_queue_adds_loss():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    s, _ = nt_xent(z1, z2, temperature=0.1, directions="sum")
    m, _ = nt_xent(z1, z2, temperature=0.1, directions="mean")
    assert s.item() == pytest.approx(2 * m.item(), rel=1e-6)
    # More negatives can only increase every softmax denominator.
    q, _ = nt_xent(
        z1, z2, temperature=0.1, extra_negatives=F.normalize(torch.randn(32, 16, generator=g), dim=1)
    )
    assert q.item() > s.item()
    # An empty queue (memory before its first enqueue) changes nothing.
    e, _ = nt_xent(z1, z2, temperature=0.1, extra_negatives=torch.empty(0, 16))
    assert e.item() == pytest.approx(s.item(), rel=1e-6)


def test_nt_xent_perfect_pairs_stats_and_no_gather_single_process():
    # Orthogonal pairs with identical views: the positive is always the argmax.
    z = torch.eye(4, 8) * 3.0
    loss, stats = nt_xent(z, z.clone(), temperature=0.1, gather=True)  # identity without a group
    assert stats["contrastive_acc"].item() == 1.0
    # Entropy of softmax over the ab row [10, 0, 0, 0].
    p_pos, p_neg = math.exp(10) / (math.exp(10) + 3), 1 / (math.exp(10) + 3)
    entropy = -p_pos * math.log(p_pos) - 3 * p_neg * math.log(p_neg)
    assert stats["entropy"].item() == pytest.approx(entropy, rel=1e-4)
    # Analytic value: positive logit 10, 3 negatives at 0 in ab and 3 in aa (self masked).
    expected = 2 * (math.log(math.exp(10) + 6) - 10)
    assert loss.item() == pytest.approx(expected, abs=1e-6)  # float32 log-sum-exp near 0


def test_nt_xent_invariant_to_scale_and_lightly_agrees():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    a, _ = nt_xent(z1, z2, temperature=0.2)
    b, _ = nt_xent(3 * z1, 0.5 * z2, temperature=0.2)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    lightly_loss = pytest.importorskip("lightly.loss")
    ref = lightly_loss.NTXentLoss(temperature=0.2)(z1, z2)  # averages the two directions
    m, _ = nt_xent(z1, z2, temperature=0.2, directions="mean")
    assert m.item() == pytest.approx(ref.item(), rel=1e-5)


def test_nt_xent_rejects_bad_input():
    with pytest.raises(ValueError):
        nt_xent(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError):
        nt_xent(torch.randn(4, 3), torch.randn(4, 3), directions="avg")
    with pytest.raises(ValueError):
        nt_xent(torch.randn(4, 3), torch.randn(4, 3), extra_negatives=torch.randn(2, 4))


def naive_distill(student, teacher, tau):
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        t_exp = [math.exp(v / tau) for v in t_row]
        s_exp = [math.exp(v / tau) for v in s_row]
        t_z, s_z = sum(t_exp), sum(s_exp)
        total += -sum((te / t_z) * math.log(se / s_z) for te, se in zip(t_exp, s_exp))
    return total / len(student)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_distillation_matches_naive(tau):
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    assert distillation_loss(s, t, tau).item() == pytest.approx(naive_distill(s, t, tau), rel=1e-5)
    scaled = distillation_loss(s, t, tau, scale_by_tau_sq=True).item()
    assert scaled == pytest.approx(tau**2 * naive_distill(s, t, tau), rel=1e-5)


def test_distillation_hard_label_limit_and_teacher_gets_no_grad():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(6, 5, generator=g, requires_grad=True)
    t = torch.randn(6, 5, generator=g, requires_grad=True)
    hard = t.detach().argmax(dim=1)
    # Teacher logits with large gaps: at tau=1 the soft targets are one-hot at the argmax.
    big_t = t * 1000.0
    torch.testing.assert_close(distillation_loss(s, big_t, 1.0), F.cross_entropy(s, hard))
    # tau -> 0: the teacher distribution collapses to its argmax; the student is sharpened too.
    t_gap = F.one_hot(hard, 5).float() * 5.0 + torch.randn(6, 5, generator=g) * 0.1
    tau = 0.02
    torch.testing.assert_close(distillation_loss(s, t_gap, tau), F.cross_entropy(s / tau, hard))
    distillation_loss(s, t, 1.0).backward()
    assert t.grad is None and s.grad is not None


def test_mixed_distillation():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    labels = torch.tensor([2, -1, 0, -1, 3, 1])
    tau, alpha = 0.7, 0.3
    # The paper's sums: CE summed over the labeled rows, both terms over the batch size (6), so a
    # labeled row weighs 1 - alpha and every row alpha whatever share of the batch is labeled.
    ce_rows = [-F.log_softmax(s[i], dim=0)[int(labels[i])].item() for i in range(6) if labels[i] >= 0]
    ce = sum(ce_rows) / 6
    expected = (1 - alpha) * ce + alpha * naive_distill(s, t, tau)
    assert mixed_distillation_loss(s, t, labels, tau, alpha).item() == pytest.approx(expected, rel=1e-5)
    pure = distillation_loss(s, t, tau)
    torch.testing.assert_close(mixed_distillation_loss(s, t, labels, tau, alpha=1.0), pure)
    assert mixed_distillation_loss(s, t, labels, tau, alpha=0.0).item() == pytest.approx(ce, rel=1e-5)
    # No labeled sample: CE term is 0, not NaN.
    none = torch.full((6,), -1)
    out = mixed_distillation_loss(s, t, none, tau, alpha=0.5)
    assert out.item() == pytest.approx(0.5 * pure.item(), rel=1e-6)


def test_nt_xent_is_fp32_under_bf16_autocast(monkeypatch):
    """Under bf16 autocast (the training step's), NT-Xent still computes its logits and loss in fp32
    (issue 30, defect 5): bf16 logits at tau = 0.1 are off by about 0.04 each.

    The inputs are bf16-rounded projections, as a bf16 model gives them; the reference is the double
    loop in float64 on the same rounded values.
    """
    g = torch.Generator().manual_seed(3)
    z1, z2 = (torch.randn(16, 32, generator=g).to(torch.bfloat16) for _ in range(2))
    queue = F.normalize(torch.randn(8, 32, generator=g), dim=1)
    seen = []
    real_ce = F.cross_entropy

    def spy(logits, *args, **kwargs):
        seen.append(logits.dtype)
        return real_ce(logits, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = nt_xent(z1, z2, temperature=0.1, extra_negatives=queue)
    ref = naive_nt_xent(z1.double(), z2.double(), 0.1, extra_negatives=queue.double())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert seen == [torch.float32, torch.float32]  # both directions' logits
    assert loss.dtype == torch.float32 and stats["entropy"].dtype == torch.float32

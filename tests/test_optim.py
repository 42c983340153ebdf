"""LARS, parameter groups, lr scaling and schedule (spec 4)."""

import math

import pytest
import torch
from torch import nn

from simclrv2.models import create_model
from simclrv2.models.heads import SupervisedHead
from simclrv2.optim import LARS, build_optimizer, lr_at, param_groups, scaled_lr, set_lr


class TinyNet(nn.Module):
    """Names like the real model's: conv weights, bn modules, a biased linear, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(2)
        self.proj = nn.Linear(2, 3)
        self.classifier = nn.Linear(3, 4)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)


def one_param_step(w, g, *, lr, wd, exclude, foreach, steps_grads=()):
    p = nn.Parameter(torch.tensor(w, dtype=torch.float64))
    opt = LARS([{"params": [p], "lars_exclude": exclude}], lr=lr, weight_decay=wd, foreach=foreach)
    for grad in (g, *steps_grads):
        p.grad = torch.tensor(grad, dtype=torch.float64)
        opt.step()
    return p.detach()


@pytest.mark.parametrize("foreach", [False, True])
def test_lars_one_step_hand_computed(foreach):
    # w = [3, 4] (|w| = 5), g = [0.6, 0.8]; with wd = 0.1: g' = [0.9, 1.2], |g'| = 1.5,
    # trust = 0.001 * 5 / 1.5 = 1/300, v = 0.1 / 300 * g' = [3e-4, 4e-4].
    w1 = one_param_step([3.0, 4.0], [0.6, 0.8], lr=0.1, wd=0.1, exclude=False, foreach=foreach)
    torch.testing.assert_close(w1, torch.tensor([2.9997, 3.9996], dtype=torch.float64))
    # Without weight decay: trust = 0.001 * 5 / 1 = 0.005, v = 0.1 * 0.005 * g = [3e-4, 4e-4].
    w1 = one_param_step([3.0, 4.0], [0.6, 0.8], lr=0.1, wd=0.0, exclude=False, foreach=foreach)
    torch.testing.assert_close(w1, torch.tensor([2.9997, 3.9996], dtype=torch.float64))
    # Excluded: plain SGD step at lr, no trust ratio: v = 0.1 * g.
    w1 = one_param_step([3.0, 4.0], [0.6, 0.8], lr=0.1, wd=0.0, exclude=True, foreach=foreach)
    torch.testing.assert_close(w1, torch.tensor([2.94, 3.92], dtype=torch.float64))
    # Excluded with the group's L2 term (the supervised head, spec 4.1): v = 0.1 * (g + 0.1 * w).
    w1 = one_param_step([3.0, 4.0], [0.6, 0.8], lr=0.1, wd=0.1, exclude=True, foreach=foreach)
    torch.testing.assert_close(w1, torch.tensor([2.91, 3.88], dtype=torch.float64))
    # |w| = 0: trust falls back to 1.
    w1 = one_param_step([0.0, 0.0], [0.6, 0.8], lr=0.1, wd=0.1, exclude=False, foreach=foreach)
    torch.testing.assert_close(w1, torch.tensor([-0.06, -0.08], dtype=torch.float64))


@pytest.mark.parametrize("foreach", [False, True])
def test_lars_momentum_two_steps(foreach):
    lr, wd, m, eta = 0.5, 0.01, 0.9, 0.001
    w0, g0, g1 = [1.0, -2.0, 2.0], [0.3, 0.1, -0.2], [-0.1, 0.4, 0.2]

    # Hand computation in plain Python.
    def norm(x):
        return math.sqrt(sum(v * v for v in x))

    gd0 = [g + wd * w for g, w in zip(g0, w0)]
    v0 = [lr * eta * norm(w0) / norm(gd0) * g for g in gd0]
    w1 = [w - v for w, v in zip(w0, v0)]
    gd1 = [g + wd * w for g, w in zip(g1, w1)]
    v1 = [m * v + lr * eta * norm(w1) / norm(gd1) * g for v, g in zip(v0, gd1)]
    w2 = [w - v for w, v in zip(w1, v1)]
    got = one_param_step(w0, g0, lr=lr, wd=wd, exclude=False, foreach=foreach, steps_grads=(g1,))
    torch.testing.assert_close(got, torch.tensor(w2, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # Excluded group over two steps: v1 = m * lr * g0 + lr * g1.
    got = one_param_step(w0, g0, lr=lr, wd=0.0, exclude=True, foreach=foreach, steps_grads=(g1,))
    expected = [w - lr * a - (m * lr * a + lr * b) for w, a, b in zip(w0, g0, g1)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_lars_foreach_equals_reference_on_a_model():
    torch.manual_seed(0)
    nets = [TinyNet(), TinyNet()]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [LARS(param_groups(net, 1e-4), lr=1.0, foreach=fe) for net, fe in zip(nets, (False, True))]
    for _ in range(3):
        x = torch.randn(4, 1, 3, 3)
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            net.classifier(net.proj(net.bn1(net.conv1(x)).flatten(1))).square().sum().backward()
            opt.step()
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, msg=name)
    assert nets[0].conv1.weight.abs().sum() > 0


class _Wrapper(nn.Module):
    """A stage's own wrapper: parameter names gain a 'model.' prefix."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.model = inner


def _groups_by_kind(groups):
    """Names per group kind, told apart by flags only: (exclude, wd) -> names."""
    return {(g["lars_exclude"], g["weight_decay"]): g["names"] for g in groups}


def test_param_groups_by_module_type():
    net = TinyNet()
    net.classifier = SupervisedHead(3, 4)
    got = _groups_by_kind(param_groups(net, weight_decay=1e-4))
    assert got == {
        (False, 1e-4): ["conv1.weight", "proj.weight"],
        (True, 1e-4): ["classifier.weight"],  # no trust ratio, L2 term (spec 4.1)
        (True, 0.0): ["bn1.weight", "bn1.bias", "proj.bias", "classifier.bias"],
    }


def test_param_groups_ignore_wrapper_prefixes():
    """DDP ('module.'), torch.compile ('_orig_mod.') and the stages' own wrappers ('model.') rename
    every parameter; the groups must not change. The old name rule put 'model.classifier.weight'
    in the decayed, trust-ratio group."""
    model = create_model("r10_0.25x_sk0", num_classes=5, in_chans=1)
    plain = param_groups(model, 1e-4)
    wrapped = param_groups(_Wrapper(_Wrapper(model)), 1e-4)
    assert [[id(p) for p in g["params"]] for g in plain] == [[id(p) for p in g["params"]] for g in wrapped]
    by_kind = _groups_by_kind(wrapped)
    assert by_kind[(True, 1e-4)] == ["model.model.classifier.weight"]
    excluded = set(by_kind[(True, 0.0)])
    assert "model.model.classifier.bias" in excluded
    norm_params = {f"model.model.{n}" for n, p in model.named_parameters() if p.ndim < 2}
    assert norm_params <= excluded
    assert all(p.ndim >= 2 for p in next(g for g in wrapped if not g["lars_exclude"])["params"])


def test_build_optimizer_kinds():
    net = TinyNet()
    lars = build_optimizer("lars", net, lr=0.1, weight_decay=1e-4)
    assert isinstance(lars, LARS)
    sgd = build_optimizer("sgd", net, lr=0.1, weight_decay=1e-4, nesterov=True)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]
    adamw = build_optimizer("adamw", net, lr=0.1, weight_decay=0.05)
    for opt, wd in ((sgd, 1e-4), (adamw, 0.05)):
        decays = sorted((g["lars_exclude"], g["weight_decay"]) for g in opt.param_groups)
        assert decays == [(False, wd), (True, 0.0)]
    with pytest.raises(ValueError):
        build_optimizer("lamb", net, lr=0.1, weight_decay=0.0)
    with pytest.raises(ValueError):
        build_optimizer("lars", net, lr=0.1, weight_decay=0.0, nesterov=True)
    set_lr(sgd, 0.25)
    assert all(g["lr"] == 0.25 for g in sgd.param_groups)


def test_scaled_lr():
    # Spec 4.2: 0.3 * 4096 / 256 = 0.075 * sqrt(4096) = 4.8.
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(4.8)
    assert scaled_lr(0.1, 4096, "sqrt") == pytest.approx(6.4)
    assert scaled_lr(0.1, 4096, "none") == 0.1
    with pytest.raises(ValueError):
        scaled_lr(0.1, 256, "log")


def test_lr_at_curve():
    total, warmup, peak = 100, 10, 2.0
    curve = [lr_at(s, total, warmup, peak) for s in range(total + 1)]
    assert curve[0] == 0.0
    assert curve[5] == pytest.approx(1.0)  # linear warmup
    assert curve[warmup] == pytest.approx(peak)
    assert curve[55] == pytest.approx(peak / 2)  # cosine midpoint
    assert curve[total] == pytest.approx(0.0, abs=1e-12)
    assert all(a < b for a, b in zip(curve[:warmup], curve[1 : warmup + 1]))
    assert all(a >= b for a, b in zip(curve[warmup:], curve[warmup + 1 :]))
    assert curve[warmup + 30] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 30 / 90)))
    assert lr_at(150, total, warmup, peak) == pytest.approx(0.0, abs=1e-12)  # clamped past the end
    assert lr_at(0, total, 0, peak) == pytest.approx(peak)  # no warmup starts at the peak

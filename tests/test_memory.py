"""MomentumMemory: EMA math, ring buffer, state round trip (METHOD.md 3.1)."""

import io

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load, save
from torch import nn

from simclrv2.losses import nt_xent
from simclrv2.memory import MomentumMemory


class TinySimCLR(nn.Module):
    """Stand-in with the SimCLRModel ``contrastive`` interface: (features, z)."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.backbone = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, dim, bias=False)

    def contrastive(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.bn(self.backbone(x))
        return h, self.head(torch.relu(h))


def test_ema_copy_is_frozen_and_update_math():
    torch.manual_seed(0)
    model = TinySimCLR()
    mem = MomentumMemory(model, queue_size=8, dim=4, momentum=0.9)
    assert all(not p.requires_grad for p in mem.ema_model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    start = [p.detach().clone() for p in mem.ema_model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    mem.update_ema(model)
    for e, s, o in zip(mem.ema_model.parameters(), start, model.parameters()):
        torch.testing.assert_close(e, 0.9 * s + 0.1 * o.detach())
    # Online parameters untouched, and they are different tensors from the EMA's.
    assert all(e.data_ptr() != o.data_ptr() for e, o in zip(mem.ema_model.parameters(), model.parameters()))
    # Unwraps DDP-like wrappers (attribute .module).
    wrapper = nn.Module()
    wrapper.module = model
    mem.update_ema(wrapper)
    for e, s, o in zip(mem.ema_model.parameters(), start, model.parameters()):
        torch.testing.assert_close(e, 0.81 * s + 0.19 * o.detach())


def test_keys_are_normalised_and_ema_stays_in_train_mode():
    model = TinySimCLR()
    mem = MomentumMemory(model, queue_size=8, dim=4)
    mem.ema_model.eval()  # keys() must still use batch statistics
    k = mem.keys(torch.randn(5, 6))
    assert k.shape == (5, 4) and not k.requires_grad
    torch.testing.assert_close(k.norm(dim=1), torch.ones(5))
    assert mem.ema_model.training
    assert mem.ema_model.bn.num_batches_tracked.item() == 1


def test_ring_buffer_wraps_and_reports_filled_slots():
    mem = MomentumMemory(TinySimCLR(), queue_size=5, dim=4)
    assert mem.negatives().shape == (0, 4)
    batches = [torch.full((2, 4), float(i)) for i in range(1, 5)]  # rows tagged 1, 2, 3, 4
    mem.enqueue(batches[0])
    mem.enqueue(batches[1])
    assert mem.negatives().shape == (4, 4) and mem.ptr == 4
    assert mem.negatives()[:, 0].tolist() == [1, 1, 2, 2]
    mem.enqueue(batches[2])  # 2 rows, 1 slot left: wraps to slot 0
    assert mem.filled == 5 and mem.ptr == 1
    assert mem.negatives()[:, 0].tolist() == [3, 1, 2, 2, 3]
    mem.enqueue(batches[3])
    assert mem.negatives()[:, 0].tolist() == [3, 4, 4, 2, 3] and mem.ptr == 3


def test_batch_larger_than_queue_keeps_newest_in_sequential_slots():
    mem = MomentumMemory(TinySimCLR(), queue_size=4, dim=2)
    mem.enqueue(torch.zeros(1, 2))  # ptr = 1
    rows = torch.arange(6, dtype=torch.float32).repeat(2, 1).T  # (6, 2) rows tagged 0..5
    mem.enqueue(rows)
    # Written sequentially from slot 1: 0->1, 1->2, 2->3, 3->0, 4->1, 5->2; ptr ends at 3.
    assert mem.negatives()[:, 0].tolist() == [3, 4, 5, 2] and mem.ptr == 3 and mem.filled == 4


def test_state_dict_round_trip_safetensors_and_weights_only():
    torch.manual_seed(1)
    model = TinySimCLR()
    mem = MomentumMemory(model, queue_size=6, dim=4, momentum=0.5)
    mem.keys(torch.randn(4, 6))  # changes EMA BN running stats
    with torch.no_grad():
        model.head.weight.mul_(3)
    mem.update_ema(model)
    mem.enqueue(F.normalize(torch.randn(4, 4), dim=1))
    state = mem.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())

    for restored_state in (load(save(state)), _torch_round_trip(state)):
        other = MomentumMemory(TinySimCLR(), queue_size=6, dim=4, momentum=0.5)
        other.load_state_dict(restored_state)
        assert other.ptr == mem.ptr == 4 and other.filled == 4
        torch.testing.assert_close(other.negatives(), mem.negatives())
        for (name, a), b in zip(mem.ema_model.state_dict().items(), other.ema_model.state_dict().values()):
            torch.testing.assert_close(a, b, msg=name)

    with pytest.raises(ValueError):
        MomentumMemory(TinySimCLR(), queue_size=7, dim=4).load_state_dict(state)


def _torch_round_trip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_queue_feeds_nt_xent_as_negatives():
    torch.manual_seed(2)
    model = TinySimCLR()
    mem = MomentumMemory(model, queue_size=16, dim=4)
    x1, x2 = torch.randn(4, 6), torch.randn(4, 6)
    mem.enqueue(mem.keys(torch.cat([x1, x2])))  # both views' EMA projections
    assert mem.negatives().shape == (8, 4)
    _, z1 = model.contrastive(x1)
    _, z2 = model.contrastive(x2)
    loss, _ = nt_xent(z1, z2, temperature=0.5, extra_negatives=mem.negatives())
    loss.backward()
    assert torch.isfinite(loss) and model.head.weight.grad is not None
    assert all(p.grad is None for p in mem.ema_model.parameters())

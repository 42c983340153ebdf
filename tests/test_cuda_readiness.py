"""What a GPU run depends on that the CPU can still show (issue 30, defects 6 and 9).

Host-to-device copies are counted on PyTorch's ``meta`` device: it has no storage, so every copy
from a CPU tensor to it is one a GPU run would make, and the counting works without a GPU.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_streaming import make_jpeg_folder
from torch.utils._python_dispatch import TorchDispatchMode

from simclrv2 import distributed as dist
from simclrv2.config import PretrainConfig
from simclrv2.data import augment as augment_mod
from simclrv2.data.augment import SimCLRAugment, to_device
from simclrv2.data.folder import ImageFolderDataset
from simclrv2.engine import device as device_mod
from simclrv2.engine import pretrain
from simclrv2.engine.batches import BatchSource, crop_spec
from simclrv2.engine.device import fast_cuda_settings, step_generator
from simclrv2.engine.pretrain import contrastive_views

META = torch.device("meta")


@pytest.fixture(autouse=True)
def no_autocast_on_meta(monkeypatch):
    """``device.augment`` opens a disabled autocast region for the images' device type, which
    torch refuses for ``meta``; the region copies nothing, so the step runs without it here."""
    monkeypatch.setattr(pretrain, "augment", lambda aug, x, g, **kw: aug(x, generator=g, **kw))


class HostCopies(TorchDispatchMode):
    """Records the shape of every copy from a CPU tensor to another device."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default:
            src, dst = args[0], out
        elif func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
        else:
            return out
        if src.device.type == "cpu" and dst.device.type != "cpu":
            self.shapes.append(tuple(src.shape))
        return out


def one_step(source: BatchSource, aug: SimCLRAugment, idx: torch.Tensor, streams: int = 1) -> torch.Tensor:
    """The data part of one pretraining step: the batch, then its two views (engine/pretrain.py)."""
    batches = source.train_batches(iter([(0, idx)]), crop_spec(aug), 2 if streams else 1, seed=0)
    x, _ = next(batches)
    parts = SimpleNamespace(aug=aug, source=source)
    return contrastive_views(PretrainConfig(), parts, x, step_generator(torch.device("cpu"), 0, 0))


@pytest.mark.parametrize("channels", [1, 3])
def test_an_in_memory_step_makes_three_host_to_device_copies(channels: int) -> None:
    """One for the batch's indices and one per view for all its augmentation parameters (issue 30
    counted about 75 on RGB images: each index and factor tensor was moved on its own), after the
    first step, which also moves the grayscale weights."""
    g = torch.Generator().manual_seed(0)
    ds = SimpleNamespace(images=torch.randint(0, 256, (64, channels, 28, 28), dtype=torch.uint8, generator=g),
                         labels=torch.randint(0, 10, (64,), generator=g))
    source = BatchSource(ds, META, num_workers=0)  # the images move once, here, not per step
    one_step(source, SimCLRAugment(28), torch.arange(32, 64))  # constants reach the device once a run
    with HostCopies() as copies:
        views = one_step(source, SimCLRAugment(28), torch.arange(32))
    assert views.device == META and views.shape == (64, channels, 28, 28)
    assert len(copies.shapes) == 3, copies.shapes


def test_a_streaming_step_copies_the_loaders_batch_before_reordering_it(tmp_path: Path) -> None:
    """The DataLoader pins its (N, views, C, S, S) batch on a GPU; reshaping it to (views * N, ...)
    first made an unpinned copy, and its transfer a blocking one. The batch moves as it came."""
    folder = ImageFolderDataset(make_jpeg_folder(tmp_path, per_class=4) / "train", image_size=24)
    source = BatchSource(folder, META, num_workers=0)
    assert source.streams
    with HostCopies() as copies:
        views = one_step(source, SimCLRAugment(24), torch.arange(6))
    assert views.shape == (12, 3, 24, 24)
    images = [s for s in copies.shapes if len(s) > 1 and s[-1] == 24]
    assert images == [(6, 2, 3, 24, 24)], copies.shapes
    assert len(copies.shapes) == 3, copies.shapes  # the images, their dataset indices, the parameters


def test_to_device_round_trips_mixed_dtypes_through_one_buffer() -> None:
    """The packed copy gives back each tensor's dtype, shape and values (unaligned sizes too)."""
    tensors = [torch.tensor([True, False, True]), torch.arange(5), torch.rand(3, 4), torch.zeros(0),
               torch.tensor([1.5], dtype=torch.float64), torch.randint(0, 255, (7,), dtype=torch.uint8)]
    with HostCopies() as copies:
        moved = to_device(tensors, META)
    assert len(copies.shapes) == 1
    for t, m in zip(tensors, moved):
        assert m.device == META and m.dtype == t.dtype and m.shape == t.shape
    # values: the packing read back where they can be read (to_device itself takes a shortcut there)
    for t, back in zip(tensors, augment_mod._packed_copy(tensors, torch.device("cpu"))):
        assert back.dtype == t.dtype and torch.equal(back, t)
    assert to_device(tensors, torch.device("cpu"))[2] is tensors[2]  # the CPU: nothing copied


@pytest.fixture
def cuda_flags(monkeypatch, request):
    """Restores cuDNN's and the matmul precision's process-wide settings after the test."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    request.addfinalizer(lambda: torch.set_float32_matmul_precision(precision))


def flags() -> tuple[bool, bool, str]:
    return torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()


def test_fast_cuda_settings_on_a_gpu_only(cuda_flags) -> None:
    fast_cuda_settings(torch.device("cpu"))
    assert flags() == (False, False, "highest")  # the CPU's fp32 numbers stay as they were
    fast_cuda_settings(torch.device("cuda", 0))
    assert flags() == (True, True, "high")
    assert torch.backends.cuda.matmul.allow_tf32


def test_resolve_device_turns_them_on_for_cuda(cuda_flags, monkeypatch) -> None:
    """Every stage resolves its device through ``resolve_device``: one place sets them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "setup_distributed", lambda name: torch.device(name))
    assert device_mod.resolve_device("cpu") == torch.device("cpu")
    assert flags() == (False, False, "highest")
    assert device_mod.resolve_device("cuda") == torch.device("cuda")
    assert flags() == (True, True, "high")


def tiny_step_module() -> torch.nn.Module:
    from simclrv2.engine.pretrain import ContrastiveStep
    from simclrv2.models import create_model

    torch.manual_seed(0)
    return ContrastiveStep(create_model("r10_0.25x_sk0", in_chans=1, cifar_stem=True), 10, True)


@pytest.mark.parametrize(("bf16_rate", "chosen"), [(125.0, "bf16"), (105.0, "fp32"), (40.0, "fp32")])
def test_precision_auto_takes_bf16_only_where_measured_faster(tmp_path, monkeypatch, bf16_rate, chosen):
    """The rule on given rates (fp32 at 100 views/s): bf16 needs 1.1x; the choice and the rates are
    kept in the run folder and read back on resume instead of measuring again."""
    calls = []

    def rate(module, views, device, precision):
        calls.append(precision)
        return bf16_rate if precision == "bf16" else 100.0

    monkeypatch.setattr(device_mod, "_views_per_s", rate)
    module = tiny_step_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    rec = device_mod.choose_precision("auto", tmp_path, module, (8, 1, 16, 16), torch.device("cpu"), False)
    assert rec["precision"] == chosen and calls == ["fp32", "bf16"]
    assert f"{bf16_rate / 100:.2f}x" in rec["reason"] and rec["bf16_views_per_s"] == bf16_rate
    again = device_mod.choose_precision("auto", tmp_path, module, (8, 1, 16, 16), torch.device("cpu"), False)
    assert again == rec and len(calls) == 2  # resumed: read back, not measured
    assert device_mod.choose_precision("bf16", tmp_path, module, (8,), torch.device("cpu"), False)["precision"] == "bf16"
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


@pytest.mark.slow
def test_precision_auto_measures_without_touching_the_model(tmp_path) -> None:
    """The real measurement on the CPU: both rates positive, the run's module unchanged (weights
    and batch-norm statistics: it times a copy)."""
    module = tiny_step_module().train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    rec = device_mod.choose_precision("auto", tmp_path, module, (8, 1, 16, 16), torch.device("cpu"), False)
    assert rec["precision"] in ("fp32", "bf16") and rec["fp32_views_per_s"] > 0 and rec["bf16_views_per_s"] > 0
    assert (rec["precision"] == "bf16") == (rec["bf16_speedup"] >= device_mod.BF16_SPEEDUP_NEEDED)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    assert all(p.grad is None for p in module.parameters())


def test_precision_auto_is_for_pretraining_only() -> None:
    from simclrv2.config import ConfigError, FinetuneConfig, validate

    validate(PretrainConfig(precision="auto"))
    with pytest.raises(ConfigError, match="pretrain.precision=auto"):
        validate(FinetuneConfig(precision="auto"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_packed_copy_and_the_views_match_the_cpu() -> None:
    """The packed, pinned, asynchronous copy delivers the same values, and the views made on the GPU
    from the same draws are the CPU's up to float rounding (scripts/gpu_check.sh runs this)."""
    cuda = torch.device("cuda")
    tensors = [torch.tensor([True, False]), torch.arange(5), torch.rand(3, 4), torch.rand(2, dtype=torch.float64)]
    for t, m in zip(tensors, to_device(tensors, cuda)):
        assert m.device.type == "cuda" and torch.equal(m.cpu(), t)
    x = torch.randint(0, 256, (16, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = SimCLRAugment(32)
    cpu = aug(x, generator=step_generator(torch.device("cpu"), 0, 3))
    gpu = aug(x.to(cuda), generator=step_generator(cuda, 0, 3))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-3, rtol=0)

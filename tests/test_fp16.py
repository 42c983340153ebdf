"""precision=fp16 on the CPU: every optimizer of a step goes through the gradient scaler (issue 19).

The step loop scales the loss by the GradScaler's factor (65536 at the start) before backward, so
every gradient of the step is scaled, the online probe's included. An optimizer that steps without
the scaler unscaling its gradients moves 65536 times too far. Here a short pretraining run with
fp16 autocast must give the probe (and the encoder) the weights of the same run in fp32, up to
fp16 rounding, and a stopped and resumed fp16 run must equal an uninterrupted one, scaler included.

fp16 is refused on the CPU by ``engine.device.autocast`` (it is slow there, and the GPU is its use); torch
itself supports fp16 autocast and ``GradScaler("cpu")``, so the tests lift that refusal by
monkeypatching the pretraining loop's ``autocast``. With the probe stepped outside the scaler, the fp16
run of the first test stops on a non-finite loss by step 4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_eval_stages import _write_idx
from test_resume import assert_same_checkpoint, cli

from simclrv2 import checkpoint as ckpt
from simclrv2.data.builtin import FASHION_MNIST_SYSTEM_DIR, read_idx
from simclrv2.engine import device as engine_device
from simclrv2.engine import pretrain as pretrain_stage

FMNIST_DIR = FASHION_MNIST_SYSTEM_DIR
pytestmark = pytest.mark.fashion_mnist


def cpu_autocast(device: torch.device, precision: str):
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return engine_device.autocast(device, precision)


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    monkeypatch.setattr(pretrain_stage, "autocast", cpu_autocast)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fmnist")
    for prefix, n in (("train", 64), ("t10k", 16)):
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            _write_idx(root / f"{prefix}-{kind}", read_idx(FMNIST_DIR / f"{prefix}-{kind}.gz")[:n])
    return root


def pretrain(data_dir: Path, run_dir: Path, precision: str, *extra: str) -> None:
    # 64 images at batch 16: 4 steps an epoch; 1.5 epochs plan 6 steps
    cli("pretrain", "model=r10_0.25x_sk0", "dataset=fashion_mnist", f"data_dir={data_dir}", "batch_size=16",
        "epochs=1.5", "warmup_epochs=0", "knn_every=0", "progress=false", "device=cpu", "num_workers=0",
        "online_probe=true", "proj_out_dim=16", f"precision={precision}", f"run_dir={run_dir}", *extra)


def final_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    last = ckpt.latest_checkpoint(run_dir)
    return (ckpt.load_tensors(last / "model.safetensors"), ckpt.load_tensors(last / "state.safetensors"),
            ckpt.load_optimizer_state(last))


@pytest.mark.slow
def test_fp16_probe_steps_with_unscaled_gradients(tmp_path, data_dir, fp16_on_cpu):
    # base_lr=0 holds the encoder still in both runs (under fp16 its first steps overflow and are
    # skipped, as they should be), so the probe learns from the same features, up to fp16 rounding
    pretrain(data_dir, tmp_path / "fp32", "fp32", "base_lr=0")
    pretrain(data_dir, tmp_path / "fp16", "fp16", "base_lr=0")
    model32, state32, opt32 = final_state(tmp_path / "fp32")
    model16, state16, opt16 = final_state(tmp_path / "fp16")
    assert "scaler" not in opt32
    assert opt16["scaler"]["scale"] >= 2.0**10  # every gradient of the run was scaled by 2^10 or more
    for k in ("weight", "bias"):
        w32, w16 = state32[f"probe/weights/{k}"], state16[f"probe/weights/{k}"]
        # observed: 6e-4 apart, 0.2 at most; an unscaled step would put w16 orders of magnitude off
        torch.testing.assert_close(w16, w32, atol=0.02 * float(w32.abs().max()), rtol=0)
    for k, v in model32.items():  # the encoder stayed put in both (BN statistics differ by rounding)
        if v.is_floating_point():
            torch.testing.assert_close(model16[k], v, atol=2e-3, rtol=1e-3, msg=k)


@pytest.mark.slow
def test_fp16_stop_and_resume_is_bitwise_identical(tmp_path, data_dir, fp16_on_cpu):
    whole, split = tmp_path / "whole", tmp_path / "split"
    pretrain(data_dir, whole, "fp16", "checkpoint_every=3")
    pretrain(data_dir, split, "fp16", "checkpoint_every=3", "max_steps=3")
    pretrain(data_dir, split, "fp16", "checkpoint_every=3")
    a, b = ckpt.latest_checkpoint(whole), ckpt.latest_checkpoint(split)
    assert a.name == "step-00000006"
    assert_same_checkpoint(a, b)
    # the scaler's state came back too: its growth tracker counts all 6 steps, not the last 3
    assert ckpt.load_optimizer_state(a)["scaler"] == ckpt.load_optimizer_state(b)["scaler"]
    assert ckpt.load_optimizer_state(b)["scaler"]["scale"] < 2.0**16  # it changed (skipped steps) on the way

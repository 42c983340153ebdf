"""engine/device.py: the per-step augmentation generator and fp32 augmentation under autocast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclrv2.cli import main
from simclrv2.data.augment import CropFlipAugment, EvalTransform, SimCLRAugment
from simclrv2.engine import classify
from simclrv2.engine.device import augment, step_generator


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_step_generator_is_on_the_cpu_for_any_training_device(device: str) -> None:
    # torch.device("cuda") is only a name here: nothing is allocated on a GPU
    g = step_generator(torch.device(device), seed=3, step=7)
    assert g.device.type == "cpu"
    ref = step_generator(torch.device("cpu"), seed=3, step=7)
    assert torch.equal(torch.rand(5, generator=g), torch.rand(5, generator=ref))  # same stream everywhere
    params = SimCLRAugment(16).sample_params(4, 16, 16, step_generator(torch.device(device), 3, 7))
    assert params["crop"].device.type == "cpu"


def test_step_generator_is_a_pure_function_of_its_arguments() -> None:
    cpu = torch.device("cpu")
    draws = {args: torch.rand(3, generator=step_generator(cpu, *args)) for args in
             [(0, 0), (0, 1), (1, 0), (0, 0, 1)]}
    assert torch.equal(draws[(0, 0)], torch.rand(3, generator=step_generator(cpu, 0, 0)))
    values = list(draws.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(values) for b in values[i + 1:])


@pytest.mark.parametrize("aug", [SimCLRAugment(24, blur=True), CropFlipAugment(24), EvalTransform(24)],
                         ids=["simclr-with-blur", "crop-flip", "eval"])
def test_augment_inside_bf16_autocast_equals_fp32(aug: torch.nn.Module) -> None:
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    gen = (lambda: torch.Generator().manual_seed(1)) if not isinstance(aug, EvalTransform) else (lambda: None)
    ref = augment(aug, x, gen())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        views = augment(aug, x, gen())
        assert torch.is_autocast_enabled("cpu")  # autocast is back on for the model that follows
    assert views.dtype == torch.float32 and torch.equal(views, ref)


def _image_folder(root: Path, per_class: int = 8, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        for c in range(2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_classifier_stage_augments_outside_autocast(tmp_path: Path, monkeypatch) -> None:
    """A bf16 step of a classifier stage: the crops are made with autocast off, in float32."""
    seen: list[tuple[bool, torch.dtype]] = []

    class Recording(CropFlipAugment):
        def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                    cropped: bool = False) -> torch.Tensor:
            out = super().forward(x, generator, cropped)
            seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
            return out

    monkeypatch.setattr(classify, "CropFlipAugment", Recording)  # the view training_view builds
    data = _image_folder(tmp_path / "images")
    rc = main(["supervised", "model=r10_0.25x_sk0", "dataset=imagefolder", f"data_dir={data}", "image_size=16",
               "num_workers=0", "progress=false", "batch_size=8", "label_fraction=1.0", "max_steps=1",
               "precision=bf16", "device=cpu", f"run_dir={tmp_path / 'run'}"])
    assert rc == 0
    assert seen == [(False, torch.float32)]


@pytest.fixture
def no_usable_gpu(monkeypatch):
    """torch's CUDA build on a machine whose driver it cannot use: is_available() is False."""
    from simclrv2.engine import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "_warned_no_gpu", False, raising=False)
    monkeypatch.setattr(device, "NVIDIA_CONTROL_NODE", Path("/nonexistent/nvidiactl"), raising=False)
    for var in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_auto_warns_once_when_the_launcher_names_gpus_that_torch_cannot_use(no_usable_gpu, capsys) -> None:
    """Issue 30, defect 10: device=auto took the CPU in silence where GPUs were meant to be used."""
    from simclrv2.engine.device import resolve_device

    no_usable_gpu.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1, lines  # once per process, however many stages resolve the device
    assert "CUDA_VISIBLE_DEVICES=0,1" in lines[0] and "device=cpu" in lines[0]
    assert ("driver" in lines[0]) if torch.version.cuda else ("CPU-only build" in lines[0])


@pytest.mark.parametrize("env", [{}, {"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "-1"}],
                         ids=["no-hint", "empty", "hidden"])
def test_auto_stays_quiet_where_no_gpu_is_expected(no_usable_gpu, capsys, env) -> None:
    from simclrv2.engine.device import resolve_device

    for k, v in env.items():
        no_usable_gpu.setenv(k, v)
    assert resolve_device("auto") == torch.device("cpu")
    no_usable_gpu.setenv("NVIDIA_VISIBLE_DEVICES", "all")
    assert resolve_device("cpu") == torch.device("cpu")  # asked for the CPU: nothing to say
    assert "warning" not in capsys.readouterr().err

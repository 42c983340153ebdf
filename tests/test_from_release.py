"""Released weights on the user's data: grey images on a colour checkpoint, resizing to the
checkpoint's resolution, and convert -> fine-tune -> distil through the real stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_convert import tiny_tf_checkpoint
from test_eval_stages import FMNIST_DIR, _write_idx

from simclrv2 import checkpoint as ckpt
from simclrv2.cli import main as cli_main
from simclrv2.convert_command import main as convert_main
from simclrv2.data.builtin import read_idx
from simclrv2.models import create_model
from simclrv2.pretrained import load_pretrained


@pytest.fixture(scope="module")
def small_fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 120 training and 40 test images of the real Fashion-MNIST."""
    root = tmp_path_factory.mktemp("fmnist")
    for prefix, n in (("train", 120), ("t10k", 40)):
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            _write_idx(root / f"{prefix}-{kind}", read_idx(FMNIST_DIR / f"{prefix}-{kind}.gz")[:n])
    return root


def test_grey_images_on_a_colour_model_match_the_adapted_stem() -> None:
    torch.manual_seed(0)
    rgb = create_model("r10_0.25x_sk0", in_chans=3, num_classes=4).eval()
    grey = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = rgb(grey)
        repeated = rgb(grey.repeat(1, 3, 1, 1))
        # naive reference: timm's adapt_input_conv for one channel, the stem kernel summed over RGB
        adapted = create_model("r10_0.25x_sk0", in_chans=1, num_classes=4).eval()
        state = rgb.state_dict()
        state["backbone.stem.conv1.weight"] = state["backbone.stem.conv1.weight"].sum(1, keepdim=True)
        adapted.load_state_dict(state)
        by_stem = adapted(grey)
    for k in out:
        torch.testing.assert_close(out[k], repeated[k])
        torch.testing.assert_close(out[k], by_stem[k], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"takes 3-channel images, got shape \(2, 2, 16, 16\)"):
        rgb(torch.rand(2, 2, 16, 16))


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_convert_finetune_distil_on_fashion_mnist(small_fmnist: Path, tmp_path: Path) -> None:
    folder = tmp_path / "finetuned_10pct" / "r10_0.25x_sk0"
    tiny_tf_checkpoint(folder)  # 3-channel stem, 10-class classifier on head output 1
    teacher_init = tmp_path / "converted" / "model.safetensors"
    assert convert_main(["--tf-checkpoint", str(folder), "--out", str(teacher_init)]) == 0
    common = ["dataset=fashion_mnist", f"data_dir={small_fmnist}", "batch_size=16", "progress=false", "device=cpu",
              "num_workers=0", "seed=0", "max_steps=2", "warmup_epochs=0"]
    # grey 28 px images, resized to 32 px (image_size), into a colour checkpoint
    ft_dir = tmp_path / "finetune"
    assert cli_main(["finetune", *common, f"init_checkpoint={teacher_init}", "label_fraction=0.25", "image_size=32",
                     "ft_proj_selector=1", f"run_dir={ft_dir}"]) == 0
    ft_metrics = json.loads((ft_dir / "metrics.json").read_text())
    assert ft_metrics["steps"] == 2 and 0.0 <= ft_metrics["top1"] <= 100.0
    _, meta = ckpt.read_model_file(ft_dir)
    assert meta["model_config"]["in_chans"] == 3 and meta["image_size"] == 32
    teacher = load_pretrained(ft_dir)
    state = teacher.state_dict()
    converted = load_pretrained(teacher_init).state_dict()
    assert not torch.equal(state["backbone.stem.conv1.weight"], converted["backbone.stem.conv1.weight"])  # trained
    # a small grey student distilled from the colour teacher
    st_dir = tmp_path / "distill"
    assert cli_main(["distill", *common, f"teacher_checkpoint={ft_dir}", "model=r10_0.25x_sk0", "label_fraction=0.25",
                     "image_size=32", f"run_dir={st_dir}"]) == 0
    st_metrics = json.loads((st_dir / "metrics.json").read_text())
    assert st_metrics["steps"] == 2
    student = load_pretrained(st_dir)
    assert student.config["in_chans"] == 1 and student.classifier.out_features == 10
    x = torch.from_numpy(read_idx(small_fmnist / "t10k-images-idx3-ubyte")[:4].astype(np.float32) / 255)[:, None]
    with torch.no_grad():
        assert teacher(torch.nn.functional.interpolate(x, size=32))["logits"].shape == (4, 10)

"""``modelfile.load_model``, the one loader: RNG use, classifier fitting, one-line CheckpointErrors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from simclrv2.checkpoint import CheckpointError, write_model_file
from simclrv2.modelfile import load_model
from simclrv2.models import SimCLRModel, create_model

NAME = "r10_0.25x_sk0"


def write(path: Path, num_classes: int, seed: int = 0, meta: dict | None = None) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = create_model(NAME, num_classes=num_classes, cifar_stem=True)
    state = model.state_dict()
    write_model_file(path, state, {"model_name": model.name, "model_config": model.config} if meta is None else meta)
    return state


def test_random_init_draws_as_building_the_model_and_meta_draws_nothing(tmp_path: Path) -> None:
    saved = write(tmp_path / "m.safetensors", num_classes=3)
    config = create_model(NAME, num_classes=3, cifar_stem=True).config
    torch.manual_seed(1)
    SimCLRModel(**config)  # what a stage drew before the loader existed: one model's init
    after_build = torch.rand(4)
    torch.manual_seed(1)
    stage_model, _ = load_model(tmp_path / "m.safetensors", "cpu")
    assert torch.equal(torch.rand(4), after_build)
    torch.manual_seed(1)
    meta_model, _ = load_model(tmp_path / "m.safetensors", "cpu", random_init=False)
    assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(1)))
    for model in (stage_model, meta_model):
        assert model.name == NAME
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_the_classifier_is_fitted_to_the_overrides(tmp_path: Path) -> None:
    pretrained = write(tmp_path / "pre.safetensors", num_classes=0)
    finetuned = write(tmp_path / "ft.safetensors", num_classes=3, seed=1)
    model, _ = load_model(tmp_path / "pre.safetensors", "cpu", num_classes=5)  # fresh classifier
    assert model.classifier.weight.shape == (5, model.classifier.weight.shape[1])
    assert torch.equal(model.state_dict()["backbone.stem.conv1.weight"], pretrained["backbone.stem.conv1.weight"])
    model, _ = load_model(tmp_path / "ft.safetensors", "cpu", num_classes=0)  # classifier dropped
    assert model.classifier is None
    model, _ = load_model(tmp_path / "ft.safetensors", "cpu", num_classes=7)  # another width: fresh
    assert model.classifier.weight.shape[0] == 7
    model, _ = load_model(tmp_path / "ft.safetensors", "cpu")
    assert torch.equal(model.classifier.weight, finetuned["classifier.weight"])


def test_errors_are_one_line_checkpoint_errors(tmp_path: Path) -> None:
    write(tmp_path / "bare.safetensors", num_classes=0, meta={"model_name": NAME})
    with pytest.raises(CheckpointError, match=r"bare.safetensors' has no model_config in its metadata; it was not"):
        load_model(tmp_path / "bare.safetensors", "cpu")
    other = create_model("r18_0.25x_sk0", cifar_stem=True)
    write_model_file(tmp_path / "odd.safetensors", other.state_dict(),
                     {"model_name": NAME, "model_config": create_model(NAME, cifar_stem=True).config})
    for random_init in (True, False):
        with pytest.raises(CheckpointError, match=f"does not fit model {NAME} .*; its weights and model_config "
                                                  "disagree, so write it again$") as err:
            load_model(tmp_path / "odd.safetensors", "cpu", random_init=random_init)
        assert "\n" not in str(err.value)
    (tmp_path / "tf").mkdir()
    (tmp_path / "tf" / "model.ckpt-5.index").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is a TF checkpoint folder; convert it first \(simclrv2 convert "):
        load_model(tmp_path / "tf", "cpu")

"""Verified checkpoints (issue 20): every file a checkpoint writes carries a sha256 in its meta.json.

A flipped bit in the newest checkpoint makes a resumed run fall back to the previous checkpoint
(one line says so) and the finished run still equals an uninterrupted one bit for bit; the load
paths (``read_model_file``, ``load_pretrained``, ``predict``, ``export``) refuse a damaged file
with one line naming it; checkpoints written before checksums existed still load.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from test_reliability import make_image_folder

from simclrv2 import checkpoint as ckpt
from simclrv2 import load_pretrained
from simclrv2.cli import main
from simclrv2.models.registry import create_model

TINY = ["model=r10_0.25x_sk0", "num_workers=0", "progress=false", "batch_size=8", "image_size=16",
        "knn_every=0", "log_every=1", "checkpoint_every=1", "keep_checkpoints=2"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("integrity") / "images")


def pretrain(images: Path, run_dir: Path, steps: int) -> list[str]:
    return ["pretrain", *TINY, "dataset=imagefolder", f"data_dir={images}", f"max_steps={steps}",
            f"run_dir={run_dir}"]


@pytest.fixture(scope="module")
def three_steps(images: Path, tmp_path_factory) -> Path:
    """A pretraining run stopped after 3 steps: checkpoints step-2 and step-3."""
    run = tmp_path_factory.mktemp("integrity") / "run"
    assert main(pretrain(images, run, 3)) == 0
    assert [c.name for c in ckpt.list_checkpoints(run)] == ["step-00000002", "step-00000003"]
    return run


def flip_bit(path: Path, offset: int = -5) -> None:
    """Flip the lowest bit of one byte (default: near the end, inside the tensor data)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def error_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.fashion_mnist
def test_meta_records_the_sha256_of_every_file(three_steps: Path) -> None:
    for c in ckpt.list_checkpoints(three_steps):
        meta = json.loads((c / "meta.json").read_text())
        on_disk = sorted(p.name for p in c.iterdir() if p.name != "meta.json")
        assert sorted(meta["files"]) == on_disk == ["model.safetensors", "optimizer.pt", "state.safetensors"]
        for name, digest in meta["files"].items():
            assert digest == ckpt.file_sha256(c / name)
        assert ckpt.verify_checkpoint(c)["step"] == int(c.name[5:])


@pytest.mark.fashion_mnist
@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.pt", "state.safetensors", "meta.json"])
def test_bit_flip_in_newest_checkpoint_resumes_from_the_previous_one(images: Path, three_steps: Path,
                                                                     tmp_path: Path, capsys, damaged: str) -> None:
    run = Path(shutil.copytree(three_steps, tmp_path / "run"))
    newest = run / "checkpoints" / "step-00000003"
    if damaged == "meta.json":  # a digit of the recorded learning rate: still valid JSON
        text = (newest / damaged).read_text()
        m = re.search(r'"base_lr": (\d)', text)
        text = text[: m.start(1)] + str((int(m.group(1)) + 1) % 10) + text[m.end(1):]
        (newest / damaged).write_text(text)
    else:
        flip_bit(newest / damaged)
    capsys.readouterr()
    assert main(pretrain(images, run, 4)) == 0
    err = capsys.readouterr().err
    notes = [ln for ln in err.splitlines() if "failed verification" in ln]
    assert len(notes) == 1, err
    assert "step-00000003" in notes[0] and damaged in notes[0] and "step-00000002" in notes[0]
    assert f"pretrain: resuming from {run / 'checkpoints' / 'step-00000002'} at step 2" in err

    # the damaged step was trained again: the result equals an uninterrupted 4-step run
    reference = tmp_path / "reference"
    assert main(pretrain(images, reference, 4)) == 0
    a = ckpt.load_tensors(ckpt.latest_checkpoint(reference) / "model.safetensors")
    b = ckpt.load_tensors(ckpt.latest_checkpoint(run) / "model.safetensors")
    assert ckpt.latest_checkpoint(run).name == "step-00000004"
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.fashion_mnist
def test_no_checkpoint_verifies_is_an_error(images: Path, three_steps: Path, tmp_path: Path, capsys) -> None:
    run = Path(shutil.copytree(three_steps, tmp_path / "run"))
    for c in ckpt.list_checkpoints(run):
        flip_bit(c / "model.safetensors")
    assert main(pretrain(images, run, 4)) == 2
    line = error_line(capsys)
    assert "no checkpoint in" in line and "step-00000003" in line and "resume=false" in line
    assert ckpt.latest_checkpoint(run).name == "step-00000003"  # nothing was deleted


@pytest.mark.fashion_mnist
def test_load_paths_refuse_a_damaged_file_naming_it(images: Path, three_steps: Path, tmp_path: Path,
                                                   capsys) -> None:
    run = Path(shutil.copytree(three_steps, tmp_path / "run"))
    weights = ckpt.latest_checkpoint(run) / "model.safetensors"
    flip_bit(weights)
    for path in (run, weights.parent):
        with pytest.raises(ckpt.CheckpointError, match=re.escape(f"'{weights}' does not match the sha256")):
            ckpt.read_model_file(path)
        with pytest.raises(ckpt.CheckpointError, match=re.escape(str(weights))):
            load_pretrained(path)
    for argv in (["predict", "--checkpoint", str(run), "--images", str(images / "test"), "--out", str(tmp_path / "p.csv")],
                 ["export", "--checkpoint", str(run), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]):
        assert main(argv) == 2
        line = error_line(capsys)
        assert str(weights) in line and "damaged" in line, line
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "m.pt").exists()


def test_standalone_model_file_is_verified(tmp_path: Path) -> None:
    model = create_model("r10_0.25x_sk0", num_classes=3)
    path = tmp_path / "model.safetensors"
    ckpt.write_model_file(path, model.state_dict(), {"model_name": model.name, "model_config": model.config})
    state, meta = ckpt.read_model_file(path)
    assert meta["weights_sha256"] == ckpt.tensors_sha256(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    flip_bit(path)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"model file '{path}' does not match")):
        load_pretrained(path)


@pytest.mark.fashion_mnist
def test_checkpoints_without_checksums_still_load_and_resume(images: Path, three_steps: Path, tmp_path: Path,
                                                             capsys) -> None:
    """What a checkpoint written before checksums existed looks like: no files, no meta_sha256."""
    run = Path(shutil.copytree(three_steps, tmp_path / "run"))
    for c in ckpt.list_checkpoints(run):
        meta = json.loads((c / "meta.json").read_text())
        del meta["files"], meta["meta_sha256"]
        (c / "meta.json").write_text(json.dumps(meta))
    load_pretrained(run)
    capsys.readouterr()
    assert main(pretrain(images, run, 4)) == 0
    err = capsys.readouterr().err
    assert "failed verification" not in err and "resuming from" in err and "step-00000003" in err

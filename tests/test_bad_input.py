"""Bad input through the CLI (issue 10): one line ``error: ...`` naming the problem and the fix,
exit code 2, and nothing already written damaged. Also safe loading (a malicious pickle is refused)
and reproducibility (the same seed twice gives bitwise-identical weights on the CPU).

Every case runs ``simclrv2.cli.main(argv)`` in-process on a tiny ImageFolder (48 Fashion-MNIST
images at 16 px) or a Fashion-MNIST IDX copy, with the smallest registry model.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from test_resume import make_image_folder

from simclrv2 import checkpoint as ckpt
from simclrv2.cli import main
from simclrv2.data.builtin import FASHION_MNIST_SYSTEM_DIR

MODEL = "model=r10_0.25x_sk0"
TINY = ["num_workers=0", "progress=false", "batch_size=8", "image_size=16"]


# ------------------------------------------------------------------ helpers


def reseal(ckpt_dir: Path) -> None:
    """Record the checksums of a checkpoint's files as they are now, as whoever swapped a file in
    could: the tests below check what comes after the checksums (shapes, the safe loader)."""
    ckpt.write_meta(ckpt_dir, json.loads((ckpt_dir / "meta.json").read_text()))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture
def own_images(images: Path, tmp_path: Path) -> Path:
    """A copy of the image folder that a test may damage."""
    return Path(shutil.copytree(images, tmp_path / "images"))


def pretrain_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["pretrain", MODEL, "dataset=imagefolder", f"data_dir={data}", *TINY, "knn_every=0",
            "max_steps=2", "checkpoint_every=1", f"run_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def pretrained(images: Path, tmp_path_factory) -> Path:
    """A finished 2-step pretraining run (read-only for the tests: copy it before damaging)."""
    run = tmp_path_factory.mktemp("pretrained") / "run"
    assert main(pretrain_args(images, run)) == 0
    return run


def cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def assert_error(rc: int, err: str, *needles: str) -> str:
    """Exit code 2 and exactly one error line, the last one, holding every needle."""
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes: any change to the folder changes this."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint_snapshot(run: Path) -> dict[str, bytes]:
    """The checkpoints' bytes (config.yaml is rewritten on resume when a resume-safe key changed)."""
    return snapshot(run / "checkpoints")


def steps(run: Path) -> list[int]:
    return [ckpt.read_meta(c)["step"] for c in ckpt.list_checkpoints(run)]


def assert_loadable(c: Path) -> None:
    ckpt.read_meta(c)
    for name in ("model.safetensors", "state.safetensors"):
        t = ckpt.load_tensors(c / name)
        assert all(torch.isfinite(v).all() for v in t.values() if v.is_floating_point())
    assert ckpt.load_optimizer_state(c) is not None


# ------------------------------------------------------------------ datasets


@pytest.mark.fashion_mnist
@pytest.mark.parametrize("damage", ["junk", "truncated"])
def test_corrupt_image_fails_with_its_path(own_images: Path, tmp_path: Path, capsys, damage: str) -> None:
    good = sorted((own_images / "train" / "class1").iterdir())[0]
    bad = own_images / "train" / "class1" / "bad.png"
    data = good.read_bytes()
    bad.write_bytes(b"this is not an image" if damage == "junk" else data[: len(data) // 2])
    rc, err = cli(capsys, *pretrain_args(own_images, tmp_path / "run", "skip_bad_images=false"))
    assert_error(rc, err, str(bad), "skip_bad_images=true")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.fashion_mnist
def test_skip_bad_images_counts_them_and_trains(own_images: Path, tmp_path: Path, capsys) -> None:
    # skip_bad_images=true is the default: a corrupt file never stops a run
    (own_images / "train" / "class0" / "junk.png").write_bytes(b"junk")  # no header: dropped at open
    cut = own_images / "train" / "class1" / "cut.png"  # header intact, pixels cut: dropped when decoded
    cut.write_bytes(sorted((own_images / "train" / "class1").iterdir())[0].read_bytes()[:100])
    with pytest.warns(UserWarning) as caught:
        rc, err = cli(capsys, *pretrain_args(own_images, tmp_path / "run"))
    assert rc == 0, err
    messages = [str(w.message) for w in caught]
    assert any("skipped 1 corrupt image(s)" in m and "junk.png" in m for m in messages), messages
    assert any("skipped unusable image" in m and str(cut) in m for m in messages), messages
    assert steps(tmp_path / "run") == [1, 2]


def fashion_subset(folder: Path, n: int = 256) -> Path:
    """The first ``n`` Fashion-MNIST training images and labels as uncompressed IDX files."""
    folder.mkdir(parents=True)
    for stem, item in (("train-images-idx3-ubyte", 784), ("train-labels-idx1-ubyte", 1)):
        with gzip.open(FASHION_MNIST_SYSTEM_DIR / f"{stem}.gz", "rb") as f:
            header = bytearray(f.read(16 if item > 1 else 8))
            body = f.read(n * item)
        header[4:8] = struct.pack(">I", n)
        (folder / stem).write_bytes(bytes(header) + body)
    return folder


@pytest.mark.fashion_mnist
@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "gzip"])
def test_truncated_idx_file(tmp_path: Path, capsys, compressed: bool) -> None:
    data = fashion_subset(tmp_path / "fmnist")
    images = data / "train-images-idx3-ubyte"
    raw = images.read_bytes()
    if compressed:
        images.unlink()
        images = data / "train-images-idx3-ubyte.gz"
        images.write_bytes(gzip.compress(raw)[:5000])
    else:
        images.write_bytes(raw[: len(raw) - 1000])
    rc, err = cli(capsys, "pretrain", MODEL, "dataset=fashion_mnist", f"data_dir={data}", "num_workers=0",
                  "progress=false", "batch_size=8", "knn_every=0", "max_steps=1",
                  f"run_dir={tmp_path / 'run'}")
    assert_error(rc, err, str(images), "truncated" if compressed else "the file holds", "fix:")


@pytest.mark.fashion_mnist
def test_label_list_naming_missing_images(images: Path, pretrained: Path, tmp_path: Path, capsys) -> None:
    listed = tmp_path / "1percent.txt"
    present = sorted((images / "train" / "class0").iterdir())[0].name
    listed.write_text(f"{present}\nn01440764_10026.JPEG\nghost.png\n")
    rc, err = cli(capsys, "finetune", f"init_checkpoint={pretrained}", "dataset=imagefolder",
                  f"data_dir={images}", *TINY, f"label_list={listed}", "max_steps=1",
                  f"run_dir={tmp_path / 'ft'}")
    assert_error(rc, err, str(listed), "2 of 3 listed file(s) are not in the dataset", "n01440764_10026.JPEG",
                 "fix:")


@pytest.mark.fashion_mnist
def test_empty_class_folder(own_images: Path, tmp_path: Path, capsys) -> None:
    (own_images / "train" / "class2").mkdir()
    rc, err = cli(capsys, *pretrain_args(own_images, tmp_path / "run"))
    assert_error(rc, err, str(own_images / "train" / "class2"), "holds no images", "fix:")


# ------------------------------------------------------------------ config


@pytest.mark.fashion_mnist
@pytest.mark.parametrize("fraction", ["0", "-0.1", "1.5"])
def test_label_fraction_out_of_range(images: Path, pretrained: Path, tmp_path: Path, capsys,
                                     fraction: str) -> None:
    rc, err = cli(capsys, "finetune", f"init_checkpoint={pretrained}", "dataset=imagefolder",
                  f"data_dir={images}", *TINY, f"label_fraction={fraction}", f"run_dir={tmp_path / 'ft'}")
    assert_error(rc, err, "label_fraction must be in (0, 1]", "label_fraction=0.01")
    assert not (tmp_path / "ft").exists()  # rejected before anything was written


@pytest.mark.fashion_mnist
def test_unknown_model_name(images: Path, pretrained: Path, tmp_path: Path, capsys) -> None:
    rc, err = cli(capsys, *pretrain_args(images, tmp_path / "run"), "model=r51_1x_sk0")
    assert_error(rc, err, "unknown model 'r51_1x_sk0'", "closest: r50_1x_sk0", "simclrv2 models")
    assert not (tmp_path / "run").exists()  # rejected while validating the config: no run folder
    # the same mistake pointed at an existing run changes nothing there
    run = tmp_path / "existing"
    shutil.copytree(pretrained, run)
    before = snapshot(run)
    rc, err = cli(capsys, *pretrain_args(images, run), "model=r51_1x_sk0")
    assert_error(rc, err, "unknown model 'r51_1x_sk0'")
    assert snapshot(run) == before


def test_unknown_model_name_in_pipeline_writes_nothing(tmp_path: Path, capsys) -> None:
    """The pipeline validates every stage (the small student too) before creating run_dir."""
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"run_dir: {tmp_path / 'pipe'}\nsmall_student: r10_0.25x_sk1\n")
    rc, err = cli(capsys, "pipeline", "--config", str(path))
    assert_error(rc, err, "unknown model 'r10_0.25x_sk1'", "r10_0.25x_sk0", "simclrv2 models")
    assert not (tmp_path / "pipe").exists()


@pytest.mark.parametrize("override, needles", [
    ("epoch=3", ["unknown config key 'epoch'", "epochs"]),
    ("memory.enable=true", ["unknown config key 'memory.enable'", "memory.enabled"]),
    ("batch_size=abc", ["'batch_size' must be an integer", "'abc'"]),
    ("resume=maybe", ["'resume' must be true or false"]),
    ("memory=4", ["'memory' must be a mapping"]),
    ("epochs", ["not key=value", "epochs=10"]),
])
def test_unknown_or_mistyped_config_key(tmp_path: Path, capsys, override: str, needles: list[str]) -> None:
    rc, err = cli(capsys, "pretrain", override, f"run_dir={tmp_path / 'run'}")
    assert_error(rc, err, *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, needle", [
    ("student_view=noisy", "student_view must be same, strong or auto, got 'noisy'"),
    ("student_crop_min_scale=0", "student_crop_min_scale must be in (0, 1], got 0.0"),
    ("student_color_strength=-1", "student_color_strength must be >= 0, got -1.0"),
    ("rounds=-1", "rounds must be 1 or more, or 0 for auto, got -1"),
])
def test_bad_student_view(tmp_path: Path, capsys, override: str, needle: str) -> None:
    rc, err = cli(capsys, "distill", override, "teacher_checkpoint=x", f"run_dir={tmp_path / 'run'}")
    assert_error(rc, err, needle)
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_config_file(tmp_path: Path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 1\nlearning_rate: 0.1\n")
    rc, err = cli(capsys, "pretrain", "--config", str(path), f"run_dir={tmp_path / 'run'}")
    assert_error(rc, err, "unknown config key 'learning_rate'", "base_lr")


@pytest.mark.fashion_mnist
def test_a_run_repeats_from_its_own_config_yaml(pretrained: Path, tmp_path: Path, capsys) -> None:
    """A run folder's config.yaml (which names its stage) is a valid --config for that stage only."""
    from simclrv2 import config as C

    saved = pretrained / "config.yaml"
    cfg = C.load_config(C.PretrainConfig, saved, [], stage="pretrain")
    assert dict(C.to_dict(cfg), stage="pretrain") == C.load_yaml(saved)
    rc, err = cli(capsys, "finetune", "--config", str(saved), f"run_dir={tmp_path / 'ft'}")
    assert_error(rc, err, "config of a pretrain run, not finetune", f"simclrv2 pretrain --config {saved}")
    assert not (tmp_path / "ft").exists()


# ------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def other_arch(images: Path, tmp_path_factory) -> Path:
    """A 2-step pretraining run of another architecture on the same data."""
    run = tmp_path_factory.mktemp("other") / "run"
    assert main([*pretrain_args(images, run), "model=r18_0.25x_sk0"]) == 0
    return run


@pytest.mark.fashion_mnist
def test_resume_from_checkpoint_of_another_architecture(images: Path, pretrained: Path, other_arch: Path,
                                                        tmp_path: Path, capsys) -> None:
    run = Path(shutil.copytree(pretrained, tmp_path / "run"))
    # a newer checkpoint that came from another run (another model) lands in this run folder
    shutil.copytree(ckpt.latest_checkpoint(other_arch), run / "checkpoints" / "step-00000003")
    before = checkpoint_snapshot(run)
    rc, err = cli(capsys, *pretrain_args(images, run), "max_steps=4")
    assert_error(rc, err, "r18_0.25x_sk0", "not a pretrain run of r10_0.25x_sk0", "new run_dir")
    assert checkpoint_snapshot(run) == before


@pytest.mark.fashion_mnist
def test_resume_from_same_name_other_shapes(images: Path, pretrained: Path, other_arch: Path,
                                            tmp_path: Path, capsys) -> None:
    run = Path(shutil.copytree(pretrained, tmp_path / "run"))
    # weights of another architecture under this run's own (correct) metadata
    shutil.copy(ckpt.latest_checkpoint(other_arch) / "model.safetensors",
                ckpt.latest_checkpoint(run) / "model.safetensors")
    reseal(ckpt.latest_checkpoint(run))
    before = checkpoint_snapshot(run)
    rc, err = cli(capsys, *pretrain_args(images, run), "max_steps=4")
    assert_error(rc, err, "does not fit this model")
    assert checkpoint_snapshot(run) == before


@pytest.mark.fashion_mnist
def test_finetune_from_checkpoint_of_another_architecture(images: Path, pretrained: Path, other_arch: Path,
                                                          tmp_path: Path, capsys) -> None:
    init = Path(shutil.copytree(ckpt.latest_checkpoint(pretrained), tmp_path / "init"))
    shutil.copy(ckpt.latest_checkpoint(other_arch) / "model.safetensors", init / "model.safetensors")
    reseal(init)
    rc, err = cli(capsys, "finetune", f"init_checkpoint={init}", "dataset=imagefolder", f"data_dir={images}",
                  *TINY, "label_fraction=1.0", "max_steps=1", f"run_dir={tmp_path / 'ft'}")
    assert_error(rc, err, str(init), "does not fit model r10_0.25x_sk0")
    assert not (tmp_path / "ft" / "checkpoints").exists()


@pytest.mark.fashion_mnist
def test_finetune_model_other_than_the_checkpoints(images: Path, pretrained: Path, tmp_path: Path,
                                                   capsys) -> None:
    """The checkpoint's architecture wins: another explicit model= is refused before anything is
    written; the CommonConfig default counts as unset and gets one line naming the model used."""
    args = ["finetune", f"init_checkpoint={pretrained}", "dataset=imagefolder", f"data_dir={images}", *TINY,
            "label_fraction=1.0", "max_steps=1"]
    rc, err = cli(capsys, *args, "model=r18_0.5x_sk0", f"run_dir={tmp_path / 'ft'}")
    assert_error(rc, err, "finetune: model=r18_0.5x_sk0 differs from the checkpoint's model r10_0.25x_sk0",
                 "drop model= or set model=r10_0.25x_sk0")
    assert not (tmp_path / "ft").exists()
    rc, err = cli(capsys, *args, f"run_dir={tmp_path / 'default'}")  # model = the default r18_0.25x_sk0
    assert rc == 0, err
    assert "finetune: using the checkpoint's model r10_0.25x_sk0" in err
    assert ckpt.read_model_meta(tmp_path / "default")["model_name"] == "r10_0.25x_sk0"
    rc, err = cli(capsys, *args, MODEL, f"run_dir={tmp_path / 'same'}")
    assert rc == 0 and "using the checkpoint's model" not in err, err


@pytest.mark.fashion_mnist
def test_checkpoint_from_a_newer_format_version(images: Path, pretrained: Path, tmp_path: Path,
                                                capsys) -> None:
    run = Path(shutil.copytree(pretrained, tmp_path / "run"))
    meta_path = ckpt.latest_checkpoint(run) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = ckpt.FORMAT_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    before = checkpoint_snapshot(run)
    # as the init checkpoint of a fine-tuning run ...
    rc, err = cli(capsys, "finetune", f"init_checkpoint={run}", "dataset=imagefolder", f"data_dir={images}",
                  *TINY, "label_fraction=1.0", "max_steps=1", f"run_dir={tmp_path / 'ft'}")
    assert_error(rc, err, f"format version {ckpt.FORMAT_VERSION + 1}", "upgrade simclrv2")
    # ... and when resuming the run itself
    rc, err = cli(capsys, *pretrain_args(images, run), "max_steps=4")
    assert_error(rc, err, f"format version {ckpt.FORMAT_VERSION + 1}", "upgrade simclrv2")
    assert checkpoint_snapshot(run) == before


class _Payload:
    """Unpickling this runs code: it creates the marker file (what an attacker's file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.fashion_mnist
def test_malicious_pickle_in_checkpoint_is_refused(images: Path, pretrained: Path, tmp_path: Path,
                                                   capsys) -> None:
    run = Path(shutil.copytree(pretrained, tmp_path / "run"))
    marker = tmp_path / "pwned"
    evil = ckpt.latest_checkpoint(run) / "optimizer.pt"
    torch.save({"optimizer": _Payload(marker)}, evil)
    reseal(evil.parent)
    rc, err = cli(capsys, *pretrain_args(images, run), "max_steps=4")
    assert_error(rc, err, str(evil), "refused by the safe loader", "trusted source")
    assert not marker.exists()
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_optimizer_state(evil.parent)
    assert not marker.exists()
    # the file really is malicious: an unsafe load runs its code
    torch.load(evil, weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------------ training failures


@pytest.mark.fashion_mnist
def test_non_finite_loss_from_a_huge_learning_rate(images: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    # PyYAML reads 1e30 as a string; 1.0e+30 is a YAML float
    rc, err = cli(capsys, *pretrain_args(images, run), "max_steps=6", "base_lr=1.0e+30", "warmup_epochs=0",
                  "log_every=1")
    line = assert_error(rc, err, "non-finite", "lower the learning rate (base_lr)")
    # every checkpoint that was written holds finite weights, and none after the failure
    done = steps(run)
    assert done and f"before step {done[-1] + 1}" in line and str(ckpt.latest_checkpoint(run)) in line
    for c in ckpt.list_checkpoints(run):
        assert_loadable(c)


@pytest.mark.fashion_mnist
def test_non_finite_loss_keeps_the_previous_checkpoint(images: Path, pretrained: Path, tmp_path: Path,
                                                       capsys, monkeypatch) -> None:
    import simclrv2.engine.pretrain as pretrain

    run = Path(shutil.copytree(pretrained, tmp_path / "run"))
    before = checkpoint_snapshot(run)
    real = pretrain.nt_xent

    def nan_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(pretrain, "nt_xent", nan_loss)
    rc, err = cli(capsys, *pretrain_args(images, run), "max_steps=4", "log_every=1")
    assert_error(rc, err, "the loss became non-finite before step 3", "step-00000002", "is kept")
    assert checkpoint_snapshot(run) == before  # no new checkpoint, the old ones untouched
    assert_loadable(ckpt.latest_checkpoint(run))


@pytest.mark.fashion_mnist
def test_run_folder_not_writable(images: Path, tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("a regular file, not a folder")
    rc, err = cli(capsys, *pretrain_args(images, afile / "sub"))
    assert_error(rc, err, str(afile / "sub"), "not writable", "run_dir=PATH")
    assert afile.read_text() == "a regular file, not a folder"


@pytest.mark.fashion_mnist
def test_run_folder_without_write_permission(images: Path, tmp_path: Path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permissions do not stop writes (the regular-file case covers this)")
        rc, err = cli(capsys, *pretrain_args(images, locked / "run"))
        assert_error(rc, err, "not writable", "run_dir=PATH")
    finally:
        locked.chmod(0o755)


@pytest.mark.fashion_mnist
@pytest.mark.parametrize("failing", ["model.safetensors", "optimizer.pt"])
def test_disk_full_while_writing_a_checkpoint(images: Path, pretrained: Path, tmp_path: Path, capsys,
                                              monkeypatch, failing: str) -> None:
    run = Path(shutil.copytree(pretrained, tmp_path / "run"))
    before = checkpoint_snapshot(run)

    def full_disk(path) -> OSError:
        Path(path).write_bytes(b"\0" * 100)  # part of the file made it to disk
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if failing == "model.safetensors":
        def save_file(tensors, path, metadata=None):
            raise full_disk(path)
        monkeypatch.setattr(ckpt, "save_file", save_file)
    else:
        def torch_save(obj, path, *args, **kwargs):
            raise full_disk(path)
        monkeypatch.setattr(ckpt.torch, "save", torch_save)

    rc, err = cli(capsys, *pretrain_args(images, run), "max_steps=4")
    assert_error(rc, err, "step-00000003", "No space left on device",
                 f"the last complete checkpoint '{ckpt.latest_checkpoint(run)}' is kept", "free disk space")
    assert checkpoint_snapshot(run) == before  # the earlier checkpoints are untouched ...
    assert_loadable(ckpt.latest_checkpoint(run))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    monkeypatch.undo()  # ... and once there is space again, the same command resumes from them
    rc, err = cli(capsys, *pretrain_args(images, run), "max_steps=4")
    assert rc == 0 and "resuming from" in err and "at step 2" in err
    assert steps(run) == [3, 4]


@pytest.mark.fashion_mnist
def test_run_folder_with_an_incompatible_config(images: Path, pretrained: Path, tmp_path: Path,
                                                capsys) -> None:
    run = Path(shutil.copytree(pretrained, tmp_path / "run"))
    before, config = checkpoint_snapshot(run), (run / "config.yaml").read_bytes()
    rc, err = cli(capsys, *pretrain_args(images, run), "temperature=0.5")
    assert_error(rc, err, str(run), "different config", "temperature: 0.1 -> 0.5", "resume=false")
    assert checkpoint_snapshot(run) == before and (run / "config.yaml").read_bytes() == config
    # starting over on purpose keeps the old run aside instead of overwriting it
    rc, err = cli(capsys, *pretrain_args(images, run), "temperature=0.5", "resume=false")
    assert rc == 0, err
    assert (run / "config.previous.yaml").read_bytes() == config
    assert snapshot(run / "checkpoints.previous") == before
    assert "temperature: 0.5" in (run / "config.yaml").read_text()
    assert steps(run) == [1, 2]


# ------------------------------------------------------------------ reproducibility


@pytest.mark.fashion_mnist
def test_same_seed_gives_bitwise_identical_weights(images: Path, pretrained: Path, tmp_path: Path) -> None:
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert main(pretrain_args(images, tmp_path / name, f"seed={seed}")) == 0
        runs[name] = ckpt.load_tensors(ckpt.latest_checkpoint(tmp_path / name) / "model.safetensors")
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    # the module fixture ran earlier in this process with the same seed: identical as well
    first = ckpt.load_tensors(ckpt.latest_checkpoint(pretrained) / "model.safetensors")
    assert all(torch.equal(first[k], runs["a"][k]) for k in first)
    # and the seed matters (the comparison above can fail)
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])

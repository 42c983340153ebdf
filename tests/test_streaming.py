"""Image folders that stream: views cut from the original files in DataLoader workers (issue 19).

A folder of JPEGs of mixed sizes and aspect ratios, run with ``cache_images=false`` so that every
stage decodes in workers as it would on an ImageNet-sized folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_resume import assert_same_checkpoint, metric_lines

from simclrv2 import checkpoint as ckpt
from simclrv2.cli import main
from simclrv2.data.decode import CropSpec, ViewDataset, crop_box, decode_eval_view, eval_box
from simclrv2.data.folder import ImageFolderDataset
from simclrv2.engine.batches import BatchSource, StepPlan, batch_indices
from simclrv2.serve import folder_batches


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_jpeg_folder(root: Path, per_class: int = 12, classes: int = 2, seed: int = 0) -> Path:
    """root/<split>/<class>/*.jpg: textured images of 40-90 px sides, class = orientation of stripes."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", per_class // 3)):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(40, 91, size=2)
                yy, xx = np.mgrid[0:h, 0:w]
                stripes = np.sin((xx if c == 0 else yy) * rng.uniform(0.3, 0.8)) * 80 + 128
                img = stripes[..., None] * rng.uniform(0.5, 1.0, size=3) + rng.normal(0, 12, (h, w, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Path:
    return make_jpeg_folder(tmp_path_factory.mktemp("jpegs"))


def cli(*argv: str) -> None:
    assert main(list(argv)) == 0, f"simclrv2 {' '.join(argv)} failed"


def stream_args(root: Path, workers: int) -> list[str]:
    return ["dataset=imagefolder", f"data_dir={root}", "image_size=24", "cache_images=false",
            f"num_workers={workers}", "progress=false", "log_every=1"]


def test_crop_box_follows_torchvision_sampling() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = (int(v) for v in rng.integers(20, 500, size=2))
        x0, y0, bw, bh = crop_box(w, h, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= x0 and 0 <= y0 and x0 + bw <= w + 1e-9 and y0 + bh <= h + 1e-9
        assert 0.08 * w * h - 1e-6 <= bw * bh or bw in (w, h * 4 / 3) or bh in (h, w * 3 / 4)
    # an image far wider than 4:3 whose crops never fit falls back to the centred, clamped box
    assert crop_box(400, 10, (0.99, 1.0), (3 / 4, 4 / 3), rng) == pytest.approx((400 / 2 - 10 * 4 / 6, 0, 40 / 3, 10))


def test_views_come_from_the_original_image(tmp_path: Path) -> None:
    """A crop that the old pre-cropped square could not hold: the left border of a wide image."""
    img = np.zeros((40, 160, 3), np.uint8)
    img[:, :20] = 255  # a white band on the left edge, outside the centre 40x40 square
    Image.fromarray(img).save(tmp_path / "wide.png")
    ds_root = tmp_path / "f" / "a"
    ds_root.mkdir(parents=True)
    Image.fromarray(img).save(ds_root / "wide.png")
    folder = ImageFolderDataset(tmp_path / "f", image_size=32)
    data = ViewDataset(folder, 16, CropSpec(16, scale=(0.08, 1.0)), views=1, seed=0)
    seen_white = any((data[(0, step)][0] > 200).float().mean() > 0.1 for step in range(40))
    assert seen_white, "no view reached the left border: crops are not taken from the original image"
    # evaluation: the centre 87.5% of the shorter side, as EvalTransform takes it (whole below 64 px)
    assert eval_box(400, 100) == (156, 6, 88) and eval_box(160, 40) == (60, 0, 40)
    x, used, _ = ViewDataset(folder, 16, None)[(0, -1)]
    assert used == 0 and x.shape == (1, 3, 16, 16) and x.float().mean() < 1  # centre: all black


def test_stream_is_the_same_with_any_number_of_workers(jpegs: Path) -> None:
    folder = ImageFolderDataset(jpegs / "train", image_size=24)
    plan = StepPlan.make(len(folder), 8, 2.0, 0)
    pool = torch.arange(len(folder))
    batches = [(s, batch_indices(pool, plan, 0, s)) for s in range(plan.total_steps)]
    out = {}
    for workers in (0, 2):
        src = BatchSource(folder, torch.device("cpu"), num_workers=workers)
        out[workers] = list(src.train_batches(iter(batches), CropSpec(24), views=2, seed=3))
    assert len(out[0]) == plan.total_steps
    for (x0, y0), (x2, y2) in zip(out[0], out[2]):
        assert x0.shape == (16, 3, 24, 24) and torch.equal(x0, x2) and torch.equal(y0, y2)
    # views 1 and 2 of a step differ, and so do the same image's views at two steps
    x, _ = out[0][0]
    assert not torch.equal(x[:8], x[8:])


@pytest.mark.slow
def test_pretrain_weights_equal_with_0_and_2_workers(tmp_path: Path, jpegs: Path) -> None:
    for workers in (0, 2):
        cli("pretrain", "model=r10_0.25x_sk0", *stream_args(jpegs, workers), "batch_size=8", "max_steps=3",
            "knn_every=0", f"run_dir={tmp_path / str(workers)}")
    assert_same_checkpoint(ckpt.latest_checkpoint(tmp_path / "0"), ckpt.latest_checkpoint(tmp_path / "2"))


@pytest.mark.slow
def test_finetune_killed_mid_epoch_resumes_bitwise(tmp_path: Path, jpegs: Path, capsys) -> None:
    data = stream_args(jpegs, 2)
    pre = tmp_path / "pre"
    cli("pretrain", "model=r10_0.25x_sk0", *data, "batch_size=8", "max_steps=2", "knn_every=0", f"run_dir={pre}")
    # 24 labelled images at batch 8: 3 steps an epoch; 7 steps stop at 4, in the middle of epoch 2
    finetune = ["finetune", f"init_checkpoint={pre}", *data, "label_fraction=1.0", "batch_size=8",
                "epochs=2.34", "min_steps=0", "warmup_epochs=0", "checkpoint_every=2"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    cli(*finetune, f"run_dir={whole}")
    cli(*finetune, f"run_dir={split}", "max_steps=4")
    capsys.readouterr()
    cli(*finetune, f"run_dir={split}")
    assert "finetune: resuming from" in capsys.readouterr().err
    assert_same_checkpoint(ckpt.latest_checkpoint(whole), ckpt.latest_checkpoint(split))
    assert metric_lines(whole) == metric_lines(split)
    assert np.array_equal(np.load(whole / "predictions.npy"), np.load(split / "predictions.npy"))


def test_predict_sees_what_the_stage_evaluation_sees(tmp_path: Path, jpegs: Path) -> None:
    """``predict --images`` and a streaming stage's evaluation: the same pixels, the same logits."""
    data = stream_args(jpegs, 0)
    run = tmp_path / "sup"
    cli("supervised", "model=r10_0.25x_sk0", *data, "label_fraction=1.0", "batch_size=8", "max_steps=2",
        "min_steps=0", f"run_dir={run}")
    test = ImageFolderDataset(jpegs / "test", image_size=24)
    stage_views = torch.cat([ViewDataset(test, 24, None)[(i, -1)][0] for i in range(len(test))])
    served = torch.cat(list(folder_batches(test.paths, 3, 24, 5)))
    assert torch.equal(stage_views.float() / 255, served)
    assert torch.equal(decode_eval_view(test.paths[0], 24), stage_views[0])
    out = tmp_path / "pred.csv"
    cli("predict", "--checkpoint", str(run), "--images", str(jpegs / "test"), "--out", str(out), "--device", "cpu")
    served_pred = np.load(out.with_suffix(".npy")).argmax(1)
    assert served_pred.tolist() == np.load(run / "predictions.npy").tolist()


@pytest.mark.slow
def test_a_corrupt_jpeg_is_replaced_counted_and_training_goes_on(tmp_path: Path, capsys) -> None:
    root = make_jpeg_folder(tmp_path / "data", per_class=6)
    bad = root / "train" / "c0" / "002.jpg"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # a truncated body: the header still reads
    run = tmp_path / "run"
    # 12 images at batch 4 for 3 epochs: the bad file is asked for in every epoch
    cli("pretrain", "model=r10_0.25x_sk0", *stream_args(root, 2), "batch_size=4", "epochs=3", "knn_every=0",
        f"run_dir={run}")
    err = capsys.readouterr().err
    assert "pretrain: 1 unusable image(s) were replaced by the next one" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["bad_images"] == 1 and summary["steps"] == 9
    # the other policy stops at the file, naming it
    assert main(["pretrain", "model=r10_0.25x_sk0", *stream_args(root, 0), "batch_size=4", "epochs=3",
                 "knn_every=0", "skip_bad_images=false", f"run_dir={tmp_path / 'strict'}"]) != 0
    assert str(bad) in capsys.readouterr().err


def test_fractional_epochs_end_with_a_knn_measurement(tmp_path: Path, jpegs: Path) -> None:
    """The budget gives fractional epochs (470.5): the monitor must still measure the final weights."""
    run = tmp_path / "pre"
    # 24 images at batch 8: 3 steps an epoch; 1.6 epochs = 5 steps, the last one mid-epoch
    cli("pretrain", "model=r10_0.25x_sk0", *stream_args(jpegs, 0), "batch_size=8", "epochs=1.6", "knn_every=1",
        f"run_dir={run}")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 5 and "knn_top1" in summary
    knn_steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                 if "knn_top1" in r]
    assert knn_steps == [3, 5]


def test_each_view_can_have_its_own_crop(tmp_path: Path) -> None:
    """A tuple of crop specs gives view v the crop of spec v (distillation's teacher and student
    views): each view is what a one-spec dataset cuts for that view with the same randomness. PNGs,
    so that no JPEG draft (set by the smallest of an image's crops) changes the decoded pixels."""
    rng = np.random.default_rng(0)
    for i in range(4):
        (tmp_path / "c0").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "c0" / f"{i}.png")
    folder = ImageFolderDataset(tmp_path, image_size=24)
    whole, small = CropSpec(24, scale=(0.9, 1.0)), CropSpec(24, scale=(0.08, 0.1))
    both = ViewDataset(folder, 24, (whole, small), views=2, seed=5)
    for key in ((0, 0), (3, 1), (2, 4)):
        x = both[key][0]
        assert torch.equal(x[0], ViewDataset(folder, 24, whole, views=2, seed=5)[key][0][0])
        assert torch.equal(x[1], ViewDataset(folder, 24, small, views=2, seed=5)[key][0][1])
        assert not torch.equal(x[1], ViewDataset(folder, 24, whole, views=2, seed=5)[key][0][1])


@pytest.mark.slow
def test_distill_with_a_strong_student_view_streams(tmp_path: Path, jpegs: Path, monkeypatch) -> None:
    """``student_view=strong`` on a streaming folder: the workers cut the teacher's and the student's
    crops, and the student learns on its own view, not the teacher's."""
    from simclrv2.engine import distill

    data = stream_args(jpegs, 2)
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    cli("pretrain", "model=r10_0.25x_sk0", *data, "batch_size=8", "max_steps=2", "knn_every=0", f"run_dir={pre}")
    cli("finetune", f"init_checkpoint={pre}", *data, "label_fraction=1.0", "batch_size=8", "max_steps=1",
        f"run_dir={ft}")
    views: list[tuple[str, torch.Tensor, bool]] = []
    augment = distill.augment

    def record(aug, x, *args, **kwargs):
        out = augment(aug, x, *args, **kwargs)
        views.append((type(aug).__name__, out, kwargs.get("cropped", False)))
        return out

    monkeypatch.setattr(distill, "augment", record)
    cli("distill", f"teacher_checkpoint={ft}", "model=r10_0.25x_sk0", *data, "batch_size=8", "max_steps=2",
        "warmup_epochs=0", "student_view=strong", f"run_dir={tmp_path / 'ds'}")
    assert [(name, cropped) for name, _, cropped in views] == [("CropFlipAugment", True), ("SimCLRAugment", True)] * 2
    for (_, teacher, _), (_, student, _) in zip(views[0::2], views[1::2]):
        assert teacher.shape == student.shape == (8, 3, 24, 24) and not torch.allclose(teacher, student)
    assert json.loads((tmp_path / "ds" / "metrics.json").read_text())["steps"] == 2

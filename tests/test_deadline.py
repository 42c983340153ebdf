"""Pretraining under ``budget_minutes`` ends by its deadline on a machine that slows down.

The budget sizes pretraining from a measurement in the run's first minute; ``engine.deadline``
shortens it where the pace of the real steps says the pipeline would not end in the budget. The
schedule is checked against a step-by-step reference; the stage runs for real on a small image
folder (a deadline already past cuts it at the first check), and a run resumed after a cut must
follow the shortened schedule to the same weights.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from test_pipeline import tiny_fashion_mnist
from test_recipes import _budget_config
from test_resume import assert_same_checkpoint, make_image_folder, metric_lines

import simclrv2.pipeline as P
from simclrv2 import budget
from simclrv2 import checkpoint as ckpt
from simclrv2.cli import main
from simclrv2.engine.deadline import Deadline, current, pretraining_deadline
from simclrv2.optim import Schedule, lr_at


def reference_rates(peak: float, warmup: int, total: int, cuts: list[tuple[int, int]]) -> list[float]:
    """Step by step: linear warmup, then the cosine's progress moves an equal share of what is left
    toward 1 at each step, the end being the last cut's total once that cut's step is reached."""
    rates, progress, end = [], 0.0, total
    for step in range(total):
        for at, new_end in cuts:
            if step == at:
                end = new_end
        if step >= end:
            break
        if step < warmup:
            rates.append(peak * step / warmup)
            continue
        rates.append(peak * 0.5 * (1 + math.cos(math.pi * progress)))
        progress += (1 - progress) / (end - step)
    return rates


def test_a_shortened_schedule_goes_on_from_where_it_was_to_zero_at_the_new_end():
    plain = Schedule(2.0, 5, 100)
    assert [plain(s) for s in range(100)] == [lr_at(s, 100, 5, 2.0) for s in range(100)]
    cut = plain.shorten(40, 70).shorten(60, 64)
    want = reference_rates(2.0, 5, 100, [(40, 70), (60, 64)])
    assert len(want) == 64 and cut.end == 64
    assert [cut(s) for s in range(64)] == pytest.approx(want, abs=1e-9)
    assert [cut(s) for s in range(40)] == [plain(s) for s in range(40)]  # the same rates before the cut
    assert cut(40) == pytest.approx(plain(40)) and cut(64) == 0.0  # no jump, and 0 at the new end
    for bad in ((3, 50), (40, 100), (40, 40)):  # in the warmup, not shorter, no step left
        with pytest.raises(ValueError):
            plain.shorten(*bad)


def test_the_deadline_keeps_the_steps_that_end_in_time():
    # 10 steps an epoch, the budget measured 10 s an epoch and 100 s for the later stages
    d = Deadline(end=1000.0, epoch_seconds=10.0, after_seconds=100.0)
    assert d.steps_that_fit(100, 500, 1.0, 10, now=500.0) == 500  # on pace: 400 s + 100 s end at 1000
    assert d.steps_that_fit(100, 500, 1.0, 10, now=504.0) == 500  # 4 steps over: under half an epoch
    assert d.steps_that_fit(100, 500, 1.0, 10, now=505.0) == 495
    # 1.5x slower: 1.5 x 100 s for the later stages leaves 350 s, 233 steps at 1.5 s
    assert d.steps_that_fit(100, 500, 1.5, 10, now=500.0) == 100 + 233
    assert d.steps_that_fit(100, 2000, 0.5, 10, now=500.0) == 100 + 800  # never assumed faster later
    assert d.steps_that_fit(100, 500, 1.5, 10, now=2000.0) == 101  # past the end: one more step


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("deadline"))


def pretrain(images: Path, run_dir: Path, deadline: Deadline | None, *extra: str) -> None:
    # 48 images at batch 8: 6 steps an epoch, 4 epochs = 24 steps, a warmup of 3
    args = ["pretrain", "model=r10_0.25x_sk0", "dataset=imagefolder", f"data_dir={images}", "image_size=16",
            "num_workers=0", "progress=false", "batch_size=8", "epochs=4", "warmup_epochs=0.5", "knn_every=1",
            "log_every=1", "checkpoint_every=3", f"run_dir={run_dir}", *extra]
    with pretraining_deadline(deadline):
        assert main(args) == 0
    assert current() is None


@pytest.fixture
def one_thread():
    # one intra-op thread: bitwise comparisons within a process (as in test_resume)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_pretraining_past_its_deadline_ends_early_and_resumes_on_the_shortened_schedule(images, tmp_path, capsys,
                                                                                        one_thread):
    past = Deadline(end=time.time() - 1, epoch_seconds=1.0, after_seconds=0.0)
    cut = tmp_path / "cut"
    pretrain(images, cut, past)
    # asked first at the end of epoch 1 (a tenth of the 24 steps has run): one more step
    assert "ending at epoch 1.17 instead of 4" in capsys.readouterr().err
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["steps"] == 7 and summary["shortened"] == {"planned_epochs": 4.0, "epochs": 7 / 6, "cuts": [[6, 7]]}
    lines = [r for r in metric_lines(cut) if "lr" in r]  # step k's record holds step k - 1's rate
    assert [r["step"] for r in lines] == list(range(1, 8))
    planned = Schedule(lines[3]["lr"], 3, 24)  # the rate peaks at step 3, where the warmup ends
    assert [r["lr"] for r in lines] == pytest.approx([planned.shorten(6, 7)(s) for s in range(7)])
    assert lines[6]["lr"] == pytest.approx(planned(6))  # no jump at the cut; 0 would come at step 7
    knn_epochs = [r["epoch"] for r in metric_lines(cut) if "knn_top1" in r]
    assert knn_epochs == [1, 7 / 6]  # the monitor's last measure is at the new end
    # a run stopped at the cut and resumed without any deadline takes the same last step
    resumed = tmp_path / "resumed"
    shutil.copytree(cut, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000007")
    (resumed / "summary.json").unlink()
    pretrain(images, resumed, None, "max_steps=6")  # a cap below the cut's end still holds
    assert ckpt.latest_checkpoint(resumed).name == "step-00000006"
    pretrain(images, resumed, None)
    assert json.loads((resumed / "summary.json").read_text())["resumed_at"] == 6  # the budget's pace skips it
    assert "resumed_at" not in summary
    assert_same_checkpoint(ckpt.latest_checkpoint(cut), ckpt.latest_checkpoint(resumed))
    # a deadline far away changes nothing
    far, none = tmp_path / "far", tmp_path / "none"
    pretrain(images, far, Deadline(end=time.time() + 3600, epoch_seconds=100.0, after_seconds=0.0))
    pretrain(images, none, None)
    assert_same_checkpoint(ckpt.latest_checkpoint(far), ckpt.latest_checkpoint(none))
    assert ckpt.latest_checkpoint(far).name == "step-00000024"


def test_the_pipeline_gives_pretraining_alone_the_budget_deadline(tmp_path, monkeypatch):
    """Half the budget's margin past its planned end, with the budget's own estimates."""
    data = tiny_fashion_mnist(tmp_path / "fmnist")
    monkeypatch.setattr(budget._StepTimer, "pretrain_step", lambda self, cfg, batch: 0.5)
    monkeypatch.setattr(budget._StepTimer, "classifier_step", lambda self, cfg, batch, teacher_cfg=None: 0.01)
    monkeypatch.setattr(budget._StepTimer, "per_image", lambda self, cfg: 1e-4)
    seen: dict[str, Deadline | None] = {}

    class _Stop(Exception):
        pass

    def run_stage(plan, upstream=None, test=True):
        seen[plan.stage] = current()
        if plan.stage != "pretrain":
            raise _Stop
        Path(plan.cfg.run_dir).mkdir(parents=True)
        (Path(plan.cfg.run_dir) / "done.json").write_text("{}")  # what the next stage's fingerprint reads
        return {"steps": 1}, 1.0, False

    monkeypatch.setattr(P, "run_stage", run_stage)
    t0 = time.time()
    with pytest.raises(_Stop):
        P.run_pipeline(_budget_config(data, tmp_path / "run", minutes=10))
    rec = json.loads((tmp_path / "run" / "budget.json").read_text())
    d = seen["pretrain"]
    assert d.epoch_seconds == rec["epoch_seconds"] and d.after_seconds == rec["other_seconds"]
    assert t0 + 600 * (1 - budget.MARGIN / 2) <= d.end <= time.time() + 600 * (1 - budget.MARGIN / 2)
    assert len(seen) == 2 and next(v for k, v in seen.items() if k != "pretrain") is None


def test_the_report_says_that_pretraining_ended_before_the_budget_planned(tmp_path):
    from simclrv2 import config as C
    from simclrv2.pipeline import PipelineConfig
    from simclrv2.report import write_report

    out = {"config_hash": "x", "machine": "test", "total_seconds": 1.0, "stages": {}, "results": [],
           "pretrain": {"epochs": 11.5, "planned_epochs": 16.5, "steps": 1219, "knn_top1": 80.0},
           "budget": {"budget_minutes": 15, "epoch_seconds": 23.4, "other_seconds": 392.0, "epochs": 16.5}}
    report = write_report(tmp_path, out, C.build(PipelineConfig, {"plots": False})).read_text()
    assert ("Pretraining: 11.5 epochs, 1219 steps, kNN monitor 80.00% at the end, chosen to fit a 15-minute "
            "budget (estimates on this machine: 23.4 s an epoch, 392 s for the other stages); the budget had "
            "planned 16.5 epochs, and pretraining ended early because this machine ran slower than measured "
            "at the start.") in report


def test_the_later_stages_get_the_share_of_their_steps_that_fills_the_time_left():
    """budget.regrown_scale against the arithmetic by hand: a 10-minute budget plans to end at
    528 s (the margin unplanned); the later stages take 40 s plus 400 s of training at full length."""
    rec = {"budget_minutes": 10, "other_scale": 0.5, "other_train_seconds": 400.0, "other_fixed_seconds": 40.0}
    assert 600 * (1 - budget.MARGIN) == pytest.approx(528)
    assert budget.regrown_scale(rec, 0.0, 200.0, 1.0) == pytest.approx((328 - 40) / 400)  # 0.72
    assert budget.regrown_scale(rec, 1000.0, 1200.0, 0.8) == pytest.approx((328 / 0.8 - 40) / 400)  # 0.925
    assert budget.regrown_scale(rec, 0.0, 100.0, 0.5) == 1.0  # never past the configured steps
    assert budget.regrown_scale(rec, 0.0, 300.0, 1.0) is None  # (228 - 40) / 400 is below the planned 0.5
    assert budget.regrown_scale(dict(rec, other_scale=1.0), 0.0, 100.0, 0.5) is None  # nothing was shrunk
    assert budget.regrown_scale({"budget_minutes": 10, "other_scale": 0.5}, 0.0, 100.0, 0.5) is None  # old record


def test_the_later_stages_take_the_time_that_a_fast_pretraining_left(tmp_path, monkeypatch, capsys):
    """A budget that shrank the stages after pretraining, on a machine measured slower than
    pretraining then ran: those stages are planned again at the end of pretraining with the steps
    that the time left affords, the choice is pinned in budget.json and pipeline.yaml, and a rerun
    (pretraining done before) repeats it. Without a pin a rerun keeps the budget's first scale, as
    does a run whose pretraining resumed (its seconds are not its epochs')."""
    from simclrv2 import config as C

    data = tiny_fashion_mnist(tmp_path / "fmnist")
    monkeypatch.setattr(budget._StepTimer, "pretrain_step", lambda self, cfg, batch: 0.5)
    monkeypatch.setattr(budget._StepTimer, "classifier_step", lambda self, cfg, batch, teacher_cfg=None: 0.05)
    monkeypatch.setattr(budget._StepTimer, "per_image", lambda self, cfg: 1e-4)
    seen: list = []

    class _Stop(Exception):
        pass

    def fake(pace: float, skipped: bool, **more):
        def run_stage(plan, upstream=None, test=True):
            if plan.stage != "pretrain":
                seen.append(plan.cfg)
                raise _Stop
            Path(plan.cfg.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(plan.cfg.run_dir) / "done.json").write_text("{}")
            rec = json.loads((tmp_path / "run" / "budget.json").read_text())
            return {"steps": 1, **more}, pace * plan.cfg.epochs * rec["epoch_seconds"], skipped
        return run_stage

    pc = _budget_config(data, tmp_path / "run", minutes=2)
    configured = pc.finetune["min_steps"]
    monkeypatch.setattr(P, "run_stage", fake(0.25, False))
    with pytest.raises(_Stop):
        P.run_pipeline(pc)
    rec = json.loads((tmp_path / "run" / "budget.json").read_text())
    assert budget.MIN_SCALE < rec["other_scale"] < 1 and rec["regrown_scale"] == 1.0
    assert "the later stages get 100% of their steps, not" in capsys.readouterr().out
    assert seen[-1].min_steps == configured  # the stage after pretraining, at its configured length
    pinned = C.load_yaml(tmp_path / "run" / "pipeline.yaml")
    assert pinned["finetune"]["min_steps"] == configured and pinned["pretrain"]["epochs"] == rec["epochs"]
    # a rerun: pretraining done before (no time to measure a pace by), the pin repeats the steps
    monkeypatch.setattr(budget, "_measure_and_fit", lambda *args: pytest.fail("measured again"))
    monkeypatch.setattr(P, "run_stage", fake(0.0, True))
    with pytest.raises(_Stop):
        P.run_pipeline(pc)
    assert seen[-1].min_steps == configured
    del rec["regrown_scale"]
    (tmp_path / "run" / "budget.json").write_text(json.dumps(rec))
    with pytest.raises(_Stop):
        P.run_pipeline(pc)
    assert seen[-1].min_steps == round(configured * rec["other_scale"])
    assert "regrown_scale" not in json.loads((tmp_path / "run" / "budget.json").read_text())
    # nor does a resumed pretraining, however fast: its seconds cover only the steps after the resume
    monkeypatch.setattr(P, "run_stage", fake(0.25, False, resumed_at=5))
    with pytest.raises(_Stop):
        P.run_pipeline(pc)
    assert seen[-1].min_steps == round(configured * rec["other_scale"])
    assert "regrown_scale" not in json.loads((tmp_path / "run" / "budget.json").read_text())


def test_the_report_says_what_share_of_their_steps_the_later_stages_trained(tmp_path):
    from simclrv2 import config as C
    from simclrv2.pipeline import PipelineConfig
    from simclrv2.report import write_report

    pre = {"epochs": 11.5, "steps": 1208, "knn_top1": 78.7}
    rec = {"budget_minutes": 15, "epoch_seconds": 33.8, "other_seconds": 391.0, "epochs": 11.5, "other_scale": 0.4087}
    texts = []
    for extra in ({}, {"regrown_scale": 0.56}):
        out = {"config_hash": "x", "machine": "test", "total_seconds": 1.0, "stages": {}, "results": [],
               "pretrain": pre, "budget": dict(rec, **extra)}
        texts.append(write_report(tmp_path, out, C.build(PipelineConfig, {"plots": False})).read_text())
    assert "; the later stages trained 41% of their configured steps, as the budget planned." in texts[0]
    assert ("; the budget gave the later stages 41% of their configured steps, and 56% once pretraining had "
            "ended ahead of its estimate.") in texts[1]

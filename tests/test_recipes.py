"""Issue 18: recipes that hold on any dataset.

- the optimizer each stage builds puts the classifier, biases and normalisation parameters where
  METHOD.md 4.1 puts them, whatever wrapper the stage trains through;
- stage lengths follow the data: a 40-image labelled subset and a small unlabeled pool still get
  ``min_steps``;
- the validation split is disjoint from the labelled subsets, the unlabeled pool and the test
  split, and the learning-rate search chooses on it;
- ``budget_minutes`` sizes pretraining and a rerun repeats the choice;
- the report warns about results at chance, students below teachers and fine-tuning below the
  baseline.

Real stages on 2,000 real Fashion-MNIST training images (``test_pipeline.tiny_fashion_mnist``).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from test_pipeline import tiny_fashion_mnist
from test_resume import make_image_folder
from torch import nn

from simclrv2 import budget
from simclrv2 import checkpoint as ckpt
from simclrv2 import config as C
from simclrv2.cli import main
from simclrv2.config import DistillConfig, FinetuneConfig, PretrainConfig, SupervisedConfig, load_config
from simclrv2.data.builtin import load_fashion_mnist
from simclrv2.engine import distill, finetune, pretrain, supervised
from simclrv2.engine.splits import labelled_indices, training_pool, validation_indices
from simclrv2.models.heads import SupervisedHead
from simclrv2.pipeline import PipelineConfig, plan_stages
from simclrv2.report import warnings, write_report

MODEL = "r10_0.25x_sk0"
DEMO = Path(__file__).resolve().parent.parent / "configs" / "fashion_mnist_demo.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_fashion_mnist(tmp_path_factory.mktemp("recipes") / "fmnist")


def _common(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"model={MODEL}", "dataset=fashion_mnist", f"data_dir={data}", "stem=imagenet", "progress=false",
            "device=cpu", "seed=0", "val_fraction=0.1", f"run_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def encoder(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("encoder")
    assert main(["pretrain", *_common(data, run), "max_steps=1", "knn_every=0", "batch_size=64"]) == 0
    return run


@pytest.fixture(scope="module")
def teacher(data, encoder, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("teacher")
    assert main(["finetune", *_common(data, run), f"init_checkpoint={encoder}", "max_steps=1",
                 "label_fraction=0.05"]) == 0
    return run


class _Built(Exception):
    """Raised by the patched step loop: the stage has built its parts, nothing needs to train."""


def built_job(monkeypatch, stage, cfg) -> SimpleNamespace:
    """What ``stage.run(cfg)`` hands to its step loop (``train_classifier`` for fine-tuning and the
    supervised baseline, else ``stage._train``): the model the checkpoint holds, its optimizer, the
    pool of images, the step plan and the schedule."""
    jobs: list[SimpleNamespace] = []
    name = "train_classifier" if hasattr(stage, "train_classifier") else "_train"
    loop = getattr(stage, name)
    loop = getattr(loop, "__wrapped__", loop)  # the real loop, also when already patched

    def capture(*args, **kwargs) -> None:
        a = inspect.signature(loop).bind(*args, **kwargs).arguments
        if "p" in a:  # pretraining keeps its parts together
            a.update(model=a["p"].model, optimizer=a["p"].optimizer)
        model = a["student"] if "student" in a else a["model"]
        jobs.append(SimpleNamespace(model=model, optimizer=a["optimizer"], pool=a["pool"], plan=a["plan"],
                                    schedule=a["schedule"]))
        raise _Built

    capture.__wrapped__ = loop
    monkeypatch.setattr(stage, name, capture)
    with pytest.raises(_Built):
        stage.run(cfg)
    return jobs[0]


def _stage_cfgs(data: Path, tmp: Path, encoder: Path, teacher: Path) -> dict[str, tuple]:
    return {
        "pretrain": (pretrain, load_config(PretrainConfig, None, _common(data, tmp / "p"))),
        "finetune": (finetune, load_config(
            FinetuneConfig, None, _common(data, tmp / "f", f"init_checkpoint={encoder}", "label_fraction=0.02"))),
        "supervised": (supervised, load_config(
            SupervisedConfig, None, _common(data, tmp / "s", "label_fraction=0.02"))),
        "distill": (distill, load_config(
            DistillConfig, None, _common(data, tmp / "d", f"teacher_checkpoint={teacher}", "label_fraction=0.02"))),
    }


# ------------------------------------------------------------------ parameter groups (METHOD.md 4.1)


@pytest.mark.slow
@pytest.mark.fashion_mnist
@pytest.mark.parametrize("stage", ["pretrain", "finetune", "supervised", "distill"])
def test_stage_optimizer_groups(stage, data, encoder, teacher, tmp_path, monkeypatch):
    """The optimizer a stage really builds: the classifier's weight has no trust ratio and an L2
    term, biases and BN have neither, and only conv/linear weights are adapted. Before the fix,
    the stages' wrapper named the head 'model.classifier.weight', which the name rule missed."""
    stage_fn, cfg = _stage_cfgs(data, tmp_path, encoder, teacher)[stage]
    job = built_job(monkeypatch, stage_fn, cfg)
    groups = job.optimizer.param_groups
    group_of = {id(p): (g["lars_exclude"], g["weight_decay"]) for g in groups for p in g["params"]}
    model = job.model
    wd = cfg.weight_decay
    norms = [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) for p in m.parameters()]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    assert norms and biases
    for p in norms + biases:
        if p.requires_grad:
            assert group_of[id(p)] == (True, 0.0)
    if stage != "pretrain":
        assert isinstance(model.classifier, SupervisedHead)
        assert group_of[id(model.classifier.weight)] == (True, wd)
    adapted = [p for g in groups if not g["lars_exclude"] for p in g["params"]]
    assert adapted and all(p.ndim >= 2 for p in adapted)
    assert all(g["weight_decay"] == wd for g in groups if not g["lars_exclude"])


# ------------------------------------------------------------------ lengths that follow the data


@pytest.mark.fashion_mnist
def test_small_data_gets_min_steps(data, encoder, teacher, tmp_path, monkeypatch):
    """The demo config's stages on a 2,000-image training split: a 40-image labelled subset and the
    1,800-image unlabeled pool (after the validation split) each get at least ``min_steps``,
    where the epochs alone would give 1 step (40 images) or a handful (1,800 at batch 256)."""
    values = yaml.safe_load(DEMO.read_text())
    values.update(run_dir=str(tmp_path / "run"), label_fractions=[0.02], budget_minutes=0, lr_search=[])
    values["common"]["data_dir"] = str(data)
    plans = {p.name: p for p in plan_stages(C.build(PipelineConfig, values))}
    runs = {"finetune_2pct": finetune, "supervised_2pct": supervised,
            "distill_self_2pct": distill, "distill_small_2pct": distill}
    for name, stage_fn in runs.items():
        cfg = plans[name].cfg
        if stage_fn is finetune:
            cfg = dataclasses.replace(cfg, init_checkpoint=str(encoder))
        if stage_fn is distill:  # the self-distilled student starts from the pipeline's encoder
            cfg = dataclasses.replace(cfg, teacher_checkpoint=str(teacher),
                                      student_init=str(encoder) if cfg.student_init else "")
        job = built_job(monkeypatch, stage_fn, cfg)
        pool = 40 if stage_fn is not distill else 1800
        assert len(job.pool) == pool, name
        by_epochs = math.ceil(cfg.epochs * max(1, pool // min(cfg.batch_size, pool)))
        assert cfg.min_steps > by_epochs, f"{name}: the test should exercise min_steps"
        assert job.plan.total_steps == cfg.min_steps, name
        assert job.schedule.warmup_steps <= job.plan.total_steps // 2


# ------------------------------------------------------------------ the validation split


@pytest.mark.fashion_mnist
def test_validation_split_is_disjoint(data, encoder, teacher, tmp_path, monkeypatch):
    """The validation split never trains anything: not in a labelled subset (any fraction), not in
    the unlabeled pool of pretraining or distillation; the label fractions keep their size."""
    cfgs = _stage_cfgs(data, tmp_path, encoder, teacher)
    ds = load_fashion_mnist("train", data_dir=str(data))
    val = set(validation_indices(cfgs["finetune"][1], ds).tolist())
    assert len(val) == 200 and np.bincount(ds.labels[sorted(val)].numpy()).tolist() == [20] * 10
    for fraction in (0.005, 0.02, 0.1, 0.5, 1.0):
        cfg = dataclasses.replace(cfgs["finetune"][1], label_fraction=fraction)
        lab = labelled_indices(cfg, ds, None)
        assert not val & set(lab.tolist())
        if fraction < 1:  # the count comes from the whole class: 200 images a class
            assert len(lab) == 10 * max(1, math.floor(fraction * 200 + 0.5))
    assert not val & set(training_pool(cfgs["pretrain"][1], ds).tolist())
    for stage in ("pretrain", "finetune", "supervised", "distill"):
        job = built_job(monkeypatch, *cfgs[stage])
        assert not val & set(job.pool.tolist()), stage
        assert len(job.pool) == (1800 if stage in ("pretrain", "distill") else 40)


@pytest.fixture(scope="module")
def searched(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("search") / "run"
    values = {
        "run_dir": str(run), "label_fractions": [0.02], "self_distill": True, "small_student": "",
        "embedding_points": 0, "plots": False, "lr_search": [0.5, 2.0],
        "common": {"dataset": "fashion_mnist", "data_dir": str(data), "model": MODEL, "stem": "imagenet",
                   "progress": False, "batch_size": 64, "val_fraction": 0.1},
        "pretrain": {"epochs": 1, "knn_every": 1, "knn_train_size": 500, "knn_test_size": 100},
        "finetune": {"epochs": 1, "min_steps": 6, "base_lr": 0.05},
        "supervised": {"epochs": 1, "min_steps": 6, "base_lr": 0.1},
        "distill_self": {"epochs": 0.1, "min_steps": 3},
        "linear_eval": {"epochs": 2},
    }
    config = run.parent / "pipeline.yaml"
    config.write_text(yaml.safe_dump(values))
    assert main(["pipeline", "--config", str(config)]) == 0
    return run


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_lr_search_chooses_on_validation(searched):
    """Each arm trains once per factor, and once more a grid step beyond the better rate where the
    two did not tie; the best validation top-1 is chosen and only it is evaluated on the test
    split; its students learn from the chosen teacher."""
    from simclrv2.pipeline import at_edge

    out = json.loads((searched / "results.json").read_text())
    rows = {r["method"]: r for r in out["results"]}
    for method, base in (("finetune", 0.05), ("supervised", 0.1)):
        row = rows[method]
        scores = {float(k): v for k, v in row["lr_search"].items()}
        low, high = scores[base * 0.5], scores[base * 2.0]
        beyond = [] if low == high else [base * 8.0] if high > low else [base * 0.125]
        assert sorted(scores) == pytest.approx(sorted([base * 0.5, base * 2.0] + beyond))
        assert row["lr_extended"] == bool(beyond)
        best = max(scores.values())
        assert row["base_lr"] == pytest.approx(min(lr for lr, v in scores.items() if v == best))
        assert row["val_top1"] == best and row["lr_at_edge"] == at_edge(scores)
        stage_dir = searched / f"{method}_2pct"
        for lr in scores:
            metrics = json.loads((stage_dir / f"lr_{lr:.4g}" / "metrics.json").read_text())
            assert metrics["val_top1"] == scores[lr]
            assert ("top1" in metrics) == (lr == row["base_lr"]), "the test split is for the chosen run only"
        assert row["run_dir"] == str(stage_dir / f"lr_{row['base_lr']:.4g}")
        # the stage folder stands for the chosen run
        assert ckpt.resolve_checkpoint(stage_dir) == ckpt.latest_checkpoint(row["run_dir"])
    student = yaml.safe_load((searched / "distill_self_2pct" / "config.yaml").read_text())
    assert student["teacher_checkpoint"] == rows["finetune"]["run_dir"]
    assert rows["distill-self"]["teacher_top1"] == rows["finetune"]["top1"]
    report = (searched / "report.md").read_text()
    assert "## Learning rates chosen on the validation split" in report


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_lr_search_rerun_skips_everything(searched, capsys):
    config = searched.parent / "pipeline.yaml"
    before = json.loads((searched / "results.json").read_text())
    assert main(["pipeline", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped, done before") == 6  # every stage, searches included
    after = json.loads((searched / "results.json").read_text())
    assert [r["top1"] for r in after["results"]] == [r["top1"] for r in before["results"]]


def test_lr_search_needs_a_validation_split():
    pc = C.build(PipelineConfig, {"lr_search": [1.0, 2.0]})
    with pytest.raises(C.ConfigError, match="val_fraction"):
        plan_stages(pc)


# ------------------------------------------------------------------ the time budget


def _budget_config(data: Path, run: Path, minutes: float) -> PipelineConfig:
    values = yaml.safe_load(DEMO.read_text())
    values.update(run_dir=str(run), label_fractions=[0.02], budget_minutes=minutes, embedding_points=0)
    values["common"].update(data_dir=str(data), model=MODEL)
    values["small_student"] = ""
    return C.build(PipelineConfig, values)


@pytest.mark.fashion_mnist
def test_budget_fills_what_the_other_stages_leave(data, tmp_path, monkeypatch):
    """With step times fixed, the epochs are the ones that fill the rest of the budget (in half
    epochs), rank 0's choice is stored, and a rerun reuses it without measuring again."""
    monkeypatch.setattr(budget._StepTimer, "pretrain_step", lambda self, cfg, batch: 0.5)
    monkeypatch.setattr(budget._StepTimer, "classifier_step", lambda self, cfg, batch, teacher_cfg=None: 0.01)
    monkeypatch.setattr(budget._StepTimer, "per_image", lambda self, cfg: 1e-4)
    pc = _budget_config(data, tmp_path / "run", minutes=2)
    rec = budget.fit_pretraining(pc)
    # 1,800 pool images at batch 512: 3 steps an epoch of 0.5 s, plus the kNN monitor per 5 epochs
    assert rec["epoch_seconds"] == pytest.approx(3 * 0.5 + (1800 + 200) * 1e-4 / 5, abs=0.01)
    left = 2 * 60 * (1 - budget.MARGIN) - rec["other_seconds"] - rec["measure_seconds"]
    assert rec["epochs"] == math.floor(2 * left / rec["epoch_seconds"]) / 2
    # finetune and supervised: 3 candidates x 300 steps each, the distillation 300 steps
    assert rec["stage_estimates"]["finetune_2pct"] >= 3 * 300 * 0.01
    monkeypatch.setattr(budget, "_measure_and_fit", lambda *args: pytest.fail("measured again"))
    assert budget.fit_pretraining(pc)["epochs"] == rec["epochs"]


@pytest.mark.fashion_mnist
@pytest.mark.parametrize("rounds", [1, 2])
def test_budget_times_every_distillation_round(data, tmp_path, monkeypatch, rounds):
    """A distillation of two rounds trains twice and is scored twice: the budget counts both, and
    ``rounds=0`` (auto) counts the two that the strong view of many passes takes."""
    monkeypatch.setattr(budget._StepTimer, "pretrain_step", lambda self, cfg, batch: 0.5)
    monkeypatch.setattr(budget._StepTimer, "classifier_step", lambda self, cfg, batch, teacher_cfg=None: 0.01)
    monkeypatch.setattr(budget._StepTimer, "per_image", lambda self, cfg: 1e-4)
    measure = budget._Sizes.__init__

    # opening the splits and reading images are fixed too: they are measured, and the first opening
    # (cold caches) is the slowest, which could make the one-round estimate more than half the two-round one
    def fixed_io(self, cfg):
        measure(self, cfg)
        self.open, self.load = 0.05, 1e-5

    monkeypatch.setattr(budget._Sizes, "__init__", fixed_io)
    estimates = {}
    for value in (1, rounds, 0):
        pc = _budget_config(data, tmp_path / f"run{value}", minutes=2)
        pc.distill_self.update(rounds=value, student_view="auto")
        estimates[value] = budget.fit_pretraining(pc)["stage_estimates"]
    # 1,800 pool images, the demo's 600 steps of 256: 85 passes, the strong view, so auto takes two rounds
    assert estimates[rounds]["distill_self_2pct"] == pytest.approx(rounds * estimates[1]["distill_self_2pct"], rel=0.05)
    assert estimates[0]["distill_self_2pct"] == pytest.approx(2 * estimates[1]["distill_self_2pct"], rel=0.05)
    assert estimates[rounds]["finetune_2pct"] == pytest.approx(estimates[1]["finetune_2pct"], rel=0.05)


@pytest.mark.fashion_mnist
def test_budget_shrinks_the_other_stages_on_a_slow_machine(data, tmp_path, monkeypatch):
    """When the stages after pretraining would take more than OTHER_SHARE of the budget, their
    steps shrink by one factor (min_steps and epochs), so a slow machine still finishes."""
    monkeypatch.setattr(budget._StepTimer, "pretrain_step", lambda self, cfg, batch: 0.5)
    monkeypatch.setattr(budget._StepTimer, "classifier_step", lambda self, cfg, batch, teacher_cfg=None: 0.05)
    monkeypatch.setattr(budget._StepTimer, "per_image", lambda self, cfg: 1e-4)
    pc = _budget_config(data, tmp_path / "run", minutes=2)
    rec = budget.fit_pretraining(pc)
    scale = rec["other_scale"]
    assert budget.MIN_SCALE < scale < 1
    planned = 2 * 60 * (1 - budget.MARGIN)
    assert rec["other_seconds"] == pytest.approx(budget.OTHER_SHARE * planned, rel=0.05)
    scaled = budget.scale_stages(pc, scale)
    plans = {p.name: p.cfg for p in plan_stages(dataclasses.replace(scaled, budget_minutes=0))}
    for name, section in (("finetune_2pct", pc.finetune), ("supervised_2pct", pc.supervised),
                          ("distill_self_2pct", pc.distill_self)):
        assert plans[name].min_steps == round(section["min_steps"] * scale)
        assert plans[name].epochs == pytest.approx(section["epochs"] * scale)
    assert budget.scale_stages(pc, 1.0) is pc


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_budget_trains_smaller_images_rather_than_fewer_steps(tmp_path, monkeypatch, capsys):
    """Where the images' own size would shrink the other stages' steps, the budget picks the size at
    which they fit (not below 32 px) and pins it in pipeline.yaml; an image_size the user set is
    kept, and the steps shrink instead."""
    import simclrv2.pipeline as P

    root = make_image_folder(tmp_path / "big", n_train=60, n_test=10, side=64)
    # a step costs in proportion to its pixels: at 64 px about half the steps would fit
    monkeypatch.setattr(budget._StepTimer, "pretrain_step", lambda self, cfg, batch:
                        0.2 * (self.image_size(cfg) / 32) ** 2)
    monkeypatch.setattr(budget._StepTimer, "classifier_step", lambda self, cfg, batch, teacher_cfg=None:
                        0.06 * (self.image_size(cfg) / 32) ** 2)
    monkeypatch.setattr(budget._StepTimer, "per_image", lambda self, cfg: 1e-4)
    values = yaml.safe_load(DEMO.read_text())
    values.update(run_dir=str(tmp_path / "run"), label_fractions=[0.1], budget_minutes=12, embedding_points=0,
                  small_student="")
    values["common"].update(dataset="imagefolder", data_dir=str(root), model=MODEL)
    pc = C.build(PipelineConfig, values)
    rec = budget.fit_pretraining(pc)
    assert rec["native_image_size"] == 64 and budget.SMALLEST_AUTO_SIZE <= rec["image_size"] < 64
    assert rec["other_scale"] == 1.0 and rec["epochs"] >= 1
    assert "training at" in capsys.readouterr().out

    class _Stop(Exception):
        pass

    monkeypatch.setattr(P, "run_stage", lambda *a, **k: (_ for _ in ()).throw(_Stop()))
    with pytest.raises(_Stop):
        P.run_pipeline(pc)
    written = yaml.safe_load((tmp_path / "run" / "pipeline.yaml").read_text())
    assert written["common"]["image_size"] == rec["image_size"]

    values["common"]["image_size"] = 64  # the user's choice stands
    values["run_dir"] = str(tmp_path / "kept")
    kept = budget.fit_pretraining(C.build(PipelineConfig, values))
    assert kept["image_size"] == 64 and "native_image_size" not in kept and kept["other_scale"] < 1


@pytest.mark.fashion_mnist
def test_budget_too_small_is_one_line(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(budget._StepTimer, "pretrain_step", lambda self, cfg, batch: 0.5)
    monkeypatch.setattr(budget._StepTimer, "classifier_step", lambda self, cfg, batch, teacher_cfg=None: 0.5)
    monkeypatch.setattr(budget._StepTimer, "per_image", lambda self, cfg: 1e-3)
    pc = _budget_config(data, tmp_path / "run", minutes=1)
    with pytest.raises(C.ConfigError, match="budget_minutes=1 is too small here"):
        budget.fit_pretraining(pc)


@pytest.mark.fashion_mnist
@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_budget_times_the_pretraining_stage_own_step(data, tmp_path, monkeypatch, precision):
    """Issue 33: the budget timed a stand-in for pretraining (always LARS, no autocast), so neither
    precision=bf16 nor another optimizer changed what it measured. Now it times engine.pretrain's
    own train_step, built from the pipeline's pretrain config: its optimizer, at lr 0, under the
    autocast of the precision the stage trains in (auto: as the stage chooses it, here bf16, without
    writing the stage's precision.json), and leaves the global random generators as they were."""
    from simclrv2.engine import device as engine_device

    steps, autocasts = [], []
    stage_step, stage_autocast = pretrain.train_step, pretrain.autocast

    def counted(cfg, p, views, y, lr, scaler):
        steps.append((lr, type(p.optimizer).__name__))
        return stage_step(cfg, p, views, y, lr, scaler)

    def recorded(device, prec):
        autocasts.append(prec)
        return stage_autocast(device, prec)

    monkeypatch.setattr(pretrain, "train_step", counted)
    monkeypatch.setattr(pretrain, "autocast", recorded)
    monkeypatch.setattr(engine_device, "_measure_precision", lambda *args: {"precision": "bf16", "reason": "faster"})
    monkeypatch.setattr(budget._StepTimer, "classifier_step", lambda self, cfg, batch, teacher_cfg=None: 0.01)
    monkeypatch.setattr(budget._StepTimer, "per_image", lambda self, cfg: 1e-4)
    # a budget no machine is too slow for: what is checked is what the timing ran, not what it chose
    pc = _budget_config(data, tmp_path / "run", minutes=600)
    pc = dataclasses.replace(pc, pretrain=dict(pc.pretrain, batch_size=16, optimizer="sgd", precision=precision))
    torch_rng, numpy_rng = torch.get_rng_state(), np.random.get_state()
    budget.fit_pretraining(pc)
    assert steps == [(0.0, "SGD")] * (1 + budget.TIMED_STEPS)  # a warm-up step, then the timed ones
    assert autocasts == ["bf16" if precision == "auto" else precision] * len(steps)
    assert not (tmp_path / "run" / "pretrain" / "precision.json").exists()  # the stage chooses for itself
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_rng))


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_budget_measures_this_machine_and_pins_the_epochs(data, tmp_path, monkeypatch):
    """The real measurement on tiny data; the run's pipeline.yaml then holds the chosen epochs
    and no budget, so running it again repeats them."""
    import simclrv2.pipeline as P
    from simclrv2 import plan

    pc = _budget_config(data, tmp_path / "run", minutes=30)
    seen: list[PipelineConfig] = []  # the check, the budget's own plan, then the pipeline's

    def recorded(pc: PipelineConfig) -> list:
        seen.append(pc)
        return plan.plan_stages(pc)

    monkeypatch.setattr(P, "plan_stages", recorded)
    monkeypatch.setattr(budget, "plan_stages", recorded)  # both import it from simclrv2.plan

    class _Stop(Exception):
        pass

    def stop(*a, **k):
        raise _Stop

    monkeypatch.setattr(P, "run_stage", stop)
    with pytest.raises(_Stop):
        P.run_pipeline(pc)
    rec = json.loads((tmp_path / "run" / "budget.json").read_text())
    assert rec["epochs"] >= 1 and rec["epoch_seconds"] > 0 and rec["other_seconds"] > 0
    written = yaml.safe_load((tmp_path / "run" / "pipeline.yaml").read_text())
    assert written["pretrain"]["epochs"] == rec["epochs"] and written["budget_minutes"] == 0
    assert seen[-1].pretrain["epochs"] == rec["epochs"] and len(seen) == 3


# ------------------------------------------------------------------ warnings


def _row(method, fraction, top1, **extra):
    return {"method": method, "label_fraction": fraction, "top1": top1, "num_classes": 10, "steps": 300,
            "model": MODEL, "run_dir": "", "seconds": 1.0, **extra}


def test_report_warns(tmp_path):
    out = {"config_hash": "x", "machine": "test", "total_seconds": 1.0, "stages": {},
           "pretrain": {"epochs": 2, "steps": 200, "knn_top1": 60.0},
           "results": [
               _row("supervised", 0.01, 70.0),
               _row("finetune", 0.01, 68.0, base_lr=0.4, lr_search={"0.1": 60.0, "0.4": 66.0}, lr_at_edge=True),
               _row("distill-self", 0.01, 14.0, teacher_top1=68.0, teacher_agreement=90.0),
               _row("distill-small", 0.01, 65.0, teacher_top1=68.0, teacher_agreement=90.0, steps=40),
               _row("supervised", 0.1, 80.0), _row("finetune", 0.1, 82.0),
               _row("distill-self", 0.1, 81.5, teacher_top1=82.0, teacher_agreement=95.0),
           ]}
    found = warnings(out)
    assert len(found) == 3
    assert "finetune at 1% labels" in found[0] and "below the supervised baseline" in found[0]
    assert "edge of the search" in found[0]
    assert "within 5 points of chance (10.0)" in found[1] and "pretraining may be too short" in found[1]
    assert "3.00 points below its teacher" in found[2] and "too few steps (40)" in found[2]
    (tmp_path / "r").mkdir()
    pc = C.build(PipelineConfig, {"plots": False})
    report = write_report(tmp_path / "r", out, pc).read_text()
    assert "## Warnings" in report and all(w in report for w in found)
    assert "Pretraining: 2 epochs, 200 steps, kNN monitor 60.00% at the end." in report
    healthy = dict(out, results=out["results"][4:])
    assert warnings(healthy) == []
    assert "## Warnings" not in write_report(tmp_path / "r", healthy, pc).read_text()
    shrunk = dict(healthy, budget={"budget_minutes": 15, "epoch_seconds": 1.9, "other_seconds": 443,
                                   "image_size": 32, "native_image_size": 96})
    assert ("every stage trained at 32 px, as the images' own 96 px would not fit"
            in write_report(tmp_path / "r", shrunk, pc).read_text())


def test_chance_warning_uses_the_number_of_classes():
    out = {"results": [dict(_row("supervised", 0.1, 54.0), num_classes=2)]}
    assert "within 5 points of chance (50.0)" in warnings(out)[0]
    out["results"][0]["top1"] = 56.0
    assert warnings(out) == []


def test_warning_names_the_augmentations_when_the_frozen_encoder_is_below_the_baseline():
    """Textures of grey photographs (docs/EXPERIMENTS.md): the frozen encoder's probes below a
    baseline trained from scratch on the same labels point at what pretraining learned to ignore,
    not only at its length."""
    out = {"pretrain": {"epochs": 247.5, "knn_top1": 51.8},
           "results": [_row("supervised", 1.0, 73.67), _row("finetune", 1.0, 70.33),
                       _row("linear-eval", 1.0, 59.33, steps=None), _row("knn", 1.0, 51.83, steps=None)]}
    found = warnings(out)
    assert len(found) == 1 and "fine-tuned (70.33) is below the supervised baseline (73.67)" in found[0]
    assert "pretraining may be too short (247.5 epochs" in found[0]
    assert "best probe (59.33) is below the baseline" in found[0] and "pretrain.color_strength=0" in found[0]
    out["results"][3]["top1"] = 74.0  # kNN above the baseline: the features hold what the labels need
    found = warnings(out)
    assert len(found) == 1 and "pretraining may be too short" in found[0] and "color_strength" not in found[0]


def test_warning_advises_longer_pretraining_only_while_the_monitor_still_rose():
    """fmnist4k seed 4 (docs/EXPERIMENTS.md): the kNN monitor's best by epoch 90 was 63.6 and it
    ended at 62.4 after 180 epochs, so a longer pretraining is no advice; textures seed 2 rose from
    49.8 by epoch 120 to 51.8 at the end, so it is."""
    from simclrv2.report import knn_first_half

    flat = [(5.0, 54.1), (40.0, 63.6), (90.0, 61.4), (135.0, 61.8), (180.0, 62.4)]
    rising = [(5.0, 35.7), (105.0, 49.8), (120.0, 44.0), (190.0, 51.5), (247.5, 51.8)]
    assert knn_first_half(flat) == {"epoch": 40.0, "top1": 63.6}
    assert knn_first_half(rising) == {"epoch": 105.0, "top1": 49.8}
    assert knn_first_half([(5.0, 50.0)]) is None and knn_first_half([]) is None
    for curve, stopped in ((flat, True), (rising, False)):
        out = {"pretrain": {"epochs": curve[-1][0], "knn_top1": curve[-1][1], "knn_first_half": knn_first_half(curve)},
               "results": [_row("supervised", 1.0, 59.7), _row("finetune", 1.0, 57.0)]}
        found = warnings(out)[0]
        assert ("pretraining may be too short" in found) is not stopped
        assert ("(kNN monitor 63.6% at epoch 40, 62.4% at the end, epoch 180): a longer one is unlikely to help" in found) is stopped
    # a rise of exactly 1 point (fmnist4k seed 0: 66.3 by epoch 90, 67.3 at the end) is no rise
    for end, stopped in ((67.3, True), (67.4, False)):
        out["pretrain"] = {"epochs": 191.5, "knn_top1": end, "knn_first_half": {"epoch": 90.0, "top1": 66.3}}
        assert ("a longer one is unlikely to help" in warnings(out)[0]) is stopped


def test_warning_says_when_no_rate_of_the_baseline_search_learned():
    """Held-out shapes seed 0 (docs/EXPERIMENTS.md): the baseline's folds scored 8.33-16.67 at every
    rate, six classes; the warning says the labels are too few to train from random weights, and
    not that the search should be wider. One rate clear of chance on the folds: no such cause."""
    rates = {"0.025": 8.3333, "0.1": 12.5, "0.4": 16.6667, "1.6": 16.6667}
    out = {"results": [dict(_row("supervised", 1.0, 16.83, base_lr=0.4, lr_search=rates, lr_at_edge=False),
                            num_classes=6)]}
    found = warnings(out)
    assert len(found) == 1 and "within 5 points of chance (16.7)" in found[0]
    assert "no rate of the search learned on the held-out labels (best 16.67)" in found[0]
    assert "edge of the search" not in found[0] and "no simple cause" not in found[0]
    out["results"][0]["lr_search"] = dict(rates, **{"0.1": 25.0})
    assert "no rate of the search learned" not in warnings(out)[0]


def test_warning_names_no_edge_when_the_best_rate_is_tied():
    """Folds that tie every rate keep the smallest (textures seed 0, docs/EXPERIMENTS.md): an edge
    by the tie-break alone, where widening the search is no advice. The report follows the
    pipeline's ``lr_at_edge`` (pipeline.at_edge) for the search scores given."""
    from simclrv2.pipeline import at_edge

    out = {"pretrain": {"epochs": 214, "knn_top1": 43.5},
           "results": [_row("supervised", 1.0, 64.5), _row("finetune", 1.0, 62.67)]}
    row = out["results"][1]
    for scores, edge in (((56.25, 56.25, 56.25), False), ((56.25, 50.0, 50.0), True)):
        search = dict(zip((0.000625, 0.0025, 0.01), scores))
        row.update(base_lr=0.000625, lr_search={f"{lr:.4g}": v for lr, v in search.items()}, lr_at_edge=at_edge(search))
        found = warnings(out)[0]
        assert ("edge of the search (0.000625-0.01)" in found) is edge
        assert ("pretraining may be too short" in found) is not edge


# ------------------------------------------------------------------ image folders at their own size


@pytest.mark.parametrize("sides, expected", [((28, 28), 28), ((300, 400), 224), ((40, 64), 40)])
def test_image_folder_keeps_its_own_size(tmp_path, sides, expected):
    """Without image_size, small images are not upscaled to 224 px (64x the pixels for 28 px
    Fashion-MNIST PNGs); large ones still are stored at 224."""
    from PIL import Image

    from simclrv2.data.datasets import load_dataset

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("L", sides, color=40 * i).save(tmp_path / c / f"{i}.png")
    ds = load_dataset("imagefolder", data_dir=str(tmp_path))
    assert ds.image_size == expected and ds[0][0].shape == (3, expected, expected)
    assert load_dataset("imagefolder", data_dir=str(tmp_path), image_size=32)[0][0].shape == (3, 32, 32)


def test_report_explains_rounds_only_where_a_student_had_more_than_one():
    """The distillation table's footnote speaks of a second round only when a row has one."""
    from simclrv2.report import _distill_section

    def student(method, rounds):
        row = _row(method, 0.01, 70.0, teacher_top1=68.0, teacher_agreement=90.0, student_view="strong", rounds=rounds)
        if rounds > 1:
            row["earlier_rounds"] = [{"top1": 69.0}]
        return row

    one = "\n".join(_distill_section({"results": [student("distill-self", 1), student("distill-small", 1)]}))
    assert "Student's view:" in one and "round" not in one.split("Student's view:")[1]
    two = "\n".join(_distill_section({"results": [student("distill-self", 2), student("distill-small", 1)]}))
    assert "| 2, round 1 69.00 |" in two and "With 2 rounds the second student learns from the first" in two


def test_report_names_the_searches_that_their_held_out_images_cannot_decide():
    """A search whose chosen rate leads the runner-up by less than the binomial standard error of
    a top-1 on its scored images is named; a clear lead, or one on many images, is not."""
    from simclrv2.report import _search_section

    def searched(method, fraction, scores, images, folds):
        best = max(scores, key=scores.get)
        return _row(method, fraction, 60.0, base_lr=float(best), lr_search=scores, folds=folds,
                    estimate={"kind": "4-fold cross-validation" if folds else "validation split",
                              "top1": scores[best], "images": images})

    out = {"results": [
        searched("finetune", 1.0, {"0.0025": 55.0, "0.01": 55.0, "0.04": 57.5, "0.16": 62.5}, 40, 4),
        searched("supervised", 1.0, {"0.025": 30.0, "0.1": 50.0, "0.4": 32.5}, 40, 4),
        searched("finetune", 0.1, {"0.0025": 80.1, "0.01": 81.0, "0.04": 79.0}, 5400, 0),
    ]}
    text = "\n".join(_search_section(out))
    se = 100 * (0.625 * 0.375 / 40) ** 0.5  # 7.65: a lead of 5.00 on 40 images is a close call
    assert (f"- finetune (100%): the chosen rate leads the next by 5.00 points, less than the standard error "
            f"of a top-1 on 40 held-out images ({se:.2f})." in text)
    assert "- supervised (100%)" not in text  # a lead of 20 points on 40 images
    assert "- finetune (10%)" not in text  # 0.90 points on 5,400 images: standard error 0.53
    assert text.count("Close calls:") == 1
    clear = {"results": out["results"][1:]}
    assert "Close calls" not in "\n".join(_search_section(clear))


def test_report_says_what_the_baseline_search_with_colour_distortion_found():
    """The baseline's two searches (pipeline.run_retry): the report gives both searches' best and
    which one it kept; the chance warning names both when the kept one learned nothing."""
    from simclrv2.report import _search_section

    first = {"0.025": 8.3333, "0.1": 12.5, "0.4": 16.6667}
    coloured = {"0.025": 20.8333, "0.1": 29.1667, "0.4": 25.0}
    kept = _row("supervised", 1.0, 31.0, base_lr=0.1, lr_search=coloured, folds=4, num_classes=6,
                color_retry={"color_strength": 1.0, "best_without": 16.6667, "best_with": 29.1667, "kept": True,
                             "lr_search": coloured, "chance": 16.6667, "images": 24, "p_value": 1.0,
                             "learned_nothing": False})
    text = "\n".join(_search_section({"results": [kept]}))
    assert ("- supervised (100%): best 16.67 with crops and flips on 24 held-out images; with the pretraining's "
            "colour distortion (strength 1) 0.025: 20.83, 0.1: 29.17, 0.4: 25.00; so it trains with colour "
            "distortion." in text)
    assert text.count("The baseline searched its rates twice") == 1
    assert warnings({"results": [kept]}) == []
    # grey textures: colour distortion removes what tells the classes apart, and crops and flips stay
    plain = _row("supervised", 1.0, 70.0, base_lr=0.1, lr_search={"0.025": 65.0, "0.1": 72.5}, folds=4,
                 num_classes=8, color_retry={"color_strength": 1.0, "best_without": 72.5, "best_with": 55.0,
                                             "kept": False, "lr_search": {"0.025": 55.0, "0.1": 47.5},
                                             "learned_nothing": False})
    text = "\n".join(_search_section({"results": [plain]}))
    assert "best 72.50 with crops and flips; with the pretraining's colour distortion (strength 1) " in text
    assert "0.025: 55.00, 0.1: 47.50; so it keeps crops and flips." in text
    assert warnings({"results": [plain]}) == []
    flat = {"0.025": 16.6667, "0.1": 16.6667, "0.4": 12.5}
    neither = _row("supervised", 1.0, 17.0, base_lr=0.025, lr_search=first, folds=4, num_classes=6,
                   color_retry={"color_strength": 1.0, "best_without": 16.6667, "best_with": 16.6667, "kept": False,
                                "lr_search": flat, "chance": 16.6667, "images": 24, "p_value": 1.0,
                                "learned_nothing": True})
    assert "so it keeps crops and flips." in "\n".join(_search_section({"results": [neither]}))
    found = warnings({"results": [neither]})
    assert len(found) == 1 and "(best 16.67, with crops and flips 16.67, with colour distortion 16.67)" in found[0]
    older = dict(neither, color_retry={k: v for k, v in neither["color_retry"].items() if k != "learned_nothing"})
    assert warnings({"results": [older]}) == found  # a results.json written before both searches always ran
    # held-out shapes seed 2: 29.17 on the folds, 5 points over chance but not by the binomial test
    unclear = dict(neither, lr_search={"0.025": 20.8333, "0.1": 29.1667, "0.4": 16.6667},
                   color_retry=dict(neither["color_retry"], best_without=29.1667))
    found = warnings({"results": [unclear]})
    assert len(found) == 1 and "(best 29.17, with crops and flips 29.17, with colour distortion 16.67)" in found[0]
    assert "colour distortion" not in "\n".join(_search_section({"results": [_row("supervised", 1.0, 31.0,
                                                                                  base_lr=0.1, lr_search=first)]}))

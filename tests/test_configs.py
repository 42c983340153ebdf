"""Every YAML under configs/ builds and validates (no training, no data loading).

Pipeline configs (configs/*.yaml) go through ``PipelineConfig`` and ``plan_stages``, which builds and
validates every stage's config; stage configs (configs/stages/<stage>.yaml) through their stage
dataclass, as ``simclrv2 <stage> --config`` loads them.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from simclrv2 import config as C
from simclrv2.pipeline import PipelineConfig, plan_stages
from simclrv2.stages import STAGES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PIPELINES = sorted(CONFIGS.glob("*.yaml"))
STAGE_FILES = sorted((CONFIGS / "stages").glob("*.yaml"))
STAGE_OF_FILE = {"pretrain": "pretrain", "finetune": "finetune", "supervised": "supervised",
                 "distill": "distill", "linear_eval": "linear-eval", "knn": "knn-eval"}
SECTIONS = {"pretrain", "finetune", "supervised", "distill_self", "distill_small", "linear_eval", "knn_eval"}


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(CONFIGS)) for p in paths]


def test_configs_are_found() -> None:
    assert {"cifar10.yaml", "stl10.yaml", "imagenet_r50_1x_sk1.yaml"} <= {p.name for p in PIPELINES}
    assert {p.stem for p in STAGE_FILES} == set(STAGE_OF_FILE)


@pytest.mark.parametrize("path", PIPELINES, ids=_ids(PIPELINES))
def test_pipeline_config_builds_and_validates(path: Path) -> None:
    pc = C.build(PipelineConfig, C.load_yaml(path))
    plans = plan_stages(pc)  # builds and validates every stage's config
    assert plans[0].stage == "pretrain"
    # keys the pipeline would drop silently: common keys no stage knows, by_fraction entries for
    # fractions that are not run or for sections that do not exist
    known = set().union(*({f.name for f in dataclasses.fields(s.config)} for s in STAGES.values()))
    assert set(pc.common) <= known, sorted(set(pc.common) - known)
    fractions = [float(f) for f in pc.label_fractions]
    for key, sections in pc.by_fraction.items():
        assert any(abs(float(key) - f) < 1e-12 for f in fractions), f"by_fraction {key} not in label_fractions"
        assert set(sections) <= SECTIONS, sorted(set(sections) - SECTIONS)
    # fine-tuning keeps the pretrained architecture (a different model= is an error at run time)
    for plan in plans:
        if plan.stage == "finetune":
            assert plan.cfg.model in (plans[0].cfg.model, C.CommonConfig.model)
            assert plan.cfg.init_checkpoint == plans[0].cfg.run_dir


def _plan(name: str) -> dict:
    pc = C.build(PipelineConfig, C.load_yaml(CONFIGS / name))
    return {p.name: p.cfg for p in plan_stages(pc)}


def test_cifar10_settings() -> None:
    cfgs = _plan("cifar10.yaml")
    pre = cfgs["pretrain"]
    assert (pre.model, pre.stem, pre.batch_size, pre.epochs) == ("r50_1x_sk0", "cifar", 512, 800)
    assert (pre.optimizer, pre.lr_scaling, pre.temperature, pre.color_strength, pre.blur) == (
        "lars", "sqrt", 0.5, 0.5, False)
    assert cfgs["finetune_1pct"].epochs == 60 and cfgs["finetune_10pct"].epochs == 30
    assert cfgs["distill_small_1pct"].model == "r18_1x_sk0" and cfgs["distill_small_1pct"].tau == 1.0
    assert cfgs["distill_self_1pct"].model == "r50_1x_sk0" and cfgs["distill_self_1pct"].tau == 0.1


def test_stl10_settings() -> None:
    cfgs = _plan("stl10.yaml")
    assert cfgs["pretrain"].train_split == "train+unlabeled" and cfgs["pretrain"].image_size == 96
    assert cfgs["finetune_1pct"].train_split == "train"
    assert cfgs["distill_self_10pct"].train_split == "train+unlabeled"


def test_imagenet_settings() -> None:
    cfgs = _plan("imagenet_r50_1x_sk1.yaml")
    pre = cfgs["pretrain"]
    assert (pre.model, pre.dataset, pre.data_dir, pre.image_size) == ("r50_1x_sk1", "imagefolder", "/data/imagenet", 224)
    assert (pre.batch_size, pre.epochs, pre.temperature, pre.base_lr, pre.lr_scaling) == (4096, 800, 0.1, 0.1, "sqrt")
    assert (pre.memory.enabled, pre.memory.size, pre.memory.momentum) == (True, 65536, 0.999)
    ft1, ft10 = cfgs["finetune_1pct"], cfgs["finetune_10pct"]
    assert ft1.ft_proj_selector == ft10.ft_proj_selector == 1
    assert (ft1.epochs, ft1.label_list) == (60, "imagenet_subsets/1percent.txt")
    assert (ft10.epochs, ft10.label_list) == (30, "imagenet_subsets/10percent.txt")
    assert cfgs["supervised_1pct"].label_list == "imagenet_subsets/1percent.txt"
    assert cfgs["distill_self_1pct"].tau == 0.1 and cfgs["distill_small_10pct"].tau == 1.0


@pytest.mark.parametrize("path", STAGE_FILES, ids=_ids(STAGE_FILES))
def test_stage_config_builds_and_validates(path: Path) -> None:
    cfg = C.load_config(STAGES[STAGE_OF_FILE[path.stem]].config, path)
    assert cfg.dataset == "fashion_mnist"


def test_stage_configs_point_at_each_other() -> None:
    cfgs = {p.stem: C.load_config(STAGES[STAGE_OF_FILE[p.stem]].config, p) for p in STAGE_FILES}
    pre = cfgs["pretrain"]
    assert pre.model == "r18_0.25x_sk0" and pre.epochs <= 5
    assert cfgs["finetune"].init_checkpoint == pre.run_dir
    assert cfgs["finetune"].model in (pre.model, C.CommonConfig.model)
    assert cfgs["distill"].teacher_checkpoint == cfgs["finetune"].run_dir
    assert cfgs["linear_eval"].checkpoint == cfgs["knn"].checkpoint == pre.run_dir
    assert len({c.run_dir for c in cfgs.values()}) == len(cfgs)  # no two stages share a run folder


def test_every_stage_runner_loads_and_takes_a_test_flag_where_the_table_says() -> None:
    """The stage table names runners by string (so that config-level code imports no engine): each
    must import, and take ``test=`` exactly where ``Stage.takes_test`` says the pipeline passes it."""
    for stage in STAGES.values():
        runner = stage.load_target()
        assert callable(runner), stage.runner
        assert ("test" in inspect.signature(runner).parameters) == stage.takes_test, stage.name
    assert {s for stage in STAGES.values() for s in stage.sections} == SECTIONS

"""The pipeline config is typed in every section (issue 23): ``common``, the stage sections and
``by_fraction``. Every key can be overridden from the command line, a label fraction such as
``0.01`` being one key, and an unknown key anywhere is one line with the closest valid key, exit
code 2, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from simclrv2 import config as C
from simclrv2 import pipeline as P
from simclrv2.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "fashion_mnist_demo.yaml"
# the demo config with a per-fraction table, as a user's config may have one
BY_FRACTION = {
    0.001: {"finetune": {"epochs": 60, "base_lr": 0.03}, "supervised": {"epochs": 60, "base_lr": 0.1}},
    0.01: {"finetune": {"epochs": 60}, "supervised": {"epochs": 60}},
    0.1: {"distill_small": {"epochs": 0.25}},
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    values = dict(C.load_yaml(DEMO_CONFIG), by_fraction=BY_FRACTION)
    path = tmp_path_factory.mktemp("config") / "demo_by_fraction.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def plans(demo: Path, *overrides: str) -> dict[str, P.StagePlan]:
    pc = C.build(P.PipelineConfig, C.apply_overrides(C.load_yaml(demo), list(overrides)))
    return {p.name: p for p in P.plan_stages(pc)}


@pytest.mark.parametrize("override, typo, suggestion", [
    ("common.bach_size=7", "common.bach_size", "common.batch_size"),
    ("pretrain.temprature=0.5", "pretrain.temprature", "pretrain.temperature"),
    ("pretrain.memory.enable=true", "pretrain.memory.enable", "pretrain.memory.enabled"),
    ("distill_small.tua=2", "distill_small.tua", "distill_small.tau"),
    ("by_fraction.0.01.finetune.epoch=1", "by_fraction.0.01.finetune.epoch", "by_fraction.0.01.finetune.epochs"),
    ("by_fraction.0.01.fintune.epochs=1", "by_fraction.0.01.fintune", "by_fraction.0.01.finetune"),
    ("lable_fractions=[0.1]", "lable_fractions", "label_fractions"),
])
def test_a_mistyped_key_is_one_line_with_the_closest_key_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        override: str, typo: str, suggestion: str) -> None:
    monkeypatch.chdir(tmp_path)  # the demo's run_dir is relative: it would appear here
    assert main(["pipeline", "--config", str(DEMO_CONFIG), override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"unknown config key '{typo}'" in err and f"did you mean {suggestion}?" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override, needle", [
    ("common.batch_size=big", "'common.batch_size' must be an integer"),
    ("by_fraction.0.01.finetune.epochs=many", "'by_fraction.0.01.finetune.epochs' must be a number"),
    ("by_fraction.0.01.finetune=3", "'by_fraction.0.01.finetune' must be a mapping"),
    ("by_fraction.2.finetune.epochs=1", "'by_fraction.2' is not a label fraction"),
    ("by_fraction.0.010.linear_eval.epochs=1", "unknown config key 'by_fraction.0.01.linear_eval'"),
])
def test_a_mistyped_value_or_section_is_an_error(demo: Path, capsys: pytest.CaptureFixture, tmp_path: Path,
                                                 override: str, needle: str) -> None:
    assert main(["pipeline", "--config", str(demo), f"run_dir={tmp_path / 'run'}", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "run").exists()


def test_two_keys_for_one_fraction_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("by_fraction:\n  0.01: {finetune: {epochs: 2}}\n  '0.010': {finetune: {epochs: 3}}\n")
    pc = C.build(P.PipelineConfig, C.load_yaml(path))
    with pytest.raises(C.ConfigError, match="same label fraction"):
        P.plan_stages(pc)


def test_split_key_keeps_a_number_whole() -> None:
    assert C.split_key("by_fraction.0.01.finetune.epochs") == ["by_fraction", "0.01", "finetune", "epochs"]
    assert C.split_key("by_fraction.1e-3.supervised.base_lr") == ["by_fraction", "1e-3", "supervised", "base_lr"]
    assert C.split_key("by_fraction.2.5e-1.finetune") == ["by_fraction", "2.5e-1", "finetune"]
    assert C.split_key("pretrain.memory.size") == ["pretrain", "memory", "size"]


def test_by_fraction_overrides_reach_the_planned_stage_configs(demo: Path) -> None:
    base = plans(demo)
    got = plans(demo, "by_fraction.0.01.finetune.epochs=1",  # the YAML key 0.01, merged with its other keys
                "by_fraction.1e-3.supervised.base_lr=0.5",  # 1e-3 names the YAML key 0.001
                "by_fraction.0.10.distill_small.tau=2.0",  # so does 0.10 name 0.1
                "label_fractions=[0.001, 0.01, 0.1, 0.05]",
                "by_fraction.0.05.finetune.epochs=3",  # a fraction the YAML has no entry for
                "common.batch_size=32")
    assert got["finetune_1pct"].cfg.epochs == 1 and base["finetune_1pct"].cfg.epochs == 60
    assert got["finetune_1pct"].cfg.base_lr == base["finetune_1pct"].cfg.base_lr  # other keys unchanged
    assert got["supervised_0.1pct"].cfg.base_lr == 0.5 and base["supervised_0.1pct"].cfg.base_lr == 0.1
    assert got["supervised_0.1pct"].cfg.epochs == base["supervised_0.1pct"].cfg.epochs == 60
    assert got["distill_small_10pct"].cfg.tau == 2.0 and got["distill_small_1pct"].cfg.tau == 1.0
    assert got["finetune_5pct"].cfg.epochs == 3 and got["finetune_5pct"].cfg.label_fraction == 0.05
    # common reaches the stages whose section does not set the key
    assert got["knn"].cfg.batch_size == 32 and got["pretrain"].cfg.batch_size == 512


def test_pipeline_help_documents_the_fraction_syntax(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["pipeline", "--help"])
    out = capsys.readouterr().out
    assert "by_fraction.0.01.finetune.epochs=1" in out


def test_self_distill_init_starts_only_the_self_distilled_student_from_the_pretrained_encoder(
        demo: Path, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    pre = plans(demo)["pretrain"].cfg.run_dir
    got = plans(demo, "self_distill_init=pretrained")
    assert [got[f"distill_self_{t}"].cfg.student_init for t in ("0.1pct", "1pct", "10pct")] == [pre] * 3
    assert got["distill_small_1pct"].cfg.student_init == ""  # another architecture: it cannot start there
    assert plans(demo, "self_distill_init=random")["distill_self_1pct"].cfg.student_init == ""
    mine = str(tmp_path / "encoder")
    assert plans(demo, "self_distill_init=pretrained",
                 f"distill_self.student_init={mine}")["distill_self_1pct"].cfg.student_init == mine
    assert main(["pipeline", "--config", str(demo), f"run_dir={tmp_path / 'run'}", "self_distill_init=teacher"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "self_distill_init must be random or pretrained, got 'teacher'" in err, err
    assert not (tmp_path / "run").exists()

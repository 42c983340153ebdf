"""One grammar for every command (issue 23): ``key=value`` and ``--config FILE`` for the tools as
for the stages; the old ``--flags`` still work, with one deprecation line on stderr."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from simclrv2 import config as C
from simclrv2.checkpoint import write_model_file
from simclrv2.cli import main, parse_tool_args
from simclrv2.data.builtin import FASHION_MNIST_CLASSES, FASHION_MNIST_SYSTEM_DIR
from simclrv2.data.datasets import load_dataset
from simclrv2.models import create_model

FMNIST_DIR = str(FASHION_MNIST_SYSTEM_DIR)


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = create_model("r10_0.25x_sk0", in_chans=1, cifar_stem=True, num_classes=10, ft_proj_selector=0).eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    write_model_file(path, model.state_dict(), {"model_name": model.name, "model_config": model.config,
                                                "image_size": 28, "classes": list(FASHION_MNIST_CLASSES),
                                                "num_classes": 10})
    return path


@pytest.mark.fashion_mnist
def test_predict_takes_key_value(classifier_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "p.csv"
    assert main(["predict", f"checkpoint={classifier_ckpt}", "dataset=fashion_mnist", f"data_dir={FMNIST_DIR}",
                 "limit=5", "batch_size=2", "device=cpu", f"out={out}"]) == 0
    captured = capsys.readouterr()
    assert "deprecated" not in captured.err
    assert np.load(out.with_suffix(".npy")).shape == (5, 10) and len(out.read_text().splitlines()) == 6


@pytest.mark.fashion_mnist
def test_embed_takes_key_value_and_config_file(classifier_ckpt: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    options = tmp_path / "embed.yaml"
    options.write_text(yaml.safe_dump({"checkpoint": str(classifier_ckpt), "dataset": "fashion_mnist",
                                       "data_dir": FMNIST_DIR, "limit": 9, "out": str(tmp_path / "no.npy")}))
    out = tmp_path / "emb.npy"
    # the command line wins over the file (limit, out)
    assert main(["embed", "--config", str(options), "limit=4", f"out={out}", "output=features"]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert np.load(out).shape == (4, 128) and not (tmp_path / "no.npy").exists()
    labels = load_dataset("fashion_mnist", "test", data_dir=FMNIST_DIR).labels[:4].tolist()
    assert np.load(tmp_path / "emb.labels.npy").tolist() == labels


def test_export_takes_key_value_with_a_switch(classifier_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    assert main(["export", f"checkpoint={classifier_ckpt}", "format=torchscript", f"out={out}",
                 "image_size=28", "verify=false"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["format"] == "torchscript"


@pytest.mark.slow
def test_models_takes_the_grammar(capsys: pytest.CaptureFixture) -> None:
    assert main(["models"]) == 0 and "r10_0.25x_sk0" in capsys.readouterr().out
    assert main(["models", "verbose=true"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "simclrv2 models takes no options, got 'verbose'" in err


@pytest.mark.slow
def test_convert_takes_key_value(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from _tf_writer import write_tf_checkpoint
    from test_convert import NUM_CLASSES, official_variables

    values = dict(official_variables(50, 0.5, True, NUM_CLASSES, cifar_stem=True).values)
    values["global_step"] = np.array(7, dtype=np.int64)
    prefix = write_tf_checkpoint(tmp_path / "ckpt" / "model.ckpt-7", values)
    out = tmp_path / "r50.safetensors"
    assert main(["convert", f"tf_checkpoint={prefix}", f"out={out}", "ft_proj_selector=0", "ema=false",
                 "no_verify=false"]) == 0
    assert "deprecated" not in capsys.readouterr().err
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["model_name"] == "r50_0.5x_sk1" and meta["ft_proj_selector"] == 0


def test_old_flags_still_work_with_one_deprecation_line(classifier_ckpt: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "m.pt"
    assert main(["export", "--checkpoint", str(classifier_ckpt), "--format=torchscript", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: simclrv2 export: the --flags are deprecated"), err
    assert "--checkpoint -> checkpoint=..." in err and "--format -> format=..." in err and out.is_file()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simclrv2 tool")
    parser.add_argument("--tf-checkpoint", required=True)
    parser.add_argument("--selector", type=int, default=None)
    parser.add_argument("--ema", action="store_true")
    parser.add_argument("--no-verify", action="store_true")
    return parser


def test_key_value_maps_onto_the_same_options(capsys: pytest.CaptureFixture) -> None:
    new = parse_tool_args(_parser(), ["tf_checkpoint=a=b/c", "selector=-1", "ema=true", "no_verify=false"])
    assert capsys.readouterr().err == ""
    old = parse_tool_args(_parser(), ["--tf-checkpoint", "a=b/c", "--selector", "-1", "--ema"])
    assert "deprecated" in capsys.readouterr().err
    assert vars(new) == vars(old) == {"tf_checkpoint": "a=b/c", "selector": -1, "ema": True, "no_verify": False}


@pytest.mark.parametrize("argv, needle", [
    (["tf_checkpoint=x", "selectr=1"], "unknown config key 'selectr'; did you mean selector?"),
    (["tf_checkpoint=x", "ema=maybe"], "'ema' must be true or false, got 'maybe'"),
    (["selector=1"], "the following arguments are required: tf_checkpoint"),
    (["tf_checkpoint=x", "selector=one"], "argument selector: invalid int value: 'one'"),
])
def test_bad_keys_are_one_line_errors_in_key_words(argv: list[str], needle: str) -> None:
    with pytest.raises(C.ConfigError) as e:
        parse_tool_args(_parser(), argv)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_help_lists_the_keys(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["predict", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "usage: simclrv2 predict [--config FILE] key=value ..." in out
    assert "  checkpoint=CHECKPOINT [required]" in out and "  batch_size=BATCH_SIZE (default: 256)" in out

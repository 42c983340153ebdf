"""predict / embed / export (issue 5): exported models agree with PyTorch, CSVs have the right rows."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from simclrv2 import load_pretrained, serve
from simclrv2.checkpoint import write_model_file
from simclrv2.cli import main as cli_main
from simclrv2.data.augment import EvalTransform
from simclrv2.data.builtin import FASHION_MNIST_CLASSES, FASHION_MNIST_SYSTEM_DIR
from simclrv2.data.datasets import load_dataset
from simclrv2.models import create_model

FMNIST_DIR = str(FASHION_MNIST_SYSTEM_DIR)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning threads make these tiny
    forwards ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomise(model: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and classifier, so eval-mode BN and the head really matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)
        if getattr(model, "classifier", None) is not None:
            model.classifier.weight.normal_(0, 0.3, generator=g)
            model.classifier.bias.normal_(0, 0.3, generator=g)


def _write(path, model) -> str:
    meta = {"model_name": model.name, "model_config": model.config, "image_size": 28,
            "classes": list(FASHION_MNIST_CLASSES), "num_classes": 10}
    write_model_file(path, model.state_dict(), meta)
    return str(path)


def _classifier_model() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("r10_0.25x_sk0", in_chans=1, cifar_stem=True, num_classes=10, ft_proj_selector=0)
    _randomise(model, 0)
    return model.eval()


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("ckpt") / "model.safetensors", _classifier_model())


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory):
    """A pretraining-style checkpoint: whole head, no classifier."""
    torch.manual_seed(1)
    model = create_model("r10_0.25x_sk0", in_chans=1, cifar_stem=True, num_classes=0, ft_proj_selector=-1,
                         proj_out_dim=16)
    _randomise(model, 1)
    return _write(tmp_path_factory.mktemp("enc") / "encoder.safetensors", model.eval())


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Five files of different sizes and modes, one in a sub-folder; 70 px triggers the centre crop."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    files = {
        "a.png": (28, 28, "L"), "b.jpg": (30, 40, "RGB"), "c.png": (70, 70, "RGB"),
        "sub/d.png": (12, 12, "L"), "sub/e.bmp": (28, 28, "RGB"),
    }
    for name, (h, w, mode) in files.items():
        shape = (h, w) if mode == "L" else (h, w, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / name)
    (root / "notes.txt").write_text("not an image")
    return root


def test_load_pretrained_eval_mode_and_weights(classifier_ckpt):
    model = load_pretrained(classifier_ckpt)
    assert not model.training and model.classifier is not None
    ref = _classifier_model().state_dict()
    state = model.state_dict()
    assert state.keys() == ref.keys()
    for k, v in state.items():  # weights, BN buffers and the classifier all come from the file
        assert torch.equal(v, ref[k]), k


@pytest.mark.slow
def test_onnx_matches_pytorch(classifier_ckpt, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    assert cli_main(["export", "--checkpoint", classifier_ckpt, "--format", "onnx", "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["input"]["shape"] == ["batch", 1, 28, 28] and meta["output"]["name"] == "logits"
    model = load_pretrained(classifier_ckpt)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 5):  # the batch axis is dynamic (exported with a batch of 2)
        x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(n))
        got = session.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            ref = model(x)["logits"].numpy()
        assert got.shape == (n, 10)
        assert ref.std() > 0.05  # the comparison is not between near-zero outputs
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated")
def test_torchscript_round_trip(classifier_ckpt, encoder_ckpt, tmp_path):
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for ckpt, name, dim in ((classifier_ckpt, "logits", 10), (encoder_ckpt, "features", 128)):
        out = tmp_path / f"{name}.pt"
        assert serve.export_main(["--checkpoint", ckpt, "--format", "torchscript", "--out", str(out)]) == 0
        loaded = torch.jit.load(str(out))
        model = load_pretrained(ckpt)
        # no profiling-executor fusion: compiling fused kernels costs seconds and changes nothing here
        with torch.no_grad(), torch.jit.optimized_execution(False):
            ref = model(x)[name] if name == "logits" else model.features(x)
            got = loaded(x)
        assert got.shape == (3, dim)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_predict_image_folder(classifier_ckpt, image_folder, tmp_path):
    out = tmp_path / "preds.csv"
    assert cli_main(["predict", "--checkpoint", classifier_ckpt, "--images", str(image_folder),
                     "--out", str(out), "--batch-size", "2", "--device", "cpu"]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == ["a.png", "b.jpg", "c.png", "sub/d.png", "sub/e.bmp"]
    probs = np.load(out.with_suffix(".npy"))
    assert probs.shape == (5, 10)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    for r, p in zip(rows, probs):
        assert r["label"] == ""
        assert int(r["pred_index"]) == int(p.argmax())
        assert r["pred_class"] == FASHION_MNIST_CLASSES[int(p.argmax())]
        np.testing.assert_allclose([float(r[f"p_{c}"]) for c in FASHION_MNIST_CLASSES], p, rtol=1e-6)
    # a reference for the 70 px RGB file with the geometry worked out by hand: grayscale, the centre
    # 61 px square (round(0.875 * 70) = 61, offset (70 - 61 + 1) // 2 = 5), one bicubic resize to 28
    model = load_pretrained(classifier_ckpt)
    with Image.open(image_folder / "c.png") as img:
        small = img.convert("RGB").convert("L").resize((28, 28), Image.Resampling.BICUBIC, box=(5, 5, 66, 66))
    x = torch.from_numpy(np.asarray(small, dtype=np.uint8).copy())[None, None].float() / 255
    # EvalTransform on the same pixels (the in-memory path) agrees up to its resampler's rounding
    with Image.open(image_folder / "c.png") as img:
        gray = torch.from_numpy(np.asarray(img.convert("L"), dtype=np.uint8).copy())[None, None]
    assert (EvalTransform(28)(gray) - x).abs().mean() < 2 / 255
    with torch.no_grad():
        ref = model(x)["logits"].softmax(1)[0].numpy()
    np.testing.assert_allclose(probs[2], ref, atol=1e-5)


@pytest.mark.fashion_mnist
def test_predict_dataset_split(classifier_ckpt, tmp_path):
    out = tmp_path / "fm.csv"
    assert serve.predict_main(["--checkpoint", classifier_ckpt, "--dataset", "fashion_mnist", "--split", "test",
                               "--data-dir", FMNIST_DIR, "--limit", "7", "--out", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    test = load_dataset("fashion_mnist", "test", data_dir=FMNIST_DIR)
    assert len(rows) == 7
    assert [int(r["label"]) for r in rows] == test.labels[:7].tolist()
    model = load_pretrained(classifier_ckpt)
    with torch.no_grad():
        ref = model(test.images[:7].float() / 255)["logits"].softmax(1).numpy()  # 28 px: no crop, no resize
    np.testing.assert_allclose(np.load(out.with_suffix(".npy")), ref, atol=1e-5)


def test_predict_needs_a_classifier(encoder_ckpt, image_folder, tmp_path, capsys):
    code = cli_main(["predict", "--checkpoint", encoder_ckpt, "--images", str(image_folder),
                     "--out", str(tmp_path / "p.csv")])
    assert code == 2 and "no classifier" in capsys.readouterr().err


@pytest.mark.fashion_mnist
@pytest.mark.parametrize("output, dim", [("features", 128), ("proj", 16)])
def test_embed_dataset_split(encoder_ckpt, tmp_path, output, dim):
    out = tmp_path / "emb.npy"
    assert cli_main(["embed", "--checkpoint", encoder_ckpt, "--dataset", "fashion_mnist", "--split", "test",
                     "--data-dir", FMNIST_DIR, "--limit", "6", "--output", output, "--out", str(out)]) == 0
    feats, labels = np.load(out), np.load(tmp_path / "emb.labels.npy")
    assert feats.shape == (6, dim) and feats.dtype == np.float32
    assert labels.tolist() == load_dataset("fashion_mnist", "test", data_dir=FMNIST_DIR).labels[:6].tolist()
    model = load_pretrained(encoder_ckpt)
    x = load_dataset("fashion_mnist", "test", data_dir=FMNIST_DIR).images[:6].float() / 255
    with torch.no_grad():
        ref = model.features(x) if output == "features" else model(x)["proj"]
    np.testing.assert_allclose(feats, ref.numpy(), atol=1e-5)


def test_help_exits_cleanly():
    for fn in (serve.predict_main, serve.embed_main, serve.export_main):
        with pytest.raises(SystemExit) as e:
            fn(["--help"])
        assert e.value.code == 0

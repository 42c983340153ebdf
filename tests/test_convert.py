"""Released-checkpoint conversion (METHOD.md 8): TF tensor-bundle I/O, name mapping, TF padding.

The checkpoints here are built by ``OfficialNet``, a replay of the official TF1 graph
construction (google-research/simclr resnet.py / model_util.py) written independently of our
model classes: every conv / BN call takes the next auto-numbered TF name, exactly as
``tf.layers`` numbers them. The same replay, run on tensors, is the reference forward pass
(with TF "SAME" padding computed from TF's formula), so a tensor landing in the wrong module or
a padding difference changes the outputs.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import _tf_writer
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tf_writer import write_tf_checkpoint

from simclrv2 import tfcheckpoint
from simclrv2.checkpoint import CheckpointError
from simclrv2.convert import ConversionError, convert_checkpoint, guess_ft_proj_selector, infer_architecture
from simclrv2.convert_command import main as convert_main
from simclrv2.modelfile import save_converted
from simclrv2.models.resnet import AvgPoolShortcut, MaxPoolSame
from simclrv2.pretrained import load_pretrained
from simclrv2.tfcheckpoint import TFCheckpoint, crc32c, read_tf_checkpoint

BN_EPS = 1e-5
REF_DTYPE = np.float64  # reference in double precision: its own rounding is negligible
BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}

# --------------------------------------------------------------------------------------------
# Replay of the official TF1 network construction
# --------------------------------------------------------------------------------------------


class OfficialNet:
    """Calls the layers in TF1 SimCLR order; ``ops`` decides what a tensor is.

    ``variables.get(name, shape, kind)`` returns the value of a variable (creating it when
    building a checkpoint). Conv and BN names use one shared counter each (METHOD.md 8.2).
    """

    def __init__(self, ops: Any, variables: Any, prefix: str = "") -> None:
        self.ops = ops
        self.vars = variables
        self.prefix = prefix  # "" or "ema_model/"
        self.n_conv = 0
        self.n_bn = 0

    def _next(self, base: str, kind: str) -> str:
        n = self.n_conv if kind == "conv" else self.n_bn
        if kind == "conv":
            self.n_conv += 1
        else:
            self.n_bn += 1
        return f"{self.prefix}base_model/{base}" + (f"_{n}" if n else "")

    def conv(self, x: Any, filters: int, k: int, stride: int) -> Any:
        """conv2d_fixed_padding: explicit pad + VALID when strided, else TF SAME."""
        kernel = self.vars.get(self._next("conv2d", "conv") + "/kernel", (k, k, self.ops.channels(x), filters), "conv")
        if stride > 1:
            x = self.ops.pad(x, (k - 1) // 2, k - 1 - (k - 1) // 2)
        return self.ops.conv(x, kernel, stride, "SAME" if stride == 1 else "VALID")

    def bn(self, x: Any, relu: bool = True, last: bool = False) -> Any:
        x = self.norm(x, self._next("batch_normalization", "bn"), center=True, last=last)
        return self.ops.relu(x) if relu else x

    def norm(self, x: Any, name: str, center: bool, last: bool = False) -> Any:
        c = (self.ops.channels(x),)
        gamma = self.vars.get(f"{name}/gamma", c, "gamma_last" if last else "gamma")
        beta = self.vars.get(f"{name}/beta", c, "beta") if center else None
        mean = self.vars.get(f"{name}/moving_mean", c, "mean")
        var = self.vars.get(f"{name}/moving_variance", c, "var")
        return self.ops.bn(x, gamma, beta, mean, var)

    def sk_conv(self, x: Any, filters: int, stride: int, sk_ratio: float = 0.0625) -> Any:
        x = self.bn(self.conv(x, 2 * filters, 3, stride))
        a, b = self.ops.split2(x)
        mid = max(int(filters * sk_ratio), 32)
        g = self.ops.mean_hw(self.ops.add(a, b))
        g = self.bn(self.conv(g, mid, 1, 1))
        m = self.conv(g, 2 * filters, 1, 1)
        ma, mb = self.ops.split2(m)
        wa, wb = self.ops.softmax2(ma, mb)
        return self.ops.add(self.ops.mul(a, wa), self.ops.mul(b, wb))

    def bottleneck(self, x: Any, filters: int, stride: int, projection: bool, sk: bool) -> Any:
        shortcut = x
        if projection:
            if sk:
                s = self.ops.pad(x, 0, 1) if stride > 1 else x
                s = self.ops.avg_pool(s, stride, "SAME" if stride == 1 else "VALID")
                shortcut = self.conv(s, 4 * filters, 1, 1)
            else:
                shortcut = self.conv(x, 4 * filters, 1, stride)
            shortcut = self.bn(shortcut, relu=False)
        x = self.bn(self.conv(x, filters, 1, 1))
        x = self.sk_conv(x, filters, stride) if sk else self.bn(self.conv(x, filters, 3, stride))
        x = self.bn(self.conv(x, 4 * filters, 1, 1), relu=False, last=True)
        return self.ops.relu(self.ops.add(x, shortcut))

    def basic(self, x: Any, filters: int, stride: int, projection: bool) -> Any:
        """residual_block of resnet.py (ResNet-10/18/34): two 3x3 convs, projection first."""
        shortcut = self.bn(self.conv(x, filters, 1, stride), relu=False) if projection else x
        x = self.bn(self.conv(x, filters, 3, stride))
        x = self.bn(self.conv(x, filters, 3, 1), relu=False, last=True)
        return self.ops.relu(self.ops.add(x, shortcut))

    def backbone(self, x: Any, depth: int, width: float, sk: bool, cifar_stem: bool = False) -> Any:
        c = int(64 * width)
        if cifar_stem:  # 3x3 stride 1, no max-pool, with or without SK
            x = self.bn(self.conv(x, c, 3, 1))
        else:
            if sk:
                x = self.bn(self.conv(x, c // 2, 3, 2))
                x = self.bn(self.conv(x, c // 2, 3, 1))
                x = self.conv(x, c, 3, 1)
            else:
                x = self.conv(x, c, 7, 2)
            x = self.ops.max_pool_same(self.bn(x))
        for i, n in enumerate(BLOCKS[depth]):
            for j in range(n):
                stride = (1, 2, 2, 2)[i] if j == 0 else 1
                if depth < 50:
                    x = self.basic(x, c * 2**i, stride, j == 0)
                else:
                    x = self.bottleneck(x, c * 2**i, stride, j == 0, sk)
        return self.ops.global_pool(x)

    def projection_head(self, h: Any, num_layers: int = 3, out_dim: int = 128) -> list[Any]:
        outs = [h]
        for j in range(num_layers):
            last = j == num_layers - 1
            name = f"{self.prefix}head_contrastive/nl_{j}"
            dim = out_dim if last else self.ops.channels(h)
            kernel = self.vars.get(f"{name}/dense/kernel", (self.ops.channels(outs[-1]), dim), "dense")
            y = self.norm(self.ops.dense(outs[-1], kernel), f"{name}/batch_normalization", center=not last)
            outs.append(y if last else self.ops.relu(y))
        return outs

    def supervised_head(self, x: Any, num_classes: int) -> Any:
        kernel = self.vars.get("head_supervised/linear_layer/dense/kernel", (self.ops.channels(x), num_classes), "dense")
        bias = self.vars.get("head_supervised/linear_layer/dense/bias", (num_classes,), "bias")
        return self.ops.dense(x, kernel, bias)


class ChannelOps:
    """Tracks only the channel count: enough to create every variable."""

    def channels(self, x: int) -> int:
        return x

    def conv(self, x: int, kernel: np.ndarray, stride: int, padding: str) -> int:
        return kernel.shape[3]

    def dense(self, x: int, kernel: np.ndarray, bias: Any = None) -> int:
        return kernel.shape[1]

    def split2(self, x: int) -> tuple[int, int]:
        return x // 2, x // 2

    def softmax2(self, a: int, b: int) -> tuple[int, int]:
        return a, b

    def pad(self, x: int, beg: int, end: int) -> int:
        return x

    def bn(self, x: int, *params: Any) -> int:
        return x

    relu = max_pool_same = mean_hw = global_pool = staticmethod(lambda x: x)

    def avg_pool(self, x: int, stride: int, padding: str) -> int:
        return x

    def add(self, a: int, b: int) -> int:
        return a

    mul = add


def tf_same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class TorchOps:
    """NCHW float64 reference with TF semantics, written from the TF op definitions."""

    def t(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=REF_DTYPE))

    def channels(self, x: torch.Tensor) -> int:
        return x.shape[1]

    def conv(self, x: torch.Tensor, kernel: np.ndarray, stride: int, padding: str) -> torch.Tensor:
        k = kernel.shape[0]
        if padding == "SAME":
            t, b = tf_same_pads(x.shape[2], k, stride)
            left, right = tf_same_pads(x.shape[3], k, stride)
            x = F.pad(x, (left, right, t, b))
        return F.conv2d(x, self.t(kernel).permute(3, 2, 0, 1), stride=stride)

    def pad(self, x: torch.Tensor, beg: int, end: int) -> torch.Tensor:
        return F.pad(x, (beg, end, beg, end))

    def bn(self, x: torch.Tensor, gamma: np.ndarray, beta: np.ndarray | None, mean: np.ndarray,
           var: np.ndarray) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - self.t(mean).view(shape)) / torch.sqrt(self.t(var).view(shape) + BN_EPS) * self.t(gamma).view(shape)
        return y if beta is None else y + self.t(beta).view(shape)

    def relu(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)

    def max_pool_same(self, x: torch.Tensor) -> torch.Tensor:
        t, b = tf_same_pads(x.shape[2], 3, 2)
        left, right = tf_same_pads(x.shape[3], 3, 2)
        return F.max_pool2d(F.pad(x, (left, right, t, b), value=-math.inf), 3, 2)

    def avg_pool(self, x: torch.Tensor, stride: int, padding: str) -> torch.Tensor:
        if padding == "VALID":
            return F.avg_pool2d(x, 2, stride)
        return naive_avg_pool_same(x, 2, stride)

    def split2(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x.chunk(2, dim=1)
        return a, b

    def mean_hw(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)

    def global_pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))

    def softmax2(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.softmax(torch.stack([a, b]), dim=0)
        return w[0], w[1]

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    def mul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b

    def dense(self, x: torch.Tensor, kernel: np.ndarray, bias: np.ndarray | None = None) -> torch.Tensor:
        y = x @ self.t(kernel)
        return y if bias is None else y + self.t(bias)


def naive_avg_pool_same(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """TF SAME average pooling: the mean over the window's cells inside the image only."""
    h, w = x.shape[-2:]
    top, _ = tf_same_pads(h, k, s)
    left, _ = tf_same_pads(w, k, s)
    out = torch.empty(*x.shape[:-2], math.ceil(h / s), math.ceil(w / s), dtype=x.dtype)
    for i in range(out.shape[-2]):
        r0, r1 = max(i * s - top, 0), min(i * s - top + k, h)
        for j in range(out.shape[-1]):
            c0, c1 = max(j * s - left, 0), min(j * s - left + k, w)
            out[..., i, j] = x[..., r0:r1, c0:c1].mean((-2, -1))
    return out


def naive_max_pool_same(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, _ = tf_same_pads(h, k, s)
    left, _ = tf_same_pads(w, k, s)
    out = torch.empty(*x.shape[:-2], math.ceil(h / s), math.ceil(w / s), dtype=x.dtype)
    for i in range(out.shape[-2]):
        r0, r1 = max(i * s - top, 0), min(i * s - top + k, h)
        for j in range(out.shape[-1]):
            c0, c1 = max(j * s - left, 0), min(j * s - left + k, w)
            out[..., i, j] = x[..., r0:r1, c0:c1].amax((-2, -1))
    return out


class RandomVariables:
    """Creates each variable on first use with values that keep activations O(1)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.values: dict[str, np.ndarray] = {}
        self.kinds: dict[str, str] = {}

    def get(self, name: str, shape: tuple[int, ...], kind: str) -> np.ndarray:
        assert name not in self.values, f"variable {name} created twice"
        r = self.rng
        if kind in ("conv", "dense"):  # uniform with variance 1 / fan_in
            bound = np.float32(math.sqrt(3.0 / int(np.prod(shape[:-1]))))
            v = (r.random(shape, dtype=np.float32) * 2 - 1) * bound
        elif kind == "gamma":
            v = r.uniform(0.5, 1.0, shape)
        elif kind == "gamma_last":
            v = r.uniform(0.1, 0.4, shape)
        elif kind == "var":
            v = r.uniform(0.5, 1.5, shape)
        else:  # beta, mean, bias
            v = r.normal(0.0, 0.1, shape)
        self.values[name] = v = np.asarray(v, dtype=np.float32)
        self.kinds[name] = kind
        return v


class Stored:
    """Reads variables of an existing checkpoint, checking the shape the network expects."""

    def __init__(self, values: Any) -> None:
        self.values = values

    def get(self, name: str, shape: tuple[int, ...], kind: str) -> np.ndarray:
        v = np.asarray(self.values[name])
        assert v.shape == shape, (name, v.shape, shape)
        return v


def official_variables(depth: int, width: float, sk: bool, num_classes: int, seed: int = 0,
                       prefix: str = "", cifar_stem: bool = False) -> RandomVariables:
    """Every network variable of the official model, in TF creation order, with random values."""
    variables = RandomVariables(seed)
    net = OfficialNet(ChannelOps(), variables, prefix)
    h = net.backbone(3, depth, width, sk, cifar_stem)
    net.projection_head(h)
    if num_classes and not prefix:
        net.supervised_head(h, num_classes)
    return variables


def reference_outputs(values: Any, x: torch.Tensor, depth: int, width: float, sk: bool, ema: bool = False,
                      cifar_stem: bool = False) -> dict[str, torch.Tensor]:
    """features, head outputs [h, out_1, out_2, z] and logits from h (0) and out_1 (1)."""
    net = OfficialNet(TorchOps(), Stored(values), "ema_model/" if ema else "")
    h = net.backbone(x.to(torch.float64 if REF_DTYPE == np.float64 else torch.float32), depth, width, sk, cifar_stem)
    outs = net.projection_head(h)
    return {"features": h, "head": outs, "logits_1": net.supervised_head(outs[1], NUM_CLASSES),
            "logits_0": net.supervised_head(h, NUM_CLASSES)}


NUM_CLASSES = 10
TRAINABLE_KINDS = ("conv", "dense", "gamma", "gamma_last", "beta", "bias")


def build_checkpoint_tensors(depth: int, width: int, sk: bool, ema: bool, momentum: bool) -> dict[str, Any]:
    live = official_variables(depth, width, sk, NUM_CLASSES, seed=1)
    tensors: dict[str, np.ndarray] = dict(live.values)
    if ema:
        ema_vars = official_variables(depth, width, sk, 0, seed=2, prefix="ema_model/")
        tensors.update(ema_vars.values)
    if momentum:  # LARS/Momentum slots of the trainable variables, same shapes
        for name, kind in live.kinds.items():
            if kind in TRAINABLE_KINDS:
                tensors[name + "/Momentum"] = np.zeros_like(live.values[name])
    tensors["global_step"] = np.array(250228 if ema else 751, dtype=np.int64)
    tensors["memory"] = np.random.default_rng(3).standard_normal((64, 128)).astype(np.float32)
    tensors["memory_ptr"] = np.array(5, dtype=np.int64)
    return {"tensors": tensors, "live": live}


@pytest.fixture(scope="module")
def r50_sk0(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    built = build_checkpoint_tensors(50, 1, False, ema=False, momentum=True)
    folder = tmp_path_factory.mktemp("ckpt") / "finetuned_1pct" / "r50_1x_sk0"
    built["prefix"] = write_tf_checkpoint(folder / "model.ckpt-751", built["tensors"])
    return built


@pytest.fixture(scope="module")
def r50_sk1(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    built = build_checkpoint_tensors(50, 1, True, ema=True, momentum=False)
    folder = tmp_path_factory.mktemp("ckpt") / "pretrained" / "r50_1x_sk1"
    built["prefix"] = write_tf_checkpoint(folder / "model.ckpt-250228", built["tensors"])
    return built


# --------------------------------------------------------------------------------------------
# Tensor bundle format
# --------------------------------------------------------------------------------------------


def naive_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def test_crc32c_matches_standard_vectors_and_bitwise_reference() -> None:
    # RFC 3720 (iSCSI) test vectors
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    data = np.random.default_rng(0).integers(0, 256, 70_001, dtype=np.uint8).tobytes()  # lane path
    assert crc32c(data) == naive_crc32c(data)
    assert crc32c(data[1000:], crc32c(data[:1000])) == crc32c(data)
    assert crc32c(data) != zlib.crc32(data)  # not the IEEE polynomial


# Written by TensorFlow 2.21 (tf.compat.v1.train.Saver, global_step=7): variables
# base_model/conv2d/kernel = arange(24).reshape(1, 2, 3, 4) float32, base_model/
# batch_normalization/gamma = ones(3) float32, dbl = arange(3) float64, i32 = arange(3) int32,
# scalar = 3.5 float32, global_step = 0 int64.
TF_INDEX_HEX = (
    "00000608011a02080100240f626173655f6d6f64656c2f62617463685f6e6f726d616c697a6174696f6e2f67616d6d61"
    "0801120412020803280c35796e80210b0d1d636f6e7632642f6b65726e656c0801121012020801120208021202080312"
    "020804200c286035dcdfe4ab00031164626c0802120412020803206c28183533ce3efa000b0e676c6f62616c5f737465"
    "7008091200208401280835290398070003126933320803120412020803208c01280c354fa57a7a00060e7363616c6172"
    "08011200209801280435d8fd7d89000000000100000000ef3afc43000000000100000000c0f2a1b00001037400d60100"
    "0000000100000000b5946ffbdb0108e8010f000000000000000000000000000000000000000000000000000000000000"
    "0000000057fb808b247547db"
)
TF_DATA_HEX = (
    "0000803f0000803f0000803f000000000000803f0000004000004040000080400000a0400000c0400000e04000000041"
    "00001041000020410000304100004041000050410000604100007041000080410000884100009041000098410000a041"
    "0000a8410000b0410000b8410000000000000000000000000000f03f0000000000000040000000000000000000000000"
    "010000000200000000006040"
)


def test_reads_a_checkpoint_written_by_tensorflow(tmp_path: Path) -> None:
    (tmp_path / "model.ckpt-7.index").write_bytes(bytes.fromhex(TF_INDEX_HEX))
    (tmp_path / "model.ckpt-7.data-00000-of-00001").write_bytes(bytes.fromhex(TF_DATA_HEX))
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "/gone/elsewhere/model.ckpt-7"\n')
    got = read_tf_checkpoint(tmp_path)  # directory -> state file -> base name
    assert list(got) == sorted(got)
    np.testing.assert_array_equal(got["base_model/conv2d/kernel"], np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4))
    np.testing.assert_array_equal(got["base_model/batch_normalization/gamma"], np.ones(3, np.float32))
    assert got["dbl"].dtype == np.float64 and got["dbl"].tolist() == [0, 1, 2]
    assert got["i32"].dtype == np.int32 and got["i32"].tolist() == [0, 1, 2]
    assert got["global_step"].dtype == np.int64 and got["global_step"].shape == ()
    assert got["scalar"] == np.float32(3.5)
    # our writer produces byte-identical files for the same tensors
    write_tf_checkpoint(tmp_path / "ours" / "model.ckpt-7", got)
    assert (tmp_path / "ours" / "model.ckpt-7.data-00000-of-00001").read_bytes() == bytes.fromhex(TF_DATA_HEX)
    ours = read_tf_checkpoint(tmp_path / "ours" / "model.ckpt-7.index")
    assert all(np.array_equal(ours[k], v) and ours[k].dtype == v.dtype for k, v in got.items())


def test_writer_reader_roundtrip_many_blocks_and_dtypes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # small table blocks, so that a few hundred names need several data blocks and a
    # multi-entry index block (TF's 256 KiB blocks are exercised in the TensorFlow test)
    monkeypatch.setattr(_tf_writer, "_BLOCK_SIZE", 4096)
    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {
        "a/f32": rng.standard_normal((300, 70)).astype(np.float32),
        "a/f64": rng.standard_normal((5,)),
        "a/i64": np.arange(-3, 9, dtype=np.int64).reshape(3, 4),
        "a/i32": np.array([-(2**31), 2**31 - 1], dtype=np.int32),
        "a/f16": np.array([1.5, -2.0], dtype=np.float16),
        "a/bool": np.array([True, False, True]),
        "a/scalar": np.float32(-0.25),
        "a/empty": np.zeros((0, 4), np.float32),
    }
    tensors.update({f"many/{i:05d}/" + "x" * 40: np.full((2,), i, np.float32) for i in range(400)})
    prefix = write_tf_checkpoint(tmp_path / "model.ckpt-3", tensors)
    assert (tmp_path / "model.ckpt-3.index").stat().st_size > 5 * 4096
    ckpt = TFCheckpoint(tmp_path)
    assert len(ckpt) == len(tensors) and ckpt.prefix == prefix
    assert ckpt.shapes["a/f32"] == (300, 70) and ckpt.shapes["a/scalar"] == ()
    for name, value in tensors.items():
        got = ckpt[name]
        assert got.dtype == np.asarray(value).dtype and np.array_equal(got, value), name
    for path in (prefix, f"{prefix}.index", f"{prefix}.data-00000-of-00001"):
        assert TFCheckpoint(path).prefix == prefix
    with pytest.raises(FileNotFoundError, match="no TF checkpoint"):
        TFCheckpoint(tmp_path / "model.ckpt-4")
    # a flipped byte in the tensor data is caught by the CRC
    data = tmp_path / "model.ckpt-3.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[ckpt.entries["a/f32"].offset + 5] ^= 0x40
    ckpt.close()
    data.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum mismatch"):
        TFCheckpoint(prefix)["a/f32"]
    assert TFCheckpoint(prefix, verify=False)["a/f32"].shape == (300, 70)


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def tf_to_torch(name: str, value: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(value, dtype=np.float32))
    if name.endswith("/kernel") and t.dim() == 4:
        return t.permute(3, 2, 0, 1)
    if name.endswith("/kernel"):
        return t.t()
    return t


def check_every_tensor(model: torch.nn.Module, report: Any, tensors: dict[str, np.ndarray],
                       expected_sources: set[str]) -> None:
    """Each expected TF tensor landed, unchanged up to layout, in exactly one model tensor."""
    assert report.unused == [] and report.missing == []
    assert set(report.mapping) == expected_sources
    state = model.state_dict()
    targets = list(report.mapping.values())
    assert len(set(targets)) == len(targets)  # one TF tensor per model tensor
    for tf_name, key in report.mapping.items():
        assert torch.equal(state[key], tf_to_torch(tf_name, tensors[tf_name])), (tf_name, key)
    # the only model entries not filled: BN batch counters (and a zero bias buffer, if the
    # beta-less BN keeps one)
    for key in set(state) - set(targets):
        assert key.endswith("num_batches_tracked") or (key.endswith(".bias") and not state[key].any()), key
    assert not any(k.startswith("proj_head.layers.2.") and k.endswith(".bias") for k in targets)
    # everything else in the checkpoint was ignored for a reason
    assert set(report.ignored) == set(tensors) - expected_sources


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["r50_1x_sk0", "r50_1x_sk1"])
def test_convert_maps_every_tensor_and_matches_tf_semantics(variant: str, request: pytest.FixtureRequest) -> None:
    built = request.getfixturevalue("r50_sk0" if variant.endswith("sk0") else "r50_sk1")
    sk = variant.endswith("sk1")
    ckpt = TFCheckpoint(built["prefix"], verify=False)  # CRCs: the CLI test and the format tests
    model, report = convert_checkpoint(ckpt, ft_proj_selector=1)
    assert model.name == variant and report.model_name == variant
    arch = report.architecture
    assert (arch.depth, arch.width, arch.sk, arch.cifar_stem) == (50, 1.0, sk, False)
    assert model.config["tf_padding"] is True and not model.training
    live = built["live"].values
    check_every_tensor(model, report, built["tensors"], set(live))
    # 53 (sk0) / 87 (sk1) convs, each BN 4 tensors, head 3 kernels + 11 BN tensors, classifier 2
    n_conv = sum(1 for n in live if n.endswith("/kernel") and n.startswith("base_model/"))
    assert n_conv == (53 if not sk else 3 + 4 + 16 * 5)
    assert len(report.mapping) == len(live) == n_conv + 4 * sum(1 for n in live if n.endswith("moving_mean")
                                                               and n.startswith("base_model/")) + 3 + 11 + 2
    reasons = set(report.ignored.values())
    assert {"global_step", "memory (negatives queue)"} <= reasons
    assert ("EMA copy (convert with --ema to use it)" in reasons) == sk
    assert ("optimizer slot" in reasons) != sk

    # 64 px: even max-pool input (32, TF pads bottom/right only); 34 px: odd max-pool input
    # (17) and odd maps (9, 5, 3) at the strided SK avg-pool shortcuts
    size = 34 if sk else 64
    x = torch.rand(2 if sk else 1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
        z = model.proj_head(out["features"])[-1]  # the whole head, final 128-d output
    ref = reference_outputs(built["tensors"], x, 50, 1, sk)
    assert ref["features"].abs().max() > 0.1  # activations neither vanished ...
    assert ref["features"].abs().max() < 100  # ... nor exploded
    torch.testing.assert_close(out["features"].double(), ref["features"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out["proj"].double(), ref["head"][1], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out["logits"].double(), ref["logits_1"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(z.double(), ref["head"][3], atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_convert_ema_uses_the_ema_copies(r50_sk1: dict[str, Any]) -> None:
    tensors = r50_sk1["tensors"]
    model, report = convert_checkpoint(TFCheckpoint(r50_sk1["prefix"], verify=False), ema=True, ft_proj_selector=0)
    ema_sources = {n for n in tensors if n.startswith("ema_model/") and not n.endswith("/Momentum")}
    sup = {"head_supervised/linear_layer/dense/kernel", "head_supervised/linear_layer/dense/bias"}
    check_every_tensor(model, report, tensors, ema_sources | sup)
    assert report.ema_fallback == [] and report.ft_proj_selector == 0
    assert sum(r == "live copy (EMA weights used)" for r in report.ignored.values()) == len(ema_sources)
    x = torch.rand(1, 3, 34, 34, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
    ref = reference_outputs(tensors, x, 50, 1, True, ema=True)
    torch.testing.assert_close(out["features"].double(), ref["features"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out["logits"].double(), ref["logits_0"], atol=2e-5, rtol=1e-5)


def shapes_only(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zero-stride stand-ins: the right shapes without the memory (for refusal tests)."""
    return {k: np.broadcast_to(np.float32(0), np.shape(v)) for k, v in values.items()}


def test_infers_every_released_architecture_from_names_and_shapes() -> None:
    for depth in (50, 101, 152):
        for width, sk in ((1, False), (1, True), (2, False), (2, True), (3, True)):
            if width == 3 and depth != 152:
                continue
            arch = infer_architecture(_official_shapes(depth, width, sk))
            assert (arch.depth, arch.width, arch.sk, arch.cifar_stem) == (depth, width, sk, False)


def _official_shapes(depth: int, width: int, sk: bool) -> dict[str, tuple[int, ...]]:
    class ShapeVariables:
        def __init__(self) -> None:
            self.values: dict[str, tuple[int, ...]] = {}

        def get(self, name: str, shape: tuple[int, ...], kind: str) -> np.ndarray:
            self.values[name] = shape
            return np.broadcast_to(np.float32(0), shape)

    recorder = ShapeVariables()
    OfficialNet(ChannelOps(), recorder).backbone(3, depth, width, sk)
    return recorder.values


def test_refuses_checkpoints_that_match_no_variant() -> None:
    values = official_variables(50, 1, False, NUM_CLASSES).values
    # drop the last bottleneck block (3 convs, 3 BNs): 15 blocks is no ResNet depth
    n_conv = sum(n.startswith("base_model/conv2d") for n in values)
    n_bn = sum(n.startswith("base_model/batch_normalization") and n.endswith("/gamma") for n in values)
    assert (n_conv, n_bn) == (53, 53)
    drop = {f"base_model/conv2d_{i}/kernel" for i in range(n_conv - 3, n_conv)}
    drop |= {f"base_model/batch_normalization_{i}/{f}" for i in range(n_bn - 3, n_bn)
             for f in ("gamma", "beta", "moving_mean", "moving_variance")}
    assert drop <= set(values)
    truncated = {k: v for k, v in shapes_only(values).items() if k not in drop}
    with pytest.raises(ConversionError, match=r"^15 bottleneck blocks match no ResNet depth"):
        convert_checkpoint(truncated)
    # ResNet-50 at width 0.75 (48 stem channels) is no registered model
    narrow = {k: v for k, v in _official_shapes(50, 1, False).items()}
    narrow = {k: np.broadcast_to(np.float32(0), tuple(int(d * 0.75) if d >= 64 else d for d in s))
              for k, s in narrow.items()}
    with pytest.raises(ConversionError, match="ResNet-50 0.75x without SK .* matches no registered model"):
        convert_checkpoint(narrow)
    # a classifier that fits no head output
    bad = shapes_only(values)
    bad["head_supervised/linear_layer/dense/kernel"] = np.broadcast_to(np.float32(0), (100, NUM_CLASSES))
    with pytest.raises(ConversionError, match="classifier takes 100 inputs"):
        convert_checkpoint(bad)
    with pytest.raises(ConversionError, match="no base_model/conv2d"):
        convert_checkpoint({"global_step": np.array(1)})
    with pytest.raises(ConversionError, match="no ema_model/base_model"):
        convert_checkpoint(shapes_only(values), ema=True)


def test_cifar_stem_checkpoint_converts_to_the_small_variant(tmp_path: Path) -> None:
    values = official_variables(50, 0.5, True, NUM_CLASSES, cifar_stem=True).values
    model, report = convert_checkpoint(values, ft_proj_selector=0)
    assert model.name == "r50_0.5x_sk1" and model.config["cifar_stem"] and report.ft_proj_selector == 0
    check_every_tensor(model, report, values, set(values))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(x)
    ref = reference_outputs(values, x, 50, 0.5, True, cifar_stem=True)
    torch.testing.assert_close(out["features"].double(), ref["features"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out["logits"].double(), ref["logits_0"], atol=2e-5, rtol=1e-5)
    with pytest.raises(CheckpointError, match="must end in .safetensors"):
        save_converted(model, report, tmp_path / "model.pt")


def tiny_tf_checkpoint(folder: Path, step: int = 30) -> dict[str, np.ndarray]:
    """A fine-tuned ResNet-10 0.25x TF checkpoint (CIFAR stem, 3-layer head, 10 classes) in
    ``folder``, with momentum slots and ``global_step``: small enough to serve, convert and train."""
    live = official_variables(10, 0.25, False, NUM_CLASSES, seed=5, cifar_stem=True)
    tensors = dict(live.values)
    tensors.update({f"{n}/Momentum": np.zeros_like(v) for n, v in live.values.items()
                    if live.kinds[n] in TRAINABLE_KINDS})
    tensors["global_step"] = np.array(step, dtype=np.int64)
    write_tf_checkpoint(folder / f"model.ckpt-{step}", tensors)
    return tensors


def test_basic_block_checkpoint_converts_with_tf_outputs(tmp_path: Path) -> None:
    tensors = tiny_tf_checkpoint(tmp_path / "finetuned_10pct" / "r10_0.25x_sk0")
    model, report = convert_checkpoint(TFCheckpoint(tmp_path / "finetuned_10pct" / "r10_0.25x_sk0"),
                                       ft_proj_selector=1)
    assert model.name == "r10_0.25x_sk0" and report.unused == [] and report.missing == []
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = model(x)
    ref = reference_outputs(tensors, x, 10, 0.25, False, cifar_stem=True)
    assert ref["features"].abs().max() > 0.1
    torch.testing.assert_close(out["features"].double(), ref["features"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out["logits"].double(), ref["logits_1"], atol=2e-5, rtol=1e-5)


def test_missing_tensors_are_refused_or_reported() -> None:
    values = dict(official_variables(50, 0.5, False, NUM_CLASSES, cifar_stem=True).values)
    del values["head_contrastive/nl_1/batch_normalization/moving_variance"]
    with pytest.raises(ConversionError, match="1 model tensors have no counterpart"):
        convert_checkpoint(values, ft_proj_selector=0)
    values["unexpected/variable"] = np.zeros(3, np.float32)
    model, report = convert_checkpoint(values, strict=False, ft_proj_selector=0)
    assert report.missing == ["proj_head.layers.1.bn.running_var"]
    assert report.unused == ["unexpected/variable"]
    assert torch.equal(model.proj_head.layers[1].bn.running_var, torch.ones(1024))  # fresh init kept


def test_selector_guess_from_release_folders(tmp_path: Path) -> None:
    assert guess_ft_proj_selector("/x/finetuned_1pct/r50_1x_sk0/model.ckpt-751") == 1
    assert guess_ft_proj_selector("/x/finetuned_10pct/r50_1x_sk0") == 1
    assert guess_ft_proj_selector("/x/finetuned_100pct/r50_1x_sk0") == 0
    assert guess_ft_proj_selector("/x/pretrained/r50_1x_sk0") == 0
    assert guess_ft_proj_selector("/x/supervised/r50_1x_sk0") == 0
    assert guess_ft_proj_selector(tmp_path / "r50_1x_sk0") is None  # copied with `gsutil cp -r .../r50_1x_sk0 .`


@pytest.mark.slow
def test_selector_is_required_when_neither_checkpoint_nor_path_tells(r50_sk0: dict[str, Any], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # the fine-tuned fixture copied without its category folder: the classifier's 2048 inputs fit
    # the features and both middle head layers, so nothing says which one it reads
    copied = tmp_path / "r50_1x_sk0"
    copied.mkdir()
    for f in Path(r50_sk0["prefix"]).parent.iterdir():
        (copied / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "m.safetensors"
    with pytest.raises(ConversionError, match=r"^cannot tell which head output feeds the classifier: its 2048 "
                                              r"inputs fit outputs 0, 1 and 2, .*ft_proj_selector=1 for a finetuned_1pct"):
        convert_main([f"tf_checkpoint={copied}", f"out={out}"])
    assert not out.exists() and not out.with_suffix(".json").exists()
    from simclrv2.cli import main as cli_main

    assert cli_main(["convert", f"tf_checkpoint={copied}", f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot tell which head output")
    assert convert_main(["--tf-checkpoint", str(copied), "--out", str(out), "--ft-proj-selector", "1"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["ft_proj_selector"] == 1
    # one width that fits: the checkpoint tells (a classifier on the 128-d output)
    values = dict(shapes_only(r50_sk0["live"].values))
    values[SUP_KERNEL] = np.broadcast_to(np.float32(0), (128, NUM_CLASSES))
    _, report = convert_checkpoint(values)
    assert report.ft_proj_selector == 3 and "only head output as wide" in report.notes[0]
    # no classifier: the selector only picks `proj`; the features, as in pretraining checkpoints
    no_cls = {k: v for k, v in shapes_only(r50_sk0["live"].values).items() if not k.startswith("head_supervised/")}
    assert convert_checkpoint(no_cls)[1].ft_proj_selector == 0


SUP_KERNEL = "head_supervised/linear_layer/dense/kernel"


def test_missing_last_head_layer_is_an_error_unless_allowed() -> None:
    values = dict(official_variables(50, 0.5, False, NUM_CLASSES, cifar_stem=True).values)
    short = {k: v for k, v in values.items() if not k.startswith("head_contrastive/nl_2/")}
    with pytest.raises(ConversionError, match=r"^the projection head stops at head_contrastive/nl_1, which has a "
                                              r"BN beta, so its final layer is missing; .*allow_short_head=true"):
        convert_checkpoint(short, ft_proj_selector=1)
    model, report = convert_checkpoint(short, ft_proj_selector=1, allow_short_head=True)
    assert report.num_proj_layers == 2 and report.unused == ["head_contrastive/nl_1/batch_normalization/beta"]
    assert any("short head" in n for n in report.notes)
    # the layers before the lost one still give TF's outputs
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(x)
    ref = reference_outputs(values, x, 50, 0.5, False, cifar_stem=True)
    torch.testing.assert_close(out["proj"].double(), ref["head"][1], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out["logits"].double(), ref["logits_1"], atol=2e-5, rtol=1e-5)
    # a complete 2-layer head (SimCLRv1 style: its last layer has no beta) is not short
    two = {k: v for k, v in short.items() if k != "head_contrastive/nl_1/batch_normalization/beta"}
    two["head_contrastive/nl_1/dense/kernel"] = values["head_contrastive/nl_1/dense/kernel"][:, :128]
    for f in ("gamma", "moving_mean", "moving_variance"):
        two[f"head_contrastive/nl_1/batch_normalization/{f}"] = values[f"head_contrastive/nl_1/batch_normalization/{f}"][:128]
    assert convert_checkpoint(two, ft_proj_selector=1)[1].num_proj_layers == 2


def test_checkpoint_file_naming_a_missing_step_is_an_error(tmp_path: Path) -> None:
    tensors = {"base_model/conv2d/kernel": np.zeros((3, 3, 3, 8), np.float32)}
    folder = tmp_path / "r50_1x_sk0"
    write_tf_checkpoint(folder / "model.ckpt-100", tensors)
    write_tf_checkpoint(folder / "model.ckpt-2000", tensors, write_state_file=False)
    assert tfcheckpoint.resolve_checkpoint_prefix(folder).name == "model.ckpt-100"  # state file wins
    (folder / "checkpoint").write_text('model_checkpoint_path: "gs://bucket/run/model.ckpt-250228"\n')
    with pytest.raises(FileNotFoundError, match=r"checkpoint names model.ckpt-250228, but model.ckpt-250228.index "
                                                r"is not in .*checkpoints present: model.ckpt-100, model.ckpt-2000\)"):
        TFCheckpoint(folder)
    (folder / "checkpoint").unlink()  # no state file: the highest step
    assert tfcheckpoint.resolve_checkpoint_prefix(folder).name == "model.ckpt-2000"


@pytest.mark.slow
def test_cli_convert_then_load_pretrained(r50_sk0: dict[str, Any], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r50_1x_sk0.safetensors"
    folder = Path(r50_sk0["prefix"]).parent  # .../finetuned_1pct/r50_1x_sk0 -> selector 1
    assert convert_main(["--tf-checkpoint", str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "0 unused, 0 missing" in printed and "ft_proj_selector=1" in printed
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["format"] == "simclrv2-model" and meta["format_version"] == 1
    assert meta["model_name"] == "r50_1x_sk0" and meta["num_classes"] == NUM_CLASSES
    assert meta["model_config"]["tf_padding"] is True and meta["ft_proj_selector"] == 1
    assert meta["source"]["global_step"] == 751
    model = load_pretrained(out)
    assert not model.training and model.classifier is not None and model.name == "r50_1x_sk0"
    # the file holds exactly what the in-memory conversion produces
    direct, _ = convert_checkpoint(r50_sk0["tensors"], ft_proj_selector=1)
    loaded_state, direct_state = model.state_dict(), direct.state_dict()
    assert loaded_state.keys() == direct_state.keys()
    assert all(torch.equal(loaded_state[k], direct_state[k]) for k in direct_state)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = model(x), direct(x)
    assert set(got) == {"features", "proj", "logits"} and got["proj"].shape == (1, 2048)
    for k in got:  # same weights; only the kernels' summation order may differ
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6)


def test_help_explains_download_to_finetune(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "gs://simclr-checkpoints/simclrv2/<category>/<model>/" in text
    assert "gsutil -m cp -r gs://simclr-checkpoints/simclrv2/pretrained/r50_1x_sk1 ." in text
    assert "simclrv2 convert tf_checkpoint=" in text and "simclrv2 finetune init_checkpoint=" in text
    assert "[0, 1]" in text


# --------------------------------------------------------------------------------------------
# TF "SAME" padding (METHOD.md 1.5)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 9, 16, 17])
def test_tf_padding_pools_match_tf_same_definition(size: int) -> None:
    x = torch.randn(2, 3, size, size + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(size))
    torch.testing.assert_close(MaxPoolSame(tf_padding=True)(x), naive_max_pool_same(x, 3, 2))
    torch.testing.assert_close(AvgPoolShortcut(1, tf_padding=True)(x), naive_avg_pool_same(x, 2, 1))
    # stride 2: explicit bottom/right zero pad, then VALID (identical in both modes)
    valid = F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), 2, 2)
    torch.testing.assert_close(AvgPoolShortcut(2, tf_padding=True)(x), valid)
    if size % 2 == 0:
        # PyTorch's symmetric padding shifts the max-pool windows on even inputs
        assert not torch.allclose(MaxPoolSame(tf_padding=False)(x), naive_max_pool_same(x, 3, 2))
    assert not torch.allclose(AvgPoolShortcut(1, tf_padding=False)(x), naive_avg_pool_same(x, 2, 1))


# --------------------------------------------------------------------------------------------
# TensorFlow itself (skipped when TensorFlow is not installed: pip install simclrv2[convert])
# --------------------------------------------------------------------------------------------


def import_tensorflow() -> Any:
    """``tensorflow``, or skip. torch's meta-device code path lazily imports triton (where
    installed), and triton's native library segfaults when it loads after TensorFlow's; so
    that path runs once before TensorFlow is imported."""
    with torch.device("meta"):
        torch.nn.init.normal_(torch.empty(2))
    return pytest.importorskip("tensorflow")


class TFOps:
    """NHWC TensorFlow ops, as the official code calls them (eager, float32)."""

    def __init__(self, tf: Any) -> None:
        self.tf = tf

    def channels(self, x: Any) -> int:
        return int(x.shape[-1])

    def conv(self, x: Any, kernel: np.ndarray, stride: int, padding: str) -> Any:
        return self.tf.nn.conv2d(x, kernel, strides=stride, padding=padding)

    def pad(self, x: Any, beg: int, end: int) -> Any:
        return self.tf.pad(x, [[0, 0], [beg, end], [beg, end], [0, 0]])

    def bn(self, x: Any, gamma: np.ndarray, beta: np.ndarray | None, mean: np.ndarray, var: np.ndarray) -> Any:
        return self.tf.nn.batch_normalization(x, mean, var, beta, gamma, BN_EPS)

    def relu(self, x: Any) -> Any:
        return self.tf.nn.relu(x)

    def max_pool_same(self, x: Any) -> Any:
        return self.tf.nn.max_pool2d(x, 3, 2, "SAME")

    def avg_pool(self, x: Any, stride: int, padding: str) -> Any:
        return self.tf.nn.avg_pool2d(x, 2, stride, padding)

    def split2(self, x: Any) -> tuple[Any, Any]:
        a, b = self.tf.split(x, 2, axis=-1)
        return a, b

    def mean_hw(self, x: Any) -> Any:
        return self.tf.reduce_mean(x, [1, 2], keepdims=True)

    def global_pool(self, x: Any) -> Any:
        return self.tf.reduce_mean(x, [1, 2])

    def softmax2(self, a: Any, b: Any) -> tuple[Any, Any]:
        w = self.tf.nn.softmax(self.tf.stack([a, b]), axis=0)
        return w[0], w[1]

    def add(self, a: Any, b: Any) -> Any:
        return a + b

    def mul(self, a: Any, b: Any) -> Any:
        return a * b

    def dense(self, x: Any, kernel: np.ndarray, bias: np.ndarray | None = None) -> Any:
        y = self.tf.matmul(x, kernel)
        return y if bias is None else y + bias


@pytest.mark.slow
def test_tensorflow_reads_our_checkpoints_and_we_read_its(tmp_path: Path, r50_sk1: dict[str, Any]) -> None:
    tf = import_tensorflow()
    # TF reads ours: the whole r50_1x_sk1 fixture (names, shapes, dtypes), a sample of values
    reader = tf.train.load_checkpoint(str(r50_sk1["prefix"]))
    listed = dict(tf.train.list_variables(str(r50_sk1["prefix"])))
    tensors = r50_sk1["tensors"]
    assert listed.keys() == tensors.keys()
    assert all(tuple(listed[k]) == np.shape(v) for k, v in tensors.items())
    for name in list(tensors)[::7] + ["global_step", "head_contrastive/nl_0/dense/kernel"]:
        got = reader.get_tensor(name)
        assert got.dtype == tensors[name].dtype and np.array_equal(got, tensors[name]), name
    assert tf.train.latest_checkpoint(str(Path(r50_sk1["prefix"]).parent)) == str(r50_sk1["prefix"])

    # we read TF's: a TF1 Saver checkpoint with large tensors and > 256 KiB of index entries
    rng = np.random.default_rng(5)
    expected = {
        "base_model/conv2d/kernel": rng.standard_normal((7, 7, 3, 64)).astype(np.float32),
        "base_model/conv2d_1/kernel": rng.standard_normal((3, 3, 256, 512)).astype(np.float32),
        "head_supervised/linear_layer/dense/bias": rng.standard_normal(1000).astype(np.float32),
        "x/f64": rng.standard_normal((3, 5)),
        "x/i32": np.arange(-5, 5, dtype=np.int32),
    }
    expected.update({f"many/{i:05d}/" + "y" * 40: np.full((3,), i, np.float32) for i in range(5000)})
    tf1 = tf.compat.v1
    graph = tf1.Graph()
    with graph.as_default():
        variables = [tf1.Variable(v, name=k) for k, v in expected.items()]
        step = tf1.train.get_or_create_global_step()
        saver = tf1.train.Saver(variables + [step])
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            saver.save(sess, str(tmp_path / "tf" / "model.ckpt"), global_step=42)
    assert TFCheckpoint(tmp_path / "tf").prefix == tmp_path / "tf" / "model.ckpt-42"
    got = read_tf_checkpoint(tmp_path / "tf")
    assert got.keys() == expected.keys() | {"global_step"} and got["global_step"] == 0
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name


@pytest.mark.parametrize("variant", ["r50_1x_sk0", "r50_1x_sk1"])
def test_outputs_match_tensorflow(variant: str, request: pytest.FixtureRequest) -> None:
    """Issue 8 acceptance: the converted model equals the same network built in TF from the
    checkpoint tensors (pooled features, selected head output, logits) within 1e-4."""
    tf = import_tensorflow()
    sk = variant.endswith("sk1")
    built = request.getfixturevalue("r50_sk1" if sk else "r50_sk0")
    ckpt = TFCheckpoint(built["prefix"], verify=False)
    model, _ = convert_checkpoint(ckpt, ft_proj_selector=1)
    values = built["tensors"]
    worst = {}
    for size in (64, 224):
        x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            out = model(x)
            z = model.proj_head(out["features"])[-1]
        net = OfficialNet(TFOps(tf), Stored(values))
        h = net.backbone(tf.constant(x.permute(0, 2, 3, 1).numpy()), 50, 1, sk)
        head = net.projection_head(h)
        logits = net.supervised_head(head[1], NUM_CLASSES)
        for key, ours, theirs in (("features", out["features"], h), ("proj", out["proj"], head[1]),
                                  ("logits", out["logits"], logits), ("z", z, head[3])):
            diff = float(np.abs(ours.numpy() - np.asarray(theirs)).max())
            worst[f"{key}@{size}"] = diff
            assert diff <= 1e-4, (variant, size, key, diff)
        if size == 64:  # the test can fail: PyTorch's symmetric pooling pads differ from TF's
            pools = [m for m in model.modules() if isinstance(m, (MaxPoolSame, AvgPoolShortcut))]
            for m in pools:
                m.tf_padding = False
            with torch.no_grad():
                shifted = model(x)["features"]
            for m in pools:
                m.tf_padding = True
            worst["features@64 without tf_padding"] = float(np.abs(shifted.numpy() - np.asarray(h)).max())
            assert worst["features@64 without tf_padding"] > 1e-3
    print(f"\n{variant} max |ours - TF|: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))


def test_an_unknown_backbone_tensor_is_refused_unless_strict_is_false(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # a backbone variable the built model has no place for: the checkpoint's network is another one
    from simclrv2.cli import main as cli_main

    folder = tmp_path / "finetuned_1pct" / "r10"  # the category tells ft_proj_selector=1
    tensors = tiny_tf_checkpoint(tmp_path / "plain")
    extra = "base_model/se_block/dense/kernel"  # e.g. squeeze-excitation, which our ResNet has not
    write_tf_checkpoint(folder / "model.ckpt-30", {**tensors, extra: np.ones((3, 3, 8, 8), np.float32)})
    out = tmp_path / "m.safetensors"
    assert cli_main(["convert", f"tf_checkpoint={folder}", f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and extra in err and "architecture differs" in err and "strict=false" in err, err
    assert not out.exists() and not out.with_suffix(".json").exists()  # nothing written
    with pytest.raises(ConversionError, match=f"1 checkpoint tensors under base_model/ .* first {extra}"):
        convert_checkpoint({**tensors, extra: np.ones((3, 3, 8, 8), np.float32)}, ft_proj_selector=1)
    ema_extra = {**tensors, **{f"ema_model/{n}": v for n, v in tensors.items() if n.startswith("base_model/")
                               or n.startswith("head_contrastive/")}, f"ema_model/{extra}": np.ones(1, np.float32)}
    with pytest.raises(ConversionError, match=f"first ema_model/{extra}"):
        convert_checkpoint(ema_extra, ema=True, ft_proj_selector=1)
    # strict=false converts it, lists it as unused, and the weights are those of the checkpoint without it
    assert cli_main(["convert", f"tf_checkpoint={folder}", f"out={out}", "strict=false"]) == 0
    assert f"unused: {extra}" in capsys.readouterr().out
    assert json.loads(out.with_suffix(".json").read_text())["conversion"]["unused"] == [extra]
    plain, report = convert_checkpoint(tensors, ft_proj_selector=1)
    assert report.unused == []
    loaded = load_pretrained(out)
    for key, value in plain.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

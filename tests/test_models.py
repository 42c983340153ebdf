"""Model zoo tests: Table-1 parameter counts, TF layout order, init, heads, TF padding (METHOD.md 1, 2, 8.2)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from simclrv2.models import (
    ProjectionHead,
    ResNet,
    SimCLRModel,
    count_backbone_params,
    create_model,
    list_models,
    model_info,
)
from simclrv2.models.heads import BatchNorm1dNoBeta
from simclrv2.models.registry import VARIANTS, format_models_table
from simclrv2.models.resnet import AvgPoolShortcut, MaxPoolSame, sk_mid_dim, tf_same_pads

# Paper Table 1 backbone sizes in millions (METHOD.md 9.1).
TABLE1_PARAMS_M = {
    "r50_1x_sk0": 24, "r50_1x_sk1": 35, "r50_2x_sk0": 94, "r50_2x_sk1": 140,
    "r101_1x_sk0": 43, "r101_1x_sk1": 65, "r101_2x_sk0": 170, "r101_2x_sk1": 257,
    "r152_1x_sk0": 58, "r152_1x_sk1": 89, "r152_2x_sk0": 233, "r152_2x_sk1": 354,
    "r152_3x_sk1": 795,
}
SMALL = [n for n in list_models() if VARIANTS[n]["cifar_stem"]]
# Built on CPU and run forward + backward; the other ImageNet-stem variants are checked on meta
# (shape inference only, too slow in Python for the 100+ block models: only the wide r50s run).
REAL_RUN = ["r50_1x_sk0", "r50_1x_sk1", *SMALL]
META_RUN = ["r50_2x_sk1"]
BLOCKS = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3],
          152: [3, 8, 36, 3], 200: [3, 24, 36, 3]}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # On a shared 2-core machine two intra-op threads spin against other processes and run these
    # tiny models ~20x slower than one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def meta_model(name: str) -> SimCLRModel:
    """Registry model on the meta device (shapes only, no memory), built once per test session."""
    with torch.device("meta"):
        return create_model(name)


@pytest.fixture(scope="module")
def real_models() -> dict[str, SimCLRModel]:
    torch.manual_seed(0)
    return {name: create_model(name) for name in REAL_RUN}


# --- registry ----------------------------------------------------------------------------


@pytest.mark.slow
def test_registry_has_table1_and_small_variants():
    names = list_models()
    assert set(TABLE1_PARAMS_M) <= set(names)
    for extra in ["r200_1x_sk0", "r18_1x_sk0", "r18_0.5x_sk0", "r18_0.25x_sk0", "r10_0.25x_sk0",
                  "r34_1x_sk0", "r50_0.5x_sk0", "r50_0.5x_sk1"]:
        assert extra in names
    for name in TABLE1_PARAMS_M:
        assert not VARIANTS[name]["cifar_stem"]
    table = format_models_table()
    for name in names:
        assert name in table


@pytest.mark.parametrize("name", list(TABLE1_PARAMS_M))
def test_table1_param_counts(name):
    info = model_info(name)
    assert round(info["backbone_params"] / 1e6) == TABLE1_PARAMS_M[name]


@pytest.mark.parametrize("name, tv_name", [("r50_1x_sk0", "resnet50"), ("r18_1x_sk0", "resnet18")])
def test_trainable_count_matches_torchvision(name, tv_name):
    # torchvision's ResNets are the same v1.5 layout (ImageNet stem, stride on the 3x3). One
    # difference: TF gives the first basic block of stage 1 a projection shortcut too (its
    # block_group always projects first), torchvision does not (64 -> 64, stride 1).
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        tv = getattr(torchvision.models, tv_name)()
    tv_count = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))
    with torch.device("meta"):
        model = create_model(name, cifar_stem=False)
    if VARIANTS[name]["depth"] < 50:
        tv_count += 64 * 64 + 2 * 64  # stage-1 projection: 1x1 conv 64 -> 64 + BN
    assert count_backbone_params(model, include_bn_stats=False) == tv_count


@pytest.mark.parametrize("name", list_models())
def test_meta_shapes_and_counts_over_registry(name):
    model = meta_model(name)
    info = model_info(name)
    depth, width = info["depth"], info["width"]
    expected_dim = int(512 * width) * (1 if depth < 50 else 4)
    assert model.backbone.feature_dim == info["feature_dim"] == expected_dim
    # Conv weights + BN gamma, beta, moving mean, moving variance (the TF variables, METHOD.md 1.7).
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    n_conv = sum(m.weight.numel() for m in convs)
    n_bn = sum(m.num_features for m in bns)
    assert count_backbone_params(model) == n_conv + 4 * n_bn == info["backbone_params"]
    assert count_backbone_params(model, include_bn_stats=False) == n_conv + 2 * n_bn
    assert info["backbone_trainable_params"] == n_conv + 2 * n_bn
    assert sum(p.numel() for p in model.backbone.parameters()) == n_conv + 2 * n_bn  # nothing else
    assert model.proj_head.dims == [expected_dim] * 3 + [128]


@pytest.mark.parametrize("name", META_RUN)
def test_meta_forward_shapes(name):
    model = meta_model(name)
    out = model(torch.empty(2, 3, 32, 32, device="meta"))
    assert out["features"].shape == (2, model.backbone.feature_dim)
    assert out["proj"].shape == (2, 128)
    assert "logits" not in out


def test_unknown_model_and_option_errors():
    with pytest.raises(ValueError, match="r9000_1x_sk0.*r50_1x_sk0"):
        create_model("r9000_1x_sk0")
    with pytest.raises(ValueError, match="r9000"):
        model_info("r9000")
    with pytest.raises(ValueError, match="colour"):
        create_model("r10_0.25x_sk0", colour=True)
    with pytest.raises(ValueError, match="Selective Kernel"):
        ResNet(depth=18, sk_ratio=0.0625)


def test_config_rebuilds_model():
    model = create_model("r10_0.25x_sk0", in_chans=1, num_classes=10, ft_proj_selector=1)
    assert model.config["name"] == "r10_0.25x_sk0"
    clone = SimCLRModel(**model.config)
    assert clone.config == model.config
    ref = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in clone.state_dict().items()} == ref
    model.reset_classifier(3)
    assert model.config["num_classes"] == 3 and model.config["zero_init_classifier"] is True
    model.reset_classifier(0)
    assert model.classifier is None and model.config["num_classes"] == 0


# --- TF layout (METHOD.md 8.2) ------------------------------------------------------------------


def tf_creation_order(depth: int, width: float, sk: bool, cifar_stem: bool):
    """(out, in, k) of every conv and width of every BN in TF1 creation order, from METHOD.md 8.2."""
    c = int(64 * width)
    convs: list[tuple[int, int, int]] = []
    bns: list[int] = []
    if cifar_stem:
        convs, bns = [(c, 3, 3)], [c]
    elif sk:
        convs, bns = [(c // 2, 3, 3), (c // 2, c // 2, 3), (c, c // 2, 3)], [c // 2, c // 2, c]
    else:
        convs, bns = [(c, 3, 7)], [c]
    in_ch = c
    basic = depth < 50
    for stage, n_blocks in enumerate(BLOCKS[depth]):
        f = c * 2**stage
        out = f if basic else 4 * f
        for j in range(n_blocks):
            if j == 0:  # projection conv + BN come first
                convs.append((out, in_ch, 1))
                bns.append(out)
            if basic:
                convs += [(f, in_ch, 3), (f, f, 3)]
                bns += [f, f]
            else:
                convs.append((f, in_ch, 1))
                bns.append(f)
                if sk:
                    mid = max(int(f * 0.0625), 32)
                    convs += [(2 * f, f, 3), (mid, f, 1), (2 * f, mid, 1)]
                    bns += [2 * f, mid]
                else:
                    convs.append((f, f, 3))
                    bns.append(f)
                convs.append((out, f, 1))
                bns.append(out)
            in_ch = out
    return convs, bns


@pytest.mark.parametrize("name", ["r50_1x_sk0", "r50_1x_sk1", "r152_3x_sk1", "r18_0.5x_sk0", "r50_0.5x_sk1"])
def test_module_order_matches_tf_creation_order(name):
    spec = VARIANTS[name]
    model = meta_model(name)
    convs = [(m.out_channels, m.in_channels, m.kernel_size[0]) for m in model.backbone.modules()
             if isinstance(m, nn.Conv2d)]
    bns = [m.num_features for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    exp_convs, exp_bns = tf_creation_order(spec["depth"], spec["width"], spec["sk_ratio"] > 0, spec["cifar_stem"])
    assert convs == exp_convs
    assert bns == exp_bns


def test_bn_modules_named_bn_and_classifier_named():
    model = create_model("r10_0.25x_sk0", num_classes=3)
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert "bn" in name.rsplit(".", 1)[-1], name
    assert isinstance(model.classifier, nn.Linear)


# --- init (METHOD.md 1.6) and SK (METHOD.md 1.3) ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["r50_1x_sk1", "r18_0.25x_sk0"])
def test_last_bn_gamma_zero_others_one(real_models, name):
    backbone = real_models[name].backbone
    last = {id(blk.last_bn) for blk in backbone.blocks()}
    n_blocks = sum(BLOCKS[VARIANTS[name]["depth"]])
    assert len(last) == n_blocks
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == (0.0 if id(m) in last else 1.0))
            assert torch.all(m.bias == 0.0)
            assert m.eps == 1e-5 and m.momentum == 0.1


@pytest.mark.slow
def test_conv_and_dense_init(real_models):
    model = real_models["r50_1x_sk0"]
    w = model.backbone.layer3[0].conv2.weight  # (256, 256, 3, 3): fan_in 2304, 590k samples
    std = 1.0 / math.sqrt(256 * 9)  # variance scaling, scale 1 (not He's 2)
    assert abs(w.std().item() / std - 1.0) < 0.02
    assert w.abs().max().item() <= 2 * std / 0.87962566103423978 + 1e-7
    head_w = model.proj_head.layers[0].linear.weight
    assert abs(head_w.std().item() - 0.01) < 0.0005


def test_sk_mid_width():
    assert sk_mid_dim(64, 0.0625) == 32  # floor of 32 dominates
    assert sk_mid_dim(1536, 0.0625) == 96  # METHOD.md 1.3 example: r152 3x stage 4
    for name in ["r50_1x_sk1", "r152_3x_sk1", "r50_0.5x_sk1"]:
        for blk in meta_model(name).backbone.blocks():
            f = blk.conv1.out_channels
            assert blk.sk.fc1.out_channels == max(int(f / 16), 32)
            assert blk.sk.conv.out_channels == 2 * f and blk.sk.fc2.out_channels == 2 * f
    assert max(b.sk.mid_dim for b in meta_model("r152_3x_sk1").backbone.blocks()) == 96


# --- forward / backward ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL_RUN)
def test_forward_backward(real_models, name):
    model = real_models[name]
    model.train()
    model.zero_grad(set_to_none=True)
    size = 16 if VARIANTS[name]["cifar_stem"] else 32
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    h, z = model.contrastive(x)
    assert h.shape == (2, model.backbone.feature_dim) and z.shape == (2, 128)
    z.square().sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    # Zero-init residual branches still pass gradient to the stem through the shortcuts.
    assert model.backbone.stem.conv1.weight.grad.abs().sum() > 0


def test_grayscale_28px_student():
    model = create_model("r10_0.25x_sk0", in_chans=1, num_classes=10)
    out = model(torch.rand(4, 1, 28, 28))
    assert out["features"].shape == (4, 128) and out["logits"].shape == (4, 10)


@pytest.mark.parametrize("selector, dim", [(0, 128), (1, 128), (-1, 128), (2, 128)])
def test_ft_proj_selector(selector, dim):
    torch.manual_seed(0)
    model = create_model("r10_0.25x_sk0", ft_proj_selector=selector, num_classes=5, proj_out_dim=16)
    n_run = model.proj_head.resolve_index(selector)  # head layers that should run
    expected_dim = 16 if n_run == 3 else dim
    assert model.selected_dim == expected_dim
    out = model(torch.rand(4, 3, 16, 16))
    assert out["proj"].shape == (4, expected_dim) and out["logits"].shape == (4, 5)
    if selector == 0:
        assert torch.equal(out["proj"], out["features"])
    out["logits"].sum().backward()
    for j, layer in enumerate(model.proj_head.layers):
        for p in layer.parameters():
            assert (p.grad is not None) == (j < n_run), (selector, j)
    # contrastive() always runs the whole head.
    assert model.contrastive(torch.rand(4, 3, 16, 16))[1].shape == (4, 16)


def test_bad_selector_rejected():
    with pytest.raises(ValueError, match="out of range"):
        create_model("r10_0.25x_sk0", ft_proj_selector=4)


def test_zero_init_classifier():
    model = create_model("r10_0.25x_sk0", num_classes=4, zero_init_classifier=True)
    assert torch.all(model(torch.rand(2, 3, 16, 16))["logits"] == 0)
    model.reset_classifier(4, zero_init=False)
    assert model.classifier.weight.std() > 0 and torch.all(model.classifier.bias == 0)


# --- heads (METHOD.md 2) ----------------------------------------------------------------------


def test_projection_head_modes():
    h = torch.randn(6, 32)
    assert [t.shape[1] for t in ProjectionHead(32, "nonlinear", 3, 8)(h)] == [32, 32, 32, 8]
    assert [t.shape[1] for t in ProjectionHead(32, "nonlinear", 2, 8)(h)] == [32, 32, 8]
    assert [t.shape[1] for t in ProjectionHead(32, "linear", out_dim=8)(h)] == [32, 8]
    none = ProjectionHead(32, "none")(h)
    assert len(none) == 1 and none[0] is h
    head = ProjectionHead(32, "nonlinear", 3, 8)
    outs = head(h)
    assert all(torch.all(o >= 0) for o in outs[1:3])  # middle outputs are taken after the ReLU
    assert (outs[3] < 0).any()  # no ReLU on the last layer
    assert len(head(h, upto=1)) == 2 and len(head(h, upto=-2)) == 3
    for layer in head.layers:
        assert layer.linear.bias is None
    with pytest.raises(ValueError, match="proj_head_mode"):
        ProjectionHead(32, "mlp")


def test_last_head_bn_has_no_beta():
    head = ProjectionHead(32, "nonlinear", 3, 8)
    names = {n for n, _ in head.named_parameters()}
    assert "layers.1.bn.bias" in names and "layers.2.bn.bias" not in names
    assert "layers.2.bn.weight" in names
    bn = head.layers[2].bn
    assert isinstance(bn, BatchNorm1dNoBeta)
    assert not any("bias" in k for k in head.layers[2].state_dict())
    x = torch.randn(16, 8) * 3 + 1
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, 8))
    y = bn.train()(x)
    ref = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5) * torch.linspace(0.5, 2.0, 8)
    assert torch.allclose(y, ref, atol=1e-5)
    assert torch.allclose(bn.bn.running_mean, 0.1 * x.mean(0), atol=1e-5)  # momentum 0.1


def test_sync_bn_conversion_keeps_head_without_beta():
    model = create_model("r10_0.25x_sk0", num_classes=2)
    n_params = sum(p.numel() for p in model.parameters())
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(synced.proj_head.layers[2].bn.bn, nn.SyncBatchNorm)
    assert isinstance(synced.backbone.stem.bn1, nn.SyncBatchNorm)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in synced.modules())
    assert sum(p.numel() for p in synced.parameters()) == n_params  # no beta appeared


# --- TF "SAME" padding (METHOD.md 1.5) ----------------------------------------------------------


def naive_tf_pool(x: torch.Tensor, k: int, s: int, op: str) -> torch.Tensor:
    """TF SAME pooling by definition: out = ceil(n/s), pad_total = max((out-1)s + k - n, 0) with
    the smaller half before; max/mean over the real cells each window covers."""
    n_h, n_w = x.shape[-2:]
    out_h, out_w = math.ceil(n_h / s), math.ceil(n_w / s)
    top = max((out_h - 1) * s + k - n_h, 0) // 2
    left = max((out_w - 1) * s + k - n_w, 0) // 2
    y = torch.empty(*x.shape[:-2], out_h, out_w)
    for i in range(out_h):
        for j in range(out_w):
            r0, c0 = i * s - top, j * s - left
            win = x[..., max(r0, 0):min(r0 + k, n_h), max(c0, 0):min(c0 + k, n_w)].flatten(-2)
            y[..., i, j] = win.amax(-1) if op == "max" else win.mean(-1)
    return y


def naive_zero_pad_pool(x: torch.Tensor, s: int) -> torch.Tensor:
    """TF's stride-2 shortcut: explicit zero pad of one row/column bottom/right, VALID 2x2 pool."""
    n_h, n_w = x.shape[-2:]
    padded = torch.zeros(*x.shape[:-2], n_h + 1, n_w + 1)
    padded[..., :n_h, :n_w] = x
    out_h, out_w = (n_h + 1 - 2) // s + 1, (n_w + 1 - 2) // s + 1
    y = torch.empty(*x.shape[:-2], out_h, out_w)
    for i in range(out_h):
        for j in range(out_w):
            y[..., i, j] = padded[..., i * s:i * s + 2, j * s:j * s + 2].mean((-2, -1))
    return y


def test_tf_same_pads_formula():
    assert tf_same_pads(112, 3, 2) == (0, 1)  # METHOD.md 1.5: even input, pad only after
    assert tf_same_pads(113, 3, 2) == (1, 1)
    assert tf_same_pads(56, 2, 1) == (0, 1)


@pytest.mark.parametrize("size", [(7, 7), (8, 8), (9, 10), (6, 5)])
def test_tf_max_pool_matches_reference(size):
    x = torch.randn(2, 3, *size) - 5  # negative values: a zero pad would win the max
    ref = naive_tf_pool(x, 3, 2, "max")
    assert torch.equal(MaxPoolSame(tf_padding=True)(x), ref)
    default = MaxPoolSame(tf_padding=False)(x)
    assert default.shape == ref.shape
    # PyTorch's symmetric padding agrees with TF on odd sizes and shifts windows on even ones.
    assert torch.equal(default, ref) == (size[0] % 2 == 1 and size[1] % 2 == 1)


@pytest.mark.parametrize("size", [(5, 5), (6, 6), (6, 7)])
def test_tf_avg_pool_shortcut_matches_reference(size):
    x = torch.rand(2, 3, *size) + 1
    ref1 = naive_tf_pool(x, 2, 1, "avg")  # stride 1: SAME, padded cells excluded
    assert torch.allclose(AvgPoolShortcut(1, tf_padding=True)(x), ref1, atol=1e-6)
    default1 = AvgPoolShortcut(1, tf_padding=False)(x)
    assert torch.allclose(default1[..., :-1, :-1], ref1[..., :-1, :-1], atol=1e-6)  # interior agrees
    assert not torch.allclose(default1, ref1)  # the zero-padded last row/column differs
    ref2 = naive_zero_pad_pool(x, 2)  # stride 2: identical in both modes
    for tf_mode in (True, False):
        assert torch.allclose(AvgPoolShortcut(2, tf_padding=tf_mode)(x), ref2, atol=1e-6)


def test_tf_padding_model_same_layout_different_numbers():
    torch.manual_seed(0)
    arch = dict(depth=50, width=0.25, sk_ratio=0.0625)  # deep stem, max-pool, avg-pool shortcuts
    default = SimCLRModel(**arch).eval()
    tf_model = SimCLRModel(**arch, tf_padding=True).eval()
    tf_model.load_state_dict(default.state_dict())
    # Give the zero-init BNs weight so the residual branches (and pooling) affect the output.
    with torch.no_grad():
        for m in (default, tf_model):
            for blk in m.backbone.blocks():
                blk.last_bn.weight.fill_(1.0)
    x = torch.rand(2, 3, 20, 20)
    a, b = default.features(x), tf_model.features(x)
    assert a.shape == b.shape
    assert not torch.allclose(a, b)


# --- memory/speed options ------------------------------------------------------------------


def test_grad_checkpointing_matches_and_keeps_bn_stats():
    torch.manual_seed(0)
    plain = create_model("r10_0.25x_sk0")
    ckpt = create_model("r10_0.25x_sk0", grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(4, 3, 16, 16)
    for m in (plain, ckpt):
        m.train()
        m.contrastive(x)[1].square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name
    for (name, b), c in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(b, c), name  # running stats updated once, not again in recompute
    assert ckpt.config["grad_checkpointing"] is True


def test_channels_last_same_output():
    torch.manual_seed(0)
    plain = create_model("r10_0.25x_sk0").eval()
    cl = create_model("r10_0.25x_sk0", channels_last=True).eval()
    cl.load_state_dict(plain.state_dict())
    assert cl.backbone.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(plain(x)["proj"], cl(x)["proj"], atol=1e-5)


def test_small_stem_halves_resolution_and_keeps_parameters():
    """stem=small: the CIFAR stem's 3x3 conv with stride 2, no max-pool (28 px -> 14 px maps)."""
    from simclrv2.models.resnet import ResNet

    x = torch.rand(2, 1, 28, 28)
    cifar = ResNet(10, 0.25, cifar_stem=True, in_chans=1)
    small = ResNet(10, 0.25, cifar_stem=True, in_chans=1, stem_stride=2)
    imagenet = ResNet(10, 0.25, cifar_stem=False, in_chans=1)
    assert cifar.stem(x).shape[-2:] == (28, 28)
    assert small.stem(x).shape[-2:] == (14, 14)
    assert imagenet.stem(x).shape[-2:] == (7, 7)
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in cifar.parameters())
    assert small(x).shape == (2, small.feature_dim)
    rebuilt = SimCLRModel(**create_model("r10_0.25x_sk0", in_chans=1, stem_stride=2).config)
    assert rebuilt.backbone.stem.conv1.stride == (2, 2)
    with pytest.raises(ValueError, match="stem_stride"):
        ResNet(10, 0.25, cifar_stem=False, stem_stride=2)

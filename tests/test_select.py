"""Choosing what to label (issue 31): TypiClust and ProbCover picks, the second round, k-means by scikit-learn
or faiss, `simclrv2 select`, label_selection."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclrv2 import selection as S
from simclrv2.checkpoint import write_model_file
from simclrv2.cli import main as cli_main
from simclrv2.config import ConfigError, FinetuneConfig, validate
from simclrv2.data.base import InMemoryDataset
from simclrv2.engine.batches import BatchSource
from simclrv2.engine.labels import labelled_subset
from simclrv2.engine.splits import labelled_indices
from simclrv2.models import create_model
from simclrv2.selection import (
    SelectionError,
    ball_graph,
    coverage_radius,
    greedy_cover,
    probcover_picks,
    random_picks,
    typical_picks,
    typicality,
)

COLOURS = [(230, 30, 30), (30, 200, 40), (40, 60, 220), (240, 230, 40)]  # four planted "classes"


def _planted(k: int = 8, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k well-separated Gaussian clusters of unequal sizes (20..80 points) and each point's cluster."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:k] * 10.0
    sizes = rng.integers(20, 81, size=k)
    x = np.concatenate([c + rng.normal(scale=0.5, size=(s, dim)) for c, s in zip(centres, sizes)])
    return x.astype(np.float32), np.repeat(np.arange(k), sizes)


@pytest.mark.slow
def test_planted_clusters_get_one_pick_each_and_random_misses_some():
    x, y = _planted()
    picks = typical_picks(x, 8, seed=0)
    assert sorted(y[picks.indices].tolist()) == list(range(8))  # every cluster exactly once
    assert picks.reason == ["uncovered"] * 8
    covered = [len(set(y[random_picks(len(x), 8, seed)].tolist())) for seed in range(10)]
    assert min(covered) < 8 and np.mean(covered) < 7.5  # random picks miss clusters on the same data


def test_typical_pick_is_the_densest_point_of_its_cluster():
    """Typicality against a naive double loop; the pick of a one-cluster set is its argmax."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    naive = np.array([1.0 / np.sort(row)[1:21].mean() for row in d])  # 20 nearest others
    got = typicality(torch.from_numpy(x), k=20, chunk=7).numpy()
    np.testing.assert_allclose(got, naive, rtol=1e-5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)  # the picks work on normalised features
    dn = np.sqrt(((xn[:, None] - xn[None]) ** 2).sum(-1))
    densest = int(np.argmax([1.0 / np.sort(row)[1:21].mean() for row in dn]))
    assert typical_picks(x, 1, max_clusters=1).indices.tolist() == [densest]


def test_same_seed_same_picks_and_second_round_never_repeats():
    x, y = _planted(k=6, seed=2)
    first = typical_picks(x, 6, seed=3)
    np.testing.assert_array_equal(first.indices, typical_picks(x, 6, seed=3).indices)
    # the second round: the first picks labelled; few clusters, so the uncertain images are reached
    second = typical_picks(x, 40, seed=3, labelled=first.indices, labelled_classes=y[first.indices], max_clusters=10)
    assert not set(second.indices.tolist()) & set(first.indices.tolist())
    assert len(set(second.indices.tolist())) == 40
    assert second.reason[0] == "uncovered" and second.reason[-1] == "uncertain"
    with pytest.raises(SelectionError, match="budget=300 is more than the 278 of 284"):
        typical_picks(x, 300, labelled=first.indices)


# --------------------------------------------------------------------------------------- ProbCover


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float64)


def _naive_purity(x: np.ndarray, pseudo: np.ndarray, delta: float) -> float:
    """The share of images whose delta-ball (distance < delta) holds its own pseudo-label only."""
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    return float(np.mean([np.all(pseudo[d[i] < delta] == pseudo[i]) for i in range(len(x))]))


def test_probcover_planted_clusters_get_one_pick_each():
    x, y = _planted()
    picks = probcover_picks(x, 8, seed=0, n_classes=8)
    assert sorted(y[picks.indices].tolist()) == list(range(8))  # every cluster exactly once
    assert picks.reason == ["uncovered"] * 8 and picks.method == "probcover" and picks.kmeans == "scikit-learn"
    assert sorted(picks.score.tolist(), reverse=True) == picks.score.tolist()  # greedy: gains never grow


def test_probcover_same_seed_same_picks_and_second_round_never_repeats():
    x, y = _planted(k=6, seed=2)
    first = probcover_picks(x, 6, seed=3, n_classes=6)
    np.testing.assert_array_equal(first.indices, probcover_picks(x, 6, seed=3, n_classes=6).indices)
    # the first picks' balls cover every cluster: the rest go to the least certain images
    second = probcover_picks(x, 40, seed=3, labelled=first.indices, labelled_classes=y[first.indices], n_classes=6)
    assert len(set(second.indices.tolist())) == 40 and not set(second.indices.tolist()) & set(first.indices.tolist())
    assert "uncertain" in second.reason
    # without classes the cover goes on with smaller balls, still never a labelled image
    blind = probcover_picks(x, 200, seed=3, labelled=first.indices, n_classes=6)
    assert len(set(blind.indices.tolist())) == 200 and not set(blind.indices.tolist()) & set(first.indices.tolist())
    with pytest.raises(SelectionError, match="budget=300 is more than the 278 of 284"):
        probcover_picks(x, 300, labelled=first.indices)


@pytest.mark.slow
def test_coverage_radius_is_the_largest_pure_enough_radius_of_a_naive_scan():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(c, 0.6, size=(20, 3)) for c in ([2, 0, 0], [0, 2, 0], [0, 0, 2])])
    pseudo = np.repeat(np.arange(3), 20)  # overlapping clusters: some balls are mixed at any radius
    xn = _unit(x)
    for alpha in (0.95, 0.8):
        delta = coverage_radius(x, pseudo, alpha)
        assert _naive_purity(xn, pseudo, delta - 1e-5) >= alpha > _naive_purity(xn, pseudo, delta + 1e-5)
        grid = np.linspace(0.0, 2.0, 2001)  # the paper's way: the largest radius of a grid that is pure enough
        best = max(g for g in grid if _naive_purity(xn, pseudo, g) >= alpha)
        assert best <= delta + 1e-5 < best + 1e-3


def test_coverage_radius_on_a_seeded_sample_is_close_to_the_exact_one():
    rng = np.random.default_rng(9)
    x = np.concatenate([rng.normal(c, 0.6, size=(400, 3)) for c in ([2, 0, 0], [0, 2, 0], [0, 0, 2])])
    pseudo = np.repeat(np.arange(3), 400)
    exact = coverage_radius(x, pseudo, 0.9)
    sampled = coverage_radius(x, pseudo, 0.9, sample=600, seed=1)
    assert sampled == coverage_radius(x, pseudo, 0.9, sample=600, seed=1) != exact  # seeded, and a sample
    assert abs(_naive_purity(_unit(x), pseudo, sampled) - 0.9) < 0.03  # the purity it keeps is about alpha


def test_ball_graph_in_blocks_matches_a_double_loop(monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    monkeypatch.setattr(S, "_row_chunk", lambda n: 7)  # several blocks, a short last one
    indptr, indices = ball_graph(x, 0.8)
    xn = _unit(x)
    d = np.sqrt(((xn[:, None] - xn[None]) ** 2).sum(-1))
    for i in range(50):
        naive = sorted(set(np.flatnonzero(d[i] < 0.8).tolist()) | {i})
        assert indices[indptr[i] : indptr[i + 1]].tolist() == naive


def test_ball_graph_too_crowded_is_a_one_line_error(monkeypatch):
    x, _ = _planted(k=3, seed=8)
    monkeypatch.setattr(S, "MAX_EDGES", len(x) + 10)  # the centres and 5 pairs
    with pytest.raises(SelectionError, match=r"has over \S+ edges: .*use method=typiclust$"):
        probcover_picks(x, 3, n_classes=3)


def test_greedy_cover_matches_a_naive_max_coverage():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(60, 3)).astype(np.float32)
    indptr, indices = ball_graph(x, 0.7)
    balls = [set(indices[indptr[i] : indptr[i + 1]].tolist()) for i in range(60)]
    labelled = np.array([3, 17])
    covered, naive = set().union(*(balls[i] for i in labelled)), []
    for _ in range(10):
        gains = [-1 if i in naive or i in labelled else len(balls[i] - covered) for i in range(60)]
        if max(gains) <= 0:
            break
        naive.append(int(np.argmax(gains)))  # ties: the lowest index
        covered |= balls[naive[-1]]
    picks, gains, mask = greedy_cover(indptr, indices, 10, labelled)
    assert picks == naive and sum(gains) + len(set().union(*(balls[i] for i in labelled))) == mask.sum()


# --------------------------------------------------------------------------------------- k-means


def test_faiss_kmeans_on_the_cpu_finds_the_planted_clusters_as_scikit_learn_does():
    pytest.importorskip("faiss")
    from sklearn.metrics import adjusted_rand_score

    x, y = _planted(k=8, seed=7)
    faiss_cl = S.cluster_features(x, 8, seed=0, backend="faiss-cpu")
    sk_cl = S.cluster_features(x, 8, seed=0, backend="scikit-learn")
    assert adjusted_rand_score(y, faiss_cl) == 1.0 and adjusted_rand_score(y, sk_cl) == 1.0
    np.testing.assert_array_equal(faiss_cl, S.cluster_features(x, 8, seed=0, backend="faiss-cpu"))  # seeded


def test_kmeans_runs_on_faiss_gpu_only_on_cuda_with_a_faiss_that_sees_a_gpu(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(get_num_gpus=lambda: 1))
    assert S.kmeans_backend("cuda") == "faiss-gpu" and S.kmeans_backend("cpu") == "scikit-learn"
    monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(get_num_gpus=lambda: 0))  # faiss-cpu
    assert S.kmeans_backend("cuda") == "scikit-learn"
    monkeypatch.setitem(sys.modules, "faiss", None)  # not installed: import fails
    assert S.kmeans_backend("cuda") == "scikit-learn"


# --------------------------------------------------------------------------------- simclrv2 select


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """36 small PNGs of four colours with noise, in nested sub-folders, no classes."""
    root = tmp_path_factory.mktemp("unlabeled")
    rng = np.random.default_rng(0)
    for i in range(36):
        colour = np.array(COLOURS[i % 4], dtype=np.float64)
        img = np.clip(colour + rng.normal(scale=25, size=(16, 16, 3)), 0, 255).astype(np.uint8)
        sub = root / f"batch{i % 3}" / ("deep" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(sub / f"img{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = create_model("r10_0.25x_sk0", in_chans=3, cifar_stem=True, num_classes=0, proj_out_dim=16)
    path = tmp_path_factory.mktemp("enc") / "encoder.safetensors"
    write_model_file(path, model.eval().state_dict(), {"model_name": model.name, "model_config": model.config,
                                                        "image_size": 16})
    return str(path)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _select(encoder: str, folder: Path, out: Path, *extra: str) -> int:
    return cli_main(["select", f"checkpoint={encoder}", f"images={folder}", f"out={out}", "num_workers=0",
                     *extra])


def test_select_writes_n_distinct_files_from_the_folder_with_links(encoder, folder, tmp_path):
    out = tmp_path / "to_label.csv"
    assert _select(encoder, folder, out, "budget=4", f"links={tmp_path / 'links'}") == 0
    rows = _rows(out)
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*.png")}
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    assert len({r["file"] for r in rows}) == 4 and {r["file"] for r in rows} <= files
    links = sorted((tmp_path / "links").iterdir())
    assert [p.resolve() for p in links] == [(folder / r["file"]).resolve() for r in rows]
    assert _select(encoder, folder, tmp_path / "again.csv", "budget=4") == 0
    assert _rows(tmp_path / "again.csv") == rows  # the same seed gives the same selection


def test_select_second_round_takes_the_labels_and_never_repeats(encoder, folder, tmp_path):
    first = tmp_path / "round1.csv"
    assert _select(encoder, folder, first, "budget=5") == 0
    rows = _rows(first)
    for i, r in enumerate(rows):
        r["label"] = "" if i == 4 else f"class{i % 2}"  # the last one seen but left unlabeled
    with open(first, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    second = tmp_path / "round2.csv"
    assert _select(encoder, folder, second, "budget=31", f"labels={first}", "max_clusters=4") == 0
    picked = [r["file"] for r in _rows(second)]
    assert len(set(picked)) == 31 and not set(picked) & {r["file"] for r in rows}
    assert "uncertain" in {r["reason"] for r in _rows(second)}


def test_select_probcover_method_says_what_ran_and_rejects_an_unknown_method(encoder, folder, tmp_path, capsys):
    out = tmp_path / "to_label.csv"
    assert _select(encoder, folder, out, "budget=4", "method=probcover", "classes=4") == 0
    said = capsys.readouterr().out
    assert "probcover, delta " in said and "k-means by scikit-learn: 4 clusters of 36 images" in said
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*.png")}
    assert len({r["file"] for r in _rows(out)}) == 4 and {r["file"] for r in _rows(out)} <= files
    assert _select(encoder, folder, tmp_path / "bad.csv", "budget=4", "method=coreset") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "method" in err and "probcover" in err


def test_select_budget_larger_than_the_folder_is_one_line(encoder, folder, tmp_path, capsys):
    out = tmp_path / "to_label.csv"
    assert _select(encoder, folder, out, "budget=37") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "budget=37 is more than the 36" in err
    assert not out.exists()


# ------------------------------------------------------------------------------- label_selection


def _colour_dataset() -> InMemoryDataset:
    """120 noisy 16 px images of four colours, class = colour; 30 of each."""
    rng = np.random.default_rng(3)
    labels = np.arange(120) % 4
    imgs = np.stack([np.clip(np.array(COLOURS[c])[:, None, None] + rng.normal(scale=25, size=(3, 16, 16)), 0, 255)
                     for c in labels]).astype(np.uint8)
    return InMemoryDataset(torch.from_numpy(imgs), torch.from_numpy(labels), [str(c) for c in range(4)])


def test_label_selection_balanced_unchanged_random_blind_typical_covers(encoder, tmp_path):
    ds = _colour_dataset()
    source = BatchSource(ds, torch.device("cpu"), 0)
    base = FinetuneConfig(label_fraction=0.034, val_fraction=0.1, init_checkpoint=encoder, run_dir=str(tmp_path))
    balanced = labelled_subset(base, ds, source, 16, None)
    np.testing.assert_array_equal(balanced, labelled_indices(base, ds, None))  # bitwise the old draw
    val = set(labelled_indices(dataclasses.replace(base, label_fraction=1.0), ds, None).tolist()) ^ set(range(120))
    random = labelled_subset(dataclasses.replace(base, label_selection="random"), ds, source, 16, None)
    typical = labelled_subset(dataclasses.replace(base, label_selection="typical"), ds, source, 16, tmp_path)
    cover = labelled_subset(dataclasses.replace(base, label_selection="probcover"), ds, source, 16, None)
    for idx in (random, typical, cover):
        assert len(idx) == len(balanced) == 4 and not set(idx.tolist()) & val
    for idx in (typical, cover):
        assert len(set(ds.labels[torch.from_numpy(idx)].tolist())) == 4  # one of each colour
    assert (tmp_path / "labelled_subset.txt").read_text().split() == [str(i) for i in typical]
    with pytest.raises(ConfigError, match="label_selection must be balanced, random, typical or probcover"):
        validate(dataclasses.replace(base, label_selection="clever"))


def test_pipeline_label_selection_reaches_every_labelled_stage_and_the_report(tmp_path):
    from simclrv2 import config as C
    from simclrv2 import pipeline as P
    from simclrv2.report import labels_section

    demo = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist_demo.yaml"
    pc = C.build(P.PipelineConfig, C.apply_overrides(C.load_yaml(demo), [
        "common.label_selection=typical", f"run_dir={tmp_path}"]))
    plans = {p.name: p.cfg for p in P.plan_stages(pc)}
    pre = plans["pretrain"].run_dir
    for name in ("finetune_0.1pct", "supervised_0.1pct", "distill_self_1pct", "distill_small_10pct"):
        assert plans[name].label_selection == "typical" and plans[name].label_encoder == pre
    plain = C.build(P.PipelineConfig, C.apply_overrides(C.load_yaml(demo), [f"run_dir={tmp_path}"]))
    assert all(getattr(p.cfg, "label_encoder", "") == "" for p in P.plan_stages(plain))  # balanced: as before
    row = {"method": "finetune", "label_fraction": 0.001, "label_selection": "random", "labelled_images": 60,
           "labelled_classes": 9, "num_classes": 10}
    assert labels_section({"results": [row]})[4] == "| finetune | 0.1% | random | 60 | 9 of 10 |"


def test_propose_for_folder_picks_only_unlabeled_images_in_the_few_labels_layout(encoder, tmp_path):
    """The pipeline's last step in the real-use layout: train/<class>/ is labelled, unlabeled/ is not."""
    from simclrv2.select import propose_for_folder

    rng = np.random.default_rng(5)
    for i in range(24):
        colour = np.array(COLOURS[i % 4], dtype=np.float64)
        img = np.clip(colour + rng.normal(scale=25, size=(16, 16, 3)), 0, 255).astype(np.uint8)
        where = tmp_path / "data" / ("train" / Path(f"c{i % 4}") if i < 4 else Path("unlabeled") / f"s{i % 2}")
        where.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(where / f"x{i:02d}.png")
    out = tmp_path / "to_label.csv"
    picks = propose_for_folder(encoder, tmp_path / "data", 6, out, device="cpu", num_workers=0)
    files = [r["file"] for r in _rows(out)]
    unlabeled = {p.relative_to(tmp_path / "data" / "unlabeled").as_posix()
                 for p in (tmp_path / "data" / "unlabeled").rglob("*.png")}
    assert len(set(files)) == 6 and set(files) <= unlabeled and len(picks.indices) == 6

"""Two real gloo processes evaluate as one does (issue 19): sharded extraction, kNN, linear eval.

Under torchrun each rank extracts its share of the images and the outputs are gathered back in
order; linear eval trains its head on cached features on rank 0 alone and broadcasts it, and with
``method=sgd`` every rank trains on its share of each batch (issue 30, defect 8). Every check here runs the
same thing in two processes (one fork) and in this process, on a tiny Fashion-MNIST with an odd
test set (21 images: shares of 11 and 10) and a frozen tiny model:

- ``extract`` gives the one-process outputs and labels, in order, also when a rank's share is empty,
  and each rank runs the model on its share only;
- only rank 0 trains heads on cached features; with ``method=sgd`` each rank runs the encoder over its
  share of every batch only, every rank ends with one process's head (in-memory and streaming
  sources, even and odd global batches, a last rank with no share);
- knn-eval and linear-eval (both methods) give the one-process metrics;
- a supervised run under two processes reports the test metrics that one process computes from its
  final weights (the run itself trains differently on two ranks: per-rank BN and augmentation).
"""

from __future__ import annotations

import datetime
import math
import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import free_port
from test_distributed_runs import ok, run_ranks
from test_eval_stages import write_small_fmnist
from test_streaming import make_jpeg_folder

from simclrv2 import checkpoint as ckpt
from simclrv2 import distributed as sdist
from simclrv2.cli import main as cli_main
from simclrv2.config import KnnEvalConfig, LinearEvalConfig, SupervisedConfig, load_config
from simclrv2.data.datasets import load_dataset
from simclrv2.engine import probe, supervised
from simclrv2.engine.batches import BatchSource
from simclrv2.engine.evaluate import evaluate_classifier, extract, knn_predict, knn_predict_sharded
from simclrv2.modelfile import load_model

WORLD = 2
N_TRAIN, N_TEST = 64, 21
METRIC_KEYS = ("top1", "top5", "n", "per_class_accuracy", "confusion_matrix")


def common(data_dir: Path, run_dir: Path) -> list[str]:
    return ["model=r10_0.25x_sk0", "dataset=fashion_mnist", f"data_dir={data_dir}", "batch_size=16",
            "progress=false", "device=cpu", "num_workers=0", "seed=0", f"run_dir={run_dir}"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_small_fmnist(tmp_path_factory.mktemp("fmnist"), N_TRAIN, N_TEST)


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pretrain")
    code = cli_main(["pretrain", *common(data_dir, run_dir), "max_steps=2", "warmup_epochs=0", "knn_every=0",
                     "proj_out_dim=16"])
    assert code == 0
    return run_dir


def evaluations(data_dir: Path, pretrained: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Everything compared between one and two processes; run on every rank."""
    device = torch.device("cpu")
    model, _ = load_model(str(pretrained), device)
    test = BatchSource(load_dataset("fashion_mnist", "test", data_dir=str(data_dir)), device, num_workers=0)
    seen = []  # images this process ran through the model
    features = model.features
    model.features = lambda x: (seen.append(len(x)), features(x))[1]
    feats, labels = extract(model, test, torch.arange(N_TEST).flip(0), 28, batch_size=4)
    res = {"feats": feats, "labels": labels, "images_run": sum(seen)}
    one, one_label = extract(model, test, torch.tensor([5]), 28, batch_size=4)  # rank 1's share is empty
    res.update(one=one, one_label=one_label)
    heads = []  # linear heads this process trained
    for name in ("_linear_sgd", "train_linear_on_features"):
        real = getattr(probe, name)
        monkeypatch.setattr(probe, name, lambda *a, real=real, **k: (heads.append(1), real(*a, **k))[1])
    banks = []  # kNN bank rows this process held
    real_knn = probe.knn_predict_sharded
    monkeypatch.setattr(probe, "knn_predict_sharded", lambda *a, **k: (banks.append(len(a[0])), real_knn(*a, **k))[1])
    evals = {
        "knn": (probe.run_knn_eval, KnnEvalConfig, ["k=5", "label_fraction=1.0"]),
        "cached": (probe.run_linear_eval, LinearEvalConfig, ["method=cached", "epochs=3", "label_fraction=1.0"]),
        "sgd": (probe.run_linear_eval, LinearEvalConfig, ["method=sgd", "epochs=2", "label_fraction=1.0"]),
    }
    for name, (run, cls, extra) in evals.items():
        cfg = load_config(cls, None, [*common(data_dir, out / name), f"checkpoint={pretrained}", *extra])
        metrics = run(cfg)
        res[name] = {k: metrics[k] for k in METRIC_KEYS}
    cfg = load_config(SupervisedConfig, None, [*common(data_dir, out / "supervised"), "label_fraction=1.0",
                                               "max_steps=2", "epochs=1", "warmup_epochs=0"])
    metrics = supervised.run(cfg)
    res["supervised"] = {k: metrics[k] for k in METRIC_KEYS}
    res["heads_trained"] = len(heads)
    res["bank_rows"] = banks
    return res


def worker(rank: int, port: int, data_dir: str, pretrained: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sdist.setup_distributed("cpu")
    with pytest.MonkeyPatch.context() as monkeypatch:
        res = evaluations(Path(data_dir), Path(pretrained), Path(out), monkeypatch)
    # uneven shares through several padded chunks: rank 0 has rows 0-4, rank 1 rows 5-6
    rows = torch.arange(7 * 2, dtype=torch.float64).view(7, 2)
    res["shares"] = [list(sdist.shard_range(n)) for n in (7, 1, 0)]
    res["gathered"] = sdist.gather_rows(rows[[0, 1, 2, 3, 4]] if rank == 0 else rows[[5, 6]], chunk_rows=2)
    sdist.barrier()
    sdist.cleanup_distributed()
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.slow
@pytest.mark.fashion_mnist
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_processes_evaluate_as_one(tmp_path, data_dir, pretrained, monkeypatch):
    two = tmp_path / "two"
    two.mkdir()
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(worker, args=(free_port(), str(data_dir), str(pretrained), str(two)), nprocs=WORLD,
                       join=True, start_method=method)
    ranks = [torch.load(two / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = evaluations(data_dir, pretrained, tmp_path / "one", monkeypatch)
    # each rank ran the model on its share only; only rank 0 trained the cached head, every rank the sgd one
    assert [res["images_run"] for res in ranks] == [11, 10] and single["images_run"] == N_TEST
    assert [res["heads_trained"] for res in ranks] == [2, 1] and single["heads_trained"] == 2
    # knn-eval: each rank held its half of the 64-image bank, not all of it (issue 30, defect 8)
    assert [res["bank_rows"] for res in ranks] == [[32], [32]] and single["bank_rows"] == [N_TRAIN]

    # naive reference: each test image alone through the model, in the order asked for
    model, _ = load_model(str(pretrained), torch.device("cpu"))
    test = BatchSource(load_dataset("fashion_mnist", "test", data_dir=str(data_dir)), torch.device("cpu"), 0)
    alone = torch.cat([extract(model, test, torch.tensor([i]), 28)[0] for i in range(N_TEST)]).flip(0)
    torch.testing.assert_close(single["feats"], alone, atol=1e-5, rtol=1e-5)
    for res in ranks:
        torch.testing.assert_close(res["feats"], single["feats"], atol=1e-5, rtol=1e-5)
        assert torch.equal(res["labels"], single["labels"])
        assert torch.equal(res["labels"], test.labels.flip(0))
        torch.testing.assert_close(res["one"], alone[N_TEST - 1 - 5 :][:1], atol=1e-5, rtol=1e-5)
        assert res["one_label"].tolist() == [int(test.labels[5])]
        for name in ("knn", "cached", "sgd"):
            assert res[name] == single[name], name
    for name in ("knn", "cached", "sgd", "supervised"):
        assert ranks[0][name] == ranks[1][name], name  # every rank reports the same numbers
        assert (two / name / "metrics.json").is_file()
    assert ranks[0]["cached"]["n"] == N_TEST
    assert [res["shares"] for res in ranks] == [[[0, 1, 2, 3], [0], []], [[4, 5, 6], [], []]]
    for res in ranks:
        assert torch.equal(res["gathered"], torch.arange(14, dtype=torch.float64).view(7, 2))

    # the two-process supervised run's test metrics are one process's on its final weights
    sup_model, _ = load_model(str(two / "supervised"), torch.device("cpu"))
    metrics, _ = evaluate_classifier(sup_model, test, torch.arange(N_TEST), 28, 10)
    assert {k: metrics[k] for k in METRIC_KEYS} == ranks[0]["supervised"]
    assert ckpt.read_meta(ckpt.latest_checkpoint(two / "supervised"))["step"] == 2


def sgd_probe(argv: list[str]) -> dict:
    """``linear-eval method=sgd``: its metrics, the head ``_linear_sgd`` returned in this process, and
    the images of each encoder forward it made here (one per training step on a rank with a share)."""
    views: list[torch.Tensor] = []
    heads: list[dict[str, torch.Tensor]] = []
    real = probe._linear_sgd

    def watched(cfg, model, *args, **kwargs):
        hook = model.backbone.register_forward_hook(lambda m, inputs, out: views.append(inputs[0].detach().clone()))
        try:
            head = real(cfg, model, *args, **kwargs)
        finally:
            hook.remove()
        heads.append(head.state_dict())
        return head

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(probe, "_linear_sgd", watched)
        metrics = probe.run_linear_eval(load_config(LinearEvalConfig, None, argv))
    return {"metrics": {k: metrics[k] for k in METRIC_KEYS if k in metrics}, "heads": heads, "views": views}  # top5: 5+ classes


def sgd_cases(data_dir: Path, pretrained: Path, jpegs: Path, streamed: Path, out: Path) -> dict[str, list[str]]:
    """Global batches over two ranks: even (8 + 8), odd (4 + 3), one image (1 + none: rank 1 loads
    nothing), and a streaming image folder whose crops are cut in workers (3 + 2)."""
    fmnist = [f"checkpoint={pretrained}", "method=sgd", "label_fraction=1.0"]
    cases = {"even": ["batch_size=16", "epochs=2"], "odd": ["batch_size=7", "epochs=1"],
             "one": ["batch_size=1", "epochs=1"]}
    argvs = {name: [*common(data_dir, out / name), *fmnist, *extra] for name, extra in cases.items()}
    argvs["stream"] = [*stream_common(jpegs, out / "stream"), f"checkpoint={streamed}", "method=sgd",
                       "label_fraction=1.0", "batch_size=5", "epochs=1"]
    return argvs


def stream_common(root: Path, run_dir: Path) -> list[str]:
    return ["model=r10_0.25x_sk0", "dataset=imagefolder", f"data_dir={root}", "image_size=24", "cache_images=false",
            "num_workers=0", "progress=false", "device=cpu", "seed=0", f"run_dir={run_dir}"]


def sgd_worker(rank: int, argvs: dict[str, list[str]]) -> dict:
    sdist.setup_distributed("cpu")
    return {name: sgd_probe(argv) for name, argv in argvs.items()}


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_sgd_linear_eval_shards_each_batch_and_trains_one_process_head(tmp_path, tmp_path_factory, data_dir,
                                                                       pretrained):
    """Two gloo ranks each run the frozen encoder over their share of every step's batch only, on the
    views one process makes of those images, and both end with one process's head and metrics."""
    jpegs = make_jpeg_folder(tmp_path_factory.mktemp("jpegs"))
    streamed = tmp_path / "stream-pretrain"
    assert cli_main(["pretrain", *stream_common(jpegs, streamed), "batch_size=8", "max_steps=1",
                     "warmup_epochs=0", "knn_every=0", "proj_out_dim=16"]) == 0
    two = ok(run_ranks(sgd_worker, tmp_path, sgd_cases(data_dir, pretrained, jpegs, streamed, tmp_path / "two"),
                       timeout=180))
    for name, argv in sgd_cases(data_dir, pretrained, jpegs, streamed, tmp_path / "one").items():
        single = sgd_probe(argv)
        steps, batch = len(single["views"]), len(single["views"][0])
        per = -(-batch // WORLD)  # ranks in order, ceil(batch / 2) each, the last one shorter or empty
        shares = [max(0, min(per, batch - r * per)) for r in range(WORLD)]
        # each rank's encoder saw its share of every step's images, no more (rank 0 saw all of them before)
        for r in range(WORLD):
            assert [len(v) for v in two[r][name]["views"]] == ([shares[r]] * steps if shares[r] else []), (name, r)
        # ... and the views one process makes of those images, whatever the number of ranks
        for step, views in enumerate(single["views"]):
            got = torch.cat([two[r][name]["views"][step] for r in range(WORLD) if shares[r]])
            torch.testing.assert_close(got, views, rtol=0, atol=1e-6, msg=f"{name}, step {step}")
        for r in range(WORLD):  # every rank holds one process's head and reports its numbers
            assert len(two[r][name]["heads"]) == 1, (name, r)
            for key, want in single["heads"][0].items():
                torch.testing.assert_close(two[r][name]["heads"][0][key], want, rtol=1e-5, atol=1e-7,
                                           msg=f"{name}: rank {r} {key}")
            assert two[r][name]["metrics"] == single["metrics"], (name, r)
        assert single["heads"][0]["weight"].abs().sum() > 0  # the head trained: a zero head would match too


def test_sharding_degrades_to_one_process():
    assert list(sdist.shard_range(5)) == [0, 1, 2, 3, 4]
    x = torch.randn(3, 2)
    assert sdist.gather_rows(x) is x
    head = torch.nn.Linear(2, 3)
    head(x).sum().backward()
    weight_grad = head.weight.grad.clone()
    head.bias.grad = None  # a parameter with no gradient counts as zeros
    sdist.sum_grads(head.parameters())
    assert torch.equal(head.weight.grad, weight_grad) and torch.equal(head.bias.grad, torch.zeros(3))


def waiting_worker(rank: int, port: int, out: str) -> None:
    # a default group with a 2-second timeout stands in for NCCL's 10 minutes
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD, timeout=datetime.timedelta(seconds=2))
    res = {}
    res["value"] = sdist.run_on_main(lambda: (time.sleep(3), {"w": torch.arange(3) * (sdist.rank() + 1)})[1])

    def fail() -> None:
        raise ValueError("no labelled images")

    try:
        sdist.run_on_main(fail)
    except (ValueError, RuntimeError) as e:
        res["error"] = f"{type(e).__name__}: {e}"
    sdist.barrier()
    sdist.cleanup_distributed()
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_run_on_main_waits_past_the_group_timeout_and_passes_errors_on(tmp_path):
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(waiting_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method=method)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for res in ranks:  # rank 0's result everywhere, though it took longer than the group's timeout
        assert torch.equal(res["value"]["w"], torch.arange(3))
    assert ranks[0]["error"] == "ValueError: no labelled images"
    assert ranks[1]["error"] == "RuntimeError: rank 0 stopped: ValueError: no labelled images"
    assert sdist.run_on_main(lambda: 7) == 7  # one process: the work, here


def knn_worker(rank: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD)
    bank, bank_y, queries = knn_problem()
    share = sdist.shard_range(len(bank))  # 19 rows: 10 and 9
    res = {k: knn_predict_sharded(bank[share.start : share.stop], bank_y[share.start : share.stop], queries, 4,
                                  k=k, temperature=0.1, chunk=5) for k in (3, 15, 100)}
    sdist.cleanup_distributed()
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))


def knn_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(19, 6, generator=g), torch.randint(0, 4, (19,), generator=g), torch.randn(11, 6, generator=g)


def naive_knn_scores(bank: torch.Tensor, bank_y: torch.Tensor, queries: torch.Tensor, k: int,
                     temperature: float = 0.1, classes: int = 4) -> torch.Tensor:
    """One query at a time in float64: cosine similarity to every bank row, the k best vote with
    weight exp(sim / T)."""
    out = torch.zeros(len(queries), classes, dtype=torch.float64)
    for i, q in enumerate(queries.double()):
        sims = sorted(((float(q @ b) / float(q.norm() * b.norm()), int(y)) for b, y in zip(bank.double(), bank_y)),
                      reverse=True)
        for sim, y in sims[:k]:
            out[i, y] += math.exp(sim / temperature)
    return out


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_knn_over_a_sharded_bank_scores_as_one_process(tmp_path):
    """Two gloo ranks, each with its share of a 19-row bank (10 and 9), score every query as a
    one-process kNN over the whole bank does: k below a share, above a share (the other rank's
    candidates fill in), and above the whole bank."""
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(knn_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method=method)
    bank, bank_y, queries = knn_problem()
    for rank in range(WORLD):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for k, scores in res.items():
            expected = naive_knn_scores(bank, bank_y, queries, k)
            torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(knn_predict(bank, bank_y, queries, 4, k, 0.1).double(), expected,
                                       rtol=1e-5, atol=1e-6)

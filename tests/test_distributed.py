"""Two real gloo processes: gathered NT-Xent equals one process on the full batch (METHOD.md 3, step 3).

Each rank holds half of the global batch. The loss is not divided by the world size and the
parameter gradients are averaged over ranks, as DDP does; the result must match a single process
on the whole batch. Both scenarios (plain, and with a shared queue of extra negatives) run in one
spawn to keep process start-up cost down.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from simclrv2 import distributed as sdist
from simclrv2.losses import nt_xent
from simclrv2.memory import MomentumMemory

WORLD = 2
N_GLOBAL, D_IN, D_OUT, TEMP = 8, 6, 5, 0.3


def make_inputs():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(N_GLOBAL, D_IN, generator=g, dtype=torch.float64)
    x2 = torch.randn(N_GLOBAL, D_IN, generator=g, dtype=torch.float64)
    weight = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    queue = F.normalize(torch.randn(7, D_OUT, generator=g, dtype=torch.float64), dim=1)
    return x1, x2, weight, queue


def loss_and_grads(x1, x2, weight, queue, gather):
    """Loss plus gradients w.r.t. the linear layer's weight and w.r.t. the projections z1, z2."""
    w = weight.clone().requires_grad_()
    z1, z2 = x1 @ w.T, x2 @ w.T
    z1.retain_grad()
    z2.retain_grad()
    loss, stats = nt_xent(z1, z2, temperature=TEMP, gather=gather, extra_negatives=queue)
    loss.backward()
    return loss.detach(), w.grad, z1.grad, z2.grad, stats


def worker(rank, port, out_dir):
    # What torchrun would set; setup_distributed is the code under test for reading it.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    device = sdist.setup_distributed("cpu")
    result = {
        "device": str(device),
        "rank": sdist.rank(),
        "world": sdist.world_size(),
        "local_rank": sdist.local_rank(),
        "is_main": sdist.is_main(),
    }
    x1, x2, weight, queue = make_inputs()
    n = N_GLOBAL // WORLD
    local = slice(rank * n, (rank + 1) * n)
    for name, q in (("plain", None), ("queue", queue)):
        loss, w_grad, z1_grad, z2_grad, stats = loss_and_grads(x1[local], x2[local], weight, q, gather=None)
        result[name] = {
            "loss": sdist.all_reduce_mean(loss),
            "w_grad": sdist.all_reduce_mean(w_grad),  # DDP's gradient averaging
            "z1_grad": z1_grad,
            "z2_grad": z2_grad,
            "acc": sdist.all_reduce_mean(stats["contrastive_acc"]),
        }
    # Memory enqueue gathers keys from both ranks in rank order.
    mem = MomentumMemory(torch.nn.Linear(2, 2), queue_size=6, dim=3)
    mem.enqueue(torch.full((2, 3), float(rank + 1)))
    result["memory_queue"] = mem.negatives().clone()
    sdist.barrier()
    sdist.cleanup_distributed()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_process_gather_matches_single_process(tmp_path):
    # fork: children inherit the imported torch instead of re-importing it (seconds each on a
    # loaded machine); the parent has no process group, and children use one thread.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method=method
    )
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    n = N_GLOBAL // WORLD

    for r, res in enumerate(results):
        assert (res["rank"], res["world"], res["local_rank"], res["is_main"]) == (r, WORLD, r, r == 0)
        assert res["device"] == "cpu"
        torch.testing.assert_close(res["memory_queue"][:, 0], torch.tensor([1.0, 1.0, 2.0, 2.0]))

    x1, x2, weight, queue = make_inputs()
    for name, q in (("plain", None), ("queue", queue)):
        loss, w_grad, z1_grad, z2_grad, stats = loss_and_grads(x1, x2, weight, q, gather=False)
        for r, res in enumerate(results):
            got = res[name]
            torch.testing.assert_close(got["loss"], loss, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got["w_grad"], w_grad, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got["acc"], stats["contrastive_acc"].to(got["acc"].dtype))
            # A rank's projection gradient is the sum over ranks' losses: R x the full-batch one.
            local = slice(r * n, (r + 1) * n)
            torch.testing.assert_close(got["z1_grad"] / WORLD, z1_grad[local], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got["z2_grad"] / WORLD, z2_grad[local], rtol=1e-5, atol=1e-5)


def test_helpers_degrade_to_one_process():
    assert (sdist.rank(), sdist.world_size(), sdist.local_rank(), sdist.is_main()) == (0, 1, 0, True)
    x = torch.randn(3, 2, requires_grad=True)
    assert sdist.gather_with_grad(x) is x
    torch.testing.assert_close(sdist.all_gather(x), x.detach())
    torch.testing.assert_close(sdist.all_reduce_mean(x), x.detach())
    sdist.barrier()
    assert sdist.setup_distributed("cpu") == torch.device("cpu")  # no WORLD_SIZE: no process group
    assert not sdist.is_dist()


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_pipeline_under_torchrun_on_cpu(tmp_path):
    """`torchrun --nproc_per_node=2 -m simclrv2 pipeline` with gloo on the CPU, global BN left on.

    torch's SyncBatchNorm is CUDA-only: converting to it on CPUs failed every training stage
    ("SyncBatchNorm layers only work with GPU modules"). On CPUs BN stays per process, with a note.
    stdout is a pipe, as in a batch job's log: rank 0 alone prints the metrics lines (issue 19).
    """
    import json
    import subprocess
    import sys

    import yaml
    from test_pipeline import tiny_fashion_mnist

    data = tiny_fashion_mnist(tmp_path / "fmnist")
    run = tmp_path / "run"
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(run), "label_fractions": [0.1], "self_distill": True, "small_student": "",
        "embedding_points": 0, "plots": False,
        "common": {"dataset": "fashion_mnist", "data_dir": str(data), "model": "r10_0.25x_sk0",
                   "stem": "imagenet", "progress": "auto", "log_every": 5, "batch_size": 128, "global_bn": True},
        "pretrain": {"epochs": 1, "knn_every": 1, "knn_train_size": 500, "knn_test_size": 200},
        "finetune": {"epochs": 1, "batch_size": 32, "min_steps": 0},
        "supervised": {"epochs": 1, "batch_size": 32, "min_steps": 0},
        "distill_self": {"epochs": 0.2, "min_steps": 0},
        "linear_eval": {"epochs": 2},
    }))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "simclrv2", "pipeline", "--config", str(config)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SyncBatchNorm is CUDA-only" in proc.stderr
    out = json.loads((run / "results.json").read_text())
    assert {r["method"] for r in out["results"]} == {"finetune", "distill-self", "supervised", "linear-eval", "knn"}
    summary = json.loads((run / "pretrain" / "summary.json").read_text())
    assert summary["global_batch"] == 128 and summary["steps"] == 2000 // 128
    # one metrics line per log_every steps, not one per rank; the stage lines once each too
    steps = [ln.split(" step ")[1].split()[0] for ln in proc.stdout.splitlines()
             if ln.startswith("[1/") and " step " in ln]
    assert steps == ["5/15", "10/15", "15/15"], proc.stdout
    progress_lines = [ln for ln in proc.stdout.splitlines() if " step " in ln or ln.startswith("[")]
    assert len(progress_lines) == len(set(progress_lines)), proc.stdout

"""Multi-GPU defects of issue 30, reproduced with two real gloo processes on the CPU.

Each test forks two ranks with torchrun's environment and a hard deadline: a rank that hangs in a
collective (the failure these defects caused) fails the test instead of stalling the suite. A rank's
result, or its one-line error, comes back through a file.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from simclrv2 import distributed as sdist

WORLD = 2

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(worker: Callable[..., Any], rank: int, port: int, out: str, env: dict[str, str], args: tuple) -> None:
    # what torchrun sets; the code under test reads it
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env)
    torch.set_num_threads(1)
    try:
        result = {"ok": worker(rank, *args)}
    except BaseException as e:  # noqa: BLE001 - the parent asserts on it
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    finally:
        sdist.cleanup_distributed()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def run_ranks(worker: Callable[..., Any], tmp_path: Path, *args: Any, timeout: float = 60.0,
              env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """``worker(rank, *args)`` in two forked gloo ranks; each rank's ``{"ok": value}`` or ``{"error": line}``.

    A rank still running after ``timeout`` seconds is a hang: both are killed (by their own pids) and
    the test fails.
    """
    out = tmp_path / "ranks"
    out.mkdir(exist_ok=True)
    # fork: the children inherit the imported torch instead of importing it again (seconds each)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(worker, r, port, str(out), env or {}, args)) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    assert not hung, f"rank(s) {hung} still running after {timeout:.0f} s: the job hangs"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def ok(results: list[dict[str, Any]]) -> list[Any]:
    for r, res in enumerate(results):
        assert "ok" in res, f"rank {r}: {res.get('traceback', res)}"
    return [res["ok"] for res in results]


# ---------------------------------------------------------------- defect 2: a batch with no labels


def _probe_worker(rank: int) -> dict[str, Any]:
    from simclrv2.data.augment import SimCLRAugment
    from simclrv2.engine.device import augment
    from simclrv2.engine.models import distribute
    from simclrv2.engine.pretrain import ContrastiveStep, PretrainParts, contrastive_loss, contrastive_views
    from simclrv2.models import create_model

    device = sdist.setup_distributed("cpu")
    torch.manual_seed(0)  # the same initial weights on both ranks, as DDP's broadcast makes them
    model = create_model("r10_0.25x_sk0", in_chans=1, cifar_stem=True)
    step_module = ContrastiveStep(model, 3, probe=True)
    train_module = distribute(step_module, device, global_bn=False)
    aug = SimCLRAugment(16)
    parts = PretrainParts(model, step_module, train_module, None, None, None, aug,  # type: ignore[arg-type]
                   SimpleNamespace(streams=False), None, 16)  # type: ignore[arg-type]
    cfg = SimpleNamespace(channels_last=False, temperature=0.5, loss_directions="sum")
    x = torch.randint(0, 256, (4, 1, 16, 16), generator=torch.Generator().manual_seed(10 + rank), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 1]) if rank == 0 else torch.full((4,), -1)  # rank 1: nothing labelled
    g = torch.Generator().manual_seed(rank)
    g_ref = torch.Generator().set_state(g.get_state())
    loss, stats, _ = contrastive_loss(cfg, parts, contrastive_views(cfg, parts, x, g), y)  # type: ignore[arg-type]
    loss.backward()  # DDP all-reduces the probe's gradients with the other rank's
    # This rank's own probe gradient, outside DDP: the same views, features and labels.
    views = torch.cat([augment(aug, x, g_ref), augment(aug, x, g_ref)])
    with torch.no_grad():
        feats, _ = model.contrastive(views)
    w = step_module.classifier.weight.detach().clone().requires_grad_()
    f = (feats - feats.mean(0)) / (feats.std(0) + 1e-5)
    logits = F.linear(f, w, step_module.classifier.bias.detach())
    targets = y.repeat(2)
    local_grad = (torch.autograd.grad(F.cross_entropy(logits, targets, ignore_index=-1), w)[0]
                  if (targets >= 0).any() else torch.zeros_like(w))
    return {"loss": loss.detach(), "probe_loss": stats["probe_loss"], "probe_acc": stats["probe_acc"],
            "probe_grad": step_module.classifier.weight.grad.clone(), "local_grad": local_grad}


def test_a_rank_without_labelled_images_trains_the_probe_on_the_others(tmp_path):
    """Issue 30, defect 2: rank 1's batch holds no labelled image. Its probe loss is 0 (not NaN),
    both ranks' losses are finite, and the probe's gradient on both is the average of the ranks'
    own: rank 0's gradient over its labelled rows, halved."""
    res = ok(run_ranks(_probe_worker, tmp_path))
    for r, got in enumerate(res):
        assert torch.isfinite(got["loss"]), f"rank {r}: loss {got['loss']}"
    assert res[1]["probe_loss"] == 0 and res[1]["probe_acc"] == 0
    assert res[0]["probe_loss"] > 0
    expected = (res[0]["local_grad"] + res[1]["local_grad"]) / WORLD
    assert res[1]["local_grad"].abs().sum() == 0 and res[0]["local_grad"].abs().sum() > 0
    for got in res:
        torch.testing.assert_close(got["probe_grad"], expected, rtol=1e-4, atol=1e-6)


def _non_finite_worker(rank: int, run_dir: str) -> str:
    from simclrv2.engine.batches import StepPlan
    from simclrv2.engine.metrics import TrainLog

    device = sdist.setup_distributed("cpu")
    cfg = SimpleNamespace(log_every=1, progress=False)
    log = TrainLog("pretrain", cfg, Path(run_dir), StepPlan.make(8, 4, 1.0, 0), 0, device)
    log.add(torch.tensor(float("nan") if rank == 1 else 1.0))  # a loss gone non-finite on one rank
    log.write(1, 0.1)
    return "wrote"


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    """A rank stopping alone on its non-finite loss leaves the others waiting in their next
    collective; the check agrees across ranks, so all stop with the same line."""
    res = run_ranks(_non_finite_worker, tmp_path, str(tmp_path))
    for r, got in enumerate(res):
        assert "the loss became non-finite before step 1" in got.get("error", ""), f"rank {r}: {got}"


# ---------------------------------------------------------------- defect 3: distillation from student_init


def _cli_worker(rank: int, argv: list[str]) -> int:
    from simclrv2.cli import main

    return main(argv)


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_distill_from_student_init_under_ddp(tmp_path):
    """Issue 30, defect 3: a student initialised from a pretraining checkpoint carries a projection
    head that never runs (its classifier sits on the features). Under DDP, trainable parameters
    without a gradient failed step 2 ("Expected to have finished reduction in the prior
    iteration"); the head is frozen now, so three steps train and both ranks finish."""
    from test_resume import make_image_folder

    from simclrv2 import checkpoint as ckpt
    from simclrv2.cli import main

    data = ["dataset=imagefolder", f"data_dir={make_image_folder(tmp_path / 'images')}", "image_size=16",
            "num_workers=0", "progress=false", "model=r10_0.25x_sk0"]
    pre, ft, student = tmp_path / "pre", tmp_path / "ft", tmp_path / "distill"
    assert main(["pretrain", *data, "batch_size=8", "max_steps=1", "knn_every=0", f"run_dir={pre}"]) == 0
    assert main(["finetune", *data, f"init_checkpoint={pre}", "label_fraction=1.0", "batch_size=8",
                 "max_steps=1", "min_steps=0", f"run_dir={ft}"]) == 0
    argv = ["distill", *data, f"teacher_checkpoint={ft}", f"student_init={pre}", "batch_size=8", "min_steps=3",
            "epochs=0.1", "log_every=1", f"run_dir={student}"]
    for r, got in enumerate(run_ranks(_cli_worker, tmp_path, argv, timeout=90)):
        assert got.get("ok") == 0, f"rank {r}: {str(got.get('error', got))[:300]}"
    assert ckpt.read_meta(ckpt.latest_checkpoint(student))["step"] == 3
    # the head never ran, so it is the init's, bit for bit
    before, after = ckpt.read_model_file(str(pre))[0], ckpt.read_model_file(str(student))[0]
    head = [k for k in before if k.startswith("proj_head.")]
    assert head and all(torch.equal(before[k], after[k]) for k in head)


def _deadline_worker(rank: int, argv: list[str]) -> int:
    from simclrv2.cli import main
    from simclrv2.engine.deadline import Deadline, pretraining_deadline

    # rank 0's clock says the deadline is past, rank 1's that it is an hour away: rank 0 decides
    end = time.time() + (-1 if rank == 0 else 3600)
    with pretraining_deadline(Deadline(end, epoch_seconds=1.0, after_seconds=0.0)):
        return main(argv)


def test_a_deadline_cuts_pretraining_on_every_rank_where_rank_0_says_so(tmp_path):
    """The pipeline's budget deadline (engine.deadline) shortens pretraining at an epoch end; every
    rank must stop at the same step, or one would wait in a collective the other never joins."""
    from test_resume import make_image_folder

    from simclrv2 import checkpoint as ckpt

    run = tmp_path / "pre"
    argv = ["pretrain", "dataset=imagefolder", f"data_dir={make_image_folder(tmp_path / 'images')}",
            "image_size=16", "num_workers=0", "progress=false", "model=r10_0.25x_sk0", "batch_size=8",
            "epochs=4", "warmup_epochs=0.5", "knn_every=0", f"run_dir={run}"]
    for r, got in enumerate(run_ranks(_deadline_worker, tmp_path, argv, timeout=90)):
        assert got.get("ok") == 0, f"rank {r}: {str(got.get('error', got))[:300]}"
    # 48 images at batch 8: 6 steps an epoch; cut at the end of the first to one more step
    assert ckpt.read_meta(ckpt.latest_checkpoint(run))["step"] == 7


# ---------------------------------------------------------------- defect 10: ranks on different devices


def _device_worker(rank: int) -> str:
    from simclrv2.engine.device import resolve_device

    # rank 0 sees a GPU, rank 1 (a node with a driver too old for the torch build) does not
    torch.cuda.is_available = lambda: rank == 0  # this forked process only
    return str(resolve_device("auto"))


@pytest.mark.slow
def test_ranks_that_resolve_different_devices_all_stop(tmp_path):
    """Under torchrun, device=auto must not mix NCCL ranks with gloo ranks (they would wait for
    each other until the timeout): every rank stops with one line naming which took which."""
    res = run_ranks(_device_worker, tmp_path, timeout=30)
    for r, got in enumerate(res):
        error = got.get("error", "")
        assert error.startswith("DeviceMismatchError: the ranks resolved different devices"), f"rank {r}: {got}"
        assert "cpu on rank(s) 1" in error and "cuda on rank(s) 0" in error and "\n" not in error


def _same_device_worker(rank: int) -> str:
    from simclrv2.engine.device import resolve_device

    device = resolve_device("cpu")
    sdist.barrier()
    return str(device)


def test_ranks_on_the_same_device_join_the_group(tmp_path):
    assert ok(run_ranks(_same_device_worker, tmp_path)) == ["cpu", "cpu"]


# ---------------------------------------------------------------- defect 4: budget_minutes under torchrun


def _pipeline_config(data: Path, run_dir: Path, **extra: Any) -> Any:
    from simclrv2.pipeline import PipelineConfig

    common = {"dataset": "imagefolder", "data_dir": str(data), "image_size": 16, "num_workers": 0,
              "model": "r10_0.25x_sk0", "progress": False, "batch_size": 16, "global_bn": False}
    return PipelineConfig(
        run_dir=str(run_dir), label_fractions=[0.5], self_distill=False, small_student="", embedding_points=0,
        plots=False, common=common, pretrain={"knn_every": 0, "log_every": 1},
        finetune={"epochs": 1, "min_steps": 0}, supervised={"epochs": 1, "min_steps": 0},
        linear_eval={"epochs": 1}, **extra)


def _budget_worker(rank: int, data: str, run_dir: str, calls: str) -> dict[str, Any]:
    from simclrv2 import budget
    from simclrv2.pipeline import run_pipeline

    def measure(pc: Any, t0: float, device: Any = None, reuse: Any = None) -> dict[str, Any]:
        # a stand-in for the measurement that gives each rank its own answer, as two machines of
        # different speed (or one under load) do: 2 epochs on rank 0, 1 on rank 1
        with open(calls, "a") as f:
            f.write(f"{rank} {device}\n")
        time.sleep(1.0)  # measuring takes a while: ranks measuring at once all do so before budget.json exists
        return {"budget_minutes": pc.budget_minutes, "epochs": 2.0 - rank, "image_size": 16, "epoch_seconds": 1.0,
                "other_seconds": 1.0, "other_scale": 1.0, "measure_seconds": 0.0, "stage_estimates": {}}

    budget._fit = measure
    out = run_pipeline(_pipeline_config(Path(data), Path(run_dir), budget_minutes=1.0))
    return {"pretrain_steps": out["pretrain"]["steps"], "methods": sorted(r["method"] for r in out["results"])}


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_budget_under_torchrun_is_measured_once_and_shared(tmp_path):
    """Issue 30, defect 4: with budget_minutes, every rank measured on its own before the process
    group existed and chose its own epochs; the ranks then trained different step counts and hung.
    Now rank 0 measures once, on the training device, and both ranks train its plan to the end."""
    from test_resume import make_image_folder

    data = make_image_folder(tmp_path / "images")  # 48 training images: 3 steps an epoch at batch 16
    calls = tmp_path / "calls.txt"
    res = ok(run_ranks(_budget_worker, tmp_path, str(data), str(tmp_path / "run"), str(calls), timeout=120))
    assert calls.read_text().splitlines() == ["0 cpu"]  # measured once, by rank 0, on the training device
    assert res[0] == res[1]
    assert res[0]["pretrain_steps"] == 6  # rank 0's 2 epochs
    assert res[0]["methods"] == ["finetune", "knn", "linear-eval", "supervised"]  # the job ran to its end


def _alone_worker(rank: int) -> dict[str, Any]:
    from simclrv2.engine.models import distribute

    device = sdist.setup_distributed("cpu")
    seen = None
    if rank == 0:  # works by itself while rank 1 waits for its answer, as the budget's measurement does
        with sdist.alone():
            module = distribute(torch.nn.Linear(3, 2), device, global_bn=True)  # DDP's constructor is a collective
            rows = len(sdist.gather_with_grad(torch.ones(2, 3, requires_grad=True)))
            sdist.barrier()
            seen = {"is_dist": sdist.is_dist(), "rank": sdist.rank(), "world": sdist.world_size(),
                    "module": type(module).__name__, "rows": rows, "broadcast": sdist.broadcast_object("own")}
        with pytest.raises(KeyError), sdist.alone():
            raise KeyError("left by an error")
    answer = sdist.broadcast_object(seen)
    sdist.barrier()
    return {"answer": answer, "after": (sdist.is_dist(), sdist.rank(), sdist.world_size())}


def test_alone_answers_as_one_process_while_the_others_wait(tmp_path):
    """distributed.alone(): inside it, one rank builds and runs what would otherwise join the
    group's collectives (DDP's parameter broadcast, the gather, a barrier) without the waiting
    ranks; afterwards, also after an error inside, the group is there as before."""
    res = ok(run_ranks(_alone_worker, tmp_path))
    alone = {"is_dist": False, "rank": 0, "world": 1, "module": "Linear", "rows": 2, "broadcast": "own"}
    assert [r["answer"] for r in res] == [alone, alone]
    assert [r["after"] for r in res] == [(True, 0, 2), (True, 1, 2)]


def _budget_step_worker(rank: int, data: str, run_dir: str) -> dict[str, Any]:
    from simclrv2 import budget
    from simclrv2.engine import pretrain

    sdist.setup_distributed("cpu")
    calls = []
    stage_step = pretrain.train_step
    pretrain.train_step = lambda *args: calls.append(sdist.world_size()) or stage_step(*args)
    budget._StepTimer.classifier_step = lambda self, cfg, batch, teacher_cfg=None: 0.01
    budget._StepTimer.per_image = lambda self, cfg: 1e-4
    rec = budget.fit_pretraining(_pipeline_config(Path(data), Path(run_dir), budget_minutes=5.0))
    sdist.barrier()  # the group still works after rank 0's measurement
    return {"epochs": rec["epochs"], "calls": calls}


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_budget_times_the_pretraining_step_on_rank_0_alone(tmp_path):
    """Issue 33: the budget times pretraining's own step (DDP and the gathered loss when built under
    torchrun); rank 0 builds and runs it alone, as one process, while rank 1 waits for the epochs."""
    from test_resume import make_image_folder

    data = make_image_folder(tmp_path / "images")
    res = ok(run_ranks(_budget_step_worker, tmp_path, str(data), str(tmp_path / "run"), timeout=120))
    assert res[0]["epochs"] == res[1]["epochs"] >= 1
    from simclrv2.budget import TIMED_STEPS

    assert res[0]["calls"] == [1] * (1 + TIMED_STEPS) and res[1]["calls"] == []  # warm-up + timed, rank 0 only


# ---------------------------------------------------------------- defect 7: a run folder per node


def _node_local_worker(rank: int, root: str, command: str) -> tuple[int, list[str]]:
    """The command's exit code and the error lines it printed. Each rank collects its own: two forked
    ranks writing to one captured stderr at the same moment can lose a line."""
    import contextlib
    import io

    from simclrv2.cli import main

    # each rank its own folder: what node-local disks look like, with the same path on every node
    run_dir = Path(root) / f"node{rank}"
    if command == "pipeline":
        import yaml

        config = Path(root) / f"pipeline{rank}.yaml"
        config.write_text(yaml.safe_dump({"run_dir": str(run_dir), "common": {"dataset": "imagefolder",
                                          "data_dir": str(Path(root) / "images")}}))
        argv = ["pipeline", "--config", str(config)]
    else:
        argv = ["pretrain", "dataset=imagefolder", f"data_dir={Path(root) / 'images'}", "image_size=16",
                "num_workers=0", "model=r10_0.25x_sk0", "batch_size=16", "max_steps=2", "knn_every=0",
                "progress=false", f"run_dir={run_dir}"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, [ln for ln in err.getvalue().splitlines() if ln.startswith("error:")]


@pytest.mark.slow
@pytest.mark.fashion_mnist
@pytest.mark.parametrize("command", ["pretrain", "pipeline"])
def test_run_folders_that_are_not_shared_stop_every_rank(tmp_path, command):
    """Issue 30, defect 7: rank 0 alone writes checkpoints and done.json, and every rank reads
    them, so a multi-node run needs one run folder that all nodes see. With a folder per node,
    every rank stops at once with one line that says so (exit 2), before anything trains."""
    from test_resume import make_image_folder

    make_image_folder(tmp_path / "images")
    res = ok(run_ranks(_node_local_worker, tmp_path, str(tmp_path), command, timeout=60))
    assert [code for code, _ in res] == [2, 2]
    errors = [lines for _, lines in res]
    assert all(len(lines) == 1 and "is not shared: rank(s) 1" in lines[0] for lines in errors), errors
    assert not (tmp_path / "node0" / "pretrain" / "checkpoints").exists()
    assert not (tmp_path / "node0" / "checkpoints").exists()

"""Fault injection (issue 10): SIGKILL a CPU pretraining run at random moments, restart it each time.

The run is the real CLI (``simclrv2.cli.main``, what ``python -m simclrv2`` calls) in a child
process, writing a checkpoint every step. Children are forked from a multiprocessing fork server
that has imported torch and simclrv2 once, so a restart costs no interpreter start-up (seconds on a
loaded CI box) and ten kills fit in well under a minute; each child is still a separate process
that is SIGKILLed with its files half written. The child patches ``simclrv2.checkpoint`` to
pause after each file of a checkpoint and before each deletion (``tests/_slow_checkpoint.py``), so
that kills land inside those windows on purpose. After every kill the test checks that each complete checkpoint on disk is
readable in full, and after every restart that the run resumed from the newest complete checkpoint
(its "resuming from ... at step N" line). At the end the weights, optimizer state and metrics equal
those of an uninterrupted run with the same seed, bit for bit.

The pipeline test (issue 20) SIGKILLs ``simclrv2 pipeline`` in every one of its stages, at least
10 times in all, each kill at a random moment within the span that stage took uninterrupted; every
restart takes over the killed process's stale run-folder locks. The finished results.json equals an
uninterrupted run's apart from its timings.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import struct
import sys
import time
from pathlib import Path

import _slow_checkpoint
import numpy as np
import pytest
import torch
import yaml
from test_resume import make_image_folder

from simclrv2 import checkpoint as ckpt
from simclrv2.cli import main
from simclrv2.data.builtin import FASHION_MNIST_SYSTEM_DIR

MIN_KILLS = 10
SEED = 20240611
N_IMAGES = 2048  # a Fashion-MNIST subset keeps each restart's start-up short
# 2048 images at batch 16 are 128 steps per epoch: 0.125 epochs = 16 steps, of which the warmup
# (0.03125 epochs) takes 4; the rest run on the cosine part of the schedule.
ARGS = [
    "pretrain", "model=r10_0.25x_sk0", "dataset=fashion_mnist", "batch_size=16", "epochs=0.125",
    "warmup_epochs=0.03125", "knn_every=0", "progress=false", "log_every=1", "checkpoint_every=1",
    "keep_checkpoints=2", "seed=3",
]
TOTAL_STEPS = 16
RESUME_LINE = re.compile(r"pretrain: resuming from (\S+) at step (\d+)")


def fashion_mnist_subset(data_dir: Path, n: int) -> Path:
    """The first ``n`` training images and labels of Fashion-MNIST as uncompressed IDX files."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for stem, item in (("train-images-idx3-ubyte", 28 * 28), ("train-labels-idx1-ubyte", 1)):
        with gzip.open(FASHION_MNIST_SYSTEM_DIR / f"{stem}.gz", "rb") as f:
            header = bytearray(f.read(16 if item > 1 else 8))
            body = f.read(n * item)
        header[4:8] = struct.pack(">I", n)  # the item count; the magic and image shape stay
        (data_dir / stem).write_bytes(bytes(header) + body)
    return data_dir


def complete_checkpoints_are_readable(run_dir: Path) -> list[int]:
    """Open every file of every complete checkpoint; return their steps."""
    steps = []
    for c in ckpt.list_checkpoints(run_dir):
        assert sorted(p.name for p in c.iterdir()) == [
            "meta.json", "model.safetensors", "optimizer.pt", "state.safetensors"
        ], f"{c} is listed as complete but misses files"
        meta = ckpt.read_meta(c)
        assert meta["stage"] == "pretrain" and c.name == f"step-{meta['step']:08d}"
        model = ckpt.load_tensors(c / "model.safetensors")
        assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())
        ckpt.load_tensors(c / "state.safetensors")
        assert ckpt.load_optimizer_state(c)["optimizer"]["state"]
        steps.append(meta["step"])
    return steps


def metric_lines(run_dir: Path) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("time"), rec.pop("images_per_s", None)
        out.append(rec)
    return out


def _child(argv: list[str], err_path: str, slow_checkpoint: float) -> None:
    """Body of a forked run: the CLI with stdout and stderr in a file, one thread like the reference,
    with a pause of ``slow_checkpoint`` seconds at each checkpoint write and deletion window."""
    if slow_checkpoint:
        _slow_checkpoint.install(slow_checkpoint)
    torch.set_num_threads(1)
    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.exit(main(argv))


def launcher():
    """A fork server with torch and simclrv2 imported; ``start(argv, err_path)`` forks one run."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "simclrv2.cli", "simclrv2.engine.pretrain",
                                "simclrv2.engine.finetune", "simclrv2.engine.supervised", "simclrv2.engine.distill",
                                "simclrv2.pipeline"])

    def start(argv: list[str], err_path: Path, slow_checkpoint: float = 0.0) -> multiprocessing.Process:
        proc = ctx.Process(target=_child, args=(argv, str(err_path), slow_checkpoint), daemon=True)
        proc.start()
        return proc

    return start


def wait_for(cond, proc: multiprocessing.Process, timeout: float = 120.0, poll: float = 0.005) -> bool:
    """Poll ``cond`` until true; False when the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if not proc.is_alive():
            return bool(cond())
        time.sleep(poll)
    raise AssertionError("the training process made no progress in time")


def kill(proc: multiprocessing.Process) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL


def test_slow_checkpoint_pauses_inside_every_write_and_deletion_window(tmp_path: Path) -> None:
    """tests/_slow_checkpoint.py pauses after each file of a checkpoint lands in its temporary folder
    and before an old checkpoint, already renamed aside, is removed: the windows the kill tests aim at."""
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    seen: list[dict[str, list[str]]] = []

    def record() -> None:  # every checkpoint folder on disk and its files, at the pause
        seen.append({d.name: sorted(p.name for p in d.iterdir()) for d in sorted(root.iterdir())})

    def save(step: int) -> None:
        ckpt.save_checkpoint(run_dir, step, {"w": torch.full((3,), float(step))}, {"stage": "pretrain"},
                             extra_tensors={"queue": torch.zeros(2)},
                             optimizer_state={"state": {0: {"momentum_buffer": torch.ones(3)}}}, keep=1)

    pid = os.getpid()
    tmp1, tmp2 = f"step-00000001.tmp-{pid}", f"step-00000002.tmp-{pid}"
    all_files = ["meta.json", "model.safetensors", "optimizer.pt", "state.safetensors"]
    writing = [["model.safetensors"], ["model.safetensors", "state.safetensors"],
               ["model.safetensors", "optimizer.pt", "state.safetensors"], all_files]
    patches = _slow_checkpoint.install(0.0, record)
    try:
        save(1)
        assert seen == [{tmp1: files} for files in writing]
        seen.clear()
        save(2)  # keep=1: step 1 is renamed aside, then removed
        assert seen == [{"step-00000001": all_files, tmp2: files} for files in writing] + [
            {f"step-00000001.del-{pid}": all_files, "step-00000002": all_files}]
        seen.clear()
        save(2)  # the same step again: the old step 2 is renamed aside and removed before the new one lands
        assert seen == [{"step-00000002": all_files, tmp2: files} for files in writing] + [
            {f"step-00000002.del-{pid}": all_files, tmp2: all_files}]
    finally:
        patches.undo()
    seen.clear()
    save(3)  # undone: no more pauses
    assert seen == [] and [c.name for c in ckpt.list_checkpoints(run_dir)] == ["step-00000003"]
    # the default pause sleeps: four files and one deletion take at least five pauses
    patches = _slow_checkpoint.install(0.05)
    try:
        t0 = time.monotonic()
        save(4)
        assert time.monotonic() - t0 >= 5 * 0.05
    finally:
        patches.undo()


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_sigkill_at_random_moments_then_resume_bitwise(tmp_path: Path) -> None:
    args = [*ARGS, f"data_dir={fashion_mnist_subset(tmp_path / 'data', N_IMAGES)}"]
    # the uninterrupted reference, in this process with the subprocesses' thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, f"run_dir={tmp_path / 'reference'}"]) == 0
    finally:
        torch.set_num_threads(threads)
    reference = ckpt.latest_checkpoint(tmp_path / "reference")
    assert reference.name == f"step-{TOTAL_STEPS:08d}"

    run_dir = tmp_path / "killed"
    ckpt_root = run_dir / "checkpoints"
    start = launcher()
    rng = random.Random(SEED)
    kills = during_write = during_delete = restarts = 0
    t0 = time.monotonic()
    for attempt in range(60):
        before = ckpt.list_checkpoints(run_dir)
        err_path = tmp_path / f"stderr-{attempt}.txt"
        err_path.write_text("")
        proc = start([*args, f"run_dir={run_dir}"], err_path, slow_checkpoint=0.08)
        pid = proc.pid

        def resumed_line(err_path: Path = err_path) -> re.Match | None:
            return RESUME_LINE.search(err_path.read_text())

        def writing(pid: int = pid) -> bool:
            return any(ckpt_root.glob(f"step-*.tmp-{pid}"))

        # wait until training runs: the resume line, or (fresh start) the first checkpoint folder
        if before:
            wait_for(lambda: resumed_line() is not None, proc)
        else:
            wait_for(lambda: ckpt_root.is_dir() and any(ckpt_root.iterdir()), proc)
        m = resumed_line()
        if before:
            restarts += 1
            # the restart resumed from the newest complete checkpoint
            assert m is not None, err_path.read_text()
            assert Path(m.group(1)) == before[-1] and int(m.group(2)) == int(before[-1].name[5:])
        else:
            assert m is None

        if kills >= MIN_KILLS:
            proc.join(timeout=300)
            assert proc.exitcode == 0, err_path.read_text()
            break
        if rng.random() < 0.6:  # aim at a checkpoint write: wait for its temporary folder
            if not wait_for(writing, proc):
                break
            time.sleep(rng.uniform(0.0, 0.45))  # the write takes 4 pauses, the deletion 1 more
        else:  # any moment of the step loop
            time.sleep(rng.uniform(0.0, 1.5))
        if not proc.is_alive():  # finished before the kill came
            break
        kill(proc)
        kills += 1
        during_write += writing()
        during_delete += any(ckpt_root.glob(f"step-*.del-{pid}"))
        complete_checkpoints_are_readable(run_dir)
    proc.join()
    assert proc.exitcode == 0, err_path.read_text()

    elapsed = time.monotonic() - t0
    print(f"\nfault injection: survived {kills} SIGKILLs ({during_write} during a checkpoint write, "
          f"{during_delete} during a checkpoint deletion), {restarts} restarts, {elapsed:.0f} s")
    assert kills >= MIN_KILLS, "the run finished before enough kills; lengthen it"
    assert during_write >= 3, "too few kills landed inside a checkpoint write"

    # finished: the last checkpoint equals the uninterrupted run's, bit for bit
    steps = complete_checkpoints_are_readable(run_dir)
    assert steps[-1] == TOTAL_STEPS
    final = ckpt.latest_checkpoint(run_dir)
    for name in ("model.safetensors", "state.safetensors"):
        a, b = ckpt.load_tensors(reference / name), ckpt.load_tensors(final / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs from the uninterrupted run"
    oa = ckpt.load_optimizer_state(reference)["optimizer"]["state"]
    ob = ckpt.load_optimizer_state(final)["optimizer"]["state"]
    assert all(torch.equal(oa[i]["momentum_buffer"], ob[i]["momentum_buffer"]) for i in oa)
    # the metrics file reads as one uninterrupted run: every step once, the same values
    assert metric_lines(run_dir) == metric_lines(tmp_path / "reference")
    # the leftovers of killed writes and deletions were cleaned up by later saves
    assert not list(ckpt_root.glob("*.tmp-*")) and not list(ckpt_root.glob("*.del-*"))


# ------------------------------------------------------------------ the pipeline command


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime in ns) of every file: any rewrite of the folder changes it."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_pipeline_killed_during_finetune_resumes_there(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "images")
    run = tmp_path / "pipeline"
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(run), "label_fractions": [1.0], "self_distill": False, "embedding_points": 0,
        "plots": False,
        "common": {"model": "r10_0.25x_sk0", "dataset": "imagefolder", "data_dir": str(data),
                   "image_size": 16, "num_workers": 0, "progress": False, "batch_size": 8},
        "pretrain": {"max_steps": 3, "knn_every": 0},
        # 48 images at batch 8: 6 steps per epoch, 12 steps, a checkpoint after each
        "finetune": {"epochs": 2, "min_steps": 0, "checkpoint_every": 1, "log_every": 1},
        "linear_eval": {"epochs": 5},
        "supervised": {"max_steps": 2},
    }))
    ft_dir = run / "finetune_100pct"
    start = launcher()
    rng = random.Random(SEED)

    first = start(["pipeline", "--config", str(config)], tmp_path / "out-0.txt", slow_checkpoint=0.05)
    # kill once fine-tuning has written its third checkpoint, at a random moment after it
    # (steps from folder names: the training process may prune a folder while we look)
    wait_for(lambda: any(int(c.name[5:]) >= 3 for c in ckpt.list_checkpoints(ft_dir)), first)
    time.sleep(rng.uniform(0.0, 0.3))
    assert first.is_alive(), (tmp_path / "out-0.txt").read_text()
    kill(first)
    assert (run / "pretrain" / "done.json").is_file() and not (ft_dir / "done.json").exists()
    last = ckpt.latest_checkpoint(ft_dir)
    last_step, before = ckpt.read_meta(last)["step"], ckpt.read_meta(last)["train_seconds"]
    assert 3 <= last_step < 12
    pretrain_files = snapshot(run / "pretrain")

    second = start(["pipeline", "--config", str(config)], tmp_path / "out-1.txt")
    second.join(timeout=300)
    out = (tmp_path / "out-1.txt").read_text()
    assert second.exitcode == 0, out
    assert "pretrain: skipped, done before" in out
    assert "pretrain: resuming" not in out
    assert f"finetune: resuming from {last} at step {last_step}" in out
    assert snapshot(run / "pretrain") == pretrain_files, "pretraining was redone or rewritten"
    # the stage's time counts the killed process's training up to the checkpoint it resumed from
    rec = json.loads((ft_dir / "done.json").read_text())
    assert rec["seconds_before_resume"] == before > 0 and rec["seconds"] > before
    assert json.loads((run / "results.json").read_text())["results"]

    # the resumed fine-tuning equals an uninterrupted one with the same config, bit for bit
    values = yaml.safe_load((ft_dir / "config.yaml").read_text())
    values.pop("stage")
    values["run_dir"] = str(tmp_path / "finetune_reference")
    ref_config = tmp_path / "finetune.yaml"
    ref_config.write_text(yaml.safe_dump(values))
    assert main(["finetune", "--config", str(ref_config)]) == 0
    a, b = ckpt.latest_checkpoint(tmp_path / "finetune_reference"), ckpt.latest_checkpoint(ft_dir)
    assert a.name == b.name == "step-00000012"
    ta, tb = ckpt.load_tensors(a / "model.safetensors"), ckpt.load_tensors(b / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert np.array_equal(np.load(tmp_path / "finetune_reference" / "predictions.npy"),
                          np.load(ft_dir / "predictions.npy"))


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_pipeline_reruns_an_edited_stage_and_the_stages_that_read_it(tmp_path: Path, capsys) -> None:
    """Editing one stage's config reruns that stage from scratch and every stage built on its
    output (here the distillation of the fine-tuned teacher); the stages beside it are skipped."""
    data = make_image_folder(tmp_path / "images")
    run = tmp_path / "pipeline"
    values = {
        "run_dir": str(run), "label_fractions": [1.0], "self_distill": True, "embedding_points": 0,
        "plots": False,
        "common": {"model": "r10_0.25x_sk0", "dataset": "imagefolder", "data_dir": str(data),
                   "image_size": 16, "num_workers": 0, "progress": False, "batch_size": 8},
        "pretrain": {"max_steps": 2, "knn_every": 0},
        "finetune": {"max_steps": 3, "checkpoint_every": 1},
        "distill_self": {"max_steps": 2},
        "linear_eval": {"epochs": 3},
        "supervised": {"max_steps": 2},
    }
    config = tmp_path / "pipeline.yaml"

    def pipeline() -> dict[str, str]:
        config.write_text(yaml.safe_dump(values))
        capsys.readouterr()
        assert main(["pipeline", "--config", str(config)]) == 0
        lines = re.findall(r"^\[\d+/\d+\] (\w+): (.+)$", capsys.readouterr().out, re.M)
        return {name: "skipped" if "skipped" in note else "ran" for name, note in lines}

    assert set(pipeline().values()) == {"ran"}
    ft_dir, ds_dir = run / "finetune_100pct", run / "distill_self_100pct"
    first_steps = sorted(c.name for c in ckpt.list_checkpoints(ft_dir))
    kept = {name: snapshot(run / name) for name in ("pretrain", "linear_eval", "knn", "supervised_100pct")}
    teacher_print = json.loads((ds_dir / "done.json").read_text())["upstream"]

    values["finetune"]["base_lr"] = 0.02  # the edit
    second = pipeline()
    assert second == {"pretrain": "skipped", "finetune_100pct": "ran", "distill_self_100pct": "ran",
                      "linear_eval": "skipped", "knn": "skipped", "supervised_100pct": "skipped"}
    assert {name: snapshot(run / name) for name in kept} == kept, "a stage beside the edit was rewritten"
    # fine-tuning started over (it did not resume from the old run's last checkpoint) and kept the old run
    assert yaml.safe_load((ft_dir / "config.previous.yaml").read_text())["base_lr"] != 0.02
    assert sorted(c.name for c in (ft_dir / "checkpoints.previous").iterdir()) == first_steps
    lines = [json.loads(x) for x in (ft_dir / "metrics.jsonl").read_text().splitlines()]
    assert min(x["step"] for x in lines if "step" in x) == 1
    # the student was distilled again, from the new teacher
    rec = json.loads((ds_dir / "done.json").read_text())
    assert rec["upstream"] != teacher_print
    assert rec["result"]["teacher_top1"] == json.loads((ft_dir / "done.json").read_text())["result"]["top1"]

    assert set(pipeline().values()) == {"skipped"}  # nothing changed: nothing runs


PIPELINE_KILLS = 10


def _without_seconds(out: dict) -> dict:
    """results.json without its timings: total_seconds, the per-stage seconds, each result's seconds."""
    out = json.loads(json.dumps(out))
    out.pop("total_seconds")
    out["stages"] = sorted(out["stages"])
    for r in out["results"]:
        r.pop("seconds")
    return out


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_pipeline_killed_at_random_moments_across_all_stages(tmp_path: Path) -> None:
    """SIGKILL ``simclrv2 pipeline`` at least 10 times, aimed at random moments of every stage,
    then let it finish: results.json equals an uninterrupted run's apart from timings, and every
    training stage's metrics.jsonl reads as one uninterrupted run."""
    data = make_image_folder(tmp_path / "images")
    run = tmp_path / "pipeline"
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(run), "label_fractions": [1.0], "self_distill": True, "embedding_points": 0,
        "plots": False,
        "common": {"model": "r10_0.25x_sk0", "dataset": "imagefolder", "data_dir": str(data),
                   "image_size": 16, "num_workers": 0, "progress": False, "batch_size": 8,
                   "checkpoint_every": 1, "log_every": 1},
        "pretrain": {"max_steps": 6, "knn_every": 0},
        "finetune": {"max_steps": 6},
        "distill_self": {"max_steps": 6},
        "linear_eval": {"epochs": 5},
        "supervised": {"max_steps": 6},
    }))
    argv = ["pipeline", "--config", str(config)]
    start = launcher()

    # the uninterrupted reference, in the same folder (results.json holds the run folders and the
    # config hash), then moved aside
    ref = start(argv, tmp_path / "reference.txt")
    ref.join(timeout=300)
    assert ref.exitcode == 0, (tmp_path / "reference.txt").read_text()
    stages = re.findall(r"^\[\d+/\d+\] (\w+) \(", (tmp_path / "reference.txt").read_text(), re.M)
    assert len(stages) == 6
    run.rename(tmp_path / "reference")
    reference = tmp_path / "reference"
    # how long each stage ran uninterrupted: kills are aimed at a random moment within that span
    span = {s: json.loads((reference / s / "done.json").read_text())["seconds"] for s in stages}

    rng = random.Random(SEED)
    killed_in: list[str] = []
    # how much of a stage's reference span a kill may wait; halved for a stage each time a kill misses it
    reach = {s: 0.9 for s in stages}
    before = tmp_path / "before-attempt"
    for attempt in range(60):
        out_path = tmp_path / f"out-{attempt}.txt"
        out_path.write_text("")
        shutil.rmtree(before, ignore_errors=True)
        if run.exists():
            shutil.copytree(run, before, symlinks=True)
        proc = start(argv, out_path)
        if len(killed_in) >= PIPELINE_KILLS and set(killed_in) == set(stages):
            break
        # the first unfinished stage, up to 3 kills each (the probes start over when killed: without a
        # cap they would be killed for ever), at a random moment within its uninterrupted span
        pending = [s for s in stages if not (run / s / "done.json").is_file() and killed_in.count(s) < 3]
        if not pending:
            break
        target = pending[0]
        begun = re.compile(rf"^\[\d+/\d+\] {target} \(", re.M)
        if not wait_for(lambda begun=begun, out_path=out_path: begun.search(out_path.read_text()) is not None, proc):
            break
        time.sleep(rng.uniform(0.0, reach[target] * span[target]))
        if not proc.is_alive():
            break
        kill(proc)
        text = out_path.read_text()
        assert "failed verification" not in text, text
        running = re.findall(r"^\[\d+/\d+\] (\w+) \(", text, re.M)
        if running[-1] != target and (run / target / "done.json").is_file():
            # the target ran faster than in the reference (a busy machine, then a quiet one) and finished
            # before the kill: put the run folder back as this attempt found it and aim earlier
            shutil.rmtree(run)
            if before.exists():
                shutil.copytree(before, run, symlinks=True)
            reach[target] /= 2
            continue
        killed_in.append(running[-1])
    proc.join(timeout=300)
    out = out_path.read_text()
    assert proc.exitcode == 0, out
    assert "failed verification" not in out
    print(f"\npipeline fault injection: {len(killed_in)} SIGKILLs, in {sorted(set(killed_in))}")
    assert len(killed_in) >= PIPELINE_KILLS, f"the pipeline finished after {len(killed_in)} kills"
    assert set(killed_in) == set(stages), f"no kill landed in some stages: {killed_in}"

    a = json.loads((reference / "results.json").read_text())
    b = json.loads((run / "results.json").read_text())
    assert _without_seconds(b) == _without_seconds(a)
    for stage in ("pretrain", "finetune_100pct", "distill_self_100pct", "supervised_100pct"):
        assert metric_lines(run / stage) == metric_lines(reference / stage), stage
    assert not list(run.rglob("run.lock")), "a finished pipeline left a lock behind"

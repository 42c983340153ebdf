"""One live writer per run folder (issue 20): ``run_dir/run.lock`` and what a second run does.

The concurrent-run test freezes the first run (SIGSTOP) while it holds its folder, so the second
run meets a live holder on every machine, however loaded; it then lets the first run finish.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_reliability import launcher, make_image_folder, wait_for

from simclrv2 import runlock
from simclrv2.cli import main

TINY = ["model=r10_0.25x_sk0", "num_workers=0", "progress=false", "batch_size=8", "image_size=16",
        "knn_every=0", "log_every=1", "checkpoint_every=1", "keep_checkpoints=1"]
STEPS = 12


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("lock") / "images")


def pretrain(images: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["pretrain", *TINY, "dataset=imagefolder", f"data_dir={images}", f"max_steps={STEPS}",
            f"run_dir={run_dir}", *extra]


def error_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def dead_pid() -> int:
    """The pid of a process of ours that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_second_run_into_a_held_folder_exits_2_and_the_first_finishes_clean(images: Path, tmp_path: Path,
                                                                           capsys) -> None:
    run = tmp_path / "run"
    first = launcher()(pretrain(images, run), tmp_path / "first.txt")
    try:
        wait_for(lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size > 0, first)
        os.kill(first.pid, signal.SIGSTOP)  # holds the lock, mid-run, for as long as the test needs
        config_before = (run / "config.yaml").read_bytes()
        holder = json.loads((run / runlock.LOCK_NAME).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()

        # the same command again (a job submitted twice), and one with another config
        assert main(pretrain(images, run)) == 2
        line = error_line(capsys)
        assert f"is in use by pid {first.pid} on host {socket.gethostname()}" in line, line
        assert str(run) in line and "another run_dir" in line
        assert main(pretrain(images, run, "base_lr=0.5", "resume=false")) == 2
        assert f"pid {first.pid}" in error_line(capsys)
        assert (run / "config.yaml").read_bytes() == config_before  # the refused runs wrote nothing
        assert not (run / "checkpoints.previous").exists()
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first.join(timeout=120)
    assert first.exitcode == 0, (tmp_path / "first.txt").read_text()

    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), "metrics.jsonl holds lines of more than one run"
    assert not (run / runlock.LOCK_NAME).exists(), "the finished run left its lock behind"
    assert main(pretrain(images, run)) == 0  # free again: resumes from the finished run, nothing to do


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_two_runs_started_together_exactly_one_writes(images: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    start = launcher()
    procs = [start(pretrain(images, run), tmp_path / f"out-{i}.txt") for i in range(2)]
    for p in procs:
        p.join(timeout=120)
    codes = sorted(p.exitcode for p in procs)
    outs = [(tmp_path / f"out-{i}.txt").read_text() for i in range(2)]
    if codes == [0, 0]:
        # the second started after the first had finished (a very slow fork): no overlap, no refusal
        assert any("resuming from" in out for out in outs), outs
    else:
        assert codes == [0, 2], outs
        assert sum("is in use by pid" in out for out in outs) == 1
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))


@pytest.mark.fashion_mnist
def test_stale_lock_of_a_dead_process_is_taken_over(images: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    pid = dead_pid()
    (run / runlock.LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                                     "proc_start": "1", "started": "2026-01-01 00:00:00"}))
    assert main(pretrain(images, run, "max_steps=2")) == 0, capsys.readouterr().err
    assert not (run / runlock.LOCK_NAME).exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_lock_of_a_reused_pid_is_stale(tmp_path: Path) -> None:
    """The pid runs, but it is another process than the one that wrote the lock (its start differs)."""
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            (tmp_path / runlock.LOCK_NAME).write_text(json.dumps(
                {"pid": other.pid, "host": socket.gethostname(), "proc_start": "1"}))
            runlock.acquire(tmp_path)
            assert json.loads((tmp_path / runlock.LOCK_NAME).read_text())["pid"] == os.getpid()
        finally:
            runlock.release(tmp_path)
            other.kill()
    assert not (tmp_path / runlock.LOCK_NAME).exists()


def test_live_holder_and_other_host_are_refused(tmp_path: Path) -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            live = {"pid": other.pid, "host": socket.gethostname(), "proc_start": runlock._proc_start(other.pid),
                    "started": "2026-12-03 01:00:00"}
            (tmp_path / runlock.LOCK_NAME).write_text(json.dumps(live))
            with pytest.raises(runlock.RunFolderBusy, match=f"in use by pid {other.pid} on host"):
                runlock.acquire(tmp_path)
        finally:
            other.kill()
    # another host: its pid cannot be checked from here, so it is never taken over
    elsewhere = {"pid": dead_pid(), "host": "node-that-is-not-this-one", "started": "2026-12-03 01:00:00"}
    (tmp_path / runlock.LOCK_NAME).write_text(json.dumps(elsewhere))
    with pytest.raises(runlock.RunFolderBusy, match="node-that-is-not-this-one.*if that run is dead, delete"):
        runlock.acquire(tmp_path)
    assert json.loads((tmp_path / runlock.LOCK_NAME).read_text()) == elsewhere
    assert not runlock.holds(tmp_path)


def _race(folder: str, barrier, results) -> None:
    barrier.wait()
    try:
        runlock.acquire(folder)
        results.put(("won", os.getpid()))
        time.sleep(1.0)  # hold it while the others try
        runlock.release(folder)
    except runlock.RunFolderBusy as e:
        results.put(("refused", str(e)))


@pytest.mark.slow
def test_stale_lock_takeover_cannot_race(tmp_path: Path) -> None:
    """Six processes find the same stale lock at once: exactly one of them ends up holding it."""
    (tmp_path / runlock.LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    ctx = multiprocessing.get_context("fork")
    n = 6
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
    won = [o for o in outcomes if o[0] == "won"]
    assert len(won) == 1, outcomes
    assert all(f"pid {won[0][1]}" in msg for kind, msg in outcomes if kind == "refused")
    assert not (tmp_path / runlock.LOCK_NAME).exists()


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_pipeline_refuses_a_held_folder_before_writing(images: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "pipeline"
    run.mkdir()
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(run), "label_fractions": [1.0], "plots": False,
                                      "common": {"dataset": "imagefolder", "data_dir": str(images)}}))
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            (run / runlock.LOCK_NAME).write_text(json.dumps(
                {"pid": other.pid, "host": socket.gethostname(), "proc_start": runlock._proc_start(other.pid)}))
            assert main(["pipeline", "--config", str(config)]) == 2
        finally:
            other.kill()
    assert f"in use by pid {other.pid}" in error_line(capsys)
    assert sorted(p.name for p in run.iterdir()) == [runlock.LOCK_NAME]  # no pipeline.yaml, no stage folder


def test_lock_is_reentrant_and_released_by_its_owner_only(tmp_path: Path) -> None:
    runlock.acquire(tmp_path)
    runlock.acquire(tmp_path)  # the pipeline's stage in the same process: no self-refusal
    rec = json.loads((tmp_path / runlock.LOCK_NAME).read_text())
    assert rec["pid"] == os.getpid() and rec["proc_start"] == runlock._proc_start(os.getpid())
    if os.fork() == 0:  # a forked child (a DataLoader worker) neither holds nor releases it
        os._exit(0 if not runlock.holds(tmp_path) and (runlock.release_all() or True) else 1)
    assert os.wait()[1] == 0
    assert (tmp_path / runlock.LOCK_NAME).exists()
    runlock.release(tmp_path)
    assert not (tmp_path / runlock.LOCK_NAME).exists()

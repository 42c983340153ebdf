"""Progress while a stage trains (issue 23): a tqdm bar on a terminal, a plain metrics line every
``log_every`` steps when stdout is a file or a pipe, and the pipeline's position in both."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simclrv2.data.builtin import load_fashion_mnist
from simclrv2.engine.progress import Progress, format_seconds, position, progress_mode

ROOT = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/train/<class>/*.png: 16 Fashion-MNIST images of two classes."""
    root = tmp_path_factory.mktemp("images")
    ds = load_fashion_mnist("test")
    labels = ds.labels.numpy()
    for c in (0, 1):
        (root / "train" / f"c{c}").mkdir(parents=True)
        for i in np.flatnonzero(labels == c)[:8]:
            Image.fromarray(ds.images[i, 0].numpy()).save(root / "train" / f"c{c}" / f"{i}.png")
    return root


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_piped_stdout_gets_a_plain_line_every_log_every_steps(images: Path, tmp_path: Path) -> None:
    """A real process with stdout on a pipe: progress=auto (the default) prints plain lines."""
    cmd = [sys.executable, "-m", "simclrv2.cli", "pretrain", "model=r10_0.25x_sk0", "dataset=imagefolder",
           f"data_dir={images}", "test_split=train", "image_size=16", "batch_size=8", "num_workers=0",
           "knn_every=0", "online_probe=false", "max_steps=6", "log_every=2", "device=cpu",
           f"run_dir={tmp_path / 'run'}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("pretrain step ")]
    assert [ln.split()[2] for ln in lines] == ["2/6", "4/6", "6/6"], out.stdout
    pattern = r"pretrain step \d+/6 loss \d+\.\d{4} lr [\d.e-]+ \d+ img/s ETA \d+:\d\d"
    assert all(re.fullmatch(pattern, ln) for ln in lines), lines
    assert lines[-1].endswith("ETA 0:00")
    assert "\r" not in out.stdout and "\r" not in out.stderr  # no bar redraws in a log


def test_lines_carry_the_pipeline_position_and_an_eta() -> None:
    stream = io.StringIO()
    with position("[3/15] finetune_1pct"):
        p = Progress("finetune", "auto", total=10, start=4, log_every=3, stream=stream)
    p.t0 -= 12.0  # 12 s for the 2 steps after the resumed step 4: 6 s a step, 4 steps to go
    p.metrics(5, 0.5, 0.1, 100.0)  # not a multiple of log_every: no line
    p.metrics(6, 0.25, 0.05, 80.0)
    p.close()
    assert stream.getvalue() == "[3/15] finetune_1pct step 6/10 loss 0.2500 lr 0.05 80 img/s ETA 0:24\n"


def test_a_terminal_gets_a_bar_with_steps_eta_and_loss() -> None:
    term = Terminal()
    with position("[2/15] finetune_0.1pct"):
        p = Progress("finetune", "auto", total=50, start=0, log_every=20, stream=term)
    assert p.mode == "bar"
    for _ in range(20):
        p.step()
    p.metrics(20, 1.2345, 0.02, 500.0)
    p.bar.refresh()
    shown = term.getvalue().split("\r")[-1]
    p.close()
    assert shown.startswith("[2/15] finetune_0.1pct:") and "20/50" in shown, shown
    assert re.search(r"<\d\d:\d\d", shown) and "loss=1.2345" in shown and "lr=0.02" in shown, shown


def test_progress_setting() -> None:
    assert progress_mode("auto", Terminal()) == "bar" and progress_mode("auto", io.StringIO()) == "lines"
    assert progress_mode(True, io.StringIO()) == "bar" and progress_mode(False, Terminal()) == "off"
    quiet = io.StringIO()
    p = Progress("pretrain", False, total=4, start=0, log_every=1, stream=quiet)
    p.step()
    p.metrics(1, 1.0, 0.1, 1.0)
    p.close()
    assert quiet.getvalue() == ""
    assert format_seconds(75.4) == "1:15" and format_seconds(3725) == "1:02:05"


def test_a_terminal_also_gets_a_plain_line_every_log_every_steps() -> None:
    """Above the bar (tqdm.write), so the scrollback keeps the history of the run."""
    term = Terminal()
    p = Progress("pretrain", "auto", total=50, start=0, log_every=20, stream=term)
    assert p.mode == "bar"
    for done in range(1, 51):
        p.step()
        if done % 10 == 0 or done == 50:  # the loop's metrics points: every log_every, boundaries, the end
            p.metrics(done, 1.0 / done, 0.1, 200.0)
    p.close()
    # each line is written whole between bar redraws ("\r"): split the screen at those
    pieces = [seg for chunk in term.getvalue().split("\r") for seg in chunk.split("\n")]
    lines = [seg for seg in pieces if seg.startswith("pretrain step ")]
    assert [ln.split()[2] for ln in lines] == ["20/50", "40/50", "50/50"], term.getvalue()
    pattern = r"pretrain step \d+/50 loss \d+\.\d{4} lr 0\.1 200 img/s ETA \d+:\d\d"
    assert all(re.fullmatch(pattern, ln) for ln in lines), lines
    assert "loss 0.0500" in lines[0] and "loss 0.0200" in lines[-1]

"""``scripts/gpu_check.sh --smoke``: the one-shot GPU check runs on the CPU, so it cannot rot (issue 30)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"pretrain_resume", "fp16", "sync_debug", "pipeline", "cuda_tests", "throughput"}
GPU_ONLY = {"fp16", "cuda_tests"}  # skipped on the CPU, with the reason


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_part(tmp_path: Path) -> None:
    out = tmp_path / "check"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--smoke", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {"device", "torch", "smoke", "passed", "seconds", "parts"} <= set(summary)
    assert summary["smoke"] and summary["passed"] and set(summary["parts"]) == PARTS
    for name, rec in summary["parts"].items():
        if name in GPU_ONLY:
            assert rec["status"] == "skipped" and rec["reason"], name
        else:
            assert rec["status"] == "passed", (name, rec)
    assert summary["parts"]["pretrain_resume"]["steps"] == 4
    assert set(summary["parts"]["throughput"]["images_per_s"]) == {"ours", "ceiling"}
    assert (out / "gpu_check.log").read_text().count("== ") >= len(PARTS)


def test_gpu_check_without_an_outdir_is_a_one_line_error() -> None:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "GPU_CHECK_OUT"})
    assert proc.returncode == 2 and proc.stderr.strip().startswith("usage: bash scripts/gpu_check.sh")

"""One-shot GPU check (issue 30): what our CPU-only CI cannot run, in at most 10 minutes on one GPU.

    bash scripts/gpu_check.sh OUTDIR            # one CUDA GPU
    bash scripts/gpu_check.sh --smoke OUTDIR    # the same parts on the CPU, tiny (what CI runs)

Writes OUTDIR/gpu_check.log (every part's output) and OUTDIR/summary.json: per part its status
(passed, failed, or skipped with the reason), seconds and what it measured. The parts:

- ``pretrain_resume``: pretraining with the online probe, the memory queue, bf16 and channels_last,
  stopped after 2 steps by ``max_steps`` and resumed to 4; ``fp16``: 2 steps in fp16 (GPU only);
- ``sync_debug``: one pretraining step (the stage's ``contrastive_views`` + ``train_step``), in
  memory and streaming, under ``torch.cuda.set_sync_debug_mode("warn")``, counting synchronisations;
- ``pipeline``: ``simclrv2 pipeline`` at tiny settings, every stage once, ``compile=true`` for
  fine-tuning (not in the smoke run: torch.compile takes minutes on the CPU);
- ``cuda_tests``: the tests marked ``cuda`` (``pytest -m cuda``);
- ``throughput``: benchmarks/throughput.py, ours against the bare backbone: R50 1x at 224 px,
  bf16, batch 256 (smoke: a tiny model).

The images are generated here (a small PNG folder), so the check needs no dataset on the machine.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


class Skip(Exception):
    """A part that cannot run here (the reason is recorded)."""


class Check:
    """Runs the parts, logs their output and collects the summary."""

    def __init__(self, out: Path, smoke: bool) -> None:
        self.out, self.smoke = out, smoke
        self.device = "cpu" if smoke else "cuda"
        self.log = (out / "gpu_check.log").open("w")
        self.parts: dict[str, dict[str, Any]] = {}

    def say(self, text: str) -> None:
        self.log.write(text + "\n")
        self.log.flush()
        print(text, flush=True)

    def part(self, name: str, work: Callable[[], dict[str, Any]]) -> None:
        self.say(f"== {name}")
        t0 = time.perf_counter()
        try:
            rec = {"status": "passed", **work()}
        except Skip as e:
            rec = {"status": "skipped", "reason": str(e)}
        except Exception as e:  # a failed part is recorded; the others still run
            self.log.write(traceback.format_exc())
            rec = {"status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        self.parts[name] = rec
        self.say(f"-- {name}: {json.dumps(rec)}")

    def run(self, *argv: str) -> str:
        """A command's output, logged; a non-zero exit is an error naming the command."""
        self.say("$ " + " ".join(argv))
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        self.log.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {' '.join(argv[:4])} ...; see gpu_check.log")
        return proc.stdout + proc.stderr

    def cli(self, *argv: str) -> str:
        return self.run(sys.executable, "-m", "simclrv2", *argv)


def write_images(root: Path, per_class: int = 16, size: int = 32) -> Path:
    """root/{train,test}/c{0,1}/*.png: stripes whose orientation is the class, plus noise."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for c in range(2):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                yy, xx = np.mgrid[0:size, 0:size]
                stripes = np.sin((xx if c == 0 else yy) * rng.uniform(0.3, 0.9)) * 80 + 128
                img = stripes[..., None] * rng.uniform(0.5, 1.0, 3) + rng.normal(0, 10, (size, size, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


def data_args(c: Check, data: Path) -> list[str]:
    return ["dataset=imagefolder", f"data_dir={data}", "image_size=32", "model=r10_0.25x_sk0", "batch_size=16",
            f"device={c.device}", "num_workers=0" if c.smoke else "num_workers=2", "progress=false", "seed=0"]


def pretrain_resume(c: Check, data: Path) -> dict[str, Any]:
    run = c.out / "runs" / "pretrain"
    args = ["pretrain", *data_args(c, data), f"run_dir={run}", "epochs=2", "knn_every=1", "knn_train_size=32",
            "knn_test_size=16", "memory.enabled=true", "memory.size=64", "precision=bf16", "channels_last=true",
            "online_probe=true", "checkpoint_every=2"]
    c.cli(*args, "max_steps=2")
    resumed = c.cli(*args, "max_steps=4")  # the same command with a larger cap: resume-safe
    if "resuming from" not in resumed:
        raise RuntimeError("the second run did not resume from the first one's checkpoint")
    summary = json.loads((run / "summary.json").read_text())
    if summary["steps"] != 4 or not np.isfinite(summary["loss"]):
        raise RuntimeError(f"resumed run: steps {summary['steps']}, loss {summary['loss']}")
    return {"steps": summary["steps"], "loss": summary["loss"], "probe_acc": summary.get("probe_acc")}


def fp16(c: Check, data: Path) -> dict[str, Any]:
    if c.smoke:
        raise Skip("fp16 needs a GPU")
    run = c.out / "runs" / "fp16"
    c.cli("pretrain", *data_args(c, data), f"run_dir={run}", "max_steps=2", "knn_every=0", "precision=fp16")
    summary = json.loads((run / "summary.json").read_text())
    return {"steps": summary["steps"], "loss": summary["loss"]}


def sync_debug(c: Check, data: Path) -> dict[str, Any]:
    """Synchronisations of one warm pretraining step, in memory and streaming."""
    import dataclasses

    import throughput as tp

    from simclrv2.data import SimCLRAugment
    from simclrv2.data.datasets import ImageFolderDataset
    from simclrv2.engine.batches import BatchSource, crop_spec
    from simclrv2.engine.device import step_generator
    from simclrv2.engine.pretrain import contrastive_views, train_step

    device = torch.device(c.device)
    cfg = tp.BenchConfig(model="r10_0.25x_sk0", image_size=32, channels=3, batch_size=16, stem="cifar",
                         device=c.device, pool_size=64, precision="bf16")
    ours = tp.OursStep(cfg, device)
    streaming = BatchSource(ImageFolderDataset(data / "train", image_size=32), device, num_workers=0)
    parts = dataclasses.replace(ours.parts, source=streaming, aug=SimCLRAugment(32))

    def stream_step(step: int) -> None:
        batches = streaming.train_batches(iter([(step, torch.arange(16))]), crop_spec(parts.aug), 2, 0)
        x, y = next(batches)
        views = contrastive_views(ours.stage_cfg, parts, x, step_generator(device, 0, step))
        train_step(ours.stage_cfg, parts, views, y, 0.1, ours.scaler)

    counts = {}
    for name, step in (("in_memory", ours), ("streaming", stream_step)):
        step(0)  # warm: lazy state and once-a-run copies are not what a step costs
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                step(1)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
        counts[name] = len(syncs) if device.type == "cuda" else None
        for line in syncs:
            c.say(f"{name}: {line}")
    return {"synchronisations": counts, "note": "" if device.type == "cuda" else "counted on CUDA only"}


def pipeline(c: Check, data: Path) -> dict[str, Any]:
    run = c.out / "runs" / "pipeline"
    config = c.out / "pipeline.yaml"
    common = {"dataset": "imagefolder", "data_dir": str(data), "image_size": 32, "model": "r10_0.25x_sk0",
              "batch_size": 16, "device": c.device, "num_workers": 0, "progress": False, "val_fraction": 0.1}
    short = {"epochs": 1, "min_steps": 0, "max_steps": 2}
    config.write_text(yaml.safe_dump({
        "run_dir": str(run), "label_fractions": [0.5], "self_distill": True, "small_student": "r10_0.25x_sk0",
        "embedding_points": 0, "plots": False, "common": common,
        "pretrain": {"epochs": 1, "max_steps": 2, "knn_every": 1, "knn_train_size": 32, "knn_test_size": 16},
        "finetune": dict(short, compile=not c.smoke), "supervised": short, "distill_self": short,
        "distill_small": short, "linear_eval": {"epochs": 1}, "knn_eval": {"k": 5},
    }))
    c.cli("pipeline", "--config", str(config))
    results = json.loads((run / "results.json").read_text())
    return {"compile": not c.smoke, "results_keys": sorted(results)[:8]}


def cuda_tests(c: Check) -> dict[str, Any]:
    if c.smoke:
        raise Skip("the cuda-marked tests need a GPU")
    out = c.run(sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests")
    return {"pytest": out.strip().splitlines()[-1] if out.strip() else ""}


def throughput(c: Check) -> dict[str, Any]:
    size = ["--model", "r10_0.25x_sk0", "--image-size", "32", "--batch-size", "8", "--steps", "1",
            "--warmup", "1", "--pool-size", "16"] if c.smoke else \
        ["--model", "r50_1x_sk0", "--image-size", "224", "--batch-size", "256", "--steps", "10", "--warmup", "3"]
    out = c.run(sys.executable, str(ROOT / "benchmarks" / "throughput.py"), *size, "--channels", "3",
                "--stem", "imagenet", "--precision", "bf16", "--channels-last", "--device", c.device,
                "--only", "ours,ceiling")
    rates = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| (ours|ceiling) \| ([\d.]+) \|", out, re.M)}
    if set(rates) != {"ours", "ceiling"}:
        raise RuntimeError("the throughput table has no ours and ceiling rows")
    return {"images_per_s": rates, "ceiling_over_ours": round(rates["ceiling"] / rates["ours"], 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for gpu_check.log and summary.json")
    p.add_argument("--smoke", action="store_true", help="the same parts on the CPU, tiny")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.smoke and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available; run it on a GPU machine, or with --smoke on the CPU",
              file=sys.stderr)
        return 2
    c = Check(a.out, a.smoke)
    t0 = time.perf_counter()
    data = write_images(a.out / "images")
    info = {"device": torch.cuda.get_device_name(0) if not a.smoke else "cpu", "torch": torch.__version__}
    c.say(json.dumps(info))
    c.part("pretrain_resume", lambda: pretrain_resume(c, data))
    c.part("fp16", lambda: fp16(c, data))
    c.part("sync_debug", lambda: sync_debug(c, data))
    c.part("pipeline", lambda: pipeline(c, data))
    c.part("cuda_tests", lambda: cuda_tests(c))
    c.part("throughput", lambda: throughput(c))
    passed = all(rec["status"] != "failed" for rec in c.parts.values())
    summary = {**info, "smoke": a.smoke, "passed": passed, "seconds": round(time.perf_counter() - t0, 1),
               "parts": c.parts}
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1))
    c.say(f"gpu_check: {'passed' if passed else 'FAILED'}; summary in {a.out / 'summary.json'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

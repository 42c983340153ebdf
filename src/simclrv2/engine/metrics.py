"""What a training stage records: ``metrics.jsonl`` (and TensorBoard), the progress a person sees."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .. import distributed as dist
from ..checkpoint import atomic_write_text
from .batches import BatchSource, StepPlan
from .checkpointer import non_finite_error
from .progress import Progress
from .runfolder import writing


class MetricsLogger:
    """JSON lines in ``metrics.jsonl`` (+ TensorBoard when installed) on rank 0.

    On resume, lines logged after the checkpoint being resumed are dropped, so the file describes
    exactly one uninterrupted run.
    """

    def __init__(self, run_dir: Path, resume_step: int = 0, tensorboard: bool = True) -> None:
        self.enabled = dist.is_main()
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not self.enabled:
            return
        if self.path.is_file():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("step", 0) <= resume_step and resume_step > 0:
                    keep.append(line)
            with writing(self.path):
                atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step or None)
            except Exception:  # tensorboard is an optional extra
                self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        rec["time"] = round(time.time(), 3)
        with writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            step = rec.get("step", 0)
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class TrainLog:
    """The step loop's record: running means on the device, a metrics line every ``log_every`` steps.

    ``add`` keeps the loss and the stage's statistics on the device (no host sync per step);
    ``write`` turns them into one ``metrics.jsonl`` record and a progress line, after checking that
    every loss since the last record was finite: a non-finite value never reaches a checkpoint.
    """

    def __init__(self, stage: str, cfg: Any, run_dir: Path, plan: StepPlan, start: int, device: torch.device) -> None:
        self.stage, self.run_dir, self.plan, self.log_every = stage, run_dir, plan, cfg.log_every
        self.logger = MetricsLogger(run_dir, resume_step=start)
        self.progress = Progress(stage, cfg.progress, plan.total_steps, start, cfg.log_every, enabled=dist.is_main())
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.t0 = time.time()
        self.last: dict[str, Any] = {}  # the latest means, then the epoch end's extra metrics

    def add(self, loss: torch.Tensor, stats: dict[str, torch.Tensor] | None = None) -> None:
        self.finite &= torch.isfinite(loss.detach())
        for k, v in dict(stats or {}, loss=loss.detach()).items():
            self.sums[k] = self.sums.get(k, 0) + v.float()
        self.count += 1
        self.progress.step()

    def due(self, done: int, boundary: bool) -> bool:
        return done % self.log_every == 0 or boundary

    def write(self, done: int, lr: float) -> None:
        """One record of the means since the last one; stops the run on a non-finite loss.

        Every rank stops when any rank's loss was non-finite: a rank stopping alone would leave the
        others waiting in their next collective until its timeout.
        """
        if dist.all_reduce_mean(self.finite.float()).item() < 1:
            raise non_finite_error(self.stage, self.run_dir, done, "loss")
        self.last = {k: round(float(v) / self.count, 6) for k, v in self.sums.items()}
        rec = dict(step=done, epoch=round(done / self.plan.steps_per_epoch, 4), lr=lr, **self.last)
        rec["images_per_s"] = round(self.count * self.plan.global_batch / max(time.time() - self.t0, 1e-9), 1)
        self.logger.log(rec)
        self.progress.metrics(done, self.last["loss"], lr, rec["images_per_s"])
        self.sums, self.count, self.t0 = {}, 0, time.time()

    def shorten(self, total: int) -> None:
        """The run now ends at ``total`` steps (a deadline cut it): the progress bar follows."""
        self.progress.shorten(total)

    def extra(self, done: int, metrics: dict[str, float]) -> None:
        """Metrics of an epoch end (the kNN monitor), in their own record."""
        if metrics:
            self.logger.log(dict(step=done, epoch=done / self.plan.steps_per_epoch, **metrics))
            self.last.update(metrics)

    def close(self, source: BatchSource) -> dict[str, Any]:
        """End of the loop: report replaced images, close the outputs; return the last metrics."""
        if source.replaced:
            self.last["bad_images"] = len(source.replaced)
            if dist.is_main():
                print(f"{self.stage}: {len(source.replaced)} unusable image(s) were replaced by the next one "
                      "(skip_bad_images; the workers' warnings name them)", file=sys.stderr, flush=True)
        self.progress.close()
        self.logger.close()
        return self.last

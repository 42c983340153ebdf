"""A wall-clock end for pretraining under ``budget_minutes``.

The budget sizes pretraining from step times measured in the run's first minute. A machine that
then slows down (another job, a noisy neighbour of a VM, heat) would carry the pipeline past its
budget: a demo measured at 23.4 s an epoch ran at 30, and ended at 955 s of a 900 s budget
(docs/EXPERIMENTS.md, "The demo on a fresh clone of e7586f4"). So the pipeline gives pretraining a
:class:`Deadline`, and at epoch ends pretraining compares its recent pace with the budget's estimate:

- the steps left at the measured pace, plus the later stages' estimate slowed by the same ratio,
  must end by the deadline;
- where they would not, pretraining is cut to the steps that do, and its cosine schedule goes on
  from where it is to 0 at the new end (:meth:`~simclrv2.optim.Schedule.shorten`).

It only ever shortens: a machine faster than measured keeps the planned length, which
``budget.json`` pins so that a rerun repeats it. The cuts are part of the training state (the
checkpoint's ``schedule`` entry), so a resumed run follows the shortened schedule.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..optim import Schedule

_current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("simclrv2_deadline", default=None)


@dataclass(frozen=True)
class Deadline:
    end: float  # time.time() by which the pipeline should have ended
    epoch_seconds: float  # the budget's estimate of one pretraining epoch
    after_seconds: float  # the budget's estimate of every stage after pretraining

    def steps_that_fit(self, done: int, total: int, step_seconds: float, steps_per_epoch: int, now: float) -> int:
        """The total steps (at most ``total``) that end by :attr:`end`, ``done`` steps in, at
        ``step_seconds`` a step from here on (the recent pace, the kNN monitor and checkpoints
        included, as the budget's epoch estimate includes the monitor). The later stages are
        assumed as much slower than the budget's estimate as pretraining is (never faster). At
        least one more step; and ``total`` itself where less than half an epoch would not fit, so
        that the pace's jitter does not cut a run by a few steps at every epoch end (the deadline
        keeps half the budget's margin, so half an epoch past it still ends within the budget)."""
        slower = max(1.0, step_seconds * steps_per_epoch / self.epoch_seconds)
        left = self.end - now - slower * self.after_seconds
        fit = done + max(1, math.floor(left / step_seconds))
        return total if total - fit < steps_per_epoch / 2 else fit


@contextlib.contextmanager
def pretraining_deadline(deadline: Deadline | None) -> Iterator[None]:
    """Pretraining run inside ends by ``deadline`` (None: no deadline)."""
    token = _current.set(deadline)
    try:
        yield
    finally:
        _current.reset(token)


def current() -> Deadline | None:
    return _current.get()


class ScheduleCuts:
    """A run's schedule as a checkpoint extra: its state is the schedule's cuts
    (:attr:`~simclrv2.optim.Schedule.shortened`), and loading it cuts the planned schedule again."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def state_dict(self) -> dict[str, torch.Tensor]:
        cuts = self.schedule.shortened
        return {"cuts": torch.tensor(cuts, dtype=torch.int64)} if cuts else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        cuts = state.get("cuts")
        for at, total in [] if cuts is None else cuts.tolist():
            self.schedule = self.schedule.shorten(int(at), int(total))

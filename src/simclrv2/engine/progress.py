"""What a person watching a run sees: a progress bar on a terminal, plain metric lines in a log.

``progress`` (a config key of every stage) chooses: ``auto`` shows a tqdm bar (steps, ETA, loss,
learning rate) when stdout is a terminal and plain lines when it is not (a file, a pipe, CI);
``true`` always shows the bar, ``false`` shows neither. Either way a plain metrics line goes out
every ``log_every`` steps, above the bar on a terminal. Both go to stdout, where the pipeline
prints its ``[i/n] stage`` lines, so one redirect keeps them in order. Under torchrun only rank 0
shows progress.

The pipeline names its position (``[3/15] finetune_1pct``) with :func:`position` around each stage;
the bar or the lines of the stage then carry it.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from collections.abc import Iterator
from typing import Any

_position: contextvars.ContextVar[str] = contextvars.ContextVar("simclrv2_progress_position", default="")


@contextlib.contextmanager
def position(label: str) -> Iterator[None]:
    """Label the progress of the stages run inside, e.g. ``[3/15] finetune_1pct``."""
    token = _position.set(label)
    try:
        yield
    finally:
        _position.reset(token)


def progress_mode(setting: bool | str, stream: Any = None) -> str:
    """``bar``, ``lines`` or ``off`` for the ``progress`` config value on this ``stream``."""
    if setting is False:
        return "off"
    if setting is True:
        return "bar"
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


def format_seconds(seconds: float) -> str:
    """``75.4`` -> ``'1:15'``, ``3725`` -> ``'1:02:05'`` (the clock style of tqdm's ETA)."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """The bar or the plain lines of one stage's step loop, on the main process only.

    ``start`` is the step the loop resumes from; the ETA counts only the steps of this process, so
    a resumed run does not report the checkpointed steps as instant.
    """

    def __init__(self, stage: str, setting: bool | str, total: int, start: int, log_every: int,
                 enabled: bool = True, stream: Any = None) -> None:
        self.stream = sys.stdout if stream is None else stream
        self.mode = progress_mode(setting, self.stream) if enabled and start < total else "off"
        self.label = _position.get() or stage
        self.total, self.start, self.log_every = total, start, max(int(log_every), 1)
        self.t0 = time.time()
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=self.label, file=self.stream, dynamic_ncols=True,
                            leave=False, unit="step")

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def metrics(self, done: int, loss: float, lr: float, images_per_s: float) -> None:
        """Called at each metrics point of the loop, with the mean loss since the last one.

        Every ``log_every`` steps (and at the last) a plain line goes out; on a terminal it is
        written above the bar (``tqdm.write``), which stays at the bottom, so the scrollback keeps
        the run's history as a log does.
        """
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", refresh=False)
        if self.mode == "off" or not (done % self.log_every == 0 or done == self.total):
            return
        per_step = (time.time() - self.t0) / max(done - self.start, 1)
        eta = format_seconds(per_step * (self.total - done))
        line = f"{self.label} step {done}/{self.total} loss {loss:.4f} lr {lr:.3g} {images_per_s:.0f} img/s ETA {eta}"
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def shorten(self, total: int) -> None:
        """The loop now ends at ``total`` steps."""
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

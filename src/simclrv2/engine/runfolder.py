"""The run folder: where a stage writes, under a lock, with its resolved config beside it.

``RunError`` is the one-line error of a run that cannot start or go on; every stage raises it
and the CLI prints it without a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .. import config as C
from .. import distributed as dist
from .. import runlock
from ..checkpoint import atomic_write_text
from ..host import cpu_name


class RunError(RuntimeError):
    """A run that cannot start or go on; the message is one line that names the fix."""


# Keys that may change between a run and its resumption without changing its results.
RESUME_SAFE_KEYS = {
    "resume", "progress", "log_every", "num_workers", "device", "data_dir", "download",
    "max_steps", "run_dir", "checkpoint_every", "checkpoint_min_seconds", "keep_checkpoints", "knn_every",
}


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, prefix + k + ".")
        elif a != b and (prefix + k) not in RESUME_SAFE_KEYS:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def config_changes(cfg: Any, stage: str) -> list[str]:
    """What differs between ``cfg`` and the run already in its folder (``config.yaml``), as
    ``"key: old -> new"`` lines, ignoring :data:`RESUME_SAFE_KEYS`; ``[]`` when there is no run."""
    cfg_path = Path(cfg.run_dir) / "config.yaml"
    if not cfg_path.is_file():
        return []
    return _diff(C.load_yaml(cfg_path), dict(C.to_dict(cfg), stage=stage))


def prepare_run_dir(cfg: Any, stage: str) -> Path:
    """Create (or reopen) the run folder and write ``config.yaml``.

    A folder that already holds a run with a different config is never overwritten silently:
    with ``resume=true`` that is an error; with ``resume=false`` the old config is kept as
    ``config.previous.yaml`` and the run starts over (the step loop then sets the old checkpoints
    aside, :func:`set_aside_previous_run`).

    The folder is locked first (:mod:`simclrv2.runlock`, rank 0 only): a second run into a folder
    that a live process writes stops here, before it has written anything, with one line naming
    the holder. The lock is held until the command ends (``simclrv2.cli``) or the process exits.
    """
    run_dir = Path(cfg.run_dir)
    error = None
    if dist.is_main():
        try:
            _open_run_dir(cfg, stage, run_dir)
        except RunError as e:
            error = str(e)
    # every rank stops with rank 0's line instead of waiting at the barrier for a rank that left
    error = dist.broadcast_from_main(error)
    if error is not None:
        raise RunError(error) if dist.is_main() else RunError(f"rank 0 stopped: {error}")
    check_shared_run_dir(run_dir)
    dist.barrier()
    return run_dir


# How long a rank waits for rank 0's token to appear: a shared filesystem's client cache may show
# a new file a moment late; a node-local folder never shows it.
SHARED_CHECK_SECONDS = 3.0


def check_shared_run_dir(run_dir: Path) -> None:
    """Stop every rank, with one line, unless all ranks see the same ``run_dir``.

    Rank 0 alone writes checkpoints, ``done.json`` and metrics, while every rank reads them to
    resume and to skip finished stages. So a run over several nodes needs ``run_dir`` on a
    filesystem that every node mounts (NFS, Lustre, ...): on node-local disks the other nodes'
    ranks would decide on files they cannot see, and the job would hang or train the wrong steps.
    Rank 0 writes a token file; every rank looks for it; the verdict is gathered, so all ranks stop
    together. One process, or one node: nothing to check.
    """
    if dist.world_size() == 1:
        return
    name, error = None, None
    if dist.is_main():
        name = f".shared-check-{uuid.uuid4().hex}"
        try:
            (run_dir / name).write_text(socket.gethostname())
        except OSError as e:
            error = f"cannot write in run folder '{run_dir}' ({e.strerror}); choose another with run_dir=PATH"
    name, error = dist.broadcast_object((name, error))
    if error is not None:
        raise RunError(error) if dist.is_main() else RunError(f"rank 0 stopped: {error}")
    deadline = time.monotonic() + SHARED_CHECK_SECONDS
    while not (seen := (run_dir / name).is_file()) and time.monotonic() < deadline:
        time.sleep(0.1)
    verdicts = dist.all_gather_object((seen, socket.gethostname()))
    if dist.is_main():
        (run_dir / name).unlink(missing_ok=True)
    blind = [(r, host) for r, (ok, host) in enumerate(verdicts) if not ok]
    if blind:
        ranks = ",".join(str(r) for r, _ in blind)
        hosts = ",".join(sorted({h for _, h in blind}))
        raise RunError(
            f"run folder '{run_dir}' is not shared: rank(s) {ranks} (host {hosts}) cannot see the files rank 0 "
            "writes there; a run over several nodes needs run_dir on a filesystem every node mounts (NFS, Lustre, ...)"
        )


def _open_run_dir(cfg: Any, stage: str, run_dir: Path) -> None:
    """Rank 0's part of :func:`prepare_run_dir`: create, lock, check and write ``config.yaml``."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        runlock.acquire(run_dir)  # before anything is written: a refused run leaves no trace
    except OSError as e:
        raise RunError(
            f"run folder '{run_dir}' is not writable ({e.strerror}); choose another with run_dir=PATH"
        ) from e
    except runlock.RunFolderBusy as e:
        raise RunError(str(e)) from e
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        changed = config_changes(cfg, stage)
        if changed and cfg.resume:
            raise RunError(
                f"run folder '{run_dir}' holds a run with a different config ({changed[0]}"
                + (f" and {len(changed) - 1} more" if len(changed) > 1 else "")
                + "); use a new run_dir, or resume=false to start over there"
            )
        with writing(run_dir / "config.previous.yaml"):
            if changed:
                atomic_write_text(run_dir / "config.previous.yaml", cfg_path.read_text())
    with writing(cfg_path):
        atomic_write_text(cfg_path, C.dump_yaml(dict(C.to_dict(cfg), stage=stage)))


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OSError while writing ``path`` (full disk, permissions) into a one-line RunError."""
    try:
        yield
    except OSError as e:
        fix = "free disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix the folder's permissions"
        raise RunError(
            f"cannot write '{path}' ({e.strerror or e}); {fix}, then rerun the same command "
            "(a training run resumes from its last complete checkpoint)"
        ) from e


def set_aside_previous_run(run_dir: Path) -> None:
    """Keep the last run's checkpoints and metrics under ``*.previous`` names (one generation).

    Called when a run starts over (``resume=false``) just before its first step. Left in place,
    an old run's later-step checkpoints would win over the new run's (pruning keeps the highest
    steps) and a later resume would pick them up with the new config.
    """
    ckpts = run_dir / "checkpoints"
    with writing(run_dir):
        if ckpts.is_dir() and any(ckpts.iterdir()):
            previous = run_dir / "checkpoints.previous"
            if previous.exists():
                doomed = run_dir / f".checkpoints.previous.del-{os.getpid()}"
                os.replace(previous, doomed)  # atomic: no half-deleted folder under a real name
                shutil.rmtree(doomed, ignore_errors=True)
            os.replace(ckpts, previous)
            print(f"resume=false: the previous run's checkpoints were moved to '{previous}'", file=sys.stderr)
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and metrics.stat().st_size > 0:
            os.replace(metrics, run_dir / "metrics.previous.jsonl")


def machine_description() -> str:
    desc = f"{socket.gethostname()}: {os.cpu_count()} CPU cores ({cpu_name()}), torch {torch.__version__}"
    if torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return desc


def write_json(path: Path, data: dict[str, Any]) -> None:
    if dist.is_main():
        with writing(path):
            atomic_write_text(path, json.dumps(data, indent=1))

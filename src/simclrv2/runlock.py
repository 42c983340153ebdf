"""One live writer per run folder: ``run_dir/run.lock`` names the process that writes there.

The lock file holds the owner's pid, host, the kernel's start time of that pid (to tell a reused
pid from the owner) and the wall-clock start, as JSON. It is created whole or not at all: written
to a private temporary file, flushed, then hard-linked to ``run.lock``; ``link`` fails when the name
exists, which makes it the same atomic test-and-create as ``open(O_CREAT | O_EXCL)`` without a
moment where another process could read a half-written lock.

A lock whose owner is dead (same host, no such pid, or the pid now belongs to another process) is
stale and is taken over. Taking over means deleting somebody else's file, which two newcomers
could otherwise both do (the second deleting the first one's fresh lock), so every takeover runs
under an exclusive ``flock`` on ``run.lock.takeover`` and re-reads the lock inside it: only a file
still holding the same dead owner is deleted, then the ordinary atomic create is tried again. A
process never deletes a lock that is not its own or not verified stale under that guard.

A lock on another host cannot be checked: the refusal names it and says how to clear it by hand.
Locks are re-entrant within one process (the pipeline holds its folder and, in turn, each stage's
sub-folder, all different files) and released by :func:`release` / :func:`release_all`, or at
interpreter exit. Under torchrun only the process with global rank 0 takes locks.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

LOCK_NAME = "run.lock"

_held: dict[Path, dict[str, Any]] = {}  # resolved lock path -> the record this process wrote


class RunFolderBusy(RuntimeError):
    """Another live process writes into the run folder; the message names it in one line."""


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot, /proc/PID/stat field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ")"
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _record() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "proc_start": _proc_start(pid),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()), "started_unix": round(time.time(), 3)}


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's record; None when there is no lock; ``{}`` when it is unreadable."""
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _alive(rec: dict[str, Any]) -> bool:
    """Whether the owner recorded in ``rec`` (on this host) still runs."""
    try:
        pid = int(rec["pid"])
    except (KeyError, TypeError, ValueError):
        return True  # cannot tell: never take over
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    recorded, now = rec.get("proc_start"), _proc_start(pid)
    return not (recorded and now and recorded != now)  # a different start time: the pid was reused


def _describe(rec: dict[str, Any]) -> str:
    return f"pid {rec.get('pid', '?')} on host {rec.get('host', '?')} since {rec.get('started', '?')}"


def _try_create(path: Path, rec: dict[str, Any]) -> bool:
    """Create ``path`` holding ``rec`` atomically; False when it exists already."""
    tmp = path.with_name(f".{path.name}.{rec['pid']}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(rec))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _take_over_if_stale(path: Path, seen: dict[str, Any]) -> None:
    """Delete ``path`` if it still holds the dead owner ``seen``; serialised by a flock guard."""
    with open(path.with_name(path.name + ".takeover"), "a") as guard:
        fcntl.flock(guard.fileno(), fcntl.LOCK_EX)  # released when the file closes
        if _read(path) == seen:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def acquire(run_dir: str | Path) -> None:
    """Hold ``run_dir/run.lock`` for this process (re-entrant), or raise :class:`RunFolderBusy`.

    ``OSError`` (an unwritable folder) is left to the caller, which knows the fix to suggest.
    """
    path = (Path(run_dir) / LOCK_NAME).resolve()
    if path in _held:
        return
    rec = _record()
    for _ in range(5):  # each retry follows a takeover or an owner that just released
        if _try_create(path, rec):
            _held[path] = rec
            return
        seen = _read(path)
        if seen is None:
            continue  # released between our create and our read
        same_host = seen.get("host") == rec["host"]
        if same_host and seen.get("pid") == rec["pid"] and seen.get("proc_start") == rec["proc_start"]:
            _held[path] = seen  # ours, written before a release_all that did not reach it
            return
        if seen and same_host and not _alive(seen):
            _take_over_if_stale(path, seen)
            continue
        if not seen:
            raise RunFolderBusy(
                f"run folder '{path.parent}' has an unreadable lock file '{path}'; if no run writes "
                "there any more, delete that file and rerun"
            )
        hint = ("wait for it to finish or use another run_dir" if same_host else
                f"wait for it to finish or use another run_dir; if that run is dead, delete '{path}'")
        raise RunFolderBusy(f"run folder '{path.parent}' is in use by {_describe(seen)}; {hint}")
    raise RunFolderBusy(f"run folder '{path.parent}': could not take its lock '{path}' (it keeps changing hands)")


def release(run_dir: str | Path) -> None:
    """Give up this process's lock on ``run_dir`` (no-op when it holds none)."""
    path = (Path(run_dir) / LOCK_NAME).resolve()
    rec = _held.pop(path, None)
    if rec is not None and rec.get("pid") == os.getpid() and _read(path) == rec:  # never delete another's lock
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def release_all() -> None:
    for path in list(_held):
        release(path.parent)


def holds(run_dir: str | Path) -> bool:
    return (Path(run_dir) / LOCK_NAME).resolve() in _held


atexit.register(release_all)
# a forked child (a DataLoader worker) must not release, or think it holds, its parent's locks
os.register_at_fork(after_in_child=_held.clear)

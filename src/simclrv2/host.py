"""This machine's shared pieces: the cache folder, atomic text writes, the cores we may use, the CPU's name.

The bottom of the package: standard library only, nothing of ours (DESIGN.md "Layers"). The data
layer, the release downloads and the checkpoints all need these, and none of them should have
to import another to get them.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cache_dir() -> Path:
    """``$SIMCLRV2_CACHE``, else ``~/.cache/simclrv2``."""
    return Path(os.environ.get("SIMCLRV2_CACHE") or Path.home() / ".cache" / "simclrv2").expanduser()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file through a temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``, as lscpu shows it), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()

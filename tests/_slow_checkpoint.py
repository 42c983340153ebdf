"""Slow checkpoint writes for the fault-injection tests, patched in from the test side.

:func:`install` makes :func:`simclrv2.checkpoint.save_checkpoint` pause after each file of a new
checkpoint is written into its ``step-*.tmp-<pid>`` folder (model, state, optimizer, meta) and
before an old checkpoint, already renamed to ``step-*.del-<pid>``, is removed. The pauses widen the
windows in which a SIGKILL leaves a half-written or half-deleted checkpoint, so that a test can land
kills inside them on purpose. Install it in the process that writes the checkpoints (a forked
child); it changes no result.

The patches wrap the functions ``simclrv2.checkpoint`` calls at those moments (``save_file``,
``torch.save``, ``write_meta``, ``shutil.rmtree``) and pause only for this process's temporary and
doomed checkpoint folders. ``tests/test_reliability.py`` checks that every pause lands where it should.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from simclrv2 import checkpoint as ckpt


def _is_tmp_checkpoint(folder: Path) -> bool:
    """``step-<n>.tmp-<pid>`` of this process: a checkpoint being written."""
    return re.fullmatch(rf"step-\d+\.tmp-{os.getpid()}", folder.name) is not None


def _is_doomed_checkpoint(folder: Path) -> bool:
    """``step-<n>.del-<pid>`` of this process: an old checkpoint being deleted."""
    return re.fullmatch(rf"step-\d+\.del-{os.getpid()}", folder.name) is not None


def install(delay: float, pause: Callable[[], None] | None = None) -> pytest.MonkeyPatch:
    """Pause ``delay`` seconds (or call ``pause``) at each write and deletion window of a checkpoint.

    Returns the :class:`pytest.MonkeyPatch` holding the patches; ``undo()`` removes them.
    """
    pause = pause or (lambda: time.sleep(delay))
    patches = pytest.MonkeyPatch()
    save_file, torch_save, write_meta, rmtree = ckpt.save_file, torch.save, ckpt.write_meta, shutil.rmtree

    def slow_save_file(tensors, filename, *args, **kwargs):
        save_file(tensors, filename, *args, **kwargs)
        if _is_tmp_checkpoint(Path(filename).parent):
            pause()

    def slow_torch_save(obj, f, *args, **kwargs):
        torch_save(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)) and _is_tmp_checkpoint(Path(f).parent):
            pause()

    def slow_write_meta(ckpt_dir, meta):
        write_meta(ckpt_dir, meta)
        if _is_tmp_checkpoint(Path(ckpt_dir)):
            pause()

    def slow_rmtree(path, *args, **kwargs):
        if _is_doomed_checkpoint(Path(path)):
            pause()
        rmtree(path, *args, **kwargs)

    patches.setattr(ckpt, "save_file", slow_save_file)
    patches.setattr(torch, "save", slow_torch_save)
    patches.setattr(ckpt, "write_meta", slow_write_meta)
    patches.setattr(shutil, "rmtree", slow_rmtree)
    return patches

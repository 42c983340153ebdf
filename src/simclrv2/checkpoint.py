"""Atomic, self-describing checkpoints.

Layout of one checkpoint (a folder, written whole or not at all)::

    run_dir/checkpoints/step-00001234/
        model.safetensors      model weights (and BN buffers)
        state.safetensors      extra tensor state: memory queue + EMA weights, online probe
        optimizer.pt           optimizer / grad-scaler state, read back with weights_only=True
        meta.json              format version, stage, step, epoch, model name+config, run config,
                               the sha256 of each other file ("files") and of itself ("meta_sha256")

Checksums: a flipped bit on a flaky disk would otherwise load as valid weights. Every read path
verifies what it reads (:func:`verify_checkpoint`, :func:`read_meta`, :func:`read_model_file`) and
names the damaged file in one line; resuming skips a damaged checkpoint for the newest one that
verifies (:func:`newest_sound_checkpoint`). Standalone model files carry a digest of their tensors
in the safetensors header (``weights_sha256``). Checkpoints and model files written before
checksums existed carry none and load as before.

The folder is first written as ``step-00001234.tmp-<pid>``, every file is flushed to disk, and
then it is renamed in one ``os.replace``. Old checkpoints are deleted the same way round: first
renamed to ``step-*.del-<pid>`` (atomic), then removed, so a kill in the middle of a deletion never
leaves a ``step-*`` folder with some of its files gone. A kill at any moment therefore leaves
either the previous complete checkpoints or the new complete one; ``*.tmp-*`` and ``*.del-*``
leftovers are ignored and removed by the next save. A failed write (a full disk) removes its
temporary folder and raises :class:`CheckpointError`; the earlier checkpoints stay as they were.
Nothing here unpickles arbitrary objects: tensors come from safetensors, metadata from JSON, and
the optimizer state through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

from .host import atomic_write_text

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line with the fix."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint of a newer format than this simclrv2 reads (not damage: never skipped)."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _remove_dir(path: Path) -> None:
    """Delete a checkpoint folder so that no kill can leave it half deleted under its own name."""
    doomed = path.with_name(f"{path.name}.del-{os.getpid()}")
    try:
        os.replace(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous, non-shared CPU tensors
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically and keep the newest ``keep`` complete ones."""
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f"step-{step:08d}.tmp-{os.getpid()}"
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(_contiguous(model_state), str(tmp / "model.safetensors"))
        if extra_tensors:
            save_file(_contiguous(extra_tensors), str(tmp / "state.safetensors"))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        meta = dict(meta, format="simclrv2-checkpoint", format_version=FORMAT_VERSION, step=step)
        write_meta(tmp, meta)
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        if final.exists():  # the same step written again (e.g. a rerun with resume=false)
            _remove_dir(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _write_error(e, final, ckpt_root) from e
        raise
    _prune(ckpt_root, keep)
    return final


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of the metadata as JSON with sorted keys, ``meta_sha256`` itself left out."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_meta(ckpt_dir: str | Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` with the sha256 of every other file of the folder and of itself.

    Call it after the folder's other files are written. The digest of the metadata is taken over
    its JSON form read back, so non-JSON values (``default=str``) hash as they will be read.
    """
    ckpt_dir = Path(ckpt_dir)
    files = {p.name: file_sha256(p) for p in sorted(ckpt_dir.iterdir()) if p.is_file() and p.name != "meta.json"}
    meta = json.loads(json.dumps(dict(meta, files=files), default=str))
    meta["meta_sha256"] = _meta_digest(meta)
    atomic_write_text(ckpt_dir / "meta.json", json.dumps(meta, indent=1))


def verify_checkpoint(ckpt_dir: str | Path, names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Check ``meta.json`` and the files it lists (only ``names`` when given) against their sha256;
    return the metadata. A checkpoint without checksums (written before they existed) passes.
    Raises :class:`CheckpointError` naming the first file that does not match."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    for name, digest in (meta.get("files") or {}).items():
        if names is not None and name not in names:
            continue
        path = ckpt_dir / name
        try:
            actual = file_sha256(path)
        except OSError as e:
            raise CheckpointError(f"checkpoint file '{path}' is unreadable ({e.strerror or e}); "
                                  "the checkpoint is damaged, resume from an earlier one or rerun the stage") from e
        if actual != digest:
            raise CheckpointError(
                f"checkpoint file '{path}' does not match the sha256 recorded in its meta.json (damaged on "
                "disk); resume from an earlier checkpoint or rerun the stage that wrote it"
            )
    return meta


def newest_sound_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint that verifies, and the newer ones that did not (with why).

    A checkpoint from a newer simclrv2 format is not "damaged": that error is raised, not skipped.
    """
    skipped: list[tuple[Path, str]] = []
    for c in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(c)
        except CheckpointError as e:
            if isinstance(e, CheckpointFormatError):
                raise
            skipped.append((c, str(e)))
            continue
        return c, skipped
    return None, skipped


def _write_error(e: OSError, final: Path, ckpt_root: Path) -> CheckpointError:
    """One line that says what failed, what is still on disk, and what to do."""
    kept = latest_checkpoint(ckpt_root.parent)
    kept_text = f"the last complete checkpoint '{kept}' is kept" if kept else "no earlier checkpoint exists"
    fix = (
        "free disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT)
        else "make the run folder writable or choose another run_dir"
    )
    return CheckpointError(
        f"could not write checkpoint '{final}' ({e.strerror or e}); {kept_text}; {fix}, then rerun "
        "the same command to resume"
    )


def _prune(ckpt_root: Path, keep: int) -> None:
    complete = list_checkpoints(ckpt_root.parent)
    for old in complete[:-keep] if keep > 0 else []:
        _remove_dir(old)
    # leftovers of killed processes: unfinished writes and unfinished deletions
    for leftover in [*ckpt_root.glob("step-*.tmp-*"), *ckpt_root.glob("step-*.del-*")]:
        try:
            pid = int(leftover.name.rsplit("-", 1)[1])
        except ValueError:
            pid = -1
        if pid != os.getpid() or ".del-" in leftover.name:
            shutil.rmtree(leftover, ignore_errors=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / "meta.json").is_file() and (d / "model.safetensors").is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint metadata '{path}' is unreadable ({e}); delete that checkpoint folder") from e
    check_version(meta, str(path))  # first: a newer format may hash differently
    recorded = meta.get("meta_sha256")
    if recorded is not None and recorded != _meta_digest(meta):
        raise CheckpointError(
            f"checkpoint metadata '{path}' does not match its recorded sha256 (damaged on disk); "
            "resume from an earlier checkpoint or rerun the stage that wrote it"
        )
    return meta


def check_version(meta: dict[str, Any], where: str) -> None:
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"'{where}' has no simclrv2 format_version; it is not a simclrv2 checkpoint")
    if version > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"'{where}' has checkpoint format version {version}, newer than this simclrv2 reads "
            f"({FORMAT_VERSION}); upgrade simclrv2"
        )


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"'{path}' is not a readable safetensors file ({e}); it may be truncated") from e


def load_optimizer_state(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """Optimizer state, read with ``weights_only=True`` so no pickled code can run."""
    path = Path(ckpt_dir) / "optimizer.pt"
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"'{path}' was refused by the safe loader ({type(e).__name__}); only plain tensors and "
            "containers are accepted, delete the file or take the checkpoint from a trusted source"
        ) from e


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder, a ``step-*`` folder or a model file -> the concrete checkpoint path."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass a run folder, a checkpoint folder or a .safetensors file")
    if p.is_file():
        return p
    if (p / "meta.json").is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None and (p / "chosen.json").is_file():
        # a pipeline stage with a learning-rate search: its folder names the candidate it chose
        try:
            chosen = json.loads((p / "chosen.json").read_text())["chosen"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"'{p / 'chosen.json'}' is unreadable ({e}); rerun the pipeline") from e
        return resolve_checkpoint(p / chosen)
    if latest is None:
        raise CheckpointError(f"'{path}' holds no complete checkpoint; run the stage that writes it first")
    return latest


def read_model_meta(path: str | Path) -> dict[str, Any]:
    """Metadata of a checkpoint folder or a standalone model ``.safetensors`` file, weights unread.

    A standalone file carries its metadata either in a sidecar ``<file>.json`` (written by
    ``simclrv2 convert``) or in the safetensors header under the key ``simclrv2``.
    """
    return _model_meta(resolve_checkpoint(path))


def _model_meta(p: Path) -> dict[str, Any]:
    if p.is_dir():
        return read_meta(p)
    sidecar = p.with_suffix(".json")
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"'{sidecar}' is not valid JSON ({e})") from e
    else:
        try:
            with safe_open(str(p), framework="pt") as f:
                header = f.metadata() or {}
        except Exception as e:
            raise CheckpointError(f"'{p}' is not a readable safetensors file ({e})") from e
        if "simclrv2" not in header:
            raise CheckpointError(f"'{p}' has no simclrv2 metadata (no sidecar .json, no header entry)")
        meta = json.loads(header["simclrv2"])
    check_version(meta, str(p))
    return meta


def model_weights_file(path: str | Path) -> Path:
    """The weights file that :func:`read_model_file` reads for a run folder, checkpoint or model file."""
    p = resolve_checkpoint(path)
    return p / "model.safetensors" if p.is_dir() else p


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and metadata (see :func:`read_model_meta`) of a checkpoint folder or model file,
    verified against their checksums where they carry them (a one-line error names a damaged file)."""
    p = resolve_checkpoint(path)  # once: a run still writing checkpoints may add a newer one
    if p.is_dir():
        meta = verify_checkpoint(p, names=("model.safetensors",))
        return load_tensors(p / "model.safetensors"), meta
    meta = _model_meta(p)
    state = load_tensors(p)
    recorded = _header_meta(p).get("weights_sha256")
    if recorded is not None and recorded != tensors_sha256(state):
        raise CheckpointError(
            f"model file '{p}' does not match the weights_sha256 in its header (damaged on disk); "
            "copy or convert it again"
        )
    return state, meta


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``state``, in name order.

    A digest of the tensors rather than of the file, so that it can live inside the file's own
    header (a file cannot hold the hash of its own bytes).
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _header_meta(p: Path) -> dict[str, Any]:
    """The ``simclrv2`` entry of a safetensors header; ``{}`` when it has none."""
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
        return json.loads(header.get("simclrv2", "{}"))
    except Exception:  # unreadable here means unreadable for load_tensors too, which says so
        return {}


def write_model_file(path: str | Path, model_state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """A standalone model file: safetensors with the metadata in its header, written atomically."""
    path = Path(path)
    state = _contiguous(model_state)
    meta = dict(meta, format="simclrv2-model", format_version=FORMAT_VERSION, weights_sha256=tensors_sha256(state))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(state, str(tmp), metadata={"simclrv2": json.dumps(meta, default=str)})
        _fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as e:
        fix = "free disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a writable path"
        raise CheckpointError(f"could not write model file '{path}' ({e.strerror or e}); {fix}") from e
    finally:
        if tmp.exists():
            tmp.unlink()

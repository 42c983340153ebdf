"""The released SimCLRv2 checkpoints by name: download into a cache (conversion: ``simclrv2.pretrained``).

Where they are: the google-research/simclr README ("Pre-trained models for SimCLRv2") lists the
buckets ``gs://simclr-checkpoints/simclrv2/<category>`` (browsable at
``https://console.cloud.google.com/storage/browser/simclr-checkpoints/simclrv2/<category>``),
one folder per model, each with ``checkpoint``, ``model.ckpt-<step>.index`` and
``model.ckpt-<step>.data-00000-of-00001``. Public objects of a Cloud Storage bucket are also
served over plain HTTPS at ``https://storage.googleapis.com/<bucket>/<object>``, so no
``gsutil`` is needed: ``https://storage.googleapis.com/simclr-checkpoints/simclrv2/<category>/
<model>/<file>``.

A download goes to ``<file>.part`` and is renamed when complete, so an interrupted one resumes
with an HTTP ``Range`` request. Sizes are checked against ``Content-Length`` / ``Content-Range``
and, for the tensor data, against the sizes the ``.index`` lists; the MD5 that Cloud Storage
sends in ``x-goog-hash`` is checked when present, and conversion checks every tensor's CRC-32C.
Files live in ``$SIMCLRV2_CACHE`` (default ``~/.cache/simclrv2``) under ``<category>/<model>/``,
the converted model next to them as ``<category>/<model>.safetensors``.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .host import cache_dir

__all__ = [
    "CATEGORIES",
    "MODELS",
    "DownloadError",
    "cache_dir",
    "download_file",
    "fetch_release",
    "is_release_name",
    "release_url",
]

RELEASE_BUCKET = "gs://simclr-checkpoints/simclrv2"
RELEASE_BASE_URL = "https://storage.googleapis.com/simclr-checkpoints/simclrv2"
CATEGORIES = ("pretrained", "finetuned_1pct", "finetuned_10pct", "finetuned_100pct", "supervised")
MODELS = ("r50_1x_sk0", "r50_1x_sk1", "r50_2x_sk0", "r50_2x_sk1", "r101_1x_sk0", "r101_1x_sk1", "r101_2x_sk0",
          "r101_2x_sk1", "r152_1x_sk0", "r152_1x_sk1", "r152_2x_sk0", "r152_2x_sk1", "r152_3x_sk1")
CHUNK = 1 << 20
_STATE_RE = re.compile(r'^\s*model_checkpoint_path:\s*"(.*)"\s*$', re.MULTILINE)


class DownloadError(ConnectionError):
    """A release could not be fetched; the message is one line saying why and what to do."""


def release_url(category: str, model: str, file: str = "") -> str:
    """HTTPS address of a release file; ``$SIMCLRV2_RELEASE_URL`` replaces the base (a mirror)."""
    base = os.environ.get("SIMCLRV2_RELEASE_URL") or RELEASE_BASE_URL
    return f"{base.rstrip('/')}/{category}/{model}/{file}"


def is_release_name(name: str) -> bool:
    return name in MODELS


def check_names(model: str, category: str) -> None:
    for value, valid, what in ((model, MODELS, "model"), (category, CATEGORIES, "category")):
        if value not in valid:
            close = difflib.get_close_matches(value, valid, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise DownloadError(f"unknown released {what} '{value}'; {hint}valid: {', '.join(valid)}")


class _Progress:
    """One updating line on a terminal; elsewhere a plain line per quarter."""

    def __init__(self, name: str, total: int | None, done: int, enabled: bool) -> None:
        self.name, self.total, self.done = name, total, done
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.start, self.start_bytes = time.monotonic(), done
        self.last_quarter = -1
        self.last_draw = 0.0

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty and now - self.last_draw > 0.2:
            self.last_draw = now
            print(f"\r{self._line(now)}", end="", file=sys.stderr, flush=True)
        elif not self.tty and self.total:
            quarter = 4 * self.done // self.total
            if quarter > self.last_quarter and quarter < 4:
                self.last_quarter = quarter
                print(self._line(now), file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.enabled:
            print(("\r" if self.tty else "") + self._line(time.monotonic()), file=sys.stderr, flush=True)

    def _line(self, now: float) -> str:
        rate = (self.done - self.start_bytes) / max(now - self.start, 1e-6)
        mib = self.done / 2**20
        if not self.total:
            return f"download {self.name}: {mib:.1f} MiB at {rate / 2**20:.1f} MiB/s"
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:.0f}s left" if eta != float("inf") else "--"
        return (f"download {self.name}: {100 * self.done / self.total:3.0f}% {mib:.1f}/{self.total / 2**20:.1f} MiB "
                f"at {rate / 2**20:.1f} MiB/s, {eta_text}")


def _md5_of(headers: http.client.HTTPMessage) -> bytes | None:
    for value in headers.get_all("x-goog-hash") or []:
        for part in value.split(","):
            kind, _, digest = part.strip().partition("=")
            if kind == "md5":
                return base64.b64decode(digest)
    return None


def download_file(url: str, dest: Path, expected_size: int | None = None, progress: bool = True,
                  manual_hint: str = "") -> Path:
    """Fetch ``url`` into ``dest`` through ``dest.part``, resuming a partial ``.part``.

    ``expected_size``: bytes the file must have (else the server's length is trusted). Raises
    ``DownloadError`` (one line, ``manual_hint`` appended when the server cannot be reached) and
    keeps the ``.part`` of an interrupted transfer so that the next call resumes it.
    """
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()  # longer than the object: not a prefix of it
        offset = 0
    headers = {"User-Agent": "simclrv2"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the range starts at the end: the .part is already whole
            total = _range_total(e.headers.get("Content-Range", ""))
            if total == offset and (expected_size is None or expected_size == offset):
                os.replace(part, dest)
                return dest
            part.unlink()
            raise DownloadError(f"{url}: the partial download does not fit the file on the server; "
                                f"removed it, run again to restart") from e
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}{manual_hint}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot reach {url} ({reason}){manual_hint}") from e
    with response:
        if offset and response.status == 206:
            start = _range_start(response.headers.get("Content-Range", ""))
            if start != offset:
                raise DownloadError(f"{url}: the server resumed at byte {start}, not {offset}; delete {part}")
            total = _range_total(response.headers.get("Content-Range", ""))
            mode = "ab"
        else:  # a fresh download, or a server that ignores Range: start over
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
            mode = "wb"
        if expected_size is not None and total is not None and total != expected_size:
            raise DownloadError(f"{url}: the server has {total} bytes but the checkpoint index needs "
                                f"{expected_size}; the release changed or the mirror is wrong")
        md5 = _md5_of(response.headers)
        bar = _Progress(dest.name, total, offset, progress)
        try:
            with open(part, mode) as f:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (http.client.IncompleteRead, OSError) as e:
            raise DownloadError(f"{url}: interrupted after {part.stat().st_size} of {total or '?'} bytes "
                                f"({type(e).__name__}): run again to resume from {part}") from e
    size = part.stat().st_size
    want = expected_size if expected_size is not None else total
    if want is not None and size != want:
        if size > want:
            part.unlink()
            raise DownloadError(f"{url}: received {size} bytes, expected {want}; removed {part}, run again")
        raise DownloadError(f"{url}: interrupted after {size} of {want} bytes; run again to resume from {part}")
    if md5 is not None:
        digest = hashlib.md5()
        with open(part, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        if digest.digest() != md5:
            part.unlink()
            raise DownloadError(f"{url}: MD5 mismatch against the server's x-goog-hash; removed {part}, run again")
    bar.finish()
    os.replace(part, dest)
    return dest


def _range_start(content_range: str) -> int | None:
    m = re.match(r"bytes (\d+)-\d+/", content_range)
    return int(m.group(1)) if m else None


def _range_total(content_range: str) -> int | None:
    m = re.search(r"/(\d+)$", content_range)
    return int(m.group(1)) if m else None


def fetch_release(model: str, category: str = "pretrained", progress: bool = True) -> Path:
    """The TF checkpoint folder of a released model, downloaded into the cache when needed.

    Downloads ``checkpoint``, then the ``.index`` it names, then the data shards, each checked
    against the sizes the index lists. Files already in ``<cache>/<category>/<model>/`` (put there
    by an earlier call or by hand) are used as they are.
    """
    from simclrv2.tfcheckpoint import TFCheckpoint

    check_names(model, category)
    folder = cache_dir() / category / model
    hint = (f"; without a network, copy {RELEASE_BUCKET}/{category}/{model}/ by hand (gsutil -m cp -r "
            f"{RELEASE_BUCKET}/{category}/{model} {folder.parent}/) and run again")
    state = download_file(release_url(category, model, "checkpoint"), folder / "checkpoint", progress=False,
                          manual_hint=hint)
    match = _STATE_RE.search(state.read_text())
    if match is None:
        state.unlink()
        raise DownloadError(f"{state} names no model_checkpoint_path; removed it, run again")
    prefix = Path(match.group(1)).name  # recorded as a path in the training bucket
    download_file(release_url(category, model, prefix + ".index"), folder / (prefix + ".index"),
                  progress=progress, manual_hint=hint)
    ckpt = TFCheckpoint(folder / prefix, verify=False)
    sizes = [0] * ckpt.num_shards  # each shard ends with its last tensor
    for entry in ckpt.entries.values():
        sizes[entry.shard_id] = max(sizes[entry.shard_id], entry.offset + entry.size)
    for i, size in enumerate(sizes):
        name = f"{prefix}.data-{i:05d}-of-{ckpt.num_shards:05d}"
        download_file(release_url(category, model, name), folder / name, expected_size=size, progress=progress,
                      manual_hint=hint)
    return folder

"""The index of an image folder, built once and kept on disk.

Every stage opens both splits on every rank, so an open must not read the images: it lists the
folder with ``os.scandir`` (names, byte sizes and modification times: no file
is opened) and hashes that listing into a *fingerprint*. The first open with a given fingerprint
reads each image's header (its size; nothing is decoded) in a thread pool and writes a *manifest*
to ``$SIMCLRV2_CACHE/index/`` (default ``~/.cache/simclrv2/index/``): relative paths, labels, class
names, image sizes, each file's byte size and mtime, and the files dropped with their reasons.
Every later open with the same fingerprint reads the manifest; any added, deleted or rewritten file
changes the fingerprint and the folder is indexed again.

Under torchrun, the process of local rank 0 builds a missing index and the other processes of
its node wait for the manifest, then read it (see :func:`open_index`).

A class-less folder (the ``unlabeled/`` folder of the few-labels layout, or any folder of images
to label) is indexed the same way by :func:`open_unlabeled_index`: its images may sit in any
sub-folders, every label is -1, and its manifest is keyed apart from a labelled index of the same
folder (:func:`manifest_path` with ``kind="unlabeled"``).

Pixel data is not checked here: a corrupt body is found when the image is decoded
(:meth:`~simclrv2.data.folder.ImageFolderDataset.open_image`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .. import distributed as dist
from ..host import atomic_write_text, cache_dir, usable_cores
from . import images
from .images import IMAGE_EXTENSIONS, DatasetError

__all__ = [
    "FolderIndex", "FolderScan", "index_cache_dir", "manifest_path", "open_index", "open_unlabeled_index",
    "scan_folder", "scan_unlabeled_folder",
]

# Bumped whenever the manifest's content or the rules that fill it change: old manifests are rebuilt.
INDEX_VERSION = 1

# Folders with fewer files are indexed without a progress display (it would flash past).
PROGRESS_MIN_FILES = 2000

# EXIF orientations 5-8 turn the stored image by 90 degrees: its upright width is the stored height.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = frozenset({5, 6, 7, 8})

# The builder of an index refreshes its marker file this often; waiting processes give up on a
# builder whose marker is older than STALE_SECONDS, and build the index themselves when no builder
# shows up within GRACE_SECONDS (its own start may lag theirs by the time to list the folder).
HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 60.0
GRACE_SECONDS = 30.0
POLL_SECONDS = 0.2

# Cache folders already warned about in this process (one warning, not one per split and stage).
_UNWRITABLE_WARNED: set[str] = set()


@dataclass
class FolderScan:
    """What ``os.scandir`` tells about a folder, without opening any file.

    ``files`` are paths relative to ``root`` (``class/name``), in class then name order; ``stamps``
    holds each file's ``(st_size, st_mtime_ns)``; ``unreadable`` lists image-named entries that
    cannot be opened at all (broken symlinks, loops) with the reason.
    """

    root: Path
    classes: list[str]
    files: list[str]
    labels: list[int]
    stamps: list[tuple[int, int]]
    unreadable: list[tuple[str, str]]
    fingerprint: str


@dataclass
class FolderIndex:
    """The usable images of a folder and what was dropped.

    ``files`` relative paths, ``labels`` int64 ``(N,)``, ``sizes`` int64 ``(N, 2)`` (width, height of
    the upright image, from its header), ``stamps`` int64 ``(N, 2)`` (``st_size``, ``st_mtime_ns``
    when indexed), ``dropped`` the ``(relative path, reason)`` of files that cannot be used.
    """

    classes: list[str]
    files: list[str]
    labels: np.ndarray
    sizes: np.ndarray
    stamps: np.ndarray
    dropped: list[tuple[str, str]]
    fingerprint: str


# ---------------------------------------------------------------------------------- the scan


def _unreadable_reason(path: str) -> str:
    """Why an entry whose ``stat`` failed cannot be read (it is a symlink: ``lstat`` worked)."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        if os.path.islink(path):
            return f"broken symlink to {os.readlink(path)}"
        return f"{type(exc).__name__}: {exc}"
    return "changed while the folder was listed"


def _sorted_entries(folder: str | Path) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as it:
        return sorted(it, key=lambda e: e.name)


def scan_folder(root: Path) -> FolderScan:
    """List ``root/<class>/<file>`` and fingerprint it; raise :class:`DatasetError` for a folder
    whose layout is wrong (no class folders, a class folder without images, a broken link at the top).

    Hidden entries (``.DS_Store``, ``._x.jpg``, ``.ipynb_checkpoints``) and files with other
    extensions are ignored; symlinks are followed. Images sit one level deep: sub-folders of a class
    folder are never walked.
    """
    entries = [e for e in _sorted_entries(root) if not e.name.startswith(".")]
    for e in entries:
        if e.is_symlink() and not os.path.exists(e.path):
            raise DatasetError(
                f"{root / e.name} is a broken symlink or a symlink loop; fix: repoint it to a class folder or remove it"
            )
    class_entries = [e for e in entries if e.is_dir()]
    if not class_entries:
        raise DatasetError(f"{root} has no class folders; fix: lay out images as root/<class>/<image>")
    classes = [e.name for e in class_entries]
    files: list[str] = []
    labels: list[int] = []
    stamps: list[tuple[int, int]] = []
    unreadable: list[tuple[str, str]] = []
    for label, cls in enumerate(classes):
        class_dir = root / cls
        n_before, subdirs = len(files) + len(unreadable), []
        for e in _sorted_entries(class_dir):
            name = e.name
            if name.startswith("."):
                continue
            dot = name.rfind(".")
            if dot <= 0 or name[dot:].lower() not in IMAGE_EXTENSIONS:
                if e.is_dir():
                    subdirs.append(name)
                continue
            try:
                st = e.stat()  # follows symlinks; no file is opened
            except OSError:
                if e.is_symlink():
                    unreadable.append((f"{cls}/{name}", _unreadable_reason(e.path)))
                continue  # a plain file that vanished while the folder was listed
            if not stat.S_ISREG(st.st_mode):
                continue
            files.append(f"{cls}/{name}")
            labels.append(label)
            stamps.append((st.st_size, st.st_mtime_ns))
        if len(files) + len(unreadable) == n_before:
            if subdirs:
                raise DatasetError(
                    f"class folder {class_dir} holds only sub-folders ({', '.join(subdirs[:3])}"
                    f"{', ...' if len(subdirs) > 3 else ''}), no images; fix: images go directly in "
                    "root/<class>/, so set data_dir one level deeper or move the images up"
                )
            raise DatasetError(
                f"class folder {class_dir} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                f"fix: add images or remove the folder '{cls}'"
            )
    return FolderScan(root, classes, files, labels, stamps, unreadable,
                      _fingerprint("", classes, files, stamps, unreadable))


def _fingerprint(kind: str, classes: list[str], files: list[str], stamps: list[tuple[int, int]],
                 unreadable: list[tuple[str, str]]) -> str:
    h = hashlib.blake2b(digest_size=16)
    # the pixel limit decides which files are dropped, so a new limit must mean a new index
    h.update(f"v{INDEX_VERSION}{kind} max_pixels={images.MAX_IMAGE_PIXELS}\n".encode())
    h.update(("\n".join(classes) + "\n\n").encode())
    h.update("".join(f"{f}\t{s}\t{m}\n" for f, (s, m) in zip(files, stamps, strict=True)).encode())
    h.update("".join(f"!{f}\t{r}\n" for f, r in unreadable).encode())
    return h.hexdigest()


def _image_entry(e: os.DirEntry[str]) -> tuple[int, int] | str | None:
    """``(st_size, st_mtime_ns)`` of an image file, why an image-named entry cannot be read (a
    broken symlink, a loop), or None for an entry that is no image file (another extension, a folder)."""
    dot = e.name.rfind(".")
    if dot <= 0 or e.name[dot:].lower() not in IMAGE_EXTENSIONS:
        return None
    try:
        st = e.stat()  # follows symlinks; no file is opened
    except OSError:
        return _unreadable_reason(e.path) if e.is_symlink() else None  # else: vanished while listed
    return (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def scan_unlabeled_folder(root: Path) -> FolderScan:
    """List every image under ``root``, in any sub-folders, and fingerprint the listing; labels are -1.

    ``files`` are paths relative to ``root`` (``a/b/x.png``), in depth-first name order. Hidden
    entries are ignored at every level, as are files with other extensions. Symlinks are followed,
    but a folder is listed once: a link back to a folder already listed (a loop, or a second way
    into the same folder) is named in ``unreadable`` and not walked. A folder without any image
    raises :class:`DatasetError`.
    """
    root = Path(root)
    try:
        top = root.stat()
    except OSError as exc:
        raise DatasetError(f"unlabeled folder {root} cannot be read ({exc.strerror or exc}); fix: "
                           "point data_dir at the folder that holds unlabeled/") from exc
    listed: dict[tuple[int, int], str] = {(top.st_dev, top.st_ino): "."}
    files: list[str] = []
    stamps: list[tuple[int, int]] = []
    unreadable: list[tuple[str, str]] = []
    stack: list[str] = [""]  # folders to list, relative to root ("" = root itself)
    while stack:
        folder = stack.pop()
        subfolders: list[str] = []
        for e in _sorted_entries(root / folder if folder else root):
            if e.name.startswith("."):
                continue
            rel = f"{folder}/{e.name}" if folder else e.name
            found = _image_entry(e)
            if isinstance(found, tuple):
                files.append(rel)
                stamps.append(found)
            elif isinstance(found, str):
                unreadable.append((rel, found))
            elif e.is_dir():  # follows symlinks
                st = e.stat()
                key = (st.st_dev, st.st_ino)
                if key in listed:
                    unreadable.append((rel, f"symlink loop: the folder is already listed as {listed[key]}"))
                    continue
                listed[key] = rel
                subfolders.append(rel)
        stack.extend(reversed(subfolders))  # depth first, in name order
    if not files and not unreadable:
        raise DatasetError(
            f"unlabeled folder {root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in any "
            "sub-folder; fix: put the images to label there, or remove the folder"
        )
    return FolderScan(root, [], files, [-1] * len(files), stamps, unreadable,
                      _fingerprint(" unlabeled", [], files, stamps, unreadable))


# ---------------------------------------------------------------------------------- headers


def read_header(path: str, nbytes: int) -> tuple[int, int] | str:
    """``(width, height)`` of the upright image from its header, or why it cannot be used.

    Only the header is parsed (``Image.open`` stops at the size); nothing is decoded, so a corrupt
    body is found later, when the image is decoded.
    """
    if nbytes == 0:
        return "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():  # PIL warns about large images that we refuse just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            w, h = img.size
            too_large = images.too_large((w, h))
            if too_large:
                return too_large
            # EXIF data that the header already holds (reading it for a PNG without it would decode)
            if "exif" in img.info or img.format == "TIFF":
                if img.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED:
                    w, h = h, w
    except Image.DecompressionBombError as exc:  # PIL refuses twice its limit on its own
        return f"over the limit of {images.MAX_IMAGE_PIXELS:,} pixels ({exc}); downscale it"
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return int(w), int(h)


def _header_threads() -> int:
    # Header reads wait on the disk (or the network) and PIL releases the GIL while reading, so
    # more threads than cores pay off; a local SSD saturates well before 32.
    return max(4, min(32, 2 * usable_cores()))


class _Progress:
    """A tqdm bar on a terminal, else a plain line every 10% (batch logs stay readable)."""

    def __init__(self, root: Path, total: int) -> None:
        self.root, self.total, self.done, self.next_line = root, total, 0, total // 10
        self.bar = None
        self.shown = total >= PROGRESS_MIN_FILES
        if self.shown and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"indexing {root}", unit="file", file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.shown and (self.done >= self.next_line or self.done == self.total):
            print(f"indexing {self.root}: {self.done}/{self.total} files", file=sys.stderr, flush=True)
            self.next_line = self.done + max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def build_index(scan: FolderScan, chunk: int = 256, heartbeat: Callable[[], object] | None = None) -> FolderIndex:
    """Read every file's header (in parallel, with a progress display) and keep the usable ones.

    ``heartbeat`` is called every few seconds while the headers are read (it tells processes
    waiting for this index that its builder is alive).
    """
    n = len(scan.files)
    last_beat = time.monotonic()
    results: list[tuple[int, int] | str] = [""] * n
    progress = _Progress(scan.root, n)
    root = str(scan.root)

    def read(start: int) -> int:
        for i in range(start, min(start + chunk, n)):
            results[i] = read_header(f"{root}/{scan.files[i]}", scan.stamps[i][0])
        return min(start + chunk, n) - start

    try:
        with ThreadPoolExecutor(max_workers=_header_threads()) as pool:
            for done in as_completed([pool.submit(read, s) for s in range(0, n, chunk)]):
                progress.update(done.result())
                if heartbeat is not None and time.monotonic() - last_beat > HEARTBEAT_SECONDS:
                    heartbeat()
                    last_beat = time.monotonic()
    finally:
        progress.close()
    keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
    bad = {scan.files[i]: r for i, r in enumerate(results) if isinstance(r, str)}
    bad.update(dict(scan.unreadable))
    return FolderIndex(
        classes=list(scan.classes),
        files=[scan.files[i] for i in keep],
        labels=np.asarray([scan.labels[i] for i in keep], dtype=np.int64),
        sizes=np.asarray([results[i] for i in keep], dtype=np.int64).reshape(-1, 2),
        stamps=np.asarray([scan.stamps[i] for i in keep], dtype=np.int64).reshape(-1, 2),
        dropped=sorted(bad.items()),
        fingerprint=scan.fingerprint,
    )


# ---------------------------------------------------------------------------------- the manifest


def index_cache_dir() -> Path:
    """``$SIMCLRV2_CACHE/index`` (default ``~/.cache/simclrv2/index``): one cache for the project."""
    return cache_dir() / "index"


def manifest_path(root: Path, kind: str = "classes") -> Path:
    """The manifest file of a folder: named after its absolute path (a readable stem and a hash).

    ``kind`` is ``"classes"`` (``root/<class>/<file>``) or ``"unlabeled"`` (any images, no
    classes): the two indexes of one folder never share a manifest.
    """
    absolute = str(Path(root).resolve())
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(absolute).name)[:40] or "root"
    key = absolute if kind == "classes" else f"{absolute}\0{kind}"  # the labelled name is as it always was
    digest = hashlib.blake2b(key.encode(), digest_size=10).hexdigest()
    return index_cache_dir() / f"{stem}-{digest}{'' if kind == 'classes' else '-' + kind}.json"


def _to_json(index: FolderIndex, root: Path) -> str:
    # Columns rather than one record per file: 50,000 entries load in a few tens of milliseconds.
    return json.dumps({
        "version": INDEX_VERSION,
        "root": str(Path(root).resolve()),
        "fingerprint": index.fingerprint,
        "classes": index.classes,
        "files": index.files,
        "labels": index.labels.tolist(),
        "width": index.sizes[:, 0].tolist(),
        "height": index.sizes[:, 1].tolist(),
        "bytes": index.stamps[:, 0].tolist(),
        "mtime_ns": index.stamps[:, 1].tolist(),
        "dropped": [list(d) for d in index.dropped],
    }, separators=(",", ":"))


def load_manifest(path: Path, fingerprint: str) -> FolderIndex | None:
    """The manifest at ``path`` when it was written for ``fingerprint``; None when it is missing,
    stale, from another version or unreadable (then the folder is indexed again)."""
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
        if m.get("version") != INDEX_VERSION or m.get("fingerprint") != fingerprint:
            return None
        return FolderIndex(
            classes=list(m["classes"]),
            files=list(m["files"]),
            labels=np.asarray(m["labels"], dtype=np.int64),
            sizes=np.stack([np.asarray(m["width"], dtype=np.int64), np.asarray(m["height"], dtype=np.int64)], 1),
            stamps=np.stack([np.asarray(m["bytes"], dtype=np.int64), np.asarray(m["mtime_ns"], dtype=np.int64)], 1),
            dropped=[(str(a), str(b)) for a, b in m["dropped"]],
            fingerprint=fingerprint,
        )
    except (OSError, ValueError, KeyError, TypeError):  # missing, half-written by a killed writer, foreign
        return None


def write_manifest(index: FolderIndex, root: Path, path: Path | None = None) -> bool:
    """Write the manifest atomically (to ``path``, default :func:`manifest_path` of ``root``); on
    failure warn once per cache folder and return False."""
    path = path or manifest_path(root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, _to_json(index, root))
    except OSError as exc:
        if str(path.parent) not in _UNWRITABLE_WARNED:
            _UNWRITABLE_WARNED.add(str(path.parent))
            warnings.warn(
                f"cannot write the image folder index to {path.parent} ({exc.strerror or exc}); every open "
                "reads the image headers again; fix: point SIMCLRV2_CACHE at a writable folder",
                stacklevel=3,
            )
        return False
    return True


# ---------------------------------------------------------------------------------- opening


def _mark(marker: Path) -> bool:
    """Create or refresh the marker that says an index is being built; False if it cannot be written."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        with open(marker, "a"):
            pass
        os.utime(marker)
    except OSError:
        return False
    return True


def _build_and_save(scan: FolderScan, root: Path, path: Path) -> FolderIndex:
    marker = path.with_name(path.name + ".building")
    marked = _mark(marker)  # not writable: write_manifest below warns
    try:
        index = build_index(scan, heartbeat=(lambda: _mark(marker)) if marked else None)
        write_manifest(index, root, path)
    finally:
        if marked:
            marker.unlink(missing_ok=True)
    return index


def _wait_for_builder(path: Path, fingerprint: str) -> FolderIndex | None:
    """The index another process of this node is building, once its manifest is written; None when
    no builder shows up within :data:`GRACE_SECONDS` or its marker goes stale (it died)."""
    marker = path.with_name(path.name + ".building")
    deadline = time.monotonic() + GRACE_SECONDS
    seen: tuple[int, int] | None = None
    while True:
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp is not None and stamp != seen:  # parse a manifest only when it is new
            seen = stamp
            index = load_manifest(path, fingerprint)
            if index is not None:
                return index
        try:
            building = time.time() - marker.stat().st_mtime < STALE_SECONDS
        except OSError:
            building = False
        if building:
            deadline = max(deadline, time.monotonic() + POLL_SECONDS)
        elif time.monotonic() > deadline:
            return None
        time.sleep(POLL_SECONDS)


def open_index(root: str | os.PathLike[str]) -> FolderIndex:
    """The index of ``root/<class>/<file>``, from the manifest when the folder is unchanged.

    Every process lists the folder (cheap, and each raises the same error for a wrong layout).
    Without a manifest for that listing, the process of local rank 0 (the only one without
    torchrun) builds it; the other processes of its node wait for the manifest, then read it.
    Waiting goes through the file system, not a collective, so a dataset that rank 0 opens
    alone (the report under torchrun) cannot deadlock, and building for longer than NCCL's
    timeout is harmless. A waiting process builds its own copy when no builder shows up (a cache
    folder it cannot write) or the builder dies.
    """
    root = Path(root)
    return _open(root, scan_folder(root), manifest_path(root))


def open_unlabeled_index(root: str | os.PathLike[str]) -> FolderIndex:
    """The index of every image under ``root``, in any sub-folders, with no classes (labels -1).

    Listed by :func:`scan_unlabeled_folder`; built, cached, shared between torchrun processes and
    rebuilt on any change exactly as :func:`open_index`, in a manifest of its own. Files whose
    header cannot be read are in ``dropped`` with the reason, as are links back into a folder
    already listed.
    """
    root = Path(root)
    return _open(root, scan_unlabeled_folder(root), manifest_path(root, "unlabeled"))


def _open(root: Path, scan: FolderScan, path: Path) -> FolderIndex:
    index = load_manifest(path, scan.fingerprint)
    if index is not None:
        return index
    if dist.local_rank() != 0:
        index = _wait_for_builder(path, scan.fingerprint)
        if index is not None:
            return index
    return _build_and_save(scan, root, path)

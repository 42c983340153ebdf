"""Read TensorFlow checkpoints (tensor-bundle V2 format) without TensorFlow.

The released SimCLRv2 checkpoints (METHOD.md 8.1) are TF1 checkpoints: a prefix such as
``model.ckpt-250228`` with two files next to it,

- ``PREFIX.index``: an SSTable (the LevelDB table format that TensorFlow keeps in
  ``tensorflow/core/lib/io/table*``). Key ``""`` holds a ``BundleHeaderProto``; every other key is
  a variable name whose value is a ``BundleEntryProto`` (dtype, shape, shard, offset, size,
  masked CRC-32C of the bytes).
- ``PREFIX.data-00000-of-0000N``: the raw little-endian tensor bytes, concatenated.

Only the few protobuf fields we need are decoded, by hand, so neither TensorFlow nor protobuf is
required. The tests' ``tests/_tf_writer.py`` writes the same format (``tf.train.load_checkpoint``
reads it), so that checkpoints laid out like the released ones are built without TensorFlow.
"""

from __future__ import annotations

import functools
import os
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = [
    "TFCheckpoint",
    "TensorEntry",
    "crc32c",
    "read_tf_checkpoint",
    "resolve_checkpoint_prefix",
]

# --------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), the checksum TensorFlow stores for tables and tensors
# --------------------------------------------------------------------------------------------

_CRC_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def _byte_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _CRC_POLY if c & 1 else c >> 1
        table[i] = c
    return table


_T8 = _byte_table()  # (256,) one-byte register update
_T8_LIST: list[int] = _T8.tolist()


def _four_zero_bytes(x: np.ndarray) -> np.ndarray:
    """Register after four bytes whose XOR with the register is ``x`` (a linear map)."""
    for _ in range(4):
        x = _T8[x & 0xFF] ^ (x >> 8)
    return x


# A 4-byte step splits into two 65536-entry tables: F(x) = F(lo16) ^ F(hi16 << 16).
_ar16 = np.arange(1 << 16, dtype=np.uint32)
_T16_LO = _four_zero_bytes(_ar16.copy())
_T16_HI = _four_zero_bytes(_ar16 << np.uint32(16))
del _ar16

_CHUNK_LANES = 4096  # lanes advanced together (at 1 KiB per lane, 4 MiB of data)


def _crc_scalar(reg: int, buf: memoryview | bytes) -> int:
    table = _T8_LIST
    for b in bytes(buf):
        reg = table[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg


@functools.cache
def _zero_shift_tables(n_bytes: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """Byte tables of the linear map 'feed n_bytes zero bytes into the register'.

    The map is applied as ``S0[r & 255] ^ S1[(r >> 8) & 255] ^ S2[(r >> 16) & 255] ^ S3[r >> 24]``.
    """
    basis = np.uint32(1) << np.arange(32, dtype=np.uint32)  # images of the 32 unit vectors
    for _ in range(n_bytes // 4):
        basis = _T16_LO[basis & 0xFFFF] ^ _T16_HI[basis >> 16]
    images = basis.tolist()
    tables = []
    for k in range(4):
        table = [0] * 256
        for b in range(1, 256):
            low = b & -b  # lowest set bit: table[b] = table[b - low] ^ image of that bit
            table[b] = table[b ^ low] ^ images[8 * k + low.bit_length() - 1]
        tables.append(table)
    return tables[0], tables[1], tables[2], tables[3]


def crc32c(data: bytes | bytearray | memoryview | np.ndarray, value: int = 0) -> int:
    """CRC-32C of ``data``, continuing from a previous ``value`` (TF's ``crc32c::Extend``).

    The buffer is cut into equal lanes (1 KiB, or 64 bytes below 1 MiB) whose CRCs advance
    together in numpy, 4096 lanes at a time (4 bytes per step, two table look-ups); the lane
    CRCs are then chained with the linear 'append one lane of zeros' map, which makes the
    result identical to the byte-serial CRC.
    """
    buf = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    reg = value ^ 0xFFFFFFFF
    lane_bytes = 1024 if buf.size >= 1 << 20 else 64
    n_lanes = buf.size // lane_bytes
    if n_lanes < 4:
        return _crc_scalar(reg, buf.data) ^ 0xFFFFFFFF
    s0, s1, s2, s3 = _zero_shift_tables(lane_bytes)
    for first in range(0, n_lanes, _CHUNK_LANES):
        count = min(_CHUNK_LANES, n_lanes - first)
        chunk = buf[first * lane_bytes : (first + count) * lane_bytes]
        # (words per lane, lanes): row i holds word i of every lane, contiguous
        words = np.ascontiguousarray(chunk.view("<u4").reshape(count, lane_bytes // 4).T)
        lanes = np.zeros(count, dtype=np.uint32)  # raw lane CRCs, register start 0
        for row in words:
            lanes ^= row
            lanes = _T16_LO[lanes & 0xFFFF] ^ _T16_HI[lanes >> 16]
        for lane_crc in lanes.tolist():
            reg = s0[reg & 0xFF] ^ s1[(reg >> 8) & 0xFF] ^ s2[(reg >> 16) & 0xFF] ^ s3[reg >> 24] ^ lane_crc
    reg = _crc_scalar(reg, buf[n_lanes * lane_bytes :].data)
    return reg ^ 0xFFFFFFFF


_MASK_DELTA = 0xA282EAD8


def _unmask_crc(masked: int) -> int:
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# Minimal protobuf wire format
# --------------------------------------------------------------------------------------------


def _read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint in TF checkpoint index")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 64 bits in TF checkpoint index")


def _proto_fields(buf: bytes | memoryview) -> Iterator[tuple[int, int | bytes]]:
    """Yield (field number, value): ints for varint/fixed fields, bytes for length-delimited."""
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
            yield field, value
        elif wire == 1:
            yield field, struct.unpack_from("<Q", buf, pos)[0]
            pos += 8
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            yield field, bytes(buf[pos : pos + length])
            pos += length
        elif wire == 5:
            yield field, struct.unpack_from("<I", buf, pos)[0]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in TF checkpoint index")


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# TensorFlow DataType enum (tensorflow/core/framework/types.proto) -> numpy dtype.
_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),  # DT_FLOAT
    2: np.dtype("<f8"),  # DT_DOUBLE
    3: np.dtype("<i4"),  # DT_INT32
    4: np.dtype("u1"),  # DT_UINT8
    5: np.dtype("<i2"),  # DT_INT16
    6: np.dtype("i1"),  # DT_INT8
    9: np.dtype("<i8"),  # DT_INT64
    10: np.dtype("?"),  # DT_BOOL
    17: np.dtype("<u2"),  # DT_UINT16
    19: np.dtype("<f2"),  # DT_HALF
    22: np.dtype("<u4"),  # DT_UINT32
    23: np.dtype("<u8"),  # DT_UINT64
}
_DT_BFLOAT16 = 14
_DT_NAMES = {7: "string", 8: "complex64", 14: "bfloat16", 18: "complex128", 20: "resource", 21: "variant"}



@dataclass(frozen=True)
class TensorEntry:
    """One ``BundleEntryProto``: where a tensor's bytes live and what they are."""

    name: str
    dtype_enum: int  # TF DataType enum value
    shape: tuple[int, ...]
    shard_id: int
    offset: int  # byte offset in the data shard
    size: int  # number of bytes
    masked_crc32c: int  # TF stores crc32c::Mask(crc) of the bytes
    sliced: bool  # partitioned variable (stored as slices): not supported

    @property
    def dtype(self) -> np.dtype:
        if self.dtype_enum == _DT_BFLOAT16:
            return np.dtype(np.float32)  # decoded to float32
        if self.dtype_enum not in _DTYPES:
            name = _DT_NAMES.get(self.dtype_enum, f"enum {self.dtype_enum}")
            raise ValueError(f"tensor {self.name!r} has TF dtype {name}, which this reader does not decode")
        return _DTYPES[self.dtype_enum]


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    dims: list[int] = []
    for field, value in _proto_fields(buf):
        if field == 2:  # repeated Dim dim = 2; Dim { int64 size = 1; string name = 2; }
            size = 0
            for f2, v2 in _proto_fields(value):  # type: ignore[arg-type]
                if f2 == 1:
                    size = _signed64(int(v2))  # type: ignore[arg-type]
            dims.append(size)
        elif field == 3 and value:  # unknown_rank
            raise ValueError("TF checkpoint entry with unknown rank")
    return tuple(dims)


def _parse_entry(name: str, buf: bytes) -> TensorEntry:
    # BundleEntryProto: dtype=1, shape=2, shard_id=3, offset=4, size=5, crc32c=6 (fixed32), slices=7
    dtype = shard = offset = size = crc = 0
    shape: tuple[int, ...] = ()
    sliced = False
    for field, value in _proto_fields(buf):
        if field == 1:
            dtype = int(value)  # type: ignore[arg-type]
        elif field == 2:
            shape = _parse_shape(value)  # type: ignore[arg-type]
        elif field == 3:
            shard = int(value)  # type: ignore[arg-type]
        elif field == 4:
            offset = int(value)  # type: ignore[arg-type]
        elif field == 5:
            size = int(value)  # type: ignore[arg-type]
        elif field == 6:
            crc = int(value)  # type: ignore[arg-type]
        elif field == 7:
            sliced = True
    return TensorEntry(name, dtype, shape, shard, offset, size, crc, sliced)


def _parse_header(buf: bytes) -> tuple[int, bool]:
    # BundleHeaderProto: num_shards=1, endianness=2 (LITTLE=0, BIG=1), version=3
    num_shards, big_endian = 1, False
    for field, value in _proto_fields(buf):
        if field == 1:
            num_shards = int(value)  # type: ignore[arg-type]
        elif field == 2:
            big_endian = int(value) == 1  # type: ignore[arg-type]
    return num_shards, big_endian


# --------------------------------------------------------------------------------------------
# SSTable (LevelDB table format, as in tensorflow/core/lib/io/table*)
# --------------------------------------------------------------------------------------------

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48  # two BlockHandles padded to 40 bytes + 8-byte magic
_BLOCK_TRAILER = 5  # 1 byte compression type + 4 bytes masked crc32c


def _read_block(data: bytes, offset: int, size: int, where: str) -> memoryview:
    if offset + size + _BLOCK_TRAILER > len(data):
        raise ValueError(f"{where}: block runs past the end of the file (truncated index?)")
    contents = memoryview(data)[offset : offset + size]
    ctype = data[offset + size]
    (stored,) = struct.unpack_from("<I", data, offset + size + 1)
    actual = crc32c(data[offset : offset + size + 1])
    if _unmask_crc(stored) != actual:
        raise ValueError(f"{where}: block checksum mismatch (corrupted index file)")
    if ctype != 0:
        raise ValueError(f"{where}: compressed index blocks (type {ctype}) are not supported")
    return contents


def _block_entries(block: memoryview) -> Iterator[tuple[bytes, memoryview]]:
    """Iterate (key, value) over a block; keys are prefix-compressed against the previous key."""
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * num_restarts
    pos = 0
    key = b""
    while pos < limit:
        shared, pos = _read_varint(block, pos)
        non_shared, pos = _read_varint(block, pos)
        value_len, pos = _read_varint(block, pos)
        key = key[:shared] + bytes(block[pos : pos + non_shared])
        pos += non_shared
        yield key, block[pos : pos + value_len]
        pos += value_len


def _read_table(path: Path) -> Iterator[tuple[bytes, memoryview]]:
    data = path.read_bytes()
    if len(data) < _FOOTER_LEN:
        raise ValueError(f"{path}: too short to be a TF checkpoint index")
    footer = data[-_FOOTER_LEN:]
    lo, hi = struct.unpack_from("<II", footer, 40)
    if (hi << 32) | lo != _TABLE_MAGIC:
        raise ValueError(f"{path}: not a TF checkpoint index (bad table magic)")
    pos = 0
    _meta_off, pos = _read_varint(footer, pos)
    _meta_size, pos = _read_varint(footer, pos)
    index_off, pos = _read_varint(footer, pos)
    index_size, pos = _read_varint(footer, pos)
    index = _read_block(data, index_off, index_size, f"{path} (index block)")
    for _sep, handle in _block_entries(index):
        off, p = _read_varint(handle, 0)
        size, _ = _read_varint(handle, p)
        yield from _block_entries(_read_block(data, off, size, f"{path} (data block)"))


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------

_STATE_RE = re.compile(r'^\s*model_checkpoint_path:\s*"(.*)"\s*$', re.MULTILINE)
_STEP_RE = re.compile(r"-(\d+)$")


def resolve_checkpoint_prefix(path: str | os.PathLike[str]) -> Path:
    """Turn a directory, a prefix or one of the checkpoint's files into the checkpoint prefix.

    A directory is resolved through its ``checkpoint`` state file (TF's ``latest_checkpoint``;
    the recorded path may point at the bucket the model was trained in, so only its base name is
    trusted) or, without one, the ``*.index`` file with the highest step. A state file naming
    a checkpoint that is absent is an error listing the ones present.
    """
    p = Path(path)
    if p.is_dir():
        indexes = sorted(p.glob("*.index"))

        def step(ix: Path) -> int:
            m = _STEP_RE.search(ix.name[: -len(".index")])
            return int(m.group(1)) if m else -1

        state = p / "checkpoint"
        match = _STATE_RE.search(state.read_text()) if state.is_file() else None
        if match:
            candidate = p / Path(match.group(1)).name
            if Path(str(candidate) + ".index").is_file():
                return candidate
            # A state file naming a step that is not here: a partial copy. Taking another step
            # silently would convert different weights than the folder says it holds.
            present = ", ".join(ix.name[: -len(".index")] for ix in sorted(indexes, key=step)) or "none"
            raise FileNotFoundError(
                f"{state} names {candidate.name}, but {candidate.name}.index is not in {p} (checkpoints "
                f"present: {present}); download it, or pass one present as {p}/<name>")
        if not indexes:
            raise FileNotFoundError(f"no TF checkpoint (*.index) in directory {p}")
        best = max(indexes, key=step)
        return best.with_name(best.name[: -len(".index")])
    name = p.name
    if name.endswith(".index"):
        p = p.with_name(name[: -len(".index")])
    elif re.search(r"\.data-\d{5}-of-\d{5}$", name) or name.endswith(".meta"):
        p = p.with_name(re.sub(r"\.(data-\d{5}-of-\d{5}|meta)$", "", name))
    if not Path(str(p) + ".index").is_file():
        raise FileNotFoundError(f"no TF checkpoint at {path} (expected {p}.index)")
    return p


class TFCheckpoint(Mapping[str, np.ndarray]):
    """Lazy read-only view of a TF1/TF2 tensor-bundle checkpoint: ``ckpt[name] -> np.ndarray``.

    Only the index is parsed on construction; each access reads that tensor's bytes from its
    data shard and (with ``verify=True``) checks the stored CRC-32C. Iteration order is TF's
    (sorted by name). ``shapes`` gives every tensor's shape without reading data.
    """

    def __init__(self, path: str | os.PathLike[str], verify: bool = True) -> None:
        self.prefix = resolve_checkpoint_prefix(path)
        self.verify = verify
        index_path = Path(str(self.prefix) + ".index")
        self.entries: dict[str, TensorEntry] = {}
        header_seen = False
        num_shards, self._big_endian = 1, False
        for key, value in _read_table(index_path):
            if key == b"":
                num_shards, self._big_endian = _parse_header(bytes(value))
                header_seen = True
                continue
            name = key.decode("utf-8")
            if "\x00" in name:
                continue  # per-slice keys of partitioned variables (see TensorEntry.sliced)
            self.entries[name] = _parse_entry(name, bytes(value))
        if not header_seen:
            raise ValueError(f"{index_path}: no BundleHeaderProto; not a tensor-bundle (V2) checkpoint")
        self.num_shards = num_shards
        self._shards = [Path(f"{self.prefix}.data-{i:05d}-of-{num_shards:05d}") for i in range(num_shards)]
        self._files: dict[int, BinaryIO] = {}  # shard id -> open file, opened on first read

    def close(self) -> None:
        """Close the data files (reopened on the next access)."""
        files = getattr(self, "_files", {})  # absent if __init__ failed
        for f in files.values():
            f.close()
        files.clear()

    def __enter__(self) -> TFCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: e.shape for name, e in self.entries.items()}

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        if entry.sliced:
            raise ValueError(f"tensor {name!r} is a partitioned (sliced) variable; not supported")
        # bfloat16 is read as its raw 16 bits; entry.dtype raises for undecodable dtypes
        dtype = np.dtype("<u2") if entry.dtype_enum == _DT_BFLOAT16 else entry.dtype
        count = int(np.prod(entry.shape, dtype=np.int64))
        if count * dtype.itemsize != entry.size:
            raise ValueError(
                f"tensor {name!r}: {entry.size} bytes stored, but shape {entry.shape} needs "
                f"{count * dtype.itemsize}"
            )
        shard = self._shards[entry.shard_id]
        f = self._files.get(entry.shard_id)
        if f is None:
            f = self._files[entry.shard_id] = open(shard, "rb")  # noqa: SIM115 -- kept open, see close()
        f.seek(entry.offset)
        raw = f.read(entry.size)
        if len(raw) != entry.size:
            raise ValueError(f"tensor {name!r}: {shard} is truncated")
        if self.verify and _unmask_crc(entry.masked_crc32c) != crc32c(raw):
            raise ValueError(f"tensor {name!r}: checksum mismatch in {shard} (corrupted download?)")
        if self._big_endian:
            dtype = dtype.newbyteorder(">")
        array = np.frombuffer(raw, dtype=dtype).reshape(entry.shape)
        if entry.dtype_enum == _DT_BFLOAT16:
            # bfloat16 is the high half of a float32
            return (array.astype(np.uint32) << np.uint32(16)).view(np.float32)
        # native byte order, writable copy
        return array.astype(array.dtype.newbyteorder("="), copy=True)


def read_tf_checkpoint(path: str | os.PathLike[str], verify: bool = True) -> dict[str, np.ndarray]:
    """Read every tensor of a TF checkpoint into a dict (name -> array); no TensorFlow needed.

    ``path`` is a directory (with a ``checkpoint`` state file or ``*.index`` files), a prefix
    such as ``.../model.ckpt-250228``, or one of the checkpoint's files. METHOD.md 8.1.
    """
    ckpt = TFCheckpoint(path, verify=verify)
    return {name: ckpt[name] for name in ckpt}

"""A TensorFlow checkpoint writer (tensor-bundle V2), for the tests only: checkpoints laid out like
the released SimCLRv2 ones, built without TensorFlow, which ``tf.train.load_checkpoint`` reads
(tests/test_convert.py checks that where TensorFlow is installed). The reader is
``simclrv2.tfcheckpoint``; the library never writes this format.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from simclrv2.tfcheckpoint import _DTYPES, _MASK_DELTA, _TABLE_MAGIC, crc32c


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return bytes((value,))
    if value < 0:
        value &= (1 << 64) - 1  # protobuf encodes negative int32/int64 as 10-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_varint(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _field_bytes(field: int, value: bytes) -> bytes:
    return _varint((field << 3) | 2) + _varint(len(value)) + value


def _mask_crc(crc: int) -> int:
    """TF/LevelDB store 'masked' CRCs so that CRCs of CRCs stay well distributed."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


_TF_ENUM_OF = {dt.newbyteorder("<") if dt.byteorder != "|" else dt: code for code, dt in _DTYPES.items()}

_BLOCK_SIZE = 262144  # TF's table::Options defaults
_RESTART_INTERVAL = 16


class _BlockBuilder:
    def __init__(self, restart_interval: int) -> None:
        self.restart_interval = restart_interval
        self.buf = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last_key = b""
        self.empty = True

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.counter < self.restart_interval:
            limit = min(len(key), len(self.last_key))
            while shared < limit and key[shared] == self.last_key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buf))
            self.counter = 0
        self.buf += _varint(shared) + _varint(len(key) - shared) + _varint(len(value))
        self.buf += key[shared:] + value
        self.last_key = key
        self.counter += 1
        self.empty = False

    def size_estimate(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        tail = b"".join(struct.pack("<I", r) for r in self.restarts) + struct.pack("<I", len(self.restarts))
        return bytes(self.buf) + tail


def _write_table(path: Path, items: list[tuple[bytes, bytes]]) -> None:
    out = bytearray()

    def write_block(contents: bytes) -> bytes:
        handle = _varint(len(out)) + _varint(len(contents))
        trailer = b"\x00"  # no compression
        out.extend(contents + trailer + struct.pack("<I", _mask_crc(crc32c(contents + trailer))))
        return handle

    index = _BlockBuilder(restart_interval=1)
    block = _BlockBuilder(_RESTART_INTERVAL)
    for key, value in items:
        block.add(key, value)
        if block.size_estimate() >= _BLOCK_SIZE:
            # the block's last key is a valid separator: >= its keys, < the next block's
            index.add(block.last_key, write_block(block.finish()))
            block = _BlockBuilder(_RESTART_INTERVAL)
    if not block.empty:
        index.add(block.last_key, write_block(block.finish()))
    meta_handle = write_block(_BlockBuilder(_RESTART_INTERVAL).finish())  # empty meta-index
    index_handle = write_block(index.finish())
    footer = (meta_handle + index_handle).ljust(40, b"\x00")
    footer += struct.pack("<II", _TABLE_MAGIC & 0xFFFFFFFF, _TABLE_MAGIC >> 32)
    out.extend(footer)
    path.write_bytes(bytes(out))


def write_tf_checkpoint(
    prefix: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    write_state_file: bool = True,
) -> Path:
    """Write ``tensors`` as a single-shard TF tensor-bundle checkpoint at ``prefix``.

    Produces ``PREFIX.index`` and ``PREFIX.data-00000-of-00001`` (and, by default, a
    ``checkpoint`` state file in the same folder pointing at it, as TF's Saver does), readable
    by ``tf.train.load_checkpoint``. Supported dtypes: float16/32/64, int8/16/32/64,
    uint8/16/32/64, bool. Returns the prefix.
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors, key=lambda n: n.encode("utf-8"))  # TF's bytewise key order
    items: list[tuple[bytes, bytes]] = []
    # BundleHeaderProto{num_shards: 1, endianness: LITTLE, version{producer: 1}}
    header = _field_varint(1, 1) + _field_bytes(3, _field_varint(1, 1))
    items.append((b"", header))
    offset = 0
    data_path = Path(f"{prefix}.data-00000-of-00001")
    with open(data_path, "wb") as f:
        for name in names:
            if not name or "\x00" in name:
                raise ValueError(f"invalid tensor name {name!r}")
            array = np.asarray(tensors[name])
            dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder != "|" else array.dtype
            if dtype not in _TF_ENUM_OF:
                raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be written")
            raw = np.ascontiguousarray(array, dtype=dtype).tobytes()
            f.write(raw)
            shape = b"".join(_field_bytes(2, _field_varint(1, d)) for d in array.shape)
            entry = _field_varint(1, _TF_ENUM_OF[dtype]) + _field_bytes(2, shape)
            if offset:
                entry += _field_varint(4, offset)
            if raw:
                entry += _field_varint(5, len(raw))
            entry += b"\x35" + struct.pack("<I", _mask_crc(crc32c(raw)))  # field 6, fixed32
            items.append((name.encode("utf-8"), entry))
            offset += len(raw)
    _write_table(Path(f"{prefix}.index"), items)
    if write_state_file:
        state = f'model_checkpoint_path: "{prefix.name}"\nall_model_checkpoint_paths: "{prefix.name}"\n'
        (prefix.parent / "checkpoint").write_text(state)
    return prefix

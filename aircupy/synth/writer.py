"""A streaming GGUF v3 writer: header in one buffer, then tensor data as large sequential writes.

Layout written (little-endian), the one aircupy.gguf.reader parses:

    "GGUF" | version u32 = 3 | n_tensors u64 | n_kv u64
    n_kv x (key string, value type u32, value)         string = u64 byte length + UTF-8
    n_tensors x (name, n_dims u32, dims u64 innermost first, ggml type u32, offset u64 from data start)
    zero padding to `alignment` | tensor data, each tensor starting at a multiple of `alignment`

Tensor data is not held in memory: each tensor supplies an iterator of byte chunks (memoryviews into a
reused pool of random blocks, see blocks.py), so a 40 GB file costs a few tens of MB of RAM. aircupy's
own writer (gguf-py is only the tests' oracle).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from aircupy.gguf.ggml import GGMLType, tensor_nbytes
from aircupy.gguf.values import GGUFValueType as VT

GGUF_VERSION = 3
ALIGNMENT = 32

# numpy dtype -> GGUF array element type, for numeric metadata arrays (token types, scores).
_ARRAY_TYPES = {np.dtype("int32"): VT.INT32, np.dtype("float32"): VT.FLOAT32,
                np.dtype("uint32"): VT.UINT32, np.dtype("int64"): VT.INT64,
                np.dtype("uint8"): VT.UINT8, np.dtype("float64"): VT.FLOAT64}


@dataclass(frozen=True)
class TensorSource:
    """One tensor to write: numpy-order `shape`; `chunks()` yields exactly nbytes of block data."""
    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[memoryview | bytes]]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.ggml_type, self.shape)


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(v: Any) -> bytes:
    """Type tag + encoded value. ints -> uint32 (int64 when negative or large, as llama.cpp files do),
    floats -> float32, str -> string, list[str] -> string array, numpy arrays -> typed arrays."""
    if isinstance(v, bool):
        return struct.pack("<IB", VT.BOOL, v)
    if isinstance(v, int):
        if 0 <= v < 1 << 32:
            return struct.pack("<II", VT.UINT32, v)
        return struct.pack("<Iq", VT.INT64, v)
    if isinstance(v, float):
        return struct.pack("<If", VT.FLOAT32, v)
    if isinstance(v, str):
        return struct.pack("<I", VT.STRING) + _string(v)
    if isinstance(v, np.ndarray):
        et = _ARRAY_TYPES[v.dtype]
        return struct.pack("<IIQ", VT.ARRAY, et, v.size) + np.ascontiguousarray(v).astype(
            v.dtype.newbyteorder("<")).tobytes()
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        # 100k-260k vocabulary strings: one join, no per-item writes.
        return struct.pack("<IIQ", VT.ARRAY, VT.STRING, len(v)) + b"".join(_string(x) for x in v)
    raise TypeError(f"cannot encode metadata value of type {type(v).__name__}")


def header_bytes(metadata: dict[str, Any], tensors: list[TensorSource]) -> tuple[bytes, list[int]]:
    """The header padded to ALIGNMENT, and each tensor's offset relative to the data section."""
    parts = [b"GGUF", struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata))]
    for k, v in metadata.items():
        parts.append(_string(k))
        parts.append(_value(v))
    offsets, rel = [], 0
    for t in tensors:
        offsets.append(rel)
        dims = tuple(reversed(t.shape))  # GGUF stores dims innermost first
        parts.append(_string(t.name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims,
                                                   int(t.ggml_type), rel))
        rel += -(-t.nbytes // ALIGNMENT) * ALIGNMENT
    head = b"".join(parts)
    return head + bytes(-len(head) % ALIGNMENT), offsets


def _write_all(f, buf) -> None:
    # A raw (unbuffered) file may accept fewer bytes than offered; finish the rest.
    mv = memoryview(buf).cast("B")
    while mv:
        mv = mv[f.write(mv):]


def write_gguf(path, metadata: dict[str, Any], tensors: list[TensorSource]) -> int:
    """Write the file; returns its size in bytes. Data goes out in the chunks' own sizes
    (megabytes each) through an unbuffered file, so nothing is copied on the way."""
    head, _ = header_bytes(metadata, tensors)
    total = len(head)
    with open(path, "wb", buffering=0) as f:
        _write_all(f, head)
        for t in tensors:
            n = 0
            for chunk in t.chunks():
                _write_all(f, chunk)
                n += len(chunk)
            if n != t.nbytes:
                raise AssertionError(f"{t.name}: wrote {n} bytes, expected {t.nbytes}")
            pad = -n % ALIGNMENT
            if pad:
                _write_all(f, bytes(pad))
            total += n + pad
    return total

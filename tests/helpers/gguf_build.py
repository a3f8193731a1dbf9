"""Build small GGUF files byte by byte (struct only, no gguf-py), valid or deliberately broken.

Import as `from tests.helpers.gguf_build import build_gguf, T, V, VT` (tests/ is a package).

API
---
build_gguf(metadata=None, tensors=(), *, version=3, alignment=32, magic=b"GGUF",
           n_tensors=None, n_kv=None, with_data=True) -> bytes
    metadata: dict, or a list of (key, value) pairs (a list may repeat a key). Keys are str, or bytes
        written as is. Values are auto-typed (see `auto_value`) or given explicitly with V(...).
    tensors: T(...) specs, laid out in order at `alignment`-aligned offsets after the header.
    alignment: layout alignment; when it is not 32 and metadata has no general.alignment, that key is
        added as uint32. Put general.alignment in metadata yourself to write a lie.
    n_tensors / n_kv: override the counts written in the header (to lie about them).
    with_data: False stops the file right after the header padding (no tensor bytes).
build(...) -> Built: same arguments; .data (bytes), .fields (list of Field(offset, size, label) for
    every count/length/dims/type/offset field written: handy for targeted corruption), .data_offset,
    .tensor_offsets {name: absolute offset}.
write_gguf(path, **kwargs) -> Path: build_gguf(**kwargs) written to `path`.
T(name, ggml_type, shape, data=None, offset=None, dims=None)
    shape in numpy order (outermost first); data defaults to deterministic bytes of the right size;
    offset overrides the relative data offset written; dims overrides the raw GGUF dims
    (innermost first, written verbatim as uint64, so they may be invalid).
V(vtype, value): an explicitly typed value. For arrays: V(VT.ARRAY, (elem_vtype, [values])), nested
    arrays as V(VT.ARRAY, (VT.ARRAY, [V-or-(elem_vtype, values), ...])). arr(elem_vtype, values) is
    shorthand for the array V. VT is the GGUF value-type enum.
Auto-typing: bool -> BOOL; int -> UINT32 if it fits, else INT32, UINT64, INT64; float -> FLOAT32;
    str -> STRING; bytes -> STRING with raw bytes (may be invalid UTF-8); list/tuple of str ->
    ARRAY of STRING; of bool/int/float -> ARRAY of the type of its first element (ints: INT32);
    numpy array -> ARRAY of its dtype; list of lists/arrays -> ARRAY of ARRAY.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aircupy.gguf.ggml import GGMLType, tensor_nbytes
from aircupy.gguf.values import SCALAR_DTYPE, GGUFValueType as VT

__all__ = ["VT", "V", "T", "arr", "auto_value", "build", "build_gguf", "write_gguf", "Built", "Field"]

_FMT = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I",
        VT.INT32: "<i", VT.FLOAT32: "<f", VT.BOOL: "<B", VT.UINT64: "<Q", VT.INT64: "<q",
        VT.FLOAT64: "<d"}
_DTYPE_VT = {np.dtype(np.uint8): VT.UINT8, np.dtype(np.int8): VT.INT8, np.dtype(np.uint16): VT.UINT16,
             np.dtype(np.int16): VT.INT16, np.dtype(np.uint32): VT.UINT32,
             np.dtype(np.int32): VT.INT32, np.dtype(np.float32): VT.FLOAT32,
             np.dtype(np.bool_): VT.BOOL, np.dtype(np.uint64): VT.UINT64,
             np.dtype(np.int64): VT.INT64, np.dtype(np.float64): VT.FLOAT64}


@dataclass(frozen=True)
class V:
    vtype: VT
    value: Any


@dataclass(frozen=True)
class T:
    name: str | bytes
    ggml_type: int
    shape: tuple[int, ...]
    data: bytes | None = None
    offset: int | None = None
    dims: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Field:
    offset: int
    size: int
    label: str


@dataclass
class Built:
    data: bytes
    fields: list[Field] = field(default_factory=list)
    data_offset: int = 0
    tensor_offsets: dict[str, int] = field(default_factory=dict)


def arr(elem_vtype: VT, values) -> V:
    return V(VT.ARRAY, (elem_vtype, values))


def auto_value(v: Any) -> V:
    """The V a plain Python/numpy value is written as (rules in the module docstring)."""
    if isinstance(v, V):
        return v
    if isinstance(v, (bool, np.bool_)):
        return V(VT.BOOL, bool(v))
    if isinstance(v, (int, np.integer)):
        v = int(v)
        for vt, lo, hi in ((VT.UINT32, 0, 2**32), (VT.INT32, -2**31, 2**31), (VT.UINT64, 0, 2**64)):
            if lo <= v < hi:
                return V(vt, v)
        return V(VT.INT64, v)
    if isinstance(v, (float, np.floating)):
        return V(VT.FLOAT32, float(v))
    if isinstance(v, (str, bytes)):
        return V(VT.STRING, v)
    if isinstance(v, np.ndarray):
        return arr(_DTYPE_VT[v.dtype.newbyteorder("=")], v)
    if isinstance(v, (list, tuple)):
        if not v or isinstance(v[0], (str, bytes)):
            return arr(VT.STRING, list(v))
        if isinstance(v[0], (list, tuple, np.ndarray, V)):
            return arr(VT.ARRAY, [auto_value(x) for x in v])
        if isinstance(v[0], (bool, np.bool_)):
            return arr(VT.BOOL, list(v))
        if isinstance(v[0], (int, np.integer)):
            return arr(VT.INT32, list(v))
        return arr(VT.FLOAT32, list(v))
    raise TypeError(f"cannot auto-type {type(v).__name__}")


class _Writer:
    def __init__(self):
        self.out = bytearray()
        self.fields: list[Field] = []

    def put(self, fmt: str, value, label: str | None = None) -> None:
        if label is not None:
            self.fields.append(Field(len(self.out), struct.calcsize(fmt), label))
        self.out += struct.pack(fmt, value)

    def string(self, s: str | bytes, label: str) -> None:
        raw = s.encode("utf-8") if isinstance(s, str) else bytes(s)
        self.put("<Q", len(raw), f"len:{label}")
        self.out += raw

    def value(self, v: V, label: str) -> None:
        if v.vtype == VT.STRING:
            self.string(v.value, label)
        elif v.vtype == VT.ARRAY:
            etype, values = v.value
            self.put("<I", int(etype), f"etype:{label}")
            self.put("<Q", len(values), f"count:{label}")
            if isinstance(values, np.ndarray) and int(etype) in _FMT:
                self.out += np.ascontiguousarray(values, dtype=SCALAR_DTYPE[etype]).tobytes()
            else:
                for i, x in enumerate(values):
                    if etype == VT.ARRAY:
                        x = x if isinstance(x, V) else (arr(*x) if isinstance(x, tuple) else auto_value(x))
                        self.value(x, f"{label}[{i}]")
                    else:
                        self.value(V(etype, x), f"{label}[{i}]")
        else:
            self.put(_FMT[v.vtype], int(v.value) if v.vtype == VT.BOOL else v.value)


def _tensor_bytes(t: T, index: int) -> bytes:
    if t.data is not None:
        return bytes(t.data)
    try:
        n = tensor_nbytes(GGMLType(t.ggml_type), tuple(t.shape))
    except (ValueError, KeyError):
        return b""
    return np.random.default_rng(index).integers(0, 256, n, dtype=np.uint8).tobytes()


def build(metadata=None, tensors=(), *, version: int = 3, alignment: int = 32, magic: bytes = b"GGUF",
          n_tensors: int | None = None, n_kv: int | None = None, with_data: bool = True) -> Built:
    items = list(metadata.items()) if isinstance(metadata, dict) else list(metadata or [])
    if alignment != 32 and not any(k in ("general.alignment", b"general.alignment") for k, _ in items):
        items.append(("general.alignment", V(VT.UINT32, alignment)))
    w = _Writer()
    w.out += magic
    w.put("<I", version, "version")
    w.put("<Q", len(tensors) if n_tensors is None else n_tensors, "n_tensors")
    w.put("<Q", len(items) if n_kv is None else n_kv, "n_kv")
    for key, value in items:
        label = key if isinstance(key, str) else key.decode("utf-8", "replace")
        w.string(key, f"key:{label}")
        v = auto_value(value)
        w.put("<I", int(v.vtype), f"vtype:{label}")
        w.value(v, label)
    blobs = [_tensor_bytes(t, i) for i, t in enumerate(tensors)]
    rel, rels = 0, []
    for b in blobs:
        rels.append(rel)
        rel += -(-len(b) // alignment) * alignment
    for t, r in zip(tensors, rels):
        label = t.name if isinstance(t.name, str) else t.name.decode("utf-8", "replace")
        w.string(t.name, f"name:{label}")
        dims = tuple(reversed(t.shape)) if t.dims is None else t.dims
        w.put("<I", len(dims), f"n_dims:{label}")
        for d, x in enumerate(dims):
            w.put("<Q", x, f"dim{d}:{label}")
        w.put("<I", int(t.ggml_type), f"type:{label}")
        w.put("<Q", r if t.offset is None else t.offset, f"offset:{label}")
    data_offset = -(-len(w.out) // alignment) * alignment
    w.out += bytes(data_offset - len(w.out))
    offsets = {}
    if with_data:
        for t, r, b in zip(tensors, rels, blobs):
            w.out += bytes(data_offset + r - len(w.out)) + b
            offsets[t.name if isinstance(t.name, str) else t.name.decode("utf-8", "replace")] = \
                data_offset + r
    return Built(bytes(w.out), w.fields, data_offset, offsets)


def build_gguf(metadata=None, tensors=(), **kwargs) -> bytes:
    return build(metadata, tensors, **kwargs).data


def write_gguf(path, metadata=None, tensors=(), **kwargs) -> Path:
    path = Path(path)
    path.write_bytes(build_gguf(metadata, tensors, **kwargs))
    return path

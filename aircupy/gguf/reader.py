"""GGUF reader: header parse, validation, and zero-copy tensor views over one mmap of the file.

File layout (little-endian; v2 and v3 share it, v1 used 32-bit counts and is refused):

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x      (key: string, value_type u32, value)          string = u64 length + UTF-8 bytes
    n_tensors x (name: string, n_dims u32, dims u64[n_dims] innermost first, ggml_type u32,
                 offset u64 relative to the data section)
    padding to `general.alignment` (default 32) -> data section (tensor data at aligned offsets)

`parse_header(buf, path)` validates everything a header can get wrong and works on any buffer, so the
fuzz tests run it on bytes in memory; `GGUFFile` maps the file once and hands out read-only uint8
views of it. A bad file raises GGUFError(path, what is wrong, byte offset) and nothing else.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aircupy.errors import GGUFError
from aircupy.gguf.ggml import BLOCK_GEOMETRY, GGMLType
from aircupy.gguf.values import Cursor, GGUFValueType, quote, value_type_name

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml tensors have at most 4 dimensions
# Smallest tensor info: name length (8) + n_dims (4) + one dim (8) + type (4) + offset (8).
_MIN_TENSOR_INFO = 32
_DIMS = {n: struct.Struct(f"<{n}Q") for n in range(1, MAX_DIMS + 1)}
_TYPE_OFFSET = struct.Struct("<IQ")
_GGML_TYPES = {int(t): t for t in GGMLType}
# Smallest key/value: key length (8) + value type (4) + a 1-byte value.
_MIN_KV = 13


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: `shape` in numpy order (outermost first); `offset` absolute in the file;
    `data` a read-only zero-copy uint8 view of its `nbytes` bytes."""
    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    # Left out of ==, hash and repr: comparing or printing megabytes of weights is never meant.
    data: np.ndarray = field(compare=False, repr=False)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class TensorSpec:
    """A tensor info as parsed from the header, before any view of the data exists."""
    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    offset: int  # absolute
    nbytes: int


@dataclass(frozen=True)
class Header:
    version: int
    metadata: dict[str, Any]
    alignment: int
    data_offset: int
    tensors: dict[str, TensorSpec]


def parse_header(buf, path="<memory>", file_size: int | None = None) -> Header:
    """Parse and validate a GGUF header from `buf` (the whole file, or any buffer of its bytes).

    `file_size` defaults to len(buf); tensor data must lie within it. Raises GGUFError only.
    """
    c = Cursor(buf, path)
    size = c.end if file_size is None else file_size
    c.need(4, "magic")
    magic = bytes(buf[0:4])
    if magic != GGUF_MAGIC:
        raise c.error(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})", 0)
    c.pos = 4
    version = c.u32("version")
    if version not in SUPPORTED_VERSIONS:
        hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise c.error(f"unsupported GGUF version {version}{hint}; supported: 2, 3", 4)
    n_tensors = c.count("tensor count", _MIN_TENSOR_INFO)
    n_kv_pos = c.pos
    n_kv = c.u64("metadata count")
    # Tensor infos follow the key/values, so both must fit in what is left.
    if n_kv * _MIN_KV + n_tensors * _MIN_TENSOR_INFO > c.end - c.pos:
        raise c.error(f"metadata count {n_kv} is impossible: {c.end - c.pos} bytes left "
                      "(file truncated or count corrupt)", n_kv_pos)

    metadata: dict[str, Any] = {}
    types: dict[str, tuple[int, int]] = {}  # key -> (value type, offset of the value)
    for i in range(n_kv):
        key_pos = c.pos
        key = c.string(("key of metadata entry %d", i))
        if key in metadata:
            raise c.error(f"duplicate metadata key {quote(key)}", key_pos)
        vtype = c.u32(("value type of %s", key))
        val_pos = c.pos
        metadata[key] = c.value(vtype, ("metadata %s", key))
        types[key] = (vtype, val_pos)

    alignment = _alignment(c, metadata, types)
    specs = [_tensor_info(c, i) for i in range(n_tensors)]
    data_offset = -(-c.pos // alignment) * alignment
    tensors = _place_tensors(c, specs, data_offset, alignment, size)
    return Header(version, metadata, alignment, data_offset, tensors)


def _alignment(c: Cursor, metadata: dict, types: dict) -> int:
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    vtype, pos = types["general.alignment"]
    if vtype != GGUFValueType.UINT32:
        raise c.error(f"general.alignment must be uint32, not {value_type_name(vtype)}", pos)
    a = metadata["general.alignment"]
    if a == 0 or a & (a - 1):
        raise c.error(f"general.alignment {a} is not a power of two", pos)
    return a


def _tensor_info(c: Cursor, i: int):
    """(name, ggml type, numpy-order shape, relative offset, offset of this info) of tensor i."""
    info_pos = c.pos
    name = c.string(("name of tensor %d", i))
    dims_pos = c.pos
    n_dims = c.u32(("dimension count of tensor %s", name))
    if not 1 <= n_dims <= MAX_DIMS:
        raise c.error(f"tensor {quote(name)} has {n_dims} dimensions (must be 1 to {MAX_DIMS})", dims_pos)
    # dims (u64 x n_dims, innermost first), ggml type (u32) and relative offset (u64) in one read
    c.need(8 * n_dims + 12, ("dimensions, type and offset of tensor %s", name))
    dims = _DIMS[n_dims].unpack_from(c.buf, c.pos)
    t, rel = _TYPE_OFFSET.unpack_from(c.buf, c.pos + 8 * n_dims)
    for d, v in enumerate(dims):
        if v == 0 or v >= 1 << 63:  # stored as int64 by ggml: >= 2^63 is negative
            raise c.error(f"tensor {quote(name)} dimension {d} is {v - (1 << 64) if v >> 63 else v} "
                          "(must be positive)", c.pos + 8 * d)
    c.pos += 8 * n_dims + 12
    gtype = _GGML_TYPES.get(t)
    if gtype is None:
        raise c.error(f"tensor {quote(name)} has unknown ggml type {t}", c.pos - 12)
    return name, gtype, tuple(reversed(dims)), rel, info_pos


def _place_tensors(c: Cursor, specs, data_offset: int, alignment: int, size: int):
    tensors: dict[str, TensorSpec] = {}
    info_at: dict[str, int] = {}
    for name, gtype, shape, rel, info_pos in specs:
        if name in tensors:
            raise c.error(f"duplicate tensor name {quote(name)}", info_pos)
        block_elems, block_bytes = BLOCK_GEOMETRY[gtype]
        if shape[-1] % block_elems:
            raise c.error(f"tensor {quote(name)} row length {shape[-1]} is not a multiple of the "
                          f"{gtype.name} block size {block_elems}", info_pos)
        rows = 1
        for d in shape[:-1]:
            rows *= d
        nbytes = rows * (shape[-1] // block_elems) * block_bytes
        if rel % alignment:
            raise c.error(f"tensor {quote(name)} data offset {rel} is not a multiple of the alignment "
                          f"{alignment}", info_pos)
        tensors[name] = TensorSpec(name, gtype, shape, data_offset + rel, nbytes)
        info_at[name] = info_pos
    by_offset = sorted(tensors.values(), key=lambda s: s.offset)
    outside = [s for s in tensors.values() if s.offset + s.nbytes > size]
    if outside:
        if _packed(by_offset, data_offset, alignment):
            raise c.error(_truncated(by_offset, data_offset, size), size)
        s = outside[0]
        raise c.error(f"tensor {quote(s.name)} data [{s.offset}, {s.offset + s.nbytes}) lies outside the file "
                      f"({size} bytes)", info_at[s.name])
    for a, b in zip(by_offset, by_offset[1:]):
        if a.offset + a.nbytes > b.offset:
            raise c.error(f"tensor {quote(a.name)} data [{a.offset}, {a.offset + a.nbytes}) overlaps "
                          f"tensor {quote(b.name)} starting at {b.offset}", b.offset)
    return tensors


def _packed(by_offset: list[TensorSpec], data_offset: int, alignment: int) -> bool:
    """True when the tensors follow one another from the start of the data section, each at the next
    aligned offset: the layout GGUF writers produce. Such a header is consistent, so tensor data past
    the end of the file means the file was cut short (a corrupt offset or size leaves a gap or overlap)."""
    pos = data_offset
    for s in by_offset:
        if s.offset != pos:
            return False
        pos = -(-(s.offset + s.nbytes) // alignment) * alignment
    return True


def _truncated(by_offset: list[TensorSpec], data_offset: int, size: int) -> str:
    """The refusal of a file cut short: what the header describes, what is on disk, and where."""
    end = by_offset[-1].offset + by_offset[-1].nbytes
    first = next(s for s in by_offset if s.offset + s.nbytes > size)
    return (f"file is truncated or incomplete (an interrupted download?): the header describes "
            f"{_human(end - data_offset)} of tensor data, the file has {_human(size)} ({size} of the {end} "
            f"bytes the header implies); tensor {quote(first.name)} is the first cut off")


def _human(n: int) -> str:
    """A byte count in decimal units, about 3 significant digits: 512 B, 99.6 MB, 4.68 GB."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            v = n / scale
            return f"{v:.{2 if v < 10 else 1 if v < 100 else 0}f} {unit}"
    return f"{n} B"


class GGUFFile:
    """An open GGUF file: validated header plus zero-copy tensor views over one read-only mmap.

    Use as a context manager or call close(). Tensor views stay valid while anyone holds them
    (the mapping is released only when the last view is gone), so close() never invalidates memory.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self.file_size = os.fstat(f.fileno()).st_size
            if self.file_size == 0:
                raise GGUFError(self.path, "empty file (not a GGUF file)", 0)
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._mm = mm
        try:
            self._init(mm, parse_header(mm, self.path, self.file_size))
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_buffer(cls, buf, path: str | os.PathLike = "<memory>") -> "GGUFFile":
        """Open a GGUF held in memory (bytes, bytearray, memoryview, mmap): same checks, same views."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self._mm = None
        self.file_size = len(buf)
        self._init(buf, parse_header(buf, self.path, self.file_size))
        return self

    def _init(self, buf, h: Header) -> None:
        self.version = h.version
        self.metadata = h.metadata
        self.alignment = h.alignment
        self.data_offset = h.data_offset
        # One uint8 array over the whole buffer; each tensor is a slice of it (no copy).
        u8 = np.frombuffer(buf, dtype=np.uint8)
        u8.flags.writeable = False
        self.tensors: dict[str, TensorInfo] = {
            s.name: TensorInfo(s.name, s.ggml_type, s.shape, s.offset, s.nbytes,
                               u8[s.offset:s.offset + s.nbytes])
            for s in h.tensors.values()
        }

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def close(self) -> None:
        """Drop this object's tensor views and unmap the file unless views are still held elsewhere."""
        self.tensors = {}
        mm, self._mm = getattr(self, "_mm", None), None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # someone still holds a tensor view; the mapping goes when the last one does

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.metadata)} keys, "
                f"{len(self.tensors)} tensors)")

"""GGUF metadata values: the value-type table and a bounds-checked cursor over the header bytes.

Everything here reads from an untrusted buffer, so every read checks the bytes left before it
touches them, and every count is checked against the bytes left before anything is allocated for
it (a header that claims 10^12 array elements fails at once instead of allocating).

Decoded values: int / float / bool / str for scalars; numeric arrays -> read-only numpy arrays
(copied out of the file, so metadata never pins the mapping); string arrays -> list[str];
arrays of arrays -> list of those.
"""
from __future__ import annotations

import enum
import struct
from typing import Any

import numpy as np

from aircupy.errors import GGUFError

# Nested arrays recurse; a hostile file could nest thousands deep. Real files nest at most once.
MAX_ARRAY_DEPTH = 8


class GGUFValueType(enum.IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# Fixed-size scalar types: struct format (little-endian) and the numpy dtype used for arrays of them.
_SCALAR_STRUCT: dict[int, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"), GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"), GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"), GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"), GGUFValueType.BOOL: struct.Struct("<B"),
    GGUFValueType.UINT64: struct.Struct("<Q"), GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
SCALAR_DTYPE: dict[int, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"), GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"), GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"), GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"), GGUFValueType.BOOL: np.dtype("<u1"),
    GGUFValueType.UINT64: np.dtype("<u8"), GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
# Smallest encoding of one array element, used to reject counts the remaining bytes cannot hold:
# a string is at least its 8-byte length, a nested array at least its 4-byte type + 8-byte count.
_MIN_ELEM_BYTES = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def value_type_name(t: int) -> str:
    try:
        return GGUFValueType(t).name
    except ValueError:
        return f"unknown({t})"


def quote(name: str, limit: int = 64) -> str:
    """repr() of a key or tensor name for an error message, cut short: a hostile name can be huge."""
    return repr(name) if len(name) <= limit else repr(name[:limit]) + "..."


def _text(what) -> str:
    """A field description: a plain string, or (format, *args) formatted only now (on error);
    string args are names from the file and are quoted (%s in the format, not %r)."""
    if isinstance(what, str):
        return what
    return what[0] % tuple(_text(a) if isinstance(a, tuple) else quote(a) if isinstance(a, str) else a
                           for a in what[1:])


class Cursor:
    """Reads little-endian fields from `buf[pos:end]`, raising GGUFError (with offset) on any overrun.

    `buf` is any buffer (bytes, mmap, memoryview); slices of it are copied into `bytes` only for
    strings, so parsing a 250 MB file touches just its header pages.
    """

    __slots__ = ("buf", "pos", "end", "path")

    def __init__(self, buf, path, pos: int = 0, end: int | None = None):
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end
        self.path = path

    def error(self, message: str, offset: int | None = None) -> GGUFError:
        return GGUFError(self.path, message, self.pos if offset is None else offset)

    # `what` names the field for error messages. Hot callers pass a tuple (format, *args) so that the
    # text is only built when something is wrong: header parsing is dominated by such small reads.
    def need(self, n: int, what) -> None:
        if n > self.end - self.pos:
            raise self.error(f"file truncated: {_text(what)} needs {n} bytes, "
                             f"{max(self.end - self.pos, 0)} left")

    def u32(self, what) -> int:
        if self.end - self.pos < 4:
            self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what) -> int:
        if self.end - self.pos < 8:
            self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def count(self, what, min_elem_bytes: int) -> int:
        """A uint64 element count, rejected unless the bytes left could hold that many elements."""
        start = self.pos
        n = self.u64(what)
        if n * min_elem_bytes > self.end - self.pos:
            raise self.error(f"{_text(what)} {n} is impossible: needs at least {n * min_elem_bytes} "
                             f"bytes, {self.end - self.pos} left (file truncated or count corrupt)", start)
        return n

    def string(self, what) -> str:
        start = self.pos
        if self.end - start < 8:
            self.need(8, ("length of %s", _text(what)))
        (n,) = _U64.unpack_from(self.buf, start)
        pos = start + 8
        if n > self.end - pos:
            raise self.error(f"{_text(what)} length {n} runs past the end ({self.end - pos} bytes left)",
                             start)
        raw = self.buf[pos:pos + n]
        self.pos = pos + n
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            raise self.error(f"{_text(what)} is not valid UTF-8 ({e.reason})", pos + e.start) from None

    def value(self, vtype: int, what, depth: int = 0) -> Any:
        """One metadata value of type `vtype` (scalar, string or array)."""
        st = _SCALAR_STRUCT.get(vtype)
        if st is not None:
            self.need(st.size, what)
            (v,) = st.unpack_from(self.buf, self.pos)
            self.pos += st.size
            return bool(v) if vtype == GGUFValueType.BOOL else v
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            return self.array(what, depth)
        raise self.error(f"{_text(what)} has unknown value type {vtype}", self.pos - 4)

    def array(self, what, depth: int) -> Any:
        if depth >= MAX_ARRAY_DEPTH:
            raise self.error(f"{_text(what)}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
        type_pos = self.pos
        etype = self.u32(("element type of %s", what))
        if etype in SCALAR_DTYPE:
            dt = SCALAR_DTYPE[etype]
            n = self.count(("element count of %s", what), dt.itemsize)
            arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos).copy()
            self.pos += n * dt.itemsize
            if etype == GGUFValueType.BOOL:
                arr = arr != 0
            arr.flags.writeable = False
            return arr
        if etype == GGUFValueType.STRING:
            n = self.count(("element count of %s", what), 8)
            return self.string_array(n, what)
        if etype == GGUFValueType.ARRAY:
            n = self.count(("element count of %s", what), 12)
            return [self.array(("%s[%d]", what, i), depth + 1) for i in range(n)]
        raise self.error(f"{_text(what)} has unknown element type {etype}", type_pos)

    def string_array(self, n: int, what) -> list[str]:
        """n length-prefixed strings: one tight loop finds the slices, then they are decoded in bulk.

        This is the hot path of opening a file (Gemma3's 262k-token vocabulary): no per-string
        numpy views, no per-string method calls beyond the unavoidable slice.
        """
        buf, pos, end = self.buf, self.pos, self.end
        unpack = _U64.unpack_from
        raws = [b""] * n
        for i in range(n):
            if end - pos < 8:
                self.pos = pos
                raise self.error(f"file truncated: length of {_text(what)}[{i}] needs 8 bytes, "
                                 f"{max(end - pos, 0)} left")
            (ln,) = unpack(buf, pos)
            pos += 8
            if ln > end - pos:
                raise self.error(f"{_text(what)}[{i}] length {ln} runs past the end ({end - pos} bytes left)",
                                 pos - 8)
            raws[i] = buf[pos:pos + ln]
            pos += ln
        try:
            out = [str(r, "utf-8") for r in raws]
        except UnicodeDecodeError:
            out = self._first_bad_utf8(raws, what)
        self.pos = pos
        return out

    def _first_bad_utf8(self, raws: list[bytes], what):
        # Slow path, only for a broken file: locate the offending string to report its offset.
        pos = self.pos
        for i, r in enumerate(raws):
            try:
                str(r, "utf-8")
            except UnicodeDecodeError as e:
                raise self.error(f"{_text(what)}[{i}] is not valid UTF-8 ({e.reason})",
                                 pos + 8 + e.start) from None
            pos += 8 + len(r)
        raise AssertionError("unreachable: some string failed to decode")

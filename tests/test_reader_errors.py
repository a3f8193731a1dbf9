"""Every way a GGUF header can be wrong gets a GGUFError naming the file, the problem and the byte offset.

Files are built with tests.helpers.gguf_build; `fields` gives the offset of each length/count field
so a test can corrupt exactly one and check the reported offset points at it.
"""
from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest

from aircupy.errors import AircupyError, GGUFError
from aircupy.gguf.ggml import GGMLType
from aircupy.gguf.reader import GGUFFile
from tests.helpers.gguf_build import VT, T, V, arr, build, build_gguf, write_gguf

META = {"general.architecture": "llama", "n": V(VT.UINT32, 3), "s": ["ab", "cd"], "f": np.ones(3, np.float32),
        "aa": [[1], ["z"]]}
TENSORS = [T("a", GGMLType.F32, (2, 8)), T("b", GGMLType.Q8_0, (1, 32))]


def _err(data: bytes, match: str) -> GGUFError:
    with pytest.raises(GGUFError, match=match) as ei:
        GGUFFile.from_buffer(data, "bad.gguf")
    e = ei.value
    assert e.path == "bad.gguf" and str(e).startswith("bad.gguf: ") and isinstance(e, AircupyError)
    assert e.offset is not None and 0 <= e.offset <= max(len(data), 4) and f"at byte {e.offset}" in str(e)
    return e


def _field(built, label: str) -> int:
    return next(f.offset for f in built.fields if f.label == label)


def _patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def test_bad_magic_and_versions():
    good = build_gguf(META, TENSORS)
    assert _err(b"GGUX" + good[4:], "not a GGUF file").offset == 0
    assert _err(build_gguf(META, TENSORS, version=1), "unsupported GGUF version 1").offset == 4
    assert _err(build_gguf(META, TENSORS, version=4), "unsupported GGUF version 4").offset == 4
    _err(_patch(good, 4, ">I", 3), "big-endian")


def test_every_truncation_is_an_error():
    data = build_gguf(META, TENSORS)
    GGUFFile.from_buffer(data)  # the whole file is fine
    for n in range(len(data)):
        _err(data[:n], "truncated|runs past the end|impossible|outside the file")


@pytest.mark.parametrize("label", ["len:key:s", "len:s[1]", "len:general.architecture", "len:name:b"])
@pytest.mark.parametrize("value", [2**64 - 1, 2**63, 10**12, 100_000])
def test_string_length_past_the_end(label, value):
    built = build(META, TENSORS)
    e = _err(_patch(built.data, _field(built, label), "<Q", value), "runs past the end")
    assert e.offset == _field(built, label)


@pytest.mark.parametrize("label", ["n_tensors", "n_kv", "count:f", "count:s", "count:aa", "count:aa[1]"])
def test_absurd_counts_fail_fast_without_allocating(label):
    built = build(META, TENSORS)
    bad = _patch(built.data, _field(built, label), "<Q", 10**12)
    tracemalloc.start()
    try:
        e = _err(bad, "impossible")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # refused at the count itself, before anything of that size is allocated or iterated
    assert e.offset == _field(built, label)
    assert peak < 1 << 20


def test_tensor_data_outside_the_file_or_overlapping():
    _err(build_gguf(META, [T("a", 0, (8,), offset=1 << 20)]), "'a' data .* lies outside the file")
    _err(build_gguf(META, [T("a", 0, (8,), offset=2**64 - 32)]), "outside the file")
    # a consistent layout running past the end is a file cut short, and says so
    _err(build_gguf(META, [T("a", 0, (8,))], with_data=False), "truncated or incomplete")
    _err(build_gguf(META, [T("a", 0, (2**40,), data=b"")]), "describes 4.40 TB of tensor data")
    _err(build_gguf(META, [T("a", 0, (16,)), T("b", 0, (8,), offset=32)]), "'a' .* overlaps tensor 'b'")
    _err(build_gguf(META, [T("a", 0, (8,)), T("b", 0, (8,), offset=0)]), "overlaps")


def test_a_file_cut_in_its_tensor_data_is_called_truncated_with_both_sizes():
    built = build(META, [T("a", GGMLType.F32, (1000,)), T("b", GGMLType.Q8_0, (10, 32)),
                         T("c", GGMLType.F32, (300,))])
    full = built.data   # tensor data: a 4000 B, b 340 B + 12 B of padding, c 1200 B
    assert len(full) == built.data_offset + 5552
    for cut, first in ((2000, "a"), (len(full) - 1, "c")):
        assert built.data_offset < cut
        e = _err(full[:cut], "file is truncated or incomplete")
        assert e.reason.startswith("file is truncated or incomplete (an interrupted download?): the header "
                                   "describes 5.55 kB of tensor data, the file has ")
        assert f"{cut / 1000:.2f} kB ({cut} of the {len(full)} bytes the header implies)" in e.reason
        assert e.reason.endswith(f"tensor '{first}' is the first cut off") and e.offset == cut


def test_a_cut_real_model_is_one_line_saying_truncated(smollm2_path, tmp_path):
    """An interrupted download of SmolLM2: the whole header, then 40% of the file (sparse, no data)."""
    from click.testing import CliRunner

    from aircupy.cli import main
    with GGUFFile(smollm2_path) as g:
        header, full = g.data_offset, g.file_size
    cut = tmp_path / "partial.gguf"
    with open(smollm2_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(header))
        dst.truncate(int(full * 0.4))
    r = CliRunner().invoke(main, ["generate", "x", "--model", str(cut), "--backend", "numpy"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and r.stdout == ""
    assert "file is truncated or incomplete" in r.stderr
    assert f"the header describes {(full - header) / 1e6:.1f} MB of tensor data, the file has " \
           f"{int(full * 0.4) / 1e6:.1f} MB" in r.stderr


def test_tensor_offset_must_be_aligned():
    _err(build_gguf(META, [T("a", 0, (8,), offset=16)]), "not a multiple of the alignment 32")


@pytest.mark.parametrize("t", [4, 5, 31, 99, 2**32 - 1])
def test_unknown_ggml_type(t):
    built = build(META, [T("a", 0, (8,))])
    e = _err(_patch(built.data, _field(built, "type:a"), "<I", t), f"unknown ggml type {t}")
    assert e.offset == _field(built, "type:a")


def test_row_length_not_a_multiple_of_the_block():
    _err(build_gguf(META, [T("q", GGMLType.Q4_K, (2, 100), data=bytes(512))]),
         "row length 100 is not a multiple of the Q4_K block size 256")
    _err(build_gguf(META, [T("q", GGMLType.Q8_0, (33,), data=bytes(64))]), "block size 32")


def test_duplicates():
    _err(build_gguf([("k", 1), ("j", 2), ("k", 3)], []), "duplicate metadata key 'k'")
    _err(build_gguf(META, [T("w", 0, (4,)), T("w", 0, (4,))]), "duplicate tensor name 'w'")


@pytest.mark.parametrize("value,match", [(V(VT.UINT32, 48), "48 is not a power of two"),
                                         (V(VT.UINT32, 0), "0 is not a power of two"),
                                         (V(VT.INT32, 32), "must be uint32, not INT32"),
                                         (V(VT.UINT64, 32), "must be uint32"), ("32", "must be uint32")])
def test_bad_alignment(value, match):
    _err(build_gguf({"general.alignment": value}, [T("w", 0, (4,))]), match)


def test_invalid_utf8():
    bad = b"ok\xff\xfe"
    e = _err(build_gguf([(b"k" + bad, 1)], []), "key of metadata entry 0 is not valid UTF-8")
    assert e.offset == 24 + 8 + 3  # header, key length, then 'k', 'o', 'k' before the bad byte
    _err(build_gguf({"k": bad}, []), "metadata 'k' is not valid UTF-8")
    _err(build_gguf({"k": ["fine", bad]}, []), r"metadata 'k'\[1\] is not valid UTF-8")
    _err(build_gguf({"k": [["fine"], ["x", b"\xc3"]]}, []), "not valid UTF-8")
    _err(build_gguf({}, [T(b"w\x80", 0, (4,))]), "name of tensor 0 is not valid UTF-8")


@pytest.mark.parametrize("dims,match", [((4, 1, 1, 1, 1), "5 dimensions"), ((), "0 dimensions"),
                                        ((4, 0), "dimension 1 is 0"), ((0,), "dimension 0 is 0"),
                                        ((2**64 - 1,), "dimension 0 is -1"),
                                        ((4, 2**63), "dimension 1 is -9223372036854775808")])
def test_bad_dims(dims, match):
    _err(build_gguf({}, [T("w", 0, (4,), dims=dims)]), match)


def test_unknown_value_types_and_deep_nesting():
    built = build({"k": 1, "a": [1, 2]}, [])
    e = _err(_patch(built.data, _field(built, "vtype:k"), "<I", 13), "'k' has unknown value type 13")
    assert e.offset == _field(built, "vtype:k")
    _err(_patch(built.data, _field(built, "etype:a"), "<I", 99), "unknown element type 99")
    deep = arr(VT.INT8, [1])
    for _ in range(9):
        deep = arr(VT.ARRAY, [deep])
    _err(build_gguf({"deep": deep}, []), "nested deeper than 8")


def test_bad_files_on_disk_name_the_path(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFError, match=f"{empty}: empty file .* at byte 0"):
        GGUFFile(empty)
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a model\n")
    with pytest.raises(GGUFError, match=f"{text}: not a GGUF file"):
        GGUFFile(text)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(build_gguf(META, TENSORS)[:-10])
    with pytest.raises(GGUFError, match=f"{cut}: file is truncated .* tensor 'b' is the first cut off") as ei:
        GGUFFile(cut)
    assert ei.value.path == str(cut) and ei.value.reason.startswith("file is truncated")
    ok = write_gguf(tmp_path / "ok.gguf", META, TENSORS)
    with GGUFFile(ok) as g:
        assert g.metadata["aa"][1] == ["z"]
    with pytest.raises(FileNotFoundError):
        GGUFFile(tmp_path / "missing.gguf")


def test_huge_names_are_cut_short_in_messages():
    name = "n" * 100_000
    e = _err(build_gguf({}, [T(name, GGMLType.Q4_K, (1, 100), data=b"")]), "not a multiple")
    assert len(str(e)) < 300 and "nnnn'..." in str(e)
    e = _err(build_gguf([(name, 1), (name, 2)], []), "duplicate metadata key")
    assert len(str(e)) < 300

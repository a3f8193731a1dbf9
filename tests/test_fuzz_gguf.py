"""Fuzzing the reader: thousands of corrupted files must each open cleanly or raise GGUFError, nothing else.

Seeds are real headers: both real models' metadata (every key with its value type; the vocabulary-
sized arrays cut to 64 entries so a parse takes ~1 ms) and their real tensor infos (names, types,
shapes, offsets), plus a synthetic header holding every value type. Each corrupted header is written
at the start of an anonymous mapping as large as the real file, so the tensor infos point at real
distances and a truncation anywhere, header or data, is a true truncation, without writing files.
Mutations: truncations, byte and bit flips, overwrites of the length/count/dims/type/offset fields
with hostile values (0, 2^63, 2^64-1, 10^12, off by one...), inserted, deleted and copied runs.
"""
from __future__ import annotations

import mmap
import random
import statistics
import time
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from aircupy.errors import GGUFError
from aircupy.gguf.ggml import GGMLType
from aircupy.gguf.reader import GGUFFile
from tests.helpers.gguf_build import VT, T, V, build, build_gguf

CASES_PER_SEED = 4000  # x 3 seeds = 12,000 corrupted files per run


@dataclass
class Seed:
    name: str
    header: bytes
    fields: list
    file_size: int


def _mini_real(path) -> Seed:
    with GGUFFile(path) as g:
        meta = {k: (v[:64] if isinstance(v, (list, np.ndarray)) else v) for k, v in g.metadata.items()}
        # auto-typing reproduces these files' value types (u32/f32/str/bool scalars, typed numpy arrays)
        tensors = [T(t.name, t.ggml_type, t.shape, data=b"", offset=t.offset - g.data_offset)
                   for t in g.tensors.values()]
        data_size = max(t.offset + t.nbytes for t in g.tensors.values()) - g.data_offset
    built = build(meta, tensors, with_data=False)
    return Seed(path.name, built.data, built.fields, built.data_offset + data_size)


def _synthetic() -> Seed:
    meta = {"general.architecture": "llama", "u8": V(VT.UINT8, 1), "i16": V(VT.INT16, -2),
            "u64": V(VT.UINT64, 2**40), "f64": V(VT.FLOAT64, 0.5), "b": True, "s": "text",
            "a_str": ["x", "yy", ""], "a_f32": np.ones(4, np.float32), "a_a": [[1, 2], ["q"]],
            "general.alignment": V(VT.UINT32, 64)}
    tensors = [T("a", GGMLType.F32, (2, 8)), T("b", GGMLType.Q4_K, (1, 256)), T("c", GGMLType.Q8_0, (3, 32)),
               T("d", GGMLType.F16, (1, 2, 3, 4))]
    built = build(meta, tensors, alignment=64)
    return Seed("synthetic", built.data, built.fields, len(built.data))


@pytest.fixture(scope="module")
def seeds(smollm2_path, gemma3_path):
    return [_mini_real(smollm2_path), _mini_real(gemma3_path), _synthetic()]


_HOSTILE_U64 = [0, 1, 7, 8, 255, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 10**12]
_HOSTILE_U32 = [0, 1, 2, 5, 8, 9, 12, 13, 99, 255, 2**31, 2**32 - 1]


def _mutate(rng: random.Random, seed: Seed) -> tuple[bytes, int]:
    """One corrupted file: (header bytes, file length). Usually one mutation, sometimes a few."""
    b = bytearray(seed.header)
    cut = None
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.randrange(7)
        if op == 0:  # truncation, mostly inside the header, sometimes inside the tensor data
            cut = rng.random()  # where, as a fraction of the header (80%) or of the whole file
            break
        if op == 1 and b:  # random bytes
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2 and b:  # bit flips
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op in (3, 4):  # a structural field gets a hostile value (twice as likely as the rest)
            f = rng.choice(seed.fields)
            if f.offset + f.size > len(b):
                continue
            old = int.from_bytes(b[f.offset:f.offset + f.size], "little")
            pool = _HOSTILE_U64 if f.size == 8 else _HOSTILE_U32
            v = rng.choice(pool + [old + 1, max(old - 1, 0), old * 2, rng.getrandbits(8 * f.size)])
            b[f.offset:f.offset + f.size] = (v % (1 << 8 * f.size)).to_bytes(f.size, "little")
        elif op == 5:  # insert or delete a run: everything after it shifts
            at = rng.randrange(len(b) + 1)
            if rng.random() < 0.5:
                b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            else:
                del b[at:at + rng.randint(1, 32)]
        elif op == 6 and len(b) > 16:  # copy a run over another place (duplicated keys, names...)
            n = rng.randint(4, 64)
            src, dst = rng.randrange(len(b)), rng.randrange(len(b))
            b[dst:dst + n] = b[src:src + n]
    # The data section keeps its length when the header grows or shrinks, unless truncated.
    length = seed.file_size + len(b) - len(seed.header)
    if cut is not None:
        length = int(cut / 0.8 * (len(b) + 64)) if cut < 0.8 else int(cut * length)
        length = min(length, seed.file_size + len(b) - len(seed.header))
    del b[length:]
    return bytes(b), length


def _check_opened(g: GGUFFile, size: int) -> None:
    assert g.alignment & (g.alignment - 1) == 0 and g.data_offset % g.alignment == 0
    spans = sorted((t.offset, t.offset + t.nbytes) for t in g.tensors.values())
    for t in g.tensors.values():
        assert g.data_offset <= t.offset and t.offset + t.nbytes <= size and t.data.size == t.nbytes
        assert not t.data.flags.writeable
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def _open_or_reject(view, name: str, size: int) -> str:
    """"opened" or "GGUFError"; any other exception propagates."""
    try:
        g = GGUFFile.from_buffer(view, name)
    except GGUFError as e:
        assert e.offset is not None and e.path == name and e.reason
        return "GGUFError"
    _check_opened(g, size)
    del g
    return "opened"


def _one_pass_cpu(view) -> float:
    """CPU seconds to read every byte of `view` once (UTF-8 decoding it), best of 3: the reference
    for what a parse of that buffer may cost."""
    best = float("inf")
    for _ in range(3):
        t0 = time.thread_time()
        str(view, "utf-8", "replace")
        best = min(best, time.thread_time() - t0)
    return best


def test_corrupted_headers_open_or_raise_gguf_error(seeds):
    """Every corrupted file opens or raises GGUFError, and none costs much more than reading its bytes
    once: counts are checked against the bytes left, so a hostile header cannot make the parser loop
    or allocate past the buffer. Costs are thread CPU time (other processes do not count), each held
    against references taken in the same run: the seed's median case and one pass over its buffer."""
    outcomes = {"opened": 0, "GGUFError": 0}
    failures = []
    for k, seed in enumerate(seeds):
        rng = random.Random(1000 + k)  # fixed: a failure reproduces from (seed, case index)
        mm = mmap.mmap(-1, max(seed.file_size, 1) + 4096)  # zero pages, touched only at the header
        dirty, costs, slowest = 0, [], []
        for case in range(CASES_PER_SEED):
            data, size = _mutate(rng, seed)
            mm[:dirty] = bytes(dirty)
            mm[:len(data)] = data
            dirty = len(data)
            view = memoryview(mm)[:size]
            t0 = time.thread_time()
            try:
                outcomes[_open_or_reject(view, f"{seed.name}#{case}", size)] += 1
            except Exception as e:  # noqa: BLE001 -- the point of the test: nothing else may escape
                failures.append(f"{seed.name} case {case}: {type(e).__name__}: {e}")
            costs.append(time.thread_time() - t0)
            view.release()
            slowest = sorted(slowest + [(costs[-1], case, data, size)], key=lambda c: -c[0])[:3]
        view = memoryview(mm)[:seed.file_size]
        budget = 25 * (statistics.median(costs) + _one_pass_cpu(view))
        view.release()
        for _, case, data, size in slowest:  # measured again, best of 3: a slow case stays slow
            mm[:dirty] = bytes(dirty)
            mm[:len(data)] = data
            dirty = len(data)
            view = memoryview(mm)[:size]
            best = float("inf")
            for _ in range(3):
                t0 = time.thread_time()
                _open_or_reject(view, f"{seed.name}#{case}", size)
                best = min(best, time.thread_time() - t0)
            view.release()
            assert best < budget, f"{seed.name} case {case} took {best:.4f} s of CPU, budget {budget:.4f} s"
        mm.close()
    assert not failures, failures[:10]
    assert sum(outcomes.values()) == 3 * CASES_PER_SEED >= 10_000
    assert outcomes["GGUFError"] > CASES_PER_SEED and outcomes["opened"] > 100, outcomes


def test_corrupted_files_on_disk_behave_like_buffers(tmp_path):
    seed = _synthetic()
    rng = random.Random(7)
    for case in range(40):
        data, size = _mutate(rng, seed)
        data = data + bytes(size - len(data))
        p = tmp_path / f"case{case}.gguf"
        p.write_bytes(data)
        try:
            want = GGUFFile.from_buffer(data, p)
        except GGUFError as e:
            with pytest.raises(GGUFError) as ei:
                GGUFFile(p)
            assert (ei.value.reason, ei.value.offset, ei.value.path) == (e.reason, e.offset, str(p))
        else:
            with GGUFFile(p) as g:
                assert [(t.name, t.shape, t.offset) for t in g.tensors.values()] == \
                       [(t.name, t.shape, t.offset) for t in want.tensors.values()]


_keys = st.text(min_size=1, max_size=12)
_scalars = st.one_of(st.booleans(), st.integers(-2**63, 2**64 - 1), st.text(max_size=20),
                     st.floats(width=32, allow_nan=False))
_arrays = st.one_of(st.lists(st.text(max_size=8), max_size=6),
                    st.lists(st.integers(-2**31, 2**31 - 1), min_size=1, max_size=6),
                    st.lists(st.lists(st.text(max_size=4), max_size=3), min_size=1, max_size=3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(meta=st.dictionaries(_keys, st.one_of(_scalars, _arrays), max_size=8),
       shapes=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=4), max_size=4),
       version=st.sampled_from([2, 3]))
def test_any_valid_file_roundtrips(meta, shapes, version):
    tensors = [T(f"t{i}", GGMLType.F32, tuple(s)) for i, s in enumerate(shapes)]
    g = GGUFFile.from_buffer(build_gguf(meta, tensors, version=version))
    assert list(g.metadata) == list(meta)
    for k, v in meta.items():
        got = g.metadata[k]
        if isinstance(v, list) and v and isinstance(v[0], list):
            assert got == v
        elif isinstance(v, list) and v and isinstance(v[0], int):
            assert got.tolist() == v
        elif isinstance(v, float):
            assert got == float(np.float32(v))
        else:
            assert got == v and type(got) is type(v)
    assert [t.shape for t in g.tensors.values()] == [tuple(s) for s in shapes]
    for t in g.tensors.values():
        assert t.nbytes == 4 * t.n_elements and t.offset % 32 == 0

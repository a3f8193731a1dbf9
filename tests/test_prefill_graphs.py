"""CPU tier of graph-replayed prefill (aircupy/cuda/prefill.py): the LRU and the capture policy,
with a stand-in stream and capture function that record what would run on the GPU."""
from __future__ import annotations

import numpy as np
import pytest

from aircupy.cuda.prefill import LRU, PrefillGraphs

FULL = 16


class FakeStream:
    def __init__(self, log):
        self.log, self.syncs = log, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        self.syncs += 1


class FakeGraph:
    def __init__(self, T, log, state, value):
        self.T, self.log, self.state, self.value = T, log, state, value

    def launch(self, stream):
        self.log.append(("replay", self.T))
        self.state["x"] = self.value


def make(capacity=2, fail_at=None, differ_at=None):
    """PrefillGraphs over a log of what would run; the pass's 'output' is state['x'] (T * 10 from
    the eager pass and from a good graph; a capture of fail_at raises; the graph of differ_at is off
    by one)."""
    log, state = [], {"x": None}
    stream = FakeStream(log)

    def step(T):
        log.append(("pass", T))
        state["x"] = T * 10

    def capture(fn, s):
        assert s is stream
        before, x = len(log), state["x"]
        fn()  # a capture records the pass's launches; nothing executes
        del log[before:]
        state["x"] = x
        T = fn.args[0]
        if T == fail_at:
            raise RuntimeError("a launcher allocated 64 bytes")
        log.append(("capture", T))
        return FakeGraph(T, log, state, T * 10 + (T == differ_at))

    pg = PrefillGraphs(step, stream, full_rows=FULL, capacity=capacity, capture=capture,
                       output=lambda T: np.array([state["x"]], np.float32))
    return pg, log


def test_lru_evicts_least_recently_used():
    lru = LRU(2)
    assert lru.put(1, "a") is None and lru.put(2, "b") is None
    assert lru.get(1) == "a"                      # 1 is now the most recent
    assert lru.put(3, "c") == (2, "b")
    assert lru.keys() == [1, 3] and 2 not in lru and len(lru) == 2
    assert lru.get(2) is None
    with pytest.raises(ValueError):
        LRU(0)


def test_full_chunk_is_captured_and_checked_after_its_first_eager_run():
    pg, log = make()
    pg.launch(FULL)
    # eager pass, capture, one checking launch (its output equals the eager pass's)
    assert log == [("pass", FULL), ("capture", FULL), ("replay", FULL)]
    pg.launch(FULL)
    pg.launch(FULL)
    assert log[3:] == [("replay", FULL), ("replay", FULL)]
    assert (pg.eager_runs, pg.captures, pg.replays) == (1, 1, 2)


def test_partial_chunk_is_captured_after_its_second_eager_run():
    pg, log = make()
    pg.launch(5)
    assert log == [("pass", 5)]                   # once-seen lengths cost no capture
    pg.launch(5)
    assert log[1:] == [("pass", 5), ("capture", 5), ("replay", 5)]
    pg.launch(5)
    assert log[-1] == ("replay", 5) and pg.eager_runs == 2 and pg.replays == 1


def test_eviction_and_recapture():
    pg, log = make(capacity=2)
    for T in (3, 3, 4, 4):                        # graphs for 3 and 4
        pg.launch(T)
    pg.launch(3)                                  # 3 most recent: 4 is evicted next
    for T in (7, 7):
        pg.launch(T)
    assert pg.graphs.keys() == [3, 7] and pg.evictions == 1
    log.clear()
    pg.launch(4)                                  # seen before: eager, captured again
    assert log == [("pass", 4), ("capture", 4), ("replay", 4)]
    assert pg.graphs.keys() == [7, 4] and pg.evictions == 2
    pg.launch(9)                                  # a new length never evicts a graph
    assert pg.graphs.keys() == [7, 4]
    assert "2 held (T = 7, 4)" in pg.report() and "2 evictions" in pg.report()


def test_capture_failure_falls_back_to_eager_and_says_why():
    pg, log = make(fail_at=6)
    pg.launch(FULL)                               # captured fine
    pg.launch(6)
    pg.launch(6)                                  # capture fails: the eager pass did the work
    assert log[-1] == ("pass", 6) and "T=6 failed: RuntimeError" in pg.fallback_reason
    pg.launch(8)
    pg.launch(8)
    assert log[-2:] == [("pass", 8), ("pass", 8)]  # no more capture attempts
    pg.launch(FULL)                               # a graph captured before stays valid
    assert log[-1] == ("replay", FULL)
    assert "off (capture of T=6 failed" in pg.report()


def test_graph_that_differs_from_eager_is_dropped_and_the_eager_pass_rerun():
    pg, log = make(differ_at=5)
    pg.launch(5)
    pg.launch(5)
    # the checking launch disagreed: the eager pass runs again (restoring its KV entries)
    assert log[1:] == [("pass", 5), ("capture", 5), ("replay", 5), ("pass", 5)]
    assert 5 not in pg.graphs and pg.captures == 0
    assert "T=5 differs from the eager pass (max |diff| 1)" in pg.fallback_reason
    pg.launch(FULL)
    assert log[-1] == ("pass", FULL) and len(pg.graphs) == 0


def test_loaded_cublas_is_found_in_the_process_maps(tmp_path):
    from aircupy.cuda.cublas_capture import loaded_library
    maps = tmp_path / "maps"
    lt = "/opt/nv lib/libcublasLt.so.13"          # a path with a space: the name is the 6th field
    blas = "/opt/nv lib/libcublas.so.13"
    maps.write_text(f"7f00-7f10 r-xp 00000000 08:01 11 {lt}\n"
                    "7f10-7f20 rw-p 00000000 00:00 0\n"
                    f"7f20-7f30 r-xp 00000000 08:01 12 {blas}\n")
    assert loaded_library(str(maps)) == blas
    maps.write_text(f"7f00-7f10 r-xp 00000000 08:01 11 {lt}\n")
    assert loaded_library(str(maps)) is None
    assert loaded_library(str(tmp_path / "absent")) is None

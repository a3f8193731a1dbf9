"""Staging ring: reader threads fill host buffers with file windows; buffers are reused only after
their release condition; the RAM tier keeps windows across passes. CPU tier (numpy buffers)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from aircupy.stream.stager import Stager


@pytest.fixture()
def blob(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, size=1 << 20, dtype=np.uint8)
    p = tmp_path / "blob.bin"
    p.write_bytes(data.tobytes())
    return p, data


def test_windows_arrive_intact_through_a_small_ring(blob):
    path, data = blob
    windows = [(i * 37_000 % (len(data) - 70_000), 50_000 + i * 211) for i in range(40)]
    with Stager(path, n_buffers=3, buffer_bytes=80_000) as st:
        inflight = []
        for off, n in windows:
            if len(inflight) == 3:                     # the streamer's depth: compute, upload, prefetch
                t, (o, m) = inflight.pop(0)
                assert np.array_equal(st.wait(t), data[o:o + m])
                st.release(t)
            inflight.append((st.submit(off, n, key=None), (off, n)))
        for t, (o, m) in inflight:
            assert np.array_equal(st.wait(t), data[o:o + m])
            st.release(t)
        assert st.stats.bytes_read == sum(n for _, n in windows)
        assert st.stats.ram_tier_hits == 0


def test_buffer_not_refilled_before_ready(blob):
    """A released buffer is refilled only after its `ready` callable returned (the upload finished)."""
    path, data = blob
    order = []
    gate = threading.Event()

    def ready():
        order.append("ready")
        gate.set()

    with Stager(path, n_buffers=1, buffer_bytes=4096) as st:
        t = st.submit(0, 4096)
        first = st.wait(t).copy()
        st.release(t, ready=ready)
        t2 = st.submit(4096, 4096)
        order.append("submitted")
        assert order == ["ready", "submitted"] and gate.is_set()
        assert np.array_equal(first, data[:4096])
        assert np.array_equal(st.wait(t2), data[4096:8192])


def test_all_buffers_held_is_an_error_not_a_deadlock(blob):
    path, _ = blob
    with Stager(path, n_buffers=2, buffer_bytes=4096) as st:
        st.submit(0, 10)
        st.submit(10, 10)
        with pytest.raises(RuntimeError, match="every staging buffer is held"):
            st.submit(20, 10)


def test_ram_tier_skips_the_second_read(blob):
    path, data = blob
    with Stager(path, n_buffers=2, buffer_bytes=100_000, ram_tier_bytes=250_000) as st:
        for _ in range(3):                              # three passes over three layers
            for layer in range(3):
                off = layer * 100_000
                t = st.submit(off, 100_000, key=layer)
                assert np.array_equal(st.wait(t), data[off:off + 100_000])
                st.release(t)
            st.tier_settled()
        # two windows fit the tier; the third is read from the file on every pass. The first
        # pass read all three through the ring and the two tier copies behind them.
        assert st.stats.ram_tier_bytes == 200_000
        assert st.stats.ram_tier_hits == 4
        assert st.stats.bytes_read == 3 * 100_000 + 2 * 100_000 + 2 * 100_000


def test_bad_windows_rejected(blob):
    path, data = blob
    with Stager(path, n_buffers=1, buffer_bytes=1000) as st:
        with pytest.raises(ValueError, match="outside the file"):
            st.submit(len(data) - 10, 20)
        with pytest.raises(ValueError, match="exceeds"):
            st.submit(0, 2000)


def test_pinning_is_off_the_callers_thread_and_never_delays_a_read(blob):
    """Pinning is slow (cudaHostAlloc): the ring and the tier are allocated on the pin thread, and a
    window whose tier copy is not complete yet is read through the ring, not waited for."""
    from aircupy.stream.stager import numpy_alloc
    path, data = blob
    where, gate = [], threading.Event()

    def alloc(n):
        where.append(threading.current_thread().name)
        if n == 90_000:                                 # a tier buffer: held until the gate opens
            gate.wait(5)
        return numpy_alloc(n)

    with Stager(path, n_buffers=2, buffer_bytes=100_000, alloc=alloc, ram_tier_bytes=1 << 20) as st:
        for _ in range(2):                              # two passes while no tier copy can finish
            for k in range(3):
                t = st.submit(k * 100_000, 90_000, key=k)
                assert t.buffer is not None             # through the ring
                assert np.array_equal(st.wait(t), data[k * 100_000:k * 100_000 + 90_000])
                st.release(t)
        gate.set()
        st.tier_settled()
        for k in range(3):
            t = st.submit(k * 100_000, 90_000, key=k)
            assert t.buffer is None and np.array_equal(st.wait(t), data[k * 100_000:k * 100_000 + 90_000])
        assert len(where) == 2 + 3 and all(n.startswith("aircupy-pin") for n in where)
        assert st.stats.ram_tier_hits == 3 and st.stats.ram_tier_bytes == 3 * 90_000


def test_a_deferred_tier_waits_for_start_tier(blob):
    """defer_tier: no tier copy (no pinning) until start_tier(); reads go through the ring."""
    from aircupy.stream.stager import numpy_alloc
    path, data = blob
    allocs = []

    def alloc(n):
        allocs.append(n)
        return numpy_alloc(n)

    with Stager(path, n_buffers=2, buffer_bytes=100_000, alloc=alloc, ram_tier_bytes=1 << 20,
                defer_tier=True) as st:
        for _ in range(2):
            for k in range(3):
                t = st.submit(k * 100_000, 100_000, key=k)
                assert t.buffer is not None and np.array_equal(st.wait(t), data[k * 100_000:(k + 1) * 100_000])
                st.release(t)
        assert allocs == [100_000, 100_000]             # the ring only
        st.start_tier()
        st.tier_settled()                               # (it would start them itself too)
        assert len(allocs) == 5
        t = st.submit(0, 100_000, key=0)
        assert t.buffer is None and np.array_equal(st.wait(t), data[:100_000])


def test_a_deferred_tier_does_not_start_at_the_warmers_end(blob):
    """With a warmer, deferred tier copies still wait for start_tier(): the warmer ends in a cold
    start's last moments, and pinning then would hold up the first pass's last launches."""
    import time
    from aircupy.stream.read_ahead import ReadAhead
    path, data = blob
    pins = []

    def alloc(n):
        pins.append(n)
        return np.empty(n, np.uint8)
    with ReadAhead(path, [(0, 300_000)], piece=100_000) as ra, \
            Stager(path, n_buffers=2, buffer_bytes=100_000, alloc=alloc, ram_tier_bytes=1 << 20,
                   read_ahead=ra, defer_tier=True) as st:
        for k in range(3):
            t = st.submit(k * 100_000, 100_000, key=k)
            assert np.array_equal(st.wait(t), data[k * 100_000:(k + 1) * 100_000])
            st.release(t)
        ra.wait_done()
        time.sleep(0.2)
        assert pins == [100_000] * 2                     # the ring only
        st.start_tier()
        st.tier_settled()
        assert len(pins) == 5
        t = st.submit(0, 100_000, key=0)
        assert t.buffer is None and np.array_equal(st.wait(t), data[:100_000])


def _wait_done(ra, timeout: float = 5.0) -> None:
    """Wait (at most `timeout` s) for a ReadAhead to reach the end of its ranges."""
    import time
    deadline = time.time() + timeout
    while not ra.done and time.time() < deadline:
        time.sleep(0.01)


def test_read_ahead_stays_within_its_lead_and_finishes(blob):
    import time
    from aircupy.stream.read_ahead import ReadAhead
    path, data = blob
    ranges = [(0, 300_000), (500_000, 400_000)]
    with ReadAhead(path, ranges, ahead_bytes=200_000, piece=50_000) as ra:
        time.sleep(0.2)
        assert ra.bytes_read == 200_000 and not ra.done   # paced: nothing consumed yet
        with Stager(path, n_buffers=2, buffer_bytes=100_000, read_ahead=ra) as st:
            for o, n in ranges:
                for off in range(o, o + n, 100_000):
                    t = st.submit(off, 100_000)
                    assert np.array_equal(st.wait(t), data[off:off + 100_000])
                    st.release(t)
        _wait_done(ra)
        # Every piece passed; those the Stager had read from the (warm) cache first were skipped.
        assert ra.done and ra.position == 700_000 and ra.error is None
        assert 200_000 <= ra.bytes_read <= 700_000


def _cold(monkeypatch):
    """Make every window look uncached to the Stager (a cold page cache): it must wait for the
    warmer. Returns the list of (offset, nbytes, warmer passed it?) of the Stager's disk reads."""
    import aircupy.stream.stager as staging
    monkeypatch.setattr(staging, "read_cached", lambda fd, mv, offset: 0)
    seen = []
    real = Stager._read

    def read(self, buf, offset, nbytes):
        real(self, buf, offset, nbytes)
        seen.append((offset, nbytes, self.read_ahead.passed(offset, nbytes)))
    monkeypatch.setattr(Stager, "_read", read)
    return seen


def test_on_a_cold_cache_the_consumers_wait_for_the_warmer(blob, monkeypatch):
    """The warmer is the disk's only reader: a window is read by the Stager only after the warmer
    passed every piece of it, also beyond the warmer's lead (a waiting consumer lifts the pacing)."""
    from aircupy.stream.read_ahead import ReadAhead
    path, data = blob
    seen = _cold(monkeypatch)
    ranges = [(0, 400_000), (600_000, 300_000)]
    with ReadAhead(path, ranges, ahead_bytes=50_000, piece=30_000) as ra, \
            Stager(path, n_buffers=3, buffer_bytes=150_000, read_ahead=ra) as st:
        wins = [(0, 150_000), (150_000, 150_000), (600_000, 150_000), (300_000, 100_000),
                (750_000, 150_000), (900_000, 1000)]        # the last one is outside the ranges
        for off, n in wins:
            t = st.submit(off, n)
            assert np.array_equal(st.wait(t), data[off:off + n])
            st.release(t)
        assert [(o, n) for o, n, _ in seen] == wins and all(p for _, _, p in seen)
        _wait_done(ra)
        assert ra.done and ra.bytes_read == 700_000 and ra.error is None


def test_a_warm_cache_is_read_without_waiting_and_not_warmed_again(blob, monkeypatch):
    """Windows the page cache already holds are copied at once (no wait on a warmer held back by
    its lead); the warmer then skips the pieces they covered."""
    import os
    import time
    import aircupy.stream.stager as staging
    from aircupy.stream.read_ahead import ReadAhead
    path, data = blob
    monkeypatch.setattr(staging, "read_cached", lambda fd, mv, off: os.preadv(fd, [mv], off))
    with ReadAhead(path, [(0, 800_000)], ahead_bytes=100_000, piece=100_000) as ra:
        deadline = time.time() + 5
        while ra.bytes_read < 100_000 and time.time() < deadline:   # first piece, then it waits
            time.sleep(0.01)
        with Stager(path, n_buffers=1, buffer_bytes=700_000, read_ahead=ra) as st:
            t = st.submit(100_000, 700_000)             # all of it ahead of the warmer
            assert np.array_equal(st.wait(t), data[100_000:800_000])
            st.release(t)
        ra.wait_done()
        # Had the Stager waited, the warmer would have read all 8 pieces.
        assert ra.done and ra.position == 800_000 and ra.bytes_read == 100_000


def test_after_a_cache_miss_the_stager_stops_probing_the_cache(blob, monkeypatch):
    """A page-cache probe that misses starts the kernel's readahead (disk I/O beside the warmer's):
    after the first miss a Stager only waits for the warmer."""
    import os
    import aircupy.stream.stager as staging
    from aircupy.stream.read_ahead import ReadAhead
    path, data = blob
    probes = []

    def half_cached(fd, mv, offset):
        probes.append(offset)
        return os.preadv(fd, [mv[:len(mv) // 2]], offset)
    monkeypatch.setattr(staging, "read_cached", half_cached)
    with ReadAhead(path, [(0, 1 << 20)], ahead_bytes=1000, piece=1000) as ra, \
            Stager(path, n_buffers=1, buffer_bytes=100_000, read_ahead=ra) as st:
        for off in (500_000, 600_000, 700_000):
            t = st.submit(off, 100_000)
            assert np.array_equal(st.wait(t), data[off:off + 100_000])
            st.release(t)
    assert probes == [500_000]


def test_a_dead_warmer_does_not_hang_the_consumers(blob, monkeypatch):
    """A warmer whose process dies (or never starts) leaves the reads to the consumers."""
    import subprocess
    import time
    from aircupy.stream.read_ahead import ReadAhead
    path, data = blob
    _cold(monkeypatch)
    with ReadAhead(path, [(0, 1 << 20)], ahead_bytes=100_000, piece=50_000) as ra, \
            Stager(path, n_buffers=2, buffer_bytes=500_000, read_ahead=ra) as st:
        deadline = time.time() + 5
        while ra.bytes_read < 100_000 and time.time() < deadline:   # paced after two pieces
            time.sleep(0.01)
        ra._proc.kill()
        t = st.submit(400_000, 500_000)
        assert np.array_equal(st.wait(t), data[400_000:900_000])
        assert ra.done
    def no_spawn(*a, **k):
        raise OSError(12, "cannot allocate memory")
    monkeypatch.setattr(subprocess, "Popen", no_spawn)
    with ReadAhead(path, [(0, 1 << 20)]) as ra, \
            Stager(path, n_buffers=1, buffer_bytes=500_000, read_ahead=ra) as st:
        assert ra.done and isinstance(ra.error, OSError)
        assert np.array_equal(st.wait(st.submit(0, 500_000)), data[:500_000])


def test_a_warmer_read_error_is_reported_and_the_consumers_read_on(blob, monkeypatch):
    """A range past the end of the file: the child reports a short read and stops."""
    from aircupy.stream.read_ahead import ReadAhead
    path, data = blob
    _cold(monkeypatch)
    with ReadAhead(path, [(1_000_000, 200_000), (0, 500_000)], piece=100_000) as ra, \
            Stager(path, n_buffers=1, buffer_bytes=500_000, read_ahead=ra) as st:
        assert np.array_equal(st.wait(st.submit(0, 500_000)), data[:500_000])
        _wait_done(ra)
        assert ra.done and isinstance(ra.error, OSError) and "short read" in str(ra.error)


def test_read_ahead_threads_pass_every_piece(blob, monkeypatch):
    from aircupy.stream.read_ahead import ReadAhead
    path, data = blob
    seen = _cold(monkeypatch)
    with ReadAhead(path, [(0, 1 << 20)], piece=10_000, threads=3) as ra, \
            Stager(path, n_buffers=2, buffer_bytes=200_000, read_ahead=ra) as st:
        for off in range(0, 1 << 20, 200_000):
            n = min(200_000, (1 << 20) - off)
            t = st.submit(off, n)
            assert np.array_equal(st.wait(t), data[off:off + n])
            st.release(t)
        _wait_done(ra)
        assert all(p for _, _, p in seen) and ra.bytes_read == 1 << 20
    with pytest.raises(ValueError):
        ReadAhead(path, [(0, 10)], threads=0)


def test_read_cached_copies_only_true_bytes(blob):
    """preadv2(RWF_NOWAIT) on a just-written file: all of it where the flag works, none where it
    is refused; whatever it reports is the file's bytes."""
    import os
    from aircupy.stream.read_ahead import read_cached
    path, data = blob
    buf = np.zeros(300_000, np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        n = read_cached(fd, memoryview(buf), 100_000)
    finally:
        os.close(fd)
    assert 0 <= n <= 300_000 and np.array_equal(buf[:n], data[100_000:100_000 + n])
    assert not buf[n:].any()


def test_available_ram_reads_memavailable_not_memfree(tmp_path):
    from aircupy.stream.stager import available_ram
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       131072000 kB\nMemFree:         2000000 kB\n"
                    "MemAvailable:   100000000 kB\nCached:         90000000 kB\n")
    assert available_ram(str(info)) == 100000000 * 1024
    assert available_ram(str(tmp_path / "absent")) >= 0     # falls back to the free pages

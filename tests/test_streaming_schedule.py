"""CPU tier of layer streaming: the slot schedule's invariants, and the streamer driving a simulator of
CUDA streams/events (tests/helpers/fake_streams.py) with a real Stager over a real file: every layer
computes on its own bytes under random interleavings of the copy and compute streams."""
from __future__ import annotations

import numpy as np
import pytest

from aircupy.stream.schedule import Compute, SlotSchedule, Upload
from aircupy.stream.stager import Stager
from aircupy.stream.streamer import LayerStreamer
from tests.helpers.fake_streams import FakeCuda

CASES = [(8, (1, 3, 5, 7), 3), (10, tuple(range(10)), 3), (6, (0, 1, 2, 3, 4), 4), (5, (2,), 3),
         (7, (0, 6), 3), (9, (0, 1, 2, 3, 4, 5), 3), (4, (), 3)]


def _replay(sched: SlotSchedule, passes: int):
    """Simulate slot contents along the host issue order; return the per-pass actions."""
    content = {}          # slot -> (layer, g) last uploaded
    last_compute = {}     # slot -> g of the last compute issued on it
    computed = set()
    out = []
    for p in range(passes):
        acts = sched.pass_actions(p)
        out.append(acts)
        assert [a.layer for a in acts if isinstance(a, Compute)] == list(range(sched.n_layers))
        for a in acts:
            if isinstance(a, Upload):
                assert 0 <= a.slot < sched.n_slots
                # the slot's previous user must have been issued, and be exactly the awaited one
                assert a.after == last_compute.get(a.slot), (a, last_compute)
                if a.after is not None:
                    assert a.after in computed
                content[a.slot] = (a.layer, a.g)
            elif a.slot is None:
                assert a.layer not in sched.streamed
            else:
                assert content[a.slot][0] == a.layer, (a, content)
                assert a.g // sched.S == p and sched.layer_of(a.g) == a.layer
                last_compute[a.slot] = a.g
                computed.add(a.g)
    return out


@pytest.mark.parametrize("n_layers,streamed,n_slots", CASES)
def test_schedule_invariants(n_layers, streamed, n_slots):
    sched = SlotSchedule(n_layers, streamed, n_slots)
    acts = _replay(sched, passes=3)
    uploads = [[a for a in ps if isinstance(a, Upload)] for ps in acts]
    if sched.cached:   # each streamed layer owns a slot: uploaded once, never again
        assert len(uploads[0]) == len(streamed) and not uploads[1] and not uploads[2]
    else:              # one upload per streamed layer per pass; the prologue fills every slot first
        assert len(uploads[0]) == len(streamed) + n_slots and len(uploads[1]) == len(streamed)
        assert [a.slot for a in acts[0][:n_slots]] == list(range(n_slots))


def test_upload_issued_right_after_slot_is_freed():
    sched = SlotSchedule(6, range(6), 3)
    acts = sched.pass_actions(1)
    # pass 1 starts with compute of layer 0 (g = 6) in slot 0, followed by the upload of g = 9
    assert acts[0] == Compute(0, 0, 6) and acts[1] == Upload(9, 3, 0, 6)


def test_schedule_rejects_bad_layers():
    with pytest.raises(ValueError):
        SlotSchedule(4, (1, 1), 3)
    with pytest.raises(ValueError):
        SlotSchedule(4, (4,), 3)


def _drive(tmp_path, n_layers, streamed, n_slots, passes, seed, ram_tier, repack_stream=False):
    rng = np.random.default_rng(seed)
    win = 3 * 4096
    data = rng.integers(0, 256, n_layers * win, dtype=np.uint8)
    path = tmp_path / "m.bin"
    data.tofile(path)
    cuda = FakeCuda(seed)
    slots = [np.zeros(win, np.uint8) for _ in range(n_slots)]
    repack = cuda.Stream()
    staging, free, turn = [np.zeros(win, np.uint8) for _ in range(2)], [None, None], [0]

    def fill(layer, host, block, stream):   # runs when the simulator gets to it, not when enqueued
        if not repack_stream:
            stream.enqueue(lambda: block.__setitem__(slice(None), host))
            return None
        # StreamedWeights' protocol: DMA into staging j on the copy stream, "repack" it into the
        # slot on a second stream, return the second stream's event that completes the slot.
        j = turn[0]
        turn[0] ^= 1
        if free[j] is not None:
            stream.wait_event(free[j])
        stream.enqueue(lambda: staging[j].__setitem__(slice(None), host))
        dma = cuda.Event()
        dma.record(stream)
        repack.wait_event(dma)
        repack.enqueue(lambda: block.__setitem__(slice(None), staging[j]))
        free[j] = cuda.Event()
        free[j].record(repack)
        done = cuda.Event()
        done.record(repack)
        return done

    seen = []
    compute = cuda.Stream()
    stager = Stager(path, n_buffers=n_slots + 2, buffer_bytes=win,
                    ram_tier_bytes=(len(streamed) * win if ram_tier else 0))
    windows = {i: (i * win, win) for i in streamed}
    s = LayerStreamer(SlotSchedule(n_layers, streamed, n_slots), windows, slots, fill, stager,
                      compute, cuda=cuda)
    for _ in range(passes):
        s.begin_pass()
        for i in range(n_layers):
            slot = s.acquire(i)
            if slot is not None:
                compute.enqueue(lambda i=i, slot=slot: seen.append(
                    (i, bool(np.array_equal(slots[slot], data[i * win:(i + 1) * win])))))
            s.release(i)
        s.end_pass()
    # The RAM tier's copies run on their own thread, behind the reads: let the last of them land
    # before the figures are read, or a busy machine leaves some in flight and the counts short.
    stager.tier_settled()
    st = s.stats()
    stager.close()
    return seen, st


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_layers,streamed,n_slots", [(8, (1, 3, 5, 7), 3), (7, tuple(range(7)), 3),
                                                       (5, (0, 4), 3)])
def test_streamer_every_layer_sees_its_own_bytes(tmp_path, seed, n_layers, streamed, n_slots):
    passes = 3
    seen, st = _drive(tmp_path, n_layers, streamed, n_slots, passes, seed, ram_tier=seed % 2 == 1)
    assert [i for i, _ in seen] == list(streamed) * passes
    assert all(ok for _, ok in seen), seen
    assert st["passes"] == passes
    n_up = len(streamed) * passes + (n_slots if len(streamed) > n_slots else 0)
    if len(streamed) <= n_slots:
        n_up = len(streamed)
    assert st["uploads"] == n_up and st["bytes_streamed"] == n_up * 3 * 4096
    if seed % 2 == 1:   # RAM tier: each window copied into it once, behind its first read
        win = 3 * 4096
        assert st["ram_tier_bytes"] == len(streamed) * win
        # Every submitted read (each upload's, plus up to n_slots read ahead for a next pass)
        # was a tier hit or a read through the ring (the first of its window, or one made while
        # its tier copy was not complete yet); the tier copies are reads too.
        ring_reads = st["disk_bytes_read"] // win - len(streamed)
        assert len(streamed) <= ring_reads <= n_up + n_slots
        assert n_up <= st["ram_tier_hits"] + ring_reads <= n_up + n_slots


@pytest.mark.parametrize("seed", range(8))
def test_streamer_waits_for_the_event_fill_returns(tmp_path, seed):
    """fill finishing the slot on a second stream (the repack stream): compute must wait for the
    event it returns, not for the copy stream; staging buffers are reused only after their repack."""
    streamed = (0, 1, 2, 4, 5, 6)
    seen, st = _drive(tmp_path, 7, streamed, 3, 3, seed, ram_tier=False, repack_stream=True)
    assert [i for i, _ in seen] == list(streamed) * 3
    assert all(ok for _, ok in seen), seen


def test_streamer_abort_restarts_cleanly(tmp_path):
    """An exception inside a pass: abort() drains, and the next passes are correct again."""
    rng = np.random.default_rng(0)
    win = 4096
    data = rng.integers(0, 256, 6 * win, dtype=np.uint8)
    (tmp_path / "m.bin").write_bytes(data.tobytes())
    cuda = FakeCuda(1)
    slots = [np.zeros(win, np.uint8) for _ in range(3)]
    compute = cuda.Stream()
    stager = Stager(tmp_path / "m.bin", n_buffers=5, buffer_bytes=win)
    s = LayerStreamer(SlotSchedule(6, range(6), 3), {i: (i * win, win) for i in range(6)}, slots,
                      lambda layer, host, block, st: st.enqueue(lambda: block.__setitem__(
                          slice(None), host)), stager, compute, cuda=cuda)
    s.begin_pass()
    s.acquire(0)
    s.release(0)
    s.acquire(1)
    s.abort()                      # as StreamedForwardPass.run does on an exception
    seen = []
    for _ in range(2):
        s.begin_pass()
        for i in range(6):
            slot = s.acquire(i)
            compute.enqueue(lambda i=i, slot=slot: seen.append(
                bool(np.array_equal(slots[slot], data[i * win:(i + 1) * win]))))
            s.release(i)
        s.end_pass()
    compute.synchronize()
    stager.close()
    assert seen == [True] * 12


# -- KV shuttle: the KV of streamed layers rides up with its layer and its new rows come back -------

H, HD, NCTX = 2, 4, 32


def _kv_drive(tmp_path, n_layers, streamed, n_slots, seed):
    """Passes over two caches (different sizes, switches, a truncate) with the KV of streamed layers
    shuttled; each simulated compute checks, when it runs, that its slot holds exactly the rows
    [0, pos0) the host issued before it, then writes T new rows. Returns (checks, caches, oracle,
    stats, shuttle)."""
    from aircupy.cuda.shuttle import KVShuttle, ShuttleKVCache
    rng = np.random.default_rng(seed)
    win = 4096
    data = rng.integers(0, 256, n_layers * win, dtype=np.uint8)
    (tmp_path / "m.bin").write_bytes(data.tobytes())
    cuda = FakeCuda(seed)
    compute = cuda.Stream()
    slots = [np.zeros(win, np.uint8) for _ in range(n_slots)]

    def copy_rows(dst, src, row0, rows, stream):
        sl = (slice(None), slice(None), slice(row0, row0 + rows))
        stream.enqueue(lambda: dst.__setitem__(sl, src[sl]))

    shuttle = KVShuttle([np.zeros(H * NCTX * HD, np.float16) for _ in range(n_slots)],
                        [np.zeros(H * NCTX * HD, np.float16) for _ in range(n_slots)],
                        H, HD, NCTX, copy_rows)
    caches, oracle = [], []
    for n in (NCTX, 24):
        kv = [[np.full((1, H, n, HD), -1, np.float16) for _ in range(n_layers)] for _ in "kv"]
        caches.append(ShuttleKVCache(kv[0], kv[1], n, streamed, shuttle.new_token()))
        oracle.append(np.full((n_layers, 2, 1, H, n, HD), -1, np.float16))
    stager = Stager(tmp_path / "m.bin", n_buffers=n_slots + 2, buffer_bytes=win)
    s = LayerStreamer(SlotSchedule(n_layers, streamed, n_slots),
                      {i: (i * win, win) for i in streamed}, slots,
                      lambda layer, host, block, st: st.enqueue(
                          lambda: block.__setitem__(slice(None), host)), stager, compute, cuda=cuda)
    checks = []
    # (cache, T) passes; ("trunc", cache, n) drops tokens for prefix reuse
    steps = [(0, 5), (0, 6), (0, 1), (0, 1), (1, 7), (0, 1), ("trunc", 0, 6), (0, 3), (1, 2), (1, 1)]
    for step in steps:
        if step[0] == "trunc":
            caches[step[1]].truncate(step[2])
            continue
        ci, T = step
        c = caches[ci]
        pkv = shuttle.bind(c, c.length, T)
        s.begin_pass(pkv)
        for i in range(n_layers):
            slot = s.acquire(i)
            kc, vc = pkv.layer(i)
            p0, exp = c.length, oracle[ci][i][:, :, :, :c.length].copy()
            new = rng.integers(0, 2048, (2, 1, H, T, HD)).astype(np.float16)
            oracle[ci][i][:, :, :, p0:p0 + T] = new

            def run(kc=kc, vc=vc, p0=p0, exp=exp, new=new, i=i):
                checks.append((i, np.array_equal(kc[:, :, :p0], exp[0])
                               and np.array_equal(vc[:, :, :p0], exp[1])))
                kc[:, :, p0:p0 + len(new[0][0][0])] = new[0]
                vc[:, :, p0:p0 + len(new[0][0][0])] = new[1]
            compute.enqueue(run)
            s.release(i)
        s.end_pass()
        c.length += T
    st = s.stats()
    stager.close()
    return checks, caches, oracle, st, shuttle


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_layers,streamed,n_slots", [(8, (1, 3, 5, 7), 3), (6, tuple(range(6)), 3),
                                                       (5, (0, 4), 3)])
def test_kv_shuttle_every_compute_sees_its_rows(tmp_path, seed, n_layers, streamed, n_slots):
    checks, caches, oracle, st, shuttle = _kv_drive(tmp_path, n_layers, streamed, n_slots, seed)
    assert len(checks) == 9 * n_layers and all(ok for _, ok in checks), checks
    for c, o in zip(caches, oracle):      # the host holds every cached row of every shuttled layer
        for i in streamed:
            assert np.array_equal(c.k[i][:, :, :c.length], o[i][0][:, :, :c.length])
            assert np.array_equal(c.v[i][:, :, :c.length], o[i][1][:, :, :c.length])
    row = 2 * H * HD * 2                  # bytes of one token's K and V in one layer
    assert st["kv_bytes_down"] == shuttle.bytes_down == len(streamed) * row * (5 + 6 + 1 + 1 + 7 + 1
                                                                              + 3 + 2 + 1)
    assert st["kv_bytes_up"] == shuttle.bytes_up > 0
    assert st["bytes_streamed"] == st["uploads"] * 4096 + st["kv_bytes_up"] + st["kv_bytes_down"]
    if len(streamed) <= n_slots:          # cached slots: the KV goes up only on a cache switch
        assert st["kv_bytes_up"] == len(streamed) * row * (13 + 7)   # A at 13, B at 7


def test_streaming_line_shows_the_kv_shuttle():
    from aircupy.console import streaming_line
    base = {"passes": 2, "bytes_streamed": 2**30, "pcie_gbps": 50.0, "overlap": 1.0, "stall_s": 0.0}
    assert "KV" not in streaming_line({"streaming": base})
    line = streaming_line({"streaming": dict(base, kv_bytes_up=3 << 20, kv_bytes_down=1 << 19)})
    assert line.endswith(" | KV shuttled 3.0 MiB up, 0.5 MiB down")

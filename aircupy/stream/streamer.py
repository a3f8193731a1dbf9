"""The layer streamer: file windows -> pinned host buffers -> device slots, overlapped with compute.

    streamer = LayerStreamer(schedule, windows, slots, fill, stager, compute_stream, cuda=cupy.cuda)
    streamer.begin_pass(kv=None)        # kv: the pass's KV shuttle (cuda/shuttle.PassKV) or None
    for i in range(n_layers):
        slot = streamer.acquire(i)      # None: resident; else the compute stream now waits for the
        ...run layer i on slots[slot]   #   upload that filled the slot
        streamer.release(i)             # compute-done event of the slot; later uploads wait on it
    streamer.end_pass()                 # uploads for the next pass are already queued here

Three engines run at once: reader threads (Stager) preadv windows into pinned host buffers N steps
ahead of the uploads; a dedicated copy stream uploads a window into its slot (`fill`: raw bytes ->
device staging -> repack into the slot's packed layout) once the compute that last used the slot is
done; the compute stream waits only for the upload of the layer it is about to run. The order comes
from SlotSchedule (stream/schedule.py); this class only turns it into events, copies and reads.

KV shuttle (a `kv` object given to begin_pass): the KV of a streamed layer rides up with its
weights into the KV slot paired with its weight slot, and its new rows go back after its compute,
both on the copy stream. kv.up(layer, slot, copy) for step g is issued right after g's weight
upload when that falls in g's own pass (the pass's first position is known only then); the steps
whose weights were uploaded during the previous pass (the first N of a pass, or every step of a
cached schedule) get theirs at begin_pass. The compute of g waits for an event recorded after its
up (recorded even when nothing is copied: it also orders the compute after the previous user's
download). kv.down(layer, slot, copy) is issued at release: the copy stream waits for the
compute-done event, then copies the new rows; that precedes, in the copy stream's order, every later
upload into the slot (which waits for the same event) and the next up of the layer's rows.

A host buffer goes back to the Stager with `ready = upload_done.synchronize`, so it is refilled only
after its DMA finished. Reads run `lookahead` steps ahead of uploads; with n_buffers = slots + 2 the
Stager recycles the buffer of an upload two steps behind the newest one, so the host rarely blocks
while the GPU has nothing queued.

CUDA is injected (the streams, events and the `cuda` module passed in): this module imports no cupy,
and tests/helpers/fake_streams.py runs it on the CPU.
"""
from __future__ import annotations

import threading
import time
from collections import deque

from aircupy.stream.schedule import Compute, SlotSchedule, Upload


class LayerStreamer:
    def __init__(self, schedule: SlotSchedule, windows: dict[int, tuple[int, int]], slots: list,
                 fill, stager, compute_stream, copy_stream=None, lookahead: int | None = None, *,
                 cuda):
        """windows: layer -> (file offset, nbytes); slots: device uint8 blocks; fill(layer,
        host_view uint8 (nbytes,), slot_block, stream) enqueues the upload of one window and returns
        None, or an event that completes the slot when work outside `stream` finishes it (repacks).
        cuda: the module providing Stream, Event, get_elapsed_time (cupy.cuda from the CUDA model;
        tests pass a simulator of streams and events)."""
        self._cuda = cuda
        self.sched, self.windows, self.slots, self.fill = schedule, windows, slots, fill
        self.stager = stager
        self.compute = compute_stream
        self.copy = copy_stream or cuda.Stream(non_blocking=True)
        self.lookahead = schedule.n_slots if lookahead is None else lookahead
        self._reset()
        self.totals = dict(passes=0, **_figures())
        self.last_pass: dict = {}
        self._timings: deque = deque()    # (pass, kind, nbytes, ev_a, ev_b) awaiting harvest
        self._open: dict = {}             # pass -> figures of a pass not yet finished
        self._lock = threading.Lock()     # stats() may come from another thread (server metrics)
        self.host_issue_s = 0.0           # host time spent issuing uploads (incl. waits for reads)

    def _reset(self) -> None:
        self._pass = 0
        self._actions: deque = deque()
        self._tickets: dict = {}          # g -> Stager ticket
        self._next_read = 0
        self._upload_done: dict = {}      # g -> event
        self._compute_done: dict = {}     # g -> event
        self._pass_start = None
        self._kv = None                   # the open pass's KV shuttle (None: KV stays in VRAM)
        self._kv_ready: dict = {}         # g -> event after the up of step g's KV

    def _event(self):
        return self._cuda.Event()         # timing enabled: stats read elapsed times

    # -- reads -----------------------------------------------------------------------------------
    def _submit_read(self, g: int):
        layer = self.sched.layer_of(g)
        off, n = self.windows[layer]
        t = self.stager.submit(off, n, key=layer)
        self._tickets[g] = t
        return t

    def _read_ahead(self, g: int) -> None:
        """Keep disk reads `lookahead` steps ahead of upload step g."""
        self._next_read = max(self._next_read, g + 1)
        while self._next_read <= g + self.lookahead and self.sched.needs_upload(self._next_read):
            self._submit_read(self._next_read)
            self._next_read += 1

    # -- actions ---------------------------------------------------------------------------------
    def _issue_upload(self, u: Upload) -> None:
        t0 = time.perf_counter()
        t = self._tickets.pop(u.g, None) or self._submit_read(u.g)
        self._next_read = max(self._next_read, u.g + 1)
        host = self.stager.wait(t)
        if u.after is not None:
            done = self._compute_done.pop(u.after, None)
            if done is not None:          # None after an abort: the streams were synchronized
                self.copy.wait_event(done)
        a, b = self._event(), self._event()
        a.record(self.copy)
        slot_done = self.fill(u.layer, host, self.slots[u.slot], self.copy)
        b.record(self.copy)
        # fill may finish the slot on another stream (repacks) and return that event; the host
        # buffer is free once the copy stream's DMAs are done (b).
        self._upload_done[u.g] = slot_done if slot_done is not None else b
        self.stager.release(t, ready=b.synchronize)
        self._timings.append((self.sched.pass_of(u.g), "upload", host.nbytes, a, b))
        if self._kv is not None and self.sched.pass_of(u.g) == self._pass:
            self._kv_up(u.g)
        self._read_ahead(u.g)
        self.host_issue_s += time.perf_counter() - t0

    def _drain_uploads(self) -> None:
        while self._actions and isinstance(self._actions[0], Upload):
            self._issue_upload(self._actions.popleft())

    def _kv_up(self, g: int) -> None:
        """Enqueue the KV up of step g on the copy stream and the event its compute waits for."""
        a, b = self._event(), self._event()
        a.record(self.copy)
        n = self._kv.up(self.sched.layer_of(g), self.sched.slot_of(g), self.copy)
        b.record(self.copy)
        self._kv_ready[g] = b
        if n:
            self._timings.append((self._pass, "kv_up", n, a, b))

    def begin_pass(self, kv=None) -> None:
        """kv: this pass's KV shuttle (see the module doc), or None when the KV stays in VRAM."""
        with self._lock:
            self._harvest()
        if self._pass >= 1 and hasattr(self.stager, "start_tier"):
            # The first pass (a cold start's) is done and its token out: the Stager may now pin
            # its RAM tier (deferred: pinning holds a driver lock the first pass would queue on).
            self.stager.start_tier()
        self._actions = deque(self.sched.pass_actions(self._pass))
        self._pass_start = self._event()
        self._pass_start.record(self.compute)
        self._kv = kv
        if kv is not None and self.sched.S:
            # Steps whose weights were uploaded during the previous pass (or stay cached): their
            # KV goes up now, the first moment this pass's positions are known.
            due = {a.g for a in self._actions if isinstance(a, Upload)}
            for g in range(self._pass * self.sched.S, (self._pass + 1) * self.sched.S):
                if g not in due:
                    self._kv_up(g)

    def acquire(self, layer: int) -> int | None:
        """Issue the uploads due before `layer`; make the compute stream wait for its weights."""
        self._drain_uploads()
        act = self._actions[0]
        assert isinstance(act, Compute) and act.layer == layer, (act, layer)
        if act.slot is None:
            return None
        up = self._upload_done.pop(act.g, None)
        kv = self._kv_ready.pop(act.g, None)
        if up is not None or kv is not None:   # both None: weights cached, KV in VRAM
            a, b = self._event(), self._event()
            a.record(self.compute)
            for ev in (up, kv):
                if ev is not None:
                    self.compute.wait_event(ev)
            b.record(self.compute)
            self._timings.append((self._pass, "stall", 0, a, b))
        return act.slot

    def release(self, layer: int) -> None:
        act = self._actions.popleft()
        assert isinstance(act, Compute) and act.layer == layer, (act, layer)
        if act.slot is None or (self.sched.cached and self._kv is None):
            return
        ev = self._event()
        ev.record(self.compute)
        if not self.sched.cached:
            self._compute_done[act.g] = ev
        if self._kv is not None:         # the new KV rows go home once the compute wrote them
            self.copy.wait_event(ev)
            a, b = self._event(), self._event()
            a.record(self.copy)
            n = self._kv.down(layer, act.slot, self.copy)
            b.record(self.copy)
            if n:
                self._timings.append((self._pass, "kv_down", n, a, b))

    def end_pass(self) -> None:
        """Issue the trailing uploads (the next pass's first layers) and close the pass."""
        self._drain_uploads()
        assert not self._actions, self._actions
        end = self._event()
        end.record(self.compute)
        self._timings.append((self._pass, "pass", 0, self._pass_start, end))
        self._pass += 1
        self._kv = None

    def abort(self) -> None:
        """After an exception inside a pass: wait for both streams, give every host buffer back and
        start over with the prologue (slot contents are no longer trusted)."""
        self.compute.synchronize()
        self.copy.synchronize()
        for t in self._tickets.values():
            self.stager.wait(t)
            self.stager.release(t)
        with self._lock:
            self._timings.clear()
            self._open.clear()
        self._reset()

    # -- stats -----------------------------------------------------------------------------------
    def _harvest(self) -> None:
        """Fold finished event pairs into the totals; a pass's figures close with its end event.
        Entries are in issue order, so every upload and stall of pass p precedes p's end entry
        (uploads issued during pass p for pass p + 1 are counted for p + 1)."""
        while self._timings and self._timings[0][4].done:
            p, kind, n, a, b = self._timings.popleft()
            dt = self._cuda.get_elapsed_time(a, b) / 1e3
            d = self._open.setdefault(p, _figures(pass_index=p))
            # KV copies count as bytes streamed and copy-stream busy time, not as uploads
            keys, vals = {"upload": (("bytes_streamed", "uploads", "upload_s"), (n, 1, dt)),
                          "kv_up": (("bytes_streamed", "kv_bytes_up", "upload_s"), (n, n, dt)),
                          "kv_down": (("bytes_streamed", "kv_bytes_down", "upload_s"), (n, n, dt)),
                          "stall": (("stall_s",), (dt,)), "pass": (("pass_s",), (dt,))}[kind]
            for k, v in zip(keys, vals):
                d[k] += v
                self.totals[k] += v
            if kind == "pass":
                self.totals["passes"] += 1
                self.last_pass = _rates(self._open.pop(p))

    def stats(self) -> dict:
        """Cumulative and last-pass figures; synchronizes both streams so every event is final."""
        self.compute.synchronize()
        self.copy.synchronize()
        with self._lock:
            self._harvest()
        s = self.stager.stats
        out = _rates(dict(self.totals))
        out.update(disk_bytes_read=s.bytes_read, disk_gbps=s.read_gbps, ram_tier_hits=s.ram_tier_hits,
                   ram_tier_bytes=s.ram_tier_bytes, ram_tier_capacity=self.stager.ram_tier_capacity,
                   host_read_wait_s=s.wait_s,
                   host_issue_s=self.host_issue_s, last_pass=self.last_pass)
        return out


def _figures(**extra) -> dict:
    return dict(extra, bytes_streamed=0, uploads=0, kv_bytes_up=0, kv_bytes_down=0,
                upload_s=0.0, stall_s=0.0, pass_s=0.0)


def _rates(d: dict) -> dict:
    """Add pcie_gbps (bytes over upload time on the copy stream, repack included) and overlap (the
    share of upload time hidden behind compute: 1 - stall / upload)."""
    d["pcie_gbps"] = d["bytes_streamed"] / d["upload_s"] / 1e9 if d["upload_s"] > 0 else 0.0
    d["overlap"] = max(0.0, 1.0 - d["stall_s"] / d["upload_s"]) if d["upload_s"] > 0 else 1.0
    return d

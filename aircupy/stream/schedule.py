"""Which streamed layer goes into which slot when, and what waits on what: a pure function.

    sched = SlotSchedule(n_layers=8, streamed=(1, 3, 5, 7), n_slots=3)
    for act in sched.pass_actions(p):   # host issue order of forward pass p
        Upload(g, layer, slot, after)   # fill `slot` with `layer` on the copy stream, once the compute
                                        # of streamed step `after` (the slot's previous user) is done
        Compute(layer, slot, g)         # run `layer`; a streamed one (slot not None) first waits for
                                        # the upload that filled its slot

Streamed steps are numbered globally over passes: g = pass * S + k for the k-th streamed layer of a
pass (S = len(streamed)), so the pipeline runs on across pass boundaries: the last layers of pass p
free the slots into which the first layers of pass p + 1 are uploaded while pass p's head, sampling
and host work run. Step g uses slot g mod N, and its upload is issued right after the compute of step
g - N (the slot's previous user) has been issued: the earliest moment its dependency exists, which
keeps all N slots busy (one computing, N - 1 filled or filling).

When S <= N every streamed layer owns a slot: it is uploaded in pass 0 only and stays there (the
schedule is then "cached" and later passes issue no uploads).

Pure Python: the streamer (stream/streamer.py) turns these actions into cupy events and copies; the
tests check the invariants on the action lists without a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Upload:
    g: int                 # global streamed step this upload feeds
    layer: int
    slot: int
    after: int | None      # step whose compute must finish before the slot is overwritten


@dataclass(frozen=True)
class Compute:
    layer: int
    slot: int | None       # None: a resident layer
    g: int | None          # global streamed step (None when resident)


class SlotSchedule:
    def __init__(self, n_layers: int, streamed, n_slots: int):
        streamed = tuple(sorted(int(i) for i in streamed))
        if any(not 0 <= i < n_layers for i in streamed) or len(set(streamed)) != len(streamed):
            raise ValueError(f"streamed layers {streamed} must be distinct indices below {n_layers}")
        if streamed and n_slots < 1:
            raise ValueError("streaming needs at least one slot")
        self.n_layers = n_layers
        self.streamed = streamed
        self.S = len(streamed)
        self.n_slots = n_slots
        self.n_used = min(n_slots, self.S)            # slots that ever hold a layer
        self.cached = self.S <= n_slots               # every streamed layer keeps its own slot
        self._index = {layer: k for k, layer in enumerate(streamed)}

    def layer_of(self, g: int) -> int:
        return self.streamed[g % self.S]

    def slot_of(self, g: int) -> int:
        return g % self.n_used

    def pass_of(self, g: int) -> int:
        return g // self.S

    def upload(self, g: int) -> Upload:
        prev = g - self.n_used
        return Upload(g, self.layer_of(g), self.slot_of(g), prev if prev >= 0 else None)

    def needs_upload(self, g: int) -> bool:
        """Step g's weights must be copied (not already in its slot from an earlier pass)."""
        return not self.cached or g < self.S

    def pass_actions(self, p: int) -> list:
        """Host issue order of pass p (p = 0 after start-up or after an abort)."""
        acts: list = []
        base = p * self.S
        if p == 0:  # prologue: fill every slot before the first layer
            acts += [self.upload(g) for g in range(self.n_used)]
        for i in range(self.n_layers):
            k = self._index.get(i)
            if k is None:
                acts.append(Compute(i, None, None))
                continue
            g = base + k
            acts.append(Compute(i, self.slot_of(g), g))
            if not self.cached:  # the slot just used is next filled by step g + N
                acts.append(self.upload(g + self.n_used))
        return acts

"""llama.cpp at the same VRAM budget as aircupy: the largest -ngl whose measured device memory fits.

The same-layer comparison gives llama-bench aircupy's resident layer count. A user with a 24 GB card
asks a different question: what does each engine do within 24 GB? llama.cpp holds its CUDA context,
the offloaded layers, their KV cache and its compute buffers on the device; how much depends on -ngl,
the context and the batch sizes, so it is measured, not computed:

    probe(ngl) -> Probe       one short llama-bench run at -ngl (the timed run's largest prompt, its
                              flags, one rep), its process's peak device memory sampled while it ran
    search_ngl(probe, budget, max_ngl, start) -> NglSearch

The search assumes peak memory grows with -ngl (each offloaded layer adds its weights and KV). It
brackets the answer between an -ngl that fits (lo) and one that does not (hi), starting from `start`
(aircupy's resident count: the answer is usually near it), and then guesses by linear interpolation
of the two peaks (probing the guess and its neighbour), falling back to the midpoint whenever a step
did not halve the bracket; so a near-linear memory curve costs 4-6 probes, and any monotone one at
most about 2 log2(max_ngl) + a few.
A run that fails (e.g. out of device memory) does not fit; a run whose memory could not be read
stops the search (nothing can be chosen honestly).
-ngl counts the repeating layers; max_ngl = n_layers + 1 also offloads the output head.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Probe:
    ngl: int
    peak_bytes: int | None     # the run's peak device memory; None: not measured
    ok: bool                   # the run finished (rc 0)
    note: str = ""

    def fits(self, budget: int) -> bool:
        return self.ok and self.peak_bytes is not None and self.peak_bytes <= budget


@dataclass
class NglSearch:
    budget_bytes: int
    max_ngl: int
    ngl: int | None = None              # the largest -ngl that fits; None: none does (or unmeasured)
    probes: list[Probe] = field(default_factory=list)   # in the order they ran
    note: str = ""

    @property
    def chosen(self) -> Probe | None:
        return next((p for p in self.probes if p.ngl == self.ngl), None)

    def to_dict(self) -> dict:
        """The record's form: budget, choice, its peak, and every probe as [ngl, peak_bytes, ok]."""
        c = self.chosen
        return {"budget_bytes": self.budget_bytes, "max_ngl": self.max_ngl, "ngl": self.ngl,
                "peak_bytes": c.peak_bytes if c else None, "note": self.note,
                "probes": [[p.ngl, p.peak_bytes, p.ok] for p in self.probes]}


class _Unmeasured(Exception):
    pass


def search_ngl(probe: Callable[[int], Probe], budget: int, max_ngl: int,
               start: int | None = None) -> NglSearch:
    """The largest -ngl in [0, max_ngl] whose probe fits `budget` (see the module doc)."""
    out = NglSearch(int(budget), int(max_ngl))
    seen: dict[int, Probe] = {}

    def fits(n: int) -> bool:
        if n not in seen:
            p = probe(n)
            seen[n] = p
            out.probes.append(p)
            if p.ok and p.peak_bytes is None:
                raise _Unmeasured(f"-ngl {n}: the run's device memory could not be read")
        return seen[n].fits(budget)

    try:
        s = min(max(0 if start is None else int(start), 0), max_ngl)
        if fits(s):
            lo = s
            if s == max_ngl or fits(max_ngl):
                out.ngl = max_ngl
                out.note = "every layer and the head fit"
                return out
            hi = max_ngl
        else:
            hi = s
            if s == 0 or not fits(0):
                out.note = "not even -ngl 0 fits the budget"
                return out
            lo = 0
        halve_next = False
        while hi - lo > 1:
            width = hi - lo
            p_lo, p_hi = seen[lo].peak_bytes, seen[hi].peak_bytes
            if not halve_next and seen[hi].ok and p_hi is not None and p_hi > p_lo:
                # Linear interpolation lands on the answer or next to it on a near-linear curve:
                # its neighbour toward the open side is probed at once to close the bracket there.
                g = min(max(lo + int((budget - p_lo) * (hi - lo) // (p_hi - p_lo)), lo + 1), hi - 1)
                if fits(g):
                    lo = g
                    if g + 1 < hi:
                        lo, hi = (g + 1, hi) if fits(g + 1) else (lo, g + 1)
                else:
                    hi = g
                    if g - 1 > lo:
                        lo, hi = (g - 1, hi) if fits(g - 1) else (lo, g - 1)
            else:
                g = (lo + hi) // 2
                lo, hi = (g, hi) if fits(g) else (lo, g)
            halve_next = (hi - lo) * 2 > width        # that step did not halve the bracket
        out.ngl = lo
        out.note = f"-ngl {lo} fits, {hi} does not"
    except _Unmeasured as e:
        out.ngl, out.note = None, str(e)
    return out

"""Scenarios of issue 7, and their expansion: budget -> bytes -> make_plan -> resident layers -> -ngl.

A budget is one of
    "resident"   the whole model in VRAM (CudaModel, decode graph-replayed; llama.cpp -ngl 99);
    "P%"         P percent of the layer weights resident: budget = the exact device pool with
                 0 resident layers (globals + buffers + scratch + every layer's KV + the streaming
                 slots and staging) + round(P/100 x n_layers) x the largest layer block, so 0%
                 keeps no layer, 50% half of them and 100% every one;
    "24GiB"      an absolute budget (a 24 GB card holds 24 GiB), planned as it comes;
    "0layers"    N resident layers forced (n_resident=N), budget = the exact pool they need.
The layer split aircupy runs is the exact pool's (StreamPlacement.choose, the streamed model's own
rule, KV in VRAM); llama.cpp gets -ngl = that
number of resident layers (it offloads the last N repeating layers and keeps the output head on
the CPU unless N exceeds the layer count: the head is the one placement difference), and HF
accelerate gets max_memory = the same budget bytes.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str          # "smollm2" or "PRESET:TYPE" (bench.harness.models)
    budget: str         # see module doc
    n_gen: int          # decode steps timed (fewer where a step streams tens of GB)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("smollm2-resident", "smollm2", "resident", 128),
    Scenario("8b-q4_0-0pct", "llama3-8b:Q4_0", "0%", 16),
    Scenario("8b-q4_0-25pct", "llama3-8b:Q4_0", "25%", 16),
    Scenario("8b-q4_0-50pct", "llama3-8b:Q4_0", "50%", 32),
    Scenario("8b-q4_0-100pct", "llama3-8b:Q4_0", "100%", 128),
    # the type mix real Q4_K_M files carry (synth/mixes.py), at the same split as the Q4_0 row above
    Scenario("8b-q4_k_m-50pct", "llama3-8b:Q4_K_M", "50%", 32),
    Scenario("70b-q4_0-24gib", "llama-70b:Q4_0", "24GiB", 8),
    Scenario("70b-q4_0-0layers", "llama-70b:Q4_0", "0layers", 4),
)


def select(patterns: str | None) -> list[Scenario]:
    """Comma-separated names or shell patterns ("8b-*,smollm2-resident"); None or "all": every one."""
    if not patterns or patterns == "all":
        return list(SCENARIOS)
    out = []
    for pat in (p.strip() for p in patterns.split(",") if p.strip()):
        hit = [s for s in SCENARIOS if fnmatch.fnmatchcase(s.name, pat)]
        if not hit:
            known = ", ".join(s.name for s in SCENARIOS)
            raise ValueError(f"no scenario matches {pat!r}; known: {known}")
        out += [s for s in hit if s not in out]
    return out


@dataclass(frozen=True)
class Placement:
    scenario: Scenario
    n_layers: int
    n_resident: int
    budget_bytes: int | None     # None: whole model resident, no budget
    ngl: int                     # llama.cpp -ngl
    model_bytes: int             # file size
    plan: dict | None            # the planner's placement, summarised (None when resident)
    note: str = ""

    @property
    def resident(self) -> bool:
        return self.n_resident == self.n_layers


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*(GiB|GB|MiB|MB)\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 24GiB, 16GB)")
    scale = {"GiB": GiB, "GB": 10**9, "MiB": 1 << 20, "MB": 10**6}[m.group(2)]
    return int(float(m.group(1)) * scale)


def expand(s: Scenario, g, n_ctx: int, prefill_chunk: int = 512) -> Placement:
    """The placement of scenario `s` on model `g` (GGUFFile or models.virtual_gguf).

    Budgets and resident counts come from the planner the CUDA model uses (cuda/placement.py, KV in
    VRAM), so aircupy runs within the stated budget and llama.cpp gets the same layer count: "P%" =
    the pool with 0 resident layers + round(P/100 x n_layers) x the largest layer block; "Nlayers" =
    the pool with N resident layers; an absolute budget = as given. A budget bounds the CUDA context
    and libraries too: the computed ones add the assumed context and the reserve (the model measures
    its context and may keep a layer fewer where the real one is larger; records carry its count)."""
    from aircupy.config import ModelConfig
    from aircupy.cuda.memory import OUTSIDE_RESERVE
    from aircupy.cuda.placement import ASSUMED_CONTEXT, Footprint, PlacementSettings, place, resident_set

    c = ModelConfig.from_gguf(g)
    L = c.n_layers
    if s.budget == "resident":
        return Placement(s, L, L, None, 99, g.file_size, None, "all layers and the head on the GPU")
    fp = Footprint.of(g, c, n_ctx, prefill_chunk)
    outside = ASSUMED_CONTEXT + OUTSIDE_RESERVE
    floor = fp.pool_plan((), False, 3).total + outside     # every layer streamed, KV in VRAM
    note = ""
    if s.budget.endswith("%"):
        pct = float(s.budget[:-1])
        budget = floor + round(pct / 100 * L) * max(lay.nbytes for lay in fp.layer_ls)
    elif s.budget.endswith("layers"):
        want = int(s.budget[:-len("layers")])
        budget = fp.pool_plan(resident_set(L, want), False, 3).total + outside
        note = f"{want} resident layers forced; budget = the exact pool they need"
    else:
        budget = parse_bytes(s.budget)
    p = place(fp, budget, PlacementSettings(kv_shuttle=False, outside_bytes=outside))
    n_res = len(p.resident_layers)
    if s.budget.endswith("layers") and n_res < int(s.budget[:-len("layers")]):
        raise AssertionError(f"{s.name}: the pool keeps {n_res} layers at {budget} B")
    summary = {"pool_bytes": p.vram_bytes, "resident_layers": list(p.resident_layers),
               "slots": p.slots, "kv_placement": p.kv_placement,
               "bytes_streamed_per_pass": p.bytes_streamed_per_pass, "pcie_bound_s": p.pcie_bound_s}
    ngl = 99 if n_res == L else n_res
    return Placement(s, L, n_res, budget, ngl, g.file_size, summary, note)

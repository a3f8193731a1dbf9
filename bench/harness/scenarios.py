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
    plan: dict | None            # make_plan(...).to_dict() summary (None when resident)
    note: str = ""

    @property
    def resident(self) -> bool:
        return self.n_resident == self.n_layers


def minimum_budget(manifest, config, settings, kv_in_vram: bool = False) -> int:
    """The smallest budget make_plan accepts: globals + workspace + slots x (slot + one layer's KV),
    the KV of streamed layers shuttling; kv_in_vram=True: with every layer's KV in VRAM instead
    (StreamedCudaModel's choice at such a budget: the shuttle would move more bytes per pass
    than the layers it frees room for), which is what "0%" means.
    Mirrors make_plan's arithmetic (tests hold the two together)."""
    from aircupy.cuda.plan import kv_layer_bytes, workspace_bytes

    def up(n):
        return -(-n // 256) * 256
    globals_b = sum(up(c.tensor_bytes) for c in manifest.globals)
    kv = kv_layer_bytes(config, settings)
    kv_total = manifest.n_layers * kv if kv_in_vram else settings.slots * kv
    return (globals_b + workspace_bytes(config, manifest, settings)
            + settings.slots * up(manifest.max_layer_bytes) + kv_total)


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*(GiB|GB|MiB|MB)\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 24GiB, 16GB)")
    scale = {"GiB": GiB, "GB": 10**9, "MiB": 1 << 20, "MB": 10**6}[m.group(2)]
    return int(float(m.group(1)) * scale)


def expand(s: Scenario, g, n_ctx: int, prefill_chunk: int = 512) -> Placement:
    """The placement of scenario `s` on model `g` (GGUFFile or models.virtual_gguf).

    Budgets and resident counts come from the exact device pool the streamed model allocates
    (model.stream_placement.StreamPlacement, KV in VRAM), so aircupy runs within the stated budget
    and llama.cpp gets the same layer count: "P%" = the pool with 0 resident layers + round(P/100 x
    n_layers) x the largest layer block; "0layers" = the pool with 0 resident layers; an absolute
    budget = as given. make_plan's view of the same budget (an estimate that errs high) is kept in
    `plan` for the record."""
    from aircupy.config import ModelConfig
    from aircupy.stream.manifest import build_manifest
    from aircupy.cuda.plan import DEFAULT_PCIE_GBPS, PlanError, PlanSettings, make_plan
    from aircupy.cuda.placement import StreamPlacement

    c = ModelConfig.from_gguf(g)
    L = c.n_layers
    if s.budget == "resident":
        return Placement(s, L, L, None, 99, g.file_size, None, "all layers and the head on the GPU")
    sp, _, layer_ls = StreamPlacement.for_model(g, c, n_ctx, prefill_chunk, 3)
    floor = sp.pool_plan((), False).total     # every streamed layer, KV in VRAM
    note = ""
    if s.budget.endswith("%"):
        pct = float(s.budget[:-1])
        budget = floor + round(pct / 100 * L) * max(lay.nbytes for lay in layer_ls)
    elif s.budget.endswith("layers"):
        want = int(s.budget[:-len("layers")])
        budget = sp.pool_plan(sp.resident_for(want), False).total
        note = f"{want} resident layers forced; budget = the exact pool they need"
    else:
        budget = parse_bytes(s.budget)
    resident, _ = sp.choose(budget, shuttle=False)
    n_res = len(resident)
    if s.budget.endswith("layers") and n_res < int(s.budget[:-len("layers")]):
        raise AssertionError(f"{s.name}: the pool keeps {n_res} layers at {budget} B")
    man = build_manifest(g)
    streamed_b = sum(man.layers[i].nbytes for i in range(L) if i not in set(resident))
    summary = {"pool_bytes": sp.pool_plan(resident, False).total if n_res < L else sp.total(L),
               "resident_layers": list(resident), "slots": 3 if n_res < L else 0,
               "kv_placement": "vram", "bytes_streamed_per_pass": streamed_b,
               "pcie_bound_s": streamed_b / (DEFAULT_PCIE_GBPS * 1e9)}
    try:   # make_plan's estimate of the same budget, for the record
        plan = make_plan(man, c, budget, PlanSettings(n_ctx=n_ctx, prefill_chunk=prefill_chunk))
        summary.update(plan_vram_bytes=plan.vram_bytes, plan_resident=len(plan.resident_layers))
    except PlanError as e:     # the estimate's floor can sit a little above the exact pool's
        summary["plan_error"] = str(e)
    ngl = 99 if n_res == L else n_res
    return Placement(s, L, n_res, budget, ngl, g.file_size, summary, note)

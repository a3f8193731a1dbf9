"""Scenarios of issue 7, and their expansion: budget -> bytes -> make_plan -> resident layers -> -ngl.

A budget is one of
    "resident"   the whole model in VRAM (CudaModel, decode graph-replayed; llama.cpp -ngl 99);
    "P%"         P percent of the layer weights resident: budget = the minimum working set with
                 0 resident layers (globals + workspace + every layer's KV + the streaming slots)
                 + round(P/100 x n_layers) x the largest layer window, so 0% keeps no layer,
                 50% half of them and 100% every one;
    "24GiB"      an absolute budget (a 24 GB card holds 24 GiB), planned as it comes;
    "0layers"    N resident layers forced (n_resident=N), budget = what the plan needs for them.
The layer split aircupy runs is the plan's (make_plan, loader/plan.py); llama.cpp gets -ngl = that
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
    from aircupy.loader.plan import kv_layer_bytes, workspace_bytes

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
    """The placement of scenario `s` on model `g` (GGUFFile or models.virtual_gguf)."""
    from aircupy.config import ModelConfig
    from aircupy.loader.manifest import build_manifest
    from aircupy.loader.plan import PlanSettings, make_plan

    c = ModelConfig.from_gguf(g)
    L = c.n_layers
    if s.budget == "resident":
        return Placement(s, L, L, None, 99, g.file_size, None, "all layers and the head on the GPU")
    man = build_manifest(g)
    st = PlanSettings(n_ctx=n_ctx, prefill_chunk=prefill_chunk)
    floor = minimum_budget(man, c, st, kv_in_vram=True)
    note = ""
    if s.budget.endswith("%"):
        pct = float(s.budget[:-1])
        budget = floor + round(pct / 100 * L) * -(-man.max_layer_bytes // 256) * 256
    elif s.budget.endswith("layers"):
        want = int(s.budget[:-len("layers")])
        budget = floor
        while len(make_plan(man, c, budget, st).resident_layers) < want:
            budget += man.max_layer_bytes       # one more layer's window per step
        note = f"{want} resident layers forced; budget = what the plan needs for them"
    else:
        budget = parse_bytes(s.budget)
    plan = make_plan(man, c, budget, st)
    n_res = len(plan.resident_layers)
    if s.budget.endswith("layers") and n_res != int(s.budget[:-len("layers")]):
        raise AssertionError(f"{s.name}: plan keeps {n_res} layers at {budget} B")
    summary = {k: plan.to_dict()[k] for k in (
        "vram_bytes", "slots", "slot_bytes", "kv_placement", "bytes_streamed_per_pass",
        "pcie_bound_s", "decode_bound_tok_s")}
    summary["resident_layers"] = list(plan.resident_layers)
    ngl = 99 if n_res == L else n_res
    return Placement(s, L, n_res, budget, ngl, g.file_size, summary, note)

"""The harness's two passes: plan every selected scenario (no GPU), then run aircupy and the peers on
each, collecting results as records.

Order per scenario: aircupy, then llama-bench at aircupy's layer count ("llama.cpp"), llama-bench at
the largest -ngl that fits the same budget ("llama.cpp@budget", bench/harness/budget_ngl.py), then
HF, one after the other in this process (the model is closed and freed before a peer starts, so a
peer sees the whole card).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from bench.harness.models import SMOLLM2, model_file, open_for_planning
from bench.harness.scenarios import Placement, Scenario, expand

PROMPTS = {"pp512": 512, "pp2048": 2048}
TTFT_PROMPT = 512


ENGINES = ("aircupy", "llama.cpp", "llama.cpp@budget", "hf")


def n_ctx_for(n_gen: int) -> int:
    return max([*PROMPTS.values(), TTFT_PROMPT]) + n_gen + 8


@dataclass
class Options:
    synth_dir: Path
    llama_bench: str | None
    hf: bool
    reps: int
    n_gen: int | None          # overrides every scenario's decode length
    engines: tuple[str, ...] = ENGINES   # which engines run; the others keep merged records


def plan_all(scenarios: list[Scenario], opt: Options) -> list[tuple[Placement, bool]]:
    """(placement, file exists) per scenario; a synthetic file not yet written is planned from its
    exact layout (models.virtual_gguf)."""
    out = []
    for s in scenarios:
        g, real = open_for_planning(s.model, opt.synth_dir)
        try:
            out.append((expand(s, g, n_ctx_for(opt.n_gen or s.n_gen)), real))
        finally:
            if real:
                g.close()
    return out


def describe(p: Placement, real: bool, opt: Options) -> str:
    """What a run would do for this placement, commands included (the --dry-run output)."""
    from bench.bench_resident import llama_bench_cmd
    s = p.scenario
    path = model_file(s.model, opt.synth_dir) or Path(f"<{s.model}>")
    n_gen = opt.n_gen or s.n_gen
    budget = "whole model" if p.budget_bytes is None else f"{p.budget_bytes / 2**30:.2f} GiB"
    lines = [f"{s.name}: {s.model} ({p.model_bytes / 1e9:.2f} GB), budget {budget} ({s.budget}) -> "
             f"{p.n_resident}/{p.n_layers} layers resident, llama.cpp -ngl {p.ngl}"]
    if not real:
        lines.append(f"  file: {path} (absent: `aircupy synth` writes it first)")
    if p.plan:
        lines.append(f"  pool: {p.plan['pool_bytes'] / 2**30:.2f} GiB, {p.plan['slots']} slots, "
                     f"{p.plan['bytes_streamed_per_pass'] / 1e9:.2f} GB streamed per pass, PCIe bound "
                     f"{p.plan['pcie_bound_s']:.3f} s/pass")
    kind = "CudaModel (resident)" if p.resident else f"CudaModel(n_resident={p.n_resident}, streamed)"
    lines.append(f"  aircupy: {kind}; prefill {list(PROMPTS.values())}, decode {n_gen}, TTFT "
                 f"{TTFT_PROMPT}, reps {opt.reps}")
    cmd = llama_bench_cmd(opt.llama_bench or "llama-bench", path, sorted(PROMPTS.values()), n_gen,
                          opt.reps, ngl=p.ngl)
    lines.append(f"  llama.cpp: {shlex.join(cmd)}" + ("" if opt.llama_bench else "  [no --llama-bench]"))
    if "llama.cpp@budget" in opt.engines and p.budget_bytes is not None:
        lines.append(f"  llama.cpp@budget: the largest -ngl in [0, {p.n_layers + 1}] whose measured peak "
                     f"(-p {max(PROMPTS.values())} -n 0 -r 1) fits {p.budget_bytes} B, searched from "
                     f"-ngl {min(p.ngl, p.n_layers + 1)}; then the command above at that -ngl")
    if opt.hf:
        mm = "free memory" if p.budget_bytes is None else str(p.budget_bytes)
        lines.append(f"  hf: bf16 {s.model.split(':')[0]} shape, accelerate max_memory={{0: {mm}}}")
    if p.note:
        lines.append(f"  note: {p.note}")
    return "\n".join(lines)


def peer_notes(opt: Options) -> dict[str, str | None]:
    """Why each peer won't run (None: it will)."""
    from bench.harness import hf_peer
    from bench.harness.peers import llama_bench_missing
    return {"llama.cpp": llama_bench_missing(opt.llama_bench),
            "hf": hf_peer.missing() if opt.hf else "HF transformers not run: --no-hf"}


def run_one(p: Placement, opt: Options, env: dict, pinned: float | None, argv_cmd: str,
            notes: dict) -> list[dict]:
    """Every engine on one placement -> records."""
    from bench.harness import hf_peer
    from bench.harness.measure import run_aircupy
    from bench.harness.peers import (
        BUDGET_ENGINE,
        aircupy_result,
        run_llama,
        run_llama_at_budget,
        skipped,
    )
    from bench.harness.records import to_records

    s = p.scenario
    n_gen = opt.n_gen or s.n_gen
    row = {"scenario": s.name, "model": s.model, "budget_bytes": p.budget_bytes,
           "n_resident": p.n_resident, "n_layers": p.n_layers, "ngl": p.ngl}
    path = model_file(s.model, opt.synth_dir, create=True)
    results = []
    if "aircupy" in opt.engines:
        try:
            raw = run_aircupy(path, p, PROMPTS, n_gen, TTFT_PROMPT, opt.reps)
            results.append(aircupy_result(raw, pinned, argv_cmd))
        except Exception as e:                    # one failing scenario must not lose the others
            results.append(skipped("aircupy", f"aircupy failed: {type(e).__name__}: {e}", argv_cmd))
    if "llama.cpp" in opt.engines:
        if notes["llama.cpp"]:
            results.append(skipped("llama.cpp", notes["llama.cpp"]))
        else:
            results.append(run_llama(opt.llama_bench, path, p, PROMPTS, n_gen, opt.reps))
    if BUDGET_ENGINE in opt.engines:
        if notes["llama.cpp"]:
            results.append(skipped(BUDGET_ENGINE, notes["llama.cpp"]))
        else:
            results.append(run_llama_at_budget(opt.llama_bench, path, p, PROMPTS, n_gen, opt.reps))
    if "hf" in opt.engines:
        if notes["hf"]:
            results.append(skipped("hf", notes["hf"]))
        else:
            preset = "smollm2-135m" if s.model == SMOLLM2 else s.model.split(":")[0]
            try:
                results.append(hf_peer.run_hf_limited(preset, p.budget_bytes, PROMPTS, n_gen, TTFT_PROMPT))
            except Exception as e:
                results.append(skipped("hf", f"HF failed: {type(e).__name__}: {e}"))
    return [rec for r in results for rec in to_records(row, r, env)]

"""Peers: llama.cpp's llama-bench at the plan's -ngl and at the same budget (and aircupy's own results
put in the same shape).

A result is one engine on one scenario:
    {"engine", "metrics": {name: value}, "command": str, "note": str, "extra": {...}}
Metric names (units in the name): prefill_512_tps, prefill_2048_tps, decode_tps, ttft_512_s,
pcie_prefill_GBps, pcie_decode_GBps, pcie_pinned_GBps, decode_overlap, bytes_per_pass_GB,
peak_vram_GB (the whole process: a peer's from the device's used-memory growth while it ran), and
for llama.cpp at the same budget (engine "llama.cpp@budget", budget_ngl.py) probe_peak_vram_GB, the
peak its -ngl search measured at the chosen -ngl. A metric an engine cannot report is left out, and
the note says why.
"""
from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

METRICS = ("prefill_512_tps", "prefill_2048_tps", "decode_tps", "ttft_512_s", "pcie_prefill_GBps",
           "pcie_decode_GBps", "pcie_pinned_GBps", "decode_overlap", "bytes_per_pass_GB", "peak_vram_GB",
           "probe_peak_vram_GB")


def llama_bench_missing(lb: str | None) -> str | None:
    """Why llama-bench cannot run (None when it can)."""
    if not lb:
        return "llama.cpp not run: no --llama-bench PATH given"
    p = Path(lb)
    if not p.is_file():
        return f"llama.cpp not run: {lb} does not exist"
    if not p.stat().st_mode & 0o111:
        return f"llama.cpp not run: {lb} is not executable"
    return None


def llama_metrics(rows: list[dict], prompts: dict[str, int]) -> dict:
    """parse_llama_bench rows -> metrics. TTFT = llama-bench's mean time of the pp512 test (prefill
    of 512 tokens; it samples nothing, so this is the prefill part of a time to first token)."""
    out = {}
    for row in rows:
        if row["n_prompt"] in prompts.values():
            out[f"prefill_{row['n_prompt']}_tps"] = row["avg_ts"]
            if row["n_prompt"] == 512 and row["avg_s"]:
                out["ttft_512_s"] = row["avg_s"]
        elif not row["n_prompt"] and row["n_gen"]:
            out["decode_tps"] = row["avg_ts"]
    return out


def peer_version(row: dict) -> str:
    """llama.cpp's version: its build commit and number when llama-bench knows them; a source tree
    without git history reports "unknown", and then AIRCUPY_PEER_VERSION (where the source came from,
    e.g. the llama-cpp-python release it was vendored in) says it."""
    import os
    commit, number = row.get("build_commit"), row.get("build_number")
    if commit and commit != "unknown":
        return f"{commit} (build {number})"
    return os.environ.get("AIRCUPY_PEER_VERSION") or f"unknown (build {number})"


@dataclass(frozen=True)
class Outcome:
    """One peer process: exit status (None: ran past its time limit), output, peak device memory."""
    rc: int | None
    stdout: str
    stderr: str
    peak_bytes: int | None


def run_measured(cmd: list[str], timeout: int) -> Outcome:
    """Run `cmd` with its device memory sampled (measure.VramPoller) until it exits."""
    from bench.harness.measure import VramPoller
    with VramPoller() as vp:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Outcome(None, "", "", vp.peak_bytes)
    return Outcome(r.returncode, r.stdout, r.stderr, vp.peak_bytes)


def run_llama(lb: str, path: Path, placement, prompts: dict[str, int], n_gen: int, reps: int,
              timeout: int = 580, ngl: int | None = None, runner=None) -> dict:
    """llama-bench on one scenario at -ngl `ngl` (default the placement's: aircupy's resident
    layers). runner: (cmd, timeout) -> Outcome; default run_measured (tests give a fake)."""
    from bench.bench_resident import llama_bench_cmd, parse_llama_bench

    cmd = llama_bench_cmd(lb, path, sorted(prompts.values()), n_gen, reps,
                          ngl=placement.ngl if ngl is None else ngl)
    res = {"engine": "llama.cpp", "command": shlex.join(cmd), "metrics": {}, "extra": {}}
    r = (runner or run_measured)(cmd, timeout)
    if r.rc is None:
        res["note"] = f"llama-bench ran past {timeout} s; no figures"
        return res
    if r.rc:
        res["note"] = f"llama-bench failed (rc {r.rc}): {r.stderr.strip()[-400:]}"
        return res
    rows = parse_llama_bench(r.stdout)
    res["metrics"] = llama_metrics(rows, prompts)
    if r.peak_bytes is not None:
        res["metrics"]["peak_vram_GB"] = round(r.peak_bytes / 1e9, 3)
    res["extra"] = {"build_commit": rows[0]["build_commit"] if rows else None,
                    "build_number": rows[0]["build_number"] if rows else None,
                    "gpu_info": rows[0]["gpu_info"] if rows else None,
                    "version": peer_version(rows[0] if rows else {}),
                    "flags": rows[0]["flags"] if rows else {}}
    res["note"] = ("-ngl = aircupy's resident layers; llama.cpp computes the other layers on the "
                   "CPU (no PCIe figure); peak VRAM: the device's used-memory growth while it ran")
    return res


BUDGET_ENGINE = "llama.cpp@budget"


def llama_probe(lb: str, path: Path, prompts: dict[str, int], timeout: int = 300, runner=None):
    """ngl -> budget_ngl.Probe: one llama-bench run of the timed run's longest prompt (its context
    and KV are the largest of the timed tests; decode's are smaller), one rep, the same flags."""
    from bench.bench_resident import llama_bench_cmd
    from bench.harness.budget_ngl import Probe

    def probe(ngl: int) -> Probe:
        cmd = llama_bench_cmd(lb, path, max(prompts.values()), 0, 1, ngl=ngl)
        r = (runner or run_measured)(cmd, timeout)
        why = "" if r.rc == 0 else ("timed out" if r.rc is None else f"rc {r.rc}: {r.stderr.strip()[-200:]}")
        print(f"    llama.cpp -ngl {ngl}: peak {r.peak_bytes} B {why}", flush=True)
        return Probe(ngl, r.peak_bytes, r.rc == 0, why)
    return probe


def run_llama_at_budget(lb: str, path: Path, placement, prompts: dict[str, int], n_gen: int,
                        reps: int, runner=None) -> dict:
    """llama-bench at the largest -ngl whose measured peak device memory fits the scenario's budget
    (budget_ngl.search_ngl, from aircupy's layer count up or down), then the timed run there."""
    from bench.harness.budget_ngl import search_ngl

    if placement.budget_bytes is None:
        return skipped(BUDGET_ENGINE, "no budget: the whole model is resident, so the same-layer run "
                                      "(-ngl 99) is the same-budget one")
    max_ngl = placement.n_layers + 1
    found = search_ngl(llama_probe(lb, path, prompts, runner=runner), placement.budget_bytes,
                       max_ngl, start=min(placement.ngl, max_ngl))
    budget_gb = placement.budget_bytes / 1e9
    if found.ngl is None:
        r = skipped(BUDGET_ENGINE, f"no -ngl fits the budget {budget_gb:.3f} GB: {found.note}")
        r["extra"] = {"ngl_search": found.to_dict()}
        return r
    res = run_llama(lb, path, placement, prompts, n_gen, reps, ngl=found.ngl, runner=runner)
    res["engine"] = BUDGET_ENGINE
    res["extra"].update(ngl=found.ngl, ngl_search=found.to_dict())
    probe_peak = found.chosen.peak_bytes
    res["metrics"]["probe_peak_vram_GB"] = round(probe_peak / 1e9, 3)
    if res["metrics"].get("prefill_512_tps") is not None or res["metrics"].get("decode_tps") is not None:
        res["note"] = (f"-ngl {found.ngl}: the largest whose measured peak ({probe_peak / 1e9:.3f} GB, "
                       f"pp{max(prompts.values())}) fits the budget {budget_gb:.3f} GB; "
                       f"{len(found.probes)} probes; {found.note}")
    return res


def aircupy_result(raw: dict, pinned_gbps: float | None, command: str) -> dict:
    """bench.harness.measure.run_aircupy's output -> a result."""
    m = {"prefill_512_tps": raw.get("pp512_tps"), "prefill_2048_tps": raw.get("pp2048_tps"),
         "decode_tps": raw.get("tg_tps"), "ttft_512_s": raw.get("ttft_s"),
         "pcie_prefill_GBps": raw.get("pp2048_pcie_GBps"), "pcie_decode_GBps": raw.get("tg_pcie_GBps"),
         "decode_overlap": raw.get("tg_overlap"), "bytes_per_pass_GB": raw.get("bytes_per_pass_GB"),
         "peak_vram_GB": round(raw["peak_vram_bytes"] / 1e9, 3) if "peak_vram_bytes" in raw else None}
    if m["pcie_decode_GBps"] is not None and pinned_gbps:
        m["pcie_pinned_GBps"] = round(pinned_gbps, 2)
    extra = {k: raw[k] for k in ("load_s", "n_resident", "allocation", "streamed_layers", "pool_GB",
                                 "disk_GBps", "ram_tier_hits", "tg_stall_s", "bench_s") if k in raw}
    note = raw.get("note") or ""
    if raw.get("tg_pcie_GBps") is None:
        note = (note + "; " if note else "") + "nothing streams: no PCIe figure"
    return {"engine": "aircupy", "metrics": {k: v for k, v in m.items() if v is not None},
            "command": command, "note": note, "extra": extra}


def skipped(engine: str, why: str, command: str = "") -> dict:
    return {"engine": engine, "metrics": {}, "command": command, "note": why, "extra": {}}

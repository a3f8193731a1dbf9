"""Peers: llama.cpp's llama-bench at the plan's -ngl (and aircupy's own results put in the same shape).

A result is one engine on one scenario:
    {"engine", "metrics": {name: value}, "command": str, "note": str, "extra": {...}}
Metric names (units in the name): prefill_512_tps, prefill_2048_tps, decode_tps, ttft_512_s,
pcie_prefill_GBps, pcie_decode_GBps, pcie_pinned_GBps, decode_overlap, bytes_per_pass_GB,
peak_vram_GB. A metric an engine cannot report is left out, and the note says why.
"""
from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

METRICS = ("prefill_512_tps", "prefill_2048_tps", "decode_tps", "ttft_512_s", "pcie_prefill_GBps",
           "pcie_decode_GBps", "pcie_pinned_GBps", "decode_overlap", "bytes_per_pass_GB", "peak_vram_GB")


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


def run_llama(lb: str, path: Path, placement, prompts: dict[str, int], n_gen: int, reps: int,
              timeout: int = 580) -> dict:
    from bench.bench_resident import llama_bench_cmd, parse_llama_bench
    from bench.harness.measure import VramPoller

    cmd = llama_bench_cmd(lb, path, sorted(prompts.values()), n_gen, reps, ngl=placement.ngl)
    res = {"engine": "llama.cpp", "command": shlex.join(cmd), "metrics": {}, "extra": {}}
    try:
        with VramPoller() as vp:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        res["note"] = f"llama-bench ran past {timeout} s; no figures"
        return res
    if r.returncode:
        res["note"] = f"llama-bench failed (rc {r.returncode}): {r.stderr.strip()[-400:]}"
        return res
    rows = parse_llama_bench(r.stdout)
    res["metrics"] = llama_metrics(rows, prompts)
    if vp.peak_bytes is not None:
        res["metrics"]["peak_vram_GB"] = round(vp.peak_bytes / 1e9, 3)
    res["extra"] = {"build_commit": rows[0]["build_commit"] if rows else None,
                    "build_number": rows[0]["build_number"] if rows else None,
                    "gpu_info": rows[0]["gpu_info"] if rows else None,
                    "version": peer_version(rows[0] if rows else {}),
                    "flags": rows[0]["flags"] if rows else {}}
    res["note"] = ("-ngl = aircupy's resident layers; llama.cpp computes the other layers on the "
                   "CPU (no PCIe figure); peak VRAM from nvidia-smi polling")
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

"""Results -> records (one per scenario x engine x metric) -> results.csv, results.json, results.md.

A record carries everything needed to read it alone: scenario, model, engine, metric, value, unit,
the placement (budget bytes, resident/total layers, -ngl), the card, driver, versions, date, the
exact command and a note. An engine that did not run on a scenario gets one record with metric
"not_run" and value None, whose note says why: a scenario not run says so.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from bench.harness.peers import METRICS

FIELDS = ("scenario", "model", "engine", "metric", "value", "unit", "budget_bytes", "n_resident",
          "n_layers", "ngl", "card", "driver", "cuda_runtime", "cupy", "python", "aircupy", "commit",
          "engine_version", "engine_flags", "date", "command", "note", "search")
ENV_KEYS = ("card", "driver", "cuda_runtime", "cupy", "python", "aircupy", "commit", "date")


def unit(metric: str) -> str:
    for suffix, u in (("_tps", "tokens/s"), ("_GBps", "GB/s"), ("_GB", "GB"), ("_s", "s")):
        if metric.endswith(suffix):
            return u
    return "ratio" if metric.endswith("overlap") else ""


def to_records(placement_row: dict, result: dict, env: dict) -> list[dict]:
    """placement_row: scenario, model, budget_bytes, n_resident, n_layers, ngl; result: peers.py."""
    base = {k: placement_row.get(k) for k in ("scenario", "model", "budget_bytes", "n_resident",
                                              "n_layers", "ngl")}
    base.update({k: env.get("gpu" if k == "card" else k) for k in ENV_KEYS})
    extra = result.get("extra", {})
    base.update(engine=result["engine"], command=result.get("command", ""), note=result.get("note", ""),
                engine_version=(extra.get("version") or extra.get("build_commit") or extra.get("transformers")
                                or env.get("commit")),
                engine_flags=json.dumps(extra["flags"], sort_keys=True) if extra.get("flags") else "")
    if result["engine"] == "aircupy" and "n_resident" in extra:
        base["n_resident"] = extra["n_resident"]      # what the model really kept (plan adjusted)
    if extra.get("ngl") is not None:                  # llama.cpp at the same budget: its own -ngl
        base["ngl"] = extra["ngl"]
        if base.get("n_layers") is not None:
            base["n_resident"] = min(int(extra["ngl"]), int(base["n_layers"]))
    base["search"] = json.dumps(extra["ngl_search"]) if extra.get("ngl_search") else ""
    metrics = result.get("metrics", {})
    if not metrics:
        return [dict(base, metric="not_run", value=None, unit="")]
    order = [m for m in METRICS if m in metrics] + sorted(set(metrics) - set(METRICS))
    return [dict(base, metric=m, value=metrics[m], unit=unit(m)) for m in order]


def write_csv(records: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in FIELDS})


def write_json(records: list[dict], path: Path, env: dict, argv: list[str], notes: list[str]) -> None:
    path.write_text(json.dumps({"environment": env, "argv": argv, "notes": notes,
                                "records": records}, indent=1))


def load_records(path: Path) -> list[dict]:
    return json.loads(Path(path).read_text())["records"]


def _fmt(v, metric: str) -> str:
    if v is None:
        return "-"
    if metric.endswith("_s"):
        return f"{v:.3f}"
    if metric.endswith("overlap"):
        return f"{v:.2f}"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"


TABLE = (("prefill_512_tps", "pp512 t/s"), ("prefill_2048_tps", "pp2048 t/s"), ("decode_tps", "decode t/s"),
         ("ttft_512_s", "TTFT 512 s"), ("pcie_decode_GBps", "PCIe GB/s (decode)"),
         ("pcie_pinned_GBps", "pinned bound GB/s"), ("peak_vram_GB", "peak VRAM GB"))


def markdown(records: list[dict], env: dict) -> str:
    """One row per scenario x engine, in the order the records came; a header naming the session."""
    lines = [f"Card: {env.get('gpu', '?')}, driver {env.get('driver', '?')}, CUDA runtime "
             f"{env.get('cuda_runtime', '?')}, cupy {env.get('cupy', '?')}, Python {env.get('python', '?')}, "
             f"aircupy {env.get('aircupy', '?')} at {env.get('commit', '?')}, {env.get('date', '?')}.", "",
             "| scenario | engine | budget GiB | layers on GPU | " + " | ".join(h for _, h in TABLE)
             + " | note |",
             "|---|---|---:|---:|" + "---:|" * len(TABLE) + "---|"]
    rows: dict[tuple, list[dict]] = {}
    for r in records:
        rows.setdefault((r["scenario"], r["engine"]), []).append(r)
    for (scn, eng), rs in rows.items():
        r0, vals = rs[0], {r["metric"]: r["value"] for r in rs}
        budget = "-" if r0.get("budget_bytes") in (None, "") else f"{int(r0['budget_bytes']) / 2**30:.2f}"
        layers = f"{r0.get('n_resident')}/{r0.get('n_layers')}"
        note = (r0.get("note") or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {scn} | {eng} | {budget} | {layers} | "
                     + " | ".join(_fmt(vals.get(m), m) for m, _ in TABLE) + f" | {note} |")
    compare = comparison_markdown(records)
    if compare:
        lines += ["", ("Same layers and same budget (peak = the process's device memory; llama.cpp's "
                       "-ngl at the same budget is the largest whose measured peak fits):"), "",
                  compare.rstrip("\n")]
    cmds = sorted({(r["engine"], r["command"]) for r in records if r.get("command")})
    if cmds:
        lines += ["", "Commands:", ""] + [f"    [{e}] {c}" for e, c in cmds]
    return "\n".join(lines) + "\n"


def _pair(vals: dict) -> str:
    return f"{_fmt(vals.get('prefill_512_tps'), 'prefill_512_tps')} / {_fmt(vals.get('decode_tps'), 'decode_tps')}"


def _cell(e: str, eng: dict, meta: dict) -> str:
    """Layers on the GPU (and -ngl) | pp512 / decode, peak GB of engine `e` in one scenario."""
    if e not in eng or "not_run" in eng[e]:
        return "- | not run"
    r0, v = meta[e], eng[e]
    ngl = f" (-ngl {r0['ngl']})" if e.startswith("llama") and r0.get("ngl") is not None else ""
    peak = _fmt(v.get("peak_vram_GB"), "peak_vram_GB")
    return f"{r0.get('n_resident')}/{r0.get('n_layers')}{ngl} | {_pair(v)}, {peak} GB"


def comparison_markdown(records: list[dict]) -> str:
    """One row per scenario with a budget: aircupy, llama.cpp at aircupy's layer count, and llama.cpp
    at the largest -ngl that fits the same budget (each: layers on the GPU, pp512 / decode t/s, peak
    device memory), as RESULTS.md's tables show them. Empty when no scenario has the same-budget run."""
    by: dict[str, dict[str, dict]] = {}
    meta: dict[str, dict] = {}
    for r in records:
        by.setdefault(r["scenario"], {}).setdefault(r["engine"], {})[r["metric"]] = r["value"]
        meta.setdefault(r["scenario"], {})[r["engine"]] = r
    rows = []
    for scn, eng in by.items():
        if "llama.cpp@budget" not in eng:
            continue
        m = meta[scn]
        b = m["llama.cpp@budget"].get("budget_bytes")
        budget = "-" if b in (None, "") else f"{int(b) / 2**30:.2f} GiB ({int(b) / 1e9:.3f} GB)"
        cells = " | ".join(_cell(e, eng, m) for e in ("aircupy", "llama.cpp", "llama.cpp@budget"))
        rows.append(f"| {scn} | {budget} | {cells} |")
    if not rows:
        return ""
    head = [("| scenario | budget | aircupy layers | aircupy pp512 / decode, peak | llama.cpp same layers "
             "| pp512 / decode, peak | llama.cpp same budget | pp512 / decode, peak |"),
            "|---|---|---:|---|---:|---|---:|---|"]
    return "\n".join(head + rows) + "\n"


def replace_scenario(records: list[dict], new: list[dict]) -> list[dict]:
    """`records` with the engines of `new` (one scenario's fresh records) replaced by `new`; the
    scenario's other engines (merged from an earlier run) stay."""
    if not new:
        return list(records)
    scenario, ran = new[0]["scenario"], {r["engine"] for r in new}
    return [r for r in records if r["scenario"] != scenario or r["engine"] not in ran] + list(new)

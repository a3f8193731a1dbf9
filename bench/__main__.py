"""python -m bench: aircupy against its peers on the issue-7 scenarios, one session, one card.

    python -m bench --out bench/results/run1 [--llama-bench PATH/llama-bench] [--scenarios 8b-*,smollm2-*]
        [--synth-dir /root/synth] [--reps 2] [--n-gen N] [--no-hf] [--engines aircupy,llama.cpp,llama.cpp@budget,hf]
        [--merge old/results.json] [--dry-run]

Writes into --out: results.csv and results.json (one record per scenario x engine x metric, with the
card, driver, versions, date and exact command), results.md (a table for bench/RESULTS.md) and PNG
plots (tokens/s against VRAM budget; achieved PCIe GB/s against the pinned bound measured at start).
--dry-run prints the plan (budgets, resident layers, -ngl, commands) and needs no GPU. --merge adds
the records of earlier runs (e.g. other scenarios run in another call) to the tables and plots.
Scenarios and budget semantics: bench/harness/scenarios.py; measurement: bench/bench_streaming.py.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from bench.harness import records as rec
from bench.harness.run import ENGINES, Options, describe, peer_notes, plan_all, run_one
from bench.harness.scenarios import SCENARIOS, select


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/latest"))
    ap.add_argument("--scenarios", default="all",
                    help="comma-separated names or patterns; known: " + ", ".join(s.name for s in SCENARIOS))
    ap.add_argument("--llama-bench", default=None, metavar="PATH")
    ap.add_argument("--synth-dir", type=Path, default=Path("/tmp/aircupy-synth"))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--n-gen", type=int, default=None, help="decode steps (default: per scenario)")
    ap.add_argument("--no-hf", action="store_true", help="leave the HF transformers peer out")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help="engines to run (comma-separated: aircupy, llama.cpp (aircupy's layer count), "
                         "llama.cpp@budget (the largest -ngl that fits the budget), hf); with --merge, "
                         "the other engines' merged records are kept")
    ap.add_argument("--merge", type=Path, action="append", default=[], metavar="RESULTS_JSON")
    ap.add_argument("--dry-run", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv)
    try:
        scenarios = select(a.scenarios)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engines = tuple(e.strip() for e in a.engines.split(",") if e.strip())
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        print(f"error: --engines takes some of {', '.join(ENGINES)}; got {a.engines!r}", file=sys.stderr)
        return 2
    if a.no_hf:
        engines = tuple(e for e in engines if e != "hf")
    opt = Options(a.synth_dir, a.llama_bench, "hf" in engines, a.reps, a.n_gen, engines)
    placements = plan_all(scenarios, opt)
    notes = peer_notes(opt)
    if a.dry_run:
        for p, real in placements:
            print(describe(p, real, opt))
        for why in notes.values():
            if why:
                print(f"note: {why}")
        return 0

    from bench.harness.measure import environment, pinned_h2d_gbps
    from bench.harness.plots import plot
    env = environment()
    pinned = pinned_h2d_gbps()
    cmd = shlex.join(["python", "-m", "bench", *argv])
    print(f"{env}\npinned host->device: {pinned:.2f} GB/s", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    records = [r for m in a.merge for r in rec.load_records(m)]
    run_notes = [f"pinned host->device measured at start: {pinned:.2f} GB/s (256 MiB copies)"]
    run_notes += [w for w in notes.values() if w]
    for p, _ in placements:
        print(describe(p, True, opt), flush=True)
        new = run_one(p, opt, env, pinned, cmd, notes)
        records = rec.replace_scenario(records, new)
        for r in new:
            print(f"  {r['engine']:10} {r['metric']:18} {r['value']}  {r['note'][:80]}", flush=True)
        write_all(records, a.out, env, argv, run_notes, plots=False)   # keep partial results
    files, note = write_all(records, a.out, env, argv, run_notes, plots=True, plot_fn=plot)
    print(f"wrote {a.out}: results.csv, results.json, results.md" +
          "".join(f", {f.name}" for f in files) + (f" ({note})" if note else ""))
    return 0


def write_all(records, out: Path, env, argv, notes, plots: bool, plot_fn=None):
    files, note = ([], None)
    if plots:
        files, note = plot_fn(records, out)
        if note:
            notes = notes + [note]
    rec.write_csv(records, out / "results.csv")
    rec.write_json(records, out / "results.json", env, argv, notes)
    (out / "results.md").write_text(rec.markdown(records, env) + "".join(f"\nNote: {n}\n" for n in notes))
    return files, note


if __name__ == "__main__":
    sys.exit(main())

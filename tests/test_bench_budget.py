"""llama.cpp at the same VRAM budget (bench/harness/budget_ngl.py, peers.run_llama_at_budget) on the
CPU: the -ngl search against brute force, its record, and the table beside the same-layer column,
with a fake llama-bench runner (a memory model instead of a GPU)."""
from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest

from bench.harness import records
from bench.harness.budget_ngl import Probe, search_ngl
from bench.harness.peers import BUDGET_ENGINE, Outcome, run_llama_at_budget
from bench.harness.run import PROMPTS
from bench.harness.scenarios import Placement, Scenario

SAMPLE = Path(__file__).resolve().parent / "data" / "llama_bench_sample.json"
ENV = {"gpu": "NVIDIA H200", "driver": "580.159.04", "commit": "abc1234"}


def counting(peaks: list[int], fail_from: int | None = None):
    """A probe over a table of peaks (index = -ngl); from `fail_from` on the run dies unmeasured
    (out of memory). Returns (probe, calls)."""
    calls = []

    def probe(ngl):
        calls.append(ngl)
        if fail_from is not None and ngl >= fail_from:
            return Probe(ngl, None, False, "rc 1: CUDA error: out of memory")
        return Probe(ngl, peaks[ngl], True)
    return probe, calls


def brute(peaks, budget, fail_from=None):
    ok = [n for n, p in enumerate(peaks) if p <= budget and (fail_from is None or n < fail_from)]
    return max(ok) if ok else None


def test_linear_memory_is_found_in_a_few_probes():
    # 70B-like: 600 MB context and buffers, 0.45 GB per layer, the head 1.1 GB at -ngl 81
    peaks = [600_000_000 + 450_000_000 * n for n in range(81)] + [600_000_000 + 450_000_000 * 80
                                                                 + 1_100_000_000]
    for budget in np.linspace(500e6, 40e9, 57).astype(int):
        for start in (0, 17, 43, 81):
            probe, calls = counting(peaks)
            got = search_ngl(probe, int(budget), 81, start=start)
            assert got.ngl == brute(peaks, budget), (budget, start)
            assert len(calls) == len(set(calls)) <= 6, (budget, start, calls)   # never twice
            if got.ngl is not None:
                assert got.chosen.peak_bytes == peaks[got.ngl] <= budget


@pytest.mark.parametrize("seed", range(30))
def test_any_monotone_memory_curve_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 120))
    steps = rng.choice([0, 1, 5, 300], size=n + 1, p=[0.2, 0.3, 0.3, 0.2]) * 1_000_000
    peaks = list(np.cumsum(steps) + 500_000_000)
    budget = int(rng.integers(400_000_000, peaks[-1] + 100_000_000))
    fail_from = int(rng.integers(1, n + 2)) if seed % 3 == 0 else None
    probe, calls = counting(peaks, fail_from)
    got = search_ngl(probe, budget, n, start=int(rng.integers(0, n + 1)))
    assert got.ngl == brute(peaks, budget, fail_from)
    assert len(calls) <= 2 * math.ceil(math.log2(n + 1)) + 4
    assert [p.ngl for p in got.probes] == calls


def test_edges_nothing_fits_everything_fits_and_unmeasured():
    probe, _ = counting([900, 1000, 1100])
    none = search_ngl(probe, 800, 2, start=1)
    assert none.ngl is None and none.chosen is None and "not even -ngl 0" in none.note
    probe, calls = counting([900, 1000, 1100])
    every = search_ngl(probe, 5000, 2, start=1)
    assert every.ngl == 2 and calls == [1, 2] and "every layer" in every.note
    blind = search_ngl(lambda n: Probe(n, None, True), 10**9, 40, start=20)
    assert blind.ngl is None and "could not be read" in blind.note
    d = every.to_dict()
    assert d == {"budget_bytes": 5000, "max_ngl": 2, "ngl": 2, "peak_bytes": 1100,
                 "note": every.note, "probes": [[1, 1000, True], [2, 1100, True]]}


class FakeLlamaBench:
    """(cmd, timeout) -> Outcome like peers.run_measured: llama-bench's JSON for the asked tests, and
    a peak of context + per-layer bytes x -ngl (the head's extra at -ngl > n_layers)."""

    def __init__(self, n_layers, base=700_000_000, per_layer=400_000_000, head=1_000_000_000):
        self.n_layers, self.base, self.per_layer, self.head = n_layers, base, per_layer, head
        self.cmds = []

    def peak(self, ngl):
        return self.base + self.per_layer * min(ngl, self.n_layers) + \
            (self.head if ngl > self.n_layers else 0)

    def __call__(self, cmd, timeout):
        self.cmds.append(cmd)
        ngl = int(cmd[cmd.index("-ngl") + 1])
        prompts = [int(x) for x in cmd[cmd.index("-p") + 1].split(",")]
        n_gen = int(cmd[cmd.index("-n") + 1])
        rows = json.loads(SAMPLE.read_text())
        out = [dict(rows[0], n_prompt=p, n_gen=0, n_gpu_layers=ngl, avg_ts=100.0 + ngl) for p in prompts]
        if n_gen:
            out.append(dict(rows[0], n_prompt=0, n_gen=n_gen, n_gpu_layers=ngl, avg_ts=2.0 + ngl / 10))
        return Outcome(0, json.dumps(out), "", self.peak(ngl))


def _placement(budget, n_res=10, n_layers=32):
    scn = Scenario("8b-q4_0-x", "llama3-8b:Q4_0", "x", 16)
    return Placement(scn, n_layers, n_res, budget, n_res, 4_500_000_000, {"pool_bytes": 1})


def test_run_llama_at_budget_with_a_fake_runner_records_its_choice():
    fake = FakeLlamaBench(32)
    budget = 8_000_000_000                                 # 700 MB + 18 x 400 MB = 7.9 GB fits
    res = run_llama_at_budget("lb", Path("m.gguf"), _placement(budget), PROMPTS, 16, 2, runner=fake)
    assert res["engine"] == BUDGET_ENGINE and res["extra"]["ngl"] == 18
    search = res["extra"]["ngl_search"]
    assert search["ngl"] == 18 and search["peak_bytes"] == fake.peak(18) <= budget < fake.peak(19)
    probes = [c for c in fake.cmds if c[c.index("-n") + 1] == "0"]
    assert [int(c[c.index("-ngl") + 1]) for c in probes] == [p[0] for p in search["probes"]]
    assert all(c[c.index("-p") + 1] == "2048" and c[c.index("-r") + 1] == "1" for c in probes)
    timed = fake.cmds[-1]
    assert timed[timed.index("-ngl") + 1] == "18" and timed[timed.index("-p") + 1] == "512,2048"
    assert res["command"] == shlex.join(timed)
    m = res["metrics"]
    assert m["prefill_512_tps"] == 118.0 and m["decode_tps"] == pytest.approx(3.8)
    assert m["peak_vram_GB"] == m["probe_peak_vram_GB"] == round(fake.peak(18) / 1e9, 3)
    assert "-ngl 18: the largest whose measured peak (7.900 GB, pp2048) fits the budget 8.000 GB" \
        in res["note"]

    rec = records.to_records({"scenario": "8b-q4_0-x", "model": "m", "budget_bytes": budget,
                              "n_resident": 10, "n_layers": 32, "ngl": 10}, res, ENV)
    assert {(r["ngl"], r["n_resident"]) for r in rec} == {(18, 18)}
    assert json.loads(rec[0]["search"])["probes"] == search["probes"]
    assert {r["metric"] for r in rec} >= {"prefill_512_tps", "decode_tps", "peak_vram_GB",
                                          "probe_peak_vram_GB"}


def test_no_budget_and_no_fit_are_not_run_records_that_say_why():
    fake = FakeLlamaBench(32)
    res = run_llama_at_budget("lb", Path("m.gguf"), _placement(None), PROMPTS, 16, 2, runner=fake)
    assert res["metrics"] == {} and "whole model is resident" in res["note"] and fake.cmds == []
    res = run_llama_at_budget("lb", Path("m.gguf"), _placement(500_000_000), PROMPTS, 16, 2, runner=fake)
    assert res["metrics"] == {} and "no -ngl fits the budget 0.500 GB" in res["note"]
    rec = records.to_records({"scenario": "s", "model": "m", "n_layers": 32}, res, ENV)
    assert [r["metric"] for r in rec] == ["not_run"] and json.loads(rec[0]["search"])["ngl"] is None


def test_the_same_budget_column_beside_the_same_layer_one():
    budget = 8_000_000_000
    row = {"scenario": "8b-q4_0-x", "model": "llama3-8b:Q4_0", "budget_bytes": budget, "n_resident": 10,
           "n_layers": 32, "ngl": 10}
    ours = {"engine": "aircupy", "metrics": {"prefill_512_tps": 9000.0, "decode_tps": 40.0,
                                             "peak_vram_GB": 7.95}, "extra": {"n_resident": 17}}
    same_layers = {"engine": "llama.cpp", "metrics": {"prefill_512_tps": 700.0, "decode_tps": 20.0,
                                                      "peak_vram_GB": 4.6}, "extra": {}}
    fake = FakeLlamaBench(32)
    at_budget = run_llama_at_budget("lb", Path("m.gguf"), _placement(budget), PROMPTS, 16, 2, runner=fake)
    recs = [r for res in (ours, same_layers, at_budget) for r in records.to_records(row, res, ENV)]
    table = records.comparison_markdown(recs)
    assert table.splitlines()[0].startswith("| scenario | budget | aircupy layers |")
    assert ("| 8b-q4_0-x | 7.45 GiB (8.000 GB) | 17/32 | 9,000 / 40.00, 7.95 GB | 10/32 (-ngl 10) | "
            "700 / 20.00, 4.60 GB | 18/32 (-ngl 18) | 118 / 3.80, 7.90 GB |") in table
    md = records.markdown(recs, ENV)
    assert "| 8b-q4_0-x | llama.cpp@budget | 7.45 | 18/32 |" in md and table.rstrip() in md
    assert records.comparison_markdown(recs[:-len(records.to_records(row, at_budget, ENV))]) == ""


def test_run_one_runs_both_llama_columns(monkeypatch, smollm2_path, tmp_path):
    """The harness's llama.cpp engines on a real (SmolLM2) placement at half its layers, llama-bench
    replaced by the fake runner: the same-layer row at aircupy's count, the same-budget row at its
    own -ngl."""
    from bench.harness import peers
    from bench.harness.run import Options, plan_all, run_one
    monkeypatch.setenv("AIRCUPY_SMOLLM2_GGUF", str(smollm2_path))
    lb = tmp_path / "llama-bench"
    lb.write_text("#!/bin/sh\nexit 1\n")
    lb.chmod(0o755)
    opt = Options(tmp_path, str(lb), False, 1, 8, ("llama.cpp", BUDGET_ENGINE))
    (p, _), = plan_all([Scenario("smol-half", "smollm2", "50%", 8)], opt)
    fake = FakeLlamaBench(30, base=500_000_000, per_layer=5_000_000, head=60_000_000)
    monkeypatch.setattr(peers, "run_measured", fake)
    recs = run_one(p, opt, ENV, None, "python -m bench", {"llama.cpp": None, "hf": "off"})
    ngl = {r["engine"]: r["ngl"] for r in recs}
    assert ngl["llama.cpp"] == p.ngl == p.n_resident
    want = max(n for n in range(32) if fake.peak(n) <= p.budget_bytes)
    assert ngl[BUDGET_ENGINE] == want

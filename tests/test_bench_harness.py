"""The `python -m bench` harness on the CPU: scenario expansion, llama-bench JSON, writers, plots,
--dry-run and absent peers. No GPU, no llama-bench, no synthetic model written (planned from layout)."""
from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import main as bench_main
from bench.bench_resident import llama_bench_cmd, parse_llama_bench
from bench.harness import hf_peer, records
from bench.harness.models import virtual_gguf
from bench.harness.peers import llama_bench_missing, llama_metrics
from bench.harness.run import PROMPTS, Options, n_ctx_for, run_one
from bench.harness.scenarios import SCENARIOS, Scenario, expand, select
from tests.helpers.missing import missing

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "llama_bench_sample.json"


@pytest.fixture(scope="module")
def g8b():
    return virtual_gguf("llama3-8b:Q4_0")


def by_name(name):
    return next(s for s in SCENARIOS if s.name == name)


def test_virtual_layout_matches_the_8b_file_size(g8b):
    # RESULTS.md: `aircupy synth --arch llama3-8b --type Q4_0` writes 4.52 GB.
    assert round(g8b.file_size / 1e9, 2) == 4.52
    assert g8b.tensors["blk.31.ffn_down.weight"].shape == (4096, 14336)


def test_percent_budgets_expand_to_layer_splits_and_ngl(g8b):
    n_ctx = n_ctx_for(16)
    got = {pct: expand(by_name(f"8b-q4_0-{pct}pct"), g8b, n_ctx) for pct in (0, 25, 50, 100)}
    assert [got[p].n_resident for p in (0, 25, 50, 100)] == [0, 8, 16, 32]
    assert [got[p].ngl for p in (0, 25, 50, 100)] == [0, 8, 16, 99]   # all resident: head too
    budgets = [got[p].budget_bytes for p in (0, 25, 50, 100)]
    assert budgets == sorted(budgets) and budgets[0] > 0
    for p in got.values():   # the exact pool (and the plan) fit the budget; streamed bytes fall
        assert p.plan["pool_bytes"] <= p.budget_bytes
    assert got[0].plan["bytes_streamed_per_pass"] > got[50].plan["bytes_streamed_per_pass"] > 0
    assert got[100].plan["bytes_streamed_per_pass"] == 0 and got[100].resident


def test_70b_scenarios_absolute_and_forced_layers():
    g = virtual_gguf("llama-70b:Q4_0")
    at24 = expand(by_name("70b-q4_0-24gib"), g, n_ctx_for(8))
    assert at24.budget_bytes == 24 << 30 and at24.plan["pool_bytes"] <= 24 << 30
    assert 30 < at24.n_resident < 80 and at24.ngl == at24.n_resident
    zero = expand(by_name("70b-q4_0-0layers"), g, n_ctx_for(4))
    assert (zero.n_resident, zero.ngl, zero.n_layers) == (0, 0, 80)
    assert zero.budget_bytes < at24.budget_bytes


def test_select_patterns():
    assert [s.name for s in select("8b-q4_0-*")] == [f"8b-q4_0-{p}pct" for p in (0, 25, 50, 100)]
    assert [s.name for s in select("8b-q4_k_m-*")] == ["8b-q4_k_m-50pct"]
    assert len(select(None)) == len(SCENARIOS) == 8
    with pytest.raises(ValueError, match="no scenario matches"):
        select("13b-*")


def test_peer_records_carry_llama_cpp_version_and_flags(monkeypatch):
    from bench.harness.peers import peer_version
    from bench.harness.records import to_records
    rows = parse_llama_bench(SAMPLE.read_text())
    flags = rows[0]["flags"]
    assert {"n_batch", "n_ubatch", "n_threads", "flash_attn", "use_mmap", "n_gpu_layers"} <= set(flags)
    monkeypatch.setenv("AIRCUPY_PEER_VERSION", "llama-cpp-python 0.3.36 vendored source")
    unknown = dict(rows[0], build_commit="unknown")
    assert peer_version(unknown) == "llama-cpp-python 0.3.36 vendored source"
    assert peer_version(dict(rows[0], build_commit="abc1234", build_number=42)) == "abc1234 (build 42)"
    result = {"engine": "llama.cpp", "metrics": {"prefill_512_tps": 1.0},
              "extra": {"version": peer_version(unknown), "flags": flags}}
    rec = to_records({"scenario": "s", "model": "m"}, result, {"gpu": "card"})[0]
    assert rec["engine_version"] == "llama-cpp-python 0.3.36 vendored source"
    assert json.loads(rec["engine_flags"])["n_batch"] == flags["n_batch"]


def test_parse_llama_bench_json_and_metrics():
    rows = parse_llama_bench(SAMPLE.read_text())
    assert [r["test"] for r in rows] == ["pp512", "pp2048", "tg32"]
    assert rows[0]["avg_ts"] == pytest.approx(1390.05) and rows[0]["n_gpu_layers"] == 16
    assert rows[0]["build_commit"] == "a1b2c3d4" and rows[2]["n_gen"] == 32
    m = llama_metrics(rows, PROMPTS)
    assert m == {"prefill_512_tps": 1390.05, "prefill_2048_tps": 1310.72, "decode_tps": 26.6,
                 "ttft_512_s": pytest.approx(0.368331)}
    cmd = llama_bench_cmd("lb", Path("m.gguf"), [512, 2048], 32, 2, ngl=16)
    assert cmd[cmd.index("-p") + 1] == "512,2048" and cmd[cmd.index("-ngl") + 1] == "16"


ENV = {"gpu": "NVIDIA H100 80GB HBM3", "driver": "580.1", "cuda_runtime": 13000, "cupy": "14.2.0",
       "python": "3.12.3", "aircupy": "0.1.0", "commit": "abc1234", "date": "2026-11-28T10:00:00+00:00"}


def synthetic_records():
    row = {"scenario": "8b-q4_0-50pct", "model": "llama3-8b:Q4_0", "budget_bytes": 3 << 30,
           "n_resident": 16, "n_layers": 32, "ngl": 16}
    ours = {"engine": "aircupy", "command": "python -m bench", "note": "",
            "metrics": {"prefill_512_tps": 5000.0, "decode_tps": 30.5, "pcie_decode_GBps": 48.2,
                        "pcie_pinned_GBps": 53.1, "ttft_512_s": 0.11}, "extra": {"n_resident": 15}}
    llama = {"engine": "llama.cpp", "command": "llama-bench -ngl 16", "note": "",
             "metrics": {"prefill_512_tps": 1390.05, "decode_tps": 26.6}, "extra": {"build_commit": "a1b2"}}
    full = dict(row, scenario="8b-q4_0-100pct", budget_bytes=5 << 30, n_resident=32, ngl=99)
    resident = {"engine": "aircupy", "command": "python -m bench", "note": "",
                "metrics": {"prefill_512_tps": 11000.0, "decode_tps": 225.0}, "extra": {}}
    hf = {"engine": "hf", "metrics": {}, "command": "", "note": "HF transformers not run: no torch"}
    out = []
    for r, res in ((row, ours), (row, llama), (row, hf), (full, resident)):
        out += records.to_records(r, res, ENV)
    return out


def test_records_and_writers(tmp_path):
    recs = synthetic_records()
    assert len(recs) == 5 + 2 + 1 + 2
    nr = [r for r in recs if r["metric"] == "not_run"]
    assert len(nr) == 1 and nr[0]["engine"] == "hf" and "no torch" in nr[0]["note"]
    ours = [r for r in recs if r["engine"] == "aircupy" and r["scenario"] == "8b-q4_0-50pct"]
    assert {r["n_resident"] for r in ours} == {15}         # the model's real count wins
    assert {r["card"] for r in recs} == {"NVIDIA H100 80GB HBM3"}
    records.write_csv(recs, tmp_path / "r.csv")
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == len(recs) and rows[0]["driver"] == "580.1"
    dec = next(r for r in rows if r["engine"] == "llama.cpp" and r["metric"] == "decode_tps")
    assert float(dec["value"]) == 26.6 and dec["unit"] == "tokens/s" and dec["engine_version"] == "a1b2"
    records.write_json(recs, tmp_path / "r.json", ENV, ["--x"], ["a note"])
    assert records.load_records(tmp_path / "r.json") == json.loads(json.dumps(recs))
    md = records.markdown(recs, ENV)
    assert "NVIDIA H100 80GB HBM3, driver 580.1" in md
    assert "| 8b-q4_0-50pct | llama.cpp | 3.00 | 16/32 | 1,390 | - | 26.60 |" in md
    assert "| 8b-q4_0-50pct | aircupy | 3.00 | 15/32 | 5,000 | - | 30.50 | 0.110 | 48.20 | 53.10 |" in md
    assert "HF transformers not run: no torch" in md and "[llama.cpp] llama-bench -ngl 16" in md


def test_plots(tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        missing("matplotlib", 'pip install -e ".[test]"')
    from bench.harness.plots import plot
    files, note = plot(synthetic_records(), tmp_path)
    assert note is None
    assert sorted(f.name for f in files) == ["pcie_vs_bound.png", "tps_vs_budget_llama3-8b_Q4_0.png"]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000


def test_dry_run_without_gpu_or_peers(capsys):
    rc = bench_main(["--dry-run", "--no-hf", "--scenarios", "8b-q4_0-50pct,smollm2-resident",
                     "--synth-dir", "/nonexistent", "--llama-bench", "/nonexistent/llama-bench"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "16/32 layers resident, llama.cpp -ngl 16" in out and "-p 512,2048 -n 32 -ngl 16" in out
    assert "30/30 layers resident, llama.cpp -ngl 99" in out
    assert "note: llama.cpp not run: /nonexistent/llama-bench does not exist" in out
    assert "note: HF transformers not run: --no-hf" in out


def test_entry_point_dry_run_subprocess():
    r = subprocess.run([sys.executable, "-m", "bench", "--dry-run", "--no-hf", "--scenarios", "70b-*"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "0/80 layers resident, llama.cpp -ngl 0" in r.stdout and "no --llama-bench" in r.stdout


def test_absent_peers_are_skipped_with_a_note(monkeypatch, smollm2_path, tmp_path):
    assert llama_bench_missing(None) == "llama.cpp not run: no --llama-bench PATH given"
    exe = tmp_path / "llama-bench"
    exe.write_text("#!/bin/sh\n")
    assert "not executable" in llama_bench_missing(str(exe))
    monkeypatch.setattr(hf_peer.importlib.util, "find_spec", lambda name: None)
    assert hf_peer.missing() == "HF transformers not run: torch is not importable"
    monkeypatch.setenv("AIRCUPY_SMOLLM2_GGUF", str(smollm2_path))
    scn = Scenario("smollm2-resident", "smollm2", "resident", 4)
    from bench.harness.run import plan_all
    opt = Options(tmp_path, None, True, 1, None)
    (p, real), = plan_all([scn], opt)
    assert real and p.resident
    notes = {"llama.cpp": llama_bench_missing(None), "hf": hf_peer.missing()}
    recs = run_one(p, opt, ENV, None, "python -m bench", notes)
    by_engine = {r["engine"]: r for r in recs if r["metric"] == "not_run"}
    assert by_engine["llama.cpp"]["note"] == notes["llama.cpp"]
    assert by_engine["hf"]["note"] == notes["hf"]
    try:
        import cupy  # noqa: F401
    except ImportError:      # no GPU stack here: aircupy itself says why it did not run
        assert by_engine["aircupy"]["note"].startswith("aircupy failed:")


def test_engines_option_runs_only_those_and_merge_keeps_the_rest(monkeypatch, smollm2_path, tmp_path):
    """--engines llama.cpp: one engine's records; replace_scenario keeps the others' merged ones."""
    from bench.harness.records import replace_scenario
    from bench.harness.run import plan_all
    monkeypatch.setenv("AIRCUPY_SMOLLM2_GGUF", str(smollm2_path))
    scn = by_name("smollm2-resident")
    opt = Options(tmp_path, None, False, 1, None, ("llama.cpp",))
    (p, _), = plan_all([scn], opt)
    notes = {"llama.cpp": llama_bench_missing(None), "hf": "off"}
    new = run_one(p, opt, ENV, None, "python -m bench --engines llama.cpp", notes)
    assert {r["engine"] for r in new} == {"llama.cpp"}
    old = [dict(scenario=scn.name, engine=e, metric="decode_tps", value=1.0)
           for e in ("aircupy", "llama.cpp")] + [dict(scenario="other", engine="llama.cpp",
                                                      metric="decode_tps", value=2.0)]
    merged = replace_scenario(old, new)
    assert [r for r in merged if r["scenario"] == scn.name and r["engine"] == "aircupy"] == old[:1]
    assert [r for r in merged if r["scenario"] == scn.name and r["engine"] == "llama.cpp"] == new
    assert old[2] in merged


def test_engines_option_rejects_unknown_names():
    r = subprocess.run([sys.executable, "-m", "bench", "--dry-run", "--engines", "vllm"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--engines takes" in r.stderr


def test_hf_layers_on_gpu_reads_accelerates_device_map():
    from bench.harness.hf_peer import layers_on_gpu
    assert layers_on_gpu({"": 0}, 30) == 30                                   # whole model on the GPU
    assert layers_on_gpu({"model.embed_tokens": 0, "model.layers": "cpu", "lm_head": 0}, 4) == 0
    dmap = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.10": "cpu",
            "model.layers.2": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    assert layers_on_gpu(dmap, 3) == 2       # "model.layers.1" must not claim "model.layers.10"


def test_hf_peer_runs_in_a_child_with_a_time_limit(monkeypatch):
    slow = [sys.executable, "-c", "import time; time.sleep(30)"]
    monkeypatch.setattr(hf_peer, "_child_cmd", lambda args: slow)
    r = hf_peer.run_hf_limited("llama3-8b", 1 << 30, {"pp": 512}, 4, 512, timeout=0.5)
    assert r["engine"] == "hf" and r["metrics"] == {} and "ran past 0.5 s on llama3-8b" in r["note"]

    done = {"engine": "hf", "metrics": {"decode_tps": 1.5}, "command": "c", "note": "", "extra": {}}
    monkeypatch.setattr(hf_peer, "_child_cmd", lambda args: [
        sys.executable, "-c", f"print('noise'); print({json.dumps(json.dumps(done))})"])
    assert hf_peer.run_hf_limited("llama3-8b", None, {"pp": 512}, 4, 512, timeout=30) == done

    monkeypatch.setattr(hf_peer, "_child_cmd", lambda args: [
        sys.executable, "-c", "import sys; sys.exit('CUDA out of memory')"])
    r = hf_peer.run_hf_limited("llama3-8b", None, {"pp": 512}, 4, 512, timeout=30)
    assert r["metrics"] == {} and r["note"] == "HF failed (exit 1): CUDA out of memory"


def test_records_take_the_commit_from_aircupy_commit_where_set(monkeypatch):
    from bench.harness.measure import git_commit
    monkeypatch.setenv("AIRCUPY_COMMIT", "0bf97c0")
    assert git_commit() == "0bf97c0"
    monkeypatch.delenv("AIRCUPY_COMMIT")
    assert git_commit() != "0bf97c0"


def test_the_q4_k_m_scenario_plans_from_the_mix_layout():
    """8b-q4_k_m-50pct: a bigger file than Q4_0 (Q6_K head and layers), half its layers resident."""
    g = virtual_gguf("llama3-8b:Q4_K_M")
    p = expand(by_name("8b-q4_k_m-50pct"), g, n_ctx_for(32))
    assert p.n_resident == p.ngl == 16 and p.n_layers == 32
    assert g.file_size > virtual_gguf("llama3-8b:Q4_0").file_size
    assert g.tensors["output.weight"].ggml_type.name == "Q6_K"

"""`aircupy inspect`: the description of both real models, the human and JSON views, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from aircupy.cli import main
from aircupy.gguf.ggml import GGMLType
from aircupy.gguf.reader import GGUFFile
from aircupy.inspect import describe, describe_file, render_text, size_str, summarize_value
from tests.helpers.gguf_build import T, build_gguf

# What the model cards and ARCHITECTURE.md say about the two files.
EXPECTED = {
    "smollm2_path": dict(arch="llama", layers=30, vocab=49152, tok="gpt2", template=True, ctx=8192,
                         types={"Q4_1", "Q8_0", "F32"}),
    "gemma3_path": dict(arch="gemma3", layers=18, vocab=262144, tok="llama", template=False, ctx=32768,
                        types={"Q8_0", "Q5_0", "Q4_K", "Q6_K", "F32"}),
}


@pytest.fixture(scope="module", params=list(EXPECTED))
def model(request):
    path = request.getfixturevalue(request.param)
    return path, EXPECTED[request.param], describe_file(path)


def test_describe_real_models(model):
    path, want, d = model
    with GGUFFile(path) as g:
        tensors = list(g.tensors.values())
        assert d["architecture"] == want["arch"] and d["context_length"] == want["ctx"]
        assert d["parameters"] == sum(int(np.prod(t.shape)) for t in tensors)
        assert d["file"]["size"] == path.stat().st_size and d["file"]["n_tensors"] == len(tensors)
        assert d["tokenizer"]["model"] == want["tok"] and d["tokenizer"]["vocab_size"] == want["vocab"]
        assert d["chat_template"]["present"] is want["template"]
        mix = {m["type"]: m for m in d["quant_mix"]}
        assert set(mix) == want["types"]
        assert sum(m["bytes"] for m in mix.values()) == sum(t.nbytes for t in tensors) == d["file"]["data_bytes"]
        assert sum(m["tensors"] for m in mix.values()) == len(tensors)
        assert [L["index"] for L in d["layers"]] == list(range(want["layers"])) and d["n_layers"] == want["layers"]
        in_layers = sum(L["bytes"] for L in d["layers"])
        assert in_layers + sum(t["nbytes"] for t in d["other_tensors"]) == d["file"]["data_bytes"]
        assert {t["name"] for t in d["other_tensors"]} >= {"token_embd.weight", "output_norm.weight"}
        assert d["tensors"] == [{"name": t.name, "type": t.ggml_type.name, "shape": list(t.shape),
                                 "offset": t.offset, "nbytes": t.nbytes} for t in tensors]
    assert d["metadata"]["tokenizer.ggml.tokens"] == {"array": "string", "length": want["vocab"]}
    json.dumps(d, allow_nan=False)  # strictly JSON-able


def test_human_view(model):
    path, want, d = model
    text = render_text(d)
    assert text.splitlines()[0] == str(path)
    assert f"architecture    {want['arch']}" in text and f"context length  {want['ctx']}" in text
    assert f"{want['vocab']} tokens" in text and ("chat template   yes" if want["template"] else "no") in text
    assert f"layers: {want['layers']} blocks" in text and "blk.0 " in text and f"blk.{want['layers'] - 1} " in text
    for t in want["types"]:
        assert f"\n  {t} " in text


def test_summaries_and_sizes():
    assert summarize_value(np.arange(3, dtype=np.int32)) == [0, 1, 2]
    assert summarize_value(np.zeros(100, np.float32)) == {"array": "float32", "length": 100}
    assert summarize_value(["a"] * 17) == {"array": "string", "length": 17}
    assert summarize_value([[1]] * 20) == {"array": "array", "length": 20}
    assert summarize_value([np.array([1.5])]) == [[1.5]]
    assert summarize_value(float("nan")) == "nan" and summarize_value("x") == "x"
    assert (size_str(5), size_str(1536), size_str(3 << 30)) == ("5 B", "1.5 KiB", "3.0 GiB")


def test_describe_a_file_without_tokenizer_or_layers():
    g = GGUFFile.from_buffer(build_gguf({"general.architecture": "toy"}, [T("w", GGMLType.F16, (2, 3))]))
    d = describe(g)
    assert d["tokenizer"]["vocab_size"] is None and d["layers"] == [] and d["context_length"] is None
    assert d["quant_mix"] == [{"type": "F16", "tensors": 1, "bytes": 12, "parameters": 6}]
    text = render_text(d)
    assert "tokenizer       none" in text and "chat template   no" in text and "layers: 0 blocks" in text


def test_cli_human_and_json(smollm2_path):
    r = CliRunner().invoke(main, ["inspect", str(smollm2_path)])
    assert r.exit_code == 0, r.output
    assert "architecture    llama" in r.stdout and "Q4_1" in r.stdout
    r = CliRunner().invoke(main, ["inspect", str(smollm2_path), "--json"])
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    assert d["architecture"] == "llama" and len(d["tensors"]) == 272
    emb = next(t for t in d["tensors"] if t["name"] == "token_embd.weight")
    assert emb["type"] == "Q8_0" and emb["shape"] == [49152, 576] and emb["nbytes"] == 49152 * 576 // 32 * 34


def _bad_files(tmp_path, smollm2_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2_path.read_bytes()[:100_000])
    return {"missing": (tmp_path / "missing.gguf", "no such file"), "not gguf": (text, "not a GGUF file"),
            "truncated": (cut, "truncated"), "directory": (tmp_path, "cannot read")}


def test_cli_errors_are_one_line_exit_2(tmp_path, smollm2_path):
    for label, (path, match) in _bad_files(tmp_path, smollm2_path).items():
        r = CliRunner().invoke(main, ["inspect", str(path)])
        assert r.exit_code == 2, (label, r.output)
        assert r.stdout == "" and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), label
        assert match in r.stderr and "Traceback" not in r.stderr, (label, r.stderr)


def test_cli_subprocess(tmp_path, smollm2_path):
    bad = _bad_files(tmp_path, smollm2_path)
    for label in ("missing", "truncated"):
        p = subprocess.run([sys.executable, "-m", "aircupy", "inspect", str(bad[label][0]), "--json"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and p.stdout == "", label
        assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1 and bad[label][1] in p.stderr
    p = subprocess.run([sys.executable, "-m", "aircupy", "inspect", str(smollm2_path), "--json"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and json.loads(p.stdout)["tokenizer"]["vocab_size"] == 49152


# ---- the PCIe rate of the plan's decode bound: measured where a GPU is usable, else assumed --------

def _plan_text(path, budget, probe):
    from aircupy.inspect import PLAN_SECTIONS, describe_plan
    d = describe_plan(path, budget, n_ctx=256, host_ram_bytes=8 << 30, measure_pcie=probe)
    return d["plan"], render_text(d, PLAN_SECTIONS)


def test_inspect_states_the_measured_pcie_rate(smollm2_path):
    plan, text = _plan_text(smollm2_path, 1_000_000_000, lambda: 47.25)
    assert plan["streamed_layers"] and plan["pcie_rate_measured"] and plan["pcie_gbps"] == 47.25
    assert plan["pcie_bound_s"] == pytest.approx(plan["bytes_streamed_per_pass"] / 47.25e9)
    assert plan["decode_bound_tok_s"] == pytest.approx(1 / plan["pcie_bound_s"])
    assert "at 47 GB/s (measured here: pinned host-to-device copies) that is " \
           f"{plan['pcie_bound_s'] * 1e3:.1f} ms" in text
    assert "not measured" not in text


def test_inspect_says_assumed_when_nothing_was_measured(smollm2_path):
    from aircupy.cuda.placement import ASSUMED_PCIE_GBPS
    plan, text = _plan_text(smollm2_path, 1_000_000_000, lambda: None)
    assert not plan["pcie_rate_measured"] and plan["pcie_gbps"] == ASSUMED_PCIE_GBPS
    assert f"at {ASSUMED_PCIE_GBPS:.0f} GB/s (assumed, not measured here)" in text


def test_inspect_measures_nothing_when_nothing_streams(smollm2_path):
    def probe():
        raise AssertionError("a resident plan has no streaming bound to measure for")
    plan, text = _plan_text(smollm2_path, 20_000_000_000, probe)
    assert not plan["streamed_layers"] and "nothing streams" in text


def test_measure_pcie_gbps_best_of_the_copies_and_none_without_cuda(monkeypatch):
    from aircupy.cuda import backend, pcie
    monkeypatch.setattr(pcie, "pinned_h2d_seconds", lambda nbytes, reps: [0.010, 0.005, 0.008][:reps])
    monkeypatch.setattr(backend, "cuda_unavailable_reason", lambda: None)
    assert pcie.measure_pcie_gbps() == pytest.approx((256 << 20) / 0.005 / 1e9)   # the fastest copy
    assert pcie.measure_pcie_gbps(1 << 20, 2) == pytest.approx((1 << 20) / 0.005 / 1e9)

    def broken(nbytes, reps):
        raise RuntimeError("cudaErrorMemoryAllocation")
    monkeypatch.setattr(pcie, "pinned_h2d_seconds", broken)
    assert pcie.measure_pcie_gbps() is None                      # a failed measurement: assumed
    monkeypatch.setattr(backend, "cuda_unavailable_reason", lambda: "cupy cannot be imported")
    assert pcie.measure_pcie_gbps() is None                      # no GPU: nothing is copied

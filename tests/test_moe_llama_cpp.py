"""Fidelity of the numpy MoE reference to llama.cpp itself (llama-cpp-python, on the CPU).

llama-cpp-python is not in the test extras (pip builds llama.cpp from source, ~10+ minutes), so in CI
and wherever it is not installed this module is skipped, saying so. Where it is installed:

    pip install llama-cpp-python && python -m pytest -q -s tests/test_moe_llama_cpp.py

For each tiny synthetic MoE (qwen3moe, qwen2moe, Mixtral-style llama) with F32 and with F16 weights,
both engines decode 32 tokens greedily from the same prompt ids (no tokenizer in the loop), each on
its own; the ids must be equal, and every step's logits within REL of llama.cpp's, measured per row
as max |ours - theirs| / max |theirs|. llama.cpp keeps its KV cache in float16 by default; it is set to
float32 here (type_k = type_v = GGML_TYPE_F32) so that the comparison measures the model, not the
cache format. With F16 weights llama.cpp's CPU matmuls round the activations to float16 (the F16
vec-dot type), which our float32 reference does not do: the F16 rows show that difference.
"""
from __future__ import annotations

import numpy as np
import pytest

from aircupy.config import ModelConfig
from aircupy.gguf.reader import GGUFFile
from aircupy.reference.model import NumpyModel
from aircupy.synth import synth_model
from tests.helpers.batch_drive import solo_greedy

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (not a test extra: it compiles llama.cpp); "
                        "pip install llama-cpp-python to run the llama.cpp fidelity tests")

N_TOKENS = 32
REL = 1e-3
GGML_TYPE_F32 = 0          # ggml.h enum ggml_type
PROMPT = [5, 77, 300, 42, 9, 260, 311, 18]


def _llama_greedy(path, prompt, n):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=2, n_gpu_layers=0,
                          logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
    try:
        llm.eval(prompt)
        toks, rows = [], []
        for _ in range(n):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            toks.append(int(np.argmax(logits)))
            rows.append(logits)
            if len(toks) < n:
                llm.eval([toks[-1]])
        return toks, np.array(rows)
    finally:
        llm.close()


@pytest.mark.parametrize("qtype", ["F32", "F16"])
@pytest.mark.parametrize("preset", ["tiny-qwen3moe", "tiny-qwen2moe", "tiny-mixtral"])
def test_greedy_ids_and_logits_match_llama_cpp(tmp_path, preset, qtype):
    path = synth_model(tmp_path / f"{preset}-{qtype}.gguf", preset, qtype, seed=11).path
    with GGUFFile(path) as g:
        model = NumpyModel(g, ModelConfig.from_gguf(g))
        ours, our_logits = solo_greedy(model, PROMPT, N_TOKENS)
    theirs, their_logits = _llama_greedy(path, PROMPT, N_TOKENS)
    rel = np.abs(our_logits - their_logits).max(axis=1) / np.abs(their_logits).max(axis=1)
    top2 = np.sort(their_logits, axis=1)[:, -2:]
    margin = (top2[:, 1] - top2[:, 0]) / np.abs(their_logits).max(axis=1)
    print(f"{preset} {qtype}: worst relative logit difference {rel.max():.2e}, smallest top-2 margin "
          f"{margin.min():.2e}, ids equal: {ours == theirs}")
    assert ours == theirs
    assert rel.max() <= REL, rel

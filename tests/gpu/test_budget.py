"""GPU tier: the VRAM budget bounds everything the process holds on the device, the CUDA context, the
kernels and cuBLAS's workspaces included, not only the pool.

Each case runs in a fresh process (so its CUDA context is part of what is measured): it builds the
model at the budget, prefills a prompt (all logits, the graphs' first captures) and decodes 8 tokens,
then reports NVML's used-memory growth since before its first CUDA call. Budgets: everything resident,
about half the layers, and the smallest that streams, each as the pool it implies plus a CUDA
context's size (measured by a process that only creates one) and the reserve for what is made after
the pool; the model measures its own context and plans its pool into the rest."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu

TINY = dict(vocab=512, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512)
CASES = [("llama3-8b", "Q4_0", 8), ("qwen2-0.5b", "Q8_0", 6), ("qwen3-0.6b", "Q4_K", 6),
         ("gemma3-270m", "Q6_K", 6), ("smollm2-135m", "Q4_1", 6)]

CONTEXT = r"""
from aircupy.cuda.memory import DeviceMeter
meter = DeviceMeter()
import cupy
cupy.cuda.runtime.memGetInfo()
print(meter.held())
"""

CHILD = r"""
import json, sys
import numpy as np
from aircupy.cuda.memory import DeviceMeter
meter = DeviceMeter()                                  # before any CUDA call of this process
from aircupy.config import ModelConfig
from aircupy.cuda.model import CudaModel
from aircupy.gguf.reader import GGUFFile
path, budget = sys.argv[1], int(sys.argv[2])
with GGUFFile(path) as g:
    c = ModelConfig.from_gguf(g)
    m = CudaModel(g, c, 128, vram_budget=budget)
    cache = m.new_cache(128)
    ids = np.arange(4, 44, dtype=np.int32) % c.vocab_size
    lg = m.forward(ids, np.arange(40, dtype=np.int32), cache, all_logits=True)
    t = int(lg[-1].argmax())
    for i in range(8):
        t = int(m.forward(np.array([t], np.int32), np.array([40 + i], np.int32), cache)[-1].argmax())
    print(json.dumps({"held": meter.held(), "source": meter.source, "pool": m.pool.plan.total,
                      "resident": len(m.placement.resident_layers), "layers": c.n_layers}))
    m.close()
"""


@pytest.mark.parametrize("preset,qtype,n_layers", CASES)
def test_the_process_stays_within_its_vram_budget(tmp_path, preset, qtype, n_layers):
    from aircupy.config import ModelConfig
    from aircupy.cuda.memory import OUTSIDE_RESERVE
    from aircupy.cuda.placement import Footprint, resident_set
    from aircupy.gguf.reader import GGUFFile
    from aircupy.synth import synth_model
    over = dict(TINY, sliding_window=8) if preset.startswith("gemma3") else TINY
    path = synth_model(tmp_path / "m.gguf", preset, qtype, n_layers=n_layers, overrides=over,
                       seed=3).path
    with GGUFFile(path) as g:
        c = ModelConfig.from_gguf(g)
        fp = Footprint.of(g, c, 128)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ctx = subprocess.run([sys.executable, "-c", CONTEXT], capture_output=True, text=True, timeout=60,
                         env=env)
    context = int(ctx.stdout.strip().splitlines()[-1])
    print(f"CONTEXT {context} B")
    outside = context + OUTSIDE_RESERVE
    budgets = [fp.pool_plan(resident_set(n_layers, k), False, 3).total + outside
               for k in (n_layers, n_layers // 2, 0)]
    for budget in budgets:
        r = subprocess.run([sys.executable, "-c", CHILD, str(path), str(budget)], capture_output=True,
                           text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        got = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"BUDGET {preset} {qtype} {budget} B: process {got['held']} B ({got['source']}), pool "
              f"{got['pool']} B, {got['resident']}/{got['layers']} resident")
        assert got["source"] == "nvml"
        assert got["pool"] < got["held"] <= budget, got

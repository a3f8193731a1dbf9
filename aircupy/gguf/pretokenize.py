"""Pre-tokenizers for gpt2-style (byte-level BPE) vocabularies, keyed by `tokenizer.ggml.pre`.

llama.cpp (src/llama-vocab.cpp, `llm_tokenizer_bpe`) splits raw text with a *sequence* of regexes: each
regex cuts every piece from the previous stage into its matches and the gaps between them (both kept),
then every piece is byte-level encoded and merged by BPE rank on its own. HF `tokenizers` expresses the
same thing as `Sequence([Split(regex, "isolated"), ...] + [ByteLevel(use_regex=False)])`, which is what
`build_pre_tokenizer` returns. The regexes below are llama.cpp's, verbatim (its adapted forms, which spell
`(?i:'s|...)` as `'[sS]|...`), so that the pieces, and therefore the ids, are the same.

`PreSpec` also carries the per-pre-tokenizer flags llama.cpp sets next to the regexes: ignore_merges
(a piece that is already a vocabulary entry is emitted whole) and the add_bos default.
"""
from __future__ import annotations

from dataclasses import dataclass

from aircupy.errors import UnsupportedModelError

# GPT-2's split: contractions, letters, numbers, other symbols, whitespace not followed by non-space.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
# Llama 3 / tiktoken cl100k: letters with one leading non-letter, numbers in groups of up to three.
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2: as Llama 3 but every digit on its own.
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# o200k (gpt-4o, llama4): case-aware words with optional contraction, numbers in groups of three.
_GPT4O = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS + "?"
          r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS + "?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
           r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SEED_CODER = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK3 = ("\\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
              "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
              "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+")


@dataclass(frozen=True)
class PreSpec:
    """How one `tokenizer.ggml.pre` value pre-tokenizes, and the vocabulary flags it implies."""
    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool | None = None  # None: keep the vocabulary type's default (False for BPE)


_DEFAULT = PreSpec((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_LLAMA3_SPEC = PreSpec((_LLAMA3,), ignore_merges=True, add_bos=True)


def _table() -> dict[str, PreSpec]:
    """name -> spec, grouped as llama.cpp groups them (LLAMA_VOCAB_PRE_TYPE_*)."""
    groups: list[tuple[tuple[str, ...], PreSpec]] = [
        (("default",), _DEFAULT),
        (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
         _LLAMA3_SPEC),
        (("dbrx", "smaug-bpe"), PreSpec((_LLAMA3,))),
        (("chatglm-bpe", "glm4"), PreSpec((_LLAMA3,))),
        (("deepseek-coder",), PreSpec(("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"))),
        (("deepseek-v3", "hunyuan-dense"), PreSpec(_DEEPSEEK3)),
        (("falcon",), PreSpec((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"))),
        # StarCoder family, SmolLM included: every digit is its own piece before the GPT-2 split.
        (("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"),
         PreSpec((r"\p{N}", _GPT2))),
        (("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "mpt", "olmo",
          "jais", "trillion", "exaone4", "a.x-4.0", "mellum", "roberta-bpe", "jina-v1-en", "jina-v2-code"),
         PreSpec((_GPT2,))),
        (("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan"), PreSpec((_QWEN2,))),
        (("qwen35",), PreSpec((_QWEN35,))),
        (("poro-chat", "bloom", "gpt3-finnish"), PreSpec((r" ?[^(\s|.,!?…。，、।۔،)]+",))),
        (("tekken",), PreSpec((_TEKKEN,), ignore_merges=True, add_bos=True)),
        (("gpt-4o", "llama4", "minimax-m2"), PreSpec((_GPT4O,))),
        (("seed-coder",), PreSpec((_SEED_CODER,))),
    ]
    return {name: spec for names, spec in groups for name in names}


def pre_spec(name: str | None) -> PreSpec:
    """The spec for a `tokenizer.ggml.pre` value; a missing value means llama.cpp's 'default'."""
    table = _table()
    key = name or "default"
    if key not in table:
        known = ", ".join(sorted(table))
        raise UnsupportedModelError(f"unknown pre-tokenizer {key!r} (tokenizer.ggml.pre); supported: {known}")
    return table[key]


def build_pre_tokenizer(spec: PreSpec):
    """HF pre-tokenizer: each regex splits ("isolated": matches and gaps both kept), then byte-level map."""
    from tokenizers import Regex, pre_tokenizers

    stages = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in spec.regexes]
    stages.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(stages)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping

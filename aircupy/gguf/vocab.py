"""The vocabulary as llama.cpp loads it from GGUF metadata: tokens, per-token attributes, special ids,
add-BOS/EOS flags and the end-of-generation set (src/llama-vocab.cpp, `llama_vocab::impl::load`).

GGUF stores a token *type* per token; llama.cpp turns it into attribute bits and then patches them by
token text (an EOG-looking token that is not CONTROL becomes CONTROL, which changes how it is parsed
and printed). These rules live here so the tokenizer sees the same attributes llama.cpp does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from aircupy.errors import UnsupportedModelError

# llama_token_attr bits.
UNDEFINED, UNKNOWN, UNUSED, NORMAL, CONTROL, USER_DEFINED, BYTE = 0, 1, 2, 4, 8, 16, 32
LSTRIP, RSTRIP = 128, 256
# GGUF token type (llama_token_type) -> attribute.
_TYPE_TO_ATTR = np.array([UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE], dtype=np.int32)

_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
# Token texts llama.cpp treats as end of generation, whatever the metadata says.
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
              "<｜end▁of▁sentence｜>", "[e~[")
# gpt-oss: always printed, never parsed as control.
_FORCE_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")

_P = "tokenizer.ggml."


@dataclass
class Vocab:
    kind: str                       # "spm" (tokenizer.ggml.model "llama") or "bpe" ("gpt2")
    pre: str | None                 # tokenizer.ggml.pre
    tokens: list[str]
    token_to_id: dict[str, int]
    attrs: np.ndarray               # int32 (n_tokens,), llama_token_attr bits
    scores: np.ndarray              # float32 (n_tokens,), SPM merge priority (0 when absent)
    merges: list[str]
    ids: dict[str, int | None]      # bos, eos, eot, eom, unk, pad, fim_*
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    eog_ids: frozenset[int] = field(default_factory=frozenset)


def _array(md: dict, key: str, n: int, dtype) -> np.ndarray | None:
    v = md.get(_P + key)
    if v is None:
        return None
    arr = np.asarray(v)
    if arr.ndim != 1 or arr.shape[0] < n or not (np.issubdtype(arr.dtype, np.number)):
        raise UnsupportedModelError(f"{_P}{key}: expected {n} numbers, got {arr.shape} {arr.dtype}")
    return arr[:n].astype(dtype, copy=False)


def load_vocab(md: dict, *, default_add_bos: bool | None = None) -> Vocab:
    """Parse the tokenizer metadata (`default_add_bos`: the pre-tokenizer's default for BPE)."""
    model = md.get(_P + "model")
    tokens = md.get(_P + "tokens")
    if model is None or tokens is None:
        raise UnsupportedModelError("GGUF has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    if model == "llama":
        kind = "spm"
    elif model == "gpt2":
        kind = "bpe"
    else:
        raise UnsupportedModelError(f"tokenizer model {model!r} is not supported (only 'llama' and 'gpt2')")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise UnsupportedModelError(f"{_P}tokens must be a list of strings")
    n = len(tokens)
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # llama.cpp renames empty tokens
    token_to_id = dict(zip(tokens, range(n)))
    if len(token_to_id) != n:  # duplicates: llama.cpp keeps the first id
        token_to_id = {}
        for i, t in enumerate(tokens):
            token_to_id.setdefault(t, i)

    types = _array(md, "token_type", n, np.int64)
    if types is None:
        attrs = np.full(n, NORMAL, dtype=np.int32)
    else:
        attrs = _TYPE_TO_ATTR[np.where((types >= 0) & (types < len(_TYPE_TO_ATTR)), types, 0)].astype(np.int32)
    scores = _array(md, "scores", n, np.float32)
    merges = md.get(_P + "merges") or []
    if kind == "bpe" and not merges:
        raise UnsupportedModelError("gpt2-style tokenizer without tokenizer.ggml.merges")

    # Defaults per vocabulary type, then the metadata's word (llama.cpp does the same, in this order).
    if kind == "spm":
        ids = {"bos": 1, "eos": 2, "unk": 0}
        add_bos, add_space_prefix = True, True
    else:
        ids = {"bos": 11, "eos": 11, "unk": None}
        add_bos, add_space_prefix = bool(default_add_bos), False
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("eot", "eot_token_id"),
                      ("eom", "eom_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id"),
                      ("fim_pre", "fim_pre_token_id"), ("fim_suf", "fim_suf_token_id"),
                      ("fim_mid", "fim_mid_token_id"), ("fim_pad", "fim_pad_token_id"),
                      ("fim_rep", "fim_rep_token_id"), ("fim_sep", "fim_sep_token_id"),
                      ("fim_pre", "prefix_token_id"), ("fim_suf", "suffix_token_id"),
                      ("fim_mid", "middle_token_id")):
        v = md.get(_P + key)
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= int(v) < n:
            ids[name] = int(v)
    ids = {k: (v if v is not None and 0 <= v < n else None) for k, v in ids.items()}
    add_bos = bool(md.get(_P + "add_bos_token", add_bos))
    add_eos = bool(md.get(_P + "add_eos_token", False))
    add_space_prefix = bool(md.get(_P + "add_space_prefix", add_space_prefix))
    if add_bos and ids.get("bos") is None:
        raise UnsupportedModelError("add_bos_token is true, but tokenizer.ggml.bos_token_id is not set")
    if add_eos and ids.get("eos") is None:
        raise UnsupportedModelError("add_eos_token is true, but tokenizer.ggml.eos_token_id is not set")

    eog = _patch_by_text(token_to_id, attrs, ids)
    _patch_by_model_name(md, token_to_id, attrs)
    return Vocab(kind=kind, pre=md.get(_P + "pre"), tokens=tokens, token_to_id=token_to_id, attrs=attrs,
                 scores=scores if scores is not None else np.zeros(n, dtype=np.float32), merges=merges,
                 ids=ids, add_bos=add_bos, add_eos=add_eos, add_space_prefix=add_space_prefix,
                 eog_ids=frozenset(eog))


def _patch_by_text(token_to_id: dict[str, int], attrs: np.ndarray, ids: dict[str, int | None]) -> set[int]:
    """llama.cpp's text-based detection of EOT/EOM/FIM tokens and of the end-of-generation set."""
    def found(texts):
        return [token_to_id[t] for t in texts if t in token_to_id]

    def make_control(i):
        attrs[i] |= CONTROL

    for name, texts in (("eot", _EOT_TEXTS), ("eom", _EOM_TEXTS), *_FIM_TEXTS.items()):
        if ids.get(name) is None:
            hits = found(texts)
            if hits:
                ids[name] = min(hits)
                make_control(ids[name])
    eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids.get(k) is not None}
    for i in found(_EOG_TEXTS):
        eog.add(i)
        make_control(i)
    for t in _FORCE_USER_DEFINED:
        if t in token_to_id:
            attrs[token_to_id[t]] = USER_DEFINED
    eog.update(ids[k] for k in ("eos", "eot", "eom") if ids.get(k) is not None)
    # o200k_harmony / solar-open: "<|end|>" ends a message, not the generation.
    texts = {t for t in ("<|return|>", "<|call|>", "<|calls|>", "<|flush|>", "<|end|>") if token_to_id.get(t) in eog}
    has_call = bool({"<|call|>", "<|calls|>"} & texts)
    if "<|end|>" in texts and has_call and ("<|return|>" in texts or "<|flush|>" in texts):
        end = token_to_id["<|end|>"]
        eog.discard(end)
        attrs[end] = USER_DEFINED
    # gemma4 / paddleocr: "</s>" is ordinary text there.
    if token_to_id.get("<|tool_response>") in eog and token_to_id.get("</s>") in eog:
        s = token_to_id["</s>"]
        eog.discard(s)
        attrs[s] = NORMAL
    return eog


def _patch_by_model_name(md: dict, token_to_id: dict[str, int], attrs: np.ndarray) -> None:
    """Phi-3: special tokens swallow the whitespace after them (llama.cpp sets RSTRIP by model name)."""
    name = str(md.get("general.name", "")).lower()
    if "phi-3" not in name and "phi3" not in name:
        return
    special = (attrs & (CONTROL | USER_DEFINED | UNKNOWN)) != 0
    attrs[special] |= RSTRIP
    if "</s>" in token_to_id:
        attrs[token_to_id["</s>"]] |= RSTRIP
    for t in ("<unk>", "<s>", "<|endoftext|>"):
        if t in token_to_id:
            attrs[token_to_id[t]] &= ~RSTRIP

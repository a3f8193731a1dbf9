"""A gpt2-style byte-level BPE vocabulary of any size, so synthetic models load and tokenize end to end.

Token ids: 0..3 control tokens (chatml markers and bos/eos), then the 256 byte tokens in GPT-2's
byte-to-unicode spelling, then merged tokens. Each merged token is the concatenation of two earlier
tokens and comes with its merge rule "a b", in creation order (= merge rank), so the vocabulary and
merges are consistent the way HF `tokenizers` and llama.cpp require. The first merges spell common
English words so ordinary text tokenizes into fewer pieces than bytes; the rest pair random earlier
tokens (kept short) until the size the architecture asks for (e.g. 128,256 for Llama-3).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>")
BOS_ID, EOS_ID, PAD_ID = 3, 2, 0
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3
MAX_TOKEN_CHARS = 12
# Spelled with a leading space, as byte-level BPE sees words inside text.
_WORDS = tuple(" " + w for w in (
    "the of and to in is was for on that with as by it at from this be are an or have not which "
    "his but they had one were all we there can their has been more when will who model token "
    "layer hello world sky blue why because light water time people").split())

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    token_types: np.ndarray  # int32 (n,)
    merges: list[str]


def build_vocab(size: int, seed: int = 0) -> Vocab:
    """A consistent byte-level BPE vocabulary of exactly `size` tokens."""
    base = len(SPECIALS) + 256
    if size < base:
        raise ValueError(f"vocabulary size {size} is below the {base} specials + byte tokens")
    b2u = byte_to_unicode()
    tokens = list(SPECIALS) + [b2u[b] for b in range(256)]
    seen = set(tokens)
    merges: list[str] = []

    def add(a: str, b: str) -> bool:
        ab = a + b
        if ab in seen or len(tokens) >= size:
            return False
        seen.add(ab)
        tokens.append(ab)
        merges.append(f"{a} {b}")
        return True

    # Words, left to right: "Ġthe" = ("Ġ" + "t") + "he"-style chains of pairwise merges.
    for w in _WORDS:
        pieces = [b2u[b] for b in w.encode()]
        while len(pieces) > 1:
            add(pieces[0], pieces[1])
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    rng = np.random.default_rng(seed)
    lo, n_byte_end = len(SPECIALS), len(SPECIALS) + 256
    while len(tokens) < size:
        # Pairs drawn from earlier tokens (specials excluded), the second half of the time a single
        # byte, so tokens stay short. Random numbers in batches: per-draw numpy calls are slow.
        u = rng.random((3, 65536))
        for ua, ub, coin in zip(*u):
            hi = len(tokens)
            a = tokens[lo + int(ua * (hi - lo))]
            b = tokens[lo + int(ub * ((n_byte_end if coin < 0.5 else hi) - lo))]
            if len(a) + len(b) <= MAX_TOKEN_CHARS:
                add(a, b)
            if len(tokens) >= size:
                break
    types = np.full(size, TOKEN_NORMAL, dtype=np.int32)
    types[:len(SPECIALS)] = TOKEN_CONTROL
    return Vocab(tokens, types, merges)


def tokenizer_metadata(vocab: Vocab, add_bos: bool) -> dict:
    """GGUF tokenizer.* keys for `vocab` (gpt2 model, chatml template)."""
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": vocab.tokens,
        "tokenizer.ggml.token_type": vocab.token_types,
        "tokenizer.ggml.merges": vocab.merges,
        "tokenizer.ggml.bos_token_id": BOS_ID,
        "tokenizer.ggml.eos_token_id": EOS_ID,
        "tokenizer.ggml.padding_token_id": PAD_ID,
        "tokenizer.ggml.add_bos_token": add_bos,
        "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.chat_template": CHATML_TEMPLATE,
    }

"""Tokenizer built from GGUF metadata alone, giving the same ids as llama.cpp.

Two vocabulary kinds:
  * gpt2-style byte-level BPE (`tokenizer.ggml.model == "gpt2"`: SmolLM2, Llama 3, Qwen): HF `tokenizers`
    does the merging -- a BPE model from tokens + merges behind the pre-tokenizer that
    `tokenizer.ggml.pre` names (aircupy.gguf.pretokenize).
  * SentencePiece-style (`"llama"`: Llama 2, Gemma3): score-priority merging (aircupy.gguf.spm).
Around both, llama.cpp's own steps: special tokens cut out of the text first (aircupy.gguf.special),
BOS/EOS added per the metadata, byte-fallback tokens, and pieces printed per token attribute.

decode() is the plain concatenation of the token pieces (llama.cpp's `clean_spaces` post-pass is not
applied: it would make decode differ from the streamed pieces; SmolLM2 and Gemma3 both have it off).
"""
from __future__ import annotations

from functools import cached_property

from aircupy.errors import InvalidParameterError
from aircupy.gguf.pretokenize import build_pre_tokenizer, bytes_to_unicode, pre_spec
from aircupy.gguf.special import SpecialSplitter, SpecialToken
from aircupy.gguf.spm import SPACE, SpmMerger
from aircupy.gguf.vocab import BYTE, CONTROL, LSTRIP, NORMAL, RSTRIP, UNKNOWN, USER_DEFINED, Vocab, load_vocab

_HIDDEN = CONTROL | UNKNOWN  # printed only when special tokens are rendered
_UNK_SENTINEL = "\x00aircupy:byte-missing-from-vocab\x00"  # never produced by byte-level pre-tokenization


class Tokenizer:
    """encode/decode with llama.cpp's ids. Build with `Tokenizer.from_gguf(g)` or `from_metadata(md)`."""

    def __init__(self, vocab: Vocab, ignore_merges: bool = False):
        self._v = vocab
        self._attrs = vocab.attrs.tolist()
        self._tokens = vocab.tokens
        self._pieces: dict[int, bytes] = {}  # id -> piece with special tokens rendered (lazy)
        self._splitter = SpecialSplitter([
            SpecialToken(i, vocab.tokens[i], bool(a & _HIDDEN), bool(a & LSTRIP), bool(a & RSTRIP))
            for i, a in enumerate(self._attrs) if a & (CONTROL | USER_DEFINED | UNKNOWN)])
        if vocab.kind == "spm":
            self._spm = SpmMerger(vocab.token_to_id, vocab.scores, vocab.ids.get("unk"))
            self._hf = None
            self._byte_decoder = None
        else:
            self._spm = None
            self._hf = _build_hf_bpe(vocab, ignore_merges)
            self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_metadata(cls, md: dict) -> "Tokenizer":
        """From a GGUF metadata dict (tokenizer.ggml.* keys); raises UnsupportedModelError."""
        if md.get("tokenizer.ggml.model") == "gpt2":
            spec = pre_spec(md.get("tokenizer.ggml.pre"))
            tok = cls(load_vocab(md, default_add_bos=spec.add_bos), ignore_merges=spec.ignore_merges)
        else:
            tok = cls(load_vocab(md))
        return tok

    @classmethod
    def from_gguf(cls, g) -> "Tokenizer":
        """From an open aircupy GGUFFile."""
        return cls.from_metadata(g.metadata)

    # ---- properties --------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """"spm" or "bpe"."""
        return self._v.kind

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def vocab(self) -> Vocab:
        """The vocabulary as loaded (token texts as stored, ids, flags); read it, do not change it."""
        return self._v

    @property
    def bos_id(self) -> int | None:
        return self._v.ids.get("bos")

    @property
    def eos_id(self) -> int | None:
        return self._v.ids.get("eos")

    @property
    def eot_id(self) -> int | None:
        return self._v.ids.get("eot")

    @property
    def eog_ids(self) -> frozenset[int]:
        """Every id that ends generation (eos, eot, eom and the control tokens llama.cpp adds)."""
        return self._v.eog_ids

    @property
    def add_bos(self) -> bool:
        return self._v.add_bos

    @property
    def add_eos(self) -> bool:
        return self._v.add_eos

    def is_special(self, token_id: int) -> bool:
        """A control or unknown token: printed by decode() only when skip_special is False."""
        return bool(self._attrs[self._check(token_id)] & _HIDDEN)

    def token_to_id(self, text: str) -> int | None:
        """The id whose vocabulary entry is exactly `text` (e.g. "<|im_end|>"), or None."""
        return self._v.token_to_id.get(text)

    # ---- encode ------------------------------------------------------------------------------------
    def encode(self, text: str, add_special: bool = True, parse_special: bool = True,
               literal: tuple[tuple[int, int], ...] = ()) -> list[int]:
        """Ids for `text`. add_special: BOS/EOS as the model asks; parse_special: special-token text
        such as "<|im_start|>" becomes that token (otherwise it is tokenized as plain text); literal:
        (start, end) character spans, disjoint, where special-token text stays plain text even with
        parse_special (a chat prompt's message contents), the rest being cut exactly as without them."""
        if not isinstance(text, str):
            raise InvalidParameterError("text", f"expected a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:   # a lone UTF-16 surrogate (JSON can carry "\ud800")
            raise InvalidParameterError("text", f"not valid Unicode: lone surrogate at index {e.start}") from None
        v = self._v
        out: list[int] = []
        if add_special and v.add_bos:
            out.append(v.ids["bos"])
        fragments = self._splitter.split(text, parse_special, tuple(literal))
        if self._spm is not None:
            prev_special = True  # llama.cpp: a space prefix goes on text at the start or after a token
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                if v.add_space_prefix and prev_special:
                    frag = " " + frag
                out.extend(self._spm.encode(frag.replace(" ", SPACE)))
                prev_special = False
        else:
            texts = [f for f in fragments if isinstance(f, str)]
            encoded = iter(self._hf.encode_batch(texts, add_special_tokens=False) if len(texts) > 1 else
                           [self._hf.encode(t, add_special_tokens=False) for t in texts])
            sentinel = self.vocab_size  # HF's stand-in for a byte the vocabulary lacks: dropped, as llama.cpp does
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    ids = next(encoded).ids
                    out.extend([i for i in ids if i != sentinel] if sentinel in ids else ids)
        if add_special and v.add_eos:
            out.append(v.ids["eos"])
        return out

    def has_control_text(self, text: str) -> bool:
        """Does `text` hold the text of a control token ("<|im_end|>") that parse_special would cut?"""
        return self._splitter.split(text, True) != self._splitter.split(text, False)

    @cached_property
    def max_piece_bytes(self) -> int:
        """The most bytes of input text one token can stand for (an upper bound, computed once).

        Byte-level BPE: a normal token's characters are one input byte each; special tokens match
        their UTF-8 text. SentencePiece: "▁" stands for one space; an unknown token for one
        character (at most 4 bytes)."""
        if self._spm is not None:
            sizes = [len(t.replace(SPACE, " ").encode("utf-8")) for t in self._tokens]
            return max(sizes + [4])
        special = CONTROL | USER_DEFINED | UNKNOWN
        return max([len(t.encode("utf-8")) if a & special else len(t)
                    for t, a in zip(self._tokens, self._attrs)] + [1])

    @cached_property
    def _uncovered(self) -> bytes:
        """Input bytes that may produce no token: bytes a byte-level vocabulary lacks (dropped, as
        llama.cpp does), and whitespace when a special token strips it (llama.cpp's lstrip/rstrip)."""
        out = b""
        if self._byte_decoder is not None:
            out += bytes(b for b, c in bytes_to_unicode().items() if c not in self._v.token_to_id)
        if any(a & (LSTRIP | RSTRIP) for a in self._attrs):
            out += b" \t\n\v\f\r"
        return out

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text, add_special=False)) from the text's size alone, in one
        pass in C: every input byte is covered by a token of at most max_piece_bytes bytes (less the
        bytes that may vanish, see _uncovered). It rejects a prompt that cannot fit a context before
        tokenizing it (an 8 MiB prompt costs seconds and a gigabyte to tokenize, and ms to bound)."""
        data = text.encode("utf-8", "surrogatepass")
        if self._uncovered:
            data = data.translate(None, self._uncovered)
        return -(-len(data) // self.max_piece_bytes)

    # ---- decode ------------------------------------------------------------------------------------
    def token_bytes(self, token_id: int, special: bool = True) -> bytes:
        """The bytes token `token_id` prints as (b"" for control tokens when special is False)."""
        attr = self._attrs[self._check(token_id)]
        if not special and attr & _HIDDEN:
            return b""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self._render(token_id, attr)
        return piece

    def token_text(self, token_id: int) -> str:
        """The piece as text (for logprobs display); a lone byte-fallback byte shows as U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", "replace")

    def decode(self, ids, skip_special: bool = False, continuation: bool = False) -> str:
        """Text of `ids`; skip_special drops control tokens (and a leading BOS, as llama.cpp does).
        Where the vocabulary adds a space prefix (Llama 2 style), the first piece's leading space is
        the prefix and is dropped -- unless `continuation`: the ids follow earlier text (generated
        tokens after a prompt), so " Paris" keeps its space."""
        return b"".join(self.iter_pieces(ids, skip_special, continuation)).decode("utf-8", "replace")

    def iter_pieces(self, ids, skip_special: bool = False, continuation: bool = False):
        """Per-token bytes exactly as decode() joins them (llama.cpp `detokenize`)."""
        strip_space = self._v.add_space_prefix and not continuation
        first = True
        for tid in ids:
            tid = int(tid)
            if first:
                first = False
                if skip_special and self._v.add_bos and tid == self._v.ids.get("bos"):
                    strip_space = False
                    continue
                piece = self.token_bytes(tid, not skip_special)
                if strip_space and piece.startswith(b" "):
                    piece = piece[1:]
                yield piece
                continue
            yield self.token_bytes(tid, not skip_special)

    def _render(self, token_id: int, attr: int) -> bytes:
        text = self._tokens[token_id]
        if attr & (_HIDDEN | USER_DEFINED):
            return text.encode("utf-8")
        if attr & NORMAL:
            if self._byte_decoder is None:
                return text.replace(SPACE, " ").encode("utf-8")
            dec = self._byte_decoder
            # A character outside the byte map (malformed vocab) is kept as its own UTF-8.
            return b"".join(bytes((dec[c],)) if c in dec else c.encode("utf-8") for c in text)
        if attr & BYTE and len(text) == 6 and text.startswith("<0x"):
            return bytes((int(text[3:5], 16),))
        return b""  # unused / undefined tokens print nothing, as in llama.cpp

    def _check(self, token_id) -> int:
        i = int(token_id)
        if not 0 <= i < len(self._tokens):
            raise InvalidParameterError("token_id", f"{i} is outside the vocabulary (0..{len(self._tokens) - 1})")
        return i


def _build_hf_bpe(vocab: Vocab, ignore_merges: bool):
    """HF byte-level BPE over the GGUF vocabulary and merges (no added tokens: specials are ours)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    t2i = vocab.token_to_id
    merges = []
    for m in vocab.merges:
        # llama.cpp splits at the first space after the first character.
        cut = m.find(" ", 1)
        if cut < 0:
            continue
        a, b = m[:cut], m[cut + 1:]
        # HF refuses merges whose parts or result are missing; llama.cpp could only byte-split those.
        if a in t2i and b in t2i and a + b in t2i:
            merges.append((a, b))
    # Some vocabularies lack a few of the 256 byte characters (SmolLM2 has no 'ñ' = byte 0xF1). llama.cpp
    # keeps such a character as a symbol while merging -- a barrier no pair crosses -- and drops it at the
    # end; HF would drop it first and let its neighbours merge. A sentinel unknown token (id = vocab size,
    # removed from the output) keeps the barrier.
    sentinel = len(vocab.tokens)
    model = models.BPE(vocab={**t2i, _UNK_SENTINEL: sentinel}, merges=merges, unk_token=_UNK_SENTINEL,
                       fuse_unk=False, ignore_merges=ignore_merges)
    hf = HFTokenizer(model)
    hf.pre_tokenizer = build_pre_tokenizer(pre_spec(vocab.pre))
    return hf

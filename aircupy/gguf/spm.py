"""SentencePiece-style ("llama" model) merging, exactly as llama.cpp's `llm_tokenizer_spm_session`.

The algorithm: start from single characters; repeatedly merge the adjacent pair whose concatenation is
a vocabulary entry with the highest *score* (ties: the leftmost pair); emit each final symbol's id, or its
UTF-8 bytes as <0xNN> tokens when the symbol is a character the vocabulary lacks (byte fallback).

Why not HF `tokenizers` here (it does the gpt2-style BPE): a BPE model needs merges, and generating
them from scores means testing every split of every token -- 515k merges for Gemma3's 262k vocabulary,
1.5-2.5 s to build on a 2-core machine, against a < 1 s start-up budget. And HF ranks each (left, right)
pair separately, while llama.cpp gives every pair that forms the same token the same score and breaks
the tie by position, so the two can differ. This port costs nothing to build and is exact by construction.

Speed: a merge can only cross a '▁' boundary if some vocabulary entry has '▁' past its first character
(Gemma3 has one, '>▁</'). So the text is cut before every '▁' that no such entry covers at that spot,
each piece is merged on its own (the result is provably the same) and pieces are cached per tokenizer.
"""
from __future__ import annotations

import heapq

import numpy as np

SPACE = "\u2581"  # '▁', SentencePiece's visible space
_CACHE_LIMIT = 1 << 16  # pieces remembered per tokenizer before the cache is reset


class SpmMerger:
    """Score-priority merging over one vocabulary: `encode(text) -> list[int]` for escaped text."""

    def __init__(self, token_to_id: dict[str, int], scores: np.ndarray, unk_id: int | None):
        """`scores`: one per token id (llama.cpp uses 0.0 for all when the file has none)."""
        self._vocab = token_to_id
        # Python floats keep float32 values exactly, so ties compare as they do in llama.cpp.
        self._scores = np.asarray(scores, dtype=np.float64).tolist()
        self._unk = unk_id
        self._byte_ids = [token_to_id.get(f"<0x{b:02X}>") for b in range(256)]
        # Entries that can join text across a '▁' boundary (a '▁' after their first character).
        self._spanning = [t for t in token_to_id if SPACE in t[1:]]
        self._cache: dict[str, tuple[int, ...]] = {}

    # ---- public ------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids for `text` (spaces already replaced by '▁')."""
        out: list[int] = []
        cache = self._cache
        for piece in self._pieces(text):
            ids = cache.get(piece)
            if ids is None:
                ids = tuple(self._merge(piece))
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[piece] = ids
            out.extend(ids)
        return out

    # ---- internals ---------------------------------------------------------------------------------
    def _pieces(self, text: str) -> list[str]:
        """Cut before each '▁' (but at 0) that no spanning vocabulary entry covers there."""
        cuts = [i for i in range(1, len(text)) if text[i] == SPACE] if SPACE in text[1:] else []
        if not cuts:
            return [text] if text else []
        if self._spanning:
            unsafe: set[int] = set()
            for tok in self._spanning:
                start = text.find(tok)
                while start != -1:
                    unsafe.update(range(start + 1, start + len(tok)))
                    start = text.find(tok, start + 1)
            cuts = [c for c in cuts if c not in unsafe]
        bounds = [0, *cuts, len(text)]
        return [text[a:b] for a, b in zip(bounds, bounds[1:])]

    def _merge(self, word: str) -> list[int]:
        vocab_get = self._vocab.get
        whole = vocab_get(word)
        n = len(word)
        if n == 1:
            return [whole] if whole is not None else self._bytes(word)
        scores = self._scores
        sym = list(word)                      # sym[i]: text of the symbol starting at char i ('' if merged away)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []  # (-score, left, right, merged length)
        for i in range(n - 1):
            tid = vocab_get(word[i:i + 2])
            if tid is not None:
                heap.append((-scores[tid], i, i + 1, 2))
        heapq.heapify(heap)
        push = heapq.heappush
        pop = heapq.heappop
        while heap:
            _, left, right, size = pop(heap)
            lt, rt = sym[left], sym[right]
            # Stale entry: one side was merged away or grew since the pair was queued.
            if not lt or not rt or len(lt) + len(rt) != size:
                continue
            sym[left] = lt + rt
            sym[right] = ""
            after = nxt[right]
            nxt[left] = after
            if after != -1:
                prv[after] = left
            before = prv[left]
            if before != -1:
                text = sym[before] + sym[left]
                tid = vocab_get(text)
                if tid is not None:
                    push(heap, (-scores[tid], before, left, len(text)))
            if after != -1:
                text = sym[left] + sym[after]
                tid = vocab_get(text)
                if tid is not None:
                    push(heap, (-scores[tid], left, after, len(text)))
        out: list[int] = []
        i = 0
        while i != -1:
            tid = vocab_get(sym[i])
            if tid is not None:
                out.append(tid)
            else:  # only a single character can be missing: every merge produced a vocabulary entry
                out.extend(self._bytes(sym[i]))
            i = nxt[i]
        return out

    def _bytes(self, ch: str) -> list[int]:
        """Byte fallback: <0xNN> per UTF-8 byte, else the unknown token (llama.cpp would abort)."""
        out = []
        for b in ch.encode("utf-8", "surrogatepass"):
            tid = self._byte_ids[b]
            if tid is None:
                tid = self._unk
            if tid is not None:
                out.append(tid)
        return out

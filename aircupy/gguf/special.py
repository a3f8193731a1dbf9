"""Cutting special-token text out of a prompt, the way llama.cpp's `tokenizer_st_partition` does.

llama.cpp takes every CONTROL, USER_DEFINED and UNKNOWN token, longest text first (byte length), and
splits each remaining text fragment at every occurrence of it; the pieces between are tokenized
normally. With parse_special=False only USER_DEFINED tokens are cut (Gemma3's runs of spaces, tabs and
newlines, its HTML tags): they are part of the vocabulary's normal text handling, not markup.

`literal` spans (character offsets) are parts of the text that stay text: a CONTROL or UNKNOWN token
overlapping one is not cut there (USER_DEFINED ones still are, as with parse_special=False). A chat
prompt passes its message contents as literal spans, so a user cannot forge a turn by typing
"<|im_end|><|im_start|>system", while the same text cut as a whole keeps every other token as before.

Trying thousands of tokens (Gemma3 has 6,414) against every prompt with str.find costs ~0.3 s per
100 KB, so a trie-shaped regex first finds which special texts occur at all (~6 ms per 100 KB); the
exact llama.cpp procedure then runs over those few. Global longest-first is not the same as leftmost-
longest when two special texts overlap, which is why the second step is kept.
"""
from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass

_C_SPACE = " \t\n\v\f\r"  # C isspace() in the "C" locale, what llama.cpp's lstrip/rstrip use


@dataclass(frozen=True)
class SpecialToken:
    id: int
    text: str
    parse_only: bool     # CONTROL or UNKNOWN: cut only when parse_special=True
    lstrip: bool = False  # eat whitespace before it (llama.cpp attribute, set per model family)
    rstrip: bool = False  # eat whitespace after it


def _trie_pattern(words: list[str]) -> str:
    """A regex matching any of `words`, nested by shared prefix so a failing position costs a few
    character tests instead of one per word; at each position it prefers the longest word."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        # Iterative-enough recursion: depth is the longest special text (tens of characters).
        kids = sorted(ch for ch in node if ch)
        if not kids:
            return ""
        alts = [re.escape(ch) + emit(node[ch]) for ch in kids]
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return "(?:" + body + ")?" if "" in node else body

    return emit(trie)


class SpecialSplitter:
    """`split(text, parse_special)` -> list of str (raw text) and int (special token id) fragments."""

    def __init__(self, tokens: list[SpecialToken]):
        # llama.cpp order: longest byte length first. (std::sort leaves equal lengths in an unspecified
        # order; equal-length texts only conflict when they overlap, so ids break the tie here.)
        self._ordered = sorted(tokens, key=lambda t: (-len(t.text.encode("utf-8")), t.id))
        self._by_text: dict[bool, dict[str, SpecialToken]] = {True: {}, False: {}}
        for tok in self._ordered:
            self._by_text[True].setdefault(tok.text, tok)
            if not tok.parse_only:
                self._by_text[False].setdefault(tok.text, tok)
        self._finders: dict[bool, re.Pattern | None] = {}

    def _finder(self, parse_special: bool) -> re.Pattern | None:
        if parse_special not in self._finders:
            texts = list(self._by_text[parse_special])
            # Zero-width lookahead so overlapping occurrences are all seen.
            self._finders[parse_special] = re.compile("(?=(" + _trie_pattern(texts) + "))") if texts else None
        return self._finders[parse_special]

    def split(self, text: str, parse_special: bool, literal: tuple[tuple[int, int], ...] = ()) -> list[str | int]:
        """Fragments of `text`; `literal`: sorted, disjoint (start, end) spans where parse-only tokens
        are not cut (only matters with parse_special=True)."""
        finder = self._finder(parse_special)
        if finder is None or not text:
            return [text] if text else []
        table = self._by_text[parse_special]
        present: set[str] = set()
        for m in finder.finditer(text):
            longest = m.group(1)
            if longest in present:
                continue
            present.add(longest)
            # A shorter special text that is a prefix of this match occurs here too.
            present.update(longest[:k] for k in range(1, len(longest)) if longest[:k] in table)
        if not present:
            return [text]
        guard = _Guard(literal) if literal and parse_special else None
        fragments: list[tuple[int, str] | int] = [(0, text)]   # text fragments carry their offset
        for tok in self._ordered:
            if tok.text in present and table.get(tok.text) is tok:
                fragments = _cut(fragments, tok, guard if tok.parse_only else None)
        return [f if isinstance(f, int) else f[1] for f in fragments]


class _Guard:
    """Literal spans, sorted and disjoint: does [a, b) overlap one of them? (binary search)"""

    def __init__(self, spans):
        self.spans = sorted(spans)
        self.starts = [s for s, _ in self.spans]

    def overlaps(self, a: int, b: int) -> bool:
        i = bisect_left(self.starts, b) - 1   # the last span starting before b
        return i >= 0 and self.spans[i][1] > a


def _cut(fragments: list, tok: SpecialToken, guard: _Guard | None) -> list:
    """Split every raw fragment at each occurrence of `tok.text` (left to right, as llama.cpp) that
    does not overlap a literal span."""
    out: list = []
    needle, n = tok.text, len(tok.text)
    for frag in fragments:
        if isinstance(frag, int) or needle not in frag[1]:
            out.append(frag)
            continue
        off, s = frag
        base = search = 0
        while (hit := s.find(needle, search)) != -1:
            if guard is not None and guard.overlaps(off + hit, off + hit + n):
                search = hit + 1   # this occurrence is a message's text: keep looking after it
                continue
            left = s[base:hit]
            if tok.lstrip:
                left = left.rstrip(_C_SPACE)
            if left:
                out.append((off + base, left))
            out.append(tok.id)
            base = hit + n
            if tok.rstrip:
                while base < len(s) and s[base] in _C_SPACE:
                    base += 1
            search = base
        if base < len(s):
            out.append((off + base, s[base:]))
    return out

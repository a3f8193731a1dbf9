"""Streaming detokenization: text per generated token, never half a UTF-8 character.

A byte-fallback vocabulary spells an emoji as four <0xNN> tokens, and a byte-level BPE token can end in
the middle of a character; printing each token's bytes on its own would show U+FFFD. The pieces are fed
to Python's incremental UTF-8 decoder, which holds back an unfinished sequence until it completes (or
is proven invalid), so the concatenated output is exactly `tokenizer.decode(all ids)` -- the same
decoder, errors="replace", run over the same bytes.
"""
from __future__ import annotations

import codecs


class IncrementalDecoder:
    """push(token_id) -> new text (possibly ""); flush() -> whatever is still held back."""

    def __init__(self, tokenizer, skip_special: bool = False, continuation: bool = False):
        """continuation: the tokens continue earlier text (generation after a prompt); see
        Tokenizer.decode. The pieces then concatenate to decode(ids, continuation=True)."""
        self._tok = tokenizer
        self._skip_special = skip_special
        self._continuation = continuation
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = True
        self.n_tokens = 0

    def push(self, token_id: int) -> str:
        self.n_tokens += 1
        if self._first:
            # The first piece follows decode()'s rules for a sequence start (leading BOS, space prefix).
            self._first = False
            piece = b"".join(self._tok.iter_pieces([token_id], self._skip_special, self._continuation))
        else:
            piece = self._tok.token_bytes(token_id, not self._skip_special)
        return self._utf8.decode(piece, final=False) if piece else ""

    def flush(self) -> str:
        """End of stream: an unfinished character becomes U+FFFD, as decode() would show it."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out

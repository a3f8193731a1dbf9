"""The draft sources behind engine/speculative.py's Proposer: prompt lookup, a draft model, self-draft.

NgramProposer     prompt lookup: the last n tokens (n = n_max down to n_min) are looked up in the
                  prompt + text so far; the k tokens that followed their most recent earlier
                  occurrence are the draft. No model; strong where the output repeats its input
                  (editing, summarising, code).
ModelProposer     a small model of the same vocabulary (a draft GGUF), kept resident, with its own
                  KV cache per sequence (the Model protocol's new_cache/forward): each proposal
                  reuses the cached prefix it shares with the sequence (the rejected drafts of the
                  previous pass fall away), runs the rest, then k single-token steps. Greedy drafts,
                  or, when the sequence samples, drafts drawn from q = the draft's distribution
                  under the sequence's own sampling settings, q kept for the acceptance rule.
self_draft()      the target itself with layers skipped (their residual passes through): a
                  ModelProposer over model.draft_view(skip_layers). The interface a backend provides:
                  draft_view(skip_layers) -> an object with config, vocab_size, new_cache(n_ctx) and
                  forward(ids, positions, cache, all_logits=False), the same layers minus the skipped
                  ones, with caches of its own (the target's KV is never touched). The numpy model has
                  it (reference/model.py); on the GPU the skipped layers are the streamed ones, so a
                  draft costs no bus time.

check_draft_vocab() is llama.cpp's compatibility rule (common/speculative.cpp,
common_speculative_are_compatible): same tokenizer type; same BOS/EOS ids and add-BOS/EOS flags; sizes
differing by at most 128 (a padded vocabulary); equal token texts from id 5 on up to the shorter size.
Where the sizes differ, draft logits past the target's vocabulary are never drafted and target ids past
the draft's have q = 0.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from aircupy.engine.sampler import Sampler
from aircupy.engine.speculative import Draft, draw
from aircupy.errors import InvalidParameterError

VOCAB_MAX_SIZE_DIFFERENCE = 128     # llama.cpp SPEC_VOCAB_MAX_SIZE_DIFFERENCE
VOCAB_CHECK_START_TOKEN_ID = 5      # llama.cpp SPEC_VOCAB_CHECK_START_TOKEN_ID


class NgramProposer:
    """Prompt lookup. n_max..n_min: the n-gram sizes tried, longest first (a longer match predicts
    better); the most recent earlier occurrence wins (the text nearby is the likeliest to repeat)."""

    def __init__(self, n_max: int = 3, n_min: int = 1):
        if not 1 <= n_min <= n_max:
            raise ValueError(f"need 1 <= n_min ({n_min}) <= n_max ({n_max})")
        self.n_max, self.n_min = n_max, n_min

    def propose(self, seq_id: int, token_ids, k: int, sampler=None) -> Draft:
        toks = np.asarray(token_ids, dtype=np.int64)
        L = len(toks)
        for n in range(self.n_max, self.n_min - 1, -1):
            if k <= 0 or L <= n:
                continue
            # windows starting at 0 .. L-n-1: every occurrence followed by at least one token
            hits = np.flatnonzero((sliding_window_view(toks[:L - 1], n) == toks[L - n:]).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return Draft(toks[start:start + k].tolist())
        return Draft()

    def release(self, seq_id: int) -> None:
        pass


class _DraftState:
    def __init__(self, cache):
        self.cache = cache
        self.tokens: list[int] = []      # what the cache holds the KV of, in order


class ModelProposer:
    """Drafts from `model` (the Model protocol: config, new_cache, forward) for a target whose vocabulary
    has target_vocab ids. n_ctx: the longest sequence drafted for (the scheduler's max_model_len).
    greedy_draft: draft the argmax even when the sequence samples (q is then a point mass)."""

    def __init__(self, model, target_vocab: int, n_ctx: int, greedy_draft: bool = False):
        self.model = model
        self.target_vocab = int(target_vocab)
        self.n_ctx = int(n_ctx)
        self.greedy_draft = greedy_draft
        self._states: dict[int, _DraftState] = {}

    def propose(self, seq_id: int, token_ids, k: int, sampler=None) -> Draft:
        tokens = [int(t) for t in token_ids]
        k = min(k, self.n_ctx - len(tokens))
        if k <= 0 or not tokens:
            return Draft()
        st = self._states.get(seq_id)
        if st is None:
            st = self._states[seq_id] = _DraftState(self.model.new_cache(self.n_ctx))
        n = _common_prefix(st.tokens, tokens, len(tokens) - 1)   # feed at least the last token
        st.cache.truncate(n)
        del st.tokens[n:]
        greedy = sampler is None or sampler.params.greedy or self.greedy_draft
        local = None if greedy else Sampler(sampler.params, self.target_vocab, prompt_ids=tokens)
        row = self._run(st, tokens[n:])
        out, qs = [], []
        for j in range(k):
            if greedy:
                x = int(np.argmax(row))
            else:
                q = local.probs(row)
                x = draw(q, sampler.rng)                 # the sequence's RNG: seeded runs reproduce
                local.accept(x)
                qs.append(q)
            out.append(x)
            if j + 1 < k:
                row = self._run(st, [x])
        return Draft(out, None if greedy else np.array(qs))

    def _run(self, st: _DraftState, ids: list[int]) -> np.ndarray:
        """Feed ids after the cache; the last row's logits over the target's vocabulary (float32)."""
        pos = np.arange(len(st.tokens), len(st.tokens) + len(ids), dtype=np.int32)
        logits = np.asarray(self.model.forward(np.asarray(ids, np.int32), pos, st.cache))[-1]
        st.tokens.extend(ids)
        V = self.target_vocab
        if len(logits) == V:
            return logits
        row = np.full(V, -np.inf, np.float32)      # ids the draft lacks: never drafted, q = 0
        n = min(V, len(logits))
        row[:n] = logits[:n]
        return row

    def release(self, seq_id: int) -> None:
        self._states.pop(seq_id, None)


def self_draft(model, skip_layers, n_ctx: int, greedy_draft: bool = False) -> ModelProposer:
    """Self-speculation: the target with skip_layers skipped (model.draft_view) as its own draft model."""
    view = model.draft_view(skip_layers)
    return ModelProposer(view, model.config.vocab_size, n_ctx, greedy_draft)


def check_draft_vocab(target, draft) -> None:
    """Raise InvalidParameterError('draft_model', ...) unless the draft tokenizer can draft for the
    target's (both gguf Tokenizers): llama.cpp's rule, in the module docstring."""
    def fail(msg):
        raise InvalidParameterError("draft_model", f"the draft model's vocabulary does not match the target's: {msg}")

    if target.kind != draft.kind:
        fail(f"tokenizer type {draft.kind!r}, the target's is {target.kind!r}")
    for name in ("bos_id", "eos_id", "add_bos", "add_eos"):
        a, b = getattr(target, name), getattr(draft, name)
        if a != b:
            fail(f"{name} is {b!r} in the draft, {a!r} in the target")
    nt, nd = target.vocab_size, draft.vocab_size
    if abs(nt - nd) > VOCAB_MAX_SIZE_DIFFERENCE:
        fail(f"{nd} tokens in the draft, {nt} in the target (at most {VOCAB_MAX_SIZE_DIFFERENCE} apart)")
    tt, td = target.vocab.tokens, draft.vocab.tokens
    for i in range(VOCAB_CHECK_START_TOKEN_ID, min(nt, nd)):
        if tt[i] != td[i]:
            fail(f"token {i} is {td[i]!r} in the draft, {tt[i]!r} in the target")


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i

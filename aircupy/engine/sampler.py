"""The numpy sampler: the reference twin of the GPU sampler, one instance per request.

Order of operations on one row of logits (vocab,), as HF transformers and vLLM apply them:
  1. logit_bias added;
  2. repetition penalty (llama.cpp/HF: a positive logit is divided by it, a negative one multiplied)
     over the unique ids among the last `repeat_last_n` prompt + generated tokens;
  3. presence and frequency penalties (OpenAI: logit -= presence * [count > 0] + frequency * count)
     over the generated tokens only;
  4. temperature 0: argmax (lowest id on a tie). Otherwise logits / temperature, then top-k, top-p
     (over the top-k set renormalised) and min-p, each a cut of the candidates sorted by probability
     (ties broken by lower id), and one draw by inverse CDF with a uniform from the request's own
     np.random.Generator — seeded, so a seed reproduces the tokens exactly.
(llama.cpp applies temperature after top-p and min-p; we follow HF/vLLM, which OpenAI clients expect.)

Constraint (engine/constraint.py): before step 1, ids the grammar forbids are set to -inf, and the
sampled id advances the grammar's matcher. When no id is allowed (the matcher failed), only the
end-of-generation ids are left, so the request ends rather than emitting a forbidden token.

Logprobs: the log-softmax of the RAW model logits, before bias, penalties, temperature and truncation,
as vLLM returns by default ("raw_logprobs") and as OpenAI's API behaves. They describe the model, not the
sampling settings, so they are comparable across requests and finite for every token (a token cut by
top-k still has its true logprob).
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from aircupy.engine.params import SamplingParams

# Candidates taken per round when top-p has to find its prefix without top-k (grows x4 per round): a
# partial sort of a few hundred ids instead of a full sort of a 262k vocabulary.
_TOP_P_FIRST_ROUND = 256


class Sampler:
    """Picks the next token from a row of logits; remembers the tokens it has seen for the penalties."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids=(), constraint=None, end_ids=()):
        """constraint: a ConstraintState for this sequence (None: unconstrained); end_ids: the ids that
        end generation, the fallback when the constraint allows nothing."""
        self.params = params.validate(vocab_size)
        self.constraint = constraint
        self._end_ids = np.fromiter(sorted(end_ids), dtype=np.int64)
        self.vocab_size = int(vocab_size)
        self.rng = np.random.default_rng(params.seed)
        self._history: list[int] = [int(t) for t in prompt_ids]  # prompt + generated, for repeat_penalty
        self._generated = Counter()                              # generated id -> count, for OpenAI penalties
        bias = params.logit_bias or {}
        self._bias_ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        self._bias_vals = np.fromiter(bias.values(), dtype=np.float64, count=len(bias))

    # -- what changes the logits ------------------------------------------------------------------
    @property
    def _modifies_logits(self) -> bool:
        p = self.params
        return bool(len(self._bias_ids) or (p.repeat_penalty != 1.0 and p.repeat_last_n != 0)
                    or p.presence_penalty or p.frequency_penalty)

    def process(self, logits: np.ndarray) -> np.ndarray:
        """Bias and penalties applied to a float64 copy of `logits` (vocab,)."""
        x = np.array(logits, dtype=np.float64).reshape(-1)
        if x.shape[0] != self.vocab_size:
            raise ValueError(f"logits have {x.shape[0]} entries, the vocabulary {self.vocab_size}")
        p = self.params
        if len(self._bias_ids):
            np.add.at(x, self._bias_ids, self._bias_vals)
        if p.repeat_penalty != 1.0 and p.repeat_last_n != 0 and self._history:
            window = self._history if p.repeat_last_n < 0 else self._history[-p.repeat_last_n:]
            ids = np.unique(np.asarray(window, dtype=np.int64))
            v = x[ids]
            x[ids] = np.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
        if (p.presence_penalty or p.frequency_penalty) and self._generated:
            ids = np.fromiter(self._generated.keys(), dtype=np.int64, count=len(self._generated))
            counts = np.fromiter(self._generated.values(), dtype=np.float64, count=len(self._generated))
            x[ids] -= p.presence_penalty + p.frequency_penalty * counts
        return x

    # -- choosing ---------------------------------------------------------------------------------
    def sample(self, logits: np.ndarray) -> int:
        """The next token id for `logits` (vocab,) or (1, vocab); records it for the penalties."""
        row = np.asarray(logits).reshape(-1)
        if row.shape[0] != self.vocab_size:
            raise ValueError(f"logits have {row.shape[0]} entries, the vocabulary {self.vocab_size}")
        if self.constraint is not None:
            row = self._masked(row)
        if self.params.greedy:
            tok = self._argmax(row)
        else:
            ids, probs = self.candidates(row)
            # Inverse CDF: the first candidate whose cumulative probability exceeds u * total.
            cdf = np.cumsum(probs)
            i = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
            tok = int(ids[min(i, len(ids) - 1)])
        self.advance(tok)
        return tok

    def _argmax(self, row: np.ndarray) -> int:
        """The greedy choice: argmax after bias and penalties (lowest id on a tie)."""
        return int(np.argmax(self.process(row) if self._modifies_logits else row))

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """(vocab,) float64: the distribution sample() would draw the next token from in the sampler's
        present state (constraint mask, bias, penalties, temperature, truncation), normalised; a point
        mass on the argmax when greedy. Records nothing: speculative decoding (engine/speculative.py)
        judges drafted tokens with it, then records the tokens it keeps with advance()."""
        row = np.asarray(logits).reshape(-1)
        if row.shape[0] != self.vocab_size:
            raise ValueError(f"logits have {row.shape[0]} entries, the vocabulary {self.vocab_size}")
        if self.constraint is not None:
            row = self._masked(row)
        out = np.zeros(self.vocab_size, dtype=np.float64)
        if self.params.greedy:
            out[self._argmax(row)] = 1.0
        else:
            ids, p = self.candidates(row)
            out[ids] = p / p.sum()
        return out

    def advance(self, token_id: int) -> None:
        """Record a token as chosen (penalty history, constraint matcher): what sample() does after its
        draw, for a token chosen elsewhere (an accepted draft)."""
        self.accept(token_id)
        if self.constraint is not None:
            self.constraint.advance(int(token_id))

    def _masked(self, row: np.ndarray) -> np.ndarray:
        from aircupy.engine.constraint import mask_logits
        allowed = self.constraint.allowed()
        if not allowed.any():
            allowed[self._end_ids] = True
        return mask_logits(row, allowed)

    def accept(self, token_id: int) -> None:
        self._history.append(int(token_id))
        self._generated[int(token_id)] += 1

    def candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, unnormalised probs) the draw chooses from, after temperature and truncation.

        Sorted by probability descending (ties: lower id first) when any cut applies; in id order when
        none does (the full vocabulary, no sort needed: the same distribution either way).
        """
        p = self.params
        x = self.process(logits)
        x /= p.temperature
        x -= x.max()  # exp() of the shifted logits: the best is 1, nothing overflows
        n = x.shape[0]
        if p.top_k == 0 and p.top_p >= 1.0 and p.min_p == 0.0:
            return np.arange(n), np.exp(x)
        mass = None  # what top-p's cumulative probabilities are relative to; None: the candidates' own sum
        if p.top_k > 0:
            ids = _top_sorted(x, min(p.top_k, n))   # top-p then renormalises over the top-k set (HF, vLLM)
        elif p.top_p < 1.0:
            ids, mass = self._top_p_prefix(x)       # a prefix only: top-p is relative to the WHOLE vocabulary
        else:  # min-p alone: everything within log(min_p) of the best, then sorted
            ids = np.flatnonzero(x >= np.log(p.min_p))
            ids = ids[np.lexsort((ids, -x[ids]))]
        probs = np.exp(x[ids])
        keep = len(ids)
        if p.top_p < 1.0:
            cdf = np.cumsum(probs) / (probs.sum() if mass is None else mass)
            keep = min(keep, int(np.searchsorted(cdf, p.top_p, side="left")) + 1)
        if p.min_p > 0.0:  # probs[0] is the best, == 1 after the shift
            keep = min(keep, max(1, int(np.count_nonzero(probs >= p.min_p * probs[0]))))
        return ids[:keep], probs[:keep]

    def _top_p_prefix(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """Sorted ids holding at least top_p of the whole probability mass (found by growing partial
        sorts), and that whole mass (sum of exp(x) over the vocabulary)."""
        e = np.exp(x)
        total = float(e.sum())
        m = min(_TOP_P_FIRST_ROUND, len(x))
        while True:
            ids = _top_sorted(x, m)
            if m == len(x) or e[ids].sum() >= self.params.top_p * total:
                return ids, total
            m = min(m * 4, len(x))


def _top_sorted(x: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest entries of x, sorted descending, ties by lower id; (k,) int64.

    argpartition alone may pick any of several tied ids at the boundary, so the boundary value's ties
    are resolved by id explicitly to keep the result deterministic.
    """
    n = len(x)
    if k >= n:
        ids = np.arange(n)
    else:
        part = np.argpartition(-x, k - 1)[:k]
        kth = x[part].min()
        above = np.flatnonzero(x > kth)
        ties = np.flatnonzero(x == kth)[: k - len(above)]
        ids = np.concatenate([above, ties])
    return ids[np.lexsort((ids, -x[ids]))]


def token_logprobs(logits: np.ndarray, token_id: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """Raw log-softmax of `logits` (vocab,): the chosen token's logprob and the top-k (id, logprob) pairs,
    sorted by logprob descending (ties: lower id first)."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())
    top = _top_sorted(x, min(k, len(x))) if k > 0 else np.empty(0, dtype=np.int64)
    return float(x[token_id] - lse), [(int(i), float(x[i] - lse)) for i in top]

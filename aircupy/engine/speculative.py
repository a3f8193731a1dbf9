"""Speculative decoding, the engine-side core: the draft interface, the acceptance rule, adaptive k, stats.

A proposer guesses the next k tokens of a sequence cheaply; the target model then runs the last sampled
token and the k drafts as one verification chunk (engine/scheduler.py: set_draft), whose k + 1 logits
rows judge every draft at once. Under streaming a pass costs its weight traffic whatever its rows, so
each accepted draft is a token for free. The runner's loop, per decoding sequence:

    draft = speculator.draft(seq_id, seq.token_ids, sampler, limit)     # a Draft (tokens, q)
    sched.set_draft(seq_id, draft.tokens)
    step = sched.schedule(); logits = model.forward_step(step.arrays(), kv)
    for ch, rows in zip(step.logits_chunks, step.logits_slices):        # rows: logits[rows]
        ids = speculator.verify(ch.seq_id, ch.draft, logits[rows], sampler) # accepted + next token
    sched.commit(step, [ids or ids[0] per chunk], finish)              # cut ids at a stop first
    speculator.release(seq_id) when the sequence finishes

Proposers (engine/drafters.py) implement one method, propose(seq_id, token_ids, k, sampler) -> Draft:
prompt lookup (n-gram), a draft model, and the target itself with layers skipped (self-draft).

Acceptance (accept_draft). p_j is the target's distribution at row j exactly as the sequence's Sampler
would draw from it (engine/sampler.py: Sampler.probs, in the sampler's state after the tokens accepted
so far, so penalties see them), q_j the draft's. Greedy (temperature 0): the longest prefix of drafts
equal to the target's argmax, then the target's own token -- the tokens greedy decoding produces, by
induction. Sampling, the rule of Leviathan et al. and Chen et al. (2023): accept d_j with probability
min(1, p_j(d_j) / q_j(d_j)); at the first rejection draw from normalise(max(0, p_j - q_j)) and stop;
when all k pass, draw the bonus token from p_k. Each emitted token is then distributed as p (the target
alone), so the output distribution is the target's for any q. A draft with no q (prompt lookup, greedy
drafting) is a point mass: accept with probability p(d), else draw from p with d removed. Every draw
uses the sequence's own np.random.Generator (sampler.rng): a seed reproduces a speculative run (with
the same proposer and k), though not the token stream of a run without speculation.

Adaptive k (AdaptiveK): drafts are assumed accepted independently with rate a, so the j-th draft is
used with probability a^j; a draft position is worth proposing while a^j >= min_gain (the fraction of
a pass that one more draft-and-verify row costs; streamed passes make it small). Hence
k = floor(log(min_gain) / log(a)), clipped to [k_min, k_max]. a is estimated per sequence from the
positions actually judged -- each accepted draft a success, the first rejected one a failure, those
after it unseen -- with counts decayed by `decay` per judged position (a memory of about 1 / (1 -
decay) positions, however they fell into passes) and a Beta(1, 1) prior, so k follows the text (a
quoted passage, then free prose) within a few passes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class Draft:
    """Drafted tokens and, for sampled drafts, q: (len(tokens), vocab) the distributions they were
    drawn from (rows normalised, over the target's vocabulary). q None: a point mass on each token."""

    tokens: list[int] = field(default_factory=list)
    q: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def cut(self, n: int) -> Draft:
        """The first n drafts (the scheduler may verify fewer than were proposed)."""
        return Draft(self.tokens[:n], None if self.q is None else self.q[:n])


class Proposer(Protocol):
    def propose(self, seq_id: int, token_ids, k: int, sampler=None) -> Draft:
        """Up to k tokens to follow token_ids (prompt + generated so far); sampler: the sequence's
        Sampler (its settings and RNG) or None for greedy drafts."""
        ...

    def release(self, seq_id: int) -> None:
        """Forget a finished sequence's state (a draft model's KV cache)."""
        ...


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One id from probs (vocab,) (any non-negative weights, not all 0) by inverse CDF, one uniform."""
    cdf = np.cumsum(probs)
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(i, len(cdf) - 1)


def accept_draft(draft: Draft, logits: np.ndarray, sampler) -> list[int]:
    """The tokens a verification chunk emits: the accepted prefix of draft.tokens, then one token of
    the target's own (corrected or bonus), 1 to k + 1 ids. logits: (k + 1, vocab) the chunk's rows;
    sampler: the sequence's engine Sampler, which records every emitted token (advance()). The rule is
    the module docstring's."""
    k = len(draft.tokens)
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] != k + 1:
        raise ValueError(f"{k} drafts need {k + 1} logits rows, got {logits.shape}")
    out: list[int] = []
    for j, x in enumerate(draft.tokens):
        if sampler.params.greedy:
            tok = sampler.sample(logits[j])              # the argmax, recorded as sample() does
            out.append(tok)
            if tok != x:
                return out
            continue
        p = sampler.probs(logits[j])
        qx = 1.0 if draft.q is None else float(draft.q[j, x])
        if p[x] >= qx or sampler.rng.random() * qx < p[x]:
            sampler.advance(x)
            out.append(x)
            continue
        residual = p.copy()
        if draft.q is None:
            residual[x] = 0.0
        else:
            residual = np.maximum(residual - draft.q[j], 0.0)
        tok = draw(residual, sampler.rng) if residual.sum() > 0 else draw(p, sampler.rng)
        sampler.advance(tok)
        out.append(tok)
        return out
    out.append(sampler.sample(logits[k]))                # every draft accepted: the bonus token
    return out


class AdaptiveK:
    """Per-sequence draft length from the running acceptance rate (rule in the module docstring)."""

    def __init__(self, k_max: int, k_min: int = 1, min_gain: float = 0.1, decay: float = 0.9):
        if not 1 <= k_min <= k_max:
            raise ValueError(f"need 1 <= k_min ({k_min}) <= k_max ({k_max})")
        if not 0 < min_gain < 1 or not 0 < decay <= 1:
            raise ValueError("min_gain must be in (0, 1) and decay in (0, 1]")
        self.k_max, self.k_min, self.min_gain, self.decay = k_max, k_min, min_gain, decay
        self._counts: dict[int, list[float]] = {}       # seq_id -> [successes, trials], decayed

    def rate(self, seq_id: int) -> float:
        s, n = self._counts.get(seq_id, (0.0, 0.0))
        return (s + 1.0) / (n + 2.0)

    def k(self, seq_id: int) -> int:
        a = self.rate(seq_id)
        if a >= 1.0:
            return self.k_max
        return max(self.k_min, min(self.k_max, int(math.log(self.min_gain) / math.log(a))))

    def update(self, seq_id: int, drafted: int, accepted: int) -> None:
        """A pass judged `drafted` drafts and accepted the first `accepted` of them."""
        if drafted == 0:
            return
        c = self._counts.setdefault(seq_id, [0.0, 0.0])
        trials = accepted + (accepted < drafted)
        f = self.decay ** trials
        c[0] = f * c[0] + accepted
        c[1] = f * c[1] + trials

    def release(self, seq_id: int) -> None:
        self._counts.pop(seq_id, None)


@dataclass
class SpecStats:
    """drafted: draft tokens verified; accepted: of which accepted; passes: verification chunks;
    emitted: tokens those chunks produced (accepted + one each)."""

    drafted: int = 0
    accepted: int = 0
    passes: int = 0
    emitted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens a verification pass emits on average (1 without speculation)."""
        return self.emitted / self.passes if self.passes else 0.0

    def as_dict(self) -> dict:
        return {"spec_drafted": self.drafted, "spec_accepted": self.accepted, "spec_passes": self.passes,
                "spec_acceptance_rate": round(self.acceptance_rate, 4),
                "spec_tokens_per_pass": round(self.tokens_per_pass, 4)}


class Speculator:
    """One proposer with adaptive k, the acceptance rule and the stats, for a runner to call per sequence.

    speculator = Speculator(NgramProposer(), k_max=8)
    draft = speculator.draft(seq_id, token_ids, sampler, limit)   # limit: drafts worth making at most
    ids = speculator.verify(seq_id, chunk.draft, rows, sampler)   # the chunk's tokens, for commit()
    speculator.release(seq_id)                                    # the sequence finished
    """

    def __init__(self, proposer: Proposer, k_max: int = 8, k_min: int = 1, adaptive: bool = True,
                 min_gain: float = 0.1):
        self.proposer = proposer
        self.k_max = k_max
        self.adaptive = AdaptiveK(k_max, k_min, min_gain) if adaptive else None
        self.stats = SpecStats()
        self._pending: dict[int, Draft] = {}

    def draft(self, seq_id: int, token_ids, sampler=None, limit: int | None = None) -> Draft:
        """Propose for seq_id's next step: k from its acceptance rate (k_max when not adaptive), at
        most `limit` (e.g. max_tokens - generated - 1: drafts past the end are wasted rows)."""
        k = self.adaptive.k(seq_id) if self.adaptive else self.k_max
        if limit is not None:
            k = min(k, max(0, limit))
        d = self.proposer.propose(seq_id, token_ids, k, sampler) if k else Draft()
        if len(d) > k:
            raise ValueError(f"the proposer returned {len(d)} drafts for k = {k}")
        self._pending[seq_id] = d
        return d

    def verify(self, seq_id: int, scheduled, logits: np.ndarray, sampler) -> list[int]:
        """The tokens seq_id's logits chunk emits. scheduled: the drafts the scheduler verified (a prefix
        of the last draft(), possibly empty); logits: the chunk's (len(scheduled) + 1, vocab) rows."""
        d = self._pending.pop(seq_id, Draft())
        n = len(scheduled)
        if list(scheduled) != d.tokens[:n]:
            raise ValueError(f"seq {seq_id}: verified drafts {list(scheduled)} are not a prefix of {d.tokens}")
        ids = accept_draft(d.cut(n), logits, sampler)
        if n:
            self.stats.drafted += n
            self.stats.accepted += len(ids) - 1
            self.stats.passes += 1
            self.stats.emitted += len(ids)
            if self.adaptive:
                self.adaptive.update(seq_id, n, len(ids) - 1)
        return ids

    def release(self, seq_id: int) -> None:
        self._pending.pop(seq_id, None)
        if self.adaptive:
            self.adaptive.release(seq_id)
        self.proposer.release(seq_id)

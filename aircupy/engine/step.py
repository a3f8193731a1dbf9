"""What the scheduler hands a model runner for one forward step: plain, printable, comparable data.

A Step is a list of chunks, one per scheduled sequence: decode rows first (one token each), then prefill
chunks, in the order the scheduler chose them. Chunk s runs tokens at positions [start, start + n);
the KV of positions [0, start) is already in the cache, through its block table. Flattened over the
step (Step.arrays()), N rows in chunk order:

    input_ids (N,), positions (N,)   what to run
    slot_mapping (N,)                where each row writes its K and V (slot = block * B + offset)
    query_start (S + 1,)             rows of chunk s: [query_start[s], query_start[s + 1])
    context_lens (S,)                KV length chunk s's last row attends to: start + n; row j of the
                                     chunk attends causally to positions [0, start + j]
    block_tables (S, max_blocks)     each chunk's blocks covering [0, start + n), padded with -1
    logits_rows (R,)                 rows whose logits are sampled: the last row of every chunk that
                                     ends its sequence's unfed tokens (every decode row, the last row
                                     of a completed prefill), and every row of a verification chunk

A verification chunk (speculative decoding) is a decode row followed by num_draft drafted tokens: rows
[last sampled token, d_1 .. d_k] at positions [start, start + 1 + k), all k + 1 of them logits rows.
Row j's logits are the target's distribution for the token after row j's token: row 0 judges d_1, row
j judges d_(j+1), row k gives the bonus token when every draft is accepted. logits_chunks lists the
chunks that yield tokens (commit() takes one entry per chunk, this order) and logits_slices the rows of
each in a forward pass's (R, vocab) logits.

A chunk may read blocks that an earlier chunk of the same step writes (two sequences sharing a prompt
prefix): a runner writes every row's KV of a layer before that layer's attention, or runs the chunks
one after another in step order. For the same reason it runs every chunk, even one whose sequence was
finished while the step was being prepared.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ScheduledChunk:
    """One sequence's share of a step: token_ids at positions [start, start + len(token_ids))."""

    seq_id: int
    token_ids: tuple[int, ...]
    start: int                      # tokens whose KV is already written; position of token_ids[0]
    slots: tuple[int, ...]          # KV write slot of each token
    block_table: tuple[int, ...]    # blocks covering positions [0, end)
    logits: bool                    # the last row's logits sample the sequence's next token
    num_draft: int = 0              # a verification chunk: the last num_draft tokens are drafts, and
                                    # all 1 + num_draft rows yield logits

    @property
    def draft(self) -> tuple[int, ...]:
        """The drafted tokens this chunk verifies (empty for an ordinary chunk)."""
        return self.token_ids[len(self.token_ids) - self.num_draft:] if self.num_draft else ()

    @property
    def num_logits(self) -> int:
        """Logits rows of this chunk: 0, 1, or 1 + num_draft for a verification chunk."""
        return (1 + self.num_draft) if self.logits else 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    @property
    def positions(self) -> range:
        return range(self.start, self.end)

    def __str__(self) -> str:
        if self.num_draft:
            what, slots = f"verify  pos {self.start} + {self.num_draft} drafts", f"slots {_runs(self.slots)}"
        elif self.num_tokens == 1:
            what, slots = f"decode  pos {self.start}", f"slot {self.slots[0]}"
        else:
            what, slots = f"prefill [{self.start}, {self.end})", f"slots {_runs(self.slots)}"
        return (f"seq {self.seq_id}: {what} {slots} blocks {list(self.block_table)}"
                f"{' -> logits' if self.logits else ''}")


@dataclass(frozen=True)
class Step:
    """One forward step: the chunks to run, and the sequences preempted while it was built."""

    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def logits_chunks(self) -> tuple[ScheduledChunk, ...]:
        """Chunks that yield a sampled token, in the order commit() expects their ids."""
        return tuple(c for c in self.chunks if c.logits)

    @property
    def logits_rows(self) -> tuple[int, ...]:
        """Rows whose logits the forward pass returns, in step order: each logits chunk's last
        num_logits rows."""
        rows, n = [], 0
        for c in self.chunks:
            n += c.num_tokens
            rows.extend(range(n - c.num_logits, n))
        return tuple(rows)

    @property
    def logits_slices(self) -> tuple[slice, ...]:
        """For each of logits_chunks, its rows in the (R, vocab) logits of logits_rows."""
        out, r = [], 0
        for c in self.logits_chunks:
            out.append(slice(r, r + c.num_logits))
            r += c.num_logits
        return tuple(out)

    def __bool__(self) -> bool:
        return bool(self.chunks)

    def arrays(self) -> dict[str, np.ndarray]:
        """The step as flat int32 arrays for a batched forward (shapes in the module docstring)."""
        c = self.chunks
        lens = np.array([x.num_tokens for x in c], dtype=np.int32)
        width = max((len(x.block_table) for x in c), default=0)
        tables = np.full((len(c), width), -1, dtype=np.int32)
        for i, x in enumerate(c):
            tables[i, :len(x.block_table)] = x.block_table
        flat = lambda f: np.array([v for x in c for v in f(x)], dtype=np.int32)   # noqa: E731
        return dict(input_ids=flat(lambda x: x.token_ids), positions=flat(lambda x: x.positions),
                    slot_mapping=flat(lambda x: x.slots),
                    query_start=np.concatenate([[0], np.cumsum(lens)]).astype(np.int32),
                    context_lens=np.array([x.end for x in c], dtype=np.int32), block_tables=tables,
                    logits_rows=np.array(self.logits_rows, dtype=np.int32))

    def __str__(self) -> str:
        head = f"Step: {len(self.chunks)} sequences, {self.num_tokens} tokens, {len(self.logits_rows)} logits rows"
        if self.preempted:
            head += f", preempted {list(self.preempted)}"
        return "\n".join([head] + [f"  {c}" for c in self.chunks])


def _runs(slots) -> str:
    """Slots as contiguous runs: '16..31, 48..51'."""
    out, i = [], 0
    while i < len(slots):
        j = i
        while j + 1 < len(slots) and slots[j + 1] == slots[j] + 1:
            j += 1
        out.append(f"{slots[i]}..{slots[j]}" if j > i else f"{slots[i]}")
        i = j + 1
    return ", ".join(out)

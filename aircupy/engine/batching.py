"""An Engine's batching limits and the size of its KV pool: plain arithmetic, checked before any work.

    limits = BatchLimits.check(max_num_seqs=64, max_batched_tokens=None, kv_cache_tokens=None, n_ctx=2048)
    model = load_model(..., **limits.load_kwargs())          # the CUDA backend plans its buffers from them
    plan = plan_kv(model.kv_spec(), limits, n_ctx, kv_bytes_per_token, ram_bytes)

max_num_seqs        sequences in one forward step at most (the running batch); the rest wait.
max_batched_tokens  tokens in one step at most: every running sequence's decode row plus prefill
                    chunks; so >= max_num_seqs. Default max(512, max_num_seqs): 512 prompt tokens per
                    step bound the (heads, tokens, context) attention scores of a prefill chunk (9 heads
                    x 512 x 4096 x 4 B = 75 MB for SmolLM2 at a full context) at little cost in BLAS
                    efficiency, as the single-sequence engine's prefill chunk did.
kv_cache_tokens     KV slots of the pool; at least n_ctx (a sequence alone must always fit: a full
                    pool makes requests wait, never fail). Default where the engine sizes the pool
                    (numpy): max(n_ctx, min(max_num_seqs * n_ctx, what a quarter of the machine's RAM
                    holds)). A quarter leaves room for the weights (float32 on numpy), the activations
                    and the rest of the machine; the pool's pages are touched only as blocks get used,
                    so an idle engine costs address space only. Where the model plans its own pool (the
                    CUDA backend: kv_spec's num_blocks), the model's figure wins.

Block sizes come from model.kv_spec(); the block manager needs a power of two. The KV shuttle's spec
(one block of n_ctx tokens, one sequence) may be any size: with a single block every slot is its
position, so the manager's block is rounded up to a power of two while the pool keeps the model's size
(positions stay below n_ctx <= the model's block).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from aircupy.errors import InvalidParameterError

DEFAULT_STEP_TOKENS = 512
RAM_SHARE = 4          # the default numpy pool takes at most 1/RAM_SHARE of the machine's memory


@dataclass(frozen=True)
class BatchLimits:
    """The Engine's arguments, checked; kv_cache_tokens None: the default (see the module docstring)."""

    max_num_seqs: int
    max_batched_tokens: int
    kv_cache_tokens: int | None

    @classmethod
    def check(cls, max_num_seqs, max_batched_tokens, kv_cache_tokens, n_ctx: int) -> "BatchLimits":
        _positive_int("max_num_seqs", max_num_seqs)
        if max_batched_tokens is None:
            max_batched_tokens = max(DEFAULT_STEP_TOKENS, max_num_seqs)
        _positive_int("max_batched_tokens", max_batched_tokens)
        if max_batched_tokens < max_num_seqs:
            raise InvalidParameterError("max_batched_tokens", f"must be >= max_num_seqs ({max_num_seqs}): every "
                                                              f"running sequence needs its decode row, got "
                                                              f"{max_batched_tokens}")
        if kv_cache_tokens is not None:
            _positive_int("kv_cache_tokens", kv_cache_tokens)
            if kv_cache_tokens < n_ctx:
                raise InvalidParameterError("kv_cache_tokens", f"must be >= n_ctx ({n_ctx}), so that a sequence "
                                                               f"alone always fits, got {kv_cache_tokens}")
        return cls(max_num_seqs, max_batched_tokens, kv_cache_tokens)

    def load_kwargs(self) -> dict:
        """What load_model passes to the backend (kv_tokens None: the backend's choice)."""
        return dict(max_num_seqs=self.max_num_seqs, max_batched_tokens=self.max_batched_tokens,
                    kv_tokens=self.kv_cache_tokens)


@dataclass(frozen=True)
class KVPlan:
    """The runner's pool and limits: the model's pool of num_blocks x block_size slots, the block
    manager's (power of two) block size, and the scheduler's limits."""

    num_blocks: int
    block_size: int               # the model's (new_kv_pool)
    manager_block_size: int       # the block manager's: block_size, or a single block's power of two
    max_num_seqs: int
    max_batched_tokens: int

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size


def plan_kv(spec: dict, limits: BatchLimits, n_ctx: int, bytes_per_token: int,
            ram_bytes: int | None) -> KVPlan:
    """The pool for a model's kv_spec() under the Engine's limits (see the module docstring)."""
    block = spec.get("block_size")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"kv_spec(): block_size must be a positive integer, got {block!r}")
    seqs = limits.max_num_seqs
    if spec.get("max_num_seqs") is not None:
        seqs = min(seqs, int(spec["max_num_seqs"]))
    num_blocks = spec.get("num_blocks")
    if num_blocks is None:
        num_blocks = -(-default_kv_tokens(limits, n_ctx, bytes_per_token, ram_bytes) // block)
        asked = limits.kv_cache_tokens is not None      # (the default stays within a quarter of the RAM)
        if asked and ram_bytes is not None and num_blocks * block * bytes_per_token > ram_bytes:
            raise InvalidParameterError("kv_cache_tokens", f"{num_blocks * block} tokens of KV cache need "
                                                           f"{num_blocks * block * bytes_per_token / 2**30:.1f} GiB, "
                                                           f"more than this machine's {ram_bytes / 2**30:.1f} GiB")
    num_blocks = int(num_blocks)
    if num_blocks * block < n_ctx:
        raise InvalidParameterError("kv_cache_tokens", f"the model's KV pool holds {num_blocks * block} tokens, "
                                                       f"fewer than n_ctx ({n_ctx})")
    manager_block = block
    if block & (block - 1):
        if num_blocks != 1:
            raise ValueError(f"kv_spec(): block_size {block} is not a power of two (allowed for one block only)")
        manager_block = 1 << (block - 1).bit_length()
    return KVPlan(num_blocks, block, manager_block, seqs, limits.max_batched_tokens)


def default_kv_tokens(limits: BatchLimits, n_ctx: int, bytes_per_token: int, ram_bytes: int | None) -> int:
    """kv_cache_tokens as asked, else max(n_ctx, min(max_num_seqs * n_ctx, RAM / RAM_SHARE worth))."""
    if limits.kv_cache_tokens is not None:
        return limits.kv_cache_tokens
    want = limits.max_num_seqs * n_ctx
    if ram_bytes is not None:
        want = min(want, ram_bytes // RAM_SHARE // max(1, bytes_per_token))
    return max(n_ctx, want)


def machine_ram() -> int | None:
    """This machine's physical memory in bytes, None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InvalidParameterError(name, f"must be a positive integer, got {v!r}")

"""The Model protocol: what the engine asks of a backend's model, and nothing more.

Both backends implement it: aircupy.reference.model.NumpyModel (the float32 oracle, on the host) and
aircupy.cuda.model.CudaModel (resident or streamed, on the GPU). The engine codes against this
protocol alone; the backend factory (engine/backend.py) is the only place that names them.

The batched methods: every request goes through them (engine/runner.py, one thread drives them).

    spec = model.kv_spec()          # dict(block_size=int, num_blocks=int | None, max_num_seqs=int | None)
        What the model's KV memory allows. block_size: tokens per KV block (a power of two, or any
        size when num_blocks is 1); num_blocks: the blocks the model planned (the CUDA pool), None
        when the engine sizes the pool itself (numpy: from host RAM); max_num_seqs: the most
        sequences one step may hold, None for no limit of the model's own. The KV shuttle (KV in
        pinned host RAM) says block_size = n_ctx, num_blocks = 1, max_num_seqs = 1: one sequence at
        a time, in one block.
    kv = model.new_kv_pool(num_blocks, block_size)
        The paged KV pool that forward_step reads and writes, slot = block * block_size + offset
        (engine/blocks.py numbers them).
    logits = model.forward_step(arrays, kv)      # float32 (R, vocab)
        One scheduler step, arrays = Step.arrays() (engine/step.py gives the shapes): every row's K/V
        written at its slot, the logits of the R logits_rows returned in that order.
    ids, logits = model.forward_step_sample(arrays, kv, samplers)
        The same step, with samplers[i] (one per logits row) either a device sampler from
        model.new_sampler(params) (row i sampled on the device: ids[i] is the token id) or None (ids[i]
        = -1 and logits[i] holds the row for the host sampler). ids int32 (R,); logits float32 (R,
        vocab), or None when every row was sampled on the device. A device sampler is stateful: its
        seed counter advances by one per token it samples, so a seeded sequence draws the same tokens
        whatever else shares its steps.
    sampler = model.new_sampler(params)          # None: this model samples nothing on the device
        (numpy always; CUDA for logit bias and penalties, or a sampler whose `.supported` is False:
        the engine then samples that sequence on the host).

    load_model(...) in engine/backend.py passes max_num_seqs, max_batched_tokens and kv_tokens (the
    engine's limits; None where unset) so a backend can plan its buffers; numpy ignores them.

The single-sequence methods stay for tests and benchmarks (the engine does not use them):

    cache = model.new_cache(n_ctx)                  # a KV cache: .length tokens held, .truncate(n)
    logits = model.forward(ids (T,), positions (T,), cache, all_logits=False)   # float32 (1|T, vocab)
    token = model.forward_sample(ids, positions, cache, sampler)   # the next id, sampled by the model

positions must continue the cache (cache.length + arange(T)); a step advances cache.length by T.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class Cache(Protocol):
    length: int
    n_ctx: int

    def truncate(self, n: int) -> None: ...


class Model(Protocol):
    config: object          # aircupy.config.ModelConfig

    # -- batched: what the engine uses ------------------------------------------------------------
    def kv_spec(self) -> dict: ...

    def new_kv_pool(self, num_blocks: int, block_size: int) -> object: ...

    def forward_step(self, arrays: dict, kv) -> np.ndarray: ...

    def forward_step_sample(self, arrays: dict, kv, samplers) -> tuple[np.ndarray, np.ndarray | None]: ...

    def new_sampler(self, params) -> object | None: ...

    # -- one sequence: tests and benchmarks -------------------------------------------------------
    def new_cache(self, n_ctx: int) -> Cache: ...

    def forward(self, token_ids, positions, cache: Cache, all_logits: bool = False) -> np.ndarray: ...

    def forward_sample(self, token_ids, positions, cache: Cache, sampler) -> int: ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...

"""The Model protocol: what the engine asks of a backend's model, and nothing more.

Both backends implement it: aircupy.reference.model.NumpyModel (the float32 oracle, on the host) and
aircupy.cuda.model.CudaModel (resident or streamed, on the GPU). The engine codes against this
protocol alone; the backend factory (engine/backend.py) is the only place that names them.

    cache = model.new_cache(n_ctx)                  # a KV cache: .length tokens held, .truncate(n)
    logits = model.forward(ids (T,), positions (T,), cache, all_logits=False)   # float32 (1|T, vocab)
    sampler = model.new_sampler(params)             # None: sample on the host from forward()'s logits
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

    def new_cache(self, n_ctx: int) -> Cache: ...

    def forward(self, token_ids, positions, cache: Cache, all_logits: bool = False) -> np.ndarray: ...

    def new_sampler(self, params) -> object | None: ...

    def forward_sample(self, token_ids, positions, cache: Cache, sampler) -> int: ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...

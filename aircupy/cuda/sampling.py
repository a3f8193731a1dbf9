"""Decode steps on the device: graph-replayed single-token passes, and sampling so only ids cross.

    sampler = model.new_sampler(params)            # seed fixed here (params.seed or fresh entropy)
    token = model.forward_sample(ids, pos, cache, sampler)

Two captured graphs serve every single-token step on the start-up (pooled) KV cache:
    logits graph:  io upload -> layers -> head -> logits (1, V) download        (forward)
    sample graph:  io upload -> layers -> head -> sample kernel -> id download   (forward_sample)
`io` (int32 (8,), see cuda/buffers.py) carries the step's token, position, rng (seed, counter) and
sampling parameters in one pinned copy, so one graph serves every request and setting. The counter
lives on the host sampler and advances once per sampled token, so a seed reproduces its tokens.

Device sampling covers temperature, top-k, top-p, min-p and the seed. Logit bias and the repetition
penalties need per-request token tables: `DeviceSampler.supported` is False for those settings and the
caller samples on the host from forward()'s logits instead.
"""
from __future__ import annotations

import secrets

import numpy as np

from aircupy.cuda.graphs import PinnedIO, StepGraph
from aircupy.errors import InvalidParameterError


class DeviceSampler:
    """One request's device-sampling state: parameters, seed and a per-token counter."""

    def __init__(self, params):
        self.params = params
        self.seed = int(params.seed if params.seed is not None else secrets.randbits(32)) & 0xFFFFFFFF
        self.counter = 0
        bias = getattr(params, "logit_bias", None)
        self.supported = (not bias and params.repeat_penalty == 1.0
                          and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0)

    def io_words(self, token: int, pos: int) -> np.ndarray:
        """The 8 int32 words of the io buffer for one step."""
        p = self.params
        words = np.empty(8, dtype=np.int32)
        words[0], words[1] = token, pos
        words[2:4] = np.array([self.seed, self.counter & 0xFFFFFFFF], dtype=np.uint32).view(np.int32)
        words[4:8] = np.array([p.temperature, p.top_k, p.top_p, p.min_p], np.float32).view(np.int32)
        return words


class DeviceSampling:
    def __init__(self, model, use_graphs: bool):
        self.m = model
        b = model.buf
        self.io = PinnedIO(b.io)
        self.logits_out = PinnedIO(b.logits[:1])
        self.token_out = PinnedIO(b.token[:1])
        # The pooled KV views, for the graphs (any cache object holding the pool has the same ones).
        self.pool_kv = model.pooled_cache()
        self.g_logits = StepGraph(self._step_logits, model.stream, use_graphs)
        self.g_sample = StepGraph(self._step_sample, model.stream, use_graphs)

    # -- captured steps (launches only) ----------------------------------------------------------

    def _decode(self) -> None:
        m, b = self.m, self.m.buf
        self.io.upload(m.stream)
        m.fwd.run(b.dec[0:1], b.dec[1:2], 1, self.pool_kv)
        m.fwd.head(0, 1)

    def _step_logits(self) -> None:
        self._decode()
        self.logits_out.download(self.m.stream)

    def _sample_last(self) -> None:
        from aircupy.cuda import ops
        b = self.m.buf
        ops.sample(self.m.lib, b.logits[:1], b.sparams, b.rng, b.token[:1])
        self.token_out.download(self.m.stream)

    def _step_sample(self) -> None:
        self._decode()
        self._sample_last()

    # -- entry points ---------------------------------------------------------------------------

    def decode_logits(self, token: int, pos: int) -> np.ndarray:
        self.io.host[:2] = (token, pos)
        self.g_logits.launch()
        self.m.stream.synchronize()
        return self.logits_out.host.copy()

    def forward_sample(self, token_ids, positions, cache, sampler: DeviceSampler) -> int:
        m = self.m
        if not isinstance(sampler, DeviceSampler):
            raise TypeError("forward_sample takes the DeviceSampler of model.new_sampler(params)")
        if not sampler.supported:
            raise InvalidParameterError("sampling", "logit_bias and repetition/presence/frequency "
                                                    "penalties are applied on the host: use forward()")
        ids, pos = m.check_step(token_ids, positions, cache)
        T = len(ids)
        self.io.host[:] = sampler.io_words(int(ids[-1]), int(pos[-1]))
        if T == 1 and cache.pooled:
            self.g_sample.launch()
        else:
            with m.stream:
                for c0 in range(0, T, m.rows):
                    n = m.prefill_chunk(ids[c0:c0 + m.rows], pos[c0:c0 + m.rows], cache)
                m.fwd.head(n - 1, n)
                self.io.upload(m.stream)  # sampling parameters and rng for the kernel
                self._sample_last()
        m.stream.synchronize()
        cache.length += T
        sampler.counter += 1
        return int(self.token_out.host[0])

    def graph_report(self) -> str:
        parts = []
        for name, g in (("decode", self.g_logits), ("sample", self.g_sample)):
            state = "captured" if g.graph is not None else (g.fallback_reason or "not yet captured")
            parts.append(f"{name} graph {state} ({g.replays} replays)")
        return ", ".join(parts)

"""What the Engine hands back: GenerationResult (a whole request), StreamEvent (one step of a stream),
TokenLogprob (one generated token's logprob and its top alternatives), and the timing bookkeeping.

All of them turn into plain JSON-able dicts with to_dict(); the CLI's --json and the HTTP server use those.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    """token_id/token/logprob of the generated token; `top`: (id, text, logprob) sorted by logprob desc.

    Logprobs are the raw model's log-softmax (see sampler.py), so they do not depend on temperature.
    """
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()

    def to_dict(self) -> dict:
        return {"id": self.token_id, "token": self.token, "logprob": self.logprob,
                "top_logprobs": [{"id": i, "token": t, "logprob": lp} for i, t, lp in self.top]}


@dataclass(frozen=True)
class StreamEvent:
    """One decode step: the text it made visible (may be "" while a possible stop string is held back,
    or while a multi-byte character is incomplete), the token ids it generated, and on the last event the
    finish_reason ("stop" | "length"; None before). The last event also carries the whole `result`
    (usage and timings for a server's final chunk)."""
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    result: "GenerationResult | None" = None


@dataclass
class GenerationResult:
    """A finished request. token_ids are every generated id (an end-of-generation token included, and the
    token that completed a stop string); `text` excludes end-of-generation tokens and stop strings."""
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    usage: dict[str, int]
    timings: dict[str, float]
    logprobs: list[TokenLogprob] | None = None
    stop_string: str | None = None

    def to_dict(self) -> dict:
        d = {"prompt_token_ids": list(self.prompt_token_ids), "token_ids": list(self.token_ids),
             "text": self.text, "finish_reason": self.finish_reason, "usage": dict(self.usage),
             "timings": dict(self.timings)}
        if self.logprobs is not None:
            d["logprobs"] = [lp.to_dict() for lp in self.logprobs]
        return d


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Timer:
    """Engine-side time of one request. Only time spent inside the engine counts: a stream consumer that
    pauses between events does not slow the reported decode rate.

    prompt_s: the prompt forward (only the tokens not reused from the KV cache);
    decode_s: the decode steps after the first token; ttft_s: request start to the first sampled token.
    """
    start: float = field(default_factory=time.perf_counter)
    prompt_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float | None = None
    prompt_evaluated: int = 0   # prompt tokens actually run through the model
    prompt_cached: int = 0      # prompt tokens whose KV came from the previous request
    decode_steps: int = 0       # forward passes of one generated token

    def as_dict(self) -> dict[str, float]:
        def rate(n, s):
            return round(n / s, 3) if s > 0 and n > 0 else 0.0
        return {"prompt_s": round(self.prompt_s, 6), "decode_s": round(self.decode_s, 6),
                "ttft_s": round(self.ttft_s or 0.0, 6),
                "prompt_tokens_per_s": rate(self.prompt_evaluated, self.prompt_s),
                "decode_tokens_per_s": rate(self.decode_steps, self.decode_s),
                "prompt_evaluated_tokens": self.prompt_evaluated,
                "prompt_cached_tokens": self.prompt_cached}

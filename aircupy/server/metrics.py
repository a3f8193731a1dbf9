"""Server counters and their Prometheus text exposition (format 0.0.4), no client library needed.

One Metrics instance per app (no module-level state). Updated from the event loop (requests) and the
engine's runner thread (tokens), hence the lock. render() also reads the queue depth (generation
requests in flight) and, when the engine has a stats() method, the batching gauges (running and waiting
sequences, KV blocks used and free, prefix-cache hit rate, preemptions) under their own names, and
every numeric value it returns as aircupy_engine_<key> (the streaming engine's copy/compute figures).
"""
from __future__ import annotations

import re
import threading
import time
from collections import Counter
from typing import Any, Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key).strip("_").lower() or "value"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._started = time.time()
        self.requests: Counter = Counter()        # (endpoint, status) -> count
        self.request_seconds = 0.0                 # sum of request wall times (for an average)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.generation_seconds = 0.0              # engine time of finished generations (they overlap)
        self.last_tokens_per_s = 0.0               # completion tokens / generation time, last request

    def on_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.request_seconds += seconds

    def on_tokens(self, n: int) -> None:
        with self._lock:
            self.generated_tokens += n

    def on_finished(self, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        """A generation request left the engine (finished, failed or cancelled)."""
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.generation_seconds += seconds
            if completion_tokens and seconds > 0:
                self.last_tokens_per_s = completion_tokens / seconds

    def render(self, queue_depth: int, engine_stats: Callable[[], Any] | None = None) -> str:
        with self._lock:
            reqs = sorted(self.requests.items())
            total_s = self.generation_seconds
            gen = self.generated_tokens
            lines = [
                "# HELP aircupy_requests_total HTTP requests answered, by endpoint and status.",
                "# TYPE aircupy_requests_total counter",
                *(f'aircupy_requests_total{{endpoint="{_label(e)}",status="{s}"}} {n}' for (e, s), n in reqs),
                "# HELP aircupy_request_seconds_total Wall time of answered requests.",
                "# TYPE aircupy_request_seconds_total counter",
                f"aircupy_request_seconds_total {self.request_seconds:.6f}",
                "# HELP aircupy_prompt_tokens_total Prompt tokens of generation requests.",
                "# TYPE aircupy_prompt_tokens_total counter",
                f"aircupy_prompt_tokens_total {self.prompt_tokens}",
                "# HELP aircupy_generation_tokens_total Tokens generated.",
                "# TYPE aircupy_generation_tokens_total counter",
                f"aircupy_generation_tokens_total {gen}",
                "# HELP aircupy_generation_seconds_total Time the engine spent on generation requests.",
                "# TYPE aircupy_generation_seconds_total counter",
                f"aircupy_generation_seconds_total {total_s:.6f}",
                "# HELP aircupy_tokens_per_second Generated tokens per second: average and last request.",
                "# TYPE aircupy_tokens_per_second gauge",
                f'aircupy_tokens_per_second{{window="all"}} {gen / total_s if total_s > 0 else 0.0:.3f}',
                f'aircupy_tokens_per_second{{window="last"}} {self.last_tokens_per_s:.3f}',
            ]
        lines += [
            "# HELP aircupy_queue_depth Generation requests in flight (waiting or running in the engine).",
            "# TYPE aircupy_queue_depth gauge",
            f"aircupy_queue_depth {queue_depth}",
            "# HELP aircupy_uptime_seconds Seconds since the server started.",
            "# TYPE aircupy_uptime_seconds gauge",
            f"aircupy_uptime_seconds {time.time() - self._started:.3f}",
        ]
        lines += _engine_lines(engine_stats)
        return "\n".join(lines) + "\n"


def _flatten(prefix: str, value: Any, out: list[tuple[str, float]]) -> None:
    """Numbers (and nested dicts of numbers) -> (name, value); strings and lists are skipped."""
    if isinstance(value, bool):
        out.append((prefix, float(value)))
    elif isinstance(value, (int, float)):
        out.append((prefix, float(value)))
    elif isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}_{_name(str(k))}", v, out)
    elif hasattr(value, "__dataclass_fields__"):
        _flatten(prefix, {k: getattr(value, k) for k in value.__dataclass_fields__}, out)


def _engine_lines(engine_stats: Callable[[], Any] | None) -> list[str]:
    """engine.stats() as gauges aircupy_engine_<key>; absent or failing stats add nothing."""
    if engine_stats is None:
        return []
    try:
        stats = engine_stats()
    except Exception as e:  # noqa: BLE001 - metrics must never take the endpoint down
        return [f"# engine stats unavailable: {type(e).__name__}"]
    pairs: list[tuple[str, float]] = []
    _flatten("aircupy_engine", stats, pairs)
    lines = _batching_lines(stats if isinstance(stats, dict) else {})
    for name, v in pairs:
        lines += [f"# TYPE {name} gauge", f"{name} {v:.6g}" if v == v else f"{name} NaN"]
    return lines


# engine.stats() key -> (metric, type, help): the continuous-batching state, named for dashboards
_BATCHING = [
    ("running", "aircupy_running_sequences", "gauge", "Sequences in the engine's running batch."),
    ("waiting", "aircupy_waiting_sequences", "gauge", "Sequences waiting for a place in the batch."),
    ("kv_blocks_used", "aircupy_kv_blocks_used", "gauge", "KV cache blocks held by sequences."),
    ("kv_blocks_free", "aircupy_kv_blocks_free", "gauge", "KV cache blocks free (prefix-cached ones included)."),
    ("prefix_cache_hit_rate", "aircupy_prefix_cache_hit_rate", "gauge",
     "Prompt tokens found in the prefix cache / prompt tokens, since start."),
    ("preemptions", "aircupy_preemptions_total", "counter", "Sequences preempted for want of KV blocks."),
    ("spec_drafted", "aircupy_spec_draft_tokens_total", "counter",
     "Speculative decoding: drafted tokens verified by the target."),
    ("spec_accepted", "aircupy_spec_accepted_tokens_total", "counter",
     "Speculative decoding: drafted tokens the target accepted."),
    ("spec_acceptance_rate", "aircupy_spec_acceptance_rate", "gauge",
     "Speculative decoding: accepted / drafted tokens, since start."),
    ("spec_tokens_per_pass", "aircupy_spec_tokens_per_pass", "gauge",
     "Speculative decoding: tokens a verification pass emitted on average, since start."),
]


def _batching_lines(stats: dict) -> list[str]:
    lines = []
    for key, name, kind, text in _BATCHING:
        v = stats.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {v:.6g}"]
    return lines

"""OpenAI response, chunk and logprob shapes, built from plain values (no model, no engine).

A generation is reported through ChoiceResult and the engine's TokenLogprob (aircupy.engine.results:
token_id, token, logprob, top = ((id, text, logprob), ...) best first; duck-typed here); every function
turns those into the exact JSON objects OpenAI's clients parse.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field


@dataclass
class ChoiceResult:
    """A finished choice of a non-streamed answer."""
    index: int
    text: str
    finish_reason: str | None
    logprobs: list = field(default_factory=list)  # TokenLogprob per generated token
    tool_calls: list | None = None   # chat with tools: [ToolCall.to_dict()], text then what is outside them


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def now() -> int:
    return int(time.time())


def finish_reason(engine_reason: str | None) -> str | None:
    """OpenAI knows "stop" (EOS, stop string) and "length" (max_tokens or the context limit)."""
    if engine_reason is None:
        return None
    return "length" if engine_reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _bytes(s: str) -> list[int]:
    return list(s.encode("utf-8", "surrogatepass"))


def chat_logprobs(lps: list) -> dict:
    """OpenAI chat format: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": _bytes(t.token),
                         "top_logprobs": [{"token": s, "logprob": lp, "bytes": _bytes(s)} for _, s, lp in t.top]}
                        for t in lps],
            "refusal": None}


def completion_logprobs(lps: list, text_offset: int = 0) -> dict:
    """Legacy completions format: parallel lists; top_logprobs is one {token: logprob} dict per token.

    text_offset: characters of completion text emitted before these tokens (continues across chunks).
    """
    offsets = []
    for t in lps:
        offsets.append(text_offset)
        text_offset += len(t.token)
    return {"tokens": [t.token for t in lps], "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [{s: lp for _, s, lp in t.top} for t in lps], "text_offset": offsets}


def _logprobs(kind: str, lps: list | None, text_offset: int = 0) -> dict | None:
    if lps is None:
        return None
    return chat_logprobs(lps) if kind == "chat" else completion_logprobs(lps, text_offset)


def completion_response(kind: str, rid: str, created: int, model: str, choices: list[ChoiceResult],
                        prompt_tokens: int, completion_tokens: int, with_logprobs: bool) -> dict:
    """The whole answer of a non-streamed chat.completion / text_completion."""
    out = []
    for c in sorted(choices, key=lambda c: c.index):
        lp = _logprobs(kind, c.logprobs if with_logprobs else None)
        if kind == "chat":
            message = {"role": "assistant", "content": c.text}
            if c.tool_calls:
                message["tool_calls"] = c.tool_calls
            out.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": c.finish_reason})
        else:
            out.append({"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason})
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created, "model": model, "system_fingerprint": None, "choices": out,
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(kind: str, rid: str, created: int, model: str, index: int, *, text: str | None = None,
          role: bool = False, finish: str | None = None, logprobs: list | None = None,
          text_offset: int = 0, include_usage: bool = False, tool_calls: list | None = None) -> dict:
    """One streamed chunk for one choice. Chat: delta {role?, content?, tool_calls?}; completions: text."""
    lp = _logprobs(kind, logprobs, text_offset)
    if kind == "chat":
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        if tool_calls:
            delta["tool_calls"] = tool_calls
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
    else:
        choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
    out = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
           "created": created, "model": model, "system_fingerprint": None, "choices": [choice]}
    if include_usage:  # OpenAI: with include_usage every chunk carries "usage": null but the last
        out["usage"] = None
    return out


def usage_chunk(kind: str, rid: str, created: int, model: str, prompt_tokens: int,
                completion_tokens: int) -> dict:
    """The final chunk of stream_options.include_usage: no choices, the request's usage."""
    return {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created, "model": model, "system_fingerprint": None, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def sse(obj: dict | str) -> bytes:
    """One server-sent event: `data: {...}\\n\\n` (or `data: [DONE]\\n\\n`)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def models_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "aircupy"}]}

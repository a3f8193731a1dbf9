"""Between a validated request and the engine: prepare() tokenizes and checks it, run() generates.

prepare() runs off the event loop (it renders the chat template and tokenizes) and raises every error a
client can cause before any response is sent, so those come back as a 400 and never as a broken stream.
run() is a Worker job: it generates the choices one after another (prompt by prompt, n per prompt) with
engine.stream(), and emits Delta events for the request's coroutine and, at the end, Done.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from aircupy.errors import ContextLengthError, InvalidParameterError, TemplateError
from aircupy.server import responses as R
from aircupy.server import tool_calls, tools
from aircupy.server.limits import Limits
from aircupy.server.protocol import DEFAULT_LIMITS, APIError, GenerationRequest, bad, check_token_ids
from aircupy.server.responses import finish_reason

# OpenAI's defaults (temperature 1, no top-k/top-p/min-p cut, no penalties): the server states every
# sampling field, so aircupy's CLI-oriented SamplingParams defaults (llama.cpp's) never leak into the API.
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0,
                   "presence_penalty": 0.0, "frequency_penalty": 0.0}

# SamplingParams' constraint fields; an error in one is reported under the request field it came from.
CONSTRAINT_FIELDS = frozenset({"grammar", "json_schema", "regex", "choice", "json_object"})


@dataclass
class Plan:
    """A request ready to run: prompt_ids[p] and params[p][c] for choice index p * n + c."""
    prompt_ids: list[list[int]]
    params: list[list[Any]]     # SamplingParams
    param: str = "prompt"       # the request field the prompt came from, for errors

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompt_ids)


@dataclass(frozen=True)
class Delta:
    """One engine step of choice `index`: new text, how many tokens it took, their logprobs, and the
    OpenAI finish_reason on the choice's last step (None before)."""
    index: int
    text: str
    n_tokens: int
    logprobs: tuple | None
    finish: str | None


@dataclass(frozen=True)
class Done:
    prompt_tokens: int
    completion_tokens: int
    seconds: float          # time spent generating (the worker's busy time for this request)


class Answer:
    """A non-streamed answer folded from a job's Delta and Done events: the body JobResponse sends, and
    the one the batch runner writes (server/batch.py), built in this one place."""

    def __init__(self):
        self.choices: dict[int, R.ChoiceResult] = {}
        self.usage = (0, 0)     # (prompt_tokens, completion_tokens) from Done

    def add(self, ev) -> None:
        if isinstance(ev, Delta):
            c = self.choices.setdefault(ev.index, R.ChoiceResult(ev.index, "", None))
            c.text += ev.text
            c.logprobs.extend(ev.logprobs or ())
            c.finish_reason = ev.finish or c.finish_reason
        elif isinstance(ev, Done):
            self.usage = (ev.prompt_tokens, ev.completion_tokens)

    def finished(self, n_choices: int) -> bool:
        """Every choice ran to its end (a cancelled job leaves one without a finish_reason)."""
        return len(self.choices) == n_choices and all(c.finish_reason for c in self.choices.values())

    def body(self, req: GenerationRequest, rid: str, created: int, model: str) -> dict:
        tr = req.tools
        if tr is not None and tr.parses_calls:   # chat with tools: calls out of each choice's text
            for c in self.choices.values():
                content, calls = tool_calls.parse(c.text, tr.convention, tr.names, tr.max_calls)
                if calls:
                    c.text, c.tool_calls, c.finish_reason = content, [t.to_dict() for t in calls], "tool_calls"
        return R.completion_response(req.kind, rid, created, model, list(self.choices.values()), *self.usage,
                                     with_logprobs=req.logprobs is not None)


def _context_error(n_prompt: int, n_ctx: int, param: str) -> APIError:
    return APIError(400, f"This model's maximum context length is {n_ctx} tokens, but the prompt has "
                         f"{n_prompt} tokens (at least one must be left to generate).",
                    param=param, code="context_length_exceeded")


def prepare(engine, req: GenerationRequest, limits: Limits = DEFAULT_LIMITS, special_in_messages: bool = False,
            cancel=None) -> Plan | None:
    """Tokenize every prompt and build each choice's SamplingParams; raises APIError / AircupyError.
    Runs on a thread; `cancel` (a threading.Event) set means the client left: stop, return None."""
    from aircupy.engine.params import SamplingParams  # the engine package, imported when first needed

    vocab = engine.tokenizer.vocab_size
    n_ctx = engine.n_ctx
    param = "messages" if req.kind == "chat" else "prompt"
    cap = limits.max_tokens_for(n_ctx)
    if req.sampling.get("max_tokens", 0) > cap:
        raise bad("max_tokens", f"{req.sampling['max_tokens']} is more than this server allows ({cap})")
    render_tools, sampling, constraint_param = None, req.sampling, req.constraint_param
    if req.tools is not None:   # the tools' schemas, the template's convention, a required call's grammar
        render_tools, grammar = tools.plan(req.tools, engine.chat_template, engine.tokenizer, req.prompts[0],
                                           special_in_messages)
        if grammar is not None:
            sampling, constraint_param = {**sampling, "grammar": grammar}, "tools"
    prompt_ids: list[list[int]] = []
    for p in req.prompts:
        if cancel is not None and cancel.is_set():
            return None
        if not isinstance(p, str) and req.kind == "completion":
            check_token_ids(p, vocab, "prompt")
        try:
            # The engine's own prompt rule: text and rendered chats get the BOS once, even when the
            # template already writes it; token id lists are taken as they are. A text the context
            # cannot hold is refused from its size, before it is tokenized (max_len).
            ids = engine.prompt_ids(p, max_len=n_ctx - 1, special_in_messages=special_in_messages,
                                    **({"tools": render_tools} if render_tools else {}))
        except ContextLengthError as e:
            raise APIError(400, f"This model's maximum context length is {n_ctx} tokens: {e}", param=param,
                           code="context_length_exceeded") from None
        except TemplateError as e:
            # 400, not 500: the template ran over the client's messages, and most failures are the
            # template rejecting the conversation (roles must alternate, no system role); a template
            # the sandbox refuses fails every chat request alike, and a 5xx would only make OpenAI's
            # client retry it. The message says which it was.
            raise APIError(400, f"chat template failed: {e}", param="messages", code="template_error")
        if not ids:
            raise bad(param, "the prompt is empty (no tokens)")
        if len(ids) >= n_ctx:
            raise _context_error(len(ids), n_ctx, param)
        prompt_ids.append(ids)
    if req.sampling.get("logit_bias"):
        check_token_ids(list(req.sampling["logit_bias"]), vocab, "logit_bias")
    params = []
    for p, ids in enumerate(prompt_ids):
        row = []
        for c in range(req.n):
            kw = {**OPENAI_DEFAULTS, **sampling, "seed": req.seed_for(c), "logprobs": req.logprobs}
            # No max_tokens (chat): generate until end of generation or the context is full, as OpenAI
            # (within the server's cap).
            kw.setdefault("max_tokens", min(cap, n_ctx - len(ids)))
            try:
                row.append(SamplingParams(**kw).validate(vocab))
            except InvalidParameterError as e:
                if constraint_param is not None and e.param in CONSTRAINT_FIELDS:
                    raise bad(constraint_param, str(e).split(": ", 1)[-1]) from None
                raise
        params.append(row)
    return Plan(prompt_ids, params, param)


def run(engine, plan: Plan, n: int, job, metrics=None) -> None:
    """Worker job: generate every choice in order; stops after the current token once job.cancelled."""
    start = time.perf_counter()
    completion = 0
    try:
        for p, ids in enumerate(plan.prompt_ids):
            for c, sp in enumerate(plan.params[p]):
                index = p * n + c
                gen = engine.stream(ids, sp)
                try:
                    for ev in gen:
                        completion += len(ev.token_ids)
                        if metrics is not None:
                            metrics.on_tokens(len(ev.token_ids))  # live, so /metrics moves mid-stream
                        if job.cancelled.is_set():
                            return
                        job.emit(Delta(index, ev.text, len(ev.token_ids), ev.logprobs,
                                       finish_reason(ev.finish_reason)))
                finally:
                    gen.close()  # on cancel: the engine drops the sequence now
                if job.cancelled.is_set():
                    return
    except ContextLengthError as e:
        # The engine's own check (e.g. a context it sizes differently): still the client's 400.
        raise APIError(400, str(e), param=plan.param, code="context_length_exceeded")
    finally:
        seconds = time.perf_counter() - start
        if metrics is not None:
            metrics.on_finished(plan.prompt_tokens, completion, seconds)
        job.emit(Done(plan.prompt_tokens, completion, seconds))

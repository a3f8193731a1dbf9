"""What `aircupy inspect` prints: a JSON-able description of a GGUF file and its human rendering.

describe(g) returns a plain dict (str/int/float/bool/list/dict only) made of sections:
    file, architecture, name, parameters, context_length, n_layers, tokenizer, chat_template,
    quant_mix, layers, other_tensors, metadata, tensors, and for a mixture of experts `experts`.
render_text(desc) turns the sections it knows (TEXT_SECTIONS, in order) into the human view, skipping
absent ones. A later section (the streaming plan) is added by putting desc["plan"] = {...} and passing
`sections=TEXT_SECTIONS + (("plan", render_plan),)`: nothing here needs to change.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from aircupy.gguf.reader import GGUFFile

# Arrays longer than this (vocabularies, merges, scores) are summarised by type and length.
MAX_ARRAY_IN_JSON = 16
_LAYER = re.compile(r"blk\.(\d+)\.")
_EXPS = re.compile(r"blk\.(\d+)\.ffn_\w+_exps\.weight$")   # stacked routed experts, (X, R, C)


def describe(g: GGUFFile) -> dict[str, Any]:
    arch = g.get("general.architecture")
    tensors = list(g.tensors.values())
    tokens = g.get("tokenizer.ggml.tokens")
    template = g.get("tokenizer.chat_template")
    n_layers = g.get(f"{arch}.block_count")
    desc = {
        "file": {"path": str(g.path), "size": g.file_size, "gguf_version": g.version,
                 "alignment": g.alignment, "data_offset": g.data_offset,
                 "data_bytes": sum(t.nbytes for t in tensors), "n_tensors": len(tensors),
                 "n_metadata": len(g.metadata)},
        "architecture": arch,
        "name": g.get("general.name"),
        "parameters": sum(t.n_elements for t in tensors),
        "context_length": g.get(f"{arch}.context_length"),
        "n_layers": n_layers,
        "tokenizer": {"model": g.get("tokenizer.ggml.model"), "pre": g.get("tokenizer.ggml.pre"),
                      "vocab_size": len(tokens) if tokens is not None else None,
                      "bos_id": g.get("tokenizer.ggml.bos_token_id"),
                      "eos_id": g.get("tokenizer.ggml.eos_token_id")},
        "chat_template": {"present": isinstance(template, str),
                          "chars": len(template) if isinstance(template, str) else 0},
        "quant_mix": _quant_mix(tensors),
        "layers": _layers(tensors),
        "other_tensors": [{"name": t.name, "type": t.ggml_type.name, "nbytes": t.nbytes}
                          for t in tensors if not _LAYER.match(t.name)],
        "metadata": {k: summarize_value(v) for k, v in g.metadata.items()},
        "tensors": [{"name": t.name, "type": t.ggml_type.name, "shape": list(t.shape),
                     "offset": t.offset, "nbytes": t.nbytes} for t in tensors],
    }
    experts = _experts(g, arch, tensors)
    if experts:
        desc["experts"] = experts
    return desc


def _experts(g: GGUFFile, arch, tensors) -> dict[str, Any] | None:
    """A mixture of experts' routing metadata and the bytes of one expert per layer (its slices of
    the stacked ffn_*_exps tensors); None for a dense model."""
    count = g.get(f"{arch}.expert_count")
    stacked = [t for t in tensors if _EXPS.match(t.name) and len(t.shape) == 3 and t.shape[0] > 0]
    if not count and not stacked:
        return None
    per_layer: dict[int, int] = {}
    for t in stacked:
        i = int(_EXPS.match(t.name).group(1))
        per_layer[i] = per_layer.get(i, 0) + t.nbytes // int(t.shape[0])
    used = g.get(f"{arch}.expert_used_count")
    used_n = int(np.max(used)) if used is not None and np.size(used) else None
    one = max(per_layer.values(), default=0)
    return {
        "count": summarize_value(count), "used": summarize_value(used),
        "feed_forward_length": summarize_value(g.get(f"{arch}.expert_feed_forward_length")),
        "shared_feed_forward_length": summarize_value(g.get(f"{arch}.expert_shared_feed_forward_length")),
        "per_expert_bytes": [{"layer": i, "bytes": per_layer[i]} for i in sorted(per_layer)],
        "routed_bytes": sum(t.nbytes for t in stacked),
        # the routed-expert bytes one token reads: `used` experts in every MoE layer
        "routed_bytes_per_token": sum(per_layer.values()) * used_n if used_n else None,
        "max_per_expert_bytes": one,
    }


def describe_file(path) -> dict[str, Any]:
    with GGUFFile(path) as g:
        return describe(g)


def _quant_mix(tensors) -> list[dict[str, Any]]:
    """Per ggml type: tensor count, bytes and parameters, largest share first."""
    mix: dict[str, dict[str, Any]] = {}
    for t in tensors:
        m = mix.setdefault(t.ggml_type.name, {"type": t.ggml_type.name, "tensors": 0, "bytes": 0,
                                              "parameters": 0})
        m["tensors"] += 1
        m["bytes"] += t.nbytes
        m["parameters"] += t.n_elements
    return sorted(mix.values(), key=lambda m: (-m["bytes"], m["type"]))


def _layers(tensors) -> list[dict[str, Any]]:
    """Per transformer block (tensors named blk.N.*): tensor count, bytes and the byte span it covers."""
    layers: dict[int, dict[str, Any]] = {}
    for t in tensors:
        m = _LAYER.match(t.name)
        if not m:
            continue
        i = int(m.group(1))
        d = layers.setdefault(i, {"index": i, "tensors": 0, "bytes": 0, "start": t.offset, "end": 0})
        d["tensors"] += 1
        d["bytes"] += t.nbytes
        d["start"] = min(d["start"], t.offset)
        d["end"] = max(d["end"], t.offset + t.nbytes)
    return [layers[i] for i in sorted(layers)]


def summarize_value(v: Any) -> Any:
    """A metadata value as JSON: scalars as they are, long arrays as {"array": type, "length": n}."""
    if isinstance(v, np.ndarray):
        if v.size > MAX_ARRAY_IN_JSON:
            return {"array": v.dtype.name, "length": int(v.size)}
        return [summarize_value(x) for x in v.tolist()]
    if isinstance(v, list):
        if len(v) > MAX_ARRAY_IN_JSON:
            kind = "string" if v and isinstance(v[0], str) else "array"
            return {"array": kind, "length": len(v)}
        return [summarize_value(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Infinity
    return v


def size_str(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{int(x)} B" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    raise AssertionError("unreachable")


def _count_str(n: int) -> str:
    """134515008 -> '134.5 M'."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return str(n)


def _render_summary(d: dict) -> list[str]:
    f, tok, tpl = d["file"], d["tokenizer"], d["chat_template"]
    vocab = f"{tok['model']}" + (f" (pre: {tok['pre']})" if tok["pre"] else "")
    vocab += f", {tok['vocab_size']} tokens" if tok["vocab_size"] is not None else ", no vocabulary"
    return [
        f"{f['path']}",
        f"  {'file':<16}{size_str(f['size'])} ({f['size']} bytes), GGUF v{f['gguf_version']}, "
        f"{f['n_metadata']} metadata keys",
        f"  {'architecture':<16}{d['architecture'] or 'unknown'}" + (f"  ({d['name']})" if d["name"] else ""),
        f"  {'parameters':<16}{_count_str(d['parameters'])} ({d['parameters']})",
        f"  {'context length':<16}{d['context_length'] if d['context_length'] is not None else 'unknown'}",
        f"  {'tokenizer':<16}{vocab if tok['model'] else 'none'}",
        f"  {'chat template':<16}" + (f"yes ({tpl['chars']} chars)" if tpl["present"] else "no"),
        f"  {'tensors':<16}{f['n_tensors']}, {size_str(f['data_bytes'])} of data from byte "
        f"{f['data_offset']} (alignment {f['alignment']})",
    ]


def _render_quant_mix(d: dict) -> list[str]:
    total = sum(m["bytes"] for m in d["quant_mix"]) or 1
    lines = ["", "quant mix", f"  {'type':<8}{'tensors':>8}{'parameters':>14}{'bytes':>12}{'share':>8}"]
    for m in d["quant_mix"]:
        lines.append(f"  {m['type']:<8}{m['tensors']:>8}{m['parameters']:>14}"
                     f"{size_str(m['bytes']):>12}{m['bytes'] / total:>8.1%}")
    return lines


def _render_layers(d: dict) -> list[str]:
    layers = d["layers"]
    n = d["n_layers"]
    lines = ["", f"layers: {len(layers)} blocks" + (f" (block_count says {n})" if n not in (None, len(layers))
                                                     else "")]
    for L in layers:
        lines.append(f"  blk.{L['index']:<5}{L['tensors']:>3} tensors {size_str(L['bytes']):>11}"
                     f"   bytes [{L['start']}, {L['end']})")
    if d["other_tensors"]:
        lines.append("  outside the layers:")
        for t in d["other_tensors"]:
            lines.append(f"    {t['name']:<28}{t['type']:<8}{size_str(t['nbytes']):>11}")
    return lines


def _render_experts(d: dict) -> list[str]:
    x = d["experts"]
    sizes = sorted({e["bytes"] for e in x["per_expert_bytes"]})
    one = " to ".join(size_str(b) for b in (sizes[:1] + sizes[-1:] if len(sizes) > 1 else sizes)) or "none"
    widths = f"expert width {x['feed_forward_length']}" if x["feed_forward_length"] is not None else ""
    if x["shared_feed_forward_length"] is not None:
        widths += f", shared expert width {x['shared_feed_forward_length']}"
    lines = ["", f"experts: {x['count']} per layer, {x['used']} used per token" + (f" ({widths})" if widths else ""),
             (f"  one expert: {one} per layer ({len(x['per_expert_bytes'])} MoE layers); routed experts "
              f"{size_str(x['routed_bytes'])} of {size_str(d['file']['data_bytes'])}")]
    if x["routed_bytes_per_token"] is not None:
        lines.append(f"  a token reads {size_str(x['routed_bytes_per_token'])} of routed experts")
    return lines


TEXT_SECTIONS: tuple[tuple[str, Callable[[dict], list[str]]], ...] = (
    ("file", _render_summary), ("experts", _render_experts), ("quant_mix", _render_quant_mix),
    ("layers", _render_layers),
)


def render_text(desc: dict, sections=TEXT_SECTIONS) -> str:
    lines: list[str] = []
    for key, render in sections:
        if key in desc:
            lines += render(desc)
    return "\n".join(lines)


def describe_plan(path, vram_budget: int, n_ctx: int | None = None, slots: int = 3,
                  host_ram_bytes: int | None = None, max_num_seqs: int = 1,
                  max_batched_tokens: int | None = None, kv_tokens: int | None = None,
                  measure_pcie: Callable[[], float | None] | None = None) -> dict[str, Any]:
    """describe_file(path) plus the placement the CUDA model builds for `vram_budget` bytes
    (desc["plan"]): the one planner, cuda/placement.py, with the batch limits the engine passes
    (placement.batch_options). host_ram_bytes: the RAM the RAM tier may draw on (default: this
    machine's available RAM, as the model reads it). measure_pcie: returns the pinned host-to-device
    GB/s, or None where it cannot be measured (the plan then states the assumed rate); default
    cuda/pcie.measure_pcie_gbps, which measures only where CUDA is usable."""
    from aircupy.config import ModelConfig
    from aircupy.cuda.memory import OUTSIDE_RESERVE
    from aircupy.cuda.pcie import measure_pcie_gbps
    from aircupy.cuda.placement import ASSUMED_CONTEXT, batch_options, plan_model
    from aircupy.stream.stager import available_ram

    with GGUFFile(path) as g:
        desc = describe(g)
        config = ModelConfig.from_gguf(g)
        ram = available_ram() if host_ram_bytes is None else host_ram_bytes
        n = n_ctx or config.default_n_ctx
        options = batch_options(n, vram_budget, max_num_seqs, max_batched_tokens, kv_tokens, slots=slots)

        def plan(pcie_gbps=None):
            return plan_model(g, config, n, vram_budget, options, host_ram_bytes=ram, pcie_gbps=pcie_gbps,
                              outside_bytes=ASSUMED_CONTEXT + OUTSIDE_RESERVE)

        placement = plan()
        # The rate matters only to the bound of a plan that streams: measured then (a second or so
        # on a GPU, the CUDA context's creation included), the plan restated at it.
        if placement.streams:
            pcie = (measure_pcie or measure_pcie_gbps)()
            if pcie is not None:
                placement = plan(pcie)
    desc["plan"] = placement.to_dict()
    return desc


def _ranges(idx: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out, start = [], None
    for i, v in enumerate(idx):
        if start is None:
            start = v
        if i + 1 == len(idx) or idx[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out) or "none"


def _render_plan(d: dict) -> list[str]:
    p = d["plan"]
    lines = ["", f"plan for a VRAM budget of {size_str(p['vram_budget'])} (n_ctx {p['n_ctx']}), of which "
                 f"{size_str(p['outside_bytes'])} for the CUDA context and libraries (assumed; the model "
                 f"measures its own):",
             f"  resident layers ({len(p['resident_layers'])}): {_ranges(p['resident_layers'])}",
             f"  streamed layers ({len(p['streamed_layers'])}): {_ranges(p['streamed_layers'])}"]
    if p["slots"]:
        lines.append(f"  slots: {p['slots']} x {size_str(p['slot_bytes'])}")
    kv = ("paged pool" if p["kv_placement"] == "vram" else "shuttled through pinned RAM, one sequence")
    lines.append(f"  KV cache: {kv}, {p['kv_tokens']} tokens ({size_str(p['kv_layer_bytes'])} per layer); "
                 f"batches of up to {p['max_seqs']} sequences")
    lines.append(f"  VRAM planned: {size_str(p['vram_bytes'])} = " + " + ".join(
        f"{k} {size_str(v)}" for k, v in p["breakdown"].items() if v))
    if p["bytes_streamed_per_pass"]:
        rate = ("measured here: pinned host-to-device copies" if p["pcie_rate_measured"]
                else "assumed, not measured here")
        lines.append(f"  streamed per forward pass: {size_str(p['bytes_streamed_per_pass'])}; at "
                     f"{p['pcie_gbps']:.0f} GB/s ({rate}) that is {p['pcie_bound_s'] * 1e3:.1f} ms "
                     f"(decode <= {p['decode_bound_tok_s']:.2f} tokens/s at batch 1)")
        lines.append(f"  pinned host memory: {size_str(p['host_pinned_bytes'])} (staging ring "
                     f"{p['host_buffers']} x {size_str(p['host_buffer_bytes'])}, RAM tier "
                     f"{size_str(p['ram_tier_bytes'])}"
                     + (f", shuttled KV {size_str(p['host_kv_bytes'])})" if p["host_kv_bytes"] else ")"))
    else:
        lines.append("  nothing streams: the whole model is resident")
    return lines


PLAN_SECTIONS = TEXT_SECTIONS + (("plan", _render_plan),)

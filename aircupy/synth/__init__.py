"""Synthetic GGUF models: real architectures' tensor names, shapes and metadata, random valid weights.

    synth_model("llama8b.gguf", "llama3-8b", "Q4_0")              # 4.2 GiB, Llama-3-8B shape
    synth_model("tiny.gguf", "qwen3-0.6b", "Q8_0", n_layers=2, overrides={"n_embd": 256, ...})
    synth_model("llama8b-q4km.gguf", "llama3-8b", "Q4_K_M")       # llama.cpp's Q4_K_M type mix

Benchmarks use full-size ones (generated on the machine that runs them, at disk speed); tests use
tiny ones. Weights are scaled so activations stay finite through any depth (see blocks.py), and the
file carries a gpt2-style vocabulary and a chatml template so it loads end to end.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aircupy.errors import InvalidParameterError
from aircupy.gguf.ggml import GGMLType, tensor_nbytes
from aircupy.synth.blocks import SYNTH_TYPES, BlockPool, float_tensor
from aircupy.synth.mixes import MIXES, mix_name, mix_picker
from aircupy.synth.shapes import PRESETS, ArchShape, TensorPlan, model_metadata, tensor_plan, \
    with_overrides
from aircupy.synth.vocab import build_vocab, tokenizer_metadata
from aircupy.synth.writer import TensorSource, write_gguf

__all__ = ["PRESETS", "ArchShape", "SynthReport", "synth_model", "parse_type", "plan_for"]


@dataclass(frozen=True)
class SynthReport:
    path: Path
    preset: str
    shape: ArchShape
    qtype: GGMLType
    n_tensors: int
    nbytes: int
    seconds: float
    mix: str | None = None   # "Q4_K_M": the types follow llama.cpp's mix (qtype is its main type)

    def summary(self) -> str:
        gb = self.nbytes / 1e9
        kind = f"{self.mix} mix" if self.mix else self.qtype.name
        return (f"{self.path}: {self.preset} ({self.shape.arch}, {self.shape.n_layers} layers, "
                f"vocab {self.shape.vocab}) {kind}, {self.n_tensors} tensors, "
                f"{gb:.3f} GB in {self.seconds:.2f} s ({gb / max(self.seconds, 1e-9):.2f} GB/s)")


def parse_type(name: str | GGMLType) -> GGMLType:
    """'q4_k' -> GGMLType.Q4_K, restricted to the types synth can fill."""
    try:
        t = name if isinstance(name, GGMLType) else GGMLType[str(name).upper()]
    except KeyError:
        t = None
    if t not in SYNTH_TYPES:
        known = ", ".join(sorted(x.name for x in SYNTH_TYPES))
        raise InvalidParameterError("type", f"cannot synthesize type {name!r}; choose one of {known} "
                                            f"or a mix ({', '.join(MIXES)})")
    return t


def plan_for(shape: ArchShape, qtype: str | GGMLType, embd_type=None, output_type=None,
             logit_std: float = 4.0, name: str | None = None) -> tuple[list[TensorPlan], dict]:
    """(tensor plan, model metadata without the tokenizer) of a `shape` model in `qtype`: one type
    (parse_type) or a mix's name ("Q4_K_M", mixes.py). The bench plans files it has not written
    through this too, so its layout is the one synth_model writes."""
    mix = mix_name(qtype) if not isinstance(qtype, GGMLType) else None
    t = MIXES[mix][0] if mix else parse_type(qtype)
    plan = tensor_plan(shape, t, parse_type(embd_type) if embd_type else None,
                       parse_type(output_type) if output_type else None, logit_std,
                       pick=mix_picker(mix, shape) if mix else None)
    label = mix or t.name
    md = model_metadata(shape, t, name or f"aircupy synthetic {label}",
                        file_type=MIXES[mix][1] if mix else None)
    return plan, md


def _sources(plan: list[TensorPlan], seed: int) -> list[TensorSource]:
    """Chunk producers: one block pool per (type, scale), shared by every tensor that needs it."""
    rng = np.random.default_rng(seed)
    pools: dict[tuple[GGMLType, float], BlockPool] = {}
    biggest: dict[tuple[GGMLType, float], int] = {}
    for p in plan:
        if len(p.shape) > 1:
            key = (p.ggml_type, p.std)
            biggest[key] = max(biggest.get(key, 0), tensor_nbytes(p.ggml_type, p.shape))
    out = []
    for p in plan:
        if len(p.shape) == 1:  # norms and biases: small, each its own values
            data = float_tensor(p.ggml_type, p.shape, p.mean, p.std, rng)
            out.append(TensorSource(p.name, p.ggml_type, p.shape, lambda d=data: (memoryview(d),)))
            continue
        key = (p.ggml_type, p.std)
        if key not in pools:
            pools[key] = BlockPool(p.ggml_type, p.std, biggest[key], rng)
        pool, n = pools[key], tensor_nbytes(p.ggml_type, p.shape)
        out.append(TensorSource(p.name, p.ggml_type, p.shape,
                                lambda pool=pool, n=n: pool.chunks(n)))
    return out


def synth_model(path, preset: str = "llama3-8b", qtype: str | GGMLType = "Q4_0", *,
                n_layers: int | None = None, overrides: dict | None = None, seed: int = 0,
                embd_type: str | GGMLType | None = None, output_type: str | GGMLType | None = None,
                logit_std: float = 4.0) -> SynthReport:
    """Write a synthetic model of `preset`'s shape to `path`; see module doc."""
    if preset not in PRESETS:
        raise InvalidParameterError("arch", f"unknown architecture preset {preset!r}; choose one "
                                            f"of {', '.join(PRESETS)}")
    mix = mix_name(qtype) if not isinstance(qtype, GGMLType) else None
    t = MIXES[mix][0] if mix else parse_type(qtype)
    kw = dict(overrides or {})
    if n_layers is not None:
        kw["n_layers"] = n_layers
    try:
        shape = with_overrides(PRESETS[preset], **kw)
    except (ValueError, TypeError) as e:
        raise InvalidParameterError("overrides", str(e)) from None
    plan, md = plan_for(shape, mix or t, embd_type, output_type, logit_std,
                        f"aircupy synthetic {preset} {mix or t.name}")
    t0 = time.perf_counter()
    md.update(tokenizer_metadata(build_vocab(shape.vocab, seed), shape.add_bos))
    nbytes = write_gguf(path, md, _sources(plan, seed))
    return SynthReport(Path(path), preset, shape, t, len(plan), nbytes,
                       time.perf_counter() - t0, mix)

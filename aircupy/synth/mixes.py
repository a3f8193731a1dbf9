"""Tensor type mixes of llama.cpp's quantization presets, so synthetic files carry the types real ones do.

    pick = mix_picker("Q4_K_M", shape)      # tensor name -> the type llama-quantize gives it
    pick("blk.0.ffn_down.weight")            # GGMLType.Q6_K

A file sold as "Q4_K_M" is not Q4_K everywhere: llama.cpp's llama_model_quantize
(src/llama-quant.cpp, llama_tensor_get_type_impl, ggml-org/llama.cpp) picks per tensor:
  - output.weight, or token_embd.weight when the head is tied to it: Q6_K (Q8_0 when the row length
    is not a multiple of Q4_K's 256-value block);
  - attn_v.weight: Q6_K where use_more_bits(i, n) holds, else Q4_K; for a model llama.cpp calls
    LLM_TYPE_70B (llama architecture, 80 layers, grouped KV heads) a Q4_K attn_v becomes Q5_K;
  - ffn_down.weight: Q6_K where use_more_bits(i, n) holds, else Q4_K (architectures other than falcon);
  - every other matrix, the untied token_embd included: Q4_K.
use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2 (integer division): the first and
last eighth of the layers and every third layer between. i counts the attn_v (ffn_down) tensors in
the loader's order, which sorts by layer number (llama_model_loader::weight_name_comparer), so i is
the layer index and n the layer count. A row length a block type cannot tile falls back afterwards
(tensor_type_fallback; shapes.matrix_type). general.file_type is LLAMA_FTYPE_MOSTLY_Q4_K_M = 15.
Norms and other 1-D tensors stay F32, as llama.cpp leaves them.
"""
from __future__ import annotations

import re
from collections.abc import Callable

from aircupy.gguf.ggml import GGMLType

# mix name -> (the type most matrices get, general.file_type)
MIXES: dict[str, tuple[GGMLType, int]] = {"Q4_K_M": (GGMLType.Q4_K, 15)}
_LAYER = re.compile(r"blk\.(\d+)\.")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's rule for the layers that get more bits (see the module doc)."""
    eighth = n_layers // 8
    return i_layer < eighth or i_layer >= 7 * n_layers // 8 or (i_layer - eighth) % 3 == 2


def is_llama_70b(shape) -> bool:
    """llama.cpp's LLM_TYPE_70B: llama architecture, 80 layers, fewer KV heads than query heads
    (with as many it would be LLM_TYPE_65B)."""
    return shape.arch == "llama" and shape.n_layers == 80 and shape.n_head != shape.n_head_kv


def q4_k_m(shape, name: str) -> GGMLType:
    """The type llama-quantize gives matrix `name` of a model of `shape` in a Q4_K_M file, before the
    row-length fallback."""
    if name == "output.weight" or (shape.tied and name == "token_embd.weight"):
        return GGMLType.Q8_0 if shape.n_embd % 256 else GGMLType.Q6_K
    m = _LAYER.match(name)
    if m is None:
        return GGMLType.Q4_K
    i, n = int(m.group(1)), shape.n_layers
    if name.endswith("attn_v.weight"):
        if use_more_bits(i, n):
            return GGMLType.Q6_K
        return GGMLType.Q5_K if is_llama_70b(shape) else GGMLType.Q4_K
    if name.endswith("ffn_down.weight") and use_more_bits(i, n):
        return GGMLType.Q6_K
    return GGMLType.Q4_K


_PICKERS = {"Q4_K_M": q4_k_m}


def mix_picker(mix: str, shape) -> Callable[[str], GGMLType]:
    """tensor name -> type, for `mix` (a key of MIXES) on a model of `shape`."""
    rule = _PICKERS[mix]
    return lambda name: rule(shape, name)


def mix_name(qtype) -> str | None:
    """'q4_k_m' -> 'Q4_K_M' when it names a mix, else None."""
    key = str(qtype).upper()
    return key if key in MIXES else None

"""Tensor names per architecture: which GGUF tensors a model needs, globally and in each layer.

Names follow llama.cpp's (gguf-py's TENSOR_NAMES): `token_embd.weight`, `blk.{i}.attn_q.weight`, ...
A role is our name for a tensor's job ("attn_q", "ffn_gate", "attn_q_bias"); a TensorMap resolves every
role to the name in the file, so the numpy model, the manifest and the GPU model never spell names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from aircupy.errors import UnsupportedModelError

# Global roles -> tensor names. `output` is optional: absent means the head is tied to token_embd.
# `rope_freqs` (llama3-style per-frequency divisors) is optional too.
_GLOBAL_REQUIRED = {"token_embd": "token_embd.weight", "output_norm": "output_norm.weight"}
_GLOBAL_OPTIONAL = {"output": "output.weight", "rope_freqs": "rope_freqs.weight"}

_ATTN = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output")
_FFN = ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
_QK_NORM = ("attn_q_norm", "attn_k_norm")
_QKV_BIAS = ("attn_q_bias", "attn_k_bias", "attn_v_bias")

# Per-architecture layer roles: (required, optional). Optional roles are used when present (some
# llama-family finetunes ship q/k/v or output biases).
_LAYER_ROLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (_ATTN + _FFN, _QKV_BIAS + ("attn_output_bias",)),
    "qwen2": (_ATTN + _FFN + _QKV_BIAS, ("attn_output_bias",)),
    "qwen3": (_ATTN + _FFN + _QK_NORM, ()),
    "gemma3": (_ATTN + _FFN + _QK_NORM + ("post_attention_norm", "post_ffw_norm"), ()),
}


def layer_tensor_name(role: str, layer: int) -> str:
    """'attn_q' -> 'blk.3.attn_q.weight'; 'attn_q_bias' -> 'blk.3.attn_q.bias'."""
    if role.endswith("_bias"):
        return f"blk.{layer}.{role[:-len('_bias')]}.bias"
    return f"blk.{layer}.{role}.weight"


@dataclass(frozen=True)
class TensorMap:
    """Resolved tensor names of one model file.

    globals: role -> name, for the global roles present (token_embd, output_norm, maybe output,
             rope_freqs). layers: one dict per layer, role -> name, for the roles present.
    """
    arch: str
    globals: dict[str, str]
    layers: tuple[dict[str, str], ...]

    @property
    def tied_output(self) -> bool:
        return "output" not in self.globals

    def output_name(self) -> str:
        """The tensor the logits are computed from: output.weight, or token_embd.weight when tied."""
        return self.globals.get("output", self.globals["token_embd"])

    def layer_names(self, layer: int) -> list[str]:
        return list(self.layers[layer].values())


def supported_archs() -> tuple[str, ...]:
    return tuple(_LAYER_ROLES)


def layer_roles(arch: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) layer roles of `arch`; UnsupportedModelError names an unknown one."""
    try:
        return _LAYER_ROLES[arch]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported architecture {arch!r} (supported: {', '.join(_LAYER_ROLES)})") from None


def tensor_map(arch: str, n_layers: int, tensor_names: Iterable[str]) -> TensorMap:
    """Resolve every role of `arch` against the names in a file; a missing required tensor raises
    UnsupportedModelError naming it (and the architecture)."""
    required, optional = layer_roles(arch)
    names = set(tensor_names)
    missing: list[str] = [n for n in _GLOBAL_REQUIRED.values() if n not in names]
    globals_ = {r: n for r, n in _GLOBAL_REQUIRED.items() if n in names}
    globals_.update({r: n for r, n in _GLOBAL_OPTIONAL.items() if n in names})
    layers = []
    for i in range(n_layers):
        layer = {}
        for role in required:
            name = layer_tensor_name(role, i)
            if name in names:
                layer[role] = name
            else:
                missing.append(name)
        for role in optional:
            name = layer_tensor_name(role, i)
            if name in names:
                layer[role] = name
        layers.append(layer)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UnsupportedModelError(
            f"{arch} model is missing tensor(s) {', '.join(repr(m) for m in missing[:5])}{more}")
    return TensorMap(arch=arch, globals=globals_, layers=tuple(layers))

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
# Mixture-of-experts FFN (llama.cpp's LLM_TENSOR_FFN_*_EXPS): the router ffn_gate_inp (X, E) and the
# routed experts stacked into 3-D tensors, numpy order gate/up (X, F_exp, E) and down (X, E, F_exp),
# expert e being the contiguous slice [e]. qwen2moe adds a shared expert (a dense FFN every token
# uses) scaled by sigmoid(h . ffn_gate_inp_shexp).
_MOE = ("ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
_SHEXP = ("ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")

# Per-architecture layer roles: (required, optional). Optional roles are used when present (some
# llama-family finetunes ship q/k/v or output biases).
_LAYER_ROLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (_ATTN + _FFN, _QKV_BIAS + ("attn_output_bias",)),
    "qwen2": (_ATTN + _FFN + _QKV_BIAS, ("attn_output_bias",)),
    "qwen3": (_ATTN + _FFN + _QK_NORM, ()),
    "gemma3": (_ATTN + _FFN + _QK_NORM + ("post_attention_norm", "post_ffw_norm"), ()),
    # llama.cpp loads q/k/v biases of both MoE archs when present (create_tensor_qkv, optional);
    # Qwen1.5-MoE and Qwen2-57B-A14B ship them, Qwen3-MoE has none.
    "qwen2moe": (_ATTN + _MOE + _SHEXP, _QKV_BIAS),
    "qwen3moe": (_ATTN + _MOE + _QK_NORM, ()),
}
# Architectures whose layers may be either dense or MoE, decided by {arch}.expert_count (llama.cpp's
# llama arch: Mixtral is `llama` with expert_count 8): the MoE role set replaces the FFN roles.
_MOE_VARIANT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (_ATTN + _MOE, _QKV_BIAS + ("attn_output_bias",)),
}
MOE_ARCHS = ("qwen2moe", "qwen3moe")   # always mixtures of experts


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
    def experts(self) -> bool:
        """True when the layers carry routed experts (a router and stacked expert tensors)."""
        return bool(self.layers) and "ffn_gate_inp" in self.layers[0]

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


def layer_roles(arch: str, experts: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) layer roles of `arch`, with routed experts when `experts` (the config's
    n_expert > 0); UnsupportedModelError names an unknown architecture or one without experts."""
    if experts and arch not in MOE_ARCHS:
        if arch not in _MOE_VARIANT:
            raise UnsupportedModelError(f"{arch}: mixture-of-experts layers are not supported for this "
                                        f"architecture (supported: {', '.join(MOE_ARCHS + tuple(_MOE_VARIANT))})")
        return _MOE_VARIANT[arch]
    if not experts and arch in MOE_ARCHS:
        raise UnsupportedModelError(f"{arch}: a mixture-of-experts architecture needs {arch}.expert_count > 0")
    try:
        return _LAYER_ROLES[arch]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported architecture {arch!r} (supported: {', '.join(_LAYER_ROLES)})") from None


def tensor_map(arch: str, n_layers: int, tensor_names: Iterable[str], experts: bool = False) -> TensorMap:
    """Resolve every role of `arch` (with routed experts when `experts`) against the names in a file;
    a missing required tensor raises UnsupportedModelError naming it (and the architecture)."""
    required, optional = layer_roles(arch, experts)
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

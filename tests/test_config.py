"""ModelConfig.from_gguf and the tensor-name maps: the real models, and metadata variants built in memory."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from aircupy.config import ModelConfig
from aircupy.errors import UnsupportedModelError
from aircupy.gguf.reader import GGUFFile
from aircupy.gguf.arch import layer_tensor_name, supported_archs, tensor_map


class FakeGGUF:
    """Just what from_gguf reads: .metadata/.get and tensor shapes. Unless layers=False, each block's
    matrices are added with the shapes the metadata implies (taken when .tensors is first read)."""

    def __init__(self, metadata: dict, tensors: dict[str, tuple[int, ...]], layers: bool = True):
        self.metadata = metadata
        self._shapes, self._layers, self._tensors = dict(tensors), layers, None

    @property
    def tensors(self):
        if self._tensors is None:
            shapes = {**(_layer_shapes(self.metadata) if self._layers else {}), **self._shapes}
            self._tensors = {n: SimpleNamespace(name=n, shape=s) for n, s in shapes.items()}
        return self._tensors

    def get(self, key, default=None):
        return self.metadata.get(key, default)


def _layer_shapes(md: dict) -> dict[str, tuple[int, ...]]:
    a = md.get("general.architecture")

    def one(key, default=None):
        v = md.get(f"{a}.{key}", default)
        return int(np.ravel(v)[0]) if v is not None else None
    try:   # a key a test deleted gets a stand-in size: the test is about the key, not the shapes
        n, e = one("block_count"), one("embedding_length") or 256
        h, ff = one("attention.head_count") or 8, one("feed_forward_length") or 512
        kv = one("attention.head_count_kv", h)
        d = one("attention.key_length", e // h)
        dv = one("attention.value_length", d)
    except (TypeError, ZeroDivisionError):
        return {}
    out = {}
    for i in range(min(n, 64)):
        out.update({f"blk.{i}.attn_q.weight": (h * d, e), f"blk.{i}.attn_k.weight": (kv * d, e),
                    f"blk.{i}.attn_v.weight": (kv * dv, e), f"blk.{i}.attn_output.weight": (e, h * dv),
                    f"blk.{i}.ffn_gate.weight": (ff, e), f"blk.{i}.ffn_up.weight": (ff, e),
                    f"blk.{i}.ffn_down.weight": (e, ff)})
    return out


def _meta(arch="qwen2", **extra):
    md = {"general.architecture": arch, f"{arch}.block_count": 12, f"{arch}.embedding_length": 256,
          f"{arch}.feed_forward_length": 512, f"{arch}.attention.head_count": 8,
          f"{arch}.attention.head_count_kv": 2, f"{arch}.context_length": 4096,
          f"{arch}.rope.freq_base": 1e6, f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
          "tokenizer.ggml.eos_token_id": 7, "tokenizer.ggml.eot_token_id": 9}
    md.update({k.replace("ARCH", arch): v for k, v in extra.items()})
    return FakeGGUF(md, {"token_embd.weight": (1000, 256), "output.weight": (1000, 256)})


def test_smollm2_config(smollm2_path):
    c = ModelConfig.from_gguf(GGUFFile(smollm2_path))
    assert (c.arch, c.n_layers, c.n_embd, c.n_ff, c.n_head, c.n_head_kv, c.head_dim) == ("llama", 30, 576, 1536, 9, 3, 64)
    assert (c.vocab_size, c.n_ctx_train, c.rope_base, c.rope_type) == (49152, 8192, 100000.0, "norm")
    assert c.tied_output and c.embed_scale == 1.0 and c.activation == "silu" and not c.qk_norm
    assert c.sliding_window is None and not any(c.swa_layers) and c.rope_scaling.kind == "none"
    assert c.rms_eps == pytest.approx(1e-5) and c.attn_scale == 0.125 and c.eos_ids == (2,) and c.n_rep == 3


def test_gemma3_config(gemma3_path):
    g = GGUFFile(gemma3_path)
    c = ModelConfig.from_gguf(g)
    assert (c.arch, c.n_layers, c.n_embd, c.n_head, c.n_head_kv, c.head_dim) == ("gemma3", 18, 640, 4, 1, 256)
    assert (c.vocab_size, c.rope_type, c.rope_base, c.rope_base_local) == (262144, "neox", 1e6, 10000.0)
    assert c.sliding_window == 512
    assert [i for i, s in enumerate(c.swa_layers) if not s] == [5, 11, 17]  # every 6th layer is global
    assert c.embed_scale == pytest.approx(math.sqrt(640)) and c.attn_scale == 1 / 16
    assert c.qk_norm and c.post_norms and c.activation == "gelu_tanh" and c.tied_output
    assert c.final_softcap is None and c.attn_softcap is None and c.bos_id == 2
    # Norm weights already hold gemma's `1 + w` (converter adds it): trained values sit well above 0.
    qn = np.frombuffer(g.tensors["blk.0.attn_q_norm.weight"].data, np.float32)
    assert qn.mean() > 0.5


def test_qwen_variants_and_eos_ids():
    c = ModelConfig.from_gguf(_meta("qwen2"))
    assert c.attn_bias and not c.qk_norm and c.rope_type == "neox" and not c.tied_output
    assert c.head_dim == 32 and c.eos_ids == (7, 9) and c.n_ctx_train == 4096
    c3 = ModelConfig.from_gguf(_meta("qwen3", **{"ARCH.attention.key_length": 64, "ARCH.attention.value_length": 64}))
    assert c3.qk_norm and not c3.attn_bias and c3.head_dim == 64 and c3.attn_scale == 1 / 8


def test_rope_scaling_parsing():
    lin = ModelConfig.from_gguf(_meta("llama", **{"ARCH.rope.scaling.type": "linear", "ARCH.rope.scaling.factor": 4.0}))
    assert lin.rope_scaling.kind == "linear" and lin.rope_scaling.freq_scale == 0.25
    yarn = ModelConfig.from_gguf(_meta("qwen2", **{
        "ARCH.rope.scaling.type": "yarn", "ARCH.rope.scaling.factor": 4.0,
        "ARCH.rope.scaling.original_context_length": 32768}))
    s = yarn.rope_scaling
    assert (s.kind, s.factor, s.orig_ctx, s.yarn_ext_factor, s.yarn_beta_fast, s.yarn_beta_slow) == \
        ("yarn", 4.0, 32768, 1.0, 32.0, 1.0)
    none = ModelConfig.from_gguf(_meta("llama", **{"ARCH.rope.scaling.type": "none", "ARCH.rope.scaling.factor": 4.0}))
    assert none.rope_scaling.kind == "none"
    legacy = ModelConfig.from_gguf(_meta("llama", **{"ARCH.rope.scale_linear": 2.0}))
    assert legacy.rope_scaling.kind == "linear" and legacy.rope_scaling.factor == 2.0
    with pytest.raises(UnsupportedModelError, match="longrope"):
        ModelConfig.from_gguf(_meta("llama", **{"ARCH.rope.scaling.type": "longrope", "ARCH.rope.scaling.factor": 2.0}))


def test_gemma3_global_rope_scaling_leaves_local_layers_alone():
    c = ModelConfig.from_gguf(_meta("gemma3", **{"ARCH.attention.sliding_window": 1024,
                                                 "ARCH.rope.scaling.type": "linear", "ARCH.rope.scaling.factor": 8.0}))
    assert c.rope_scaling.factor == 8.0 and c.rope_scaling_local.kind == "none"
    assert c.rope_base == 1e6 and c.rope_base_local == 10000.0
    assert c.layer_window(0) == 1024 and c.layer_window(5) is None


def test_sliding_window_pattern_keys():
    arr = [True, False] * 6
    c = ModelConfig.from_gguf(_meta("qwen2", **{"ARCH.attention.sliding_window": 64,
                                                "ARCH.attention.sliding_window_pattern": np.array(arr)}))
    assert c.swa_layers == tuple(arr)
    c = ModelConfig.from_gguf(_meta("qwen2", **{"ARCH.attention.sliding_window": 64,
                                                "ARCH.attention.sliding_window_pattern": 4}))
    assert [i for i, s in enumerate(c.swa_layers) if not s] == [3, 7, 11]
    c = ModelConfig.from_gguf(_meta("qwen2", **{"ARCH.attention.sliding_window": 64}))  # Mistral-style: all
    assert all(c.swa_layers)
    with pytest.raises(UnsupportedModelError, match="sliding_window_pattern"):
        ModelConfig.from_gguf(_meta("qwen2", **{"ARCH.attention.sliding_window": 64,
                                                "ARCH.attention.sliding_window_pattern": np.array([True] * 3)}))


def test_bad_metadata_is_named():
    with pytest.raises(UnsupportedModelError, match="'mamba'"):
        ModelConfig.from_gguf(FakeGGUF({"general.architecture": "mamba"}, {}))
    g = _meta("llama")
    del g.metadata["llama.embedding_length"]
    with pytest.raises(UnsupportedModelError, match="llama.embedding_length"):
        ModelConfig.from_gguf(g)
    with pytest.raises(UnsupportedModelError, match="grouped"):
        ModelConfig.from_gguf(_meta("llama", **{"ARCH.attention.head_count_kv": 3}))
    with pytest.raises(UnsupportedModelError, match="varies"):
        ModelConfig.from_gguf(_meta("llama", **{"ARCH.attention.head_count_kv": np.array([2, 4] * 6)}))
    uniform = ModelConfig.from_gguf(_meta("llama", **{"ARCH.attention.head_count_kv": np.array([4] * 12)}))
    assert uniform.n_head_kv == 4
    no_embd = _meta("llama")
    del no_embd.tensors["token_embd.weight"]
    with pytest.raises(UnsupportedModelError, match="token_embd"):
        ModelConfig.from_gguf(no_embd)


def test_tensor_map(smollm2_path):
    g = GGUFFile(smollm2_path)
    tm = tensor_map("llama", 30, g.tensors)
    assert tm.tied_output and tm.output_name() == "token_embd.weight"
    assert tm.layers[7]["attn_q"] == "blk.7.attn_q.weight" and len(tm.layers) == 30
    # every tensor of the file is accounted for by the map
    mapped = set(tm.globals.values()) | {n for layer in tm.layers for n in layer.values()}
    assert mapped == set(g.tensors)
    assert layer_tensor_name("attn_k_bias", 2) == "blk.2.attn_k.bias"
    assert set(supported_archs()) == {"llama", "qwen2", "qwen3", "gemma3", "qwen2moe", "qwen3moe"}


def test_tensor_map_errors():
    names = {"token_embd.weight", "output_norm.weight"} | {
        layer_tensor_name(r, 0) for r in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                          "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert tensor_map("llama", 1, names).layers[0]["ffn_down"] == "blk.0.ffn_down.weight"
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.attn_q\.bias"):
        tensor_map("qwen2", 1, names)
    with pytest.raises(UnsupportedModelError, match=r"blk\.1\.attn_norm\.weight.* and \d+ more"):
        tensor_map("llama", 2, names)
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        tensor_map("gpt2", 1, names)

"""aircupy.gguf.quants: bit-exact against gguf-py's numpy dequantizer, plus hand-decoded blocks."""
from __future__ import annotations

import numpy as np
import pytest
from gguf.quants import dequantize as oracle_dequantize

from aircupy.errors import UnsupportedModelError
from aircupy.gguf.ggml import BLOCK_GEOMETRY, GGMLType
from aircupy.gguf.quants import dequantize
from aircupy.gguf.reader import GGUFFile
from tests.helpers.quant_blocks import ALL_TYPES, random_blocks


def _oracle(raw: np.ndarray, t: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    """gguf-py wants the bytes shaped (..., row_nbytes) and returns (..., row_elems)."""
    out = oracle_dequantize(raw.reshape(*shape[:-1], -1), t)
    return np.asarray(out, dtype=np.float32).reshape(shape)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    # array_equal treats -0.0 == 0.0; compare the bit patterns too.
    return a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(
        a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("scales,extremes", [("realistic", False), ("any", True)])
@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_random_blocks_bit_exact(t, scales, extremes):
    rng = np.random.default_rng(int(t) * 7 + extremes)
    be = BLOCK_GEOMETRY[t][0]
    n_cols = 8 * max(be, 32)
    raw = random_blocks(t, 24, n_cols, rng, scales=scales, extremes=extremes)
    shape = (2, 12, n_cols)  # 3-D: leading axes are just more rows
    ours = dequantize(raw, t, shape)
    assert np.isfinite(ours).all()
    assert _same_bits(ours, _oracle(raw, t, shape))


def test_many_chunks_bit_exact():
    # More blocks than one vectorised step (2^20 values), with a partial last step.
    rng = np.random.default_rng(5)
    t, shape = GGMLType.Q8_0, (37, 32 * 1000)
    raw = random_blocks(t, *shape, rng)
    assert _same_bits(dequantize(raw.ravel(), t, shape), _oracle(raw, t, shape))


def test_q4_0_hand_decoded():
    # d = 0.5; byte 0x9F: low nibble 15 -> element j, high nibble 9 -> element j + 16; offset 8.
    block = np.frombuffer(np.float16(0.5).tobytes() + bytes([0x9F] * 16), dtype=np.uint8)
    y = dequantize(block, GGMLType.Q4_0, (32,))
    assert np.array_equal(y, np.array([3.5] * 16 + [0.5] * 16, dtype=np.float32))


def test_q5_1_hand_decoded():
    # d = 1, m = -10; qh bit j sets bit 4 of element j; qh = 0x80000001 -> elements 0 and 31.
    qs = bytes([0x21] * 16)  # low nibble 1 (elements 0..15), high nibble 2 (elements 16..31)
    raw = (np.float16(1).tobytes() + np.float16(-10).tobytes()
           + (0x80000001).to_bytes(4, "little") + qs)
    y = dequantize(np.frombuffer(raw, dtype=np.uint8), GGMLType.Q5_1, (1, 32))
    q = np.array([1 + 16] + [1] * 15 + [2] * 15 + [2 + 16], dtype=np.float32)
    assert np.array_equal(y[0], q - 10)


def test_q8_0_and_bf16_hand_decoded():
    raw = np.frombuffer(np.float16(0.25).tobytes() + np.arange(-16, 16, dtype=np.int8).tobytes(),
                        dtype=np.uint8)
    assert np.array_equal(dequantize(raw, GGMLType.Q8_0, (32,)),
                          np.arange(-16, 16, dtype=np.float32) * 0.25)
    bf = np.array([0x3F80, 0xC040, 0x0000], dtype="<u2")  # 1.0, -3.0, 0.0
    assert np.array_equal(dequantize(bf, GGMLType.BF16, (3,)), np.array([1, -3, 0], np.float32))


def _pack_k4_scales(ls: list[int], lm: list[int]) -> bytes:
    """Q4_K/Q5_K 6-bit scales and mins packed as ggml's quantize_row_q4_K_ref writes them."""
    s = [0] * 12
    for j in range(8):
        if j < 4:
            s[j], s[j + 4] = ls[j], lm[j]
        else:
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            s[j - 4] |= (ls[j] >> 4) << 6
            s[j] |= (lm[j] >> 4) << 6
    return bytes(s)


def test_q4_k_hand_decoded():
    # Sub-block j (32 values) gets scale ls[j] and min lm[j]; quants: low nibbles 3, high nibbles 12,
    # so sub-blocks 0, 2, 4, 6 (low nibbles of qs groups 0..3) hold 3 and 1, 3, 5, 7 hold 12.
    ls, lm = [1, 7, 16, 33, 40, 47, 62, 63], [0, 63, 5, 17, 48, 2, 31, 60]
    d, dmin = 0.5, 0.25
    raw = (np.float16(d).tobytes() + np.float16(dmin).tobytes() + _pack_k4_scales(ls, lm)
           + bytes([0xC3] * 128))
    y = dequantize(np.frombuffer(raw, dtype=np.uint8), GGMLType.Q4_K, (256,)).reshape(8, 32)
    want = [d * ls[j] * (3 if j % 2 == 0 else 12) - dmin * lm[j] for j in range(8)]
    assert np.array_equal(y, np.repeat(np.array(want, np.float32)[:, None], 32, axis=1))


def test_q3_k_hand_decoded():
    # Scales packed as ggml's quantize_row_q3_K_ref does (value + 32 in 6 bits); all qs bits 1
    # (low2 = 3); hmask bit set only for elements 0..31 (bit 0 of every hmask byte).
    scales = [-32, -1, 0, 31, 5, -7, 12, -20, 1, 2, 3, 4, -5, -6, 30, -31]
    s = [0] * 12
    for j, v in enumerate(scales):
        lv = v + 32
        if j < 8:
            s[j] = lv & 0xF
        else:
            s[j - 8] |= (lv & 0xF) << 4
        s[j % 4 + 8] |= (lv >> 4) << (2 * (j // 4))
    raw = bytes([0x01] * 32) + bytes([0xFF] * 64) + bytes(s) + np.float16(0.125).tobytes()
    y = dequantize(np.frombuffer(raw, dtype=np.uint8), GGMLType.Q3_K, (256,)).reshape(16, 16)
    q = np.array([3, 3] + [3 - 4] * 14, dtype=np.float32)  # sub-blocks 0, 1 = elements 0..31
    want = (np.float32(0.125) * np.array(scales, np.float32) * q)[:, None]
    assert np.array_equal(y, np.broadcast_to(want, (16, 16)))


def test_result_is_a_fresh_writable_array():
    src = np.arange(8, dtype=np.float32)
    view = src.view(np.uint8)
    view.flags.writeable = False
    y = dequantize(view, GGMLType.F32, (2, 4))
    y[0, 0] = 42.0
    assert src[0] == 0.0 and y.shape == (2, 4) and y.dtype == np.float32


def test_wrong_byte_count_is_value_error():
    with pytest.raises(ValueError, match="needs 36 bytes, got 34"):
        dequantize(np.zeros(34, np.uint8), GGMLType.Q4_0, (2, 32))


def test_partial_block_row_is_unsupported():
    with pytest.raises(UnsupportedModelError, match="not a multiple of the 32-value block"):
        dequantize(np.zeros(18, np.uint8), GGMLType.Q4_0, (16,))


@pytest.mark.parametrize("t", [GGMLType.Q8_1, GGMLType.IQ2_XXS, GGMLType.I32, 99])
def test_unsupported_type(t):
    with pytest.raises(UnsupportedModelError, match="no dequantizer"):
        dequantize(np.zeros(36, np.uint8), t, (32,))


# Types the two real model files hold (what the comparison below must cover).
_REAL_MODEL_TYPES = {
    "smollm2": {GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.F32},
    "gemma3": {GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.F32},
}


@pytest.mark.parametrize("model", sorted(_REAL_MODEL_TYPES))
def test_every_real_model_tensor_bit_exact(model, request):
    path = request.getfixturevalue(f"{model}_path")
    rows_per_step = 8192  # gemma's 262144 x 640 embedding: 32 steps of 21 MB instead of one 671 MB
    seen = set()
    with GGUFFile(path) as g:
        for t in g.tensors.values():
            raw = t.data.reshape(int(np.prod(t.shape[:-1])), -1)  # (rows, row_nbytes); 1-D: 1 row
            for r in range(0, raw.shape[0], rows_per_step):
                part = raw[r:r + rows_per_step]
                ours = dequantize(part, t.ggml_type, (part.shape[0], t.shape[-1]))
                assert _same_bits(ours, _oracle(part, t.ggml_type, ours.shape)), (t.name, r)
            seen.add(t.ggml_type)
    assert seen == _REAL_MODEL_TYPES[model]

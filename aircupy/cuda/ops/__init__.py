"""The typed CUDA launchers, one per kernel: the contract the GPU model codes against.

    from aircupy.cuda.kernels import KernelLibrary
    from aircupy.cuda import ops
    lib = KernelLibrary(); ops.matvec(lib, x, w, out)

Every launcher asserts dtypes, contiguity and shapes, passes scalars as np.int32/np.float32, takes
preallocated outputs (and scratch) and an optional cupy `stream`, and never allocates or synchronises,
so it is safe inside CUDA-graph capture. The launchers live in three files by kernel family (layers,
matmul, sampling); this module gathers them. cuda_src/*.cu headers describe layouts and launch
geometry; aircupy/reference/ops.py and gguf/quants.py are the numpy twins. argmax and apply_penalties
(greedy rows and per-row penalties/bias) serve batched sampling, with per-sequence settings.
"""
from __future__ import annotations

from aircupy.cuda.ops.layers import (DECODE_MAX_ROWS, HEAD_DIMS, MAX_SPLITS, MIN_CHUNK, attention,
                                     attention_scratch_nbytes, decode_splits, geglu, glu, glu_quant,
                                     rms_norm, rms_norm_add, rope_kv_store, softcap, swiglu, take_rows)
from aircupy.cuda.ops.matmul import (FORMATS, MAX_MATVEC_ROWS, cast_half, dequant, gemm, gemm_q,
                                     gemm_q_part_nbytes, get_rows,
                                     linear, linear_scratch_nbytes, matvec, matvec_xq, repack, takes_xq,
                                     warm_gemm, xq_row_nbytes)
from aircupy.cuda.ops.sampling import apply_penalties, argmax, sample
from aircupy.cuda.ops.packing import QWeight, needs_repack, repack_nbytes

__all__ = [
    "DECODE_MAX_ROWS", "HEAD_DIMS", "MAX_SPLITS", "attention", "attention_scratch_nbytes",
    "decode_splits", "geglu", "glu", "rms_norm", "rms_norm_add", "softcap", "swiglu",
    "MIN_CHUNK", "glu_quant", "rope_kv_store", "take_rows",
    "FORMATS", "MAX_MATVEC_ROWS", "cast_half", "dequant", "gemm", "gemm_q", "gemm_q_part_nbytes", "get_rows", "linear",
    "linear_scratch_nbytes", "matvec", "repack", "matvec_xq", "takes_xq", "warm_gemm", "xq_row_nbytes",
    "apply_penalties", "argmax", "sample", "QWeight", "needs_repack", "repack_nbytes",
]

"""Which prefill matmul linear() runs for M > 8 rows, per shape: the fused-dequant tensor-core GEMM
(cuda_src/gemm_q.cu, `gemm_q`) or dequantize into an fp16/bf16 scratch + cuBLAS GemmEx (`gemm`).

Pure Python (no numpy, no cupy): the CPU tier tests it. The choice is a lookup in FUSED_SHAPES, the
(type name, N, K, M bucket) keys where gemm_q was MEASURED faster on a GPU; every other shape takes
cuBLAS. `python bench/bench_kernels.py --gemm` times both paths and prints the entries to paste here.
Until a GPU run fills it the table is empty, so linear() behaves exactly as before (cuBLAS).

M buckets: a shape's speed depends on M mostly through the number of row tiles and how long the K loop
runs, so rows are grouped by the smallest bound in M_BUCKETS that holds them; past the last bound the
last bucket stands for every larger M (prefill chunks are at most a few thousand rows).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

# Types gemm_q has kernels for: their 32-value items tile a row in order (legacy formats; Q4_K/Q5_K,
# whose items 2g and 2g+1 cover values [64g, 64g + 64) of a 256-value block). Q2_K/Q3_K/Q6_K items
# straddle 128 values, the float types need no dequantization: those always take cuBLAS.
# Keep in sync with FOR_EACH_GEMM_Q_FORMAT in cuda_src/gemm_q.cu (a CPU test checks it).
GEMM_Q_TYPES: frozenset[str] = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K"})
_BLOCK = {"Q4_K": 256, "Q5_K": 256}  # values per block where not 32: K must be a multiple

M_BUCKETS: tuple[int, ...] = (32, 128, 512, 2048)

# (type name, N, K, M bucket) where gemm_q beat dequant + cuBLAS. Empty: nothing measured yet.
FUSED_SHAPES: frozenset[tuple[str, int, int, int]] = frozenset()

PATHS = ("fused", "cublas")


def m_bucket(m: int) -> int:
    """The M bucket of m rows (m >= 1): the smallest bound >= m, the last bound beyond it."""
    if m < 1:
        raise ValueError(f"rows must be >= 1, got {m}")
    return next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])


def gemm_q_supports(type_name: str, k: int) -> bool:
    """Whether gemm_q takes a weight of this type with rows of k values."""
    return type_name in GEMM_Q_TYPES and k % _BLOCK.get(type_name, 32) == 0


def prefill_path(type_name: str, n: int, k: int, m: int,
                 table: Iterable[tuple[str, int, int, int]] = FUSED_SHAPES) -> str:
    """'fused' when (type, n, k, m_bucket(m)) is in the table and gemm_q supports it, else 'cublas'."""
    if not gemm_q_supports(type_name, k):
        return "cublas"
    return "fused" if (type_name, int(n), int(k), m_bucket(m)) in frozenset(table) else "cublas"


def measured_entries(rows: Iterable[Mapping], margin: float = 0.03) -> list[tuple[str, int, int, int]]:
    """FUSED_SHAPES entries from bench rows {type, n, k, m, fused_us, cublas_us}: the shapes where the
    fused kernel was at least `margin` faster. A bucket measured at several M counts only if the fused
    kernel won at every one of them (no guessing between measurements), sorted for a stable diff."""
    won: dict[tuple[str, int, int, int], bool] = {}
    for r in rows:
        key = (str(r["type"]), int(r["n"]), int(r["k"]), m_bucket(int(r["m"])))
        ok = float(r["fused_us"]) * (1.0 + margin) <= float(r["cublas_us"])
        won[key] = won.get(key, True) and ok
    return sorted(k for k, ok in won.items() if ok)


def format_entries(entries: Iterable[tuple[str, int, int, int]]) -> str:
    """The FUSED_SHAPES assignment for these entries, as Python source to paste into this module."""
    items = "".join(f"    {tuple(e)!r},\n" for e in sorted(entries))
    if not items:
        return "FUSED_SHAPES: frozenset[tuple[str, int, int, int]] = frozenset()"
    return "FUSED_SHAPES: frozenset[tuple[str, int, int, int]] = frozenset({\n" + items + "})"

"""Which prefill matmul linear() runs for M > 8 rows, per shape: dequantize W into an fp16/bf16 scratch
+ cuBLAS GemmEx ("cublas"), or the tensor-core GEMM with the dequantization fused (cuda_src/gemm_q.cu)
reading x as fp32 ("fused") or after a cast_half of x into the scratch ("fused_xh": half the bytes of x,
which the kernel re-reads once per 128 output columns, for one small extra launch).

Pure Python (no numpy, no cupy): the CPU tier tests it. The choice is a lookup in FAST_PATHS, a
read-only map (type name, N, K, M bucket) -> path of the shapes where a fused path was MEASURED faster
on a GPU; every other shape takes cuBLAS. `python bench/bench_kernels.py --gemm` times all three and
prints the map to paste here. Until a GPU run fills it the map is empty, so linear() behaves exactly
as before (cuBLAS).

M buckets: a shape's speed depends on M mostly through the number of row tiles and how long the K loop
runs, so rows are grouped by the smallest bound in M_BUCKETS that holds them; past the last bound the
last bucket stands for every larger M (prefill chunks are at most a few thousand rows).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

# Types gemm_q has kernels for: their 32-value items tile a row in order (legacy formats; Q4_K/Q5_K,
# whose items 2g and 2g+1 cover values [64g, 64g + 64) of a 256-value block). Q2_K/Q3_K/Q6_K items
# straddle 128 values, the float types need no dequantization: those always take cuBLAS.
# Keep in sync with FOR_EACH_GEMM_Q_FORMAT in cuda_src/gemm_q.cu (a CPU test checks it).
GEMM_Q_TYPES: frozenset[str] = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K"})
_BLOCK = {"Q4_K": 256, "Q5_K": 256}  # values per block where not 32: K must be a multiple

M_BUCKETS: tuple[int, ...] = (32, 128, 512, 2048)

Key = tuple[str, int, int, int]  # (type name, N, K, M bucket)
# Shapes where a fused path beat dequant + cuBLAS, and which one. Empty: nothing measured yet.
FAST_PATHS: Mapping[Key, str] = MappingProxyType({})

FUSED_PATHS = ("fused", "fused_xh")
PATHS = ("cublas",) + FUSED_PATHS


def m_bucket(m: int) -> int:
    """The M bucket of m rows (m >= 1): the smallest bound >= m, the last bound beyond it."""
    if m < 1:
        raise ValueError(f"rows must be >= 1, got {m}")
    return next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])


def gemm_q_supports(type_name: str, k: int) -> bool:
    """Whether gemm_q takes a weight of this type with rows of k values."""
    return type_name in GEMM_Q_TYPES and k % _BLOCK.get(type_name, 32) == 0


def prefill_path(type_name: str, n: int, k: int, m: int, table: Mapping[Key, str] = FAST_PATHS) -> str:
    """The table's path for (type, n, k, m_bucket(m)) where gemm_q supports the weight, else 'cublas'."""
    if not gemm_q_supports(type_name, k):
        return "cublas"
    return table.get((type_name, int(n), int(k), m_bucket(m)), "cublas")


def measured_table(rows: Iterable[Mapping], margin: float = 0.03) -> dict[Key, str]:
    """FAST_PATHS entries from bench rows {type, n, k, m, cublas_us, fused_us, fused_xh_us}: per key,
    the fused path with the least total time among those at least `margin` faster than cuBLAS at EVERY
    M measured in the bucket (no guessing between measurements); keys sorted for a stable diff."""
    groups: dict[Key, list[Mapping]] = {}
    for r in rows:
        groups.setdefault((str(r["type"]), int(r["n"]), int(r["k"]), m_bucket(int(r["m"]))), []).append(r)
    out: dict[Key, str] = {}
    for key, rs in sorted(groups.items()):
        best = None
        for p in FUSED_PATHS:
            if all(f"{p}_us" in r and float(r[f"{p}_us"]) * (1.0 + margin) <= float(r["cublas_us"]) for r in rs):
                total = sum(float(r[f"{p}_us"]) for r in rs)
                if best is None or total < best[0]:
                    best = (total, p)
        if best is not None:
            out[key] = best[1]
    return out


def format_table(table: Mapping[Key, str]) -> str:
    """The FAST_PATHS assignment for this map, as Python source to paste into this module."""
    items = "".join(f"    {tuple(k)!r}: {v!r},\n" for k, v in sorted(table.items()))
    return "FAST_PATHS: Mapping[Key, str] = MappingProxyType({" + (f"\n{items}" if items else "") + "})"

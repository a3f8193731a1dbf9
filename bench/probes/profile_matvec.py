"""Run one decode matvec a few times, for a profiler (ncu) to look at: which limit binds, issue or memory.

    ncu -k regex:matvec --launch-skip 2 --launch-count 1 --section SpeedOfLight --section WarpStateStats \
        python -m bench.probes.profile_matvec --type Q4_0 --n 28672 --k 4096 --rows 1
"""
from __future__ import annotations

import argparse

from aircupy.gguf.ggml import GGMLType


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--type", default="Q4_0")
    ap.add_argument("--n", type=int, default=28672)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--launches", type=int, default=4)
    a = ap.parse_args()
    import cupy as cp
    from aircupy.cuda.kernels import KernelLibrary
    from aircupy.cuda import ops
    from aircupy.cuda.ops.packing import QWeight, repack_nbytes

    lib = KernelLibrary()
    t = GGMLType[a.type]
    w = QWeight(cp.random.randint(0, 256, size=repack_nbytes(t, (a.n, a.k)), dtype=cp.uint8), t, (a.n, a.k))
    x = cp.random.standard_normal((a.rows, a.k), dtype=cp.float32)
    out = cp.empty((a.rows, a.n), dtype=cp.float32)
    for _ in range(a.launches):
        ops.matvec(lib, x, w, out)
    cp.cuda.Device().synchronize()


if __name__ == "__main__":
    main()

#!/bin/bash
# GPU check of the fused-dequant prefill GEMM (issue #4, branch wip/mma-gemm) in ONE device call
# (~3-5 min: the first NVRTC compile of all kernels takes ~1 min): the kernels and launchers of THIS
# checkout (PYTHONPATH + kernels.source_dir, which prefers the checkout's cuda_src), the GPU tests of
# gemm_q and of the existing matmul launchers (linear's cuBLAS path must be unchanged), the prefill
# graph tests (linear inside a captured prefill), then bench_kernels --gemm. Logs and JSON go to $OUT.
# usage (repo root, on the GPU host): bash bench/probes/device_gemm_q.sh [tests|bench|all]
set -uo pipefail
what=${1:-all}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import aircupy, aircupy.cuda.kernels as k; print(aircupy.__file__, k.source_dir())" | tee "$OUT/where.txt"
if [ "$what" != bench ]; then
  timeout 420 python3 -m pytest -q --tb=short tests/gpu/test_gemm_q.py tests/gpu/test_kernels_matmul.py \
    tests/gpu/test_prefill_graphs.py 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED|Error" | tail -40
fi
if [ "$what" != tests ]; then
  timeout 300 python3 bench/bench_kernels.py --gemm --json "$OUT/gemm_paths.json" 2>&1 | tee "$OUT/bench_gemm.log"
fi

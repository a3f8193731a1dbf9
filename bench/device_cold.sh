#!/bin/bash
# Issue 5 on the GPU host in one device call (~4 min): the cold-load GPU tests, then cold TTFT of the
# synthetic 8B Q4_0 for the resident and the all-streamed model, with each cold-start warmer mode.
# Logs and JSON go to $OUT. usage (repo root, on the GPU host): bash bench/device_cold.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /root/synth
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
M=/root/synth/llama3-8b-Q4_0.gguf
[ -f $M ] || python3 -m aircupy synth $M --arch llama3-8b --type Q4_0 | tee "$OUT/synth.log"
timeout 300 python3 -m pytest -q -s --tb=short tests/gpu/test_cold_load.py 2>&1 | tee "$OUT/gpu_cold_load.log" \
  | grep -E "passed|failed|FAILED|Error" | tail -20
timeout 300 python3 -m pytest -q --tb=short -k tiny tests/gpu/test_cuda_model.py 2>&1 \
  | tee "$OUT/gpu_models.log" | grep -E "passed|failed|FAILED|Error" | tail -20
timeout 300 python3 -m pytest -q --tb=short tests/gpu/test_streaming.py 2>&1 \
  | tee "$OUT/gpu_streaming.log" | grep -E "passed|failed|FAILED|Error" | tail -20
timeout 400 python3 bench/bench_cold.py --model $M --resident all,0 --read-ahead fadvise,read,off \
  --json "$OUT/cold8.json" 2>&1 | tee "$OUT/cold8.log"

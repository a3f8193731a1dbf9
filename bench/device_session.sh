#!/bin/bash
# Every GPU measurement of issues 4, 5 and 7 in back-to-back device calls (the machine is kept only
# while calls keep coming: issue each stage as soon as the previous one returns). Each stage is under
# the 10-minute call limit; logs go to /root/logs and come back as $OUT/logs-STAGE.tgz with the JSON.
#   stage1 (carry .device/whl .device/peers .device/COMMIT): wheels + editable install; llama-bench build and the
#          synthetic 8B Q4_0 + Q4_K and 70B Q4_0 in the background; the GPU tier minus the SmolLM2,
#          streaming and cold-load tests.
#   stage2 (carry .device/stage/part.00 + SHA256SUM): the streaming and cold-load GPU tests; the
#          prefill GEMM paths (bench_kernels --gemm) -> /root/gemm_table.json, used by later stages
#          through AIRCUPY_GEMM_TABLE only if the gemm_q GPU tests passed.
#   stage3 (carry .device/stage/part.01): join SmolLM2; its GPU tests; `python -m bench` on SmolLM2
#          and the 8B scenarios for aircupy and llama.cpp.
#   stage4: the 70B scenarios (merged); resident 8B Q4_K and the real SmolLM2 (bench_resident.py).
#   stage5: cold TTFT per read-ahead mode, 3 interleaved reps (no build or synthesis running now);
#          the HF peer on SmolLM2 and the resident 8B (its child gives up after 300 s), merged.
# The 98 MB SmolLM2 travels in two 48 MiB parts (../shared/device/split.sh), one per call.
# usage (repo root, on the GPU host): bash bench/device_session.sh stage1|...|stage5
set -uo pipefail
stage=${1:?usage: device_session.sh stage1|stage2|stage3|stage4|stage5}
OUT=${OUT:-/tmp/out}; L=/root/logs; mkdir -p "$OUT" $L /root/stage /root/synth /root/bench
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
[ -f /root/stage/model.gguf ] && export AIRCUPY_SMOLLM2_GGUF=/root/stage/model.gguf   # after stage3's join
LB=/root/llama/llama.cpp/build/bin/llama-bench
S=/root/synth
[ -f /root/gemm_table.json ] && export AIRCUPY_GEMM_TABLE=/root/gemm_table.json
# The host's copy of .git can be stale: the records take the commit from .device/COMMIT, written here
# before the calls with `git describe --always --dirty > .device/COMMIT` (carry .device/COMMIT).
[ -f .device/COMMIT ] && export AIRCUPY_COMMIT=$(cat .device/COMMIT)
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip -e failed"
pack() { tar czf "$OUT/logs-$stage.tgz" -C $L . 2>/dev/null; }
trap pack EXIT

if [ "$stage" = stage1 ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null || echo "pip -e failed"
  # The pruned llama.cpp tree lacks tools/ui, which its CMake still adds: give it an empty one, and
  # leave the server out (it depends on the ui's asset target).
  (setsid nohup bash -c 'mkdir -p /root/llama && tar xJf .device/peers/llama.cpp.tar.xz -C /root/llama \
    && cd /root/llama/llama.cpp && mkdir -p tools/ui && : > tools/ui/CMakeLists.txt \
    && cmake -B build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_BUILD_TESTS=OFF \
       -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    && nice cmake --build build -j12 --target llama-bench' > $L/llama-build.log 2>&1 &)
  (setsid nohup bash -c "python3 -m aircupy synth $S/llama3-8b-Q4_0.gguf --arch llama3-8b --type Q4_0 \
    && python3 -m aircupy synth $S/llama3-8b-Q4_K.gguf --arch llama3-8b --type Q4_K \
    && python3 -m aircupy synth $S/llama-70b-Q4_0.gguf --arch llama-70b --type Q4_0" > $L/synth.log 2>&1 &)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
  timeout 520 python3 -m pytest -q -rfs --tb=short --durations=10 tests/gpu -k "not smollm2" \
    --ignore tests/gpu/test_streaming.py --ignore tests/gpu/test_cold_load.py 2>&1 \
    | tee $L/gpu_tier.log | grep -E "passed|failed|FAILED|Error" | tail -25
  tail -n 2 $L/synth.log $L/llama-build.log
  exit 0
fi

if [ "$stage" = stage2 ]; then
  cp .device/stage/part.00 .device/stage/SHA256SUM /root/stage/
  timeout 200 python3 -m pytest -q -rf --tb=short tests/gpu/test_streaming.py tests/gpu/test_cold_load.py 2>&1 \
    | tee $L/gpu_stream_cold.log | grep -E "passed|failed|FAILED|Error" | tail -15
  timeout 200 python3 bench/bench_kernels.py --gemm --json $L/gemm_paths.json --table-out /root/gemm_candidate.json \
    2>&1 | tee $L/bench_gemm.log | tail -30
  if grep -qE "FAILED tests/gpu/test_gemm_q|ERROR tests/gpu/test_gemm_q" $L/gpu_tier.log \
     || ! grep -qE "[0-9]+ passed" $L/gpu_tier.log; then
    echo "gemm_q GPU tests not clean: the measured table is NOT used"
  else
    cp /root/gemm_candidate.json /root/gemm_table.json 2>/dev/null && cp /root/gemm_table.json "$OUT/"
  fi
  tail -n 2 $L/synth.log $L/llama-build.log
  exit 0
fi

if [ "$stage" = stage3 ]; then
  cp .device/stage/part.01 /root/stage/ && (cd /root/stage && cat part.* > model.gguf \
    && sha256sum -c SHA256SUM && rm -f part.*) || echo "SmolLM2 join failed"
  export AIRCUPY_SMOLLM2_GGUF=/root/stage/model.gguf
  # every test on the real file (stage1 left them out: the smollm2_path fixture's tests)
  timeout 150 python3 -m pytest -q -rfs --tb=short tests/gpu/test_cuda_model.py tests/gpu/test_cold_load.py \
    -k "smollm2 or not tiny" 2>&1 | tee $L/gpu_smol.log \
    | grep -E "passed|failed|FAILED|Error" | tail -10
  for i in $(seq 60); do [ -x $LB ] && break; sleep 5; done
  tail -1 $L/llama-build.log
  timeout 420 python3 -m bench --engines aircupy,llama.cpp --scenarios 'smollm2-*,8b-*' --synth-dir $S \
    --llama-bench $LB --out /root/bench/all --reps 2 2>&1 | tee $L/bench_a.log | grep -vE "^  (aircupy|llama.cpp|hf) " | tail -20
  cp /root/bench/all/results.json "$OUT/results-a.json" 2>/dev/null
  exit 0
fi

if [ "$stage" = stage4 ]; then
  timeout 330 python3 -m bench --engines aircupy,llama.cpp --scenarios '70b-*' --synth-dir $S \
    --llama-bench $LB --out /root/bench/all --reps 2 --merge /root/bench/all/results.json 2>&1 \
    | tee $L/bench_b.log | grep -vE "^  (aircupy|llama.cpp|hf) " | tail -20
  cp /root/bench/all/results.json /root/bench/all/results.md /root/bench/all/*.png "$OUT/" 2>/dev/null
  timeout 220 python3 bench/bench_resident.py --model /root/stage/model.gguf --model $S/llama3-8b-Q4_K.gguf \
    --llama-bench $LB --json "$OUT/resident.json" 2>&1 | tee $L/resident.log | tail -8
  exit 0
fi

# cold TTFT here, with the llama.cpp build and the synthesis long done (CPU and disk contention)
timeout 200 python3 bench/bench_cold.py --model $S/llama3-8b-Q4_0.gguf --resident all,0 --reps 3 \
  --read-ahead read,off --json "$OUT/cold8.json" 2>&1 | tee $L/cold8.log | tail -5
timeout 330 python3 -m bench --engines hf --scenarios 'smollm2-resident,8b-q4_0-100pct' --synth-dir $S \
  --out /root/bench/hf --reps 2 --merge /root/bench/all/results.json 2>&1 | tee $L/bench_hf.log | tail -12
cp /root/bench/hf/results.json /root/bench/hf/results.md /root/bench/hf/*.png "$OUT/" 2>/dev/null

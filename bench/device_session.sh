#!/bin/bash
# Every GPU measurement of issues 4, 5 and 7 in back-to-back device calls (the machine is kept only
# while calls keep coming: issue each stage as soon as the previous one returns). Logs/JSON -> $OUT.
#   stage1: SmolLM2 part 00 to /root/stage; llama-bench build (background, ~5 min on 16 cores);
#           synthetic 8B Q4_0 + Q4_K and 70B Q4_0 (background); the GPU tier minus SmolLM2.
#   stage2: join SmolLM2; its GPU tests; `python -m bench` on every scenario for aircupy and
#           llama.cpp (~7 min).
#   stage3: resident 8B Q4_K and the real SmolLM2 vs llama-bench (bench_resident.py); cold TTFT.
#   stage4: the HF peer where it fits (SmolLM2 and the 8B scenarios), merged into stage2's results.
# The 98 MB SmolLM2 travels in two 48 MiB parts (../shared/device/split.sh), one per call: carry
# .device/whl, .device/peers, .device/stage/part.00 + SHA256SUM in stage1 and part.01 in stage2.
# usage (repo root, on the GPU host): bash bench/device_session.sh stage1|stage2|stage3|stage4
set -uo pipefail
stage=${1:?usage: device_session.sh stage1|stage2|stage3|stage4}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /root/stage /root/synth /root/bench
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site AIRCUPY_SMOLLM2_GGUF=/root/stage/model.gguf
LB=/root/llama/llama.cpp/build/bin/llama-bench
S=/root/synth

if [ "$stage" = stage1 ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null || echo "pip -e failed"
  cp .device/stage/part.00 .device/stage/SHA256SUM /root/stage/
  # The pruned llama.cpp tree lacks tools/ui, which its CMake still adds: give it an empty one, and
  # leave the server out (it depends on the ui's asset target).
  (setsid nohup bash -c 'mkdir -p /root/llama && tar xJf .device/peers/llama.cpp.tar.xz -C /root/llama \
    && cd /root/llama/llama.cpp && mkdir -p tools/ui && : > tools/ui/CMakeLists.txt \
    && cmake -B build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_BUILD_TESTS=OFF \
       -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    && cmake --build build -j16 --target llama-bench' > /root/llama-build.log 2>&1 &)
  (setsid nohup bash -c "python3 -m aircupy synth $S/llama3-8b-Q4_0.gguf --arch llama3-8b --type Q4_0 \
    && python3 -m aircupy synth $S/llama3-8b-Q4_K.gguf --arch llama3-8b --type Q4_K \
    && python3 -m aircupy synth $S/llama-70b-Q4_0.gguf --arch llama-70b --type Q4_0" > /root/synth.log 2>&1 &)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
  timeout 400 python3 -m pytest -q -rf --tb=short tests/gpu -k "not smollm2" 2>&1 | tee "$OUT/gpu_tier.log" \
    | grep -E "passed|failed|FAILED|Error" | tail -25
  tail -2 /root/synth.log /root/llama-build.log
  exit 0
fi

if [ "$stage" = stage2 ]; then
  cp .device/stage/part.01 /root/stage/ && (cd /root/stage && cat part.* > model.gguf \
    && sha256sum -c SHA256SUM && rm -f part.*) || echo "SmolLM2 join failed"
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null || echo "pip -e failed"
  timeout 90 python3 -m pytest -q -rf --tb=short tests/gpu -k smollm2 2>&1 | tee "$OUT/gpu_smol.log" \
    | grep -E "passed|failed|FAILED|Error" | tail -10
  for i in $(seq 60); do [ -x $LB ] && break; sleep 5; done
  tail -1 /root/llama-build.log
  timeout 450 python3 -m bench --engines aircupy,llama.cpp --synth-dir $S --llama-bench $LB \
    --out /root/bench/all --reps 2 2>&1 | grep -vE "^  (aircupy|llama.cpp|hf) " | tail -20
  cp /root/bench/all/results.json /root/bench/all/results.md /root/bench/all/*.png "$OUT/" 2>/dev/null  # <= 8 files back
  exit 0
fi

if [ "$stage" = stage3 ]; then
  timeout 200 python3 bench/bench_resident.py --model /root/stage/model.gguf --model $S/llama3-8b-Q4_K.gguf \
    --llama-bench $LB --json "$OUT/resident.json" 2>&1 | tail -8
  timeout 90 python3 bench/bench_cold.py --model $S/llama3-8b-Q4_0.gguf --resident all,0 \
    --json "$OUT/cold8.json" 2>&1 | tail -3
  exit 0
fi

timeout 540 python3 -m bench --engines hf --scenarios 'smollm2-resident,8b-*' --synth-dir $S \
  --out /root/bench/hf --reps 2 --merge /root/bench/all/results.json 2>&1 | tail -12
cp /root/bench/hf/results.json /root/bench/hf/results.md /root/bench/hf/*.png "$OUT/" 2>/dev/null

#!/bin/bash
# The resident-model GPU run in two back-to-back device calls (the 98 MB SmolLM2 travels in two
# 48 MiB parts, one per call; see ../shared/device/split.sh). Logs and JSON go to $OUT.
#   stage1: copy part 00; build llama.cpp's llama-bench in the background (~5 min on 16 cores);
#           write the synthetic 8B models; run the GPU tests on tiny synthetic models.
#   stage2: join SmolLM2; run the whole GPU tier; time a 70B-shape synth; wait for llama-bench;
#           benchmark ours and llama.cpp on the same files (bench/bench_resident.py).
# usage (repo root, on the GPU host): bash bench/device_resident.sh stage1|stage2
set -uo pipefail
stage=${1:?usage: device_resident.sh stage1|stage2}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /root/stage /root/synth
export PYTHONUNBUFFERED=1 AIRCUPY_SMOLLM2_GGUF=/root/stage/model.gguf
LB=/root/llama/llama.cpp/build/bin/llama-bench

if [ "$stage" = stage1 ]; then
  cp .device/stage/part.00 .device/stage/SHA256SUM /root/stage/
  # The pruned llama.cpp tree lacks tools/ui, which its CMake still adds: give it an empty one, and
  # leave the server out (it depends on the ui's asset target).
  (setsid nohup bash -c 'mkdir -p /root/llama && tar xJf .device/peers/llama.cpp.tar.xz -C /root/llama \
    && cd /root/llama/llama.cpp && mkdir -p tools/ui && : > tools/ui/CMakeLists.txt \
    && cmake -B build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_BUILD_TESTS=OFF \
       -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    && cmake --build build -j"$(nproc)" --target llama-bench' > /root/llama-build.log 2>&1 &)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
  for t in Q4_0 Q4_K; do python3 -m aircupy synth /root/synth/llama3-8b-$t.gguf --arch llama3-8b --type $t; done \
    | tee "$OUT/synth.log"
  timeout 240 python3 -m pytest -q -s --tb=short -k tiny tests/gpu/test_cuda_model.py 2>&1 | tee "$OUT/gpu_tiny.log" \
    | grep -E "passed|failed|FAILED|Error" | tail -25
  exit 0
fi

cp .device/stage/part.01 /root/stage/ && (cd /root/stage && cat part.* > model.gguf \
  && sha256sum -c SHA256SUM && rm -f part.*) || exit 1
timeout 240 python3 -m pytest -q -s --tb=short -k "not tiny" tests/gpu/test_cuda_model.py 2>&1 | tee "$OUT/gpu_smol.log" \
  | grep -E "ERR|passed|failed|FAILED|Error" | tail -25
python3 -m aircupy synth /root/synth/llama-70b-Q4_0.gguf --arch llama-70b --type Q4_0 | tee -a "$OUT/synth.log"
rm -f /root/synth/llama-70b-Q4_0.gguf
for i in $(seq 90); do [ -x $LB ] && break; sleep 5; done
tail -3 /root/llama-build.log
LBA=(); [ -x $LB ] && LBA=(--llama-bench $LB)
timeout 420 python3 bench/bench_resident.py --model /root/stage/model.gguf \
  --model /root/synth/llama3-8b-Q4_0.gguf --model /root/synth/llama3-8b-Q4_K.gguf "${LBA[@]}" \
  --profile --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -8

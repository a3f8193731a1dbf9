#!/bin/bash
# Continuous batching on the GPU host, in three back-to-back device calls (issue each as soon as the
# previous returns: an idle machine is given back). Logs and records come back under $OUT.
#   b1 (carry .device/whl .device/peers .device/stage/part.00 .device/stage/SHA256SUM .device/COMMIT):
#      wheels + editable install; llama-bench and llama-batched-bench and the synthetic 8B Q4_0 built in
#      the background; the GPU tier minus the tests on the real SmolLM2 (summary -> $OUT/gpu_tier.txt).
#   b2 (carry .device/stage/part.01): join SmolLM2, its GPU tests (batch steps included), then
#      bench_batch on SmolLM2 and llama-batched-bench on the same file at the same parallel counts.
#   b3: bench_batch and llama-batched-bench on the 8B Q4_0 and SmolLM2.
#   ab (carry .device/whl .device/COMMIT; a fresh machine): the 8B's batched decode with the small-M
#      matmul path of gemm_choice (split-K gemm_q) against dequant + cuBLAS, and the gemm_q GPU tests.
# usage (repo root, on the GPU host): bash bench/device_batch.sh b1|b2|b3
set -uo pipefail
stage=${1:?usage: device_batch.sh b1|b2|b3}
OUT=${OUT:-/tmp/out}; L=/root/logs; mkdir -p "$OUT" $L /root/stage /root/synth /root/bench
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
[ -f /root/stage/model.gguf ] && export AIRCUPY_SMOLLM2_GGUF=/root/stage/model.gguf
B=/root/llama/llama.cpp/build/bin
S=/root/synth
[ -f .device/COMMIT ] && export AIRCUPY_COMMIT=$(cat .device/COMMIT)
[ -f .device/peers/VERSION ] && export AIRCUPY_PEER_VERSION=$(cat .device/peers/VERSION)
pack() { tar czf "$OUT/logs-$stage.tgz" -C $L . 2>/dev/null; }
trap pack EXIT
summary() {
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    echo "commit ${AIRCUPY_COMMIT:-unknown}; $(date -u +%FT%TZ)"
    grep -E "^(FAILED|ERROR)|passed|failed" "$1" | tail -40
    sed -n '/slowest/,/^$/p' "$1" | head -14; } > "$OUT/$2"
}
install() {   # the carried wheels, then this checkout (editable, offline)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null || echo "pip -e failed"
}
join_smollm2() {   # the parts carried now and before -> /root/stage/model.gguf, checked
  cp .device/stage/part.0[1-9] /root/stage/ && (cd /root/stage && cat part.* > model.gguf \
    && sha256sum -c SHA256SUM && rm -f part.*) || echo "SmolLM2 join failed"
  export AIRCUPY_SMOLLM2_GGUF=/root/stage/model.gguf
}
# llama-batched-bench: -npp prompt tokens, -ntg generated tokens per sequence, -npl parallel counts;
# flash attention on, all layers on the GPU, one context big enough for the largest count.
peer() {  # peer MODEL NPL LABEL
  [ -x $B/llama-batched-bench ] || { echo "llama-batched-bench not built"; tail -3 $L/llama-build.log; return; }
  timeout 240 $B/llama-batched-bench -m "$1" -c 20000 -b 2048 -ub 512 -npp 32 -ntg 128 -npl "$2" -ngl 99 \
    -fa on 2>&1 | tee $L/peer-$3.log | grep -E "^\|" | tail -12
  cp $L/peer-$3.log "$OUT/"
}

if [ "$stage" = b1 ]; then
  install
  cp .device/stage/part.00 .device/stage/SHA256SUM /root/stage/
  (setsid nohup bash -c 'mkdir -p /root/llama && tar xJf .device/peers/llama.cpp.tar.xz -C /root/llama \
    && cd /root/llama/llama.cpp && mkdir -p tools/ui && : > tools/ui/CMakeLists.txt \
    && cmake -B build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_BUILD_TESTS=OFF \
       -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    && nice cmake --build build -j10 --target llama-bench llama-batched-bench' > $L/llama-build.log 2>&1 &)
  (setsid nohup python3 -m aircupy synth $S/llama3-8b-Q4_0.gguf --arch llama3-8b --type Q4_0 > $L/synth.log 2>&1 &)
  timeout 430 python3 -m pytest -q -rfE --tb=short --durations=12 -m gpu tests/gpu -k "not smollm2" \
    --ignore tests/gpu/test_budget.py -p no:cacheprovider 2>&1 | tee $L/gpu_tier.log \
    | grep -E "passed|failed|FAILED|ERROR|Error" | tail -30
  summary $L/gpu_tier.log gpu_tier.txt
  tail -n 2 $L/synth.log $L/llama-build.log 2>/dev/null
  exit 0
fi

if [ "$stage" = b2 ]; then
  join_smollm2
  timeout 220 python3 -m pytest -q -rfE --tb=short -m gpu tests/gpu -k "smollm2 or batch_steps" \
    -p no:cacheprovider 2>&1 | tee $L/gpu_smol.log | grep -E "passed|failed|FAILED|ERROR|Error" | tail -12
  summary $L/gpu_smol.log gpu_tier_smollm2.txt
  timeout 200 python3 -m bench.bench_batch --model /root/stage/model.gguf --streams 1 8 32 64 128 \
    --tokens 128 --prompt 32 --n-ctx 1024 --json "$OUT/batch_smollm2.jsonl" 2>&1 | tee $L/batch_smol.log | tail -9
  peer /root/stage/model.gguf 1,8,32,64,128 smollm2
  exit 0
fi

if [ "$stage" = ab ]; then
  install
  python3 -m aircupy synth $S/llama3-8b-Q4_0.gguf --arch llama3-8b --type Q4_0 > $L/synth.log 2>&1
  timeout 150 python3 -m pytest -q -rfE --tb=short -m gpu tests/gpu/test_gemm_q.py tests/gpu/test_paged.py \
    -p no:cacheprovider 2>&1 | tee $L/gpu_gemm.log | grep -E "passed|failed|FAILED|ERROR|Error" | tail -12
  summary $L/gpu_gemm.log gpu_gemm_q.txt
  for path in fused_sk cublas; do
    AIRCUPY_SMALL_M_PATH=$path timeout 200 python3 -m bench.bench_batch --model $S/llama3-8b-Q4_0.gguf \
      --streams 1 8 16 32 64 --tokens 128 --prompt 32 --n-ctx 1024 --json "$OUT/batch_8b_$path.jsonl" 2>&1 \
      | tee $L/batch_8b_$path.log | grep -E "^streams|batch steps"
  done
  exit 0
fi

if [ "$stage" = fin1 ]; then   # the final GPU tier, part 1 (carry as b1, without the peers)
  install
  cp .device/stage/part.00 .device/stage/SHA256SUM /root/stage/
  timeout 500 python3 -m pytest -q -rfE --tb=short --durations=12 -m gpu tests/gpu -k "not smollm2 and not gemma3_real" \
    --ignore tests/gpu/test_budget.py -p no:cacheprovider 2>&1 | tee $L/gpu_tier.log \
    | grep -E "passed|failed|FAILED|ERROR|Error" | tail -30
  summary $L/gpu_tier.log gpu_tier.txt
  exit 0
fi

if [ "$stage" = prep ]; then   # install and the first SmolLM2 part only (carry as fin1); then fin2
  install
  cp .device/stage/part.00 .device/stage/SHA256SUM /root/stage/
  exit 0
fi

if [ "$stage" = fin2 ]; then   # part 2 (carry .device/stage/part.01 part.02): SmolLM2 tests, the server
  join_smollm2
  timeout 240 python3 -m pytest -q -rfE --tb=short -m gpu tests/gpu -k "smollm2 or batch_steps or batching" \
    -p no:cacheprovider 2>&1 | tee $L/gpu_smol.log | grep -E "passed|failed|FAILED|ERROR|Error" | tail -12
  summary $L/gpu_smol.log gpu_tier_smollm2.txt
  BENCH_SERVE_LOG=$L/serve.log timeout 200 python3 -m bench.bench_serve --model /root/stage/model.gguf \
    --backend cuda --clients 1 8 32 64 --tokens 64 --server-arg=--max-num-seqs=64 \
    --json "$OUT/serve_smollm2.jsonl" 2>&1 | tail -6
  cp $L/serve.log "$OUT/" 2>/dev/null
  exit 0
fi

if [ "$stage" = st32 ]; then   # the 70B at 24 GiB, KV sized for 32 sequences (carry .device/whl)
  install
  python3 -m aircupy synth $S/llama-70b-Q4_0.gguf --arch llama-70b --type Q4_0 > $L/synth.log 2>&1
  timeout 400 python3 -m bench.bench_batch --model $S/llama-70b-Q4_0.gguf --vram-budget 24GiB \
    --streams 32 --tokens 32 --prompt 512 --batch-tokens 2048 --n-ctx 1024 \
    --json "$OUT/batch_70b_24gib_32.jsonl" 2>&1 | tee $L/batch_70b.log | grep -vE "^\s*$" | tail -5
  exit 0
fi

if [ "$stage" = st ]; then   # streamed batches (a fresh machine: carry .device/whl .device/COMMIT)
  install
  python3 -m aircupy synth $S/llama-70b-Q4_0.gguf --arch llama-70b --type Q4_0 > $L/synth.log 2>&1
  timeout 420 python3 -m bench.bench_batch --model $S/llama-70b-Q4_0.gguf --vram-budget 24GiB \
    --streams 1 8 32 64 --tokens 32 --prompt 512 --batch-tokens 2048 --n-ctx 1024 \
    --json "$OUT/batch_70b_24gib.jsonl" 2>&1 | tee $L/batch_70b.log | grep -vE "^\s*$" | tail -8
  exit 0
fi

if [ "$stage" = b3 ]; then
  for i in $(seq 40); do [ -f $S/llama3-8b-Q4_0.gguf ] && ! pgrep -f "aircupy synth" >/dev/null && break; sleep 5; done
  timeout 240 python3 -m bench.bench_batch --model $S/llama3-8b-Q4_0.gguf --streams 1 8 32 64 \
    --tokens 128 --prompt 32 --n-ctx 1024 --json "$OUT/batch_8b.jsonl" 2>&1 | tee $L/batch_8b.log | tail -7
  for i in $(seq 70); do [ -x $B/llama-batched-bench ] && break; sleep 5; done
  peer $S/llama3-8b-Q4_0.gguf 1,8,32,64 8b
  peer /root/stage/model.gguf 1,8,32,64,128 smollm2
  exit 0
fi

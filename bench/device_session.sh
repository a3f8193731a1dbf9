#!/bin/bash
# The GPU checks and measurements of a change, in three back-to-back device calls (the machine is kept
# only while calls keep coming: issue each stage as soon as the previous one returns). Each stage stays
# under the 10-minute call limit; logs come back under $OUT.
#   stage1 (carry .device/whl .device/peers .device/stage/part.00 .device/stage/SHA256SUM .device/COMMIT):
#          wheels + editable install; llama-bench and the synthetic 8B and 70B Q4_0 built in the
#          background; the GPU tier minus the tests on the real SmolLM2 (summary -> $OUT/gpu_tier.txt).
#   stage2 (carry .device/stage/part.01 .device/stage/part.02): join SmolLM2 and run its GPU tests; `python -m bench` on the
#          resident 8B for aircupy and llama.cpp.
#   stage3: `python -m bench` on the 70B at 24 GiB for aircupy and llama.cpp (merged records, table).
#   stage4 (issue 24's figures; after stage2, same machine): SmolLM2 pp512 eager vs graph, a different
#          prompt per rep (bench_prefill_graphs); `aircupy inspect` at a streaming budget (the PCIe
#          rate it measures); `python -m bench` on the 8B budget rows ($SCEN, default the Q4_0 and the
#          Q4_K_M mix at 50%) for aircupy, llama.cpp at the same layers and llama.cpp at the same budget
#          (-ngl searched by measured peak memory), records merged into results.json.
#   stage5: llama.cpp at the same budget on the 70B at 24 GiB (its -ngl search takes a call of its
#          own), merged beside stage3's aircupy and same-layer rows of the same session and commit.
#   gemma (repeat, carrying .device/gemma/part.NN, one or two per call, and .device/gemma/SHA256SUM):
#          the parts are kept on the host; once all are there (as many as .device/gemma/NPARTS says),
#          the real Gemma3 270M is joined and its GPU tests run (-k gemma3_real).
#          Split it with ../shared/device/split.sh GEMMA.gguf .device/gemma 40; ls .device/gemma/part.*
#          | wc -l > .device/gemma/NPARTS.
# The 98 MB SmolLM2 travels in 40 MiB parts (../shared/device/split.sh FILE .device/stage 40), part.00
# with stage1, the rest with stage2 (each call carries at most 64 MiB with the tree).
# TIER_ONLY=1: stage1 and stage2 run the GPU tier alone (no llama.cpp build, synthesis or benchmark).
# usage (repo root, on the GPU host): [TIER_ONLY=1] bash bench/device_session.sh stage1..stage5|gemma
set -uo pipefail
stage=${1:?usage: device_session.sh stage1|stage2|stage3|stage4|stage5|gemma}
OUT=${OUT:-/tmp/out}; L=/root/logs; mkdir -p "$OUT" $L /root/stage /root/synth /root/bench
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
[ -f /root/stage/model.gguf ] && export AIRCUPY_SMOLLM2_GGUF=/root/stage/model.gguf
LB=/root/llama/llama.cpp/build/bin/llama-bench
S=/root/synth
# The host's copy of .git can be stale: records take the commit from .device/COMMIT
# (`git describe --always --dirty > .device/COMMIT` before the calls).
[ -f .device/COMMIT ] && export AIRCUPY_COMMIT=$(cat .device/COMMIT)
# The pruned llama.cpp source has no git history (llama-bench says "unknown"): the release it was
# vendored in is written beside it (`echo "llama.cpp of llama-cpp-python 0.3.36" > .device/peers/VERSION`).
[ -f .device/peers/VERSION ] && export AIRCUPY_PEER_VERSION=$(cat .device/peers/VERSION)
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip -e failed"
merge() { [ -f /root/bench/all/results.json ] && echo "--merge /root/bench/all/results.json"; }
pack() { tar czf "$OUT/logs-$stage.tgz" -C $L . 2>/dev/null; }
trap pack EXIT
summary() {   # card, driver, commit, pass/fail counts, durations of a pytest log -> $OUT/$2
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    echo "commit ${AIRCUPY_COMMIT:-unknown}; $(date -u +%FT%TZ)"
    grep -E "^(FAILED|ERROR)|passed|failed" "$1" | tail -40
    sed -n '/slowest/,/^$/p' "$1" | head -14; } > "$OUT/$2"
}

start_peers() {
  # The pruned llama.cpp tree lacks tools/ui, which its CMake still adds: give it an empty one, and
  # leave the server out (it depends on the ui's asset target).
  (setsid nohup bash -c 'mkdir -p /root/llama && tar xJf .device/peers/llama.cpp.tar.xz -C /root/llama \
    && cd /root/llama/llama.cpp && mkdir -p tools/ui && : > tools/ui/CMakeLists.txt \
    && cmake -B build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_BUILD_TESTS=OFF \
       -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    && nice cmake --build build -j10 --target llama-bench' > $L/llama-build.log 2>&1 &)
  (setsid nohup bash -c "python3 -m aircupy synth $S/llama3-8b-Q4_0.gguf --arch llama3-8b --type Q4_0 \
    && python3 -m aircupy synth $S/llama-70b-Q4_0.gguf --arch llama-70b --type Q4_0" > $L/synth.log 2>&1 &)
}

if [ "$stage" = stage1 ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null || echo "pip -e failed"
  cp .device/stage/part.00 .device/stage/SHA256SUM /root/stage/
  [ -n "${TIER_ONLY:-}" ] || start_peers
  timeout 400 python3 -m pytest -q -rfE --tb=short --durations=12 -m gpu tests/gpu \
    -k "not smollm2 and not gemma3_real" \
    --ignore tests/gpu/test_budget.py -p no:cacheprovider 2>&1 | tee $L/gpu_tier.log \
    | grep -E "passed|failed|FAILED|ERROR|Error" | tail -30
  summary $L/gpu_tier.log gpu_tier.txt
  # the budget test in its own run, its figures printed (-s): each case is a fresh process
  timeout 150 python3 -m pytest -q -s -rfE --tb=short -m gpu tests/gpu/test_budget.py -p no:cacheprovider \
    2>&1 | tee $L/gpu_budget.log | grep -E "^(BUDGET|CONTEXT)|passed|failed|FAILED|ERROR" | tail -30
  summary $L/gpu_budget.log gpu_budget.txt
  grep -E "^(BUDGET|CONTEXT)" $L/gpu_budget.log >> "$OUT/gpu_budget.txt"
  tail -n 2 $L/synth.log $L/llama-build.log 2>/dev/null
  exit 0
fi


if [ "$stage" = stage2 ]; then
  cp .device/stage/part.0[1-9] /root/stage/ && (cd /root/stage && cat part.* > model.gguf \
    && sha256sum -c SHA256SUM && rm -f part.*) || echo "SmolLM2 join failed"
  export AIRCUPY_SMOLLM2_GGUF=/root/stage/model.gguf
  timeout 200 python3 -m pytest -q -rfE --tb=short -m gpu tests/gpu -k "smollm2" -p no:cacheprovider 2>&1 \
    | tee $L/gpu_smol.log | grep -E "passed|failed|FAILED|ERROR|Error" | tail -12
  summary $L/gpu_smol.log gpu_tier_smollm2.txt
  [ -n "${TIER_ONLY:-}" ] && exit 0
  for i in $(seq 60); do [ -x $LB ] && break; sleep 5; done
  tail -1 $L/llama-build.log
  timeout 330 python3 -m bench --engines aircupy,llama.cpp --scenarios '8b-q4_0-100pct' --synth-dir $S \
    --llama-bench $LB --out /root/bench/all --reps 2 2>&1 | tee $L/bench_8b.log \
    | grep -vE "^  (aircupy|llama.cpp|hf) " | tail -16
  cp /root/bench/all/results.json "$OUT/results-8b.json" 2>/dev/null
  exit 0
fi

if [ "$stage" = gemma ]; then
  G=/root/gemma; mkdir -p $G
  cp .device/gemma/part.* .device/gemma/SHA256SUM .device/gemma/NPARTS $G/ 2>/dev/null
  have=$(ls $G/part.* 2>/dev/null | wc -l); want=$(cat $G/NPARTS 2>/dev/null || echo "?")
  echo "gemma parts on the host: $have of $want"
  [ "$have" = "$want" ] || exit 0
  (cd $G && cat part.* > model.gguf && sha256sum -c SHA256SUM && rm -f part.*) || { echo "Gemma3 join failed"; exit 0; }
  export AIRCUPY_GEMMA3_GGUF=$G/model.gguf
  timeout 500 python3 -m pytest -q -s -rfE --tb=short -m gpu tests/gpu -k gemma3_real -p no:cacheprovider \
    2>&1 | tee $L/gpu_gemma3.log | grep -E "^GEMMA3|passed|failed|FAILED|ERROR|Error" | tail -12
  summary $L/gpu_gemma3.log gpu_tier_gemma3.txt
  grep -E "^GEMMA3" $L/gpu_gemma3.log >> "$OUT/gpu_tier_gemma3.txt"
  exit 0
fi

if [ "$stage" = stage4 ]; then
  SMOL=/root/stage/model.gguf
  timeout 120 python3 -m bench.bench_prefill_graphs --model $SMOL --n-prompt 512 --reps 7 \
    --json "$OUT/prefill_graphs_smollm2.json" 2>&1 | tee $L/prefill_graphs.log | tail -14
  # the decode bound at the measured pinned rate (a streaming budget: 25% of the 8B's layers)
  python3 -m aircupy inspect $S/llama3-8b-Q4_0.gguf --vram-budget 3GiB 2>&1 | sed -n '/^plan for/,$p' \
    | tee "$OUT/inspect_8b_3gib.txt"
  for i in $(seq 60); do [ -x $LB ] && break; sleep 5; done
  timeout 460 python3 -m bench --engines aircupy,llama.cpp,llama.cpp@budget --no-hf \
    --scenarios "${SCEN:-8b-q4_0-50pct,8b-q4_k_m-50pct}" --synth-dir $S --llama-bench $LB \
    --out /root/bench/all --reps 2 $(merge) 2>&1 | tee $L/bench_8b_budget.log \
    | grep -vE "^  (aircupy|llama.cpp|llama.cpp@budget|hf) " | tail -24
  cp /root/bench/all/results.json /root/bench/all/results.md "$OUT/" 2>/dev/null
  exit 0
fi

if [ "$stage" = stage5 ]; then
  timeout 540 python3 -m bench --engines llama.cpp@budget --no-hf --scenarios '70b-q4_0-24gib' \
    --synth-dir $S --llama-bench $LB --out /root/bench/all --reps 2 $(merge) \
    2>&1 | tee $L/bench_70b_budget.log | grep -vE "^  (aircupy|llama.cpp|llama.cpp@budget|hf) " | tail -24
  cp /root/bench/all/results.json /root/bench/all/results.md "$OUT/" 2>/dev/null
  exit 0
fi

timeout 520 python3 -m bench --engines aircupy,llama.cpp --scenarios '70b-q4_0-24gib' --synth-dir $S \
  --llama-bench $LB --out /root/bench/all --reps 2 --merge /root/bench/all/results.json 2>&1 \
  | tee $L/bench_70b.log | grep -vE "^  (aircupy|llama.cpp|hf) " | tail -16
cp /root/bench/all/results.json /root/bench/all/results.md "$OUT/" 2>/dev/null

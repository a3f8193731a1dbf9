#!/bin/bash
# Issue 5's cold start on the GPU host, with the whole GPU tier, in two back-to-back device calls
# (the machine is kept only while calls keep coming: issue stage2 as soon as stage1 returns).
#   stage1 (carry .device/whl .device/stage/part.00 .device/stage/SHA256SUM .device/COMMIT):
#          wheels + editable install; the synthetic 8B Q4_0; the GPU tier minus the real-SmolLM2
#          tests (they skip without the file).
#   stage2 (carry .device/stage/part.01): join SmolLM2; the GPU tests that use it; cold TTFT of the
#          8B: resident, all-streamed, the Engine and the warmer alone, $REPS interleaved reps
#          (default 6), each run in a fresh process.
#   cold (carry .device/whl): on a fresh machine, steady-state streaming of the 8B (0 and 16
#          resident layers), then the cold TTFT runs: resident, all-streamed, the Engine, and the
#          warmer with no model beside it, 4 interleaved reps, each bracketed by disk-rate reads.
#   disk (carry .device/whl): on a fresh machine, how fast the disk reads the 8B by each way of
#          reading (probe_disk.py); a cold start's per-read timeline, resident and streamed (the first
#          also fills the kernel cache); then the cold TTFT runs as in `cold`, 5 reps.
#   prep (carry .device/whl): a fresh machine: install, the synthetic 8B, the GPU tier minus the
#          real-SmolLM2 tests, cold-start timelines resident and streamed (probe_cold.py).
#   ttft (right after prep, same machine): bench_cold, modes $MODES (default all,0,engine,warmer), warmer threads
#          $READ_AHEAD (default 1,4), $REPS interleaved reps (default 4).
# Logs come back as $OUT/logs-STAGE.tgz, JSON beside them.
# usage (repo root, on the GPU host): bash bench/probes/device_cold.sh stage1|stage2|cold|disk|prep|ttft
set -uo pipefail
stage=${1:?usage: device_cold.sh stage1|stage2|cold|disk|prep|ttft}
OUT=${OUT:-/tmp/out}; L=/root/logs; S=/root/synth; mkdir -p "$OUT" $L /root/stage $S
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
[ -f .device/COMMIT ] && export AIRCUPY_COMMIT=$(cat .device/COMMIT)
pack() { tar czf "$OUT/logs-$stage.tgz" -C $L . 2>/dev/null; }
trap pack EXIT
M=$S/llama3-8b-Q4_0.gguf
fresh() {   # a fresh machine: wheels, aircupy (editable), the card's name, the synthetic 8B
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null || echo "pip -e failed"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  python3 -m aircupy synth $M --arch llama3-8b --type Q4_0 > $L/synth.log 2>&1; tail -1 $L/synth.log
}
timelines() {   # cold-start timelines (probe_cold.py), resident then streamed, twice; $1: time limit
  for r in all 0 all 0; do
    timeout "$1" python -m bench.probes.probe_cold timeline --model $M --resident $r > $L/timeline_$r.jsonl 2>&1
  done
  cp $L/timeline_*.jsonl "$OUT/" 2>/dev/null
}

if [ "$stage" = stage1 ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null || echo "pip -e failed"
  cp .device/stage/part.00 .device/stage/SHA256SUM /root/stage/
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
  uname -r | tee -a "$OUT/gpu.txt"
  python3 -m aircupy synth $M --arch llama3-8b --type Q4_0 > $L/synth.log 2>&1; tail -1 $L/synth.log
  timeout 480 python3 -m pytest -q -rfs --tb=short --durations=10 tests/gpu 2>&1 \
    | tee $L/gpu_tier.log | grep -E "passed|failed|FAILED|Error" | tail -25
  exit 0
fi

if [ "$stage" = stage2 ]; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
  cp .device/stage/part.01 /root/stage/ && (cd /root/stage && cat part.* > model.gguf \
    && sha256sum -c SHA256SUM && rm -f part.*) || echo "SmolLM2 join failed"
  export AIRCUPY_SMOLLM2_GGUF=/root/stage/model.gguf
  # the tests stage1 skipped: those taking the real file (the smollm2 / smollm2_path fixtures)
  timeout 150 python3 -m pytest -q -rfs --tb=short tests/gpu/test_cuda_model.py tests/gpu/test_cold_load.py \
    -k "smollm2 or decode_graph_equals or device_sampling or over_the_vram or bad_steps or probe_and_engine" \
    2>&1 | tee $L/gpu_smol.log | grep -E "passed|failed|FAILED|Error" | tail -10
  timeout 420 python3 bench/bench_cold.py --model $M --resident all,0,engine,warmer --read-ahead 1 \
    --reps ${REPS:-6} --json "$OUT/cold8.json" 2>&1 | tee $L/cold8.log | tail -5
  exit 0
fi
if [ "$stage" = cold ]; then   # one call on a fresh machine: the cold TTFT runs only
  fresh
  # steady-state streaming first (it also fills the kernel cache: no NVRTC inside a timed start)
  timeout 150 python3 bench/bench_streaming.py --model $M --resident 0,16 --n-gen 32 \
    --json "$OUT/stream8.json" 2>&1 | tee $L/stream8.log | cut -c1-300
  timeout 420 python3 bench/bench_cold.py --model $M --resident all,0,engine,warmer --read-ahead 1 \
    --reps 4 --json "$OUT/cold8.json" 2>&1 | tee $L/cold8.log | tail -4
  exit 0
fi
if [ "$stage" = disk ]; then
  fresh
  timeout 200 python -m bench.probes.probe_disk --model $M --reps 3 --json "$OUT/disk.json" 2>&1 \
    | tee $L/disk.log | grep median
  timelines 150                       # the first of each fills the kernel cache (NVRTC)
  timeout 400 python3 bench/bench_cold.py --model $M --resident all,0,engine,warmer --read-ahead 1 \
    --reps 5 --json "$OUT/cold8.json" 2>&1 | tee $L/cold8.log | tail -5
  exit 0
fi
if [ "$stage" = prep ]; then
  fresh
  timeout 330 python3 -m pytest -q -rfs --tb=short --durations=5 tests/gpu 2>&1 \
    | tee $L/gpu_tier.log | grep -E "passed|failed|FAILED|Error" | tail -25
  timelines 60                        # the kernel cache is filled by now (the GPU tier)
  exit 0
fi
if [ "$stage" = ttft ]; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
  timeout 560 python3 bench/bench_cold.py --model $M --resident ${MODES:-all,0,engine,warmer} \
    --read-ahead ${READ_AHEAD:-1,4} --reps ${REPS:-4} --json "$OUT/cold8.json" 2>&1 \
    | tee $L/cold8.log | tail -9
  exit 0
fi
echo "unknown stage $stage"; exit 2

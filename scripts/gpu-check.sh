#!/usr/bin/env bash
# On the GPU machine, from the repo root: build the CUDA backend for sm_90a, run its tests (then again under
# compute-sanitizer memcheck in quick mode), torch SDPA timings, the decode benchmark, and the GPU Python tests.
# Logs, CSV and markdown go to $OUT.
# Usage: scripts/gpu-check.sh [test|bench|py|hf|ncu|all ...]   (default all; several steps may be named)
#   test: test_cuda + memcheck (quick); bench: SDPA + kvq-bench-cuda; py: GPU Python tests; hf: bench/bench_hf.py
#   (HF="..." replaces its arguments; carry .whl for the quanto rows); ncu: Nsight Compute on one Q4 and one Q2
#   decode launch (batch 8, 128k).
#   BENCH="--types q4 --ctx 131072 --batch 8 --reps 10" narrows the benchmark; FLUSH=write flushes the L2 with a 256 MB
#   memset instead of a read (both benchmarks); KVQ_CUDA_DEBUG=1 names a failing kernel.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvq-out}
mkdir -p "$OUT"
steps=" ${*:-all} "
want() { [[ $steps == *" $1 "* || $steps == *" all "* ]]; }
export PATH=/usr/local/cuda/bin:$PATH
B=build-gpu
t0=$(date +%s)
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
{ cmake -S . -B $B -DCMAKE_BUILD_TYPE=Release -DKVQ_BUILD_MODEL=OFF -DKVQ_CUDA=ON &&
  cmake --build $B -j16 --target test_cuda kvq-bench-cuda kvq_shared kvq_cuda; } >"$OUT/build.log" 2>&1 ||
  { tail -40 "$OUT/build.log"; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
rc=0
if want test; then
  timeout 300 $B/src/cuda/test_cuda >"$OUT/test.log" 2>&1; r=$?; [ $r = 0 ] || rc=$r
  echo "test_cuda rc=$r"; grep FAIL "$OUT/test.log" | head; tail -1 "$OUT/test.log"
  KVQ_TEST_QUICK=1 timeout 200 compute-sanitizer --tool memcheck --error-exitcode 3 $B/src/cuda/test_cuda >"$OUT/memcheck.log" 2>&1
  r=$?; [ $r = 0 ] || rc=$r; echo "memcheck rc=$r"; tail -1 "$OUT/memcheck.log"
fi
if want bench; then
  PYTHONUNBUFFERED=1 timeout 200 python3 bench/bench_sdpa.py 20 ${FLUSH:+--flush-write} >"$OUT/sdpa.csv" 2>"$OUT/sdpa.err" ||
    tail -5 "$OUT/sdpa.err"
  timeout 300 $B/src/cuda/kvq-bench-cuda --out "$OUT" --sdpa "$OUT/sdpa.csv" ${BENCH:---reps 15} ${FLUSH:+--flush write} \
    >"$OUT/bench.log" 2>&1
  echo "bench rc=$?"; grep -E "rror|copy band|ctx 131072" "$OUT/bench.log"
fi
if want py || want hf; then python3 python/build_native.py --build-dir $B -j 16 >>"$OUT/build.log" 2>&1; fi
if want py; then
  OMP_WAIT_POLICY=PASSIVE timeout 200 python3 -m pytest tests/python/test_cuda.py -q -rs -p no:cacheprovider >"$OUT/pytest.log" 2>&1
  r=$?; [ $r = 0 ] || rc=$r; echo "pytest rc=$r"; tail -3 "$OUT/pytest.log"
fi
if want hf; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
      export PYTHONPATH=/tmp/site
  fi
  PYTHONUNBUFFERED=1 timeout 400 python3 bench/bench_hf.py ${HF:---ctx 32768,131072 --batch 1,8 --steps 16 --rounds 1} \
    --out "$OUT/bench-hf.md" >"$OUT/hf.log" 2>&1
  r=$?; [ $r = 0 ] || rc=$r; echo "bench_hf rc=$r"; tail -25 "$OUT/hf.log"
fi
if want ncu; then
  for t in q4 q2; do
    timeout 200 ncu --clock-control none -k regex:decode_kernel -c 1 --launch-skip 3 \
      --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
      --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section InstructionStats \
      $B/src/cuda/kvq-bench-cuda --types $t --ctx 131072 --batch 8 --reps 3 >"$OUT/ncu-$t.txt" 2>&1
    echo "ncu $t rc=$?"; grep -E "Duration|Throughput|Issue Slots|Warp Cycles Per Issued|No Eligible|Active Warps|Stall" "$OUT/ncu-$t.txt" | head -30
  done
fi
echo "done in $(( $(date +%s) - t0 )) s"
exit $rc

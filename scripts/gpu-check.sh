#!/usr/bin/env bash
# On the GPU machine, from the repo root: build the CUDA backend for sm_90a, run its tests (then again under
# compute-sanitizer memcheck in quick mode), torch SDPA timings, the decode benchmark, and the GPU Python tests.
# Logs, CSV and markdown go to $OUT.
# Usage: scripts/gpu-check.sh [test|bench|py|all]   (default all)
#   BENCH="--types q4 --ctx 131072 --batch 8 --reps 10" narrows the benchmark; KVQ_CUDA_DEBUG=1 names a failing kernel.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvq-out}
mkdir -p "$OUT"
what=${1:-all}
export PATH=/usr/local/cuda/bin:$PATH
B=build-gpu
t0=$(date +%s)
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
{ cmake -S . -B $B -DCMAKE_BUILD_TYPE=Release -DKVQ_BUILD_MODEL=OFF -DKVQ_CUDA=ON &&
  cmake --build $B -j16 --target test_cuda kvq-bench-cuda kvq_shared kvq_cuda; } >"$OUT/build.log" 2>&1 ||
  { tail -40 "$OUT/build.log"; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
rc=0
if [ "$what" = test ] || [ "$what" = all ]; then
  timeout 300 $B/src/cuda/test_cuda >"$OUT/test.log" 2>&1; r=$?; [ $r = 0 ] || rc=$r
  echo "test_cuda rc=$r"; grep FAIL "$OUT/test.log" | head; tail -1 "$OUT/test.log"
  KVQ_TEST_QUICK=1 timeout 200 compute-sanitizer --tool memcheck --error-exitcode 3 $B/src/cuda/test_cuda >"$OUT/memcheck.log" 2>&1
  r=$?; [ $r = 0 ] || rc=$r; echo "memcheck rc=$r"; tail -1 "$OUT/memcheck.log"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  PYTHONUNBUFFERED=1 timeout 200 python3 bench/bench_sdpa.py 20 >"$OUT/sdpa.csv" 2>"$OUT/sdpa.err" || tail -5 "$OUT/sdpa.err"
  timeout 300 $B/src/cuda/kvq-bench-cuda --out "$OUT" --sdpa "$OUT/sdpa.csv" ${BENCH:---reps 15} >"$OUT/bench.log" 2>&1
  echo "bench rc=$?"; grep -E "rror|copy band|ctx 131072" "$OUT/bench.log"
fi
if [ "$what" = py ] || [ "$what" = all ]; then
  python3 python/build_native.py --build-dir $B -j 16 >>"$OUT/build.log" 2>&1
  OMP_WAIT_POLICY=PASSIVE timeout 200 python3 -m pytest tests/python/test_cuda.py -q -rs -p no:cacheprovider >"$OUT/pytest.log" 2>&1
  r=$?; [ $r = 0 ] || rc=$r; echo "pytest rc=$r"; tail -3 "$OUT/pytest.log"
fi
echo "done in $(( $(date +%s) - t0 )) s"
exit $rc

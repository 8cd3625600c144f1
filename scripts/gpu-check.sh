#!/usr/bin/env bash
# On the GPU machine: build the CUDA backend for sm_90a, run its tests (plain, then under compute-sanitizer memcheck
# in quick mode), the torch SDPA reference and the decode benchmark. Logs, CSV and markdown go to $OUT.
# Usage: scripts/gpu-check.sh [test|bench|all|final]   (default all; final: long tests + quick benchmark)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvq-out}
mkdir -p "$OUT"
what=${1:-all}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DKVQ_BUILD_MODEL=OFF >"$OUT/build.log" 2>&1
cmake --build build-gpu -j16 --target test_cuda kvq-bench-cuda >>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
rc=0
if [ "$what" = final ]; then  # long-context tests, then the quick benchmark
  KVQ_TEST_LONG_ONLY=1 ./build-gpu/src/cuda/test_cuda 2>&1 | tee "$OUT/test.log"; rc=${PIPESTATUS[0]}
  echo "test_cuda (long) rc=$rc"
  PYTHONUNBUFFERED=1 python3 bench/bench_sdpa.py 20 --quick > "$OUT/sdpa.csv" 2>"$OUT/sdpa.err" || tail -5 "$OUT/sdpa.err"
  ./build-gpu/src/cuda/kvq-bench-cuda --quick --out "$OUT" --sdpa "$OUT/sdpa.csv" 2>&1 | tee "$OUT/bench.log"
  exit $rc
fi
if [ "$what" != bench ]; then
  ./build-gpu/src/cuda/test_cuda 2>&1 | tee "$OUT/test.log"; rc=${PIPESTATUS[0]}
  echo "test_cuda rc=$rc"
  KVQ_TEST_QUICK=1 compute-sanitizer --tool memcheck --error-exitcode 3 ./build-gpu/src/cuda/test_cuda >"$OUT/memcheck.log" 2>&1
  echo "memcheck rc=$?"; tail -3 "$OUT/memcheck.log"
fi
if [ "$what" != test ]; then
  PYTHONUNBUFFERED=1 python3 bench/bench_sdpa.py > "$OUT/sdpa.csv" 2>"$OUT/sdpa.err" || tail -5 "$OUT/sdpa.err"
  ./build-gpu/src/cuda/kvq-bench-cuda --out "$OUT" --sdpa "$OUT/sdpa.csv" 2>&1 | tee "$OUT/bench.log" | grep -E "copy|batch  8 ctx 131072|batch  1 ctx 131072|batch  8 ctx   4096|wrote|rror"
fi
exit $rc

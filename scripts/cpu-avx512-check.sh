#!/usr/bin/env bash
# On a machine with AVX-512 (F/BW/VL/DQ), from the repo root: a CPU-only release build in build-avx512, test_attn
# (full: every SIMD table the CPU has, avx2 and avx512, against the scalar _ref kernels), then `kvq-bench cpu` with
# KVQ_CPU_KERNELS=avx512 and again with avx2 (same build, same run), and a table of their ratios. Logs, CSV and
# markdown go to $OUT (default /tmp/kvq-out); docs/ is not written. A few minutes on 16 cores.
# Usage: scripts/cpu-avx512-check.sh      BENCH="--ctx 4096 --runs 5" replaces the benchmark's arguments.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvq-out}
mkdir -p "$OUT"
B=build-avx512
BENCH=${BENCH:---ctx 4096,32768 --runs 9}
jobs=$(nproc 2>/dev/null || echo 4)
t0=$(date +%s)
echo "== CPU"
lscpu 2>/dev/null | grep -E '^(Model name|CPU\(s\)|Thread\(s\) per core|Socket\(s\)|L3 cache)' || true
grep -o 'avx512[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' '
echo
{ cmake -S . -B $B -DCMAKE_BUILD_TYPE=Release -DKVQ_CUDA=OFF -DKVQ_BUILD_MODEL=OFF &&
  cmake --build $B -j"$jobs" --target test_attn kvq-bench; } >"$OUT/build.log" 2>&1 ||
  { grep -E 'error|warning' "$OUT/build.log" | head -40; tail -40 "$OUT/build.log"; exit 1; }
grep -E 'warning' "$OUT/build.log" | head -20
obj=$B/src/core/CMakeFiles/kvq_core_obj.dir/attn_avx512.c.o
echo "build $(( $(date +%s) - t0 )) s; $(objdump -d "$obj" 2>/dev/null | grep -c zmm) instructions on zmm in attn_avx512.c.o"

echo "== test_attn (full)"
t1=$(date +%s)
timeout 400 $B/tests/test_attn >"$OUT/test_attn.log" 2>&1
rc=$?
head -3 "$OUT/test_attn.log"
grep -E 'FAIL' "$OUT/test_attn.log" | head -40
echo "FAIL lines: $(grep -c FAIL "$OUT/test_attn.log")"
tail -n 26 "$OUT/test_attn.log"
echo "test_attn exit code: $rc ($(( $(date +%s) - t1 )) s)"

echo "== kvq-bench cpu $BENCH"
for k in avx512 avx2; do
  # shellcheck disable=SC2086
  KVQ_CPU_KERNELS=$k timeout 300 $B/bench/kvq-bench cpu $BENCH --out "$OUT/bench-$k" >"$OUT/bench-$k.log" 2>&1
  r=$?
  cat "$OUT/bench-$k.log"
  echo "kvq-bench ($k) exit code: $r"
  [ $r = 0 ] || rc=$r
done
if [ -f "$OUT/bench-avx512.csv" ] && [ -f "$OUT/bench-avx2.csv" ]; then
  echo "== ms/step: avx2 / avx512 (above 1: avx512 faster)"
  awk -F, 'FNR == 1 { next } NR == FNR { a2[$1 "," $2] = $3; next }
           { k = $1 "," $2; if (k in a2) printf "%8s %6s %10.3f %10.3f %8.2f\n", $1, $2, a2[k], $3, a2[k] / $3 }' \
    "$OUT/bench-avx2.csv" "$OUT/bench-avx512.csv" | { printf "%8s %6s %10s %10s %8s\n" ctx type avx2 avx512 ratio; cat; }
fi
echo "total $(( $(date +%s) - t0 )) s; logs in $OUT"
exit $rc

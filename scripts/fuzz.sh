#!/usr/bin/env bash
# Builds and runs the libFuzzer targets of tests/fuzz_<name>.c (tests/fuzz.cmake) with ASan and UBSan.
#   scripts/fuzz.sh NAME|all [SECONDS]      NAME: gguf, tokenizer, cache, cli (those whose source exists); default 600 s
#   (several targets run side by side, KVQ_FUZZ_JOBS at a time, default the core count: each is one process)
#   KVQ_FUZZ_FAST=1 scripts/fuzz.sh ...     the same without sanitizers at -O2, in build-fuzz-fast (long runs)
# Needs clang with libFuzzer (Debian 12: apt-get install clang libclang-rt-14-dev). Build dir: build-fuzz
# (clang, -DKVQ_FUZZ=ON, OpenMP off: one thread per execution is what libFuzzer measures best).
# Each target starts from tests/corpus/NAME/ (read only) plus its work corpus build-fuzz/corpus-NAME/, where libFuzzer
# writes the new inputs it keeps; crashes, leaks and timeouts land as build-fuzz/NAME-crash-* (leak-*, timeout-*).
# Reproduce one with build-fuzz/tests/fuzz_NAME FILE; copy a fixed one into tests/corpus/NAME/ so that ctest's
# fuzz_NAME_corpus replays it from then on. Prints per target: executions, new corpus inputs, findings. Exit status:
# 0 all clean, 1 a finding or a build error, 77 no requested target exists in this configuration (no OpenBLAS: cli).
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-}
secs=${2:-600}
if [ -z "$what" ]; then
  echo "usage: scripts/fuzz.sh NAME|all [SECONDS]" >&2
  exit 2
fi
out=build-fuzz fast=OFF
# KVQ_FUZZ_FAST=1: build-fuzz-fast, no sanitizers, -O2, for long runs (fuzz_cache: ~60 executions per second against
# ~8 sanitized on this 2-core machine); a finding is then replayed in the sanitized build before it is believed
if [ "${KVQ_FUZZ_FAST:-0}" = 1 ]; then out=build-fuzz-fast fast=ON; fi
if [ "$what" = all ]; then
  names=$(for f in tests/fuzz_*.c; do n=${f#tests/fuzz_}; n=${n%.c}; [ "$n" = replay_main ] || echo "$n"; done)
else
  names=$what
  [ -f "tests/fuzz_$what.c" ] || { echo "fuzz.sh: no tests/fuzz_$what.c" >&2; exit 2; }
fi
jobs=$(nproc 2>/dev/null || echo 2)
mkdir -p "$out"
cmake -S . -B "$out" -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=Debug -DKVQ_FUZZ=ON -DKVQ_FUZZ_FAST=$fast -DKVQ_OPENMP=OFF -DKVQ_CUDA=OFF \
  >"$out/configure.log" 2>&1 || { cat "$out/configure.log"; exit 1; }
targets=""
for n in $names; do targets="$targets fuzz_$n"; done
[ "$what" = all ] || [ "$what" = gguf ] && [ -f tests/test_gguf_corrupt.c ] && targets="$targets test_gguf_corrupt"
# a target whose libraries this configuration lacks (e.g. cli without OpenBLAS) is not defined: build the others
built=""
for t in $targets; do
  if cmake --build "$out" -j"$jobs" --target "$t" >"$out/build-$t.log" 2>&1; then built="$built $t"
  elif grep -q "unknown target\|No rule to make target" "$out/build-$t.log"; then echo "fuzz.sh: $t is not defined in this configuration: skipped"
  else cat "$out/build-$t.log"; exit 1; fi
done

# run_one NAME: one target for SECONDS; its report (and a finding's details) in $out/report-NAME.txt; exit 1 on a finding
run_one() {
  local n=$1 work="$out/corpus-$1" seeds=() args=(-rss_limit_mb=2048 -timeout=10) before after execs findings rc
  local secs=$secs
  # fuzz_cache's executions run the attention kernels (built at -O0 here, tests/fuzz.cmake): a few per second, and
  # half as many beside another target on a 2-vCPU machine (SMT siblings). Side by side it gets twice the seconds,
  # which with five targets on two slots it runs first and costs no wall time (cache | cli + gguf, then the rest).
  [ "$n" = cache ] && [ "$par" -gt 1 ] && [ "$(wc -w <<<"$names")" -gt 1 ] && secs=$((secs * 2))
  mkdir -p "$work"
  [ -d "tests/corpus/$n" ] && seeds+=("tests/corpus/$n")
  if [ "$n" = gguf ]; then
    # crafted corrupt files of tests/test_gguf_corrupt.c, and the real model's header + metadata (tokenizer included)
    # cut before the tensor data: mutations of its counts and offsets start from a real file's shape
    case " $built " in *" test_gguf_corrupt "*) "$out/tests/test_gguf_corrupt" --write-seeds "$out/seeds-gguf" >/dev/null &&
      seeds+=("$out/seeds-gguf") ;; esac
    if [ -s models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
      mkdir -p "$out/seeds-model"
      head -c 1785664 models/SmolLM2-135M-Instruct.Q4_1.gguf >"$out/seeds-model/model_head.gguf"
      seeds+=("$out/seeds-model")
    fi
    args+=(-max_len=4194304)
  fi
  before=$(find "$work" -type f | wc -l)
  {
    echo "== fuzz_$n: ${secs}s, corpus $work (+ ${seeds[*]:-no seeds})"
    "$out/tests/fuzz_$n" -max_total_time="$secs" -print_final_stats=1 -artifact_prefix="$out/$n-" "${args[@]}" \
      "$work" "${seeds[@]}" >"$out/fuzz-$n.log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out/fuzz-$n.log" | tail -1)
    after=$(find "$work" -type f | wc -l)
    findings=$(ls "$out/$n"-crash-* "$out/$n"-leak-* "$out/$n"-timeout-* "$out/$n"-oom-* 2>/dev/null | wc -l)
    echo "fuzz_$n: ${execs:-?} executions in ${secs}s, $((after - before)) new corpus inputs ($after in $work)," \
      "exit $rc, $findings finding(s) in $out/$n-*"
    # the harness's own message (fuzz_<name>: ...), the sanitizers' and libFuzzer's, and the input as Base64: enough
    # to reproduce a finding from a CI log alone (base64 -d > FILE; build-fuzz/tests/fuzz_NAME FILE)
    [ "$rc" = 0 ] || grep -E "^fuzz_$n: |ERROR|SUMMARY|==[0-9]+==|runtime error|Test unit written|^Base64: " "$out/fuzz-$n.log" | head -20
  } >"$out/report-$n.txt"
  [ "$rc" = 0 ]
}

ran=0
status=0
run=()
running=0
par=${KVQ_FUZZ_JOBS:-$jobs}
for n in $names; do
  case " $built " in *" fuzz_$n "*) ;; *) continue ;; esac
  ran=$((ran + 1))
  run+=("$n")
  if [ "$running" -ge "$par" ]; then wait -n || status=1; running=$((running - 1)); fi
  run_one "$n" &
  running=$((running + 1))
done
while [ "$running" -gt 0 ]; do wait -n || status=1; running=$((running - 1)); done
for n in "${run[@]}"; do cat "$out/report-$n.txt"; done
[ "$ran" = 0 ] && { echo "fuzz.sh: no target of '$what' is built in this configuration"; exit 77; }
exit $status

#!/usr/bin/env bash
# What CI runs (.ci/run: fresh 2-core Debian 12, no GPU, env CI=true). Tiers, each in its own build dir:
#   release  Release build, CUDA=AUTO (the CUDA code is compiled and linked where nvcc exists), all of ctest.
#   asan     ASan + UBSan + LSan, OpenMP on (gcc + libgomp: see CMakeLists.txt), CUDA off, -O1: all of ctest in quick
#            mode (KVQ_TEST_QUICK=1), plus the allocation-failure sweeps (tests/failalloc.cmake) and corpus replays,
#            except model_ppl_gemma3 (~110 s under ASan; model_golden_gemma3 runs the same Gemma 3 forward pass there).
#   tsan     ThreadSanitizer on tests/test_threads.c (the threading contract of kvq.h). clang + LLVM's libomp with its
#            Archer tool when installed (OpenMP on), else gcc with OpenMP off (libgomp's barriers are invisible to TSan).
#   fuzz     every libFuzzer target for FUZZ_SECONDS (default 20; fuzz_cache twice that, side by side: scripts/fuzz.sh)
#            each, one per core at a time (scripts/fuzz.sh all),
#            where clang has libFuzzer.
#   scripts/test.sh [TIER...]            (default: release asan tsan fuzz)
# A test may skip (exit 77) only for a reason that holds on this machine: GPU tests without a GPU; model tests without
# the model, and then only outside CI (CI fetches it; the Gemma 3 tests need their own file); Python tests without
# numpy/pytest, outside CI. Any other skip counts as a failure. The last line is "N passed, N failed, N skipped"; the exit status is non-zero on any failure.
set -uo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc 2>/dev/null || echo 2)
tiers=${*:-release asan tsan fuzz}
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
gemma=models/gemma-3-270m-q4_k_m.gguf
in_ci=0
[ "${CI:-}" = true ] && in_ci=1
have_gpu=0
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU && have_gpu=1
export OMP_WAIT_POLICY=PASSIVE
# the CPU decides which kernel tables exist here (scalar, avx2, avx512): a failure elsewhere starts from this line
echo "== CPU: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -1); $jobs cores;" \
  "$(for f in avx2 fma f16c avx512f avx512bw avx512vl avx512dq avx512_vnni; do
    grep -qw "$f" /proc/cpuinfo 2>/dev/null && printf '%s ' "$f"; done)"

n_pass=0 n_fail=0 n_skip=0
failed=() skipped=() t_start=$(date +%s)

# Why test $1 may skip here, on stdout; non-zero status when it must run.
may_skip() {
  case "$1" in
  cuda_* | *_cuda | *gpu*) [ $have_gpu = 0 ] && echo "no GPU on this machine" ;;
  model_gguf_quant | model_gguf_quants) python3 -c 'import gguf' 2>/dev/null || echo "the gguf Python package is not installed (scripts/setup.sh installs it)" ;;
  model_*gemma3*) [ $in_ci = 0 ] && [ ! -s $gemma ] && echo "no Gemma 3 model ($gemma; scripts/fetch-model.sh gemma3), outside CI" ;;
  model_* | cli_model_sh) [ $in_ci = 0 ] && [ ! -s $model ] && echo "no model ($model; scripts/fetch-model.sh), outside CI" ;;
  python_hf | python_hf_oldest) python3 -c 'import torch, transformers' 2>/dev/null || echo "torch/transformers not installed (scripts/setup.sh installs them)" ;;
  python_*) [ $in_ci = 0 ] && echo "Python modules missing, outside CI" ;;
  *) false ;;
  esac
}

fail_step() { # a build or setup step that failed: counts as one failed test
  n_fail=$((n_fail + 1))
  failed+=("$1")
  echo "FAILED: $1"
}

# ctest in build dir $1 for tier $2 (remaining args go to ctest), then tallies its JUnit report.
run_ctest() {
  local dir=$1 tier=$2
  shift 2
  local xml=$dir/ctest-junit.xml t0
  t0=$(date +%s)
  rm -f "$xml"
  ctest --test-dir "$dir" --output-on-failure -j"$jobs" --output-junit "$(realpath "$dir")/ctest-junit.xml" "$@"
  echo "== $tier: ctest took $(($(date +%s) - t0)) s"
  if [ ! -s "$xml" ]; then
    fail_step "$tier: ctest wrote no report"
    return
  fi
  # name<TAB>passed|failed|skipped<TAB>first SKIP line of its output
  local name st why
  while IFS=$'\t' read -r name st why; do
    case "$st" in
    passed) n_pass=$((n_pass + 1)) ;;
    skipped)
      if reason=$(may_skip "$name"); then
        n_skip=$((n_skip + 1))
        skipped+=("$tier/$name: ${why:-exit 77} [allowed: $reason]")
      else
        n_fail=$((n_fail + 1))
        failed+=("$tier/$name: skipped (${why:-exit 77}) but must run on this machine")
      fi
      ;;
    *) n_fail=$((n_fail + 1)) failed+=("$tier/$name") ;;
    esac
  done < <(python3 - "$xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
for tc in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    out = tc.findtext("system-out") or ""
    why = next((l.strip() for l in out.splitlines() if "SKIP" in l), "")
    if tc.find("skipped") is not None or tc.get("status") == "notrun":
        st = "skipped"
    elif tc.find("failure") is not None or tc.find("error") is not None or tc.get("status") == "fail":
        st = "failed"
    else:
        st = "passed"
    print(f"{tc.get('name')}\t{st}\t{why[:160]}")
EOF
  )
}

build() { # dir, tier, cmake args...
  local dir=$1 tier=$2 t0
  shift 2
  t0=$(date +%s)
  mkdir -p "$dir"
  if ! cmake -S . -B "$dir" "$@" >"$dir/configure.log" 2>&1; then
    cat "$dir/configure.log"
    fail_step "$tier: configure"
    return 1
  fi
  if ! cmake --build "$dir" -j"$jobs" "${build_targets[@]}"; then
    fail_step "$tier: build"
    return 1
  fi
  echo "== $tier: build took $(($(date +%s) - t0)) s"
}

for tier in $tiers; do
  echo "==================== tier $tier"
  build_targets=()
  t_tier=$(date +%s)
  case $tier in
  release)
    # Where nvcc exists the CUDA code is compiled (a compile check, even without a GPU: CMake's AUTO would skip it
    # there); KVQ_CUDA=OFF in the environment skips it (e.g. on a loaded 2-core machine)
    cuda=${KVQ_CUDA:-AUTO}
    if [ "$cuda" = AUTO ] && command -v nvcc >/dev/null 2>&1; then cuda=ON; fi
    # Without a GPU nothing runs the kernels: compile them to PTX for both pipelines' targets (the front end and
    # NVVM see all the code), leave out ptxas and, where nvcc has it (12.8+), its optimizer (-Ofc=max, "fastest
    # compilation speed"): a compile check, not code to run. One decode file (Q4 keys) on 2 cores, nvcc 13.0: 109 s
    # as compute_90a + compute_80 PTX, 61 s as compute_90a alone, 9.3 s as both with -Ofc=max (the release build, all
    # targets: 1085 s before, 168 s with it, of CI's 30 minutes). KVQ_CUDA_GENCODE in the environment wins.
    gencode=()
    if [ "$cuda" = ON ] && [ ! -e /dev/nvidia0 ]; then
      gencode=(-DKVQ_CUDA_GENCODE="${KVQ_CUDA_GENCODE:--gencode=arch=compute_90a,code=compute_90a -gencode=arch=compute_80,code=compute_80}")
      # the help whole first: grep -q stops reading at its match, and nvcc's SIGPIPE would fail the pipe (pipefail)
      nvcc_help=$(nvcc --help 2>/dev/null || true)
      grep -q -- --Ofast-compile <<<"$nvcc_help" && gencode+=(-DCMAKE_CUDA_FLAGS=-Ofc=max)
    elif [ -n "${KVQ_CUDA_GENCODE:-}" ]; then
      gencode=(-DKVQ_CUDA_GENCODE="$KVQ_CUDA_GENCODE")
    fi
    if build build release -DCMAKE_BUILD_TYPE=Release -DKVQ_CUDA="$cuda" -DKVQ_SANITIZE=OFF -DKVQ_TSAN=OFF \
      -DKVQ_FAILALLOC=OFF "${gencode[@]}"; then
      run_ctest build release
      # in CI the model tests must exist at all (they are not registered without OpenBLAS)
      if [ $in_ci = 1 ] && ! grep -q 'name="model_golden"' build/ctest-junit.xml 2>/dev/null; then
        fail_step "release: model tests not registered (OpenBLAS missing?)"
      fi
    fi
    ;;
  asan)
    if build build-asan asan -DCMAKE_BUILD_TYPE=Debug -DKVQ_SANITIZE=ON -DKVQ_OPENMP=ON -DKVQ_CUDA=OFF \
      -DKVQ_FAILALLOC=ON; then
      ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 KVQ_TEST_QUICK=1 run_ctest build-asan asan -E '^model_ppl_gemma3$'
    fi
    ;;
  tsan)
    # Only the threads tests: the other tests are single-threaded apart from OpenMP, which test_threads covers too,
    # and the engine's pool (test_tpool).
    tsan_cc=gcc
    archer=$(ls /usr/lib/llvm-*/lib/libarcher.so 2>/dev/null | tail -1)
    if command -v clang >/dev/null && [ -n "$archer" ]; then
      tsan_cc=clang
      export OMP_TOOL_LIBRARIES="$archer" # libomp loads Archer, which tells TSan about OpenMP's synchronisation
    fi
    build_targets=(--target test_threads test_tpool)
    if build build-tsan tsan -DCMAKE_C_COMPILER=$tsan_cc -DCMAKE_BUILD_TYPE=Debug -DKVQ_TSAN=ON -DKVQ_CUDA=OFF \
      -DKVQ_BUILD_MODEL=OFF; then
      echo "== tsan: $tsan_cc, OpenMP $(grep -q 'KVQ_OPENMP:BOOL=ON' build-tsan/CMakeCache.txt && echo on || echo off)"
      # ignore_noninstrumented_modules: races inside libomp itself (its own unannotated locks) are not kvq's
      TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:ignore_noninstrumented_modules=1" run_ctest build-tsan tsan -R '^core_(threads|tpool)$'
    fi
    unset OMP_TOOL_LIBRARIES
    ;;
  fuzz)
    secs=${FUZZ_SECONDS:-20}
    if command -v clang >/dev/null && echo 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n) { return 0; }' |
      clang -x c -fsanitize=fuzzer -o /tmp/kvq-fuzz-probe.$$ - >/dev/null 2>&1; then
      rm -f /tmp/kvq-fuzz-probe.$$
      # every target at once (fuzz.sh runs them side by side, one per core), then one verdict per target from its
      # report line: "fuzz_NAME: ... exit 0, 0 finding(s)" passes
      mkdir -p build-fuzz && fuzz_log=build-fuzz/all.log
      bash scripts/fuzz.sh all "$secs" 2>&1 | tee "$fuzz_log"
      for f in tests/fuzz_*.c; do
        n=${f#tests/fuzz_}
        n=${n%.c}
        [ "$n" = replay_main ] && continue
        if grep -q "^fuzz\.sh: fuzz_$n is not defined in this configuration" "$fuzz_log"; then
          n_skip=$((n_skip + 1)) skipped+=("fuzz/$n: its libraries are not built here [allowed: e.g. no OpenBLAS]")
        elif grep -q "^fuzz_$n: .* exit 0, 0 finding(s)" "$fuzz_log"; then
          n_pass=$((n_pass + 1))
        else
          fail_step "fuzz/$n"
        fi
      done
    else
      # the corpus replays (fuzz_<name>_corpus) ran in the release and asan tiers
      n_skip=$((n_skip + 1))
      skipped+=("fuzz: clang with libFuzzer not installed (apt-get install clang) [allowed: corpus replays ran in ctest]")
    fi
    ;;
  *)
    fail_step "unknown tier '$tier' (release, asan, tsan, fuzz)"
    ;;
  esac
  echo "== tier $tier: $(($(date +%s) - t_tier)) s"
done

echo
echo "==================== summary ($(($(date +%s) - t_start)) s)"
for s in "${skipped[@]}"; do echo "SKIPPED $s"; done
for f in "${failed[@]}"; do echo "FAILED  $f"; done
echo "$n_pass passed, $n_fail failed, $n_skip skipped"
[ "$n_fail" = 0 ]

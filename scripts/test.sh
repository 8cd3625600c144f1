#!/usr/bin/env bash
# Builds kvq twice (plain, then ASan+UBSan) and runs the whole ctest suite on each.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc 2>/dev/null || echo 2)
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$jobs"
ctest --test-dir build --output-on-failure -j"$jobs"
# CUDA device code is compiled (and linked) once, in the release build; the sanitizers cover the host code.
cmake -S . -B build-san -DCMAKE_BUILD_TYPE=Debug -DKVQ_SANITIZE=ON -DKVQ_OPENMP=OFF -DKVQ_CUDA=OFF >/dev/null
cmake --build build-san -j"$jobs"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  KVQ_TEST_QUICK=1 ctest --test-dir build-san --output-on-failure -j"$jobs"
echo "all tests passed (release and sanitizer builds)"

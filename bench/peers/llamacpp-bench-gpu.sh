#!/usr/bin/env bash
# llama.cpp's llama-bench on the GPU, the peer of `kvq bench --gpu` (issue 21): the same GGUF, flash attention on,
# -ngl 99, -ctk/-ctv f16 | q8_0 | q4_0 (keys and values alike), -d DEPTHS (llama-bench fills the depth with a real
# prompt pass), -n 64 generated tokens, no prompt test, 3 repetitions. Built with CUDA (sm_90, static) from the
# llama.cpp sources vendored in the llama-cpp-python sdist (PyPI: the project's only source registry), repacked
# without models/ and docs/ (the sdist is 73 MiB, the repack 12 MiB) so that it can travel to a GPU machine without a
# network: the device runner's carry takes git-ignored paths, e.g. build-peers/llama.cpp-0.3.36-src.tar.gz.
#   bench/peers/llamacpp-bench-gpu.sh pack                       (network) pip download the sdist, write the repack
#   bench/peers/llamacpp-bench-gpu.sh build                      build only (scripts/gpu-check.sh peerbuild runs it in
#                                                                the background while kvq builds and runs)
#   bench/peers/llamacpp-bench-gpu.sh MODEL OUT_DIR [DEPTHS]     build (reused when there), run; writes
#                                                                OUT_DIR/llamacpp-bench-gpu.csv (llama-bench's CSV rows)
# Env: LLAMA_CPP_PYTHON_VERSION (0.3.36), JOBS (16), TYPES (f16,q8_0,q4_0), REPS (3).
set -euo pipefail
cd "$(dirname "$0")/../.."
ver=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
top=build-peers
pack=$top/llama.cpp-$ver-src.tar.gz
if [ "${1:-}" = pack ]; then
  mkdir -p "$top"
  pip download --no-deps --no-binary llama-cpp-python -d "$top" "llama-cpp-python==$ver" >&2
  tmp=$(mktemp -d)
  tar -xzf "$top/llama_cpp_python-$ver.tar.gz" -C "$tmp"
  tar -czf "$pack" --exclude='llama.cpp/models' --exclude='llama.cpp/docs' --exclude='llama.cpp/.git*' \
    -C "$tmp/llama_cpp_python-$ver/vendor" llama.cpp
  rm -rf "$tmp" "$top/llama_cpp_python-$ver.tar.gz"
  ls -la "$pack"
  exit 0
fi
if [ "${1:-}" = build ]; then model='' out='' depths=''; else model=${1:?MODEL} out=${2:?OUT_DIR} depths=${3:-0,4096,32768}; fi
src=$top/llama.cpp-$ver-src bld=$top/llama.cpp-$ver-cuda
bin=$bld/bin/llama-bench
if [ ! -x "$bin" ]; then
  if [ ! -d "$src" ]; then
    [ -f "$pack" ] || { echo "llamacpp-bench-gpu.sh: $pack is missing (run '$0 pack' where PyPI is reachable, carry it)" >&2; exit 1; }
    mkdir -p "$src" && tar -xzf "$pack" -C "$src" --strip-components=1
  fi
  export PATH=/usr/local/cuda/bin:$PATH
  cmake -S "$src" -B "$bld" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >&2
  cmake --build "$bld" -j "${JOBS:-16}" --target llama-bench >&2
fi
[ "${1:-}" = build ] && { echo "$bin"; exit 0; }
mkdir -p "$out"
csv=$out/llamacpp-bench-gpu.csv
rm -f "$csv"
IFS=, read -ra types <<< "${TYPES:-f16,q8_0,q4_0}"
for t in "${types[@]}"; do
  # one type per call: -ctk/-ctv lists would run every (K, V) pair
  "$bin" -m "$model" -ngl 99 -fa on -ctk "$t" -ctv "$t" -d "$depths" -n 64 -p 0 -r "${REPS:-3}" -o csv >"$out/llamacpp-$t.csv" \
    2>"$out/llamacpp-$t.log" || { tail -20 "$out/llamacpp-$t.log" >&2; exit 1; }
  if [ -f "$csv" ]; then tail -n +2 "$out/llamacpp-$t.csv" >>"$csv"; else cat "$out/llamacpp-$t.csv" >"$csv"; fi
done
echo "$csv"

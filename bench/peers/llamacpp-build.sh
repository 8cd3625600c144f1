#!/usr/bin/env bash
# Builds llama.cpp's llama-perplexity on the CPU from the llama.cpp sources vendored in the llama-cpp-python sdist
# (PyPI is the only source registry this project reaches), into build-peers/ (git-ignored). Reuses a build that exists.
#   bench/peers/llamacpp-build.sh          prints the path of llama-perplexity on its last line
#   bench/peers/llamacpp-build.sh bench    builds llama-bench for this host's CPU (GGML_NATIVE=ON, its own build dir
#                                          build-peers/llama.cpp-VER-native) and prints its path: the speed peer of
#                                          `kvq bench` (bench/peers/e2e-cpu.sh), which uses AVX-512 where the host has
#                                          it, so llama.cpp gets its best kernels too. Sources: the sdist as below, or
#                                          the repack build-peers/llama.cpp-VER-src.tar.gz (llamacpp-bench-gpu.sh pack)
#                                          when it is there (no network needed).
# LLAMA_CPP_PYTHON_VERSION pins the sdist (default below). Portable build: GGML_NATIVE=OFF with AVX2/FMA/F16C only,
# no AVX-512 and no AMX: a native build on some Intel hosts crashes in the AMX weight path, and a binary that runs
# on AVX2-only CI machines (AMD Zen 3) gives the same numbers everywhere. JOBS (default 2) for the build.
set -euo pipefail
cd "$(dirname "$0")/../.."
ver=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
top=build-peers
src=$top/llama-cpp-python-$ver
bld=$top/llama.cpp-$ver
bin=$bld/bin/llama-perplexity
pack=$top/llama.cpp-$ver-src.tar.gz
if [ "${1:-}" = bench ]; then
  bld=$top/llama.cpp-$ver-native bin=$bld/bin/llama-bench
  if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
  if [ -d "$src/vendor/llama.cpp" ]; then lsrc=$src/vendor/llama.cpp
  else
    lsrc=$top/llama.cpp-$ver-src
    if [ ! -d "$lsrc" ]; then
      if [ ! -f "$pack" ]; then
        pip download --no-deps --no-binary llama-cpp-python -d "$top" "llama-cpp-python==$ver" >&2
        tar -xzf "$top/llama_cpp_python-$ver.tar.gz" -C "$top"
        mv "$top/llama_cpp_python-$ver" "$src"
        lsrc=$src/vendor/llama.cpp
      else
        mkdir -p "$lsrc" && tar -xzf "$pack" -C "$lsrc" --strip-components=1
      fi
    fi
  fi
  # native: AVX-512 (and VNNI/BF16) on hosts that have them; AMX off (the crash above), OpenMP as llama.cpp ships
  cmake -S "$lsrc" -B "$bld" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=OFF -DGGML_METAL=OFF -DLLAMA_CURL=OFF \
    -DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_OPENMP=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >&2
  cmake --build "$bld" -j "${JOBS:-2}" --target llama-bench >&2
  echo "$bin"
  exit 0
fi
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
mkdir -p "$top"
if [ ! -d "$src/vendor/llama.cpp" ]; then
  # the sdist only (--no-binary for this package alone: ':all:' would also build pip's metadata step's build
  # dependencies, scikit-build-core and hatchling, from source)
  pip download --no-deps --no-binary llama-cpp-python -d "$top" "llama-cpp-python==$ver" >&2
  tar -xzf "$top/llama_cpp_python-$ver.tar.gz" -C "$top" 2>/dev/null || tar -xzf "$top/llama-cpp-python-$ver.tar.gz" -C "$top"
  [ -d "$src" ] || mv "$top/llama_cpp_python-$ver" "$src"
fi
cmake -S "$src/vendor/llama.cpp" -B "$bld" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=OFF -DGGML_METAL=OFF \
  -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
  -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_OPENMP=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$bld" -j "${JOBS:-2}" --target llama-perplexity llama-tokenize >&2
echo "$bin"

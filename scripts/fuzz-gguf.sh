#!/usr/bin/env bash
# Fuzzes the GGUF reader + tokenizer loader (tests/fuzz_gguf.c) with libFuzzer, ASan and UBSan.
#   scripts/fuzz-gguf.sh [SECONDS]     (default 600)
# Needs clang with libFuzzer (Debian: apt-get install clang libclang-rt-dev). Seeds: the crafted files of
# tests/test_gguf_corrupt.c, plus the real model's header and metadata when models/ has it. Crashes are written to
# build-fuzz/ as crash-* files; reproduce with: build-fuzz/fuzz_gguf build-fuzz/crash-...
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
out=build-fuzz
mkdir -p "$out/corpus"
src="src/model/gguf.c src/model/tokenizer.c src/model/model_err.c"
inc="-Iinclude -Isrc/model -Isrc/core"
# Seed writer: the ctest program's --write-seeds mode (plain build, core's errors.c for kvq_strerror).
clang -O1 -g $inc -o "$out/seed_writer" tests/test_gguf_corrupt.c tests/fuzz_gguf.c $src src/core/errors.c -lm
"$out/seed_writer" --write-seeds "$out/corpus"
if [ -s models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  # The real header + metadata (tokenizer included), cut before the tensor data: the reader rejects it as
  # truncated, but libFuzzer's mutations of its counts and offsets start from a real file's shape.
  head -c 1785664 models/SmolLM2-135M-Instruct.Q4_1.gguf > "$out/corpus/model_head.gguf"
fi
clang -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined $inc \
  -o "$out/fuzz_gguf" tests/fuzz_gguf.c $src -lm
cd "$out"
# -rss_limit_mb: a parse must not allocate more than a small multiple of its input; -max_len 4 MiB covers the seeds.
./fuzz_gguf -max_total_time="$secs" -max_len=4194304 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 corpus

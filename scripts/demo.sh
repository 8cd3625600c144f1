#!/usr/bin/env bash
# README command one: fetches SmolLM2-135M-Instruct, builds kvq and asks the model a question with a 4-bit KV cache.
# The answer streams to stdout; the footer (stderr) shows prefill/decode speed and the KV memory against F16.
#   scripts/demo.sh ["your prompt"]
# Needs (Debian): build-essential cmake python3-pip unzip libopenblas-dev. Build directory: $KVQ_BUILD_DIR or build.
set -euo pipefail
cd "$(dirname "$0")/.."
prompt=${1:-"Give me three tips for staying healthy."}
build=${KVQ_BUILD_DIR:-build}
bash scripts/fetch-model.sh
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j"$(nproc 2>/dev/null || echo 2)" --target kvq_cli >/dev/null
if [ ! -x "$build/bin/kvq" ]; then
  echo "demo: $build/bin/kvq was not built (is libopenblas-dev installed?)" >&2
  exit 1
fi
echo "\$ $build/bin/kvq run -m models/SmolLM2-135M-Instruct.Q4_1.gguf --kv-type q4 --chat -p \"$prompt\"" >&2
exec "$build/bin/kvq" run -m models/SmolLM2-135M-Instruct.Q4_1.gguf --kv-type q4 --chat --temp 0 -n 200 -p "$prompt"

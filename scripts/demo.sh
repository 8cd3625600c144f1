#!/usr/bin/env bash
# README command one: fetches SmolLM2-135M-Instruct, builds kvq and asks the model a question about a page of the
# Debian reference manual (tests/data/demo_prompt.txt, ~1500 tokens with the chat template), once with an F16 KV
# cache and once with a 4-bit one (kvq run --compare f16,q4). With R = 128 and G = 64, all but the newest 128-191
# tokens of each layer live in 4-bit pages, so the quantized cache is what the q4 answer attends to.
# The answers stream to stdout; the footer (stderr) compares the resident KV bytes (pages + fp16 residual windows,
# from the library's statistics) and the prefill/decode speeds of both runs.
#   scripts/demo.sh [PROMPT_FILE]
# Needs (Debian): build-essential cmake python3-pip unzip libopenblas-dev. Build directory: $KVQ_BUILD_DIR, else build
# where the machine has an NVIDIA GPU (the CUDA backend is compiled when nvcc is there: KVQ_CUDA=AUTO), else build-cpu
# with KVQ_CUDA=OFF: the demo runs on the CPU, and compiling the CUDA kernels on a 2-core machine without a GPU takes
# ~10 minutes for nothing. KVQ_CUDA=ON|OFF|AUTO overrides.
# Runtime on the 2-core build machine: about 1-2 minutes (two prefills of ~1500 tokens and two answers of up to 120).
set -euo pipefail
cd "$(dirname "$0")/.."
prompt_file=${1:-tests/data/demo_prompt.txt}
gpu=0
{ nvidia-smi -L 2>/dev/null | grep -q GPU || [ -e /dev/nvidia0 ]; } && gpu=1
cuda=${KVQ_CUDA:-}
[ -z "$cuda" ] && { [ $gpu = 1 ] && cuda=AUTO || cuda=OFF; }
build=${KVQ_BUILD_DIR:-}
[ -z "$build" ] && { [ "$cuda" = OFF ] && build=build-cpu || build=build; }
bash scripts/fetch-model.sh
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DKVQ_CUDA="$cuda" >/dev/null
cmake --build "$build" -j"$(nproc 2>/dev/null || echo 2)" --target kvq_cli >/dev/null
if [ ! -x "$build/bin/kvq" ]; then
  echo "demo: $build/bin/kvq was not built (is libopenblas-dev installed?)" >&2
  exit 1
fi
cmd=("$build/bin/kvq" run -m models/SmolLM2-135M-Instruct.Q4_1.gguf --chat -f "$prompt_file" --temp 0 -n 120
     --compare f16,q4)
# The echoed command is the array that runs next; an argument with characters the shell would treat specially is
# single-quoted (${a@Q}), so the line pastes back into a shell as the same command.
line='$'
for a in "${cmd[@]}"; do
  if [[ $a =~ ^[A-Za-z0-9_./,:=+-]+$ ]]; then line+=" $a"; else line+=" ${a@Q}"; fi
done
echo "$line" >&2
start=$SECONDS
"${cmd[@]}"
echo "demo: $((SECONDS - start)) s" >&2

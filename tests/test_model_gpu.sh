#!/usr/bin/env bash
# ctest model_gpu: CPU and GPU engines on generated GGUFs (kvq gen-model): the SmolLM2-135M shape (30 layers, head_dim
# 64, 9/3 heads, f16 weights) and a 2-layer Llama-3-8B shape (head_dim 128, 32/8 heads, vocab 128256, q8_0 weights),
# every KV type (test_model_gpu.c says what is compared). Exit 77 (skipped) without a usable GPU.
# usage: test_model_gpu.sh KVQ TEST_MODEL_GPU [DIR]   (DIR keeps the generated models; default a temporary one)
set -uo pipefail
kvq=$1 bin=$2
"$bin" --probe || exit $?
dir=${3:-}
if [ -z "$dir" ]; then dir=$(mktemp -d); trap 'rm -rf "$dir"' EXIT; fi
mkdir -p "$dir"
rc=0
for spec in "smollm2-135m f16" "llama3-8b q8_0 --layers 2"; do
  set -- $spec
  m=$dir/$1-$2${3:+-l$4}.gguf
  [ -s "$m" ] || "$kvq" gen-model --shape "$1" -o "$m" --wtype "$2" ${3:+$3 $4} >/dev/null || { echo "FAIL gen-model $spec"; rc=1; continue; }
  echo "== $m"
  # the CPU side runs the scalar _ref attention kernels: the reference, fp32 throughout
  KVQ_FORCE_SCALAR=1 OMP_WAIT_POLICY=PASSIVE "$bin" "$m" || rc=1
done
exit $rc

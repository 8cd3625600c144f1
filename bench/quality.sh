#!/usr/bin/env bash
# Quality table: perplexity of SmolLM2-135M-Instruct on the debian-reference-en text with every KV cache type and
# the useful K/V mixes, at ctx 2048 and 8192. Writes docs/quality.md (and prints it).
#   bench/quality.sh            CHUNKS_2K=12 CHUNKS_8K=2 by default (a full run over the corpus takes hours on 2 cores)
# Needs a built kvq (KVQ_BUILD_DIR, default build) and the model (scripts/fetch-model.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${KVQ_BUILD_DIR:-build}
kvq=$build/bin/kvq
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
corpus=/usr/share/debian-reference/debian-reference.en.txt.gz
chunks_2k=${CHUNKS_2K:-12}
chunks_8k=${CHUNKS_8K:-2}
mixes_2k=${MIXES_2K:-f16,bf16,fp8,q8,q8/q4,q4/q8,q4,q4:r128,q8/q2,q4/q2,q2}
mixes_8k=${MIXES_8K:-f16,q8,q8/q4,q4,q2}
[ -x "$kvq" ] || { echo "quality: build kvq first ($kvq missing)" >&2; exit 1; }
[ -s "$model" ] || bash scripts/fetch-model.sh
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
gzip -dc "$corpus" > "$tmp/corpus.txt"

run() { # ctx chunks mixes
  local cmd="kvq perplexity -m $model -f debian-reference.en.txt --ctx $1 --chunks $2 --compare $3"
  echo "### ctx $1" >> "$tmp/out.md"
  echo >> "$tmp/out.md"
  echo "\`$cmd\`" >> "$tmp/out.md"
  echo >> "$tmp/out.md"
  local t0=$(date +%s)
  "$kvq" perplexity -m "$model" -f "$tmp/corpus.txt" --ctx "$1" --chunks "$2" --compare "$3" > "$tmp/table.txt"
  local t1=$(date +%s)
  head -n 1 "$tmp/table.txt" | sed 's/^/Scored: /' >> "$tmp/out.md"
  echo >> "$tmp/out.md"
  tail -n +2 "$tmp/table.txt" >> "$tmp/out.md"
  echo >> "$tmp/out.md"
  echo "($((t1 - t0)) s on this machine.)" >> "$tmp/out.md"
  echo >> "$tmp/out.md"
}
: > "$tmp/out.md"
run 2048 "$chunks_2k" "$mixes_2k"
run 8192 "$chunks_8k" "$mixes_8k"

{
  echo "# KV cache quality: perplexity by KV type"
  echo
  echo "Made by \`bench/quality.sh\` on $(date -u +%Y-%m-%d) ($(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); libkvq CPU attention: $("$kvq" version | sed 's/.*attention: //; s/)//'))."
  echo
  echo "Model: SmolLM2-135M-Instruct (GGUF Q4_1 weights, dequantized to fp32; 30 layers, 3 KV heads of 64, trained context 8192)."
  echo "Text: \`/usr/share/debian-reference/debian-reference.en.txt.gz\` (Debian package debian-reference-en, 212507 tokens)."
  echo "Method: the tokens are cut into chunks of ctx tokens; each chunk runs from an empty cache (prefill in batches of 256"
  echo "through \`kvq_attn_prefill\`) and only its second half is scored, so every scored token sees at least ctx/2 tokens"
  echo "of context, all of them read back from the quantized cache. PPL +/- is the standard error over scored tokens; all rows of a"
  echo "table use the same tokens, so their differences are much less noisy than the +/- suggests. dPPL is relative to F16."
  echo "KV bytes/token: K+V of all 30 layers, page bytes amortized (scales/mins included), from \`kvq_cache_get_stats\`;"
  echo "q4/q2 also keep a fixed fp16 residual window of the newest 64..127 tokens per layer (not in bytes/token)."
  echo "A mix a/b means keys a, values b."
  echo
  cat "$tmp/out.md"
} > docs/quality.md
cat docs/quality.md

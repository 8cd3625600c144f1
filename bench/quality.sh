#!/usr/bin/env bash
# Quality table: perplexity of SmolLM2-135M-Instruct on the debian-reference-en text with every KV cache type and
# the useful K/V mixes, at ctx 2048 and 8192. Prints the table; with --out DIR also writes DIR/quality.md,
# DIR/quality.csv and DIR/quality.png (bench/plot.py). `--out docs` updates the tracked ones: only the part of
# docs/quality.md between its markers is rewritten, the reading around it is kept.
#   bench/quality.sh [--out DIR]   CHUNKS_2K=12 CHUNKS_8K=2 by default (a full run over the corpus takes hours on 2 cores)
#   bench/quality.sh --csv DIR     only (re)writes DIR/quality.csv from the tables of DIR/quality.md
# quality.csv: ctx, kv (K/V mix), ppl, ppl_se, dppl_pct (vs f16), kv_bytes_per_token (K+V, all layers),
# vs_f16 (bytes ratio), bits_per_element (16 * bytes / f16 bytes: scales and mins included, residual window not).
# Needs a built kvq (KVQ_BUILD_DIR, default build) and the model (scripts/fetch-model.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
BEGIN_MARK='<!-- bench/quality.sh: begin (generated: the text outside these markers is kept) -->'
END_MARK='<!-- bench/quality.sh: end -->'

md_to_csv() { # quality.md on stdin -> quality.csv on stdout (the "### ctx N" tables)
  awk -F'|' '
    function trim(x) { gsub(/^[ \t]+|[ \t]+$/, "", x); return x }
    /^### ctx / { ctx = $0; sub(/^### ctx /, "", ctx); next }
    /^\| *KV/ || /^\|--/ || NF < 6 || ctx == "" { next }
    {
      kv = trim($2); split(trim($3), p, / *\+\/- */); d = trim($4); sub(/%$/, "", d); sub(/^\+/, "", d)
      b = trim($5); r = trim($6); sub(/x$/, "", r)
      n++; C[n] = ctx; K[n] = kv; P[n] = p[1]; S[n] = p[2]; D[n] = d; B[n] = b; R[n] = r
      if (kv == "f16") F[ctx] = b
    }
    END {
      print "ctx,kv,ppl,ppl_se,dppl_pct,kv_bytes_per_token,vs_f16,bits_per_element"
      for (i = 1; i <= n; i++) {
        f = (C[i] in F) ? F[C[i]] : B[i] / R[i]
        printf "%s,%s,%s,%s,%s,%s,%s,%.3f\n", C[i], K[i], P[i], S[i], D[i], B[i], R[i], 16 * B[i] / f
      }
    }'
}

out=""
case "${1:-}" in
  --out) out=${2:?--out DIR} ;;
  --csv)
    md_to_csv < "${2:?--csv DIR}/quality.md" > "$2/quality.csv"
    echo "wrote $2/quality.csv from $2/quality.md"
    exit 0 ;;
  "") ;;
  *) echo "usage: bench/quality.sh [--out DIR] | --csv DIR" >&2; exit 2 ;;
esac
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
[ "$chunks_8k" = 0 ] || run 8192 "$chunks_8k" "$mixes_8k"  # CHUNKS_8K=0: the ctx 2048 table only

{
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
} > "$tmp/generated.md"
if [ -z "$out" ]; then
  cat "$tmp/generated.md"
  echo "(not written: bench/quality.sh --out DIR writes DIR/quality.md, .csv and .png; --out docs the tracked ones)"
  exit 0
fi
md=$out/quality.md
{
  # what the file has around the markers (title, hand-written reading) stays; without markers it is replaced
  if [ -f "$md" ] && grep -qF "$BEGIN_MARK" "$md" && grep -qF "$END_MARK" "$md"; then
    awk -v m="$BEGIN_MARK" '$0 == m {exit} {print}' "$md"
    echo "$BEGIN_MARK"; cat "$tmp/generated.md"; echo "$END_MARK"
    awk -v m="$END_MARK" 'on {print} $0 == m {on = 1}' "$md"
  else
    echo "# KV cache quality: perplexity by KV type"; echo
    echo "$BEGIN_MARK"; cat "$tmp/generated.md"; echo "$END_MARK"
  fi
} > "$tmp/quality.md"
cp "$tmp/quality.md" "$md"
md_to_csv < "$md" > "$out/quality.csv"
cat "$md"
echo "wrote $md and $out/quality.csv"
python3 bench/plot.py --dir "$out" quality || echo "quality: no plot (bench/plot.py failed)" >&2

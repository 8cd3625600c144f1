#!/usr/bin/env bash
# Quality suite: SmolLM2-135M-Instruct on the debian-reference-en text, one table per ctx (2048, 8192) with kvq's KV
# configs beside llama.cpp's KV types (bench/peers/llamacpp.sh: llama-perplexity built from the llama-cpp-python sdist)
# and HF QuantizedCache (docs/bench-hf-quality.csv from bench/bench_hf_quality.py, when it is there), all on the same
# GGUF, text, ctx and scoring (chunks of ctx tokens from an empty cache, the second half of each scored).
#   bench/quality.sh [--out DIR] [--kvq-only | --peers-only] [--kvq-list LIST]
#     prints the tables; --out DIR also writes DIR/quality.md (between its markers; the reading around them is
#     kept), DIR/quality.csv and DIR/quality.png (bench/plot.py quality). --kvq-only / --peers-only rerun one part
#     and keep the other part's rows from DIR/quality.csv.
#   bench/quality.sh --csv DIR     only (re)writes DIR/quality.csv from the tables of DIR/quality.md
# Env: CHUNKS_2K (6), CHUNKS_8K (2; 0: no ctx 8192 table), KVQ_LIST (kvq --compare entries, default below; an entry
# the built kvq rejects is skipped with a note), KVQ_LIST_8K, DECODE_ATTN (1: kvq perplexity --decode-attn, every
# token scored as generation sees the cache, which llama.cpp's window-less types need not; 0: prefill batches), LLAMA_KV (llama.cpp's, see bench/peers/llamacpp.sh),
# HF_CSV (docs/bench-hf-quality.csv), KVQ_BUILD_DIR (build), LLAMA_PERPLEXITY (a llama-perplexity of your own, with
# llama-tokenize beside it), LLAMA_CSV_DIR (take llama.cpp's rows from
# DIR/llama-CTX.csv, written by an earlier `bench/peers/llamacpp.sh CTX CHUNKS TEXT DIR/llama-CTX.csv`, instead of running).
# quality.csv (bench/peers/quality_table.py COLS): method,kv,type_k,type_v,ctx,chunks,tokens,ppl,ppl_se,dppl_pct
# (vs the same method's F16),kld_mean,kld_p99,top1_pct (vs that F16),bits_per_element,bytes_per_token,
# f16_bytes_per_token,seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
BEGIN_MARK='<!-- bench/quality.sh: begin (generated: the text outside these markers is kept) -->'
END_MARK='<!-- bench/quality.sh: end -->'
table=bench/peers/quality_table.py

out="" part=all kvq_list=${KVQ_LIST:-f16,q8,q8/q4,q4,q4:outl=none,q3,q3:outl=none,q2,q2:outl=none,q4:rot=none,q4:sinks=0}
decode_attn=${DECODE_ATTN:-1}
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=${2:?--out DIR}; shift ;;
    --csv)
      python3 "$table" md2csv < "${2:?--csv DIR}/quality.md" > "$2/quality.csv"
      echo "wrote $2/quality.csv from $2/quality.md"
      exit 0 ;;
    --kvq-only) part=kvq ;;
    --peers-only) part=peers ;;
    --kvq-list) kvq_list=${2:?--kvq-list LIST}; shift ;;
    *) echo "usage: bench/quality.sh [--out DIR] [--kvq-only | --peers-only] [--kvq-list LIST] | --csv DIR" >&2
       exit 2 ;;
  esac
  shift
done
[ "$part" = all ] || [ -n "$out" ] || { echo "quality: --kvq-only/--peers-only need --out DIR" >&2; exit 2; }
build=${KVQ_BUILD_DIR:-build}
kvq=$build/bin/kvq
[ -x "$kvq" ] || kvq=$build/src/cli/kvq
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
corpus=/usr/share/debian-reference/debian-reference.en.txt.gz
chunks_2k=${CHUNKS_2K:-6}
chunks_8k=${CHUNKS_8K:-2}
kvq_list_8k=${KVQ_LIST_8K:-$kvq_list}
hf_csv=${HF_CSV:-docs/bench-hf-quality.csv}
[ -x "$kvq" ] || { echo "quality: build kvq first ($kvq missing)" >&2; exit 1; }
[ -s "$model" ] || bash scripts/fetch-model.sh
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
gzip -dc "$corpus" > "$tmp/corpus.txt"
notes=$tmp/notes.md
: > "$notes"
note() { echo "$*" >&2; echo "- $*" >> "$notes"; }

# the help text whole first: grep -q on a pipe stops reading at its match, and the SIGPIPE that kvq then gets fails
# the pipeline under pipefail
ppl_help=$("$kvq" perplexity --help 2>&1 || true)
kvq_csv_ok=0
grep -q -- '--csv' <<<"$ppl_help" && kvq_csv_ok=1
da=()
if [ "$decode_attn" = 1 ]; then
  if grep -q -- '--decode-attn' <<<"$ppl_help"; then da=(--decode-attn)
  else note "this kvq has no --decode-attn: its rows are scored in prefill batches of 256"; fi
fi
ctxs=(2048)
[ "$chunks_8k" = 0 ] || ctxs+=(8192)
chunks_of() { [ "$1" = 2048 ] && echo "$chunks_2k" || echo "$chunks_8k"; }

# The entries this kvq accepts: each one runs a 64-token chunk of the text (a parse error or a config that the
# library rejects fails in a second); the rest are skipped with a note.
accepted() {
  local ok="" e
  IFS=, read -ra es <<< "$1"
  for e in "${es[@]}"; do
    if "$kvq" perplexity -m "$model" -f "$tmp/corpus.txt" --ctx 64 --chunks 1 --compare "$e" -q \
         > /dev/null 2> "$tmp/probe.err"; then
      ok=${ok:+$ok,}$e
    else
      note "kvq entry \`$e\` skipped: this kvq rejects it ($(grep -v '^$' "$tmp/probe.err" | tail -n 1))"
    fi
  done
  echo "$ok"
}

run_kvq() { # ctx list -> $tmp/kvq-ctx.csv
  local ctx=$1 ch list t0 t1
  ch=$(chunks_of "$ctx")
  list=$(accepted "$2")
  [ -n "$list" ] || { note "ctx $ctx: no kvq entry accepted"; return 0; }
  echo "kvq: ctx $ctx, $ch chunks: $list" >&2
  t0=$(date +%s)
  if [ "$kvq_csv_ok" = 1 ]; then
    "$kvq" perplexity -m "$model" -f "$tmp/corpus.txt" --ctx "$ctx" --chunks "$ch" --compare "$list" -q "${da[@]}" \
      --csv "$tmp/raw-kvq-$ctx.csv" > "$tmp/kvq-$ctx.txt"
    python3 - "$tmp/raw-kvq-$ctx.csv" "$tmp/kvq-$ctx.csv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1], newline="")))
for r in rows:
    r["method"] = "kvq"
sys.path.insert(0, "bench/peers")
import quality_table
quality_table.write(sys.argv[2], rows)
EOF
  else
    "$kvq" perplexity -m "$model" -f "$tmp/corpus.txt" --ctx "$ctx" --chunks "$ch" --compare "$list" -q "${da[@]}" \
      > "$tmp/kvq-$ctx.txt"
    python3 "$table" kvq-md "$ctx" "$ch" < "$tmp/kvq-$ctx.txt" > "$tmp/kvq-$ctx.csv"
  fi
  t1=$(date +%s)
  echo "- kvq, ctx $ctx: \`kvq perplexity -m $model -f debian-reference.en.txt --ctx $ctx --chunks $ch --compare $list${da[*]:+ ${da[*]}}$([ "$kvq_csv_ok" = 1 ] && echo " --csv FILE")\` ($((t1 - t0)) s, all entries)" >> "$tmp/commands.md"
}

run_llama() { # ctx -> $tmp/llama-ctx.csv
  local ctx=$1 ch t0 t1
  ch=$(chunks_of "$ctx")
  if [ -n "${LLAMA_CSV_DIR:-}" ] && [ -s "$LLAMA_CSV_DIR/llama-$ctx.csv" ]; then  # rows of an earlier llamacpp.sh run
    cp "$LLAMA_CSV_DIR/llama-$ctx.csv" "$tmp/llama-$ctx.csv"
    echo "- llama.cpp, ctx $ctx: \`bench/peers/llamacpp.sh $ctx $ch debian-reference.en.txt OUT.csv\` (run before, rows taken from it; per type: $(awk -F, 'NR > 1 { printf "%s%s %s s", s, $2, $15; s = ", " }' "$tmp/llama-$ctx.csv"))" >> "$tmp/commands.md"
    return 0
  fi
  t0=$(date +%s)
  bash bench/peers/llamacpp.sh "$ctx" "$ch" "$tmp/corpus.txt" "$tmp/llama-$ctx.csv"
  t1=$(date +%s)
  echo "- llama.cpp, ctx $ctx: \`bench/peers/llamacpp.sh $ctx $ch debian-reference.en.txt OUT.csv\`: \`llama-perplexity -m $model -c $ctx -b $ctx --chunks $ch -fa on -t ${THREADS:-2} -ctk f16 -ctv f16 --kl-divergence-base F16.kld -f debian-reference.en.txt\`, then per type \`... -ctk K -ctv V --kl-divergence-base F16.kld --kl-divergence\` ($((t1 - t0)) s in all; per type: $(awk -F, 'NR > 1 { printf "%s%s %s s", s, $2, $15; s = ", " }' "$tmp/llama-$ctx.csv"))" >> "$tmp/commands.md"
}

: > "$tmp/commands.md"
# the same tokens on both sides: kvq's tokenizer and llama.cpp's must agree on the text's count
if [ "$part" != kvq ]; then
  llama_bin=${LLAMA_PERPLEXITY:-$(bash bench/peers/llamacpp-build.sh | tail -n 1)}
  # the ids, not only the counts: the chunks that are scored must hold the same tokens on both sides
  "$kvq" tokenize -m "$model" -f "$tmp/corpus.txt" --ids > "$tmp/kvq.ids"
  "$(dirname "$llama_bin")/llama-tokenize" -m "$model" -f "$tmp/corpus.txt" --ids --log-disable 2>/dev/null \
    | tr -d '[],' > "$tmp/llama.ids"
  need=$((2048 * chunks_2k)); [ "$chunks_8k" = 0 ] || [ $((8192 * chunks_8k)) -le "$need" ] || need=$((8192 * chunks_8k))
  note "tokens: $(python3 - "$tmp/kvq.ids" "$tmp/llama.ids" "$need" <<'EOF'
import sys
a, b, need = open(sys.argv[1]).read().split(), open(sys.argv[2]).read().split(), int(sys.argv[3])
i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
same = "the scored chunks hold the same tokens" if i >= need else f"the scored chunks DIFFER from token {i} on"
print(f"kvq {len(a)}, llama.cpp {len(b)} for the whole text, the same ids up to token {i} "
      f"(kvq id {a[i] if i < len(a) else '-'}, llama.cpp {b[i] if i < len(b) else '-'} there); the runs use "
      f"the first {need}: {same}")
EOF
)"
fi
for ctx in "${ctxs[@]}"; do
  [ "$ctx" = 2048 ] && list=$kvq_list || list=$kvq_list_8k
  [ "$part" = peers ] || run_kvq "$ctx" "$list"
  [ "$part" = kvq ] || run_llama "$ctx"
done

# the part not rerun keeps its command lines and notes from the existing DIR/quality.md (its rows come below)
if [ "$part" != all ] && [ -f "$out/quality.md" ]; then
  keep=$([ "$part" = kvq ] && echo '^- (llama\.cpp|HF rows)' || echo '^- (kvq, |HF rows)')
  awk -v b="$BEGIN_MARK" -v e="$END_MARK" '$0 == b {on = 1} $0 == e {on = 0} on' "$out/quality.md" \
    | grep -E "$keep" | sed 's/\( (kept from the previous run)\)*$/ (kept from the previous run)/' >> "$tmp/commands.md" || true
  [ "$part" = kvq ] && awk -v b="$BEGIN_MARK" -v e="$END_MARK" '$0 == b {on = 1} $0 == e {on = 0} on' "$out/quality.md" \
    | grep -E '^- tokens: ' >> "$notes" || true
fi
# rows: the parts just run, the other part's rows from the existing DIR/quality.csv, HF's from its own CSV
srcs=()
for f in "$tmp"/kvq-*.csv "$tmp"/llama-*.csv; do [ -f "$f" ] && srcs+=("$f"); done
if [ "$part" != all ] && [ -f "$out/quality.csv" ]; then
  python3 - "$out/quality.csv" "$tmp/kept.csv" "$part" <<'EOF'
import csv, sys
sys.path.insert(0, "bench/peers")
import quality_table
rerun = {"kvq": {"kvq"}, "peers": {"llama.cpp"}}[sys.argv[3]]
rows = [r for r in csv.DictReader(open(sys.argv[1], newline="")) if r.get("method") and r["method"] not in rerun
        and not r["method"].startswith("HF")]
quality_table.write(sys.argv[2], rows)
EOF
  srcs+=("$tmp/kept.csv")
fi
if [ -f "$hf_csv" ]; then
  python3 "$table" hf "$tmp/hf.csv" "$hf_csv" 2048 && srcs+=("$tmp/hf.csv")
else
  note "no HF QuantizedCache rows: $hf_csv is not there (bench/bench_hf_quality.py writes it)"
fi
python3 "$table" merge "$tmp/quality.csv" "${srcs[@]}"

{
  echo "Made by \`bench/quality.sh\` on $(date -u +%Y-%m-%d) ($(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); libkvq CPU attention: $("$kvq" version | sed 's/.*attention: //; s/)//'))."
  echo
  echo "Model: SmolLM2-135M-Instruct (GGUF Q4_1 weights; 30 layers, 3 KV heads of 64, trained context 8192)."
  echo "Text: \`/usr/share/debian-reference/debian-reference.en.txt.gz\` (Debian package debian-reference-en)."
  echo "Method: the tokens are cut into chunks of ctx tokens; each chunk runs from an empty cache and only its second half"
  echo "is scored, so every scored token sees at least ctx/2 tokens of context, read back from the quantized cache."
  echo "kvq and llama.cpp (\`llama-perplexity\`, \`first = n_ctx/2\`) score the same way (llama.cpp one token fewer per chunk)."
  if [ ${#da[@]} -gt 0 ]; then
    echo "kvq attends token by token (\`--decode-attn\`): each token's query right after its own token is appended, as in"
    echo "generation, so its fp16 window holds each query's last R tokens exact; scored in prefill batches its grouped"
    echo "types measure 2-3x the KLD at ctx 2048 (docs/quality.md, 2026-12-05 evening). llama.cpp's types have no window:"
    echo "its figures do not depend on the batch."
  fi
  echo "ΔPPL, KLD (mean and 99th percentile of the per-token KL divergence of the next-token distribution) and top-1 %"
  echo "(the argmax agrees) are against the same method's F16 run on the same tokens: each method is its own baseline"
  echo "(kvq multiplies on the Q4_1 blocks with fp32 activations, llama.cpp with 8-bit ones; their F16 rows differ slightly)."
  echo "bits/elem: stored bits per K/V element, scales and mins included (kvq: from \`kvq_cache_get_stats\`; llama.cpp:"
  echo "ggml block sizes, q8_0 8.5, q5_0 5.5, q4_1 5.0, q4_0 and iq4_nl 4.5; a K/V mix is the mean of its two)."
  echo "llama.cpp (this version) rotates quantized K and V by a Hadamard matrix by default; \`:norot\` switches it off."
  echo "A mix a/b means keys a, values b."
  echo
  echo "Commands (the text gunzipped to debian-reference.en.txt):"
  echo
  cat "$tmp/commands.md"
  [ -s "$notes" ] && { echo; echo "Notes:"; echo; cat "$notes"; }
  echo
  python3 "$table" md "$tmp/quality.csv"
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
    echo "# KV cache quality: kvq against llama.cpp and HF QuantizedCache"; echo
    echo "$BEGIN_MARK"; cat "$tmp/generated.md"; echo "$END_MARK"
  fi
} > "$tmp/quality.md"
cp "$tmp/quality.md" "$md"
cp "$tmp/quality.csv" "$out/quality.csv"
cat "$md"
echo "wrote $md and $out/quality.csv"
python3 bench/plot.py --dir "$out" quality || echo "quality: no plot (bench/plot.py failed)" >&2

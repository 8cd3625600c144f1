#!/usr/bin/env bash
# llama.cpp's quantized KV cache as the peer in kvq's quality suite: llama-perplexity (bench/peers/llamacpp-build.sh)
# on the same GGUF, text and ctx as `kvq perplexity`, flash attention on (llama.cpp quantizes V only with it), one
# F16 run that saves its logits (--kl-divergence-base), then one --kl-divergence run per KV type against them.
#   bench/peers/llamacpp.sh CTX CHUNKS TEXT OUT.csv
# Env: LLAMA_KV (the list, below), THREADS (2), MODEL. An entry is TYPE or K/V (keys K, values V), with ':norot' to
# switch off llama.cpp's Hadamard rotation of quantized K/V (LLAMA_ATTN_ROT_DISABLE=1; on by default in this version
# for head sizes that are a multiple of 64, SmolLM2's is 64).
# Scoring is kvq's protocol: chunks of CTX tokens from an empty cache, the second half of each scored
# (perplexity.cpp: first = n_ctx/2, n_ctx - 1 - first tokens scored per chunk; kvq scores n_ctx/2, one more).
# OUT.csv: method,kv,type_k,type_v,ctx,chunks,tokens,ppl,ppl_se,dppl_pct,kld_mean,kld_p99,top1_pct,bits_per_element,seconds
# bits_per_element: ggml's block sizes: q8_0 34 B / 32, q5_0 22 B / 32, q4_0 and iq4_nl 18 B / 32, q4_1 20 B / 32
# (the fp16 scale, and q4_1's fp16 min, included); a K/V mix is the mean of the two.
set -euo pipefail
cd "$(dirname "$0")/../.."
ctx=${1:?CTX} chunks=${2:?CHUNKS} text=${3:?TEXT} out=${4:?OUT.csv}
kvlist=${LLAMA_KV:-f16,q8_0,q4_0,q8_0/q4_0,q4_1,q5_0,iq4_nl,q4_0:norot}
model=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
threads=${THREADS:-2}
bin=${LLAMA_PERPLEXITY:-$(bash bench/peers/llamacpp-build.sh | tail -n 1)}  # LLAMA_PERPLEXITY: a binary of your own
work=build-peers/run-$ctx
mkdir -p "$work"
base=$work/f16.kld  # 2 bytes per vocab entry per scored token: 0.6 GB at ctx 2048 x 6 chunks
trap 'rm -f "$base"' EXIT

bpe() { case $1 in f16) echo 16 ;; q8_0) echo 8.5 ;; q5_0) echo 5.5 ;; q5_1) echo 6 ;; q4_0|iq4_nl) echo 4.5 ;;
        q4_1) echo 5 ;; *) echo "llamacpp.sh: no bits/element for $1" >&2; exit 2 ;; esac; }
num() { sed -n "s/^$1 *: *\([0-9.eE+-]*\).*/\1/p" "$2" | head -n 1; }  # "Mean PPL(Q)   :   10.2 ± ..." -> 10.2

echo "method,kv,type_k,type_v,ctx,chunks,tokens,ppl,ppl_se,dppl_pct,kld_mean,kld_p99,top1_pct,bits_per_element,seconds" > "$out"
common=(-m "$model" -c "$ctx" -b "$ctx" -ub 512 --chunks "$chunks" -fa on -t "$threads" -ngl 0 --no-warmup)
t0=$(date +%s)
"$bin" "${common[@]}" -f "$text" -ctk f16 -ctv f16 --kl-divergence-base "$base" > "$work/f16.log" 2>&1 \
  || { tail -n 20 "$work/f16.log" >&2; exit 1; }
t1=$(date +%s)
f16_ppl=$(sed -n 's/.*Final estimate: PPL = \([0-9.]*\) +\/- \([0-9.]*\).*/\1/p' "$work/f16.log")
f16_se=$(sed -n 's/.*Final estimate: PPL = \([0-9.]*\) +\/- \([0-9.]*\).*/\2/p' "$work/f16.log")

scored=$((chunks * (ctx - 1 - ctx / 2)))
echo "llama.cpp,f16,f16,f16,$ctx,$chunks,$scored,$f16_ppl,$f16_se,0,0,0,100,16,$((t1 - t0))" >> "$out"
echo "llamacpp: ctx $ctx f16 PPL $f16_ppl +/- $f16_se ($((t1 - t0)) s)" >&2

IFS=, read -ra entries <<< "$kvlist"
for e in "${entries[@]}"; do
  [ "$e" = f16 ] && continue
  name=$e env=()
  case $e in *:norot) e=${e%:norot}; env=(LLAMA_ATTN_ROT_DISABLE=1) ;; esac
  tk=${e%%/*} tv=${e#*/}
  log=$work/$(echo "$name" | tr '/:' '__').log
  t0=$(date +%s)
  if ! env "${env[@]}" "$bin" "${common[@]}" -ctk "$tk" -ctv "$tv" --kl-divergence-base "$base" --kl-divergence \
       > "$log" 2>&1; then
    echo "llamacpp: $name failed (skipped):" >&2; tail -n 5 "$log" >&2; continue
  fi
  t1=$(date +%s)
  ppl=$(num 'Mean PPL(Q)' "$log")
  se=$(sed -n 's/^Mean PPL(Q) *: *[0-9.]* *± *\([0-9.]*\).*/\1/p' "$log")
  kld=$(num 'Mean    KLD' "$log")
  p99=$(num '99.0%   KLD' "$log")
  top=$(num 'Same top p' "$log")
  bits=$(awk -v a="$(bpe "$tk")" -v b="$(bpe "$tv")" 'BEGIN { printf "%g", (a + b) / 2 }')
  dppl=$(awk -v p="$ppl" -v f="$f16_ppl" 'BEGIN { printf "%.3f", 100 * (p / f - 1) }')
  echo "llama.cpp,$name,$tk,$tv,$ctx,$chunks,$scored,$ppl,$se,$dppl,$kld,$p99,$top,$bits,$((t1 - t0))" >> "$out"
  echo "llamacpp: ctx $ctx $name PPL $ppl dPPL $dppl% KLD $kld p99 $p99 top1 $top% ($((t1 - t0)) s)" >&2
done

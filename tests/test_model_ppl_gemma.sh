#!/usr/bin/env bash
# Perplexity of Gemma 3 270M (scripts/fetch-model.sh gemma3) on tests/data/ppl_excerpt.txt, against transformers.
#
#   `kvq perplexity --ctx 1024 --compare f16,q8,q4` with kvq.h section 10's mechanisms at their defaults (rotation,
#   sinks in the global layers) but SQuat and the keys' outliers off (the KLD ranges were measured without them),
#   on 2 chunks of 1024 (KVQ_TEST_QUICK=1: the first only), each starting with <bos> and scoring its second half:
#   positions 512..1023, past the 512-token sliding window of the local layers.
# References (tests/data/ppl_reference_gemma3.txt):
#   hf    transformers' fp32 perplexity of the same chunks (tests/data/make_golden.py --model gemma3)
#   band  the largest relative deviation allowed for each type: f16 from hf; q8 and q4 from kvq's f16
#   kld   the range of each quantized type's mean KL divergence from kvq's f16
#   (measured, the file says how; a mis-scaled or zeroed cache, a wrong window or RoPE base is far outside them)
# usage: test_model_ppl_gemma.sh KVQ_BINARY MODEL EXCERPT REFERENCE      (exit 77: model absent, skipped)
set -euo pipefail
kvq=$1 model=$2 excerpt=$3 ref=$4
if [ ! -r "$model" ]; then echo "SKIP: model $model not present (scripts/fetch-model.sh gemma3)"; exit 77; fi
quick=${KVQ_TEST_QUICK:-0}
read -r _ ctx chunks hf chunks_q hf_q < <(grep '^hf ' "$ref")
if [ "$quick" != 0 ]; then chunks=$chunks_q; hf=$hf_q; fi
bands=$(grep "^band $ctx " "$ref" | cut -d' ' -f3-)
klds=$(grep "^kld $ctx " "$ref" | cut -d' ' -f3-)
if [ -z "$bands" ] || [ -z "$klds" ]; then echo "FAIL: no 'band $ctx' or 'kld $ctx' line in $ref"; exit 1; fi
echo "reference (ctx $ctx, $chunks chunks): transformers $hf; bands $bands; KLD ranges $klds"
out=$(OMP_WAIT_POLICY=PASSIVE "$kvq" perplexity -m "$model" -f "$excerpt" --ctx "$ctx" --chunks "$chunks" \
      --compare f16,q8,q4 --kv-squat 0 --kv-outliers none -q)
echo "$out"
echo "$out" | awk -v hf="$hf" -v bands="$bands" -v klds="$klds" '
  /^\| (f16|q8|q4) / { gsub(/ /, ""); split($0, f, "|"); split(f[3], v, "\\+/-"); ppl[f[2]] = v[1]; kld[f[2]] = f[5] }
  function dev(a, b) { return a > b ? a / b - 1 : b / a - 1 }
  function check(ok, msg) { n++; if (!ok) { bad++; print "FAIL: " msg } else print "ok: " msg }
  END {
    nb = split(bands, b, " "); for (i = 1; i < nb; i += 2) band[b[i]] = b[i + 1];
    if (!("f16" in ppl) || !("q8" in ppl) || !("q4" in ppl)) { print "FAIL: no perplexity table"; exit 1 }
    check(dev(ppl["f16"], hf) <= band["f16"], sprintf("f16 %.4f within %.2f%% of transformers %.4f (%+.3f%%)", ppl["f16"],
          band["f16"] * 100, hf, (ppl["f16"] / hf - 1) * 100));
    for (t in band) if (t != "f16")
      check(dev(ppl[t], ppl["f16"]) <= band[t], sprintf("%s %.4f within %.2f%% of f16 %.4f (%+.3f%%)", t, ppl[t],
            band[t] * 100, ppl["f16"], (ppl[t] / ppl["f16"] - 1) * 100));
    nk = split(klds, k, " ");
    for (i = 1; i + 2 <= nk; i += 3)
      check(kld[k[i]] != "" && kld[k[i]] + 0 >= k[i + 1] && kld[k[i]] + 0 <= k[i + 2],
            sprintf("%s KLD %s in [%s, %s]", k[i], kld[k[i]], k[i + 1], k[i + 2]));
    printf "%d passed, %d failed\n", n - bad, bad;
    exit bad ? 1 : 0
  }'

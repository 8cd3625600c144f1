#!/usr/bin/env bash
# CI perplexity check: `kvq perplexity --compare f16,q8,q4,q2` on a 9 KB excerpt of the corpus, against
# tests/data/ppl_reference.txt. Fails on garbage: F16 must match transformers' fp32 perplexity of the same chunks
# (an independent implementation) within 0.3%, and the KV types must order as quantization says they should.
# usage: test_model_ppl.sh KVQ_BINARY MODEL EXCERPT REFERENCE      (exit 77: model absent, skipped)
set -euo pipefail
kvq=$1 model=$2 excerpt=$3 ref=$4
if [ ! -r "$model" ]; then echo "SKIP: model $model not present (scripts/fetch-model.sh)"; exit 77; fi
quick=${KVQ_TEST_QUICK:-0}
read -r _ ctx chunks hf chunks_q hf_q < <(grep '^hf ' "$ref")
if [ "$quick" != 0 ]; then chunks=$chunks_q; hf=$hf_q; fi
stored=$(grep "^kvq $ctx $chunks " "$ref" | cut -d' ' -f4-)
out=$("$kvq" perplexity -m "$model" -f "$excerpt" --ctx "$ctx" --chunks "$chunks" --compare f16,q8,q4,q2 -q)
echo "$out"
echo "reference: transformers fp32 PPL $hf; stored kvq: $stored"
# Table rows: | name | PPL +/- err | ... ; awk does the float checks and prints one line per check.
echo "$out" | awk -v hf="$hf" -v stored="$stored" '
  /^\| (f16|q8|q4|q2) / { gsub(/ /, ""); split($0, f, "|"); split(f[3], v, "\\+/-"); ppl[f[2]] = v[1] }
  function check(ok, msg) { n++; if (!ok) { bad++; print "FAIL: " msg } else print "ok: " msg }
  END {
    ns = split(stored, s, " ");
    for (i = 1; i < ns; i += 2) ref[s[i]] = s[i + 1];
    if (!("f16" in ppl) || !("q2" in ppl)) { print "FAIL: could not parse the table"; exit 1 }
    check(ppl["f16"] / hf - 1 < 0.003 && hf / ppl["f16"] - 1 < 0.003, sprintf("f16 %.4f vs transformers %.4f (0.3%%)", ppl["f16"], hf));
    check(ppl["q8"] / ppl["f16"] - 1 < 0.01 && ppl["f16"] / ppl["q8"] - 1 < 0.01, sprintf("q8 %.4f within 1%% of f16", ppl["q8"]));
    check(ppl["q4"] >= ppl["f16"] * 0.99 && ppl["q4"] <= ppl["f16"] * 1.08, sprintf("q4 %.4f in [f16 - 1%%, f16 + 8%%]", ppl["q4"]));
    check(ppl["q2"] > ppl["q4"] * 1.05 && ppl["q2"] < ppl["f16"] * 8, sprintf("q2 %.4f worse than q4 by > 5%%, < 8x f16", ppl["q2"]));
    for (k in ref) {
      tol = k == "q2" ? 0.05 : 0.02;
      check(ppl[k] / ref[k] - 1 < tol && ref[k] / ppl[k] - 1 < tol, sprintf("%s %.4f within %d%% of stored %.4f", k, ppl[k], tol * 100, ref[k]));
    }
    printf "%d passed, %d failed\n", n - bad, bad;
    exit bad ? 1 : 0
  }'

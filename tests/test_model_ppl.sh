#!/usr/bin/env bash
# Perplexity of every KV type with every kvq kernel table the CPU has, against independent references.
#
#   `kvq perplexity --ctx 512 --compare f16,q8,q4,q2` (kvq.h section 10's mechanisms off: the emulation has the
#   plain formats; tests/test_rotate.c, test_cache.c and test_attn.c check those mechanisms) on
#   tests/data/ppl_excerpt.txt, once per kernel table: KVQ_CPU_KERNELS=scalar, avx2, avx512, each run only where
#   `kvq version` says that table is the one in use (a CPU without it says SKIP). The table this CPU picks by itself
#   (what users run) scores 3 chunks against the 3-chunk references; the others the first chunk only, against the
#   1-chunk ones (their kernels are checked against the scalar ref one by one in tests/test_attn.c; here they need
#   only to run a whole model sanely: 5 chunks instead of 9). KVQ_TEST_QUICK=1 (the sanitizer tier): the CPU's own
#   table, first chunk only.
#
# References (tests/data/ppl_reference.txt, which explains each number):
#   hf   transformers' fp32 perplexity of the same chunks (tests/data/make_golden.py --ppl): F16 must match it.
#   ref  a numpy forward pass of the same GGUF whose KV cache emulates each kvq type from the page format of
#        include/kvq.h (tests/data/make_ppl_reference.py); its F16 matches hf within 0.01%.
#   band the relative tolerance of each type around ref, for this many chunks. A quantized type's perplexity is
#        discontinuous in K and V (a last-bit change flips a code), so correct engines that differ only in fp32
#        summation order (OpenBLAS kernels, kvq tables) spread around the reference; the bands are twice the largest
#        deviation measured over kvq tables x OpenBLAS core types (the runs listed there) and over the emulation perturbed at
#        fp32 rounding size; ppl_reference.txt shows the runs and which injected bug they catch (q2's, not q4's).
# Checks for each table: every type within its band of ref (symmetric in log: max(x/ref, ref/x) - 1 <= band), F16
# within 0.3% of hf, and the order quantization implies (q2 above q4 by more than q4's band).
# usage: test_model_ppl.sh KVQ_BINARY MODEL EXCERPT REFERENCE      (exit 77: model absent, skipped)
set -euo pipefail
kvq=$1 model=$2 excerpt=$3 ref=$4
if [ ! -r "$model" ]; then echo "SKIP: model $model not present (scripts/fetch-model.sh)"; exit 77; fi
quick=${KVQ_TEST_QUICK:-0}
read -r _ ctx chunks_full hf_full chunks_q hf_q < <(grep '^hf ' "$ref")
for n in "$chunks_full" "$chunks_q"; do
  if ! grep -q "^ref $ctx $n " "$ref" || ! grep -q "^band $ctx $n " "$ref"; then
    echo "FAIL: no 'ref $ctx $n' or 'band $ctx $n' line in $ref"; exit 1
  fi
done
# the kernel table kvq runs, as `kvq version` names it (KVQ_CPU_KERNELS in the environment asks for one)
table_in_use() { "$kvq" version | sed -n 's/.*CPU attention: \([a-z0-9]*\).*/\1/p'; }
own=$(unset KVQ_CPU_KERNELS; table_in_use)
if [ -z "$own" ]; then echo "FAIL: 'kvq version' names no CPU attention table"; exit 1; fi
echo "this CPU's own kernel table: '$own'"
fails=0 ran=0
for table in scalar avx2 avx512; do
  have=$(KVQ_CPU_KERNELS=$table table_in_use)
  if [ "$have" != "$table" ]; then echo "SKIP $table: this CPU runs '$have' when asked for it"; continue; fi
  if [ "$table" = "$own" ] && [ "$quick" = 0 ]; then chunks=$chunks_full hf=$hf_full
  elif [ "$table" = "$own" ] || [ "$quick" = 0 ]; then chunks=$chunks_q hf=$hf_q
  else echo "SKIP $table: KVQ_TEST_QUICK=1 runs the CPU's own table only"; continue; fi
  refs=$(grep "^ref $ctx $chunks " "$ref" | cut -d' ' -f4-)
  bands=$(grep "^band $ctx $chunks " "$ref" | cut -d' ' -f4-)
  echo "== kernel table $table, $chunks chunk(s): transformers F16 $hf; emulation $refs; bands $bands"
  ran=$((ran + 1))
  out=$(KVQ_CPU_KERNELS=$table OMP_WAIT_POLICY=PASSIVE "$kvq" perplexity -m "$model" -f "$excerpt" --ctx "$ctx" \
        --chunks "$chunks" --compare f16,q8,q4,q2 --kv-rotate none --kv-sinks 0 --kv-nuq none --kv-prerope 0 --kv-squat 0 --kv-qnorm none --kv-outliers none -q)
  echo "$out"
  # Table rows: | name | PPL +/- err | ... ; awk does the float checks and prints one line per check.
  if ! echo "$out" | awk -v hf="$hf" -v refs="$refs" -v bands="$bands" -v table="$table" '
    /^\| (f16|q8|q4|q2) / { gsub(/ /, ""); split($0, f, "|"); split(f[3], v, "\\+/-"); ppl[f[2]] = v[1] }
    function dev(a, b) { return a > b ? a / b - 1 : b / a - 1 }
    function check(ok, msg) { n++; if (!ok) { bad++; print "FAIL " table ": " msg } else print "ok " table ": " msg }
    END {
      nr = split(refs, r, " "); for (i = 1; i < nr; i += 2) ref[r[i]] = r[i + 1];
      nb = split(bands, b, " "); for (i = 1; i < nb; i += 2) band[b[i]] = b[i + 1];
      split("f16 q8 q4 q2", types, " ");
      for (i = 1; i <= 4; i++) {
        t = types[i];
        if (!(t in ppl) || !(t in ref) || !(t in band)) { check(0, "no perplexity, reference or band for " t); continue }
        check(dev(ppl[t], ref[t]) <= band[t], sprintf("%s %.4f within %.1f%% of the emulation %.4f (%+.2f%%)", t, ppl[t],
              band[t] * 100, ref[t], (ppl[t] / ref[t] - 1) * 100));
      }
      if ("f16" in ppl) check(dev(ppl["f16"], hf) <= 0.003, sprintf("f16 %.4f within 0.3%% of transformers %.4f", ppl["f16"], hf));
      if ("q2" in ppl && "q4" in ppl) check(ppl["q2"] > ppl["q4"] * (1 + band["q4"]), sprintf("q2 %.4f above q4 %.4f by more than %.1f%%", ppl["q2"], ppl["q4"], band["q4"] * 100));
      printf "%s: %d passed, %d failed\n", table, n - bad, bad;
      exit bad ? 1 : 0
    }'; then fails=$((fails + 1)); fi
done
if [ "$ran" = 0 ]; then echo "FAIL: no kernel table ran"; exit 1; fi
echo "$ran kernel tables, $fails failed"
[ "$fails" = 0 ]

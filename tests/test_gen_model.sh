#!/usr/bin/env bash
# kvq gen-model: a 2-layer SmolLM2-shaped GGUF per weight type loads in the CPU engine; kvq perplexity completes with a
# finite PPL in the band the generator's init implies, and kvq run decodes; the same seed gives the same bytes and
# another seed other bytes; bad options are refused by name.
# usage: test_gen_model.sh KVQ
set -uo pipefail
kvq=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
ok() { echo "ok: $*"; }
bad() { echo "FAIL: $*"; fail=1; }
# text of ~2k tokens: the vocabulary is synthetic, any bytes tokenize
for i in $(seq 60); do echo "The quick brown fox $i jumps over the lazy dog; pack my box with five dozen liquor jugs."; done >"$tmp/t.txt"
for w in f16 q8_0 q4_0; do
  m=$tmp/m-$w.gguf
  "$kvq" gen-model --shape smollm2-135m --layers 2 --wtype $w --seed 7 -o "$m" >"$tmp/gen.log" 2>&1 || { bad "gen $w"; cat "$tmp/gen.log"; continue; }
  # Logits are ~N(0, 2^2) over V = 49152 tokens (gen_model.c): PPL ~ V e^2 = 3.6e5 for text the model never saw. Zero
  # logits would give exactly V, a collapsed distribution far more; the band is (2V, 20V).
  out=$("$kvq" perplexity -m "$m" -f "$tmp/t.txt" -c 256 --chunks 2 -t 1 -q 2>&1)
  ppl=$(sed -n 's/^PPL = \([0-9.]*\) .*/\1/p' <<<"$out")
  if [ -n "$ppl" ] && awk -v p="$ppl" 'BEGIN { exit !(p > 2 * 49152 && p < 20 * 49152) }'; then ok "$w: PPL $ppl"
  else bad "$w: PPL '$ppl' not in (98304, 983040)"; echo "$out" | tail -5; fi
  out=$("$kvq" run -m "$m" -p "hello world" -n 12 --temp 0 -t 1 --kv-type q4 2>&1)
  if grep -q "decode: 11 tokens" <<<"$out"; then ok "$w: run decodes"; else bad "$w: run"; echo "$out" | tail -5; fi
done
"$kvq" gen-model --shape smollm2-135m --layers 2 --wtype q4_0 --seed 7 -o "$tmp/again.gguf" >/dev/null &&
  cmp -s "$tmp/again.gguf" "$tmp/m-q4_0.gguf" && ok "same seed, same bytes" || bad "same seed gives other bytes"
"$kvq" gen-model --shape smollm2-135m --layers 2 --wtype q4_0 --seed 8 -o "$tmp/other.gguf" >/dev/null &&
  ! cmp -s "$tmp/other.gguf" "$tmp/m-q4_0.gguf" && ok "other seed, other bytes" || bad "seed ignored"
# the 8B shape's metadata and sizes, without its 16 GB: one layer, q4_0 (vocab 128256, untied head, GQA 32/8 of 128)
"$kvq" gen-model --shape llama3-8b --layers 1 --wtype q4_0 -o "$tmp/l3.gguf" --ctx 32768 >"$tmp/gen.log" 2>&1 || bad "gen llama3-8b"
out=$("$kvq" capacity -m "$tmp/l3.gguf" --ctx 32768 2>&1)
grep -q "32768" <<<"$out" && ok "llama3-8b shape reads (capacity)" || { bad "llama3-8b capacity"; echo "$out" | tail; }
# expected size: 2 x 128256 x 4096 (embedding, head) + 4096^2 x 2 + 4096 x 1024 x 2 + 3 x 4096 x 14336 weights in q4_0
# (18 bytes per 32) + 3 norms of 4096 f32; the header (the vocabulary) is ~3 MB
sz=$(stat -c %s "$tmp/l3.gguf")
want=$(( (2 * 128256 * 4096 + 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) / 32 * 18 + 3 * 4096 * 4 ))
if [ "$sz" -gt "$want" ] && [ "$sz" -lt $((want + 8000000)) ]; then ok "llama3-8b 1-layer q4_0: $sz bytes (tensors $want)"
else bad "llama3-8b size $sz, tensors alone $want"; fi
for args in "--shape gpt5 -o $tmp/x" "--shape llama3-8b" "--shape llama3-8b -o $tmp/x --wtype q5_0" \
            "--shape llama3-8b -o $tmp/x --layers 0" "--shape llama3-8b -o /nonexistent/dir/x --layers 1"; do
  out=$("$kvq" gen-model $args 2>&1); rc=$?
  if [ $rc -ne 0 ] && [ $rc -lt 124 ] && grep -q "kvq gen-model:" <<<"$out"; then ok "refused: $args: $(head -1 <<<"$out")"
  else bad "not refused ($rc): $args"; fi
done
# Per-layer KV types (--kv-layers / :layers=) on the 2-layer model: every layer overridden to q8 is the q8 context (same
# caches: the same PPL to the last digit and bytes); one layer of q2 made f16 stores the mean of the two types' bytes
# per token (layers are summed) and changes the result; a range past the model's layers is refused by name.
m=$tmp/m-q8_0.gguf
if "$kvq" perplexity -m "$m" -f "$tmp/t.txt" -c 256 --chunks 2 -t 1 -q --csv "$tmp/lt.csv" \
     --compare f16,q8,f16:layers=0-1@q8,q2,q2:layers=1@f16 >"$tmp/lt.log" 2>&1; then
  if awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i; next }
      { p[$c["kv"]] = $c["ppl"]; b[$c["kv"]] = $c["bytes_per_token"] }
      END { e = ""
        if (p["q8"] == "" || p["q2:layers=1@f16"] == "" || b["q2"] == "") e = e " missing-rows"
        if (p["q8"] != p["f16:layers=0-1@q8"] || b["q8"] != b["f16:layers=0-1@q8"]) e = e " all-overridden"
        if ((b["q2:layers=1@f16"] - (b["q2"] + b["f16"]) / 2) ^ 2 > 1e-6) e = e " bytes"
        if (p["q2:layers=1@f16"] == p["q2"]) e = e " no-effect"
        if (e != "") { print e; exit 1 } }' "$tmp/lt.csv"; then ok "per-layer types: overrides apply, bytes per layer"
  else bad "per-layer types"; cat "$tmp/lt.csv"; fi
else bad "per-layer types run"; tail -5 "$tmp/lt.log"; fi
out=$("$kvq" perplexity -m "$m" -f "$tmp/t.txt" -c 128 --chunks 1 -t 1 --kv-layers 1-2@q8 2>&1) && bad "--kv-layers 1-2 on 2 layers accepted" ||
  { grep -q "layers 1-2 outside the model's 0-1" <<<"$out" && ok "--kv-layers past the last layer refused" || bad "--kv-layers 1-2: $out"; }
# the same layers' types and sensitivities (predicted_kld, a sum, may differ in its last digit: --load reads the
# sensitivities rounded to the 8 decimals they were written with)
same_plan() { cmp -s <(grep -v '^predicted_kld ' "$1") <(grep -v '^predicted_kld ' "$2"); }
# kvq calibrate on a 3-layer model: a sensitivity per (layer, candidate), the plan within the budget and runnable as it
# prints it; an f16 candidate costs no run (KLD 0); bad options refused by name
"$kvq" gen-model --shape smollm2-135m --layers 3 --wtype q8_0 --seed 7 -o "$tmp/m3.gguf" >/dev/null 2>&1 || bad "gen 3 layers"
if "$kvq" calibrate -m "$tmp/m3.gguf" -f "$tmp/t.txt" --budget 4 --bits-ctx 8192 --types q2,q4,f16 -c 256 --chunks 1 -t 1 \
     --csv "$tmp/cal.csv" -o "$tmp/plan.txt" >"$tmp/cal.log" 2>&1; then
  bits=$(sed -n 's/^plan: \([0-9.]*\) bits.*/\1/p' "$tmp/cal.log")
  if awk -F, 'NR > 1 { n++; if ($2 == "f16" && $3 != 0) e = e " f16-not-0"; if ($3 < 0) e = e " negative"; p += $5 }
      END { if (n != 9 || p != 3 || e != "") { print n, p, e; exit 1 } }' "$tmp/cal.csv" &&
     awk -v b="$bits" 'BEGIN { exit !(b > 0 && b <= 4) }' && [ "$(head -1 "$tmp/plan.txt")" = "kvq-plan 1" ] &&
     [ "$(grep -c '^layer [0-2] ' "$tmp/plan.txt")" = 3 ] && [ "$(grep -c '^sensitivity ' "$tmp/plan.txt")" = 9 ]; then
    opts=$(grep -A1 '^plan: ' "$tmp/cal.log" | tail -1)
    ok "calibrate: 9 sensitivities, plan $opts at $bits bits"
    # the plan file (--kv-plan, --compare plan=) is the same config as the options printed beside it: same PPL and bytes
    spec=$(sed -n 's/^--kv-type \([^ ]*\)\( --kv-layers \(.*\)\)\{0,1\}$/\1:layers=\3/p' <<<"$opts" | sed 's/:layers=$//')
    if "$kvq" perplexity -m "$tmp/m3.gguf" -f "$tmp/t.txt" -c 256 --chunks 1 -t 1 -q --compare "f16,$spec,plan=$tmp/plan.txt" \
         --csv "$tmp/plan.csv" >/dev/null 2>&1 &&
       awk -F, 'NR == 3 { p = $7; b = $13 } NR == 4 { exit !(p == $7 && b == $13 && p != "") }' "$tmp/plan.csv" &&
       "$kvq" perplexity -m "$tmp/m3.gguf" -f "$tmp/t.txt" -c 256 --chunks 1 -t 1 -q --kv-plan "$tmp/plan.txt" >/dev/null 2>&1; then
      ok "calibrate: the plan file runs (--kv-plan, plan=) as the printed options ($spec)"
    else bad "calibrate: the plan file: $(cat "$tmp/plan.csv" 2>&1)"; fi
    printf 'kvq-plan 1\nn_layers 2\nlayer 0 q4\nlayer 1 q2\n' >"$tmp/plan2l.txt"
    out=$("$kvq" perplexity -m "$tmp/m3.gguf" -f "$tmp/t.txt" -c 256 --chunks 1 -t 1 -q --kv-plan "$tmp/plan2l.txt" 2>&1) &&
      bad "a 2-layer plan on 3 layers accepted" ||
      { grep -q "the plan is for 2 layers, the model has 3" <<<"$out" && ok "a plan for other layers refused" || bad "2-layer plan: $out"; }
    "$kvq" calibrate -m "$tmp/m3.gguf" --load "$tmp/cal.csv" --budget 4 --bits-ctx 8192 --types q2,q4,f16 -o "$tmp/plan2.txt" \
      >/dev/null 2>&1 && same_plan "$tmp/plan.txt" "$tmp/plan2.txt" && ok "calibrate --load: the same plan from the CSV" ||
      bad "calibrate --load: $(cat "$tmp/plan2.txt" 2>&1)"
    "$kvq" calibrate -m "$tmp/m3.gguf" --load "$tmp/plan.txt" --budget 4 --bits-ctx 8192 --types q2,q4,f16 -o "$tmp/plan3.txt" \
      >/dev/null 2>&1 && same_plan "$tmp/plan.txt" "$tmp/plan3.txt" && ok "calibrate --load: the same plan from the -o plan" ||
      bad "calibrate --load PLAN: $(cat "$tmp/plan3.txt" 2>&1)"
  else bad "calibrate output"; cat "$tmp/cal.csv" "$tmp/cal.log" | tail -20; fi
else bad "calibrate run"; tail -5 "$tmp/cal.log"; fi
# --decode-attn: the sensitivities scored token by token; a prefill chunk of 256 quantizes its first 128 tokens before
# their queries read them, so the decode scoring's summed q2 KLD is the lower one
if "$kvq" calibrate -m "$tmp/m3.gguf" -f "$tmp/t.txt" --budget 4 --bits-ctx 8192 --types q2,q4,f16 -c 256 --chunks 1 -t 1 \
     --decode-attn --csv "$tmp/cal-d.csv" >/dev/null 2>&1 &&
   awk -F, 'FNR > 1 && $2 == "q2" { s[FILENAME == ARGV[1]] += $3 } END { exit !(s[1] > 0 && s[1] < s[0]) }' \
     "$tmp/cal-d.csv" "$tmp/cal.csv"; then
  ok "calibrate --decode-attn: summed q2 KLD $(awk -F, 'FNR > 1 && $2 == "q2" { s += $3 } END { print s }' "$tmp/cal-d.csv") < $(awk -F, 'FNR > 1 && $2 == "q2" { s += $3 } END { print s }' "$tmp/cal.csv") (prefill)"
else bad "calibrate --decode-attn: $(cat "$tmp/cal-d.csv" 2>&1 | tail -4)"; fi
for args in "--budget 4" "-f $tmp/t.txt" "-f $tmp/t.txt --budget 4 --types q2" "-f $tmp/t.txt --budget 4 --types q2,q4:r0" \
            "-f $tmp/t.txt --budget 4 --types q2,q2" "-f $tmp/t.txt --budget 0.1" "-f $tmp/t.txt --budget 1 --bits-ctx 8192 -c 256"; do
  out=$("$kvq" calibrate -m "$tmp/m3.gguf" $args 2>&1); rc=$?
  if [ $rc -ne 0 ] && [ $rc -lt 124 ] && grep -q "kvq calibrate:" <<<"$out"; then ok "calibrate refused: $args: $(tail -1 <<<"$out" | cut -c1-90)"
  else bad "calibrate not refused ($rc): $args"; fi
done
# kvq bench on the CPU engine: one row per (type, depth), f16 the base of the ratios (listed second here), the bound
# column equal to (W + d K_f16) / (W + d K_t) from the row's own columns, positive speeds
m=$tmp/m-q8_0.gguf
if "$kvq" bench -m "$m" --types q4,f16 --depths 128,0 -n 3 --prefill 64 -b 64 -t 1 --out "$tmp/bench" >"$tmp/bench.log" 2>&1; then
  csv=$tmp/bench/bench-e2e-cpu.csv
  if awk -F, 'NR == 1 { next } { n++
        if ($7 <= 0 || $12 <= 0) bad = bad " speed"
        want = ($13 + $6 * $15) / ($13 + $6 * $14); if ((want - $10) ^ 2 > 1e-6) bad = bad " bound"
        if ($3 == "f16" && ($9 != "1.0000" || $10 != "1.0000")) bad = bad " base"
        if ($3 == "q4" && $6 == 128 && !($10 > 1.0)) bad = bad " q4-bound" }
      END { if (n != 4 || bad != "") { print "rows " n ":" bad; exit 1 } }' "$csv"; then ok "bench: 4 rows, ratios and bounds consistent"
  else bad "bench CSV"; cat "$csv"; fi
  grep -q "| q4 | 128 |" "$tmp/bench/bench-e2e-cpu.md" && ok "bench: markdown table" || bad "bench markdown"
else bad "bench run"; tail -5 "$tmp/bench.log"; fi
out=$("$kvq" bench -m "$m" --batch 2 2>&1) && bad "bench --batch 2 on the CPU accepted" || { grep -q "the GPU engine" <<<"$out" && ok "bench --batch 2 on the CPU refused" || bad "bench --batch 2: $out"; }
for cmd in "run -p hi -n 2 --gpu" "perplexity -f $tmp/t.txt -c 128 --chunks 1 -ngl 99"; do
  out=$("$kvq" ${cmd%% *} -m "$m" ${cmd#* } 2>&1)
  if [ $? -ne 0 ]; then grep -Eq "built without CUDA|no usable GPU" <<<"$out" && ok "${cmd%% *} on the GPU without one: refused by name" || bad "$cmd: $out"
  else ok "$cmd ran (a GPU is there)"; fi
done
out=$("$kvq" run -m "$m" -p hi -n 2 -ngl x 2>&1) && bad "-ngl x accepted" || { grep -q -- "-ngl: 'x' is not an integer" <<<"$out" && ok "-ngl x refused" || bad "-ngl x: $out"; }
out=$("$kvq" bench -m "$m" --gpu --depths 0 -n 1 --prefill 8 2>&1)
if [ $? -ne 0 ]; then grep -Eq "built without CUDA|no usable GPU" <<<"$out" && ok "bench --gpu without a GPU: $(tail -1 <<<"$out")" || bad "bench --gpu: $out"
else ok "bench --gpu ran (a GPU is there)"; fi
exit $fail

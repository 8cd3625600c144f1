#!/usr/bin/env bash
# End-to-end tests of the kvq command: every bad input gives rc != 0 (and not a signal or a timeout), a message naming
# the problem and no sanitizer report; llama.cpp's spellings work; the help states the library's defaults.
#   test_cli.sh parse KVQ TEST_CLI_PARSE MODEL SRCDIR   no model needed (files are read before the model is loaded)
#   test_cli.sh model KVQ TEST_CLI_PARSE MODEL SRCDIR   needs the model; exit 77 (skipped) without it
# KVQ_CLI_SANITIZED=1 (ASan build) skips the `ulimit -v` case, which ASan's shadow memory cannot run under.
set -uo pipefail
part=$1 kvq=$2 helper=$3 model=$4 src=$5
tmp=$(mktemp -d)
trap 'chmod -R u+rwx "$tmp"; rm -rf "$tmp"' EXIT
pass=0 fail=0
sanitizer_re='AddressSanitizer|LeakSanitizer|runtime error:|UndefinedBehaviorSanitizer'

# expect RC_KIND NAME WANT -- CMD...: RC_KIND is "fail" (rc 1..127 but not 124) or "ok" (rc 0); WANT an ERE that the
# combined output must match.
expect() {
  local kind=$1 name=$2 want=$3
  shift 4
  local out rc
  out=$(timeout 300 "$@" 2>&1 </dev/null)
  rc=$?
  local why=""
  if [ "$kind" = fail ]; then
    if [ $rc -eq 0 ]; then why="rc 0"; elif [ $rc -ge 124 ]; then why="rc $rc (timeout or signal)"; fi
  elif [ $rc -ne 0 ]; then why="rc $rc"; fi
  if [ -z "$why" ] && ! grep -Eq -- "$want" <<<"$out"; then why="no match for /$want/"; fi
  if [ -z "$why" ] && grep -Eq "$sanitizer_re" <<<"$out"; then why="sanitizer report"; fi
  if [ -z "$why" ]; then
    pass=$((pass + 1)); echo "ok: $name"
  else
    fail=$((fail + 1)); echo "FAIL: $name: $why"; echo "  \$ $*"; tail -n 15 <<<"$out" | sed 's/^/  | /'
  fi
}

if [ "$part" = parse ]; then
  M=/nonexistent/model.gguf
  expect fail "no command" "usage: kvq" -- "$kvq"
  expect fail "unknown command" "unknown command 'runn'" -- "$kvq" runn
  expect fail "unknown option" "unknown option '--bogus'" -- "$kvq" run -m $M -p x --bogus
  expect fail "option of another subcommand (capacity --kv-type)" "'--kv-type' is not used by 'kvq capacity'" -- \
    "$kvq" capacity -m $M --mem 1G --kv-type q4
  expect fail "option of another subcommand (run -q)" "'-q' is not used by 'kvq run'" -- "$kvq" run -m $M -p x -q
  expect fail "option of another subcommand (tokenize --compare)" "not used by 'kvq tokenize'" -- \
    "$kvq" tokenize -m $M -p x --compare f16
  expect fail "missing value" "option '-p' needs a value" -- "$kvq" run -m $M -p
  expect fail "missing value (--mem)" "option '--mem' needs a value" -- "$kvq" capacity -m $M --mem
  expect fail "bad number -n abc" "-n: 'abc' is not an integer" -- "$kvq" run -m $M -p x -n abc
  expect fail "bad number -t 0" "-t: '0' is not an integer in 1..1024" -- "$kvq" run -m $M -p x -t 0
  expect fail "bad number -c 1e3" "-c: '1e3'" -- "$kvq" run -m $M -p x -c 1e3
  expect fail "bad number --temp nan" "--temp: 'nan'" -- "$kvq" run -m $M -p x --temp nan
  expect fail "--seed abc" "--seed: 'abc' is not an integer" -- "$kvq" run -m $M -p x --seed abc
  expect fail "--seed -1" "--seed: '-1' is not an integer" -- "$kvq" run -m $M -p x --seed -1
  expect fail "--seed overflow" "--seed: '18446744073709551616'" -- "$kvq" run -m $M -p x --seed 18446744073709551616
  expect fail "--mem inf" "--mem: 'inf' is not a size" -- "$kvq" capacity -m $M --mem inf
  expect fail "--mem 1e30" "--mem: '1e30'" -- "$kvq" capacity -m $M --mem 1e30
  expect fail "--compare ''" "--compare: the list is empty" -- "$kvq" run -m $M -p x --compare ''
  expect fail "--compare '' (perplexity)" "--compare: the list is empty" -- "$kvq" perplexity -m $M -f x --compare ''
  expect fail "--compare with 17 entries" "--compare: 17 entries, at most 16" -- "$kvq" perplexity -m $M -f x \
    --compare f16,f16,f16,f16,f16,f16,f16,f16,f16,f16,f16,f16,f16,f16,f16,f16,q4
  expect fail "--compare suffix given twice" "entry 'q4:rot=kv:rot=k' gives :rot= more than once" -- \
    "$kvq" perplexity -m $M -f x --compare f16,q4:rot=kv:rot=k
  expect fail "--kv-rotate bad value" "--kv-rotate: 'all' is not one of none, k, v, kv, default" -- \
    "$kvq" run -m $M -p x --kv-rotate all
  expect fail "--kv-sinks out of range" "--kv-sinks: '2000' is not 0..1024 or default" -- \
    "$kvq" capacity -m $M --mem 1G --kv-sinks 2000
  expect fail "section 10 options parse" "kvq perplexity: loading the model" -- "$kvq" perplexity -m $M -f /dev/null \
    --kv-rotate kv --kv-sinks 4 --kv-nuq k --rotation-seed 9 --compare f16,q4:rot=none:sinks=0:nuq=v:seed=3:r64:g32
  expect fail "SQuat options parse" "kvq perplexity: loading the model" -- "$kvq" perplexity -m $M -f /dev/null \
    --kv-squat 4 --kv-squat-lambda 0.5 --compare f16,q4:squat=0,q3:squat=8:lambda=auto,q2:lambda=0.05
  expect fail "--kv-squat out of range" "--kv-squat: '33' is not 0..32 or default" -- "$kvq" run -m $M -p x --kv-squat 33
  expect fail "--compare :squat= out of range" "SQuat rank .:squat=.: '40' is not an integer in 0..32" -- "$kvq" perplexity -m $M -f x --compare q4:squat=40
  expect fail "--kv-squat-lambda not a number" "--kv-squat-lambda" -- "$kvq" run -m $M -p x --kv-squat-lambda -1
  expect fail "passkey --lengths listed twice" "--lengths: 512 is listed twice" -- "$kvq" passkey -m $M --lengths 512,512
  expect fail "passkey --depths past 100" "--depths: '150' is not an integer in 0..100" -- "$kvq" passkey -m $M --depths 150
  expect fail "passkey options parse" "kvq passkey: loading the model" -- "$kvq" passkey -m $M --lengths 256,512 \
    --depths 0,50,100 --trials 2 --compare f16,q4:r64 --kv-sinks 0 --chat -n 6 --csv "$tmp/pk.csv"
  expect fail "llama.cpp type without an equivalent" "'q4_0' has no kvq equivalent" -- "$kvq" run -m $M -p x -ctk q4_0
  expect fail "-p and -f" "exactly one of -p TEXT or -f FILE" -- "$kvq" run -m $M -p x -f y
  # Files are read before the model is loaded: these need no model.
  expect fail "nonexistent file" "cannot open '$tmp/none.txt': No such file" -- "$kvq" run -m $M -f "$tmp/none.txt"
  expect fail "directory as file" "'$tmp' is a directory" -- "$kvq" perplexity -m $M -f "$tmp"
  echo secret > "$tmp/unreadable.txt"; chmod 000 "$tmp/unreadable.txt"
  if [ "$(id -u)" != 0 ]; then
    expect fail "unreadable file" "cannot open '$tmp/unreadable.txt': Permission denied" -- \
      "$kvq" tokenize -m $M -f "$tmp/unreadable.txt"
  else
    echo "skip: unreadable file (running as root)"
  fi
  head -c 2048 /dev/zero | tr '\0' a > "$tmp/big.txt"
  expect fail "oversized file" "'$tmp/big.txt' is 2048 bytes, more than the limit of 1024" -- \
    "$kvq" run -m $M -f "$tmp/big.txt" --max-file-size 1KiB
  expect fail "/dev/urandom with --max-file-size" "'/dev/urandom' is longer than the limit of 1048576" -- \
    "$kvq" run -m $M -f /dev/urandom --max-file-size 1MiB
  expect fail "/dev/urandom with the default limit" "'/dev/urandom' is longer than the limit of 67108864" -- \
    "$kvq" tokenize -m $M -f /dev/urandom
  expect fail "a pipe on stdin (-f -) over the limit" "'-' is longer than the limit of 1000 bytes" -- \
    bash -c "head -c 5000 /dev/zero | \"\$0\" tokenize -m $M -f - --max-file-size 1000" "$kvq"
  expect fail "missing model" "loading the model: .*'/nonexistent/model.gguf'" -- "$kvq" capacity -m $M --mem 1G
  # Every llama.cpp spelling is accepted: parsing succeeds and the run stops at the missing model.
  expect fail "llama.cpp spellings parse" "kvq run: loading the model" -- "$kvq" run -m $M -p x -c 64 -ctk q8_0 \
    -ctv q4_1 --cache-type-k f16 --cache-type-v bf16 -b 16 --batch-size 16 -s 5 --seed 5 -t 1 --top-k 5 \
    --min-p 0.05 --repeat-penalty 1.1 --repeat-last-n 16 --ctx-size 64 -n 3
  # Help: every subcommand's help exits 0, and the defaults it states are the library's.
  read -r rq4 rf16 g < <("$helper" --print-lib-defaults)
  for c in run perplexity capacity passkey; do
    expect ok "$c --help states libkvq's residual ($rq4/$rf16) and group ($g)" \
      "^ +$rq4 for q4/q3/q2, $rf16 for the per-token types\)" -- "$kvq" $c --help
    expect ok "$c --help group default" "group size: 16, 32, 64 or 128 \(default: libkvq's, $g\)" -- "$kvq" $c --help
  done
  expect ok "tokenize --help" "usage: kvq tokenize" -- "$kvq" tokenize --help
  expect ok "run --help lists the aliases" "-ctk T, --cache-type-k T" -- "$kvq" run --help
else
  if [ ! -r "$model" ]; then echo "SKIP: model $model not present (scripts/fetch-model.sh)"; exit 77; fi
  M=$model
  expect fail "huge --ctx fails cleanly" "memory" -- "$kvq" run -m $M -p "Hello" -c 4194304
  expect fail "engine names a bad group" "group 48 is not one of 16, 32, 64, 128" -- \
    "$kvq" run -m $M -p "Hello" --kv-type q4 --group 48 -n 1
  out=$("$kvq" run -m $M -p "Hello" --kv-type q4 --group 48 -n 1 2>&1)
  if grep -q "unsupported KV type" <<<"$out"; then fail=$((fail + 1)); echo "FAIL: group 48 reported as unsupported KV type"; else pass=$((pass + 1)); echo "ok: not 'unsupported KV type'"; fi
  expect fail "early exit (prompt longer than -c) leaks nothing" "does not fit -c/--ctx-size 2" -- \
    "$kvq" run -m $M -p "Hello world, how are you today?" -c 2
  expect fail "early exit (empty prompt) leaks nothing" "the prompt is empty" -- "$kvq" run -m $M -p ""
  expect ok "llama.cpp spellings run" "KV cache q8 keys / q4 values" -- "$kvq" run -m $M -p "The capital of France is" \
    -n 3 -c 64 -ctk q8_0 -ctv q4_1 -b 4 -s 5 -t 1 --temp 0.8 --top-k 5 --min-p 0.05 --repeat-penalty 1.1 --repeat-last-n 16
  printf 'The capital of France is' > "$tmp/prompt.txt"
  a=$("$kvq" run -m $M -p "The capital of France is" -n 6 --temp 0 2>/dev/null)
  b=$("$kvq" run -m $M -f "$tmp/prompt.txt" -n 6 --temp 0 2>/dev/null)
  if [ -n "$a" ] && [ "$a" = "$b" ]; then pass=$((pass + 1)); echo "ok: -f FILE gives the same answer as -p"; else fail=$((fail + 1)); echo "FAIL: -f vs -p: '$a' vs '$b'"; fi
  a=$("$kvq" run -m $M -p "Once upon a time" -n 8 --temp 1 --top-k 20 --min-p 0.02 --repeat-penalty 1.3 -s 11 2>/dev/null)
  b=$("$kvq" run -m $M -p "Once upon a time" -n 8 --temp 1 --top-k 20 --min-p 0.02 --repeat-penalty 1.3 -s 11 2>/dev/null)
  if [ -n "$a" ] && [ "$a" = "$b" ]; then pass=$((pass + 1)); echo "ok: sampling with a seed repeats"; else fail=$((fail + 1)); echo "FAIL: same seed, different text"; fi
  expect ok "run --compare f16,q4" "\| q4 +\| +[0-9]+ \|.*\| (identical|same first [0-9]+ tok) " -- \
    "$kvq" run -m $M -p "The capital of France is" -n 4 --temp 0 --compare f16,q4
  # kvq.h section 10: what the library does not implement yet it rejects with its own message, which the command
  # reports (rc 1, no crash); once implemented, the same commands must run.
  for args in "--kv-rotate kv" "--kv-sinks 4" "--kv-nuq k" "--compare f16,q4:rot=kv:sinks=4:nuq=kv:seed=7"; do
    out=$(timeout 300 "$kvq" perplexity -m $M -f "$src/tests/data/ppl_excerpt.txt" -c 128 --chunks 1 -q $args 2>&1); rc=$?
    if [ $rc -eq 0 ] && grep -Eq "^PPL = |\| q4:rot=kv" <<<"$out"; then
      pass=$((pass + 1)); echo "ok: perplexity $args runs"
    elif [ $rc -eq 1 ] && grep -Eq "creating the context.*: invalid argument: .*(rotate|sinks|nonuniform) [0-9]+: .* not implemented" <<<"$out"; then
      pass=$((pass + 1)); echo "ok: perplexity $args: the library's reason is reported"
    else
      fail=$((fail + 1)); echo "FAIL: perplexity $args: rc $rc"; tail -n 5 <<<"$out" | sed 's/^/  | /'
    fi
  done
  out=$(timeout 300 "$kvq" capacity -m $M --ctx 1000 --kv-sinks 4 2>&1); rc=$?
  if { [ $rc -eq 0 ] && grep -Eq "^\| q4 +\| +[0-9.]+ [KM]iB" <<<"$out"; } ||
     { [ $rc -eq 1 ] && grep -Eq "^\| q4 +\| rejected: invalid argument: sinks 4: .*not implemented" <<<"$out"; }; then
    pass=$((pass + 1)); echo "ok: capacity --kv-sinks 4 (rc $rc)"
  else
    fail=$((fail + 1)); echo "FAIL: capacity --kv-sinks 4: rc $rc"; tail -n 5 <<<"$out" | sed 's/^/  | /'
  fi
  # KL divergence against F16 (batch-major: the base's logits are exact fp32): an f16 entry listed twice is exactly
  # 0 KLD and 100% top-1; q2 diverges more than q4 and q4 more than nothing; the CSV has the agreed columns. q2's
  # top-1 bound was < 90 while its keys were post-RoPE (measured 87.5%, KLD 0.0499); the engine's pre-RoPE q2 keys
  # (kvq.h section 10) measure 92.6% (KLD 0.0297, still 15x q4's): < 95, where q4 is 98.4%.
  expect ok "perplexity --compare without f16 runs it first" "no f16 entry: running f16 first" -- \
    "$kvq" perplexity -m $M -f "$src/tests/data/ppl_excerpt.txt" -c 128 --chunks 1 -q --compare q8
  # Under the sanitizers (this script took 229 s there against 45 s in a release build) one chunk: the same code
  # paths; the figures' checks need two (at one chunk q2's KLD measured 11.8x q4's, too close to the 10x bound) and
  # run in the release tier.
  if [ "${KVQ_CLI_SANITIZED:-0}" = 1 ]; then ch=1 figs=0; else ch=2 figs=1; fi
  out=$(timeout 600 "$kvq" perplexity -m $M -f "$src/tests/data/ppl_excerpt.txt" -c 256 --chunks $ch -q \
    --compare f16,q4,q2,f16 --csv "$tmp/ppl.csv" 2>&1); rc=$?
  hdr="kv,type_k,type_v,ctx,chunks,tokens,ppl,ppl_se,dppl_pct,kld_mean,kld_p99,top1_pct,bytes_per_token,f16_bytes_per_token,bits_per_element,batch,decode_attn,prefill_exact"
  if [ $rc -eq 0 ] && [ "$(head -1 "$tmp/ppl.csv")" = "$hdr" ] && [ "$(wc -l < "$tmp/ppl.csv")" -eq 5 ] &&
     awk -F, -v ch=$ch -v figs=$figs '
       NR == 2 || NR == 5 { if ($1 != "f16" || $9 != 0 || $10 != 0 || $11 != 0 || $12 != 100 || $15 != 16) bad = 1 }
       NR == 3 { q4 = $10; if (!($10 > 1e-4) || !($11 >= $10) || !($12 < 100 && $12 > 80) || !($15 > 4 && $15 < 16)) bad = 1 }
       NR == 4 && figs { if (!($10 > 10 * q4) || !($12 < 95)) bad = 1 }
       NR == 4 && !figs { if (!($10 > q4)) bad = 1 }
       NR > 1 { if ($4 != 256 || $5 != ch || $6 != 128 * ch || ($13 * 8 / (2 * 30 * 3 * 64) - $15) ^ 2 > 1e-8 ||
                    $16 != 256 || $17 != 0) bad = 1 }
       END { exit bad }' "$tmp/ppl.csv"; then
    pass=$((pass + 1)); echo "ok: perplexity KLD columns and --csv"
  else
    fail=$((fail + 1)); echo "FAIL: perplexity KLD / --csv: rc $rc"; tail -n 8 <<<"$out" | sed 's/^/  | /'; cat "$tmp/ppl.csv" 2>/dev/null | sed 's/^/  csv| /'
  fi
  # --decode-attn: queries attend token by token, so the figures no longer depend on -b (q4: no SQuat, whose subspace
  # comes from the first batch); a prefill batch of 256 flushes its early tokens before its queries read them, which
  # decode never does: q4's KLD at -b 256 measured 0.00189 as a prefill, 0.00035 token by token (5.4x; bound 2x; one
  # chunk, the sanitizer tier's: 0.00125 and 0.00024, 5.1x).
  for b in 256 48; do
    timeout 600 "$kvq" perplexity -m $M -f "$src/tests/data/ppl_excerpt.txt" -c 256 --chunks $ch -q -b $b --decode-attn \
      --compare f16,q4 --csv "$tmp/ppl-d$b.csv" >/dev/null 2>&1 || echo "rc $?" > "$tmp/ppl-d$b.csv"
  done
  if awk -F, 'FNR == 3 { k[FILENAME == ARGV[1]] = $10; b[FILENAME == ARGV[1]] = $16; d[FILENAME == ARGV[1]] = $17 }
       END { r = k[1] / k[0]; exit !(r > 0.99999 && r < 1.00001 && b[1] == 256 && b[0] == 48 && d[0] == 1 && d[1] == 1) }' \
       "$tmp/ppl-d256.csv" "$tmp/ppl-d48.csv" &&
     awk -F, 'FNR == 3 { k[FILENAME == ARGV[1]] = $10 } END { exit !(k[0] > 2 * k[1]) }' "$tmp/ppl-d256.csv" "$tmp/ppl.csv"; then
    pass=$((pass + 1)); echo "ok: perplexity --decode-attn does not depend on -b, and is below the prefill's KLD"
  else
    fail=$((fail + 1)); echo "FAIL: perplexity --decode-attn"; cat "$tmp/ppl-d256.csv" "$tmp/ppl-d48.csv" | sed 's/^/  csv| /'
  fi
  expect ok "perplexity table has the KLD columns" "\| q4 +\| +[0-9.]+ \+/- [0-9.]+ +\| +[-+][0-9.]+% \| +0\.[0-9]+ \| +[0-9.]+ \| +[0-9.]+% \|" -- \
    "$kvq" perplexity -m $M -f "$src/tests/data/ppl_excerpt.txt" -c 128 --chunks 1 -q --compare f16,q4
  expect fail "--csv into a missing directory" "--csv: cannot write '$tmp/none/x.csv'" -- \
    "$kvq" perplexity -m $M -f "$src/tests/data/ppl_excerpt.txt" -c 128 --chunks 1 -q --csv "$tmp/none/x.csv"
  # passkey: F16 finds the key at every depth of short prompts (SmolLM2-135M-Instruct, plain prompts: measured 12/12
  # at 256 and 512 tokens, depths 0/50/100, 2 trials); the CSV has a row per cell; a too short length is refused.
  # The sanitizer tier: 256 tokens only.
  if [ $figs = 1 ]; then lens=256,512 cells=6; else lens=256 cells=3; fi
  out=$(timeout 600 "$kvq" passkey -m $M --lengths $lens --depths 0,50,100 --trials 1 -q --csv "$tmp/pk.csv" 2>&1); rc=$?
  if [ $rc -eq 0 ] && grep -q "^KV f16: passed/trials .*; $cells/$cells in all" <<<"$out" &&
     [ "$(head -1 "$tmp/pk.csv")" = "kv,length,depth_pct,trials,passed" ] &&
     [ "$(grep -c '^f16,\(256\|512\),\(0\|50\|100\),1,1$' "$tmp/pk.csv")" -eq $cells ]; then
    pass=$((pass + 1)); echo "ok: passkey f16 grid $cells/$cells and --csv"
  else
    fail=$((fail + 1)); echo "FAIL: passkey f16 grid: rc $rc"; tail -n 12 <<<"$out" | sed 's/^/  | /'; sed 's/^/  csv| /' "$tmp/pk.csv" 2>/dev/null
  fi
  expect fail "passkey: a length with no room for the task" "--lengths 64: the task, key and question alone take more than 56 tokens" -- \
    "$kvq" passkey -m $M --lengths 64 -q
  expect fail "passkey: a length past the model's context" "--lengths 16384 exceeds the model's context_length 8192" -- \
    "$kvq" passkey -m $M --lengths 16384 -q
  expect ok "passkey without f16 in --compare runs it first, with the note" "note: a cell that f16 fails" -- \
    "$kvq" passkey -m $M --lengths 128 --depths 50 -q --compare q8
  expect ok "capacity --mem 1GiB" "\| q4 +\| +6480 \| +[0-9]+" -- "$kvq" capacity -m $M --mem 1GiB
  expect ok "capacity lists q3 between q4 and q2" "\| q3 +\| +5040 \| +[0-9]+" -- "$kvq" capacity -m $M --mem 1GiB
  expect fail "capacity: too small a budget" "--mem 100.00 MiB is too small.*cheapest config listed \(q8\)" -- \
    "$kvq" capacity -m $M --mem 100MiB --compare q8,q4
  # the ratio is to an f16 cache with the same options even when f16 is not listed; the name column widens
  expect ok "capacity --compare: its entries only, vs f16" "\| q3:sinks=4 +\| +[0-9.]+ MiB .*\| +0\.2[0-9]+x \|" -- \
    "$kvq" capacity -m $M --ctx 32768 --compare q3:sinks=4,q8/q4
  expect fail "capacity --compare: a bad entry" "unknown KV type 'q5'" -- "$kvq" capacity -m $M --ctx 1024 --compare q4,q5
  expect ok "capacity --ctx past the trained context warns" "past the model's trained context \(8192\)" -- \
    "$kvq" capacity -m $M --ctx 16384 --parallel 2
  expect ok "tokenize -f" "^tokens [0-9]+ fnv1a" -- "$kvq" tokenize -m $M -f "$tmp/prompt.txt"
  if [ "${KVQ_CLI_SANITIZED:-0}" != 1 ]; then
    # Before the fix: OpenBLAS started as many of 1024 threads as the address space allowed, the model's mmap then
    # failed, and exit() hung joining threads that were never created.
    out=$(timeout 120 bash -c "ulimit -v 1000000; exec \"\$@\"" _ "$kvq" run -m $M -p "Hi" -n 2 -t 1024 2>&1); rc=$?
    if [ $rc -ne 124 ] && [ $rc -lt 128 ]; then pass=$((pass + 1)); echo "ok: -t 1024 under ulimit -v ends (rc $rc)"; else fail=$((fail + 1)); echo "FAIL: -t 1024 under ulimit -v: rc $rc"; tail -5 <<<"$out"; fi
  fi
fi
echo "$pass passed, $fail failed"
[ $fail -eq 0 ]

#!/usr/bin/env bash
# End-to-end CPU speed of kvq beside llama.cpp (issue 22): `kvq bench` (this tree's build) and llama.cpp's
# llama-bench (built for this host's CPU by bench/peers/llamacpp-build.sh bench) on the same GGUF, same threads, runs
# interleaved: per model, per KV type, kvq then llama.cpp (ROUNDS times), so that a drift of the machine (another
# job, clocks) hits both engines alike. KV types paired as f16 = f16, q8 = q8_0, q4 = q4_0 (keys and values alike).
#   bench/peers/e2e-cpu.sh OUT_DIR [MODEL...]       (default: models/SmolLM2-135M-Instruct.Q4_1.gguf and
#                                                    models/gemma-3-270m-q4_k_m.gguf)
# Writes per model OUT_DIR/NAME/bench-e2e-cpu.csv (kvq bench's rows, with a round column),
# OUT_DIR/NAME/llamacpp-bench-cpu.csv (llama-bench's CSV rows, with a round column), the logs, and OUT_DIR/machine.txt;
# then bench/peers/e2e_cpu_table.py OUT_DIR writes OUT_DIR/bench-e2e-cpu.md (+ .png with matplotlib).
# Both engines: decode of N tokens at each depth after a fill of the depth by real forward passes (kvq: median step
# time of N after 2 untimed; llama-bench: mean tokens/s of tg N over REPS repetitions, each after its own fill), and
# prefill of PREFILL tokens in one batch of PREFILL from an empty cache (kvq: one timing; llama-bench: pp PREFILL,
# mean of REPS repetitions).
# Env: DEPTHS (0,2048,8192), N (32), PREFILL (512), REPS (2), THREADS (2), ROUNDS (1), TYPES (f16,q8,q4),
#      KVQ (build/bin/kvq), LLAMA_BENCH (default: built by llamacpp-build.sh bench).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: e2e-cpu.sh OUT_DIR [MODEL...]}
shift
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(models/SmolLM2-135M-Instruct.Q4_1.gguf models/gemma-3-270m-q4_k_m.gguf)
depths=${DEPTHS:-0,2048,8192} n=${N:-32} prefill=${PREFILL:-512} reps=${REPS:-2} th=${THREADS:-2} rounds=${ROUNDS:-1}
kvq=${KVQ:-build/bin/kvq}
[ -x "$kvq" ] || { echo "e2e-cpu.sh: $kvq is missing (build kvq first)" >&2; exit 1; }
lb=${LLAMA_BENCH:-$(bash bench/peers/llamacpp-build.sh bench | tail -n 1)}
declare -A peer=([f16]=f16 [q8]=q8_0 [q4]=q4_0)
mkdir -p "$out"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) online CPUs; flags: $(grep -o 'avx512f\|avx2\|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  echo "kvq: $(git rev-parse --short HEAD) ($kvq); llama-bench: $lb"
  echo "env: DEPTHS=$depths N=$n PREFILL=$prefill REPS=$reps THREADS=$th ROUNDS=$rounds"
} >"$out/machine.txt"
cat "$out/machine.txt" >&2
IFS=, read -ra types <<<"${TYPES:-f16,q8,q4}"
for model in "${models[@]}"; do
  name=$(basename "$model" .gguf)
  d=$out/$name
  mkdir -p "$d"
  kcsv=$d/bench-e2e-cpu.csv lcsv=$d/llamacpp-bench-cpu.csv
  rm -f "$kcsv" "$lcsv"
  for r in $(seq 1 "$rounds"); do
    for t in "${types[@]}"; do
      p=${peer[$t]:?"e2e-cpu.sh: no llama.cpp peer for KV type $t"}
      echo "== $name round $r: kvq $t" >&2
      t0=$(date +%s)
      "$kvq" bench -m "$model" --types "$t" --depths "$depths" -n "$n" --prefill "$prefill" -b "$prefill" -t "$th" \
        --out "$d/kvq-$t-r$r" >"$d/kvq-$t-r$r.log" 2>&1 || { tail -20 "$d/kvq-$t-r$r.log" >&2; exit 1; }
      echo "   $(($(date +%s) - t0)) s" >&2
      [ -f "$kcsv" ] || echo "round,$(head -n 1 "$d/kvq-$t-r$r/bench-e2e-cpu.csv")" >"$kcsv"
      tail -n +2 "$d/kvq-$t-r$r/bench-e2e-cpu.csv" | sed "s/^/$r,/" >>"$kcsv"
      echo "== $name round $r: llama.cpp $p" >&2
      t0=$(date +%s)
      # one type per call (-ctk/-ctv lists would run every (K, V) pair); decode at the depths and prefill at depth 0
      # in two calls: one -p -n -d call would also time pp at every depth, each repetition after a fill of its own
      for job in "pp:-p $prefill -n 0 -d 0" "tg:-p 0 -n $n -d $depths"; do
        f=$d/llamacpp-$p-${job%%:*}-r$r
        # shellcheck disable=SC2086
        "$lb" -m "$model" -t "$th" -fa 1 -ctk "$p" -ctv "$p" ${job#*:} -r "$reps" -o csv >"$f.csv" 2>"$f.log" ||
          { tail -20 "$f.log" >&2; exit 1; }
        [ -f "$lcsv" ] || echo "round,$(head -n 1 "$f.csv")" >"$lcsv"
        tail -n +2 "$f.csv" | sed "s/^/$r,/" >>"$lcsv"
      done
      echo "   $(($(date +%s) - t0)) s" >&2
    done
  done
done
python3 bench/peers/e2e_cpu_table.py "$out"

#!/usr/bin/env bash
# Allocation-failure sweep of one command whose binary is linked with tests/failalloc.c (the sanitizer build's kvq CLI,
# see tests/failalloc.cmake): counts its allocations, then runs it once per n with the n-th allocation failing.
#   scripts/failalloc.sh [-j JOBS] [--sample K [--last L]] -- COMMAND [ARGS...]
# Each run must either succeed or exit 1/2 with a message naming the memory failure ("out of memory" / "Cannot
# allocate memory"); a signal, a sanitizer report (ASan, UBSan, LSan leak) or a silent or unrelated error fails the
# sweep. --sample K tries the first 20 n, the last L (default 20) and K spread between, instead of every n: for the
# real model, whose load allocates ~50000 times (49152 of them one per vocabulary piece in the tokenizer; everything
# after the tokenizer is in the last ~700).
set -uo pipefail
jobs=$(nproc 2>/dev/null || echo 2)
sample=0
last=20
while [ $# -gt 0 ]; do
  case "$1" in
  -j) jobs=$2; shift 2 ;;
  --sample) sample=$2; shift 2 ;;
  --last) last=$2; shift 2 ;;
  --) shift; break ;;
  *) echo "usage: $0 [-j JOBS] [--sample K [--last L]] -- COMMAND [ARGS...]" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "failalloc.sh: no command" >&2; exit 2; }
# The CLI re-execs itself to set OMP_WAIT_POLICY unless it is set: set it, so one process does all the work.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
unset KVQ_FAILALLOC_N
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

KVQ_FAILALLOC_COUNT=1 "$@" >/dev/null 2>"$tmp/count.err" </dev/null
rc=$?
total=$(sed -n 's/^failalloc: \([0-9]*\) allocations$/\1/p' "$tmp/count.err" | tail -1)
if [ "$rc" != 0 ] || [ -z "$total" ]; then
  echo "failalloc.sh: the command fails without injection (rc $rc) or is not linked with failalloc.c:" >&2
  tail -20 "$tmp/count.err" >&2
  exit 1
fi
if [ "$total" = 0 ]; then echo "failalloc.sh: the command made no counted allocation" >&2; exit 1; fi

if [ "$sample" -gt 0 ] && [ "$total" -gt $((sample + last + 20)) ]; then
  { seq 1 20; seq $((total - last + 1)) "$total"; for i in $(seq 1 "$sample"); do echo $((20 + i * (total - 20 - last) / (sample + 1))); done; } |
    sort -n | uniq >"$tmp/ns"
else
  seq 1 "$total" >"$tmp/ns"
fi

export tmp
one() {
  local n=$1
  shift
  KVQ_FAILALLOC_N=$n "$@" >/dev/null 2>"$tmp/$n.err" </dev/null
  echo $? >"$tmp/$n.rc"
}
export -f one
t0=$(date +%s)
xargs -P "$jobs" -I{} bash -c 'one "$@"' _ {} "$@" <"$tmp/ns"

tried=0 clean=0 through=0 bad=0
while read -r n; do
  tried=$((tried + 1))
  rc=$(cat "$tmp/$n.rc")
  msg=$(grep -v '^failalloc: ' "$tmp/$n.err")
  if [ "$rc" = 0 ]; then
    through=$((through + 1)) # the failed allocation was not needed for the result (or n was past this run's count)
  elif { [ "$rc" = 1 ] || [ "$rc" = 2 ]; } && grep -qiE 'out of memory|cannot allocate memory' <<<"$msg" &&
    ! grep -qE 'Sanitizer|runtime error' <<<"$msg"; then
    clean=$((clean + 1))
  else
    bad=$((bad + 1))
    if [ "$bad" -le 3 ]; then
      echo "FAIL n=$n: exit $rc"
      tail -25 "$tmp/$n.err" | sed 's/^/    /'
    fi
    # one line per distinct failure: the command's message and the sanitizer's summary or first frame in kvq
    sig="$(head -1 <<<"$msg" | cut -c1-150) | $(grep -m1 -E 'SUMMARY|runtime error' <<<"$msg" | cut -c1-120)"
    sig="$sig | $(grep -m1 -E '#[0-9]+ .* in [a-z]' <<<"$msg" | grep -v -E '__interceptor|__wrap_' | sed 's/.* in //' | cut -c1-80)"
    echo "$n $sig" >>"$tmp/sigs"
  fi
done <"$tmp/ns"
if [ -s "$tmp/sigs" ]; then
  echo "distinct failures (count, first n, message | sanitizer | where):"
  awk '{n=$1; $1=""; if (!($0 in c)) {first[$0]=n; order[++k]=$0}; c[$0]++} END {for (i=1;i<=k;i++) print "  " c[order[i]] "x, n=" first[order[i]] ":" order[i]}' "$tmp/sigs"
fi
echo "failalloc: $* : $total allocations, $tried runs ($(($(date +%s) - t0)) s): $clean clean out-of-memory errors," \
  "$through ran through, $bad failed"
[ "$bad" = 0 ]

#!/usr/bin/env bash
# On the GPU machine, from the repo root: build the CUDA backend (sm_90a + sm_80 + compute_80 PTX by default), run its tests (then again under
# compute-sanitizer memcheck in quick mode), torch SDPA timings, the decode benchmark, and the GPU Python tests.
# Logs, CSV and markdown go to $OUT.
# Usage: scripts/gpu-check.sh [test|bench|py|hf|ncu|all|portable|prefill|engine|enginetest|enginebench|gemv|peerbuild|peer|engine1m|engine1m8b ...] (default all;
#   several steps may be named; all = test bench py hf ncu: the engine steps run only when named)
#   test: test_cuda + memcheck (quick); bench: SDPA + kvq-bench-cuda; py: GPU Python tests; hf: bench/bench_hf.py
#   (HF="..." replaces its arguments; carry .whl for the quanto rows); ncu: Nsight Compute on one Q4 and one Q2
#   decode launch (batch 8, 128k).
#   portable (only when named; issue 19): the portable decode kernel (cp.async pipeline, what sm_80..sm_89 and
#   sm_100+ GPUs run) on the H200, ~4 min after the build: test_cuda in quick mode (every test with the default
#   Hopper kernel, then its second pass with KVQ_CUDA_PORTABLE=1: decode/prefill of every type at head dims 64 and
#   128, mixed pairs, rotation and sinks against the CPU reference), compute-sanitizer racecheck and memcheck on the
#   portable decode kernel (q4's tests; PORTABLE_SAN_TYPES="q4 f16" for more), and kvq-bench-cuda at batch 1 and 8,
#   32k and 128k with the Hopper kernel and with KVQ_CUDA_PORTABLE=1 ($OUT/hopper, $OUT/portable; side by side in
#   $OUT/portable-vs-hopper.md; PORTABLE_BENCH="..." replaces the benchmark's arguments). (`test` also runs the
#   second pass, not quick.)
#   prefill (only when named; issue 19, item 5): compute-sanitizer racecheck and memcheck on the prefill kernels (the quick
#   ragged tests of PREFILL_SAN_TYPES, default "q4 f16 q3"), then torch SDPA's flash prefill (bench_sdpa.py --prefill) and kvq-bench-cuda
#   --prefill (the tiled kernel, and the decode kernel's entries for chunks up to 2048) at chunks 512, 2048, 8192 after
#   0, 4096, 32768 cached tokens (PREFILL_CHUNKS, PREFILL_DEPTHS, PREFILL_TYPES override), to $OUT/bench-cuda-prefill.csv.
#   engine = enginetest + enginebench: the engine on the GPU (the kvq CLI with CUDA and the model layer, in build-gpu/
#   with KVQ_BUILD_MODEL=ON). enginetest: ctest model_gpu's script (CPU and GPU engines on generated SmolLM2-135M and
#   2-layer Llama-3-8B shapes, each KV type), kvq perplexity CPU vs --gpu and kvq run -ngl 99 on the SmolLM2 shape.
#   enginebench: kvq bench --gpu on a generated Llama-3-8B shape (f16 weights, 16 GB) at depths 0, 4096, 32768 for
#   f16, q8, q4, q2 (ENGINE_BENCH="..." replaces the bench's arguments), then 8 sequences at once at depth 4096
#   (ENGINE_BENCH8="..."). Models go to $MODELS (default
#   build-gpu/models: kept between calls on a warm machine, so a second call skips generating them).
#   gemv: the decode GEMV (src/model/gemv_gpu.h): test_gemv_gpu (ctest gemv_gpu) and its --bench microbenchmark
#   (GEMV_REPS timed launches, default 20) to $OUT/gemv-bench.csv.
#   peerbuild: starts llama.cpp's build (below) in the background, in its own process session so that it outlives the
#   call (nice 19; log build-peers/peer-build.log, build-peers/peer-build.rc when done); peer waits for it.
#   NOBUILD=1: the engine steps use build-gpu as it is (a later call on a warm machine, the sources unchanged).
#   ENGINE_BENCH_CUBLAS="...": enginebench also runs kvq bench with these arguments under KVQ_GPU_GEMV=0 (every
#   product through cuBLAS, llama_gpu.h) to $OUT/cublas, the same-run "before" of the GEMV.
#   peer: llama.cpp's llama-bench with CUDA on the same Llama-3-8B GGUF (bench/peers/llamacpp-bench-gpu.sh; carry
#   build-peers/llama.cpp-0.3.36-src.tar.gz; the build alone takes minutes: give it its own call), and the table beside
#   kvq's (bench/peers/e2e_table.py) when enginebench ran in the same call.
#   engine1m: kvq bench --gpu on a Llama-2-7B shape (32 KV heads) at 1,048,576 tokens with q2 (fill with a sliding
#   window, decode exact): memory and decode tokens/s at full depth. engine1m8b: the Llama-3-8B shape at 1,048,576
#   tokens with q4 (ENGINE1M8B_BENCH="..." replaces the arguments).
#   BENCH="--types q4 --ctx 131072 --batch 8 --reps 10" narrows the benchmark; FLUSH=write flushes the L2 with a 256 MB
#   memset instead of a read (both benchmarks); KVQ_CUDA_DEBUG=1 names a failing kernel.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvq-out}
mkdir -p "$OUT"
steps=" ${*:-all} "
want() { [[ $steps == *" $1 "* || $steps == *" all "* ]]; }
export PATH=/usr/local/cuda/bin:$PATH
named() { [[ $steps == *" $1 "* ]]; }
B=build-gpu
t0=$(date +%s)
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
if want test || want bench || want py || want hf || want ncu || named portable || named prefill; then
  { cmake -S . -B $B -DCMAKE_BUILD_TYPE=Release -DKVQ_BUILD_MODEL=OFF -DKVQ_CUDA=ON &&
    cmake --build $B -j16 --target test_cuda kvq-bench-cuda kvq_shared kvq_cuda; } >"$OUT/build.log" 2>&1 ||
    { tail -40 "$OUT/build.log"; exit 1; }
  echo "build $(( $(date +%s) - t0 )) s"
fi
rc=0
# sanitize TAG KERNEL SECONDS TYPE...: compute-sanitizer racecheck, then memcheck, on test_cuda's quick ragged tests of
# each TYPE, only the kernels whose names contain KERNEL instrumented, SECONDS each; logs $OUT/TOOL-TAG-TYPE.log. An
# environment prefix on the call (KVQ_CUDA_PORTABLE=1 ...) reaches test_cuda.
sanitize() {
  local tag=$1 kern=$2 secs=$3 t tool r
  shift 3
  for t in "$@"; do
    for tool in racecheck memcheck; do
      KVQ_TEST_QUICK=1 KVQ_TEST_ONLY=$t timeout $secs compute-sanitizer --tool $tool --error-exitcode 3 \
        --kernel-name kns=$kern $B/src/cuda/test_cuda >"$OUT/$tool-$tag-$t.log" 2>&1
      r=$?; [ $r = 0 ] || rc=$r; echo "$tool $tag $t rc=$r"; grep -E "SUMMARY|hazard|rror" "$OUT/$tool-$tag-$t.log" | head -3
    done
  done
}
named engine && steps="$steps enginetest enginebench "
if named peerbuild; then
  rm -f build-peers/peer-build.rc
  setsid nohup nice -n 19 bash -c 'bash bench/peers/llamacpp-bench-gpu.sh build >build-peers/peer-build.log 2>&1;
    echo $? >build-peers/peer-build.rc' >/dev/null 2>&1 </dev/null &
  echo "llama.cpp build started in the background"
fi
if named enginetest || named enginebench || named engine1m || named engine1m8b || named peer || named gemv; then
  # the same build directory as the other steps (kvq_cuda's objects are reused), with the model layer on
  E=$B MODELS=${MODELS:-$B/models}
  mkdir -p "$MODELS"
  if [ "${NOBUILD:-0}" = 1 ] && [ -x $E/bin/kvq ]; then
    echo "engine build skipped (NOBUILD=1)"
  else
    { cmake -S . -B $E -DCMAKE_BUILD_TYPE=Release -DKVQ_CUDA=ON -DKVQ_BUILD_MODEL=ON &&
      cmake --build $E -j16 --target kvq_cli test_model_gpu test_gemv_gpu; } >"$OUT/engine-build.log" 2>&1 ||
      { tail -40 "$OUT/engine-build.log"; exit 1; }
    echo "engine build $(( $(date +%s) - t0 )) s"
  fi
  kvq=$E/bin/kvq
fi
if named gemv; then
  timeout 300 $E/tests/test_gemv_gpu >"$OUT/gemv.log" 2>&1
  r=$?; [ $r = 0 ] || rc=$r; echo "test_gemv_gpu rc=$r"; grep -E "^(ok|FAIL|worst|all)" "$OUT/gemv.log" | grep -v "^ok  .*: status"
  timeout 240 $E/tests/test_gemv_gpu --bench ${GEMV_REPS:-20} >"$OUT/gemv-bench.csv" 2>&1
  r=$?; [ $r = 0 ] || rc=$r; echo "test_gemv_gpu --bench rc=$r"; cat "$OUT/gemv-bench.csv"
fi
if named enginetest; then
  # CPU vs GPU engines, every KV type (tests/test_model_gpu.c states the bounds); the models stay in $MODELS
  OMP_WAIT_POLICY=PASSIVE timeout 600 bash tests/test_model_gpu.sh $kvq $E/tests/test_model_gpu "$MODELS" \
    >"$OUT/model_gpu.log" 2>&1
  r=$?; [ $r = 0 ] || rc=$r; echo "model_gpu rc=$r"; grep -E "^(ok|FAIL|SKIP|info|==)" "$OUT/model_gpu.log"
  # the CLI end to end on the GPU: perplexity CPU vs GPU on the same tokens, a greedy run
  sm=$MODELS/smollm2-135m-f16.gguf
  for i in $(seq 200); do echo "The quick brown fox $i jumps over the lazy dog; pack my box with five dozen liquor jugs."; done \
    >"$OUT/text.txt"
  for dev in "" "--gpu"; do
    timeout 300 $kvq perplexity -m $sm -f "$OUT/text.txt" -c 512 --chunks 4 -q $dev --compare f16,q8,q4,q2 \
      >"$OUT/ppl${dev:+-gpu}.txt" 2>&1; echo "perplexity ${dev:-(cpu)} rc=$?"; grep -E "^\|" "$OUT/ppl${dev:+-gpu}.txt"
  done
  timeout 120 $kvq run -m $sm -p "hello world" -n 32 --temp 0 -ngl 99 --kv-type q4 >"$OUT/run-gpu.txt" 2>&1
  r=$?; [ $r = 0 ] || rc=$r; echo "run -ngl 99 rc=$r"; tail -4 "$OUT/run-gpu.txt"
fi
if named enginebench; then
  l3=$MODELS/llama3-8b-f16.gguf
  [ -s $l3 ] || { timeout 600 $kvq gen-model --shape llama3-8b --wtype f16 --ctx 131072 -o $l3 || rc=1; }
  timeout 420 $kvq bench -m $l3 --gpu ${ENGINE_BENCH:---types f16,q8,q4,q2 --depths 0,4096,32768 -n 32} --out "$OUT" \
    >"$OUT/bench-e2e-gpu.log" 2>&1
  r=$?; [ $r = 0 ] || rc=$r; echo "kvq bench --gpu rc=$r"; cat "$OUT/bench-e2e-gpu.log"
  python3 bench/plot.py --dir "$OUT" e2e >/dev/null 2>&1 || true  # bench-e2e-gpu.png (when matplotlib is there)
  # 8 sequences at once (llama_gpu_decode_batch), each filled with its own tokens
  timeout 300 $kvq bench -m $l3 --gpu ${ENGINE_BENCH8:---batch 8 --types f16,q8,q4,q2 --depths 4096 -n 16} --out "$OUT/batch8" \
    >"$OUT/bench-e2e-gpu-b8.log" 2>&1
  r=$?; [ $r = 0 ] || rc=$r; echo "kvq bench --gpu --batch 8 rc=$r"; grep -E "^\|" "$OUT/bench-e2e-gpu-b8.log"
  if [ -n "${ENGINE_BENCH_CUBLAS:-}" ]; then
    KVQ_GPU_GEMV=0 timeout 300 $kvq bench -m $l3 --gpu $ENGINE_BENCH_CUBLAS --out "$OUT/cublas" >"$OUT/bench-e2e-gpu-cublas.log" 2>&1
    r=$?; [ $r = 0 ] || rc=$r; echo "kvq bench --gpu (KVQ_GPU_GEMV=0: cuBLAS) rc=$r"; grep -E "^\|" "$OUT/bench-e2e-gpu-cublas.log"
  fi
fi
if named peer; then
  if [ -e build-peers/peer-build.log ] && [ ! -e build-peers/peer-build.rc ]; then  # peerbuild's, still running
    for i in $(seq 100); do [ -e build-peers/peer-build.rc ] && break; sleep 3; done
    echo "waited for the background llama.cpp build: rc $(cat build-peers/peer-build.rc 2>/dev/null || echo none)"
  fi
  l3=$MODELS/llama3-8b-f16.gguf
  [ -s $l3 ] || { timeout 600 $kvq gen-model --shape llama3-8b --wtype f16 --ctx 131072 -o $l3 || rc=1; }
  timeout 580 bash bench/peers/llamacpp-bench-gpu.sh $l3 "$OUT" ${PEER_DEPTHS:-0,4096,32768} >"$OUT/peer.log" 2>&1
  r=$?; [ $r = 0 ] || rc=$r; echo "llama-bench rc=$r"; tail -5 "$OUT/peer.log"
  [ -f "$OUT/bench-e2e-gpu.csv" ] && [ -f "$OUT/llamacpp-bench-gpu.csv" ] &&
    python3 bench/peers/e2e_table.py "$OUT/bench-e2e-gpu.csv" "$OUT/llamacpp-bench-gpu.csv" "$OUT/bench-e2e-gpu-vs-llamacpp.md"
fi
if named engine1m; then
  l2=$MODELS/llama2-7b-f16.gguf
  [ -s $l2 ] || { timeout 600 $kvq gen-model --shape llama2-7b --wtype f16 --ctx 1048576 -o $l2 || rc=1; }
  timeout 540 $kvq bench -m $l2 --gpu ${ENGINE1M_BENCH:---types q2 --depths 1048576 -n 8 --prefill 512} --out "$OUT/1m" \
    >"$OUT/bench-1m.log" 2>&1
  r=$?; [ $r = 0 ] || rc=$r; echo "kvq bench --gpu 1M rc=$r"; cat "$OUT/bench-1m.log"
fi
if named engine1m8b; then
  l3=$MODELS/llama3-8b-f16.gguf
  [ -s $l3 ] || { timeout 600 $kvq gen-model --shape llama3-8b --wtype f16 --ctx 131072 -o $l3 || rc=1; }
  timeout 540 $kvq bench -m $l3 --gpu ${ENGINE1M8B_BENCH:---types q4 --depths 1048576 -n 8 --prefill 512} --out "$OUT/1m8b" \
    >"$OUT/bench-1m8b.log" 2>&1
  r=$?; [ $r = 0 ] || rc=$r; echo "kvq bench --gpu 1M (Llama-3-8B shape) rc=$r"; cat "$OUT/bench-1m8b.log"
fi
if want test; then
  timeout 420 $B/src/cuda/test_cuda >"$OUT/test.log" 2>&1; r=$?; [ $r = 0 ] || rc=$r
  echo "test_cuda rc=$r"; grep FAIL "$OUT/test.log" | head; tail -1 "$OUT/test.log"
  KVQ_TEST_QUICK=1 timeout 200 compute-sanitizer --tool memcheck --error-exitcode 3 $B/src/cuda/test_cuda >"$OUT/memcheck.log" 2>&1
  r=$?; [ $r = 0 ] || rc=$r; echo "memcheck rc=$r"; tail -1 "$OUT/memcheck.log"
fi
if want bench; then
  PYTHONUNBUFFERED=1 timeout 200 python3 bench/bench_sdpa.py 20 ${FLUSH:+--flush-write} >"$OUT/sdpa.csv" 2>"$OUT/sdpa.err" ||
    tail -5 "$OUT/sdpa.err"
  timeout 300 $B/src/cuda/kvq-bench-cuda --out "$OUT" --sdpa "$OUT/sdpa.csv" ${BENCH:---reps 15} ${FLUSH:+--flush write} \
    >"$OUT/bench.log" 2>&1
  echo "bench rc=$?"; grep -E "rror|copy band|ctx 131072" "$OUT/bench.log"
fi
if named prefill; then
  # the tiled prefill kernel and its merge (cp.async double buffers, shared-to-shared conversion) under racecheck and
  # memcheck: one type per tile path (q4: half2 conversion, f16: rows straight into the tile, q3: fp32 levels), the
  # quick ragged tests of that type, only the prefill kernels instrumented (PREFILL_SAN_TYPES="" skips this)
  KVQ_TEST_NO_PORTABLE=1 sanitize prefill prefill 80 ${PREFILL_SAN_TYPES-q4 f16 q3}
  pc=${PREFILL_CHUNKS:-512,2048,8192} pd=${PREFILL_DEPTHS:-0,4096,32768}
  PYTHONUNBUFFERED=1 timeout 200 python3 bench/bench_sdpa.py 5 --prefill $pc --ctx $pd >"$OUT/sdpa-prefill.csv" \
    2>"$OUT/sdpa-prefill.err" || tail -5 "$OUT/sdpa-prefill.err"
  timeout 300 $B/src/cuda/kvq-bench-cuda --prefill $pc --ctx $pd --types ${PREFILL_TYPES:-f16,q8,q4,q2} --reps 5 \
    --sdpa "$OUT/sdpa-prefill.csv" --out "$OUT" >"$OUT/bench-prefill.log" 2>&1
  r=$?; [ $r = 0 ] || rc=$r; echo "prefill bench rc=$r"; grep -E "rror|chunk" "$OUT/bench-prefill.log"
fi
if want py || want hf; then python3 python/build_native.py --build-dir $B -j 16 >>"$OUT/build.log" 2>&1; fi
if want py; then
  OMP_WAIT_POLICY=PASSIVE timeout 200 python3 -m pytest tests/python/test_cuda.py -q -rs -p no:cacheprovider >"$OUT/pytest.log" 2>&1
  r=$?; [ $r = 0 ] || rc=$r; echo "pytest rc=$r"; tail -3 "$OUT/pytest.log"
fi
if want hf; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
      export PYTHONPATH=/tmp/site
  fi
  PYTHONUNBUFFERED=1 timeout 400 python3 bench/bench_hf.py ${HF:---ctx 32768,131072 --batch 1,8 --steps 16 --rounds 1} \
    --out "$OUT/bench-hf.md" >"$OUT/hf.log" 2>&1
  r=$?; [ $r = 0 ] || rc=$r; echo "bench_hf rc=$r"; tail -25 "$OUT/hf.log"
fi
if want ncu; then
  for t in q4 q2; do
    timeout 200 ncu --clock-control none -k regex:decode_kernel -c 1 --launch-skip 3 \
      --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
      --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section InstructionStats \
      $B/src/cuda/kvq-bench-cuda --types $t --ctx 131072 --batch 8 --reps 3 >"$OUT/ncu-$t.txt" 2>&1
    echo "ncu $t rc=$?"; grep -E "Duration|Throughput|Issue Slots|Warp Cycles Per Issued|No Eligible|Active Warps|Stall" "$OUT/ncu-$t.txt" | head -30
  done
fi
if named portable; then
  tp=$(date +%s)
  KVQ_TEST_QUICK=1 timeout 240 $B/src/cuda/test_cuda >"$OUT/test-quick-both.log" 2>&1; r=$?; [ $r = 0 ] || rc=$r
  echo "test_cuda (quick; Hopper kernel, then the portable pass) rc=$r"; grep FAIL "$OUT/test-quick-both.log" | head
  echo "  $(grep -c ' portable' "$OUT/test-quick-both.log") lines of the portable pass; $(tail -1 "$OUT/test-quick-both.log")"
  KVQ_CUDA_PORTABLE=1 sanitize portable decode_kernel 100 ${PORTABLE_SAN_TYPES:-q4}
  PB=${PORTABLE_BENCH:---types f16,q8,q4,q2 --ctx 32768,131072 --batch 1,8 --reps 10}
  for k in hopper portable; do
    mkdir -p "$OUT/$k"
    if [ $k = portable ]; then export KVQ_CUDA_PORTABLE=1; else unset KVQ_CUDA_PORTABLE; fi
    timeout 150 $B/src/cuda/kvq-bench-cuda --out "$OUT/$k" $PB >"$OUT/$k/bench.log" 2>&1
    r=$?; [ $r = 0 ] || rc=$r; echo "bench $k rc=$r"; grep -E "rror|decode kernel" "$OUT/$k/bench.log"
  done
  unset KVQ_CUDA_PORTABLE
  if [ -f "$OUT/hopper/bench-cuda.csv" ] && [ -f "$OUT/portable/bench-cuda.csv" ]; then
    { echo "| type | batch | context | Hopper µs | portable µs | portable / Hopper | portable KV GB/s |"
      echo "|---|---:|---:|---:|---:|---:|---:|"
      awk -F, 'NR == FNR { if (FNR > 1) h[$1 "," $2 "," $3] = $4; next }
               FNR > 1 { k = $1 "," $2 "," $3; if (k in h) printf "| %s | %s | %s | %.1f | %.1f | %.2f | %.0f |\n", $1, $2, $3, h[k], $4, $4 / h[k], $5 }' \
        "$OUT/hopper/bench-cuda.csv" "$OUT/portable/bench-cuda.csv"; } >"$OUT/portable-vs-hopper.md"
    cat "$OUT/portable-vs-hopper.md"
  fi
  echo "portable step $(( $(date +%s) - tp )) s"
fi
echo "done in $(( $(date +%s) - t0 )) s"
exit $rc

// kvq-bench cuda: decode attention and append on the device, Llama-3-8B attention shapes (32 query heads,
// 8 KV heads, D = 128; --shape gemma3-12b: 16 query heads, 8 KV heads, D = 256; gemma3-270m: 4 and 1, D = 256),
// batch 1/8/32, context 4k/16k/64k/128k, every type. Timed with CUDA events around each
// call, after warm-up, L2 flushed before every timed run (by reading a buffer of 256 MiB or 4x the L2, whichever is
// larger; --flush write: a memset of it,
// whose ~50 MB of dirty lines are then written back inside the timed call), median of the runs.
// Writes <out>/bench-cuda.md and <out>/bench-cuda.csv; merges torch SDPA timings from --sdpa <csv>
// (bench/bench_sdpa.py: lines "batch,ctx,ms"). Caches have kvq.h section 10's defaults (Q8: keys rotated; Q4, Q2:
// rotation and one sink), as kvq_cuda_cache_create resolves them; --plain switches the rotation and the sinks off,
// --qnorm turns Q-Norm on for the grouped roles (kvq.h section 10; kvq's engine and KVQCache do), --residual R sets
// the fp16 window (default: 128 rows for Q4/Q2, none for the per-token types), --rotate ROLES (0-3) and --sinks S
// the rotated roles and the sinks. --multi N,..: also times kvq_cuda_attn_decode_multi with N query tokens per
// sequence (the verify step of speculative decoding), printed beside the one-token decode of the same run.
// --prefill CHUNKS (with --ctx DEPTHS, 0 allowed): kvq_cuda_attn_prefill of each chunk after each depth instead, one
// sequence, against torch SDPA's flash prefill (bench_sdpa.py --prefill's lines in --sdpa); <out>/bench-cuda-prefill.csv.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "kvq.h"
#include "kvq_cuda.h"

#define CU(call)                                                                                                     \
    do {                                                                                                             \
        cudaError_t e_ = (call);                                                                                     \
        if (e_ != cudaSuccess) {                                                                                     \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_));                  \
            return 1;                                                                                                \
        }                                                                                                            \
    } while (0)
#define OK(call)                                                                                                     \
    do {                                                                                                             \
        kvq_status s_ = (call);                                                                                      \
        if (s_ != KVQ_OK) {                                                                                          \
            fprintf(stderr, "%s:%d: %s -> %d (%s)\n", __FILE__, __LINE__, #call, (int)s_, kvq_cuda_last_error());   \
            return 1;                                                                                                \
        }                                                                                                            \
    } while (0)

__global__ void fill_random(__half *x, size_t n, uint32_t seed, float amp) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 16, h *= 0x7feb352du, h ^= h >> 15, h *= 0x846ca68bu, h ^= h >> 16;
        x[i] = __float2half(amp * ((float)(h & 0xffffff) / 8388608.0f - 1.0f));
    }
}

// Reads n bytes (x: 16-byte aligned): afterwards the L2 holds clean lines of x, nothing of the data a timed call reads.
__global__ void read_flush(const uint4 *x, size_t n16, unsigned *sink) {
    unsigned acc = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n16; i += (size_t)gridDim.x * blockDim.x) {
        const uint4 v = x[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9e3779b9u) *sink = acc;  // keeps the loads
}

// Spins ~ns nanoseconds: queued after the flush, so the host has queued the timed call before the GPU gets there
// (bench_sdpa.py does the same, where Python's launch gap was otherwise timed).
__global__ void spin(unsigned ns) {
    const unsigned long long t0 = clock64();
    while (clock64() - t0 < (unsigned long long)ns * 2) __nanosleep(1000);
}

// Records e1 on st after the work to time, waits for it and gives the milliseconds since e0.
static cudaError_t stop_ms(cudaEvent_t e0, cudaEvent_t e1, cudaStream_t st, float *ms) {
    cudaError_t e = cudaEventRecord(e1, st);
    if (e == cudaSuccess) e = cudaEventSynchronize(e1);
    if (e == cudaSuccess) e = cudaEventElapsedTime(ms, e0, e1);
    return e;
}

static double median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0 : v[v.size() / 2];
}

static std::vector<int> int_list(const char *s, int lo = 1) {
    std::vector<int> v;
    for (const char *p = s; *p;) {
        char *end;
        long x = strtol(p, &end, 10);
        if (end == p || x < lo || x > (1 << 24)) return {};
        v.push_back((int)x);
        p = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return {};
    }
    return v;
}

struct Row {
    int type_index;  // position in --types: the tables list each type's rows together
    std::string type;
    int batch, ctx;
    double us, gbs, pct_copy, vs_f16, vs_sdpa, sdpa_us, b2b_us;
};

extern "C" int kvq_bench_cuda_main(int argc, char **argv) {
    const char *out_dir = nullptr, *sdpa_path = nullptr;  // no --out: stdout only (--out docs: the tracked tables)
    int reps = 20, residual = -1, rotate = -1, sinks = -1;
    bool quick = false, flush_write = false, plain = false, qnorm = false;
    const char *types_arg = nullptr, *ctx_arg = nullptr, *batch_arg = nullptr, *shape = "llama3-8b", *multi_arg = nullptr,
               *prefill_arg = nullptr;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--out") && i + 1 < argc) out_dir = argv[++i];
        else if (!strcmp(argv[i], "--sdpa") && i + 1 < argc) sdpa_path = argv[++i];
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--quick")) quick = true;
        else if (!strcmp(argv[i], "--plain")) plain = true;
        else if (!strcmp(argv[i], "--qnorm")) qnorm = true;
        else if (!strcmp(argv[i], "--types") && i + 1 < argc) types_arg = argv[++i];
        else if (!strcmp(argv[i], "--ctx") && i + 1 < argc) ctx_arg = argv[++i];
        else if (!strcmp(argv[i], "--multi") && i + 1 < argc) multi_arg = argv[++i];
        else if (!strcmp(argv[i], "--prefill") && i + 1 < argc) prefill_arg = argv[++i];
        else if (!strcmp(argv[i], "--batch") && i + 1 < argc) batch_arg = argv[++i];
        else if (!strcmp(argv[i], "--shape") && i + 1 < argc) shape = argv[++i];
        else if (!strcmp(argv[i], "--residual") && i + 1 < argc) residual = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--rotate") && i + 1 < argc) rotate = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--sinks") && i + 1 < argc) sinks = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--flush") && i + 1 < argc) flush_write = !strcmp(argv[++i], "write");
        else if (strcmp(argv[i], "cuda")) {
            fprintf(stderr, "usage: kvq-bench cuda [--out DIR] [--sdpa CSV] [--reps N] [--quick] [--types f16,q8,q8/q4,...] "
                            "[--ctx 4096,131072] [--batch 1,8] [--flush read|write] [--plain] [--qnorm] "
                            "[--shape llama3-8b|gemma3-12b|gemma3-270m] [--residual R] [--rotate ROLES] [--sinks S] "
                            "[--multi 2,4,8] [--prefill CHUNKS (--ctx: the depths before each chunk, 0 allowed)]\n");
            return 2;
        }
    }
    int ndev = 0;
    if (kvq_cuda_device_count(&ndev) != KVQ_OK) {
        printf("SKIP: %s\n", kvq_cuda_last_error());
        return 77;
    }
    cudaDeviceProp prop;
    CU(cudaGetDeviceProperties(&prop, 0));
    std::map<std::pair<int, int>, double> sdpa;
    if (sdpa_path) {
        FILE *f = fopen(sdpa_path, "r");
        if (f) {
            int b, c;
            double ms;
            char line[256];
            while (fgets(line, sizeof line, f))
                if (sscanf(line, "%d,%d,%lf", &b, &c, &ms) == 3) sdpa[{b, c}] = ms * 1000.0;
            fclose(f);
        }
    }
    cudaStream_t st;
    CU(cudaStreamCreate(&st));
    cudaEvent_t e0, e1;
    CU(cudaEventCreate(&e0));
    CU(cudaEventCreate(&e1));
    void *flush;
    // 256 MiB is 5x the H100/H200's 50 MB L2; 4x the L2 keeps the flush complete on GPUs with larger ones
    const size_t flush_bytes = std::max<size_t>(256u << 20, (size_t)4 * prop.l2CacheSize / 16 * 16);
    CU(cudaMalloc(&flush, flush_bytes));
    CU(cudaMemset(flush, 1, flush_bytes));
    unsigned *sink;
    CU(cudaMalloc(&sink, sizeof *sink));
    // One timed call of a decode (`call` gives its kvq_status): the L2 flushed first, then a spin so that the host has
    // queued the call before the GPU reaches it; device time in *ms. Every flushed figure goes through here.
    int n_flushed = 0;
    auto flushed_ms = [&](auto call, float *ms) -> int {
        if (flush_write) CU(cudaMemsetAsync(flush, n_flushed++ & 0xff, flush_bytes, st));
        else read_flush<<<4 * prop.multiProcessorCount, 512, 0, st>>>((const uint4 *)flush, flush_bytes / 16, sink);
        spin<<<1, 32, 0, st>>>(100000);
        CU(cudaEventRecord(e0, st));
        OK(call());
        CU(stop_ms(e0, e1, st, ms));
        return 0;
    };

    // measured copy bandwidth: device-to-device, bytes read + written
    double copy_gbs = 0;
    {
        size_t n = 2ull << 30;
        void *a, *b;
        CU(cudaMalloc(&a, n));
        CU(cudaMalloc(&b, n));
        CU(cudaMemsetAsync(a, 1, n, st));
        std::vector<float> ts;
        for (int r = 0; r < 10; r++) {
            CU(cudaEventRecord(e0, st));
            CU(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, st));
            float ms;
            CU(stop_ms(e0, e1, st, &ms));
            ts.push_back(ms);
        }
        copy_gbs = 2.0 * n / (median(ts) * 1e-3) / 1e9;
        cudaFree(a);
        cudaFree(b);
    }
    printf("device %s, %d SMs; copy bandwidth %.0f GB/s (read + write)\n", prop.name, prop.multiProcessorCount, copy_gbs);
    // which decode kernel the caches get (kvq_cuda.h section 1): the Hopper one on sm_90 unless KVQ_CUDA_PORTABLE=1
    const char *penv = getenv("KVQ_CUDA_PORTABLE");
    const bool portable = (penv && penv[0] && strcmp(penv, "0") != 0) || prop.major != 9;
    const char *kname = portable ? "portable (cp.async pipeline, sm_80+)" : "Hopper (bulk copies, sm_90)";
    printf("decode kernel: %s%s\n", kname, penv && portable ? " (KVQ_CUDA_PORTABLE)" : "");
    fflush(stdout);

    // attention shapes: KV heads, head dim, query heads
    int H = 8, D = 128, NQH = 32;
    if (!strcmp(shape, "gemma3-12b")) H = 8, D = 256, NQH = 16;
    else if (!strcmp(shape, "gemma3-270m")) H = 1, D = 256, NQH = 4;
    else if (strcmp(shape, "llama3-8b")) {
        fprintf(stderr, "unknown --shape '%s' (llama3-8b, gemma3-12b, gemma3-270m)\n", shape);
        return 2;
    }
    std::vector<int> ctxs = {4096, 16384, 65536, 131072};
    std::vector<int> batches = {1, 8, 32};
    if (quick) ctxs = {4096, 131072}, batches = {1, 8};
    if (ctx_arg) ctxs = prefill_arg ? int_list(ctx_arg, 0) : int_list(ctx_arg);
    std::vector<int> multis;
    if (multi_arg) multis = int_list(multi_arg);
    for (int m : multis)
        if (m < 1 || m > 64) {
            fprintf(stderr, "--multi: %d query tokens outside 1..64\n", m);
            return 2;
        }
    const int maxm = multis.empty() ? 1 : *std::max_element(multis.begin(), multis.end());
    if (batch_arg) batches = int_list(batch_arg);
    // (key type, value type); "q8/q4" on the command line for Q8 keys with Q4 values
    std::vector<std::pair<kvq_type, kvq_type>> types;
    for (kvq_type t : {KVQ_TYPE_F16, KVQ_TYPE_BF16, KVQ_TYPE_Q8, KVQ_TYPE_FP8, KVQ_TYPE_Q4, KVQ_TYPE_Q3, KVQ_TYPE_Q2})
        types.push_back({t, t});
    if (types_arg) {
        types.clear();
        std::string all = types_arg;
        for (size_t a = 0; a <= all.size();) {
            size_t b = all.find(',', a);
            if (b == std::string::npos) b = all.size();
            std::string name = all.substr(a, b - a);
            const size_t sl = name.find('/');
            const std::string nk = name.substr(0, sl), nv = sl == std::string::npos ? nk : name.substr(sl + 1);
            kvq_type tk, tv;
            if (kvq_type_from_name(nk.c_str(), &tk) != KVQ_OK || kvq_type_from_name(nv.c_str(), &tv) != KVQ_OK) {
                fprintf(stderr, "unknown type '%s'\n", name.c_str());
                return 2;
            }
            types.push_back({tk, tv});
            a = b + 1;
        }
    }
    printf("shape %s: %d query heads, %d KV heads, head_dim %d\n", shape, NQH, H, D);
    if (ctxs.empty() || batches.empty() || types.empty()) {
        fprintf(stderr, "empty --ctx, --batch or --types\n");
        return 2;
    }
    if (prefill_arg) {
        // Chunked prefill (issue 19, item 5): `chunk` query tokens after `depth` cached ones, one sequence, causal
        // (query i sees depth + i + 1 keys), the cache holding all depth + chunk tokens as kvq_cuda_attn_prefill
        // wants them. kvq's tiled kernel (the default) and, for chunks up to 2048, the decode kernel's entries
        // (KVQ_CUDA_PREFILL_TILES=0); torch SDPA's flash prefill from --sdpa lines "prefill,depth,chunk,ms"
        // (bench_sdpa.py --prefill: causal, aligned to the lower right as here).
        const std::vector<int> chunks = int_list(prefill_arg);
        if (chunks.empty() || ctxs.empty()) {
            fprintf(stderr, "--prefill: a list of chunk sizes (1 .. 2^24) and --ctx depths (0 ..)\n");
            return 2;
        }
        std::map<std::pair<int, int>, double> sdpa_p;
        if (sdpa_path) {
            FILE *f = fopen(sdpa_path, "r");
            char line[256];
            int dp, ch;
            double ms;
            while (f && fgets(line, sizeof line, f))
                if (sscanf(line, "prefill,%d,%d,%lf", &dp, &ch, &ms) == 3) sdpa_p[{dp, ch}] = ms * 1000.0;
            if (f) fclose(f);
        }
        const int maxc = *std::max_element(chunks.begin(), chunks.end());
        const int CHP = 4096;
        __half *pk, *pv, *pq, *po;
        CU(cudaMalloc(&pk, (size_t)CHP * H * D * 2));
        CU(cudaMalloc(&pv, (size_t)CHP * H * D * 2));
        CU(cudaMalloc(&pq, (size_t)maxc * NQH * D * 2));
        CU(cudaMalloc(&po, (size_t)maxc * NQH * D * 2));
        fill_random<<<1024, 256, 0, st>>>(pk, (size_t)CHP * H * D, 1u, 2.0f);
        fill_random<<<1024, 256, 0, st>>>(pv, (size_t)CHP * H * D, 2u, 1.0f);
        fill_random<<<1024, 256, 0, st>>>(pq, (size_t)maxc * NQH * D, 3u, 1.0f);
        std::vector<std::string> lines;
        std::map<std::pair<int, int>, double> f16p;
        for (int depth : ctxs)
            for (int chunk : chunks)
                for (size_t ti = 0; ti < types.size(); ti++) {
                    const kvq_type tk = types[ti].first, tv = types[ti].second;
                    std::string tname = kvq_type_get_traits(tk)->name;
                    if (tv != tk) tname = tname + "/" + kvq_type_get_traits(tv)->name;
                    kvq_cache_config cfg = kvq_cache_config_default();
                    cfg.n_layers = 1, cfg.n_kv_heads = H, cfg.head_dim = D, cfg.type_k = tk, cfg.type_v = tv, cfg.max_seqs = 1;
                    if (plain) cfg.rotate = 0, cfg.sinks = 0;
                    if (qnorm) cfg.qnorm = KVQ_ROLES_KV;
                    cfg.residual = residual;
                    if (rotate >= 0) cfg.rotate = rotate;
                    if (sinks >= 0) cfg.sinks = sinks;
                    kvq_page_layout L;
                    OK(kvq_page_layout_make(tk, tv, H, D, 64, 64, &L));
                    const int len = depth + chunk;
                    cfg.arena_bytes = (size_t)(len / 64 + 4) * L.page_bytes;
                    kvq_cuda_cache *c;
                    OK(kvq_cuda_cache_create(&cfg, 0, len + 64, &c));
                    int32_t id;
                    OK(kvq_cuda_seq_new(c, &id));
                    for (int done = 0; done < len;) {
                        int32_t n = std::min(CHP, len - done);
                        OK(kvq_cuda_append(c, 0, 1, &id, &n, KVQ_DTYPE_F16, pk, pv, st));
                        done += n;
                    }
                    kvq_attn_params ap = kvq_attn_params_default(NQH);
                    auto call = [&] { return kvq_cuda_attn_prefill(c, 0, id, chunk, KVQ_DTYPE_F16, pq, po, &ap, st); };
                    auto time_it = [&](int n_rep, double *us) -> int {
                        OK(call());
                        std::vector<float> ts;
                        for (int r = 0; r < n_rep; r++) {
                            float ms;
                            if (flushed_ms(call, &ms)) return 1;
                            ts.push_back(ms);
                        }
                        *us = median(ts) * 1000.0;
                        return 0;
                    };
                    double us = 0, us_e = 0;
                    unsetenv("KVQ_CUDA_PREFILL_TILES");
                    if (time_it(reps, &us)) return 1;
                    if (chunk <= 2048) {
                        setenv("KVQ_CUDA_PREFILL_TILES", "0", 1);
                        const int r = time_it(std::min(reps, 5), &us_e);
                        unsetenv("KVQ_CUDA_PREFILL_TILES");
                        if (r) return 1;
                    }
                    CU(cudaGetLastError());
                    const double pairs = (double)chunk * depth + (double)chunk * (chunk + 1) / 2;
                    const double tflops = 4.0 * D * NQH * pairs / (us * 1e-6) / 1e12;
                    if (tk == KVQ_TYPE_F16 && tv == KVQ_TYPE_F16) f16p[{depth, chunk}] = us;
                    const double vf = f16p.count({depth, chunk}) ? f16p[{depth, chunk}] / us : 0;
                    const double sd = sdpa_p.count({depth, chunk}) ? sdpa_p[{depth, chunk}] : 0;
                    char buf[320];
                    snprintf(buf, sizeof buf, "%s,%d,%d,%.1f,%.1f,%.3f,%.1f,%.3f,%.1f", tname.c_str(), depth, chunk, us, tflops, vf, sd,
                             sd > 0 ? sd / us : 0.0, us_e);
                    lines.push_back(buf);
                    printf("%-6s depth %6d chunk %5d: %10.1f us  %6.1f TFLOP/s  x%.2f vs f16  x%.2f vs sdpa (%.1f us)  entries %.1f us (x%.2f)\n",
                           tname.c_str(), depth, chunk, us, tflops, vf, sd > 0 ? sd / us : 0.0, sd, us_e, us_e > 0 ? us_e / us : 0.0);
                    fflush(stdout);
                    kvq_cuda_cache_free(c);
                }
        if (out_dir) {
            std::string csv = std::string(out_dir) + "/bench-cuda-prefill.csv";
            FILE *f = fopen(csv.c_str(), "w");
            if (f) {
                fprintf(f, "type,depth,chunk,us,tflops,speedup_vs_f16,sdpa_us,speedup_vs_sdpa,entries_us\n");
                for (auto &l : lines) fprintf(f, "%s\n", l.c_str());
                fclose(f);
                printf("wrote %s\n", csv.c_str());
            }
        }
        return 0;
    }
    std::sort(batches.begin(), batches.end());
    const int maxb = batches.back();
    const int CH = 4096;  // append chunk
    __half *dk, *dv, *dq, *dout;
    size_t in_elems = (size_t)maxb * CH * H * D;
    CU(cudaMalloc(&dk, in_elems * 2));
    CU(cudaMalloc(&dv, in_elems * 2));
    fill_random<<<1024, 256, 0, st>>>(dk, in_elems, 1u, 2.0f);
    fill_random<<<1024, 256, 0, st>>>(dv, in_elems, 2u, 1.0f);
    CU(cudaMalloc(&dq, (size_t)maxb * maxm * NQH * D * 2));
    CU(cudaMalloc(&dout, (size_t)maxb * maxm * NQH * D * 2));
    fill_random<<<64, 256, 0, st>>>(dq, (size_t)maxb * maxm * NQH * D, 3u, 1.0f);

    std::vector<Row> rows;
    std::map<std::pair<int, int>, double> f16_us;
    std::vector<std::string> append_lines;
    // Contexts outside, types inside: every type's cache of a context is created in the same allocation state.
    // Type-major order measured F16 and BF16 at 4k, batch 8, 13% slower after a 128k cache (35 GB) had been freed
    // (64.7 against 57.2 us, same binary and run), which had made BF16 look 0.87x F16 at 4k-16k.
    for (int ctx : ctxs) {
        for (size_t ti = 0; ti < types.size(); ti++) {
            const kvq_type tk = types[ti].first, tv = types[ti].second;
            std::string tname = kvq_type_get_traits(tk)->name;
            if (tv != tk) tname = tname + "/" + kvq_type_get_traits(tv)->name;
            const char *tn = tname.c_str();
            kvq_cache_config cfg = kvq_cache_config_default();
            cfg.n_layers = 1, cfg.n_kv_heads = H, cfg.head_dim = D, cfg.type_k = tk, cfg.type_v = tv, cfg.max_seqs = maxb;
            if (plain) cfg.rotate = 0, cfg.sinks = 0;  // else the defaults: what a user of the library gets
            if (qnorm) cfg.qnorm = KVQ_ROLES_KV;       // Q-Norm of the grouped roles (kvq's engine and KVQCache)
            cfg.residual = residual;                   // the fp16 window (-1: the default, 128 for grouped types)
            if (rotate >= 0) cfg.rotate = rotate;      // roles rotated (kvq.h section 10), over --plain's
            if (sinks >= 0) cfg.sinks = sinks;
            kvq_page_layout L;
            OK(kvq_page_layout_make(tk, tv, H, D, 64, 64, &L));
            cfg.arena_bytes = (size_t)maxb * ((ctx + 2 * CH) / 64 + 2) * L.page_bytes;
            kvq_cuda_cache *c;
            OK(kvq_cuda_cache_create(&cfg, 0, ctx + 2 * CH, &c));
            std::vector<int32_t> ids(maxb), nt(maxb);
            for (int i = 0; i < maxb; i++) OK(kvq_cuda_seq_new(c, &ids[i]));
            const bool verbose = getenv("KVQ_CUDA_DEBUG") != nullptr;
            if (verbose) fprintf(stderr, "[%s ctx %d: appending]\n", tn, ctx);
            // fill ctx - 64 tokens in chunks (prefill append), then time 64 decode-step appends (one token per
            // sequence), one of which flushes a group of the grouped types' window into a page
            const int NSTEP = 64;
            double app_chunk_us = 0;
            int n_chunks = 0;
            for (int done = 0; done < ctx - NSTEP;) {
                int n = std::min(CH, ctx - NSTEP - done);
                for (int i = 0; i < maxb; i++) nt[i] = n;
                CU(cudaEventRecord(e0, st));
                OK(kvq_cuda_append(c, 0, maxb, ids.data(), nt.data(), KVQ_DTYPE_F16, dk, dv, st));
                float ms;
                CU(stop_ms(e0, e1, st, &ms));
                if (n == CH && done > 0) app_chunk_us += ms * 1000.0, n_chunks++;
                done += n;
            }
            for (int i = 0; i < maxb; i++) nt[i] = 1;
            std::vector<double> step_us;
            for (int s = 0; s < NSTEP; s++) {
                spin<<<1, 32, 0, st>>>(50000);  // device time only: the call is queued before the GPU gets to it
                CU(cudaEventRecord(e0, st));
                OK(kvq_cuda_append(c, 0, maxb, ids.data(), nt.data(), KVQ_DTYPE_F16, dk + (size_t)s * maxb * H * D,
                                   dv + (size_t)s * maxb * H * D, st));
                float ms;
                CU(stop_ms(e0, e1, st, &ms));
                step_us.push_back(ms * 1000.0);
            }
            if (ctx == ctxs.back()) {
                double mean = 0;
                for (double x : step_us) mean += x / NSTEP;
                std::sort(step_us.begin(), step_us.end());
                char buf[256];
                snprintf(buf, sizeof buf, "| %s | %.1f | %.1f | %.1f | %.3f | %.1f |", tn, step_us[NSTEP / 2], step_us.back(), mean,
                         mean / maxb, n_chunks ? app_chunk_us / n_chunks / ((double)CH * maxb) * 1000.0 : 0.0);
                append_lines.push_back(buf);
            }
            CU(cudaGetLastError());
            kvq_attn_params ap = kvq_attn_params_default(NQH);
            for (int b : batches) {
                if (verbose) fprintf(stderr, "[%s ctx %d batch %d: decoding]\n", tn, ctx, b);
                double bytes = 0;
                OK(kvq_cuda_attn_decode_bytes(c, 0, b, ids.data(), &ap, &bytes));
                for (int w = 0; w < 3; w++) OK(kvq_cuda_attn_decode(c, 0, b, ids.data(), KVQ_DTYPE_F16, dq, dout, &ap, st));
                std::vector<float> ts;
                auto one = [&] { return kvq_cuda_attn_decode(c, 0, b, ids.data(), KVQ_DTYPE_F16, dq, dout, &ap, st); };
                for (int r = 0; r < reps; r++) {
                    float ms;
                    if (flushed_ms(one, &ms)) return 1;
                    ts.push_back(ms);
                }
                // steady state: 10 calls back to back (no flush; launch gaps hidden), per call
                CU(cudaEventRecord(e0, st));
                for (int r = 0; r < 10; r++) OK(kvq_cuda_attn_decode(c, 0, b, ids.data(), KVQ_DTYPE_F16, dq, dout, &ap, st));
                float b2b_ms;
                CU(stop_ms(e0, e1, st, &b2b_ms));
                CU(cudaGetLastError());
                Row row;
                row.b2b_us = b2b_ms * 100.0;
                row.type_index = (int)ti, row.type = tn, row.batch = b, row.ctx = ctx;
                row.us = median(ts) * 1000.0;
                row.gbs = bytes / (row.us * 1e-6) / 1e9;
                row.pct_copy = 100.0 * row.gbs / copy_gbs;
                if (tk == KVQ_TYPE_F16 && tv == KVQ_TYPE_F16) f16_us[{b, ctx}] = row.us;
                row.vs_f16 = f16_us.count({b, ctx}) ? f16_us[{b, ctx}] / row.us : 0;
                row.sdpa_us = sdpa.count({b, ctx}) ? sdpa[{b, ctx}] : 0;
                row.vs_sdpa = row.sdpa_us > 0 ? row.sdpa_us / row.us : 0;
                rows.push_back(row);
                printf("%-5s batch %2d ctx %6d: %9.1f us  %7.0f GB/s  %5.1f%% of copy  x%.2f vs f16  x%.2f vs sdpa  (b2b %.1f us)\n",
                       tn, b, ctx, row.us, row.gbs, row.pct_copy, row.vs_f16, row.vs_sdpa, row.b2b_us);
                // n_q query tokens per sequence in one call, timed as above: its time over the one-token step's
                for (int m : multis) {
                    for (int w = 0; w < 3; w++)
                        OK(kvq_cuda_attn_decode_multi(c, 0, b, ids.data(), m, KVQ_DTYPE_F16, dq, dout, &ap, st));
                    std::vector<float> tm;
                    auto multi = [&] {
                        return kvq_cuda_attn_decode_multi(c, 0, b, ids.data(), m, KVQ_DTYPE_F16, dq, dout, &ap, st);
                    };
                    for (int r = 0; r < reps; r++) {
                        float ms;
                        if (flushed_ms(multi, &ms)) return 1;
                        tm.push_back(ms);
                    }
                    const double us = median(tm) * 1000.0;
                    printf("%-5s batch %2d ctx %6d: multi n_q %2d %9.1f us  x%.2f of the 1-token step (%.2f per token)\n", tn, b,
                           ctx, m, us, us / row.us, us / row.us / m);
                }
                fflush(stdout);
            }
            kvq_cuda_cache_free(c);
        }
    }
    std::stable_sort(rows.begin(), rows.end(), [](const Row &a, const Row &b) { return a.type_index < b.type_index; });
    if (!out_dir) return 0;
    std::string md = std::string(out_dir) + "/bench-cuda.md", csv = std::string(out_dir) + "/bench-cuda.csv";
    FILE *f = fopen(csv.c_str(), "w");
    if (f) {
        fprintf(f, "type,batch,ctx,us_per_step_layer,kv_gb_per_s,pct_copy_bw,speedup_vs_f16,speedup_vs_sdpa,sdpa_us,back_to_back_us\n");
        for (auto &r : rows)
            fprintf(f, "%s,%d,%d,%.2f,%.1f,%.1f,%.3f,%.3f,%.2f,%.2f\n", r.type.c_str(), r.batch, r.ctx, r.us, r.gbs, r.pct_copy,
                    r.vs_f16, r.vs_sdpa, r.sdpa_us, r.b2b_us);
        fclose(f);
    }
    f = fopen(md.c_str(), "w");
    if (f) {
        fprintf(f, "# kvq CUDA decode benchmark\n\n");
        fprintf(f, "Device: %s (%d SMs). Measured device-to-device copy bandwidth: %.0f GB/s (bytes read + written).\n\n",
                prop.name, prop.multiProcessorCount, copy_gbs);
        fprintf(f, "Decode kernel: %s%s.\n\n", kname, penv && portable ? ", selected with KVQ_CUDA_PORTABLE=1" : "");
        fprintf(f, "Caches: %s%s; fp16 window %s%s%s.\n\n", plain ? "rotation and sinks off (--plain)"
                                             : "kvq.h section 10's defaults (q8 keys rotated; q4, q3, q2 rotated and one sink; q3 with its non-uniform levels)",
                qnorm ? ", Q-Norm of the grouped roles (--qnorm)" : "",
                residual < 0 ? "the default (R = 128 for q4/q3/q2, none for the per-token types)" : std::to_string(residual).c_str(),
                rotate >= 0 ? ("; rotate " + std::to_string(rotate)).c_str() : "", sinks >= 0 ? ("; sinks " + std::to_string(sinks)).c_str() : "");
        fprintf(f, "Attention shape %s: %d query heads, %d KV heads, head_dim %d, one layer; fp16 queries and "
                   "outputs. Each figure is the median of %d runs timed with CUDA events, after 3 warm-up runs, with the "
                   "L2 flushed before every run (%s). `GB/s` counts the KV bytes the kernel must read (pages "
                   "with their scales, plus fp16 window rows). `vs SDPA`: torch `scaled_dot_product_attention` (fp16, "
                   "enable_gqa) timed the same way by bench/bench_sdpa.py, read from %s.\n\n", shape, NQH, H, D, reps,
                flush_write ? ("a " + std::to_string(flush_bytes >> 20) + " MiB memset, whose dirty lines are written back during the timed call").c_str()
                            : ("by reading a " + std::to_string(flush_bytes >> 20) + " MiB buffer, which leaves clean lines").c_str(),
                sdpa_path ? sdpa_path : "(no --sdpa file)");
        fprintf(f, "| type | batch | context | µs / step / layer | KV GB/s | %% of copy BW | × vs our F16 | × vs SDPA | SDPA µs | back-to-back µs |\n");
        fprintf(f, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for (auto &r : rows)
            fprintf(f, "| %s | %d | %d | %.1f | %.0f | %.1f | %.2f | %.2f | %.1f | %.1f |\n", r.type.c_str(), r.batch, r.ctx, r.us,
                    r.gbs, r.pct_copy, r.vs_f16, r.vs_sdpa, r.sdpa_us, r.b2b_us);
        fprintf(f, "\n## Append (quantize on append)\n\nAt context %d, batch %d, one layer: 64 decode steps (1 token per "
                   "sequence; device time of each call, the host's work hidden behind a GPU spin), of which the grouped "
                   "types' slowest flushes a 64-token group of every sequence's window into a page; and prefill chunks "
                   "of %d tokens per sequence.\n\n", ctxs.back(), maxb, CH);
        fprintf(f, "| type | decode step µs (median) | slowest step µs | mean µs per step | mean µs per token | prefill-chunk "
                   "ns per token |\n|---|---:|---:|---:|---:|---:|\n");
        for (auto &l : append_lines) fprintf(f, "%s\n", l.c_str());
        fclose(f);
    }
    printf("wrote %s and %s\n", md.c_str(), csv.c_str());
    return 0;
}

#ifdef KVQ_BENCH_CUDA_STANDALONE
int main(int argc, char **argv) { return kvq_bench_cuda_main(argc, argv); }
#endif

// GPU tests of the CUDA backend against the CPU core: the same K/V appended to a CPU kvq_cache and a device
// cache must give byte-identical pages and windows (kvq_seq_view_get vs kvq_cuda_seq_read), and decode / prefill
// must match kvq_attn_decode / kvq_attn_prefill within NMSE bounds. Ragged batches, page boundaries, window
// flushes, sliding window, soft-cap, every type, head dims 64 and 128, lengths 1 to 128k. Fork (shared pages, copy
// on write) and truncate (into the window, into the pages) against kvq_seq_fork / kvq_seq_truncate, with page
// accounting (pages_free, pages_shared) equal to the CPU cache's after every step, and their error paths.
// kvq.h section 10 on the GPU: the same tests with the rotation (K, V, KV; seeds), attention sinks (1, 4, the most a
// sink page holds) and the defaults (-1, resolved alike on both sides), sinks compared byte for byte too.
// Both decode kernels (issue 19): the tests run with the device's default kernel (Hopper's on an H100/H200), then a
// pass with KVQ_CUDA_PORTABLE=1 set at cache creation runs the decode/prefill comparisons again on the portable
// kernel (cp.async pipeline: what sm_80..sm_89 and sm_100+ GPUs run), every type, head dims 64 and 128.
// Without a usable GPU: prints "SKIP: <reason>" and returns 77. Environment: KVQ_TEST_QUICK=1 skips the long
// sequences; KVQ_TEST_ONLY=<type name> runs one type's ragged tests; KVQ_TEST_ROWS=1 prints the prefill rows that
// are off; KVQ_CUDA_PORTABLE=1 runs every test on the portable kernel (and skips the second pass);
// KVQ_TEST_NO_PORTABLE=1 skips the second pass. The decode kernel's A/B switches (KVQ_CUDA_SPLIT_ROT, _WIN_LAST) are
// compared with its defaults (test_switches); the whole suite may also run under either.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <string>
#include <vector>

#include "kvq.h"
#include "kvq_cuda.h"

static int g_fail = 0;
extern "C" int kvq_cuda__fail_alloc_in(int n);  // test hook of kvq_cuda.cu (not in kvq_cuda.h)
#define CHECK(cond, ...)                                                                                             \
    do {                                                                                                             \
        if (!(cond)) {                                                                                               \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                                              \
            printf(__VA_ARGS__);                                                                                     \
            printf("\n");                                                                                            \
            g_fail++;                                                                                                \
        }                                                                                                            \
    } while (0)
#define OK(call)                                                                                                     \
    do {                                                                                                             \
        kvq_status s_ = (call);                                                                                      \
        if (s_ != KVQ_OK) {                                                                                          \
            printf("FAIL %s:%d: %s -> %d (%s / %s)\n", __FILE__, __LINE__, #call, (int)s_, kvq_last_error(),          \
                   kvq_cuda_last_error());                                                                           \
            exit(1);                                                                                                 \
        }                                                                                                            \
    } while (0)
#define CU(call)                                                                                                     \
    do {                                                                                                             \
        cudaError_t e_ = (call);                                                                                     \
        if (e_ != cudaSuccess) {                                                                                     \
            printf("FAIL %s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_));                     \
            exit(1);                                                                                                 \
        }                                                                                                            \
    } while (0)

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static float frand(void) {  // uniform in [-1, 1)
    g_rng ^= g_rng << 13, g_rng ^= g_rng >> 7, g_rng ^= g_rng << 17;
    return (float)((g_rng >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}
static uint16_t f2h(float f) { return __half_as_ushort(__float2half_rn(f)); }

static const char *tname(kvq_type t) { return kvq_type_get_traits(t)->name; }
// "q8", or "q8/q4" for Q8 keys with Q4 values
static const char *tnames(kvq_type tk, int tv) {
    static char buf[4][32];
    static int k = 0;
    char *b = buf[k++ % 4];
    if (tv < 0 || tv == (int)tk) snprintf(b, 32, "%s", tname(tk));
    else snprintf(b, 32, "%s/%s", tname(tk), tname((kvq_type)tv));
    return b;
}

// Quality mechanisms of the caches make_pair builds (kvq.h section 10): 0 = off (the plain formats), -1 = defaults
static int g_rot = 0, g_sinks = 0, g_qnorm = 0;  // g_qnorm: Q-Norm roles (0 off)
static int g_nuq = 0;  // non-uniform level roles (Q3's only on the GPU; -1: the default, Q3's roles)
static uint32_t g_seed = 0;
static bool portable_env(void) {  // the caches created now get the portable decode kernel (kvq_cuda.h section 1)
    const char *e = getenv("KVQ_CUDA_PORTABLE");
    return e && e[0] && strcmp(e, "0") != 0;
}
static const char *mech_name(void) {
    static char b[64];
    const char *port = portable_env() ? " portable" : "";
    if (!g_rot && !g_sinks && !g_qnorm && !g_nuq) return port;
    static const char *const qn[4] = {"", " qnorm=k", " qnorm=v", " qnorm=kv"};  // KVQ_ROLES_*
    char nq[16] = "";
    if (g_nuq) snprintf(nq, sizeof nq, " nuq=%d", g_nuq);
    snprintf(b, sizeof b, " rot=%d sinks=%d%s%s%s%s", g_rot, g_sinks, qn[g_qnorm & 3], nq, g_seed ? " seed" : "", port);
    return b;
}

struct Pair {
    kvq_cache *cpu;
    kvq_cuda_cache *gpu;
    int H, D, layers;
};

// Appends the same random tokens to both caches; dt: input dtype (F32 or F16). g_misalign: the device K/V start one
// element into their allocations (no vector loads: the append kernels' scalar path).
static bool g_misalign = false;
static void append_both(Pair &p, int layer, int n, const int32_t *ids, const int32_t *nt, kvq_dtype dt, float outlier) {
    int64_t tot = 0;
    for (int i = 0; i < n; i++) tot += nt[i];
    size_t ne = (size_t)tot * p.H * p.D;
    std::vector<float> k(ne), v(ne);
    for (size_t e = 0; e < ne; e++) {
        k[e] = frand() * 2.0f + 0.5f * sinf((float)(e % p.D));  // channel structure, like real keys
        v[e] = frand();
        if (outlier > 0 && e % 997 == 0) k[e] *= outlier;
    }
    std::vector<uint16_t> kh(ne), vh(ne);
    size_t esz = dt == KVQ_DTYPE_F32 ? 4 : 2;
    const void *hk = k.data(), *hv = v.data();
    if (dt == KVQ_DTYPE_F16) {
        for (size_t e = 0; e < ne; e++) kh[e] = f2h(k[e]), vh[e] = f2h(v[e]);
        hk = kh.data(), hv = vh.data();
    }
    OK(kvq_append(p.cpu, layer, n, ids, nt, dt, hk, hv));
    char *dk = nullptr, *dv = nullptr;
    const size_t off = g_misalign ? esz : 0;
    if (ne) {
        CU(cudaMalloc(&dk, ne * esz + off));
        CU(cudaMalloc(&dv, ne * esz + off));
        CU(cudaMemcpy(dk + off, hk, ne * esz, cudaMemcpyHostToDevice));
        CU(cudaMemcpy(dv + off, hv, ne * esz, cudaMemcpyHostToDevice));
    }
    OK(kvq_cuda_append(p.gpu, layer, n, ids, nt, dt, ne ? dk + off : nullptr, ne ? dv + off : nullptr, 0));
    CU(cudaDeviceSynchronize());
    cudaFree(dk);
    cudaFree(dv);
}

// Byte comparison of pages and window of (seq, layer).
static void compare_bytes(Pair &p, int32_t seq, int layer, const char *what) {
    kvq_seq_view view;
    OK(kvq_seq_view_get(p.cpu, seq, layer, &view));
    int64_t paged = 0;
    int32_t win = 0;
    OK(kvq_cuda_seq_read(p.gpu, seq, layer, &paged, &win, nullptr, nullptr, nullptr, 0));
    CHECK(paged == view.paged_tokens && win == view.window_tokens, "%s seq %d: gpu paged %lld win %d, cpu %lld %d", what,
          seq, (long long)paged, win, (long long)view.paged_tokens, view.window_tokens);
    if (paged != view.paged_tokens || win != view.window_tokens) return;
    size_t pb = view.layout.page_bytes, row = (size_t)p.H * p.D;
    std::vector<uint8_t> pages((size_t)view.n_pages * pb);
    std::vector<uint16_t> wk((size_t)win * row), wv((size_t)win * row);
    OK(kvq_cuda_seq_read(p.gpu, seq, layer, nullptr, nullptr, pages.data(), wk.data(), wv.data(), 0));
    // compare only the written part: token rows < paged and their params; simplest exact check is per page up
    // to the last page, whose unwritten slots are zero on both sides only for fresh pages, so compare rows.
    const kvq_page_layout &L = view.layout;
    long bad = 0;
    for (int pg = 0; pg < view.n_pages; pg++) {
        const uint8_t *c = view.arena + (size_t)view.pages[pg] * pb, *g = pages.data() + (size_t)pg * pb;
        int ntok = (int)(paged - (int64_t)pg * L.page_tokens);
        if (ntok >= L.page_tokens) {
            if (memcmp(c, g, pb)) {
                for (size_t b = 0; b < pb; b++) bad += c[b] != g[b];
                if (bad) printf("  %s seq %d page %d: first diff at byte %zu\n", what, seq, pg,
                                (size_t)(std::mismatch(c, c + pb, g).first - c));
            }
        } else {
            for (int h = 0; h < p.H; h++)
                for (int r = 0; r < 2; r++) {
                    size_t off = r ? L.v_offset + h * L.v_block_bytes : L.k_offset + h * L.k_block_bytes;
                    size_t rb = r ? L.v_row_bytes : L.k_row_bytes;
                    bad += memcmp(c + off, g + off, rb * ntok) != 0;
                    kvq_type t = r ? L.type_v : L.type_k;  // per-token scales of the written slots
                    if (t == KVQ_TYPE_Q8 || t == KVQ_TYPE_FP8)
                        bad += memcmp(c + off + rb * L.page_tokens, g + off + rb * L.page_tokens, 2 * (size_t)ntok) != 0;
                }
        }
    }
    CHECK(bad == 0, "%s seq %d: %ld page bytes differ", what, seq, bad);
    // sinks (kvq.h section 10): fp16 rows [H][D] of sink pages, token t at row t % SR of page t / SR
    int32_t gs = -1;
    OK(kvq_cuda_seq_read_sinks(p.gpu, seq, layer, &gs, nullptr, nullptr, 0));
    CHECK(gs == view.sink_tokens, "%s seq %d: gpu %d sink tokens, cpu %d", what, seq, gs, view.sink_tokens);
    if (gs == view.sink_tokens && gs > 0) {
        std::vector<uint16_t> sk((size_t)gs * row), sv((size_t)gs * row);
        OK(kvq_cuda_seq_read_sinks(p.gpu, seq, layer, nullptr, sk.data(), sv.data(), 0));
        long sbad = 0;
        for (int t = 0; t < gs; t++) {
            const int SR = view.sink_rows_per_page, r = t % SR;
            const uint16_t *ck = (const uint16_t *)(view.arena + (size_t)view.sink_pages[t / SR] * pb) + (size_t)r * row;
            const uint16_t *cv = ck + (size_t)SR * row;
            sbad += memcmp(ck, sk.data() + (size_t)t * row, row * 2) != 0;
            sbad += memcmp(cv, sv.data() + (size_t)t * row, row * 2) != 0;
        }
        CHECK(sbad == 0, "%s seq %d: %ld sink rows differ", what, seq, sbad);
    }
    long wbad = 0;
    for (size_t e = 0; e < (size_t)win * row; e++) wbad += (wk[e] != view.window_k[e]) + (wv[e] != view.window_v[e]);
    CHECK(wbad == 0, "%s seq %d: %ld window values differ", what, seq, wbad);
}

static double nmse(const float *a, const float *ref, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i])) return INFINITY;
        double d = (double)a[i] - ref[i];
        num += d * d, den += (double)ref[i] * ref[i];
    }
    return den > 0 ? num / den : num;
}

static void compare_decode(Pair &p, int layer, int n, const int32_t *ids, int nqh, int window, float softcap,
                           kvq_dtype qo, double bound, const char *what) {
    kvq_attn_params ap = kvq_attn_params_default(nqh);
    ap.window = window;
    ap.softcap = softcap;
    size_t ne = (size_t)n * nqh * p.D;
    std::vector<float> q(ne), ref(ne), got(ne);
    for (auto &x : q) x = frand() * 1.5f;
    std::vector<uint16_t> qh(ne), oh(ne);
    if (qo == KVQ_DTYPE_F16)
        for (size_t e = 0; e < ne; e++) qh[e] = f2h(q[e]), q[e] = __half2float(__ushort_as_half(qh[e]));
    OK(kvq_attn_decode(p.cpu, layer, n, ids, q.data(), ref.data(), &ap));
    size_t esz = qo == KVQ_DTYPE_F32 ? 4 : 2;
    void *dq, *dout;
    CU(cudaMalloc(&dq, ne * esz));
    CU(cudaMalloc(&dout, ne * esz));
    CU(cudaMemcpy(dq, qo == KVQ_DTYPE_F32 ? (void *)q.data() : (void *)qh.data(), ne * esz, cudaMemcpyHostToDevice));
    CU(cudaMemset(dout, 0xff, ne * esz));  // NaN poison: every element must be written
    OK(kvq_cuda_attn_decode(p.gpu, layer, n, ids, qo, dq, dout, &ap, 0));
    CU(cudaDeviceSynchronize());
    if (qo == KVQ_DTYPE_F32) CU(cudaMemcpy(got.data(), dout, ne * 4, cudaMemcpyDeviceToHost));
    else {
        CU(cudaMemcpy(oh.data(), dout, ne * 2, cudaMemcpyDeviceToHost));
        for (size_t e = 0; e < ne; e++) got[e] = __half2float(__ushort_as_half(oh[e]));
    }
    double e = nmse(got.data(), ref.data(), ne);
    CHECK(e < bound, "%s: decode NMSE %.3g >= %.1g", what, e, bound);
    printf("  %-40s decode nmse %.2e\n", what, e);
    cudaFree(dq);
    cudaFree(dout);
}

// kvq_cuda_attn_prefill against the CPU's kvq_attn_prefill, through both kernels (KVQ_CUDA_PREFILL_TILES, read per
// call): the tiled one (prefill.cu: its CTAs of 128 (row, query head) rows, the positions split where query tiles are
// few) and the decode kernel's entries
static void compare_prefill(Pair &p, int layer, int32_t seq, int n_q, int nqh, int window, const char *what, float softcap = 0.f,
                            kvq_dtype qo = KVQ_DTYPE_F32) {
    kvq_attn_params ap = kvq_attn_params_default(nqh);
    ap.window = window;
    ap.softcap = softcap;
    size_t ne = (size_t)n_q * nqh * p.D;
    std::vector<float> q(ne), ref(ne), got(ne);
    for (auto &x : q) x = frand();
    std::vector<uint16_t> qh(ne), oh(ne);
    if (qo == KVQ_DTYPE_F16)  // the engine's dtype: the reference gets the same rounded queries
        for (size_t e = 0; e < ne; e++) qh[e] = f2h(q[e]), q[e] = __half2float(__ushort_as_half(qh[e]));
    OK(kvq_attn_prefill(p.cpu, layer, seq, n_q, q.data(), ref.data(), &ap));
    const size_t esz = qo == KVQ_DTYPE_F32 ? 4 : 2;
    void *dq, *dout;
    CU(cudaMalloc(&dq, ne * esz));
    CU(cudaMalloc(&dout, ne * esz));
    CU(cudaMemcpy(dq, qo == KVQ_DTYPE_F32 ? (void *)q.data() : (void *)qh.data(), ne * esz, cudaMemcpyHostToDevice));
    auto fetch = [&](std::vector<float> &dst) {
        if (qo == KVQ_DTYPE_F32) CU(cudaMemcpy(dst.data(), dout, ne * 4, cudaMemcpyDeviceToHost));
        else {
            CU(cudaMemcpy(oh.data(), dout, ne * 2, cudaMemcpyDeviceToHost));
            for (size_t e = 0; e < ne; e++) dst[e] = __half2float(__ushort_as_half(oh[e]));
        }
    };
    const char *old = getenv("KVQ_CUDA_PREFILL_TILES");
    const std::string keep = old ? old : "";
    for (int tiled = 1; tiled >= 0; tiled--) {
        setenv("KVQ_CUDA_PREFILL_TILES", tiled ? "1" : "0", 1);
        const char *kn = tiled ? "tiled" : "entries";
        CU(cudaMemset(dout, 0xff, ne * esz));  // NaN poison: every element must be written
        OK(kvq_cuda_attn_prefill(p.gpu, layer, seq, n_q, qo, dq, dout, &ap, 0));
        CU(cudaDeviceSynchronize());
        fetch(got);
        double e = nmse(got.data(), ref.data(), ne);
        // The same call again must give the same bits: a race between the ring's bulk copies and the consumers' reads
        // (fixed by a proxy fence in decode.cuh) changed one (row, KV head) pair's output in 4-10 of 30 calls of the
        // F16 D64 case, by up to 1e-2 NMSE in that pair; the NMSE over the call stayed under the bound above in most runs.
        {
            std::vector<float> g2(ne);
            int diff = 0;
            for (int rep = 0; rep < 20; rep++) {
                OK(kvq_cuda_attn_prefill(p.gpu, layer, seq, n_q, qo, dq, dout, &ap, 0));
                fetch(g2);
                diff += memcmp(g2.data(), got.data(), ne * 4) != 0;
            }
            CHECK(diff == 0, "%s: %d of 20 identical prefill calls (%s) gave different bits", what, diff, kn);
        }
        if (getenv("KVQ_TEST_ROWS") && e > 1e-6) {  // debugging: which (row, query head) rows are off
            const size_t rl = (size_t)nqh * p.D;
            for (int r = 0; r < n_q; r++)
                for (int hq = 0; hq < nqh; hq++) {
                    double er = nmse(got.data() + r * rl + hq * p.D, ref.data() + r * rl + hq * p.D, p.D);
                    if (er > 1e-5) printf("    row %d head %d nmse %.2e got %g ref %g\n", r, hq, er, got[r * rl + hq * p.D], ref[r * rl + hq * p.D]);
                }
        }
        CHECK(e < 1e-4, "%s: prefill (%s) NMSE %.3g", what, kn, e);
        printf("  %-40s prefill n_q %d%s%s %s nmse %.2e\n", what, n_q, softcap > 0 ? " softcap" : "",
               qo == KVQ_DTYPE_F16 ? " f16 q/out" : "", kn, e);
    }
    if (old) setenv("KVQ_CUDA_PREFILL_TILES", keep.c_str(), 1);
    else unsetenv("KVQ_CUDA_PREFILL_TILES");
    cudaFree(dq);
    cudaFree(dout);
}

// Multi-token decode (kvq_cuda_attn_decode_multi): n_q query tokens of each sequence in one call against the CPU's
// kvq_attn_prefill of each; the entries pack up to 8 / (nqh / H) tokens (decode.cuh: per-column causal masks)
static void compare_multi(Pair &p, int layer, int n, const int32_t *ids, int n_q, int nqh, kvq_dtype qo, const char *what) {
    kvq_attn_params ap = kvq_attn_params_default(nqh);
    const size_t per = (size_t)n_q * nqh * p.D, ne = per * n;
    std::vector<float> q(ne), ref(ne), got(ne);
    for (auto &x : q) x = frand() * 1.5f;
    std::vector<uint16_t> qh(ne), oh(ne);
    if (qo == KVQ_DTYPE_F16)
        for (size_t e = 0; e < ne; e++) qh[e] = f2h(q[e]), q[e] = __half2float(__ushort_as_half(qh[e]));
    for (int i = 0; i < n; i++) OK(kvq_attn_prefill(p.cpu, layer, ids[i], n_q, q.data() + i * per, ref.data() + i * per, &ap));
    const size_t esz = qo == KVQ_DTYPE_F32 ? 4 : 2;
    void *dq, *dout;
    CU(cudaMalloc(&dq, ne * esz));
    CU(cudaMalloc(&dout, ne * esz));
    CU(cudaMemcpy(dq, qo == KVQ_DTYPE_F32 ? (void *)q.data() : (void *)qh.data(), ne * esz, cudaMemcpyHostToDevice));
    CU(cudaMemset(dout, 0xff, ne * esz));  // NaN poison: every element must be written
    OK(kvq_cuda_attn_decode_multi(p.gpu, layer, n, ids, n_q, qo, dq, dout, &ap, 0));
    CU(cudaDeviceSynchronize());
    if (qo == KVQ_DTYPE_F32) CU(cudaMemcpy(got.data(), dout, ne * 4, cudaMemcpyDeviceToHost));
    else {
        CU(cudaMemcpy(oh.data(), dout, ne * 2, cudaMemcpyDeviceToHost));
        for (size_t e = 0; e < ne; e++) got[e] = __half2float(__ushort_as_half(oh[e]));
    }
    double worst = 0;  // per (sequence, token): a mask off by one position shows in its row, not in the mean
    for (int i = 0; i < n; i++)
        for (int r = 0; r < n_q; r++) {
            const size_t o = i * per + (size_t)r * nqh * p.D;
            worst = std::max(worst, nmse(got.data() + o, ref.data() + o, (size_t)nqh * p.D));
        }
    CHECK(worst < 1e-4, "%s: multi-token decode (n_q %d, %d query heads) worst row NMSE %.3g", what, n_q, nqh, worst);
    printf("  %-40s multi n_q %d nqh %d worst nmse %.2e\n", what, n_q, nqh, worst);
    // errors leave nothing enqueued and are named
    CHECK(kvq_cuda_attn_decode_multi(p.gpu, layer, n, ids, 0, qo, dq, dout, &ap, 0) == KVQ_ERR_INVALID_ARG, "n_q 0");
    cudaFree(dq);
    cudaFree(dout);
}

// tv: the value type (-1: t, the key type)
static Pair make_pair(kvq_type t, int H, int D, int layers, int64_t tokens, int max_seqs, int residual, int tv = -1) {
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.n_layers = layers;
    cfg.n_kv_heads = H;
    cfg.head_dim = D;
    cfg.type_k = t;
    cfg.type_v = tv < 0 ? t : (kvq_type)tv;
    cfg.max_seqs = max_seqs;
    cfg.residual = residual;
    cfg.rotate = g_rot, cfg.sinks = g_sinks, cfg.rotation_seed = g_seed; /* kvq.h section 10 (the CPU is the byte reference) */
    cfg.nonuniform = g_nuq, cfg.qnorm = g_qnorm;
    kvq_page_layout L;
    OK(kvq_page_layout_make(cfg.type_k, cfg.type_v, H, D, 64, 64, &L));
    cfg.arena_bytes = (size_t)((tokens + 64 * max_seqs) / 64 + 2 + (g_sinks ? max_seqs : 0)) * layers * L.page_bytes;
    Pair p;
    p.H = H, p.D = D, p.layers = layers;
    OK(kvq_cache_create(&cfg, &p.cpu));
    OK(kvq_cuda_cache_create(&cfg, 0, 0, &p.gpu));
    kvq_page_layout Lg;
    kvq_cache_config cc, cg;
    OK(kvq_cache_get_config(p.cpu, &cc, nullptr));
    OK(kvq_cuda_cache_get_config(p.gpu, &cg, &Lg));
    CHECK(cc.rotate == cg.rotate && cc.sinks == cg.sinks && cc.nonuniform == cg.nonuniform && cc.rotation_seed == cg.rotation_seed &&
              cc.qnorm == cg.qnorm,
          "%s: resolved rotate/sinks/nonuniform/qnorm: cpu %d/%d/%d/%d, gpu %d/%d/%d/%d", tnames(t, tv), cc.rotate, cc.sinks,
          cc.nonuniform, cc.qnorm, cg.rotate, cg.sinks, cg.nonuniform, cg.qnorm);
    CHECK(L.page_bytes == Lg.page_bytes && L.k_block_bytes == Lg.k_block_bytes && L.v_block_bytes == Lg.v_block_bytes &&
              L.v_offset == Lg.v_offset && L.group == Lg.group && L.value_group == Lg.value_group,
          "layouts differ");
    return p;
}
static void free_pair(Pair &p) {
    kvq_cache_free(p.cpu);
    kvq_cuda_cache_free(p.gpu);
}

// The GPU decode of n sequences for host queries q (fp32 in, qo on the device): outputs as floats
static std::vector<float> gpu_decode(Pair &p, int n, const int32_t *ids, int nqh, const std::vector<float> &q, kvq_dtype qo) {
    kvq_attn_params ap = kvq_attn_params_default(nqh);
    const size_t ne = q.size(), esz = qo == KVQ_DTYPE_F32 ? 4 : 2;
    std::vector<uint16_t> qh(ne), oh(ne);
    std::vector<float> got(ne);
    for (size_t e = 0; e < ne; e++) qh[e] = f2h(q[e]);
    void *dq, *dout;
    CU(cudaMalloc(&dq, ne * esz));
    CU(cudaMalloc(&dout, ne * esz));
    CU(cudaMemcpy(dq, qo == KVQ_DTYPE_F32 ? (const void *)q.data() : (const void *)qh.data(), ne * esz, cudaMemcpyHostToDevice));
    CU(cudaMemset(dout, 0xff, ne * esz));
    OK(kvq_cuda_attn_decode(p.gpu, 0, n, ids, qo, dq, dout, &ap, 0));
    CU(cudaDeviceSynchronize());
    if (qo == KVQ_DTYPE_F32) CU(cudaMemcpy(got.data(), dout, ne * 4, cudaMemcpyDeviceToHost));
    else {
        CU(cudaMemcpy(oh.data(), dout, ne * 2, cudaMemcpyDeviceToHost));
        for (size_t e = 0; e < ne; e++) got[e] = __half2float(__ushort_as_half(oh[e]));
    }
    cudaFree(dq);
    cudaFree(dout);
    return got;
}

// The decode kernel's A/B switches (kvq_cuda.h section 2), read at cache creation: the output's un-rotation fused into
// the kernel's stores must give the bits of the separate kernel (KVQ_CUDA_SPLIT_ROT=1), and the window and sink units
// read before the pages the result of reading them after (KVQ_CUDA_WIN_LAST=1) up to fp32 summation order, and so
// must another weight of the window units in the split over CTAs (KVQ_CUDA_WIN_WEIGHT=3: other CTAs hold them). Short
// sequences (a pair inside one CTA) and long ones (pairs split over CTAs, merged by the last), rotated values.
static void test_switches(kvq_type t, int D, int tv, kvq_dtype qo) {
    const int H = 2, nqh = 8, NS = 4;
    const int32_t lens[NS] = {3, 150, 4100, 30000};
    const char *envs[4] = {nullptr, "KVQ_CUDA_SPLIT_ROT", "KVQ_CUDA_WIN_LAST", "KVQ_CUDA_WIN_WEIGHT"};
    Pair p[4];
    int32_t ids[4][NS];
    const uint64_t st = g_rng;
    for (int c = 0; c < 4; c++) {
        const char *old = envs[c] ? getenv(envs[c]) : nullptr;
        const std::string keep = old ? old : "";
        if (envs[c]) setenv(envs[c], c == 3 ? "3" : "1", 1);
        p[c] = make_pair(t, H, D, 1, 34400, NS, -1, tv);
        if (envs[c] && old) setenv(envs[c], keep.c_str(), 1);
        else if (envs[c]) unsetenv(envs[c]);
        for (int i = 0; i < NS; i++) {
            OK(kvq_cuda_seq_new(p[c].gpu, &ids[c][i]));
            OK(kvq_seq_new(p[c].cpu, &ids[c][i]));
        }
        g_rng = st;
        append_both(p[c], 0, NS, ids[c], lens, KVQ_DTYPE_F16, 0.f);
        int32_t one[NS] = {1, 1, 1, 1};
        for (int s = 0; s < 3; s++) append_both(p[c], 0, NS, ids[c], one, KVQ_DTYPE_F16, 0.f);
    }
    std::vector<float> q((size_t)NS * nqh * D);
    for (auto &x : q) x = frand() * 1.5f;
    const std::vector<float> a = gpu_decode(p[0], NS, ids[0], nqh, q, qo), b = gpu_decode(p[1], NS, ids[1], nqh, q, qo),
                             c = gpu_decode(p[2], NS, ids[2], nqh, q, qo), d = gpu_decode(p[3], NS, ids[3], nqh, q, qo);
    char what[96];
    snprintf(what, sizeof what, "%s D%d %s%s", tnames(t, tv), D, qo == KVQ_DTYPE_F32 ? "f32" : "f16", mech_name());
    CHECK(memcmp(a.data(), b.data(), a.size() * 4) == 0, "%s: fused output rotation differs from the split one", what);
    const double e = nmse(c.data(), a.data(), a.size());
    CHECK(e < 1e-10, "%s: window-last vs window-first NMSE %.3g", what, e);
    const double ew = nmse(d.data(), a.data(), a.size());
    // another split merges other partials: fp32 sums in another order, measured <= 3.1e-10 (H100)
    CHECK(ew < 1e-8, "%s: window weight 3 vs the default NMSE %.3g", what, ew);
    printf("  %-40s switches: split rotation %s, window last nmse %.2e, window weight 3 nmse %.2e\n", what,
           memcmp(a.data(), b.data(), a.size() * 4) ? "DIFFERS" : "identical", e, ew);
    for (int k = 0; k < 4; k++) free_pair(p[k]);
}

// Ragged batch: prefill chunks of different lengths (page boundaries, partial groups), then decode steps that
// cross window flushes, then byte and attention comparisons.
static void test_ragged(kvq_type t, int D, int residual, kvq_dtype in_dt, int H = 4, int tv = -1) {
    const int nqh = 4 * H, NS = 7;
    const int32_t pre[NS] = {1, 63, 64, 65, 127, 200, 1000};
    Pair p = make_pair(t, H, D, 2, 16 * 2048, 8, residual, tv);
    int32_t ids[NS], ids_gpu[NS];
    for (int i = 0; i < NS; i++) {
        OK(kvq_seq_new(p.cpu, &ids[i]));
        OK(kvq_cuda_seq_new(p.gpu, &ids_gpu[i]));
        CHECK(ids[i] == ids_gpu[i], "seq ids differ");
    }
    char what[128];
    for (int layer = 0; layer < 2; layer++) {
        append_both(p, layer, NS, ids, pre, in_dt, layer ? 8.0f : 0.f);
        int32_t one[NS];
        for (int i = 0; i < NS; i++) one[i] = 1;
        for (int step = 0; step < 70; step++) append_both(p, layer, NS, ids, one, in_dt, 0.f);
        int32_t chunk[NS] = {130, 0, 3, 64, 1, 5, 77};  // a second prefill chunk
        append_both(p, layer, NS, ids, chunk, in_dt, 0.f);
    }
    snprintf(what, sizeof what, "%s D%d R%d in=%s H%d%s%s", tnames(t, tv), D, residual, in_dt == KVQ_DTYPE_F32 ? "f32" : "f16", H,
             g_misalign ? " misaligned" : "", mech_name());
    for (int layer = 0; layer < 2; layer++)
        for (int i = 0; i < NS; i++) compare_bytes(p, ids[i], layer, what);
    compare_decode(p, 1, NS, ids, nqh, 0, 0.f, KVQ_DTYPE_F32, 2e-5, what);
    char w2[160];
    snprintf(w2, sizeof w2, "%s window 100 softcap 30", what);
    compare_decode(p, 0, NS, ids, nqh, 100, 30.f, KVQ_DTYPE_F32, 2e-5, w2);
    snprintf(w2, sizeof w2, "%s f16 q/out, GQA 1", what);
    compare_decode(p, 0, NS, ids, H, 0, 0.f, KVQ_DTYPE_F16, 2e-5, w2);
    snprintf(w2, sizeof w2, "%s subset", what);
    int32_t sub[3] = {ids[6], ids[0], ids[3]};
    compare_decode(p, 1, 3, sub, 2 * H, 0, 0.f, KVQ_DTYPE_F32, 2e-5, w2);
    compare_prefill(p, 1, ids[6], 37, nqh, 0, what);
    snprintf(w2, sizeof w2, "%s window 50", what);
    compare_prefill(p, 0, ids[5], 20, nqh, 50, w2);
    // long chunks: many query tiles and page units, the positions split (tiled kernel), the window and sinks inside
    compare_prefill(p, 1, ids[6], 300, nqh, 0, what);
    snprintf(w2, sizeof w2, "%s window 100 softcap 30", what);
    compare_prefill(p, 0, ids[6], 200, nqh, 100, w2, 30.f);
    snprintf(w2, sizeof w2, "%s GQA 3", what);  // 42 tokens of 3 rows in a CTA of 128 rows: two rows unused
    compare_prefill(p, 1, ids[6], 100, 3 * H, 0, w2);
    snprintf(w2, sizeof w2, "%s GQA 1", what);
    compare_prefill(p, 0, ids[4], 127, H, 0, w2);
    compare_prefill(p, 1, ids[5], 150, nqh, 0, what, 0.f, KVQ_DTYPE_F16);  // the GPU engine's q/out dtype
    compare_multi(p, 1, NS, ids, 2, nqh, KVQ_DTYPE_F32, what);
    compare_multi(p, 0, NS, ids, 7, nqh, KVQ_DTYPE_F16, what);
    compare_multi(p, 1, 3, sub, 3, 2 * H, KVQ_DTYPE_F32, what);
    compare_multi(p, 0, NS, ids, 11, H, KVQ_DTYPE_F32, what);  // 8 + 3 tokens an entry
    {  // a sequence of 6 tokens, all of them queries: the earlier tokens' masks reach the sinks (if any)
        int32_t s6, s6g;
        OK(kvq_seq_new(p.cpu, &s6));
        OK(kvq_cuda_seq_new(p.gpu, &s6g));
        CHECK(s6 == s6g, "seq ids differ");
        const int32_t six = 6;
        for (int layer = 0; layer < 2; layer++) append_both(p, layer, 1, &s6, &six, in_dt, 0.f);
        snprintf(w2, sizeof w2, "%s 6-token seq", what);
        compare_multi(p, 0, 1, &s6, 6, H, KVQ_DTYPE_F32, w2);
        compare_multi(p, 1, 1, &s6, 6, nqh, KVQ_DTYPE_F32, w2);
        OK(kvq_seq_free(p.cpu, s6));
        OK(kvq_cuda_seq_free(p.gpu, s6));
    }
    // free and reuse
    OK(kvq_seq_free(p.cpu, ids[2]));
    OK(kvq_cuda_seq_free(p.gpu, ids[2]));
    int32_t a, b;
    OK(kvq_seq_new(p.cpu, &a));
    OK(kvq_cuda_seq_new(p.gpu, &b));
    CHECK(a == b, "reused ids differ");
    int32_t n300 = 300;
    append_both(p, 0, 1, &a, &n300, in_dt, 0.f);
    compare_bytes(p, a, 0, "reused");
    compare_decode(p, 0, 1, &a, nqh, 0, 0.f, KVQ_DTYPE_F32, 2e-5, "reused seq");
    free_pair(p);
}

static void test_long(kvq_type t, int64_t len) {
    const int H = 2, D = 128, nqh = 8;
    Pair p = make_pair(t, H, D, 1, 2 * len + 4096, 2, -1);
    int32_t ids[2];
    OK(kvq_seq_new(p.cpu, &ids[0]));
    OK(kvq_cuda_seq_new(p.gpu, &ids[0]));
    OK(kvq_seq_new(p.cpu, &ids[1]));
    OK(kvq_cuda_seq_new(p.gpu, &ids[1]));
    for (int64_t done = 0; done < len;) {
        int32_t n = (int32_t)(len - done < 16384 ? len - done : 16384);
        int32_t nt[2] = {n, n > 1000 ? 1000 : n};
        append_both(p, 0, 2, ids, nt, KVQ_DTYPE_F16, 0.f);
        done += n;
    }
    char what[96];
    snprintf(what, sizeof what, "%s long %lld%s", tname(t), (long long)len, mech_name());
    compare_bytes(p, ids[0], 0, what);
    compare_decode(p, 0, 2, ids, nqh, 0, 0.f, KVQ_DTYPE_F32, 2e-5, what);
    free_pair(p);
}

// ------------------------------------------------------------------------------------------------ decode step
// kvq_cuda_decode_step (append one token per sequence + decode, one call) against kvq_cuda_append followed by
// kvq_cuda_attn_decode on a twin cache fed the same inputs: the same output bits at every step and the same page and
// window bytes, across window flushes and page boundaries (ragged lengths, 3 sequences, 2 layers). Then its errors:
// each leaves every length and the page accounting as they were.
static std::vector<uint8_t> seq_bytes(kvq_cuda_cache *c, int32_t seq, int layer) {
    int64_t paged = 0;
    int32_t win = 0;
    kvq_cache_config cfg;
    kvq_page_layout L;
    OK(kvq_cuda_cache_get_config(c, &cfg, &L));
    OK(kvq_cuda_seq_read(c, seq, layer, &paged, &win, nullptr, nullptr, nullptr, 0));
    const size_t np = (size_t)((paged + 63) / 64), row = (size_t)L.n_kv_heads * L.head_dim;
    std::vector<uint8_t> b(np * L.page_bytes + 4 * row * win + 16, 0);
    uint16_t *wk = (uint16_t *)(b.data() + np * L.page_bytes), *wv = wk + row * win;
    OK(kvq_cuda_seq_read(c, seq, layer, nullptr, nullptr, b.data(), wk, wv, 0));
    memcpy(b.data() + b.size() - 16, &paged, 8);
    memcpy(b.data() + b.size() - 8, &win, 4);
    return b;
}

// The twin caches of the decode-step and static-plan tests: two caches of one config holding the same NS sequences
// (the same ids) and the same random prefix (pre[i] tokens in every layer), and the device buffers of one step's K,
// V, Q and the two outputs. One cache is decoded one way, its twin another, and their bits are compared.
struct Twins {
    static const int NS = 3;
    kvq_cuda_cache *a = nullptr, *b = nullptr;
    int32_t ids[NS];
    kvq_dtype dt;
    size_t esz, nq, n1;  // bytes per element; elements of Q (and of an output), of one step's K or V
    std::vector<uint8_t> hk, hv, hq;
    void *dk, *dv, *dq, *oa, *ob;
    Twins(const kvq_cache_config &cfg, const int32_t pre[NS], int nqh, kvq_dtype dt_) : dt(dt_) {
        OK(kvq_cuda_cache_create(&cfg, 0, 0, &a));
        OK(kvq_cuda_cache_create(&cfg, 0, 0, &b));
        for (int i = 0; i < NS; i++) {
            OK(kvq_cuda_seq_new(a, &ids[i]));
            OK(kvq_cuda_seq_new(b, &ids[i]));
        }
        esz = dt == KVQ_DTYPE_F32 ? 4 : 2;
        const size_t row = (size_t)cfg.n_kv_heads * cfg.head_dim, nkv = (size_t)(pre[0] + pre[1] + pre[2]) * row;
        nq = (size_t)NS * nqh * cfg.head_dim, n1 = NS * row;
        hk.resize(nkv * esz), hv.resize(nkv * esz), hq.resize(nq * esz);
        CU(cudaMalloc(&dk, nkv * esz));
        CU(cudaMalloc(&dv, nkv * esz));
        CU(cudaMalloc(&dq, nq * esz));
        CU(cudaMalloc(&oa, nq * esz));
        CU(cudaMalloc(&ob, nq * esz));
        fill(hk, nkv), fill(hv, nkv);
        CU(cudaMemcpy(dk, hk.data(), nkv * esz, cudaMemcpyHostToDevice));
        CU(cudaMemcpy(dv, hv.data(), nkv * esz, cudaMemcpyHostToDevice));
        for (int l = 0; l < cfg.n_layers; l++) {
            OK(kvq_cuda_append(a, l, NS, ids, pre, dt, dk, dv, 0));
            OK(kvq_cuda_append(b, l, NS, ids, pre, dt, dk, dv, 0));
        }
    }
    ~Twins() {
        CU(cudaFree(dk));
        CU(cudaFree(dv));
        CU(cudaFree(dq));
        CU(cudaFree(oa));
        CU(cudaFree(ob));
        kvq_cuda_cache_free(a);
        kvq_cuda_cache_free(b);
    }
    void fill(std::vector<uint8_t> &h, size_t n) {
        for (size_t e = 0; e < n; e++) {
            const float x = frand() * 2.0f;
            if (dt == KVQ_DTYPE_F32) memcpy(h.data() + 4 * e, &x, 4);
            else { const uint16_t y = f2h(x); memcpy(h.data() + 2 * e, &y, 2); }
        }
    }
    // one step's random K, V (one token per sequence) and Q, on the device
    void upload() {
        fill(hk, n1), fill(hv, n1), fill(hq, nq);
        CU(cudaMemcpy(dk, hk.data(), n1 * esz, cudaMemcpyHostToDevice));
        CU(cudaMemcpy(dv, hv.data(), n1 * esz, cudaMemcpyHostToDevice));
        CU(cudaMemcpy(dq, hq.data(), nq * esz, cudaMemcpyHostToDevice));
    }
};

static void test_decode_step(kvq_type t, int D, int residual, kvq_dtype dt) {
    const int H = 2, nqh = 8, NS = 3, LAYERS = 2, STEPS = 150;
    const int32_t pre[NS] = {1, 70, 127};
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.n_layers = LAYERS, cfg.n_kv_heads = H, cfg.head_dim = D, cfg.type_k = cfg.type_v = t;
    cfg.max_seqs = 4, cfg.residual = residual, cfg.rotate = g_rot, cfg.sinks = g_sinks, cfg.nonuniform = g_nuq;
    cfg.qnorm = g_qnorm;
    cfg.arena_bytes = kvq_cache_arena_bytes_for(&cfg, 4 * 512);
    Twins tw(cfg, pre, nqh, dt);
    kvq_cuda_cache *a = tw.a, *b = tw.b;
    const int32_t *ids = tw.ids;
    void *dk = tw.dk, *dv = tw.dv, *dq = tw.dq, *oa = tw.oa, *ob = tw.ob;
    const size_t esz = tw.esz, nq = tw.nq;
    char what[96];
    snprintf(what, sizeof what, "%s D%d R%d%s decode_step", tname(t), D, residual, mech_name());
    const int32_t ones[NS] = {1, 1, 1};
    kvq_attn_params ap = kvq_attn_params_default(nqh);
    ap.window = t == KVQ_TYPE_Q8 ? 100 : 0;  // a sliding window in one of the cases
    std::vector<uint8_t> ra(nq * esz), rb(nq * esz);
    int diff = 0;
    for (int step = 0; step < STEPS; step++) {
        for (int l = 0; l < LAYERS; l++) {
            tw.upload();
            CU(cudaMemset(ob, 0xff, nq * esz));  // NaN poison: every element must be written
            OK(kvq_cuda_append(a, l, NS, ids, ones, dt, dk, dv, 0));
            OK(kvq_cuda_attn_decode(a, l, NS, ids, dt, dq, oa, &ap, 0));
            OK(kvq_cuda_decode_step(b, l, NS, ids, dt, dk, dv, dt, dq, ob, &ap, 0));
            CU(cudaMemcpy(ra.data(), oa, nq * esz, cudaMemcpyDeviceToHost));
            CU(cudaMemcpy(rb.data(), ob, nq * esz, cudaMemcpyDeviceToHost));
            diff += memcmp(ra.data(), rb.data(), nq * esz) != 0;
        }
    }
    CHECK(diff == 0, "%s: %d of %d steps gave other bits than append + attn_decode", what, diff, STEPS * LAYERS);
    for (int i = 0; i < NS; i++)
        for (int l = 0; l < LAYERS; l++) {
            int64_t la = 0, lb = 0;
            OK(kvq_cuda_seq_length(a, ids[i], l, &la));
            OK(kvq_cuda_seq_length(b, ids[i], l, &lb));
            CHECK(la == lb && la == pre[i] + STEPS, "%s: seq %d layer %d length %lld vs %lld", what, i, l, (long long)lb,
                  (long long)la);
            CHECK(seq_bytes(a, ids[i], l) == seq_bytes(b, ids[i], l), "%s: seq %d layer %d bytes differ", what, i, l);
        }
    // errors: nothing changes
    kvq_cuda_stats s0, s1;
    OK(kvq_cuda_cache_get_stats(b, &s0));
    auto same = [&](kvq_status got, kvq_status want, const char *bad) {
        CHECK(got == want && kvq_cuda_last_error()[0], "%s: %s -> %d (%s), expected %d", what, bad, (int)got,
              kvq_cuda_last_error(), (int)want);
        OK(kvq_cuda_cache_get_stats(b, &s1));
        CHECK(s1.pages_free == s0.pages_free && s1.n_seqs == s0.n_seqs, "%s: %s changed the page accounting", what, bad);
        for (int i = 0; i < NS; i++) {
            int64_t len = 0;
            OK(kvq_cuda_seq_length(b, ids[i], 0, &len));
            CHECK(len == pre[i] + STEPS, "%s: %s changed sequence %d's length to %lld", what, bad, i, (long long)len);
        }
    };
    kvq_attn_params bp = ap;
    bp.n_q_heads = H + 1;
    same(kvq_cuda_decode_step(b, 0, NS, ids, dt, dk, dv, dt, dq, ob, &bp, 0), KVQ_ERR_SHAPE, "n_q_heads 3");
    bp = ap, bp.scale = -1.0f;
    same(kvq_cuda_decode_step(b, 0, NS, ids, dt, dk, dv, dt, dq, ob, &bp, 0), KVQ_ERR_INVALID_ARG, "scale -1");
    same(kvq_cuda_decode_step(b, 0, NS, ids, dt, dk, dv, dt, dq, ob, nullptr, 0), KVQ_ERR_NULL, "params NULL");
    same(kvq_cuda_decode_step(b, LAYERS, NS, ids, dt, dk, dv, dt, dq, ob, &ap, 0), KVQ_ERR_SHAPE, "layer 2");
    same(kvq_cuda_decode_step(b, 0, 0, ids, dt, dk, dv, dt, dq, ob, &ap, 0), KVQ_ERR_INVALID_ARG, "n_seqs 0");
    same(kvq_cuda_decode_step(b, 0, NS, ids, dt, dk, dv, dt, nullptr, ob, &ap, 0), KVQ_ERR_NULL, "q NULL");
    same(kvq_cuda_decode_step(b, 0, NS, ids, dt, dk, nullptr, dt, dq, ob, &ap, 0), KVQ_ERR_NULL, "v NULL");
    same(kvq_cuda_decode_step(b, 0, NS, ids, (kvq_dtype)7, dk, dv, dt, dq, ob, &ap, 0), KVQ_ERR_INVALID_ARG, "kv dtype 7");
    same(kvq_cuda_decode_step(b, 0, NS, ids, dt, dk, dv, (kvq_dtype)7, dq, ob, &ap, 0), KVQ_ERR_INVALID_ARG, "qo dtype 7");
    const int32_t dup[NS] = {ids[0], ids[1], ids[0]}, dead[NS] = {ids[0], 3, ids[2]};
    same(kvq_cuda_decode_step(b, 0, NS, dup, dt, dk, dv, dt, dq, ob, &ap, 0), KVQ_ERR_INVALID_ARG, "a sequence twice");
    same(kvq_cuda_decode_step(b, 0, NS, dead, dt, dk, dv, dt, dq, ob, &ap, 0), KVQ_ERR_NO_SEQ, "sequence 3");
    printf("  %-40s %d steps x %d layers: same bits as append + attn_decode\n", what, STEPS, LAYERS);
}

// Static plans (kvq_cuda.h section 5): the same sequences in two caches, one decoded with kvq_cuda_decode_step, the
// other lent to a plan: first its steps called directly, then captured once in a CUDA graph (every layer) and
// replayed. Every step must give the decode_step's bits; after kvq_cuda_static_end the pages, windows and lengths
// must be the eager cache's and both go on alike. A fork before the plan makes it copy the shared pages it writes.
// Then: lent sequences refused elsewhere, bad plans refused with nothing changed, a token past max_tokens dropped.
static void test_static(kvq_type t, int D, int residual, kvq_dtype dt) {
    const int H = 2, nqh = 8, NS = 3, LAYERS = 2, STEPS1 = 70, STEPS2 = 90;
    const int32_t pre[NS] = {1, 70, 127};
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.n_layers = LAYERS, cfg.n_kv_heads = H, cfg.head_dim = D, cfg.type_k = cfg.type_v = t;
    cfg.max_seqs = 6, cfg.residual = residual, cfg.rotate = g_rot, cfg.sinks = g_sinks, cfg.nonuniform = g_nuq;
    cfg.qnorm = g_qnorm;
    cfg.arena_bytes = kvq_cache_arena_bytes_for(&cfg, 5 * 1024);
    Twins tw(cfg, pre, nqh, dt);
    kvq_cuda_cache *a = tw.a, *b = tw.b;
    const int32_t *ids = tw.ids;
    void *dk = tw.dk, *dv = tw.dv, *dq = tw.dq, *oa = tw.oa, *ob = tw.ob;
    const size_t esz = tw.esz, nq = tw.nq;
    char what[96];
    snprintf(what, sizeof what, "%s D%d R%d%s static plan", tname(t), D, residual, mech_name());
    int32_t fk[2];
    for (int i = 0; i < 2; i++) {  // shared pages (and sink pages) the plan must copy before writing
        OK(kvq_cuda_seq_fork(a, ids[i + 1], &fk[i], 0));
        OK(kvq_cuda_seq_fork(b, ids[i + 1], &fk[i], 0));
    }
    kvq_attn_params ap = kvq_attn_params_default(nqh);
    ap.window = t == KVQ_TYPE_Q8 ? 100 : 0;  // a sliding window in one of the cases
    const int64_t maxt = pre[2] + STEPS1 + STEPS2 + 40;
    kvq_cuda_stats s0, s1;
    OK(kvq_cuda_cache_get_stats(b, &s0));
    kvq_cuda_static *plan = nullptr, *p2 = nullptr;
    // bad plans: refused, nothing changed
    auto refused = [&](kvq_status got, kvq_status want, const char *bad) {
        CHECK(got == want && kvq_cuda_last_error()[0], "%s: %s -> %d (%s), expected %d", what, bad, (int)got,
              kvq_cuda_last_error(), (int)want);
        OK(kvq_cuda_cache_get_stats(b, &s1));
        CHECK(s1.pages_free == s0.pages_free && s1.pages_shared == s0.pages_shared, "%s: %s changed the pages", what, bad);
    };
    refused(kvq_cuda_static_create(b, NS, ids, pre[2] - 1, &ap, dt, dt, 0, &p2), KVQ_ERR_RANGE, "max_tokens < length");
    refused(kvq_cuda_static_create(b, NS, ids, 0, &ap, dt, dt, 0, &p2), KVQ_ERR_RANGE, "max_tokens 0");
    refused(kvq_cuda_static_create(b, NS, ids, 1 << 22, &ap, dt, dt, 0, &p2), KVQ_ERR_CACHE_FULL, "max_tokens 4M");
    refused(kvq_cuda_static_create(b, NS, ids, 3000, &ap, dt, dt, 0, &p2), KVQ_ERR_CACHE_FULL, "more pages than free");
    refused(kvq_cuda_static_create(b, 0, ids, maxt, &ap, dt, dt, 0, &p2), KVQ_ERR_INVALID_ARG, "n_seqs 0");
    const int32_t dup[2] = {ids[0], ids[0]}, dead[2] = {ids[0], 5};  // 0..4: the sequences and their forks
    refused(kvq_cuda_static_create(b, 2, dup, maxt, &ap, dt, dt, 0, &p2), KVQ_ERR_INVALID_ARG, "a sequence twice");
    refused(kvq_cuda_static_create(b, 2, dead, maxt, &ap, dt, dt, 0, &p2), KVQ_ERR_NO_SEQ, "sequence 5");
    refused(kvq_cuda_static_create(b, NS, ids, maxt, nullptr, dt, dt, 0, &p2), KVQ_ERR_NULL, "params NULL");
    refused(kvq_cuda_static_create(b, NS, ids, maxt, &ap, (kvq_dtype)7, dt, 0, &p2), KVQ_ERR_INVALID_ARG, "dtype 7");
    CHECK(!p2, "%s: a refused plan was returned", what);
    OK(kvq_cuda_static_create(b, NS, ids, maxt, &ap, dt, dt, 0, &plan));
    // lent: refused everywhere else; one plan per cache
    OK(kvq_cuda_cache_get_stats(b, &s0));
    refused(kvq_cuda_static_create(b, 1, &fk[0], maxt, &ap, dt, dt, 0, &p2), KVQ_ERR_INVALID_ARG, "a second plan");
    const int32_t one = 1;
    refused(kvq_cuda_append(b, 0, 1, &ids[1], &one, dt, dk, dv, 0), KVQ_ERR_INVALID_ARG, "append to a lent sequence");
    refused(kvq_cuda_attn_decode(b, 0, 1, &ids[1], dt, dq, ob, &ap, 0), KVQ_ERR_INVALID_ARG, "decode a lent sequence");
    refused(kvq_cuda_seq_free(b, ids[0]), KVQ_ERR_INVALID_ARG, "free a lent sequence");
    refused(kvq_cuda_seq_truncate(b, ids[0], 0, 0), KVQ_ERR_INVALID_ARG, "truncate a lent sequence");
    int32_t tmp;
    refused(kvq_cuda_seq_fork(b, ids[0], &tmp, 0), KVQ_ERR_INVALID_ARG, "fork a lent sequence");
    CHECK(kvq_cuda_static_step(plan, LAYERS, dk, dv, dq, ob, 0) == KVQ_ERR_SHAPE, "%s: layer 2 stepped", what);
    CHECK(kvq_cuda_static_step(plan, 0, dk, dv, nullptr, ob, 0) == KVQ_ERR_NULL, "%s: q NULL stepped", what);
    std::vector<uint8_t> ra(nq * esz), rb(nq * esz);
    int diff = 0, steps = 0;
    auto compare = [&](int l) {
        OK(kvq_cuda_decode_step(a, l, NS, ids, dt, dk, dv, dt, dq, oa, &ap, 0));
        CU(cudaMemcpy(ra.data(), oa, nq * esz, cudaMemcpyDeviceToHost));
        CU(cudaMemcpy(rb.data(), ob, nq * esz, cudaMemcpyDeviceToHost));
        diff += memcmp(ra.data(), rb.data(), nq * esz) != 0;
        steps++;
    };
    for (int step = 0; step < STEPS1; step++)
        for (int l = 0; l < LAYERS; l++) {
            tw.upload();
            CU(cudaMemset(ob, 0xff, nq * esz));  // NaN poison: every element must be written
            OK(kvq_cuda_static_step(plan, l, dk, dv, dq, ob, 0));
            compare(l);
        }
    // captured: one layer per graph, fixed buffers whose contents change between replays
    cudaStream_t cs;
    CU(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
    cudaGraphExec_t ge[LAYERS];
    for (int l = 0; l < LAYERS; l++) {
        cudaGraph_t g;
        CU(cudaStreamBeginCapture(cs, cudaStreamCaptureModeGlobal));
        OK(kvq_cuda_static_step(plan, l, dk, dv, dq, ob, cs));
        CU(cudaStreamEndCapture(cs, &g));
        CU(cudaGraphInstantiate(&ge[l], g, 0));
        CU(cudaGraphDestroy(g));
    }
    for (int step = 0; step < STEPS2; step++)
        for (int l = 0; l < LAYERS; l++) {
            tw.upload();
            CU(cudaMemset(ob, 0xff, nq * esz));
            CU(cudaGraphLaunch(ge[l], cs));
            CU(cudaStreamSynchronize(cs));
            compare(l);
        }
    CHECK(diff == 0, "%s: %d of %d steps gave other bits than kvq_cuda_decode_step", what, diff, steps);
    int64_t lens[NS];
    OK(kvq_cuda_static_lengths(plan, 1, lens, 0));
    for (int i = 0; i < NS; i++)
        CHECK(lens[i] == pre[i] + STEPS1 + STEPS2, "%s: plan length of seq %d %lld", what, i, (long long)lens[i]);
    OK(kvq_cuda_static_end(plan, 0));
    for (int l = 0; l < LAYERS; l++) CU(cudaGraphExecDestroy(ge[l]));
    CU(cudaStreamDestroy(cs));
    // given back: the same state as the eager cache, and both go on alike (eager steps, then fork/truncate)
    kvq_cuda_stats sa, sb;
    OK(kvq_cuda_cache_get_stats(a, &sa));
    OK(kvq_cuda_cache_get_stats(b, &sb));
    CHECK(sa.pages_free == sb.pages_free && sa.pages_shared == sb.pages_shared, "%s: pages free %lld/%lld shared %lld/%lld",
          what, (long long)sb.pages_free, (long long)sa.pages_free, (long long)sb.pages_shared, (long long)sa.pages_shared);
    auto same_state = [&](const char *when) {
        for (int i = 0; i < NS; i++)
            for (int l = 0; l < LAYERS; l++) {
                int64_t la = 0, lb = 0;
                OK(kvq_cuda_seq_length(a, ids[i], l, &la));
                OK(kvq_cuda_seq_length(b, ids[i], l, &lb));
                CHECK(la == lb, "%s %s: seq %d layer %d length %lld vs %lld", what, when, i, l, (long long)lb, (long long)la);
                CHECK(seq_bytes(a, ids[i], l) == seq_bytes(b, ids[i], l), "%s %s: seq %d layer %d bytes differ", what, when, i, l);
                if (i > 0) CHECK(seq_bytes(a, fk[i - 1], l) == seq_bytes(b, fk[i - 1], l), "%s %s: fork %d bytes", what, when, i);
            }
    };
    same_state("after the plan");
    diff = 0, steps = 0;
    for (int step = 0; step < 70; step++)
        for (int l = 0; l < LAYERS; l++) {
            tw.upload();
            OK(kvq_cuda_decode_step(b, l, NS, ids, dt, dk, dv, dt, dq, ob, &ap, 0));
            compare(l);
        }
    CHECK(diff == 0, "%s: after the plan, %d of %d eager steps differ", what, diff, steps);
    same_state("after eager steps");
    // max_tokens reached: the step drops the token, end says so, the state stays consistent
    int64_t len0 = 0;
    OK(kvq_cuda_seq_length(b, ids[2], 0, &len0));
    OK(kvq_cuda_static_create(b, 1, &ids[2], len0 + 2, &ap, dt, dt, 0, &plan));
    for (int step = 0; step < 3; step++)
        for (int l = 0; l < LAYERS; l++) OK(kvq_cuda_static_step(plan, l, dk, dv, dq, ob, 0));
    CHECK(kvq_cuda_static_end(plan, 0) == KVQ_ERR_CACHE_FULL, "%s: a dropped token not reported", what);
    int64_t len1 = 0;
    OK(kvq_cuda_seq_length(b, ids[2], 1, &len1));
    CHECK(len1 == len0 + 2, "%s: length %lld after max_tokens %lld", what, (long long)len1, (long long)len0 + 2);
    // a live plan at kvq_cuda_cache_free: freed with the cache
    OK(kvq_cuda_static_create(b, 1, &ids[0], len0 + 100, &ap, dt, dt, 0, &plan));  // ~Twins frees it with b
    printf("  %-40s %d direct + %d captured steps x %d layers: same bits as decode_step\n", what, STEPS1, STEPS2, LAYERS);
}

// kvq_cuda_decode_step when the cache or the device is full: a page table with room for one page (CACHE_FULL once the
// window must flush into a second page) and every device allocation of a first call failing in turn
// (OUT_OF_MEMORY): the cache unchanged, and the next call works with the bits of a run that never failed.
static void test_decode_step_full() {
    const int H = 2, D = 128, NQ = 8;
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.n_layers = 1, cfg.n_kv_heads = H, cfg.head_dim = D, cfg.max_seqs = 1, cfg.residual = 0, cfg.sinks = 0;
    cfg.rotate = KVQ_ROLES_KV, cfg.type_k = cfg.type_v = KVQ_TYPE_Q8;  // rotated values: the output scratch too
    cfg.arena_bytes = kvq_cache_arena_bytes_for(&cfg, 512);
    std::vector<float> h((size_t)NQ * D), hq(h.size());
    for (size_t i = 0; i < h.size(); i++) h[i] = sinf(0.37f * (float)i), hq[i] = cosf(0.11f * (float)i);
    float *dk, *dq, *dout;
    CU(cudaMalloc(&dk, h.size() * 4));
    CU(cudaMalloc(&dq, h.size() * 4));
    CU(cudaMalloc(&dout, h.size() * 4));
    CU(cudaMemcpy(dk, h.data(), h.size() * 4, cudaMemcpyHostToDevice));  // K = V: the first H * D values
    CU(cudaMemcpy(dq, hq.data(), hq.size() * 4, cudaMemcpyHostToDevice));
    kvq_attn_params ap = kvq_attn_params_default(NQ);
    std::vector<std::vector<float>> outs;
    int failed = 0;
    for (int n = 1; n <= 16; n++) {
        kvq_cuda_cache *c;
        OK(kvq_cuda_cache_create(&cfg, 0, 64, &c));  // one page per (sequence, layer)
        int32_t seq;
        OK(kvq_cuda_seq_new(c, &seq));
        kvq_cuda__fail_alloc_in(n);
        kvq_status st = kvq_cuda_decode_step(c, 0, 1, &seq, KVQ_DTYPE_F32, dk, dk, KVQ_DTYPE_F32, dq, dout, &ap, 0);
        const bool reached = kvq_cuda__fail_alloc_in(0) == 0;
        int64_t len = -1;
        OK(kvq_cuda_seq_length(c, seq, 0, &len));
        if (st != KVQ_OK) {
            failed++;
            kvq_cuda_stats s;
            OK(kvq_cuda_cache_get_stats(c, &s));
            CHECK(st == KVQ_ERR_OUT_OF_MEMORY && len == 0 && s.pages_free == s.pages_total,
                  "decode_step failalloc n=%d: -> %d (%s), length %lld", n, (int)st, kvq_cuda_last_error(), (long long)len);
            OK(kvq_cuda_decode_step(c, 0, 1, &seq, KVQ_DTYPE_F32, dk, dk, KVQ_DTYPE_F32, dq, dout, &ap, 0));
        }
        std::vector<float> o(h.size());
        CU(cudaMemcpy(o.data(), dout, o.size() * 4, cudaMemcpyDeviceToHost));
        outs.push_back(o);
        if (!reached) {  // every allocation of the first call was made to fail once: now the full page table
            for (int i = 1; i < 64; i++)
                OK(kvq_cuda_decode_step(c, 0, 1, &seq, KVQ_DTYPE_F32, dk, dk, KVQ_DTYPE_F32, dq, dout, &ap, 0));
            st = kvq_cuda_decode_step(c, 0, 1, &seq, KVQ_DTYPE_F32, dk, dk, KVQ_DTYPE_F32, dq, dout, &ap, 0);
            OK(kvq_cuda_seq_length(c, seq, 0, &len));
            CHECK(st == KVQ_ERR_CACHE_FULL && len == 64, "decode_step into a full page table -> %d, length %lld", (int)st,
                  (long long)len);
            kvq_cuda_cache_free(c);
            break;
        }
        kvq_cuda_cache_free(c);
    }
    CHECK(failed >= 2, "decode_step failalloc: %d allocations failed (expected >= 2: workspace, scratch)", failed);
    for (size_t i = 0; i + 1 < outs.size(); i++)
        CHECK(memcmp(outs[i].data(), outs.back().data(), outs.back().size() * 4) == 0,
              "decode_step failalloc: the output after failure %zu differs from a run without one", i);
    printf("decode_step: %d device allocations failed in turn, all clean; a full page table refused cleanly\n", failed);
    CU(cudaFree(dk));
    CU(cudaFree(dq));
    CU(cudaFree(dout));
}

// ------------------------------------------------------------------------------------------------ fork, truncate
// Every step is applied to the CPU cache and the device cache; the CPU core is the reference for contents (bytes),
// lengths, sequence ids and page accounting.
static void check_stats(Pair &p, const char *what) {
    kvq_cache_stats cs;
    kvq_cuda_stats gs;
    OK(kvq_cache_get_stats(p.cpu, &cs));
    OK(kvq_cuda_cache_get_stats(p.gpu, &gs));
    CHECK(cs.pages_total == gs.pages_total && cs.pages_free == gs.pages_free && cs.pages_shared == gs.pages_shared &&
              cs.n_seqs == gs.n_seqs,
          "%s: pages total/free/shared, seqs: gpu %lld/%lld/%lld %d, cpu %lld/%lld/%lld %d", what,
          (long long)gs.pages_total, (long long)gs.pages_free, (long long)gs.pages_shared, gs.n_seqs,
          (long long)cs.pages_total, (long long)cs.pages_free, (long long)cs.pages_shared, cs.n_seqs);
}
static int32_t new_both(Pair &p) {
    int32_t a, b;
    OK(kvq_seq_new(p.cpu, &a));
    OK(kvq_cuda_seq_new(p.gpu, &b));
    CHECK(a == b, "new: seq ids differ (cpu %d gpu %d)", a, b);
    return a;
}
static int32_t fork_both(Pair &p, int32_t src) {
    int32_t a, b;
    OK(kvq_seq_fork(p.cpu, src, &a));
    OK(kvq_cuda_seq_fork(p.gpu, src, &b, 0));
    CHECK(a == b, "fork: seq ids differ (cpu %d gpu %d)", a, b);
    return a;
}
static void truncate_both(Pair &p, int32_t seq, int64_t n) {
    OK(kvq_seq_truncate(p.cpu, seq, n));
    OK(kvq_cuda_seq_truncate(p.gpu, seq, n, 0));
    CU(cudaDeviceSynchronize());
}
static void free_both(Pair &p, int32_t seq) {
    OK(kvq_seq_free(p.cpu, seq));
    OK(kvq_cuda_seq_free(p.gpu, seq));
}
// n new tokens to one sequence, in every layer
static void append_seq(Pair &p, int32_t seq, int32_t n, kvq_dtype dt) {
    for (int l = 0; l < p.layers; l++) append_both(p, l, 1, &seq, &n, dt, 0.f);
}
static void compare_all(Pair &p, const int32_t *ids, int n, const char *what) {
    for (int l = 0; l < p.layers; l++)
        for (int i = 0; i < n; i++) compare_bytes(p, ids[i], l, what);
    check_stats(p, what);
}
static void cpu_split(Pair &p, int32_t seq, int layer, int64_t *paged, int32_t *win) {
    kvq_seq_view v;
    OK(kvq_seq_view_get(p.cpu, seq, layer, &v));
    *paged = v.paged_tokens, *win = v.window_tokens;
}
// Appends the same K/V on both sides expecting `expect` from both; on an error both caches must be unchanged.
static void append_expect(Pair &p, int layer, int n, const int32_t *ids, const int32_t *nt, kvq_status expect,
                          const char *what) {
    int64_t tot = 0;
    for (int i = 0; i < n; i++) tot += nt[i];
    size_t ne = (size_t)tot * p.H * p.D;
    std::vector<float> k(ne), v(ne);
    for (size_t e = 0; e < ne; e++) k[e] = frand(), v[e] = frand();
    kvq_status sc = kvq_append(p.cpu, layer, n, ids, nt, KVQ_DTYPE_F32, k.data(), v.data());
    void *dk = nullptr, *dv = nullptr;
    CU(cudaMalloc(&dk, ne * 4 + 4));
    CU(cudaMalloc(&dv, ne * 4 + 4));
    CU(cudaMemcpy(dk, k.data(), ne * 4, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(dv, v.data(), ne * 4, cudaMemcpyHostToDevice));
    kvq_status sg = kvq_cuda_append(p.gpu, layer, n, ids, nt, KVQ_DTYPE_F32, dk, dv, 0);
    CU(cudaDeviceSynchronize());
    cudaFree(dk);
    cudaFree(dv);
    CHECK(sc == expect && sg == expect, "%s: append returned cpu %d gpu %d, expected %d (%s)", what, (int)sc, (int)sg,
          (int)expect, kvq_last_error());
}

static void test_fork_truncate(kvq_type t, int D, int residual, kvq_dtype dt, int tv = -1) {
    const int H = 2, nqh = 8;
    Pair p = make_pair(t, H, D, 2, 4096, 8, residual, tv);
    char what[160], w2[200];
    snprintf(what, sizeof what, "fork/truncate %s D%d R%d%s", tnames(t, tv), D, residual, mech_name());
    const int32_t a = new_both(p);
    int32_t n0 = 300, n1 = 70;
    append_both(p, 0, 1, &a, &n0, dt, 0.f);
    append_both(p, 1, 1, &a, &n0, dt, 4.f);
    append_both(p, 1, 1, &a, &n1, dt, 0.f);  // layer 1 is longer: truncation cuts the layers at different places
    kvq_cuda_stats g0, g1;
    OK(kvq_cuda_cache_get_stats(p.gpu, &g0));
    const int32_t b = fork_both(p, a);
    OK(kvq_cuda_cache_get_stats(p.gpu, &g1));
    CHECK(g1.pages_free == g0.pages_free && g1.pages_shared == g0.pages_total - g0.pages_free && g1.n_seqs == 2,
          "%s: fork allocated pages or shares %lld of %lld", what, (long long)g1.pages_shared,
          (long long)(g0.pages_total - g0.pages_free));
    int32_t ab[2] = {a, b};
    snprintf(w2, sizeof w2, "%s after fork", what);
    compare_all(p, ab, 2, w2);
    // parent and child diverge (copy on write of the shared, partly filled last page where there is one)
    for (int l = 0; l < 2; l++) {
        int32_t na = 37, nb = 20;
        append_both(p, l, 1, &a, &na, dt, 0.f);
        append_both(p, l, 1, &b, &nb, dt, 0.f);
    }
    snprintf(w2, sizeof w2, "%s diverged", what);
    compare_all(p, ab, 2, w2);
    // two sharers in one call: c forked from b, then b and c appended together (b copies, c writes in place)
    const int32_t c = fork_both(p, b);
    int32_t bc[2] = {b, c}, abc[3] = {a, b, c};
    for (int l = 0; l < 2; l++) {
        int32_t one[2] = {1, 1}, more[2] = {65, 3};
        for (int step = 0; step < 5; step++) append_both(p, l, 2, bc, one, dt, 0.f);
        append_both(p, l, 2, bc, more, dt, 0.f);
        int32_t three[3] = {2, 1, 1};
        append_both(p, l, 3, abc, three, dt, 0.f);
    }
    snprintf(w2, sizeof w2, "%s three seqs", what);
    compare_all(p, abc, 3, w2);
    compare_decode(p, 0, 3, abc, nqh, 0, 0.f, KVQ_DTYPE_F32, 2e-5, w2);
    compare_decode(p, 1, 3, abc, nqh, 0, 0.f, KVQ_DTYPE_F16, 2e-5, w2);
    compare_prefill(p, 1, c, 20, nqh, 0, w2);

    // truncate a inside layer 0's window (layer 1 is longer: there the cut may fall in the pages), then re-append
    int64_t pg;
    int32_t wn;
    cpu_split(p, a, 0, &pg, &wn);
    if (wn >= 2) {
        truncate_both(p, a, pg + wn / 2);
        snprintf(w2, sizeof w2, "%s cut in window", what);
        compare_all(p, abc, 3, w2);
        append_seq(p, a, 50, dt);
        compare_all(p, abc, 3, w2);
        compare_decode(p, 0, 3, abc, nqh, 0, 0.f, KVQ_DTYPE_F32, 2e-5, w2);
    }
    // truncate a inside its pages, off the group boundary (grouped types: the cut group goes back to the window)
    cpu_split(p, a, 0, &pg, &wn);
    CHECK(pg >= 64, "%s: %lld tokens in pages, the test expects >= 64", what, (long long)pg);
    truncate_both(p, a, pg - 10);
    snprintf(w2, sizeof w2, "%s cut in pages", what);
    compare_all(p, abc, 3, w2);
    {
        int64_t len0, len1;
        OK(kvq_cuda_seq_length(p.gpu, a, 0, &len0));
        OK(kvq_cuda_seq_length(p.gpu, a, 1, &len1));
        CHECK(len0 == pg - 10 && len1 == pg - 10, "%s: lengths %lld %lld after truncate to %lld", w2, (long long)len0,
              (long long)len1, (long long)(pg - 10));
    }
    compare_decode(p, 1, 3, abc, nqh, 0, 0.f, KVQ_DTYPE_F32, 2e-5, w2);
    append_seq(p, a, 100, dt);
    snprintf(w2, sizeof w2, "%s cut in pages, re-appended", what);
    compare_all(p, abc, 3, w2);
    compare_decode(p, 0, 3, abc, nqh, 0, 0.f, KVQ_DTYPE_F32, 2e-5, w2);
    compare_decode(p, 1, 3, abc, nqh, 100, 30.f, KVQ_DTYPE_F32, 2e-5, w2);
    // truncate b, whose pages c shares, inside them: c keeps its content, shared pages lose one reference
    truncate_both(p, b, 64 + 5);
    snprintf(w2, sizeof w2, "%s shared cut", what);
    compare_all(p, abc, 3, w2);
    append_seq(p, b, 80, dt);
    compare_all(p, abc, 3, w2);
    compare_decode(p, 0, 3, abc, nqh, 0, 0.f, KVQ_DTYPE_F32, 2e-5, w2);
    // c: to a page boundary, beyond its length (no-op), to 0, re-appended
    truncate_both(p, c, 128);
    truncate_both(p, c, 100000);
    snprintf(w2, sizeof w2, "%s cut at 128", what);
    compare_all(p, abc, 3, w2);
    truncate_both(p, c, 2);  // with sinks S > 2: inside the sinks
    snprintf(w2, sizeof w2, "%s cut at 2", what);
    compare_all(p, abc, 3, w2);
    compare_decode(p, 1, 3, abc, nqh, 0, 0.f, KVQ_DTYPE_F32, 2e-5, w2);
    truncate_both(p, c, 0);
    snprintf(w2, sizeof w2, "%s cut to 0", what);
    compare_all(p, abc, 3, w2);
    append_seq(p, c, 10, dt);
    compare_all(p, abc, 3, w2);
    compare_decode(p, 1, 3, abc, nqh, 0, 0.f, KVQ_DTYPE_F32, 2e-5, w2);

    // errors: nothing changes
    kvq_cuda_stats s0, s1;
    OK(kvq_cuda_cache_get_stats(p.gpu, &s0));
    int32_t x = -7;
    CHECK(kvq_cuda_seq_fork(p.gpu, 7, &x, 0) == KVQ_ERR_NO_SEQ && x == -7, "fork of a free slot");
    CHECK(kvq_cuda_seq_fork(p.gpu, -1, &x, 0) == KVQ_ERR_NO_SEQ, "fork of -1");
    CHECK(kvq_cuda_seq_fork(p.gpu, a, nullptr, 0) == KVQ_ERR_NULL, "fork to NULL");
    CHECK(kvq_cuda_seq_fork(nullptr, a, &x, 0) == KVQ_ERR_NULL, "fork of a NULL cache");
    CHECK(kvq_cuda_seq_truncate(p.gpu, a, -1, 0) == KVQ_ERR_RANGE, "truncate to -1");
    CHECK(kvq_cuda_seq_truncate(p.gpu, 7, 0, 0) == KVQ_ERR_NO_SEQ, "truncate of a free slot");
    CHECK(kvq_cuda_seq_truncate(nullptr, a, 0, 0) == KVQ_ERR_NULL, "truncate of a NULL cache");
    int32_t fk[5];
    for (int i = 0; i < 5; i++) fk[i] = fork_both(p, i % 2 ? a : c);  // 8 live: the cache's max_seqs
    kvq_cuda_stats s2;
    OK(kvq_cuda_cache_get_stats(p.gpu, &s2));
    CHECK(kvq_cuda_seq_fork(p.gpu, a, &x, 0) == KVQ_ERR_TOO_MANY_SEQS && x == -7, "%s: fork past max_seqs", what);
    OK(kvq_cuda_cache_get_stats(p.gpu, &s1));
    CHECK(s1.n_seqs == 8 && s1.pages_free == s2.pages_free && s1.pages_shared == s2.pages_shared,
          "%s: failed fork changed the cache", what);
    CHECK(s2.pages_free == s0.pages_free, "%s: forks allocated pages", what);
    snprintf(w2, sizeof w2, "%s max forks", what);
    compare_all(p, fk, 5, w2);
    for (int i = 0; i < 5; i++) free_both(p, fk[i]);
    compare_all(p, abc, 3, w2);

    // page accounting through the frees: parent first, then the children
    free_both(p, a);
    snprintf(w2, sizeof w2, "%s freed a", what);
    compare_all(p, bc, 2, w2);
    free_both(p, b);
    snprintf(w2, sizeof w2, "%s freed b", what);
    compare_all(p, &c, 1, w2);
    compare_decode(p, 0, 1, &c, nqh, 0, 0.f, KVQ_DTYPE_F32, 2e-5, w2);
    free_both(p, c);
    check_stats(p, what);
    OK(kvq_cuda_cache_get_stats(p.gpu, &s1));
    CHECK(s1.pages_free == s1.pages_total && s1.pages_shared == 0 && s1.n_seqs == 0, "%s: %lld of %lld pages free at the end",
          what, (long long)s1.pages_free, (long long)s1.pages_total);
    printf("  %-40s ok\n", what);
    free_pair(p);
}

// Copy on write with no free page: the append fails with KVQ_ERR_CACHE_FULL on both sides and changes nothing.
static void test_cow_full(kvq_type t, int residual) {
    const int H = 2, D = 128;
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.n_layers = 1, cfg.n_kv_heads = H, cfg.head_dim = D, cfg.type_k = cfg.type_v = t;
    cfg.max_seqs = 4, cfg.residual = residual;
    cfg.rotate = 0, cfg.sinks = 0, cfg.nonuniform = 0; /* as make_pair */
    kvq_page_layout L;
    OK(kvq_page_layout_make(t, t, H, D, 64, 64, &L));
    cfg.arena_bytes = 3 * L.page_bytes;
    Pair p;
    p.H = H, p.D = D, p.layers = 1;
    OK(kvq_cache_create(&cfg, &p.cpu));
    OK(kvq_cuda_cache_create(&cfg, 0, 0, &p.gpu));
    char what[96];
    snprintf(what, sizeof what, "cow full %s R%d", tname(t), residual);
    const int32_t a = new_both(p);
    const int32_t n = 130 + residual;  // 3 pages, the last holding 2 tokens
    append_expect(p, 0, 1, &a, &n, KVQ_OK, what);
    const int32_t b = fork_both(p, a);
    // residual + 1 tokens make one flush from an empty window (one token into the page), more from a full one
    int32_t ab[2] = {a, b}, nf[2] = {residual + 1, residual + 1};
    compare_all(p, ab, 2, what);
    append_expect(p, 0, 1, &b, nf, KVQ_ERR_CACHE_FULL, what);
    append_expect(p, 0, 2, ab, nf, KVQ_ERR_CACHE_FULL, what);
    compare_all(p, ab, 2, what);
    truncate_both(p, a, 100);  // page 3 is still b's: nothing freed, a's page 2 (36 tokens) shared; window dropped
    compare_all(p, ab, 2, what);
    append_expect(p, 0, 1, &a, nf, KVQ_ERR_CACHE_FULL, what);
    compare_all(p, ab, 2, what);
    truncate_both(p, b, 100);  // page 3 free now
    compare_all(p, ab, 2, what);
    append_expect(p, 0, 1, &a, nf, KVQ_OK, what);  // copy on write takes the free page
    append_expect(p, 0, 1, &b, nf, KVQ_OK, what);  // b's page 2 is its own now: written in place
    compare_all(p, ab, 2, what);
    kvq_cuda_stats st;
    OK(kvq_cuda_cache_get_stats(p.gpu, &st));
    CHECK(st.pages_free == 0 && st.pages_shared == 1, "%s: %lld free, %lld shared (expected 0, 1)", what,
          (long long)st.pages_free, (long long)st.pages_shared);
    compare_decode(p, 0, 2, ab, 8, 0, 0.f, KVQ_DTYPE_F32, 2e-5, what);
    free_both(p, a);
    free_both(p, b);
    check_stats(p, what);
    printf("  %-40s ok\n", what);
    free_pair(p);
}

// ------------------------------------------------------------------------------------------ device allocation failure
// The n-th device allocation (cudaMalloc in create, cudaMallocAsync of the decode workspace) fails, for n = 1, 2, ...
// until the workload no longer reaches the n-th: a failing call returns KVQ_ERR_OUT_OF_MEMORY with a message; a
// failed create returns no cache and leaves no device memory behind; a failed decode leaves the cache's lengths and
// page accounting as they were and works once memory is back, with the bits of a run that never failed.
static void test_failalloc() {
    const int H = 2, D = 128, NQ = 4, T = 200;
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.n_layers = 1, cfg.n_kv_heads = H, cfg.head_dim = D, cfg.max_seqs = 2;
    cfg.type_k = cfg.type_v = KVQ_TYPE_Q4;
    cfg.arena_bytes = kvq_cache_arena_bytes_for(&cfg, 1024);
    const size_t ne = (size_t)T * H * D;
    std::vector<float> h(ne);
    for (size_t i = 0; i < ne; i++) h[i] = sinf(0.37f * (float)i);
    float *dk, *dv, *dq, *dout;
    CU(cudaMalloc(&dk, ne * sizeof(float)));
    CU(cudaMalloc(&dv, ne * sizeof(float)));
    CU(cudaMalloc(&dq, (size_t)NQ * D * sizeof(float)));
    CU(cudaMalloc(&dout, (size_t)NQ * D * sizeof(float)));
    CU(cudaMemcpy(dk, h.data(), ne * sizeof(float), cudaMemcpyHostToDevice));
    CU(cudaMemcpy(dv, h.data() + 7, (ne - 7) * sizeof(float), cudaMemcpyHostToDevice));
    CU(cudaMemcpy(dq, h.data() + 3, (size_t)NQ * D * sizeof(float), cudaMemcpyHostToDevice));
    kvq_attn_params ap = kvq_attn_params_default(NQ);
    std::vector<std::vector<float>> outs;
    int n = 1, failed_create = 0, failed_decode = 0, failed_append = 0;
    for (bool reached = true; reached && n <= 64; n++) {
        size_t free0 = 0, free1 = 0, total = 0;
        CU(cudaDeviceSynchronize());
        CU(cudaMemGetInfo(&free0, &total));
        kvq_cuda__fail_alloc_in(n);
        kvq_cuda_cache *c = nullptr;
        kvq_status st = kvq_cuda_cache_create(&cfg, 0, 1024, &c);
        if (st != KVQ_OK) {
            failed_create++;
            CHECK(st == KVQ_ERR_OUT_OF_MEMORY && !c && kvq_cuda_last_error()[0], "failalloc n=%d: create -> %d (%s)", n,
                  (int)st, kvq_cuda_last_error());
            CU(cudaMemGetInfo(&free1, &total));
            CHECK(free1 == free0, "failalloc n=%d: a failed create kept %lld device bytes", n,
                  (long long)free0 - (long long)free1);
            reached = kvq_cuda__fail_alloc_in(0) == 0;
            continue;
        }
        int32_t seq, nt = T;
        OK(kvq_cuda_seq_new(c, &seq));
        st = kvq_cuda_append(c, 0, 1, &seq, &nt, KVQ_DTYPE_F32, dk, dv, 0);
        bool failed_this = false;
        if (st != KVQ_OK) {  // the rotation's scratch (kvq.h section 10: Q4's default rotates keys)
            failed_append++, failed_this = true;
            int64_t len = -1;
            kvq_cuda_stats sa;
            OK(kvq_cuda_seq_length(c, seq, 0, &len));
            OK(kvq_cuda_cache_get_stats(c, &sa));
            CHECK(st == KVQ_ERR_OUT_OF_MEMORY && len == 0 && sa.pages_free == sa.pages_total,
                  "failalloc n=%d: append -> %d (%s), length %lld, %lld of %lld pages free", n, (int)st,
                  kvq_cuda_last_error(), (long long)len, (long long)sa.pages_free, (long long)sa.pages_total);
            reached = kvq_cuda__fail_alloc_in(0) == 0;
            OK(kvq_cuda_append(c, 0, 1, &seq, &nt, KVQ_DTYPE_F32, dk, dv, 0));
        }
        kvq_cuda_stats s0, s1;
        int64_t len0, len1;
        OK(kvq_cuda_cache_get_stats(c, &s0));
        OK(kvq_cuda_seq_length(c, seq, 0, &len0));
        st = kvq_cuda_attn_decode(c, 0, 1, &seq, KVQ_DTYPE_F32, dq, dout, &ap, 0);
        if (st != KVQ_OK) {
            failed_decode++;
            CHECK(st == KVQ_ERR_OUT_OF_MEMORY && kvq_cuda_last_error()[0], "failalloc n=%d: decode -> %d (%s)", n, (int)st,
                  kvq_cuda_last_error());
            OK(kvq_cuda_cache_get_stats(c, &s1));
            OK(kvq_cuda_seq_length(c, seq, 0, &len1));
            CHECK(len1 == len0 && s1.pages_free == s0.pages_free && s1.n_seqs == s0.n_seqs,
                  "failalloc n=%d: a failed decode changed the cache", n);
            reached = kvq_cuda__fail_alloc_in(0) == 0;
            OK(kvq_cuda_attn_decode(c, 0, 1, &seq, KVQ_DTYPE_F32, dq, dout, &ap, 0));
        } else if (!failed_this) {
            reached = kvq_cuda__fail_alloc_in(0) == 0;
        }
        std::vector<float> o((size_t)NQ * D);
        CU(cudaMemcpy(o.data(), dout, o.size() * sizeof(float), cudaMemcpyDeviceToHost));
        outs.push_back(o);
        kvq_cuda_cache_free(c);
    }
    CHECK(n <= 64, "failalloc: still reaching allocations after 64");
    CHECK(failed_create >= 3 && failed_decode >= 1 && failed_append >= 1,
          "failalloc: %d failed creates, %d failed decodes, %d failed appends (expected >= 3, >= 1, >= 1)", failed_create,
          failed_decode, failed_append);
    for (size_t i = 0; i + 1 < outs.size(); i++)
        CHECK(memcmp(outs[i].data(), outs.back().data(), outs.back().size() * sizeof(float)) == 0,
              "failalloc: the decode after a failure differs from a run without one (%zu)", i);
    printf("failalloc: %d device allocations failed in turn (%d in create, %d in append, %d in decode): all clean\n",
           failed_create + failed_append + failed_decode, failed_create, failed_append, failed_decode);
    CU(cudaFree(dk));
    CU(cudaFree(dv));
    CU(cudaFree(dq));
    CU(cudaFree(dout));
}

int main(int argc, char **argv) {
    int n = 0;
    if (kvq_cuda_device_count(&n) != KVQ_OK || n == 0) {
        printf("SKIP: %s\n", kvq_cuda_last_error());
        return 77;
    }
    // The reference is the CPU core's scalar kernels (exact fp32): its AVX2 Q4/Q2 value kernels round softmax weights
    // to 8 bits, an error (NMSE up to ~4e-5) larger than the bounds here.
    setenv("KVQ_FORCE_SCALAR", "1", 1);
    bool quick = getenv("KVQ_TEST_QUICK") != nullptr;
    // (Q3 last: the GPU has had it since 2026-12-05)
    const kvq_type types[7] = {KVQ_TYPE_F16, KVQ_TYPE_BF16, KVQ_TYPE_Q8, KVQ_TYPE_FP8, KVQ_TYPE_Q4, KVQ_TYPE_Q2, KVQ_TYPE_Q3};
    bool long_only = getenv("KVQ_TEST_LONG_ONLY") != nullptr;
    const char *only = getenv("KVQ_TEST_ONLY");  // debugging: one type's ragged tests
    for (int ti = 0; ti < 7 && !long_only; ti++) {
        kvq_type t = types[ti];
        if (only && strcmp(only, tname(t))) continue;
        bool grouped = kvq_type_get_traits(t)->grouped;
        test_ragged(t, 128, -1, KVQ_DTYPE_F32);
        test_ragged(t, 64, -1, KVQ_DTYPE_F16);
        if (!grouped) test_ragged(t, 128, 5, KVQ_DTYPE_F32);  // per-token type through an fp16 window
        else test_ragged(t, 128, 0, KVQ_DTYPE_F16);           // KIVI without residual
        if (t == KVQ_TYPE_Q2 || t == KVQ_TYPE_Q4) test_ragged(t, 128, -1, KVQ_DTYPE_F16, 3);
        g_misalign = true;  // K/V not aligned for vector loads
        test_ragged(t, 64, -1, t % 2 ? KVQ_DTYPE_F16 : KVQ_DTYPE_F32);
        g_misalign = false;
    }
    for (int ti = 0; ti < 7 && !long_only && !only; ti++) {
        kvq_type t = types[ti];
        bool grouped = kvq_type_get_traits(t)->grouped;
        test_fork_truncate(t, 128, -1, KVQ_DTYPE_F32);
        test_fork_truncate(t, 64, grouped ? 0 : 5, KVQ_DTYPE_F16);
        if (!grouped) test_cow_full(t, ti % 2 ? 0 : 3);
    }
    // Different key and value types (as llama.cpp's --cache-type-k/-v): per-token keys with grouped values and the
    // reverse, bf16 on either side (bf16 MMAs for one role only), two grouped types
    const kvq_type mixed[][2] = {{KVQ_TYPE_Q8, KVQ_TYPE_Q4},  {KVQ_TYPE_Q4, KVQ_TYPE_Q8},  {KVQ_TYPE_F16, KVQ_TYPE_Q2},
                                 {KVQ_TYPE_Q2, KVQ_TYPE_BF16}, {KVQ_TYPE_BF16, KVQ_TYPE_FP8}, {KVQ_TYPE_FP8, KVQ_TYPE_F16},
                                 {KVQ_TYPE_Q4, KVQ_TYPE_Q2},  {KVQ_TYPE_Q2, KVQ_TYPE_Q4}};
    for (const auto &m : mixed) {
        if (long_only || (only && strcmp(only, tnames(m[0], m[1])))) continue;
        test_ragged(m[0], 128, -1, KVQ_DTYPE_F32, 4, m[1]);
        test_ragged(m[0], 64, 3, KVQ_DTYPE_F16, 4, m[1]);
        test_fork_truncate(m[0], 128, -1, KVQ_DTYPE_F32, m[1]);
        test_fork_truncate(m[0], 64, 0, KVQ_DTYPE_F16, m[1]);
    }
    // kvq.h section 10: rotation and sinks. Every type with the defaults (-1: the same resolution on both sides; Q4
    // keys rotated and one sink), each role set and sink count on its own, seeds, head dims 64 and 128, the fp16
    // window and R = 0, fork / truncate (a sink page shared, copied on write, cut inside) and a sink page's last row.
    for (int ti = 0; ti < 7 && !long_only; ti++) {
        kvq_type t = types[ti];
        if (only && strcmp(only, tname(t))) continue;
        bool grouped = kvq_type_get_traits(t)->grouped;
        g_rot = -1, g_sinks = -1;
        test_ragged(t, 128, -1, KVQ_DTYPE_F32);
        test_ragged(t, 64, grouped ? 0 : 5, KVQ_DTYPE_F16);
        if (!only) test_fork_truncate(t, 128, -1, KVQ_DTYPE_F32);
        g_rot = KVQ_ROLES_KV, g_sinks = 4, g_seed = 12345;
        test_ragged(t, 64, -1, KVQ_DTYPE_F32);
        if (!only) test_fork_truncate(t, 64, grouped ? 0 : 3, KVQ_DTYPE_F16);
        g_seed = 0;
    }
    if (!long_only && !only) {
        g_rot = KVQ_ROLES_K, g_sinks = 0;
        test_ragged(KVQ_TYPE_Q4, 128, -1, KVQ_DTYPE_F16);
        test_ragged(KVQ_TYPE_Q8, 64, 0, KVQ_DTYPE_F32);
        g_rot = KVQ_ROLES_V, g_sinks = 1;
        test_ragged(KVQ_TYPE_Q4, 128, -1, KVQ_DTYPE_F32, 4, KVQ_TYPE_Q2);  // Q4/Q2's default, spelled out
        test_fork_truncate(KVQ_TYPE_Q2, 128, -1, KVQ_DTYPE_F32);
        g_rot = 0, g_sinks = 10;  // Q2: a sink page holds 10 rows, the most this backend takes
        test_ragged(KVQ_TYPE_Q2, 128, -1, KVQ_DTYPE_F32);
        test_fork_truncate(KVQ_TYPE_Q2, 64, -1, KVQ_DTYPE_F16);
        g_rot = -1, g_sinks = -1;
        test_ragged(KVQ_TYPE_Q8, 128, -1, KVQ_DTYPE_F32, 4, KVQ_TYPE_Q4);
        test_fork_truncate(KVQ_TYPE_Q4, 128, -1, KVQ_DTYPE_F16, KVQ_TYPE_Q2);
        if (!quick) test_long(KVQ_TYPE_Q4, 40000);
        g_rot = 0, g_sinks = 0;
        // Q-Norm (kvq.h section 10): the CPU's (scale, min) bits from the flush kernels, keys and values, Q4 (min/max's
        // codes) and Q2 (codes taken again), each role alone, with the engine's other defaults and plain, D 64 and 128,
        // a prefill's flushes and the decode steps' (test_ragged), fork/truncate, the fused step and static plans
        g_qnorm = KVQ_ROLES_KV;
        test_ragged(KVQ_TYPE_Q4, 128, -1, KVQ_DTYPE_F32);
        test_ragged(KVQ_TYPE_Q2, 64, -1, KVQ_DTYPE_F16);
        test_ragged(KVQ_TYPE_Q8, 128, -1, KVQ_DTYPE_F32, 4, KVQ_TYPE_Q2);  // per-token keys: Q-Norm of the values only
        g_rot = -1, g_sinks = -1;
        test_ragged(KVQ_TYPE_Q2, 128, -1, KVQ_DTYPE_F32);
        test_ragged(KVQ_TYPE_Q4, 64, 0, KVQ_DTYPE_F16, 4, KVQ_TYPE_Q2);
        test_fork_truncate(KVQ_TYPE_Q4, 128, -1, KVQ_DTYPE_F32);
        test_decode_step(KVQ_TYPE_Q2, 128, -1, KVQ_DTYPE_F16);
        test_static(KVQ_TYPE_Q4, 128, -1, KVQ_DTYPE_F16);
        g_qnorm = KVQ_ROLES_K;
        test_ragged(KVQ_TYPE_Q2, 128, -1, KVQ_DTYPE_F32, 4, KVQ_TYPE_Q4);
        g_qnorm = KVQ_ROLES_V;
        test_fork_truncate(KVQ_TYPE_Q2, 64, -1, KVQ_DTYPE_F16);
        g_rot = 0, g_sinks = 0, g_qnorm = 0;
        // what the backend does not take: more sinks than a sink page holds, non-uniform levels, Q-Norm roles beyond KV,
        // outliers
        kvq_cache_config mc = kvq_cache_config_default();
        mc.n_layers = 1, mc.n_kv_heads = 2, mc.head_dim = 128, mc.type_k = mc.type_v = KVQ_TYPE_Q2, mc.arena_bytes = 1 << 22;
        kvq_cuda_cache *x = nullptr;
        mc.sinks = 11;
        CHECK(kvq_cuda_cache_create(&mc, 0, 0, &x) == KVQ_ERR_INVALID_ARG && !x, "q2 sinks 11 accepted");
        mc.sinks = -1, mc.nonuniform = KVQ_ROLES_K;  // Q2's non-uniform levels: the CPU's only (Q3's are on both)
        CHECK(kvq_cuda_cache_create(&mc, 0, 0, &x) == KVQ_ERR_INVALID_ARG && !x, "nonuniform accepted");
        mc.type_k = KVQ_TYPE_Q3, mc.type_v = KVQ_TYPE_Q4, mc.nonuniform = KVQ_ROLES_KV;
        CHECK(kvq_cuda_cache_create(&mc, 0, 0, &x) == KVQ_ERR_INVALID_ARG && !x, "q4 values' nonuniform accepted");
        mc.nonuniform = KVQ_ROLES_K;
        CHECK(kvq_cuda_cache_create(&mc, 0, 0, &x) == KVQ_OK && x, "q3 keys' nonuniform refused: %s", kvq_cuda_last_error());
        kvq_cuda_cache_free(x);
        x = nullptr;
        mc.type_k = mc.type_v = KVQ_TYPE_Q2, mc.nonuniform = -1;
        mc.nonuniform = -1, mc.rotate = 4;
        CHECK(kvq_cuda_cache_create(&mc, 0, 0, &x) == KVQ_ERR_INVALID_ARG && !x, "rotate 4 accepted");
        mc.rotate = -1, mc.qnorm = 4;
        CHECK(kvq_cuda_cache_create(&mc, 0, 0, &x) == KVQ_ERR_INVALID_ARG && !x, "qnorm 4 accepted");
        mc.qnorm = -2;
        CHECK(kvq_cuda_cache_create(&mc, 0, 0, &x) == KVQ_ERR_INVALID_ARG && !x, "qnorm -2 accepted");
        mc.qnorm = -1, mc.outliers = KVQ_ROLES_V; /* dense-and-sparse outliers: the CPU cache's only */
        CHECK(kvq_cuda_cache_create(&mc, 0, 0, &x) == KVQ_ERR_INVALID_ARG && !x, "outliers accepted");
    }
    // Q3 (kvq.h section 5: split bit planes) with its levels: the loops above ran it with uniform levels; here the
    // non-uniform ones (the default: -1 resolves to Q3's roles on both sides), each role alone, mixed pairs both
    // ways, Q-Norm (which keeps min/max's codes for Q3), rotation and sinks, fork/truncate, the fused step and static
    // plans, and the head dims 64, 128 and 256
    if (!long_only && (!only || !strcmp(only, "q3"))) {
        g_nuq = -1;
        test_ragged(KVQ_TYPE_Q3, 128, -1, KVQ_DTYPE_F32);
        test_ragged(KVQ_TYPE_Q3, 64, 0, KVQ_DTYPE_F16);
        test_ragged(KVQ_TYPE_Q3, 256, -1, KVQ_DTYPE_F32, 1);
        test_fork_truncate(KVQ_TYPE_Q3, 128, -1, KVQ_DTYPE_F32);
        test_ragged(KVQ_TYPE_Q3, 128, -1, KVQ_DTYPE_F16, 4, KVQ_TYPE_Q8);
        test_ragged(KVQ_TYPE_Q8, 128, 3, KVQ_DTYPE_F32, 4, KVQ_TYPE_Q3);
        test_ragged(KVQ_TYPE_Q4, 64, -1, KVQ_DTYPE_F32, 4, KVQ_TYPE_Q3);
        test_ragged(KVQ_TYPE_Q3, 128, -1, KVQ_DTYPE_F32, 4, KVQ_TYPE_Q2);
        test_ragged(KVQ_TYPE_F16, 64, -1, KVQ_DTYPE_F16, 4, KVQ_TYPE_Q3);
        g_nuq = KVQ_ROLES_K;
        test_ragged(KVQ_TYPE_Q3, 128, -1, KVQ_DTYPE_F32);
        g_nuq = KVQ_ROLES_V;
        test_fork_truncate(KVQ_TYPE_Q3, 64, 0, KVQ_DTYPE_F16);
        g_nuq = -1, g_qnorm = KVQ_ROLES_KV;
        test_ragged(KVQ_TYPE_Q3, 128, -1, KVQ_DTYPE_F32);
        test_ragged(KVQ_TYPE_Q3, 64, -1, KVQ_DTYPE_F16, 4, KVQ_TYPE_Q2);
        g_qnorm = 0, g_rot = -1, g_sinks = -1;
        test_ragged(KVQ_TYPE_Q3, 128, -1, KVQ_DTYPE_F32);
        test_ragged(KVQ_TYPE_Q3, 256, 0, KVQ_DTYPE_F16, 2);
        test_fork_truncate(KVQ_TYPE_Q3, 128, -1, KVQ_DTYPE_F16);
        test_decode_step(KVQ_TYPE_Q3, 128, -1, KVQ_DTYPE_F16);
        test_static(KVQ_TYPE_Q3, 64, -1, KVQ_DTYPE_F32);
        g_rot = KVQ_ROLES_KV, g_sinks = 4, g_seed = 12345;
        test_ragged(KVQ_TYPE_Q3, 64, -1, KVQ_DTYPE_F32);
        g_rot = 0, g_sinks = 0, g_seed = 0, g_nuq = 0;
        if (!quick) test_long(KVQ_TYPE_Q3, 40000);
    }
    // Head dim 256 (Gemma 2/3): every type with one KV head (Gemma 3 270M's shape) and fork/truncate, mixed pairs,
    // rotation and sinks, Q-Norm, the fused step and static plans. Its grouped flushes stage the channels in two
    // chunks, and its kernels have their own ring sizes (decode.cuh, Cfg).
    for (int ti = 0; ti < 7 && !long_only; ti++) {
        kvq_type t = types[ti];
        if (only && strcmp(only, tname(t))) continue;
        bool grouped = kvq_type_get_traits(t)->grouped;
        test_ragged(t, 256, -1, KVQ_DTYPE_F32, 1);
        if (!only) test_fork_truncate(t, 256, grouped ? 0 : 5, KVQ_DTYPE_F16);
    }
    if (!long_only && !only) {
        test_ragged(KVQ_TYPE_Q4, 256, -1, KVQ_DTYPE_F16, 2, KVQ_TYPE_Q2);
        test_ragged(KVQ_TYPE_Q8, 256, 3, KVQ_DTYPE_F32, 2, KVQ_TYPE_Q4);
        g_rot = -1, g_sinks = -1;
        test_ragged(KVQ_TYPE_Q4, 256, -1, KVQ_DTYPE_F32, 1);
        test_ragged(KVQ_TYPE_Q2, 256, 0, KVQ_DTYPE_F16, 2);
        test_fork_truncate(KVQ_TYPE_Q2, 256, -1, KVQ_DTYPE_F32);
        test_decode_step(KVQ_TYPE_Q4, 256, -1, KVQ_DTYPE_F16);
        test_static(KVQ_TYPE_Q2, 256, -1, KVQ_DTYPE_F32);
        g_rot = KVQ_ROLES_KV, g_sinks = 4, g_seed = 12345;
        test_ragged(KVQ_TYPE_Q8, 256, -1, KVQ_DTYPE_F16, 1);
        test_static(KVQ_TYPE_F16, 256, 0, KVQ_DTYPE_F16);
        g_rot = 0, g_sinks = 0, g_seed = 0, g_qnorm = KVQ_ROLES_KV;
        test_ragged(KVQ_TYPE_Q2, 256, -1, KVQ_DTYPE_F32, 1);
        test_ragged(KVQ_TYPE_Q4, 256, -1, KVQ_DTYPE_F16, 2, KVQ_TYPE_Q2);
        g_qnorm = 0;
    }
    if (!quick && !only) {
        test_long(KVQ_TYPE_Q8, 131072 + 77);
        test_long(KVQ_TYPE_Q4, 131072 + 100);
        test_long(KVQ_TYPE_F16, 40000);
        test_long(KVQ_TYPE_Q2, 40000);
    }
    // The portable decode kernel on the same checks: every type at head dims 128, 64 and 256 (decode, sliding window,
    // soft-cap, f16 I/O, subsets, prefill), every mixed pair, rotation and sinks, fork/truncate, the fused step, and
    // (not quick) 128k. Its caches are created with KVQ_CUDA_PORTABLE=1 (read at creation).
    if (!portable_env() && !long_only && !getenv("KVQ_TEST_NO_PORTABLE")) {
        setenv("KVQ_CUDA_PORTABLE", "1", 1);
        for (int ti = 0; ti < 7; ti++) {
            kvq_type t = types[ti];
            if (only && strcmp(only, tname(t))) continue;
            test_ragged(t, 128, -1, KVQ_DTYPE_F32);
            test_ragged(t, 64, -1, KVQ_DTYPE_F16);
            if (!kvq_type_get_traits(t)->grouped) test_ragged(t, 128, 5, KVQ_DTYPE_F32);
            else test_ragged(t, 128, 0, KVQ_DTYPE_F16);
            test_ragged(t, 256, -1, KVQ_DTYPE_F32, 1);
        }
        if (!only) {
            for (const auto &m : mixed) test_ragged(m[0], (&m - mixed) % 2 ? 64 : 128, -1, KVQ_DTYPE_F32, 4, m[1]);
            test_ragged(KVQ_TYPE_Q2, 128, -1, KVQ_DTYPE_F16, 3);
            g_rot = -1, g_sinks = -1;
            test_ragged(KVQ_TYPE_Q4, 128, -1, KVQ_DTYPE_F32);
            test_ragged(KVQ_TYPE_Q8, 64, 5, KVQ_DTYPE_F16);
            test_fork_truncate(KVQ_TYPE_Q4, 128, -1, KVQ_DTYPE_F32);
            g_rot = KVQ_ROLES_KV, g_sinks = 4, g_seed = 12345;
            test_ragged(KVQ_TYPE_Q2, 64, -1, KVQ_DTYPE_F32);
            test_ragged(KVQ_TYPE_Q4, 256, -1, KVQ_DTYPE_F16, 2, KVQ_TYPE_Q2);
            g_nuq = -1;
            test_ragged(KVQ_TYPE_Q3, 128, -1, KVQ_DTYPE_F32);
            test_ragged(KVQ_TYPE_Q4, 64, -1, KVQ_DTYPE_F16, 4, KVQ_TYPE_Q3);
            g_nuq = 0;
            test_fork_truncate(KVQ_TYPE_F16, 64, 3, KVQ_DTYPE_F16);
            g_rot = 0, g_sinks = 0, g_seed = 0;
            test_decode_step(KVQ_TYPE_F16, 64, 0, KVQ_DTYPE_F16);
            g_rot = -1, g_sinks = -1;
            test_decode_step(KVQ_TYPE_Q4, 128, -1, KVQ_DTYPE_F16);
            test_static(KVQ_TYPE_Q2, 128, -1, KVQ_DTYPE_F16);
            g_rot = 0, g_sinks = 0;
            if (!quick) {
                test_long(KVQ_TYPE_Q4, 131072 + 100);
                test_long(KVQ_TYPE_F16, 40000);
            }
        }
        unsetenv("KVQ_CUDA_PORTABLE");
    }
    test_failalloc();
    // the decode kernel's A/B switches: rotated values (Q2's default, Q4/Q3 with KV rotation), one sink, D 64/128/256
    if (!only && !long_only) {
        g_rot = -1, g_sinks = -1;
        test_switches(KVQ_TYPE_Q2, 128, -1, KVQ_DTYPE_F16);
        test_switches(KVQ_TYPE_Q4, 64, KVQ_TYPE_Q2, KVQ_DTYPE_F32);
        g_rot = KVQ_ROLES_KV, g_nuq = -1;
        test_switches(KVQ_TYPE_Q3, 128, -1, KVQ_DTYPE_F32);
        test_switches(KVQ_TYPE_F16, 256, -1, KVQ_DTYPE_F16);
        g_rot = 0, g_sinks = 0, g_nuq = 0;
    }
    // the fused decode step: plain and rotated/sink caches, per-token and grouped types, fp32 and fp16 I/O
    if (!only) {
        test_decode_step(KVQ_TYPE_F16, 64, 0, KVQ_DTYPE_F16);
        test_decode_step(KVQ_TYPE_Q8, 128, 5, KVQ_DTYPE_F32);
        g_rot = -1, g_sinks = -1;
        test_decode_step(KVQ_TYPE_Q4, 128, -1, KVQ_DTYPE_F16);
        test_decode_step(KVQ_TYPE_Q2, 64, 0, KVQ_DTYPE_F32);
        g_rot = 0, g_sinks = 0;
        test_decode_step_full();
        // static plans: per-token and grouped types, fp16 window and R = 0, rotation and sinks, fp32 and fp16 I/O
        test_static(KVQ_TYPE_F16, 64, 0, KVQ_DTYPE_F16);
        test_static(KVQ_TYPE_Q8, 128, 5, KVQ_DTYPE_F32);
        g_rot = -1, g_sinks = -1;
        test_static(KVQ_TYPE_Q4, 128, -1, KVQ_DTYPE_F16);
        test_static(KVQ_TYPE_Q2, 64, 0, KVQ_DTYPE_F32);
        test_static(KVQ_TYPE_Q8, 64, -1, KVQ_DTYPE_F16);
        g_rot = KVQ_ROLES_KV, g_sinks = 4;
        test_static(KVQ_TYPE_Q4, 64, -1, KVQ_DTYPE_F32);
        g_rot = 0, g_sinks = 0;
    }
    // argument errors
    kvq_cuda_cache *none = nullptr;
    kvq_cache_config bad = kvq_cache_config_default();
    bad.n_layers = 1, bad.n_kv_heads = 2, bad.head_dim = 96, bad.arena_bytes = 1 << 20;
    CHECK(kvq_cuda_cache_create(&bad, 0, 0, &none) == KVQ_ERR_UNSUPPORTED_HEAD_DIM && !none, "head_dim 96 accepted");
    if (g_fail) {
        printf("%d check(s) failed\n", g_fail);
        return 1;
    }
    printf("all CUDA tests passed\n");
    return 0;
}

/* Pre-RoPE keys (kvq.h section 10): the cache stores keys before RoPE and attention applies RoPE(t) to key t.
 *  - arithmetic: decode and prefill against an fp64 reference over the cache's own dequantized (pre-RoPE) keys,
 *    rotated in fp64 by their positions, every key type, both pair layouts, theta or explicit (scaled) frequencies,
 *    sinks, pages and the fp16 window, rotated (Hadamard) keys; every kernel table: NMSE < 1e-9 where the values
 *    take the fp32 kernels (the RoPE tables' fp32 angle addition: ~1e-7 per cos/sin, ~1e-13 of output NMSE; a
 *    wrong sign, pair layout or position gives ~1e-1), the integer value kernels' bounds of test_attn otherwise;
 *  - positions past 64k (70000 tokens): the angles of a segment come from fp64 sincos at its first position; fp32
 *    angles (t f rounded to 2^-24 t) would be off by ~4e-3 rad there, NMSE ~1e-5, over the 1e-9 bound;
 *  - an F16 pre-RoPE cache against a post-RoPE F16 cache (the keys RoPE'd by the caller, kvq's usual contract):
 *    both round keys to fp16 (relative 2^-12), at different points: measured NMSE 2e-7 .. 5.5e-7 (SmolLM2-like outlier channels: large logits), bound 4e-6;
 *  - after fork, truncate (a cut inside a key group) and appends to the fork: both sequences against their
 *    references (token t stays at position t);
 *  - kvq_rope_apply (kvq_read's keys -> post-RoPE) and the config's named errors;
 *  - dense-and-sparse outliers (kvq.h section 10) of pre-RoPE keys, added to the decoded rows before RoPE. */
#include "testutil.h"

/* y = RoPE(pos) x for one head vector, fp64 */
static void rope64(const float *x, double *y, int D, int neox, int64_t pos, const float *f) {
    int h = D / 2;
    for (int i = 0; i < h; i++) {
        int c0 = neox ? i : 2 * i, c1 = neox ? i + h : 2 * i + 1;
        double a = (double)pos * f[i], cs = cos(a), sn = sin(a);
        y[c0] = x[c0] * cs - x[c1] * sn, y[c1] = x[c0] * sn + x[c1] * cs;
    }
}

/* keys [T][H][D] (pre-RoPE) -> post-RoPE fp32 (from fp64) */
static float *roped(const float *k, int64_t T, int H, int D, int neox, const float *f) {
    float *o = malloc((size_t)T * H * D * sizeof(float));
    double y[256];
    for (int64_t t = 0; t < T; t++)
        for (int h = 0; h < H; h++) {
            rope64(k + ((size_t)t * H + h) * D, y, D, neox, t, f);
            for (int d = 0; d < D; d++) o[((size_t)t * H + h) * D + d] = (float)y[d];
        }
    return o;
}

/* The scalar table (fp32 weights): 1e-9. The SIMD value kernels of Q4/Q2 round the softmax weights but the largest
 * to 8 bits: test_attn measures <= 1.8e-6 on its data; these keys (outlier channels kept by RoPE's pairs) spread the
 * logits wider and leave more weights far below the largest: measured <= 1.3e-5 here, the same with and without
 * RoPE errors in the keys (the scalar table, same keys, holds 1e-9) */
static double arith_bound(kvq_type tv, const char *table) {
    if (!strcmp(table, "scalar")) return 1e-9;
    if (tv == KVQ_TYPE_Q4 || tv == KVQ_TYPE_Q2) return 3e-5;
    if (tv == KVQ_TYPE_Q8 || tv == KVQ_TYPE_Q3) return 2e-8; /* int16 weights */
    return 1e-9;
}

/* decode (one query per sequence at its last position) and prefill of the last nq tokens of `seq`, each kernel table,
 * against fp64 attention over the cache's contents RoPE'd in fp64 */
static void check_seq(kvq_cache *c, int32_t seq, int64_t T, int H, int D, int rep, int neox, const float *f, kvq_type tk,
                      kvq_type tv, const char *what) {
    const int nqh = H * rep, nq = T < 37 ? (int)T : 37;
    size_t n = (size_t)T * H * D;
    float *k = malloc(n * 4), *v = malloc(n * 4);
    CHECK_OK(kvq_read(c, seq, 0, 0, T, k, v));
    float *kr = roped(k, T, H, D, neox, f);
    float *q = malloc((size_t)nq * nqh * D * 4), *out = malloc((size_t)nq * nqh * D * 4);
    double *ref = malloc((size_t)nq * nqh * D * 8);
    for (size_t i = 0; i < (size_t)nq * nqh * D; i++) q[i] = (float)tu_normal();
    kvq_attn_params ap = kvq_attn_params_default(nqh);
    float scale = 1.0f / sqrtf((float)D);
    int64_t pos[37];
    for (int i = 0; i < nq; i++) pos[i] = T - nq + i;
    const char *nk = kvq_type_get_traits(tk)->name, *nv = kvq_type_get_traits(tv)->name;
    /* decode: the last query row set */
    tu_attn_ref(q + (size_t)(nq - 1) * nqh * D, 1, nqh, &pos[nq - 1], kr, v, T, H, D, scale, 0, 0, ref);
    for (int b = 0; b < tu_n_tables; b++) {
        tu_use_table(tu_tables[b]);
        CHECK_OK(kvq_attn_decode(c, 0, 1, &seq, q + (size_t)(nq - 1) * nqh * D, out, &ap));
        double e = tu_nmse(out, ref, (size_t)nqh * D), bound = arith_bound(tv, tu_tables[b]);
        CHECK(e < bound, "%s: decode %s/%s D=%d neox=%d T=%lld %s: NMSE %g (bound %g)", what, nk, nv, D, neox, (long long)T,
              tu_tables[b], e, bound);
    }
    tu_attn_ref(q, nq, nqh, pos, kr, v, T, H, D, scale, 0, 0, ref);
    for (int b = 0; b < tu_n_tables; b++) {
        tu_use_table(tu_tables[b]);
        CHECK_OK(kvq_attn_prefill(c, 0, seq, nq, q, out, &ap));
        double e = tu_nmse(out, ref, (size_t)nq * nqh * D);
        /* prefill rows (> 8 per item) take the fp32 value kernels */
        CHECK(e < 1e-9, "%s: prefill %s/%s D=%d neox=%d T=%lld %s: NMSE %g", what, nk, nv, D, neox, (long long)T,
              tu_tables[b], e);
    }
    unsetenv("KVQ_CPU_KERNELS");
    free(k), free(v), free(kr), free(q), free(out), free(ref);
}

static void append_all(kvq_cache *c, int32_t seq, const float *k, const float *v, int64_t T, int H, int D) {
    size_t row = (size_t)H * D;
    for (int64_t done = 0; done < T;) { /* a prefill chunk, then single tokens */
        int32_t piece = done == 0 && T > 5 ? (int32_t)(T - 5) : 1;
        CHECK_OK(kvq_append(c, 0, 1, &seq, &piece, KVQ_DTYPE_F32, k + done * row, v + done * row));
        done += piece;
    }
}

static int g_outliers; /* kvq_cache_config.outliers of run_case's caches (kvq.h section 10) */

static void run_case(kvq_type tk, kvq_type tv, int D, int H, int rep, int neox, int rot, int freqs, int64_t T) {
    float f[128];
    for (int i = 0; i < D / 2; i++) /* freqs: Llama-3-like, the low frequencies divided by 8 */
        f[i] = (float)pow(10000.0, -2.0 * i / D) / (freqs && i >= D / 4 ? 8.0f : 1.0f);
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.n_layers = 1, cfg.n_kv_heads = H, cfg.head_dim = D, cfg.type_k = tk, cfg.type_v = tv, cfg.n_threads = 2;
    cfg.rotate = rot, cfg.sinks = 1, cfg.max_seqs = 4, cfg.outliers = g_outliers;
    cfg.prerope = 1, cfg.rope_neox = neox, cfg.rope_theta = 10000.0f, cfg.rope_freqs = freqs ? f : NULL;
    cfg.arena_bytes = 3 * kvq_cache_arena_bytes_for(&cfg, T + 64);
    kvq_cache *c = NULL;
    CHECK_OK(kvq_cache_create(&cfg, &c));
    if (!c) return;
    kvq_cache_config got;
    CHECK_OK(kvq_cache_get_config(c, &got, NULL));
    CHECK(got.rope_freqs && got.rope_freqs != cfg.rope_freqs, "get_config: rope_freqs is not the cache's copy");
    for (int i = 0; got.rope_freqs && i < D / 2; i++)
        CHECK(got.rope_freqs[i] == f[i], "rope_freqs[%d] %g, expected %g", i, (double)got.rope_freqs[i], (double)f[i]);
    size_t n = (size_t)T * H * D, row = (size_t)H * D;
    float *k = malloc((n + 64 * row) * 4), *v = malloc((n + 64 * row) * 4);
    tu_fill_kv(k, v, (size_t)T + 64, H, D);
    int32_t s0, s1;
    CHECK_OK(kvq_seq_new(c, &s0));
    append_all(c, s0, k, v, T, H, D);
    check_seq(c, s0, T, H, D, rep, neox, f, tk, tv, "append");
    if (T <= 1000) {
        /* fork, cut inside a key group (G = 64 after the sink), append other tokens to the fork */
        CHECK_OK(kvq_seq_fork(c, s0, &s1));
        int64_t cut = T - 37;
        CHECK_OK(kvq_seq_truncate(c, s1, cut));
        int32_t add = 50;
        CHECK_OK(kvq_append(c, 0, 1, &s1, &add, KVQ_DTYPE_F32, k + (size_t)T * row, v + (size_t)T * row));
        check_seq(c, s1, cut + add, H, D, rep, neox, f, tk, tv, "fork+truncate+append");
        check_seq(c, s0, T, H, D, rep, neox, f, tk, tv, "fork's source");
    }
    if (tk == KVQ_TYPE_F16 && !rot) {
        /* against a post-RoPE F16 cache of the same values (RoPE'd by the caller in fp64) */
        kvq_cache_config pc = cfg;
        pc.prerope = 0, pc.rope_freqs = NULL;
        kvq_cache *cp = NULL;
        CHECK_OK(kvq_cache_create(&pc, &cp));
        int32_t sp;
        CHECK_OK(kvq_seq_new(cp, &sp));
        float *kr = roped(k, T, H, D, neox, f);
        append_all(cp, sp, kr, v, T, H, D);
        const int nqh = H * rep;
        float *q = malloc((size_t)nqh * D * 4), *o1 = malloc((size_t)nqh * D * 4), *o2 = malloc((size_t)nqh * D * 4);
        double *d2 = malloc((size_t)nqh * D * 8);
        for (int i = 0; i < nqh * D; i++) q[i] = (float)tu_normal();
        kvq_attn_params ap = kvq_attn_params_default(nqh);
        CHECK_OK(kvq_attn_decode(c, 0, 1, &s0, q, o1, &ap));
        CHECK_OK(kvq_attn_decode(cp, 0, 1, &sp, q, o2, &ap));
        for (int i = 0; i < nqh * D; i++) d2[i] = o2[i];
        double e = tu_nmse(o1, d2, (size_t)nqh * D);
        CHECK(e < 4e-6, "f16 pre-RoPE vs post-RoPE cache D=%d neox=%d T=%lld: NMSE %g", D, neox, (long long)T, e);
        printf("f16 pre-RoPE vs post-RoPE cache, %lld tokens: NMSE %.2e (bound 4e-6)\n", (long long)T, e);
        /* kvq_read + kvq_rope_apply: the post-RoPE keys (fp16 of the pre-RoPE ones, then RoPE) */
        int64_t n2 = T < 200 ? T : 200, p0 = T - n2;
        float *kk = malloc((size_t)n2 * row * 4);
        CHECK_OK(kvq_read(c, s0, 0, p0, n2, kk, NULL));
        CHECK_OK(kvq_rope_apply(c, p0, n2, 0, kk));
        double num = 0, den = 0;
        for (size_t i = 0; i < (size_t)n2 * row; i++) {
            double dd = kk[i] - kr[p0 * row + i];
            num += dd * dd, den += (double)kr[p0 * row + i] * kr[p0 * row + i];
        }
        CHECK(num / den < 1e-7, "kvq_rope_apply after kvq_read: NMSE %g against the RoPE'd keys (fp16: ~1e-7 / 12)",
              num / den);
        CHECK_OK(kvq_rope_apply(c, p0, n2, 1, kk)); /* and back */
        float *k0 = malloc((size_t)n2 * row * 4);
        CHECK_OK(kvq_read(c, s0, 0, p0, n2, k0, NULL));
        double mx = 0;
        for (size_t i = 0; i < (size_t)n2 * row; i++) mx = fmax(mx, fabs((double)kk[i] - k0[i]));
        CHECK(mx < 1e-4, "kvq_rope_apply inverse: off by %g", mx);
        free(kk), free(k0), free(kr), free(q), free(o1), free(o2), free(d2);
        kvq_cache_free(cp);
    }
    free(k), free(v);
    kvq_cache_free(c);
}

static void errors(void) {
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.n_layers = 1, cfg.n_kv_heads = 2, cfg.head_dim = 64, cfg.type_k = cfg.type_v = KVQ_TYPE_Q4;
    cfg.arena_bytes = 1 << 20;
    kvq_cache *c = NULL;
    CHECK(cfg.prerope == 0, "kvq_cache_config_default: prerope %d, expected 0 (off)", cfg.prerope);
    cfg.prerope = 2;
    CHECK_ERR(kvq_cache_create(&cfg, &c), KVQ_ERR_INVALID_ARG);
    cfg.prerope = 1, cfg.rope_theta = 0;
    CHECK_ERR(kvq_cache_create(&cfg, &c), KVQ_ERR_INVALID_ARG);
    cfg.rope_theta = NAN;
    CHECK_ERR(kvq_cache_create(&cfg, &c), KVQ_ERR_INVALID_ARG);
    cfg.rope_theta = 10000, cfg.rope_neox = 2;
    CHECK_ERR(kvq_cache_create(&cfg, &c), KVQ_ERR_INVALID_ARG);
    cfg.rope_neox = 1;
    float f[32];
    for (int i = 0; i < 32; i++) f[i] = 0.5f;
    f[31] = -1;
    cfg.rope_freqs = f;
    CHECK_ERR(kvq_cache_create(&cfg, &c), KVQ_ERR_INVALID_ARG);
    f[31] = INFINITY;
    CHECK_ERR(kvq_cache_create(&cfg, &c), KVQ_ERR_INVALID_ARG);
    CHECK(kvq_cache_capacity_tokens(&cfg) == KVQ_ERR_INVALID_ARG, "capacity_tokens: an invalid rope config passes");
    f[31] = 0.5f, cfg.rope_theta = 0; /* rope_theta is not read with rope_freqs */
    CHECK_OK(kvq_cache_create(&cfg, &c));
    float x[2 * 64] = {0};
    CHECK_ERR(kvq_rope_apply(c, -1, 1, 0, x), KVQ_ERR_RANGE);
    CHECK_ERR(kvq_rope_apply(c, 0, 1, 2, x), KVQ_ERR_INVALID_ARG);
    CHECK_ERR(kvq_rope_apply(c, 0, 1, 0, NULL), KVQ_ERR_NULL);
    CHECK_ERR(kvq_rope_apply(NULL, 0, 1, 0, x), KVQ_ERR_NULL);
    kvq_cache_free(c);
    cfg.prerope = 0, cfg.rope_neox = 7, cfg.rope_freqs = NULL; /* off: the rope fields are not read */
    CHECK_OK(kvq_cache_create(&cfg, &c));
    CHECK_ERR(kvq_rope_apply(c, 0, 1, 0, x), KVQ_ERR_INVALID_ARG);
    kvq_cache_free(c);
}

int main(void) {
    tu_seed(11);
    tu_find_tables();
    errors();
    static const kvq_type types[] = {KVQ_TYPE_F16, KVQ_TYPE_BF16, KVQ_TYPE_Q8, KVQ_TYPE_FP8,
                                     KVQ_TYPE_Q4,  KVQ_TYPE_Q3,   KVQ_TYPE_Q2};
    static const int dims[] = {64, 80, 96, 128, 256};
    for (int ti = 0; ti < 7; ti++)
        for (int neox = 0; neox < 2; neox++) {
            /* values F16 (fp32 value kernels: the tight bound), then the key type's own */
            run_case(types[ti], KVQ_TYPE_F16, dims[(ti + neox) % 5], 2, 3, neox, 0, ti % 2, 300);
            run_case(types[ti], types[ti], 64, 3, 3, neox, KVQ_ROLES_NONE, 0, 250);
        }
    /* rotated keys (R^T per key row before RoPE) and values; rotated values alone (the engine's q2/q3 choice) */
    run_case(KVQ_TYPE_Q4, KVQ_TYPE_Q4, 64, 3, 3, 0, KVQ_ROLES_KV, 0, 300);
    run_case(KVQ_TYPE_Q2, KVQ_TYPE_Q2, 128, 2, 4, 1, KVQ_ROLES_K, 1, 300);
    run_case(KVQ_TYPE_Q3, KVQ_TYPE_Q3, 64, 3, 3, 0, KVQ_ROLES_V, 0, 300);
    run_case(KVQ_TYPE_F16, KVQ_TYPE_F16, 80, 2, 8, 1, KVQ_ROLES_K, 0, 300);
    /* 9 query rows per KV head: more than the fused value kernels take */
    run_case(KVQ_TYPE_Q4, KVQ_TYPE_Q8, 96, 1, 9, 1, 0, 0, 200);
    /* dense-and-sparse outliers: the keys' join the decoded rows before RoPE (kvq_read returns them too), through
     * fork, a cut inside a key group (back into the window) and appends */
    g_outliers = KVQ_ROLES_KV;
    run_case(KVQ_TYPE_Q4, KVQ_TYPE_Q4, 64, 3, 3, 0, KVQ_ROLES_KV, 0, 300);
    run_case(KVQ_TYPE_Q2, KVQ_TYPE_F16, 128, 2, 4, 1, KVQ_ROLES_K, 1, 300);
    run_case(KVQ_TYPE_Q3, KVQ_TYPE_Q3, 80, 2, 2, 0, KVQ_ROLES_NONE, 0, 300);
    g_outliers = 0;
    /* positions past 64k */
    if (!tu_quick()) {
        run_case(KVQ_TYPE_F16, KVQ_TYPE_F16, 64, 1, 2, 0, 0, 0, 70000);
        run_case(KVQ_TYPE_Q4, KVQ_TYPE_F16, 128, 1, 2, 1, 0, 0, 70000);
    }
    return tu_finish("test_prerope");
}

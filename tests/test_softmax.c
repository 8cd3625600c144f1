/* The online softmax of CPU attention, on every kernel table the CPU has (scalar, avx2, avx512), every type, decode
 * (2 query heads per KV head: the integer kernels; 8: the fused fp32 kernels) and prefill (64 rows: the unfused
 * tile kernels):
 *  - non-finite queries (issue 17): a query head with NaN, +Inf or -Inf gets NaN in all of its outputs; the other
 *    heads and sequences of the call are bit for bit what they are without the bad head. The old code returned 0
 *    with KVQ_OK (and a finite value on the Q8 integer path, which rounds NaN to an int16 code).
 *  - the running max: logits near +100 on one page and -100 on the next (and the reverse order), against fp64 on
 *    the cache's dequantized contents. Replacing the running max by the current segment's gives exp(200) = Inf in
 *    the correction of the pages after a +100 page, so NaN: this test fails on that mutation. */
#include "testutil.h"

#include <stdbool.h>

enum { H = 2 };

/* "Unaffected by another head's NaN": bit for bit on the scalar table; on the SIMD tables the Q4 value kernels split a
 * segment's integer sums where the rows sharing a KV head could overflow 16 bits, so a NaN head (its weights 0) may
 * move a split and change the fp32 summation order of its neighbours: the same values up to that rounding. */
static bool same_result(const float *x, const float *y, int D, const char *table) {
    if (!strcmp(table, "scalar")) return !memcmp(x, y, (size_t)D * 4);
    double amax = 0;
    for (int d = 0; d < D; d++) amax = fmax(amax, fabs(y[d]));
    for (int d = 0; d < D; d++)
        if (!(fabs((double)x[d] - y[d]) <= 1e-5 * amax)) return false;
    return true;
}

static const kvq_type all_types[7] = {KVQ_TYPE_F16, KVQ_TYPE_BF16, KVQ_TYPE_Q8, KVQ_TYPE_FP8,
                                     KVQ_TYPE_Q4,  KVQ_TYPE_Q2,   KVQ_TYPE_Q3};

static kvq_cache *make(kvq_type t, int D, int residual) {
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.sinks = 0; /* no attention sinks: this test places its NaN/large logits by page (test_attn covers sinks) */
    cfg.n_layers = 1, cfg.n_kv_heads = H, cfg.head_dim = D, cfg.type_k = t, cfg.type_v = t;
    cfg.arena_bytes = 16u << 20, cfg.residual = residual, cfg.n_threads = 2;
    kvq_cache *c = NULL;
    CHECK_OK(kvq_cache_create(&cfg, &c));
    return c;
}

static bool all_nan(const float *x, int n) {
    for (int i = 0; i < n; i++)
        if (!isnan(x[i])) return false;
    return true;
}

/* ---- non-finite queries ---- */

static void nonfinite_case(kvq_type t, int D, int rep) {
    const char *tn = kvq_type_get_traits(t)->name;
    const int nqh = H * rep, T0 = 1100, T1 = 300; /* 1100 tokens: three decode work items of 512, merged */
    kvq_cache *c = make(t, D, -1);
    if (!c) return;
    int32_t seq[2];
    const int64_t len[2] = {T0, T1};
    float *k = malloc((size_t)T0 * H * D * 4), *v = malloc((size_t)T0 * H * D * 4);
    for (int b = 0; b < 2; b++) {
        CHECK_OK(kvq_seq_new(c, &seq[b]));
        tu_fill_kv(k, v, (size_t)len[b], H, D);
        int32_t n = (int32_t)len[b];
        CHECK_OK(kvq_append(c, 0, 1, &seq[b], &n, KVQ_DTYPE_F32, k, v));
    }
    /* decode: sequence 0's heads 0 (NaN in one channel), 1 (+Inf) and rep (-Inf, the second KV head) are bad */
    const size_t qn = (size_t)2 * nqh * D;
    float *q = malloc(qn * 4), *qc = malloc(qn * 4), *o = malloc(qn * 4), *oc = malloc(qn * 4);
    for (size_t i = 0; i < qn; i++) q[i] = qc[i] = (float)tu_normal();
    const int bad[3] = {0, 1, rep};
    const float badv[3] = {NAN, INFINITY, -INFINITY};
    for (int i = 0; i < 3; i++) q[(size_t)bad[i] * D + 5 + i] = badv[i];
    kvq_attn_params ap = kvq_attn_params_default(nqh);
    /* prefill: 70 queries of sequence 0 (three work items of 32 queries at rep = 2), bad heads in queries 3 and 40 */
    const int nq = 70;
    const size_t pn = (size_t)nq * nqh * D;
    float *pq = malloc(pn * 4), *pqc = malloc(pn * 4), *po = malloc(pn * 4), *poc = malloc(pn * 4);
    for (size_t i = 0; i < pn; i++) pq[i] = pqc[i] = (float)tu_normal();
    const size_t pbad[3] = {(size_t)3 * nqh + 0, (size_t)40 * nqh + 1, (size_t)40 * nqh + rep};
    for (int i = 0; i < 3; i++) pq[pbad[i] * D + 7] = badv[i];
    for (int tb = 0; tb < tu_n_tables; tb++) {
        tu_use_table(tu_tables[tb]);
        CHECK_OK(kvq_attn_decode(c, 0, 2, seq, qc, oc, &ap));
        CHECK_OK(kvq_attn_decode(c, 0, 2, seq, q, o, &ap));
        for (int hq = 0; hq < 2 * nqh; hq++) {
            bool is_bad = hq == bad[0] || hq == bad[1] || hq == bad[2];
            const float *x = o + (size_t)hq * D, *y = oc + (size_t)hq * D;
            if (is_bad)
                CHECK(all_nan(x, D), "decode %s D=%d rep=%d %s: head %d (non-finite q) gives %g, not NaN", tn, D, rep,
                      tu_tables[tb], hq, (double)x[0]);
            else
                CHECK(same_result(x, y, D, tu_tables[tb]), "decode %s D=%d rep=%d %s: head %d changed by another head's NaN",
                      tn, D, rep, tu_tables[tb], hq);
        }
        CHECK_OK(kvq_attn_prefill(c, 0, seq[0], nq, pqc, poc, &ap));
        CHECK_OK(kvq_attn_prefill(c, 0, seq[0], nq, pq, po, &ap));
        for (size_t r = 0; r < (size_t)nq * nqh; r++) {
            bool is_bad = r == pbad[0] || r == pbad[1] || r == pbad[2];
            const float *x = po + r * D, *y = poc + r * D;
            if (is_bad)
                CHECK(all_nan(x, D), "prefill %s D=%d rep=%d %s: row %zu (non-finite q) gives %g, not NaN", tn, D, rep,
                      tu_tables[tb], r, (double)x[0]);
            else
                CHECK(same_result(x, y, D, tu_tables[tb]), "prefill %s D=%d rep=%d %s: row %zu changed by another row's NaN",
                      tn, D, rep, tu_tables[tb], r);
        }
    }
    unsetenv("KVQ_CPU_KERNELS");
    free(k), free(v), free(q), free(qc), free(o), free(oc), free(pq), free(pqc), free(po), free(poc);
    kvq_cache_free(c);
}

/* ---- logits far apart across pages ---- */

/* Bound on the NMSE of the kernels against fp64 on the cache's own contents. The logits are ~100 in magnitude: an
 * fp32 dot product of D = 128 terms accumulates rounding errors of ~2^-24 * 100 per addition, sqrt(D) of them
 * independent, so each logit is off by sigma ~ sqrt(128) * 6e-6 = 6.7e-5, and the output (weights e^(s_t + d_t))
 * by an NMSE ~ sigma^2 = 4.5e-9 (measured: up to 6.6e-9, FP8). Bound 2e-8 = 4 sigma^2, which also covers the int16
 * rounding of queries and weights of the integer kernels (test_attn: 2e-8); for Q4/Q2 values on a SIMD table the
 * 8-bit softmax weights (test_attn: 4e-5, relative weight error <= 1/510 per segment); Q3's value kernels round
 * them to 8 bits the same way where D is a multiple of 128 (attn_simd.h, value_weights8), so Q3 takes the Q4/Q2 bound
 * (elsewhere its kernels keep int16 weights, well under it). A NaN, or weights summed
 * against the wrong maximum, is off by O(1). */
static double arith_bound(kvq_type t, const char *table) {
    bool simd = strcmp(table, "scalar") != 0;
    if (simd && (t == KVQ_TYPE_Q4 || t == KVQ_TYPE_Q2 || t == KVQ_TYPE_Q3)) return 4e-5;
    return 2e-8;
}

static void far_logits_case(kvq_type t, bool plus_first) {
    const char *tn = kvq_type_get_traits(t)->name;
    const int D = 128, T = 1100, P = 64;
    /* R = 0: every token but a grouped type's last partial group is in 64-token pages (= the 64-token softmax
     * segments), so consecutive segments alternate between logits near +100 and near -100 */
    kvq_cache *c = make(t, D, 0);
    if (!c) return;
    int32_t seq;
    CHECK_OK(kvq_seq_new(c, &seq));
    /* q = 1 in every channel, k = +-a + noise with a = 100 / sqrt(D): logit = scale * sum_c k_c = +-100 + N(0, 0.3^2)
     * (scale = 1/sqrt(D)); values N(0, 1) */
    const float a = 100.0f / sqrtf((float)D);
    size_t n = (size_t)T * H * D;
    float *k = malloc(n * 4), *v = malloc(n * 4), *kd = malloc(n * 4), *vd = malloc(n * 4);
    for (int tok = 0; tok < T; tok++) {
        float sg = ((tok / P) % 2 == 0) == plus_first ? 1.0f : -1.0f;
        for (int e = 0; e < H * D; e++) {
            size_t i = (size_t)tok * H * D + e;
            k[i] = sg * a + (float)(0.3 * tu_normal()), v[i] = (float)tu_normal();
        }
    }
    int32_t nt = T;
    CHECK_OK(kvq_append(c, 0, 1, &seq, &nt, KVQ_DTYPE_F32, k, v));
    CHECK_OK(kvq_read(c, seq, 0, 0, T, kd, vd));
    for (int rep = 2; rep <= 8; rep *= 4) {
        const int nqh = H * rep, nq = 64;
        float *q = malloc((size_t)nq * nqh * D * 4), *o = malloc((size_t)nq * nqh * D * 4);
        double *ref = malloc((size_t)nq * nqh * D * 8), *dref = malloc((size_t)nqh * D * 8);
        for (size_t i = 0; i < (size_t)nq * nqh * D; i++) q[i] = 1.0f;
        int64_t pos[64];
        for (int i = 0; i < nq; i++) pos[i] = T - nq + i;
        kvq_attn_params ap = kvq_attn_params_default(nqh);
        const float scale = 1.0f / sqrtf((float)D);
        /* the fp64 references do not depend on the table: computed once (the prefill's only where it runs) */
        tu_attn_ref(q, 1, nqh, &pos[nq - 1], kd, vd, T, H, D, scale, 0, 0.0f, dref);
        if (rep == 2) tu_attn_ref(q, nq, nqh, pos, kd, vd, T, H, D, scale, 0, 0.0f, ref);
        for (int tb = 0; tb < tu_n_tables; tb++) {
            tu_use_table(tu_tables[tb]);
            double bound = arith_bound(t, tu_tables[tb]);
            CHECK_OK(kvq_attn_decode(c, 0, 1, &seq, q, o, &ap));
            double e = tu_nmse(o, dref, (size_t)nqh * D);
            CHECK(e < bound, "decode %s rep=%d %s, %s page first: NMSE %g vs fp64 (bound %g)", tn, rep, tu_tables[tb],
                  plus_first ? "+100" : "-100", e, bound);
            if (rep == 2) { /* prefill: one row count (64 rows), 64 queries seeing the alternating pages */
                CHECK_OK(kvq_attn_prefill(c, 0, seq, nq, q, o, &ap));
                e = tu_nmse(o, ref, (size_t)nq * nqh * D);
                CHECK(e < bound, "prefill %s %s, %s page first: NMSE %g vs fp64 (bound %g)", tn, tu_tables[tb],
                      plus_first ? "+100" : "-100", e, bound);
            }
        }
        unsetenv("KVQ_CPU_KERNELS");
        free(q), free(o), free(ref), free(dref);
    }
    free(k), free(v), free(kd), free(vd);
    kvq_cache_free(c);
}

int main(void) {
    tu_seed(5);
    tu_find_tables();
    for (int i = 0; i < 7; i++) {
        /* D = 80: the AVX-512 table hands Q8/Q4/Q2 to the AVX2 kernels there */
        nonfinite_case(all_types[i], 128, 2);
        nonfinite_case(all_types[i], 128, 8);
        nonfinite_case(all_types[i], 80, 2);
        far_logits_case(all_types[i], true);
        far_logits_case(all_types[i], false);
    }
    return tu_finish("test_softmax");
}

/* kvq_attn_prefill_exact (kvq.h section 9): a batch's queries read the cache as it was before the batch and
 * the batch's own K/V in fp16, never quantized.
 *  - arithmetic: against an fp64 reference over kvq_read of the cache before the batch (what it holds: sinks
 * and the last R tokens in fp16, the rest as stored) followed by the batch as an F16 cache with the same
 * rotation holds it (fp16 in the rotated domain). Every type pair, pre-RoPE keys, sinks, outliers, 8-bit
 * windows and parameters, GQA, sliding window with soft-cap, head dims 64 and 128, an empty cache (the first
 * batch), every kernel table. Prefill items hold more than KVQ_FUSED_ROWS rows here, so the fp32 kernels run:
 * NMSE < 1e-9;
 *  - the plain prefill on a fork (append, then kvq_attn_prefill): the same output with F16 (NMSE < 1e-11),
 * and with grouped types and a batch longer than R an error the bound above would catch (the batch read
 * quantized), so the check can fail; the batch appended afterwards leaves the same cache as appending it to
 * the fork;
 *  - K/V given as fp16: the same output as the same values in fp32;
 *  - named errors, and the cache as it was. */
#include "testutil.h"

#include <stdbool.h>

enum { MAXT = 512 };

typedef struct tcase {
    kvq_type tk, tv;
    int D, rep, prerope, sinks, outliers, window8, params8, window, T0;
    float softcap;
} tcase;

static kvq_cache *make(const tcase *t, int H, kvq_type tk, kvq_type tv, int rotate, int residual,
                       int64_t tokens) {
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.n_layers = 1, cfg.n_kv_heads = H, cfg.head_dim = t->D, cfg.type_k = tk, cfg.type_v = tv,
    cfg.n_threads = 2;
    cfg.residual = residual, cfg.max_seqs = 4, cfg.rotate = rotate, cfg.sinks = t->sinks;
    if (tk == KVQ_TYPE_F16) cfg.sinks = 0; /* the scratch cache of the batch's rows */
    cfg.outliers = t->outliers, cfg.window8 = t->window8, cfg.params8 = t->params8;
    cfg.prerope = t->prerope, cfg.rope_neox = 1, cfg.rope_theta = 10000.0f;
    cfg.arena_bytes = 4 * kvq_cache_arena_bytes_for(&cfg, tokens + 64);
    kvq_cache *c = NULL;
    CHECK_OK(kvq_cache_create(&cfg, &c));
    return c;
}

static void run_case(const tcase *t) {
    const int H = 2, D = t->D, nqh = H * t->rep, n = 70, R = 32, T0 = t->T0, T = T0 + n;
    const size_t row = (size_t)H * D, qrow = (size_t)nqh * D;
    char what[160];
    snprintf(what, sizeof what,
             "%s/%s D=%d rep=%d pre=%d sinks=%d outl=%d w8=%d p8=%d window=%d softcap=%g T0=%d",
             kvq_type_get_traits(t->tk)->name, kvq_type_get_traits(t->tv)->name, D, t->rep, t->prerope,
             t->sinks, t->outliers, t->window8, t->params8, t->window, (double)t->softcap, T0);
    kvq_cache *c = make(t, H, t->tk, t->tv, -1, R, T);
    if (!c) return;
    kvq_cache_config got;
    CHECK_OK(kvq_cache_get_config(c, &got, NULL));
    float *k = malloc((size_t)T * row * 4), *v = malloc((size_t)T * row * 4);
    tu_fill_kv(k, v, (size_t)T, H, D);
    int32_t s, s2;
    CHECK_OK(kvq_seq_new(c, &s));
    { /* a prefill chunk, then single tokens: pages, the window and a partial group */
        int32_t a = T0 > 3 ? T0 - 3 : 0, one = 1;
        if (a) CHECK_OK(kvq_append(c, 0, 1, &s, &a, KVQ_DTYPE_F32, k, v));
        for (int i = a; i < T0; i++)
            CHECK_OK(kvq_append(c, 0, 1, &s, &one, KVQ_DTYPE_F32, k + i * row, v + i * row));
    }
    const float *bk = k + (size_t)T0 * row, *bv = v + (size_t)T0 * row;

    /* the reference's keys and values: the cache's contents, then the batch as fp16 rows in the rotated
     * domain */
    float *rk = malloc((size_t)T * row * 4), *rv = malloc((size_t)T * row * 4);
    if (T0 > 0) CHECK_OK(kvq_read(c, s, 0, 0, T0, rk, rv));
    kvq_cache *fc = make(t, H, KVQ_TYPE_F16, KVQ_TYPE_F16, got.rotate, 0, n);
    int32_t fs;
    CHECK_OK(kvq_seq_new(fc, &fs));
    int32_t nn = n;
    CHECK_OK(kvq_append(fc, 0, 1, &fs, &nn, KVQ_DTYPE_F32, bk, bv));
    CHECK_OK(kvq_read(fc, fs, 0, 0, n, rk + (size_t)T0 * row, rv + (size_t)T0 * row));
    if (t->prerope) CHECK_OK(kvq_rope_apply(c, 0, T, 0, rk));

    float *q = malloc((size_t)n * qrow * 4), *out = malloc((size_t)n * qrow * 4),
          *o2 = malloc((size_t)n * qrow * 4);
    double *ref = malloc((size_t)n * qrow * 8);
    for (size_t i = 0; i < (size_t)n * qrow; i++) q[i] = (float)tu_normal();
    kvq_attn_params ap = kvq_attn_params_default(nqh);
    ap.window = t->window, ap.softcap = t->softcap;
    int64_t pos[70];
    for (int i = 0; i < n; i++) pos[i] = T0 + i;
    tu_attn_ref(q, n, nqh, pos, rk, rv, T, H, D, 1.0f / sqrtf((float)D), t->window, t->softcap, ref);
    for (int b = 0; b < tu_n_tables; b++) {
        tu_use_table(tu_tables[b]);
        CHECK_OK(kvq_attn_prefill_exact(c, 0, s, n, q, KVQ_DTYPE_F32, bk, bv, out, &ap));
        double e = tu_nmse(out, ref, (size_t)n * qrow);
        CHECK(e < 1e-9, "%s %s: NMSE %g against the reference", what, tu_tables[b], e);
    }
    unsetenv("KVQ_CPU_KERNELS");
    CHECK_OK(kvq_attn_prefill_exact(c, 0, s, n, q, KVQ_DTYPE_F32, bk, bv, out, &ap));

    /* the plain prefill on a fork of the same tokens */
    CHECK_OK(kvq_seq_fork(c, s, &s2));
    CHECK_OK(kvq_append(c, 0, 1, &s2, &nn, KVQ_DTYPE_F32, bk, bv));
    CHECK_OK(kvq_attn_prefill(c, 0, s2, n, q, o2, &ap));
    double ep = tu_nmse(o2, ref, (size_t)n * qrow);
    if (t->tk == KVQ_TYPE_F16 && t->tv == KVQ_TYPE_F16) {
        double *d = malloc((size_t)n * qrow * 8);
        for (size_t i = 0; i < (size_t)n * qrow; i++) d[i] = out[i];
        double e = tu_nmse(o2, d, (size_t)n * qrow);
        CHECK(e < 1e-11, "%s: plain prefill differs from the exact one by NMSE %g", what, e);
        free(d);
    } else if (T0 + n >= R + 64 + t->sinks) {
        /* the batch fills the window (R + G rows): the plain prefill reads its first tokens, and the R before
         * it, from pages: far outside the bound */
        CHECK(ep > 1e-6,
              "%s: the plain prefill's NMSE %g is inside the exact one's bound: the check cannot fail", what,
              ep);
    }
    printf("%-72s plain prefill NMSE %.2e\n", what, ep);

    /* the batch appended after the exact prefill: the same contents as the fork's */
    CHECK_OK(kvq_append(c, 0, 1, &s, &nn, KVQ_DTYPE_F32, bk, bv));
    float *ak = malloc((size_t)T * row * 4), *av = malloc((size_t)T * row * 4),
          *bk2 = malloc((size_t)T * row * 4), *bv2 = malloc((size_t)T * row * 4);
    CHECK_OK(kvq_read(c, s, 0, 0, T, ak, av));
    CHECK_OK(kvq_read(c, s2, 0, 0, T, bk2, bv2));
    CHECK(!memcmp(ak, bk2, (size_t)T * row * 4) && !memcmp(av, bv2, (size_t)T * row * 4),
          "%s: the cache after exact prefill + append differs from append alone", what);

    free(ak), free(av), free(bk2), free(bv2);
    free(q), free(out), free(o2), free(ref), free(rk), free(rv), free(k), free(v);
    kvq_cache_free(fc);
    kvq_cache_free(c);
}

/* dtypes' and errors' setup: a q4 cache (H 2, D 64, R 32) whose sequence s holds 100 tokens of k, v; rows 100
 * .. 100 + n - 1 of k, v (bk, bv) are a batch of n new tokens, q their queries (4 query heads) */
enum { FH = 2, FD = 64, FNQH = 4, FT0 = 100 };
typedef struct fixture {
    kvq_cache *c;
    int32_t s;
    float *k, *v, *q, *bk, *bv;
} fixture;

static bool fixture_make(fixture *f, int n) {
    tcase t = {KVQ_TYPE_Q4, KVQ_TYPE_Q4, FD, 2, 0, 1, 0, 0, 0, 0, FT0, 0};
    memset(f, 0, sizeof *f);
    if (!(f->c = make(&t, FH, t.tk, t.tv, -1, 32, 200))) return false;
    size_t e = (size_t)(FT0 + n) * FH * FD;
    f->k = malloc(e * 4), f->v = malloc(e * 4), f->q = malloc((size_t)n * FNQH * FD * 4);
    tu_fill_kv(f->k, f->v, (size_t)(FT0 + n), FH, FD);
    for (int i = 0; i < n * FNQH * FD; i++) f->q[i] = (float)tu_normal();
    int32_t a = FT0;
    CHECK_OK(kvq_seq_new(f->c, &f->s));
    CHECK_OK(kvq_append(f->c, 0, 1, &f->s, &a, KVQ_DTYPE_F32, f->k, f->v));
    f->bk = f->k + (size_t)FT0 * FH * FD, f->bv = f->v + (size_t)FT0 * FH * FD;
    return true;
}

static void fixture_free(fixture *f) {
    free(f->k), free(f->v), free(f->q);
    kvq_cache_free(f->c);
}

/* K/V in fp16: the same output as their values in fp32 */
static void dtypes(void) {
    const int H = FH, D = FD, nqh = FNQH, n = 40;
    fixture f;
    if (!fixture_make(&f, n)) return;
    kvq_cache *c = f.c;
    int32_t s = f.s;
    float *q = f.q, *bk = f.bk, *bv = f.bv;
    float *o1 = malloc((size_t)n * nqh * D * 4), *o2 = malloc((size_t)n * nqh * D * 4);
    /* the batch as random fp16 numbers (normal, 2^-6 .. 2^4), given as fp16 and as their exact fp32 values */
    uint16_t *hk = malloc((size_t)n * H * D * 2), *hv = malloc((size_t)n * H * D * 2);
    for (size_t i = 0; i < 2 * (size_t)n * H * D; i++) {
        uint32_t sign = tu_uniform() < 0.5, ex = 9 + (uint32_t)(tu_uniform() * 11),
                 man = (uint32_t)(tu_uniform() * 1024);
        uint16_t h = (uint16_t)(sign << 15 | ex << 10 | man);
        float fv = (sign ? -1.0f : 1.0f) * ldexpf(1.0f + man / 1024.0f, (int)ex - 15);
        if (i < (size_t)n * H * D)
            hk[i] = h, bk[i] = fv;
        else
            hv[i - (size_t)n * H * D] = h, bv[i - (size_t)n * H * D] = fv;
    }
    kvq_attn_params ap = kvq_attn_params_default(nqh);
    CHECK_OK(kvq_attn_prefill_exact(c, 0, s, n, q, KVQ_DTYPE_F32, bk, bv, o1, &ap));
    CHECK_OK(kvq_attn_prefill_exact(c, 0, s, n, q, KVQ_DTYPE_F16, hk, hv, o2, &ap));
    CHECK(!memcmp(o1, o2, (size_t)n * nqh * D * 4),
          "fp16 K/V: the output differs from the same values in fp32");
    free(o1), free(o2), free(hk), free(hv);
    fixture_free(&f);
}

static void errors(void) {
    const int H = FH, D = FD, nqh = FNQH, n = 8;
    fixture f;
    if (!fixture_make(&f, n)) return;
    kvq_cache *c = f.c;
    int32_t s = f.s;
    float *q = f.q, *bk = f.bk, *bv = f.bv, *o = malloc((size_t)n * nqh * D * 4);
    float *before_k = malloc((size_t)100 * H * D * 4), *before_v = malloc((size_t)100 * H * D * 4);
    float *after_k = malloc((size_t)100 * H * D * 4), *after_v = malloc((size_t)100 * H * D * 4);
    CHECK_OK(kvq_read(c, s, 0, 0, 100, before_k, before_v));
    kvq_attn_params ap = kvq_attn_params_default(nqh), bad = kvq_attn_params_default(3);
    CHECK_ERR(kvq_attn_prefill_exact(NULL, 0, s, n, q, KVQ_DTYPE_F32, bk, bv, o, &ap), KVQ_ERR_NULL);
    CHECK_ERR(kvq_attn_prefill_exact(c, 0, s, n, q, KVQ_DTYPE_F32, NULL, bv, o, &ap), KVQ_ERR_NULL);
    CHECK_ERR(kvq_attn_prefill_exact(c, 0, s, n, q, KVQ_DTYPE_F32, bk, NULL, o, &ap), KVQ_ERR_NULL);
    CHECK_ERR(kvq_attn_prefill_exact(c, 0, s, n, NULL, KVQ_DTYPE_F32, bk, bv, o, &ap), KVQ_ERR_NULL);
    CHECK_ERR(kvq_attn_prefill_exact(c, 0, s, n, q, KVQ_DTYPE_F32, bk, bv, NULL, &ap), KVQ_ERR_NULL);
    CHECK_ERR(kvq_attn_prefill_exact(c, 0, s, n, q, KVQ_DTYPE_F32, bk, bv, o, NULL), KVQ_ERR_NULL);
    CHECK_ERR(kvq_attn_prefill_exact(c, 0, s, n, q, (kvq_dtype)9, bk, bv, o, &ap), KVQ_ERR_INVALID_ARG);
    CHECK_ERR(kvq_attn_prefill_exact(c, 0, s, -1, q, KVQ_DTYPE_F32, bk, bv, o, &ap), KVQ_ERR_INVALID_ARG);
    CHECK_ERR(kvq_attn_prefill_exact(c, 0, s, n, q, KVQ_DTYPE_F32, bk, bv, o, &bad), KVQ_ERR_SHAPE);
    CHECK(kvq_attn_prefill_exact(c, 1, s, n, q, KVQ_DTYPE_F32, bk, bv, o, &ap) != KVQ_OK,
          "layer 1 of a 1-layer cache accepted");
    CHECK(kvq_attn_prefill_exact(c, 0, 3, n, q, KVQ_DTYPE_F32, bk, bv, o, &ap) != KVQ_OK,
          "a sequence never created accepted");
    CHECK_OK(
        kvq_attn_prefill_exact(c, 0, s, 0, NULL, KVQ_DTYPE_F32, NULL, NULL, NULL, &ap)); /* nothing to do */
    float keep = bv[5 * H * D + 7];
    bv[5 * H * D + 7] = NAN;
    CHECK_ERR(kvq_attn_prefill_exact(c, 0, s, n, q, KVQ_DTYPE_F32, bk, bv, o, &ap), KVQ_ERR_NONFINITE);
    bv[5 * H * D + 7] = keep;
    keep = bk[3];
    bk[3] = 70000.0f;
    CHECK_ERR(kvq_attn_prefill_exact(c, 0, s, n, q, KVQ_DTYPE_F32, bk, bv, o, &ap), KVQ_ERR_NONFINITE);
    /* within fp16, but not once rotated: 60000 in every channel of a head rotates to 60000 sqrt(D) */
    for (int d = 0; d < D; d++) bk[d] = 60000.0f;
    CHECK_ERR(kvq_attn_prefill_exact(c, 0, s, n, q, KVQ_DTYPE_F32, bk, bv, o, &ap), KVQ_ERR_NONFINITE);
    int64_t len = -1;
    CHECK_OK(kvq_seq_length(c, s, 0, &len));
    CHECK(len == 100, "the sequence's length changed: %lld", (long long)len);
    CHECK_OK(kvq_read(c, s, 0, 0, 100, after_k, after_v));
    CHECK(!memcmp(before_k, after_k, (size_t)100 * H * D * 4) &&
              !memcmp(before_v, after_v, (size_t)100 * H * D * 4),
          "the cache's contents changed");
    free(o), free(before_k), free(before_v), free(after_k), free(after_v);
    fixture_free(&f);
}

int main(void) {
    tu_find_tables();
    const kvq_type F16 = KVQ_TYPE_F16, Q8 = KVQ_TYPE_Q8, Q4 = KVQ_TYPE_Q4, Q3 = KVQ_TYPE_Q3, Q2 = KVQ_TYPE_Q2,
                   FP8 = KVQ_TYPE_FP8;
    const tcase cases[] = {
        /* tk tv D rep pre sinks outl w8 p8 window T0 softcap */
        {F16, F16, 64, 2, 0, 0, 0, 0, 0, 0, 150, 0},
        {Q8, Q8, 64, 2, 0, 0, 0, 0, 0, 0, 150, 0},
        {FP8, FP8, 64, 2, 0, 0, 0, 0, 0, 0, 150, 0},
        {Q4, Q4, 64, 2, 0, 1, 0, 0, 0, 0, 150, 0},
        {Q3, Q3, 64, 2, 0, 1, 0, 0, 0, 0, 150, 0},
        {Q2, Q2, 64, 2, 0, 1, 0, 0, 0, 0, 150, 0},
        {Q8, Q4, 128, 3, 0, 1, 0, 0, 0, 0, 150, 0},
        {Q4, Q2, 64, 2, 0, 4, 0, 0, 0, 0, 150, 0},
        {Q4, Q4, 64, 2, 0, 1, 0, 0, 0, 0, 0, 0},   /* the first batch: nothing cached */
        {Q2, Q2, 64, 2, 0, 4, 0, 0, 0, 0, 2, 0},   /* the batch fills the sinks */
        {Q4, Q4, 64, 2, 1, 1, 0, 0, 0, 0, 150, 0}, /* pre-RoPE keys */
        {Q3, Q3, 128, 2, 1, 1, KVQ_ROLES_K, 0, 0, 0, 150, 0},
        {Q4, Q4, 64, 2, 0, 1, KVQ_ROLES_KV, KVQ_ROLES_KV, KVQ_ROLES_KV, 0, 150, 0},
        {Q4, Q4, 64, 2, 0, 0, 0, 0, 0, 48, 150, 30.0f}, /* sliding window, soft-cap */
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) run_case(&cases[i]);
    dtypes();
    errors();
    return tu_finish("test_prefill_exact");
}

#define _POSIX_C_SOURCE 200809L
/* CPU attention on the quantized cache, for every (type_k, type_v, head dim, GQA ratio, window, soft-cap):
 *  - against an fp64 reference over the cache's own dequantized contents (the kernel's arithmetic): NMSE < 1e-9;
 *  - against an fp64 reference over the original fp32 K/V (the type's quality): the NMSE the formats predict for
 *    this data (format_var, predicted_error), per combination and as a median per type pair;
 *  - every table the CPU has (scalar, AVX2, AVX-512: asked for with KVQ_CPU_KERNELS) against the scalar _ref
 *    kernels: NMSE < 1e-10 for the fp32 kernels, < 2e-8 for the integer kernels of Q8/Q4/Q2, which round
 *    queries and softmax weights to int16 (relative error ~1.5e-5 each), < 6e-6 where the values are Q4/Q2,
 *    whose kernels round the weights but a dominant largest to 8 bits; the same bounds for both tables (they share the
 *    rounding); a dominant token (run_dominant) < 5e-7;
 *  - decode of a ragged batch, and chunked causal prefill. */
#include "testutil.h"

#include "attn.h" /* the kernel tables' w8_expand */

#include <stdbool.h>

/* ---- the quality bound, from the formats (issue 17: the old fixed bound of q2/q2, NMSE 2.0, passed an all-zero
 * output) ----
 * Each stored element x gets the error variance its format promises for this data, computed from the ORIGINAL values
 * (never from the scales the quantizer stored, so a quantizer with a wrong scale is not excused): uniform rounding
 * with step delta has error variance delta^2 / 12, where delta is
 *   F16 (and the fp16 window): one ulp of x, 2^(e - 11) for x = m 2^e, m in [0.5, 1); BF16: 2^(e - 8);
 *   Q8: max|x| / 127 over the token's head row; FP8: one E4M3 ulp of x / s (3 mantissa bits), s = max|x| / 448;
 *   Q4/Q3/Q2 (qmax = 15, 7, 3): (max - min) / qmax over the key's channel in its group of G tokens, or over the value's
 *   group of Gv channels. */
static double ulp_var(double x, int mant_bits, double min_ulp) {
    int e;
    frexp(x, &e);
    double u = ldexp(1.0, e - mant_bits - 1);
    if (u < min_ulp) u = min_ulp;
    return u * u / 12;
}

/* sink: tokens 0 .. sink-1 are fp16 sinks; the pages' key groups start at sink + k*G */
static void format_var(kvq_type t, kvq_role role, const float *x, int64_t T, int64_t sink, int64_t paged, int H, int D,
                       int G, int Gv, int win8, double *var) {
    for (int64_t tok = 0; tok < T; tok++)
        for (int h = 0; h < H; h++) {
            const float *row = x + ((size_t)tok * H + h) * D;
            double amax = 0;
            for (int d = 0; d < D; d++) amax = fmax(amax, fabs(row[d]));
            for (int d = 0; d < D; d++) {
                double v, xi = row[d];
                if (win8 && tok >= sink + paged) { /* an 8-bit window (kvq.h section 10): Q8's step, then fp16 */
                    v = (amax / 127) * (amax / 127) / 12 + ulp_var(xi, 10, 0x1p-24);
                } else if (tok < sink || tok >= sink + paged || t == KVQ_TYPE_F16) {
                    v = ulp_var(xi, 10, 0x1p-24);
                } else if (t == KVQ_TYPE_BF16) {
                    v = ulp_var(xi, 7, 0x1p-133);
                } else if (t == KVQ_TYPE_Q8) {
                    v = (amax / 127) * (amax / 127) / 12;
                } else if (t == KVQ_TYPE_FP8) {
                    double sc = amax / 448;
                    v = sc > 0 ? ulp_var(xi / sc, 3, 0x1p-9) * sc * sc : 0;
                } else {
                    double lo = INFINITY, hi = -INFINITY, qmax = (1 << kvq_type_get_traits(t)->bits) - 1;
                    if (role == KVQ_KEY)
                        for (int64_t j = sink + (tok - sink) / G * G; j < sink + (tok - sink) / G * G + G; j++)
                            lo = fmin(lo, x[((size_t)j * H + h) * D + d]), hi = fmax(hi, x[((size_t)j * H + h) * D + d]);
                    else
                        for (int j = d / Gv * Gv; j < d / Gv * Gv + Gv; j++) lo = fmin(lo, row[j]), hi = fmax(hi, row[j]);
                    v = (hi - lo) / qmax * (hi - lo) / qmax / 12;
                }
                var[((size_t)tok * H + h) * D + d] = v;
            }
        }
}

/* First-order propagation of those independent element errors through attention, for one query row set (as
 * tu_attn_ref): with weights p_t and output o on the original data, a logit error ds_t = f'(s_t) scale q . dk_t
 * (f: the soft-cap) moves o by sum_t p_t ds_t (v_t - o), a value error by sum_t p_t dv_t, so
 *   E|do_d|^2 = sum_t p_t^2 (varV_td + Var(ds_t) (v_td - o_d)^2),  Var(ds_t) = f'^2 scale^2 sum_c q_c^2 varK_tc.
 * Adds E|do|^2 to *num and |o|^2 to *den: the expected NMSE is num / den. */
static void predicted_error(const float *q, int nq, int nqh, const int64_t *pos, const float *k, const float *v,
                            const double *vk, const double *vv, int64_t T, int H, int D, float scale, int window,
                            float softcap, double *num, double *den) {
    int rep = nqh / H;
    double *s = malloc((size_t)T * sizeof *s), *ds = malloc((size_t)T * sizeof *ds), *o = malloc((size_t)D * 8);
    for (int i = 0; i < nq; i++)
        for (int qh = 0; qh < nqh; qh++) {
            int h = qh / rep;
            const float *qq = q + ((size_t)i * nqh + qh) * D;
            double mx = -INFINITY, l = 0;
            for (int64_t t = 0; t < T; t++) {
                s[t] = -INFINITY;
                if (t > pos[i] || (window > 0 && t <= pos[i] - window)) continue;
                double a = 0, va = 0;
                for (int d = 0; d < D; d++) {
                    size_t e = ((size_t)t * H + h) * D + d;
                    a += (double)qq[d] * k[e], va += (double)qq[d] * qq[d] * vk[e];
                }
                a *= scale, va *= (double)scale * scale;
                if (softcap > 0) {
                    double th = tanh(a / softcap);
                    a = softcap * th, va *= (1 - th * th) * (1 - th * th);
                }
                s[t] = a, ds[t] = va, mx = fmax(mx, a);
            }
            for (int d = 0; d < D; d++) o[d] = 0;
            for (int64_t t = 0; t < T; t++) {
                if (s[t] == -INFINITY) continue;
                s[t] = exp(s[t] - mx), l += s[t];
                for (int d = 0; d < D; d++) o[d] += s[t] * v[((size_t)t * H + h) * D + d];
            }
            for (int d = 0; d < D; d++) o[d] /= l, *den += o[d] * o[d];
            for (int64_t t = 0; t < T; t++) {
                if (s[t] == -INFINITY) continue;
                double p2 = (s[t] / l) * (s[t] / l);
                for (int d = 0; d < D; d++) {
                    size_t e = ((size_t)t * H + h) * D + d;
                    double dv = v[e] - o[d];
                    *num += p2 * (vv[e] + ds[t] * dv * dv);
                }
            }
        }
    free(s), free(ds), free(o);
}

/* kvq.h section 10: nu (nonuniform), rot (rotate), sinks (0 in the type sweep: the layout without sinks), outl
 * (outliers), p8 (8-bit parameters); len0: sequence 0's length (0: 300) */
typedef struct { kvq_type tk, tv; int D, rep, window; float softcap; int H; int nu; int rot; int sinks; int len0; int outl; int p8; } combo;

static int g_window8; /* cfg.window8 of run_combo's caches (kvq.h section 10, "8-bit window") */

/* Each table's w8_expand against kvq__w8_expand_ref, bit for bit: every head dim, every code, scales from the
 * smallest subnormal fp16 up to 516 (65504 / 127), products that round to even, underflow to fp16 subnormals and 0 */
static void w8_expand_tables(void) {
    const kvq__kernels *tabs[3] = {&kvq__kernels_ref, kvq__kernels_avx2(), kvq__kernels_avx512()};
    static const int dims[5] = {64, 80, 96, 128, 256};
    for (int t = 1; t < 3; t++) {
        if (!tabs[t]) {
            printf("SKIP w8_expand %s: this CPU lacks it\n", t == 1 ? "avx2" : "avx512");
            continue;
        }
        int bad = 0, n = 0;
        for (int si = 0; si < 2000; si++) {
            uint16_t scale = si < 8 ? (uint16_t)(1 + si) : (uint16_t)(tu_uniform() * 0x6008); /* <= fp16(516) */
            int8_t q[256];
            for (int d = 0; d < 256; d++) q[d] = (int8_t)(si % 3 ? (int)(tu_uniform() * 255) - 127 : (d * 37 + si) % 255 - 127);
            for (int di = 0; di < 5; di++) {
                uint16_t a[256], b[256];
                kvq__w8_expand_ref(q, scale, dims[di], a);
                tabs[t]->w8_expand(q, scale, dims[di], b);
                bad += memcmp(a, b, (size_t)dims[di] * 2) != 0, n++;
            }
        }
        CHECK(bad == 0, "w8_expand %s: %d of %d rows differ from kvq__w8_expand_ref", tabs[t]->name, bad, n);
    }
}

/* The integer key kernels of the AVX2 and AVX-512 tables against each other, bit for bit: they round the query
 * alike and their int32 sums are exact, so however a table reduces them (AVX-512 reduces whole segments of 8 tokens
 * as one tree) the scores are the same floats. Q8, Q4, Q2, Q3, the head dims of the AVX-512 integer kernels, 1 to 4
 * rows, runs that start inside a key group, cross one, and end in a partial segment. */
static void key_scores_tables(void) {
    const kvq__kernels *a = kvq__kernels_avx2(), *z = kvq__kernels_avx512();
    if (!a || !z) {
        printf("SKIP key_scores avx2 vs avx512: this CPU lacks %s\n", a ? "avx512" : "avx2");
        return;
    }
    static const kvq_type types[4] = {KVQ_TYPE_Q8, KVQ_TYPE_Q4, KVQ_TYPE_Q2, KVQ_TYPE_Q3};
    static const int dims[5] = {64, 80, 96, 128, 256};
    static const int runs[][2] = {{0, 64}, {0, 128}, {5, 59}, {40, 50}, {3, 8}, {0, 1}, {61, 67}, {16, 13}};
    const int N = 192, G = 64;
    uint8_t *data = malloc((size_t)N * 256);
    uint16_t *par = malloc((size_t)N * 2 * 256 * sizeof(uint16_t));
    float *q = malloc(4 * 256 * sizeof(float)), sa[4 * 128], sz[4 * 128];
    kvq__qstate *sta = aligned_alloc(64, sizeof(kvq__qstate)), *stz = aligned_alloc(64, sizeof(kvq__qstate));
    int bad = 0, n = 0;
    for (int ti = 0; ti < 4; ti++)
        for (int di = 0; di < 5; di++)
            for (int R = 1; R <= 4; R++)
                for (size_t ri = 0; ri < sizeof runs / sizeof runs[0]; ri++) {
                    const kvq_type T = types[ti];
                    const int D = dims[di];
                    /* where the AVX-512 table has integer kernels of its own (else it takes the AVX2 table's, or
                     * both take fp32 ones whose sums differ in order) */
                    if (D % (T == KVQ_TYPE_Q8 ? 32 : T == KVQ_TYPE_Q2 ? 128 : 64)) continue;
                    for (size_t i = 0; i < (size_t)N * 256; i++) data[i] = (uint8_t)(tu_uniform() * 256);
                    for (size_t i = 0; i < (size_t)N * 2 * 256; i++)
                        par[i] = kvq__f32_to_f16((float)(T == KVQ_TYPE_Q8 || i % (2 * D) < (size_t)D
                                                            ? 0.01 + tu_uniform()
                                                            : tu_normal()));
                    for (int i = 0; i < 4 * D; i++) q[i] = (float)tu_normal();
                    kvq__blk b = {0};
                    b.type = T, b.role = KVQ_KEY, b.data = data, b.stride = (size_t)D, b.par = par, b.D = D;
                    b.G = G, b.Gv = D, b.lv16 = T == KVQ_TYPE_Q8 ? NULL : kvq__levels16(T, false);
                    memset(sta, 0, sizeof *sta), memset(stz, 0, sizeof *stz);
                    const int j0 = runs[ri][0], cnt = runs[ri][1];
                    memset(sa, 0, sizeof sa), memset(sz, 0, sizeof sz);
                    /* two calls per run, as the driver makes them per page: the second keeps the query state */
                    for (int h = 0; h < 2; h++) {
                        int from = h ? cnt / 2 : 0, len = h ? cnt - cnt / 2 : cnt / 2;
                        if (!len) continue;
                        a->key_scores(&b, j0 + from, len, q, R, sa + from, 128, sta);
                        z->key_scores(&b, j0 + from, len, q, R, sz + from, 128, stz);
                    }
                    /* Q2 on a VNNI CPU: the avx512 table's int8 query (attn_avx512.c). Each score within half
                     * an int8 step of q' times the codes' distance from their centre 1.5, of the exact fp64 dot
                     * product (plus float rounding); a wrong field, token or group is off by far more. */
                    const bool k8 = T == KVQ_TYPE_Q2 && __builtin_cpu_supports("avx512vnni");
                    for (int r = 0; r < R; r++) {
                        int d = 0;
                        if (!k8) d = memcmp(sa + r * 128, sz + r * 128, (size_t)cnt * 4) != 0;
                        for (int t = 0; k8 && t < cnt; t++) {
                            const int j = j0 + t;
                            const uint16_t *sm = par + (size_t)(j / G) * 2 * D;
                            double exact = 0, a8 = 0, dev = 0, mag = 0;
                            for (int ch = 0; ch < D; ch++) {
                                const double sc = kvq__f16_to_f32(sm[ch]), mn = kvq__f16_to_f32(sm[D + ch]);
                                const double code = (data[(size_t)j * D + ch / 4] >> (2 * (ch % 4))) & 3;
                                const double qc = q[r * D + ch];
                                exact += qc * (sc * code + mn);
                                a8 = fmax(a8, fabs(qc * sc)), dev += fabs(code - 1.5);
                                mag += fabs(qc) * (fabs(sc) * code + fabs(mn));
                            }
                            const double bound = 0.5 * a8 / 127 * dev * 1.001 + 1e-5 * mag + 1e-6;
                            d |= !(fabs(sz[r * 128 + t] - exact) <= bound);
                        }
                        if (d && bad < 40) printf("  differs: %s D=%d R=%d j0=%d n=%d row %d\n", kvq_type_get_traits(T)->name, D, R, j0, cnt, r);
                        bad += d;
                    }
                    n += R;
                }
    CHECK(bad == 0, "key_scores: %d of %d rows of the AVX-512 table differ from the AVX2 table's (Q2 with VNNI: "
                    "from the int8 query's bound)", bad, n);
    printf("key_scores avx2 vs avx512: %d rows, %d differ\n", n, bad);
    free(data), free(par), free(q), free(sta), free(stz);
}

/* The same for the value kernels: the weights' rounding is attn_simd.h's for both tables and the integer sums are
 * exact, so the sums added to acc are the same floats. Softmax-like weights, one of them dominant in some runs (the
 * exact fixup), value groups of 32 and 64 channels. */
static void value_accum_tables(void) {
    const kvq__kernels *a = kvq__kernels_avx2(), *z = kvq__kernels_avx512();
    if (!a || !z) {
        printf("SKIP value_accum avx2 vs avx512: this CPU lacks %s\n", a ? "avx512" : "avx2");
        return;
    }
    static const kvq_type types[4] = {KVQ_TYPE_Q8, KVQ_TYPE_Q4, KVQ_TYPE_Q2, KVQ_TYPE_Q3};
    static const int dims[3] = {64, 128, 256};
    static const int runs[][2] = {{0, 64}, {5, 59}, {40, 24}, {3, 8}, {0, 1}, {16, 13}};
    const int N = 64;
    uint8_t *data = malloc((size_t)N * 256);
    uint16_t *par = malloc((size_t)N * 2 * 8 * sizeof(uint16_t));
    float *p = malloc(4 * 64 * sizeof(float)), *aa = malloc(4 * 256 * sizeof(float)), *az = malloc(4 * 256 * sizeof(float));
    int bad = 0, n = 0;
    for (int ti = 0; ti < 4; ti++)
        for (int di = 0; di < 3; di++)
            for (int gv = 32; gv <= 64; gv += 32)
                for (int R = 1; R <= 4; R++)
                    for (size_t ri = 0; ri < sizeof runs / sizeof runs[0]; ri++) {
                        const kvq_type T = types[ti];
                        const int D = dims[di], ng = D / gv;
                        if (T == KVQ_TYPE_Q8 && gv == 32) continue; /* per-token: no value groups */
                        for (size_t i = 0; i < (size_t)N * 256; i++) data[i] = (uint8_t)(tu_uniform() * 256);
                        for (int i = 0; i < N * 2 * ng; i++)
                            par[i] = kvq__f32_to_f16((float)(T == KVQ_TYPE_Q8 || i % 2 == 0 ? 0.01 + tu_uniform() : tu_normal()));
                        const int j0 = runs[ri][0], cnt = runs[ri][1];
                        for (int r = 0; r < R; r++) {
                            double sum = 0;
                            /* flat weights every third row: Q4's 16-bit sums then take more than one window */
                            const bool flat = (ri + r) % 3 == 1;
                            for (int i = 0; i < cnt; i++)
                                sum += p[r * 64 + i] = (float)(flat ? 1.0 + 0.05 * tu_uniform() : exp(2.0 * tu_normal()));
                            if ((ri + r) % 3 == 0) p[r * 64 + cnt / 2] = (float)(5.0 * sum); /* a dominant token */
                        }
                        kvq__blk b = {0};
                        /* rows at their page stride (D * bits / 8 bytes), which the AVX2 kernels assume for D = 128 */
                        const int bits = T == KVQ_TYPE_Q8 ? 8 : T == KVQ_TYPE_Q4 ? 4 : T == KVQ_TYPE_Q3 ? 3 : 2;
                        b.type = T, b.role = KVQ_VALUE, b.data = data, b.stride = (size_t)D * bits / 8, b.par = par, b.D = D;
                        b.G = 64, b.Gv = T == KVQ_TYPE_Q8 ? D : gv;
                        b.lv16 = T == KVQ_TYPE_Q8 ? NULL : kvq__levels16(T, false);
                        for (int i = 0; i < 4 * 256; i++) aa[i] = az[i] = (float)tu_normal();
                        a->value_accum(&b, j0, cnt, p, 64, R, aa);
                        z->value_accum(&b, j0, cnt, p, 64, R, az);
                        for (int r = 0; r < R; r++) {
                            int d = memcmp(aa + r * D, az + r * D, (size_t)D * 4) != 0;
                            if (d && bad < 20)
                                printf("  value_accum differs: %s D=%d Gv=%d R=%d j0=%d n=%d row %d\n",
                                       kvq_type_get_traits(T)->name, D, gv, R, j0, cnt, r);
                            bad += d;
                        }
                        n += R;
                    }
    CHECK(bad == 0, "value_accum: %d of %d rows of the AVX-512 table differ from the AVX2 table's", bad, n);
    printf("value_accum avx2 vs avx512: %d rows, %d differ\n", n, bad);
    free(data), free(par), free(p), free(aa), free(az);
}

#define backends tu_tables /* scalar, then the SIMD tables this CPU has (tu_find_tables) */
#define n_backends tu_n_tables

/* The prediction is an expectation over random rounding errors; one combination's measured NMSE is one sample, and
 * where a few tokens carry most of the softmax weight (rep = 1, small D) it varies widely: measured / predicted
 * spans 0.2 .. 8.2 over the 1000+ combinations of the full run. So:
 *  - per combination, NMSE < min(QUAL_MARGIN x predicted, QUAL_CAP): the cap keeps an all-zero (NMSE 1), a doubled
 *    (1) or a halved (0.25) output failing where the prediction is large (q2/q2: up to 0.023; measured NMSE up to
 *    0.036);
 *  - per (type_k, type_v), the MEDIAN of measured / predicted over its combinations and tables lies in
 *    [QUAL_MED_LO, QUAL_MED_HI]: it is 0.8 .. 1.4 on this data (printed), and a quantizer whose step is twice the
 *    format's (a scale x2 in quant.c: error variance x4) moves it to ~4; a step of half (scale / 2: clipping) further. */
#define QUAL_MARGIN 12.0
#define QUAL_CAP 0.2
#define QUAL_MED_LO 0.4
#define QUAL_MED_HI 2.2
#define MAX_RATIOS 512
static double ratios[KVQ_TYPE_COUNT][KVQ_TYPE_COUNT][MAX_RATIOS];
static int n_ratios[KVQ_TYPE_COUNT][KVQ_TYPE_COUNT];

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double worst_quality[KVQ_TYPE_COUNT][KVQ_TYPE_COUNT], worst_simd[3][KVQ_TYPE_COUNT][KVQ_TYPE_COUNT];
static double worst_ratio[KVQ_TYPE_COUNT][KVQ_TYPE_COUNT], least_ratio[KVQ_TYPE_COUNT][KVQ_TYPE_COUNT];

/* one of the tables above, for the six types of kvq.h section 4 */
static void print_by_types(const char *title, double t[KVQ_TYPE_COUNT][KVQ_TYPE_COUNT]) {
    printf("%s, rows K, columns V:\n      ", title);
    for (int tv = 0; tv < KVQ_TYPE_COUNT; tv++) printf("%10s", kvq_type_get_traits((kvq_type)tv)->name);
    printf("\n");
    for (int tk = 0; tk < KVQ_TYPE_COUNT; tk++) {
        printf("%6s", kvq_type_get_traits((kvq_type)tk)->name);
        for (int tv = 0; tv < KVQ_TYPE_COUNT; tv++) printf("%10.2e", t[tk][tv]);
        printf("\n");
    }
}

static void run_combo(combo cb) {
    const int H = cb.H ? cb.H : 2, nqh = H * cb.rep, B = 3;
    const int64_t lens[3] = {cb.len0 ? cb.len0 : 300, 17, 129}; /* ragged: pages + window, window only, a page edge */
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.n_layers = 2, cfg.n_kv_heads = H, cfg.head_dim = cb.D, cfg.type_k = cb.tk, cfg.type_v = cb.tv;
    cfg.sinks = cb.sinks;
    cfg.arena_bytes = (size_t)H << 21, cfg.n_threads = 2, cfg.nonuniform = cb.nu, cfg.rotate = cb.rot;
    cfg.outliers = cb.outl, cfg.params8 = cb.p8, cfg.window8 = g_window8;
    if (cb.p8 == KVQ_ROLES_KV) cfg.qnorm = KVQ_ROLES_KV; /* 8-bit pairs nearest to Q-Norm's too */
    kvq_cache *c = NULL;
    CHECK_OK(kvq_cache_create(&cfg, &c));
    if (!c) return;
    kvq_attn_params ap = kvq_attn_params_default(nqh);
    ap.window = cb.window, ap.softcap = cb.softcap;
    float scale = 1.0f / sqrtf((float)cb.D);
    int32_t seqs[3];
    size_t row = (size_t)H * cb.D;
    float *orig[3], *deq[3];
    for (int b = 0; b < B; b++) {
        CHECK_OK(kvq_seq_new(c, &seqs[b]));
        size_t n = (size_t)lens[b] * row;
        orig[b] = malloc(2 * n * sizeof(float));
        deq[b] = malloc(2 * n * sizeof(float));
        tu_fill_kv(orig[b], orig[b] + n, lens[b], H, cb.D);
        /* appended in uneven pieces, as a prefill chunk and then single decode steps would be */
        int64_t done = 0;
        while (done < lens[b]) {
            int32_t piece = (int32_t)(done == 0 ? (lens[b] * 2 / 3 > 0 ? lens[b] * 2 / 3 : 1) : 1);
            if (done + piece > lens[b]) piece = (int32_t)(lens[b] - done);
            CHECK_OK(kvq_append(c, 1, 1, &seqs[b], &piece, KVQ_DTYPE_F32, orig[b] + done * row, orig[b] + n + done * row));
            done += piece;
        }
        CHECK_OK(kvq_read(c, seqs[b], 1, 0, lens[b], deq[b], deq[b] + n));
    }
    size_t qn = (size_t)B * nqh * cb.D;
    float *q = malloc(qn * 4), *out = malloc(qn * 4), *out_ref = malloc(qn * 4);
    double *ref = malloc(qn * 8), *refq = malloc(qn * 8);
    for (size_t i = 0; i < qn; i++) q[i] = (float)tu_normal();
    setenv("KVQ_FORCE_SCALAR", "1", 1);
    CHECK_OK(kvq_attn_decode(c, 1, B, seqs, q, out_ref, &ap));
    unsetenv("KVQ_FORCE_SCALAR");
    for (int b = 0; b < B; b++) {
        size_t n = (size_t)lens[b] * row, o = (size_t)b * nqh * cb.D;
        int64_t pos = lens[b] - 1;
        tu_attn_ref(q + o, 1, nqh, &pos, deq[b], deq[b] + n, lens[b], H, cb.D, scale, cb.window, cb.softcap, ref + o);
        tu_attn_ref(q + o, 1, nqh, &pos, orig[b], orig[b] + n, lens[b], H, cb.D, scale, cb.window, cb.softcap, refq + o);
    }
    double *refd = malloc(qn * 8);
    for (size_t i = 0; i < qn; i++) refd[i] = out_ref[i];
    /* the quality bound: the error the formats predict for this data (format_var, predicted_error) */
    kvq_page_layout L;
    kvq_cache_config got;
    kvq_cache_get_config(c, &got, &L);
    double pnum = 0, pden = 0;
    for (int b = 0; b < B; b++) {
        size_t n = (size_t)lens[b] * row, o = (size_t)b * nqh * cb.D;
        int64_t pos = lens[b] - 1;
        kvq_seq_view view;
        CHECK_OK(kvq_seq_view_get(c, seqs[b], 1, &view));
        double *vk = malloc(n * 8), *vv = malloc(n * 8);
        CHECK(view.sink_tokens == (lens[b] < got.sinks ? lens[b] : got.sinks), "sinks %d: view holds %d sink tokens of %lld",
              got.sinks, view.sink_tokens, (long long)lens[b]);
                /* a rotated cache quantizes R k and R v: the formats' error of those, seen by R q (q.k = Rq.Rk) and carried
         * back by R^T, which keeps the output error's energy (R orthonormal), so the prediction is made in the rotated
         * domain; R is the cache's own (kvq_rotation_apply: the identity for a role that is not rotated) */
        float *rk = malloc(2 * n * 4), *rq = malloc((size_t)nqh * cb.D * 4);
        memcpy(rk, orig[b], 2 * n * 4), memcpy(rq, q + o, (size_t)nqh * cb.D * 4);
        CHECK_OK(kvq_rotation_apply(c, 1, KVQ_KEY, 0, rk, (int)(lens[b] * H)));
        CHECK_OK(kvq_rotation_apply(c, 1, KVQ_VALUE, 0, rk + n, (int)(lens[b] * H)));
        CHECK_OK(kvq_rotation_apply(c, 1, KVQ_KEY, 0, rq, nqh));
        format_var(cb.tk, KVQ_KEY, rk, lens[b], view.sink_tokens, view.paged_tokens, H, cb.D, L.group, L.value_group,
                   g_window8 & 1, vk);
        format_var(cb.tv, KVQ_VALUE, rk + n, lens[b], view.sink_tokens, view.paged_tokens, H, cb.D, L.group, L.value_group,
                   g_window8 >> 1 & 1, vv);
        predicted_error(rq, 1, nqh, &pos, rk, rk + n, vk, vv, lens[b], H, cb.D, scale, cb.window, cb.softcap, &pnum,
                        &pden);
        free(vk), free(vv), free(rk), free(rq);
    }
    const double pred = pnum / pden, qbound = fmin(QUAL_MARGIN * pred, QUAL_CAP);
    double e_ref = tu_nmse(out_ref, ref, qn);
    const char *nk = kvq_type_get_traits(cb.tk)->name, *nv = kvq_type_get_traits(cb.tv)->name;
    /* int16 rounding of q and p in the integer kernels: NMSE ~ (2^-15)^2 * a few, measured <= 5e-9. The Q4/Q2 value
     * kernels round the softmax weights (times the value scales) to 8 bits per segment of 64 tokens, all but the
     * largest, which is kept exact: measured <= 1.8e-6 (7.9e-6 when the largest was rounded too), under 1% of those
     * types' own error energy (quality NMSE >= 3e-4 on this data). Q3's key kernels round queries to int16 (the int16
     * bound); its value kernels, see below. */
    bool int_path = cb.tk == KVQ_TYPE_Q8 || cb.tk == KVQ_TYPE_Q4 || cb.tk == KVQ_TYPE_Q2 || cb.tv == KVQ_TYPE_Q8 ||
                    cb.tv == KVQ_TYPE_Q4 || cb.tv == KVQ_TYPE_Q2 || cb.tk == KVQ_TYPE_Q3 || cb.tv == KVQ_TYPE_Q3;
    /* Q3 values (D a multiple of 128) now take the same 8-bit weights as Q4/Q2 (attn_simd.h, value_weights8), rounded
     * the same way, against centered levels of at most 32/8 = 4 steps (Q4's codes: 8): the Q4/Q2 bound */
    bool w8_path = cb.tv == KVQ_TYPE_Q4 || cb.tv == KVQ_TYPE_Q2 || cb.tv == KVQ_TYPE_Q3;
    double simd_bound = w8_path ? 6e-6 : int_path ? 2e-8 : 1e-10, arith_bound = w8_path ? 6e-6 : int_path ? 2e-8 : 1e-9;
    /* The avx512 table's Q2 keys on a VNNI CPU meet an int8 query (attn_avx512.c, "Q2 keys against an int8
     * query"): measured <= 6.5e-6 here, 0.01-0.1% of Q2 keys' own quality NMSE on this data (8.6e-3 .. 5.7e-2) */
    const bool k8_keys = cb.tk == KVQ_TYPE_Q2 && (cb.D == 128 || cb.D == 256) && cb.rep <= 4 &&
                         __builtin_cpu_supports("avx512vnni");
    for (int k = 0; k < n_backends; k++) {
        setenv("KVQ_CPU_KERNELS", backends[k], 1);
        const bool k8 = k8_keys && !strcmp(backends[k], "avx512");
        const double simd_bound_k = k8 ? fmax(simd_bound, 2e-5) : simd_bound;
        const double arith_bound_k = k8 ? fmax(arith_bound, 2e-5) : arith_bound;
        CHECK_OK(kvq_attn_decode(c, 1, B, seqs, q, out, &ap));
        double e_arith = tu_nmse(out, ref, qn), e_qual = tu_nmse(out, refq, qn);
        double e_simd = tu_nmse(out, refd, qn);
        if (e_simd > worst_simd[k][cb.tk][cb.tv]) worst_simd[k][cb.tk][cb.tv] = e_simd;
        CHECK(e_arith < arith_bound_k && e_ref < 1e-9,
              "decode %s/%s D=%d rep=%d win=%d cap=%g: arithmetic NMSE %s %g ref %g", nk, nv, cb.D, cb.rep,
              cb.window, (double)cb.softcap, backends[k], e_arith, e_ref);
        CHECK(e_simd < simd_bound_k, "decode %s/%s D=%d rep=%d win=%d: %s vs _ref NMSE %g", nk, nv, cb.D,
              cb.rep, cb.window, backends[k], e_simd);
        CHECK(e_qual < qbound, "decode %s/%s D=%d rep=%d win=%d cap=%g: %s quality NMSE %g over %g (%g x the formats' %g)",
              nk, nv, cb.D, cb.rep, cb.window, (double)cb.softcap, backends[k], e_qual, qbound, e_qual / pred, pred);
        if (n_ratios[cb.tk][cb.tv] < MAX_RATIOS) ratios[cb.tk][cb.tv][n_ratios[cb.tk][cb.tv]++] = e_qual / pred;
        if (e_qual > worst_quality[cb.tk][cb.tv]) worst_quality[cb.tk][cb.tv] = e_qual;
        double ratio = e_qual / pred;
        if (ratio > worst_ratio[cb.tk][cb.tv]) worst_ratio[cb.tk][cb.tv] = ratio;
        if (least_ratio[cb.tk][cb.tv] == 0 || ratio < least_ratio[cb.tk][cb.tv]) least_ratio[cb.tk][cb.tv] = ratio;
    }
    unsetenv("KVQ_CPU_KERNELS");

    /* chunked prefill: the last nq tokens of sequence 0 */
    const int nq = 37;
    size_t pn = (size_t)nq * nqh * cb.D, n0 = (size_t)lens[0] * row;
    float *pq = malloc(pn * 4), *pout = malloc(pn * 4), *pout_ref = malloc(pn * 4);
    double *pref = malloc(pn * 8);
    int64_t pos[37];
    for (int i = 0; i < nq; i++) pos[i] = lens[0] - nq + i;
    for (size_t i = 0; i < pn; i++) pq[i] = (float)tu_normal();
    setenv("KVQ_FORCE_SCALAR", "1", 1);
    CHECK_OK(kvq_attn_prefill(c, 1, seqs[0], nq, pq, pout_ref, &ap));
    unsetenv("KVQ_FORCE_SCALAR");
    tu_attn_ref(pq, nq, nqh, pos, deq[0], deq[0] + n0, lens[0], H, cb.D, scale, cb.window, cb.softcap, pref);
    double p_ref = tu_nmse(pout_ref, pref, pn);
    for (int k = 0; k < n_backends; k++) {
        setenv("KVQ_CPU_KERNELS", backends[k], 1);
        CHECK_OK(kvq_attn_prefill(c, 1, seqs[0], nq, pq, pout, &ap));
        double p_arith = tu_nmse(pout, pref, pn);
        CHECK(p_arith < 1e-9 && p_ref < 1e-9, "prefill %s/%s D=%d rep=%d win=%d: NMSE %s %g ref %g", nk, nv,
              cb.D, cb.rep, cb.window, backends[k], p_arith, p_ref);
    }
    unsetenv("KVQ_CPU_KERNELS");

    free(pq), free(pout), free(pout_ref), free(pref), free(refd);
    free(q), free(out), free(out_ref), free(ref), free(refq);
    for (int b = 0; b < B; b++) free(orig[b]), free(deq[b]);
    kvq_cache_free(c);
}

/* A dominant token (a sink: its logit ~12 above the others', so it takes ~90% of the softmax weight) in a cache
 * whose values are Q4 or Q2: each table against the _ref kernels. The SIMD value kernels round the weights of a
 * 64-token segment to 8 bits; if the dominant weight set that scale, the others would keep one or two steps of it
 * (NMSE 5.7e-5 q4, 1e-4 q2 before the largest weight was kept exact). With the largest weight exact the rest are
 * rounded against the second largest: <= 7.1e-9 (avx2 and avx512 alike) on this file's data, but the data decides:
 * over 300 other seeds of the same cases the worst was 1.7e-7 (q2, D = 64), and 10 of the 2400 cases were above the
 * 4e-8 this bound was, so that adding random draws before these checks (as a new test does) moved them over it. The
 * bound is 5e-7: 3x that worst, 100x under the failure it guards. */
#define DOMINANT_BOUND 5e-7
static double worst_dominant[3];
static void run_dominant(kvq_type t, int D, int rep, int64_t at) {
    const int H = 2, nqh = H * rep;
    const int64_t T = 300;
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.n_layers = 1, cfg.n_kv_heads = H, cfg.head_dim = D, cfg.type_k = t, cfg.type_v = t;
    cfg.arena_bytes = (size_t)H << 21, cfg.n_threads = 1;
    kvq_cache *c = NULL;
    CHECK_OK(kvq_cache_create(&cfg, &c));
    if (!c) return;
    int32_t seq;
    CHECK_OK(kvq_seq_new(c, &seq));
    size_t row = (size_t)H * D, n = (size_t)T * row, qn = (size_t)nqh * D;
    float *k = malloc(n * 4), *v = malloc(n * 4), *q = malloc(qn * 4), *out = malloc(qn * 4), *ref = malloc(qn * 4);
    tu_fill_kv(k, v, (size_t)T, H, D);
    /* the query heads of a KV head share a direction u (|u|^2 ~ D); the dominant key adds 12 / sqrt(D) u */
    for (int h = 0; h < H; h++) {
        float u[256];
        for (int d = 0; d < D; d++) u[d] = (float)tu_normal();
        for (int r = 0; r < rep; r++)
            for (int d = 0; d < D; d++) q[((size_t)h * rep + r) * D + d] = u[d] + 0.3f * (float)tu_normal();
        for (int d = 0; d < D; d++) k[((size_t)at * H + h) * D + d] += 12.0f * sqrtf((float)D) / (float)D * u[d];
    }
    int32_t cnt = (int32_t)T;
    CHECK_OK(kvq_append(c, 0, 1, &seq, &cnt, KVQ_DTYPE_F32, k, v));
    kvq_attn_params ap = kvq_attn_params_default(nqh);
    setenv("KVQ_FORCE_SCALAR", "1", 1);
    CHECK_OK(kvq_attn_decode(c, 0, 1, &seq, q, ref, &ap));
    unsetenv("KVQ_FORCE_SCALAR");
    double *refd = malloc(qn * 8);
    for (size_t i = 0; i < qn; i++) refd[i] = ref[i];
    for (int b = 0; b < n_backends; b++) {
        setenv("KVQ_CPU_KERNELS", backends[b], 1);
        CHECK_OK(kvq_attn_decode(c, 0, 1, &seq, q, out, &ap));
        double e = tu_nmse(out, refd, qn);
        /* Q2 keys on the avx512 table of a VNNI CPU meet an int8 query (run_combo's k8 bound): their logits' rounding
         * moves the weights too (8.1e-7 measured), still 5x under the failure this guards (1e-4) */
        const bool k8 = t == KVQ_TYPE_Q2 && (D == 128 || D == 256) && rep <= 4 && !strcmp(backends[b], "avx512") &&
                        __builtin_cpu_supports("avx512vnni");
        const double bound = k8 ? 2e-5 : DOMINANT_BOUND;
        if (e > worst_dominant[b] && !k8) worst_dominant[b] = e;
        CHECK(e < bound, "dominant token %s D=%d rep=%d at %lld: %s vs _ref NMSE %g (bound %g)",
              kvq_type_get_traits(t)->name, D, rep, (long long)at, backends[b], e, bound);
    }
    unsetenv("KVQ_CPU_KERNELS");
    free(k), free(v), free(q), free(out), free(ref), free(refd);
    kvq_cache_free(c);
}

/* One logit far above the others (+60 over N(0, 1) logits): the output is that token's value. The integer value
 * kernels round each segment's weights with one scale per row: here every other weight (e^-60 of the largest)
 * rounds to 0, and an error in the scale or in the dominant weight's rounding moves the output by O(1). Every
 * table against fp64 attention over the cache's own contents (the int16 bound, 2e-8) and against the dominant
 * token's dequantized value. */
static void one_far_logit(kvq_type tk, kvq_type tv, int D, int rep) {
    const int H = 2, T = 300, hot = 137, nqh = H * rep;
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.n_layers = 1, cfg.n_kv_heads = H, cfg.head_dim = D, cfg.type_k = tk, cfg.type_v = tv, cfg.residual = 0;
    cfg.arena_bytes = 4u << 20;
    kvq_cache *c = NULL;
    CHECK_OK(kvq_cache_create(&cfg, &c));
    if (!c) return;
    size_t row = (size_t)H * D, n = (size_t)T * row;
    float *k = malloc(n * 4), *v = malloc(n * 4), *kd = malloc(n * 4), *vd = malloc(n * 4);
    float *q = malloc((size_t)nqh * D * 4), *out = malloc((size_t)nqh * D * 4);
    double *ref = malloc((size_t)nqh * D * 8);
    for (size_t i = 0; i < n; i++) k[i] = (float)tu_normal(), v[i] = (float)tu_normal();
    /* every query head of KV head h is the same unit vector u_h; the hot key is u_h * 60 sqrt(D) (logit 60) */
    const float scale = 1.0f / sqrtf((float)D);
    for (int h = 0; h < H; h++) {
        float *u = q + (size_t)h * rep * D, nrm = 0;
        for (int d = 0; d < D; d++) u[d] = (float)tu_normal(), nrm += u[d] * u[d];
        for (int d = 0; d < D; d++) u[d] /= sqrtf(nrm);
        for (int d = 0; d < D; d++) k[(size_t)hot * row + (size_t)h * D + d] = u[d] * 60.0f / scale;
        for (int r = 1; r < rep; r++) memcpy(u + (size_t)r * D, u, (size_t)D * 4);
    }
    int32_t seq, nt = T;
    CHECK_OK(kvq_seq_new(c, &seq));
    CHECK_OK(kvq_append(c, 0, 1, &seq, &nt, KVQ_DTYPE_F32, k, v));
    CHECK_OK(kvq_read(c, seq, 0, 0, T, kd, vd));
    kvq_attn_params ap = kvq_attn_params_default(nqh);
    int64_t pos = T - 1;
    tu_attn_ref(q, 1, nqh, &pos, kd, vd, T, H, D, scale, 0, 0.0f, ref);
    for (int tb = 0; tb < tu_n_tables; tb++) {
        tu_use_table(tu_tables[tb]);
        CHECK_OK(kvq_attn_decode(c, 0, 1, &seq, q, out, &ap));
        double e = tu_nmse(out, ref, (size_t)nqh * D), ev = 0, den = 0;
        for (int qh = 0; qh < nqh; qh++)
            for (int d = 0; d < D; d++) {
                double x = vd[(size_t)hot * row + (size_t)(qh / rep) * D + d], y = out[(size_t)qh * D + d];
                ev += (y - x) * (y - x), den += x * x;
            }
        CHECK(e < 2e-8 && ev / den < 2e-8, "one far logit %s/%s D=%d rep=%d %s: NMSE %g vs fp64, %g vs the hot value",
              kvq_type_get_traits(tk)->name, kvq_type_get_traits(tv)->name, D, rep, tu_tables[tb], e, ev / den);
    }
    unsetenv("KVQ_CPU_KERNELS");
    free(k), free(v), free(kd), free(vd), free(q), free(out), free(ref);
    kvq_cache_free(c);
}

int main(void) {
    tu_seed(7);
    printf("CPU kernels: %s\n", kvq_cpu_backend());
    tu_find_tables();
    key_scores_tables();
    value_accum_tables();
    static const int dims[] = {64, 80, 96, 128, 256};
    int quick = tu_quick(), n = 0;
    for (int tk = 0; tk < KVQ_TYPE_COUNT; tk++)
        for (int tv = 0; tv < KVQ_TYPE_COUNT; tv++) {
            if (!kvq_type_get_traits((kvq_type)tk)->implemented || !kvq_type_get_traits((kvq_type)tv)->implemented)
                continue;
            for (int di = 0; di < 5; di++) {
                if (quick && (di % 2 || (tk != tv && di != 0))) continue;
                for (int rep = 1; rep <= 4; rep *= 4)
                    for (int w = 0; w < 2; w++) {
                        /* half of the runs on a rotated cache (K and V), every type pair and head dim both ways */
                        combo cb = {(kvq_type)tk, (kvq_type)tv, dims[di], rep, w ? 100 : 0, w && rep == 4 ? 30.0f : 0.0f, 2,
                                    0, (di + w) % 2 ? KVQ_ROLES_KV : KVQ_ROLES_NONE, 0, 0, 0, 0};
                        run_combo(cb);
                        n++;
                    }
            }
        }
    /* more KV heads than one decode work item walks together (16) */
    run_combo((combo){KVQ_TYPE_Q4, KVQ_TYPE_Q8, 64, 2, 0, 0.0f, 18, 0, 0, 0, 0, 0, 0});
    run_combo((combo){KVQ_TYPE_F16, KVQ_TYPE_F16, 128, 1, 0, 0.0f, 17, 0, 0, 0, 0, 0, 0});
    /* 8 query heads per KV head: the fused fp32 kernels for 5 to 8 rows, every type's key and value path */
    run_combo((combo){KVQ_TYPE_Q4, KVQ_TYPE_Q2, 128, 8, 0, 0.0f, 2, 0, 0, 0, 0, 0, 0});
    run_combo((combo){KVQ_TYPE_Q2, KVQ_TYPE_Q4, 64, 8, 100, 0.0f, 2, 0, 0, 0, 0, 0, 0});
    run_combo((combo){KVQ_TYPE_FP8, KVQ_TYPE_Q8, 80, 8, 0, 0.0f, 2, 0, 0, 0, 0, 0, 0});
    run_combo((combo){KVQ_TYPE_Q8, KVQ_TYPE_FP8, 96, 8, 0, 30.0f, 2, 0, 0, 0, 0, 0, 0});
    run_combo((combo){KVQ_TYPE_BF16, KVQ_TYPE_F16, 256, 8, 0, 0.0f, 2, 0, 0, 0, 0, 0, 0});
    /* SmolLM2-135M's shape: D = 64, 3 KV heads, 3 query heads per KV head (R = 3 in the integer kernels; no other
     * combination has an odd ratio above 1) */
    run_combo((combo){KVQ_TYPE_Q4, KVQ_TYPE_Q4, 64, 3, 0, 0.0f, 3, 0, 0, 0, 0, 0, 0});
    run_combo((combo){KVQ_TYPE_Q2, KVQ_TYPE_Q2, 64, 3, 0, 0.0f, 3, 0, 0, 0, 0, 0, 0});
    run_combo((combo){KVQ_TYPE_Q8, KVQ_TYPE_FP8, 64, 3, 0, 0.0f, 3, 0, 0, 0, 0, 0, 0});
    /* rotated keys only and values only: the query and the output each rotated alone */
    run_combo((combo){KVQ_TYPE_Q4, KVQ_TYPE_Q2, 64, 3, 0, 0.0f, 3, 0, KVQ_ROLES_K, 0, 0, 0, 0});
    run_combo((combo){KVQ_TYPE_Q2, KVQ_TYPE_Q4, 96, 4, 100, 0.0f, 2, 0, KVQ_ROLES_V, 0, 0, 0, 0});
    n += 2;
    /* Q3: 8 rows (decoded tiles through the fp32 kernels), SmolLM2's shape, more heads than a work item walks */
    run_combo((combo){KVQ_TYPE_Q3, KVQ_TYPE_Q3, 128, 8, 0, 0.0f, 2, 0, 0, 0, 0, 0, 0});
    run_combo((combo){KVQ_TYPE_Q3, KVQ_TYPE_Q3, 80, 8, 100, 30.0f, 2, 0, 0, 0, 0, 0, 0});
    run_combo((combo){KVQ_TYPE_Q3, KVQ_TYPE_Q3, 64, 3, 0, 0.0f, 3, 0, 0, 0, 0, 0, 0});
    run_combo((combo){KVQ_TYPE_Q4, KVQ_TYPE_Q3, 64, 3, 0, 0.0f, 3, 0, 0, 0, 0, 0, 0});
    run_combo((combo){KVQ_TYPE_Q3, KVQ_TYPE_Q8, 96, 2, 0, 0.0f, 18, 0, 0, 0, 0, 0, 0});
    n += 15;
    /* non-uniform levels (kvq.h section 10) for keys, values or both, every head dim: the SIMD tables decode them
     * through a lookup (a wrong level fails the comparison with _ref) and the quality bound holds (their error is
     * below the uniform levels' step^2 / 12 on Gaussian groups) */
    for (int di = 0; di < 5; di++)
        for (int nu = 1; nu <= 3; nu++) {
            if (quick && nu != 3) continue;
            run_combo((combo){KVQ_TYPE_Q4, KVQ_TYPE_Q4, dims[di], 4, 0, 0.0f, 2, nu, di % 2 ? KVQ_ROLES_KV : 0, 0, 0, 0, 0});
            run_combo((combo){KVQ_TYPE_Q2, KVQ_TYPE_Q2, dims[di], 1, di % 2 ? 100 : 0, 0.0f, 2, nu, 0, 0, 0, 0, 0});
            run_combo((combo){KVQ_TYPE_Q4, KVQ_TYPE_Q2, dims[di], 3, 0, 0.0f, 3, nu, 0, 0, 0, 0, 0});
            run_combo((combo){KVQ_TYPE_Q3, KVQ_TYPE_Q3, dims[di], 2, 0, 0.0f, 2, nu, 0, 0, 0, 0, 0});
            n += 4;
        }
    /* dense-and-sparse outliers (kvq.h section 10): added by the driver to the fused kernels' scores and value sums
     * (up to 8 rows) and to the fp32 path's (9 rows: prefill's too), keys, values or both, every grouped type and head
     * dim, sinks, a window and a soft-cap: the arithmetic against kvq_read's contents (which include them) */
    for (int di = 0; di < 5; di++)
        for (int o = 1; o <= 3; o++) {
            if (quick && o != 3 && di % 2) continue;
            run_combo((combo){KVQ_TYPE_Q4, KVQ_TYPE_Q4, dims[di], 4, 0, 0.0f, 2, 0, di % 2 ? KVQ_ROLES_KV : 0, 0, 0, o, 0});
            run_combo((combo){KVQ_TYPE_Q2, KVQ_TYPE_Q3, dims[di], 3, di % 2 ? 100 : 0, 30.0f, 3, 0, 0, 1, 0, o, 0});
            run_combo((combo){KVQ_TYPE_Q3, KVQ_TYPE_Q2, dims[di], 9, 0, 0.0f, 1, 3, KVQ_ROLES_KV, 1, 0, o, 0});
            n += 3;
        }
    run_combo((combo){KVQ_TYPE_Q8, KVQ_TYPE_Q4, 128, 2, 0, 0.0f, 2, 0, 0, 0, 0, KVQ_ROLES_KV, 0}); /* q8 keys ignore it */
    n++;
    /* 8-bit group parameters (kvq.h section 5): each table's p8_expand against kvq_read's (the scalar expansion), with
     * the fused kernels (up to 8 rows) and the fp32 path (9), outliers, sinks, windows, Q-Norm's pairs (p8 = KV: the
     * engine's default; the config's is off), a split over work items (len0 1300) */
    for (int di = 0; di < 5; di++)
        for (int p8 = 1; p8 <= 3; p8++) {
            if (quick && p8 != 3 && di % 2) continue;
            run_combo((combo){KVQ_TYPE_Q4, KVQ_TYPE_Q4, dims[di], 4, 0, 0.0f, 2, 0, di % 2 ? KVQ_ROLES_KV : 0, 0, 0, 0, p8});
            run_combo((combo){KVQ_TYPE_Q2, KVQ_TYPE_Q3, dims[di], 3, di % 2 ? 100 : 0, 30.0f, 3, 3, 0, 1, 0, 1, p8});
            run_combo((combo){KVQ_TYPE_Q3, KVQ_TYPE_Q2, dims[di], 9, 0, 0.0f, 1, 0, KVQ_ROLES_KV, 1, di == 2 ? 1300 : 0, 3, p8});
            n += 3;
        }
    run_combo((combo){KVQ_TYPE_Q8, KVQ_TYPE_FP8, 64, 2, 0, 0.0f, 2, 0, 0, 0, 0, 0, KVQ_ROLES_KV}); /* per-token types ignore it */
    n++;
    /* 8-bit windows: the driver expands a head's window rows to fp16 before the kernels read them; every table
     * against kvq_read's contents, decode (fused kernels) and prefill (37 rows: the fp32 path), with 8-bit
     * parameters, sinks, a sliding window, rotation, soft-cap and a split over work items (len0 1300) */
    for (int di = 0; di < 5; di++)
        for (g_window8 = 1; g_window8 <= 3; g_window8++) {
            /* quick (the sanitizer tier): both roles at D = 64 and 128, keys alone at D = 80 */
            if (quick && !(g_window8 == 3 && (di == 0 || di == 3)) && !(g_window8 == 1 && di == 1)) continue;
            run_combo((combo){KVQ_TYPE_Q4, KVQ_TYPE_Q4, dims[di], 4, 0, 0.0f, 2, 0, di % 2 ? KVQ_ROLES_KV : 0, 0, 0, 0, di % 2 ? 3 : 0});
            run_combo((combo){KVQ_TYPE_Q2, KVQ_TYPE_Q3, dims[di], 3, di % 2 ? 100 : 0, 30.0f, 3, 3, KVQ_ROLES_KV, 1, di == 2 ? 1300 : 0, 0, 0});
            run_combo((combo){KVQ_TYPE_Q8, KVQ_TYPE_Q4, dims[di], 2, 0, 0.0f, 1, 0, 0, 0, 0, 0, 0});
            n += 3;
        }
    g_window8 = 0;
    /* Q3 at D = 128 too, where its value kernels take 8-bit weights and keep a dominant one exact as Q4/Q2's do.
     * (Q3 at D = 64, whose SIMD kernels keep int16 weights, measured 8.5e-8 .. 3.2e-7 here with the token at 3, on
     * the kernels before this change as well: not yet under this bound.) */
    for (int ti = 0; ti < 3; ti++)
        for (int D = ti == 2 ? 128 : 64; D <= 128; D *= 2)
            for (int rep = 1; rep <= 3; rep += 2)
                for (int at = 0; at < 2; at++)
                    run_dominant(ti == 2 ? KVQ_TYPE_Q3 : ti ? KVQ_TYPE_Q2 : KVQ_TYPE_Q4, D, rep, at ? 201 : 3);
    for (int k = 0; k < n_backends; k++)
        printf("dominant token: worst NMSE of the %s kernels against the _ref kernels %.2e (bound %g)\n", backends[k],
               worst_dominant[k], DOMINANT_BOUND);
    for (int di = 0; di < 5; di++) one_far_logit(KVQ_TYPE_Q3, KVQ_TYPE_Q3, dims[di], di % 2 ? 4 : 1);
    one_far_logit(KVQ_TYPE_F16, KVQ_TYPE_Q3, 128, 8);
    one_far_logit(KVQ_TYPE_Q3, KVQ_TYPE_Q8, 64, 3);
    /* attention sinks (kvq.h section 10): fp16 sink pages first, then pages whose groups start at S, then the window;
     * S inside a page of sinks, at a page edge, past sequence 1 (17 tokens: sinks only); windows that reach back into
     * the sinks or not (positions: win = 100 with 300 tokens sees none of them); len0 = 1300 makes decode split
     * sequence 0 over work items (chunks of 512 tokens: boundaries inside the sinks at S = 600, and in the pages) */
    static const combo sink_combos[] = {
        {KVQ_TYPE_Q4, KVQ_TYPE_Q4, 64, 3, 0, 0.0f, 3, 0, 0, 1, 0, 0, 0},     {KVQ_TYPE_Q4, KVQ_TYPE_Q4, 64, 3, 0, 0.0f, 3, 0, 0, 4, 0, 0, 0},
        {KVQ_TYPE_Q2, KVQ_TYPE_Q2, 128, 4, 100, 30.0f, 2, 0, 0, 5, 0, 0, 0}, {KVQ_TYPE_Q4, KVQ_TYPE_Q2, 64, 1, 0, 0.0f, 2, 0, 0, 64, 0, 0, 0},
        {KVQ_TYPE_Q8, KVQ_TYPE_Q4, 80, 4, 0, 0.0f, 2, 0, 0, 70, 0, 0, 0},    {KVQ_TYPE_F16, KVQ_TYPE_F16, 96, 1, 0, 0.0f, 2, 0, 0, 16, 0, 0, 0},
        {KVQ_TYPE_FP8, KVQ_TYPE_Q8, 64, 4, 250, 0.0f, 2, 0, 0, 33, 0, 0, 0}, {KVQ_TYPE_Q4, KVQ_TYPE_Q4, 64, 4, 0, 0.0f, 2, 0, 0, 600, 1300, 0, 0},
        {KVQ_TYPE_Q2, KVQ_TYPE_Q8, 64, 1, 1000, 0.0f, 2, 0, 0, 130, 1300, 0, 0}, {KVQ_TYPE_Q4, KVQ_TYPE_Q4, 128, 2, 0, 0.0f, 2, -1, -1, -1, 0, 0, 0},
    };
    for (size_t i = 0; i < sizeof sink_combos / sizeof *sink_combos; i++) run_combo(sink_combos[i]);
    n += 10 + (int)(sizeof sink_combos / sizeof *sink_combos);
    printf("%d combinations; ", n);
    print_by_types("worst quality NMSE (decode vs fp64 on the original K/V)", worst_quality);
    static double median[KVQ_TYPE_COUNT][KVQ_TYPE_COUNT];
    for (int tk = 0; tk < KVQ_TYPE_COUNT; tk++)
        for (int tv = 0; tv < KVQ_TYPE_COUNT; tv++) {
            int m = n_ratios[tk][tv];
            if (!m) continue;
            qsort(ratios[tk][tv], (size_t)m, sizeof(double), cmp_double);
            median[tk][tv] = m % 2 ? ratios[tk][tv][m / 2] : 0.5 * (ratios[tk][tv][m / 2 - 1] + ratios[tk][tv][m / 2]);
            CHECK(median[tk][tv] > QUAL_MED_LO && median[tk][tv] < QUAL_MED_HI,
                  "%s/%s: median quality NMSE / predicted %g outside [%g, %g] over %d runs", kvq_type_get_traits((kvq_type)tk)->name,
                  kvq_type_get_traits((kvq_type)tv)->name, median[tk][tv], QUAL_MED_LO, QUAL_MED_HI, m);
        }
    print_by_types("median quality NMSE / the formats' predicted NMSE (bounds 0.4, 2.2)", median);
    print_by_types("largest quality NMSE / predicted NMSE (bound 12)", worst_ratio);
    print_by_types("smallest quality NMSE / predicted NMSE", least_ratio);
    for (int k = 0; k < n_backends; k++) {
        char title[128];
        snprintf(title, sizeof title, "worst NMSE of the %s kernels against the _ref kernels", backends[k]);
        print_by_types(title, worst_simd[k]);
    }
    w8_expand_tables();
    return tu_finish("test_attn");
}

/* Fuzz target of the paged cache: the input is a cache configuration and a sequence of operations (sequence
 * new / free / fork / truncate, append with random sizes, types, values and bad input, read back, decode, prefill
 * and exact-prefill attention, stats, SQuat key subspaces), run against a plain model: the original fp32 K/V of every (sequence, layer). Checked after
 * every operation:
 *  - a call that fails leaves the cache exactly as it was (a snapshot: stats, lengths, views, every token read
 *    back, compared bit for bit), and one given NaN/Inf/|x| > 65504 never succeeds;
 *  - read back is within the bound each format promises for the model's values (kvq.h section 5);
 *  - attention on the scalar table is within the fp32 rounding bound of an fp64 computation on the cache's
 *    dequantized data, and each SIMD table the CPU has within that plus its documented roundings (int16 queries,
 *    8-bit Q4/Q2 value weights); a query head with NaN gives NaN, the others stay finite.
 * Any violation aborts. libFuzzer: clang -fsanitize=fuzzer,address,undefined -Iinclude -Isrc/core
 * tests/fuzz_cache.c src/core/ *.c (AVX files with their -m flags); ctest replays tests/corpus/cache/ through
 * tests/fuzz_replay_main.c. */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h" /* the core's fp16 / bf16 conversions (src/core) */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define NL 2
#define MAXS 3
#define MAXT 400 /* tokens per (sequence, layer) the model holds; appends beyond are skipped */
#ifndef ATTN_BUDGET
#define ATTN_BUDGET 6e7 /* multiply-adds of attention per input (run_attention) */
#endif

#define FAIL(...)                                                                                           \
    do {                                                                                                   \
        fprintf(stderr, "fuzz_cache: " __VA_ARGS__);                                                       \
        fprintf(stderr, "\n");                                                                             \
        abort();                                                                                           \
    } while (0)

typedef struct {
    const uint8_t *p;
    size_t n;
} rd;
static unsigned byte(rd *r) {
    if (!r->n) return 0;
    r->n--;
    return *r->p++;
}

typedef struct {
    bool live;
    int32_t id;
    int64_t len[NL];
    float *k[NL], *v[NL]; /* [MAXT][H][D] */
    bool squat;           /* a SQuat subspace was set on it (or on the sequence it was forked from) at some point */
} mseq;

typedef struct {
    kvq_cache *c;
    kvq_cache_config cfg;
    kvq_page_layout L;
    int H, D;
    mseq s[MAXS];
    uint64_t rng;
    double attn_work; /* multiply-adds of the attention runs so far (every table + the fp64 check): see ATTN_BUDGET */
} world;

static double urand(world *w) {
    w->rng ^= w->rng << 13, w->rng ^= w->rng >> 7, w->rng ^= w->rng << 17;
    return (double)(w->rng >> 11) / 9007199254740992.0;
}

/* ---- snapshots: everything observable ---- */
typedef struct {
    kvq_cache_stats st;
    float *data;
    size_t n;
} snap;

static snap take(world *w) {
    snap s;
    memset(&s, 0, sizeof s);
    kvq_cache_get_stats(w->c, &s.st);
    size_t row = (size_t)w->H * w->D, total = 0;
    for (int i = 0; i < MAXS; i++)
        for (int l = 0; l < NL && w->s[i].live; l++) total += 6 + (size_t)w->s[i].len[l] * row * 2;
    s.data = calloc(total + 1, sizeof(float));
    for (int i = 0; i < MAXS; i++)
        for (int l = 0; l < NL && w->s[i].live; l++) {
            kvq_seq_view v;
            int64_t len = -1;
            if (kvq_seq_view_get(w->c, w->s[i].id, l, &v) || kvq_seq_length(w->c, w->s[i].id, l, &len))
                FAIL("view/length of a live sequence failed: %s", kvq_last_error());
            s.data[s.n++] = (float)len, s.data[s.n++] = (float)v.paged_tokens, s.data[s.n++] = (float)v.window_tokens;
            s.data[s.n++] = (float)v.n_pages;
            s.data[s.n++] = (float)v.sink_tokens, s.data[s.n++] = (float)v.n_sink_pages;
            if (len != w->s[i].len[l]) FAIL("seq %d layer %d: length %lld, model %lld", i, l, (long long)len, (long long)w->s[i].len[l]);
            if (kvq_read(w->c, w->s[i].id, l, 0, len, s.data + s.n, s.data + s.n + (size_t)len * row))
                FAIL("read back failed: %s", kvq_last_error());
            s.n += (size_t)len * row * 2;
        }
    return s;
}

static void same_or_die(const snap *a, const snap *b, const char *what) {
    if (a->n != b->n || memcmp(a->data, b->data, a->n * sizeof(float)) || memcmp(&a->st, &b->st, sizeof a->st))
        FAIL("failing %s changed the cache", what);
}

/* ---- read back against the model, per element, with the bounds of kvq.h section 5 ---- */
/* paged: tok is in a quantized page (not a sink, not the window); sink: the sinks before the pages, where key groups
 * start (sink + k*G) */
/* sq: a SQuat key's group range over all its channels (squat_ranges), NULL otherwise */
static double elem_bound_x(world *w, kvq_type t, kvq_role role, const float *x, int64_t tok, int h, int d, bool paged,
                           int64_t sink, const double *sq, double f8);

/* Element e of a row-major [..][D] array after an 8-bit window's rounding of its head vector (kvq.h section 10) */
static float round8(const float *x, size_t e, int D) {
    const float *v = x + e / D * D;
    float amax = 0;
    for (int c = 0; c < D; c++) amax = fmaxf(amax, fabsf(v[c]));
    float s = kvq__round_f16(amax / 127.0f), q = s > 0 ? rintf(x[e] / s) : 0;
    q = q > 127 ? 127 : q < -127 ? -127 : q;
    return kvq__round_f16((float)(int8_t)q * s); /* an integer code: 0, never -0 */
}

/* An 8-bit window (kvq.h section 10) rounds a token to codes under max |x| / 127 per token and head (+ the fp16 of that
 * scale and of the decoded value) before the pages see it: that much more in the window, twice it in a page (the
 * group's range moves by up to two such errors) */
static double elem_bound(world *w, kvq_type t, kvq_role role, const float *x, int64_t tok, int h, int d, bool paged,
                         int64_t sink, const double *sq, double f8) {
    double e8 = 0;
    if ((w->cfg.window8 >> role) & 1 && tok >= sink) {
        const float *row = x + ((size_t)tok * w->H + h) * w->D;
        double amax = 0;
        for (int c = 0; c < w->D; c++) amax = fmax(amax, fabs(row[c]));
        e8 = amax / 254 * 1.01 + amax * 0x1p-10;
    }
    return elem_bound_x(w, t, role, x, tok, h, d, paged, sink, sq, f8) + (paged && t != KVQ_TYPE_F16 ? 2 : 1) * e8;
}

/* 8-bit pairs (kvq.h section 5): the smallest scale that covers [lo, hi] in `steps` steps with a zero point in reach
 * (z in 0 .. 255, unit u = 2^(bits - 7)) */
static double p8_need(double lo, double hi, int bits, double steps) {
    double qmax = (1 << bits) - 1, u = ldexp(1, bits - 7), Z0 = 128 + qmax / (2 * u), s = (hi - lo) / steps;
    if (lo < 0) s = fmax(s, -lo / (Z0 * u));
    if (hi > 0) s = fmax(s, hi / ((255 - Z0) * u + qmax));
    return s;
}

/* f8: the smallest scale of the element's 8-bit parameter grid (p8_floors), 0 without 8-bit parameters */
static double elem_bound_x(world *w, kvq_type t, kvq_role role, const float *x, int64_t tok, int h, int d, bool paged,
                           int64_t sink, const double *sq, double f8) {
    const int H = w->H, D = w->D;
    double xi = x[((size_t)tok * H + h) * D + d], fp16 = fabs(xi) * 0x1p-11 + 0x1p-25; /* window / input rounding */
    if (!paged || t == KVQ_TYPE_F16) return fp16;
    /* SQuat (kvq.h section 10) moves each key's error out of the query subspace into the channels quantized after it:
     * no per-element half step. Bound: the group's range over all its channels (an update that cancels an error never
     * exceeds the errors it cancels by more than the factors of a well-conditioned ridge) */
    if (sq) return 2 * (sq[1] - sq[0]) + fmax(fabs(sq[0]), fabs(sq[1])) * 2e-3 + 1e-6;
    if (t == KVQ_TYPE_BF16) return fabs(xi) * 0x1p-8 + fp16;
    const float *row = x + ((size_t)tok * H + h) * D;
    double amax = 0, lo = INFINITY, hi = -INFINITY;
    for (int c = 0; c < D; c++) amax = fmax(amax, fabs(row[c]));
    if (t == KVQ_TYPE_Q8) return amax / 254 * 1.01 + fp16 + amax * 0x1p-11;
    if (t == KVQ_TYPE_FP8) return fabs(xi) * 0x1p-4 * 1.01 + amax / 448 * 0x1p-9 * 1.01 + 2 * fp16 + amax * 0x1p-11;
    if (role == KVQ_KEY) {
        int64_t g0 = sink + (tok - sink) / w->L.group * w->L.group;
        for (int64_t j = g0; j < g0 + w->L.group; j++) {
            double u = x[((size_t)j * H + h) * D + d];
            lo = fmin(lo, u), hi = fmax(hi, u);
        }
    } else {
        int g0 = d / w->L.value_group * w->L.value_group;
        for (int j = g0; j < g0 + w->L.value_group; j++) lo = fmin(lo, row[j]), hi = fmax(hi, row[j]);
    }
    double qmax = (1 << kvq_type_get_traits(t)->bits) - 1, m = fmax(fabs(lo), fabs(hi));
    if ((w->L.params8 >> role) & 1) {
        /* half of a scale at most one grid step (2^(1/16)) above the smallest that covers the group with the largest
         * z under lo (qmax - u steps), or the grid's floor */
        int bits = kvq_type_get_traits(t)->bits;
        double s = fmax(p8_need(lo, hi, bits, qmax - ldexp(1, bits - 7)), f8);
        return 0.5 * s * 1.0443 * (1 + 4e-3) + (hi - lo) * qmax * 1e-3 + m * 2e-3 + 1e-6;
    }
    /* half a step, widened for the fp16 rounding of scale (x qmax) and min, and of the inputs */
    return 0.5 * (hi - lo) / qmax * (1 + 4e-3) + (hi - lo) * qmax * 1e-3 + fabs(lo) * 1e-3 + m * 0x1p-10 + 1e-6;
}

/* (min, max) of model keys x over each paged key group (tokens sink + k G ..) and all channels, [group][head]: once per
 * (group, head) for SQuat's bound, which per element (O(G D) each) took 98% of a SQuat input's time */
static double *squat_ranges(world *w, const float *x, int64_t sink, int64_t paged) {
    const int H = w->H, D = w->D, G = w->L.group;
    int64_t ng = (paged + G - 1) / G;
    double *rg = malloc(sizeof(double) * 2 * (size_t)(ng ? ng : 1) * H);
    for (int64_t g = 0; g < ng; g++)
        for (int h = 0; h < H; h++) {
            double lo = INFINITY, hi = -INFINITY;
            for (int64_t j = sink + g * G; j < sink + (g + 1) * G; j++)
                for (int c = 0; c < D; c++) lo = fmin(lo, x[((size_t)j * H + h) * D + c]), hi = fmax(hi, x[((size_t)j * H + h) * D + c]);
            rg[2 * ((size_t)g * H + h)] = lo, rg[2 * ((size_t)g * H + h) + 1] = hi;
        }
    return rg;
}

/* 8-bit parameters (kvq.h section 5): the scale grid spans 255/16 octaves below the base b = fp16(4 max_g s_g) of each
 * block of G tokens (s_g: the smallest scale covering group g's range with some zero point), so a group whose own
 * scale would be smaller takes the grid's floor b 2^(-255/16): a token 2^14 times smaller than the largest of its
 * block (the fuzzer's magnitudes 1 and 60000) reads back within half of that floor, not of its own step. Per (block,
 * head) of the role's paged tokens: that floor, over-estimated by the fp16 rounding of b; NULL without params8. */
static double *p8_floors(world *w, kvq_role role, const float *x, int64_t sink, int64_t paged) {
    kvq_type t = role == KVQ_VALUE ? w->L.type_v : w->L.type_k;
    if (!((w->L.params8 >> role) & 1) || !kvq_type_get_traits(t)->grouped) return NULL;
    const int H = w->H, D = w->D, G = w->L.group, Gv = w->L.value_group, bits = kvq_type_get_traits(t)->bits;
    const double qmax = (1 << bits) - 1;
    int64_t nb = paged / G;
    double *f = calloc((size_t)(nb ? nb : 1) * H, sizeof(double));
    for (int64_t b = 0; b < nb; b++)
        for (int h = 0; h < H; h++) {
            double m = 0;
            /* key groups: one channel over the block's G tokens; value groups: Gv channels of one token */
            int n_groups = role == KVQ_KEY ? D : G * (D / Gv), len = role == KVQ_KEY ? G : Gv;
            for (int g = 0; g < n_groups; g++) {
                double lo = INFINITY, hi = -INFINITY;
                for (int j = 0; j < len; j++) {
                    int64_t tok = sink + b * G + (role == KVQ_KEY ? j : g / (D / Gv));
                    int c = role == KVQ_KEY ? g : g % (D / Gv) * Gv + j;
                    double v = x[((size_t)tok * H + h) * D + c];
                    lo = fmin(lo, v), hi = fmax(hi, v);
                }
                m = fmax(m, p8_need(lo, hi, bits, qmax)); /* the quantizer's s_g: qmax steps */
            }
            double base = fmin(4 * m * (1 + 0x1p-10), 65504);
            f[(size_t)b * H + h] = base * exp2(-255.0 / 16) * (1 + 0x1p-10);
        }
    return f;
}

static void check_read(world *w, int i, int l) {
    mseq *q = &w->s[i];
    int64_t len = q->len[l];
    size_t row = (size_t)w->H * w->D;
    float *k = malloc((size_t)(len + 1) * row * 4), *v = malloc((size_t)(len + 1) * row * 4);
    kvq_seq_view view;
    if (kvq_read(w->c, q->id, l, 0, len, k, v) || kvq_seq_view_get(w->c, q->id, l, &view)) FAIL("read: %s", kvq_last_error());
    double *sq = q->squat ? squat_ranges(w, q->k[l], view.sink_tokens, view.paged_tokens) : NULL;
    /* tokens reach the pages G at a time, and a cut inside them sends the rest of its group back to the window */
    if (view.paged_tokens % w->L.group)
        FAIL("%lld paged tokens: not whole groups of %d", (long long)view.paged_tokens, w->L.group);
    double *f8[2] = {p8_floors(w, KVQ_KEY, q->k[l], view.sink_tokens, view.paged_tokens),
                     p8_floors(w, KVQ_VALUE, q->v[l], view.sink_tokens, view.paged_tokens)};
    for (int64_t t = 0; t < len; t++)
        for (int h = 0; h < w->H; h++)
            for (int d = 0; d < w->D; d++)
                for (int r = 0; r < 2; r++) {
                    size_t e = ((size_t)t * w->H + h) * w->D + d;
                    double got = r ? v[e] : k[e], want = r ? q->v[l][e] : q->k[l][e];
                    bool paged = t >= view.sink_tokens && t < view.sink_tokens + view.paged_tokens;
                    const double *sqe = sq && !r && paged ? sq + 2 * ((size_t)((t - view.sink_tokens) / w->L.group) * w->H + h) : NULL;
                    double f8e = f8[r] && paged ? f8[r][(size_t)((t - view.sink_tokens) / w->L.group) * w->H + h] : 0;
                    double b = elem_bound(w, r ? w->L.type_v : w->L.type_k, r ? KVQ_VALUE : KVQ_KEY, r ? q->v[l] : q->k[l], t,
                                          h, d, paged, view.sink_tokens, sqe, f8e);
                    if (!(fabs(got - want) <= b))
                        FAIL("seq %d layer %d token %lld head %d ch %d %s: read %g, model %g, bound %g", i, l, (long long)t, h,
                             d, r ? "v" : "k", got, want, b);
                }
    free(sq), free(f8[0]), free(f8[1]), free(k), free(v);
}

/* ---- attention against fp64 on the dequantized cache ----
 * Scalar table: each logit's fp32 error is at most (D + 2) 2^-24 scale sum_c |q_c k_c| (a D-term dot product, the
 * scaling, the soft-cap's tanhf: + 2^-21 softcap), the weights then move by a factor e^(+-2 delta) and the sums over
 * T tokens add T 2^-23 relative: |out - ref| <= (e^(2 delta) - 1 + (T + D) 2^-22) vmax.
 * SIMD tables: + the int16 rounding of q (|dq_c| <= max|q| / 65534 against codes times scales <= 2 max|k_c|) in
 * delta, + 0.13 vmax where Q4/Q2 values meet 8-bit weights (per 64-token segment the weights' errors sum to at most
 * 64/510 of the segment's largest weight, those maxima sum to at most 1, codes span at most 2 vmax). */
/* xn > 0: kvq_attn_prefill_exact's batch of xn = n_q new tokens (xk, xv: fp32 [xn][H][D]) after the T cached ones;
 * the library holds them in fp16 (in the rotated domain where the role is rotated): each key's and value's vector
 * within 2^-11 of its 2-norm of the fp32 one, which the bound takes in (keys: scale |q| |k| 2^-11 per logit; values:
 * sqrt(D) vmax 2^-11 per channel) */
static void check_attn(world *w, int layer, int nb, const int *slots, int n_q, const float *q, const float *out,
                       const kvq_attn_params *p, bool simd, const float *xk, const float *xv, int xn) {
    const int H = w->H, D = w->D, nqh = p->n_q_heads, rep = nqh / H;
    const float scale = p->scale > 0 ? p->scale : 1.0f / sqrtf((float)D);
    size_t row = (size_t)H * D;
    bool w8 = w->L.type_v == KVQ_TYPE_Q4 || w->L.type_v == KVQ_TYPE_Q2;
    bool k8 = w->L.type_k == KVQ_TYPE_Q2 && __builtin_cpu_supports("avx512vnni");
    for (int b = 0; b < nb; b++) {
        mseq *m = &w->s[slots[b]];
        int64_t T0 = m->len[layer], T = T0 + xn;
        float *k = malloc(((size_t)T + 1) * row * 4), *v = malloc(((size_t)T + 1) * row * 4);
        if (kvq_read(w->c, m->id, layer, 0, T0, k, v)) FAIL("read: %s", kvq_last_error());
        if (xn) memcpy(k + (size_t)T0 * row, xk, (size_t)xn * row * 4), memcpy(v + (size_t)T0 * row, xv, (size_t)xn * row * 4);
        int nqr = n_q ? n_q : 1; /* decode: one query per sequence */
        for (int i = 0; i < nqr; i++) {
            int64_t pos = n_q ? T - n_q + i : T - 1;
            for (int qh = 0; qh < nqh; qh++) {
                int h = qh / rep;
                const float *qq = q + ((size_t)(n_q ? i : b) * nqh + qh) * D;
                const float *o = out + ((size_t)(n_q ? i : b) * nqh + qh) * D;
                bool finite_q = true;
                double qmax = 0;
                for (int d = 0; d < D; d++) finite_q &= isfinite(qq[d]), qmax = fmax(qmax, fabs(qq[d]));
                if (!finite_q) {
                    for (int d = 0; d < D; d++)
                        if (!isnan(o[d])) FAIL("non-finite query head %d gave %g, not NaN", qh, (double)o[d]);
                    continue;
                }
                double mx = -INFINITY, delta = 0, vmax = 0, l = 0, kmax = 0, qn = 0;
                for (int d = 0; d < D; d++) qn += (double)qq[d] * qq[d];
                qn = sqrt(qn);
                for (int64_t t = 0; t < T; t++)
                    for (int d = 0; d < D; d++) kmax = fmax(kmax, fabs(k[((size_t)t * H + h) * D + d]));
                double *s = malloc((size_t)T * 8), *ref = calloc((size_t)D, 8);
                for (int64_t t = 0; t < T; t++) {
                    s[t] = -INFINITY;
                    if (t > pos || (p->window > 0 && t <= pos - p->window)) continue;
                    double a = 0, aa = 0, kn = 0;
                    for (int d = 0; d < D; d++) {
                        double kd = k[((size_t)t * H + h) * D + d];
                        a += qq[d] * kd, aa += fabs(qq[d] * kd), kn += kd * kd;
                        vmax = fmax(vmax, fabs(v[((size_t)t * H + h) * D + d]));
                    }
                    a *= scale;
                    double dl = (D + 2) * 0x1p-24 * scale * aa + (p->softcap > 0 ? 0x1p-21 * p->softcap : 0);
                    if (t >= T0) dl += 0x1p-11 * scale * qn * sqrt(kn); /* the batch's keys in fp16 */
                    /* int16 q (or q * key scale, grouped keys) against codes x scales spanning <= 2 kmax, and q . min in
                     * fp32 */
                    if (simd) dl += scale * qmax * (1.0 / 65534 + D * 0x1p-23) * D * 2 * kmax + 0x1p-20 * scale * aa;
                    /* Q2 keys on an AVX512-VNNI CPU: q * key scale (<= 2 kmax / 3) rounded to int8, half a step of its
                     * largest / 127 against codes within 1.5 of their centre (attn_avx512.c) */
                    if (simd && k8) dl += scale * qmax * (2 * kmax / 3) * (0.5 / 127) * 1.5 * D * 1.01;
                    if (p->softcap > 0) a = p->softcap * tanh(a / p->softcap);
                    s[t] = a, mx = fmax(mx, a), delta = fmax(delta, dl);
                }
                for (int64_t t = 0; t < T; t++)
                    if (s[t] > -INFINITY) {
                        double e = exp(s[t] - mx);
                        l += e;
                        for (int d = 0; d < D; d++) ref[d] += e * v[((size_t)t * H + h) * D + d];
                    }
                double bound = (expm1(2 * fmin(delta, 300)) + (double)(T + D) * 0x1p-22 + (simd && w8 ? 0.13 : 0) +
                                (xn ? 0x1p-11 * sqrt((double)D) : 0)) * vmax + 1e-30;
                for (int d = 0; d < D; d++) {
                    double r = ref[d] / l;
                    if (!(fabs(o[d] - r) <= bound))
                        FAIL("%s layer %d seq slot %d query %d head %d ch %d: %g vs fp64 %g (bound %g, %s, T %lld, win %d, "
                             "cap %g)", xn ? "exact prefill" : n_q ? "prefill" : "decode", layer, slots[b], i, qh, d, (double)o[d], r, bound,
                             simd ? "simd" : "scalar", (long long)T, p->window, (double)p->softcap);
                }
                free(s), free(ref);
            }
        }
        free(k), free(v);
    }
}

static const char *simd_tables[2];
static int n_simd = -1;

static void find_tables(void) {
    static const char *const names[2] = {"avx2", "avx512"};
    n_simd = 0;
    for (int i = 0; i < 2; i++) {
        setenv("KVQ_CPU_KERNELS", names[i], 1);
        if (!strcmp(kvq_cpu_backend(), names[i])) simd_tables[n_simd++] = names[i];
    }
    unsetenv("KVQ_CPU_KERNELS");
}

static void fill(world *w, float *x, size_t n, unsigned mode) {
    static const double mag[6] = {0, 1, 0.01, 30, 3000, 60000};
    double m = mag[mode % 6];
    for (size_t i = 0; i < n; i++) x[i] = (float)(m * (2 * urand(w) - 1));
}

static int slot_of(world *w, unsigned b) { return (int)(b % MAXS); }
static int free_slot(world *w) {
    for (int i = 0; i < MAXS; i++)
        if (!w->s[i].live) return i;
    return -1;
}

/* A thread pool handed to the cache (kvq_cache_set_thread_pool): tasks run on the caller, thread indices spread
 * over the pool's size, which sets attention's work split like a real pool of that size. */
static void serial_run(void *ctx, int n_tasks, kvq_task_fn fn, void *arg) {
    int n = *(const int *)ctx;
    for (int i = n_tasks - 1; i >= 0; i--) fn(arg, i, i % n); /* backwards: no reliance on task order */
}

/* mode bit 0: a prefill, else decode; with bit 1 too, kvq_attn_prefill_exact: a batch of new tokens (never appended)
 * against the cache and itself */
static void run_attention(world *w, rd *r, unsigned mode) {
    const bool prefill = mode & 1, exact = prefill && (mode & 2);
    int layer = (int)(byte(r) % NL), nb = 0, slots[MAXS];
    int32_t ids[MAXS];
    unsigned pick = byte(r);
    for (int i = 0; i < MAXS; i++)
        if ((pick >> i & 1) && w->s[i].live && (w->s[i].len[layer] > 0 || exact)) slots[nb] = i, ids[nb++] = w->s[i].id;
    if (nb == 0) return;
    static const int reps[4] = {1, 2, 3, 8};
    static const int wins[4] = {0, 1, 7, 100};
    static const float caps[3] = {0, 5, 30};
    unsigned a = byte(r), bq = byte(r);
    kvq_attn_params p = kvq_attn_params_default(w->H * reps[a & 3]);
    p.window = wins[(a >> 2) & 3], p.softcap = caps[((a >> 4) & 3) % 3], p.scale = (a >> 6) & 1 ? 0.3f : 0.0f;
    int n_q = exact ? 1 + (int)(byte(r) % 48) : prefill ? (int)(byte(r) % (w->s[slots[0]].len[layer] + 1)) : 0;
    if (prefill) nb = 1;
    if (prefill && n_q == 0) return;
    /* the exact prefill's batch: values of fill()'s magnitudes (60000 may leave fp16 once rotated: refused then), or
     * one NaN / Inf / 1e5 (always refused) */
    float *xk = NULL, *xv = NULL;
    bool x_bad = false, x_big = false;
    if (exact) {
        size_t xe = (size_t)n_q * w->H * w->D;
        unsigned xm = byte(r);
        xk = malloc(xe * 4), xv = malloc(xe * 4);
        fill(w, xk, xe, xm), fill(w, xv, xe, xm >> 3);
        /* mode 5 (60000) may leave fp16 once rotated; mode 4 (3000) reaches at most 3000 sqrt(256) = 48000 */
        x_big = xm % 6 == 5 || (xm >> 3) % 6 == 5;
        if (xm & 0x40) {
            static const float bad[3] = {NAN, INFINITY, 1e5f};
            ((xm & 0x80) ? xv : xk)[(size_t)(urand(w) * (double)xe)] = bad[(xm >> 3) % 3];
            x_bad = true;
        }
    }
    /* Attention is the expensive operation (each table, then the fp64 reference and its bounds): an input whose runs
     * would pass ATTN_BUDGET skips the rest, so that no input takes seconds in the sanitized build where the SIMD
     * kernels are built at -O0 (tests/fuzz.cmake) and libFuzzer's -timeout never fires on a valid input. */
    double work = 0;
    for (int b = 0; b < nb; b++) work += (double)w->s[slots[b]].len[layer] + (exact ? n_q : 0);
    work *= (double)(prefill ? n_q : 1) * p.n_q_heads * w->D * (n_simd + 2);
    if (w->attn_work + work > ATTN_BUDGET) {
        free(xk), free(xv);
        return;
    }
    w->attn_work += work;
    size_t nrow = (size_t)(prefill ? n_q : nb) * p.n_q_heads, qn = nrow * w->D;
    float *q = malloc(qn * 4), *o = malloc(qn * 4);
    static const double qmag[4] = {1, 0.01, 10, 1};
    for (size_t i = 0; i < qn; i++) q[i] = (float)(qmag[bq & 3] * (2 * urand(w) - 1));
    if (bq & 4) q[(size_t)(urand(w) * (double)qn)] = (bq & 8) ? NAN : INFINITY;
    static int pool_threads;
    pool_threads = 1 + (bq >> 5 & 3) * 3;
    kvq_thread_pool pool = {pool_threads, serial_run, &pool_threads};
    if (bq & 16) {
        kvq_thread_pool bad = pool;
        bad.n_threads = (bq & 128) ? 0 : 1025;
        snap s0 = take(w);
        if (kvq_cache_set_thread_pool(w->c, &bad) != KVQ_ERR_INVALID_ARG) FAIL("a pool of %d threads accepted", bad.n_threads);
        snap s1 = take(w);
        same_or_die(&s0, &s1, "bad thread pool");
        free(s0.data), free(s1.data);
        if (kvq_cache_set_thread_pool(w->c, &pool)) FAIL("set_thread_pool: %s", kvq_last_error());
    }
    for (int tb = -1; tb < n_simd; tb++) {
        if (tb < 0) setenv("KVQ_FORCE_SCALAR", "1", 1);
        else setenv("KVQ_CPU_KERNELS", simd_tables[tb], 1);
        snap s0 = take(w);
        kvq_status st = exact     ? kvq_attn_prefill_exact(w->c, layer, ids[0], n_q, q, KVQ_DTYPE_F32, xk, xv, o, &p)
                        : prefill ? kvq_attn_prefill(w->c, layer, ids[0], n_q, q, o, &p)
                                  : kvq_attn_decode(w->c, layer, nb, ids, q, o, &p);
        unsetenv("KVQ_FORCE_SCALAR"), unsetenv("KVQ_CPU_KERNELS");
        snap s1 = take(w);
        same_or_die(&s0, &s1, "attention"); /* attention never changes the cache */
        free(s0.data), free(s1.data);
        if (x_bad) {
            if (st != KVQ_ERR_NONFINITE) FAIL("exact prefill of non-finite or > 65504 K/V: %s", kvq_strerror(st));
            continue;
        }
        if (st == KVQ_ERR_NONFINITE && x_big) continue; /* beyond fp16 once rotated */
        if (st) FAIL("valid attention failed: %s", kvq_last_error());
        check_attn(w, layer, nb, slots, n_q, q, o, &p, tb >= 0, xk, xv, exact ? n_q : 0);
    }
    free(xk), free(xv);
    if (bq & 16 && kvq_cache_set_thread_pool(w->c, NULL)) FAIL("set_thread_pool(NULL): %s", kvq_last_error());
    free(q), free(o);
}

static void run_append(world *w, rd *r) {
    int layer = (int)(byte(r) % (NL + 1)); /* NL: a bad layer */
    unsigned a = byte(r), mode = byte(r);
    int ns = 1 + (int)((a & 3) % MAXS), slots[MAXS];
    int32_t ids[MAXS], nt[MAXS];
    int64_t total = 0;
    bool bad = layer >= NL;
    for (int i = 0; i < ns; i++) {
        unsigned b = byte(r);
        slots[i] = slot_of(w, b);
        ids[i] = w->s[slots[i]].live ? w->s[slots[i]].id : b & 8 ? -1 : MAXS + (int32_t)(b >> 4); /* never live */
        nt[i] = (int32_t)(byte(r) % 70);
        if ((a >> 3 & 7) == 0) nt[i] = -1; /* a bad count */
        bad |= !w->s[slots[i]].live || nt[i] < 0;
        for (int j = 0; j < i; j++) bad |= ids[j] == ids[i];
        if (nt[i] > 0) total += nt[i];
        if (!bad && layer < NL && w->s[slots[i]].len[layer] + nt[i] > MAXT) return; /* beyond what the model holds */
    }
    size_t row = (size_t)w->H * w->D, n = (size_t)(total ? total : 1) * row;
    float *k = malloc(n * 4), *v = malloc(n * 4);
    fill(w, k, n, mode), fill(w, v, n, mode >> 3);
    bool poison = (a >> 6) != 0 && total > 0;
    if (poison) {
        static const float pv[3] = {NAN, INFINITY, 70000.0f};
        ((a >> 5) & 1 ? v : k)[(size_t)(urand(w) * (double)n)] = pv[(a >> 6) - 1];
    }
    kvq_dtype dt = (kvq_dtype)((mode >> 6) % 3); /* F16/BF16 inputs: the values converted first */
    void *kin = k, *vin = v;
    uint16_t *kh = NULL, *vh = NULL;
    if (dt != KVQ_DTYPE_F32) {
        kh = malloc(n * 2), vh = malloc(n * 2);
        for (size_t i = 0; i < n; i++) {
            for (int r2 = 0; r2 < 2; r2++) {
                float x = r2 ? v[i] : k[i];
                uint16_t h = dt == KVQ_DTYPE_BF16 ? kvq__f32_to_bf16(x) : kvq__f32_to_f16(x);
                x = dt == KVQ_DTYPE_BF16 ? kvq__bf16_to_f32(h) : kvq__f16_to_f32(h);
                (r2 ? vh : kh)[i] = h;
                (r2 ? v : k)[i] = x; /* the model keeps what the cache was given */
            }
        }
        kin = kh, vin = vh;
    }
    bool nonfinite = false;
    for (size_t i = 0; i < (size_t)total * row; i++) nonfinite |= !(fabsf(k[i]) <= 65504) || !(fabsf(v[i]) <= 65504);
    snap s0 = take(w);
    kvq_status st = kvq_append(w->c, layer, ns, ids, nt, dt, kin, vin);
    if (st != KVQ_OK) {
        if (!kvq_last_error()[0]) FAIL("append failed without a message");
        snap s1 = take(w);
        same_or_die(&s0, &s1, "append");
        free(s1.data);
    } else {
        if (bad || nonfinite) FAIL("append with bad input (bad %d, non-finite %d) succeeded", bad, nonfinite);
        size_t off = 0;
        for (int i = 0; i < ns; i++) {
            mseq *m = &w->s[slots[i]];
            memcpy(m->k[layer] + (size_t)m->len[layer] * row, k + off * row, (size_t)nt[i] * row * 4);
            memcpy(m->v[layer] + (size_t)m->len[layer] * row, v + off * row, (size_t)nt[i] * row * 4);
            m->len[layer] += nt[i], off += (size_t)nt[i];
        }
    }
    free(s0.data), free(k), free(v), free(kh), free(vh);
}

static void run_truncate(world *w, rd *r) {
    int i = slot_of(w, byte(r));
    unsigned b = byte(r);
    mseq *m = &w->s[i];
    if (!m->live) return;
    int64_t n = (int64_t)(b % 200) - 2; /* -2, -1: bad */
    size_t row = (size_t)w->H * w->D;
    float *pre[NL][2] = {{NULL}};
    for (int l = 0; l < NL; l++) {
        kvq_seq_view v;
        kvq_seq_view_get(w->c, m->id, l, &v);
        if (n >= v.sink_tokens && n < v.sink_tokens + v.paged_tokens) { /* what the cut's tokens hold now */
            pre[l][0] = malloc((size_t)n * row * 4 + 4), pre[l][1] = malloc((size_t)n * row * 4 + 4);
            if (kvq_read(w->c, m->id, l, 0, n, pre[l][0], pre[l][1])) FAIL("read: %s", kvq_last_error());
        }
    }
    snap s0 = take(w);
    kvq_status st = kvq_seq_truncate(w->c, m->id, n);
    if (st) {
        snap s1 = take(w);
        same_or_die(&s0, &s1, "truncate");
        free(s0.data), free(s1.data);
        for (int l = 0; l < NL; l++) free(pre[l][0]), free(pre[l][1]);
        if (n >= 0) FAIL("truncate to %lld failed: %s", (long long)n, kvq_last_error());
        return;
    }
    free(s0.data);
    for (int l = 0; l < NL; l++) {
        if (n >= m->len[l]) continue;
        m->len[l] = n;
        if (!pre[l][0]) { /* a cut inside the window: the kept tokens are untouched */
            check_read(w, i, l);
            continue;
        }
        /* a cut inside the pages: tokens before it keep their bytes, the rest of its group went back to the window
         * as the fp16 (or, in an 8-bit window, the 8-bit rounding: round8) of what it dequantized to (kvq.h), which the
         * model takes as the values from now on */
        float *k = malloc((size_t)n * row * 4 + 4), *v = malloc((size_t)n * row * 4 + 4);
        kvq_seq_view view;
        if (kvq_read(w->c, m->id, l, 0, n, k, v) || kvq_seq_view_get(w->c, m->id, l, &view)) FAIL("read");
        for (size_t e = 0; e < (size_t)n * row; e++) {
            bool moved = e >= (size_t)(view.sink_tokens + view.paged_tokens) * row;
            for (int r2 = 0; r2 < 2; r2++) {
                float was = pre[l][r2][e], now = (r2 ? v : k)[e];
                float want = moved ? ((w->cfg.window8 >> r2) & 1 ? round8(pre[l][r2], e, w->D) : kvq__round_f16(was)) : was;
                if (memcmp(&now, &want, 4)) FAIL("truncate to %lld changed element %zu: %g -> %g", (long long)n, e, was, now);
                if (moved) (r2 ? m->v[l] : m->k[l])[e] = now;
            }
        }
        free(k), free(v);
        check_read(w, i, l);
    }
    for (int l = 0; l < NL; l++) free(pre[l][0]), free(pre[l][1]);
}

/* kvq_seq_set_key_subspace with a random orthonormal basis, a broken one, NULL (clear), or bad ids; a failing call
 * leaves the cache as it was, a successful one is what get gives back (in the caller's frame, within fp32 rounding) */
static void run_subspace(world *w, rd *r) {
    int i = slot_of(w, byte(r));
    unsigned a = byte(r);
    int layer = (int)(a % (NL + 1)), h = (int)((a >> 2) % (unsigned)(w->H + 1)), kind = (int)((a >> 4) % 5);
    int D = w->D, R = w->cfg.squat_rank > 0 ? w->cfg.squat_rank : 1;
    int32_t id = w->s[i].live ? w->s[i].id : 7;
    float *B = malloc(sizeof(float) * (size_t)D * R);
    for (int j = 0; j < R; j++) { /* Gram-Schmidt in double of random columns */
        double col[256];
        for (int d = 0; d < D; d++) col[d] = 2 * urand(w) - 1;
        for (int pass = 0; pass < 2; pass++)
            for (int k = 0; k < j; k++) {
                double dot = 0;
                for (int d = 0; d < D; d++) dot += col[d] * B[(size_t)d * R + k];
                for (int d = 0; d < D; d++) col[d] -= dot * B[(size_t)d * R + k];
            }
        double n = 0;
        for (int d = 0; d < D; d++) n += col[d] * col[d];
        for (int d = 0; d < D; d++) B[(size_t)d * R + j] = (float)(col[d] / sqrt(n));
    }
    if (kind == 1) { /* not orthonormal: column 0's largest entry x 1.5 moves its squared norm by >= 1.25 / D (>= 0.0049
                      * at D <= 256), past set's 1e-3 tolerance; a random entry could be too small to (a fuzz finding) */
        int big = 0;
        for (int d = 1; d < D; d++)
            if (fabsf(B[(size_t)d * R]) > fabsf(B[(size_t)big * R])) big = d;
        B[(size_t)big * R] *= 1.5f;
    }
    if (kind == 2) B[(size_t)(urand(w) * D * R)] = NAN;      /* not finite */
    bool bad = !w->s[i].live || layer >= NL || h >= w->H || kind == 1 || kind == 2 || w->cfg.squat_rank == 0;
    snap s0 = take(w);
    int before = 0;
    bool ids_ok = w->s[i].live && layer < NL && h < w->H && w->cfg.squat_rank;
    if (ids_ok) kvq_seq_get_key_subspace(w->c, id, layer, h, NULL, &before);
    kvq_status st = kvq_seq_set_key_subspace(w->c, id, layer, h, kind == 3 ? NULL : B);
    snap s1 = take(w);
    same_or_die(&s0, &s1, "set_key_subspace"); /* it never changes the stored tokens */
    free(s0.data), free(s1.data);
    if (bad != (st != KVQ_OK)) FAIL("set_key_subspace (bad %d) returned %s: %s", bad, kvq_strerror(st), kvq_last_error());
    if (st) {
        int after = 0;
        if (ids_ok && (kvq_seq_get_key_subspace(w->c, id, layer, h, NULL, &after) || after != before))
            FAIL("a failing set_key_subspace changed the subspace");
    } else {
        float *got = malloc(sizeof(float) * (size_t)D * R);
        int set = -1;
        if (kvq_seq_get_key_subspace(w->c, id, layer, h, got, &set) || set != (kind != 3)) FAIL("get after set");
        for (int e = 0; set && e < D * R; e++)
            if (!(fabsf(got[e] - B[e]) <= 1e-5f)) FAIL("get gave %g for %g at %d", got[e], B[e], e);
        if (kind != 3) w->s[i].squat = true;
        free(got);
    }
    free(B);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (n_simd < 0) find_tables();
    rd r = {data, size};
    world w;
    memset(&w, 0, sizeof w);
    unsigned b0 = byte(&r), b1 = byte(&r), b2 = byte(&r), b3 = byte(&r);
    static const int Gs[3] = {16, 32, 64};
    static const int Rs[4] = {-1, 0, 5, 40};
    w.cfg = kvq_cache_config_default();
    w.cfg.n_layers = NL, w.cfg.max_seqs = MAXS, w.cfg.n_threads = 1;
    w.cfg.rotate = 0;     /* the model's per-element bounds are the formats'; a rotated cache spreads each element's error
                           * over the vector (test_rotate covers it) */
    w.cfg.nonuniform = 0; /* the same: the uniform levels' half-step bound */
    w.cfg.qnorm = 0;      /* the same: Q-Norm's (scale, min) may put a group's extremes past half a step (test_roundtrip) */
    w.cfg.type_k = (kvq_type)(b0 % KVQ_TYPE_COUNT), w.cfg.type_v = (kvq_type)(b1 % KVQ_TYPE_COUNT);
    w.D = w.cfg.head_dim = b2 & 1 ? 80 : 64;
    w.H = w.cfg.n_kv_heads = 1 + (b2 >> 1 & 1);
    w.cfg.group = Gs[(b2 >> 2) % 3];
    w.cfg.residual = Rs[(b2 >> 4) & 3];
    w.cfg.page_tokens = w.cfg.group * (1 + (b3 >> 6 & 1));
    static const int Ss[4] = {0, 3, -1, 70}; /* attention sinks: none, inside a sink page, the default, several pages */
    w.cfg.sinks = Ss[b2 >> 6];
    /* SQuat keys (kvq.h section 10) for grouped key types when bit 5 of b3 is set: rank 1, 4 or 8 */
    if ((b3 >> 5 & 1) && kvq_type_get_traits(w.cfg.type_k)->grouped) w.cfg.squat_rank = 1 + (int)(b3 % 3) * 3 + (b3 % 3 == 2);
    /* dense-and-sparse outliers (kvq.h section 10) from b0's bits above the type: the per-element bounds hold as they
     * are (the others' error is within half a step of a narrower range, the outlier's within its fp16 residual's) */
    w.cfg.outliers = (int)(b0 / KVQ_TYPE_COUNT) % 4;
    /* 8-bit group parameters (kvq.h section 5) from b1's bits above the type */
    w.cfg.params8 = (int)(b1 / KVQ_TYPE_COUNT) % 4;
    /* 8-bit windows (kvq.h section 10) from b0's bits above those */
    w.cfg.window8 = (int)(b0 / KVQ_TYPE_COUNT / 4) % 4;
    kvq_page_layout L; /* the cache's own: outlier sections make its pages larger than kvq_page_layout_make's */
    if (kvq_cache_config_layout(&w.cfg, &L)) FAIL("layout: %s", kvq_last_error());
    w.cfg.arena_bytes = (size_t)(2 + b3 % 40) * L.page_bytes + (b3 >> 7) * (L.page_bytes / 2);
    w.rng = 0x9e3779b97f4a7c15ull ^ ((uint64_t)b0 << 8 | b1 << 16 | (uint64_t)b2 << 24 | (uint64_t)b3 << 32);
    if (kvq_cache_create(&w.cfg, &w.c)) FAIL("create: %s", kvq_last_error());
    kvq_cache_get_config(w.c, NULL, &w.L);
    size_t row = (size_t)w.H * w.D;
    for (int i = 0; i < MAXS; i++)
        for (int l = 0; l < NL; l++) w.s[i].k[l] = malloc(MAXT * row * 4), w.s[i].v[l] = malloc(MAXT * row * 4);
    int ops = 0;
    const char *verbose = getenv("KVQ_FUZZ_VERBOSE"); /* prints the operations and the cache's state */
    if (verbose) fprintf(stderr, "cache %s/%s H=%d D=%d G=%d R=%d P=%d S=%d outliers=%d params8=%d window8=%d pages=%lld\n",
                         kvq_type_get_traits(w.cfg.type_k)->name, kvq_type_get_traits(w.cfg.type_v)->name, w.H, w.D,
                         w.L.group, w.cfg.residual, w.L.page_tokens, w.cfg.sinks, w.L.outliers, w.L.params8, w.cfg.window8,
                         (long long)(w.cfg.arena_bytes / w.L.page_bytes));
    while (r.n && ops++ < 64) {
        /* op 9 (subspace) only in SQuat caches: the corpus of caches without it keeps its meaning */
        unsigned op = byte(&r) % (w.cfg.squat_rank ? 10u : 9u);
        if (verbose) {
            kvq_cache_stats st;
            kvq_cache_get_stats(w.c, &st);
            fprintf(stderr, "op %d: %u (seqs %d, tokens %lld, free pages %lld, window bytes %zu; last error '%s')\n", ops,
                    op, st.n_seqs, (long long)st.tokens, (long long)st.pages_free, st.window_bytes, kvq_last_error());
        }
        switch (op) {
        case 0: { /* new */
            int i = free_slot(&w);
            int32_t id;
            kvq_status st = kvq_seq_new(w.c, &id);
            if ((st == KVQ_OK) != (i >= 0)) FAIL("seq_new: %s with slot %d", kvq_strerror(st), i);
            if (st == KVQ_OK) w.s[i].live = true, w.s[i].id = id, w.s[i].len[0] = w.s[i].len[1] = 0, w.s[i].squat = false;
            break;
        }
        case 1: { /* free, maybe of a dead id */
            int i = slot_of(&w, byte(&r));
            int32_t id = w.s[i].live ? w.s[i].id : 7;
            snap s0 = take(&w);
            kvq_status st = kvq_seq_free(w.c, id);
            if (w.s[i].live) {
                if (st) FAIL("free: %s", kvq_last_error());
                w.s[i].live = false;
            } else {
                snap s1 = take(&w);
                if (st != KVQ_ERR_NO_SEQ) FAIL("free of a dead id: %s", kvq_strerror(st));
                same_or_die(&s0, &s1, "free");
                free(s1.data);
            }
            free(s0.data);
            break;
        }
        case 2: { /* fork */
            int i = slot_of(&w, byte(&r)), j = free_slot(&w);
            if (!w.s[i].live) break;
            int32_t id;
            snap s0 = take(&w);
            kvq_status st = kvq_seq_fork(w.c, w.s[i].id, &id);
            if (j < 0) {
                snap s1 = take(&w);
                if (st != KVQ_ERR_TOO_MANY_SEQS) FAIL("fork with no slot: %s", kvq_strerror(st));
                same_or_die(&s0, &s1, "fork");
                free(s1.data);
            } else {
                if (st) FAIL("fork: %s", kvq_last_error());
                mseq *a = &w.s[i], *c = &w.s[j];
                c->live = true, c->id = id;
                for (int l = 0; l < NL; l++) {
                    c->len[l] = a->len[l];
                    memcpy(c->k[l], a->k[l], (size_t)a->len[l] * row * 4), memcpy(c->v[l], a->v[l], (size_t)a->len[l] * row * 4);
                }
                c->squat = a->squat;
                /* the fork has the parent's subspaces (kvq.h section 10) */
                for (int l = 0; l < NL && w.cfg.squat_rank; l++)
                    for (int h = 0; h < w.H; h++) {
                        float ba[256 * 8], bc[256 * 8];
                        int sa = -1, sc = -1;
                        if (kvq_seq_get_key_subspace(w.c, a->id, l, h, ba, &sa) ||
                            kvq_seq_get_key_subspace(w.c, id, l, h, bc, &sc) || sa != sc ||
                            (sa && memcmp(ba, bc, sizeof(float) * (size_t)w.D * (size_t)w.cfg.squat_rank)))
                            FAIL("fork: the subspace of layer %d head %d was not copied", l, h);
                    }
            }
            free(s0.data);
            break;
        }
        case 3: run_truncate(&w, &r); break;
        case 4:
        case 5: run_append(&w, &r); break;
        case 6: { /* read back */
            int i = slot_of(&w, byte(&r));
            if (w.s[i].live)
                for (int l = 0; l < NL; l++) check_read(&w, i, l);
            break;
        }
        case 7: run_attention(&w, &r, byte(&r)); break;
        case 9: run_subspace(&w, &r); break;
        default: { /* stats */
            kvq_cache_stats st;
            if (kvq_cache_get_stats(w.c, &st)) FAIL("stats");
            int64_t tokens = 0, live = 0;
            size_t win_max = 0;
            for (int i = 0; i < MAXS; i++)
                if (w.s[i].live) {
                    tokens += w.s[i].len[0], live++;
                    win_max += (size_t)NL * 2 * (size_t)(w.cfg.residual < 0 ? 128 + 64 : w.cfg.residual + 64) * row * 2;
                }
            if (st.tokens != tokens || st.n_seqs != live || st.pages_free < 0 || st.pages_free > st.pages_total ||
                st.window_bytes > win_max || st.page_bytes_in_use != (size_t)(st.pages_total - st.pages_free) * st.page_bytes)
                FAIL("stats: tokens %lld/%lld seqs %d/%lld free %lld/%lld window %zu", (long long)st.tokens,
                     (long long)tokens, st.n_seqs, (long long)live, (long long)st.pages_free, (long long)st.pages_total,
                     st.window_bytes);
            break;
        }
        }
    }
    for (int i = 0; i < MAXS; i++)
        if (w.s[i].live)
            for (int l = 0; l < NL; l++) check_read(&w, i, l);
    if (verbose) fprintf(stderr, "attention: %.3g multiply-adds (budget %.3g)\n", w.attn_work, ATTN_BUDGET);
    kvq_cache_free(w.c);
    for (int i = 0; i < MAXS; i++)
        for (int l = 0; l < NL; l++) free(w.s[i].k[l]), free(w.s[i].v[l]);
    return 0;
}

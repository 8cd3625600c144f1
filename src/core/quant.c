/* Scalar reference quantizers and dequantizers for the formats of kvq.h section 5. Rounding is
 * round-to-nearest-even everywhere (nearbyintf, as CUDA's __float2int_rn); scales and mins are rounded to fp16
 * first and the rounded values are the ones used to quantize, so that dequantization sees exactly them. */
#include "internal.h"

#include <pthread.h>

float kvq__e4m3_table[256];

static void build_tables(void) {
    for (int i = 0; i < 256; i++) {
        int s = i >> 7, e = (i >> 3) & 15, m = i & 7;
        float v;
        if (e == 15 && m == 7) v = NAN;
        else if (e == 0) v = ldexpf((float)m / 8.0f, -6);
        else v = ldexpf(1.0f + (float)m / 8.0f, e - 7);
        kvq__e4m3_table[i] = s ? -v : v;
    }
}

static pthread_once_t tables_once = PTHREAD_ONCE_INIT;
void kvq__init_tables(void) { pthread_once(&tables_once, build_tables); }

uint8_t kvq__f32_to_e4m3(float f) {
    uint8_t sign = signbit(f) ? 0x80 : 0;
    float a = fabsf(f);
    if (!(a < 448.0f)) return sign | 0x7e; /* saturate: the scale maps max|x| to 448 */
    int lo = 0, hi = 126;                   /* table[lo] <= a < table[hi] */
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (kvq__e4m3_table[mid] <= a) lo = mid;
        else hi = mid;
    }
    float dl = a - kvq__e4m3_table[lo], dh = kvq__e4m3_table[hi] - a;
    int q = dl < dh ? lo : dh < dl ? hi : (lo & 1 ? hi : lo);
    return sign | (uint8_t)q;
}

static inline int rne_clamp(float v, int lo, int hi) {
    float r = nearbyintf(v);
    return r < (float)lo ? lo : r > (float)hi ? hi : (int)r;
}

static const uint8_t lv_u4[16] = {0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240};
static const uint8_t lv_u3[8] = {0, 16, 32, 48, 64, 80, 96, 112};
static const uint8_t lv_u2[4] = {0, 16, 32, 48};
/* Non-uniform levels (kvq.h section 10): Lloyd-Max for a group of 64 Gaussian values normalized by its (min, max),
 * each value's error weighted by scale^2, rounded to 1/8 of a step (Q4, Q3) or 1/4 (Q2): tests/data/make_levels.py.
 * Mean squared error relative to the uniform levels on that distribution: Q4 0.85, Q3 0.77, Q2 0.57. */
static const uint8_t lv_n4[16] = {4, 28, 46, 62, 76, 90, 102, 114, 126, 138, 150, 164, 178, 194, 212, 236};
static const uint8_t lv_n3[8] = {6, 24, 38, 50, 62, 74, 88, 106};
static const uint8_t lv_n2[4] = {8, 20, 28, 40};

const uint8_t *kvq__levels16(kvq_type t, bool nonuniform) {
    switch (t) {
    case KVQ_TYPE_Q4: return nonuniform ? lv_n4 : lv_u4;
    case KVQ_TYPE_Q3: return nonuniform ? lv_n3 : lv_u3;
    case KVQ_TYPE_Q2: return nonuniform ? lv_n2 : lv_u2;
    default: return NULL;
    }
}

/* code of v (in level units: (x - min) / scale) under levels lv16[0..qmax]: the nearest level; for the uniform table
 * exactly round-to-nearest-even, as layout 1 quantized */
static inline int code_of(float v, const uint8_t *lv16, int qmax) {
    if (lv16[1] == 16 && lv16[qmax] == 16 * qmax) return rne_clamp(v, 0, qmax);
    float w = v * 16.0f;
    int best = 0;
    float bd = fabsf(w - lv16[0]);
    for (int q = 1; q <= qmax; q++) {
        float d = fabsf(w - lv16[q]);
        if (d < bd) bd = d, best = q;
    }
    return best;
}

/* code q of channel c in a row of D channels (kvq.h section 5); b = 3: the low 2 bits as a Q2 row, the high bit at
 * byte D/4 + c/8, bit c%8 */
static inline void put_bits(uint8_t *row, int c, int b, int D, int q) {
    if (b == 3) {
        put_bits(row, c, 2, D, q & 3);
        row[D / 4 + c / 8] = (uint8_t)(row[D / 4 + c / 8] | ((q >> 2) << (c % 8)));
        return;
    }
    int per = 8 / b, shift = (c % per) * b;
    row[c / per] = (uint8_t)(row[c / per] | (q << shift));
}

static inline int get_bits(const uint8_t *row, int c, int b, int D) {
    if (b == 3) return get_bits(row, c, 2, D) | (((row[D / 4 + c / 8] >> (c % 8)) & 1) << 2);
    int per = 8 / b, shift = (c % per) * b;
    return (row[c / per] >> shift) & ((1 << b) - 1);
}

static void range_of(const float *x, int n, size_t st, float *lo, float *hi) {
    float a = x[0], b = x[0];
    for (int i = 1; i < n; i++) {
        float v = x[(size_t)i * st];
        a = v < a ? v : a;
        b = v > b ? v : b;
    }
    *lo = a, *hi = b;
}

/* asymmetric (scale, min) for n values at stride `st` */
static void minmax_params(const float *x, int n, size_t st, int qmax, float *scale, float *mn) {
    float lo, hi;
    range_of(x, n, st, &lo, &hi);
    *mn = kvq__round_f16(lo);
    *scale = kvq__round_f16((hi - *mn) / (float)qmax);
}

/* ---- 8-bit parameters (kvq.h section 5) ---- */
const float kvq__p8_frac[16] = {0x1p+0f,        0x1.ea4afap-1f, 0x1.d5818ep-1f, 0x1.c199bep-1f,
                                0x1.ae89fap-1f, 0x1.9c4918p-1f, 0x1.8ace54p-1f, 0x1.7a1148p-1f,
                                0x1.6a09e6p-1f, 0x1.5ab07ep-1f, 0x1.4bfdaep-1f, 0x1.3dea64p-1f,
                                0x1.306fe0p-1f, 0x1.2387a6p-1f, 0x1.172b84p-1f, 0x1.0b5586p-1f};

/* the smallest scale for which some z in 0..255 covers [lo, hi]: the range itself, and the zero point's reach */
static float p8_need(float lo, float hi, int qmax) {
    float Z0 = (float)kvq__p8_zero(qmax), u = kvq__p8_unit(qmax), s = (hi - lo) / (float)qmax;
    if (lo < 0) s = fmaxf(s, -lo / (Z0 * u));
    if (hi > 0) s = fmaxf(s, hi / ((255.0f - Z0) * u + (float)qmax));
    return s;
}

float kvq__p8_base(const float *lo, const float *hi, int n, int qmax) {
    float m = 0;
    for (int i = 0; i < n; i++) m = fmaxf(m, p8_need(lo[i], hi[i], qmax));
    if (!(m > 0)) return 0; /* every group is 0: every scale and min decodes to 0 */
    float b = kvq__round_f16(fminf(4.0f * m, 65504.0f));
    return b > 0 ? b : 0x1p-24f; /* the smallest fp16 */
}

/* the largest k (smallest scale) whose scale is >= need; 0 if none is */
static int p8_k_at_least(float base, float need) {
    if (!(need > 0)) return 255;
    float e = -16.0f * log2f(need / base); /* an estimate: the loops below make it exact */
    int k = e <= 0 ? 0 : e >= 255 ? 255 : (int)e;
    while (k < 255 && kvq__p8_scale(base, k + 1) >= need) k++;
    while (k > 0 && kvq__p8_scale(base, k) < need) k--;
    return k;
}

/* Codes (k, z) of the group [lo, hi] for min/max quantization: the smallest scale, and under it the largest min, with
 * min <= lo and min + qmax scale >= hi; the scale grows a step at a time where the zero point cannot reach */
static void p8_cover(float lo, float hi, int qmax, float base, float *s, float *mn, uint8_t *ko, uint8_t *zo) {
    const int Z0 = kvq__p8_zero(qmax);
    const float u = kvq__p8_unit(qmax);
    int k = p8_k_at_least(base, (hi - lo) / (float)qmax), z = Z0;
    for (;; k--) {
        float sc = kvq__p8_scale(base, k);
        if (sc > 0) {
            float zf = floorf(lo / sc / u) + (float)Z0;
            z = zf <= 0 ? 0 : zf >= 255 ? 255 : (int)zf;
            while (z > 0 && kvq__p8_min(sc, z, qmax) > lo) z--;
            while (z < 255 && kvq__p8_min(sc, z + 1, qmax) <= lo) z++;
        } else {
            z = Z0;
        }
        float m = kvq__p8_min(sc, z, qmax);
        if (k == 0 || (m <= lo && m + (float)qmax * sc >= hi)) {
            *s = sc, *mn = m, *ko = (uint8_t)k, *zo = (uint8_t)z;
            return;
        }
    }
}

/* Codes of the pair nearest to Q-Norm's (scale ns; min = mean - scale ml); false (min/max's stay) where z cannot reach */
static bool p8_nearest(float ns, double mx, double ml, int qmax, float base, float *s, float *mn, uint8_t *ko,
                       uint8_t *zo) {
    const int Z0 = kvq__p8_zero(qmax);
    int k = p8_k_at_least(base, ns);
    if (k < 255 && ns - kvq__p8_scale(base, k + 1) < kvq__p8_scale(base, k) - ns) k++;
    float sc = kvq__p8_scale(base, k);
    if (!(sc > 0)) return false;
    float zf = nearbyintf((float)((mx - (double)sc * ml) / sc) / kvq__p8_unit(qmax)) + (float)Z0;
    if (!(zf >= 0 && zf <= 255)) return false;
    *s = sc, *mn = kvq__p8_min(sc, (int)zf, qmax), *ko = (uint8_t)k, *zo = (uint8_t)zf;
    return true;
}

void kvq__p8_expand_ref(uint16_t base, int qmax, const uint8_t *k, const uint8_t *z, int n, uint16_t *s_out,
                        uint16_t *m_out, int os) {
    float b = kvq__f16_to_f32(base);
    for (int i = 0; i < n; i++) {
        float s = kvq__p8_scale(b, k[i]);
        s_out[(size_t)i * os] = kvq__f32_to_f16(s);
        m_out[(size_t)i * os] = kvq__f32_to_f16(kvq__p8_min(s, z[i], qmax));
    }
}

void kvq__p8_expand_block(const kvq_page_layout *L, kvq_role role, const uint8_t *block, int g0, int g1,
                          kvq__p8_expand_fn expand, uint16_t *out) {
    kvq_type t = role == KVQ_KEY ? L->type_k : L->type_v;
    const int qmax = (1 << kvq_type_get_traits(t)->bits) - 1, n = kvq__p8_group_n(L, role);
    const uint16_t *bases = kvq__p8_bases(L, role, (uint8_t *)(uintptr_t)block);
    for (int g = g0; g < g1; g++) {
        const uint8_t *k = kvq__p8_codes(L, role, (uint8_t *)(uintptr_t)block, g);
        uint16_t *o = out + (size_t)(g - g0) * 2 * n; /* keys: scale[D] min[D]; values: G rows of (scale, min) pairs */
        if (role == KVQ_KEY) expand(bases[g], qmax, k, k + n, n, o, o + n, 1);
        else expand(bases[g], qmax, k, k + n, n, o, o + 1, 2);
    }
}

/* q[i] = the code of value i under (s, mn), 0 where s is not > 0 (a group of equal values) */
static void group_codes(const float *x, int n, size_t st, const uint8_t *lv16, int qmax, float s, float mn, uint8_t *q) {
    for (int i = 0; i < n; i++) q[i] = (uint8_t)(s > 0 ? code_of((x[(size_t)i * st] - mn) / s, lv16, qmax) : 0);
}

/* Q-Norm (kvq.h section 10, `qnorm`; KVQuant section 3.5): given the codes q (min/max's), the stored (scale, min)
 * become the fp16 pair under which they decode to the group's mean and standard deviation. Returns whether it changed
 * the pair. Rounding to levels shrinks or stretches a group's spread and shifts its centre; at 2 bits that bias,
 * shared by every key of a channel group (every token's logit moves the same way) or every channel of a value row,
 * costs more than the rounding noise itself. A group whose codes are all equal (or whose values are) keeps min/max's
 * pair. */
static bool qnorm_params(const float *x, int n, size_t st, const uint8_t *lv16, const uint8_t *q, int qmax,
                         const kvq__p8q *p8, float *scale, float *mn, uint8_t *ko, uint8_t *zo) {
    if (!(*scale > 0)) return false;
    double sx = 0, sxx = 0, sl = 0, sll = 0;
    for (int i = 0; i < n; i++) {
        float v = x[(size_t)i * st];
        double l = (double)lv16[q[i]] * 0.0625;
        sx += v, sxx += (double)v * v, sl += l, sll += l * l;
    }
    double mx = sx / n, vx = sxx / n - mx * mx, ml = sl / n, vl = sll / n - ml * ml;
    if (!(vl > 0) || !(vx > 0)) return false;
    if (p8) return p8_nearest((float)sqrt(vx / vl), mx, ml, qmax, p8->base, scale, mn, ko, zo);
    float ns = kvq__round_f16((float)sqrt(vx / vl)), nm = kvq__round_f16((float)(mx - (double)ns * ml));
    if (!(ns > 0) || !isfinite(ns) || !isfinite(nm)) return false; /* beyond fp16: min/max's pair stays */
    *scale = ns, *mn = nm;
    return true;
}

/* A group of n values (stride st, n <= 128): its stored (scale, min) and its codes q. Q-Norm keeps min/max's codes
 * (KVQuant's method: the decoded group has its values' mean and std) for Q4 and Q3; for Q2 the codes are taken again
 * under the normalized pair, whose step is finer than min/max's: measured on SmolLM2 (kvq.h section 10), Q2's KLD
 * -30% that way against -14% with min/max's codes, while Q4 and Q3 gain only with min/max's codes (-15%, -9%; 0%
 * taken again). */
static void group_quant(bool qnorm, const float *x, int n, size_t st, const uint8_t *lv16, int qmax, const kvq__p8q *p8,
                        float *s, float *mn, uint8_t *q, uint8_t *ko, uint8_t *zo) {
    if (p8) {
        float lo, hi;
        range_of(x, n, st, &lo, &hi);
        p8_cover(lo, hi, qmax, p8->base, s, mn, ko, zo);
    } else {
        minmax_params(x, n, st, qmax, s, mn);
    }
    group_codes(x, n, st, lv16, qmax, *s, *mn, q);
    if (qnorm && qnorm_params(x, n, st, lv16, q, qmax, p8, s, mn, ko, zo) && qmax == 3)
        group_codes(x, n, st, lv16, qmax, *s, *mn, q);
}

/* Dense-and-sparse outliers (kvq.h section 10, `outliers`): of a group of n >= 2 values (stride st), the one whose
 * removal narrows the range most: the largest if it stands further above the second largest than the smallest stands
 * below the second smallest, else the smallest (min/max quantization pays for the range, not for |x|) */
static int outlier_of(const float *x, int n, size_t st) {
    int hi = 0, lo = 0;
    for (int i = 1; i < n; i++) {
        float v = x[(size_t)i * st];
        if (v > x[(size_t)hi * st]) hi = i;
        if (v < x[(size_t)lo * st]) lo = i;
    }
    float hi2 = -INFINITY, lo2 = INFINITY;
    for (int i = 0; i < n; i++) {
        float v = x[(size_t)i * st];
        if (i != hi && v > hi2) hi2 = v;
        if (i != lo && v < lo2) lo2 = v;
    }
    return x[(size_t)hi * st] - hi2 >= lo2 - x[(size_t)lo * st] ? hi : lo;
}

/* group_quant with one outlier (n <= 128): the group is quantized with the outlier replaced by the mean of the
 * others (inside their range, and it leaves Q-Norm's mean as the others'), then *res = fp16(x - its decode) and
 * *idx = its index: decode + res is the value within fp16 rounding of the residual */
static void group_quant_outlier(bool qnorm, const float *x, int n, size_t st, const uint8_t *lv16, int qmax,
                                const kvq__p8q *p8, float *s, float *mn, uint8_t *q, uint16_t *res, uint8_t *idx,
                                uint8_t *ko, uint8_t *zo) {
    float y[128];
    int k = outlier_of(x, n, st);
    double sum = 0;
    for (int i = 0; i < n; i++) y[i] = x[(size_t)i * st], sum += i == k ? 0.0 : (double)y[i];
    y[k] = (float)(sum / (n - 1));
    group_quant(qnorm, y, n, 1, lv16, qmax, p8, s, mn, q, ko, zo);
    const float xk = x[(size_t)k * st];
    float d = xk - (*s * ((float)lv16[q[k]] * 0.0625f) + *mn); /* dequant_row's expression */
    /* The mean's code sits mid-range, where the kernels' rounded attention weights and queries meet a small level.
     * Where the residual from it passes fp16 (a group spanning more than 65504), the code is free (the residual
     * restores the value): the level nearest to the outlier leaves the smallest residual. */
    if (!(fabsf(d) <= 65504.0f))
        for (int c = 0; c <= qmax; c++) {
            float dc = xk - (*s * ((float)lv16[c] * 0.0625f) + *mn);
            if (fabsf(dc) < fabsf(d)) d = dc, q[k] = (uint8_t)c;
        }
    if (!(fabsf(d) <= 65504.0f)) {
        /* past fp16 even from the nearest level (a group spanning more than 65504, the rest at one end): the group is
         * quantized whole, residual 0; its values keep the bound of a group without outliers */
        group_quant(qnorm, x, n, st, lv16, qmax, p8, s, mn, q, ko, zo);
        d = 0;
    }
    *res = kvq__f32_to_f16(d);
    *idx = (uint8_t)k;
}

void kvq__outliers_add_rows(kvq_role role, const uint16_t *res, const uint8_t *idx, int j0, int n, int D, int G, int Gv,
                            float *x, size_t x_stride) {
    if (role == KVQ_KEY) {
        for (int g = j0 / G; g * G < j0 + n; g++)
            for (int c = 0; c < D; c++) {
                int j = g * G + idx[(size_t)g * D + c];
                if (j >= j0 && j < j0 + n) x[(size_t)(j - j0) * x_stride + c] += kvq__f16_to_f32(res[(size_t)g * D + c]);
            }
    } else {
        int ng = D / Gv;
        for (int j = j0; j < j0 + n; j++)
            for (int k = 0; k < ng; k++) {
                size_t e = (size_t)j * ng + k;
                x[(size_t)(j - j0) * x_stride + k * Gv + idx[e]] += kvq__f16_to_f32(res[e]);
            }
    }
}

void kvq__quant_row(kvq_type t, const uint8_t *lv16, bool qnorm, const float *x, int D, int Gv, uint8_t *row,
                    uint16_t *par, uint16_t *ores, uint8_t *oidx, const kvq__p8q *p8) {
    switch (t) {
    case KVQ_TYPE_F16:
        for (int c = 0; c < D; c++) ((uint16_t *)(void *)row)[c] = kvq__f32_to_f16(x[c]);
        return;
    case KVQ_TYPE_BF16:
        for (int c = 0; c < D; c++) ((uint16_t *)(void *)row)[c] = kvq__f32_to_bf16(x[c]);
        return;
    case KVQ_TYPE_Q8:
    case KVQ_TYPE_FP8: {
        float amax = 0;
        for (int c = 0; c < D; c++) amax = fmaxf(amax, fabsf(x[c]));
        float s = kvq__round_f16(amax / (t == KVQ_TYPE_Q8 ? 127.0f : 448.0f));
        par[0] = kvq__f32_to_f16(s);
        for (int c = 0; c < D; c++) {
            float v = s > 0 ? x[c] / s : 0.0f;
            row[c] = t == KVQ_TYPE_Q8 ? (uint8_t)(int8_t)rne_clamp(v, -127, 127) : kvq__f32_to_e4m3(v);
        }
        return;
    }
    case KVQ_TYPE_Q4:
    case KVQ_TYPE_Q3:
    case KVQ_TYPE_Q2: {
        int b = kvq_type_get_traits(t)->bits, qmax = (1 << b) - 1;
        memset(row, 0, kvq__row_bytes(t, D));
        for (int g = 0; g < D / Gv; g++) {
            float s, mn;
            uint8_t q[128], k8 = 0, z8 = 0; /* Gv <= G <= 128 (kvq_page_layout_make) */
            if (ores)
                group_quant_outlier(qnorm, x + g * Gv, Gv, 1, lv16, qmax, p8, &s, &mn, q, ores + g, oidx + g, &k8, &z8);
            else group_quant(qnorm, x + g * Gv, Gv, 1, lv16, qmax, p8, &s, &mn, q, &k8, &z8);
            if (p8) p8->k[g] = k8, p8->z[g] = z8;
            par[2 * g] = kvq__f32_to_f16(s);
            par[2 * g + 1] = kvq__f32_to_f16(mn);
            for (int c = 0; c < Gv; c++) put_bits(row, g * Gv + c, b, D, q[c]);
        }
        return;
    }
    default: return;
    }
}

void kvq__quant_key_group(kvq_type t, const uint8_t *lv16, bool qnorm, const float *x, int G, int D, uint8_t *rows,
                          size_t row_bytes, uint16_t *scale_min, uint16_t *ores, uint8_t *oidx, const kvq__p8q *p8) {
    int b = kvq_type_get_traits(t)->bits, qmax = (1 << b) - 1;
    for (int i = 0; i < G; i++) memset(rows + (size_t)i * row_bytes, 0, row_bytes);
    for (int c = 0; c < D; c++) {
        float s, mn;
        uint8_t q[128], k8 = 0, z8 = 0; /* G <= 128 (kvq_page_layout_make) */
        if (ores)
            group_quant_outlier(qnorm, x + c, G, (size_t)D, lv16, qmax, p8, &s, &mn, q, ores + c, oidx + c, &k8, &z8);
        else group_quant(qnorm, x + c, G, (size_t)D, lv16, qmax, p8, &s, &mn, q, &k8, &z8);
        if (p8) p8->k[c] = k8, p8->z[c] = z8;
        scale_min[c] = kvq__f32_to_f16(s);
        scale_min[D + c] = kvq__f32_to_f16(mn);
        for (int i = 0; i < G; i++) put_bits(rows + (size_t)i * row_bytes, c, b, D, q[i]);
    }
}

void kvq__quant_key_channel(kvq_type t, const uint8_t *lv16, bool qnorm, const float *x, int G, int D, int c,
                            uint8_t *rows, size_t row_bytes, uint16_t *scale_min, float *deq, uint16_t *ores,
                            uint8_t *oidx, const kvq__p8q *p8) {
    int b = kvq_type_get_traits(t)->bits, qmax = (1 << b) - 1;
    float s, mn;
    uint8_t q[128], k8 = 0, z8 = 0; /* G <= 128 (kvq_page_layout_make) */
    if (ores) group_quant_outlier(qnorm, x + c, G, (size_t)D, lv16, qmax, p8, &s, &mn, q, ores, oidx, &k8, &z8);
    else group_quant(qnorm, x + c, G, (size_t)D, lv16, qmax, p8, &s, &mn, q, &k8, &z8);
    if (p8) p8->k[c] = k8, p8->z[c] = z8;
    scale_min[c] = kvq__f32_to_f16(s);
    scale_min[D + c] = kvq__f32_to_f16(mn);
    for (int i = 0; i < G; i++) {
        put_bits(rows + (size_t)i * row_bytes, c, b, D, q[i]);
        /* what kvq__dequant_row decodes: the same fp32 expression */
        deq[i] = s * ((float)lv16[q[i]] * 0.0625f) + mn;
    }
    if (ores) deq[*oidx] += kvq__f16_to_f32(*ores); /* the outlier as read back: its residual added */
}

void kvq__dequant_row(kvq_type t, const uint8_t *lv16, kvq_role role, const uint8_t *row, const uint16_t *par, int j,
                      int D, int G, int Gv, float *o) {
    switch (t) {
    case KVQ_TYPE_F16:
        for (int c = 0; c < D; c++) o[c] = kvq__f16_to_f32(((const uint16_t *)(const void *)row)[c]);
        break;
    case KVQ_TYPE_BF16:
        for (int c = 0; c < D; c++) o[c] = kvq__bf16_to_f32(((const uint16_t *)(const void *)row)[c]);
        break;
    case KVQ_TYPE_Q8: {
        float s = kvq__f16_to_f32(par[j]);
        for (int c = 0; c < D; c++) o[c] = s * (float)(int8_t)row[c];
        break;
    }
    case KVQ_TYPE_FP8: {
        float s = kvq__f16_to_f32(par[j]);
        for (int c = 0; c < D; c++) o[c] = s * kvq__e4m3_table[row[c]];
        break;
    }
    case KVQ_TYPE_Q4:
    case KVQ_TYPE_Q3:
    case KVQ_TYPE_Q2: {
        int b = kvq_type_get_traits(t)->bits;
        if (role == KVQ_KEY) {
            const uint16_t *sm = par + (size_t)(j / G) * 2 * D;
            for (int c = 0; c < D; c++)
                o[c] = kvq__f16_to_f32(sm[c]) * ((float)lv16[get_bits(row, c, b, D)] * 0.0625f) + kvq__f16_to_f32(sm[D + c]);
        } else {
            const uint16_t *sm = par + (size_t)j * (D / Gv) * 2;
            for (int c = 0; c < D; c++)
                o[c] = kvq__f16_to_f32(sm[2 * (c / Gv)]) * ((float)lv16[get_bits(row, c, b, D)] * 0.0625f) +
                       kvq__f16_to_f32(sm[2 * (c / Gv) + 1]);
        }
        break;
    }
    default: break;
    }
}

void kvq__dequant_block(const kvq_page_layout *L, kvq_role role, const uint8_t *block, int t0, int t1,
                        float *out, size_t out_stride) {
    kvq_type t = role == KVQ_KEY ? L->type_k : L->type_v;
    size_t rb = role == KVQ_KEY ? L->k_row_bytes : L->v_row_bytes;
    const uint16_t *par = kvq__block_params(block, rb, L->page_tokens);
    if (kvq__p8(L, role)) { /* group by group: its pairs expanded to fp16, the rows read as group 0's */
        const int G = L->group;
        uint16_t ex[2 * 128 * 16]; /* a group's pairs: keys 2 D <= 512, values 2 G D/Gv <= 2 x 128 x 16 */
        for (int g = t0 / G; g * G < t1; g++) {
            kvq__p8_expand_block(L, role, block, g, g + 1, kvq__p8_expand_ref, ex);
            int a = g * G > t0 ? g * G : t0, e = (g + 1) * G < t1 ? (g + 1) * G : t1;
            for (int i = a; i < e; i++)
                kvq__dequant_row(t, kvq__layout_levels(L, role), role, block + (size_t)i * rb, ex, i - g * G,
                                 L->head_dim, G, L->value_group, out + (size_t)(i - t0) * out_stride);
        }
    } else {
        for (int i = t0; i < t1; i++)
            kvq__dequant_row(t, kvq__layout_levels(L, role), role, block + (size_t)i * rb, par, i, L->head_dim,
                             L->group, L->value_group, out + (size_t)(i - t0) * out_stride);
    }
    const uint16_t *res = kvq__outlier_res(L, role, block);
    if (res && t1 > t0)
        kvq__outliers_add_rows(role, res, kvq__outlier_idx(L, role, block), t0, t1 - t0, L->head_dim, L->group,
                               L->value_group, out, out_stride ? out_stride : (size_t)L->head_dim);
}

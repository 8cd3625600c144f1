/* AVX2 + FMA + F16C kernels, compiled with those flags and chosen at run time. Tested against the _ref kernels. */
#include "attn.h"

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

static inline __attribute__((always_inline)) __m256 load_row8(const kvq__blk *b, const uint8_t *row, int c, const uint16_t *par, int j) {
    switch (b->type) {
    case KVQ_TYPE_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(row + 2 * c)));
    case KVQ_TYPE_BF16: {
        __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(const void *)(row + 2 * c)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    }
    case KVQ_TYPE_Q8:
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)(row + c))));
    case KVQ_TYPE_FP8: { /* e4m3 bits placed in a float's exponent/mantissa, then * 2^120 rebias (subnormals too) */
        __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)(row + c)));
        __m256i mag = _mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x7f)), 20);
        __m256i sgn = _mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x80)), 24);
        return _mm256_mul_ps(_mm256_castsi256_ps(_mm256_or_si256(mag, sgn)), _mm256_set1_ps(0x1p120f));
    }
    case KVQ_TYPE_Q4: {
        uint32_t word;
        memcpy(&word, row + c / 2, 4);
        __m256i q = _mm256_srlv_epi32(_mm256_set1_epi32((int)word), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
        return _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(15)));
    }
    case KVQ_TYPE_Q2: {
        uint16_t word;
        memcpy(&word, row + c / 4, 2);
        __m256i q = _mm256_srlv_epi32(_mm256_set1_epi32(word), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14));
        return _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(3)));
    }
    default: return _mm256_setzero_ps();
    }
    (void)par, (void)j;
}

static void decode_avx2(const kvq__blk *b, int j0, int n, float *out) {
    const int D = b->D;
    for (int i = 0; i < n; i++) {
        int j = j0 + i;
        const uint8_t *row = b->data + (size_t)j * b->stride;
        float *o = out + (size_t)i * D;
        switch (b->type) {
        case KVQ_TYPE_F16:
        case KVQ_TYPE_BF16:
            for (int c = 0; c < D; c += 8) _mm256_storeu_ps(o + c, load_row8(b, row, c, NULL, j));
            break;
        case KVQ_TYPE_Q8:
        case KVQ_TYPE_FP8: {
            __m256 s = _mm256_set1_ps(_cvtsh_ss(b->par[j]));
            for (int c = 0; c < D; c += 8) _mm256_storeu_ps(o + c, _mm256_mul_ps(s, load_row8(b, row, c, NULL, j)));
            break;
        }
        default: /* Q4, Q2 */
            if (b->role == KVQ_KEY) {
                const uint16_t *sm = b->par + (size_t)(j / b->G) * 2 * D;
                for (int c = 0; c < D; c += 8) {
                    __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(sm + c)));
                    __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(sm + D + c)));
                    _mm256_storeu_ps(o + c, _mm256_fmadd_ps(s, load_row8(b, row, c, NULL, j), m));
                }
            } else {
                const uint16_t *sm = b->par + (size_t)j * (D / b->Gv) * 2;
                for (int g = 0; g < D / b->Gv; g++) {
                    __m256 s = _mm256_set1_ps(_cvtsh_ss(sm[2 * g])), m = _mm256_set1_ps(_cvtsh_ss(sm[2 * g + 1]));
                    for (int c = g * b->Gv; c < (g + 1) * b->Gv; c += 8)
                        _mm256_storeu_ps(o + c, _mm256_fmadd_ps(s, load_row8(b, row, c, NULL, j), m));
                }
            }
        }
    }
}

/* 8 horizontal sums at once: returns (sum a0, sum a1, ..., sum a7) */
static inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
    __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3);
    __m256 b2 = _mm256_hadd_ps(a4, a5), b3 = _mm256_hadd_ps(a6, a7);
    __m256 c0 = _mm256_hadd_ps(b0, b1), c1 = _mm256_hadd_ps(b2, b3);
    /* c0 = [a0 a1 a2 a3 | a0 a1 a2 a3] lane halves; c1 same for a4..a7 */
    __m256 lo = _mm256_permute2f128_ps(c0, c1, 0x20), hi = _mm256_permute2f128_ps(c0, c1, 0x31);
    return _mm256_add_ps(lo, hi);
}

static void dots_avx2(const float *q, int rows, int D, const float *x, int n, float *s, int ss) {
    if (n == KVQ_TILE) {
        for (int r = 0; r < rows; r++) {
            const float *qr = q + (size_t)r * D;
            __m256 a[8];
            for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
            for (int c = 0; c < D; c += 8) {
                __m256 qv = _mm256_loadu_ps(qr + c);
                for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(x + (size_t)i * D + c), a[i]);
            }
            _mm256_storeu_ps(s + (size_t)r * ss, hsum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]));
        }
        return;
    }
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < n; i++) {
            __m256 a = _mm256_setzero_ps();
            for (int c = 0; c < D; c += 8)
                a = _mm256_fmadd_ps(_mm256_loadu_ps(q + (size_t)r * D + c), _mm256_loadu_ps(x + (size_t)i * D + c), a);
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            h = _mm_hadd_ps(h, h);
            h = _mm_hadd_ps(h, h);
            s[(size_t)r * ss + i] = _mm_cvtss_f32(h);
        }
}

static void axpys_avx2(const float *p, int ps, int rows, int D, const float *x, int n, float *acc) {
    for (int r = 0; r < rows; r++) {
        const float *pr = p + (size_t)r * ps;
        float *ar = acc + (size_t)r * D;
        for (int c = 0; c < D; c += 8) {
            __m256 a = _mm256_loadu_ps(ar + c);
            for (int i = 0; i < n; i++) a = _mm256_fmadd_ps(_mm256_set1_ps(pr[i]), _mm256_loadu_ps(x + (size_t)i * D + c), a);
            _mm256_storeu_ps(ar + c, a);
        }
    }
}

/* exp on [-87, 0]: 2^n * p(f), p a degree-6 polynomial on |f| <= ln2/2; relative error < 2e-7 */
static inline __m256 exp256(__m256 x0) {
    __m256 x = _mm256_max_ps(x0, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    /* below -87 (masked logits are -inf) the result is exactly 0 */
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), _mm256_cmp_ps(x0, _mm256_set1_ps(-87.0f), _CMP_GE_OQ));
}

static float exp_sum_avx2(float *x, int n, float m) {
    __m256 mv = _mm256_set1_ps(m), acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float t[8], sum = 0;
    _mm256_storeu_ps(t, acc);
    for (int k = 0; k < 8; k++) sum += t[k];
    for (; i < n; i++) sum += (x[i] = expf(x[i] - m));
    return sum;
}

/* ---- fused kernels: one pass over a block's bytes, dequantized in registers ---- */

#define AI static inline __attribute__((always_inline))

/* raw value of 8 channels: full value for F16/BF16/FP8 (before the token scale), codes for Q8/Q4/Q2 */
AI __m256 raw8(const kvq_type T, const uint8_t *row, int c) {
    kvq__blk b;
    b.type = T;
    return load_row8(&b, row, c, NULL, 0);
}

/* per-token multiplier of a per-token type's raw row */
AI float tok_scale(const kvq_type T, const kvq__blk *b, int j) {
    return T == KVQ_TYPE_Q8 || T == KVQ_TYPE_FP8 ? _cvtsh_ss(b->par[j]) : 1.0f;
}

AI void key_scores_impl(const kvq_type T, const int R, const kvq__blk *b, int j0, int n, const float *q, float *s,
                        int ss) {
    const int D = b->D;
    const bool grouped = T == KVQ_TYPE_Q4 || T == KVQ_TYPE_Q2;
    float qg[KVQ_FUSED_ROWS * 256] __attribute__((aligned(32))), qm[KVQ_FUSED_ROWS] = {0};
    float part[KVQ_FUSED_ROWS][8] __attribute__((aligned(32)));
    const float *qq = q;
    int cur_group = -1;
    for (int i0 = 0; i0 < n; i0 += 8) {
        int m = n - i0 < 8 ? n - i0 : 8;
        __m256 sums[KVQ_FUSED_ROWS];
        float raw[KVQ_FUSED_ROWS][8] __attribute__((aligned(32)));
        for (int i = 0; i < m; i++) {
            int j = j0 + i0 + i;
            if (grouped && j / b->G != cur_group) { /* q' = q * scale, qm = q . min for this key group */
                cur_group = j / b->G;
                const uint16_t *sm = b->par + (size_t)cur_group * 2 * D;
                for (int r = 0; r < R; r++) {
                    __m256 am = _mm256_setzero_ps();
                    for (int c = 0; c < D; c += 8) {
                        __m256 qv = _mm256_loadu_ps(q + (size_t)r * D + c);
                        __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(sm + c)));
                        __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(sm + D + c)));
                        _mm256_store_ps(qg + (size_t)r * D + c, _mm256_mul_ps(qv, sc));
                        am = _mm256_fmadd_ps(qv, mn, am);
                    }
                    _mm256_store_ps(part[0], am);
                    qm[r] = part[0][0] + part[0][1] + part[0][2] + part[0][3] + part[0][4] + part[0][5] + part[0][6] + part[0][7];
                }
                qq = qg;
            }
            const uint8_t *row = b->data + (size_t)j * b->stride;
            __m256 acc[KVQ_FUSED_ROWS];
            for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
            for (int c = 0; c < D; c += 8) {
                __m256 x = raw8(T, row, c);
                for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(qq + (size_t)r * D + c), x, acc[r]);
            }
            for (int r = 0; r < R; r++) _mm256_store_ps(raw[r], acc[r]), (void)sums;
            /* transpose-sum later: keep the 8-lane partials per (row, token) */
            for (int r = 0; r < R; r++) {
                __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
                h = _mm_hadd_ps(h, h);
                h = _mm_hadd_ps(h, h);
                s[(size_t)r * ss + i0 + i] = _mm_cvtss_f32(h) * tok_scale(T, b, j) + (grouped ? qm[r] : 0.0f);
            }
        }
    }
}

AI void value_accum_impl(const kvq_type T, const int R, const kvq__blk *b, int j0, int n, const float *p, int ps,
                         float *accbuf) {
    const int D = b->D;
    const bool grouped = T == KVQ_TYPE_Q4 || T == KVQ_TYPE_Q2;
    const int ng = grouped ? D / b->Gv : 1;
    /* coef[g][r][i]: the weight of token i's raw row in channel group g; minacc[r][g]: sum of p * min */
    float coef[16][KVQ_FUSED_ROWS][64], minacc[KVQ_FUSED_ROWS][16];
    for (int i = 0; i < n; i++) {
        int j = j0 + i;
        if (grouped) {
            const uint16_t *sm = b->par + (size_t)j * ng * 2;
            for (int g = 0; g < ng; g++) {
                float sc = _cvtsh_ss(sm[2 * g]), mn = _cvtsh_ss(sm[2 * g + 1]);
                for (int r = 0; r < R; r++) {
                    float pr = p[(size_t)r * ps + i];
                    coef[g][r][i] = pr * sc;
                    minacc[r][g] = (i ? minacc[r][g] : 0.0f) + pr * mn;
                }
            }
        } else {
            float sc = tok_scale(T, b, j);
            for (int r = 0; r < R; r++) coef[0][r][i] = p[(size_t)r * ps + i] * sc;
        }
    }
    for (int c = 0; c < D; c += 8) {
        int g = grouped ? c / b->Gv : 0;
        __m256 acc[KVQ_FUSED_ROWS];
        for (int r = 0; r < R; r++) acc[r] = _mm256_loadu_ps(accbuf + (size_t)r * D + c);
        const uint8_t *row = b->data + (size_t)j0 * b->stride;
        for (int i = 0; i < n; i++, row += b->stride) {
            __m256 x = raw8(T, row, c);
            for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&coef[g][r][i]), x, acc[r]);
        }
        for (int r = 0; r < R; r++) {
            if (grouped) acc[r] = _mm256_add_ps(acc[r], _mm256_set1_ps(minacc[r][g]));
            _mm256_storeu_ps(accbuf + (size_t)r * D + c, acc[r]);
        }
    }
}

#define ROWS_SWITCH(CALL, T)                                                                               \
    switch (rows) {                                                                                        \
    case 1: CALL(T, 1); break;                                                                             \
    case 2: CALL(T, 2); break;                                                                             \
    case 3: CALL(T, 3); break;                                                                             \
    case 4: CALL(T, 4); break;                                                                             \
    case 5: CALL(T, 5); break;                                                                             \
    case 6: CALL(T, 6); break;                                                                             \
    case 7: CALL(T, 7); break;                                                                             \
    default: CALL(T, 8); break;                                                                            \
    }
#define TYPE_SWITCH(CALL)                                                                                  \
    switch (b->type) {                                                                                     \
    case KVQ_TYPE_F16: ROWS_SWITCH(CALL, KVQ_TYPE_F16); break;                                             \
    case KVQ_TYPE_BF16: ROWS_SWITCH(CALL, KVQ_TYPE_BF16); break;                                           \
    case KVQ_TYPE_Q8: ROWS_SWITCH(CALL, KVQ_TYPE_Q8); break;                                               \
    case KVQ_TYPE_FP8: ROWS_SWITCH(CALL, KVQ_TYPE_FP8); break;                                             \
    case KVQ_TYPE_Q4: ROWS_SWITCH(CALL, KVQ_TYPE_Q4); break;                                               \
    case KVQ_TYPE_Q2: ROWS_SWITCH(CALL, KVQ_TYPE_Q2); break;                                               \
    default: break;                                                                                        \
    }

static void key_scores_avx2(const kvq__blk *b, int j0, int n, const float *q, int rows, float *s, int ss) {
#define KS(T, R) key_scores_impl(T, R, b, j0, n, q, s, ss)
    TYPE_SWITCH(KS)
#undef KS
}

static void value_accum_avx2(const kvq__blk *b, int j0, int n, const float *p, int ps, int rows, float *acc) {
#define VA(T, R) value_accum_impl(T, R, b, j0, n, p, ps, acc)
    TYPE_SWITCH(VA)
#undef VA
}

static const kvq__kernels avx2 = {"avx2", decode_avx2, dots_avx2, axpys_avx2, exp_sum_avx2, key_scores_avx2,
                                  value_accum_avx2};

const kvq__kernels *kvq__kernels_avx2(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &avx2;
    return NULL;
}
#else
const kvq__kernels *kvq__kernels_avx2(void) { return NULL; }
#endif

/* AVX2 + FMA + F16C kernels, compiled with those flags and chosen at run time. Tested against the _ref kernels. */
#include "attn.h"

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

/* raw value of 8 channels: full value for F16/BF16/FP8 (before the token scale), codes for Q8/Q4/Q2 */
static inline __attribute__((always_inline)) __m256 raw8(kvq_type t, const uint8_t *row, int c) {
    switch (t) {
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
            for (int c = 0; c < D; c += 8) _mm256_storeu_ps(o + c, raw8(b->type, row, c));
            break;
        case KVQ_TYPE_Q8:
        case KVQ_TYPE_FP8: {
            __m256 s = _mm256_set1_ps(_cvtsh_ss(b->par[j]));
            for (int c = 0; c < D; c += 8) _mm256_storeu_ps(o + c, _mm256_mul_ps(s, raw8(b->type, row, c)));
            break;
        }
        default: /* Q4, Q2 */
            if (b->role == KVQ_KEY) {
                const uint16_t *sm = b->par + (size_t)(j / b->G) * 2 * D;
                for (int c = 0; c < D; c += 8) {
                    __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(sm + c)));
                    __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(sm + D + c)));
                    _mm256_storeu_ps(o + c, _mm256_fmadd_ps(s, raw8(b->type, row, c), m));
                }
            } else {
                const uint16_t *sm = b->par + (size_t)j * (D / b->Gv) * 2;
                for (int g = 0; g < D / b->Gv; g++) {
                    __m256 s = _mm256_set1_ps(_cvtsh_ss(sm[2 * g])), m = _mm256_set1_ps(_cvtsh_ss(sm[2 * g + 1]));
                    for (int c = g * b->Gv; c < (g + 1) * b->Gv; c += 8)
                        _mm256_storeu_ps(o + c, _mm256_fmadd_ps(s, raw8(b->type, row, c), m));
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
        for (int i = 0; i < m; i++) {
            int j = j0 + i0 + i;
            if (grouped && j / b->G != cur_group) { /* q' = q * scale, qm = q . min for this key group */
                cur_group = j / b->G;
                const uint16_t *sm = b->par + (size_t)cur_group * 2 * D;
                #pragma GCC unroll 8
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
            /* two tokens at a time: 2R independent FMA chains hide the FMA latency */
            const bool pair = i + 1 < m && (!grouped || (j + 1) / b->G == cur_group);
            const uint8_t *row0 = b->data + (size_t)j * b->stride, *row1 = row0 + b->stride;
            __m256 a0[KVQ_FUSED_ROWS], a1[KVQ_FUSED_ROWS];
            #pragma GCC unroll 8
            for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm256_setzero_ps();
            if (pair) {
                for (int c = 0; c < D; c += 8) {
                    __m256 x0 = raw8(T, row0, c), x1 = raw8(T, row1, c);
                    #pragma GCC unroll 8
                    for (int r = 0; r < R; r++) {
                        __m256 qv = _mm256_loadu_ps(qq + (size_t)r * D + c);
                        a0[r] = _mm256_fmadd_ps(qv, x0, a0[r]);
                        a1[r] = _mm256_fmadd_ps(qv, x1, a1[r]);
                    }
                }
            } else {
                for (int c = 0; c < D; c += 16) { /* D is a multiple of 16: split chains over even/odd chunks */
                    __m256 x0 = raw8(T, row0, c), x1 = raw8(T, row0, c + 8);
                    #pragma GCC unroll 8
                    for (int r = 0; r < R; r++) {
                        a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(qq + (size_t)r * D + c), x0, a0[r]);
                        a1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(qq + (size_t)r * D + c + 8), x1, a1[r]);
                    }
                }
                #pragma GCC unroll 8
                for (int r = 0; r < R; r++) a0[r] = _mm256_add_ps(a0[r], a1[r]);
            }
            for (int t = 0; t < (pair ? 2 : 1); t++)
                #pragma GCC unroll 8
                for (int r = 0; r < R; r++) {
                    __m256 a = t ? a1[r] : a0[r];
                    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
                    h = _mm_hadd_ps(h, h);
                    h = _mm_hadd_ps(h, h);
                    s[(size_t)r * ss + i0 + i + t] = _mm_cvtss_f32(h) * tok_scale(T, b, j + t) + (grouped ? qm[r] : 0.0f);
                }
            i += pair;
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
                #pragma GCC unroll 8
                for (int r = 0; r < R; r++) {
                    float pr = p[(size_t)r * ps + i];
                    coef[g][r][i] = pr * sc;
                    minacc[r][g] = (i ? minacc[r][g] : 0.0f) + pr * mn;
                }
            }
        } else {
            float sc = tok_scale(T, b, j);
            #pragma GCC unroll 8
            for (int r = 0; r < R; r++) coef[0][r][i] = p[(size_t)r * ps + i] * sc;
        }
    }
    /* R <= 4: two 8-channel chunks per pass, so 2R independent FMA chains hide the FMA latency */
    const int W = R <= 4 ? 2 : 1;
    for (int c = 0; c < D; c += 8 * W) {
        int g = grouped ? c / b->Gv : 0; /* Gv >= 16, so both chunks share the group */
        __m256 acc[KVQ_FUSED_ROWS][2];
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++)
            #pragma GCC unroll 8
            for (int u = 0; u < W; u++) acc[r][u] = _mm256_loadu_ps(accbuf + (size_t)r * D + c + 8 * u);
        const uint8_t *row = b->data + (size_t)j0 * b->stride;
        for (int i = 0; i < n; i++, row += b->stride) {
            __m256 x[2];
            #pragma GCC unroll 8
            for (int u = 0; u < W; u++) x[u] = raw8(T, row, c + 8 * u);
            #pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                __m256 cf = _mm256_broadcast_ss(&coef[g][r][i]);
                #pragma GCC unroll 8
                for (int u = 0; u < W; u++) acc[r][u] = _mm256_fmadd_ps(cf, x[u], acc[r][u]);
            }
        }
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++)
            #pragma GCC unroll 8
            for (int u = 0; u < W; u++) {
                __m256 a = acc[r][u];
                if (grouped) a = _mm256_add_ps(a, _mm256_set1_ps(minacc[r][g]));
                _mm256_storeu_ps(accbuf + (size_t)r * D + c + 8 * u, a);
            }
    }
}

/* ---- integer kernels for Q8, Q4 and Q2: the codes are multiplied as 16-bit integers (vpmaddwd: 16 MACs per
 * instruction against 8 for an fp32 FMA), so the narrower types also need fewer instructions than F16, not more.
 * Queries and softmax weights are rounded to int16 with one scale per row: relative error ~1e-5, far below the
 * types' own quantization error. A chunk of C channels (Q8 16, Q4 32, Q2 64) unpacks into C/16 vectors of 16
 * int16 lanes; vector u holds channels A..A+7 in its low half and B..B+7 in its high half, A = 8u, B = A + C/2. */

static inline int int_chunk(kvq_type T) { return T == KVQ_TYPE_Q8 ? 16 : T == KVQ_TYPE_Q4 ? 32 : 64; }

/* All C/16 vectors of the chunk of `row` starting at channel c */
AI void unpack_chunk(const kvq_type T, const uint8_t *row, int c, __m256i *v) {
    if (T == KVQ_TYPE_Q8) {
        v[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(const void *)(row + c)));
        return;
    }
    if (T == KVQ_TYPE_Q4) {
        __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(const void *)(row + c / 2)));
        __m256i lo = _mm256_and_si256(x, _mm256_set1_epi16(15)), hi = _mm256_srli_epi16(x, 4);
        v[0] = _mm256_unpacklo_epi16(lo, hi), v[1] = _mm256_unpackhi_epi16(lo, hi);
        return;
    }
    __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(const void *)(row + c / 4)));
    __m256i m = _mm256_set1_epi16(3);
    __m256i f0 = _mm256_and_si256(x, m), f1 = _mm256_and_si256(_mm256_srli_epi16(x, 2), m);
    __m256i f2 = _mm256_and_si256(_mm256_srli_epi16(x, 4), m), f3 = _mm256_srli_epi16(x, 6);
    __m256i l01 = _mm256_unpacklo_epi16(f0, f1), l23 = _mm256_unpacklo_epi16(f2, f3);
    __m256i h01 = _mm256_unpackhi_epi16(f0, f1), h23 = _mm256_unpackhi_epi16(f2, f3);
    v[0] = _mm256_unpacklo_epi32(l01, l23), v[1] = _mm256_unpackhi_epi32(l01, l23);
    v[2] = _mm256_unpacklo_epi32(h01, h23), v[3] = _mm256_unpackhi_epi32(h01, h23);
}

static inline float hmax_ps(__m256 a) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}

/* Rounds R rows of D floats (row stride D) to int16 in the unpacked vector order; per-row scales out. */
static void quantize_rows16(kvq_type T, const float *src, int R, int D, int16_t *dst, float *scale) {
    const int C = int_chunk(T), NX = C / 16;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        const float *x = src + (size_t)r * D;
        __m256 mx = _mm256_setzero_ps();
        for (int c = 0; c < D; c += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(absmask, _mm256_loadu_ps(x + c)));
        float amax = hmax_ps(mx), sc = amax > 0 ? amax / 32767.0f : 1.0f;
        __m256 inv = _mm256_set1_ps(1.0f / sc);
        scale[r] = sc;
        for (int c = 0; c < D; c += C)
            #pragma GCC unroll 8
            for (int u = 0; u < NX; u++) {
                int A = c + 8 * u, B = A + C / 2;
                __m256i ia = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + A), inv));
                __m256i ib = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + B), inv));
                __m256i v = _mm256_packs_epi32(_mm256_permute2x128_si256(ia, ib, 0x20), _mm256_permute2x128_si256(ia, ib, 0x31));
                _mm256_store_si256((__m256i *)(void *)(dst + (size_t)r * D + c + 16 * u), v);
            }
    }
}

/* the 8 horizontal sums of a[0..7], in order */
static inline __m256i hsum8_epi32(const __m256i *a) {
    __m256i b0 = _mm256_hadd_epi32(a[0], a[1]), b1 = _mm256_hadd_epi32(a[2], a[3]);
    __m256i b2 = _mm256_hadd_epi32(a[4], a[5]), b3 = _mm256_hadd_epi32(a[6], a[7]);
    __m256i c0 = _mm256_hadd_epi32(b0, b1), c1 = _mm256_hadd_epi32(b2, b3);
    return _mm256_add_epi32(_mm256_permute2x128_si256(c0, c1, 0x20), _mm256_permute2x128_si256(c0, c1, 0x31));
}

AI void key_scores_int_impl(const kvq_type T, const int R, const kvq__blk *b, int j0, int n, const float *q, float *s,
                            int ss, kvq__qstate *st) {
    const int D = b->D, C = int_chunk(T), NX = C / 16;
    const bool grouped = T != KVQ_TYPE_Q8;
    if (!grouped && !st->valid) quantize_rows16(T, q, R, D, st->q16, st->qs), st->valid = 1;
    for (int i0 = 0; i0 < n;) {
        int j = j0 + i0;
        if (grouped && (!st->valid || st->par != b->par || st->group != j / b->G)) {
            /* q' = q * scale and qm = q . min for this key group, quantized once per group */
            const uint16_t *sm = b->par + (size_t)(j / b->G) * 2 * D;
            #pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                __m256 am = _mm256_setzero_ps();
                for (int c = 0; c < D; c += 8) {
                    __m256 qv = _mm256_loadu_ps(q + (size_t)r * D + c);
                    __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(sm + c)));
                    __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(sm + D + c)));
                    _mm256_storeu_ps(st->qg + (size_t)r * D + c, _mm256_mul_ps(qv, sc));
                    am = _mm256_fmadd_ps(qv, mn, am);
                }
                __m128 h = _mm_add_ps(_mm256_castps256_ps128(am), _mm256_extractf128_ps(am, 1));
                h = _mm_hadd_ps(h, h);
                st->qm[r] = _mm_cvtss_f32(_mm_hadd_ps(h, h));
            }
            quantize_rows16(T, st->qg, R, D, st->q16, st->qs);
            st->valid = 1, st->par = b->par, st->group = j / b->G;
        }
        /* up to 8 tokens of one key group; their scores are reduced together (transposed sums) */
        int m = n - i0 < 8 ? n - i0 : 8;
        if (grouped && (j + m - 1) / b->G != st->group) m = (st->group + 1) * b->G - j;
        __m256i part[4][8];
        for (int t = 0; t < 8; t++) {
            __m256i acc[4];
            #pragma GCC unroll 8
            for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_si256();
            if (t < m) {
                /* integer adds have 1-cycle latency: one token at a time keeps every vector in a register */
                const uint8_t *row = b->data + (size_t)(j + t) * b->stride;
                for (int c = 0; c < D; c += C) {
                    __m256i x[4];
                    unpack_chunk(T, row, c, x);
                    #pragma GCC unroll 8
                    for (int u = 0; u < NX; u++)
                        #pragma GCC unroll 8
                        for (int r = 0; r < R; r++) {
                            __m256i qv = _mm256_load_si256((const __m256i *)(const void *)(st->q16 + (size_t)r * D + c + 16 * u));
                            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(qv, x[u]));
                        }
                }
            }
            #pragma GCC unroll 8
            for (int r = 0; r < R; r++) part[r][t] = acc[r];
        }
        __m256 ts = _mm256_set1_ps(1.0f);
        if (!grouped) {
            uint16_t h[8] = {0};
            memcpy(h, b->par + j, (size_t)m * 2);
            ts = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)h));
        }
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            __m256 sc = _mm256_mul_ps(_mm256_cvtepi32_ps(hsum8_epi32(part[r])), _mm256_mul_ps(ts, _mm256_set1_ps(st->qs[r])));
            sc = _mm256_add_ps(sc, _mm256_set1_ps(grouped ? st->qm[r] : 0.0f));
            float o8[8];
            _mm256_storeu_ps(o8, sc);
            memcpy(s + (size_t)r * ss + i0, o8, (size_t)m * sizeof(float));
        }
        i0 += m;
    }
}

AI void value_accum_int_impl(const kvq_type T, const int R, const kvq__blk *b, int j0, int n, const float *p, int ps,
                             float *accbuf) {
    const int D = b->D, C = int_chunk(T), NX = C / 16;
    const bool grouped = T != KVQ_TYPE_Q8;
    const int ng = grouped ? D / b->Gv : 1;
    /* weights p * scale of each token, per value group and row, rounded to int16 (pairs read as one int32) */
    int16_t c16[4][4][64 + 16] __attribute__((aligned(32)));
    float cs[4][4], minacc[4][4];
    float scl[64 + 8] __attribute__((aligned(32))), mnv[64 + 8] __attribute__((aligned(32)));
    const int n8 = (n + 7) & ~7;
    for (int g = 0; g < ng; g++) {
        uint16_t hs[64 + 8], hm[64 + 8];
        for (int i = 0; i < n8; i++) {
            const uint16_t *sm = grouped ? b->par + (size_t)(j0 + i) * ng * 2 + 2 * g : b->par + j0 + i;
            hs[i] = i < n ? sm[0] : 0;
            hm[i] = i < n && grouped ? sm[1] : 0;
        }
        for (int i = 0; i < n8; i += 8) {
            _mm256_store_ps(scl + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(hs + i))));
            _mm256_store_ps(mnv + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(hm + i))));
        }
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const float *pr = p + (size_t)r * ps;
            float cf[64 + 8] __attribute__((aligned(32)));
            __m256 mx = _mm256_setzero_ps(), mn = _mm256_setzero_ps();
            for (int i = 0; i < n8; i += 8) {
                /* p beyond n is not ours to read: mask it */
                __m256 pv = i + 8 <= n ? _mm256_loadu_ps(pr + i) : _mm256_setzero_ps();
                if (i + 8 > n)
                    for (int k = i; k < n; k++) ((float *)&pv)[k - i] = pr[k];
                __m256 v = _mm256_mul_ps(pv, _mm256_load_ps(scl + i));
                _mm256_store_ps(cf + i, v);
                mx = _mm256_max_ps(mx, v);
                mn = _mm256_fmadd_ps(pv, _mm256_load_ps(mnv + i), mn);
            }
            float amax = hmax_ps(mx), sc = amax > 0 ? amax / 32767.0f : 1.0f;
            __m256 inv = _mm256_set1_ps(1.0f / sc);
            cs[g][r] = sc;
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(mn), _mm256_extractf128_ps(mn, 1));
            h = _mm_hadd_ps(h, h);
            minacc[g][r] = _mm_cvtss_f32(_mm_hadd_ps(h, h));
            for (int i = 0; i < n8; i += 16) {
                __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(cf + i), inv));
                __m256i bq = i + 8 < n8 ? _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(cf + i + 8), inv)) : _mm256_setzero_si256();
                _mm256_store_si256((__m256i *)(void *)&c16[g][r][i], _mm256_permute4x64_epi64(_mm256_packs_epi32(a, bq), 0xD8));
            }
            c16[g][r][n] = 0;
        }
    }
    for (int c = 0; c < D; c += C) {
        int g = grouped ? c / b->Gv : 0; /* Gv is a multiple of C: the chunk lies in one group */
        #pragma GCC unroll 8
        for (int u = 0; u < NX; u++) { /* one unpacked vector at a time: 2R accumulators stay in registers */
            __m256i alo[4], ahi[4];
            #pragma GCC unroll 8
            for (int r = 0; r < R; r++) alo[r] = ahi[r] = _mm256_setzero_si256();
            const uint8_t *row = b->data + (size_t)j0 * b->stride;
            for (int i = 0; i < n; i += 2, row += 2 * b->stride) {
                __m256i x0[4], x1[4];
                unpack_chunk(T, row, c, x0);
                if (i + 1 < n) unpack_chunk(T, row + b->stride, c, x1);
                else x1[u] = _mm256_setzero_si256();
                /* (token i, token i+1) pairs of each channel, against the pair of their weights */
                __m256i plo = _mm256_unpacklo_epi16(x0[u], x1[u]), phi = _mm256_unpackhi_epi16(x0[u], x1[u]);
                #pragma GCC unroll 8
                for (int r = 0; r < R; r++) {
                    int32_t pairw;
                    memcpy(&pairw, &c16[g][r][i], 4);
                    __m256i cc = _mm256_set1_epi32(pairw);
                    alo[r] = _mm256_add_epi32(alo[r], _mm256_madd_epi16(plo, cc));
                    ahi[r] = _mm256_add_epi32(ahi[r], _mm256_madd_epi16(phi, cc));
                }
            }
            /* alo lanes: channels A+0..3 | B+0..3; ahi: A+4..7 | B+4..7 */
            #pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                int A = c + 8 * u, B = A + C / 2;
                float *o = accbuf + (size_t)r * D;
                __m256 sc = _mm256_set1_ps(cs[g][r]);
                __m256 lo = _mm256_mul_ps(_mm256_cvtepi32_ps(alo[r]), sc), hi = _mm256_mul_ps(_mm256_cvtepi32_ps(ahi[r]), sc);
                _mm_storeu_ps(o + A, _mm_add_ps(_mm_loadu_ps(o + A), _mm256_castps256_ps128(lo)));
                _mm_storeu_ps(o + A + 4, _mm_add_ps(_mm_loadu_ps(o + A + 4), _mm256_castps256_ps128(hi)));
                _mm_storeu_ps(o + B, _mm_add_ps(_mm_loadu_ps(o + B), _mm256_extractf128_ps(lo, 1)));
                _mm_storeu_ps(o + B + 4, _mm_add_ps(_mm_loadu_ps(o + B + 4), _mm256_extractf128_ps(hi, 1)));
            }
        }
    }
    if (grouped)
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++)
            for (int c = 0; c < D; c += 8)
                _mm256_storeu_ps(accbuf + (size_t)r * D + c, _mm256_add_ps(_mm256_loadu_ps(accbuf + (size_t)r * D + c),
                                                                          _mm256_set1_ps(minacc[c / b->Gv][r])));
}

/* The integer kernels take R <= 4 rows and whole chunks that never straddle a value group. */
static bool int_ok(const kvq__blk *b, int rows) {
    if (rows > 4 || (b->type != KVQ_TYPE_Q8 && b->type != KVQ_TYPE_Q4 && b->type != KVQ_TYPE_Q2)) return false;
    int C = int_chunk(b->type);
    if (b->D % C) return false;
    return b->type == KVQ_TYPE_Q8 || b->role == KVQ_KEY || (b->Gv % C == 0 && b->D / b->Gv <= 4);
}

#define INT_ROWS_SWITCH(CALL, T)                                                                           \
    switch (rows) {                                                                                        \
    case 1: CALL(T, 1); break;                                                                             \
    case 2: CALL(T, 2); break;                                                                             \
    case 3: CALL(T, 3); break;                                                                             \
    default: CALL(T, 4); break;                                                                            \
    }
#define INT_TYPE_SWITCH(CALL)                                                                              \
    switch (b->type) {                                                                                     \
    case KVQ_TYPE_Q8: INT_ROWS_SWITCH(CALL, KVQ_TYPE_Q8); break;                                           \
    case KVQ_TYPE_Q4: INT_ROWS_SWITCH(CALL, KVQ_TYPE_Q4); break;                                           \
    default: INT_ROWS_SWITCH(CALL, KVQ_TYPE_Q2); break;                                                    \
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

static void key_scores_avx2(const kvq__blk *b, int j0, int n, const float *q, int rows, float *s, int ss,
                            kvq__qstate *st) {
    if (int_ok(b, rows)) {
#define KI(T, R) key_scores_int_impl(T, R, b, j0, n, q, s, ss, st)
        INT_TYPE_SWITCH(KI)
#undef KI
        return;
    }
#define KS(T, R) key_scores_impl(T, R, b, j0, n, q, s, ss)
    TYPE_SWITCH(KS)
#undef KS
}

static void value_accum_avx2(const kvq__blk *b, int j0, int n, const float *p, int ps, int rows, float *acc) {
    if (int_ok(b, rows)) {
#define VI(T, R) value_accum_int_impl(T, R, b, j0, n, p, ps, acc)
        INT_TYPE_SWITCH(VI)
#undef VI
        return;
    }
#define VA(T, R) value_accum_impl(T, R, b, j0, n, p, ps, acc)
    TYPE_SWITCH(VA)
#undef VA
}

static float max_avx2(const float *x, int n) {
    float m = x[0];
    int i = 0;
    if (n >= 8) {
        __m256 v = _mm256_loadu_ps(x);
        for (i = 8; i + 8 <= n; i += 8) v = _mm256_max_ps(v, _mm256_loadu_ps(x + i));
        m = hmax_ps(v);
    }
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

static const kvq__kernels avx2 = {"avx2", decode_avx2, dots_avx2, axpys_avx2, exp_sum_avx2, max_avx2,
                                  key_scores_avx2, value_accum_avx2};

const kvq__kernels *kvq__kernels_avx2(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &avx2;
    return NULL;
}
#else
const kvq__kernels *kvq__kernels_avx2(void) { return NULL; }
#endif

/* AVX2 + FMA + F16C kernels, compiled with those flags and chosen at run time. Tested against the _ref kernels.
 * Their width-independent parts (weights, prefetch, dispatch) are in attn_simd.h, shared with attn_avx512.c. */
#include "attn.h"

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "attn_simd.h"

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

static void q3_decode(const kvq__blk *b, int j0, int n, float *out);

static void decode_avx2(const kvq__blk *b, int j0, int n, float *out) {
    if (nu_blk(b)) {
        decode_levels(b, j0, n, out);
        return;
    }
    const int D = b->D;
    if (b->type == KVQ_TYPE_Q3) {
        q3_decode(b, j0, n, out);
        return;
    }
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
            s[(size_t)r * ss + i] = hsum_ps(a);
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
    /* n = round(x / ln2) by the 1.5 * 2^23 shifter, whose low mantissa bits are then n + 127: 2^n's exponent */
    const __m256 shifter = _mm256_set1_ps(12583039.0f); /* 1.5 * 2^23 + 127 */
    __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), shifter);
    __m256 n = _mm256_sub_ps(t, shifter);
    __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_castps_si256(t), 23);
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

/* ---- Q3 (kvq.h section 5: D/4 bytes of low 2 bits as a Q2 row, then D/8 bytes of high bits). Codes decode
 * through the level table lv16 (x = scale * lv16[q] / 16 + min, lv16[q] <= 112): each 3-bit code is assembled in
 * a byte and looked up with one vpshufb, so non-uniform tables cost the same as the uniform one. Keys use int16 dot
 * products (vpmaddwd) with the query rounded to int16 per key group. Values: where D is a multiple of 128, 8-bit
 * weights against centered level bytes, four tokens per dword (attn_simd.h, q3_value_accum8_impl: the Q4/Q2 value
 * kernels' rounding); else rows decoded to lv16 bytes in channel order and the softmax weights rounded to int16 per
 * (row, value group, segment): relative error <= 1/65534 of the largest weight. */

/* decoded rows: x = scale * lv / 16 + min, fp32 */
static void q3_decode(const kvq__blk *b, int j0, int n, float *out) {
    const int D = b->D;
    const __m256i tbl = q3_table(b->lv16);
    uint8_t lv[256];
    for (int i = 0; i < n; i++) {
        int j = j0 + i;
        float *o = out + (size_t)i * D;
        q3_row_lv(b->data + (size_t)j * b->stride, D, b->lv16, tbl, lv);
        const __m256 k16 = _mm256_set1_ps(0.0625f);
        for (int c = 0; c < D; c += 8) {
            __m256 x = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)(lv + c)))), k16);
            __m256 s, m;
            if (b->role == KVQ_KEY) {
                const uint16_t *sm = b->par + (size_t)(j / b->G) * 2 * D;
                s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(sm + c)));
                m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(sm + D + c)));
            } else {
                const uint16_t *sm = b->par + ((size_t)j * (D / b->Gv) + c / b->Gv) * 2; /* Gv >= 16 */
                s = _mm256_set1_ps(_cvtsh_ss(sm[0])), m = _mm256_set1_ps(_cvtsh_ss(sm[1]));
            }
            _mm256_storeu_ps(o + c, _mm256_fmadd_ps(s, x, m));
        }
    }
}

/* The query's order for Q3 keys: D a multiple of 64, per 128 channels from c, position c + 32u + 16h + i holds
 * channel c + 4(8h + i) + u (i < 8) and c + 64 + 4(8h + i - 8) + u (i >= 8): field u of q3_fields128 widened to words
 * by unpacking with zero (lo: h = 0, hi: h = 1; no lane crossing); a last 64 channels (D = 64, 192) in Q2's kernel
 * order (position c + 16u + k: channel c + 4k + u, q3_fields64's fields widened); else channel order */
static void q3_order(kvq_type T, const float *src, float *dst, int D) {
    (void)T;
    if (D % 64) {
        memcpy(dst, src, (size_t)D * sizeof(float));
        return;
    }
    float t[256] __attribute__((aligned(32)));
    to_kernel_order(KVQ_TYPE_Q2, src, t, D); /* position c + 16u + k of each 64 channels: channel c + 4k + u */
    int c = 0;
    for (; c + 128 <= D; c += 128)
        for (int u = 0; u < 4; u++)
            for (int h = 0; h < 2; h++) {
                _mm256_storeu_ps(dst + c + 32 * u + 16 * h, _mm256_load_ps(t + c + 16 * u + 8 * h));
                _mm256_storeu_ps(dst + c + 32 * u + 16 * h + 8, _mm256_load_ps(t + c + 64 + 16 * u + 8 * h));
            }
    if (c < D) memcpy(dst + c, t + c, 64 * sizeof(float));
}

/* *a += maddwd(x, q) for the R rows of q16 at channel position pos (in place, the query a memory operand: written
 * with intrinsics, GCC reassociates the sums and copies the query to the stack) */
AI void q3_madd_rows(const int R, __m256i *acc, __m256i x, const int16_t *q16, int D, int pos) {
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        __m256i t;
        __asm__("vpmaddwd %[q], %[x], %[t]\n\tvpaddd %[t], %[a], %[a]"
                : [a] "+x"(acc[r]), [t] "=&x"(t)
                : [q] "m"(*(const __m256i *)(const void *)(q16 + (size_t)r * D + pos)), [x] "x"(x));
    }
}

/* Key scores of R <= 4 rows: 8 tokens of one key group are decoded to level bytes, then dotted with
 * q' = q * scale (int16, per key group): score = qs / 16 * sum q'_c lv_c + q . min */
AI void q3_key_scores_impl(const int R, const int DK, const kvq__blk *b, int j0, int n, const float *q, float *s,
                           int ss, kvq__qstate *st) {
    const int D = DK ? DK : b->D; /* DK: the head dim when known at compile time (the channel loop unrolls) */
    const __m256i tbl = q3_table(b->lv16);
    uint8_t lv[8][256] __attribute__((aligned(32)));
    if (!st->valid) {
        for (int r = 0; r < R; r++) q3_order(KVQ_TYPE_Q3, q + (size_t)r * D, st->qg + (size_t)r * D, D);
        st->valid = 1, st->par = NULL, st->group = -1;
    }
    pfcur pf = pf_start(b, n);
    for (int i0 = 0; i0 < n;) {
        int j = j0 + i0;
        const int m = key_segment(KVQ_TYPE_Q3, R, D, b, j, n - i0, q, st, q3_order);
        pf_step(&pf);
        const uint8_t *row = b->data + (size_t)j * b->stride;
        __m256i part[8];
        if (D % 64 == 0) { /* the fields stay in registers, widened to words in the query's order */
            for (int t = 0; t < m; t++, row += b->stride) {
                __m256i acc[4];
                const int16_t *q16 = st->q16;
                __asm__("" : "+r"(q16)); /* the query stays in memory operands (see key_scores_int_impl) */
                #pragma GCC unroll 4
                for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_si256();
                int c = 0;
                #pragma GCC unroll 2
                for (; c + 128 <= D; c += 128) {
                    __m256i f[4];
                    q3_fields128(row, D, c, tbl, f);
                    const __m256i z = _mm256_setzero_si256();
                    #pragma GCC unroll 4
                    for (int u = 0; u < 4; u++) {
                        q3_madd_rows(R, acc, _mm256_unpacklo_epi8(f[u], z), q16, D, c + 32 * u);
                        q3_madd_rows(R, acc, _mm256_unpackhi_epi8(f[u], z), q16, D, c + 32 * u + 16);
                    }
                }
                if (c < D) {
                    __m128i f[4];
                    q3_fields64(row, D, c, tbl, f);
                    #pragma GCC unroll 4
                    for (int u = 0; u < 4; u++) q3_madd_rows(R, acc, _mm256_cvtepu8_epi16(f[u]), q16, D, c + 16 * u);
                }
                part[t] = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0], acc[1]), _mm256_hadd_epi32(acc[2], acc[3]));
            }
            int_scores_store(KVQ_TYPE_Q3, R, b, j, m, part, st, s + i0, ss);
            i0 += m;
            continue;
        }
        for (int t = 0; t < m; t++, row += b->stride) q3_row_lv(row, D, b->lv16, tbl, lv[t]);
        for (int t = 0; t < m; t++) {
            __m256i acc[4];
            #pragma GCC unroll 4
            for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_si256();
            for (int c = 0; c < D; c += 16) {
                __m256i x = _mm256_cvtepu8_epi16(_mm_load_si128((const __m128i *)(const void *)(lv[t] + c)));
                #pragma GCC unroll 4
                for (int r = 0; r < R; r++)
                    acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(x, _mm256_load_si256((const __m256i *)(const void *)(st->q16 + (size_t)r * D + c))));
            }
            part[t] = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0], acc[1]), _mm256_hadd_epi32(acc[2], acc[3]));
        }
        int_scores_store(KVQ_TYPE_Q3, R, b, j, m, part, st, s + i0, ss);
        i0 += m;
    }
}

/* Values, R <= 4 rows: the segment's n rows decoded to level bytes, then per 16 channels of value group g,
 * acc[r] += ws[g][r] * sum_i w16[g][r][i] lv_i + sum_i p_ri min_ig, w16 = p * scale rounded to int16 (token pairs
 * interleaved as in the Q8 kernel: one vpmaddwd does two tokens of 8 channels) */
AI void q3_value_accum_impl(const int R, const int DK, const kvq__blk *b, int j0, int n, const float *p, int ps,
                            float *accbuf) {
    const int D = DK ? DK : b->D, Gv = b->Gv;
    const __m256i tbl = q3_table(b->lv16);
    /* row n: the partner of an odd n's last token, at weight 0 (its bytes never matter: integer products) */
    uint8_t lv[65][256] __attribute__((aligned(32)));
    for (int i = 0; i < n; i++) q3_row_lv(b->data + (size_t)(j0 + i) * b->stride, D, b->lv16, tbl, lv[i]);
    q3weights qw;
    q3_value_weights(R, b, j0, n, p, ps, &qw);
    for (int c = 0; c < D; c += 16) {
        const int g = c / Gv;
        __m256i a[4][2];
        #pragma GCC unroll 4
        for (int r = 0; r < R; r++) a[r][0] = a[r][1] = _mm256_setzero_si256();
        for (int i = 0; i < n; i += 2) {
            /* an odd n's last token pairs with row n at weight 0 (w16[n] = 0) */
            __m128i x0 = _mm_load_si128((const __m128i *)(const void *)(lv[i] + c));
            __m128i x1 = _mm_load_si128((const __m128i *)(const void *)(lv[i + 1] + c));
            __m256i lo = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(x0, x1)), hi = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(x0, x1));
            #pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                int32_t pw;
                memcpy(&pw, &qw.w16[g][r][i], 4);
                __m256i w = _mm256_set1_epi32(pw);
                a[r][0] = _mm256_add_epi32(a[r][0], _mm256_madd_epi16(w, lo));
                a[r][1] = _mm256_add_epi32(a[r][1], _mm256_madd_epi16(w, hi));
            }
        }
        #pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            float *o = accbuf + (size_t)r * D + c;
            __m256 s = _mm256_set1_ps(qw.ws[g][r]), m = _mm256_set1_ps(qw.mn[g][r]);
            _mm256_storeu_ps(o, _mm256_add_ps(_mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][0]), s, _mm256_loadu_ps(o)), m));
            _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][1]), s, _mm256_loadu_ps(o + 8)), m));
        }
    }
}

/* more than 4 rows: decoded tiles of 8 rows through the fp32 kernels */
static void q3_key_scores_tiles(const kvq__blk *b, int j0, int n, const float *q, int rows, float *s, int ss) {
    float x[KVQ_TILE * 256] __attribute__((aligned(32)));
    for (int i = 0; i < n; i += KVQ_TILE) {
        int m = n - i < KVQ_TILE ? n - i : KVQ_TILE;
        q3_decode(b, j0 + i, m, x);
        dots_avx2(q, rows, b->D, x, m, s + i, ss);
    }
}

static void q3_value_accum_tiles(const kvq__blk *b, int j0, int n, const float *p, int ps, int rows, float *acc) {
    float x[KVQ_TILE * 256] __attribute__((aligned(32)));
    for (int i = 0; i < n; i += KVQ_TILE) {
        int m = n - i < KVQ_TILE ? n - i : KVQ_TILE;
        q3_decode(b, j0 + i, m, x);
        axpys_avx2(p + i, ps, rows, b->D, x, m, acc);
    }
}

static void q3_key_scores(const kvq__blk *b, int j0, int n, const float *q, int rows, float *s, int ss,
                          kvq__qstate *st) {
#define Q3K(DK)                                                                                                \
    switch (rows) {                                                                                            \
    case 1: q3_key_scores_impl(1, DK, b, j0, n, q, s, ss, st); break;                                          \
    case 2: q3_key_scores_impl(2, DK, b, j0, n, q, s, ss, st); break;                                          \
    case 3: q3_key_scores_impl(3, DK, b, j0, n, q, s, ss, st); break;                                          \
    default: q3_key_scores_impl(4, DK, b, j0, n, q, s, ss, st); break;                                         \
    }
    if (rows > 4) q3_key_scores_tiles(b, j0, n, q, rows, s, ss);
    else if (b->D == 128) Q3K(128)
    else if (b->D == 64) Q3K(64)
    else Q3K(0)
#undef Q3K
}

static void q3_value_accum(const kvq__blk *b, int j0, int n, const float *p, int ps, int rows, float *acc) {
#define Q3V(DK)                                                                                                \
    switch (rows) {                                                                                            \
    case 1: q3_value_accum_impl(1, DK, b, j0, n, p, ps, acc); break;                                           \
    case 2: q3_value_accum_impl(2, DK, b, j0, n, p, ps, acc); break;                                           \
    case 3: q3_value_accum_impl(3, DK, b, j0, n, p, ps, acc); break;                                           \
    default: q3_value_accum_impl(4, DK, b, j0, n, p, ps, acc); break;                                          \
    }
#define Q3V8(DK)                                                                                               \
    switch (rows) {                                                                                            \
    case 1: q3_value_accum8_impl(1, DK, false, b, j0, n, p, ps, acc); break;                                   \
    case 2: q3_value_accum8_impl(2, DK, false, b, j0, n, p, ps, acc); break;                                   \
    case 3: q3_value_accum8_impl(3, DK, false, b, j0, n, p, ps, acc); break;                                   \
    default: q3_value_accum8_impl(4, DK, false, b, j0, n, p, ps, acc); break;                                  \
    }
    if (rows > 4) q3_value_accum_tiles(b, j0, n, p, ps, rows, acc);
    else if (q3_w8_fits(b, rows)) { /* 8-bit weights (attn_simd.h) */
        if (b->D == 128) Q3V8(128)
        else Q3V8(0)
    } else if (b->D == 128) Q3V(128)
    else Q3V(0)
#undef Q3V
#undef Q3V8
}

/* ---- fused kernels: one pass over a block's bytes, dequantized in registers ---- */

AI void key_scores_impl(const kvq_type T, const int R, const kvq__blk *b, int j0, int n, const float *q, float *s,
                        int ss) {
    const int D = b->D;
    const bool grouped = T == KVQ_TYPE_Q4 || T == KVQ_TYPE_Q2;
    float qg[KVQ_FUSED_ROWS * 256] __attribute__((aligned(32))), qm[KVQ_FUSED_ROWS] = {0};
    float part[KVQ_FUSED_ROWS][8] __attribute__((aligned(32)));
    const float *qq = q;
    int cur_group = -1;
    pfcur pf = pf_start(b, n);
    for (int i0 = 0; i0 < n; i0 += 8) {
        int m = n - i0 < 8 ? n - i0 : 8;
        pf_step(&pf);
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
                    s[(size_t)r * ss + i0 + i + t] = hsum_ps(a) * tok_scale(T, b, j + t) + (grouped ? qm[r] : 0.0f);
                }
            i += pair;
        }
    }
}

AI void value_accum_impl(const kvq_type T, const int R, const kvq__blk *b, int j0, int n, const float *p, int ps,
                         float *accbuf) {
    const int D = b->D;
    const bool grouped = T == KVQ_TYPE_Q4 || T == KVQ_TYPE_Q2;
    /* coef[g][r][i]: the weight of token i's raw row in channel group g; minacc[r][g]: sum of p * min */
    float coef[16][KVQ_FUSED_ROWS][64], minacc[KVQ_FUSED_ROWS][16];
    value_coefs(T, R, b, j0, n, p, ps, coef, minacc);
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
 * types' own quantization error. A chunk of C channels (Q8 16, Q4 32, Q2 64) is one 16-byte load. */

static inline int int_chunk(kvq_type T) { return T == KVQ_TYPE_Q8 ? 16 : T == KVQ_TYPE_Q4 ? 32 : 64; }

/* Key codes are unpacked in the order the bytes give them, with no shuffles: 16 bytes widen to 16 words and each
 * field of a byte (E = 1, 2 or 4 codes per byte) is masked out into its own vector, so lane k of vector u is
 * channel c + k*E + u. The query is permuted to the same order ("kernel order", index c + 16u + k) instead, once
 * per work item, where it costs nothing per token. */
AI void unpack_keys(const kvq_type T, const uint8_t *row, int c, __m256i *v) {
    if (T == KVQ_TYPE_Q8) {
        v[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(const void *)(row + c)));
        return;
    }
    if (T == KVQ_TYPE_Q4) {
        __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(const void *)(row + c / 2)));
        v[0] = _mm256_and_si256(x, _mm256_set1_epi16(15)), v[1] = _mm256_srli_epi16(x, 4);
        return;
    }
    __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(const void *)(row + c / 4)));
    __m256i m = _mm256_set1_epi16(3);
    v[0] = _mm256_and_si256(x, m), v[1] = _mm256_and_si256(_mm256_srli_epi16(x, 2), m);
    v[2] = _mm256_and_si256(_mm256_srli_epi16(x, 4), m), v[3] = _mm256_srli_epi16(x, 6);
}

/* Accumulations in place: written with intrinsics, GCC reassociates them into trees of spilled products or keeps
 * moving the sums between registers. *a += maddubs(w, x) (int16 lanes): */
AI void acc_maddubs(__m256i *a, __m256i w, __m256i x) {
    __m256i t;
    __asm__("vpmaddubsw %[x], %[w], %[t]\n\tvpaddw %[t], %[a], %[a]" : [a] "+x"(*a), [t] "=&x"(t) : [w] "x"(w), [x] "x"(x));
}

/* *a += maddwd(w, x) (int32 lanes), in place */
AI void acc_maddwd(__m256i *a, __m256i w, __m256i x) {
    __m256i t;
    __asm__("vpmaddwd %[x], %[w], %[t]\n\tvpaddd %[t], %[a], %[a]" : [a] "+x"(*a), [t] "=&x"(t) : [w] "x"(w), [x] "x"(x));
}

/* *a += maddwd(*w, x), w in memory */
AI void acc_maddwd_m(__m256i *a, const __m256i *w, __m256i x) {
    __m256i t;
    __asm__("vpmaddwd %[w], %[x], %[t]\n\tvpaddd %[t], %[a], %[a]" : [a] "+x"(*a), [t] "=&x"(t) : [w] "m"(*w), [x] "x"(x));
}

/* DK: the head dim when known at compile time (the channel loop unrolls fully), else 0 */
AI void key_scores_int_impl(const kvq_type T, const int R, const int DK, const kvq__blk *b, int j0, int n,
                            const float *q, float *s, int ss, kvq__qstate *st) {
    const int D = DK ? DK : b->D, C = int_chunk(T), NX = C / 16;
    const bool grouped = T != KVQ_TYPE_Q8;
    if (!st->valid) { /* first block of the work item: Q8 rounds q once, the grouped types permute it once */
        if (grouped)
            for (int r = 0; r < R; r++) to_kernel_order(T, q + (size_t)r * D, st->qg + (size_t)r * D, D);
        else
            quantize_rows16(q, NULL, R, D, st->q16, st->qs);
        st->valid = 1, st->par = NULL, st->group = -1;
    }
    pfcur pf = pf_start(b, n);
    for (int i0 = 0; i0 < n;) {
        int j = j0 + i0;
        /* up to 8 tokens of one key group; their scores are reduced together (transposed sums) */
        const int m = key_segment(T, R, D, b, j, n - i0, q, st, to_kernel_order);
        pf_step(&pf);
        /* part[t]: token t's R row sums, each split over the two 128-bit halves: (r0 r1 r2 r3 | r0 r1 r2 r3) */
        __m256i part[8];
        const uint8_t *row = b->data + (size_t)j * b->stride;
        for (int t = 0; t < m; t++, row += b->stride) {
            /* integer adds have 1-cycle latency: one token at a time keeps every vector in a register */
            __m256i acc[4];
            /* the query stays in memory operands: hoisted out of the token loop, GCC would copy it to the stack */
            const int16_t *q16 = st->q16;
            __asm__("" : "+r"(q16));
            #pragma GCC unroll 4
            for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_si256(); /* folded away when DK is known */
            #pragma GCC unroll 16
            for (int c = 0; c < D; c += C) {
                __m256i x[4];
                unpack_keys(T, row, c, x);
                #pragma GCC unroll 4
                for (int u = 0; u < NX; u++)
                    #pragma GCC unroll 4
                    for (int r = 0; r < R; r++) {
                        const __m256i *qv = (const __m256i *)(const void *)(q16 + (size_t)r * D + c + 16 * u);
                        if (DK && c == 0 && u == 0) acc[r] = _mm256_madd_epi16(*qv, x[u]);
                        else acc_maddwd_m(&acc[r], qv, x[u]);
                    }
            }
            #pragma GCC unroll 4
            for (int r = R; r < 4; r++) acc[r] = _mm256_setzero_si256();
            part[t] = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0], acc[1]), _mm256_hadd_epi32(acc[2], acc[3]));
        }
        int_scores_store(T, R, b, j, m, part, st, s + i0, ss);
        i0 += m;
    }
}

/* acc[c..] += ws * a (+ mn) for the unsigned 16-bit sums a of a 32 (Q4) or 64 (Q2) channel block of one row, whose
 * lane k of vector f is channel c + k*E + f */
AI void flush_block(const kvq_type T, const __m256i *a, float ws, float mn, bool last, float *acc) {
    __m256i v[4];
    const int NV = T == KVQ_TYPE_Q4 ? 2 : 4, half = 8 * NV;
    if (T == KVQ_TYPE_Q4) { /* ch 0-7 | 16-23, ch 8-15 | 24-31 */
        v[0] = _mm256_unpacklo_epi16(a[0], a[1]), v[1] = _mm256_unpackhi_epi16(a[0], a[1]);
    } else { /* ch 0-7 | 32-39, 8-15 | 40-47, 16-23 | 48-55, 24-31 | 56-63 */
        __m256i l01 = _mm256_unpacklo_epi16(a[0], a[1]), l23 = _mm256_unpacklo_epi16(a[2], a[3]);
        __m256i h01 = _mm256_unpackhi_epi16(a[0], a[1]), h23 = _mm256_unpackhi_epi16(a[2], a[3]);
        v[0] = _mm256_unpacklo_epi32(l01, l23), v[1] = _mm256_unpackhi_epi32(l01, l23);
        v[2] = _mm256_unpacklo_epi32(h01, h23), v[3] = _mm256_unpackhi_epi32(h01, h23);
    }
    const __m256 s = _mm256_set1_ps(ws), m = _mm256_set1_ps(last ? mn : 0.0f);
    #pragma GCC unroll 4
    for (int k = 0; k < NV; k++)
        #pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            __m128i x = h ? _mm256_extracti128_si256(v[k], 1) : _mm256_castsi256_si128(v[k]);
            float *o = acc + 8 * k + h * half;
            __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(x));
            __m256 r = _mm256_fmadd_ps(f, s, _mm256_loadu_ps(o));
            _mm256_storeu_ps(o, last ? _mm256_add_ps(r, m) : r);
        }
}

/* one token pair of a block: a[r][f] += w8 pair of row r x the pair's codes of field f */
AI void grouped_pair(const kvq_type T, const int R, const uint8_t *row0, const uint8_t *row1, const uint32_t *w8,
                     __m256i (*a)[4]) {
    const int NV = T == KVQ_TYPE_Q4 ? 2 : 4;
    const __m256i nib = _mm256_set1_epi8(T == KVQ_TYPE_Q4 ? 15 : 3);
    /* words (token i byte k, token i+1 byte k): a field of both tokens per byte pair */
    __m256i z = _mm256_or_si256(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(const void *)row0)),
                                _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(const void *)row1)), 8));
    __m256i x[4];
    #pragma GCC unroll 4
    for (int f = 0; f < NV; f++)
        x[f] = _mm256_and_si256(f == 0 ? z : _mm256_srli_epi16(z, f * (T == KVQ_TYPE_Q4 ? 4 : 2)), nib);
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        __m256i w = _mm256_set1_epi32((int)w8[(size_t)r * (VW_PAD / 2)]);
        #pragma GCC unroll 4
        for (int f = 0; f < NV; f++) {
            acc_maddubs(&a[r][f], w, x[f]);
        }
    }
}

AI void value_accum_grouped_impl(const kvq_type T, const int R, const int DK, const kvq__blk *b, int j0, int n,
                                 const float *p, int ps, float *accbuf) {
    const int D = DK ? DK : b->D, C = T == KVQ_TYPE_Q4 ? 32 : 64, NV = C / 16;
    vweights vw;
    value_weights8(T, R, b, j0, n, p, ps, (uint32_t *)vw.w8, &vw.s);
    const size_t st = DK ? (size_t)DK * (T == KVQ_TYPE_Q4 ? 4 : 2) / 8 : b->stride; /* page rows: D * b / 8 bytes */
    for (int k = 0; k < vw.s.nwin; k++) {
        const int i0 = vw.s.win[k], i1 = vw.s.win[k + 1];
        const bool last = k == vw.s.nwin - 1;
        for (int c = 0; c < D; c += C) {
            const int g = c / b->Gv; /* Gv is a multiple of C */
            __m256i a[4][4];
            #pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                #pragma GCC unroll 4
                for (int f = 0; f < NV; f++) a[r][f] = _mm256_setzero_si256();
            const uint8_t *row = b->data + (size_t)(j0 + i0) * st + (T == KVQ_TYPE_Q4 ? c / 2 : c / 4);
            const uint8_t *end = row + (size_t)((i1 - i0) & ~1) * st;
            const uint32_t *w8 = &vw.w8[g][0][i0 / 2]; /* windows start at multiples of 16 */
            for (; row + 2 * st < end; row += 4 * st, w8 += 2) /* two pairs per turn: half the loop overhead */
                grouped_pair(T, R, row, row + st, w8, a), grouped_pair(T, R, row + 2 * st, row + 3 * st, w8 + 1, a);
            if (row < end) grouped_pair(T, R, row, row + st, w8, a), row += 2 * st, w8 += 1;
            if ((i1 - i0) & 1) grouped_pair(T, R, row, row, w8, a); /* its second weight is 0 */
            #pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                flush_block(T, a[r], vw.s.ws[g][r], vw.s.mn[g][r], last, accbuf + (size_t)r * D + c);
        }
    }
    top_fixup(T, R, b, j0, &vw.s, accbuf);
}

/* one token pair of a Q8 block's 16 channels: a[r][0..1] += weight pair of row r x the pair's int16 codes */
AI void q8_pair(const int R, const uint8_t *row0, const uint8_t *row1, const int16_t *w16, __m256i (*a)[2]) {
    __m128i x0 = _mm_loadu_si128((const __m128i *)(const void *)row0);
    __m128i x1 = _mm_loadu_si128((const __m128i *)(const void *)row1);
    /* int16 (token i, token i+1) pairs of channels 0-7 and 8-15 */
    __m256i lo = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(x0, x1)), hi = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(x0, x1));
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        int32_t pairw;
        memcpy(&pairw, w16 + (size_t)r * (64 + 16), 4);
        __m256i w = _mm256_set1_epi32(pairw);
        acc_maddwd(&a[r][0], w, lo), acc_maddwd(&a[r][1], w, hi);
    }
}

AI void value_accum_q8_impl(const int R, const int DK, const kvq__blk *b, int j0, int n, const float *p, int ps,
                            float *accbuf) {
    const int D = DK ? DK : b->D;
    /* weights p * s rounded to int16, read in (token i, token i+1) pairs as one int32 */
    int16_t c16[4][64 + 16] __attribute__((aligned(32)));
    float cs[4];
    q8_weights(R, b, j0, n, p, ps, c16, cs);
    for (int c = 0; c < D; c += 16) {
        __m256i a[4][2];
        #pragma GCC unroll 4
        for (int r = 0; r < R; r++) a[r][0] = a[r][1] = _mm256_setzero_si256();
        const size_t st = DK ? (size_t)DK : b->stride;
        const uint8_t *row = b->data + (size_t)j0 * st + c, *end = row + (size_t)(n & ~1) * st;
        const int16_t *w16 = &c16[0][0];
        for (; row + 2 * st < end; row += 4 * st, w16 += 4) /* two pairs per turn: half the loop overhead */
            q8_pair(R, row, row + st, w16, a), q8_pair(R, row + 2 * st, row + 3 * st, w16 + 2, a);
        if (row < end) q8_pair(R, row, row + st, w16, a), row += 2 * st, w16 += 2;
        if (n & 1) q8_pair(R, row, row, w16, a); /* an odd n's last token, with itself at weight 0 */
        #pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            float *o = accbuf + (size_t)r * D + c;
            __m256 s = _mm256_set1_ps(cs[r]);
            _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][0]), s, _mm256_loadu_ps(o)));
            _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][1]), s, _mm256_loadu_ps(o + 8)));
        }
    }
}

AI void value_accum_int_impl(const kvq_type T, const int R, const int DK, const kvq__blk *b, int j0, int n,
                             const float *p, int ps, float *accbuf) {
    if (T == KVQ_TYPE_Q8) value_accum_q8_impl(R, DK, b, j0, n, p, ps, accbuf);
    else value_accum_grouped_impl(T, R, DK, b, j0, n, p, ps, accbuf);
}

/* The integer kernels take R <= 4 rows and whole chunks that never straddle a value group. */
static bool int_ok(const kvq__blk *b, int rows) {
    int C = int_chunk(b->type);
    return int_fits(b, rows, C, C);
}

static void key_scores_avx2(const kvq__blk *b, int j0, int n, const float *q, int rows, float *s, int ss,
                            kvq__qstate *st) {
    if (b->type == KVQ_TYPE_Q3) {
        q3_key_scores(b, j0, n, q, rows, s, ss, st);
        return;
    }
    if (nu_blk(b)) {
        key_scores_levels(dots_avx2, b, j0, n, q, rows, s, ss);
        return;
    }
    if (int_ok(b, rows)) {
        /* the common head dims get a fully unrolled channel loop */
#define KI(T, R) key_scores_int_impl(T, R, 128, b, j0, n, q, s, ss, st)
        if (b->D == 128) INT_TYPE_SWITCH(KI)
#undef KI
#define KI(T, R) key_scores_int_impl(T, R, 64, b, j0, n, q, s, ss, st)
        else if (b->D == 64) INT_TYPE_SWITCH(KI)
#undef KI
#define KI(T, R) key_scores_int_impl(T, R, 0, b, j0, n, q, s, ss, st)
        else INT_TYPE_SWITCH(KI)
#undef KI
        return;
    }
#define KS(T, R) key_scores_impl(T, R, b, j0, n, q, s, ss)
    TYPE_SWITCH(KS)
#undef KS
}

static void value_accum_avx2(const kvq__blk *b, int j0, int n, const float *p, int ps, int rows, float *acc) {
    if (b->type == KVQ_TYPE_Q3) {
        q3_value_accum(b, j0, n, p, ps, rows, acc);
        return;
    }
    if (nu_blk(b)) {
        value_accum_levels(axpys_avx2, b, j0, n, p, ps, rows, acc);
        return;
    }
    if (int_ok(b, rows)) {
        /* Q8, Q4 at D = 128: the row stride and the channel loop known at compile time (Q2's 16 sums spill more) */
#define VI(T, R) value_accum_int_impl(T, R, T == KVQ_TYPE_Q2 ? 0 : 128, b, j0, n, p, ps, acc)
        if (b->D == 128) INT_TYPE_SWITCH(VI)
#undef VI
#define VI(T, R) value_accum_int_impl(T, R, 0, b, j0, n, p, ps, acc)
        else INT_TYPE_SWITCH(VI)
#undef VI
        return;
    }
#define VA(T, R) value_accum_impl(T, R, b, j0, n, p, ps, acc)
    TYPE_SWITCH(VA)
#undef VA
}

/* NaN if any x[i] is NaN: vmaxps returns its second operand when either is NaN, so NaNs are tracked apart */
static float max_avx2(const float *x, int n) {
    float m = x[0];
    int i = 0, nan = 0;
    if (n >= 8) {
        __m256 v = _mm256_loadu_ps(x), un = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
        for (i = 8; i + 8 <= n; i += 8) {
            __m256 y = _mm256_loadu_ps(x + i);
            v = _mm256_max_ps(v, y), un = _mm256_or_ps(un, _mm256_cmp_ps(y, y, _CMP_UNORD_Q));
        }
        m = hmax_ps(v), nan = _mm256_movemask_ps(un);
    }
    for (; i < n; i++) m = x[i] > m ? x[i] : m, nan |= isnan(x[i]);
    return nan ? NAN : m;
}

static void scale_avx2(float *x, int n, float s) {
    const __m256 v = _mm256_set1_ps(s);
    for (int i = 0; i < n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), v));
}

/* pre-RoPE keys: y[c] = x[c] C[c] + x[partner] S[c] (kvq__rope_rows_ref); D/2 is a multiple of 8 for every D */
static void rope_avx2(float *x, int n, int D, int neox, const float *C, const float *S) {
    const int h = D / 2;
    for (int i = 0; i < n; i++, x += D, C += D, S += D) {
        if (neox)
            for (int c = 0; c < h; c += 8) {
                __m256 a = _mm256_loadu_ps(x + c), b = _mm256_loadu_ps(x + c + h);
                _mm256_storeu_ps(x + c, _mm256_fmadd_ps(a, _mm256_loadu_ps(C + c), _mm256_mul_ps(b, _mm256_loadu_ps(S + c))));
                _mm256_storeu_ps(x + c + h,
                                 _mm256_fmadd_ps(b, _mm256_loadu_ps(C + c + h), _mm256_mul_ps(a, _mm256_loadu_ps(S + c + h))));
            }
        else
            for (int c = 0; c < D; c += 8) { /* partners are neighbours: swap the pairs of each 128-bit lane */
                __m256 a = _mm256_loadu_ps(x + c), b = _mm256_permute_ps(a, 0xB1);
                _mm256_storeu_ps(x + c, _mm256_fmadd_ps(a, _mm256_loadu_ps(C + c), _mm256_mul_ps(b, _mm256_loadu_ps(S + c))));
            }
    }
}

/* Pre-RoPE keys stored rotated: R^T of each row in registers, then RoPE, one store per row. The row's D/8 vectors go
 * through the inverse Hadamard of each block in kvq__rot_apply's order: the 1/sqrt(n) first, stages h = 1, 2, 4
 * inside a vector (x[j] + x[j+h] in the lower lane, x[j] - x[j+h] in the upper: fmadd(v, +-1, partner) is that one
 * add or subtract, exactly), h >= 8 between vectors, then the channel signs. Every step rounds as the scalar one,
 * so R^T x has the same bits; RoPE rounds as rope_avx2 (fmadd). */
AI void fwht_inv8(__m256 *v, const int nv, const __m256 f) {
    const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1), s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
    const __m256 s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
    #pragma GCC unroll 32
    for (int k = 0; k < nv; k++) {
        __m256 a = _mm256_mul_ps(v[k], f);
        a = _mm256_fmadd_ps(a, s1, _mm256_permute_ps(a, 0xB1));
        a = _mm256_fmadd_ps(a, s2, _mm256_permute_ps(a, 0x4E));
        v[k] = _mm256_fmadd_ps(a, s4, _mm256_permute2f128_ps(a, a, 1));
    }
    #pragma GCC unroll 32
    for (int h = 1; h < nv; h <<= 1)
        #pragma GCC unroll 32
        for (int k = 0; k < nv; k += 2 * h)
            #pragma GCC unroll 32
            for (int j = k; j < k + h; j++) {
                __m256 a = v[j], b = v[j + h];
                v[j] = _mm256_add_ps(a, b), v[j + h] = _mm256_sub_ps(a, b);
            }
}

AI void unrot_rope_rows8(float *x, int n, const int D, const __m256 *sg, int neox, const float *C, const float *S) {
    const int nv = D / 8, hv = nv / 2;
    for (int i = 0; i < n; i++, x += D, C += D, S += D) {
        __m256 v[32];
        #pragma GCC unroll 32
        for (int k = 0; k < nv; k++) v[k] = _mm256_loadu_ps(x + 8 * k);
        if (!(D & (D - 1))) {
            fwht_inv8(v, nv, _mm256_set1_ps(kvq__rot_scale(D)));
        } else { /* D = 80, 96: blocks of 64 and D - 64 (kvq__rot_apply) */
            fwht_inv8(v, 8, _mm256_set1_ps(kvq__rot_scale(64)));
            fwht_inv8(v + 8, nv - 8, _mm256_set1_ps(kvq__rot_scale(D - 64)));
        }
        #pragma GCC unroll 32
        for (int k = 0; k < nv; k++) v[k] = _mm256_xor_ps(v[k], sg[k]);
        if (neox) /* partners D/2 apart: vectors k and k + nv/2 (D/2 is a multiple of 8 for every D) */
            #pragma GCC unroll 32
            for (int k = 0; k < hv; k++) {
                __m256 a = v[k], b = v[k + hv];
                _mm256_storeu_ps(x + 8 * k, _mm256_fmadd_ps(a, _mm256_loadu_ps(C + 8 * k), _mm256_mul_ps(b, _mm256_loadu_ps(S + 8 * k))));
                _mm256_storeu_ps(x + 8 * (k + hv), _mm256_fmadd_ps(b, _mm256_loadu_ps(C + 8 * (k + hv)),
                                                                   _mm256_mul_ps(a, _mm256_loadu_ps(S + 8 * (k + hv)))));
            }
        else
            #pragma GCC unroll 32
            for (int k = 0; k < nv; k++) {
                __m256 a = v[k], b = _mm256_permute_ps(a, 0xB1);
                _mm256_storeu_ps(x + 8 * k, _mm256_fmadd_ps(a, _mm256_loadu_ps(C + 8 * k), _mm256_mul_ps(b, _mm256_loadu_ps(S + 8 * k))));
            }
    }
}

static void unrot_rope_avx2(float *x, int n, const kvq__rot *r, int neox, const float *C, const float *S) {
    /* the sign bits as xor masks, 8 channels a vector */
    __m256 sg[32];
    const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (int k = 0; k < r->D / 8; k++) {
        __m256i b = _mm256_set1_epi32((int)((r->s[k >> 3] >> ((k & 7) * 8)) & 0xff));
        sg[k] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cmpeq_epi32(_mm256_and_si256(b, bits), bits), 31));
    }
    switch (r->D) { /* a constant D: the vectors stay in registers (D = 256: 32, partly spilled) */
    case 64: unrot_rope_rows8(x, n, 64, sg, neox, C, S); break;
    case 80: unrot_rope_rows8(x, n, 80, sg, neox, C, S); break;
    case 96: unrot_rope_rows8(x, n, 96, sg, neox, C, S); break;
    case 128: unrot_rope_rows8(x, n, 128, sg, neox, C, S); break;
    default: unrot_rope_rows8(x, n, 256, sg, neox, C, S); break; /* the cache's head dims: 64, 80, 96, 128, 256 */
    }
}

/* 8-bit group parameters (kvq.h section 5), 8 pairs at a time: b F[k % 16] (a table lookup by two permutes),
 * times 2^-(k / 16) as an exponent built from bits (the product is exact), both conversions to fp16 round to nearest
 * even (VCVTPS2PH keeps fp16 subnormals): the same operations as kvq__p8_scale / kvq__p8_min, so the same bits */
static void p8_expand_avx2(uint16_t base, int qmax, const uint8_t *k, const uint8_t *z, int n, uint16_t *s_out,
                           uint16_t *m_out, int os) {
    const int Z0 = kvq__p8_zero(qmax);
    const __m256 b = _mm256_set1_ps(_cvtsh_ss(base)), unit = _mm256_set1_ps(kvq__p8_unit(qmax));
    const __m256 flo = _mm256_loadu_ps(kvq__p8_frac), fhi = _mm256_loadu_ps(kvq__p8_frac + 8);
    const __m256i z0 = _mm256_set1_epi32(Z0), fifteen = _mm256_set1_epi32(15), e127 = _mm256_set1_epi32(127);
    for (int i = 0; i < n; i += 8) {
        __m256i kk = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)(k + i)));
        __m256i zz = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)(z + i)));
        __m256i lo = _mm256_and_si256(kk, fifteen);
        __m256 f = _mm256_blendv_ps(_mm256_permutevar8x32_ps(flo, lo), _mm256_permutevar8x32_ps(fhi, lo),
                                    _mm256_castsi256_ps(_mm256_slli_epi32(lo, 28))); /* bit 3 of k % 16 */
        __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(e127, _mm256_srli_epi32(kk, 4)), 23));
        __m128i s16 = _mm256_cvtps_ph(_mm256_mul_ps(_mm256_mul_ps(b, f), p2), _MM_FROUND_TO_NEAREST_INT);
        __m256 sc = _mm256_cvtph_ps(s16);
        __m256 mn = _mm256_mul_ps(_mm256_mul_ps(sc, _mm256_cvtepi32_ps(_mm256_sub_epi32(zz, z0))), unit);
        __m128i m16 = _mm256_cvtps_ph(mn, _MM_FROUND_TO_NEAREST_INT);
        if (os == 1) {
            _mm_storeu_si128((__m128i *)(void *)(s_out + i), s16);
            _mm_storeu_si128((__m128i *)(void *)(m_out + i), m16);
        } else { /* interleaved pairs (values): m_out == s_out + 1; one 32-byte store */
            __m256i pr = _mm256_set_m128i(_mm_unpackhi_epi16(s16, m16), _mm_unpacklo_epi16(s16, m16));
            _mm256_storeu_si256((__m256i *)(void *)(s_out + 2 * (size_t)i), pr);
        }
    }
}

/* 8-bit window rows: int8 -> fp32 (exact), one fp32 product, F16C's round to nearest even = kvq__f32_to_f16 */
static void w8_expand_avx2(const int8_t *q, uint16_t scale, int n, uint16_t *out) {
    const __m256 s = _mm256_set1_ps(_cvtsh_ss(scale));
    for (int i = 0; i < n; i += 8) {
        __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)(q + i))));
        _mm_storeu_si128((__m128i *)(void *)(out + i), _mm256_cvtps_ph(_mm256_mul_ps(x, s), _MM_FROUND_TO_NEAREST_INT));
    }
}

static const kvq__kernels avx2 = {"avx2", decode_avx2, dots_avx2, axpys_avx2, exp_sum_avx2, max_avx2, scale_avx2,
                                  key_scores_avx2, value_accum_avx2, rope_avx2, unrot_rope_avx2, p8_expand_avx2,
                                  w8_expand_avx2};

const kvq__kernels *kvq__kernels_avx2(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &avx2;
    return NULL;
}

const kvq__kernels *kvq__kernels_avx2_table(void) { return &avx2; }
#else
const kvq__kernels *kvq__kernels_avx2(void) { return NULL; }
const kvq__kernels *kvq__kernels_avx2_table(void) { return NULL; }
#endif

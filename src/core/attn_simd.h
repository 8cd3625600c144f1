/* Width-independent parts of the SIMD attention kernels, shared by attn_avx2.c and attn_avx512.c: the
 * prefetch cursor, the type/row dispatch, the horizontal sums of 8-lane vectors, the int16 rounding of
 * queries and softmax weights, the 8-bit weights of the Q4/Q2/Q3 value kernels and the last steps of the integer
 * key scores. Included only by files compiled with at least AVX2 + FMA + F16C; every function is static (each
 * file gets its own copy, built with its own flags). */
#ifndef KVQ_ATTN_SIMD_H
#define KVQ_ATTN_SIMD_H

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "attn_simd.h needs AVX2, FMA and F16C"
#endif

#include "attn.h"

#include <immintrin.h>

#define AI static inline __attribute__((always_inline))
/* a plain static function that a file may leave unused */
#define SIMD_FN static __attribute__((unused))

/* sum of the 8 lanes */
static inline float hsum_ps(__m256 a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_hadd_ps(h, h);
    return _mm_cvtss_f32(_mm_hadd_ps(h, h));
}

/* 8 horizontal sums at once: returns (sum a0, sum a1, ..., sum a7) */
static inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                           __m256 a7) {
    __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3);
    __m256 b2 = _mm256_hadd_ps(a4, a5), b3 = _mm256_hadd_ps(a6, a7);
    __m256 c0 = _mm256_hadd_ps(b0, b1), c1 = _mm256_hadd_ps(b2, b3);
    /* c0 = [a0 a1 a2 a3 | a0 a1 a2 a3] lane halves; c1 same for a4..a7 */
    __m256 lo = _mm256_permute2f128_ps(c0, c1, 0x20), hi = _mm256_permute2f128_ps(c0, c1, 0x31);
    return _mm256_add_ps(lo, hi);
}

/* the lane-wise max of 8 vectors, as a tree */
static inline __m256 max8_ps(const __m256 *v) {
    __m256 a = _mm256_max_ps(v[0], v[1]), b = _mm256_max_ps(v[2], v[3]);
    __m256 c = _mm256_max_ps(v[4], v[5]), d = _mm256_max_ps(v[6], v[7]);
    return _mm256_max_ps(_mm256_max_ps(a, b), _mm256_max_ps(c, d));
}

static inline float hmax_ps(__m256 a) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}

/* Prefetch of the key and value blocks the driver reads next (kvq__blk.pf_k, pf_v), spread by the key kernels
 * over their 8-token steps: a few lines at a time never fill the miss buffers, which a whole block's burst
 * did, stalling the loads of the work behind the prefetches. (n + 7) / 8 steps of `per` lines of each block.
 */
typedef struct pfcur {
    const char *k, *v;
    int per;
} pfcur;

AI pfcur pf_start(const kvq__blk *b, int n) {
    pfcur p = {(const char *)b->pf_k, (const char *)b->pf_v, 0};
    if (p.k) {
        int steps = (n + 7) / 8, l = b->pf_k_lines > b->pf_v_lines ? b->pf_k_lines : b->pf_v_lines;
        p.per = (l + steps - 1) / steps;
    }
    return p;
}

/* one step; lines past a block's end are harmless (a prefetch never faults) */
AI void pf_step(pfcur *p) {
    for (int l = 0; l < p->per; l += 2, p->k += 128, p->v += 128) {
        _mm_prefetch(p->k, _MM_HINT_T0), _mm_prefetch(p->k + 64, _MM_HINT_T0);
        _mm_prefetch(p->v, _MM_HINT_T0), _mm_prefetch(p->v + 64, _MM_HINT_T0);
    }
}

/* per-token multiplier of a per-token type's raw row */
AI float tok_scale(const kvq_type T, const kvq__blk *b, int j) {
    return T == KVQ_TYPE_Q8 || T == KVQ_TYPE_FP8 ? _cvtsh_ss(b->par[j]) : 1.0f;
}

/* Weights of the fp32 value kernels: coef[g][r][i], the weight of token i's raw row in channel group g (g = 0
 * for the per-token types); minacc[r][g]: sum of p * min (grouped types) */
AI void value_coefs(const kvq_type T, const int R, const kvq__blk *b, int j0, int n, const float *p, int ps,
                    float (*coef)[KVQ_FUSED_ROWS][64], float (*minacc)[16]) {
    const bool grouped = T == KVQ_TYPE_Q4 || T == KVQ_TYPE_Q2;
    const int ng = grouped ? b->D / b->Gv : 1;
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
}

/* Rounds R rows of D floats (x, or x * mul when mul is given; row stride D) to int16, order kept; per-row
 * scales out */
SIMD_FN void quantize_rows16(const float *x, const float *mul, int R, int D, int16_t *dst, float *scale) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
#if defined(__AVX512F__) && defined(__AVX512BW__)
    /* the AVX-512 table's: 16 lanes, the same products, maximum (exact in any order) and roundings as the 8-lane
     * form below, so the same int16 as the AVX2 table's (test_attn, key_scores_tables). It runs once per key group
     * and head (64 tokens): with key_group_query_in, about a third of Q4's key kernel at 32k in its 8-lane form. */
    if (D % 32 == 0) {
        const __m512i order = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7); /* undoes the packs' lane interleave */
        for (int r = 0; r < R; r++) {
            const float *xr = x + (size_t)r * D;
            __m512 mx = _mm512_setzero_ps(), mx2 = _mm512_setzero_ps();
            for (int c = 0; c < D; c += 32) {
                __m512 v = _mm512_loadu_ps(xr + c), v2 = _mm512_loadu_ps(xr + c + 16);
                if (mul)
                    v = _mm512_mul_ps(v, _mm512_loadu_ps(mul + c)), v2 = _mm512_mul_ps(v2, _mm512_loadu_ps(mul + c + 16));
                mx = _mm512_max_ps(mx, _mm512_abs_ps(v)), mx2 = _mm512_max_ps(mx2, _mm512_abs_ps(v2));
            }
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(mx, mx2)), sc = amax > 0 ? amax / 32767.0f : 1.0f;
            scale[r] = sc;
            const __m512 inv = _mm512_set1_ps(1.0f / sc);
            for (int c = 0; c < D; c += 32) {
                __m512 a = _mm512_loadu_ps(xr + c), bb = _mm512_loadu_ps(xr + c + 16);
                if (mul) a = _mm512_mul_ps(a, _mm512_loadu_ps(mul + c)), bb = _mm512_mul_ps(bb, _mm512_loadu_ps(mul + c + 16));
                __m512i v = _mm512_packs_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(a, inv)),
                                               _mm512_cvtps_epi32(_mm512_mul_ps(bb, inv)));
                _mm512_storeu_si512((void *)(dst + (size_t)r * D + c), _mm512_permutexvar_epi64(order, v));
            }
        }
        return;
    }
#endif
    for (int r = 0; r < R; r++) {
        const float *xr = x + (size_t)r * D;
        /* two chains of maxima (the same maximum: a max is exact in any order) */
        __m256 mx = _mm256_setzero_ps(), mx2 = _mm256_setzero_ps();
        int c = 0;
        for (; c + 16 <= D; c += 16) {
            __m256 v = _mm256_loadu_ps(xr + c), v2 = _mm256_loadu_ps(xr + c + 8);
            if (mul) v = _mm256_mul_ps(v, _mm256_loadu_ps(mul + c)), v2 = _mm256_mul_ps(v2, _mm256_loadu_ps(mul + c + 8));
            mx = _mm256_max_ps(mx, _mm256_and_ps(absmask, v)), mx2 = _mm256_max_ps(mx2, _mm256_and_ps(absmask, v2));
        }
        for (; c < D; c += 8) {
            __m256 v = _mm256_loadu_ps(xr + c);
            if (mul) v = _mm256_mul_ps(v, _mm256_loadu_ps(mul + c));
            mx = _mm256_max_ps(mx, _mm256_and_ps(absmask, v));
        }
        float amax = hmax_ps(_mm256_max_ps(mx, mx2)), sc = amax > 0 ? amax / 32767.0f : 1.0f;
        scale[r] = sc;
        for (int c = 0; c < D; c += 16) {
            __m256 a = _mm256_loadu_ps(xr + c), bb = _mm256_loadu_ps(xr + c + 8);
            __m256 inv = _mm256_set1_ps(1.0f / sc);
            if (mul)
                a = _mm256_mul_ps(a, _mm256_loadu_ps(mul + c)),
                bb = _mm256_mul_ps(bb, _mm256_loadu_ps(mul + c + 8));
            __m256i v = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(a, inv)),
                                           _mm256_cvtps_epi32(_mm256_mul_ps(bb, inv)));
            _mm256_store_si256((__m256i *)(void *)(dst + (size_t)r * D + c),
                               _mm256_permute4x64_epi64(v, 0xD8));
        }
    }
}

/* A new key group of a grouped type: q' = q * scale rounded to int16 (in the kernel order that `order` makes)
 * and qm = q . min */
AI void key_group_query_in(kvq_type T, int R, int D, const uint16_t *sm, const float *q, kvq__qstate *st,
                           void (*order)(kvq_type, const float *, float *, int)) {
    float sc[256] __attribute__((aligned(64))), scp[256] __attribute__((aligned(64)));
    int c0 = 0;
#if defined(__AVX512F__)
    /* stored as the AVX-512 order() loads them, 64 bytes at a time: a 64-byte load of two 32-byte stores is not
     * forwarded and waits for them to retire (perf: the hottest instruction of Q2's key kernel at 32k) */
    for (; c0 + 16 <= D; c0 += 16)
        _mm512_store_ps(sc + c0, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(sm + c0))));
#endif
    for (int c = c0; c < D; c += 8)
        _mm256_store_ps(sc + c, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(sm + c))));
    order(T, sc, scp, D);
    /* the mins converted once for all rows, and the rows' chains side by side (a row alone was a chain of D / 8
     * dependent FMAs); each row's sum in its old order. R <= 4: the query state holds 4 rows. */
    __m256 am[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int c = 0; c < D; c += 8) {
        const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(sm + D + c)));
        #pragma GCC unroll 4
        for (int r = 0; r < (R < 4 ? R : 4); r++) am[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (size_t)r * D + c), mn, am[r]);
    }
    #pragma GCC unroll 4
    for (int r = 0; r < (R < 4 ? R : 4); r++) st->qm[r] = hsum_ps(am[r]);
    quantize_rows16(st->qg, scp, R, D, st->q16, st->qs);
}

/* The next segment of the integer key kernels, from token j with `left` tokens to go: enters token j's key group
 * when it changes (q' and q . min for that group, once per group; Q3's levels are in 1/16 steps) and returns how
 * many tokens (<= 8) of that group come next. Q8 has no groups: min(left, 8). */
AI int key_segment(const kvq_type T, int R, int D, const kvq__blk *b, int j, int left, const float *q,
                   kvq__qstate *st, void (*order)(kvq_type, const float *, float *, int)) {
    const bool grouped = T != KVQ_TYPE_Q8;
    /* (no divisions per 8 tokens: the group's rows are [G * group, G * group + G)) */
    if (grouped && (st->par != b->par || j < st->group * b->G || j >= (st->group + 1) * b->G)) {
        key_group_query_in(T, R, D, b->par + (size_t)(j / b->G) * 2 * D, q, st, order);
        if (T == KVQ_TYPE_Q3)
            for (int r = 0; r < R; r++) st->qs[r] *= 0.0625f;
        st->par = b->par, st->group = j / b->G;
    }
    int m = left < 8 ? left : 8;
    if (grouped && j + m > (st->group + 1) * b->G) m = (st->group + 1) * b->G - j;
    return m;
}

/* Last step of the integer key scores of m <= 8 tokens from row j: part[t] holds token t's R (<= 4) int32 row
 * sums, each split over the two 128-bit halves: (r0 r1 r2 r3 | r0 r1 r2 r3) (rows from R on 0); part[m..8) is
 * set here. s[r * ss + t] = sum * token scale * query scale (+ q . min for the grouped types). */
AI void int_scores_store(const kvq_type T, const int R, const kvq__blk *b, int j, int m, __m256i *part,
                         const kvq__qstate *st, float *s, int ss) {
    const bool grouped = T != KVQ_TYPE_Q8;
    for (int t = m; t < 8; t++) part[t] = _mm256_setzero_si256();
    __m256 ts;
    if (grouped)
        ts = _mm256_set1_ps(1.0f);
    else if (m == 8)
        ts = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(b->par + j)));
    else {
        uint16_t h[8] = {0};
        memcpy(h, b->par + j, (size_t)m * 2);
        ts = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)h));
    }
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(m), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    /* tokens t and t + 4 side by side, halves added: (t: r0 r1 r2 r3 | t + 4: r0 r1 r2 r3); then a 4 x 4
     * transpose in each half gives row r's 8 sums in token order */
    __m256i pt[4], sum[4];
    #pragma GCC unroll 4
    for (int t = 0; t < 4; t++)
        pt[t] = _mm256_add_epi32(_mm256_permute2x128_si256(part[t], part[t + 4], 0x20),
                                 _mm256_permute2x128_si256(part[t], part[t + 4], 0x31));
    {
        __m256i u0 = _mm256_unpacklo_epi32(pt[0], pt[1]), u1 = _mm256_unpackhi_epi32(pt[0], pt[1]);
        __m256i u2 = _mm256_unpacklo_epi32(pt[2], pt[3]), u3 = _mm256_unpackhi_epi32(pt[2], pt[3]);
        sum[0] = _mm256_unpacklo_epi64(u0, u2), sum[1] = _mm256_unpackhi_epi64(u0, u2);
        sum[2] = _mm256_unpacklo_epi64(u1, u3), sum[3] = _mm256_unpackhi_epi64(u1, u3);
    }
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        __m256 sc = _mm256_mul_ps(_mm256_cvtepi32_ps(sum[r]), _mm256_mul_ps(ts, _mm256_set1_ps(st->qs[r])));
        if (grouped) sc = _mm256_add_ps(sc, _mm256_set1_ps(st->qm[r]));
        if (m == 8)
            _mm256_storeu_ps(s + (size_t)r * ss, sc);
        else
            _mm256_maskstore_ps(s + (size_t)r * ss, keep, sc);
    }
}

/* ---- integer value kernels ----
 * Q8: acc[r][c] += sum_i (p_ri * s_i) * q_ic with the weights rounded to int16 (one scale per row and
 * segment) and the codes of tokens i, i+1 interleaved as int16 pairs, so that one vpmaddwd does both tokens
 * of 8 channels. Q4, Q2: the weights w = p * scale of a segment are rounded to 8 bits (one scale per row, value
 * group and segment: error <= 1/510 of the largest weight rounded, at most 1/255 of the second largest; a largest
 * weight more than twice the second, which a sink makes dominant, is left out and added exactly in fp32 by
 * top_fixup, so the others are rounded against the second) and meet byte-interleaved code
 * pairs in vpmaddubsw (16 channels x 2 tokens per instruction), summed in 16-bit lanes read as unsigned: a
 * lane's sum is at most (2^b - 1) * (sum of the 8-bit weights), so the sums can run over the whole segment
 * when the weights' total keeps that under 2^16 (always for Q2; for Q4 unless the weights are flat), else
 * over windows of whole 16-token parts (16 tokens always fit: 15 * 16 * 255 < 2^16). The rounding of the
 * weights meets only the centered codes q - o, o = 2^(b-1): x = s * (q - o) + (m + o * s), whose second part
 * is summed in fp32 with the exact weights; o times the 8-bit weights' sum, which the sums of w8 * q hold in
 * excess, is taken off that fp32 term. */

#define VW_PAD (64 + 32)
/* [group][row]: the scalars of the 8-bit value weights (value_weights8) */
typedef struct vwparams {
    float ws[4][4], mn[4][4]; /* weight scale, sum of p * (min + o s) - ws * o * sum of w8 */
    /* the largest weight's token (-1: none) and its weight p * s, kept exact (its w8 is 0) */
    int top[4][4];
    float topw[4][4];
    int nwin, win[5];         /* 16-bit sums run over tokens win[k] .. win[k + 1] */
} vwparams;

typedef struct vweights {
    /* [group][row][token pair]: the pair's two 8-bit weights twice, so that a 32-bit broadcast (a plain load,
     * no shuffle) spreads them; zero from n on */
    uint32_t w8[4][4][VW_PAD / 2] __attribute__((aligned(32)));
    vwparams s;
} vweights;

/* scale[g][i] and (min + off * scale)[g][i] as fp32 for the n tokens from j0, zero from n to 64 */
SIMD_FN void value_params(const kvq__blk *b, int j0, int n, int ng, float off, float (*S)[64],
                          float (*M)[64]) {
    const uint16_t *par = b->par + (size_t)j0 * ng * 2;
    int i = 0;
    if (ng == 2) /* D = 128: a token's params are (s0, m0, s1, m1); 8 tokens are 64 bytes */
        for (; i + 8 <= n; i += 8) {
            const __m256i sh = _mm256_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15, 0, 1, 8,
                                                9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15);
            const __m256i pd = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            /* per 128-bit lane (2 tokens): s0 s0' m0 m0' s1 s1' m1 m1', then 4 tokens per 64 bits */
            __m256i a = _mm256_permutevar8x32_epi32(
                _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)(const void *)(par + 4 * i)), sh),
                pd);
            __m256i c = _mm256_permutevar8x32_epi32(
                _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)(const void *)(par + 4 * i + 16)),
                                    sh),
                pd);
            __m256i s01 = _mm256_unpacklo_epi64(a, c),
                    m01 = _mm256_unpackhi_epi64(a, c); /* group 0 | group 1 */
            __m256 s0 = _mm256_cvtph_ps(_mm256_castsi256_si128(s01)),
                   s1 = _mm256_cvtph_ps(_mm256_extracti128_si256(s01, 1));
            __m256 m0 = _mm256_cvtph_ps(_mm256_castsi256_si128(m01)),
                   m1 = _mm256_cvtph_ps(_mm256_extracti128_si256(m01, 1));
            __m256 o = _mm256_set1_ps(off);
            _mm256_store_ps(S[0] + i, s0), _mm256_store_ps(S[1] + i, s1);
            _mm256_store_ps(M[0] + i, _mm256_fmadd_ps(o, s0, m0)),
                _mm256_store_ps(M[1] + i, _mm256_fmadd_ps(o, s1, m1));
        }
    for (; i < 64; i++)
        for (int g = 0; g < ng; g++) {
            float s = i < n ? _cvtsh_ss(par[(size_t)i * ng * 2 + 2 * g]) : 0.0f;
            float m = i < n ? _cvtsh_ss(par[(size_t)i * ng * 2 + 2 * g + 1]) : 0.0f;
            S[g][i] = s, M[g][i] = m + off * s;
        }
}

/* p of row r, tokens 0..n8, zero from n on (the driver leaves what follows n undefined) */
AI __m256 load_p(const float *pr, int i, int n) {
    if (i + 8 <= n) return _mm256_loadu_ps(pr + i);
    __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - i), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_maskload_ps(pr + i, keep);
}

/* windows of whole 16-token parts, as long as qmax * (sum of weights) stays under 2^16 in every row; m16[k]: the
 * largest sum of the 8-bit weights of tokens 16k .. 16k + 15 over the rows and groups */
AI void value_windows(const int qmax, int n, const int *m16, vwparams *vw) {
    int sum = 0;
    vw->nwin = 0, vw->win[0] = 0;
    for (int k = 0; 16 * k < n; k++) {
        if (k > 0 && (sum + m16[k]) * qmax > 65535) vw->win[++vw->nwin] = 16 * k, sum = 0;
        sum += m16[k];
    }
    vw->win[++vw->nwin] = n;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
/* lane r (all four floats) = the largest of the 16 floats of m[r], r < 4: both halves, then the lanes, then
 * within the lanes, four rows in each step */
AI __m512 rowmax4(const __m512 *m) {
    const __m512 t01 = _mm512_max_ps(_mm512_shuffle_f32x4(m[0], m[1], 0x44), _mm512_shuffle_f32x4(m[0], m[1], 0xEE));
    const __m512 t23 = _mm512_max_ps(_mm512_shuffle_f32x4(m[2], m[3], 0x44), _mm512_shuffle_f32x4(m[2], m[3], 0xEE));
    __m512 u = _mm512_max_ps(_mm512_shuffle_f32x4(t01, t23, 0x88), _mm512_shuffle_f32x4(t01, t23, 0xDD));
    u = _mm512_max_ps(u, _mm512_permute_ps(u, 0x4E));
    return _mm512_max_ps(u, _mm512_permute_ps(u, 0xB1));
}

/* lane r of x in all four lanes (a switch: the immediate must be a constant in every build, -O0 and clang too) */
AI __m512 bcast_lane(__m512 x, const int r) {
    switch (r) {
    case 0: return _mm512_shuffle_f32x4(x, x, 0x00);
    case 1: return _mm512_shuffle_f32x4(x, x, 0x55);
    case 2: return _mm512_shuffle_f32x4(x, x, 0xAA);
    default: return _mm512_shuffle_f32x4(x, x, 0xFF);
    }
}

/* value_weights8's loop in the AVX-512 table: the products, maxima, comparisons and roundings on 16 lanes, each
 * value as the 8-lane form makes it (a maximum and a comparison are exact, each weight is rounded alone, the sums
 * of 8-bit weights are integers); the sums p . M keep the 8-lane form's order, so every output has the same bits
 * (test_attn, value_accum_tables). The 8-lane form was about a sixth of Q4's decode step at 32k. Returns 1. */
AI int value_weights8_zmm(const kvq_type T, const int R, const int ng, int n, const float *p, int ps,
                          float (*S)[64], float (*M)[64], uint32_t *w8, vwparams *vw) {
    const bool Q3 = T == KVQ_TYPE_Q3;
    const int wrow = Q3 ? 16 : VW_PAD / 2;
    const int qmax = T == KVQ_TYPE_Q4 ? 15 : Q3 ? 7 : 3, off = (qmax + 1) / 2;
    /* packus leaves dword 4L + k holding tokens 16k + 4L .. + 3: back to token order */
    const __m512i tok = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    /* words of the pair layout: word 2k and 2k + 1 are pair k's (tokens 2k, 2k + 1) */
    const __m512i dup0 = _mm512_set_epi16(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8, 7, 7, 6, 6,
                                          5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i dup1 = _mm512_add_epi16(dup0, _mm512_set1_epi16(16));
    __m512i most = _mm512_setzero_si512(); /* qword 2k: the largest sum of the weights of tokens 16k .. 16k + 15 */
    for (int g = 0; g < ng; g++) {
        /* the rows side by side: their maxima reduced together (rowmax4), and no chain waits for another row's */
        __m512 wv[4][4], mr[4];
        __m256 ma[4];
        #pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            ma[r] = _mm256_setzero_ps();
            #pragma GCC unroll 4
            for (int i = 0; i < 64; i += 16) {
                if (r >= R) {
                    wv[r][i / 16] = _mm512_setzero_ps();
                    continue;
                }
                const float *pr = p + (size_t)r * ps;
                const __mmask16 keep = i + 16 <= n ? (__mmask16)0xFFFF : i >= n ? 0 : (__mmask16)((1u << (n - i)) - 1u);
                const __m512 pv = _mm512_maskz_loadu_ps(keep, pr + i);
                wv[r][i / 16] = _mm512_mul_ps(pv, _mm512_load_ps(S[g] + i));
                ma[r] = _mm256_fmadd_ps(_mm512_castps512_ps256(pv), _mm256_load_ps(M[g] + i), ma[r]);
                ma[r] = _mm256_fmadd_ps(_mm512_extractf32x8_ps(pv, 1), _mm256_load_ps(M[g] + i + 8), ma[r]);
            }
            mr[r] = _mm512_max_ps(_mm512_max_ps(wv[r][0], wv[r][1]), _mm512_max_ps(wv[r][2], wv[r][3]));
        }
        /* the largest of each row, and the largest of the others (lanes not equal to it), as value_weights8 finds
         * them (a maximum is exact in any order) */
        const __m512 am4 = rowmax4(mr);
        #pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const __m512 am = bcast_lane(am4, r);
            __m512 o[4];
            #pragma GCC unroll 4
            for (int k = 0; k < 4; k++) o[k] = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(wv[r][k], am, _CMP_NEQ_UQ), wv[r][k]);
            mr[r] = _mm512_max_ps(_mm512_max_ps(o[0], o[1]), _mm512_max_ps(o[2], o[3]));
        }
        const __m512 se4 = rowmax4(mr);
        float amx[16] __attribute__((aligned(64))), sec[16] __attribute__((aligned(64)));
        _mm512_store_ps(amx, am4), _mm512_store_ps(sec, se4);
        #pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            float amax = amx[4 * r];
            const float topw = amax;
            int top = -1;
            /* the dominant largest: alone, and more than twice the second (a tie is not) */
            if (amax > 0 && amax > 2.0f * sec[4 * r]) {
                const __m512 am = _mm512_set1_ps(amax);
                uint64_t hit = 0;
                #pragma GCC unroll 4
                for (int k = 0; k < 4; k++) hit |= (uint64_t)_mm512_cmp_ps_mask(wv[r][k], am, _CMP_EQ_OQ) << (16 * k);
                if (hit && !(hit & (hit - 1))) top = __builtin_ctzll(hit), amax = sec[4 * r];
            }
            vw->top[g][r] = top, vw->topw[g][r] = topw;
            const float sc = amax > 0 ? amax / 255.0f : 1.0f, inv = amax > 0 ? 255.0f / amax : 0.0f;
            const __m512 iv = _mm512_set1_ps(inv);
            __m512i a[4];
            #pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                /* the dominant token's weight is 0 (top_fixup adds it exactly) */
                const __mmask16 m = (top >> 4) == k ? (__mmask16) ~(1u << (top & 15)) : (__mmask16)0xFFFF;
                a[k] = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_mov_ps(m, wv[r][k]), iv));
            }
            __m512i v = _mm512_packus_epi16(_mm512_packus_epi32(a[0], a[1]), _mm512_packus_epi32(a[2], a[3]));
            v = _mm512_permutexvar_epi32(tok, v); /* the 64 weights in token order */
            uint32_t *dst = w8 + (size_t)(g * 4 + r) * wrow;
            if (Q3) {
                _mm512_storeu_si512((void *)dst, v);
                vw->ws[g][r] = sc * 0.125f, vw->mn[g][r] = hsum_ps(ma[r]);
                continue;
            }
            _mm512_storeu_si512((void *)dst, _mm512_permutexvar_epi16(dup0, v));
            _mm512_storeu_si512((void *)(dst + 16), _mm512_permutexvar_epi16(dup1, v));
            const __m512i sad = _mm512_sad_epu8(v, _mm512_setzero_si512()); /* qword q: tokens 8q .. 8q + 7 */
            most = _mm512_max_epi64(most, _mm512_add_epi64(sad, _mm512_bsrli_epi128(sad, 8)));
            const int wtot = (int)_mm512_reduce_add_epi64(sad);
            vw->ws[g][r] = sc, vw->mn[g][r] = hsum_ps(ma[r]) - sc * (float)(off * wtot);
        }
    }
    if (Q3) return 1;
    int64_t mq[8];
    _mm512_storeu_si512((void *)mq, most);
    const int m16[4] = {(int)mq[0], (int)mq[2], (int)mq[4], (int)mq[6]};
    value_windows(qmax, n, m16, vw);
    return 1;
}
#endif

/* The 8-bit value weights of the n tokens from row j0 per (value group, row), a dominant largest kept exact, into
 * w8 (rows of VW_PAD / 2 dwords, vweights) and vw: for the Q4/Q2 kernels (T = Q4, Q2: token pairs, 16-token windows)
 * and Q3's (T = Q3: rows of 16 dwords, q3w8; token quads, level offset 4, int32 sums so no windows). T is a
 * compile-time constant, so each gets only its own layout's code. */
AI void value_weights8(const kvq_type T, const int R, const kvq__blk *b, int j0, int n, const float *p, int ps,
                       uint32_t *w8, vwparams *vw) {
    const bool Q3 = T == KVQ_TYPE_Q3;
    const int wrow = Q3 ? 16 : VW_PAD / 2; /* dwords per (group, row) */
    const int D = b->D, ng = D / b->Gv;
    const int qmax = T == KVQ_TYPE_Q4 ? 15 : Q3 ? 7 : 3, off = (qmax + 1) / 2;
    float S[4][64] __attribute__((aligned(64))), M[4][64] __attribute__((aligned(64)));
    value_params(b, j0, n, ng, (float)off, S, M);
    /* 64 tokens whatever n: p, S and M are 0 past n */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
    if (value_weights8_zmm(T, R, ng, n, p, ps, S, M, w8, vw)) return;
#endif
    __m256i most[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()}; /* the largest sums of 16 weights */
    for (int g = 0; g < ng; g++)
        #pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const float *pr = p + (size_t)r * ps;
            float wf[64] __attribute__((aligned(32)));
            __m256 ma = _mm256_setzero_ps(), wv[8];
            #pragma GCC unroll 8
            for (int i = 0; i < 64; i += 8) {
                /* p is 0 from n on, so w8[n], which the last pair of an odd n reads, is 0 */
                __m256 pv = load_p(pr, i, n);
                wv[i / 8] = _mm256_mul_ps(pv, _mm256_load_ps(S[g] + i));
                _mm256_store_ps(wf + i, wv[i / 8]);
                ma = _mm256_fmadd_ps(pv, _mm256_load_ps(M[g] + i), ma);
            }
            /* maxima as trees, not chains (exact either way; the chains' latency was most of this function's) */
            __m256 mx = max8_ps(wv);
            /* A dominant largest weight (more than twice the second: a sink, one logit far above the others) is
             * left out of the 8-bit ones and added exactly (top_fixup): it would otherwise set the scale alone and
             * leave the rest of the segment's weights one or two steps of 8 bits (NMSE 5.7e-5 q4, 1e-4 q2 against
             * exact arithmetic with one such token; < 1e-6 without it). A largest weight at most twice the second
             * stays among the 8-bit ones: the others' steps at most double, and the segment keeps the windows and
             * the cost of the kernel without a fixup (doing it for every segment took ~34 of Q4's ~300
             * instructions per token and KV head at D = 128, the more windows included: kvq-bench, callgrind). */
            float amax = hmax_ps(mx), topw = amax;
            int top = -1;
            if (amax > 0) {
                /* without branches on the data (a search that stopped at the first match, and the largest zeroed,
                 * looked for again and restored, mispredicted every segment: 0.9 ms of a q4 step's 8.1 at 32k, one
                 * thread) and with short dependency chains: the lanes equal to the largest, and the largest of the
                 * others; the largest is dominant only if it is alone and more than twice that (a tie is not) */
                const __m256 am = _mm256_set1_ps(amax);
                __m256 eq[8], o[8];
                #pragma GCC unroll 8
                for (int i = 0; i < 8; i++) {
                    eq[i] = _mm256_cmp_ps(wv[i], am, _CMP_EQ_OQ);
                    o[i] = _mm256_andnot_ps(eq[i], wv[i]);
                }
                const float second = hmax_ps(max8_ps(o));
                /* dominant (one lane, kept exact): rare, so a predictable branch; the lanes equal to the largest
                 * are counted only for such a candidate (their masks were ~20% of this loop's operations) */
                if (amax > 2.0f * second) {
                    uint64_t hm[8];
                    #pragma GCC unroll 8
                    for (int i = 0; i < 8; i++) hm[i] = (uint64_t)(unsigned)_mm256_movemask_ps(eq[i]) << (8 * i);
                    const uint64_t hit = ((hm[0] | hm[1]) | (hm[2] | hm[3])) | ((hm[4] | hm[5]) | (hm[6] | hm[7]));
                    if (hit && !(hit & (hit - 1))) top = __builtin_ctzll(hit), wf[top] = 0.0f, amax = second;
                }
            }
            vw->top[g][r] = top, vw->topw[g][r] = topw;
            float sc = amax > 0 ? amax / 255.0f : 1.0f, inv = amax > 0 ? 255.0f / amax : 0.0f;
            __m256 iv = _mm256_set1_ps(inv);
            __m256i wsum = _mm256_setzero_si256();
            #pragma GCC unroll 2
            for (int i = 0; i < 64; i += 32) {
                __m256i a[4];
                #pragma GCC unroll 4
                for (int k = 0; k < 4; k++)
                    a[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(wf + i + 8 * k), iv));
                __m256i v =
                    _mm256_packus_epi16(_mm256_packus_epi32(a[0], a[1]), _mm256_packus_epi32(a[2], a[3]));
                v = _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)); /* token order */
                if (Q3) { /* quads as they are */
                    _mm256_store_si256((__m256i *)(void *)(w8 + (g * 4 + r) * wrow + i / 4), v);
                    continue;
                }
                __m256i lo = _mm256_unpacklo_epi16(v, v),
                        hi = _mm256_unpackhi_epi16(v, v); /* pairs 0-3 | 8-11, 4-7 | 12-15 */
                _mm256_store_si256((__m256i *)(void *)(w8 + (g * 4 + r) * wrow + i / 2),
                                   _mm256_permute2x128_si256(lo, hi, 0x20));
                _mm256_store_si256((__m256i *)(void *)(w8 + (g * 4 + r) * wrow + i / 2 + 8),
                                   _mm256_permute2x128_si256(lo, hi, 0x31));
                /* sums of 16 weights in dwords 0 and 4 */
                __m256i sad = _mm256_sad_epu8(v, _mm256_setzero_si256());
                sad = _mm256_add_epi64(sad, _mm256_shuffle_epi32(sad, 0x4E));
                most[i / 32] = _mm256_max_epi32(most[i / 32], sad);
                wsum = _mm256_add_epi32(wsum, sad);
            }
            if (Q3) {
                vw->ws[g][r] = sc * 0.125f, vw->mn[g][r] = hsum_ps(ma);
                continue;
            }
            int wtot = _mm256_extract_epi32(wsum, 0) + _mm256_extract_epi32(wsum, 4);
            vw->ws[g][r] = sc, vw->mn[g][r] = hsum_ps(ma) - sc * (float)(off * wtot);
        }
    if (Q3) return;
    const int m16[4] = {_mm256_extract_epi32(most[0], 0), _mm256_extract_epi32(most[0], 4),
                        _mm256_extract_epi32(most[1], 0), _mm256_extract_epi32(most[1], 4)};
    value_windows(qmax, n, m16, vw);
}

/* codes of channels c .. c + 7 of a Q4 or Q2 row, as int32 lanes */
AI __m256i codes8(const kvq_type T, const uint8_t *row, int c) {
    if (T == KVQ_TYPE_Q4) {
        uint32_t word;
        memcpy(&word, row + c / 2, 4);
        return _mm256_and_si256(
            _mm256_srlv_epi32(_mm256_set1_epi32((int)word), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
            _mm256_set1_epi32(15));
    }
    uint16_t word;
    memcpy(&word, row + c / 4, 2);
    return _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32(word), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
        _mm256_set1_epi32(3));
}

/* table[q] for int32 codes q of a table of 16 (Q4: lo = entries 0-7, hi = 8-15) or 4 (Q2: lo) floats */
AI __m256 lut8(const kvq_type T, __m256i q, __m256 lo, __m256 hi) {
    __m256 l = _mm256_permutevar8x32_ps(lo, q);
    if (T == KVQ_TYPE_Q4)
        l = _mm256_blendv_ps(l, _mm256_permutevar8x32_ps(hi, q),
                             _mm256_castsi256_ps(_mm256_cmpgt_epi32(q, _mm256_set1_epi32(7))));
    return l;
}

/* acc[r][channels of group g] += topw * (level of the code - off) for the token each (group, row) kept exact
 * (value_weights8): 8 channels at a time, the level looked up from a table of floats (lv16 / 16 - off) */
SIMD_FN void top_fixup(const kvq_type T, const int R, const kvq__blk *b, int j0, const vwparams *vw, float *acc) {
    const int D = b->D, ng = D / b->Gv, qmax = T == KVQ_TYPE_Q4 ? 15 : 3;
    bool any = false;
    for (int g = 0; g < ng; g++)
        for (int r = 0; r < R; r++) any |= vw->top[g][r] >= 0;
    if (!any) return; /* the common case: no weight was dominant */
    const float off = (float)((qmax + 1) / 2);
    /* the table built in registers: a vector load of a freshly stored array would wait for the stores (no
     * store forwarding across sizes), on every block */
    float l[16];
    for (int q = 0; q < 16; q++) l[q] = q <= qmax ? (float)b->lv16[q] * 0.0625f - off : 0.0f;
    const __m256 lo = _mm256_setr_ps(l[0], l[1], l[2], l[3], l[4], l[5], l[6], l[7]);
    const __m256 hi = T == KVQ_TYPE_Q4 ? _mm256_setr_ps(l[8], l[9], l[10], l[11], l[12], l[13], l[14], l[15]) : lo;
    for (int g = 0; g < ng; g++)
        for (int r = 0; r < R; r++) {
            const int t = vw->top[g][r];
            if (t < 0) continue;
            const uint8_t *row = b->data + (size_t)(j0 + t) * b->stride;
            const __m256 w = _mm256_set1_ps(vw->topw[g][r]);
            float *o = acc + (size_t)r * D;
            for (int c = g * b->Gv; c < (g + 1) * b->Gv; c += 8)
                _mm256_storeu_ps(o + c, _mm256_fmadd_ps(w, lut8(T, codes8(T, row, c), lo, hi), _mm256_loadu_ps(o + c)));
        }
}

/* ---- non-uniform levels (kvq.h section 10) ----
 * A block whose codes decode through non-uniform levels (b->lv16 not the uniform table) is decoded to fp32 here,
 * levels looked up from a table of floats, and meets the query and the weights in the fp32 kernels (dots,
 * axpys); the integer kernels take uniform blocks only. */
static inline bool nu_blk(const kvq__blk *b) {
    return (b->type == KVQ_TYPE_Q4 || b->type == KVQ_TYPE_Q2) && b->lv16 != kvq__levels16(b->type, false);
}

/* out[i][c] = row j0 + i of a Q4/Q2 block with levels, i < n */
SIMD_FN void decode_levels(const kvq__blk *b, int j0, int n, float *out) {
    const kvq_type T = b->type;
    const int D = b->D, qmax = T == KVQ_TYPE_Q4 ? 15 : 3;
    float lvf[16] __attribute__((aligned(32))) = {0};
    for (int q = 0; q <= qmax; q++) lvf[q] = (float)b->lv16[q] * 0.0625f;
    const __m256 lo = _mm256_load_ps(lvf), hi = _mm256_load_ps(lvf + 8);
    for (int i = 0; i < n; i++) {
        const int j = j0 + i;
        const uint8_t *row = b->data + (size_t)j * b->stride;
        float *o = out + (size_t)i * D;
        if (b->role == KVQ_KEY) {
            const uint16_t *sm = b->par + (size_t)(j / b->G) * 2 * D;
            for (int c = 0; c < D; c += 8) {
                __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(sm + c)));
                __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(sm + D + c)));
                __m256 l = T == KVQ_TYPE_Q4 ? lut8(KVQ_TYPE_Q4, codes8(KVQ_TYPE_Q4, row, c), lo, hi)
                                            : lut8(KVQ_TYPE_Q2, codes8(KVQ_TYPE_Q2, row, c), lo, hi);
                _mm256_storeu_ps(o + c, _mm256_fmadd_ps(s, l, m));
            }
        } else {
            const uint16_t *sm = b->par + (size_t)j * (D / b->Gv) * 2;
            for (int g = 0; g < D / b->Gv; g++) {
                __m256 s = _mm256_set1_ps(_cvtsh_ss(sm[2 * g])), m = _mm256_set1_ps(_cvtsh_ss(sm[2 * g + 1]));
                for (int c = g * b->Gv; c < (g + 1) * b->Gv; c += 8) {
                    __m256 l = T == KVQ_TYPE_Q4 ? lut8(KVQ_TYPE_Q4, codes8(KVQ_TYPE_Q4, row, c), lo, hi)
                                                : lut8(KVQ_TYPE_Q2, codes8(KVQ_TYPE_Q2, row, c), lo, hi);
                    _mm256_storeu_ps(o + c, _mm256_fmadd_ps(s, l, m));
                }
            }
        }
    }
}

typedef void (*dots_fn)(const float *q, int rows, int D, const float *x, int n, float *s, int ss);
typedef void (*axpys_fn)(const float *p, int ps, int rows, int D, const float *x, int n, float *acc);

/* the fused key and value kernels' work for a block with levels: decoded KVQ_TILE rows at a time */
SIMD_FN void key_scores_levels(dots_fn dots, const kvq__blk *b, int j0, int n, const float *q, int rows, float *s,
                               int ss) {
    float x[KVQ_TILE * 256] __attribute__((aligned(64)));
    for (int i = 0; i < n; i += KVQ_TILE) {
        int m = n - i < KVQ_TILE ? n - i : KVQ_TILE;
        decode_levels(b, j0 + i, m, x);
        dots(q, rows, b->D, x, m, s + i, ss);
    }
}

SIMD_FN void value_accum_levels(axpys_fn axpys, const kvq__blk *b, int j0, int n, const float *p, int ps, int rows,
                                float *acc) {
    float x[KVQ_TILE * 256] __attribute__((aligned(64)));
    for (int i = 0; i < n; i += KVQ_TILE) {
        int m = n - i < KVQ_TILE ? n - i : KVQ_TILE;
        decode_levels(b, j0 + i, m, x);
        axpys(p + i, ps, rows, b->D, x, m, acc);
    }
}

/* Q8 value weights: p * s rounded to int16, c16[r][i] (read in (token i, token i + 1) pairs as one int32;
 * c16[r][n] is 0), with one scale cs[r] per row */
AI void q8_weights(const int R, const kvq__blk *b, int j0, int n, const float *p, int ps,
                   int16_t (*c16)[64 + 16], float *cs) {
    const int n8 = (n + 7) & ~7;
    float scl[64 + 8] __attribute__((aligned(32)));
    {
        uint16_t hs[64 + 8] = {0};
        memcpy(hs, b->par + j0, (size_t)n * 2);
        for (int i = 0; i < n8; i += 8)
            _mm256_store_ps(scl + i,
                            _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(hs + i))));
    }
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        const float *pr = p + (size_t)r * ps;
        float cf[64 + 8] __attribute__((aligned(32)));
        __m256 mx = _mm256_setzero_ps();
        for (int i = 0; i < n8; i += 8) {
            __m256 v = _mm256_mul_ps(load_p(pr, i, n), _mm256_load_ps(scl + i));
            _mm256_store_ps(cf + i, v);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v));
        }
        float amax = hmax_ps(mx), sc = amax > 0 ? amax / 32767.0f : 1.0f;
        __m256 inv = _mm256_set1_ps(1.0f / sc);
        cs[r] = sc;
        for (int i = 0; i < n8; i += 16) {
            __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(cf + i), inv));
            __m256i bq = i + 8 < n8 ? _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(cf + i + 8), inv))
                                    : _mm256_setzero_si256();
            _mm256_store_si256((__m256i *)(void *)&c16[r][i],
                               _mm256_permute4x64_epi64(_mm256_packs_epi32(a, bq), 0xD8));
        }
        c16[r][n] = 0;
    }
}

/* Whether an integer kernel takes the block: R <= 4 rows, whole chunks of C channels (the kernel's chunk for
 * the block's type), and for values, weight broadcasts over Cg channels that never straddle a value group,
 * and at most 4 value groups (vweights) */
static inline bool int_fits(const kvq__blk *b, int rows, int C, int Cg) {
    if (rows > 4 || (b->type != KVQ_TYPE_Q8 && b->type != KVQ_TYPE_Q4 && b->type != KVQ_TYPE_Q2))
        return false;
    if (b->D % C) return false;
    return b->type == KVQ_TYPE_Q8 || b->role == KVQ_KEY || (b->Gv % Cg == 0 && b->D / b->Gv <= 4);
}

/* Dispatch to a kernel instantiated for the block's type T and R rows, CALL(T, R): INT_TYPE_SWITCH for Q8,
 * Q4, Q2 and rows 1 to 4, TYPE_SWITCH for the six types and rows 1 to 8, TYPE_SWITCH4 for the six types and
 * rows 1 to 4. */
/* clang-format off */
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
#define TYPES_SWITCH(RSW, CALL)                                                                            \
    switch (b->type) {                                                                                     \
    case KVQ_TYPE_F16: RSW(CALL, KVQ_TYPE_F16); break;                                                     \
    case KVQ_TYPE_BF16: RSW(CALL, KVQ_TYPE_BF16); break;                                                   \
    case KVQ_TYPE_Q8: RSW(CALL, KVQ_TYPE_Q8); break;                                                       \
    case KVQ_TYPE_FP8: RSW(CALL, KVQ_TYPE_FP8); break;                                                     \
    case KVQ_TYPE_Q4: RSW(CALL, KVQ_TYPE_Q4); break;                                                       \
    case KVQ_TYPE_Q2: RSW(CALL, KVQ_TYPE_Q2); break;                                                       \
    default: break;                                                                                        \
    }
#define TYPE_SWITCH(CALL) TYPES_SWITCH(ROWS_SWITCH, CALL)
#define TYPE_SWITCH4(CALL) TYPES_SWITCH(INT_ROWS_SWITCH, CALL)
/* clang-format on */


/* ---- Q3 row decoding (kvq.h section 5), shared by the AVX2 and AVX-512 Q3 kernels ---- */

/* lv16[0..7] in bytes 0..7 and 8..15 of each 128-bit lane (vpshufb looks up within a lane; indices are < 8) */
static inline __m256i q3_table(const uint8_t *lv16) {
    uint64_t t;
    memcpy(&t, lv16, 8);
    return _mm256_set1_epi64x((long long)t);
}

/* level bytes of the four fields of 128 channels from c (c + 128 <= D): f[u], lane 0 byte k = channel c + 4k + u,
 * lane 1 byte k = channel c + 64 + 4k + u. The 3-bit code is assembled in a byte (low bits from the Q2 plane, the
 * high bit from the nibble of the high plane that covers channels 4k .. 4k + 3) and looked up with vpshufb. */
AI void q3_fields128(const uint8_t *row, int D, int c, __m256i tbl, __m256i *f) {
    const __m256i m3 = _mm256_set1_epi8(3), m4 = _mm256_set1_epi8(4);
    __m256i L = _mm256_loadu_si256((const __m256i *)(const void *)(row + c / 4));
    /* word m: high-bit byte m (channels c + 8m .. c + 8m + 7); its high nibble moved to the word's high byte */
    __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(const void *)(row + D / 4 + c / 8)));
    __m256i N = _mm256_or_si256(w, _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0xF0)), 4));
    f[0] = _mm256_shuffle_epi8(tbl, _mm256_or_si256(_mm256_and_si256(L, m3), _mm256_and_si256(_mm256_slli_epi16(N, 2), m4)));
    f[1] = _mm256_shuffle_epi8(tbl, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(L, 2), m3),
                                                    _mm256_and_si256(_mm256_slli_epi16(N, 1), m4)));
    f[2] = _mm256_shuffle_epi8(tbl, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(L, 4), m3), _mm256_and_si256(N, m4)));
    f[3] = _mm256_shuffle_epi8(tbl, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(L, 6), m3),
                                                    _mm256_and_si256(_mm256_srli_epi16(N, 1), m4)));
}

/* 128 channels from c (c + 128 <= D) in channel order: dst[c .. c + 128) */
AI void q3_lv128(const uint8_t *row, int D, int c, __m256i tbl, uint8_t *dst) {
    __m256i f[4];
    q3_fields128(row, D, c, tbl, f);
    /* fields to channel order: (u0 u1) and (u2 u3) byte pairs, then their words interleaved; per 128-bit lane */
    __m256i a0 = _mm256_unpacklo_epi8(f[0], f[1]), b0 = _mm256_unpacklo_epi8(f[2], f[3]);
    __m256i a1 = _mm256_unpackhi_epi8(f[0], f[1]), b1 = _mm256_unpackhi_epi8(f[2], f[3]);
    __m256i o0 = _mm256_unpacklo_epi16(a0, b0), o1 = _mm256_unpackhi_epi16(a0, b0); /* ch 0-15 | 64-79, 16-31 | 80-95 */
    __m256i o2 = _mm256_unpacklo_epi16(a1, b1), o3 = _mm256_unpackhi_epi16(a1, b1);
    _mm256_storeu_si256((__m256i *)(void *)(dst + c), _mm256_permute2x128_si256(o0, o1, 0x20));
    _mm256_storeu_si256((__m256i *)(void *)(dst + c + 32), _mm256_permute2x128_si256(o2, o3, 0x20));
    _mm256_storeu_si256((__m256i *)(void *)(dst + c + 64), _mm256_permute2x128_si256(o0, o1, 0x31));
    _mm256_storeu_si256((__m256i *)(void *)(dst + c + 96), _mm256_permute2x128_si256(o2, o3, 0x31));
}

/* the fields of 64 channels (f[u] byte k = channel c + 4k + u) */
AI void q3_fields64(const uint8_t *row, int D, int c, __m256i tbl256, __m128i *f) {
    const __m128i m3 = _mm_set1_epi8(3), m4 = _mm_set1_epi8(4), tbl = _mm256_castsi256_si128(tbl256);
    __m128i L = _mm_loadu_si128((const __m128i *)(const void *)(row + c / 4));
    __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(const void *)(row + D / 4 + c / 8)));
    __m128i N = _mm_or_si128(w, _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0xF0)), 4));
    f[0] = _mm_shuffle_epi8(tbl, _mm_or_si128(_mm_and_si128(L, m3), _mm_and_si128(_mm_slli_epi16(N, 2), m4)));
    f[1] = _mm_shuffle_epi8(tbl, _mm_or_si128(_mm_and_si128(_mm_srli_epi16(L, 2), m3), _mm_and_si128(_mm_slli_epi16(N, 1), m4)));
    f[2] = _mm_shuffle_epi8(tbl, _mm_or_si128(_mm_and_si128(_mm_srli_epi16(L, 4), m3), _mm_and_si128(N, m4)));
    f[3] = _mm_shuffle_epi8(tbl, _mm_or_si128(_mm_and_si128(_mm_srli_epi16(L, 6), m3), _mm_and_si128(_mm_srli_epi16(N, 1), m4)));
}

/* the same as q3_lv128 for 64 channels */
AI void q3_lv64(const uint8_t *row, int D, int c, __m256i tbl, uint8_t *dst) {
    __m128i f[4];
    q3_fields64(row, D, c, tbl, f);
    __m128i a0 = _mm_unpacklo_epi8(f[0], f[1]), b0 = _mm_unpacklo_epi8(f[2], f[3]);
    __m128i a1 = _mm_unpackhi_epi8(f[0], f[1]), b1 = _mm_unpackhi_epi8(f[2], f[3]);
    _mm_storeu_si128((__m128i *)(void *)(dst + c), _mm_unpacklo_epi16(a0, b0));
    _mm_storeu_si128((__m128i *)(void *)(dst + c + 16), _mm_unpackhi_epi16(a0, b0));
    _mm_storeu_si128((__m128i *)(void *)(dst + c + 32), _mm_unpacklo_epi16(a1, b1));
    _mm_storeu_si128((__m128i *)(void *)(dst + c + 48), _mm_unpackhi_epi16(a1, b1));
}

/* a row's D level bytes lv16[q_c], channel order (D = 80, 96: the last 16 or 32 channels one at a time) */
AI void q3_row_lv(const uint8_t *row, int D, const uint8_t *lv16, __m256i tbl, uint8_t *dst) {
    int c = 0;
    for (; c + 128 <= D; c += 128) q3_lv128(row, D, c, tbl, dst);
    if (c + 64 <= D) q3_lv64(row, D, c, tbl, dst), c += 64;
    for (; c < D; c++)
        dst[c] = lv16[((row[c / 4] >> (2 * (c % 4))) & 3) | (((row[D / 4 + c / 8] >> (c % 8)) & 1) << 2)];
}


/* ---- the integer key kernels' query order ---- */

/* dst = src (D floats, natural channel order) in kernel order; src != dst */
SIMD_FN void to_kernel_order(kvq_type T, const float *src, float *dst, int D) {
    if (T == KVQ_TYPE_Q8) {
        memcpy(dst, src, (size_t)D * sizeof(float));
        return;
    }
    if (T == KVQ_TYPE_Q4) { /* 16 channels: evens to dst[c..], odds to dst[c + 16..] */
        const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
        for (int c = 0; c < D; c += 32)
            for (int h = 0; h < 32; h += 16) {
                __m256 y0 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(src + c + h), idx);
                __m256 y1 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(src + c + h + 8), idx);
                _mm256_storeu_ps(dst + c + h / 2, _mm256_permute2f128_ps(y0, y1, 0x20));
                _mm256_storeu_ps(dst + c + 16 + h / 2, _mm256_permute2f128_ps(y0, y1, 0x31));
            }
        return;
    }
    /* Q2: per 32 channels, vpermps makes (8j + u, 8j + 4 + u) pairs; a 4x4 transpose of those pairs gathers u */
    const __m256i idx = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int c = 0; c < D; c += 64)
        for (int h = 0; h < 64; h += 32) {
            __m256d y[4];
            for (int j = 0; j < 4; j++)
                y[j] = _mm256_castps_pd(_mm256_permutevar8x32_ps(_mm256_loadu_ps(src + c + h + 8 * j), idx));
            __m256d l01 = _mm256_unpacklo_pd(y[0], y[1]), h01 = _mm256_unpackhi_pd(y[0], y[1]);
            __m256d l23 = _mm256_unpacklo_pd(y[2], y[3]), h23 = _mm256_unpackhi_pd(y[2], y[3]);
            float *o = dst + c + h / 4;
            _mm256_storeu_pd((double *)(void *)(o + 0), _mm256_permute2f128_pd(l01, l23, 0x20));
            _mm256_storeu_pd((double *)(void *)(o + 16), _mm256_permute2f128_pd(h01, h23, 0x20));
            _mm256_storeu_pd((double *)(void *)(o + 32), _mm256_permute2f128_pd(l01, l23, 0x31));
            _mm256_storeu_pd((double *)(void *)(o + 48), _mm256_permute2f128_pd(h01, h23, 0x31));
        }
}


/* Q3 value weights of the n tokens from row j0: w16[g][r][i] = p * scale of value group g rounded to int16 with one
 * scale per (group, row) (relative error <= 1/65534 of the largest weight), read in token pairs (zero from n on,
 * w16[g][r][64] too), ws = that scale / 16 (lv16 is in 1/16 steps), mn = sum_i p * min */
typedef struct q3weights {
    int16_t w16[16][4][64 + 16] __attribute__((aligned(64)));
    float ws[16][4], mn[16][4];
} q3weights;

AI void q3_value_weights(const int R, const kvq__blk *b, int j0, int n, const float *p, int ps, q3weights *w) {
    const int ng = b->D / b->Gv;
    for (int g = 0; g < ng; g++) {
        float S[64] __attribute__((aligned(32))), M[64] __attribute__((aligned(32)));
        for (int i = 0; i < 64; i++) {
            const uint16_t *sm = b->par + ((size_t)(j0 + i) * ng + g) * 2;
            S[i] = i < n ? _cvtsh_ss(sm[0]) : 0.0f, M[i] = i < n ? _cvtsh_ss(sm[1]) : 0.0f;
        }
        for (int r = 0; r < R; r++) {
            const float *pr = p + (size_t)r * ps;
            float wf[64] __attribute__((aligned(32)));
            __m256 mx = _mm256_setzero_ps(), ma = _mm256_setzero_ps();
            for (int i = 0; i < 64; i += 8) {
                __m256 pv = load_p(pr, i, n), w = _mm256_mul_ps(pv, _mm256_load_ps(S + i));
                _mm256_store_ps(wf + i, w);
                mx = _mm256_max_ps(mx, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), w));
                ma = _mm256_fmadd_ps(pv, _mm256_load_ps(M + i), ma);
            }
            float amax = hmax_ps(mx), sc = amax > 0 ? amax / 32767.0f : 1.0f;
            __m256 inv = _mm256_set1_ps(1.0f / sc);
            for (int i = 0; i < 64; i += 16) {
                __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(wf + i), inv));
                __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(wf + i + 8), inv));
                _mm256_store_si256((__m256i *)(void *)&w->w16[g][r][i], _mm256_permute4x64_epi64(_mm256_packs_epi32(a, c), 0xD8));
            }
            w->w16[g][r][64] = 0;
            w->ws[g][r] = sc * 0.0625f, w->mn[g][r] = hsum_ps(ma);
        }
    }
}

/* ---- Q3 values with 8-bit weights (as the Q4/Q2 value kernels): D a multiple of 128, value groups of whole 64-channel
 * halves, at most 4 groups, even levels (every Q3 table kvq__levels16 gives: levels in 1/8 steps). Codes meet the
 * weights as centered level bytes lv8 - 32 = lv16 / 2 - 32 in [-32, 24] (x = s/8 (lv8 - 32) + (min + 4 s)), looked up
 * with one vpshufb per field, four tokens interleaved per dword: one vpmaddubsw (8-bit weights unsigned, levels signed:
 * a byte pair sums to at most 2 * 255 * 32, no saturation) + vpmaddwd by ones (AVX2), or one vpdpbusd (AVX512-VNNI),
 * does 8 channels x 4 tokens into int32 sums, so no 16-bit windows. The weights of a segment of <= 64 tokens are
 * rounded to 8 bits per (value group, row) by value_weights8 as for Q4/Q2, a dominant largest (more than twice the
 * second) kept exact in fp32 (q3_top_fixup). */

/* (a struct of its own, 1 KB: the 3 KB of vweights on this kernel's stack cost +0.9 instructions per token and KV
 * head, callgrind) */
typedef struct q3w8 {
    uint32_t w8[4][4][16] __attribute__((aligned(32))); /* [group][row][quad]: tokens 4k..4k+3's 8-bit weights */
    vwparams s; /* ws: weight scale / 8 (lv8 units); mn: sum of p * (min + 4 scale) (the levels are centered: no
                 * excess to take off); no windows */
} q3w8;

static inline bool q3_w8_fits(const kvq__blk *b, int rows) {
    if (rows > 4 || b->D % 128 || b->Gv % 64 || b->D / b->Gv > 4) return false;
    for (int q = 0; q < 8; q++)
        if (b->lv16[q] & 1) return false;
    return true;
}

/* acc[r][channels of group g] += topw * (lv16 / 16 - 4) of the token each (group, row) kept exact */
SIMD_FN void q3_top_fixup(const int R, const kvq__blk *b, int j0, const vwparams *vw, float *acc) {
    const int D = b->D, ng = D / b->Gv;
    const __m256i tbl = q3_table(b->lv16);
    for (int g = 0; g < ng; g++)
        for (int r = 0; r < R; r++) {
            const int t = vw->top[g][r];
            if (t < 0) continue;
            uint8_t lv[256] __attribute__((aligned(32)));
            q3_row_lv(b->data + (size_t)(j0 + t) * b->stride, D, b->lv16, tbl, lv);
            const __m256 w = _mm256_set1_ps(vw->topw[g][r] * 0.0625f), o4 = _mm256_set1_ps(64.0f);
            float *o = acc + (size_t)r * D;
            for (int c = g * b->Gv; c < (g + 1) * b->Gv; c += 8) {
                __m256 l = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)(lv + c))));
                _mm256_storeu_ps(o + c, _mm256_fmadd_ps(w, _mm256_sub_ps(l, o4), _mm256_loadu_ps(o + c)));
            }
        }
}

/* *a += the 4-token dot products of 8 channels: u8 weights w (a dword per channel: tokens 0..3) by s8 levels x */
AI void q3_dot4(const bool VNNI, __m256i *a, __m256i w, __m256i x, __m256i ones) {
#if defined(__AVX512VL__) && !defined(KVQ_SIMD_NO_ASM)
    if (VNNI) {
        __asm__("%{evex%} vpdpbusd %[x], %[w], %[a]" : [a] "+v"(*a) : [w] "v"(w), [x] "v"(x));
        return;
    }
#endif
    (void)VNNI;
    __m256i t;
    __asm__("vpmaddubsw %[x], %[w], %[t]\n\tvpmaddwd %[o], %[t], %[t]\n\tvpaddd %[t], %[a], %[a]"
            : [a] "+x"(*a), [t] "=&x"(t)
            : [w] "x"(w), [x] "x"(x), [o] "x"(ones));
}

AI void q3_value_accum8_impl(const int R, const int DK, const bool VNNI, const kvq__blk *b, int j0, int n,
                             const float *p, int ps, float *accbuf) {
    const int D = DK ? DK : b->D, Gv = b->Gv, nq = (n + 3) / 4;
    const int V = VNNI ? 4 : 2; /* vectors of 8 channels per pass: 4R accumulators fit 32 registers, 2R 16 */
    q3w8 vw;
    value_weights8(KVQ_TYPE_Q3, R, b, j0, n, p, ps, (uint32_t *)vw.w8, &vw.s);
    /* centered lv8 table: (lv16 / 2) - 32 */
    uint8_t lc[8];
    for (int q = 0; q < 8; q++) lc[q] = (uint8_t)((b->lv16[q] >> 1) - 32);
    const __m256i tbl = q3_table(lc);
    const __m256i ones = _mm256_set1_epi16(1);
    /* X[quad][chunk * 16 + 4h + u]: dword i of lane L holds channel c + 64L + 16h + 4i + u of the quad's 4 tokens */
    __m256i X[16][2 * 16];
    for (int k = 0; k < nq; k++) {
        const uint8_t *rows[4];
        for (int t = 0; t < 4; t++) {
            int i = 4 * k + t < n ? 4 * k + t : n - 1; /* past n: any row, at weight 0 */
            rows[t] = b->data + (size_t)(j0 + i) * b->stride;
        }
        for (int c = 0; c < D; c += 128) {
            __m256i f[4][4];
            #pragma GCC unroll 4
            for (int t = 0; t < 4; t++) q3_fields128(rows[t], D, c, tbl, f[t]);
            #pragma GCC unroll 4
            for (int u = 0; u < 4; u++) {
                __m256i al = _mm256_unpacklo_epi8(f[0][u], f[1][u]), bl = _mm256_unpacklo_epi8(f[2][u], f[3][u]);
                __m256i ah = _mm256_unpackhi_epi8(f[0][u], f[1][u]), bh = _mm256_unpackhi_epi8(f[2][u], f[3][u]);
                __m256i *x = X[k] + c / 8;
                x[u] = _mm256_unpacklo_epi16(al, bl), x[4 + u] = _mm256_unpackhi_epi16(al, bl);
                x[8 + u] = _mm256_unpacklo_epi16(ah, bh), x[12 + u] = _mm256_unpackhi_epi16(ah, bh);
            }
        }
    }
    for (int c = 0; c < D; c += 128) {
        const int g0 = c / Gv, g1 = (c + 64) / Gv;
        __m256i W[4][16];
        for (int k = 0; k < nq; k++)
            #pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                W[r][k] = _mm256_inserti128_si256(_mm256_set1_epi32((int)vw.w8[g0][r][k]),
                                                  _mm_set1_epi32((int)vw.w8[g1][r][k]), 1);
        int32_t I[4][16][8] __attribute__((aligned(32))); /* [row][vector]: the int32 sums */
        for (int v0 = 0; v0 < 16; v0 += V) {
            __m256i a[4][4];
            #pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                #pragma GCC unroll 4
                for (int v = 0; v < V; v++) a[r][v] = _mm256_setzero_si256();
            for (int k = 0; k < nq; k++) {
                const __m256i *x = X[k] + c / 8 + v0;
                #pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    const __m256i w = W[r][k];
                    #pragma GCC unroll 4
                    for (int v = 0; v < V; v++) q3_dot4(VNNI, &a[r][v], w, x[v], ones);
                }
            }
            #pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                #pragma GCC unroll 4
                for (int v = 0; v < V; v++) _mm256_store_si256((__m256i *)(void *)I[r][v0 + v], a[r][v]);
        }
        /* to channel order: per h, a 4 x 4 transpose (fields u, dwords i) in each lane */
        #pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            float *o = accbuf + (size_t)r * D + c;
            const __m256 s0 = _mm256_set1_ps(vw.s.ws[g0][r]), s1 = _mm256_set1_ps(vw.s.ws[g1][r]);
            const __m256 m0 = _mm256_set1_ps(vw.s.mn[g0][r]), m1 = _mm256_set1_ps(vw.s.mn[g1][r]);
            for (int h = 0; h < 4; h++) {
                __m256 A[4];
                for (int u = 0; u < 4; u++)
                    A[u] = _mm256_cvtepi32_ps(_mm256_load_si256((const __m256i *)(const void *)I[r][4 * h + u]));
                __m256 t0 = _mm256_unpacklo_ps(A[0], A[1]), t1 = _mm256_unpacklo_ps(A[2], A[3]);
                __m256 t2 = _mm256_unpackhi_ps(A[0], A[1]), t3 = _mm256_unpackhi_ps(A[2], A[3]);
                __m256 T0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t1)));
                __m256 T1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t1)));
                __m256 T2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t2), _mm256_castps_pd(t3)));
                __m256 T3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t2), _mm256_castps_pd(t3)));
                /* T_i lane L: channels c + 64L + 16h + 4i .. + 3 */
                float *lo = o + 16 * h, *hi = o + 64 + 16 * h;
                __m256 y;
                y = _mm256_permute2f128_ps(T0, T1, 0x20);
                _mm256_storeu_ps(lo, _mm256_add_ps(_mm256_fmadd_ps(y, s0, _mm256_loadu_ps(lo)), m0));
                y = _mm256_permute2f128_ps(T2, T3, 0x20);
                _mm256_storeu_ps(lo + 8, _mm256_add_ps(_mm256_fmadd_ps(y, s0, _mm256_loadu_ps(lo + 8)), m0));
                y = _mm256_permute2f128_ps(T0, T1, 0x31);
                _mm256_storeu_ps(hi, _mm256_add_ps(_mm256_fmadd_ps(y, s1, _mm256_loadu_ps(hi)), m1));
                y = _mm256_permute2f128_ps(T2, T3, 0x31);
                _mm256_storeu_ps(hi + 8, _mm256_add_ps(_mm256_fmadd_ps(y, s1, _mm256_loadu_ps(hi + 8)), m1));
            }
        }
    }
    q3_top_fixup(R, b, j0, &vw.s, accbuf);
}


#endif

/* qmat_avx512.c: AVX-512 (F, BW, VL, DQ) dot products of one weight row with fp32 activations (qmat.h), 16 lanes:
 * 16 bytes of codes widen to one zmm of int32 (low nibbles and high nibbles of the same load give two), Q5_0's
 * fifth bit comes from its 32-bit mask as a masked add. Same arithmetic as the _ref kernels in qmat.c up to the
 * summation order. Built with the AVX-512 flags of attn_avx512.c; called only after qmat_kernels_avx512()'s check. */
#include "qmat.h"

#if defined(__x86_64__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#include <immintrin.h>
#include <string.h>

static inline float h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}
static inline __m128i ld128(const uint8_t *p) { return _mm_loadu_si128((const __m128i *)p); }

static float dot_f32(int cols, const uint8_t *w, const float *x, const float *xs) {
    (void)xs;
    const float *v = (const float *)(const void *)w;
    __m512 a = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= cols; i += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(v + i), _mm512_loadu_ps(x + i), a);
    float s = _mm512_reduce_add_ps(a);
    for (; i < cols; i++) s += v[i] * x[i];
    return s;
}
static float dot_f16(int cols, const uint8_t *w, const float *x, const float *xs) {
    (void)xs;
    __m512 a = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= cols; i += 16)
        a = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + 2 * i))), _mm512_loadu_ps(x + i), a);
    float s = _mm512_reduce_add_ps(a);
    for (; i < cols; i++) s += h2f(w + 2 * i) * x[i];
    return s;
}
static float dot_bf16(int cols, const uint8_t *w, const float *x, const float *xs) {
    (void)xs;
    __m512 a = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= cols; i += 16) {
        __m512i b = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w + 2 * i))), 16);
        a = _mm512_fmadd_ps(_mm512_castsi512_ps(b), _mm512_loadu_ps(x + i), a);
    }
    float s = _mm512_reduce_add_ps(a);
    for (; i < cols; i++) {
        uint32_t b = (uint32_t)(w[2 * i] | w[2 * i + 1] << 8) << 16;
        float v;
        memcpy(&v, &b, 4);
        s += v * x[i];
    }
    return s;
}
/* sum(q x) over a 32-element block of nibbles (low nibble of byte j: element j, high: j + 16), `off` subtracted */
static inline __m512 nib32(__m128i q, const float *x, __m512i off) {
    __m512i v = _mm512_cvtepu8_epi32(q);
    __m512i lo = _mm512_sub_epi32(_mm512_and_si512(v, _mm512_set1_epi32(15)), off);
    __m512i hi = _mm512_sub_epi32(_mm512_srli_epi32(v, 4), off);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_loadu_ps(x + 16),
                           _mm512_mul_ps(_mm512_cvtepi32_ps(lo), _mm512_loadu_ps(x)));
}
static float dot_q4_0(int cols, const uint8_t *w, const float *x, const float *xs) {
    (void)xs;
    __m512 acc = _mm512_setzero_ps();
    const __m512i off = _mm512_set1_epi32(8);
    for (int b = 0; b < cols / 32; b++, w += 18, x += 32)
        acc = _mm512_fmadd_ps(_mm512_set1_ps(h2f(w)), nib32(ld128(w + 2), x, off), acc);
    return _mm512_reduce_add_ps(acc);
}
static float dot_q4_1(int cols, const uint8_t *w, const float *x, const float *xs) {
    __m512 acc = _mm512_setzero_ps();
    const __m512i off = _mm512_setzero_si512();
    float macc = 0;
    for (int b = 0; b < cols / 32; b++, w += 20, x += 32) {
        acc = _mm512_fmadd_ps(_mm512_set1_ps(h2f(w)), nib32(ld128(w + 4), x, off), acc);
        macc += h2f(w + 2) * xs[b];
    }
    return _mm512_reduce_add_ps(acc) + macc;
}
static float dot_q5_0(int cols, const uint8_t *w, const float *x, const float *xs) {
    (void)xs;
    __m512 acc = _mm512_setzero_ps();
    const __m512i m4 = _mm512_set1_epi32(15), o16 = _mm512_set1_epi32(16);
    for (int b = 0; b < cols / 32; b++, w += 22, x += 32) {
        uint32_t qh;
        memcpy(&qh, w + 2, 4);
        __m512i v = _mm512_cvtepu8_epi32(ld128(w + 6));
        /* code - 16, plus 16 where the high bit is set: bits 0-15 of qh for elements 0-15, 16-31 for 16-31 */
        __m512i lo = _mm512_sub_epi32(_mm512_and_si512(v, m4), o16), hi = _mm512_sub_epi32(_mm512_srli_epi32(v, 4), o16);
        lo = _mm512_mask_add_epi32(lo, (__mmask16)(qh & 0xffff), lo, o16);
        hi = _mm512_mask_add_epi32(hi, (__mmask16)(qh >> 16), hi, o16);
        __m512 s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_loadu_ps(x + 16),
                                   _mm512_mul_ps(_mm512_cvtepi32_ps(lo), _mm512_loadu_ps(x)));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(h2f(w)), s, acc);
    }
    return _mm512_reduce_add_ps(acc);
}
static float dot_q8_0(int cols, const uint8_t *w, const float *x, const float *xs) {
    (void)xs;
    __m512 acc = _mm512_setzero_ps();
    for (int b = 0; b < cols / 32; b++, w += 34, x += 32) {
        __m512 s = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(ld128(w + 2))), _mm512_loadu_ps(x));
        s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(ld128(w + 18))), _mm512_loadu_ps(x + 16), s);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(h2f(w)), s, acc);
    }
    return _mm512_reduce_add_ps(acc);
}
static inline void k4_scales(const uint8_t *q, float *sc, float *mn) {
    for (int j = 0; j < 8; j++) {
        int s, m;
        if (j < 4) s = q[j] & 63, m = q[j + 4] & 63;
        else s = (q[j + 4] & 15) | (q[j - 4] >> 6) << 4, m = (q[j + 4] >> 4) | (q[j] >> 6) << 4;
        sc[j] = (float)s, mn[j] = (float)m;
    }
}
static float dot_q4_k(int cols, const uint8_t *w, const float *x, const float *xs) {
    __m512 acc = _mm512_setzero_ps();
    float macc = 0;
    const __m512i m4 = _mm512_set1_epi32(15);
    for (int b = 0; b < cols / 256; b++, w += 144, x += 256, xs += 8) {
        float sc[8], mn[8], m_all = 0;
        k4_scales(w + 4, sc, mn);
        const uint8_t *q = w + 16;
        __m512 sacc = _mm512_setzero_ps();
        for (int j = 0; j < 8; j += 2, q += 32) {
            __m512i v0 = _mm512_cvtepu8_epi32(ld128(q)), v1 = _mm512_cvtepu8_epi32(ld128(q + 16));
            const float *xj = x + 32 * j;
            __m512 s0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v1, m4)), _mm512_loadu_ps(xj + 16),
                                        _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v0, m4)), _mm512_loadu_ps(xj)));
            __m512 s1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v1, 4)), _mm512_loadu_ps(xj + 48),
                                        _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v0, 4)), _mm512_loadu_ps(xj + 32)));
            sacc = _mm512_fmadd_ps(_mm512_set1_ps(sc[j]), s0, sacc);
            sacc = _mm512_fmadd_ps(_mm512_set1_ps(sc[j + 1]), s1, sacc);
            m_all += mn[j] * xs[j] + mn[j + 1] * xs[j + 1];
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(h2f(w)), sacc, acc);
        macc += h2f(w + 2) * m_all;
    }
    return _mm512_reduce_add_ps(acc) - macc;
}
static float dot_q6_k(int cols, const uint8_t *w, const float *x, const float *xs) {
    (void)xs;
    __m512 acc = _mm512_setzero_ps();
    const __m512i m4 = _mm512_set1_epi32(15), m2 = _mm512_set1_epi32(3), o32 = _mm512_set1_epi32(32);
    for (int b = 0; b < cols / 256; b++, w += 210, x += 256) {
        const uint8_t *ql = w, *qh = w + 128;
        const int8_t *sc = (const int8_t *)(w + 192);
        __m512 sacc = _mm512_setzero_ps();
        for (int half = 0; half < 2; half++, ql += 64, qh += 32, sc += 8) {
            const float *xh = x + 128 * half;
            for (int l = 0; l < 32; l += 16) { /* 16 elements of one sub-block in each of the 4 groups */
                __m512i a = _mm512_cvtepu8_epi32(ld128(ql + l)), c = _mm512_cvtepu8_epi32(ld128(ql + l + 32));
                __m512i h = _mm512_cvtepu8_epi32(ld128(qh + l));
                __m512i q1 = _mm512_or_si512(_mm512_and_si512(a, m4), _mm512_slli_epi32(_mm512_and_si512(h, m2), 4));
                __m512i q2 = _mm512_or_si512(_mm512_and_si512(c, m4),
                                             _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, 2), m2), 4));
                __m512i q3 = _mm512_or_si512(_mm512_srli_epi32(a, 4),
                                             _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, 4), m2), 4));
                __m512i q4 = _mm512_or_si512(_mm512_srli_epi32(c, 4), _mm512_slli_epi32(_mm512_srli_epi32(h, 6), 4));
                int is = l / 16;
                __m512 s1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q1, o32)), _mm512_loadu_ps(xh + l));
                __m512 s2 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q2, o32)), _mm512_loadu_ps(xh + l + 32));
                __m512 s3 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q3, o32)), _mm512_loadu_ps(xh + l + 64));
                __m512 s4 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q4, o32)), _mm512_loadu_ps(xh + l + 96));
                sacc = _mm512_fmadd_ps(_mm512_set1_ps((float)sc[is]), s1, sacc);
                sacc = _mm512_fmadd_ps(_mm512_set1_ps((float)sc[is + 2]), s2, sacc);
                sacc = _mm512_fmadd_ps(_mm512_set1_ps((float)sc[is + 4]), s3, sacc);
                sacc = _mm512_fmadd_ps(_mm512_set1_ps((float)sc[is + 6]), s4, sacc);
            }
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(h2f(w + 208)), sacc, acc);
    }
    return _mm512_reduce_add_ps(acc);
}

static const qmat_kernels avx512 = {
    "avx512",
    {[GGML_F32] = dot_f32, [GGML_F16] = dot_f16, [GGML_BF16] = dot_bf16, [GGML_Q4_0] = dot_q4_0, [GGML_Q4_1] = dot_q4_1,
     [GGML_Q5_0] = dot_q5_0, [GGML_Q8_0] = dot_q8_0, [GGML_Q4_K] = dot_q4_k, [GGML_Q6_K] = dot_q6_k}};

const qmat_kernels *qmat_kernels_avx512(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return &avx512;
    return NULL;
}
#else
const qmat_kernels *qmat_kernels_avx512(void) { return NULL; }
#endif

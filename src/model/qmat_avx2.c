/* qmat_avx2.c: AVX2 + FMA + F16C dot products of one weight row with fp32 activations (qmat.h), 8 lanes: each
 * block's codes are widened to int32, converted to fp32, multiplied with x and scaled once per (sub-)block, as the
 * _ref kernels in qmat.c do (only the summation order differs). Built with -mavx2 -mfma -mf16c; called only after
 * the run-time check in qmat_kernels_avx2(). */
#include "qmat.h"

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#include <string.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline float h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}
static inline __m128i ld64(const uint8_t *p) { return _mm_loadl_epi64((const __m128i *)p); }
static inline __m256 i8f(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); } /* low 8 bytes, signed */

static float dot_f32(int cols, const uint8_t *w, const float *x, const float *xs) {
    (void)xs;
    const float *v = (const float *)(const void *)w;
    __m256 a = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= cols; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(v + i), _mm256_loadu_ps(x + i), a);
    float s = hsum(a);
    for (; i < cols; i++) s += v[i] * x[i];
    return s;
}
static float dot_f16(int cols, const uint8_t *w, const float *x, const float *xs) {
    (void)xs;
    __m256 a = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= cols; i += 8)
        a = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 2 * i))), _mm256_loadu_ps(x + i), a);
    float s = hsum(a);
    for (; i < cols; i++) s += h2f(w + 2 * i) * x[i];
    return s;
}
static float dot_bf16(int cols, const uint8_t *w, const float *x, const float *xs) {
    (void)xs;
    __m256 a = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= cols; i += 8) {
        __m256i b = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + 2 * i))), 16);
        a = _mm256_fmadd_ps(_mm256_castsi256_ps(b), _mm256_loadu_ps(x + i), a);
    }
    float s = hsum(a);
    for (; i < cols; i++) {
        uint32_t b = (uint32_t)(w[2 * i] | w[2 * i + 1] << 8) << 16;
        float v;
        memcpy(&v, &b, 4);
        s += v * x[i];
    }
    return s;
}
/* sum over the block of q[j] x[j] for 16 bytes of nibbles (elements j: low nibble of byte j, j + 16: high), with
 * `off` subtracted from each code (8 for Q4_0, 0 for Q4_1) */
static inline __m256 nib32(__m128i q, const float *x, __m128i off) {
    const __m128i m4 = _mm_set1_epi8(15);
    __m128i lo = _mm_sub_epi8(_mm_and_si128(q, m4), off), hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m4), off);
    __m256 s = _mm256_mul_ps(i8f(lo), _mm256_loadu_ps(x));
    s = _mm256_fmadd_ps(i8f(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(x + 8), s);
    s = _mm256_fmadd_ps(i8f(hi), _mm256_loadu_ps(x + 16), s);
    return _mm256_fmadd_ps(i8f(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(x + 24), s);
}
static float dot_q4_0(int cols, const uint8_t *w, const float *x, const float *xs) {
    (void)xs;
    __m256 acc = _mm256_setzero_ps();
    const __m128i off = _mm_set1_epi8(8);
    for (int b = 0; b < cols / 32; b++, w += 18, x += 32)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(w)), nib32(_mm_loadu_si128((const __m128i *)(w + 2)), x, off), acc);
    return hsum(acc);
}
static float dot_q4_1(int cols, const uint8_t *w, const float *x, const float *xs) {
    __m256 acc = _mm256_setzero_ps();
    const __m128i off = _mm_setzero_si128();
    float macc = 0;
    for (int b = 0; b < cols / 32; b++, w += 20, x += 32) {
        acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(w)), nib32(_mm_loadu_si128((const __m128i *)(w + 4)), x, off), acc);
        macc += h2f(w + 2) * xs[b];
    }
    return hsum(acc) + macc;
}
/* Q5_0: 8 elements at a time; the 8 high bits hb (one byte of qh) become 16 in the lanes whose bit is set */
static inline __m256 q5_8(__m128i nib8, uint32_t hb, const float *x, __m256 s) {
    const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i h = _mm256_and_si256(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)hb), bits), bits),
                                 _mm256_set1_epi32(16));
    __m256i q = _mm256_sub_epi32(_mm256_add_epi32(_mm256_cvtepu8_epi32(nib8), h), _mm256_set1_epi32(16));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_loadu_ps(x), s);
}
static float dot_q5_0(int cols, const uint8_t *w, const float *x, const float *xs) {
    (void)xs;
    __m256 acc = _mm256_setzero_ps();
    const __m128i m4 = _mm_set1_epi8(15);
    for (int b = 0; b < cols / 32; b++, w += 22, x += 32) {
        uint32_t qh;
        memcpy(&qh, w + 2, 4);
        __m128i q = _mm_loadu_si128((const __m128i *)(w + 6));
        __m128i lo = _mm_and_si128(q, m4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
        __m256 s = _mm256_setzero_ps();
        s = q5_8(lo, qh & 0xff, x, s);
        s = q5_8(_mm_srli_si128(lo, 8), (qh >> 8) & 0xff, x + 8, s);
        s = q5_8(hi, (qh >> 16) & 0xff, x + 16, s);
        s = q5_8(_mm_srli_si128(hi, 8), qh >> 24, x + 24, s);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(w)), s, acc);
    }
    return hsum(acc);
}
static float dot_q8_0(int cols, const uint8_t *w, const float *x, const float *xs) {
    (void)xs;
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < cols / 32; b++, w += 34, x += 32) {
        __m256 s = _mm256_mul_ps(i8f(ld64(w + 2)), _mm256_loadu_ps(x));
        s = _mm256_fmadd_ps(i8f(ld64(w + 10)), _mm256_loadu_ps(x + 8), s);
        s = _mm256_fmadd_ps(i8f(ld64(w + 18)), _mm256_loadu_ps(x + 16), s);
        s = _mm256_fmadd_ps(i8f(ld64(w + 26)), _mm256_loadu_ps(x + 24), s);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(w)), s, acc);
    }
    return hsum(acc);
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
    __m256 acc = _mm256_setzero_ps();
    float macc = 0;
    const __m256i m4 = _mm256_set1_epi32(15);
    for (int b = 0; b < cols / 256; b++, w += 144, x += 256, xs += 8) {
        float sc[8], mn[8], m_all = 0;
        k4_scales(w + 4, sc, mn);
        const uint8_t *q = w + 16;
        __m256 sacc = _mm256_setzero_ps();
        for (int j = 0; j < 8; j += 2, q += 32) {
            __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
            for (int k = 0; k < 4; k++) {
                __m256i v = _mm256_cvtepu8_epi32(ld64(q + 8 * k));
                s0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m4)), _mm256_loadu_ps(x + 32 * j + 8 * k), s0);
                s1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), _mm256_loadu_ps(x + 32 * j + 32 + 8 * k), s1);
            }
            sacc = _mm256_fmadd_ps(_mm256_set1_ps(sc[j]), s0, sacc);
            sacc = _mm256_fmadd_ps(_mm256_set1_ps(sc[j + 1]), s1, sacc);
            m_all += mn[j] * xs[j] + mn[j + 1] * xs[j + 1];
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(w)), sacc, acc);
        macc += h2f(w + 2) * m_all;
    }
    return hsum(acc) - macc;
}
static float dot_q6_k(int cols, const uint8_t *w, const float *x, const float *xs) {
    (void)xs;
    __m256 acc = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi32(15), m2 = _mm256_set1_epi32(3), o32 = _mm256_set1_epi32(32);
    for (int b = 0; b < cols / 256; b++, w += 210, x += 256) {
        const uint8_t *ql = w, *qh = w + 128;
        const int8_t *sc = (const int8_t *)(w + 192);
        __m256 sacc = _mm256_setzero_ps();
        for (int half = 0; half < 2; half++, ql += 64, qh += 32, sc += 8) {
            const float *xh = x + 128 * half;
            for (int l = 0; l < 32; l += 8) {
                __m256i a = _mm256_cvtepu8_epi32(ld64(ql + l)), c = _mm256_cvtepu8_epi32(ld64(ql + l + 32));
                __m256i h = _mm256_cvtepu8_epi32(ld64(qh + l));
                __m256i q1 = _mm256_or_si256(_mm256_and_si256(a, m4), _mm256_slli_epi32(_mm256_and_si256(h, m2), 4));
                __m256i q2 = _mm256_or_si256(_mm256_and_si256(c, m4),
                                             _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, 2), m2), 4));
                __m256i q3 = _mm256_or_si256(_mm256_srli_epi32(a, 4),
                                             _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, 4), m2), 4));
                __m256i q4 = _mm256_or_si256(_mm256_srli_epi32(c, 4), _mm256_slli_epi32(_mm256_srli_epi32(h, 6), 4));
                int is = l / 16;
                sacc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps((float)sc[is]), _mm256_cvtepi32_ps(_mm256_sub_epi32(q1, o32))),
                                       _mm256_loadu_ps(xh + l), sacc);
                sacc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps((float)sc[is + 2]), _mm256_cvtepi32_ps(_mm256_sub_epi32(q2, o32))),
                                       _mm256_loadu_ps(xh + l + 32), sacc);
                sacc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps((float)sc[is + 4]), _mm256_cvtepi32_ps(_mm256_sub_epi32(q3, o32))),
                                       _mm256_loadu_ps(xh + l + 64), sacc);
                sacc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps((float)sc[is + 6]), _mm256_cvtepi32_ps(_mm256_sub_epi32(q4, o32))),
                                       _mm256_loadu_ps(xh + l + 96), sacc);
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(w + 208)), sacc, acc);
    }
    return hsum(acc);
}

static const qmat_kernels avx2 = {
    "avx2",
    {[GGML_F32] = dot_f32, [GGML_F16] = dot_f16, [GGML_BF16] = dot_bf16, [GGML_Q4_0] = dot_q4_0, [GGML_Q4_1] = dot_q4_1,
     [GGML_Q5_0] = dot_q5_0, [GGML_Q8_0] = dot_q8_0, [GGML_Q4_K] = dot_q4_k, [GGML_Q6_K] = dot_q6_k}};

const qmat_kernels *qmat_kernels_avx2(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &avx2; /* F16C: every AVX2 CPU */
    return NULL;
}
#else
const qmat_kernels *qmat_kernels_avx2(void) { return NULL; }
#endif

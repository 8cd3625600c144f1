/* AVX-512 (F, BW, VL, DQ) kernels, compiled with those flags (and AVX2, FMA, F16C) and chosen at run time.
 * Tested against the _ref kernels. They are the AVX2 kernels' algorithms (attn_avx2.c, attn_simd.h) on 16
 * fp32 or 32 int16 lanes; the parts that do not depend on the width are attn_simd.h's, so the integer kernels
 * round queries and weights exactly as the AVX2 ones do and their integer sums are the same. A 512-bit
 * register of codes covers 32 (Q8), 64 (Q4) or 128 (Q2) channels: the integer kernels whose head dim is not a
 * multiple of that (Q8 at D = 80, Q4 at 80 and 96, Q2 below 128) are left to the AVX2 table, which handles
 * them as before. */
#include "attn.h"

#if defined(__x86_64__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) &&         \
    defined(__AVX512DQ__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "attn_simd.h"

/* the first n lanes, 0 <= n; all 16 from n = 16 on */
static inline __mmask16 first_n(int n) {
    return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
}

/* raw channels c .. c + 15: full value for F16/BF16/FP8 (before the token scale), codes for Q8/Q4/Q2 */
AI __m512 raw16(kvq_type t, const uint8_t *row, int c) {
    switch (t) {
    case KVQ_TYPE_F16:
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(row + 2 * c)));
    case KVQ_TYPE_BF16: {
        __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(const void *)(row + 2 * c)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    }
    case KVQ_TYPE_Q8:
        return _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(const void *)(row + c))));
    case KVQ_TYPE_FP8: {
        /* e4m3 bits placed in a float's exponent/mantissa, then * 2^120 rebias (subnormals too) */
        __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(const void *)(row + c)));
        __m512i mag = _mm512_slli_epi32(_mm512_and_si512(w, _mm512_set1_epi32(0x7f)), 20);
        __m512i sgn = _mm512_slli_epi32(_mm512_and_si512(w, _mm512_set1_epi32(0x80)), 24);
        return _mm512_mul_ps(_mm512_castsi512_ps(_mm512_or_si512(mag, sgn)), _mm512_set1_ps(0x1p120f));
    }
    case KVQ_TYPE_Q4: {
        /* 8 bytes: channels c .. c + 7 in the first 4 (lanes 0-7), c + 8 .. c + 15 in the next 4 (lanes 8-15)
         */
        uint32_t w[2];
        memcpy(w, row + c / 2, 8);
        __m512i v = _mm512_mask_set1_epi32(_mm512_set1_epi32((int)w[0]), 0xFF00, (int)w[1]);
        __m512i sh = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
        return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(v, sh), _mm512_set1_epi32(15)));
    }
    case KVQ_TYPE_Q2: {
        uint32_t w;
        memcpy(&w, row + c / 4, 4);
        __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        return _mm512_cvtepi32_ps(
            _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)w), sh), _mm512_set1_epi32(3)));
    }
    default:
        return _mm512_setzero_ps();
    }
}

/* 16 fp16 values from p */
AI __m512 load_h16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)p));
}

/* the sum of the 16 lanes, as 8 lanes */
AI __m256 fold_ps(__m512 a) {
    return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
}
AI __m256i fold_epi32(__m512i a) {
    return _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
}
AI float hsum16(__m512 a) {
    return hsum_ps(fold_ps(a));
}

static void decode_avx512(const kvq__blk *b, int j0, int n, float *out) {
    if (b->type == KVQ_TYPE_Q3) { /* Q3: the AVX2 kernels (256-bit byte-shuffle decode) */
        kvq__kernels_avx2_table()->decode(b, j0, n, out);
        return;
    }
    if (nu_blk(b)) {
        decode_levels(b, j0, n, out);
        return;
    }
    const int D = b->D; /* a multiple of 16, and so is Gv */
    for (int i = 0; i < n; i++) {
        int j = j0 + i;
        const uint8_t *row = b->data + (size_t)j * b->stride;
        float *o = out + (size_t)i * D;
        switch (b->type) {
        case KVQ_TYPE_F16:
        case KVQ_TYPE_BF16:
            for (int c = 0; c < D; c += 16) _mm512_storeu_ps(o + c, raw16(b->type, row, c));
            break;
        case KVQ_TYPE_Q8:
        case KVQ_TYPE_FP8: {
            __m512 s = _mm512_set1_ps(_cvtsh_ss(b->par[j]));
            for (int c = 0; c < D; c += 16) _mm512_storeu_ps(o + c, _mm512_mul_ps(s, raw16(b->type, row, c)));
            break;
        }
        default: /* Q4, Q2 */
            if (b->role == KVQ_KEY) {
                const uint16_t *sm = b->par + (size_t)(j / b->G) * 2 * D;
                for (int c = 0; c < D; c += 16)
                    _mm512_storeu_ps(o + c, _mm512_fmadd_ps(load_h16(sm + c), raw16(b->type, row, c),
                                                            load_h16(sm + D + c)));
            } else {
                const uint16_t *sm = b->par + (size_t)j * (D / b->Gv) * 2;
                for (int g = 0; g < D / b->Gv; g++) {
                    __m512 s = _mm512_set1_ps(_cvtsh_ss(sm[2 * g])),
                           m = _mm512_set1_ps(_cvtsh_ss(sm[2 * g + 1]));
                    for (int c = g * b->Gv; c < (g + 1) * b->Gv; c += 16)
                        _mm512_storeu_ps(o + c, _mm512_fmadd_ps(s, raw16(b->type, row, c), m));
                }
            }
        }
    }
}

static void dots_avx512(const float *q, int rows, int D, const float *x, int n, float *s, int ss) {
    if (n == KVQ_TILE) {
        for (int r = 0; r < rows; r++) {
            const float *qr = q + (size_t)r * D;
            __m512 a[8];
            for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
            for (int c = 0; c < D; c += 16) {
                __m512 qv = _mm512_loadu_ps(qr + c);
                for (int i = 0; i < 8; i++)
                    a[i] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(x + (size_t)i * D + c), a[i]);
            }
            _mm256_storeu_ps(s + (size_t)r * ss,
                             hsum8(fold_ps(a[0]), fold_ps(a[1]), fold_ps(a[2]), fold_ps(a[3]), fold_ps(a[4]),
                                   fold_ps(a[5]), fold_ps(a[6]), fold_ps(a[7])));
        }
        return;
    }
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < n; i++) {
            __m512 a = _mm512_setzero_ps();
            for (int c = 0; c < D; c += 16)
                a = _mm512_fmadd_ps(_mm512_loadu_ps(q + (size_t)r * D + c),
                                    _mm512_loadu_ps(x + (size_t)i * D + c), a);
            s[(size_t)r * ss + i] = hsum16(a);
        }
}

static void axpys_avx512(const float *p, int ps, int rows, int D, const float *x, int n, float *acc) {
    for (int r = 0; r < rows; r++) {
        const float *pr = p + (size_t)r * ps;
        float *ar = acc + (size_t)r * D;
        for (int c = 0; c < D; c += 16) {
            __m512 a = _mm512_loadu_ps(ar + c);
            for (int i = 0; i < n; i++)
                a = _mm512_fmadd_ps(_mm512_set1_ps(pr[i]), _mm512_loadu_ps(x + (size_t)i * D + c), a);
            _mm512_storeu_ps(ar + c, a);
        }
    }
}

/* exp on [-87, 0]: attn_avx2.c's exp256 on 16 lanes (2^n * a degree-6 polynomial; relative error < 2e-7) */
AI __m512 exp512(__m512 x0) {
    __m512 x = _mm512_max_ps(x0, _mm512_set1_ps(-87.0f));
    const __m512 shifter = _mm512_set1_ps(12583039.0f); /* 1.5 * 2^23 + 127 */
    __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), shifter);
    __m512 n = _mm512_sub_ps(t, shifter);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    __m512i e = _mm512_slli_epi32(_mm512_castps_si512(t), 23);
    /* below -87 (masked logits are -inf) the result is exactly 0 */
    __mmask16 keep = _mm512_cmp_ps_mask(x0, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    return _mm512_maskz_mov_ps(keep, _mm512_mul_ps(p, _mm512_castsi512_ps(e)));
}

static float exp_sum_avx512(float *x, int n, float m) {
    __m512 mv = _mm512_set1_ps(m), acc = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) { /* the lanes past n are neither read nor written nor summed */
        __mmask16 k = first_n(n - i);
        __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), mv));
        _mm512_mask_storeu_ps(x + i, k, e);
        acc = _mm512_mask_add_ps(acc, k, acc, e);
    }
    return hsum16(acc);
}

/* NaN if any x[i] is NaN (vmaxps drops a NaN first operand, so they are tracked apart) */
static float max_avx512(const float *x, int n) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 v = ninf;
    __mmask16 nan = 0;
    for (int i = 0; i < n; i += 16) {
        __m512 y = _mm512_mask_loadu_ps(ninf, first_n(n - i), x + i);
        v = _mm512_max_ps(v, y), nan |= _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
    }
    __m256 h = _mm256_max_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    return nan ? NAN : hmax_ps(h);
}

static void scale_avx512(float *x, int n, float s) {
    const __m512 v = _mm512_set1_ps(s);
    for (int i = 0; i < n; i += 16) {
        __mmask16 k = first_n(n - i);
        _mm512_mask_storeu_ps(x + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), v));
    }
}

/* ---- fused fp32 kernels: attn_avx2.c's on 16 lanes ---- */

AI void key_scores_impl(const kvq_type T, const int R, const kvq__blk *b, int j0, int n, const float *q,
                        float *s, int ss) {
    const int D = b->D;
    const bool grouped = T == KVQ_TYPE_Q4 || T == KVQ_TYPE_Q2;
    float qg[KVQ_FUSED_ROWS * 256] __attribute__((aligned(64))), qm[KVQ_FUSED_ROWS] = {0};
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
                    __m512 am = _mm512_setzero_ps();
                    for (int c = 0; c < D; c += 16) {
                        __m512 qv = _mm512_loadu_ps(q + (size_t)r * D + c);
                        _mm512_storeu_ps(qg + (size_t)r * D + c, _mm512_mul_ps(qv, load_h16(sm + c)));
                        am = _mm512_fmadd_ps(qv, load_h16(sm + D + c), am);
                    }
                    qm[r] = hsum16(am);
                }
                qq = qg;
            }
            /* two tokens at a time: 2R independent FMA chains hide the FMA latency */
            const bool pair = i + 1 < m && (!grouped || (j + 1) / b->G == cur_group);
            const uint8_t *row0 = b->data + (size_t)j * b->stride, *row1 = row0 + b->stride;
            __m512 a0[KVQ_FUSED_ROWS], a1[KVQ_FUSED_ROWS];
            #pragma GCC unroll 8
            for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm512_setzero_ps();
            if (pair) {
                for (int c = 0; c < D; c += 16) {
                    __m512 x0 = raw16(T, row0, c), x1 = raw16(T, row1, c);
                    #pragma GCC unroll 8
                    for (int r = 0; r < R; r++) {
                        __m512 qv = _mm512_loadu_ps(qq + (size_t)r * D + c);
                        a0[r] = _mm512_fmadd_ps(qv, x0, a0[r]);
                        a1[r] = _mm512_fmadd_ps(qv, x1, a1[r]);
                    }
                }
            } else { /* one token: chains split over even/odd 16-channel chunks (D = 80: one more) */
                int c = 0;
                for (; c + 32 <= D; c += 32) {
                    __m512 x0 = raw16(T, row0, c), x1 = raw16(T, row0, c + 16);
                    #pragma GCC unroll 8
                    for (int r = 0; r < R; r++) {
                        a0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(qq + (size_t)r * D + c), x0, a0[r]);
                        a1[r] = _mm512_fmadd_ps(_mm512_loadu_ps(qq + (size_t)r * D + c + 16), x1, a1[r]);
                    }
                }
                if (c < D) {
                    __m512 x0 = raw16(T, row0, c);
                    #pragma GCC unroll 8
                    for (int r = 0; r < R; r++)
                        a0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(qq + (size_t)r * D + c), x0, a0[r]);
                }
                #pragma GCC unroll 8
                for (int r = 0; r < R; r++) a0[r] = _mm512_add_ps(a0[r], a1[r]);
            }
            for (int t = 0; t < (pair ? 2 : 1); t++)
                #pragma GCC unroll 8
                for (int r = 0; r < R; r++) {
                    __m512 a = t ? a1[r] : a0[r];
                    s[(size_t)r * ss + i0 + i + t] =
                        hsum16(a) * tok_scale(T, b, j + t) + (grouped ? qm[r] : 0.0f);
                }
            i += pair;
        }
    }
}

/* W 16-channel chunks per pass (W = 2 needs D and, for the grouped types, Gv to be multiples of 32) */
AI void value_accum_impl(const kvq_type T, const int R, const int W, const kvq__blk *b, int j0, int n,
                         const float *p, int ps, float *accbuf) {
    const int D = b->D;
    const bool grouped = T == KVQ_TYPE_Q4 || T == KVQ_TYPE_Q2;
    float coef[16][KVQ_FUSED_ROWS][64], minacc[KVQ_FUSED_ROWS][16];
    value_coefs(T, R, b, j0, n, p, ps, coef, minacc);
    for (int c = 0; c < D; c += 16 * W) {
        int g = grouped ? c / b->Gv : 0; /* the W chunks share the group */
        __m512 acc[KVQ_FUSED_ROWS][2];
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++)
            #pragma GCC unroll 2
            for (int u = 0; u < W; u++) acc[r][u] = _mm512_loadu_ps(accbuf + (size_t)r * D + c + 16 * u);
        const uint8_t *row = b->data + (size_t)j0 * b->stride;
        for (int i = 0; i < n; i++, row += b->stride) {
            __m512 x[2];
            #pragma GCC unroll 2
            for (int u = 0; u < W; u++) x[u] = raw16(T, row, c + 16 * u);
            #pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                __m512 cf = _mm512_set1_ps(coef[g][r][i]);
                #pragma GCC unroll 2
                for (int u = 0; u < W; u++) acc[r][u] = _mm512_fmadd_ps(cf, x[u], acc[r][u]);
            }
        }
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++)
            #pragma GCC unroll 2
            for (int u = 0; u < W; u++) {
                __m512 a = acc[r][u];
                if (grouped) a = _mm512_add_ps(a, _mm512_set1_ps(minacc[r][g]));
                _mm512_storeu_ps(accbuf + (size_t)r * D + c + 16 * u, a);
            }
    }
}

/* ---- integer kernels for Q8, Q4 and Q2 (see attn_avx2.c): 32 int16 lanes, vpmaddwd / vpmaddubsw on zmm. A
 * chunk of C channels (Q8 32, Q4 64, Q2 128) is one 32-byte load of a row's codes. */

/* Accumulations in place, in asm as in attn_avx2.c (written with intrinsics, GCC reassociates them into trees
 * of products that spill, or moves the sums between registers). KVQ_SIMD_NO_ASM: the same with intrinsics
 * (for a build that emulates the intrinsics). *a += maddubs(w, x) (int16 lanes): */
AI void acc_maddubs512(__m512i *a, __m512i w, __m512i x) {
#ifndef KVQ_SIMD_NO_ASM
    __m512i t;
    __asm__("vpmaddubsw %[x], %[w], %[t]\n\tvpaddw %[t], %[a], %[a]"
            : [a] "+v"(*a), [t] "=&v"(t)
            : [w] "v"(w), [x] "v"(x));
#else
    *a = _mm512_add_epi16(*a, _mm512_maddubs_epi16(w, x));
#endif
}

/* *a += maddwd(w, x) (int32 lanes) */
AI void acc_maddwd512(__m512i *a, __m512i w, __m512i x) {
#ifndef KVQ_SIMD_NO_ASM
    __m512i t;
    __asm__("vpmaddwd %[x], %[w], %[t]\n\tvpaddd %[t], %[a], %[a]"
            : [a] "+v"(*a), [t] "=&v"(t)
            : [w] "v"(w), [x] "v"(x));
#else
    *a = _mm512_add_epi32(*a, _mm512_madd_epi16(w, x));
#endif
}

/* *a += maddwd(w[0..32), x), w in memory (any alignment; the key kernel's query words are 64-byte aligned:
 * q16 is, and r * D + c + 32u is a multiple of 32) */
AI void acc_maddwd512_m(__m512i *a, const int16_t *w, __m512i x) {
#ifndef KVQ_SIMD_NO_ASM
    __m512i t;
    __asm__("vpmaddwd %[w], %[x], %[t]\n\tvpaddd %[t], %[a], %[a]"
            : [a] "+v"(*a), [t] "=&v"(t)
            : [w] "m"(*(const int16_t(*)[32])w), [x] "v"(x));
#else
    *a = _mm512_add_epi32(*a, _mm512_madd_epi16(_mm512_loadu_si512((const void *)w), x));
#endif
}

/* AVX512-VNNI (vpdpwssd): a read of libgcc's CPU model, which kvq__kernels_avx512 initialized */
#define have_vnni __builtin_cpu_supports("avx512vnni")

/* *a += maddwd(w, x) for the R rows of q16 at position pos: vpdpwssd where the CPU has AVX512-VNNI (one
 * instruction instead of two; the assembler needs no compiler flag for it) */
AI void madd_rows512(const int R, const bool VNNI, __m512i *acc, __m512i x, const int16_t *q16, int D, int pos) {
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        const int16_t *w = q16 + (size_t)r * D + pos;
#ifndef KVQ_SIMD_NO_ASM
        if (VNNI) {
            __asm__("vpdpwssd %[w], %[x], %[a]" : [a] "+v"(acc[r]) : [w] "m"(*(const int16_t(*)[32])w), [x] "v"(x));
            continue;
        }
#endif
        acc_maddwd512_m(&acc[r], w, x);
    }
}

static inline int int_chunk512(kvq_type T) {
    return T == KVQ_TYPE_Q8 ? 32 : T == KVQ_TYPE_Q4 ? 64 : 128;
}

/* Key codes, as in attn_avx2.c: 32 bytes widen to 32 words and each field of a byte (E = 1, 2 or 4 codes per
 * byte) is masked out into its own vector, so lane k of vector u is channel c + k*E + u. The query is
 * permuted to that order ("kernel order", index c + 32u + k) once per work item (and the key scales once per
 * group). */
AI void unpack_keys512(const kvq_type T, const uint8_t *row, int c, __m512i *v) {
    if (T == KVQ_TYPE_Q8) {
        v[0] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(const void *)(row + c)));
        return;
    }
    if (T == KVQ_TYPE_Q4) {
        __m512i x = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(const void *)(row + c / 2)));
        v[0] = _mm512_and_si512(x, _mm512_set1_epi16(15)), v[1] = _mm512_srli_epi16(x, 4);
        return;
    }
    __m512i x = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(const void *)(row + c / 4)));
    __m512i m = _mm512_set1_epi16(3);
    v[0] = _mm512_and_si512(x, m), v[1] = _mm512_and_si512(_mm512_srli_epi16(x, 2), m);
    v[2] = _mm512_and_si512(_mm512_srli_epi16(x, 4), m), v[3] = _mm512_srli_epi16(x, 6);
}

/* KO[E / 4][u][l] = (E * l + u) & 31: the lanes of field u among 16 E channels (E codes per byte), for the two
 * permutes of a field's 16 lanes (to_kernel_order512, k8_group_query) */
static const int32_t KO[2][4][16] __attribute__((aligned(64))) = {
    {{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30},
     {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}},
    {{0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28},
     {1, 5, 9, 13, 17, 21, 25, 29, 1, 5, 9, 13, 17, 21, 25, 29},
     {2, 6, 10, 14, 18, 22, 26, 30, 2, 6, 10, 14, 18, 22, 26, 30},
     {3, 7, 11, 15, 19, 23, 27, 31, 3, 7, 11, 15, 19, 23, 27, 31}}};

/* dst = src (D floats, natural channel order, D a multiple of the chunk) in kernel order; src != dst. Output
 * vector v of a chunk (dst[c + 16v ..], v < 2E) is field u = v / 2, k = 16 (v % 2) + l (l < 16): channels c +
 * E*k + u, which lie in the 16E channels from c + 16E (v % 2); lane l takes channel E*l + u of them, from the
 * first 32 (l < 32/E) or, for E = 4, the next 32 (lanes 8-15). */
static void to_kernel_order512(kvq_type T, const float *src, float *dst, int D) {
    if (T == KVQ_TYPE_Q8) {
        memcpy(dst, src, (size_t)D * sizeof(float));
        return;
    }
    const int E = T == KVQ_TYPE_Q4 ? 2 : 4, C = 32 * E;
    for (int c = 0; c < D; c += C)
        for (int v = 0; v < 2 * E; v++) {
            const int u = v / 2;
            const float *sv = src + c + 16 * E * (v % 2);
            const __m512i idx = _mm512_load_si512((const void *)KO[E / 4][u]);
            __m512 y = _mm512_permutex2var_ps(_mm512_loadu_ps(sv), idx, _mm512_loadu_ps(sv + 16));
            if (E == 4)
                y = _mm512_mask_blend_ps(
                    0xFF00, y,
                    _mm512_permutex2var_ps(_mm512_loadu_ps(sv + 32), idx, _mm512_loadu_ps(sv + 48)));
            _mm512_storeu_ps(dst + c + 16 * v, y);
        }
}

/* acc[r] = 16 int32 partial sums of row r's products with one token's key codes */
AI void key_row_sums512(const kvq_type T, const int R, const bool VNNI, const int D, const uint8_t *row,
                        const int16_t *q16, __m512i *acc) {
    const int C = int_chunk512(T), NX = C / 32;
    /* the query stays in memory (as in attn_avx2.c: hoisted, GCC would copy it to the stack) */
    __asm__("" : "+r"(q16));
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_si512();
    #pragma GCC unroll 8
    for (int c = 0; c < D; c += C) {
        __m512i x[4];
        unpack_keys512(T, row, c, x);
        #pragma GCC unroll 4
        for (int u = 0; u < NX; u++) madd_rows512(R, VNNI, acc, x[u], q16, D, c + 32 * u);
    }
}

/* acc[r] = 16 int32 partial sums of row r's products with one token's Q3 key levels */
AI void q3_row_sums512(const int R, const bool VNNI, const int D, const uint8_t *row, const __m256i tbl,
                       const int16_t *q16, __m512i *acc) {
    __asm__("" : "+r"(q16)); /* the query stays in memory operands (see key_row_sums512) */
    #pragma GCC unroll 4
    for (int r = 0; r < 4; r++) acc[r] = _mm512_setzero_si512();
    int c = 0;
    #pragma GCC unroll 2
    for (; c + 128 <= D; c += 128) {
        __m256i f[4];
        q3_fields128(row, D, c, tbl, f);
        #pragma GCC unroll 4
        for (int u = 0; u < 4; u++) madd_rows512(R, VNNI, acc, _mm512_cvtepu8_epi16(f[u]), q16, D, c + 32 * u);
    }
    if (c < D) {
        __m128i f[4];
        q3_fields64(row, D, c, tbl, f);
        madd_rows512(R, VNNI, acc, _mm512_cvtepu8_epi16(_mm256_set_m128i(f[1], f[0])), q16, D, c);
        madd_rows512(R, VNNI, acc, _mm512_cvtepu8_epi16(_mm256_set_m128i(f[3], f[2])), q16, D, c + 32);
    }
}

/* ---- the integer key sums of 8 tokens, reduced as one tree ----
 * A token's R row sums arrive as R vectors of 16 int32 partial sums ("items" t * R + r). Folding each vector
 * alone (extract, add, then hadds and int_scores_store's transpose) took ~23 operations per token at R = 4, as
 * many as its products. Here 8 tokens' 8R items go through one tree of two-input steps, each of which halves the
 * partials per item and doubles the items per vector (3 operations): two steps within 128-bit lanes (a vector
 * then holds 4 items, lane l of each 128-bit lane item l), two across them (16 items in item order). Integer
 * sums, so the same bits as int_scores_store. */
AI __m512i tree1(__m512i x, __m512i y) { /* per 128-bit lane: x0+x2 y0+y2 x1+x3 y1+y3 */
    return _mm512_add_epi32(_mm512_unpacklo_epi32(x, y), _mm512_unpackhi_epi32(x, y));
}
AI __m512i tree2(__m512i x, __m512i y) { /* of two tree1 results: items x, y, x', y' each summed over the lane */
    return _mm512_add_epi32(_mm512_unpacklo_epi64(x, y), _mm512_unpackhi_epi64(x, y));
}
AI __m512i tree3(__m512i x, __m512i y) { /* 128-bit lanes: x0+x1 x2+x3 y0+y1 y2+y3 */
    return _mm512_add_epi32(_mm512_shuffle_i32x4(x, y, 0x88), _mm512_shuffle_i32x4(x, y, 0xDD));
}

/* Pushes token t's R vectors into the tree (t, R compile-time constants once unrolled) */
AI void tree_push(const int R, int t, const __m512i *acc, __m512i *lv, __m512i *e, __m512i *f, __m512i *g) {
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        const int i = t * R + r;
        lv[i % 4] = acc[r];
        if (i % 4 == 3) e[i / 4] = tree2(tree1(lv[0], lv[1]), tree1(lv[2], lv[3]));
        if (i % 8 == 7) f[i / 8] = tree3(e[i / 4 - 1], e[i / 4]);
        if (i % 16 == 15) g[i / 16] = tree3(f[i / 8 - 1], f[i / 8]);
    }
}

/* s[r * ss + t] for the 8 tokens from row j, R = 1, 2 or 4, from the tree's top (R = 1: f[0], items 0-7 with two
 * partials; else g[0], g[1]: items 0-15, 16-31): as int_scores_store, the same float operations */
AI void tree_store512(const kvq_type T, const int R, const kvq__blk *b, int j, const __m512i *f, const __m512i *g,
                      const kvq__qstate *st, float *s, int ss) {
    const bool grouped = T != KVQ_TYPE_Q8;
    const __m256 ts = grouped ? _mm256_set1_ps(1.0f)
                              : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(b->par + j)));
    if (R == 1) {
        __m256 sc = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm512_castsi512_si256(tree3(f[0], f[0]))),
                                  _mm256_mul_ps(ts, _mm256_set1_ps(st->qs[0])));
        if (grouped) sc = _mm256_add_ps(sc, _mm256_set1_ps(st->qm[0]));
        _mm256_storeu_ps(s, sc);
        return;
    }
    const __m512 ts2 = _mm512_insertf32x8(_mm512_castps256_ps512(ts), ts, 1);
    #pragma GCC unroll 2
    for (int ra = 0; ra < R; ra += 2) {
        /* lanes 0-7: row ra, tokens 0-7; lanes 8-15: row ra + 1 */
        int32_t ix[16];
        #pragma GCC unroll 16
        for (int l = 0; l < 16; l++) ix[l] = (l % 8) * R + ra + l / 8;
        const __m512i idx = _mm512_loadu_si512((const void *)ix);
        __m512i v = R == 2 ? _mm512_permutexvar_epi32(idx, g[0]) : _mm512_permutex2var_epi32(g[0], idx, g[1]);
        const __m512 qs = _mm512_insertf32x8(_mm512_set1_ps(st->qs[ra]), _mm256_set1_ps(st->qs[ra + 1]), 1);
        __m512 sc = _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(ts2, qs));
        if (grouped)
            sc = _mm512_add_ps(sc, _mm512_insertf32x8(_mm512_set1_ps(st->qm[ra]), _mm256_set1_ps(st->qm[ra + 1]), 1));
        _mm256_storeu_ps(s + (size_t)ra * ss, _mm512_castps512_ps256(sc));
        _mm256_storeu_ps(s + (size_t)(ra + 1) * ss, _mm512_extractf32x8_ps(sc, 1));
    }
}

/* The scores of the m (<= 8) tokens of one key segment from token j (kvq_page_layout rows at b->stride): each
 * token's row sums (Q3: its levels looked up in tbl; else its codes unpacked), then a whole segment reduced as one
 * tree, a shorter one token by token as attn_avx2.c's layout (r0 r1 r2 r3 | r0 r1 r2 r3). */
AI void k8_row_sums(const kvq_type T, const int R, const int bpt, const uint8_t *row, const int8_t *q8,
                    __m512i *acc); /* the int8-query row sums of the Q2 keys, below */
/* K8: the row sums of k8_row_sums (an int8 query in st->q8, rows of 64 bytes or more) */
AI void segment_scores512(const kvq_type T, const int R, const int D, const bool VNNI, const kvq__blk *b, int j,
                          int m, const __m256i tbl, kvq__qstate *st, float *s, int ss, const bool K8) {
    const int bpt = T == KVQ_TYPE_Q4 ? D / 2 : D / 4; /* K8's bytes of codes per token */
    const uint8_t *row = b->data + (size_t)j * b->stride;
    if (m == 8 && R != 3) {
        __m512i lv[4], e[8], f[4], g[2];
        #pragma GCC unroll 8
        for (int t = 0; t < 8; t++, row += b->stride) {
            __m512i acc[4];
            if (K8) k8_row_sums(T, R, bpt, row, st->q8, acc);
            else if (T == KVQ_TYPE_Q3) q3_row_sums512(R, VNNI, D, row, tbl, st->q16, acc);
            else key_row_sums512(T, R, VNNI, D, row, st->q16, acc);
            tree_push(R, t, acc, lv, e, f, g);
        }
        tree_store512(T, R, b, j, f, g, st, s, ss);
        return;
    }
    __m256i part[8];
    for (int t = 0; t < m; t++, row += b->stride) {
        __m512i acc[4];
        if (K8) k8_row_sums(T, R, bpt, row, st->q8, acc);
        else if (T == KVQ_TYPE_Q3) q3_row_sums512(R, VNNI, D, row, tbl, st->q16, acc);
        else key_row_sums512(T, R, VNNI, D, row, st->q16, acc);
        /* each row's 16 sums folded to 8 */
        __m256i h[4];
        #pragma GCC unroll 4
        for (int r = 0; r < 4; r++) h[r] = r < R ? fold_epi32(acc[r]) : _mm256_setzero_si256();
        part[t] = _mm256_hadd_epi32(_mm256_hadd_epi32(h[0], h[1]), _mm256_hadd_epi32(h[2], h[3]));
    }
    int_scores_store(T, R, b, j, m, part, st, s, ss);
}

/* DK: the head dim when known at compile time (the channel loop unrolls fully), else 0 */
AI void key_scores_int_impl(const kvq_type T, const int R, const int DK, const bool VNNI, const kvq__blk *b, int j0,
                            int n, const float *q, float *s, int ss, kvq__qstate *st) {
    /* a head dim that is not a multiple of the chunk never gets here (int_ok512): no code for it */
    if (DK % int_chunk512(T)) return;
    const int D = DK ? DK : b->D;
    const bool grouped = T != KVQ_TYPE_Q8;
    if (!st->valid) { /* first block of the work item: Q8 rounds q once, the grouped types permute it once */
        if (grouped)
            for (int r = 0; r < R; r++) to_kernel_order512(T, q + (size_t)r * D, st->qg + (size_t)r * D, D);
        else
            quantize_rows16(q, NULL, R, D, st->q16, st->qs);
        st->valid = 1, st->par = NULL, st->group = -1;
    }
    pfcur pf = pf_start(b, n);
    for (int i0 = 0; i0 < n;) {
        int j = j0 + i0;
        /* up to 8 tokens of one key group; their scores are reduced together (attn_simd.h) */
        const int m = key_segment(T, R, D, b, j, n - i0, q, st, to_kernel_order512);
        pf_step(&pf);
        segment_scores512(T, R, D, VNNI, b, j, m, _mm256_setzero_si256(), st, s + i0, ss, false);
        i0 += m;
    }
}

/* ---- Q2 keys against an int8 query (AVX512-VNNI) ----
 * vpdpbusd takes 64 byte products per instruction, twice vpdpwssd's 32, and the codes meet the query unsigned as
 * they are stored: a token's row is one load and a shift and mask per field, no widening to words. Per key group
 * and row, q' = q * scale is rounded to int8 (one scale per row: its largest |q'| -> 127). That rounding error
 * (half a step) meets the codes centred on qmax / 2: its mean part, qmax / 2 times the sum of the errors, is known
 * per group and comes off q . min. What is left is ~0.05% of Q2's own key error on the output (numpy emulation on
 * Gaussian keys; test_attn bounds it per score and per output). The kernels are written for Q4's nibbles too
 * (E = 2), which k8_bytes does not send here. Rows of 32 bytes (Q2 at D = 128) go two tokens to a vector. */

/* bytes of codes per token where this path takes a block: 32 or a multiple of 64; else 0. Q2 only: Q4 at 32k
 * gained 6% with its caches warm and nothing flushed (its time there is the memory's), and its own key error is
 * small enough that the query's rounding would be ~2% of it (test_attn's data) */
static inline int k8_bytes(const kvq__blk *b) {
    const int bpt = b->type == KVQ_TYPE_Q2 ? b->D / 4 : 0;
    return bpt == 32 || (bpt && bpt % 64 == 0 && bpt <= 128) ? bpt : 0;
}

/* *a += 16 dword sums of 4 products of x's unsigned codes with the 64 signed query bytes at q */
AI void dpbusd_m(__m512i *a, __m512i x, const int8_t *q) {
#ifndef KVQ_SIMD_NO_ASM
    __asm__("vpdpbusd %[q], %[x], %[a]" : [a] "+v"(*a) : [q] "m"(*(const int8_t(*)[64])q), [x] "v"(x));
#else
    *a = _mm512_add_epi32(*a, _mm512_madd_epi16(_mm512_maddubs_epi16(x, _mm512_loadu_si512((const void *)q)),
                                                _mm512_set1_epi16(1)));
#endif
}

/* A new key group: st->q8[r * 256 + f * QB + k] = q' of channel E k + f rounded (QB = max(bytes per token, 64);
 * a 32-byte row's query is stored twice, for both tokens of a vector), st->qs its scale, st->qm = q . min less the
 * centred rounding's mean part */
AI void k8_group_query(const kvq_type T, const int R, const int D, const uint16_t *sm, const float *q,
                       kvq__qstate *st) {
    const int E = T == KVQ_TYPE_Q4 ? 2 : 4, bpt = D / E, QB = bpt < 64 ? 64 : bpt;
    const float cen = T == KVQ_TYPE_Q4 ? 7.5f : 1.5f;
    /* lane l of field f's vector takes channel E l + f of the 16 E channels from c (KO) */
    #pragma GCC unroll 1
    for (int r = 0; r < R; r++) {
        __m512 qp[16], mx = _mm512_setzero_ps(), am = _mm512_setzero_ps(), ps = _mm512_setzero_ps();
        #pragma GCC unroll 16
        for (int c = 0; c < D; c += 16) {
            const __m512 qv = _mm512_loadu_ps(q + (size_t)r * D + c);
            const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(sm + c)));
            const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(sm + D + c)));
            qp[c / 16] = _mm512_mul_ps(qv, s);
            mx = _mm512_max_ps(mx, _mm512_abs_ps(qp[c / 16]));
            am = _mm512_fmadd_ps(qv, mn, am);
            ps = _mm512_add_ps(ps, qp[c / 16]);
        }
        const float amax = _mm512_reduce_max_ps(mx), qs = amax > 0 ? amax / 127.0f : 1.0f;
        const __m512 inv = _mm512_set1_ps(1.0f / qs);
        __m512i sum8 = _mm512_setzero_si512();
        int8_t *dst = st->q8 + (size_t)r * 256;
        #pragma GCC unroll 4
        for (int c = 0; c < D; c += 16 * E) /* 16 lanes per field */
            #pragma GCC unroll 4
            for (int f = 0; f < E; f++) {
                const __m512i idx = _mm512_load_si512((const void *)KO[E / 4][f]);
                const int v = c / 16;
                __m512 y = _mm512_permutex2var_ps(qp[v], idx, qp[v + 1]);
                if (E == 4) y = _mm512_mask_blend_ps(0xFF00, y, _mm512_permutex2var_ps(qp[v + 2], idx, qp[v + 3]));
                /* |.| <= 127 for a finite query; clamped, so that a NaN or infinite one (NaN scores through
                 * q . min) leaves the byte sums bounded */
                const __m512i i32 = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(y, inv)),
                                                                      _mm512_set1_epi32(127)),
                                                     _mm512_set1_epi32(-127));
                sum8 = _mm512_add_epi32(sum8, i32);
                const __m128i i8 = _mm512_cvtepi32_epi8(i32);
                int8_t *o = dst + f * QB + c / E;
                _mm_storeu_si128((__m128i *)(void *)o, i8);
                if (bpt == 32) _mm_storeu_si128((__m128i *)(void *)(o + 32), i8);
            }
        st->qs[r] = qs;
        st->qm[r] = _mm512_reduce_add_ps(am) -
                    cen * (qs * (float)_mm512_reduce_add_epi32(sum8) - _mm512_reduce_add_ps(ps));
    }
}

/* the fields of 64 code bytes: x[f] byte k = code of channel E k + f of those bytes */
AI void k8_fields(const kvq_type T, __m512i v, __m512i *x) {
    const int E = T == KVQ_TYPE_Q4 ? 2 : 4, bits = 8 / E;
    const __m512i m = _mm512_set1_epi8(T == KVQ_TYPE_Q4 ? 15 : 3);
    #pragma GCC unroll 4
    for (int f = 0; f < E; f++) x[f] = _mm512_and_si512(f ? _mm512_srli_epi16(v, f * bits) : v, m);
}

/* acc[r] = 16 int32 partial sums of row r with one token's codes (bpt >= 64 bytes) */
AI void k8_row_sums(const kvq_type T, const int R, const int bpt, const uint8_t *row, const int8_t *q8,
                    __m512i *acc) {
    const int E = T == KVQ_TYPE_Q4 ? 2 : 4;
    __asm__("" : "+r"(q8)); /* the query stays in memory operands (see key_row_sums512) */
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_si512();
    #pragma GCC unroll 2
    for (int j = 0; j < bpt; j += 64) {
        __m512i x[4];
        k8_fields(T, _mm512_loadu_si512((const void *)(row + j)), x);
        #pragma GCC unroll 4
        for (int f = 0; f < E; f++)
            #pragma GCC unroll 4
            for (int r = 0; r < R; r++) dpbusd_m(&acc[r], x[f], q8 + (size_t)r * 256 + f * bpt + j);
    }
}

/* acc[r]: lanes 0-7 partial sums of row r with token A's 32 code bytes, lanes 8-15 with token B's */
AI void k8_pair_sums(const kvq_type T, const int R, const uint8_t *ra, const uint8_t *rb, const int8_t *q8,
                     __m512i *acc) {
    const int E = T == KVQ_TYPE_Q4 ? 2 : 4;
    __asm__("" : "+r"(q8));
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(const void *)ra)),
                                         _mm256_loadu_si256((const __m256i *)(const void *)rb), 1);
    __m512i x[4];
    k8_fields(T, v, x);
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_si512();
    #pragma GCC unroll 4
    for (int f = 0; f < E; f++)
        #pragma GCC unroll 4
        for (int r = 0; r < R; r++) dpbusd_m(&acc[r], x[f], q8 + (size_t)r * 256 + f * 64);
}

/* Where the pair tree below leaves the sum of row r and token t (of 8): item i = (t / 2) R + r went into e[i / 4]
 * at position i % 4 of each 128-bit lane (lanes 0-1 token A's partials, 2-3 token B's), and f[k / 2] =
 * tree3(e[k], e[k + 1]) holds in its 128-bit lane 2 (k % 2) + h the sums of e[k]'s token-h items */
static inline int k8_pair_pos(int R, int r, int t) {
    const int i = (t / 2) * R + r, k = i / 4;
    return 16 * (k / 2) + 4 * (2 * (k % 2) + t % 2) + i % 4;
}

/* the scores of the m <= 8 tokens of one key segment from token j: 32-byte rows, tokens in pairs (the pairs past
 * m read token j's row again; their sums are not stored) */
AI void k8_pair_segment(const kvq_type T, const int R, const kvq__blk *b, int j, int m, const kvq__qstate *st,
                        float *s, int ss) {
    const uint8_t *row = b->data + (size_t)j * b->stride;
    __m512i lv[4], e[4], f[2];
    #pragma GCC unroll 4
    for (int p = 0; p < 4; p++) {
        const int ta = 2 * p < m ? 2 * p : 0, tb = 2 * p + 1 < m ? 2 * p + 1 : 0;
        __m512i acc[4];
        k8_pair_sums(T, R, row + (size_t)ta * b->stride, row + (size_t)tb * b->stride, st->q8, acc);
        #pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const int i = p * R + r;
            lv[i % 4] = acc[r];
            if (i % 4 == 3) e[i / 4] = tree2(tree1(lv[0], lv[1]), tree1(lv[2], lv[3]));
        }
    }
    /* R vectors e (4R items): pairs of them, an odd last one with itself */
    #pragma GCC unroll 2
    for (int k = 0; k < R; k += 2) f[k / 2] = tree3(e[k], e[k + 1 < R ? k + 1 : k]);
    if (R <= 2) f[1] = f[0];
    const __mmask8 keep = (__mmask8)((1u << m) - 1);
    #pragma GCC unroll 2
    for (int ra = 0; ra < R; ra += 2) {
        const int rb = ra + 1 < R ? ra + 1 : ra;
        int32_t ix[16];
        #pragma GCC unroll 16
        for (int l = 0; l < 16; l++) ix[l] = k8_pair_pos(R, l < 8 ? ra : rb, l % 8);
        const __m512i v = _mm512_permutex2var_epi32(f[0], _mm512_loadu_si512((const void *)ix), f[1]);
        const __m512 qs = _mm512_insertf32x8(_mm512_set1_ps(st->qs[ra]), _mm256_set1_ps(st->qs[rb]), 1);
        const __m512 qm = _mm512_insertf32x8(_mm512_set1_ps(st->qm[ra]), _mm256_set1_ps(st->qm[rb]), 1);
        const __m512 sc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), qs, qm);
        _mm256_mask_storeu_ps(s + (size_t)ra * ss, keep, _mm512_castps512_ps256(sc));
        if (ra + 1 < R) _mm256_mask_storeu_ps(s + (size_t)rb * ss, keep, _mm512_extractf32x8_ps(sc, 1));
    }
}

/* DK: the head dim when known at compile time, else 0 */
AI void key_scores_k8_impl(const kvq_type T, const int R, const int DK, const kvq__blk *b, int j0, int n,
                           const float *q, float *s, int ss, kvq__qstate *st) {
    const int D = DK ? DK : b->D, bpt = T == KVQ_TYPE_Q4 ? D / 2 : D / 4;
    if (DK && bpt != 32 && bpt % 64) return; /* never taken (k8_bytes): no code for it */
    if (!st->valid) st->valid = 1, st->par = NULL, st->group = -1;
    pfcur pf = pf_start(b, n);
    for (int i0 = 0; i0 < n;) {
        const int j = j0 + i0;
        if (st->par != b->par || j < st->group * b->G || j >= (st->group + 1) * b->G) {
            k8_group_query(T, R, D, b->par + (size_t)(j / b->G) * 2 * D, q, st);
            st->par = b->par, st->group = j / b->G;
        }
        int m = n - i0 < 8 ? n - i0 : 8;
        if (j + m > (st->group + 1) * b->G) m = (st->group + 1) * b->G - j;
        pf_step(&pf);
        if (bpt == 32) k8_pair_segment(T, R, b, j, m, st, s + i0, ss);
        else segment_scores512(T, R, D, true, b, j, m, _mm256_setzero_si256(), st, s + i0, ss, true);
        i0 += m;
    }
}

/* ---- integer value kernels (the weights are attn_simd.h's, as for AVX2) ---- */

/* one token pair of a Q4/Q2 chunk: a[r][f] += w8 pair of row r x the pair's codes of field f. Word k of a
 * vector holds byte k of the chunk's 32: words 0-15 are the chunk's first C/2 channels, whose weights are
 * wlo, words 16-31 the other C/2 channels, whose weights are whi (another value group when SPLIT). */
AI void grouped_pair512(const kvq_type T, const int R, const bool SPLIT, const uint8_t *row0,
                        const uint8_t *row1, const uint32_t *wlo, const uint32_t *whi, __m512i (*a)[4]) {
    const int NV = T == KVQ_TYPE_Q4 ? 2 : 4, bits = T == KVQ_TYPE_Q4 ? 4 : 2;
    const __m512i nib = _mm512_set1_epi8(T == KVQ_TYPE_Q4 ? 15 : 3);
    /* words (token i byte k, token i+1 byte k): a field of both tokens per byte pair */
    __m512i z = _mm512_or_si512(
        _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(const void *)row0)),
        _mm512_slli_epi16(_mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(const void *)row1)), 8));
    __m512i x[4];
    #pragma GCC unroll 4
    for (int f = 0; f < NV; f++) x[f] = _mm512_and_si512(f == 0 ? z : _mm512_srli_epi16(z, f * bits), nib);
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        __m512i w = _mm512_set1_epi32((int)wlo[(size_t)r * (VW_PAD / 2)]);
        if (SPLIT) w = _mm512_mask_set1_epi32(w, 0xFF00, (int)whi[(size_t)r * (VW_PAD / 2)]);
        #pragma GCC unroll 4
        for (int f = 0; f < NV; f++) acc_maddubs512(&a[r][f], w, x[f]);
    }
}

/* the cnt tokens of one window from `row` (the chunk's bytes of its first token), weights from wlo / whi */
AI void grouped_tokens512(const kvq_type T, const int R, const bool SPLIT, const uint8_t *row, size_t st,
                          int cnt, const uint32_t *wlo, const uint32_t *whi, __m512i (*a)[4]) {
    const uint8_t *end = row + (size_t)(cnt & ~1) * st;
    /* two pairs per turn: half the loop overhead */
    for (; row + 2 * st < end; row += 4 * st, wlo += 2, whi += 2) {
        grouped_pair512(T, R, SPLIT, row, row + st, wlo, whi, a);
        grouped_pair512(T, R, SPLIT, row + 2 * st, row + 3 * st, wlo + 1, whi + 1, a);
    }
    if (row < end) {
        grouped_pair512(T, R, SPLIT, row, row + st, wlo, whi, a);
        row += 2 * st, wlo += 1, whi += 1;
    }
    if (cnt & 1) grouped_pair512(T, R, SPLIT, row, row, wlo, whi, a); /* its second weight is 0 */
}

/* Permutation indices of the flush. Interleaved words of two vectors, from word 0 (IW[0]) or word 16 (IW[1]):
 * IW[h][j] = (j & 1) * 32 + 16h + j / 2. Interleaved dwords, from dword 0 or 8: ID[e][d] = (d & 1) * 16 + 8e
 * + d / 2. */
static const int16_t IW[2][32] = {{0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                   8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47},
                                  {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                   24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63}};
static const int32_t ID[2][16] = {{0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23},
                                  {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31}};

/* acc[0 .. C) += ws * a (+ mn on the last window) for the unsigned 16-bit sums a of row r of a chunk at
 * channel c, whose word k of vector f is channel c + k*E + f (E = 2 for Q4, 4 for Q2); every 16 channels with
 * their value group's ws and mn */
AI void flush512(const kvq_type T, const __m512i *a, const vweights *vw, int r, int c, int Gv, bool last,
                 float *acc) {
    const __m512i w0 = _mm512_loadu_si512((const void *)IW[0]);
    const __m512i w1 = _mm512_loadu_si512((const void *)IW[1]);
    __m512i nat[4]; /* word j of nat[v]: channel c + 32v + j */
    int nn;
    if (T == KVQ_TYPE_Q4) {
        /* channel 2k + f: interleave the words of a[0] and a[1] */
        nat[0] = _mm512_permutex2var_epi16(a[0], w0, a[1]);
        nat[1] = _mm512_permutex2var_epi16(a[0], w1, a[1]);
        nn = 2;
    } else {
        /* channel 4k + f: word pairs (f = 0, 1) and (2, 3) of each k, whose dwords then interleave */
        const __m512i d0 = _mm512_loadu_si512((const void *)ID[0]);
        const __m512i d1 = _mm512_loadu_si512((const void *)ID[1]);
        __m512i p01l = _mm512_permutex2var_epi16(a[0], w0, a[1]);
        __m512i p01h = _mm512_permutex2var_epi16(a[0], w1, a[1]);
        __m512i p23l = _mm512_permutex2var_epi16(a[2], w0, a[3]);
        __m512i p23h = _mm512_permutex2var_epi16(a[2], w1, a[3]);
        nat[0] = _mm512_permutex2var_epi32(p01l, d0, p23l);
        nat[1] = _mm512_permutex2var_epi32(p01l, d1, p23l);
        nat[2] = _mm512_permutex2var_epi32(p01h, d0, p23h);
        nat[3] = _mm512_permutex2var_epi32(p01h, d1, p23h);
        nn = 4;
    }
    #pragma GCC unroll 4
    for (int v = 0; v < nn; v++)
        #pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const int g = (c + 32 * v + 16 * h) / Gv;
            __m256i x = h ? _mm512_extracti64x4_epi64(nat[v], 1) : _mm512_castsi512_si256(nat[v]);
            float *o = acc + 32 * v + 16 * h;
            __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(x));
            __m512 y = _mm512_fmadd_ps(f, _mm512_set1_ps(vw->s.ws[g][r]), _mm512_loadu_ps(o));
            _mm512_storeu_ps(o, last ? _mm512_add_ps(y, _mm512_set1_ps(vw->s.mn[g][r])) : y);
        }
}

AI void value_accum_grouped512(const kvq_type T, const int R, const kvq__blk *b, int j0, int n,
                               const float *p, int ps, float *accbuf) {
    const int D = b->D, C = int_chunk512(T), NV = T == KVQ_TYPE_Q4 ? 2 : 4;
    vweights vw;
    value_weights8(T, R, b, j0, n, p, ps, (uint32_t *)vw.w8, &vw.s);
    const size_t st = b->stride;
    for (int k = 0; k < vw.s.nwin; k++) {
        const int i0 = vw.s.win[k], i1 = vw.s.win[k + 1];
        const bool last = k == vw.s.nwin - 1;
        for (int c = 0; c < D; c += C) {
            /* the chunk's halves' value groups (Gv is a multiple of C / 2) */
            const int g0 = c / b->Gv, g1 = (c + C / 2) / b->Gv;
            __m512i a[4][4];
            #pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                #pragma GCC unroll 4
                for (int f = 0; f < NV; f++) a[r][f] = _mm512_setzero_si512();
            const uint8_t *row = b->data + (size_t)(j0 + i0) * st + (T == KVQ_TYPE_Q4 ? c / 2 : c / 4);
            /* windows start at multiples of 16 tokens: whole pairs */
            const uint32_t *wlo = &vw.w8[g0][0][i0 / 2], *whi = &vw.w8[g1][0][i0 / 2];
            if (g0 == g1)
                grouped_tokens512(T, R, false, row, st, i1 - i0, wlo, wlo, a);
            else
                grouped_tokens512(T, R, true, row, st, i1 - i0, wlo, whi, a);
            #pragma GCC unroll 4
            for (int r = 0; r < R; r++) flush512(T, a[r], &vw, r, c, b->Gv, last, accbuf + (size_t)r * D + c);
        }
    }
    top_fixup(T, R, b, j0, &vw.s, accbuf);
}

/* one token pair of a Q8 chunk's 32 channels: a[r][0..1] += weight pair of row r x the pair's int16 codes.
 * The byte interleave works in 128-bit lanes: a[r][0] holds channels 0-7 and 16-23, a[r][1] 8-15, 24-31. */
AI void q8_pair512(const int R, const uint8_t *row0, const uint8_t *row1, const int16_t *w16,
                   __m512i (*a)[2]) {
    __m256i x0 = _mm256_loadu_si256((const __m256i *)(const void *)row0);
    __m256i x1 = _mm256_loadu_si256((const __m256i *)(const void *)row1);
    __m512i lo = _mm512_cvtepi8_epi16(_mm256_unpacklo_epi8(x0, x1));
    __m512i hi = _mm512_cvtepi8_epi16(_mm256_unpackhi_epi8(x0, x1));
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        int32_t pairw;
        memcpy(&pairw, w16 + (size_t)r * (64 + 16), 4);
        __m512i w = _mm512_set1_epi32(pairw);
        acc_maddwd512(&a[r][0], w, lo), acc_maddwd512(&a[r][1], w, hi);
    }
}

AI void value_accum_q8_512(const int R, const kvq__blk *b, int j0, int n, const float *p, int ps,
                           float *accbuf) {
    const int D = b->D;
    int16_t c16[4][64 + 16] __attribute__((aligned(32)));
    float cs[4];
    q8_weights(R, b, j0, n, p, ps, c16, cs);
    /* channels 0-15 and 16-31 from the two halves of q8_pair512's sums */
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const size_t st = b->stride;
    for (int c = 0; c < D; c += 32) {
        __m512i a[4][2];
        #pragma GCC unroll 4
        for (int r = 0; r < R; r++) a[r][0] = a[r][1] = _mm512_setzero_si512();
        const uint8_t *row = b->data + (size_t)j0 * st + c, *end = row + (size_t)(n & ~1) * st;
        const int16_t *w16 = &c16[0][0];
        /* two pairs per turn: half the loop overhead */
        for (; row + 2 * st < end; row += 4 * st, w16 += 4) {
            q8_pair512(R, row, row + st, w16, a);
            q8_pair512(R, row + 2 * st, row + 3 * st, w16 + 2, a);
        }
        if (row < end) {
            q8_pair512(R, row, row + st, w16, a);
            row += 2 * st, w16 += 2;
        }
        if (n & 1) q8_pair512(R, row, row, w16, a); /* an odd n's last token, with itself at weight 0 */
        #pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            float *o = accbuf + (size_t)r * D + c;
            __m512 s = _mm512_set1_ps(cs[r]);
            __m512 f0 = _mm512_cvtepi32_ps(a[r][0]), f1 = _mm512_cvtepi32_ps(a[r][1]);
            __m512 y0 = _mm512_permutex2var_ps(f0, first, f1), y1 = _mm512_permutex2var_ps(f0, second, f1);
            _mm512_storeu_ps(o, _mm512_fmadd_ps(y0, s, _mm512_loadu_ps(o)));
            _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(y1, s, _mm512_loadu_ps(o + 16)));
        }
    }
}

AI void value_accum_int_impl(const kvq_type T, const int R, const kvq__blk *b, int j0, int n, const float *p,
                             int ps, float *accbuf) {
    if (T == KVQ_TYPE_Q8)
        value_accum_q8_512(R, b, j0, n, p, ps, accbuf);
    else
        value_accum_grouped512(T, R, b, j0, n, p, ps, accbuf);
}

/* ---- Q3 (kvq.h section 5) on zmm: attn_avx2.c's byte-shuffle decode (attn_simd.h), then the int16 dot products
 * on 32 lanes, half the instructions of the 256-bit ones. D a multiple of 64 (keys) and value groups of whole
 * 32-channel chunks; other shapes and more than 4 rows take the AVX2 Q3 kernels. */

/* The query's order for Q3 keys: per 128 channels from c, position c + 32u + k (k < 16) holds channel c + 4k + u
 * and c + 32u + 16 + k channel c + 64 + 4k + u (field u of q3_fields128's two lanes widened to one zmm); a last 64
 * channels (D = 64, 192) as AVX2 (position c + 16u + k: channel c + 4k + u, two fields per zmm) */
static void q3_order512(kvq_type T, const float *src, float *dst, int D) {
    (void)T;
    /* position c + 32u + 16h + k holds channel c + 64h + 4k + u: Q2's kernel order on zmm, built in registers
     * (through to_kernel_order's 32-byte stores, each 64-byte load below waited for two stores to retire) */
    if (D % 128 == 0) {
        to_kernel_order512(KVQ_TYPE_Q2, src, dst, D);
        return;
    }
    float t[256] __attribute__((aligned(64)));
    to_kernel_order(KVQ_TYPE_Q2, src, t, D); /* position c + 16u + k of each 64 channels: channel c + 4k + u */
    int c = 0;
    for (; c + 128 <= D; c += 128)
        for (int u = 0; u < 4; u++) {
            _mm512_storeu_ps(dst + c + 32 * u, _mm512_loadu_ps(t + c + 16 * u));
            _mm512_storeu_ps(dst + c + 32 * u + 16, _mm512_loadu_ps(t + c + 64 + 16 * u));
        }
    if (c < D) memcpy(dst + c, t + c, 64 * sizeof(float));
}

AI void q3_key_scores512_impl(const int R, const int DK, const bool VNNI, const kvq__blk *b, int j0, int n,
                              const float *q, float *s, int ss, kvq__qstate *st) {
    const int D = DK ? DK : b->D;
    const __m256i tbl = q3_table(b->lv16);
    if (!st->valid) {
        for (int r = 0; r < R; r++) q3_order512(KVQ_TYPE_Q3, q + (size_t)r * D, st->qg + (size_t)r * D, D);
        st->valid = 1, st->par = NULL, st->group = -1;
    }
    pfcur pf = pf_start(b, n);
    for (int i0 = 0; i0 < n;) {
        int j = j0 + i0;
        const int m = key_segment(KVQ_TYPE_Q3, R, D, b, j, n - i0, q, st, q3_order512);
        pf_step(&pf);
        segment_scores512(KVQ_TYPE_Q3, R, D, VNNI, b, j, m, tbl, st, s + i0, ss, false);
        i0 += m;
    }
}

/* Values: the segment's rows decoded to level bytes (channel order), then per 32 channels of value group g and token
 * pair, acc[r] += ws * (w16 pair of row r) . (the pair's level bytes as words) as in value_accum_q8_512 (lanes:
 * channels 0-7 and 16-23, then 8-15 and 24-31), + sum p * min */
AI void q3_value_accum512_impl(const int R, const int DK, const bool VNNI, const kvq__blk *b, int j0, int n,
                               const float *p, int ps, float *accbuf) {
    const int D = DK ? DK : b->D, Gv = b->Gv;
    const __m256i tbl = q3_table(b->lv16);
    /* row n: the partner of an odd n's last token, at weight 0 (its bytes never matter: integer products) */
    uint8_t lv[65][256] __attribute__((aligned(64)));
    for (int i = 0; i < n; i++) q3_row_lv(b->data + (size_t)(j0 + i) * b->stride, D, b->lv16, tbl, lv[i]);
    q3weights qw;
    q3_value_weights(R, b, j0, n, p, ps, &qw);
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int c = 0; c < D; c += 32) {
        const int g = c / Gv;
        __m512i a[4][2];
        #pragma GCC unroll 4
        for (int r = 0; r < R; r++) a[r][0] = a[r][1] = _mm512_setzero_si512();
        for (int i = 0; i < n; i += 2) {
            __m256i x0 = _mm256_load_si256((const __m256i *)(const void *)(lv[i] + c));
            __m256i x1 = _mm256_load_si256((const __m256i *)(const void *)(lv[i + 1] + c));
            __m512i lo = _mm512_cvtepu8_epi16(_mm256_unpacklo_epi8(x0, x1));
            __m512i hi = _mm512_cvtepu8_epi16(_mm256_unpackhi_epi8(x0, x1));
            #pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                int32_t pw;
                memcpy(&pw, &qw.w16[g][r][i], 4);
                const __m512i w = _mm512_set1_epi32(pw);
#ifndef KVQ_SIMD_NO_ASM
                if (VNNI) {
                    __asm__("vpdpwssd %[x], %[w], %[a]" : [a] "+v"(a[r][0]) : [w] "v"(w), [x] "v"(lo));
                    __asm__("vpdpwssd %[x], %[w], %[a]" : [a] "+v"(a[r][1]) : [w] "v"(w), [x] "v"(hi));
                    continue;
                }
#endif
                acc_maddwd512(&a[r][0], w, lo), acc_maddwd512(&a[r][1], w, hi);
            }
        }
        #pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            float *o = accbuf + (size_t)r * D + c;
            const __m512 sv = _mm512_set1_ps(qw.ws[g][r]), mv = _mm512_set1_ps(qw.mn[g][r]);
            __m512 f0 = _mm512_cvtepi32_ps(a[r][0]), f1 = _mm512_cvtepi32_ps(a[r][1]);
            __m512 y0 = _mm512_permutex2var_ps(f0, first, f1), y1 = _mm512_permutex2var_ps(f0, second, f1);
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_fmadd_ps(y0, sv, _mm512_loadu_ps(o)), mv));
            _mm512_storeu_ps(o + 16, _mm512_add_ps(_mm512_fmadd_ps(y1, sv, _mm512_loadu_ps(o + 16)), mv));
        }
    }
}


/* IMPL(R, DK, VNNI, ...) for rows 1 .. 4, D = 128 unrolled (DK = 128) or any (DK = 0), with or without AVX512-VNNI */
/* clang-format off */
#define Q3_CALL(IMPL, R, ...)                                                                                  \
    if (b->D == 128) {                                                                                         \
        if (have_vnni) IMPL(R, 128, true, __VA_ARGS__);                                                        \
        else IMPL(R, 128, false, __VA_ARGS__);                                                                 \
    } else if (have_vnni) IMPL(R, 0, true, __VA_ARGS__);                                                       \
    else IMPL(R, 0, false, __VA_ARGS__);
#define Q3_DISPATCH(IMPL, ...)                                                                                 \
    switch (rows) {                                                                                            \
    case 1: Q3_CALL(IMPL, 1, __VA_ARGS__) break;                                                               \
    case 2: Q3_CALL(IMPL, 2, __VA_ARGS__) break;                                                               \
    case 3: Q3_CALL(IMPL, 3, __VA_ARGS__) break;                                                               \
    default: Q3_CALL(IMPL, 4, __VA_ARGS__) break;                                                              \
    }
/* clang-format on */

static void q3_key_scores512(const kvq__blk *b, int j0, int n, const float *q, int rows, float *s, int ss,
                             kvq__qstate *st) {
    Q3_DISPATCH(q3_key_scores512_impl, b, j0, n, q, s, ss, st)
}

/* Q3 values: 8-bit weights where the shape takes them (attn_simd.h: vpdpbusd on ymm where the CPU has
 * AVX512-VNNI), else the int16 weights above */
static void q3_value_accum512(const kvq__blk *b, int j0, int n, const float *p, int ps, int rows, float *acc) {
    if (q3_w8_fits(b, rows)) Q3_DISPATCH(q3_value_accum8_impl, b, j0, n, p, ps, acc)
    else Q3_DISPATCH(q3_value_accum512_impl, b, j0, n, p, ps, acc)
}
#undef Q3_DISPATCH
#undef Q3_CALL

/* The 512-bit integer kernels: whole 512-bit chunks, value groups that hold whole half chunks (one weight
 * broadcast per half). */
static bool int_ok512(const kvq__blk *b, int rows) {
    int C = int_chunk512(b->type);
    return int_fits(b, rows, C, C / 2);
}

/* ... else the AVX2 integer kernels (half chunks), which the AVX2 table runs */
static bool int_ok_avx2(const kvq__blk *b, int rows) {
    int C = int_chunk512(b->type) / 2;
    return int_fits(b, rows, C, C);
}

/* Q2 keys with an int8 query (a function of its own, so that the other types' dispatch below stays as it was) */
__attribute__((noinline)) static void key_scores_k8(const kvq__blk *b, int j0, int n, const float *q, int rows,
                                                    float *s, int ss, kvq__qstate *st) {
#define K8(T, R)                                                                                               \
    if (b->D == 128) key_scores_k8_impl(T, R, 128, b, j0, n, q, s, ss, st);                                    \
    else key_scores_k8_impl(T, R, 0, b, j0, n, q, s, ss, st)
    INT_ROWS_SWITCH(K8, KVQ_TYPE_Q2)
#undef K8
}

static void key_scores_avx512(const kvq__blk *b, int j0, int n, const float *q, int rows, float *s, int ss,
                              kvq__qstate *st) {
    if (b->type == KVQ_TYPE_Q3) { /* Q3: the zmm kernels where the shape fits them, else the AVX2 ones */
        if (rows <= 4 && b->D % 64 == 0) q3_key_scores512(b, j0, n, q, rows, s, ss, st);
        else kvq__kernels_avx2_table()->key_scores(b, j0, n, q, rows, s, ss, st);
        return;
    }
    if (nu_blk(b)) {
        key_scores_levels(dots_avx512, b, j0, n, q, rows, s, ss);
        return;
    }
    if (int_ok512(b, rows) && have_vnni && k8_bytes(b)) {
        key_scores_k8(b, j0, n, q, rows, s, ss, st);
        return;
    }
    if (int_ok512(b, rows)) {
        /* the common head dims get a fully unrolled channel loop */
#define KI128(T, R)                                                                                            \
    if (have_vnni) key_scores_int_impl(T, R, 128, true, b, j0, n, q, s, ss, st);                               \
    else key_scores_int_impl(T, R, 128, false, b, j0, n, q, s, ss, st)
#define KI64(T, R) key_scores_int_impl(T, R, 64, false, b, j0, n, q, s, ss, st)
#define KI(T, R) key_scores_int_impl(T, R, 0, false, b, j0, n, q, s, ss, st)
        if (b->D == 128) {
            INT_TYPE_SWITCH(KI128)
        } else if (b->D == 64) {
            INT_TYPE_SWITCH(KI64)
        } else {
            INT_TYPE_SWITCH(KI)
        }
#undef KI128
#undef KI64
#undef KI
        return;
    }
    if (int_ok_avx2(b, rows)) {
        kvq__kernels_avx2_table()->key_scores(b, j0, n, q, rows, s, ss, st);
        return;
    }
#define KS(T, R) key_scores_impl(T, R, b, j0, n, q, s, ss)
    TYPE_SWITCH(KS)
#undef KS
}

static void value_accum_avx512(const kvq__blk *b, int j0, int n, const float *p, int ps, int rows,
                               float *acc) {
    if (b->type == KVQ_TYPE_Q3) { /* Q3: the zmm kernels where the shape fits them, else the AVX2 ones */
        /* (the shapes of the 8-bit weights, q3_w8_fits, are among these) */
        if (rows <= 4 && b->D % 32 == 0 && b->Gv % 32 == 0) q3_value_accum512(b, j0, n, p, ps, rows, acc);
        else kvq__kernels_avx2_table()->value_accum(b, j0, n, p, ps, rows, acc);
        return;
    }
    if (nu_blk(b)) {
        value_accum_levels(axpys_avx512, b, j0, n, p, ps, rows, acc);
        return;
    }
    if (int_ok512(b, rows)) {
#define VI(T, R) value_accum_int_impl(T, R, b, j0, n, p, ps, acc)
        INT_TYPE_SWITCH(VI)
#undef VI
        return;
    }
    if (int_ok_avx2(b, rows)) {
        kvq__kernels_avx2_table()->value_accum(b, j0, n, p, ps, rows, acc);
        return;
    }
    const bool grouped = b->type == KVQ_TYPE_Q4 || b->type == KVQ_TYPE_Q2;
    if (rows <= 4 && b->D % 32 == 0 && (!grouped || b->Gv % 32 == 0)) {
        /* R <= 4: two 16-channel chunks per pass, so 2R independent FMA chains hide the FMA latency */
#define VA(T, R) value_accum_impl(T, R, 2, b, j0, n, p, ps, acc)
        TYPE_SWITCH4(VA)
#undef VA
        return;
    }
#define VA(T, R) value_accum_impl(T, R, 1, b, j0, n, p, ps, acc)
    TYPE_SWITCH(VA)
#undef VA
}

/* pre-RoPE keys: y[c] = x[c] C[c] + x[partner] S[c] (kvq__rope_rows_ref); chunks of 16 lanes, the last one masked
 * (NeoX halves of D = 80: 40 lanes) */
static void rope_avx512(float *x, int n, int D, int neox, const float *C, const float *S) {
    const int h = D / 2;
    for (int i = 0; i < n; i++, x += D, C += D, S += D) {
        if (neox)
            for (int c = 0; c < h; c += 16) {
                __mmask16 k = first_n(h - c);
                __m512 a = _mm512_maskz_loadu_ps(k, x + c), b = _mm512_maskz_loadu_ps(k, x + c + h);
                _mm512_mask_storeu_ps(x + c, k, _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(k, C + c),
                                                                _mm512_mul_ps(b, _mm512_maskz_loadu_ps(k, S + c))));
                _mm512_mask_storeu_ps(x + c + h, k, _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(k, C + c + h),
                                                                    _mm512_mul_ps(a, _mm512_maskz_loadu_ps(k, S + c + h))));
            }
        else
            for (int c = 0; c < D; c += 16) { /* D is a multiple of 16; partners are neighbours */
                __m512 a = _mm512_loadu_ps(x + c), b = _mm512_permute_ps(a, 0xB1);
                _mm512_storeu_ps(x + c, _mm512_fmadd_ps(a, _mm512_loadu_ps(C + c), _mm512_mul_ps(b, _mm512_loadu_ps(S + c))));
            }
    }
}

/* Pre-RoPE keys stored rotated: unrot_rope_avx2's algorithm on 16 lanes (stages h = 1 .. 8 inside a vector, h >= 16
 * between vectors; the same fp32 steps as kvq__rot_apply, so R^T x has the same bits). NeoX halves of D = 80
 * (40 channels) do not fall on vector bounds: the AVX2 kernel takes them. */
AI void fwht_inv16(__m512 *v, const int nv, const __m512 f) {
    const __m512 s1 = _mm512_setr_ps(1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1);
    const __m512 s2 = _mm512_setr_ps(1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1);
    const __m512 s4 = _mm512_setr_ps(1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1);
    const __m512 s8 = _mm512_setr_ps(1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1);
    #pragma GCC unroll 32
    for (int k = 0; k < nv; k++) {
        __m512 a = _mm512_mul_ps(v[k], f);
        a = _mm512_fmadd_ps(a, s1, _mm512_permute_ps(a, 0xB1));
        a = _mm512_fmadd_ps(a, s2, _mm512_permute_ps(a, 0x4E));
        a = _mm512_fmadd_ps(a, s4, _mm512_shuffle_f32x4(a, a, 0xB1)); /* 128-bit lanes 1 0 3 2 */
        v[k] = _mm512_fmadd_ps(a, s8, _mm512_shuffle_f32x4(a, a, 0x4E)); /* 2 3 0 1 */
    }
    #pragma GCC unroll 32
    for (int h = 1; h < nv; h <<= 1)
        #pragma GCC unroll 32
        for (int k = 0; k < nv; k += 2 * h)
            #pragma GCC unroll 32
            for (int j = k; j < k + h; j++) {
                __m512 a = v[j], b = v[j + h];
                v[j] = _mm512_add_ps(a, b), v[j + h] = _mm512_sub_ps(a, b);
            }
}

AI void unrot_rope_rows16(float *x, int n, const int D, const __mmask16 *sg, int neox, const float *C, const float *S) {
    const int nv = D / 16, hv = nv / 2;
    const __m512 neg = _mm512_set1_ps(-0.0f);
    for (int i = 0; i < n; i++, x += D, C += D, S += D) {
        __m512 v[16];
        #pragma GCC unroll 32
        for (int k = 0; k < nv; k++) v[k] = _mm512_loadu_ps(x + 16 * k);
        if (!(D & (D - 1))) {
            fwht_inv16(v, nv, _mm512_set1_ps(kvq__rot_scale(D)));
        } else { /* D = 80, 96: blocks of 64 and D - 64 (kvq__rot_apply) */
            fwht_inv16(v, 4, _mm512_set1_ps(kvq__rot_scale(64)));
            fwht_inv16(v + 4, nv - 4, _mm512_set1_ps(kvq__rot_scale(D - 64)));
        }
        #pragma GCC unroll 32
        for (int k = 0; k < nv; k++) v[k] = _mm512_mask_xor_ps(v[k], sg[k], v[k], neg);
        if (neox) /* D != 80: D/2 is a multiple of 16 */
            #pragma GCC unroll 32
            for (int k = 0; k < hv; k++) {
                __m512 a = v[k], b = v[k + hv];
                _mm512_storeu_ps(x + 16 * k, _mm512_fmadd_ps(a, _mm512_loadu_ps(C + 16 * k), _mm512_mul_ps(b, _mm512_loadu_ps(S + 16 * k))));
                _mm512_storeu_ps(x + 16 * (k + hv), _mm512_fmadd_ps(b, _mm512_loadu_ps(C + 16 * (k + hv)),
                                                                    _mm512_mul_ps(a, _mm512_loadu_ps(S + 16 * (k + hv)))));
            }
        else
            #pragma GCC unroll 32
            for (int k = 0; k < nv; k++) {
                __m512 a = v[k], b = _mm512_permute_ps(a, 0xB1);
                _mm512_storeu_ps(x + 16 * k, _mm512_fmadd_ps(a, _mm512_loadu_ps(C + 16 * k), _mm512_mul_ps(b, _mm512_loadu_ps(S + 16 * k))));
            }
    }
}

static void unrot_rope_avx512(float *x, int n, const kvq__rot *r, int neox, const float *C, const float *S) {
    if (neox && r->D == 80) {
        kvq__kernels_avx2_table()->unrot_rope(x, n, r, neox, C, S);
        return;
    }
    __mmask16 sg[16]; /* the sign bits of channels 16k .. 16k + 15 */
    for (int k = 0; k < r->D / 16; k++) sg[k] = (__mmask16)(r->s[k >> 2] >> ((k & 3) * 16));
    switch (r->D) { /* a constant D: the vectors stay in registers */
    case 64: unrot_rope_rows16(x, n, 64, sg, neox, C, S); break;
    case 80: unrot_rope_rows16(x, n, 80, sg, neox, C, S); break;
    case 96: unrot_rope_rows16(x, n, 96, sg, neox, C, S); break;
    case 128: unrot_rope_rows16(x, n, 128, sg, neox, C, S); break;
    default: unrot_rope_rows16(x, n, 256, sg, neox, C, S); break; /* the cache's head dims: 64, 80, 96, 128, 256 */
    }
}

static void p8_expand_avx512(uint16_t base, int qmax, const uint8_t *k, const uint8_t *z, int n, uint16_t *s_out,
                             uint16_t *m_out, int os) {
    kvq__kernels_avx2_table()->p8_expand(base, qmax, k, z, n, s_out, m_out, os); /* a few pairs per block: 256 bits do */
}

/* 8-bit window rows: 16 at a time, as w8_expand_avx2 (D = 80: a tail of 16 still) */
static void w8_expand_avx512(const int8_t *q, uint16_t scale, int n, uint16_t *out) {
    const __m512 s = _mm512_set1_ps(_cvtsh_ss(scale));
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(const void *)(q + i))));
        _mm256_storeu_si256((__m256i *)(void *)(out + i), _mm512_cvtps_ph(_mm512_mul_ps(x, s), _MM_FROUND_TO_NEAREST_INT));
    }
    if (i < n) kvq__kernels_avx2_table()->w8_expand(q + i, scale, n - i, out + i);
}

static const kvq__kernels avx512 = {"avx512",     decode_avx512,     dots_avx512,
                                    axpys_avx512, exp_sum_avx512,    max_avx512,
                                    scale_avx512, key_scores_avx512, value_accum_avx512,
                                    rope_avx512,  unrot_rope_avx512, p8_expand_avx512,
                                    w8_expand_avx512};

const kvq__kernels *kvq__kernels_avx512(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && kvq__kernels_avx2_table())
        return &avx512;
    return NULL;
}
#else
const kvq__kernels *kvq__kernels_avx512(void) {
    return NULL;
}
#endif

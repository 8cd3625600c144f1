/* Attention kernel interface: the driver in attn.c walks pages and windows, the kernels (scalar _ref in attn.c,
 * AVX2 in attn_avx2.c, AVX-512 in attn_avx512.c) decode rows and do the arithmetic. A "block" is any run of token
 * rows of one head in one format: a page's key or value block, or the fp16 residual window (row stride H*D). */
#ifndef KVQ_ATTN_H
#define KVQ_ATTN_H

#include "internal.h"

typedef struct kvq__blk {
    kvq_type type;
    kvq_role role;
    const uint8_t *data; /* row 0 */
    size_t stride;       /* bytes between rows */
    const uint16_t *par; /* params of the block (NULL for F16/BF16), indexed by the row number */
    const uint8_t *lv16; /* grouped types: decode levels, x = scale * lv16[q] / 16 + min (kvq__levels16); else NULL */
    int D, G, Gv;
    /* Key blocks: the key and value blocks the driver reads next (NULL: none), which key_scores prefetches spread
     * over its tokens, and their sizes in 64-byte lines */
    const uint8_t *pf_k, *pf_v;
    int pf_k_lines, pf_v_lines;
    /* the block's outliers (kvq.h section 5; NULL: none): the driver adds them, the kernels never see them */
    const uint16_t *ores;
    const uint8_t *oidx;
} kvq__blk;

#define KVQ_TILE 8 /* rows decoded at a time */

/* Per work item state of the fused key kernels: the query rounded to int16 once (Q8) or once per key group (Q4,
 * Q2: q * scale), not once per block; qg holds the query in the kernel's channel order. The driver zeroes `valid`
 * when a work item starts. */
typedef struct kvq__qstate {
    int valid;
    int group;           /* key group the quantized q' belongs to (grouped types) */
    const uint16_t *par; /* ... of the block with these params */
    float qs[4], qm[4];
    union { /* a block meets one of them: the int16 query, or the AVX512-VNNI Q2 key kernels' int8 one (a state
             * 1 KB larger made Q4's decode 5% slower at 32k) */
        int16_t q16[4 * 256] __attribute__((aligned(64))); /* a 512-bit kernel's chunks are whole cache lines */
        int8_t q8[4 * 256] __attribute__((aligned(64)));
    };
    float qg[4 * 256];
    /* the driver's (attn.c, outlier_scores): the query transposed, qo[4 c + r] = q[r][c] (0 for r >= rows), made
     * when qo_valid is 0 (zeroed with valid) */
    int qo_valid;
    float qo[4 * 256] __attribute__((aligned(16)));
} kvq__qstate;
#define KVQ_FUSED_ROWS 8

typedef struct kvq__kernels {
    const char *name;
    /* out[i][c] = value of row j0 + i, i < n <= KVQ_TILE */
    void (*decode)(const kvq__blk *b, int j0, int n, float *out);
    /* s[r * ss + i] = dot(q[r], x[i]) for r < rows, i < n */
    void (*dots)(const float *q, int rows, int D, const float *x, int n, float *s, int ss);
    /* acc[r] += sum_i p[r * ps + i] * x[i] */
    void (*axpys)(const float *p, int ps, int rows, int D, const float *x, int n, float *acc);
    /* in place: x[i] = exp(x[i] - m), returns their sum */
    float (*exp_sum)(float *x, int n, float m);
    /* max of x[0..n), n >= 1; NaN if any x[i] is NaN */
    float (*max)(const float *x, int n);
    /* in place: x[i] *= s, i < n (a multiple of 8) */
    void (*scale)(float *x, int n, float s);
    /* Optional fused forms for up to KVQ_FUSED_ROWS rows, which read the block's bytes once, in registers:
     * s[r * ss + i] = dot(q[r], row j0 + i) and acc[r] += sum_i p[r * ps + i] * row j0 + i, for i < n <= 64. */
    void (*key_scores)(const kvq__blk *b, int j0, int n, const float *q, int rows, float *s, int ss,
                       kvq__qstate *st);
    void (*value_accum)(const kvq__blk *b, int j0, int n, const float *p, int ps, int rows, float *acc);
    /* pre-RoPE keys: x[n][D] in place, row i rotated by the tables C, S + i * D (kvq__rope_tables) */
    void (*rope)(float *x, int n, int D, int neox, const float *C, const float *S);
    /* pre-RoPE keys stored rotated: x[n][r->D] in place, each row taken back through the key rotation (R^T x, as
     * kvq__rot_apply with inverse = 1: the same fp32 operations, so the same bits), then rotated as by `rope` */
    void (*unrot_rope)(float *x, int n, const kvq__rot *r, int neox, const float *C, const float *S);
    /* 8-bit group parameters (kvq.h section 5) to fp16 pairs, n a multiple of 8: as kvq__p8_expand_ref, to the bit */
    kvq__p8_expand_fn p8_expand;
    /* 8-bit window rows (kvq.h section 10) to fp16, n a multiple of 8: as kvq__w8_expand_ref, to the bit */
    kvq__w8_expand_fn w8_expand;
} kvq__kernels;

extern const kvq__kernels kvq__kernels_ref;
const kvq__kernels *kvq__kernels_avx2(void); /* NULL when not compiled in or the CPU lacks AVX2/FMA/F16C */
/* The AVX2 table without the CPU check (NULL when not compiled in): the AVX-512 kernels call it for the
 * shapes whose chunks a 512-bit register does not fit */
const kvq__kernels *kvq__kernels_avx2_table(void);
/* NULL when not compiled in or the CPU lacks AVX-512 F/BW/VL/DQ (or AVX2/FMA) */
const kvq__kernels *kvq__kernels_avx512(void);

#endif

/* Internal declarations shared by the core's translation units. Not installed. */
#ifndef KVQ_INTERNAL_H
#define KVQ_INTERNAL_H

#include "kvq.h"

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

/* ---- errors: record a message for kvq_last_error() and return the code ---- */
#define kvq__fail kvq_set_error
#define KVQ_CHECK_NULL(p, fn)                                                                               \
    do {                                                                                                   \
        if (!(p)) return kvq__fail(KVQ_ERR_NULL, "%s: argument '%s' is NULL", fn, #p);                      \
    } while (0)

/* ---- host allocation: every allocation of the core goes through these (errors.c), so that a test can make the
 * n-th one fail and check that each failure path returns KVQ_ERR_OUT_OF_MEMORY with the cache unchanged and
 * nothing leaked. kvq__alloc_fail_in: 0 = off; n > 0 = the n-th allocation from now on this thread fails.
 * Thread-local: attention allocates on the calling thread only, before its parallel region. Tests only. */
extern _Thread_local int64_t kvq__alloc_fail_in;
void *kvq__malloc(size_t n);
void *kvq__calloc(size_t n, size_t size);
void *kvq__realloc(void *p, size_t n);
void *kvq__aligned_alloc(size_t align, size_t n); /* n: a multiple of align */

/* ---- half precision: round to nearest even, as the hardware converters do ---- */
static inline float kvq__f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t kvq__f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* rounds past 65504 */
    if (ax < 0x38800000u) { /* result is subnormal or zero: let the FPU round (x * 2^24 exact in fp32 range) */
        float af;
        memcpy(&af, &ax, 4);
        float r = af * 16777216.0f; /* units of 2^-24 */
        uint32_t m = (uint32_t)nearbyintf(r);
        return (uint16_t)(sign | m);
    }
    uint32_t e = ((ax >> 23) - 112) << 10, m = (ax >> 13) & 0x3ff;
    uint32_t h = e | m;
    uint32_t rest = ax & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

static inline float kvq__bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t kvq__f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40);
    x += 0x7fff + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}

static inline float kvq__round_f16(float f) { return kvq__f16_to_f32(kvq__f32_to_f16(f)); }

/* element i of a K/V array the caller passed in dtype (kvq_append, kvq_attn_prefill_exact) */
static inline float kvq__load_elem(kvq_dtype dt, const void *base, size_t i) {
    switch (dt) {
    case KVQ_DTYPE_F16: return kvq__f16_to_f32(((const uint16_t *)base)[i]);
    case KVQ_DTYPE_BF16: return kvq__bf16_to_f32(((const uint16_t *)base)[i]);
    default: return ((const float *)base)[i];
    }
}

/* E4M3 (fn variant: no Inf, max 448) */
extern float kvq__e4m3_table[256];
void kvq__init_tables(void);
uint8_t kvq__f32_to_e4m3(float f);

/* ---- quantizers (quant.c): the scalar reference formats of kvq.h section 5 ---- */
/* Decode levels of a grouped type: code q means x = scale * lv16[q] / 16 + min, lv16[q] in 0 .. 16 * (2^b - 1).
 * Multiples of 1/16, so that SIMD kernels look them up as small integers (a byte shuffle) and keep integer dot
 * products. The uniform table (lv16[q] = 16 q) is the format of KVQ_LAYOUT_VERSION 1. NULL for other types. */
const uint8_t *kvq__levels16(kvq_type t, bool nonuniform);
/* The levels a layout's role uses (NULL for non-grouped types). */
static inline const uint8_t *kvq__layout_levels(const kvq_page_layout *L, kvq_role role) {
    kvq_type t = role == KVQ_KEY ? L->type_k : L->type_v;
    return kvq__levels16(t, (L->nonuniform >> role) & 1);
}
/* ---- 8-bit group parameters (kvq.h section 5, `params8`) ----
 * A group's (scale, min) as two bytes under a base b (fp16, one per G tokens of a block): scale = fp16(b 2^(-k/16)),
 * min = fp16(scale (z - Z0) u), u = 2^-(7 - bits), Z0 = 128 + qmax / (2 u) (a group centred on 0 has z = 128).
 * kvq__p8_scale / kvq__p8_min are the decode every reader must reproduce to the bit: fp32 products (exact but for the
 * one rounding of b 2^(-(k % 16) / 16)), then fp16 rounding to nearest even. */
extern const float kvq__p8_frac[16]; /* fp32(2^(-i/16)), i < 16 */
/* the zero point's unit 2^-(7 - bits) of a scale: its reach (128 units either way) is the same in ranges for every
 * type; Q4 at Q3's 1/16 clamped 10% of SmolLM2's groups (KLD +92% against fp16 pairs, 1/8: +15%; docs/quality.md) */
static inline int kvq__p8_zbits(int qmax) { return qmax == 15 ? 3 : qmax == 7 ? 4 : 5; }
static inline float kvq__p8_unit(int qmax) { return 1.0f / (float)(1 << kvq__p8_zbits(qmax)); }
static inline int kvq__p8_zero(int qmax) { return 128 + (qmax << (kvq__p8_zbits(qmax) - 1)); }
static inline float kvq__p8_scale(float base, int k) {
    static const float p2[16] = {1.0f,          0x1p-1f,  0x1p-2f,  0x1p-3f,  0x1p-4f,  0x1p-5f,  0x1p-6f,  0x1p-7f,
                                 0x1p-8f,       0x1p-9f,  0x1p-10f, 0x1p-11f, 0x1p-12f, 0x1p-13f, 0x1p-14f, 0x1p-15f};
    float f = base * kvq__p8_frac[k & 15];
    return kvq__round_f16(f * p2[k >> 4]);
}
static inline float kvq__p8_min(float scale, int z, int qmax) {
    /* the products are exact: 11 x 9 significant bits, then a power of two */
    return kvq__round_f16(scale * (float)(z - kvq__p8_zero(qmax)) * kvq__p8_unit(qmax));
}
/* The base of n groups given each group's value range [lo[i], hi[i]]: 4x the largest scale any of them needs (room for
 * Q-Norm's scale and for a zero point at the end of its range), in fp16, at most 65504 */
float kvq__p8_base(const float *lo, const float *hi, int n, int qmax);
/* fp16 (scale, min) of n groups from their codes k[i], z[i]: s_out[i * os], m_out[i * os] (the scalar reference of the
 * kernel tables' p8_expand) */
void kvq__p8_expand_ref(uint16_t base, int qmax, const uint8_t *k, const uint8_t *z, int n, uint16_t *s_out,
                        uint16_t *m_out, int os);
/* Whether the layout stores `role`'s group parameters in 8 bits */
static inline bool kvq__p8(const kvq_page_layout *L, kvq_role role) { return (L->params8 >> role) & 1; }
/* (scale, min) pairs of a grouped block: one per key group and channel, or per token and value group */
static inline size_t kvq__param_pairs(kvq_role role, int P, int D, int G, int Gv) {
    return role == KVQ_KEY ? (size_t)(P / G) * (size_t)D : (size_t)P * (size_t)(D / Gv);
}
/* halves of a block's parameters expanded to fp16 (the layout of kvq.h section 5 without params8) */
static inline size_t kvq__params_halves(const kvq_page_layout *L, kvq_role role) {
    return 2 * kvq__param_pairs(role, L->page_tokens, L->head_dim, L->group, L->value_group);
}
/* A params8 block's parameters expanded to fp16 (the format the kernels read), groups [g0, g1) of G tokens only,
 * group g at out + (g - g0) 2 n (kvq__params_halves in all for the whole block); `expand`: a kernel table's
 * p8_expand or kvq__p8_expand_ref */
typedef void (*kvq__p8_expand_fn)(uint16_t base, int qmax, const uint8_t *k, const uint8_t *z, int n, uint16_t *s_out,
                                  uint16_t *m_out, int os);
void kvq__p8_expand_block(const kvq_page_layout *L, kvq_role role, const uint8_t *block, int g0, int g1,
                          kvq__p8_expand_fn expand, uint16_t *out);
/* A params8 block's section: bases[P/G] (fp16), then per group of G tokens k[n] and z[n] (n = D for keys, G D/Gv for
 * values, entry t (D/Gv) + j for token t of the group, value group j) */
static inline uint16_t *kvq__p8_bases(const kvq_page_layout *L, kvq_role role, uint8_t *block) {
    return (uint16_t *)(void *)(block + (role == KVQ_KEY ? L->k_row_bytes : L->v_row_bytes) * (size_t)L->page_tokens);
}
static inline int kvq__p8_group_n(const kvq_page_layout *L, kvq_role role) {
    return role == KVQ_KEY ? L->head_dim : L->group * (L->head_dim / L->value_group);
}
static inline uint8_t *kvq__p8_codes(const kvq_page_layout *L, kvq_role role, uint8_t *block, int g) {
    return (uint8_t *)(kvq__p8_bases(L, role, block) + L->page_tokens / L->group) + (size_t)g * 2 * kvq__p8_group_n(L, role);
}

/* Where a grouped quantizer puts 8-bit parameters (NULL: fp16 only): the base, and the code arrays k[], z[] indexed as
 * the fp16 pairs are (keys: channel c; values: the row's group j at k[j]); the fp16 pairs are written as well (decoded) */
typedef struct kvq__p8q {
    float base;
    uint8_t *k, *z;
} kvq__p8q;
/* Per-token types and grouped values: quantize one row of D values into `row` (+ its params at `par`); lv16: the
 * grouped type's levels (kvq__levels16), ignored by the other types; qnorm: grouped (scale, min) matched to the group's
 * mean and standard deviation (kvq.h section 10, `qnorm`) instead of min/max. ores / oidx (grouped types; NULL: no
 * outliers): the row's D / value_group outlier entries (kvq.h section 5). */
void kvq__quant_row(kvq_type t, const uint8_t *lv16, bool qnorm, const float *x, int D, int value_group, uint8_t *row,
                    uint16_t *par, uint16_t *ores, uint8_t *oidx, const kvq__p8q *p8);
/* Grouped keys: quantize G rows (x: G rows of stride D) into G data rows + scale[D], min[D]; ores / oidx (NULL: no
 * outliers): the group's D outlier entries. */
void kvq__quant_key_group(kvq_type t, const uint8_t *lv16, bool qnorm, const float *x, int G, int D, uint8_t *rows,
                          size_t row_bytes, uint16_t *scale_min, uint16_t *ores, uint8_t *oidx, const kvq__p8q *p8);
/* Dequantize row j of a block whose params start at `par` (NULL for F16/BF16) into o[0..D). */
void kvq__dequant_row(kvq_type t, const uint8_t *lv16, kvq_role role, const uint8_t *row, const uint16_t *par, int j,
                      int D, int G, int Gv, float *o);
/* Dequantize rows [t0, t1) of a block (page slot indices) into out[(t - t0) * out_stride + c]. */
void kvq__dequant_block(const kvq_page_layout *L, kvq_role role, const uint8_t *block, int t0, int t1,
                        float *out, size_t out_stride);
size_t kvq__row_bytes(kvq_type t, int D);
/* Grouped keys, one channel: quantizes channel c of G rows (x: stride D) into its codes in `rows` (which the caller
 * zeroed) and scale_min[c], scale_min[D + c]; deq[i] = the value row i reads back as (its outlier's residual added).
 * ores / oidx (NULL: no outliers): the channel's outlier entry. The building block of SQuat. */
void kvq__quant_key_channel(kvq_type t, const uint8_t *lv16, bool qnorm, const float *x, int G, int D, int c,
                            uint8_t *rows, size_t row_bytes, uint16_t *scale_min, float *deq, uint16_t *ores,
                            uint8_t *oidx, const kvq__p8q *p8);
/* params of a block start right after its P data rows */
static inline const uint16_t *kvq__block_params(const uint8_t *block, size_t row_bytes, int P) {
    return (const uint16_t *)(const void *)(block + row_bytes * (size_t)P);
}
int kvq__value_group(int D, int G);

/* ---- dense-and-sparse outliers (kvq.h sections 5 and 10, `outliers`) ---- */
/* Entries of a block's outlier section: one per key group and channel, or per token and value group; 0 for roles
 * without outliers */
static inline size_t kvq__outlier_count(const kvq_page_layout *L, kvq_role role) {
    if (!((L->outliers >> role) & 1)) return 0;
    return role == KVQ_KEY ? (size_t)(L->page_tokens / L->group) * (size_t)L->head_dim
                           : (size_t)L->page_tokens * (size_t)(L->head_dim / L->value_group);
}
size_t kvq__outlier_offset(const kvq_page_layout *L, kvq_role role);
/* Sets L->params8 and L->outliers (the grouped roles of each set) and the block and page sizes that follow */
void kvq__layout_set_sections(kvq_page_layout *L, int params8, int outliers);
/* A block's residuals (fp16) and index bytes; NULL for a role without outliers */
static inline const uint16_t *kvq__outlier_res(const kvq_page_layout *L, kvq_role role, const uint8_t *block) {
    return kvq__outlier_count(L, role) ? (const uint16_t *)(const void *)(block + kvq__outlier_offset(L, role)) : NULL;
}
static inline const uint8_t *kvq__outlier_idx(const kvq_page_layout *L, kvq_role role, const uint8_t *block) {
    return kvq__outlier_count(L, role) ? block + kvq__outlier_offset(L, role) + 2 * kvq__outlier_count(L, role) : NULL;
}
/* Adds the outliers of block rows [j0, j0 + n) to their dense decode x[i][D] (row j0 + i). res, idx: the block's
 * outlier section; G, Gv: the layout's groups */
void kvq__outliers_add_rows(kvq_role role, const uint16_t *res, const uint8_t *idx, int j0, int n, int D, int G, int Gv,
                            float *x, size_t x_stride);

/* ---- the cache's internals, shared by cache.c and attn.c ---- */
typedef struct kvq_seq_layer {
    int32_t *pages;    /* page ids, token order */
    int32_t n_pages;
    int32_t cap_pages;
    int64_t paged;     /* tokens in pages */
    int64_t dropped;   /* leading paged tokens whose pages kvq_seq_drop_front released (pages[i] = -1 for
                        * i < dropped / P; a multiple of P); they are no longer readable */
    int32_t win;       /* tokens in the window */
    int32_t wcap;      /* rows allocated in wk and wv: grows with the window (doubling), at most W; 0: NULL */
    uint8_t *wk, *wv;  /* [wcap] rows of kvq__win_row_bytes: fp16 [H][D], or 8-bit (cfg.window8: kvq__win_put) */
    /* attention sinks (kvq.h section 10): tokens 0 .. sink-1, exact fp16 in arena pages of their own; sink page i
     * holds tokens i*SR .. i*SR+SR-1: key rows fp16 [SR][H][D], then value rows [SR][H][D]. Pages and window hold
     * the tokens after them, so sink < S implies paged == 0 and win == 0. */
    int32_t *spages;   /* [SP] sink page ids (NULL when S = 0) */
    int32_t n_spages;
    int32_t sink;      /* tokens in sink pages, 0 .. S */
} kvq_seq_layer;

typedef struct kvq_seq {
    bool live;
    kvq_seq_layer *layers; /* [n_layers] */
    /* SQuat key subspaces (kvq.h section 10; squat.c): NULL until the first kvq_seq_set_key_subspace, then one block
     * of [n_layers][H] bases of D x r floats in the stored (rotated) key frame, followed by [n_layers][H] flags
     * (uint8_t: 1 = set) */
    float *squat;
} kvq_seq;

struct kvq_cache {
    kvq_cache_config cfg;
    kvq_page_layout L;
    int W;  /* window capacity: R + G */
    int Gf; /* tokens flushed at once: G for grouped caches, 1 otherwise */
    int S;  /* sink tokens per (sequence, layer) (cfg.sinks) */
    int SR; /* sink rows per sink page: page_bytes / (2 * H * D * 2) */
    int SP; /* sink pages per (sequence, layer) when full: ceil(S / SR) */
    uint8_t *arena;
    int64_t n_pages;
    int32_t *refcnt;    /* [n_pages] */
    int32_t *free_list; /* stack of free page ids */
    int64_t n_free;
    kvq_seq *seqs; /* [max_seqs] */
    int n_live;
    /* pre-RoPE keys (kvq.h section 10; NULL when cfg.prerope = 0): rope_f [D/2] inverse frequencies (cfg.rope_freqs
     * points here), rope_kc / rope_ks [KVQ_ROPE_STEPS][D/2] cos / sin(k f_i): a segment's angles are its first
     * position's (sincos in double) advanced by these (angle addition), no table sized by the capacity */
    float *rope_f, *rope_kc, *rope_ks;
    int32_t *rot_layers; /* the copy of cfg.rotation_layers, or NULL */
    kvq_thread_pool pool; /* kvq_cache_set_thread_pool; run NULL: OpenMP */
};

#define KVQ_ROPE_STEPS 64 /* tokens of one attention segment (attn.c SEG) */
/* Fills the cache's RoPE tables from cfg (prerope = 1); KVQ_ERR_OUT_OF_MEMORY leaves them NULL (attn.c) */
kvq_status kvq__rope_init(kvq_cache *c);
/* RoPE of the segment of n <= KVQ_ROPE_STEPS tokens at positions t0 ..: C[k][c], S[k][c] such that
 * RoPE(t0 + k) x = x[c] C[k][c] + x[partner(c)] S[k][c], partner(c) = c ^ 1 (adjacent pairs) or c +- D/2 (NeoX) */
void kvq__rope_tables(const kvq_cache *c, int64_t t0, int n, float *C, float *S);
/* x[n][D] in place: RoPE by the tables of kvq__rope_tables (the scalar reference of the kernels' rope) */
void kvq__rope_rows_ref(float *x, int n, int D, int neox, const float *C, const float *S);

/* the number layer's rotation signs are seeded with (kvq_cache_config.rotation_layers) */
static inline int kvq__rot_layer(const kvq_cache *c, int layer) {
    return c->cfg.rotation_layers ? c->cfg.rotation_layers[layer] : layer;
}
static inline uint8_t *kvq__page(const kvq_cache *c, int32_t id) {
    return c->arena + (size_t)id * c->L.page_bytes;
}
static inline uint8_t *kvq__kblock(const kvq_cache *c, int32_t page, int h) {
    return kvq__page(c, page) + c->L.k_offset + (size_t)h * c->L.k_block_bytes;
}
static inline uint8_t *kvq__vblock(const kvq_cache *c, int32_t page, int h) {
    return kvq__page(c, page) + c->L.v_offset + (size_t)h * c->L.v_block_bytes;
}
/* sink page `pg`: key row r of head h, value rows after the SR key rows */
static inline uint16_t *kvq__sink_k(const kvq_cache *c, int32_t pg, int r, int h) {
    return (uint16_t *)(void *)kvq__page(c, pg) + ((size_t)r * c->L.n_kv_heads + h) * c->L.head_dim;
}
static inline uint16_t *kvq__sink_v(const kvq_cache *c, int32_t pg, int r, int h) {
    return kvq__sink_k(c, pg, r, h) + (size_t)c->SR * c->L.n_kv_heads * c->L.head_dim;
}
static inline int64_t kvq__seq_len(const kvq_seq_layer *sl) { return sl->sink + sl->paged + sl->win; }

/* ---- residual window rows (kvq.h section 7): fp16 [H][D], or for the roles in cfg.window8 int8 codes [H][D] then
 * fp16 scales [H] (symmetric, scale = fp16(max |x| / 127)); an 8-bit element decodes to fp16(code * scale), so
 * attention (the kernel tables' w8_expand, bit-identical to kvq__w8_expand_ref), kvq_read and the flush to pages all
 * see the same value ---- */
static inline bool kvq__win8(const kvq_cache *c, kvq_role role) { return (c->cfg.window8 >> role) & 1; }
static inline size_t kvq__win_row_bytes(const kvq_cache *c, kvq_role role) {
    size_t HD = (size_t)c->L.n_kv_heads * c->L.head_dim;
    return kvq__win8(c, role) ? HD + 2 * (size_t)c->L.n_kv_heads : 2 * HD;
}
/* row r of a role's window */
static inline uint8_t *kvq__win_row(const kvq_cache *c, const kvq_seq_layer *sl, kvq_role role, int64_t r) {
    return (role == KVQ_KEY ? sl->wk : sl->wv) + (size_t)r * kvq__win_row_bytes(c, role);
}
/* out[i] = fp16(q[i] * scale), i < n (a multiple of 8): an 8-bit window row's head to fp16 (kernel tables' w8_expand) */
typedef void (*kvq__w8_expand_fn)(const int8_t *q, uint16_t scale, int n, uint16_t *out);
void kvq__w8_expand_ref(const int8_t *q, uint16_t scale, int n, uint16_t *out);
/* the codes and the fp16 scale of head h in an 8-bit window row */
static inline const int8_t *kvq__win8_codes(const kvq_cache *c, const uint8_t *row, int h) {
    return (const int8_t *)row + (size_t)h * c->L.head_dim;
}
static inline uint16_t kvq__win8_scale(const kvq_cache *c, const uint8_t *row, int h) {
    uint16_t s;
    memcpy(&s, row + (size_t)c->L.n_kv_heads * c->L.head_dim + 2 * (size_t)h, 2);
    return s;
}
/* Stores one token's x[H][D] (finite, within fp16) into a window row */
void kvq__win_put(const kvq_cache *c, kvq_role role, uint8_t *row, const float *x);
/* Head h of a window row: fp16 [D], or fp32 [D] (the same values) */
void kvq__win_get_f16(const kvq_cache *c, kvq_role role, const uint8_t *row, int h, uint16_t *out);
void kvq__win_get_f32(const kvq_cache *c, kvq_role role, const uint8_t *row, int h, float *out);
kvq_status kvq__check_seq(const kvq_cache *c, int32_t seq, const char *fn);

/* ---- randomized Hadamard rotation (rotate.c, kvq.h section 10) ---- */
#define KVQ_ROT_SIGN_WORDS 4 /* one sign bit per channel, D <= 256 */
typedef struct kvq__rot {
    uint64_t s[KVQ_ROT_SIGN_WORDS];
    int D;
} kvq__rot;
/* The rotation of (layer, role) for a seed (0: the default seed) and head dimension D. */
void kvq__rot_init(kvq__rot *r, uint32_t seed, int layer, kvq_role role, int D);
/* x[0..D) <- R x (inverse = 0) or R^T x (inverse = 1), in place, O(D log D). */
void kvq__rot_apply(const kvq__rot *r, float *x, int inverse);
/* 1 / sqrt(n) of a Hadamard block of n = 16 .. 256 channels, as an fp32 constant: the SIMD un-rotation (the kernel
 * tables' unrot_rope) multiplies by the same value as kvq__rot_apply, so that both round alike */
static inline float kvq__rot_scale(int n) {
    static const float inv_sqrt[9] = {1.0f, 0.70710678f, 0.5f, 0.35355339f, 0.25f, 0.17677670f, 0.125f, 0.08838835f,
                                      0.0625f};
    return inv_sqrt[__builtin_ctz((unsigned)n)];
}
/* Sign bit b of the rotation (1: channel b is negated) */
static inline int kvq__rot_sign(const kvq__rot *r, int b) { return (int)((r->s[b >> 6] >> (b & 63)) & 1); }
/* Whether the cache stores `role` rotated. */
static inline bool kvq__rotated(const kvq_cache *c, kvq_role role) { return (c->cfg.rotate >> role) & 1; }
/* Row i of K or V (D values of a kvq_dtype array) as the cache holds it, in x: finite and within fp16, then rotated
 * where the role is and within fp16 again, else KVQ_ERR_NONFINITE (fn and tail in the message); cache.c */
kvq_status kvq__kv_row_in(const kvq_cache *c, kvq_role role, const kvq__rot *rot, kvq_dtype dtype, const void *src,
                          size_t i, float *x, const char *fn, const char *tail);
kvq_status kvq__check_layer(const kvq_cache *c, int layer, const char *fn);

/* ---- SQuat keys (squat.c, kvq.h section 10) ---- */
/* Bytes of a sequence's subspace block (0 when squat_rank = 0) */
size_t kvq__squat_bytes(const kvq_cache *c);
/* The stored-frame basis of (q, layer, h), D x r, or NULL when none is set */
const float *kvq__squat_basis(const kvq_cache *c, const kvq_seq *q, int layer, int h);
/* doubles of scratch kvq__squat_key_group_ref needs (D x D) */
static inline size_t kvq__squat_scratch_doubles(int D) { return (size_t)D * D; }
/* SQuat quantization of one key group: as kvq__quant_key_group, but channel by channel in order, each channel's
 * error (per token) propagated into the channels not yet quantized so as to minimize e^T (B B^T + lambda I) e per
 * token (GPTQ / OBQ with the inverse Cholesky factor of that matrix). x (G x D) is overwritten (the updated values);
 * B: D x r orthonormal; work: kvq__squat_scratch_doubles(D) doubles. ores / oidx (NULL: no outliers): the group's D
 * outlier entries; an outlier's error is its residual's rounding, so nearly nothing of it is propagated. */
void kvq__squat_key_group_ref(kvq_type t, const uint8_t *lv16, bool qnorm, float *x, int G, int D, const float *B, int r,
                              float lambda, uint8_t *rows, size_t row_bytes, uint16_t *scale_min, double *work,
                              uint16_t *ores, uint8_t *oidx, const kvq__p8q *p8);
/* lambda the cache uses (the config's, or the auto rule) */
float kvq__squat_lambda(const kvq_cache *c);

#endif

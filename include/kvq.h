/*
 * kvq.h: the public C API of libkvq, a quantized, paged key/value cache for LLM inference with attention
 * computed directly on the quantized bytes.
 *
 * This header is the manual. Read it top to bottom once.
 *
 * ---------------------------------------------------------------------------------------------------------
 * 1. Model
 * ---------------------------------------------------------------------------------------------------------
 * A kvq_cache holds keys and values for `n_layers` layers x `n_kv_heads` heads x `head_dim` channels, for up to
 * `max_seqs` sequences at once. Keys and values have their own storage type (kvq_type), like llama.cpp's
 * type_k / type_v. Storage is a single arena of `arena_bytes`, cut into fixed-size pages; each page holds
 * `page_tokens` tokens of one layer (all of its KV heads, keys then values). Every (sequence, layer) owns a
 * list of pages. Pages are reference counted: a forked sequence shares its parent's pages and copies a page only
 * when it writes into it (copy on write).
 *
 * Grouped types (Q4, Q2: KIVI-style) quantize keys per channel over groups of G tokens, so the newest tokens
 * wait in an fp16 "residual window" until a whole group is there. The window of each (sequence, layer) holds
 * between R and R+G-1 of the newest tokens exactly (fp16; fewer right after a truncate); when it reaches R+G
 * tokens the oldest G are quantized into pages. Caches whose types are all per-token (F16, BF16, Q8, FP8) use
 * G = 1, so R = 0 means every token goes straight to its page. Windows live on the heap, outside the arena, and grow
 * with what they hold (capacity doubling, at most R + G rows; none before a sequence's first token, none at all with
 * R = 0 and per-token types), so a short sequence's resident bytes track its tokens; kvq_cache_get_stats reports the
 * bytes allocated. With attention sinks (section 10) the first S tokens of every (sequence, layer) come before all
 * of that: exact fp16, in arena pages of their own (sink pages, section 5), and the pages and the window hold the
 * tokens after them.
 *
 * ---------------------------------------------------------------------------------------------------------
 * 2. Ownership, threading, errors
 * ---------------------------------------------------------------------------------------------------------
 * - Every object created by kvq_*_create is released by the matching kvq_*_free. Free functions accept NULL.
 *   Pointers passed in are borrowed for the duration of the call only.
 * - A kvq_cache is not internally locked. Calls that take `const kvq_cache *` (attention, read back, stats,
 *   lengths) may run concurrently with each other; calls that take `kvq_cache *` need exclusive access.
 *   Attention uses up to `n_threads` OpenMP threads internally. libgomp's threads spin for a while after each
 *   parallel region by default; an engine that runs its own threads (or BLAS) between attention calls should hand
 *   its thread pool to the cache (kvq_cache_set_thread_pool, section 9) or set OMP_WAIT_POLICY=PASSIVE before the
 *   process starts, or those threads lose their cores to the spinning.
 * - Every entry point validates its arguments. On error it returns a negative kvq_status, changes nothing in
 *   the cache (all checks, including page availability, are made before the first byte is written), and
 *   records a message saying what was wrong, readable with kvq_last_error() on the same thread.
 * - NaN/Inf in K/V: rejected. kvq_append returns KVQ_ERR_NONFINITE and appends nothing (no token of any
 *   sequence in the call). Finite values beyond the fp16 range (|x| > 65504) are rejected the same way, because
 *   the residual window and the F16 type store fp16. Queries are not rejected: a query head whose row holds NaN or
 *   +-Inf (after the attention scale), or whose logits are NaN or +-Inf in fp32 (overflow), gets NaN in all of its
 *   head_dim outputs, whatever the kernel table; the other heads and queries of the call are unaffected (bit for
 *   bit with the scalar kernels; with the SIMD ones up to fp32 summation order, see tests/test_softmax.c).
 *
 * ---------------------------------------------------------------------------------------------------------
 * 3. Versions
 * ---------------------------------------------------------------------------------------------------------
 * KVQ_VERSION_* give the header's version, kvq_version_number() the library's. The kvq_type enum and the
 * kvq_status codes are append-only: values never change meaning. Page byte layouts (section 5) are versioned
 * with KVQ_LAYOUT_VERSION; a change bumps it.
 */
#ifndef KVQ_H
#define KVQ_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVQ_VERSION_MAJOR 0
#define KVQ_VERSION_MINOR 1
#define KVQ_VERSION_PATCH 0
#define KVQ_VERSION_NUMBER (KVQ_VERSION_MAJOR * 10000 + KVQ_VERSION_MINOR * 100 + KVQ_VERSION_PATCH)
#define KVQ_LAYOUT_VERSION 2

#if defined(_WIN32)
#define KVQ_API __declspec(dllexport)
#else
#define KVQ_API __attribute__((visibility("default")))
#endif

KVQ_API unsigned kvq_version_number(void);
KVQ_API const char *kvq_version_string(void);

/* ---------------------------------------------------------------------------------------------------------
 * Errors
 * ------------------------------------------------------------------------------------------------------- */
typedef enum kvq_status {
    KVQ_OK = 0,
    KVQ_ERR_NULL = -1,                 /* a required pointer argument was NULL */
    KVQ_ERR_INVALID_ARG = -2,          /* a scalar argument is out of its documented range */
    KVQ_ERR_UNSUPPORTED_TYPE = -3,     /* kvq_type unknown, reserved, or not allowed in this role */
    KVQ_ERR_UNSUPPORTED_HEAD_DIM = -4, /* head_dim not in {64, 80, 96, 128, 256} */
    KVQ_ERR_SHAPE = -5,                /* a layer, head count or length does not match the cache */
    KVQ_ERR_NO_SEQ = -6,               /* sequence id unknown or already freed */
    KVQ_ERR_CACHE_FULL = -7,           /* not enough free pages for the whole call */
    KVQ_ERR_TOO_MANY_SEQS = -8,        /* max_seqs sequences already live */
    KVQ_ERR_NONFINITE = -9,            /* NaN, Inf or |x| > 65504 in K or V */
    KVQ_ERR_OUT_OF_MEMORY = -10,       /* a host allocation failed */
    KVQ_ERR_RANGE = -11,               /* token range outside the sequence */
    KVQ_ERR_CUDA = -12,                /* a CUDA runtime call failed (message has the CUDA error) */
    KVQ_ERR_NO_DEVICE = -13,           /* no usable GPU, or the library was built without CUDA */
    KVQ_ERR_IO = -14,                  /* a file could not be opened, read or mapped */
    KVQ_ERR_FORMAT = -15,              /* a file is corrupt: bad magic, version, offset, size or count */
    KVQ_ERR_TRUNCATED = -16,           /* a file ends before the data it declares */
    KVQ_ERR_INTERNAL = -17             /* a bug in kvq: please report it */
} kvq_status;

/* Short fixed description of a code ("cache full"). Never NULL. */
KVQ_API const char *kvq_strerror(kvq_status s);
/* Message of the last failing call on this thread, with the specifics ("append: seq 3 layer 2: 40 pages
 * needed, 12 free"). Empty string if none. Valid until the next kvq call on this thread. */
KVQ_API const char *kvq_last_error(void);
/* For code layered on kvq (the GGUF/model library, the CUDA backend, bindings), so that one kvq_last_error() tells
 * what failed whatever the layer: records a printf-style message for this thread and returns `s`. */
KVQ_API kvq_status kvq_set_error(kvq_status s, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* The same with a va_list, for layers that wrap it in their own printf-style helper. Arguments may include
 * kvq_last_error() itself ("while loading: %s"). */
KVQ_API kvq_status kvq_set_error_v(kvq_status s, const char *fmt, va_list ap);

/* ---------------------------------------------------------------------------------------------------------
 * 4. Types
 * ------------------------------------------------------------------------------------------------------- */
typedef enum kvq_type {
    KVQ_TYPE_F16 = 0,  /* IEEE half: the baseline */
    KVQ_TYPE_BF16 = 1, /* bfloat16 */
    KVQ_TYPE_Q8 = 2,   /* int8 symmetric, one fp16 scale per token per head */
    KVQ_TYPE_FP8 = 3,  /* fp8 E4M3, one fp16 scale per token per head */
    KVQ_TYPE_Q4 = 4,   /* 4-bit asymmetric KIVI: keys per channel over G tokens, values per token over G channels */
    KVQ_TYPE_Q2 = 5,   /* 2-bit asymmetric KIVI, same grouping as Q4 */
    KVQ_TYPE_Q3 = 6,   /* 3-bit asymmetric KIVI, same grouping as Q4: 3.5 bits per element with scales (G = 64) */
    /* reserved for: non-uniform codebooks (NUQ), dense-and-sparse outliers (pre-RoPE keys are a cache option,
     * section 10, not a type) */
    KVQ_TYPE_COUNT
} kvq_type;

typedef enum kvq_role { KVQ_KEY = 0, KVQ_VALUE = 1 } kvq_role;

/* Element type of arrays the caller passes in. */
typedef enum kvq_dtype { KVQ_DTYPE_F32 = 0, KVQ_DTYPE_F16 = 1, KVQ_DTYPE_BF16 = 2 } kvq_dtype;

typedef struct kvq_type_traits {
    const char *name; /* "f16", "bf16", "q8", "fp8", "q4", "q2", "q3" */
    int bits;         /* bits per stored element */
    int grouped;      /* 1 for KIVI types: asymmetric (scale, min) over groups of G */
    int implemented;  /* 0 for reserved entries */
} kvq_type_traits;

/* Traits of a type; NULL when `t` is outside the enum. */
KVQ_API const kvq_type_traits *kvq_type_get_traits(kvq_type t);
/* Parses "f16", "bf16", "q8", "fp8", "q4", "q3", "q2" (case-insensitive). */
KVQ_API kvq_status kvq_type_from_name(const char *name, kvq_type *out);
/* Bytes that one token of one head occupies in pages, scales and mins included, amortized over a page
 * (the residual window is not counted). 0 if the arguments are invalid. group 0 means the default. */
KVQ_API double kvq_type_bytes_per_token(kvq_type t, kvq_role role, int head_dim, int group);

/* ---------------------------------------------------------------------------------------------------------
 * 5. Page layout (KVQ_LAYOUT_VERSION 2)
 *
 * A page is `page_bytes` bytes: the key blocks of heads 0..H-1, then the value blocks of heads 0..H-1.
 * A block holds `page_tokens` (P) tokens of one head: its data rows, then its parameters, each block padded to
 * a multiple of 16 bytes. Data rows are token-major: token t's row starts at t * row_bytes.
 *   F16, BF16   row: D 16-bit values.                             params: none.
 *   Q8          row: D int8 q, x = s_t * q.                       params: fp16 s_t for t in 0..P-1.
 *               s_t = fp16(max|x| / 127), q = clamp(round(x / s_t), -127, 127).
 *   FP8         row: D E4M3 bytes, x = s_t * e4m3(q).             params: fp16 s_t for t in 0..P-1.
 *               s_t = fp16(max|x| / 448), q = e4m3_rne(x / s_t).
 *   Q4, Q2      row: D*b/8 bytes (b = 4 or 2); channel c sits at byte c*b/8, bit (c % (8/b)) * b, low first.
 *               q in [0, 2^b - 1], x = scale * L[q] + min, scale = fp16((max - min) / (2^b - 1)), min = fp16(min),
 *               L[q] = lv16[q] / 16 (levels in steps above min), q = the level nearest (x - min) / scale (ties to
 *               the lower). Uniform levels (the default): lv16[q] = 16 q, so x = scale * q + min and q = clamp(
 *               round((x - min) / scale), 0, 2^b - 1) (round half to even): exactly KVQ_LAYOUT_VERSION 1, the
 *               uniform table being the only one it had. Non-uniform levels (section 10; the roles in
 *               kvq_page_layout.nonuniform):
 *                 Q4 lv16 = {4, 28, 46, 62, 76, 90, 102, 114, 126, 138, 150, 164, 178, 194, 212, 236}
 *                 Q3 lv16 = {6, 24, 38, 50, 62, 74, 88, 106}   
 *                 Q2 lv16 = {8, 20, 28, 40}
 *   Q3          row: 3D/8 bytes: first D/4 bytes hold the low 2 bits of every code exactly as a Q2 row does
 *               (channel c at byte c/4, bits (c % 4) * 2), then D/8 bytes hold the high bit (channel c at byte
 *               D/4 + c/8, bit c % 8). Codes contiguous per row and bit plane, so that a kernel reads the low plane
 *               with Q2's unpacking and adds the high plane with one shift. q in [0, 7], scale = fp16((max - min) / 7),
 *               min, levels, rounding and the grouping of keys and values as Q4 and Q2.
 *     keys:     grouped per channel over G consecutive tokens. params: for each of the P/G groups,
 *               scale[D] then min[D] (fp16).
 *     values:   grouped per token over Gv consecutive channels. params: for each token, for each of the D/Gv
 *               groups, (scale, min) (fp16). Gv = G if it divides D, else the largest power of two <= G that
 *               divides D (D = 80: 16, D = 96: 32).
 * 8-bit parameters (roles in kvq_page_layout.params8, grouped types only; section 10): the params above become, for
 *   each of the P/G groups of G tokens, codes k and z (one byte each) per (scale, min) pair: the section holds bases
 *   b[P/G] (fp16), then for each group k[n] then z[n], where n = D (keys: entry c is channel c's pair) or n = G D/Gv
 *   (values: entry t (D/Gv) + j is the pair of the group's token t, value group j). The pair decodes to
 *     scale = fp16(fp32(b * F[k % 16]) * 2^-(k / 16)),   min = fp16(scale * (z - Z0) * u),
 *   F[i] = fp32(2^(-i/16)), u = 2^-(7 - bits) (Q4 1/8, Q3 1/16, Q2 1/32 of a scale), Z0 = 128 + (2^bits - 1) / (2u)
 *   (Q4 188, Q3 184, Q2 176: a group centred on 0 has z = 128) (fp32 arithmetic; every product before the fp16
 *   rounding is exact but b * F[i]), and the codes decode with it as above. The quantizer takes b = fp16(4 max_g s_g), s_g the
 *   smallest scale that covers group g's range with some z, and for each group the smallest scale, then the largest
 *   z, whose (scale, min) covers the group (Q-Norm: the nearest pair to Q-Norm's). The grid ends at b 2^(-255/16):
 *   a group that needs less (a range ~2^14 times below the largest of its G tokens' block) takes that floor, so its
 *   error is up to half of the floor rather than half of its own step.
 * Outlier section (roles in kvq_page_layout.outliers, grouped types only; section 10): after the params, N fp16
 *   residuals e[0..N) then N index bytes i[0..N), before the block's padding. Keys: N = (P/G) D, entry g D + c is
 *   channel c of key group g, its outlier at token g G + i[.]; values: N = P (D/Gv), entry t (D/Gv) + k is token t's
 *   value group k, its outlier at channel k Gv + i[.]. The value there is the dense decode plus e (the dense codes
 *   quantized the group with that value replaced by the mean of the others: min/max, Q-Norm and the codes of the
 *   rest do not see it). An addition that only a cache asking for it (outliers != 0) has: every other block's bytes
 *   are unchanged, so KVQ_LAYOUT_VERSION stays 2.
 * Sink pages (caches with sinks S > 0, section 10): a page of the arena holding SR = page_bytes / (4 H D) sink tokens,
 *   fp16 keys [SR][H][D] then fp16 values [SR][H][D] (token-major rows, whatever type_k and type_v are); the
 *   rest of the page is unused. A (sequence, layer) has ceil(S / SR) of them once it holds S tokens.
 * Defaults: G = 64 and P = 64. G = 64 is the smallest power of two for which the fp16 (scale, min) overhead keeps
 * Q4 under 0.29x and Q2 under 0.16x of F16 bytes at D = 128 (72 and 40 bytes per token per head, K or V); Q3 takes
 * 56 bytes (0.219x, 3.5 bits per element).
 * ------------------------------------------------------------------------------------------------------- */
typedef struct kvq_page_layout {
    int page_tokens;       /* P */
    int head_dim;          /* D */
    int n_kv_heads;        /* H */
    int group;             /* G: tokens per key group (grouped types); 1 for per-token-only caches */
    int value_group;       /* Gv: channels per value group (grouped value types) */
    kvq_type type_k, type_v;
    size_t k_row_bytes, v_row_bytes;     /* bytes of one token's data row, one head */
    size_t k_block_bytes, v_block_bytes; /* bytes of one head's block in a page (data + params, padded) */
    size_t k_offset, v_offset;           /* byte offset of head 0's key / value block in a page (v = H * k_block) */
    size_t page_bytes;
    int nonuniform; /* KVQ_ROLES_*: roles whose grouped type decodes codes through non-uniform levels (section 10);
                     * kvq_page_layout_make sets 0, a cache's layout says what the cache uses */
    int outliers;   /* KVQ_ROLES_*: roles whose grouped blocks end with an outlier section (below; section 10);
                     * kvq_page_layout_make sets 0, a cache's layout says what the cache uses, its block sizes included */
    int params8;    /* KVQ_ROLES_*: roles whose grouped blocks store their (scale, min) in 8 bits each (above; section
                     * 10, "8-bit parameters"); kvq_page_layout_make sets 0, a cache's layout says what it uses */
} kvq_page_layout;

KVQ_API kvq_status kvq_page_layout_make(kvq_type type_k, kvq_type type_v, int n_kv_heads, int head_dim,
                                        int page_tokens, int group, kvq_page_layout *out);

/* ---------------------------------------------------------------------------------------------------------
 * 6. The cache
 * ------------------------------------------------------------------------------------------------------- */
typedef struct kvq_cache kvq_cache;

typedef struct kvq_cache_config {
    int n_layers;       /* >= 1 */
    int n_kv_heads;     /* >= 1 */
    int head_dim;       /* 64, 80, 96, 128 or 256 */
    kvq_type type_k;    /* default F16 */
    kvq_type type_v;    /* default F16 */
    size_t arena_bytes; /* size of the page arena; the cache holds arena_bytes / page_bytes pages */
    int page_tokens;    /* 0: 64. A multiple of 16, and of G when a type is grouped */
    int group;          /* G; 0: 64. One of 16, 32, 64, 128. 64: 32 and 128 measured no better per bit (section 10,
                         * "Residual window and group"); the CUDA backend has 64 only */
    int residual;       /* R; -1: default (128 with a grouped type, else 0). 0 .. 4096. 128 because, with section
                         * 10's defaults (rotation, one sink), R = 64 measured 1.6x (q2) .. 2.2x (q4) and R = 0 2.2 ..
                         * 2.3x the KL divergence from F16 of R = 128 on SmolLM2-135M (section 10, "Residual window and
                         * group") */
    int max_seqs;       /* 0: 256. Live sequences at once */
    int n_threads;      /* 0: as many as OpenMP gives; 1: no threading */
    /* Quality mechanisms (section 10). -1: the default for the cache's types (kvq_cache_config_default sets -1;
     * a zero-initialized config gets 0, every mechanism off: the layout of KVQ_LAYOUT_VERSION 1). */
    int rotate;             /* randomized Hadamard rotation of the roles in KVQ_ROLES_* (0: none) */
    uint32_t rotation_seed; /* seed of the rotation's random signs; 0: the fixed default seed */
    int sinks;              /* the first `sinks` tokens of every sequence stay exact (fp16): 0 .. 1024; -1: 1 with a
                             * grouped type, else 0 (section 10) */
    int nonuniform;         /* grouped types (Q4, Q3, Q2) of the roles in KVQ_ROLES_* use non-uniform levels */
    /* Pre-RoPE keys (section 10). Off (0) in a zero-initialized config and in kvq_cache_config_default: only the
     * caller knows its model's RoPE. */
    int prerope;            /* 1: keys are appended before RoPE and attention applies RoPE(t) to key t; 0: off */
    int rope_neox;          /* pair layout: 0 adjacent pairs (x[2i], x[2i+1]) as GGUF Llama; 1 NeoX halves
                             * (x[i], x[i + D/2]) as Hugging Face Llama */
    float rope_theta;       /* base: inverse frequency i = rope_theta^(-2i/D); > 1, used when rope_freqs is NULL */
    const float *rope_freqs; /* NULL or D/2 inverse frequencies (radians per position, finite, >= 0), copied at
                              * create (Llama-3 / YaRN scaled frequencies); kvq_cache_get_config returns the
                              * cache's copy (valid until kvq_cache_free) */
    /* SQuat keys (section 10, "SQuat keys"). Off (0) in a zero-initialized config and in kvq_cache_config_default: the
     * subspace comes from the model's queries, which only the caller has (kvq's engine turns it on, r = 8). */
    int squat_rank;         /* r, 0 .. 32 and < head_dim: the rank of the per-(sequence, layer, KV head) query subspace
                             * that kvq_seq_set_key_subspace sets; 0 off. Grouped key types (Q4, Q3, Q2) only */
    float squat_lambda;     /* ridge lambda of the SQuat objective; <= 0 (and 0 in both defaults): auto, r / D
                             * (section 10); else finite */
    /* NULL (both defaults) or n_layers numbers, each >= 0, that seed the rotation's random signs in place of the layer
     * indices 0 .. n_layers - 1 (section 10), copied at create; read only with rotate != 0. An engine that spreads a
     * model's layers over several caches (kvq's per-layer types) passes each cache its layers' model numbers, so that a
     * layer's R does not depend on the grouping. kvq_cache_get_config returns the cache's copy (valid until
     * kvq_cache_free), or NULL. */
    const int32_t *rotation_layers;
    /* Q-Norm (section 10, "Q-Norm"): the grouped types (Q4, Q3, Q2) of the roles in KVQ_ROLES_* store, for each group,
     * the fp16 (scale, min) under which its codes (min/max's) decode to the group's mean and standard deviation; the
     * page format is unchanged. -1: the default, none (kvq's engine and KVQCache turn it on for every grouped role);
     * 0 (a zero-initialized config): none. CPU and CUDA caches write the same pairs. */
    int qnorm;
    /* Dense-and-sparse outliers (section 10, "Outliers"; KVQuant): the grouped types (Q4, Q3, Q2) of the roles in
     * KVQ_ROLES_* keep, in each group, the one value whose removal narrows the group's range most (its largest or its
     * smallest) nearly exact: the group is quantized without it, and the block stores its index and its residual in
     * fp16 (section 5), which attention adds back. 3 bytes per group: +0.375 bits per element at G = 64. -1 (the
     * default) and 0: none (kvq's CPU engine turns it on for Q4/Q3/Q2 keys). The CPU cache only (the CUDA backend
     * refuses it). Roles of per-token types ignore it. */
    int outliers;
    /* 8-bit group parameters (section 5, section 10 "8-bit parameters"): the grouped types (Q4, Q3, Q2) of the roles in
     * KVQ_ROLES_* store each group's (scale, min) as two bytes under an fp16 base per G tokens instead of two fp16
     * values: 0.25 bits per element less at G = 64 (Q4 4.25, Q3 3.25, Q2 2.25 bits per element in pages). -1 (the
     * default) and 0: fp16 pairs. The CPU cache only (the CUDA backend refuses it). */
    int params8;
    /* 8-bit residual window (section 10, "8-bit window"): the roles in KVQ_ROLES_* keep their residual window (and the
     * keys' partial group) as int8 rows with one fp16 scale per token and head, (8 + 16 / D) bits per element instead
     * of 16; tokens reach the pages quantized from those rows. -1 (the default) and 0: fp16 windows. The CPU cache only
     * (the CUDA backend refuses it). */
    int window8;
} kvq_cache_config;

/* Role sets for kvq_cache_config's rotate and nonuniform fields. */
#define KVQ_ROLES_NONE 0
#define KVQ_ROLES_K 1
#define KVQ_ROLES_V 2
#define KVQ_ROLES_KV 3

/* A config with every field at its default and arena_bytes = 0 (which the caller must set). */
KVQ_API kvq_cache_config kvq_cache_config_default(void);
/* Tokens of one sequence that `cfg` would hold, all layers, the residual window not counted (its sink pages
 * counted: min(S, pages x SR) with pages <= ceil(S / SR) per layer, else S + the other pages x P); < 0 is a
 * kvq_status if cfg is invalid. Use it to size the arena. */
KVQ_API int64_t kvq_cache_capacity_tokens(const kvq_cache_config *cfg);
/* The smallest arena_bytes for which one sequence of n_tokens tokens fits in every layer (cfg->arena_bytes is
 * ignored; the residual window is heap memory, not counted; sink pages counted: ceil(min(n, S) / SR) per layer). 0, with a message for kvq_last_error(), if cfg is
 * invalid, n_tokens < 0, or the arena would need more than INT32_MAX pages (kvq_cache_create's limit) or
 * SIZE_MAX bytes: never a wrapped size. */
KVQ_API size_t kvq_cache_arena_bytes_for(const kvq_cache_config *cfg, int64_t n_tokens);
/* The page layout a cache of `cfg` would have (its defaults resolved; cfg->arena_bytes ignored): what
 * kvq_cache_get_config returns after kvq_cache_create. With outliers (section 10) its blocks and pages are larger
 * than kvq_page_layout_make's for the same types. KVQ_ERR_* with a message if cfg is invalid; *out unchanged then. */
KVQ_API kvq_status kvq_cache_config_layout(const kvq_cache_config *cfg, kvq_page_layout *out);

KVQ_API kvq_status kvq_cache_create(const kvq_cache_config *cfg, kvq_cache **out);
KVQ_API void kvq_cache_free(kvq_cache *cache);
/* The effective configuration (defaults resolved) and page layout. */
KVQ_API kvq_status kvq_cache_get_config(const kvq_cache *cache, kvq_cache_config *cfg, kvq_page_layout *layout);

typedef struct kvq_cache_stats {
    int64_t pages_total;
    int64_t pages_free;
    int64_t pages_shared;    /* pages referenced by more than one (sequence, layer) */
    size_t page_bytes;
    size_t arena_bytes;
    size_t page_bytes_in_use;   /* (pages_total - pages_free) * page_bytes: sink pages included */
    size_t window_bytes;        /* heap bytes allocated for all live residual windows (they grow as they fill) */
    int n_seqs;                 /* live sequences */
    int64_t tokens;             /* sum over live sequences of their layer-0 length */
    double bytes_per_token;     /* K+V page bytes per token, all layers and heads, amortized over a page of P
                                 * tokens (no window, no sink pages: a fixed cost of ceil(S / SR) pages per
                                 * (sequence, layer), in page_bytes_in_use) */
    double f16_bytes_per_token; /* the same for an F16 cache of this shape */
    int64_t capacity_tokens;    /* tokens one sequence could hold if it had the whole arena (its sinks included) */
} kvq_cache_stats;

KVQ_API kvq_status kvq_cache_get_stats(const kvq_cache *cache, kvq_cache_stats *stats);

/* ---------------------------------------------------------------------------------------------------------
 * 7. Sequences
 * Ids are small non-negative integers chosen by the cache (the smallest free slot, < max_seqs).
 * ------------------------------------------------------------------------------------------------------- */
KVQ_API kvq_status kvq_seq_new(kvq_cache *cache, int32_t *seq_out);
/* New sequence with the same content as `src` in every layer: pages and sink pages shared (copy on write), window
 * copied. */
KVQ_API kvq_status kvq_seq_fork(kvq_cache *cache, int32_t src, int32_t *seq_out);
/* Keep the first n_tokens tokens in every layer (layers already shorter are left alone). For grouped types a
 * cut inside a quantized group moves that group's surviving tokens back into the window, dequantized: they stay
 * as accurate as they were, but are not restored to their original fp16 values. A cut inside the sinks (section
 * 10) keeps the sinks before it exact and gives the sink pages past it back to the arena. */
KVQ_API kvq_status kvq_seq_truncate(kvq_cache *cache, int32_t seq, int64_t n_tokens);
/* Sliding-window layers: gives the pages of one (sequence, layer) that hold only tokens before n_tokens back to the
 * arena (a page shared with a fork is released by this sequence only: the other keeps it, copy on write). Whole
 * pages of the paged tokens only: the sinks, a page still being filled and the residual window stay. The tokens of
 * the released pages can no longer be read: kvq_read of them and kvq_seq_truncate to before their end fail with
 * KVQ_ERR_RANGE, and attention on the layer needs a window (kvq_attn_params.window) that none of the queries'
 * windows reaches back into them (else KVQ_ERR_RANGE). An engine with window W calls it before attending queries
 * from position p on with n_tokens = p - W + 1, so a local layer holds W + the batch + a page of tokens however
 * long the sequence grows. Lengths and positions do not change; n_tokens at or below what was dropped already is a
 * no-op. Errors (the cache unchanged): KVQ_ERR_NULL, KVQ_ERR_NO_SEQ, KVQ_ERR_SHAPE (layer), KVQ_ERR_RANGE
 * (n_tokens outside 0 .. the layer's length). It allocates nothing. */
KVQ_API kvq_status kvq_seq_drop_front(kvq_cache *cache, int32_t seq, int layer, int64_t n_tokens);
KVQ_API kvq_status kvq_seq_free(kvq_cache *cache, int32_t seq);
/* SQuat keys (section 10): the query subspace of one (sequence, layer, KV head). basis: D x r floats, row-major
 * (basis[d * r + j] = channel d of column j), r = the cache's squat_rank, orthonormal columns (|B^T B - I| <= 1e-3
 * entrywise, finite), in the caller's key frame: the frame of the keys it appends (post-RoPE, or pre-RoPE with
 * prerope = 1; un-rotated: with the key rotation on, the cache rotates the basis into the frame it stores). From then
 * on the key groups of (seq, layer) that this head quantizes into pages are quantized by SQuat; tokens already in
 * pages are not touched. basis NULL clears it (plain quantization again). The basis lives on the heap (one block per
 * sequence, allocated by its first set: D x r floats per layer and head); kvq_seq_fork copies it, kvq_seq_truncate
 * and kvq_seq_drop_front keep it, kvq_seq_free releases it. Errors (the cache unchanged): KVQ_ERR_NULL, KVQ_ERR_NO_SEQ,
 * KVQ_ERR_SHAPE (layer, kv_head), KVQ_ERR_INVALID_ARG (the cache's squat_rank is 0; a basis that is not finite or not
 * orthonormal), KVQ_ERR_OUT_OF_MEMORY. */
KVQ_API kvq_status kvq_seq_set_key_subspace(kvq_cache *cache, int32_t seq, int layer, int kv_head, const float *basis);
/* The basis set for (seq, layer, kv_head), in the caller's frame (un-rotated, up to fp32 rounding): *is_set = 1 and
 * basis (D x r, may be NULL to ask only whether one is set) filled, or *is_set = 0 and basis untouched. Errors as
 * set's but for the basis checks. */
KVQ_API kvq_status kvq_seq_get_key_subspace(const kvq_cache *cache, int32_t seq, int layer, int kv_head, float *basis,
                                            int *is_set);
KVQ_API kvq_status kvq_seq_length(const kvq_cache *cache, int32_t seq, int layer, int64_t *len);

/* A plain strided view of one (sequence, layer), for engines that run their own kernels over kvq's layout
 * (the CUDA backend's tests use it). With S = sink_tokens (0 without sinks):
 *   tokens 0 .. S-1 are the attention sinks (section 10), exact fp16 in arena pages of their own: token t is row
 *     r = t % SR of sink page sink_pages[t / SR] (SR = sink_rows_per_page = page_bytes / (4 * H * D)); its key
 *     for head h is the D fp16 at page + ((r * H + h) * D) * 2 bytes, its value SR * H * D * 2 bytes further on
 *     (a sink page is fp16 keys [SR][H][D], then values [SR][H][D], whatever type_k and type_v are);
 *   tokens S .. S+paged_tokens-1 live in pages[0 .. n_pages-1] (token S+u in page pages[u / P], slot u % P: the
 *     grouped types' key groups start at S + k*G);
 *   tokens S+paged_tokens .. S+paged_tokens+window_tokens-1 are rows 0 .. of the window, fp16
 *     [window_capacity][H][D] (window_k, window_v NULL while the capacity is 0), or for a role in cfg.window8
 *     window8_k / window8_v: row r is window8_row_bytes = H * D + 2 * H bytes at r * window8_row_bytes, int8
 *     codes [H][D] then fp16 scales [H]; value = fp16(code * scale) (window_k / window_v NULL for that role).
 * Pointers stay valid until the next non-const call on the cache. */
typedef struct kvq_seq_view {
    kvq_page_layout layout;
    const uint8_t *arena; /* page id i starts at arena + i * layout.page_bytes */
    int32_t n_pages;
    const int32_t *pages;
    int64_t paged_tokens;
    int32_t window_tokens;
    int32_t window_capacity; /* rows allocated now: grows with the window, at most R + G (R + 1 for per-token caches) */
    const uint16_t *window_k;
    const uint16_t *window_v;
    int32_t sink_tokens;        /* S: tokens in sink pages (< cfg.sinks only while the sequence is shorter) */
    int32_t sink_rows_per_page; /* SR */
    int32_t n_sink_pages;
    const int32_t *sink_pages;  /* page ids, token order (NULL with sinks = 0) */
    int64_t dropped_tokens;     /* the first dropped_tokens paged tokens were released (kvq_seq_drop_front):
                                 * pages[0 .. dropped_tokens / P - 1] are -1 */
    const uint8_t *window8_k;   /* 8-bit window rows (cfg.window8), else NULL */
    const uint8_t *window8_v;
    size_t window8_row_bytes;   /* H * D + 2 * H */
} kvq_seq_view;

KVQ_API kvq_status kvq_seq_view_get(const kvq_cache *cache, int32_t seq, int layer, kvq_seq_view *view);

/* ---------------------------------------------------------------------------------------------------------
 * 8. Append
 * Appends n_tokens[i] tokens to sequence seq_ids[i] in `layer`, for i in 0..n_seqs-1 (distinct ids).
 * k and v are dense [sum n_tokens][n_kv_heads][head_dim] arrays of `dtype`, sequences back to back.
 * All or nothing: on any error no sequence changes.
 * ------------------------------------------------------------------------------------------------------- */
KVQ_API kvq_status kvq_append(kvq_cache *cache, int layer, int n_seqs, const int32_t *seq_ids,
                              const int32_t *n_tokens, kvq_dtype dtype, const void *k, const void *v);

/* Dequantizes tokens [start, start + n) of one (sequence, layer) into fp32 arrays [n][n_kv_heads][head_dim]
 * (either pointer may be NULL to skip it). For debugging and tests: attention never does this. Keys come back as
 * they were appended: before RoPE in a pre-RoPE cache (section 10; kvq_rope_apply gives the post-RoPE keys). */
KVQ_API kvq_status kvq_read(const kvq_cache *cache, int32_t seq, int layer, int64_t start, int64_t n, float *k,
                            float *v);

/* ---------------------------------------------------------------------------------------------------------
 * 9. Attention on the quantized cache (CPU)
 * out = softmax(scale * q K^T [+ soft-cap, causal and window masks]) V, fp32 online softmax, read straight
 * from the pages and windows: no dequantized copy of the cache is made.
 * Query head h uses KV head h / (n_q_heads / n_kv_heads) (grouped-query attention).
 * ------------------------------------------------------------------------------------------------------- */
typedef struct kvq_attn_params {
    int n_q_heads;  /* a multiple of n_kv_heads */
    float scale;    /* 0: 1/sqrt(head_dim) */
    int window;     /* sliding window: a query at position p sees keys at positions > p - window; 0: no window */
    float softcap;  /* > 0: logits = softcap * tanh(logits / softcap) (Gemma 2); 0: off */
} kvq_attn_params;

KVQ_API kvq_attn_params kvq_attn_params_default(int n_q_heads);

/* Decode: one query per sequence, at the sequence's last position (append the current token's K/V first).
 * q, out: [n_seqs][n_q_heads][head_dim] fp32. */
KVQ_API kvq_status kvq_attn_decode(const kvq_cache *cache, int layer, int n_seqs, const int32_t *seq_ids,
                                   const float *q, float *out, const kvq_attn_params *p);

/* Chunked causal prefill: the n_q queries are the last n_q tokens of the sequence (append them first); query i
 * sits at position len - n_q + i and sees keys 0 .. its position. q, out: [n_q][n_q_heads][head_dim] fp32. */
KVQ_API kvq_status kvq_attn_prefill(const kvq_cache *cache, int layer, int32_t seq, int n_q, const float *q,
                                    float *out, const kvq_attn_params *p);

/* Prefill that reads its own batch exact: the n_q queries are n_q NEW tokens, not appended yet, at positions
 * len .. len + n_q - 1 (len: the sequence's length in the layer now); k and v are their keys and values
 * ([n_q][n_kv_heads][head_dim] in dtype, exactly what kvq_append takes next). Query i sees tokens 0 .. len - 1 as
 * the cache holds them (the last R in its window, as decode reads them) and the batch's tokens 0 .. i in fp16
 * (rotated where the cache rotates the role, as an fp16 window holds them; with 8-bit windows too), never
 * quantized. With kvq_attn_prefill (append, then attend) a batch longer than the window pushes its own first tokens
 * and the R before them into the pages before its queries read them: on SmolLM2 passkey prompts that, not the
 * stored bits, lost most of q3's keys at the prompt's end (docs/quality.md). This is how HF's QuantizedCache (KIVI)
 * prefills; llama.cpp's reads the batch back quantized. Call it, then kvq_append(k, v) to keep the batch. Errors:
 * those of kvq_attn_prefill, KVQ_ERR_NONFINITE for K/V that kvq_append would refuse (not finite, or beyond fp16
 * before or after rotation), KVQ_ERR_OUT_OF_MEMORY; the cache is never changed. */
KVQ_API kvq_status kvq_attn_prefill_exact(const kvq_cache *cache, int layer, int32_t seq, int n_q, const float *q,
                                          kvq_dtype dtype, const void *k, const void *v, float *out,
                                          const kvq_attn_params *p);

/* Attention on the caller's threads. By default the attention calls above split their work (sequences x KV heads x
 * query blocks) over up to n_threads OpenMP threads. An engine with a thread pool of its own hands it to the cache
 * instead, so that one set of threads serves its weight products and kvq's attention: no second team woken for each
 * call, no two teams spinning for the same cores (kvq's CLI engine does this: src/model/tpool.h measures why).
 * run(ctx, n_tasks, fn, arg) must call fn(arg, task, thread) exactly once for every task in 0 .. n_tasks - 1, with
 * thread in 0 .. n_threads - 1 and no two calls running at once on the same thread index, and return when all have
 * returned. kvq calls run from the thread that called the attention function; with n_tasks < 2 it may call fn
 * itself. The pool must not call back into kvq for this cache from inside fn. */
typedef void (*kvq_task_fn)(void *arg, int task, int thread);
typedef struct kvq_thread_pool {
    int n_threads; /* 1 .. 1024: the thread indices run passes to fn */
    void (*run)(void *ctx, int n_tasks, kvq_task_fn fn, void *arg);
    void *ctx; /* passed to run; borrowed until the pool is replaced or the cache freed */
} kvq_thread_pool;
/* pool NULL: back to OpenMP. The struct is copied. KVQ_ERR_NULL (cache, or pool->run NULL), KVQ_ERR_INVALID_ARG
 * (n_threads outside 1 .. 1024); on error the cache keeps the pool it had. Needs exclusive access to the cache. */
KVQ_API kvq_status kvq_cache_set_thread_pool(kvq_cache *cache, const kvq_thread_pool *pool);

/* Which CPU kernels run: "avx512", "avx2" or "scalar": the best table the CPU has (AVX-512 F/BW/VL/DQ, else AVX2 +
 * FMA, else the scalar reference). The environment, read at every attention call, changes that: KVQ_FORCE_SCALAR=1
 * forces the _ref kernels; KVQ_CPU_KERNELS=scalar, avx2 or avx512 asks for that table (where the CPU lacks it, the
 * best one below it; other values are ignored). The avx512 table also uses AVX512-VNNI where the CPU has it:
 * vpdpwssd for the Q3 keys and the integer key kernels at head_dim 128 (the same integer sums, bit for bit, fewer
 * instructions), vpdpbusd for the Q3 values with 8-bit weights (head_dim a multiple of 128; the same sums as the
 * avx2 table's vpmaddubsw + vpmaddwd) and for the Q2 keys (head_dim 128 or 256, at most 4 query heads per KV head,
 * uniform levels, keys not pre-RoPE) against the query times the key scales rounded to int8 per key group: not the
 * avx2 table's bits but within half an int8 step per channel of them, about 0.05% of Q2's own key error. */
KVQ_API const char *kvq_cpu_backend(void);

/* ---------------------------------------------------------------------------------------------------------
 * 10. Quality mechanisms (kvq_cache_config: rotate, rotation_seed, sinks, nonuniform, prerope, squat_rank, qnorm,
 *     outliers, params8, window8)
 * Each is an option that can be switched off (0), so that what each one buys can be measured; -1 picks the
 * default for the cache's types. All are implemented on the CPU. The CUDA backend (kvq_cuda.h section 4) has the
 * rotation and the sinks (up to one sink page, SR >= 10 tokens) and resolves -1 to these same defaults, so that a CPU
 * and a GPU cache of one config hold the same bytes; it has no non-uniform levels yet (nonuniform must be 0 or -1,
 * which is none for its types) and no Q3. Defaults (-1), from the measurements below:
 *     type (K/V)   rotate                                   sinks   nonuniform
 *     q8           keys                                     0       - (no levels)
 *     q4           keys and values (q4/q2: values only)     1       none (kept on the integer kernels)
 *     q3           keys and values                          1       keys and values
 *     q2           keys and values                          1       none (kept on the integer kernels); keys
 *                                                                    when prerope = 1 (fp32 key kernels then)
 *     f16, bf16, fp8: none of them. A mix takes each role's column (q8/q4: keys and values rotated, 1 sink).
 * qnorm (Q-Norm, below) is none in the library (-1 and 0); kvq's engine and KVQCache (CPU and CUDA) turn it on for
 * every grouped role. outliers (below) is none everywhere unless asked (the CPU cache only).
 * Q4 values are rotated since 2026-12-05 (before: keys only); the paragraph "Q4 values rotated" below has the
 * measurement. The page format is the same; a cache made with the old default holds other bytes for its Q4 values
 * (rotate = KVQ_ROLES_K makes it again).
 * prerope (pre-RoPE keys, below) has no -1: the cache's default is off, since only the caller knows its RoPE; kvq's
 * engine turns it on for Q2 keys (with SQuat: dPPL +11.1% -> +5.8% at ctx 2048, decode attention about F16's time:
 * below).
 * Measured together (SmolLM2-135M-Instruct Q4_1, debian-reference, kvq perplexity --ctx 1024 --chunks 4 --compare
 * with each mechanism spelled out, 2048 scored tokens; KLD: mean KL divergence of the token distributions from the
 * F16 cache's, in nats; F16 PPL 6.5435):
 *     entry                         dPPL      KLD       top-1        entry                         dPPL      KLD
 *     q8 rot=none                  +0.119%  0.000362   99.56%        q3 rot=none sinks=0           +4.932%  0.0575
 *     q8 rot=k                     -0.048%  0.000125   99.56%        q3 rot=k sinks=1              +2.800%  0.0278
 *     q4 rot=none sinks=0          +1.093%  0.00942    95.85%        q3 rot=k sinks=1 nuq=kv       +2.387%  0.0289
 *     q4 rot=k sinks=0             -0.294%  0.00996    95.51%        q3 rot=kv sinks=1 nuq=kv      +2.648%  0.0197
 *     q4 rot=k sinks=1             -0.017%  0.00399    97.71%        q2 rot=none sinks=0          +75.49%   0.563
 *     q4 rot=k sinks=1 nuq=k       +0.474%  0.00450    97.31%        q2 rot=kv sinks=1            +16.00%   0.181
 *     q4 rot=k sinks=1 nuq=kv      +0.707%  0.00508    97.36%        q2 rot=kv sinks=1 nuq=kv     +18.52%   0.167
 *     q4 rot=kv sinks=1 nuq=kv     +0.646%  0.00369    97.90%
 * KLD is the measure the defaults follow (dPPL over 2048 tokens moves by +-0.3% with noise-sized changes: q4 rot=k
 * has a lower PPL than F16). The rotation and one sink each halve or more the error of every quantized type; the
 * non-uniform levels buy 30% of Q3's KLD, 7-8% of Q4's and Q2's at best, where they would cost the integer kernels
 * (section 5: the SIMD tables run Q4/Q2 blocks with levels through fp32 kernels), so only Q3 uses them by default.
 * The paragraphs below give each mechanism's own measurement, made before the others existed.
 *
 * nonuniform (KVQ_ROLES_K, _V, _KV; -1: the table above): the grouped types of those roles decode codes
 * through the non-uniform levels of section 5 instead of uniform steps; roles of other types ignore it (the
 * layout's nonuniform lists only grouped roles). The levels are fixed and data-free: Lloyd-Max quantizers for a
 * group of 64 Gaussian values normalized by the group's (min, max), each value's error weighted by scale^2, the
 * levels rounded to 1/8 of a step (Q4, Q3) or 1/4 (Q2) (tests/data/make_levels.py, numpy only). They leave the
 * ends open (clipping a group's extremes costs less than spacing every level evenly for them). On that
 * distribution their mean squared error is 0.84 (Q4), 0.77 (Q3) and 0.57 (Q2) of the uniform levels';
 * test_roundtrip measures 0.83 .. 0.84 (Q4) and 0.57 .. 0.58 (Q2) through the cache where groups hold 64 values
 * (smaller value groups, D = 80 / 96, gain less: 0.80 .. 0.96). Kernels: the scalar _ref kernels and the
 * AVX2 / AVX-512 tables decode the levels (a table lookup); the SIMD tables run blocks with non-uniform levels
 * through their fp32 kernels (decode, then dots / axpys), not yet the integer ones, so such caches are slower
 * than uniform ones on the CPU. Measured (kvq perplexity -m SmolLM2-135M-Instruct.Q4_1.gguf -f debian-reference
 * --ctx 1024 --chunks 4, dPPL against the F16 cache, without the rotation): none: q4 +1.09%, q2 +75.5%, q4/q2
 * +15.9%; k: q4 +0.83%, q2 +78.3%, q4/q2 +14.1%. Keys alone help Q4 and Q4/Q2 but not Q2 (its groups are not
 * Gaussian without the rotation: outlier channels); with the rotation and a sink, the table above.
 *
 * Attention sinks (sinks = S, 0 .. 1024). The first S tokens of every (sequence, layer) are stored exactly as fp16 and
 * never quantized, in sink pages of the arena (section 5): the BOS and first tokens take much of the attention mass
 * and often carry outlier keys/values, which in a grouped type would also widen the per-channel (scale, min) of their
 * whole key group. The tokens after them are grouped and paged as without sinks, starting at token S (key groups
 * S + k*G). Sink pages are shared on fork and copied on write, freed by truncate (a cut inside the sinks keeps the
 * sinks before it) and free, counted in page_bytes_in_use, capacity_tokens, kvq_cache_capacity_tokens and
 * kvq_cache_arena_bytes_for (bytes_per_token leaves them out: a fixed ceil(S / SR) pages per (sequence, layer)).
 * Attention reads them first, as fp16 blocks at positions 0 .. S-1 (causal and sliding-window masks as for any
 * token). Default (-1): S = 1 where a type is grouped (Q4, Q3, Q2), 0 for F16/BF16/Q8/FP8, whose per-token scales
 * an outlier token does not share. Measured: SmolLM2-135M-Instruct (Q4_1 GGUF), kvq perplexity --ctx 1024 --chunks 4
 * on debian-reference.en.txt (2048 scored tokens; F16 6.5435), R = 128, G = 64:
 *     S        0        1        4        16       64
 *     q4     6.6150   6.5669   6.5703   6.5779   6.5815     (F16 +1.09% at S = 0, +0.36% at S = 1)
 *     q2    11.4831   8.7414   8.9136   8.9433  10.4290     (+75.5% -> +33.6%)
 *     q4/q2  7.5843   7.0122   7.0480   7.1078   7.2156     (+15.9% -> +7.2%)
 * One sink (the BOS token) buys nearly all of it; more move the group boundaries of the rest without exceeding it
 * (S = 64: q2 worse than S = 1 by 19%), and cost ceil(S / SR) pages per (sequence, layer) (S = 1: one page per
 * layer, the bytes of 64 paged tokens: 13824 with Q4 at SmolLM2's H = 3, D = 64).
 *
 * Q4 values rotated (the default since 2026-12-05). kvq perplexity --ctx 2048 on debian-reference, KLD from the F16
 * cache (docs/quality-vrot-*.csv; SmolLM2-135M 4 chunks, 4096 scored tokens; Gemma 3 270M 2 chunks, 2048;
 * commands: docs/quality.md, "Q4 values rotated"):
 *     entry                 SmolLM2 dPPL   KLD       p99          Gemma 3 dPPL   KLD       p99
 *     q8/q4 (keys rotated)     +0.299%    0.00172   0.0190          +0.174%     0.00273   0.0293
 *     q8/q4:rot=kv             +0.176%    0.00117   0.0110          +0.095%     0.00154   0.0161
 *     q4 (keys rotated)        +0.469%    0.00451   0.0446          +0.260%     0.0132    0.123
 *     q4:rot=kv                +0.273%    0.00409   0.0381          +1.297%     0.0109    0.131
 * SmolLM2 at ctx 8192 (1 chunk, 4096 scored tokens): q8/q4 +0.473% 0.00192 -> :rot=kv +0.204% 0.00124; q4 +0.700%
 * 0.00632 (p99 0.0710) -> +0.930% 0.00594 (p99 0.0616). KLD falls in every case (-6% to -44%) and so does the p99 but
 * for Gemma's q4; q4's dPPL rose in two of the three (Gemma: top-1 96.3% -> 97.0% all the same), within the +-0.3%
 * that dPPL over 2-4k tokens moves by, and KLD is the measure the defaults follow. llama.cpp's q8_0/q4_0 (its values
 * rotated too) gives +0.174% dPPL and KLD 0.0075 on SmolLM2 at 6.5 bits (docs/quality.md): kvq's q8/q4 now has the
 * same dPPL and 1/6 of the KLD at 7.48 bits (its fp16 window counted; with Q-Norm on top, the engine's default since,
 * +0.25% and 0.0012). The cost is one inverse rotation of each
 * output row per head and step (the CPU's integer value kernels are unchanged).
 *
 * Q-Norm (qnorm = KVQ_ROLES_*; -1 and 0: none in the library; kvq's engine and KVQCache, on the CPU and on CUDA: the
 * roles of grouped types). KVQuant's section 3.5 for kvq's groups: given min/max's codes, each group stores the fp16 (scale,
 * min) under which they decode to the group's mean and standard deviation (one pass at quantization; the page format
 * and the kernels are unchanged). For Q2 the codes are then taken again under that pair, whose step is finer than
 * min/max's (measured below: that buys Q2 twice as much; Q4 and Q3 gain only with min/max's codes). Rounding to levels
 * biases a group's spread and centre, and that bias, shared by every key of a channel group or every channel of a
 * value row, moves every logit the same way. kvq perplexity --ctx 2048 --chunks 4 -t 2 on debian-reference (SmolLM2,
 * 4096 scored tokens; each type's other defaults; docs/quality-qnorm-*.csv, commands in docs/quality.md, "Q-Norm"):
 *     entry                           dPPL      KLD       KLD p99   top-1
 *     q4:qnorm=none                  +0.273%   0.00409   0.0381    97.46%
 *     q4 (Q-Norm, min/max's codes)   +0.251%   0.00349   0.0362    97.44%    KLD -15%
 *     q3:qnorm=none                  +1.247%   0.0183    0.181     94.31%
 *     q3 (Q-Norm)                    +1.004%   0.0166    0.157     94.48%    -9%
 *     q2:qnorm=none                  +5.843%   0.0819    0.913     88.79%
 *     q2 (Q-Norm, codes taken again) +4.496%   0.0589    0.648     90.43%    -28%
 *     q2, Q-Norm with min/max's codes +6.295%  0.0706    0.679     89.92%    -14%
 *     q4, Q-Norm with codes taken again +0.623% 0.00448  0.0460    96.90%    (values not rotated: against 0.00451)
 *     q3, Q-Norm with codes taken again +1.392% 0.0188   0.194     94.63%    (+3%)
 * Gemma 3 and ctx 8192: docs/quality.md ("Q-Norm"). Roles, q2 with codes taken again: keys alone -17%, values alone
 * -9%, both -30%. The CUDA backend's flush kernels compute the same pair with the same arithmetic in the same order,
 * so a CUDA cache holds the CPU cache's bytes with Q-Norm too (test_cuda; its -1 is none, as here).
 * Tried first and dropped: the (scale, min) of least squared error (min/max's and ranges shrunk to 80% and 60%, each
 * refined by least squares, codes taken again): it cut the squared error to 0.52 / 0.78 / 0.91 of min/max's for Q2 /
 * Q3 / Q4 but made q4's and q3's KLD worse (0.00451 -> 0.00469, 0.0183 -> 0.0207) and bought q2 only 4% (0.0819 ->
 * 0.0784, dPPL +5.8% -> +7.6%; docs/quality-fit-2048.csv): clipping a group's extremes trades many small errors for a
 * few large ones on the tokens (or channels) that carry the largest logits; Q-Norm keeps the spread instead.
 *
 * Outliers (outliers = KVQ_ROLES_*; -1 and 0: none; the CPU cache only, the CUDA backend refuses it; KVQuant's
 * dense-and-sparse quantization at one value per group). In each group of a grouped role the value whose removal
 * narrows the range most (the largest if it stands further above the second largest than the smallest below the
 * second smallest, else the smallest) is replaced by the mean of the others for quantization, and its residual
 * (value - decoded code, fp16) and index go to the block's outlier section (section 5), 3 bytes per group (+0.375
 * bits per element of the role at G = 64). Where that residual would pass fp16's 65504 (a group spanning more than
 * that), the outlier takes the code of the level nearest to it instead; where even that one's would, the group is
 * quantized whole (residual 0, the bound of a group without outliers). Attention adds the residuals in the driver:
 * q . e to the key's score (for pre-RoPE keys to the decoded row before RoPE), p e to the value sum; kvq_read
 * includes them. With SQuat keys, each channel's error carried into the next channels is the one it reads back
 * with, its outlier's residual added (so nearly none for the outlier). kvq perplexity --decode-attn
 * (docs/quality.md, "dense-and-sparse outliers"; docs/quality-outliers-*.csv), KLD from F16:
 *     entry          SmolLM2 ctx 2048    SmolLM2 ctx 8192    Gemma 3 ctx 2048   Gemma 3 ctx 8192
 *     q4:outl=k      -18%                -37% (dPPL +0.36%)  +5%                -17% (dPPL +0.65%)
 *     q4:outl=v                          -1%
 *     q3:outl=k      -46%                -47% (dPPL +0.74%)  -26%               -38% (dPPL +1.43%)
 *     q3:outl=kv     -49%                -41% (dPPL +1.21%)
 *     q2:outl=k      -34% (SQuat kept)   -33% (dPPL +4.85%)  -11%
 *     q2:outl=k:squat=0  -14%                                +49%
 * Keys' outliers pay (a key channel's few large tokens survive the rotation), values' do not (a rotated token's 64
 * channels have none left). Per bit, q3 keys' outliers beat moving layers from q3 to q4 (35% and 12% under that
 * line). The cost is the driver's correction, one 4-lane multiply-add per outlier into its token's rows (up to 4 rows;
 * more take a scalar loop): decode attention at 32k (kvq-bench cpu, Llama-3-8B shapes, 2 cores, AVX-512, two runs
 * each) q4 4.85 -> 5.53 .. 5.66 ms, q3 5.50 -> 6.06 .. 6.19, q2 4.35 -> 5.01 .. 5.13 (+12 .. 16%; the scalar form
 * before it: +40 .. 48%). The library's default stays none, so that a CPU and a CUDA cache of one config hold the
 * same bytes (the CUDA backend has no outlier sections yet); kvq's CPU engine turns the keys' outliers on for Q4, Q3
 * and Q2 keys (llama_default_outliers, src/model/llama.c), as it does pre-RoPE keys and SQuat for Q2; its GPU engine
 * and KVQCache keep none.
 *
 * 8-bit parameters (params8 = KVQ_ROLES_*; -1 and 0: fp16 pairs; the CPU cache only, the CUDA backend refuses it).
 * A grouped role's (scale, min) pairs take two bytes instead of four (section 5): a scale code k on a 1/16-octave grid
 * below an fp16 base per G tokens, and a zero point z in units of 2^-(7 - bits) of the scale. At G = 64 that is 0.25
 * bits per element less: Q4 pages 4.25, Q3 3.25, Q2 2.25 bits, which leaves room for a small fp16 window inside issue
 * 18's 4.5 / 3.5 / 2.5 bits at ctx 8192. The quantizer takes the smallest grid scale, then the largest z, that cover
 * the group (min/max) or the pair nearest to Q-Norm's; attention expands a block's pairs to fp16 before the kernels
 * read it (AVX2/F16C, the bits of the scalar decode), so every kernel is unchanged. kvq perplexity --decode-attn,
 * SmolLM2-135M, ctx 8192 (docs/quality.md, "8-bit group parameters"; the engine's defaults otherwise: Q-Norm, keys'
 * outliers, R = 128, one sink), KLD from F16:
 *     entry                        bits    dPPL     KLD
 *     q4 / q4:p8=kv                4.99    +0.33%   0.00187   4.77    +0.34%   0.00254
 *     q4:outl=none / +p8=kv        4.81    +0.68%   0.00302   4.59    +0.24%   0.00280
 *     q3 / q3:p8=kv                4.01    +0.69%   0.00845   3.79    +1.14%   0.01165
 *     q2 / q2:p8=kv                3.02    +4.85%   0.04209   2.81    +4.88%   0.04141
 *     q4:p8=kv:outl=none:r32       4.47    +0.15%   0.00334   (issue 18: <= 4.5 bits, dPPL <= 0.5%, KLD <= 0.01: met)
 *     q3:p8=kv:outl=none:r32       3.47    +2.70%   0.0178    (<= 3.5 bits, dPPL <= 2%: not met)
 *       + pre-RoPE keys, SQuat r = 8   3.47    +1.46%   0.0112    (met; :pre=1:squat=8, q2's engine defaults)
 *     q2:p8=kv:outl=none:r32       2.47    +7.33%   0.0649    (<= 2.5 bits, dPPL <= 8%: met)
 * Without outliers the 8-bit pairs cost nothing measurable (q4 -7% KLD, within noise), as bench/quant_emulation.py
 * predicted; with the keys' outliers they cost q4 +36% and q3 +38% KLD (q2 -2%): the outlier's removal narrows a
 * group's range but not its offset from 0. Speed (kvq-bench cpu, Llama-3-8B shapes, 32k, AVX-512, 2 cores): within
 * 0 .. +9% of the fp16 pairs' ms per step over three runs, inside this machine's run-to-run spread. Off by default:
 * the CUDA backend does not read them yet, and with the engine's keys' outliers they cost quality.
 *
 * 8-bit window (window8 = KVQ_ROLES_*; -1 and 0: fp16 windows; the CPU cache only, the CUDA backend refuses it). The
 * roles' residual windows (R + G rows: the recent R tokens and the keys' partial group) hold each token as int8 codes
 * under one fp16 scale per head, s = fp16(max |x| / 127), code = rint(x / s) within +-127, value = fp16(code * s):
 * (8 + 16 / D) bits per element instead of 16 (kvq_seq_view: window8_k / window8_v). Attention expands a head's rows
 * to fp16 (the kernel tables' w8_expand, bit-identical to the scalar decode) and reads them as an fp16 window; kvq_read
 * returns the same values, and a group leaving the window is quantized from them, so such a cache holds exactly what an
 * fp16-window cache holds when given the 8-bit rounding of each token (tests/test_roundtrip.c checks that model).
 * kvq perplexity --decode-attn, SmolLM2-135M, ctx 8192 (docs/quality.md, "8-bit windows"; 8-bit pairs, no outliers,
 * the engine's defaults otherwise), KLD from F16:
 *     entry                              bits    dPPL     KLD
 *     q4:p8=kv:outl=none (R = 128)       4.59    +0.24%   0.00280   (fp16 window; the 8-bit parameters' table)
 *     q4:p8=kv:outl=none:r32             4.47    +0.15%   0.00334
 *     q4:p8=kv:outl=none:w8=kv           4.41    +0.18%   0.00312   (R = 128, 8-bit)
 *     q3:p8=kv:outl=none:r32             3.47    +2.22%   0.01700   (this run; +2.70% / 0.0178 in the one above)
 *     q3:p8=kv:outl=none:w8=kv           3.42    +2.50%   0.01646
 *       + pre-RoPE keys, SQuat r = 8     3.42    +1.74%   0.01215
 *     q2:p8=kv:outl=none:w8=kv           2.44    +7.18%   0.0606    (r32 above: 2.47 bits, +7.33%, 0.0649)
 * At equal R the 8-bit rows cost +11% KLD on q4 for 0.18 bits less; against an fp16 window of R = 32 they are as good
 * or better at 0.05 bits less (decoding token by token, R buys little past 32 here). Off by default: the CUDA backend
 * keeps fp16 windows, and the window is a small part of the memory past a few thousand tokens.
 *
 * Residual window and group (residual = R, group = G: not switches of this section, but measured with its defaults).
 * kvq perplexity --ctx 1024 --chunks 4 on debian-reference (as above; docs/quality-window-1024.csv), entry:R:G, mean
 * KLD from the F16 cache and bits per element: scales, the sink page and the window's allocated R + G fp16 rows
 * amortized over the 1024 tokens:
 *     G = 64:   R = 0 (= 16 = 32)      R = 64              R = 128 (default)     G = 32, R = 0       G = 128, R = 0
 *     q4        0.00927  5.50 bits     0.00875  6.22       0.00399  6.94         0.00683  5.81       0.01042  6.38
 *     q3        0.0435   4.50          0.0343   5.28       0.0197   6.06         0.0422   4.75       0.0405   5.38
 *     q2        0.400    3.50          0.290    4.34       0.181    5.19         0.303    3.69       0.388    4.38
 *     q8/q4     0.00400  7.38                              0.00201  8.58
 * The perplexity run prefills in batches of 256 tokens (a multiple of G), so after every batch the window holds
 * R + ((n - R) mod G) exact tokens of the n after the sink: 63 for every R < 64, 127 for R = 64, 191 for R = 128
 * (R = 0, 16 and 32 gave identical logits). 191 -> 127 exact tokens costs 1.6x (q2) .. 2.2x (q4) in KLD, 127 -> 63
 * less: the window does buy quality with the rotation and a sink, and nothing smaller is within noise of R = 128
 * (0.43 .. 0.50x the KLD of R < 64 for every type). G = 32 is better than 64 at the same R = 0 (finer key scales) but
 * still 1.7x R = 128's KLD, and costs 0.5 bit more per element in pages; G = 128 is worse than 64 and its window
 * (R + 128 rows) costs more than its scales save below ctx ~8k. Defaults: R = 128, G = 64 (unchanged). At ctx 2048
 * (--chunks 4): q4 KLD 0.00451 at 5.72 bits, q4 R = 0 0.01022 at 5.00 bits (docs/quality.md).
 * Bits: with G = 64 the fp16 scales alone make Q4 4.5 bits, Q3 3.5, Q2 2.5, so no fp16 window fits issue 18's <= 4.5 /
 * 3.5 / 2.5 at ctx 2048 (R = 0 still allocates G rows: 5.0 / 4.0 / 3.0 bits there); 8-bit parameters (above) leave
 * 0.25 bits, R <= 32 at ctx 8192, nothing at ctx 2048 (the keys' partial group alone is 0.5 bits there). An 8-bit
 * window (above) halves that: R = 128 fits at ctx 8192, but at ctx 2048 the G = 64 rows alone are 64 x 8.25 / 2048 =
 * 0.26 bits, so Q4 with 8-bit pairs, no sink and R = 0 measured 4.54 bits (+0.71%, KLD 0.0057), still above 4.5
 * (docs/quality.md, "8-bit residual windows"). Below that would need values
 * quantized at append (they are grouped per token, only keys wait for a group) or a smaller G for the window's keys;
 * each changes how a group leaves the window, not the page layout (section 5).
 * ------------------------------------------------------------------------------------------------------- */

/* Pre-RoPE keys (prerope = 1, rope_neox, rope_theta, rope_freqs; KVQuant). Off by default in the cache (0 in a
 * zero-initialized config and in kvq_cache_config_default): only the caller knows its model's RoPE. With prerope = 1
 * the caller appends keys BEFORE RoPE (queries still after it) and attention scores q . RoPE(t) k_t: each decoded key
 * row is rotated by its position's angles (pairs (x[2i], x[2i+1]) with rope_neox = 0, as GGUF Llama and kvq's
 * engine; (x[i], x[i + D/2]) with rope_neox = 1, as Hugging Face Llama), inverse frequency f_i = rope_freqs[i], or
 * rope_theta^(-2i/D) when rope_freqs is NULL (Llama-3 / YaRN scaling: pass the scaled frequencies; a magnitude
 * factor such as YaRN's attention scaling belongs in the query or the scale). The position of a sequence's token t is
 * t: the engines kvq serves place token t at position t, and fork and truncate keep it (a fork's token t is its
 * source's token t; after a truncate to n, the next token appended is at position n). Every key source is rotated:
 * sink pages, pages of every type, the fp16 window, in decode and prefill.
 * Why: the grouped types quantize keys per channel over G tokens (KIVI); after RoPE a channel pair turns with the
 * position, so each channel's range over a group mixes in its partner's magnitude; before RoPE the outlier channels
 * are steady and the groups narrower.
 * Cost: keys go through the fp32 kernels (decode a tile, rotate it, dot products), not the fused integer key kernels,
 * which take one query per key group; values are unchanged. A segment of 64 tokens takes its first position's
 * angles from fp64 sincos (exact past 2^31 positions) and the rest by angle addition with a per-cache table of
 * cos / sin(k f_i), k < 64 (no table sized by the capacity); the rotation is an AVX2 / AVX-512 kernel (scalar _ref).
 * Rotated keys (rotate with KVQ_ROLES_K): the Hadamard rotation does not commute with RoPE, so instead of rotating
 * the query once, attention takes each decoded key row back through R^T (O(D log D) per key and head) before RoPE:
 * one kernel (unrot_rope: AVX2 / AVX-512, scalar _ref) does both for a tile of 8 rows, each row in registers (R^T
 * with the scalar rotation's fp32 steps in its order, so the same bits; tests/test_rotate.c).
 * Speed (kvq-bench cpu --ctx 32768 --types f16,q4,q2 --prerope --runs 15 --threads 1, Llama-3-8B shapes: 32 query
 * heads, 8 KV heads, D = 128; the 2-core machine shared, load 4.2-4.5, so ratios only), ms per step AVX-512 / AVX2:
 *     F16 26.4 / 25.5    F16 pre-RoPE (no rotation) 28.7 / 31.9
 *     Q4   8.6 /  8.0    Q4 pre-RoPE (keys rotated) 27.9 / 29.7     (before unrot_rope, same load: 110.8 / 111.0)
 *     Q2   7.3 /  6.8    Q2 pre-RoPE (keys rotated) 25.5 / 27.6     (before: 108.1 / 106.4; 16x Q2's time)
 * Pre-RoPE Q2 runs at about F16's speed (0.92-1.03x) reading 6x fewer bytes, 3.5-4x post-RoPE Q2's time: the fp32
 * key path (decode a tile, R^T + RoPE, dot products) in place of the fused integer key kernels; F16 pre-RoPE shows
 * what the fp32 path and RoPE cost without R^T. Measured better than leaving pre-RoPE keys unrotated (KVQuant's
 * per-channel keys) for every grouped type, so both are allowed and the rotation default stays as it is.
 * kvq_read returns the keys as appended (pre-RoPE); kvq_rope_apply gives the post-RoPE ones. The CUDA backend
 * rejects prerope = 1 (KVQ_ERR_INVALID_ARG). Errors: prerope not 0/1, and with prerope = 1 rope_neox not 0/1,
 * rope_freqs with a NaN, Inf or negative value, or (rope_freqs NULL) rope_theta not finite and > 1:
 * KVQ_ERR_INVALID_ARG; with prerope = 0 the rope fields are not read.
 * Measured (SmolLM2-135M-Instruct Q4_1, debian-reference, kvq perplexity --ctx 1024 --chunks 4 --compare ..., 2048
 * scored tokens, F16 6.5435; each entry the types' defaults above, :pre= and :rot= as given):
 *     entry                     dPPL      KLD      top-1        entry                     dPPL      KLD      top-1
 *     q4 (rot=k)  pre=0       -0.017%  0.00399   97.71%        q2 (rot=kv) pre=0       +16.00%   0.181    86.13%
 *     q4 rot=k    pre=1       +0.422%  0.00417   97.95%        q2 rot=kv   pre=1       +11.88%   0.125    89.06%
 *     q4 rot=none pre=1       +0.230%  0.00393   97.36%        q2 rot=v    pre=1       +21.44%   0.209    84.42%
 *     q4 rot=v    pre=1       +0.305%  0.00383   97.51%        q2 rot=none pre=1       +26.00%   0.238    84.28%
 *     q3 (rot=kv) pre=0       +2.648%  0.0197    95.56%
 *     q3 rot=kv   pre=1       +2.034%  0.0148    95.17%
 *     q3 rot=v    pre=1       +2.313%  0.0197    94.87%
 *     q2/q8 rot=k pre=0       +11.88%   0.122    88.57%        q3/q2 (rot=kv) pre=0    +4.652%   0.0459   93.41%
 *     q2/q8 rot=k pre=1       +6.588%   0.0743   90.82%        q3/q2 rot=kv   pre=1    +2.407%   0.0403   93.26%
 *     q2/q8 rot=none pre=1    +15.77%   0.149    86.72%        q3/q2 rot=v    pre=1    +2.425%   0.0479   93.31%
 *     q2 rot=kv pre=1 nuq=k   +9.913%   0.111    89.21%        q3 rot=kv pre=1 nuq=k   +1.669%   0.0167   94.97%
 *     q3 rot=none pre=1       +3.319%   0.0347   93.41%
 * Pre-RoPE keys with the rotation cut Q3's KLD by 25% and Q2's by 31% (dPPL +2.65% -> +2.03%, +16.0% -> +11.9%);
 * without the key rotation they lose to it. Q4's KLD moves within noise (0.0038 .. 0.0042), so Q4 stays post-RoPE
 * and keeps its integer key kernels. Q2 keys alone (values Q8) lose 39% of their KLD, the q3/q2 mix 12%. Non-uniform
 * levels for pre-RoPE Q2 keys take another 11% (0.125 -> 0.111; free: those keys use the fp32 kernels), so they are
 * the default there (nonuniform = -1, table above); Q3's keys and values keep theirs (keys alone: 0.0167, worse).
 * With the keys' outliers (below) the models disagree: uniform levels cut SmolLM2's KLD by 32% at ctx 2048 and 19% at
 * 8192 (dPPL +2.61% -> +1.14%, +4.85% -> +3.03%) and raise Gemma 3's by 86% at 2048 and 61% at 8192 (+3.97% ->
 * +6.42%, +9.56% -> +14.8%), so the default stays (docs/quality.md, "Q2 keys' levels with outliers").
 * At ctx 2048 with SQuat (below; docs/quality.md, "2026-12-04: pre-RoPE Q2 keys"), pre-RoPE Q2 keys take Q2 from
 * dPPL +11.1% / KLD 0.124 to +5.8% / 0.082 (without SQuat +7.8% / 0.102), so kvq's engine (src/model/llama.c,
 * llama_default_prerope) stores Q2 keys pre-RoPE by default, at the decode cost above; other key types stay
 * post-RoPE (Q4: within noise, and it keeps its integer key kernels; Q3: not measured at ctx 2048 with SQuat).
 * kvq run / perplexity --kv-prerope 0|1 (compare suffix :pre=) overrides it; the GPU engine has none.
 *
 * Rotation (rotate = a KVQ_ROLES_* set, rotation_seed). Keys and/or values are multiplied by a fixed orthonormal
 * randomized Walsh-Hadamard matrix R = H diag(s) / sqrt(n) per head vector before they are stored (window and pages):
 * it spreads channel outliers over the whole vector, so that per-token scales (Q8, Q4/Q2 values) get a finer step.
 * Attention rotates each query row once (q.k = Rq.Rk) and un-rotates each output row once (sum p_i v_i =
 * R^T sum p_i R v_i): O(D log D) per query head, nothing per cached token; kvq_read un-rotates. Append also rejects
 * (KVQ_ERR_NONFINITE, nothing appended) a finite K/V whose rotated value exceeds 65504.
 * R: n = D for D = 64, 128, 256; block-diagonal 64 + 16 / 64 + 32 for D = 80 / 96 (it quantizes better than two
 * stages of blocks that mix all channels: rotate.c has the measurement). s = the sign bits of splitmix64 outputs
 * seeded by (rotation_seed or 0x6b7671 when 0, layer, role): a different R per layer and per role.
 * Pages and windows (kvq_seq_view) hold R k / R v for the rotated roles: an engine with its own kernels applies
 * kvq_rotation_apply to its queries (role KVQ_KEY, inverse 0) and outputs (KVQ_VALUE, inverse 1) of that layer.
 * Default (rotate = -1): keys of Q8, Q4, Q3, Q2 and values of Q3, Q2, except Q4 keys with Q2 values: values only; never
 * F16/BF16 (nothing to gain) nor FP8 (relative error per element: rotated, its read-back NMSE is 2.2x higher,
 * test_rotate). Measured: SmolLM2-135M Q4_1, debian-reference, ctx 1024, 4 chunks, PPL change vs the F16 cache
 * (6.5435), rotate none / K / V / KV:
 *   q8     +0.12%  -0.05%  +0.13%  -0.01%      q8/q4  +0.39%  +0.18%  +0.38%  +0.29%
 *   q4     +1.09%  -0.29%  +1.04%  +0.06%      q4/q2  +15.9%  +16.5%  +5.08%  +6.72%
 *   q2     +75.5%  +62.2%  +68.5%  +41.9%
 */
/* SQuat keys (squat_rank = r, squat_lambda; kvq_seq_set_key_subspace; "SQuat: Subspace-orthogonal KV cache
 * quantization"). Attention reads a key only through q . k; when one head's queries live mostly in an r-dimensional
 * subspace (basis B, D x r), the part of a key's quantization error inside it moves the logits, the part orthogonal
 * to it hardly does. With a basis set for (sequence, layer, KV head), each key group is quantized channel by channel
 * (channel order, the per-channel (scale, min) of each channel taken over its values at that point) and after each
 * channel the channels not yet quantized absorb its error so as to minimize, per token, e^T (B B^T + lambda I) e
 * (OBQ / GPTQ with that matrix in place of a Hessian: src/core/squat.c). Only the values written change: the page
 * layout (section 5), KVQ_LAYOUT_VERSION and every attention kernel are the same as without it, and a cache with a
 * rank but no basis set for a sequence quantizes it exactly as before (bit for bit).
 * Which types: grouped key types (Q4, Q3, Q2: keys per channel over G tokens, the only key grouping the cache has;
 * uniform and non-uniform levels alike: the error is measured against the decoded level). squat_rank > 0 with another
 * key type: KVQ_ERR_UNSUPPORTED_TYPE at create (Q8 keys would need the same loop per token with a row-wide scale).
 * Values are untouched. squat_rank: 0 .. 32 and < head_dim, else KVQ_ERR_INVALID_ARG; squat_lambda NaN / Inf:
 * KVQ_ERR_INVALID_ARG. Auto lambda (squat_lambda <= 0): r / D, the mean eigenvalue of B B^T (trace r over D
 * channels), so the ridge weighs the total error like the subspace's per dimension; smaller cancels more of the
 * subspace's error and widens the later channels' ranges (tests/test_squat.c, D = 64, r = 8, random basis: the
 * in-subspace error x0.17 .. x0.22 of plain quantization at x1.16 .. x1.18 its total; lambda 0.01: x0.09 at x1.46).
 * The basis: the caller's (un-rotated) key frame, i.e. post-RoPE keys' frame, or the pre-RoPE keys' with prerope = 1
 * (kvq's engine then takes its queries before their RoPE: its queries after RoPE, which sample the pre-RoPE query
 * turned by the distances that reach a key, measured worse, Q2 KLD 0.0894 against 0.0819 at ctx 2048); with the key rotation on, the cache stores R B and
 * quantizes rotated keys against it; kvq_seq_get_key_subspace gives back B. Kept per (sequence, layer, KV head) on
 * the heap (one block per sequence from its first set: n_layers x H x D x r floats + flags); kvq_seq_fork copies it,
 * kvq_seq_truncate and kvq_seq_drop_front keep it (tokens a truncate moves back into the window are quantized again
 * with it), kvq_seq_free releases it; a new sequence has none. Tokens quantized before a basis is set stay as they are.
 * Cost: D^3 / 6 flops for the factor per key group and head, + G D^2 / 2 for the updates (a key group of plain
 * quantization is G D): at append only, when a group leaves the window; attention is unchanged. The CUDA backend
 * rejects squat_rank > 0 (KVQ_ERR_INVALID_ARG): its append kernels quantize without a subspace.
 * Default: off in the cache (0 in a zero-initialized config and in kvq_cache_config_default): the subspace comes from
 * the model's queries, which only the caller has. kvq's CPU engine (src/model/llama.c, llama_default_squat) turns it
 * on with r = 8 and auto lambda for Q2 keys (Q4/Q3 keys: --kv-squat 8; why, below): the first forward call of a sequence (its first prefill batch)
 * takes that batch's queries of every query head of a KV head's group, in the keys' frame, and sets the top-r
 * eigenvectors of Q^T Q (orthogonal iteration, deterministic) on every layer and KV head; kvq run / perplexity /
 * passkey --kv-squat R (0 off), --kv-squat-lambda, compare suffixes :squat=R and :lambda=X. Measured (docs/quality.md,
 * "2026-12-04: SQuat keys"; KLD from the F16 cache, the other mechanisms at their defaults):
 *     SmolLM2-135M, ctx 2048, 4 chunks      plain             r = 8, auto lambda
 *       q4                                  +0.47%  0.00451   +0.50%  0.00383   (KLD -15%)
 *       q3                                  +1.25%  0.0183    +1.07%  0.0168    (-8%; the first 2 chunks alone: +4%)
 *       q2                                  +16.1%  0.179     +11.1%  0.124     (-31%)
 *       q2, pre-RoPE keys (nuq k)           +7.82%  0.102     +5.84%  0.0819    (-20%; the engine's default)
 *     Gemma 3 270M, ctx 1024, 2 chunks
 *       q4                                  +1.44%  0.00988   +0.75%  0.00777   (-21%)
 * Lambda 0.0125 .. 0.125 measured within noise of each other, 1 loses part of the gain. Decode: unchanged (same bytes,
 * same kernels). Prefill, quiet machine, `kvq bench --depths 0 --prefill 2048 -b 256 -t 2`, two runs: SmolLM2 q4
 * 426 / 435 -> 344 / 368 tok/s, q2 391 / 389 -> 341 / 350 (-10 .. -19%); Gemma 3 q4 336 / 360 -> 208 / 202 (-38 ..
 * -44%: D = 256). So the engine's default is on for Q2 keys only, where it buys dPPL (+16.1% -> +11.1%); for Q4 it
 * buys KLD, not dPPL, at that prefill cost, and Q3's gain did not hold on every chunk subset.
 */
/* Pre-RoPE keys: x [n_tokens][n_kv_heads][head_dim] fp32, in place: token i's vectors rotated by the cache's RoPE at
 * position pos0 + i (inverse = 0: RoPE(p) x, what attention applies to a stored key; 1: RoPE(p)^T x, which takes a
 * post-RoPE key back to the form the cache stores). With kvq_read it gives the post-RoPE keys. KVQ_ERR_INVALID_ARG for
 * a cache with prerope = 0 or inverse not 0/1, KVQ_ERR_RANGE for negative positions. Angles in fp64. */
KVQ_API kvq_status kvq_rope_apply(const kvq_cache *cache, int64_t pos0, int64_t n_tokens, int inverse, float *x);

/* x: n_vectors vectors of head_dim floats, in place: x <- R x (inverse = 0) or R^T x (inverse = 1) with the R of
 * (layer, role); the identity where the cache does not rotate `role`. */
KVQ_API kvq_status kvq_rotation_apply(const kvq_cache *cache, int layer, kvq_role role, int inverse, float *x,
                                      int n_vectors);

#ifdef __cplusplus
}
#endif
#endif /* KVQ_H */

/* The paged cache: configuration, page accounting, sequences (fork / truncate / free), append with the residual
 * window, and read back. Every mutating call validates everything, including page availability, before it
 * writes its first byte, so a failing call leaves the cache as it was. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>

#define FN_APPEND "kvq_append"

/* default sinks for caches with a grouped type (kvq.h section 10 gives the measurement); per-token types: 0 */
#define KVQ__SINKS_GROUPED 1

kvq_cache_config kvq_cache_config_default(void) {
    kvq_cache_config c = {0};
    c.type_k = KVQ_TYPE_F16;
    c.type_v = KVQ_TYPE_F16;
    c.residual = -1;
    c.rotate = -1;
    c.sinks = -1;
    c.nonuniform = -1;
    c.qnorm = -1;
    c.outliers = -1;
    c.params8 = -1;
    c.window8 = -1;
    return c;
}

/* rotate = -1 (kvq.h section 10, measured on SmolLM2 and Gemma 3 there): keys of Q8/Q4/Q3/Q2 and values of
 * Q4/Q3/Q2, except values alone for Q4 keys with Q2 values (rotating those keys too measured 1.6% worse); FP8 never
 * (its error is relative per element: rotated, it grows), F16/BF16 never (nothing to gain). Q4 values since
 * 2026-12-05 (q8/q4 KLD -32% SmolLM2, -44% Gemma 3; q4 -9%, -18%). */
static int default_rotate(kvq_type tk, kvq_type tv) {
    if (tk == KVQ_TYPE_Q4 && tv == KVQ_TYPE_Q2) return KVQ_ROLES_V;
    int r = KVQ_ROLES_NONE;
    if (tk == KVQ_TYPE_Q8 || tk == KVQ_TYPE_Q4 || tk == KVQ_TYPE_Q3 || tk == KVQ_TYPE_Q2) r |= KVQ_ROLES_K;
    if (tv == KVQ_TYPE_Q4 || tv == KVQ_TYPE_Q3 || tv == KVQ_TYPE_Q2) r |= KVQ_ROLES_V;
    return r;
}

/* kvq.h section 10: non-uniform levels by default where they were measured to help and cost no speed: Q3 (its
 * kernels decode every code through the level table); Q4/Q2 would leave their integer kernels for fp32 ones */
static int default_nonuniform(kvq_type tk, kvq_type tv, int prerope) {
    /* pre-RoPE Q2 keys go through the fp32 kernels anyway: their levels cost nothing and cut Q2's KLD by 11% */
    bool k = tk == KVQ_TYPE_Q3 || (tk == KVQ_TYPE_Q2 && prerope == 1);
    return (k ? KVQ_ROLES_K : 0) | (tv == KVQ_TYPE_Q3 ? KVQ_ROLES_V : 0);
}

/* Validates cfg (all but arena_bytes when check_arena is false), resolves its defaults and computes the layout and
 * window geometry. */
static kvq_status resolve_checked(const kvq_cache_config *in, kvq_cache_config *cfg, kvq_page_layout *L, int *W,
                                  int *Gf, bool check_arena) {
    KVQ_CHECK_NULL(in, "kvq_cache_config");
    *cfg = *in;
    if (cfg->n_layers < 1 || cfg->n_layers > 4096)
        return kvq__fail(KVQ_ERR_INVALID_ARG, "n_layers %d outside 1..4096", cfg->n_layers);
    if (cfg->group == 0) cfg->group = 64;
    if (cfg->page_tokens == 0) cfg->page_tokens = cfg->group > 64 ? cfg->group : 64;
    kvq_status s = kvq_page_layout_make(cfg->type_k, cfg->type_v, cfg->n_kv_heads, cfg->head_dim,
                                        cfg->page_tokens, cfg->group, L);
    if (s) return s;
    bool grouped = L->group > 1;
    if (cfg->residual == -1) cfg->residual = grouped ? 128 : 0;
    if (cfg->residual < 0 || cfg->residual > 4096)
        return kvq__fail(KVQ_ERR_INVALID_ARG, "residual %d outside 0..4096 (or -1 for the default)", cfg->residual);
    if (cfg->max_seqs == 0) cfg->max_seqs = 256;
    if (cfg->max_seqs < 1 || cfg->max_seqs > 65536)
        return kvq__fail(KVQ_ERR_INVALID_ARG, "max_seqs %d outside 1..65536", cfg->max_seqs);
    if (cfg->n_threads < 0 || cfg->n_threads > 1024)
        return kvq__fail(KVQ_ERR_INVALID_ARG, "n_threads %d outside 0..1024", cfg->n_threads);
    /* quality mechanisms (kvq.h section 10): defaults resolved per type */
    if (cfg->rotate == -1) cfg->rotate = default_rotate(cfg->type_k, cfg->type_v);
    if (cfg->rotate < 0 || cfg->rotate > KVQ_ROLES_KV)
        return kvq__fail(KVQ_ERR_INVALID_ARG, "rotate %d is not a set of roles 0..3 (or -1 for the default)", cfg->rotate);
    if (cfg->sinks == -1) cfg->sinks = grouped ? KVQ__SINKS_GROUPED : 0; /* kvq.h section 10: measured */
    if (cfg->sinks < 0 || cfg->sinks > 1024)
        return kvq__fail(KVQ_ERR_INVALID_ARG, "sinks %d outside 0..1024 (or -1 for the default)", cfg->sinks);
    /* Q-Norm: off unless asked (the CUDA backend quantizes with min/max only, and a cache of one config holds the same
     * bytes on both; kvq's CPU engine turns it on); roles of per-token types ignore it */
    if (cfg->qnorm == -1) cfg->qnorm = KVQ_ROLES_NONE;
    if (cfg->qnorm < 0 || cfg->qnorm > KVQ_ROLES_KV)
        return kvq__fail(KVQ_ERR_INVALID_ARG, "qnorm %d is not a set of roles 0..3 (or -1 for the default)", cfg->qnorm);
    if (cfg->nonuniform == -1) cfg->nonuniform = default_nonuniform(cfg->type_k, cfg->type_v, cfg->prerope);
    if (cfg->nonuniform < 0 || cfg->nonuniform > KVQ_ROLES_KV)
        return kvq__fail(KVQ_ERR_INVALID_ARG, "nonuniform %d is not a set of roles 0..3 (or -1 for the default)",
                         cfg->nonuniform);
    /* pre-RoPE keys (kvq.h section 10): the rope fields are read only with prerope = 1 */
    if (cfg->prerope != 0 && cfg->prerope != 1)
        return kvq__fail(KVQ_ERR_INVALID_ARG, "prerope %d is not 0 or 1", cfg->prerope);
    if (!cfg->prerope) cfg->rope_freqs = NULL; /* not read: kvq_cache_get_config must not hand back a borrowed pointer */
    if (!cfg->rotate) cfg->rotation_layers = NULL; /* likewise */
    for (int l = 0; cfg->rotation_layers && l < cfg->n_layers; l++)
        if (cfg->rotation_layers[l] < 0)
            return kvq__fail(KVQ_ERR_INVALID_ARG, "rotation_layers[%d] = %d is negative", l, (int)cfg->rotation_layers[l]);
    if (cfg->prerope) {
        if (cfg->rope_neox != 0 && cfg->rope_neox != 1)
            return kvq__fail(KVQ_ERR_INVALID_ARG, "rope_neox %d is not 0 (adjacent pairs) or 1 (NeoX halves)",
                             cfg->rope_neox);
        if (cfg->rope_freqs) {
            for (int i = 0; i < L->head_dim / 2; i++)
                if (!(cfg->rope_freqs[i] >= 0) || !isfinite(cfg->rope_freqs[i]))
                    return kvq__fail(KVQ_ERR_INVALID_ARG, "rope_freqs[%d] = %g is not finite and >= 0", i,
                                     (double)cfg->rope_freqs[i]);
        } else if (!(cfg->rope_theta > 1) || !isfinite(cfg->rope_theta)) {
            return kvq__fail(KVQ_ERR_INVALID_ARG, "rope_theta %g is not finite and > 1 (prerope = 1, no rope_freqs)",
                             (double)cfg->rope_theta);
        }
    }
    /* SQuat keys (kvq.h section 10): grouped key types only; lambda <= 0 is auto */
    if (cfg->squat_rank < 0 || cfg->squat_rank > 32 || cfg->squat_rank >= L->head_dim)
        return kvq__fail(KVQ_ERR_INVALID_ARG, "squat_rank %d outside 0..32 (and < head_dim %d)", cfg->squat_rank,
                         L->head_dim);
    if (cfg->squat_rank > 0 && !kvq_type_get_traits(L->type_k)->grouped)
        return kvq__fail(KVQ_ERR_UNSUPPORTED_TYPE, "squat_rank %d: SQuat needs a grouped key type (q4, q3, q2), not %s",
                         cfg->squat_rank, kvq_type_get_traits(L->type_k)->name);
    if (!isfinite(cfg->squat_lambda))
        return kvq__fail(KVQ_ERR_INVALID_ARG, "squat_lambda %g is not finite (<= 0: auto)", (double)cfg->squat_lambda);
    if (cfg->squat_lambda < 0) cfg->squat_lambda = 0;
    /* dense-and-sparse outliers: none unless asked (with SQuat keys too: squat.c propagates each outlier's error as
     * what it reads back, its residual added) */
    if (cfg->outliers == -1) cfg->outliers = KVQ_ROLES_NONE;
    if (cfg->outliers < 0 || cfg->outliers > KVQ_ROLES_KV)
        return kvq__fail(KVQ_ERR_INVALID_ARG, "outliers %d is not a set of roles 0..3 (or -1 for the default)",
                         cfg->outliers);
    /* 8-bit group parameters: fp16 pairs unless asked */
    if (cfg->params8 == -1) cfg->params8 = KVQ_ROLES_NONE;
    if (cfg->params8 < 0 || cfg->params8 > KVQ_ROLES_KV)
        return kvq__fail(KVQ_ERR_INVALID_ARG, "params8 %d is not a set of roles 0..3 (or -1 for the default)",
                         cfg->params8);
    kvq__layout_set_sections(L, cfg->params8, cfg->outliers);
    /* 8-bit windows: fp16 unless asked */
    if (cfg->window8 == -1) cfg->window8 = KVQ_ROLES_NONE;
    if (cfg->window8 < 0 || cfg->window8 > KVQ_ROLES_KV)
        return kvq__fail(KVQ_ERR_INVALID_ARG, "window8 %d is not a set of roles 0..3 (or -1 for the default)",
                         cfg->window8);
    /* the layout records the roles whose type has levels (grouped types); other roles ignore the field */
    L->nonuniform = cfg->nonuniform & ((kvq_type_get_traits(L->type_k)->grouped ? KVQ_ROLES_K : 0) |
                                       (kvq_type_get_traits(L->type_v)->grouped ? KVQ_ROLES_V : 0));
    *Gf = L->group;
    *W = cfg->residual + *Gf;
    if (!check_arena) return KVQ_OK;
    int64_t pages = (int64_t)(cfg->arena_bytes / L->page_bytes);
    if (pages < cfg->n_layers)
        return kvq__fail(KVQ_ERR_INVALID_ARG,
                         "arena_bytes %zu holds %lld pages of %zu bytes: fewer than one per layer (%d)",
                         cfg->arena_bytes, (long long)pages, L->page_bytes, cfg->n_layers);
    if (pages > INT32_MAX) return kvq__fail(KVQ_ERR_INVALID_ARG, "arena_bytes %zu: more than 2^31 pages", cfg->arena_bytes);
    return KVQ_OK;
}

static kvq_status resolve(const kvq_cache_config *in, kvq_cache_config *cfg, kvq_page_layout *L, int *W, int *Gf) {
    return resolve_checked(in, cfg, L, W, Gf, true);
}

/* Sink rows per page (K and V fp16 of all heads: at least 2 for every valid layout, P >= 16) and sink pages of a
 * full sink block */
static void sink_geometry(const kvq_cache_config *cfg, const kvq_page_layout *L, int *SR, int *SP) {
    *SR = (int)(L->page_bytes / (4 * (size_t)L->n_kv_heads * L->head_dim));
    *SP = (cfg->sinks + *SR - 1) / *SR;
}

/* Arena pages one (sequence, layer) of n tokens occupies: sink pages, then pages of the tokens after the sinks */
static int64_t pages_for_tokens(const kvq_cache_config *cfg, const kvq_page_layout *L, int64_t n) {
    int SR, SP;
    sink_geometry(cfg, L, &SR, &SP);
    int64_t s = n < cfg->sinks ? n : cfg->sinks, rest = n - s;
    /* no rounding-up sum first: rest + P - 1 overflows near INT64_MAX */
    return (s + SR - 1) / SR + rest / L->page_tokens + (rest % L->page_tokens != 0);
}

size_t kvq_cache_arena_bytes_for(const kvq_cache_config *in, int64_t n_tokens) {
    const char *fn = "kvq_cache_arena_bytes_for";
    kvq_cache_config cfg = {0};
    kvq_page_layout L;
    int W, Gf;
    if (resolve_checked(in, &cfg, &L, &W, &Gf, false) != KVQ_OK) return 0;
    if (n_tokens < 0) {
        kvq__fail(KVQ_ERR_INVALID_ARG, "%s: n_tokens %lld is negative", fn, (long long)n_tokens);
        return 0;
    }
    /* pages per layer without rounding n_tokens up first (n_tokens + P - 1 overflows near INT64_MAX); the arena
     * kvq_cache_create accepts has at most INT32_MAX pages, so anything above that is an error, not a size */
    int64_t pages = pages_for_tokens(&cfg, &L, n_tokens);
    if (pages == 0) pages = 1;
    if (pages > INT32_MAX / cfg.n_layers) {
        kvq__fail(KVQ_ERR_INVALID_ARG, "%s: %lld tokens need %lld pages in each of %d layers: more than the %d pages "
                  "a cache can have", fn, (long long)n_tokens, (long long)pages, cfg.n_layers, INT32_MAX);
        return 0;
    }
    /* <= 2^31 pages of at most 2^33 bytes (H = 1024, D = 256, P = 4096, F16): fits in 64 bits */
    if ((uint64_t)pages * (uint64_t)cfg.n_layers > SIZE_MAX / L.page_bytes) {
        kvq__fail(KVQ_ERR_INVALID_ARG, "%s: %lld tokens need more than SIZE_MAX bytes", fn, (long long)n_tokens);
        return 0;
    }
    return (size_t)pages * (size_t)cfg.n_layers * L.page_bytes;
}

kvq_status kvq_cache_config_layout(const kvq_cache_config *in, kvq_page_layout *out) {
    KVQ_CHECK_NULL(out, "kvq_cache_config_layout");
    kvq_cache_config cfg = {0};
    kvq_page_layout L;
    int W, Gf;
    kvq_status s = resolve_checked(in, &cfg, &L, &W, &Gf, false);
    if (s) return s;
    *out = L;
    return KVQ_OK;
}

int64_t kvq_cache_capacity_tokens(const kvq_cache_config *in) {
    kvq_cache_config cfg = {0};
    kvq_page_layout L;
    int W, Gf;
    kvq_status s = resolve(in, &cfg, &L, &W, &Gf);
    if (s) return s;
    int SR, SP;
    sink_geometry(&cfg, &L, &SR, &SP);
    int64_t ppl = (int64_t)(cfg.arena_bytes / L.page_bytes) / cfg.n_layers;
    if (ppl <= SP) return ppl * SR < cfg.sinks ? ppl * SR : cfg.sinks;
    return cfg.sinks + (ppl - SP) * L.page_tokens;
}

kvq_status kvq_cache_create(const kvq_cache_config *in, kvq_cache **out) {
    KVQ_CHECK_NULL(out, "kvq_cache_create");
    *out = NULL;
    kvq__init_tables();
    kvq_cache *c = kvq__calloc(1, sizeof *c);
    if (!c) return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, "kvq_cache_create: no memory for the cache object");
    kvq_status s = resolve(in, &c->cfg, &c->L, &c->W, &c->Gf);
    if (s) {
        free(c);
        return s;
    }
    c->n_pages = (int64_t)(c->cfg.arena_bytes / c->L.page_bytes);
    c->S = c->cfg.sinks;
    sink_geometry(&c->cfg, &c->L, &c->SR, &c->SP);
    /* n_pages <= INT32_MAX (resolve) and page_bytes <= 2^33: no overflow, rounding up included */
    size_t arena = ((size_t)c->n_pages * c->L.page_bytes + 63) & ~(size_t)63;
    c->arena = kvq__aligned_alloc(64, arena);
    c->refcnt = kvq__calloc((size_t)c->n_pages, sizeof *c->refcnt);
    c->free_list = kvq__malloc((size_t)c->n_pages * sizeof *c->free_list);
    c->seqs = kvq__calloc((size_t)c->cfg.max_seqs, sizeof *c->seqs);
    if (!c->arena || !c->refcnt || !c->free_list || !c->seqs) {
        /* the message is formatted before c is freed: it reads c's fields */
        kvq_status e = c->arena ? kvq__fail(KVQ_ERR_OUT_OF_MEMORY,
                                            "kvq_cache_create: no memory for the page tables of %lld pages",
                                            (long long)c->n_pages)
                                : kvq__fail(KVQ_ERR_OUT_OF_MEMORY,
                                            "kvq_cache_create: cannot allocate an arena of %zu bytes", arena);
        kvq_cache_free(c);
        return e;
    }
    if (c->cfg.rotation_layers) { /* the caller's array is borrowed for the call only */
        if (!(c->rot_layers = kvq__malloc((size_t)c->cfg.n_layers * sizeof *c->rot_layers))) {
            kvq_cache_free(c);
            return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, "kvq_cache_create: no memory for rotation_layers");
        }
        memcpy(c->rot_layers, c->cfg.rotation_layers, (size_t)c->cfg.n_layers * sizeof *c->rot_layers);
        c->cfg.rotation_layers = c->rot_layers;
    }
    if (c->cfg.prerope && (s = kvq__rope_init(c))) {
        kvq_cache_free(c);
        return s;
    }
    /* pop order = ascending page ids, which keeps a fresh sequence's pages contiguous */
    for (int64_t i = 0; i < c->n_pages; i++) c->free_list[i] = (int32_t)(c->n_pages - 1 - i);
    c->n_free = c->n_pages;
    *out = c;
    return KVQ_OK;
}

static void seq_release(kvq_cache *c, kvq_seq *q);

void kvq_cache_free(kvq_cache *c) {
    if (!c) return;
    if (c->seqs)
        for (int i = 0; i < c->cfg.max_seqs; i++)
            if (c->seqs[i].live) seq_release(c, &c->seqs[i]);
    free(c->seqs);
    free(c->free_list);
    free(c->refcnt);
    free(c->arena);
    free(c->rope_f), free(c->rope_kc), free(c->rope_ks);
    free(c->rot_layers);
    free(c);
}

kvq_status kvq_cache_get_config(const kvq_cache *c, kvq_cache_config *cfg, kvq_page_layout *layout) {
    KVQ_CHECK_NULL(c, "kvq_cache_get_config");
    if (cfg) *cfg = c->cfg;
    if (layout) *layout = c->L;
    return KVQ_OK;
}

void kvq__win_put(const kvq_cache *c, kvq_role role, uint8_t *row, const float *x) {
    int H = c->L.n_kv_heads, D = c->L.head_dim;
    if (!kvq__win8(c, role)) {
        uint16_t *o = (uint16_t *)(void *)row;
        for (size_t e = 0; e < (size_t)H * D; e++) o[e] = kvq__f32_to_f16(x[e]);
        return;
    }
    int8_t *q = (int8_t *)row;
    for (int h = 0; h < H; h++) {
        const float *xh = x + (size_t)h * D;
        float amax = 0;
        for (int d = 0; d < D; d++) amax = fmaxf(amax, fabsf(xh[d]));
        uint16_t s16 = kvq__f32_to_f16(amax / 127.0f);
        float s = kvq__f16_to_f32(s16);
        for (int d = 0; d < D; d++) {
            /* fp16 rounding of the scale may leave max |x| / s a little above 127: clamped */
            float r = s > 0 ? rintf(xh[d] / s) : 0.0f;
            q[(size_t)h * D + d] = (int8_t)(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
        }
        memcpy(row + (size_t)H * D + 2 * (size_t)h, &s16, 2);
    }
}

void kvq__w8_expand_ref(const int8_t *q, uint16_t scale, int n, uint16_t *out) {
    float s = kvq__f16_to_f32(scale);
    for (int d = 0; d < n; d++) out[d] = kvq__f32_to_f16((float)q[d] * s);
}

void kvq__win_get_f16(const kvq_cache *c, kvq_role role, const uint8_t *row, int h, uint16_t *out) {
    int D = c->L.head_dim;
    if (!kvq__win8(c, role)) memcpy(out, row + (size_t)h * D * 2, (size_t)D * 2);
    else kvq__w8_expand_ref(kvq__win8_codes(c, row, h), kvq__win8_scale(c, row, h), D, out);
}

void kvq__win_get_f32(const kvq_cache *c, kvq_role role, const uint8_t *row, int h, float *out) {
    uint16_t tmp[256];
    kvq__win_get_f16(c, role, row, h, tmp);
    for (int d = 0; d < c->L.head_dim; d++) out[d] = kvq__f16_to_f32(tmp[d]);
}

/* bytes of one window row of both roles: one token, all heads */
static size_t window_row_bytes(const kvq_cache *c) {
    return kvq__win_row_bytes(c, KVQ_KEY) + kvq__win_row_bytes(c, KVQ_VALUE);
}

kvq_status kvq_cache_get_stats(const kvq_cache *c, kvq_cache_stats *st) {
    KVQ_CHECK_NULL(c, "kvq_cache_get_stats");
    KVQ_CHECK_NULL(st, "kvq_cache_get_stats");
    memset(st, 0, sizeof *st);
    st->pages_total = c->n_pages;
    st->pages_free = c->n_free;
    for (int64_t i = 0; i < c->n_pages; i++) st->pages_shared += c->refcnt[i] > 1;
    st->page_bytes = c->L.page_bytes;
    st->arena_bytes = c->cfg.arena_bytes;
    st->page_bytes_in_use = (size_t)(c->n_pages - c->n_free) * c->L.page_bytes;
    st->n_seqs = c->n_live;
    for (int i = 0; i < c->cfg.max_seqs; i++) {
        if (!c->seqs[i].live) continue;
        st->tokens += kvq__seq_len(&c->seqs[i].layers[0]);
        for (int l = 0; l < c->cfg.n_layers; l++)
            st->window_bytes += (size_t)c->seqs[i].layers[l].wcap * window_row_bytes(c);
    }
    st->bytes_per_token = (double)c->L.page_bytes * c->cfg.n_layers / c->L.page_tokens;
    kvq_page_layout F;
    kvq_page_layout_make(KVQ_TYPE_F16, KVQ_TYPE_F16, c->L.n_kv_heads, c->L.head_dim, c->L.page_tokens, 0, &F);
    st->f16_bytes_per_token = (double)F.page_bytes * c->cfg.n_layers / F.page_tokens;
    int64_t ppl = c->n_pages / c->cfg.n_layers;
    st->capacity_tokens = ppl <= c->SP ? (ppl * c->SR < c->S ? ppl * c->SR : c->S) : c->S + (ppl - c->SP) * c->L.page_tokens;
    return KVQ_OK;
}

/* ---- sequences ---- */

kvq_status kvq__check_seq(const kvq_cache *c, int32_t seq, const char *fn) {
    if (seq < 0 || seq >= c->cfg.max_seqs || !c->seqs[seq].live)
        return kvq__fail(KVQ_ERR_NO_SEQ, "%s: sequence %d does not exist (or was freed)", fn, (int)seq);
    return KVQ_OK;
}

kvq_status kvq__check_layer(const kvq_cache *c, int layer, const char *fn) {
    if (layer < 0 || layer >= c->cfg.n_layers)
        return kvq__fail(KVQ_ERR_SHAPE, "%s: layer %d outside 0..%d", fn, layer, c->cfg.n_layers - 1);
    return KVQ_OK;
}

static void page_unref(kvq_cache *c, int32_t id) {
    if (id < 0) return; /* a page kvq_seq_drop_front already released */
    if (--c->refcnt[id] == 0) c->free_list[c->n_free++] = id;
}

static int32_t page_alloc(kvq_cache *c) {
    int32_t id = c->free_list[--c->n_free];
    c->refcnt[id] = 1;
    return id;
}

/* Frees the slot's memory; unref: whether its page references were taken (not yet, in a failing fork) */
static void seq_discard(kvq_cache *c, kvq_seq *q, bool unref) {
    for (int l = 0; l < c->cfg.n_layers && q->layers; l++) {
        kvq_seq_layer *sl = &q->layers[l];
        for (int32_t i = 0; unref && i < sl->n_pages; i++) page_unref(c, sl->pages[i]);
        for (int32_t i = 0; unref && i < sl->n_spages; i++) page_unref(c, sl->spages[i]);
        free(sl->pages);
        free(sl->wk);
        free(sl->wv);
    }
    if (q->layers) free(q->layers[0].spages); /* one table for all layers (seq_alloc) */
    free(q->layers);
    free(q->squat);
    memset(q, 0, sizeof *q);
}

static void seq_release(kvq_cache *c, kvq_seq *q) { seq_discard(c, q, true); }

/* ---- residual windows: allocated as they fill, not for R + G rows up front ----
 * A change of capacity is prepared (both new buffers allocated) for every (sequence, layer) a call touches before
 * the call changes anything, and committed only once nothing can fail any more. */
typedef struct win_grow {
    kvq_seq_layer *sl;
    int32_t cap;
    uint8_t *k, *v;
} win_grow;

/* Capacity for `rows` rows: doubling from the current one (so appending token by token reallocates
 * log2(R + G) times), never more than W. 0 when the current capacity suffices. */
static int32_t window_target(const kvq_cache *c, const kvq_seq_layer *sl, int64_t rows) {
    if (rows <= sl->wcap) return 0;
    int64_t cap = 2 * (int64_t)sl->wcap;
    if (cap < rows) cap = rows;
    return (int32_t)(cap < c->W ? cap : c->W);
}

/* Allocates the buffers of g (g->cap rows); false when out of memory (nothing left allocated) */
static bool window_prepare(const kvq_cache *c, win_grow *g) {
    g->k = kvq__malloc((size_t)g->cap * kvq__win_row_bytes(c, KVQ_KEY));
    g->v = g->k ? kvq__malloc((size_t)g->cap * kvq__win_row_bytes(c, KVQ_VALUE)) : NULL;
    if (g->v) return true;
    free(g->k);
    g->k = NULL;
    return false;
}

static void window_discard(win_grow *g, int n) {
    for (int i = 0; i < n; i++) free(g[i].k), free(g[i].v);
}

/* Moves the window's rows into the new buffers */
static void window_commit(const kvq_cache *c, win_grow *g, int n) {
    for (int i = 0; i < n; i++) {
        kvq_seq_layer *sl = g[i].sl;
        if (sl->win) {
            memcpy(g[i].k, sl->wk, (size_t)sl->win * kvq__win_row_bytes(c, KVQ_KEY));
            memcpy(g[i].v, sl->wv, (size_t)sl->win * kvq__win_row_bytes(c, KVQ_VALUE));
        }
        free(sl->wk), free(sl->wv);
        sl->wk = g[i].k, sl->wv = g[i].v, sl->wcap = g[i].cap;
    }
}

static int free_slot(const kvq_cache *c) {
    for (int i = 0; i < c->cfg.max_seqs; i++)
        if (!c->seqs[i].live) return i;
    return -1;
}

/* Allocates the per-layer state of slot `id` (windows come with the first tokens); on failure nothing is left
 * allocated. The slot is not live yet. */
static kvq_status seq_alloc(kvq_cache *c, int id, const char *fn) {
    kvq_seq *q = &c->seqs[id];
    q->layers = kvq__calloc((size_t)c->cfg.n_layers, sizeof *q->layers);
    if (!q->layers)
        return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no memory for the state of %d layers", fn, c->cfg.n_layers);
    if (c->SP) { /* sink page tables have a fixed size: allocated here, appends never grow them */
        int32_t *sp = kvq__malloc((size_t)c->cfg.n_layers * c->SP * sizeof *sp);
        if (!sp) {
            free(q->layers);
            q->layers = NULL;
            return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no memory for %d layers' sink page tables", fn, c->cfg.n_layers);
        }
        for (int l = 0; l < c->cfg.n_layers; l++) q->layers[l].spages = sp + (size_t)l * c->SP;
    }
    return KVQ_OK;
}

static void seq_go_live(kvq_cache *c, int id) {
    c->seqs[id].live = true;
    c->n_live++;
}

kvq_status kvq_seq_new(kvq_cache *c, int32_t *seq_out) {
    KVQ_CHECK_NULL(c, "kvq_seq_new");
    KVQ_CHECK_NULL(seq_out, "kvq_seq_new");
    int id = free_slot(c);
    if (id < 0) return kvq__fail(KVQ_ERR_TOO_MANY_SEQS, "kvq_seq_new: all %d sequence slots are live", c->cfg.max_seqs);
    kvq_status s = seq_alloc(c, id, "kvq_seq_new");
    if (s) return s;
    seq_go_live(c, id);
    *seq_out = id;
    return KVQ_OK;
}

kvq_status kvq_seq_fork(kvq_cache *c, int32_t src, int32_t *seq_out) {
    KVQ_CHECK_NULL(c, "kvq_seq_fork");
    KVQ_CHECK_NULL(seq_out, "kvq_seq_fork");
    kvq_status s = kvq__check_seq(c, src, "kvq_seq_fork");
    if (s) return s;
    int id = free_slot(c);
    if (id < 0) return kvq__fail(KVQ_ERR_TOO_MANY_SEQS, "kvq_seq_fork: all %d sequence slots are live", c->cfg.max_seqs);
    if ((s = seq_alloc(c, id, "kvq_seq_fork"))) return s;
    kvq_seq *a = &c->seqs[src], *b = &c->seqs[id];
    for (int l = 0; l < c->cfg.n_layers; l++) {
        kvq_seq_layer *sa = &a->layers[l], *sb = &b->layers[l];
        if (sa->n_pages) {
            sb->pages = kvq__malloc((size_t)sa->n_pages * sizeof *sb->pages);
            if (!sb->pages) {
                seq_discard(c, b, false); /* its page references are not taken yet */
                return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, "kvq_seq_fork: no memory for a page table of %d pages",
                                 (int)sa->n_pages);
            }
            memcpy(sb->pages, sa->pages, (size_t)sa->n_pages * sizeof *sb->pages);
            sb->cap_pages = sb->n_pages = sa->n_pages;
        }
        sb->paged = sa->paged;
        sb->dropped = sa->dropped;
        if (sa->n_spages) /* shared, copied on write (spages is NULL in a cache without sinks) */
            memcpy(sb->spages, sa->spages, (size_t)sa->n_spages * sizeof *sb->spages);
        sb->n_spages = sa->n_spages, sb->sink = sa->sink;
        if (sa->win) { /* the child's window is as large as the parent's content; it grows on its own later */
            win_grow g = {sb, sa->win, NULL, NULL};
            if (!window_prepare(c, &g)) {
                seq_discard(c, b, false);
                return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, "kvq_seq_fork: no memory for a window of %d tokens",
                                 (int)sa->win);
            }
            memcpy(g.k, sa->wk, (size_t)sa->win * kvq__win_row_bytes(c, KVQ_KEY));
            memcpy(g.v, sa->wv, (size_t)sa->win * kvq__win_row_bytes(c, KVQ_VALUE));
            sb->wk = g.k, sb->wv = g.v, sb->wcap = g.cap, sb->win = sa->win;
        }
    }
    if (a->squat) { /* the fork keeps the parent's SQuat subspaces (kvq.h section 10) */
        if (!(b->squat = kvq__malloc(kvq__squat_bytes(c)))) {
            seq_discard(c, b, false);
            return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, "kvq_seq_fork: no memory for the SQuat subspaces (%zu bytes)",
                             kvq__squat_bytes(c));
        }
        memcpy(b->squat, a->squat, kvq__squat_bytes(c));
    }
    /* references are taken only once nothing can fail any more */
    for (int l = 0; l < c->cfg.n_layers; l++) {
        for (int32_t i = 0; i < b->layers[l].n_pages; i++)
            if (b->layers[l].pages[i] >= 0) c->refcnt[b->layers[l].pages[i]]++;
        for (int32_t i = 0; i < b->layers[l].n_spages; i++) c->refcnt[b->layers[l].spages[i]]++;
    }
    seq_go_live(c, id);
    *seq_out = id;
    return KVQ_OK;
}

kvq_status kvq_seq_free(kvq_cache *c, int32_t seq) {
    KVQ_CHECK_NULL(c, "kvq_seq_free");
    kvq_status s = kvq__check_seq(c, seq, "kvq_seq_free");
    if (s) return s;
    seq_release(c, &c->seqs[seq]);
    c->n_live--;
    return KVQ_OK;
}

kvq_status kvq_seq_length(const kvq_cache *c, int32_t seq, int layer, int64_t *len) {
    KVQ_CHECK_NULL(c, "kvq_seq_length");
    KVQ_CHECK_NULL(len, "kvq_seq_length");
    kvq_status s;
    if ((s = kvq__check_seq(c, seq, "kvq_seq_length")) || (s = kvq__check_layer(c, layer, "kvq_seq_length"))) return s;
    const kvq_seq_layer *sl = &c->seqs[seq].layers[layer];
    *len = kvq__seq_len(sl);
    return KVQ_OK;
}

kvq_status kvq_seq_view_get(const kvq_cache *c, int32_t seq, int layer, kvq_seq_view *v) {
    KVQ_CHECK_NULL(c, "kvq_seq_view_get");
    KVQ_CHECK_NULL(v, "kvq_seq_view_get");
    kvq_status s;
    if ((s = kvq__check_seq(c, seq, "kvq_seq_view_get")) || (s = kvq__check_layer(c, layer, "kvq_seq_view_get")))
        return s;
    const kvq_seq_layer *sl = &c->seqs[seq].layers[layer];
    v->layout = c->L;
    v->arena = c->arena;
    v->n_pages = sl->n_pages;
    v->pages = sl->pages;
    v->paged_tokens = sl->paged;
    v->window_tokens = sl->win;
    v->window_capacity = sl->wcap;
    v->window_k = kvq__win8(c, KVQ_KEY) ? NULL : (const uint16_t *)(const void *)sl->wk;
    v->window_v = kvq__win8(c, KVQ_VALUE) ? NULL : (const uint16_t *)(const void *)sl->wv;
    v->window8_k = kvq__win8(c, KVQ_KEY) ? sl->wk : NULL;
    v->window8_v = kvq__win8(c, KVQ_VALUE) ? sl->wv : NULL;
    v->window8_row_bytes = (size_t)c->L.n_kv_heads * (c->L.head_dim + 2);
    v->sink_tokens = sl->sink;
    v->sink_rows_per_page = c->SR;
    v->n_sink_pages = sl->n_spages;
    v->sink_pages = sl->spages;
    v->dropped_tokens = sl->dropped;
    return KVQ_OK;
}

kvq_status kvq_seq_drop_front(kvq_cache *c, int32_t seq, int layer, int64_t n_tokens) {
    KVQ_CHECK_NULL(c, "kvq_seq_drop_front");
    kvq_status s;
    if ((s = kvq__check_seq(c, seq, "kvq_seq_drop_front")) || (s = kvq__check_layer(c, layer, "kvq_seq_drop_front")))
        return s;
    kvq_seq_layer *sl = &c->seqs[seq].layers[layer];
    int64_t len = kvq__seq_len(sl);
    if (n_tokens < 0 || n_tokens > len)
        return kvq__fail(KVQ_ERR_RANGE, "kvq_seq_drop_front: n_tokens %lld outside 0..%lld (the sequence's length in layer %d)",
                         (long long)n_tokens, (long long)len, layer);
    /* whole pages only, every token of them before n_tokens: a page still partly filled is never one of them */
    int P = c->L.page_tokens;
    int64_t cut = n_tokens - sl->sink;
    if (cut > sl->paged) cut = sl->paged;
    int64_t np = cut > 0 ? cut / P : 0;
    for (int64_t i = sl->dropped / P; i < np; i++) {
        page_unref(c, sl->pages[i]); /* a page shared with a fork stays for it (copy on write) */
        sl->pages[i] = -1;
    }
    if (np * P > sl->dropped) sl->dropped = np * P;
    return KVQ_OK;
}

/* Dequantizes paged tokens [t0, t1) of one layer into the window rows starting at `row` (scratch: 2 H D floats). */
static void paged_to_window(kvq_cache *c, kvq_seq_layer *sl, int64_t t0, int64_t t1, int row, float *scratch) {
    int P = c->L.page_tokens, H = c->L.n_kv_heads, D = c->L.head_dim;
    float *tk = scratch, *tv = scratch + (size_t)H * D;
    for (int64_t t = t0; t < t1; t++, row++) {
        int32_t pg = sl->pages[t / P];
        int slot = (int)(t % P);
        for (int h = 0; h < H; h++) {
            kvq__dequant_block(&c->L, KVQ_KEY, kvq__kblock(c, pg, h), slot, slot + 1, tk + (size_t)h * D, 0);
            kvq__dequant_block(&c->L, KVQ_VALUE, kvq__vblock(c, pg, h), slot, slot + 1, tv + (size_t)h * D, 0);
        }
        kvq__win_put(c, KVQ_KEY, kvq__win_row(c, sl, KVQ_KEY, row), tk);
        kvq__win_put(c, KVQ_VALUE, kvq__win_row(c, sl, KVQ_VALUE, row), tv);
    }
}

kvq_status kvq_seq_truncate(kvq_cache *c, int32_t seq, int64_t n) {
    KVQ_CHECK_NULL(c, "kvq_seq_truncate");
    kvq_status s = kvq__check_seq(c, seq, "kvq_seq_truncate");
    if (s) return s;
    if (n < 0) return kvq__fail(KVQ_ERR_RANGE, "kvq_seq_truncate: n_tokens %lld is negative", (long long)n);
    for (int l = 0; l < c->cfg.n_layers; l++) {
        const kvq_seq_layer *sl = &c->seqs[seq].layers[l];
        if (sl->dropped && n < sl->sink + sl->dropped)
            return kvq__fail(KVQ_ERR_RANGE, "kvq_seq_truncate: n_tokens %lld is inside the tokens dropped from layer %d "
                                            "(kvq_seq_drop_front: its first %lld)", (long long)n, l,
                             (long long)(sl->sink + sl->dropped));
    }
    int P = c->L.page_tokens;
    /* a cut inside the pages moves up to Gf - 1 tokens back into the window: its rows are allocated first */
    win_grow *g = kvq__malloc((size_t)c->cfg.n_layers * sizeof *g);
    if (!g) return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, "kvq_seq_truncate: no memory for %d layers' windows", c->cfg.n_layers);
    float *tmp = kvq__malloc(2 * (size_t)c->L.n_kv_heads * c->L.head_dim * sizeof *tmp); /* one token, K and V */
    if (!tmp) {
        free(g);
        return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, "kvq_seq_truncate: no memory for one token's scratch");
    }
    int ng = 0;
    for (int l = 0; l < c->cfg.n_layers; l++) {
        kvq_seq_layer *sl = &c->seqs[seq].layers[l];
        int64_t m = n - sl->sink; /* the cut among the tokens after the sinks */
        if (m < 0 || m >= sl->paged) continue;
        int32_t cap = window_target(c, sl, m - m / c->Gf * c->Gf);
        if (!cap) continue;
        g[ng] = (win_grow){sl, cap, NULL, NULL};
        if (!window_prepare(c, &g[ng])) {
            window_discard(g, ng);
            free(g), free(tmp);
            return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, "kvq_seq_truncate: no memory for a window of %d tokens", (int)cap);
        }
        ng++;
    }
    window_commit(c, g, ng);
    free(g);
    for (int l = 0; l < c->cfg.n_layers; l++) {
        kvq_seq_layer *sl = &c->seqs[seq].layers[l];
        if (n >= kvq__seq_len(sl)) continue;
        if (n < sl->sink) { /* the cut is inside the sinks: everything after them goes, and the sink pages past n */
            for (int32_t i = 0; i < sl->n_pages; i++) page_unref(c, sl->pages[i]);
            sl->n_pages = 0, sl->paged = 0, sl->win = 0;
            int32_t nsp = (int32_t)((n + c->SR - 1) / c->SR);
            for (int32_t i = nsp; i < sl->n_spages; i++) page_unref(c, sl->spages[i]);
            sl->n_spages = nsp, sl->sink = (int32_t)n;
            continue;
        }
        int64_t m = n - sl->sink;
        if (m >= sl->paged) {
            sl->win = (int32_t)(m - sl->paged);
            continue;
        }
        /* The cut is inside the pages: whole flush units before it stay, the rest of its unit moves back to the
         * window (dequantized), later window tokens are dropped. */
        int64_t keep = m / c->Gf * c->Gf;
        paged_to_window(c, sl, keep, m, 0, tmp);
        sl->win = (int32_t)(m - keep);
        sl->paged = keep;
        int32_t np = (int32_t)((keep + P - 1) / P);
        for (int32_t i = np; i < sl->n_pages; i++) page_unref(c, sl->pages[i]);
        sl->n_pages = np;
    }
    free(tmp);
    return KVQ_OK;
}

/* ---- append ---- */

/* Number of window flushes when n tokens arrive at a window holding `win`. */
static int64_t flushes(const kvq_cache *c, int32_t win, int64_t n) {
    int64_t total = win + n;
    return total < c->W ? 0 : 1 + (total - c->W) / c->Gf;
}

/* Of n tokens appended to (seq, layer), those that go to its sinks (the first ones) */
static int64_t sink_take(const kvq_cache *c, const kvq_seq_layer *sl, int64_t n) {
    return n < c->S - sl->sink ? n : c->S - sl->sink;
}

/* Sink pages (seq, layer) needs for n more tokens, counting a copy-on-write of its last sink page. */
static int64_t sink_pages_needed(const kvq_cache *c, const kvq_seq_layer *sl, int64_t n) {
    int64_t ns = sink_take(c, sl, n);
    if (ns == 0) return 0;
    int64_t need = (sl->sink + ns + c->SR - 1) / c->SR - sl->n_spages;
    if (sl->sink % c->SR != 0 && c->refcnt[sl->spages[sl->n_spages - 1]] > 1) need++;
    return need;
}

/* Pages (seq, layer) needs for n more tokens after its sinks, counting a copy-on-write of its last page. */
static int64_t pages_needed(const kvq_cache *c, const kvq_seq_layer *sl, int64_t n) {
    int P = c->L.page_tokens;
    n -= sink_take(c, sl, n);
    int64_t f = flushes(c, sl->win, n);
    if (f == 0) return 0;
    int64_t end = sl->paged + f * c->Gf;
    int64_t need = (end + P - 1) / P - sl->n_pages;
    if (sl->paged % P != 0 && c->refcnt[sl->pages[sl->n_pages - 1]] > 1) need++;
    return need;
}

/* Quantizes Gf tokens (x: fp32 [Gf][H][D]) into the next page slots of (seq, layer). */
static void store_unit(kvq_cache *c, const kvq_seq *q, int layer, kvq_seq_layer *sl, const float *xk,
                       const float *xv, float *scratch, double *sq_work) {
    const kvq_page_layout *L = &c->L;
    int P = L->page_tokens, H = L->n_kv_heads, D = L->head_dim, Gf = c->Gf;
    int slot = (int)(sl->paged % P);
    if (slot == 0) {
        sl->pages[sl->n_pages++] = page_alloc(c);
    } else {
        int32_t *last = &sl->pages[sl->n_pages - 1];
        if (c->refcnt[*last] > 1) { /* copy on write */
            int32_t id = page_alloc(c);
            memcpy(kvq__page(c, id), kvq__page(c, *last), L->page_bytes);
            page_unref(c, *last);
            *last = id;
        }
    }
    int32_t pg = sl->pages[sl->n_pages - 1];
    for (int h = 0; h < H; h++) {
        for (int r = 0; r < 2; r++) {
            kvq_role role = r ? KVQ_VALUE : KVQ_KEY;
            kvq_type t = r ? L->type_v : L->type_k;
            size_t rb = r ? L->v_row_bytes : L->k_row_bytes;
            uint8_t *blk = r ? kvq__vblock(c, pg, h) : kvq__kblock(c, pg, h);
            const float *x = r ? xv : xk;
            const bool qnorm = (c->cfg.qnorm >> role) & 1;
            uint16_t *par = (uint16_t *)(void *)(blk + rb * (size_t)P);
            /* the block's outlier section (NULL without one) */
            uint16_t *ores = (uint16_t *)(uintptr_t)kvq__outlier_res(L, role, blk);
            uint8_t *oidx = (uint8_t *)(uintptr_t)kvq__outlier_idx(L, role, blk);
            /* 8-bit parameters: the group's base from its value ranges, codes into the block, the decoded fp16 pairs
             * (which the quantizers also write) into pk */
            const bool p8 = kvq__p8(L, role);
            const int qmax = (1 << kvq_type_get_traits(t)->bits) - 1, ng = D / L->value_group;
            uint16_t pk[2 * 256];
            kvq__p8q p8q = {0, NULL, NULL};
            if (role == KVQ_KEY && kvq_type_get_traits(t)->grouped) {
                for (int i = 0; i < Gf; i++) memcpy(scratch + (size_t)i * D, x + ((size_t)i * H + h) * D, (size_t)D * 4);
                size_t e = (size_t)(slot / Gf) * D; /* the group's first outlier entry */
                uint16_t *sm = par + (size_t)(slot / Gf) * 2 * D;
                if (p8) {
                    float lo[256], hi[256];
                    for (int ch = 0; ch < D; ch++) {
                        lo[ch] = hi[ch] = scratch[ch];
                        for (int i = 1; i < Gf; i++) {
                            float v = scratch[(size_t)i * D + ch];
                            lo[ch] = v < lo[ch] ? v : lo[ch], hi[ch] = v > hi[ch] ? v : hi[ch];
                        }
                    }
                    p8q.base = kvq__p8_base(lo, hi, D, qmax);
                    kvq__p8_bases(L, role, blk)[slot / Gf] = kvq__f32_to_f16(p8q.base);
                    p8q.k = kvq__p8_codes(L, role, blk, slot / Gf), p8q.z = p8q.k + D;
                    sm = pk;
                }
                const float *B = kvq__squat_basis(c, q, layer, h);
                if (B) { /* SQuat (squat.c): same layout, other values */
                    kvq__squat_key_group_ref(t, kvq__layout_levels(L, KVQ_KEY), qnorm, scratch, Gf, D, B, c->cfg.squat_rank,
                                             kvq__squat_lambda(c), blk + rb * (size_t)slot, rb, sm, sq_work,
                                             ores ? ores + e : NULL, oidx ? oidx + e : NULL, p8 ? &p8q : NULL);
                    continue;
                }
                kvq__quant_key_group(t, kvq__layout_levels(L, KVQ_KEY), qnorm, scratch, Gf, D, blk + rb * (size_t)slot, rb,
                                     sm, ores ? ores + e : NULL, oidx ? oidx + e : NULL, p8 ? &p8q : NULL);
                continue;
            }
            uint8_t *codes = NULL;
            if (p8) { /* values: one base for the Gf rows' groups */
                float lo[128 * 16], hi[128 * 16]; /* Gf <= 128 rows of ng <= 16 groups */
                for (int i = 0; i < Gf; i++)
                    for (int j = 0; j < ng; j++) {
                        const float *v = x + ((size_t)i * H + h) * D + (size_t)j * L->value_group;
                        float a = v[0], b = v[0];
                        for (int ch = 1; ch < L->value_group; ch++) a = v[ch] < a ? v[ch] : a, b = v[ch] > b ? v[ch] : b;
                        lo[i * ng + j] = a, hi[i * ng + j] = b;
                    }
                p8q.base = kvq__p8_base(lo, hi, Gf * ng, qmax);
                kvq__p8_bases(L, role, blk)[slot / Gf] = kvq__f32_to_f16(p8q.base);
                codes = kvq__p8_codes(L, role, blk, slot / Gf);
            }
            for (int i = 0; i < Gf; i++) {
                int s = slot + i;
                uint16_t *p = t == KVQ_TYPE_Q8 || t == KVQ_TYPE_FP8 ? par + s
                              : p8                              ? pk
                              : kvq_type_get_traits(t)->grouped ? par + (size_t)s * ng * 2
                                                                : NULL;
                if (p8) p8q.k = codes + (size_t)i * ng, p8q.z = codes + (size_t)(Gf + i) * ng;
                size_t e = (size_t)s * ng; /* the row's first outlier entry */
                kvq__quant_row(t, kvq__layout_levels(L, role), qnorm, x + ((size_t)i * H + h) * D, D, L->value_group,
                               blk + rb * (size_t)s, p, ores ? ores + e : NULL, oidx ? oidx + e : NULL, p8 ? &p8q : NULL);
            }
        }
    }
    sl->paged += Gf;
}

/* Stores one token (element offset `off` of k and v) as the next sink row of (seq, layer), exact fp16 */
static void store_sink(kvq_cache *c, kvq_seq_layer *sl, const float *uk, const float *uv) {
    int r = sl->sink % c->SR;
    if (r == 0) {
        sl->spages[sl->n_spages++] = page_alloc(c);
    } else {
        int32_t *last = &sl->spages[sl->n_spages - 1];
        if (c->refcnt[*last] > 1) { /* copy on write: a fork shares the sink pages */
            int32_t id = page_alloc(c);
            memcpy(kvq__page(c, id), kvq__page(c, *last), c->L.page_bytes);
            page_unref(c, *last);
            *last = id;
        }
    }
    int32_t pg = sl->spages[sl->n_spages - 1];
    uint16_t *wk = kvq__sink_k(c, pg, r, 0), *wv = kvq__sink_v(c, pg, r, 0);
    for (size_t e = 0; e < (size_t)c->L.n_kv_heads * c->L.head_dim; e++) {
        wk[e] = kvq__f32_to_f16(uk[e]);
        wv[e] = kvq__f32_to_f16(uv[e]);
    }
    sl->sink++;
}

static kvq_status reserve_pages(kvq_seq_layer *sl, int64_t need) {
    int64_t want = sl->n_pages + need;
    if (want <= sl->cap_pages) return KVQ_OK;
    int64_t cap = sl->cap_pages ? sl->cap_pages : 8;
    while (cap < want) cap *= 2;
    if (cap > INT32_MAX) cap = want; /* want <= pages in the cache + 1 */
    if (cap > INT32_MAX) return kvq__fail(KVQ_ERR_INTERNAL, FN_APPEND ": a page table of %lld pages", (long long)cap);
    int32_t *p = kvq__realloc(sl->pages, (size_t)cap * sizeof *p);
    if (!p) return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, FN_APPEND ": no memory for a page table of %lld pages", (long long)cap);
    sl->pages = p;
    sl->cap_pages = (int32_t)cap;
    return KVQ_OK;
}

/* Row i (D values from element i of a kvq_dtype array) of K or V as the cache holds it, in x: every value finite
 * and within fp16, then rotated where the role is and within fp16 again. The one rule for the K/V that kvq_append
 * stores and kvq_attn_prefill_exact reads; `tail` ends the message. */
kvq_status kvq__kv_row_in(const kvq_cache *c, kvq_role role, const kvq__rot *rot, kvq_dtype dtype, const void *src,
                          size_t i, float *x, const char *fn, const char *tail) {
    const int H = c->L.n_kv_heads, D = c->L.head_dim;
    const char *name = role == KVQ_VALUE ? "v" : "k";
    for (int d = 0; d < D; d++) {
        x[d] = kvq__load_elem(dtype, src, i + d);
        if (!(fabsf(x[d]) <= 65504.0f))
            return kvq__fail(KVQ_ERR_NONFINITE,
                             "%s: %s[%zu] (token %zu, head %zu, channel %d) is %g: K/V must be finite and within the "
                             "fp16 range%s",
                             fn, name, i + d, i / ((size_t)H * D), i / D % H, d, (double)x[d], tail);
    }
    if (!kvq__rotated(c, role)) return KVQ_OK;
    kvq__rot_apply(rot, x, 0);
    for (int d = 0; d < D; d++)
        if (!(fabsf(x[d]) <= 65504.0f))
            return kvq__fail(KVQ_ERR_NONFINITE,
                             "%s: %s (token %zu, head %zu) rotates to %g in channel %d: beyond the fp16 range of the "
                             "cache%s",
                             fn, name, i / ((size_t)H * D), i / D % H, (double)x[d], d, tail);
    return KVQ_OK;
}

kvq_status kvq_append(kvq_cache *c, int layer, int n_seqs, const int32_t *seq_ids, const int32_t *n_tokens,
                      kvq_dtype dtype, const void *k, const void *v) {
    KVQ_CHECK_NULL(c, FN_APPEND);
    kvq_status s = kvq__check_layer(c, layer, FN_APPEND);
    if (s) return s;
    if (n_seqs < 0 || n_seqs > c->cfg.max_seqs)
        return kvq__fail(KVQ_ERR_INVALID_ARG, FN_APPEND ": n_seqs %d outside 0..%d", n_seqs, c->cfg.max_seqs);
    if (n_seqs == 0) return KVQ_OK;
    KVQ_CHECK_NULL(seq_ids, FN_APPEND);
    KVQ_CHECK_NULL(n_tokens, FN_APPEND);
    if (dtype != KVQ_DTYPE_F32 && dtype != KVQ_DTYPE_F16 && dtype != KVQ_DTYPE_BF16)
        return kvq__fail(KVQ_ERR_INVALID_ARG, FN_APPEND ": dtype %d is not a kvq_dtype", (int)dtype);
    const int H = c->L.n_kv_heads, D = c->L.head_dim;
    int64_t total = 0, need = 0;
    for (int i = 0; i < n_seqs; i++) {
        if ((s = kvq__check_seq(c, seq_ids[i], FN_APPEND))) return s;
        for (int j = 0; j < i; j++)
            if (seq_ids[j] == seq_ids[i])
                return kvq__fail(KVQ_ERR_INVALID_ARG, FN_APPEND ": sequence %d appears twice in seq_ids", (int)seq_ids[i]);
        if (n_tokens[i] < 0)
            return kvq__fail(KVQ_ERR_INVALID_ARG, FN_APPEND ": n_tokens[%d] = %d is negative", i, (int)n_tokens[i]);
        total += n_tokens[i];
        const kvq_seq_layer *sl = &c->seqs[seq_ids[i]].layers[layer];
        need += pages_needed(c, sl, n_tokens[i]) + sink_pages_needed(c, sl, n_tokens[i]);
    }
    if (total == 0) return KVQ_OK;
    KVQ_CHECK_NULL(k, FN_APPEND);
    KVQ_CHECK_NULL(v, FN_APPEND);
    /* before the data is read: a call that cannot fit must not scan (or index past) arrays of its claimed size */
    if (need > c->n_free)
        return kvq__fail(KVQ_ERR_CACHE_FULL, FN_APPEND ": layer %d needs %lld free pages, %lld are free", layer,
                         (long long)need, (long long)c->n_free);
    if ((uint64_t)total > SIZE_MAX / 4 / ((size_t)H * D))
        return kvq__fail(KVQ_ERR_INVALID_ARG, FN_APPEND ": %lld tokens of %d x %d values exceed the address space",
                         (long long)total, H, D);
    size_t n_elem = (size_t)total * H * D;
    for (int r = 0; r < 2; r++) {
        kvq__rot rot = {0};
        if (kvq__rotated(c, (kvq_role)r))
            kvq__rot_init(&rot, c->cfg.rotation_seed, kvq__rot_layer(c, layer), (kvq_role)r, D);
        float tmp[256];
        for (size_t i = 0; i < n_elem; i += D)
            if ((s = kvq__kv_row_in(c, (kvq_role)r, &rot, dtype, r ? v : k, i, tmp, FN_APPEND, "; nothing was appended")))
                return s;
    }
    /* page tables: only their capacity grows, which no caller can observe */
    for (int i = 0; i < n_seqs; i++) {
        kvq_seq_layer *sl = &c->seqs[seq_ids[i]].layers[layer];
        if ((s = reserve_pages(sl, pages_needed(c, sl, n_tokens[i]) + 1))) return s;
    }
    /* windows: the rows this call fills (the window flushes on reaching W, so at most W); c->W == 1 (R = 0,
     * per-token types) stores straight to pages and never has one */
    win_grow *g = NULL;
    if (c->W > 1 && !(g = kvq__malloc((size_t)n_seqs * sizeof *g)))
        return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, FN_APPEND ": no memory for %d sequences' windows", n_seqs);
    int ng = 0;
    for (int i = 0; i < n_seqs && g; i++) {
        kvq_seq_layer *sl = &c->seqs[seq_ids[i]].layers[layer];
        int32_t cap = window_target(c, sl, sl->win + (int64_t)n_tokens[i] - sink_take(c, sl, n_tokens[i]));
        if (!cap) continue;
        g[ng] = (win_grow){sl, cap, NULL, NULL};
        if (!window_prepare(c, &g[ng])) {
            window_discard(g, ng);
            free(g);
            return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, FN_APPEND ": no memory for a window of %d tokens (sequence %d)",
                             (int)cap, (int)seq_ids[i]);
        }
        ng++;
    }
    /* scratch for one flush unit of K and V in fp32 plus a transposition buffer */
    size_t unit = (size_t)c->Gf * H * D;
    /* + SQuat's D x D doubles (squat.c) after the floats, 8-byte aligned: 2 * unit + Gf * D is even (D is) */
    size_t n_buf = 2 * unit + (size_t)c->Gf * D + (c->cfg.squat_rank ? 2 * kvq__squat_scratch_doubles(D) : 0);
    float *buf = kvq__malloc(n_buf * sizeof(float));
    if (!buf) {
        window_discard(g, ng);
        free(g);
        return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, FN_APPEND ": no memory for %zu floats of scratch", 2 * unit);
    }
    float *uk = buf, *uv = buf + unit, *scratch = buf + 2 * unit;
    double *sq_work = (double *)(void *)(scratch + (size_t)c->Gf * D);
    window_commit(c, g, ng);
    free(g);

    /* nothing can fail from here on */
    size_t row = (size_t)H * D, off = 0;
    kvq__rot rk, rv;
    kvq__rot_init(&rk, c->cfg.rotation_seed, kvq__rot_layer(c, layer), KVQ_KEY, D);
    kvq__rot_init(&rv, c->cfg.rotation_seed, kvq__rot_layer(c, layer), KVQ_VALUE, D);
    for (int i = 0; i < n_seqs; i++) {
        kvq_seq_layer *sl = &c->seqs[seq_ids[i]].layers[layer];
        for (int32_t t = 0; t < n_tokens[i]; t++, off += row) {
            /* the token's row into uk / uv (free until a flush refills them from the window), rotated */
            for (size_t e = 0; e < row; e++)
                uk[e] = kvq__load_elem(dtype, k, off + e), uv[e] = kvq__load_elem(dtype, v, off + e);
            for (int h = 0; h < H; h++) {
                if (kvq__rotated(c, KVQ_KEY)) kvq__rot_apply(&rk, uk + (size_t)h * D, 0);
                if (kvq__rotated(c, KVQ_VALUE)) kvq__rot_apply(&rv, uv + (size_t)h * D, 0);
            }
            if (sl->sink < c->S) { /* sinks hold the rotated rows too: attention rotates q for every key it reads */
                store_sink(c, sl, uk, uv);
                continue;
            }
            if (c->W == 1) { /* R = 0, per-token types: straight to the page */
                store_unit(c, &c->seqs[seq_ids[i]], layer, sl, uk, uv, scratch, sq_work);
                continue;
            }
            kvq__win_put(c, KVQ_KEY, kvq__win_row(c, sl, KVQ_KEY, sl->win), uk);
            kvq__win_put(c, KVQ_VALUE, kvq__win_row(c, sl, KVQ_VALUE, sl->win), uv);
            if (++sl->win < c->W) continue;
            /* the oldest Gf rows to the pages, as attention read them */
            for (int r = 0; r < c->Gf; r++)
                for (int h = 0; h < H; h++) {
                    size_t o = (size_t)r * row + (size_t)h * D;
                    kvq__win_get_f32(c, KVQ_KEY, kvq__win_row(c, sl, KVQ_KEY, r), h, uk + o);
                    kvq__win_get_f32(c, KVQ_VALUE, kvq__win_row(c, sl, KVQ_VALUE, r), h, uv + o);
                }
            store_unit(c, &c->seqs[seq_ids[i]], layer, sl, uk, uv, scratch, sq_work);
            sl->win -= c->Gf;
            memmove(sl->wk, kvq__win_row(c, sl, KVQ_KEY, c->Gf), (size_t)sl->win * kvq__win_row_bytes(c, KVQ_KEY));
            memmove(sl->wv, kvq__win_row(c, sl, KVQ_VALUE, c->Gf), (size_t)sl->win * kvq__win_row_bytes(c, KVQ_VALUE));
        }
    }
    free(buf);
    return KVQ_OK;
}

/* ---- read back ---- */

kvq_status kvq_read(const kvq_cache *c, int32_t seq, int layer, int64_t start, int64_t n, float *k, float *v) {
    KVQ_CHECK_NULL(c, "kvq_read");
    kvq_status s;
    if ((s = kvq__check_seq(c, seq, "kvq_read")) || (s = kvq__check_layer(c, layer, "kvq_read"))) return s;
    const kvq_seq_layer *sl = &c->seqs[seq].layers[layer];
    int64_t len = kvq__seq_len(sl);
    if (start < 0 || n < 0 || start > len || n > len - start) /* start + n may overflow: not formed */
        return kvq__fail(KVQ_ERR_RANGE, "kvq_read: %lld tokens from %lld: outside the sequence's %lld (layer %d)",
                         (long long)n, (long long)start, (long long)len, layer);
    if (n > 0 && sl->dropped && start >= sl->sink && start < sl->sink + sl->dropped)
        return kvq__fail(KVQ_ERR_RANGE, "kvq_read: token %lld of layer %d was dropped (kvq_seq_drop_front: tokens %d..%lld)",
                         (long long)start, layer, sl->sink, (long long)(sl->sink + sl->dropped - 1));
    if (n > 0 && sl->dropped && start < sl->sink && start + n > sl->sink)
        return kvq__fail(KVQ_ERR_RANGE, "kvq_read: tokens %lld..%lld of layer %d cross the dropped ones (%d..%lld)",
                         (long long)start, (long long)(start + n - 1), layer, sl->sink, (long long)(sl->sink + sl->dropped - 1));
    int P = c->L.page_tokens, H = c->L.n_kv_heads, D = c->L.head_dim;
    size_t row = (size_t)H * D;
    bool rot_k = kvq__rotated(c, KVQ_KEY), rot_v = kvq__rotated(c, KVQ_VALUE);
    kvq__rot rk, rv;
    kvq__rot_init(&rk, c->cfg.rotation_seed, kvq__rot_layer(c, layer), KVQ_KEY, D);
    kvq__rot_init(&rv, c->cfg.rotation_seed, kvq__rot_layer(c, layer), KVQ_VALUE, D);
    for (int64_t t = start; t < start + n; t++) {
        float *ko = k ? k + (size_t)(t - start) * row : NULL, *vo = v ? v + (size_t)(t - start) * row : NULL;
        for (int h = 0; h < H; h++) {
            if (t < sl->sink) {
                int32_t pg = sl->spages[t / c->SR];
                const uint16_t *sk = kvq__sink_k(c, pg, (int)(t % c->SR), h), *sv = kvq__sink_v(c, pg, (int)(t % c->SR), h);
                for (int d = 0; d < D; d++) {
                    if (ko) ko[(size_t)h * D + d] = kvq__f16_to_f32(sk[d]);
                    if (vo) vo[(size_t)h * D + d] = kvq__f16_to_f32(sv[d]);
                }
            } else if (t - sl->sink < sl->paged) { /* u = t - sink: position among the tokens after the sinks */
                int64_t u = t - sl->sink;
                int32_t pg = sl->pages[u / P];
                int slot = (int)(u % P);
                if (ko) kvq__dequant_block(&c->L, KVQ_KEY, kvq__kblock(c, pg, h), slot, slot + 1, ko + (size_t)h * D, 0);
                if (vo) kvq__dequant_block(&c->L, KVQ_VALUE, kvq__vblock(c, pg, h), slot, slot + 1, vo + (size_t)h * D, 0);
            } else {
                int64_t r = t - sl->sink - sl->paged;
                if (ko) kvq__win_get_f32(c, KVQ_KEY, kvq__win_row(c, sl, KVQ_KEY, r), h, ko + (size_t)h * D);
                if (vo) kvq__win_get_f32(c, KVQ_VALUE, kvq__win_row(c, sl, KVQ_VALUE, r), h, vo + (size_t)h * D);
            }
            /* pages and window hold the rotated domain: back to the caller's */
            if (ko && rot_k) kvq__rot_apply(&rk, ko + (size_t)h * D, 1);
            if (vo && rot_v) kvq__rot_apply(&rv, vo + (size_t)h * D, 1);
        }
    }
    return KVQ_OK;
}

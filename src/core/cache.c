/* The paged cache: configuration, page accounting, sequences (fork / truncate / free), append with the residual
 * window, and read back. Every mutating call validates everything, including page availability, before it
 * writes its first byte, so a failing call leaves the cache as it was. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>

#define FN_APPEND "kvq_append"

kvq_cache_config kvq_cache_config_default(void) {
    kvq_cache_config c = {0};
    c.type_k = KVQ_TYPE_F16;
    c.type_v = KVQ_TYPE_F16;
    c.residual = -1;
    return c;
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

size_t kvq_cache_arena_bytes_for(const kvq_cache_config *in, int64_t n_tokens) {
    kvq_cache_config cfg = {0};
    kvq_page_layout L;
    int W, Gf;
    if (n_tokens < 0 || resolve_checked(in, &cfg, &L, &W, &Gf, false) != KVQ_OK) return 0;
    int64_t pages = (n_tokens + L.page_tokens - 1) / L.page_tokens;
    if (pages == 0) pages = 1;
    return (size_t)pages * (size_t)cfg.n_layers * L.page_bytes;
}

int64_t kvq_cache_capacity_tokens(const kvq_cache_config *in) {
    kvq_cache_config cfg = {0};
    kvq_page_layout L;
    int W, Gf;
    kvq_status s = resolve(in, &cfg, &L, &W, &Gf);
    if (s) return s;
    return (int64_t)(cfg.arena_bytes / L.page_bytes) / cfg.n_layers * L.page_tokens;
}

kvq_status kvq_cache_create(const kvq_cache_config *in, kvq_cache **out) {
    KVQ_CHECK_NULL(out, "kvq_cache_create");
    *out = NULL;
    kvq__init_tables();
    kvq_cache *c = calloc(1, sizeof *c);
    if (!c) return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, "kvq_cache_create: no memory for the cache object");
    kvq_status s = resolve(in, &c->cfg, &c->L, &c->W, &c->Gf);
    if (s) {
        free(c);
        return s;
    }
    c->n_pages = (int64_t)(c->cfg.arena_bytes / c->L.page_bytes);
    c->arena = aligned_alloc(64, (c->n_pages * c->L.page_bytes + 63) & ~(size_t)63);
    c->refcnt = calloc((size_t)c->n_pages, sizeof *c->refcnt);
    c->free_list = malloc((size_t)c->n_pages * sizeof *c->free_list);
    c->seqs = calloc((size_t)c->cfg.max_seqs, sizeof *c->seqs);
    if (!c->arena || !c->refcnt || !c->free_list || !c->seqs) {
        kvq_cache_free(c);
        return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, "kvq_cache_create: cannot allocate an arena of %zu bytes",
                         c->cfg.arena_bytes);
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
    free(c);
}

kvq_status kvq_cache_get_config(const kvq_cache *c, kvq_cache_config *cfg, kvq_page_layout *layout) {
    KVQ_CHECK_NULL(c, "kvq_cache_get_config");
    if (cfg) *cfg = c->cfg;
    if (layout) *layout = c->L;
    return KVQ_OK;
}

static size_t window_bytes(const kvq_cache *c) {
    return (size_t)c->W * c->L.n_kv_heads * c->L.head_dim * sizeof(uint16_t);
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
    st->window_bytes = (size_t)c->n_live * c->cfg.n_layers * 2 * window_bytes(c);
    for (int i = 0; i < c->cfg.max_seqs; i++)
        if (c->seqs[i].live) st->tokens += c->seqs[i].layers[0].paged + c->seqs[i].layers[0].win;
    st->bytes_per_token = (double)c->L.page_bytes * c->cfg.n_layers / c->L.page_tokens;
    kvq_page_layout F;
    kvq_page_layout_make(KVQ_TYPE_F16, KVQ_TYPE_F16, c->L.n_kv_heads, c->L.head_dim, c->L.page_tokens, 0, &F);
    st->f16_bytes_per_token = (double)F.page_bytes * c->cfg.n_layers / F.page_tokens;
    st->capacity_tokens = c->n_pages / c->cfg.n_layers * c->L.page_tokens;
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
    if (--c->refcnt[id] == 0) c->free_list[c->n_free++] = id;
}

static int32_t page_alloc(kvq_cache *c) {
    int32_t id = c->free_list[--c->n_free];
    c->refcnt[id] = 1;
    return id;
}

static void seq_release(kvq_cache *c, kvq_seq *q) {
    for (int l = 0; l < c->cfg.n_layers && q->layers; l++) {
        kvq_seq_layer *sl = &q->layers[l];
        for (int32_t i = 0; i < sl->n_pages; i++) page_unref(c, sl->pages[i]);
        free(sl->pages);
        free(sl->wk);
        free(sl->wv);
    }
    free(q->layers);
    memset(q, 0, sizeof *q);
}

static int free_slot(const kvq_cache *c) {
    for (int i = 0; i < c->cfg.max_seqs; i++)
        if (!c->seqs[i].live) return i;
    return -1;
}

/* Allocates the per-layer state of slot `id` (windows included); on failure nothing is left allocated. */
static kvq_status seq_alloc(kvq_cache *c, int id, const char *fn) {
    kvq_seq *q = &c->seqs[id];
    q->layers = calloc((size_t)c->cfg.n_layers, sizeof *q->layers);
    bool ok = q->layers != NULL;
    for (int l = 0; ok && l < c->cfg.n_layers; l++) {
        q->layers[l].wk = malloc(window_bytes(c));
        q->layers[l].wv = malloc(window_bytes(c));
        ok = q->layers[l].wk && q->layers[l].wv;
    }
    if (!ok) {
        seq_release(c, q);
        return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no memory for the residual windows", fn);
    }
    q->live = true;
    c->n_live++;
    return KVQ_OK;
}

kvq_status kvq_seq_new(kvq_cache *c, int32_t *seq_out) {
    KVQ_CHECK_NULL(c, "kvq_seq_new");
    KVQ_CHECK_NULL(seq_out, "kvq_seq_new");
    int id = free_slot(c);
    if (id < 0) return kvq__fail(KVQ_ERR_TOO_MANY_SEQS, "kvq_seq_new: all %d sequence slots are live", c->cfg.max_seqs);
    kvq_status s = seq_alloc(c, id, "kvq_seq_new");
    if (s) return s;
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
            sb->pages = malloc((size_t)sa->n_pages * sizeof *sb->pages);
            if (!sb->pages) {
                seq_release(c, b);
                c->n_live--;
                return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, "kvq_seq_fork: no memory for the page table");
            }
            memcpy(sb->pages, sa->pages, (size_t)sa->n_pages * sizeof *sb->pages);
            sb->cap_pages = sb->n_pages = sa->n_pages;
        }
        sb->paged = sa->paged;
        sb->win = sa->win;
        size_t wb = (size_t)sa->win * c->L.n_kv_heads * c->L.head_dim * sizeof(uint16_t);
        memcpy(sb->wk, sa->wk, wb);
        memcpy(sb->wv, sa->wv, wb);
    }
    /* references are taken only once nothing can fail any more */
    for (int l = 0; l < c->cfg.n_layers; l++)
        for (int32_t i = 0; i < b->layers[l].n_pages; i++) c->refcnt[b->layers[l].pages[i]]++;
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
    *len = sl->paged + sl->win;
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
    v->window_capacity = c->W;
    v->window_k = sl->wk;
    v->window_v = sl->wv;
    return KVQ_OK;
}

/* Dequantizes paged tokens [t0, t1) of one layer into the window rows starting at `row`. */
static void paged_to_window(kvq_cache *c, kvq_seq_layer *sl, int64_t t0, int64_t t1, int row) {
    int P = c->L.page_tokens, H = c->L.n_kv_heads, D = c->L.head_dim;
    float tmp[256];
    for (int64_t t = t0; t < t1; t++, row++) {
        int32_t pg = sl->pages[t / P];
        int slot = (int)(t % P);
        for (int h = 0; h < H; h++) {
            uint16_t *wk = sl->wk + ((size_t)row * H + h) * D, *wv = sl->wv + ((size_t)row * H + h) * D;
            kvq__dequant_block(&c->L, KVQ_KEY, kvq__kblock(c, pg, h), slot, slot + 1, tmp, 0);
            for (int d = 0; d < D; d++) wk[d] = kvq__f32_to_f16(tmp[d]);
            kvq__dequant_block(&c->L, KVQ_VALUE, kvq__vblock(c, pg, h), slot, slot + 1, tmp, 0);
            for (int d = 0; d < D; d++) wv[d] = kvq__f32_to_f16(tmp[d]);
        }
    }
}

kvq_status kvq_seq_truncate(kvq_cache *c, int32_t seq, int64_t n) {
    KVQ_CHECK_NULL(c, "kvq_seq_truncate");
    kvq_status s = kvq__check_seq(c, seq, "kvq_seq_truncate");
    if (s) return s;
    if (n < 0) return kvq__fail(KVQ_ERR_RANGE, "kvq_seq_truncate: n_tokens %lld is negative", (long long)n);
    int P = c->L.page_tokens;
    for (int l = 0; l < c->cfg.n_layers; l++) {
        kvq_seq_layer *sl = &c->seqs[seq].layers[l];
        if (n >= sl->paged + sl->win) continue;
        if (n >= sl->paged) {
            sl->win = (int32_t)(n - sl->paged);
            continue;
        }
        /* The cut is inside the pages: whole flush units before it stay, the rest of its unit moves back to the
         * window (dequantized), later window tokens are dropped. */
        int64_t keep = n / c->Gf * c->Gf;
        paged_to_window(c, sl, keep, n, 0);
        sl->win = (int32_t)(n - keep);
        sl->paged = keep;
        int32_t np = (int32_t)((keep + P - 1) / P);
        for (int32_t i = np; i < sl->n_pages; i++) page_unref(c, sl->pages[i]);
        sl->n_pages = np;
    }
    return KVQ_OK;
}

/* ---- append ---- */

static inline float load_elem(kvq_dtype dt, const void *base, size_t i) {
    switch (dt) {
    case KVQ_DTYPE_F16: return kvq__f16_to_f32(((const uint16_t *)base)[i]);
    case KVQ_DTYPE_BF16: return kvq__bf16_to_f32(((const uint16_t *)base)[i]);
    default: return ((const float *)base)[i];
    }
}

/* Number of window flushes when n tokens arrive at a window holding `win`. */
static int64_t flushes(const kvq_cache *c, int32_t win, int64_t n) {
    int64_t total = win + n;
    return total < c->W ? 0 : 1 + (total - c->W) / c->Gf;
}

/* Pages (seq, layer) needs for n more tokens, counting a copy-on-write of its last page. */
static int64_t pages_needed(const kvq_cache *c, const kvq_seq_layer *sl, int64_t n) {
    int P = c->L.page_tokens;
    int64_t f = flushes(c, sl->win, n);
    if (f == 0) return 0;
    int64_t end = sl->paged + f * c->Gf;
    int64_t need = (end + P - 1) / P - sl->n_pages;
    if (sl->paged % P != 0 && c->refcnt[sl->pages[sl->n_pages - 1]] > 1) need++;
    return need;
}

/* Quantizes Gf tokens (x: fp32 [Gf][H][D]) into the next page slots of (seq, layer). */
static void store_unit(kvq_cache *c, kvq_seq_layer *sl, const float *xk, const float *xv, float *scratch) {
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
            uint16_t *par = (uint16_t *)(void *)(blk + rb * (size_t)P);
            if (role == KVQ_KEY && kvq_type_get_traits(t)->grouped) {
                for (int i = 0; i < Gf; i++) memcpy(scratch + (size_t)i * D, x + ((size_t)i * H + h) * D, (size_t)D * 4);
                kvq__quant_key_group(t, scratch, Gf, D, blk + rb * (size_t)slot, rb, par + (size_t)(slot / Gf) * 2 * D);
                continue;
            }
            for (int i = 0; i < Gf; i++) {
                int s = slot + i;
                uint16_t *p = t == KVQ_TYPE_Q8 || t == KVQ_TYPE_FP8 ? par + s
                              : kvq_type_get_traits(t)->grouped ? par + (size_t)s * (D / L->value_group) * 2
                                                                : NULL;
                kvq__quant_row(t, x + ((size_t)i * H + h) * D, D, L->value_group, blk + rb * (size_t)s, p);
            }
        }
    }
    sl->paged += Gf;
}

static kvq_status reserve_pages(kvq_seq_layer *sl, int64_t need) {
    int64_t want = sl->n_pages + need;
    if (want <= sl->cap_pages) return KVQ_OK;
    int64_t cap = sl->cap_pages ? sl->cap_pages : 8;
    while (cap < want) cap *= 2;
    int32_t *p = realloc(sl->pages, (size_t)cap * sizeof *p);
    if (!p) return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, FN_APPEND ": no memory for a page table of %lld pages", (long long)cap);
    sl->pages = p;
    sl->cap_pages = (int32_t)cap;
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
        need += pages_needed(c, &c->seqs[seq_ids[i]].layers[layer], n_tokens[i]);
    }
    if (total == 0) return KVQ_OK;
    KVQ_CHECK_NULL(k, FN_APPEND);
    KVQ_CHECK_NULL(v, FN_APPEND);
    size_t n_elem = (size_t)total * H * D;
    for (size_t i = 0; i < n_elem; i++) {
        float a = load_elem(dtype, k, i), b = load_elem(dtype, v, i);
        if (!(fabsf(a) <= 65504.0f) || !(fabsf(b) <= 65504.0f))
            return kvq__fail(KVQ_ERR_NONFINITE,
                             FN_APPEND ": %s[%zu] (token %zu, head %zu, channel %zu) is %g: K/V must be finite and "
                             "within the fp16 range; nothing was appended",
                             fabsf(a) <= 65504.0f ? "v" : "k", i, i / ((size_t)H * D), i / D % H, i % D,
                             (double)(fabsf(a) <= 65504.0f ? b : a));
    }
    if (need > c->n_free)
        return kvq__fail(KVQ_ERR_CACHE_FULL, FN_APPEND ": layer %d needs %lld free pages, %lld are free", layer,
                         (long long)need, (long long)c->n_free);
    for (int i = 0; i < n_seqs; i++) {
        kvq_seq_layer *sl = &c->seqs[seq_ids[i]].layers[layer];
        if ((s = reserve_pages(sl, pages_needed(c, sl, n_tokens[i]) + 1))) return s;
    }
    /* scratch for one flush unit of K and V in fp32 plus a transposition buffer */
    size_t unit = (size_t)c->Gf * H * D;
    float *buf = malloc((2 * unit + (size_t)c->Gf * D) * sizeof(float));
    if (!buf) return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, FN_APPEND ": no memory for %zu floats of scratch", 2 * unit);
    float *uk = buf, *uv = buf + unit, *scratch = buf + 2 * unit;

    /* nothing can fail from here on */
    size_t row = (size_t)H * D, off = 0;
    for (int i = 0; i < n_seqs; i++) {
        kvq_seq_layer *sl = &c->seqs[seq_ids[i]].layers[layer];
        for (int32_t t = 0; t < n_tokens[i]; t++, off += row) {
            if (c->W == 1) { /* R = 0, per-token types: straight from the caller's values to the page */
                for (size_t e = 0; e < row; e++) uk[e] = load_elem(dtype, k, off + e), uv[e] = load_elem(dtype, v, off + e);
                store_unit(c, sl, uk, uv, scratch);
                continue;
            }
            uint16_t *wk = sl->wk + (size_t)sl->win * row, *wv = sl->wv + (size_t)sl->win * row;
            for (size_t e = 0; e < row; e++) {
                wk[e] = kvq__f32_to_f16(load_elem(dtype, k, off + e));
                wv[e] = kvq__f32_to_f16(load_elem(dtype, v, off + e));
            }
            if (++sl->win < c->W) continue;
            for (size_t e = 0; e < unit; e++) uk[e] = kvq__f16_to_f32(sl->wk[e]), uv[e] = kvq__f16_to_f32(sl->wv[e]);
            store_unit(c, sl, uk, uv, scratch);
            sl->win -= c->Gf;
            memmove(sl->wk, sl->wk + unit, (size_t)sl->win * row * sizeof(uint16_t));
            memmove(sl->wv, sl->wv + unit, (size_t)sl->win * row * sizeof(uint16_t));
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
    int64_t len = sl->paged + sl->win;
    if (start < 0 || n < 0 || start > len || n > len - start)
        return kvq__fail(KVQ_ERR_RANGE, "kvq_read: tokens [%lld, %lld) outside the sequence's %lld", (long long)start,
                         (long long)(start + n), (long long)len);
    int P = c->L.page_tokens, H = c->L.n_kv_heads, D = c->L.head_dim;
    size_t row = (size_t)H * D;
    for (int64_t t = start; t < start + n; t++) {
        float *ko = k ? k + (size_t)(t - start) * row : NULL, *vo = v ? v + (size_t)(t - start) * row : NULL;
        for (int h = 0; h < H; h++) {
            if (t < sl->paged) {
                int32_t pg = sl->pages[t / P];
                int slot = (int)(t % P);
                if (ko) kvq__dequant_block(&c->L, KVQ_KEY, kvq__kblock(c, pg, h), slot, slot + 1, ko + (size_t)h * D, 0);
                if (vo) kvq__dequant_block(&c->L, KVQ_VALUE, kvq__vblock(c, pg, h), slot, slot + 1, vo + (size_t)h * D, 0);
            } else {
                size_t w = ((size_t)(t - sl->paged) * H + h) * D;
                for (int d = 0; d < D; d++) {
                    if (ko) ko[(size_t)h * D + d] = kvq__f16_to_f32(sl->wk[w + d]);
                    if (vo) vo[(size_t)h * D + d] = kvq__f16_to_f32(sl->wv[w + d]);
                }
            }
        }
    }
    return KVQ_OK;
}

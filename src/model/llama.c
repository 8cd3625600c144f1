#include "llama.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model_err.h"

/* ----------------------------------------------------------------------------------------------------------
 * Loading
 * -------------------------------------------------------------------------------------------------------- */
static kvq_status get_int(const gguf_file *f, const char *arch, const char *key, int64_t lo, int64_t hi, int *out) {
    char name[160];
    int64_t v;
    snprintf(name, sizeof name, "%s.%s", arch, key);
    kvq_status st = gguf_get_i64(f, name, &v);
    if (st) return st;
    if (v < lo || v > hi) return kvqm_fail(KVQ_ERR_FORMAT, "model: %s = %lld outside %lld..%lld", name, (long long)v, (long long)lo, (long long)hi);
    *out = (int)v;
    return KVQ_OK;
}

/* Finds tensor `name` and checks its shape is [ne1][ne0] (ne0 contiguous). */
static kvq_status find_tensor(const gguf_file *f, const char *name, int64_t ne0, int64_t ne1, const gguf_tensor **out) {
    const gguf_tensor *t = gguf_find_tensor(f, name);
    if (!t) return kvqm_fail(KVQ_ERR_FORMAT, "model: tensor '%s' is missing", name);
    if ((int64_t)t->ne[0] != ne0 || (int64_t)t->ne[1] != ne1 || t->ne[2] != 1 || t->ne[3] != 1)
        return kvqm_fail(KVQ_ERR_FORMAT, "model: tensor '%s' has shape [%llu, %llu, %llu, %llu], expected [%lld, %lld]", name,
                         (unsigned long long)t->ne[0], (unsigned long long)t->ne[1], (unsigned long long)t->ne[2],
                         (unsigned long long)t->ne[3], (long long)ne0, (long long)ne1);
    *out = t;
    return KVQ_OK;
}

/* A vector (norm weights) copied to a new fp32 array. */
static kvq_status load_vector(const gguf_file *f, const char *name, int64_t n, float **out, size_t *bytes) {
    const gguf_tensor *t = NULL;
    kvq_status st = find_tensor(f, name, n, 1, &t);
    if (st) return st;
    float *p = malloc((size_t)n * sizeof *p);
    if (!p) return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "model: no memory for tensor '%s'", name);
    if ((st = gguf_tensor_to_f32(t, p))) {
        free(p);
        return st;
    }
    *out = p;
    *bytes += (size_t)n * sizeof *p;
    return KVQ_OK;
}

/* A weight matrix [rows][cols] left in its encoding, pointing into the file's tensor data. */
static kvq_status load_matrix(const gguf_file *f, const char *name, int64_t cols, int64_t rows, qmat *out, size_t *bytes) {
    const gguf_tensor *t = NULL;
    kvq_status st = find_tensor(f, name, cols, rows, &t);
    if (st) return st;
    if ((st = qmat_init(out, t->type, (int)rows, (int)cols, t->data)))
        return kvqm_fail(st, "model: tensor '%s': %s", name, kvqm_last_error());
    *bytes += qmat_bytes(out);
    return KVQ_OK;
}

void llama_free(llama_model *m) {
    if (!m) return;
    if (m->layers)
        for (int l = 0; l < m->cfg.n_layers; l++) free(m->layers[l].attn_norm), free(m->layers[l].ffn_norm);
    free(m->layers);
    free(m->output_norm);
    free(m);
}

/* Reads and checks the model's shape from its metadata (no tensor data is touched beyond token_embd's shape). */
kvq_status llama_read_config(const gguf_file *f, llama_config *c) {
    if (!f || !c) return kvqm_fail(KVQ_ERR_NULL, "llama_read_config: NULL argument");
    memset(c, 0, sizeof *c);
    gguf_str arch_s = gguf_get_str(f, "general.architecture");
    char arch[64];
    if (!arch_s.ptr || arch_s.len == 0 || arch_s.len >= sizeof arch)
        return kvqm_fail(KVQ_ERR_FORMAT, "model: general.architecture missing");
    memcpy(arch, arch_s.ptr, arch_s.len);
    arch[arch_s.len] = '\0';
    if (strcmp(arch, "llama") != 0)
        return kvqm_fail(KVQ_ERR_FORMAT, "model: architecture '%s' is not supported (llama only)", arch);
    kvq_status st;
    if ((st = get_int(f, arch, "embedding_length", 1, 1 << 16, &c->dim)) ||
        (st = get_int(f, arch, "block_count", 1, 1024, &c->n_layers)) ||
        (st = get_int(f, arch, "attention.head_count", 1, 1024, &c->n_heads)) ||
        (st = get_int(f, arch, "feed_forward_length", 1, 1 << 20, &c->hidden_dim)))
        return st;
    c->n_kv_heads = c->n_heads;
    char key[160];
    snprintf(key, sizeof key, "%s.attention.head_count_kv", arch);
    if (gguf_find_kv(f, key) && (st = get_int(f, arch, "attention.head_count_kv", 1, c->n_heads, &c->n_kv_heads))) return st;
    if (c->dim % c->n_heads || c->n_heads % c->n_kv_heads)
        return kvqm_fail(KVQ_ERR_FORMAT, "model: dim %d / heads %d / kv heads %d do not divide", c->dim, c->n_heads, c->n_kv_heads);
    c->head_dim = c->dim / c->n_heads;
    snprintf(key, sizeof key, "%s.context_length", arch);
    int64_t ctx_len = gguf_get_i64_or(f, key, 2048);
    c->ctx_len = ctx_len < 1 ? 2048 : ctx_len > (1 << 24) ? (1 << 24) : (int)ctx_len;
    snprintf(key, sizeof key, "%s.rope.freq_base", arch);
    double theta = gguf_get_f64_or(f, key, 10000.0);
    snprintf(key, sizeof key, "%s.attention.layer_norm_rms_epsilon", arch);
    double eps = gguf_get_f64_or(f, key, 1e-5);
    if (!(theta > 1.0 && theta < 1e12) || !(eps > 0 && eps < 1.0))
        return kvqm_fail(KVQ_ERR_FORMAT, "model: rope.freq_base %g or rms epsilon %g out of range", theta, eps);
    c->rope_theta = (float)theta;
    c->norm_eps = (float)eps;
    snprintf(key, sizeof key, "%s.rope.dimension_count", arch);
    if (gguf_get_i64_or(f, key, c->head_dim) != c->head_dim)
        return kvqm_fail(KVQ_ERR_FORMAT, "model: partial RoPE (rope.dimension_count != head_dim) is not supported");
    const gguf_tensor *emb = gguf_find_tensor(f, "token_embd.weight");
    if (!emb || (int64_t)emb->ne[0] != c->dim || emb->ne[1] > (1u << 24))
        return kvqm_fail(KVQ_ERR_FORMAT, "model: token_embd.weight missing or not [vocab][%d]", c->dim);
    c->vocab_size = (int)emb->ne[1];
    return KVQ_OK;
}

/* What llama_load will hold: the matrices' encoded bytes (resident as pages of the mapping once touched) and the
 * fp32 copies of the norms; the tied output counted once. Sizes come from the tensor infos (validated at parse). */
kvq_status llama_weight_bytes(const gguf_file *f, const llama_config *c, size_t *out) {
    if (!f || !c || !out) return kvqm_fail(KVQ_ERR_NULL, "llama_weight_bytes: NULL argument");
    size_t n = 0;
    char name[64];
    static const char *const mats[7] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};
    const gguf_tensor *t = gguf_find_tensor(f, "token_embd.weight");
    n += t ? t->nbytes : 0;
    if ((t = gguf_find_tensor(f, "output.weight"))) n += t->nbytes;
    for (int l = 0; l < c->n_layers; l++)
        for (int i = 0; i < 7; i++) {
            snprintf(name, sizeof name, "blk.%d.%s.weight", l, mats[i]);
            if ((t = gguf_find_tensor(f, name))) n += t->nbytes;
        }
    n += ((size_t)c->n_layers * 2 + 1) * (size_t)c->dim * sizeof(float); /* attn/ffn norms per layer, output norm */
    *out = n;
    return KVQ_OK;
}

static int max_cols(const llama_config *c) { return c->hidden_dim > c->dim ? c->hidden_dim : c->dim; }

size_t llama_ctx_scratch_bytes(const llama_config *c, int max_batch) {
    int B = max_batch > 0 ? max_batch : 256;
    size_t kv_dim = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    return (size_t)(c->head_dim / 2) * sizeof(float) +
           (size_t)B * (4 * (size_t)c->dim + 2 * kv_dim + 2 * (size_t)c->hidden_dim) * sizeof(float) +
           qmat_work_bytes(B, max_cols(c));
}

kvq_status llama_load(const gguf_file *f, llama_model **out) {
    if (!f || !out) return kvqm_fail(KVQ_ERR_NULL, "llama_load: NULL argument");
    *out = NULL;
    llama_model *m = calloc(1, sizeof *m);
    if (!m) return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "model: out of memory");
    llama_config *c = &m->cfg;
    kvq_status st = llama_read_config(f, c);
    if (st) {
        free(m);
        return st;
    }
    int dim = c->dim, kv_dim = c->n_kv_heads * c->head_dim, hid = c->hidden_dim, V = c->vocab_size;
    size_t *wb = &m->weight_bytes;
    if ((st = load_matrix(f, "token_embd.weight", dim, V, &m->tok_embd, wb)) ||
        (st = load_vector(f, "output_norm.weight", dim, &m->output_norm, wb)))
        goto fail;
    if (gguf_find_tensor(f, "output.weight")) {
        if ((st = load_matrix(f, "output.weight", dim, V, &m->output, wb))) goto fail;
    } else {
        m->output = m->tok_embd; /* tied embeddings: the same bytes */
    }
    m->layers = calloc((size_t)c->n_layers, sizeof *m->layers);
    if (!m->layers) {
        st = kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "model: out of memory");
        goto fail;
    }
    for (int l = 0; l < c->n_layers; l++) {
        llama_layer *L = &m->layers[l];
        char n[9][64];
        static const char *const suffix[9] = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                              "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"};
        for (int i = 0; i < 9; i++) snprintf(n[i], sizeof n[i], "blk.%d.%s.weight", l, suffix[i]);
        if ((st = load_vector(f, n[0], dim, &L->attn_norm, wb)) || (st = load_matrix(f, n[1], dim, dim, &L->wq, wb)) ||
            (st = load_matrix(f, n[2], dim, kv_dim, &L->wk, wb)) || (st = load_matrix(f, n[3], dim, kv_dim, &L->wv, wb)) ||
            (st = load_matrix(f, n[4], dim, dim, &L->wo, wb)) || (st = load_vector(f, n[5], dim, &L->ffn_norm, wb)) ||
            (st = load_matrix(f, n[6], dim, hid, &L->w_gate, wb)) || (st = load_matrix(f, n[7], dim, hid, &L->w_up, wb)) ||
            (st = load_matrix(f, n[8], hid, dim, &L->w_down, wb)))
            goto fail;
    }
    *out = m;
    return KVQ_OK;
fail:
    llama_free(m);
    return st;
}

/* ----------------------------------------------------------------------------------------------------------
 * Context
 * -------------------------------------------------------------------------------------------------------- */
struct llama_ctx {
    const llama_model *m;
    kvq_cache *cache;
    int32_t seq;
    int max_batch;
    int n_ctx;
    kvq_attn_params ap;
    float *rope_inv_freq; /* [head_dim / 2] */
    int prerope;          /* the cache takes keys before RoPE (kvq.h section 10): forward appends them unroped */
    int n_threads;        /* weight products (qmat_mul); 0: OpenMP's default */
    qmat_work work;       /* qmat_mul's scratch for max_batch tokens */
    void *work_buf;
    /* scratch, sized for max_batch tokens */
    float *x, *h, *q, *k, *v, *o, *g, *u; /* [B][dim] x4 ([B][kv_dim] for k, v), [B][hidden] for g, u */
};

static const char *type_str(kvq_type t) {
    const kvq_type_traits *tr = kvq_type_get_traits(t);
    return tr ? tr->name : "(unknown type)";
}

/* kvq.h section 10: pre-RoPE keys help Q3 and Q2 (KLD -25%, -31% on SmolLM2; Q4 within noise), but with the default
 * key rotation each decoded key row goes back through R^T: 14-18x slower decode attention at 32k. So off for every
 * key type until that R^T is vectorized; --kv-prerope 1 asks for the trade. */
int llama_default_prerope(kvq_type type_k) {
    (void)type_k;
    return 0;
}

kvq_status llama_ctx_create(const llama_model *m, const llama_ctx_params *p, llama_ctx **out) {
    if (!m || !p || !out) return kvqm_fail(KVQ_ERR_NULL, "llama_ctx_create: NULL argument");
    *out = NULL;
    const llama_config *c = &m->cfg;
    if (p->n_ctx < 1) return kvqm_fail(KVQ_ERR_INVALID_ARG, "context size %d must be >= 1", p->n_ctx);
    llama_ctx *x = calloc(1, sizeof *x);
    if (!x) return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "out of memory");
    x->m = m;
    x->n_ctx = p->n_ctx;
    x->max_batch = p->max_batch > 0 ? p->max_batch : 256;
    x->n_threads = p->n_threads;
    x->ap = kvq_attn_params_default(c->n_heads);

    int hd = c->head_dim;
    x->rope_inv_freq = malloc((size_t)(hd / 2) * sizeof(float));
    if (!x->rope_inv_freq) {
        llama_ctx_free(x);
        return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "out of memory for activations");
    }
    for (int i = 0; i < hd / 2; i++) x->rope_inv_freq[i] = (float)pow((double)c->rope_theta, -2.0 * i / hd);
    x->prerope = p->prerope == -1 ? llama_default_prerope(p->type_k) : p->prerope;

    kvq_cache_config cc = kvq_cache_config_default();
    cc.n_layers = c->n_layers;
    cc.n_kv_heads = c->n_kv_heads;
    cc.head_dim = c->head_dim;
    cc.type_k = p->type_k;
    cc.type_v = p->type_v;
    cc.residual = p->residual;
    cc.group = p->group;
    cc.n_threads = p->n_threads;
    cc.rotate = p->rotate;
    cc.rotation_seed = p->rotation_seed;
    cc.sinks = p->sinks;
    cc.nonuniform = p->nonuniform;
    /* the model's RoPE (adjacent pairs: GGUF's Q/K rows are permuted for them), for a cache that applies it */
    cc.prerope = x->prerope;
    cc.rope_neox = 0;
    cc.rope_theta = c->rope_theta;
    cc.rope_freqs = x->rope_inv_freq;
    cc.max_seqs = 1;
    kvq_status st;
    cc.arena_bytes = kvq_cache_arena_bytes_for(&cc, p->n_ctx); /* exactly the pages n_ctx tokens need */
    if (cc.arena_bytes == 0) {
        /* arena_bytes_for says only "invalid": the same config through kvq_cache_capacity_tokens fails at the same
         * check and returns its status (head dim, group, residual, type, ...) with the library's message. */
        int64_t why = kvq_cache_capacity_tokens(&cc);
        st = why < 0 ? (kvq_status)why : KVQ_ERR_INTERNAL;
        st = kvqm_fail(st, "KV cache (keys %s, values %s, head_dim %d, %d KV heads, %d tokens): %s", type_str(p->type_k),
                       type_str(p->type_v), c->head_dim, c->n_kv_heads, p->n_ctx, kvq_last_error());
        goto fail;
    }
    if ((st = kvq_cache_create(&cc, &x->cache))) {
        st = kvqm_fail(st, "KV cache of %d tokens (%zu bytes of pages): %s", p->n_ctx, cc.arena_bytes, kvq_last_error());
        goto fail;
    }
    if ((st = kvq_seq_new(x->cache, &x->seq))) {
        st = kvqm_fail(st, "kvq_seq_new: %s", kvq_last_error());
        goto fail;
    }
    size_t B = (size_t)x->max_batch, kv_dim = (size_t)c->n_kv_heads * (size_t)hd;
    x->x = malloc(B * (size_t)c->dim * sizeof(float));
    x->h = malloc(B * (size_t)c->dim * sizeof(float));
    x->q = malloc(B * (size_t)c->dim * sizeof(float));
    x->o = malloc(B * (size_t)c->dim * sizeof(float));
    x->k = malloc(B * kv_dim * sizeof(float));
    x->v = malloc(B * kv_dim * sizeof(float));
    x->g = malloc(B * (size_t)c->hidden_dim * sizeof(float));
    x->u = malloc(B * (size_t)c->hidden_dim * sizeof(float));
    x->work_buf = malloc(qmat_work_bytes(x->max_batch, max_cols(c)));
    if (x->work_buf) qmat_work_init(&x->work, x->work_buf, x->max_batch, max_cols(c));
    if (!x->x || !x->h || !x->q || !x->o || !x->k || !x->v || !x->g || !x->u || !x->work_buf) {
        st = kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "out of memory for activations");
        goto fail;
    }
    *out = x;
    return KVQ_OK;
fail:
    llama_ctx_free(x);
    return st;
}

void llama_ctx_free(llama_ctx *c) {
    if (!c) return;
    kvq_cache_free(c->cache);
    free(c->rope_inv_freq);
    free(c->x), free(c->h), free(c->q), free(c->o), free(c->k), free(c->v), free(c->g), free(c->u);
    free(c->work_buf);
    free(c);
}

kvq_status llama_ctx_reset(llama_ctx *c) {
    kvq_status st = kvq_seq_free(c->cache, c->seq);
    if (!st) st = kvq_seq_new(c->cache, &c->seq);
    return st ? kvqm_fail(st, "reset: %s", kvq_last_error()) : KVQ_OK;
}

int64_t llama_ctx_pos(const llama_ctx *c) {
    int64_t len = 0;
    kvq_seq_length(c->cache, c->seq, 0, &len);
    return len;
}

const kvq_cache *llama_ctx_cache(const llama_ctx *c) { return c->cache; }

/* ----------------------------------------------------------------------------------------------------------
 * Forward
 * -------------------------------------------------------------------------------------------------------- */
/* out[n][dim] = rmsnorm(in[n][dim]) * w[dim] */
static void rmsnorm(float *out, const float *in, const float *w, int n, int dim, float eps) {
    for (int t = 0; t < n; t++) {
        const float *a = in + (size_t)t * dim;
        float *b = out + (size_t)t * dim;
        double ss = 0;
        for (int i = 0; i < dim; i++) ss += (double)a[i] * a[i];
        float r = (float)(1.0 / sqrt(ss / dim + eps));
        for (int i = 0; i < dim; i++) b[i] = a[i] * r * w[i];
    }
}

/* Y[n][W.rows] = X[n][W.cols] W^T; accumulate 1 adds it to Y (residual adds). The shapes were checked at load and
 * n <= max_batch by llama_forward, so qmat_mul cannot fail here. */
static void matmul(llama_ctx *c, float *Y, const float *X, const qmat *W, int n, int accumulate) {
    qmat_mul(W, X, n, Y, accumulate, &c->work, c->n_threads);
}

/* Rotates adjacent pairs (x[2i], x[2i+1]) of every head by pos * inv_freq[i]. */
static void rope(float *x, int n_heads, int hd, int64_t pos, const float *inv_freq) {
    for (int i = 0; i < hd / 2; i++) {
        double a = (double)pos * inv_freq[i];
        float cs = (float)cos(a), sn = (float)sin(a);
        for (int h = 0; h < n_heads; h++) {
            float *p = x + (size_t)h * hd + 2 * i;
            float x0 = p[0], x1 = p[1];
            p[0] = x0 * cs - x1 * sn;
            p[1] = x0 * sn + x1 * cs;
        }
    }
}

kvq_status llama_forward(llama_ctx *c, const int32_t *tokens, int n, float *logits, int logits_from) {
    const llama_model *m = c->m;
    const llama_config *cf = &m->cfg;
    if (!tokens || n < 1 || n > c->max_batch)
        return kvqm_fail(KVQ_ERR_INVALID_ARG, "forward: %d tokens (1..%d per call)", n, c->max_batch);
    int dim = cf->dim, hd = cf->head_dim, kv_dim = cf->n_kv_heads * hd, hid = cf->hidden_dim, V = cf->vocab_size;
    int64_t pos0 = llama_ctx_pos(c);
    if (pos0 + n > c->n_ctx)
        return kvqm_fail(KVQ_ERR_CACHE_FULL, "forward: context full (%lld + %d > %d tokens)", (long long)pos0, n, c->n_ctx);
    for (int t = 0; t < n; t++) {
        if (tokens[t] < 0 || tokens[t] >= V) return kvqm_fail(KVQ_ERR_INVALID_ARG, "forward: token id %d out of range", tokens[t]);
        qmat_row(&m->tok_embd, tokens[t], c->x + (size_t)t * dim);
    }
    int32_t n_tok = n;
    for (int l = 0; l < cf->n_layers; l++) {
        const llama_layer *L = &m->layers[l];
        rmsnorm(c->h, c->x, L->attn_norm, n, dim, cf->norm_eps);
        matmul(c, c->q, c->h, &L->wq, n, 0); /* [n][n_heads*hd] */
        matmul(c, c->k, c->h, &L->wk, n, 0); /* [n][n_kv*hd] */
        matmul(c, c->v, c->h, &L->wv, n, 0);
        for (int t = 0; t < n; t++) {
            rope(c->q + (size_t)t * dim, cf->n_heads, hd, pos0 + t, c->rope_inv_freq);
            if (!c->prerope) rope(c->k + (size_t)t * kv_dim, cf->n_kv_heads, hd, pos0 + t, c->rope_inv_freq);
        }
        kvq_status st = kvq_append(c->cache, l, 1, &c->seq, &n_tok, KVQ_DTYPE_F32, c->k, c->v);
        if (st) return kvqm_fail(st, "layer %d: kvq_append: %s", l, kvq_last_error());
        st = n == 1 ? kvq_attn_decode(c->cache, l, 1, &c->seq, c->q, c->o, &c->ap)
                    : kvq_attn_prefill(c->cache, l, c->seq, n, c->q, c->o, &c->ap);
        if (st) return kvqm_fail(st, "layer %d: kvq attention: %s", l, kvq_last_error());
        matmul(c, c->x, c->o, &L->wo, n, 1); /* x += o Wo^T */

        rmsnorm(c->h, c->x, L->ffn_norm, n, dim, cf->norm_eps);
        matmul(c, c->g, c->h, &L->w_gate, n, 0); /* [n][hidden] */
        matmul(c, c->u, c->h, &L->w_up, n, 0);
        for (size_t i = 0; i < (size_t)n * hid; i++) {
            float g = c->g[i];
            c->g[i] = g / (1.0f + expf(-g)) * c->u[i]; /* silu(g) * u */
        }
        matmul(c, c->x, c->g, &L->w_down, n, 1); /* x += ... Wd^T */
    }
    if (!logits || logits_from >= n) return KVQ_OK;
    int first = logits_from < 0 ? 0 : logits_from, rows = n - first;
    rmsnorm(c->h, c->x + (size_t)first * dim, m->output_norm, rows, dim, cf->norm_eps);
    matmul(c, logits, c->h, &m->output, rows, 0);
    return KVQ_OK;
}

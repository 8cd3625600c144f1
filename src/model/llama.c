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
        for (int l = 0; l < m->cfg.n_layers; l++) {
            llama_layer *L = &m->layers[l];
            free(L->attn_norm), free(L->ffn_norm);
            free(L->q_norm), free(L->k_norm), free(L->post_attn_norm), free(L->post_ffw_norm);
        }
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
    if (strcmp(arch, "llama") == 0) c->arch = LLAMA_ARCH_LLAMA;
    else if (strcmp(arch, "gemma3") == 0) c->arch = LLAMA_ARCH_GEMMA3;
    else return kvqm_fail(KVQ_ERR_FORMAT, "model: architecture '%s' is not supported (llama, gemma3)", arch);
    int gemma = c->arch == LLAMA_ARCH_GEMMA3;
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
    if (c->n_heads % c->n_kv_heads)
        return kvqm_fail(KVQ_ERR_FORMAT, "model: heads %d / kv heads %d do not divide", c->n_heads, c->n_kv_heads);
    snprintf(key, sizeof key, "%s.attention.key_length", arch);
    if (gguf_find_kv(f, key)) {
        /* Gemma: head_dim is its own number (256 for Gemma 3 270M, whose dim / n_heads is 160) */
        int vl = 0;
        if ((st = get_int(f, arch, "attention.key_length", 1, 1024, &c->head_dim))) return st;
        snprintf(key, sizeof key, "%s.attention.value_length", arch);
        if (gguf_find_kv(f, key) && ((st = get_int(f, arch, "attention.value_length", 1, 1024, &vl)) || vl != c->head_dim))
            return st ? st : kvqm_fail(KVQ_ERR_FORMAT, "model: attention.value_length %d != key_length %d is not supported", vl, c->head_dim);
    } else {
        if (c->dim % c->n_heads)
            return kvqm_fail(KVQ_ERR_FORMAT, "model: dim %d / heads %d do not divide", c->dim, c->n_heads);
        c->head_dim = c->dim / c->n_heads;
    }
    if (c->head_dim % 2) return kvqm_fail(KVQ_ERR_FORMAT, "model: head_dim %d is odd (RoPE rotates pairs)", c->head_dim);
    c->q_dim = c->n_heads * c->head_dim;
    snprintf(key, sizeof key, "%s.context_length", arch);
    int64_t ctx_len = gguf_get_i64_or(f, key, 2048);
    c->ctx_len = ctx_len < 1 ? 2048 : ctx_len > (1 << 24) ? (1 << 24) : (int)ctx_len;
    snprintf(key, sizeof key, "%s.rope.freq_base", arch);
    double theta = gguf_get_f64_or(f, key, 10000.0);
    snprintf(key, sizeof key, "%s.attention.layer_norm_rms_epsilon", arch);
    double eps = gguf_get_f64_or(f, key, gemma ? 1e-6 : 1e-5);
    if (!(theta > 1.0 && theta < 1e12) || !(eps > 0 && eps < 1.0))
        return kvqm_fail(KVQ_ERR_FORMAT, "model: rope.freq_base %g or rms epsilon %g out of range", theta, eps);
    c->rope_theta = (float)theta;
    c->norm_eps = (float)eps;
    c->embed_scale = 1.0f;
    c->rope_scale_global = 1.0f;
    c->rope_theta_local = c->rope_theta;
    c->attn_scale = (float)(1.0 / sqrt((double)c->head_dim));
    snprintf(key, sizeof key, "%s.attention.scale", arch);
    double as = gguf_get_f64_or(f, key, 0.0);
    if (as > 0 && as < 1e3) c->attn_scale = (float)as;
    snprintf(key, sizeof key, "%s.final_logit_softcapping", arch);
    double fsc = gguf_get_f64_or(f, key, 0.0);
    snprintf(key, sizeof key, "%s.attn_logit_softcapping", arch);
    double asc = gguf_get_f64_or(f, key, 0.0);
    if (!(fsc >= 0 && fsc < 1e6) || !(asc >= 0 && asc < 1e6))
        return kvqm_fail(KVQ_ERR_FORMAT, "model: soft-cap %g / %g out of range", fsc, asc);
    c->final_softcap = (float)fsc;
    c->attn_softcap = (float)asc;
    if (gemma) {
        /* transformers' Gemma3TextScaledWordEmbedding: embeddings * sqrt(hidden_size) */
        c->embed_scale = sqrtf((float)c->dim);
        /* llama.cpp and transformers: 5 sliding-window layers for each global one (sliding_window_pattern 6), the
         * local layers with RoPE base 10000 (rope_local_base_freq); the GGUF has neither, so they are Gemma 3's */
        c->swa_period = 6;
        snprintf(key, sizeof key, "%s.rope.freq_base_swa", arch);
        c->rope_theta_local = (float)gguf_get_f64_or(f, key, 10000.0);
        if (!(c->rope_theta_local > 1.0f && c->rope_theta_local < 1e12f))
            return kvqm_fail(KVQ_ERR_FORMAT, "model: rope.freq_base_swa %g out of range", (double)c->rope_theta_local);
        if ((st = get_int(f, arch, "attention.sliding_window", 1, 1 << 24, &c->window))) return st;
        /* Gemma 3 4B+ scale the global layers' positions linearly (factor 8); the local layers never */
        snprintf(key, sizeof key, "%s.rope.scaling.type", arch);
        gguf_str sc = gguf_get_str(f, key);
        if (sc.ptr && !(sc.len == 4 && memcmp(sc.ptr, "none", 4) == 0)) {
            snprintf(key, sizeof key, "%s.rope.scaling.factor", arch);
            double fac = gguf_get_f64_or(f, key, 1.0);
            if (!(sc.len == 6 && memcmp(sc.ptr, "linear", 6) == 0) || !(fac >= 1.0 && fac < 1e6))
                return kvqm_fail(KVQ_ERR_FORMAT, "model: rope scaling '%.*s' (factor %g) is not supported (linear only)",
                                 (int)(sc.len > 32 ? 32 : sc.len), sc.ptr, fac);
            c->rope_scale_global = (float)fac;
        }
    }
    snprintf(key, sizeof key, "%s.rope.dimension_count", arch);
    if (gguf_get_i64_or(f, key, c->head_dim) != c->head_dim)
        return kvqm_fail(KVQ_ERR_FORMAT, "model: partial RoPE (rope.dimension_count != head_dim) is not supported");
    const gguf_tensor *emb = gguf_find_tensor(f, "token_embd.weight");
    if (!emb || (int64_t)emb->ne[0] != c->dim || emb->ne[1] > (1u << 24))
        return kvqm_fail(KVQ_ERR_FORMAT, "model: token_embd.weight missing or not [vocab][%d]", c->dim);
    c->vocab_size = (int)emb->ne[1];
    return KVQ_OK;
}

int llama_layer_is_local(const llama_config *c, int l) {
    return c->swa_period > 0 && l % c->swa_period != c->swa_period - 1;
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
    if (c->arch == LLAMA_ARCH_GEMMA3) /* Gemma's q/k norms and post-attention/post-FFN norms */
        n += (size_t)c->n_layers * (2 * (size_t)c->head_dim + 2 * (size_t)c->dim) * sizeof(float);
    *out = n;
    return KVQ_OK;
}

/* The widest input of a weight product (qmat_mul's scratch): dim, hidden_dim, or q_dim (Gemma's Wo) */
static int max_cols(const llama_config *c) {
    int w = c->hidden_dim > c->dim ? c->hidden_dim : c->dim;
    return c->q_dim > w ? c->q_dim : w;
}

size_t llama_ctx_scratch_bytes(const llama_config *c, int max_batch) {
    size_t B = (size_t)(max_batch > 0 ? max_batch : 256), kv_dim = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    return (size_t)c->head_dim * sizeof(float) +
           B * (2 * (size_t)c->dim + 2 * (size_t)c->q_dim + 2 * kv_dim + 2 * (size_t)c->hidden_dim) * sizeof(float) +
           qmat_work_bytes((int)B, max_cols(c), 1); /* the same with threads, unless threads x max_cols > 4 MiB */
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
    int dim = c->dim, kv_dim = c->n_kv_heads * c->head_dim, hid = c->hidden_dim, V = c->vocab_size, qd = c->q_dim;
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
        if ((st = load_vector(f, n[0], dim, &L->attn_norm, wb)) || (st = load_matrix(f, n[1], dim, qd, &L->wq, wb)) ||
            (st = load_matrix(f, n[2], dim, kv_dim, &L->wk, wb)) || (st = load_matrix(f, n[3], dim, kv_dim, &L->wv, wb)) ||
            (st = load_matrix(f, n[4], qd, dim, &L->wo, wb)) || (st = load_vector(f, n[5], dim, &L->ffn_norm, wb)) ||
            (st = load_matrix(f, n[6], dim, hid, &L->w_gate, wb)) || (st = load_matrix(f, n[7], dim, hid, &L->w_up, wb)) ||
            (st = load_matrix(f, n[8], hid, dim, &L->w_down, wb)))
            goto fail;
        if (c->arch == LLAMA_ARCH_GEMMA3) {
            char g[4][64];
            static const char *const gsuffix[4] = {"attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"};
            for (int i = 0; i < 4; i++) snprintf(g[i], sizeof g[i], "blk.%d.%s.weight", l, gsuffix[i]);
            if ((st = load_vector(f, g[0], c->head_dim, &L->q_norm, wb)) ||
                (st = load_vector(f, g[1], c->head_dim, &L->k_norm, wb)) ||
                (st = load_vector(f, g[2], dim, &L->post_attn_norm, wb)) ||
                (st = load_vector(f, g[3], dim, &L->post_ffw_norm, wb)))
                goto fail;
        }
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
    /* One cache per group of layers of one kind (0: global, every layer for Llama; 1: Gemma 3's local sliding-window
     * layers) and the same key and value types (per-layer types, llama_ctx_params.layer_types): n_caches of them,
     * cache 0 holding layer 0 */
    int n_caches;
    kvq_cache *cache[LLAMA_MAX_CACHES];
    int32_t seq[LLAMA_MAX_CACHES];
    int8_t cache_kind[LLAMA_MAX_CACHES];
    int prerope[LLAMA_MAX_CACHES]; /* the cache takes keys before RoPE (kvq.h section 10): forward appends them unroped */
    int squat[LLAMA_MAX_CACHES];   /* SQuat rank (0: off): the first batch of a sequence sets its subspaces */
    int decode_attn;               /* llama_ctx_params.decode_attn */
    int exact_batch;               /* llama_ctx_params.exact_batch, resolved */
    kvq_attn_params ap[2];         /* per kind */
    float *rope_inv_freq[2];       /* per kind, [head_dim / 2] each */
    int8_t *layer_cache;           /* [n_layers]: the layer's cache */
    int *layer_index;              /* [n_layers]: the layer's index in its cache */
    int max_batch;
    int n_ctx;
    tpool *pool;             /* the threads of weight products and attention (tpool.h) */
    qmat_work work;          /* qmat_mul's scratch for max_batch tokens */
    void *work_buf;
    /* scratch, sized for max_batch tokens */
    float *x, *h, *q, *k, *v, *o, *g, *u; /* [B][dim] x2, [B][q_dim] for q, o, [B][kv_dim] for k, v, [B][hidden] for g, u */
};

static const char *type_str(kvq_type t) {
    const kvq_type_traits *tr = kvq_type_get_traits(t);
    return tr ? tr->name : "(unknown type)";
}

/* kvq.h section 10: on for Q2 keys. With their SQuat subspace and non-uniform levels they take Q2 from dPPL +11.1%
 * to +5.8% (KLD 0.124 -> 0.082) on SmolLM2 at ctx 2048 (docs/quality.md, "2026-12-04: pre-RoPE Q2 keys"); with R^T
 * and RoPE vectorized over a tile of rows (unrot_rope), Q2's decode attention at 32k takes about F16's time (3.5x
 * post-RoPE Q2's; it was 16x). Q4 gains nothing measurable and keeps its fused integer key kernels; Q3 is not
 * measured at ctx 2048 with SQuat yet. The GPU engine has no pre-RoPE keys: -1 is off there. */
int llama_default_prerope(kvq_type type_k) {
    return type_k == KVQ_TYPE_Q2;
}

/* kvq.h section 10, "SQuat keys": on (r = 8) for Q2 keys only. It lowered the KLD from F16 of every grouped key type,
 * but costs prefill (quiet machine, 2048-token prefill: SmolLM2 -10 .. -19%, Gemma 3 q4 -38 .. -44%); for Q2 it buys
 * dPPL +16.1% -> +11.1% on SmolLM2, for Q4 only KLD (dPPL within noise) and Q3's gain did not hold on every chunk
 * subset. The library's own default stays off: it needs the queries. */
int llama_default_squat(kvq_type type_k) {
    return type_k == KVQ_TYPE_Q2 ? 8 : 0;
}

/* kvq.h section 10, "Outliers": the keys' outliers of every grouped key type. KLD from F16 (kvq perplexity
 * --decode-attn; docs/quality.md, the suite with this default): SmolLM2 ctx 2048 q4 -22%, q3 -36%, q2 -31%; ctx 8192
 * q4 -38% (dPPL +0.68% -> +0.33%), q3 -48% (+2.38% -> +0.69%), q2 -33% (+7.56% -> +4.85%); Gemma 3 at 8192 q3 +3.42%
 * -> +1.43%, q4 +0.95% -> +0.65%. For +0.19 bits per element (3 bytes per key group) and 12-16% of the CPU's decode
 * attention at 32k. Values' outliers buy nothing measurable (a rotated token's channels have none left): off. */
int llama_default_outliers(kvq_type type_k) {
    const kvq_type_traits *k = kvq_type_get_traits(type_k);
    return k && k->grouped ? KVQ_ROLES_K : 0;
}

/* kvq.h section 10, "Q-Norm": KLD from F16 on SmolLM2 at ctx 2048 q4 -15%, q3 -9%, q2 -30% */
int llama_default_qnorm(kvq_type type_k, kvq_type type_v) {
    const kvq_type_traits *k = kvq_type_get_traits(type_k), *v = kvq_type_get_traits(type_v);
    return (k && k->grouped ? KVQ_ROLES_K : 0) | (v && v->grouped ? KVQ_ROLES_V : 0);
}

int llama_layer_groups(const llama_config *c, const llama_ctx_params *p, int8_t *group, int8_t *kind, kvq_type *tk,
                       kvq_type *tv) {
    int ng = 0;
    for (int l = 0; l < c->n_layers; l++) {
        int k = llama_layer_is_local(c, l), g;
        kvq_type a = k && p->local_types ? p->type_k_local : p->type_k;
        kvq_type b = k && p->local_types ? p->type_v_local : p->type_v;
        for (int i = 0; i < p->n_layer_types; i++)
            if (l >= p->layer_types[i].first && l <= p->layer_types[i].last)
                a = p->layer_types[i].type_k, b = p->layer_types[i].type_v;
        for (g = 0; g < ng; g++)
            if (kind[g] == k && tk[g] == a && tv[g] == b) break;
        if (g == ng) {
            if (ng == LLAMA_MAX_CACHES)
                return kvqm_fail(KVQ_ERR_INVALID_ARG, "layer types: more than %d groups of layers with distinct types",
                                 LLAMA_MAX_CACHES);
            kind[g] = (int8_t)k, tk[g] = a, tv[g] = b, ng++;
        }
        group[l] = (int8_t)g;
    }
    return ng;
}

kvq_cache_config llama_cache_config(const llama_config *c, const llama_ctx_params *p, int kind, kvq_type tk,
                                    kvq_type tv, int n_layers, const int32_t *model_layers) {
    kvq_cache_config cc = kvq_cache_config_default();
    cc.n_layers = n_layers;
    cc.n_kv_heads = c->n_kv_heads;
    cc.head_dim = c->head_dim;
    cc.type_k = tk;
    cc.type_v = tv;
    cc.residual = p->residual;
    cc.group = p->group;
    cc.rotate = p->rotate;
    cc.rotation_seed = p->rotation_seed;
    /* each layer's rotation is seeded with its number in the model, whichever cache holds it (llama_ctx_params
     * layer_types regroup the layers) */
    cc.rotation_layers = model_layers;
    /* a sliding window never sees token 0 once past it: sinks would be dead weight in the local layers */
    cc.sinks = kind ? 0 : p->sinks;
    cc.nonuniform = p->nonuniform;
    cc.qnorm = p->qnorm == -1 ? llama_default_qnorm(tk, tv) : p->qnorm;
    cc.outliers = p->outliers == -1 ? llama_default_outliers(tk) : p->outliers;
    cc.params8 = p->params8;
    cc.window8 = p->window8;
    return cc;
}

/* Cache g of the context: n_layers layers of kind `kind` (0 global, 1 local) with keys tk and values tv; `what` names
 * them in messages. */
static kvq_status make_cache(llama_ctx *x, const llama_ctx_params *p, int g, int kind, kvq_type tk, kvq_type tv,
                             int n_layers, const int32_t *model_layers, const char *what) {
    const llama_config *c = &x->m->cfg;
    kvq_cache_config cc = llama_cache_config(c, p, kind, tk, tv, n_layers, model_layers);
    /* the model's RoPE, for a cache that applies it: adjacent pairs for Llama (GGUF's Q/K rows are permuted for
     * them), NeoX halves for Gemma (not permuted) */
    x->prerope[g] = p->prerope == -1 ? llama_default_prerope(tk) : p->prerope;
    cc.prerope = x->prerope[g];
    cc.rope_neox = c->arch == LLAMA_ARCH_GEMMA3;
    cc.rope_theta = kind ? c->rope_theta_local : c->rope_theta;
    cc.rope_freqs = x->rope_inv_freq[kind];
    int sq = p->squat_rank == -1 ? llama_default_squat(tk) : p->squat_rank;
    const kvq_type_traits *tt = kvq_type_get_traits(tk);
    x->squat[g] = tt && tt->grouped ? sq : 0;
    cc.squat_rank = x->squat[g];
    cc.squat_lambda = p->squat_lambda;
    cc.max_seqs = 1;
    kvq_status st;
    cc.n_threads = tpool_threads(x->pool);
    /* exactly the pages n_ctx tokens need; the local layers hold only their window (llama_forward releases the
     * pages before it, kvq_seq_drop_front): the window, a batch, the page the window starts in and a page being
     * filled (P = 64, or G when larger) */
    int64_t n_tokens = p->n_ctx;
    if (kind && c->window > 0) {
        int64_t P = cc.page_tokens > 64 ? cc.page_tokens : 64;
        if (p->group > P) P = p->group;
        int64_t need = (int64_t)c->window + x->max_batch + 2 * P;
        if (need < n_tokens) n_tokens = need;
    }
    cc.arena_bytes = kvq_cache_arena_bytes_for(&cc, n_tokens);
    if (cc.arena_bytes == 0) {
        /* arena_bytes_for says only "invalid": the same config through kvq_cache_capacity_tokens fails at the same
         * check and returns its status (head dim, group, residual, type, ...) with the library's message. */
        int64_t why = kvq_cache_capacity_tokens(&cc);
        st = why < 0 ? (kvq_status)why : KVQ_ERR_INTERNAL;
        return kvqm_fail(st, "KV cache%s (keys %s, values %s, head_dim %d, %d KV heads, %d tokens): %s", what, type_str(tk),
                         type_str(tv), c->head_dim, c->n_kv_heads, p->n_ctx, kvq_last_error());
    }
    if ((st = kvq_cache_create(&cc, &x->cache[g])))
        return kvqm_fail(st, "KV cache%s of %d tokens (%zu bytes of pages): %s", what, p->n_ctx, cc.arena_bytes, kvq_last_error());
    kvq_thread_pool tp = tpool_as_kvq(x->pool);
    if ((st = kvq_cache_set_thread_pool(x->cache[g], &tp)))
        return kvqm_fail(st, "kvq_cache_set_thread_pool: %s", kvq_last_error());
    if ((st = kvq_seq_new(x->cache[g], &x->seq[g]))) return kvqm_fail(st, "kvq_seq_new: %s", kvq_last_error());
    return KVQ_OK;
}

kvq_status llama_check_layer_types(const llama_config *c, const llama_ctx_params *p) {
    if (p->n_layer_types < 0 || p->n_layer_types > LLAMA_MAX_LAYER_TYPES || (p->n_layer_types && !p->layer_types))
        return kvqm_fail(p->n_layer_types > 0 && !p->layer_types ? KVQ_ERR_NULL : KVQ_ERR_INVALID_ARG,
                         "n_layer_types %d (0..%d, with layer_types)", p->n_layer_types, LLAMA_MAX_LAYER_TYPES);
    for (int i = 0; i < p->n_layer_types; i++) {
        const llama_layer_types *r = &p->layer_types[i];
        if (r->first < 0 || r->last < r->first || r->last >= c->n_layers)
            return kvqm_fail(KVQ_ERR_INVALID_ARG, "layer types: layers %d-%d outside the model's 0-%d", r->first, r->last,
                             c->n_layers - 1);
        for (int j = 0; j < i; j++)
            if (r->first <= p->layer_types[j].last && p->layer_types[j].first <= r->last)
                return kvqm_fail(KVQ_ERR_INVALID_ARG, "layer types: layers %d-%d and %d-%d overlap", p->layer_types[j].first,
                                 p->layer_types[j].last, r->first, r->last);
    }
    return KVQ_OK;
}

kvq_status llama_ctx_create(const llama_model *m, const llama_ctx_params *p, llama_ctx **out) {
    if (!m || !p || !out) return kvqm_fail(KVQ_ERR_NULL, "llama_ctx_create: NULL argument");
    *out = NULL;
    const llama_config *c = &m->cfg;
    if (p->n_ctx < 1) return kvqm_fail(KVQ_ERR_INVALID_ARG, "context size %d must be >= 1", p->n_ctx);
    if (p->local_types != 0 && p->local_types != 1)
        return kvqm_fail(KVQ_ERR_INVALID_ARG, "local_types %d must be 0 or 1", p->local_types);
    kvq_status lt = llama_check_layer_types(c, p);
    if (lt) return lt;
    llama_ctx *x = calloc(1, sizeof *x);
    if (!x) return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "out of memory");
    x->m = m;
    x->n_ctx = p->n_ctx;
    x->max_batch = p->max_batch > 0 ? p->max_batch : 256;
    x->decode_attn = p->decode_attn != 0;
    x->exact_batch = p->exact_batch != 0;
    kvq_status st = KVQ_OK;
    if (p->n_threads < 0 || p->n_threads > 1024) {
        st = kvqm_fail(KVQ_ERR_INVALID_ARG, "threads %d outside 0..1024", p->n_threads);
        goto fail;
    }
    if ((st = tpool_create(p->n_threads, -1, &x->pool))) goto fail;

    int hd = c->head_dim;
    x->layer_cache = malloc((size_t)c->n_layers * sizeof *x->layer_cache);
    x->layer_index = malloc((size_t)c->n_layers * sizeof *x->layer_index);
    x->rope_inv_freq[0] = malloc((size_t)(hd / 2) * sizeof(float));
    x->rope_inv_freq[1] = malloc((size_t)(hd / 2) * sizeof(float));
    if (!x->layer_cache || !x->layer_index || !x->rope_inv_freq[0] || !x->rope_inv_freq[1]) {
        st = kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "out of memory for activations");
        goto fail;
    }
    /* the groups: layers of one kind and the same types, in the order of their first layer */
    kvq_type gk[LLAMA_MAX_CACHES], gv[LLAMA_MAX_CACHES];
    int n_in[LLAMA_MAX_CACHES] = {0}, n_local = 0;
    int ng = llama_layer_groups(c, p, x->layer_cache, x->cache_kind, gk, gv);
    if (ng < 0) {
        st = (kvq_status)ng;
        goto fail;
    }
    x->n_caches = ng;
    for (int l = 0; l < c->n_layers; l++) {
        x->layer_index[l] = n_in[x->layer_cache[l]]++;
        n_local += x->cache_kind[x->layer_cache[l]];
    }
    for (int i = 0; i < hd / 2; i++) {
        x->rope_inv_freq[0][i] = (float)(pow((double)c->rope_theta, -2.0 * i / hd) / (double)c->rope_scale_global);
        x->rope_inv_freq[1][i] = (float)pow((double)c->rope_theta_local, -2.0 * i / hd);
    }
    for (int k = 0; k < 2; k++) {
        x->ap[k] = kvq_attn_params_default(c->n_heads);
        x->ap[k].scale = c->attn_scale;
        x->ap[k].softcap = c->attn_softcap;
    }
    x->ap[1].window = c->window;

    int32_t *members = malloc((size_t)c->n_layers * sizeof *members);
    if (!members) {
        st = kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "out of memory");
        goto fail;
    }
    for (int g = 0; g < x->n_caches && !st; g++) {
        int k = 0;
        for (int l = 0; l < c->n_layers; l++)
            if (x->layer_cache[l] == g) members[k++] = l; /* in layer_index order */
        char what[96];
        int kind = x->cache_kind[g];
        if (p->n_layer_types)
            snprintf(what, sizeof what, " (%s layers with keys %s, values %s)", kind ? "local" : "global",
                     type_str(gk[g]), type_str(gv[g]));
        else
            snprintf(what, sizeof what, "%s", n_local ? (kind ? " (local layers)" : " (global layers)") : "");
        st = make_cache(x, p, g, kind, gk[g], gv[g], n_in[g], members, what);
    }
    free(members);
    if (st) goto fail;
    size_t B = (size_t)x->max_batch, kv_dim = (size_t)c->n_kv_heads * (size_t)hd, qd = (size_t)c->q_dim;
    x->x = malloc(B * (size_t)c->dim * sizeof(float));
    x->h = malloc(B * (size_t)c->dim * sizeof(float));
    x->q = malloc(B * qd * sizeof(float));
    x->o = malloc(B * qd * sizeof(float));
    x->k = malloc(B * kv_dim * sizeof(float));
    x->v = malloc(B * kv_dim * sizeof(float));
    x->g = malloc(B * (size_t)c->hidden_dim * sizeof(float));
    x->u = malloc(B * (size_t)c->hidden_dim * sizeof(float));
    int nthr = tpool_threads(x->pool);
    x->work_buf = malloc(qmat_work_bytes(x->max_batch, max_cols(c), nthr));
    if (x->work_buf) qmat_work_init(&x->work, x->work_buf, x->max_batch, max_cols(c), nthr);
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
    for (int g = 0; g < c->n_caches; g++) kvq_cache_free(c->cache[g]);
    free(c->rope_inv_freq[0]), free(c->rope_inv_freq[1]);
    free(c->layer_cache), free(c->layer_index);
    free(c->x), free(c->h), free(c->q), free(c->o), free(c->k), free(c->v), free(c->g), free(c->u);
    free(c->work_buf);
    tpool_free(c->pool);
    free(c);
}

kvq_status llama_ctx_reset(llama_ctx *c) {
    for (int k = 0; k < c->n_caches; k++) {
        kvq_status st = kvq_seq_free(c->cache[k], c->seq[k]);
        if (!st) st = kvq_seq_new(c->cache[k], &c->seq[k]);
        if (st) return kvqm_fail(st, "reset: %s", kvq_last_error());
    }
    return KVQ_OK;
}

int64_t llama_ctx_pos(const llama_ctx *c) {
    int64_t len = 0;
    kvq_seq_length(c->cache[0], c->seq[0], 0, &len);
    return len;
}

const kvq_cache *llama_ctx_layer_cache(const llama_ctx *c, int l) {
    return c && l >= 0 && l < c->m->cfg.n_layers ? c->cache[c->layer_cache[l]] : NULL;
}

kvq_status llama_ctx_get_stats(const llama_ctx *c, kvq_cache_stats *s) {
    if (!c || !s) return kvqm_fail(KVQ_ERR_NULL, "llama_ctx_get_stats: NULL argument");
    kvq_status st = kvq_cache_get_stats(c->cache[0], s);
    if (st) return kvqm_fail(st, "cache statistics: %s", kvq_last_error());
    for (int g = 1; g < c->n_caches; g++) { /* the caches' sums: each holds its own layers */
        kvq_cache_stats t;
        if ((st = kvq_cache_get_stats(c->cache[g], &t))) return kvqm_fail(st, "cache statistics: %s", kvq_last_error());
        s->pages_total += t.pages_total;
        s->pages_free += t.pages_free;
        s->pages_shared += t.pages_shared;
        s->arena_bytes += t.arena_bytes;
        s->page_bytes_in_use += t.page_bytes_in_use;
        s->window_bytes += t.window_bytes;
        s->bytes_per_token += t.bytes_per_token;
        s->f16_bytes_per_token += t.f16_bytes_per_token;
    }
    return KVQ_OK;
}

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
    qmat_mul(W, X, n, Y, accumulate, &c->work, c->pool);
}

/* Rotates every head of x by pos * inv_freq[i]: adjacent pairs (x[2i], x[2i+1]), or NeoX halves (x[i], x[i+hd/2]). */
static void rope(float *x, int n_heads, int hd, int64_t pos, const float *inv_freq, int neox) {
    for (int i = 0; i < hd / 2; i++) {
        double a = (double)pos * inv_freq[i];
        float cs = (float)cos(a), sn = (float)sin(a);
        int i0 = neox ? i : 2 * i, i1 = neox ? i + hd / 2 : 2 * i + 1;
        for (int h = 0; h < n_heads; h++) {
            float *p = x + (size_t)h * hd;
            float x0 = p[i0], x1 = p[i1];
            p[i0] = x0 * cs - x1 * sn;
            p[i1] = x0 * sn + x1 * cs;
        }
    }
}

/* GELU, tanh approximation (transformers' gelu_pytorch_tanh) */
/* SQuat keys (kvq.h section 10): the top-r eigenvectors of C = Q^T Q (D x D, the queries of one KV head's group in the
 * keys' frame) by orthogonal iteration from a fixed start, so the same queries give the same basis. 150 steps of
 * V <- orth(C V): the subspace, not each vector, is what matters, and converges as (l_{r+1} / l_r)^steps. */
static void top_subspace(const double *C, int D, int r, double *V, double *W, float *out) {
    uint64_t st = 0x5157u; /* "SQ" */
    for (int i = 0; i < D * r; i++) {
        st = st * 6364136223846793005ull + 1442695040888963407ull;
        V[i] = (double)(st >> 11) / 9007199254740992.0 - 0.5;
    }
    for (int it = 0; it <= 150; it++) {
        if (it) /* W = C V */
            for (int i = 0; i < D; i++)
                for (int j = 0; j < r; j++) {
                    double s = 0;
                    for (int k = 0; k < D; k++) s += C[(size_t)i * D + k] * V[(size_t)k * r + j];
                    W[(size_t)i * r + j] = s;
                }
        else
            memcpy(W, V, sizeof(double) * (size_t)D * r);
        for (int j = 0; j < r; j++) { /* modified Gram-Schmidt, twice */
            for (int pass = 0; pass < 2; pass++)
                for (int i = 0; i < j; i++) {
                    double d = 0;
                    for (int k = 0; k < D; k++) d += W[(size_t)k * r + j] * W[(size_t)k * r + i];
                    for (int k = 0; k < D; k++) W[(size_t)k * r + j] -= d * W[(size_t)k * r + i];
                }
            double n = 0;
            for (int k = 0; k < D; k++) n += W[(size_t)k * r + j] * W[(size_t)k * r + j];
            n = sqrt(n);
            for (int k = 0; k < D; k++) W[(size_t)k * r + j] = n > 0 ? W[(size_t)k * r + j] / n : (k == j);
        }
        memcpy(V, W, sizeof(double) * (size_t)D * r);
    }
    for (int i = 0; i < D * r; i++) out[i] = (float)V[i];
}

/* Sets layer li's key subspaces (one per KV head) from the n queries q ([n][n_heads][D], in the frame the cache stores
 * keys in). A batch with fewer than 2r query rows per KV head leaves the sequence without one (plain quantization). */
static kvq_status squat_set(llama_ctx *c, int g, int li, const float *q, int n) {
    const llama_config *cf = &c->m->cfg;
    kvq_cache *cache = c->cache[g];
    int D = cf->head_dim, r = c->squat[g], grp = cf->n_heads / cf->n_kv_heads;
    if (n * grp < 2 * r) return KVQ_OK;
    double *C = malloc(sizeof(double) * ((size_t)D * D + 2 * (size_t)D * r));
    float *B = malloc(sizeof(float) * (size_t)D * r);
    if (!C || !B) {
        free(C), free(B);
        return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "SQuat: out of memory");
    }
    kvq_status st = KVQ_OK;
    for (int h = 0; h < cf->n_kv_heads && !st; h++) {
        memset(C, 0, sizeof(double) * (size_t)D * D);
        for (int t = 0; t < n; t++)
            for (int g = 0; g < grp; g++) {
                const float *qr = q + ((size_t)t * cf->n_heads + (size_t)h * grp + g) * D;
                for (int i = 0; i < D; i++)
                    for (int j = 0; j <= i; j++) C[(size_t)i * D + j] += (double)qr[i] * qr[j];
            }
        for (int i = 0; i < D; i++)
            for (int j = 0; j < i; j++) C[(size_t)j * D + i] = C[(size_t)i * D + j];
        top_subspace(C, D, r, C + (size_t)D * D, C + (size_t)D * D + (size_t)D * r, B);
        if ((st = kvq_seq_set_key_subspace(cache, c->seq[g], li, h, B)))
            st = kvqm_fail(st, "layer %d: kvq_seq_set_key_subspace: %s", li, kvq_last_error());
    }
    free(C), free(B);
    return st;
}

static float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

kvq_status llama_forward(llama_ctx *c, const int32_t *tokens, int n, float *logits, int logits_from) {
    const llama_model *m = c->m;
    const llama_config *cf = &m->cfg;
    if (!tokens || n < 1 || n > c->max_batch)
        return kvqm_fail(KVQ_ERR_INVALID_ARG, "forward: %d tokens (1..%d per call)", n, c->max_batch);
    int dim = cf->dim, hd = cf->head_dim, kv_dim = cf->n_kv_heads * hd, hid = cf->hidden_dim, V = cf->vocab_size;
    int qd = cf->q_dim, gemma = cf->arch == LLAMA_ARCH_GEMMA3;
    int64_t pos0 = llama_ctx_pos(c);
    if (pos0 + n > c->n_ctx)
        return kvqm_fail(KVQ_ERR_CACHE_FULL, "forward: context full (%lld + %d > %d tokens)", (long long)pos0, n, c->n_ctx);
    for (int t = 0; t < n; t++)
        if (tokens[t] < 0 || tokens[t] >= V) return kvqm_fail(KVQ_ERR_INVALID_ARG, "forward: token id %d out of range", tokens[t]);
    for (int t = 0; t < n; t++) {
        float *xt = c->x + (size_t)t * dim;
        qmat_row(&m->tok_embd, tokens[t], xt);
        if (cf->embed_scale != 1.0f)
            for (int i = 0; i < dim; i++) xt[i] *= cf->embed_scale;
    }
    int32_t n_tok = n;
    for (int l = 0; l < cf->n_layers; l++) {
        const llama_layer *L = &m->layers[l];
        int g = c->layer_cache[l], kind = c->cache_kind[g], li = c->layer_index[l], pre = c->prerope[g];
        kvq_cache *cache = c->cache[g];
        rmsnorm(c->h, c->x, L->attn_norm, n, dim, cf->norm_eps);
        matmul(c, c->q, c->h, &L->wq, n, 0); /* [n][n_heads*hd] */
        matmul(c, c->k, c->h, &L->wk, n, 0); /* [n][n_kv*hd] */
        matmul(c, c->v, c->h, &L->wv, n, 0);
        if (L->q_norm) { /* Gemma: RMSNorm of every head's q and k */
            rmsnorm(c->q, c->q, L->q_norm, n * cf->n_heads, hd, cf->norm_eps);
            rmsnorm(c->k, c->k, L->k_norm, n * cf->n_kv_heads, hd, cf->norm_eps);
        }
        kvq_status st = KVQ_OK;
        /* SQuat: the first batch's queries, in the keys' frame: before RoPE for pre-RoPE keys, else after. For
         * pre-RoPE keys the queries after RoPE (which sample q_p turned by the distances p - t that reach key t) were
         * measured worse: Q2 KLD 0.0894 against 0.0819 (docs/quality.md, 2026-12-04) */
        int squat_now = c->squat[g] > 0 && pos0 == 0;
        if (squat_now && pre && (st = squat_set(c, g, li, c->q, n))) return st;
        for (int t = 0; t < n; t++) {
            rope(c->q + (size_t)t * qd, cf->n_heads, hd, pos0 + t, c->rope_inv_freq[kind], gemma);
            if (!pre) rope(c->k + (size_t)t * kv_dim, cf->n_kv_heads, hd, pos0 + t, c->rope_inv_freq[kind], gemma);
        }
        if (squat_now && !pre && (st = squat_set(c, g, li, c->q, n))) return st;
        /* a local layer: the keys before the first query's window are released, which frees the pages the append
         * needs (make_cache sized the local arena for the window) */
        if (kind && c->ap[1].window > 0 && pos0 - c->ap[1].window + 1 > 0 &&
            (st = kvq_seq_drop_front(cache, c->seq[g], li, pos0 - c->ap[1].window + 1)))
            return kvqm_fail(st, "layer %d: kvq_seq_drop_front: %s", l, kvq_last_error());
        if (n == 1 || c->decode_attn) { /* token by token, as generation runs (llama_ctx_params.decode_attn) */
            int32_t one = 1;
            for (int t = 0; t < n && !st; t++) {
                st = kvq_append(cache, li, 1, &c->seq[g], &one, KVQ_DTYPE_F32, c->k + (size_t)t * kv_dim,
                                c->v + (size_t)t * kv_dim);
                if (st) return kvqm_fail(st, "layer %d: kvq_append: %s", l, kvq_last_error());
                st = kvq_attn_decode(cache, li, 1, &c->seq[g], c->q + (size_t)t * qd, c->o + (size_t)t * qd, &c->ap[kind]);
            }
        } else if (c->exact_batch) { /* the batch's queries read its own K/V exact, then it is stored */
            st = kvq_attn_prefill_exact(cache, li, c->seq[g], n, c->q, KVQ_DTYPE_F32, c->k, c->v, c->o, &c->ap[kind]);
            if (st) return kvqm_fail(st, "layer %d: kvq_attn_prefill_exact: %s", l, kvq_last_error());
            st = kvq_append(cache, li, 1, &c->seq[g], &n_tok, KVQ_DTYPE_F32, c->k, c->v);
            if (st) return kvqm_fail(st, "layer %d: kvq_append: %s", l, kvq_last_error());
        } else {
            st = kvq_append(cache, li, 1, &c->seq[g], &n_tok, KVQ_DTYPE_F32, c->k, c->v);
            if (st) return kvqm_fail(st, "layer %d: kvq_append: %s", l, kvq_last_error());
            st = kvq_attn_prefill(cache, li, c->seq[g], n, c->q, c->o, &c->ap[kind]);
        }
        if (st) return kvqm_fail(st, "layer %d: kvq attention: %s", l, kvq_last_error());
        if (L->post_attn_norm) { /* Gemma: x += rmsnorm(o Wo^T) * post_attention_norm */
            matmul(c, c->h, c->o, &L->wo, n, 0);
            rmsnorm(c->h, c->h, L->post_attn_norm, n, dim, cf->norm_eps);
            for (size_t i = 0; i < (size_t)n * dim; i++) c->x[i] += c->h[i];
        } else {
            matmul(c, c->x, c->o, &L->wo, n, 1); /* x += o Wo^T */
        }

        rmsnorm(c->h, c->x, L->ffn_norm, n, dim, cf->norm_eps);
        matmul(c, c->g, c->h, &L->w_gate, n, 0); /* [n][hidden] */
        matmul(c, c->u, c->h, &L->w_up, n, 0);
        if (gemma)
            for (size_t i = 0; i < (size_t)n * hid; i++) c->g[i] = gelu_tanh(c->g[i]) * c->u[i]; /* GeGLU */
        else
            for (size_t i = 0; i < (size_t)n * hid; i++) {
                float g = c->g[i];
                c->g[i] = g / (1.0f + expf(-g)) * c->u[i]; /* silu(g) * u */
            }
        if (L->post_ffw_norm) { /* Gemma: x += rmsnorm(ffn) * post_ffw_norm */
            matmul(c, c->h, c->g, &L->w_down, n, 0);
            rmsnorm(c->h, c->h, L->post_ffw_norm, n, dim, cf->norm_eps);
            for (size_t i = 0; i < (size_t)n * dim; i++) c->x[i] += c->h[i];
        } else {
            matmul(c, c->x, c->g, &L->w_down, n, 1); /* x += ... Wd^T */
        }
    }
    if (!logits || logits_from >= n) return KVQ_OK;
    int first = logits_from < 0 ? 0 : logits_from, rows = n - first;
    rmsnorm(c->h, c->x + (size_t)first * dim, m->output_norm, rows, dim, cf->norm_eps);
    matmul(c, logits, c->h, &m->output, rows, 0);
    if (cf->final_softcap > 0) {
        float cap = cf->final_softcap;
        for (size_t i = 0; i < (size_t)rows * V; i++) logits[i] = cap * tanhf(logits[i] / cap);
    }
    return KVQ_OK;
}

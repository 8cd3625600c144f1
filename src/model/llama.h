/* llama.h: forward pass of a Llama-family decoder (Llama, SmolLM, ...) loaded from GGUF, with its KV cache and
 * attention in libkvq.
 *
 *   x = embed[token]                                     [n][dim]
 *   for each layer:
 *     h = rmsnorm(x) * attn_norm
 *     q = h Wq^T, k = h Wk^T, v = h Wv^T                 [n][n_heads*hd], [n][n_kv_heads*hd] x2
 *     rope(q, k)  (adjacent pairs: GGUF's Q/K rows are permuted for it)
 *     kvq_append(k, v); o = kvq_attn(q)                  [n][n_heads*hd]
 *     x += o Wo^T
 *     h = rmsnorm(x) * ffn_norm
 *     x += (silu(h Wg^T) * (h Wu^T)) Wd^T                [n][hidden] -> [n][dim]
 *   logits = (rmsnorm(x) * output_norm) Wout^T           [n][vocab]  (Wout = embed when tied)
 * Weight matrices stay in their GGUF encoding inside the mapped file (qmat.h): products run on the quantized
 * blocks for short batches and through tiles dequantized for cblas_sgemm for long ones; embedding rows are
 * dequantized on lookup. Only the norm vectors are copied (fp32). */
#ifndef KVQ_LLAMA_H
#define KVQ_LLAMA_H

#include <stddef.h>
#include <stdint.h>

#include "gguf.h"
#include "kvq.h"
#include "qmat.h"

typedef struct llama_config {
    int dim;        /* embedding_length */
    int n_layers;   /* block_count */
    int n_heads;    /* attention.head_count */
    int n_kv_heads; /* attention.head_count_kv */
    int head_dim;   /* dim / n_heads */
    int hidden_dim; /* feed_forward_length */
    int vocab_size;
    int ctx_len; /* context_length: the longest context the model was trained for */
    float rope_theta;
    float norm_eps;
} llama_config;

typedef struct llama_layer {
    float *attn_norm;           /* [dim] */
    qmat wq, wk, wv, wo;        /* [dim][dim], [kv_dim][dim], [kv_dim][dim], [dim][dim]  (out x in) */
    float *ffn_norm;            /* [dim] */
    qmat w_gate, w_up, w_down;  /* [hidden][dim], [hidden][dim], [dim][hidden] */
} llama_layer;

typedef struct llama_model {
    llama_config cfg;
    qmat tok_embd;      /* [vocab][dim] */
    float *output_norm; /* [dim] */
    qmat output;        /* [vocab][dim]; the same bytes as tok_embd when the embeddings are tied */
    llama_layer *layers;
    size_t weight_bytes; /* resident: the matrices' encoded bytes in the mapping + the fp32 norm copies */
} llama_model;

/* Reads and checks the shape from the metadata only (what `kvq capacity` needs without loading the weights). */
kvq_status llama_read_config(const gguf_file *f, llama_config *cfg);
/* Resident bytes of the weights llama_load uses: every matrix in its file encoding (its pages of the mapping), the
 * fp32 copies of the norms, a tied output counted once. */
kvq_status llama_weight_bytes(const gguf_file *f, const llama_config *cfg, size_t *bytes);
/* The model points into f's tensor data: f must stay open until llama_free. */
kvq_status llama_load(const gguf_file *f, llama_model **out);
void llama_free(llama_model *m);

/* A sequence being run: the model, its kvq cache, and scratch buffers sized for up to `max_batch` tokens per call. */
typedef struct llama_ctx llama_ctx;

typedef struct llama_ctx_params {
    int n_ctx;       /* tokens the cache must hold */
    int max_batch;   /* tokens per forward call (prefill chunk); 0: 256 */
    kvq_type type_k, type_v;
    int residual;    /* -1: kvq's default */
    int group;       /* G of the grouped types; 0: kvq's default */
    int n_threads;   /* attention and weight-product threads; 0: OpenMP's default */
    /* kvq.h section 10, passed to the cache as they are: -1 kvq's default for the types, 0 off (what a
     * zero-initialized llama_ctx_params gets) */
    int rotate, sinks, nonuniform;
    uint32_t rotation_seed;
    /* pre-RoPE keys (kvq.h section 10): 1 the cache gets keys before RoPE and the model's rope parameters, 0 after
     * RoPE (what a zero-initialized llama_ctx_params gets), -1 llama_default_prerope(type_k) */
    int prerope;
} llama_ctx_params;

/* The engine's default for llama_ctx_params.prerope = -1, by key type (kvq.h section 10 has the measurement) */
int llama_default_prerope(kvq_type type_k);

/* Fails with the cache's own reason (KVQ_ERR_UNSUPPORTED_HEAD_DIM, KVQ_ERR_INVALID_ARG for a group or residual,
 * KVQ_ERR_UNSUPPORTED_TYPE, KVQ_ERR_OUT_OF_MEMORY for the arena, ...) and a message naming it. */
kvq_status llama_ctx_create(const llama_model *m, const llama_ctx_params *p, llama_ctx **out);
/* Heap bytes of a context's activation and weight-product scratch for max_batch tokens per call (the KV cache not
 * included). */
size_t llama_ctx_scratch_bytes(const llama_config *cfg, int max_batch);
void llama_ctx_free(llama_ctx *c);
/* Drops the cached tokens (a fresh sequence). */
kvq_status llama_ctx_reset(llama_ctx *c);
int64_t llama_ctx_pos(const llama_ctx *c);
const kvq_cache *llama_ctx_cache(const llama_ctx *c);

/* Runs n tokens (n <= max_batch) at the next positions. logits: NULL, or [n - logits_from][vocab] receiving the
 * logits of tokens logits_from .. n-1 (n - 1: the last only; >= n: none, the lm head is skipped). */
kvq_status llama_forward(llama_ctx *c, const int32_t *tokens, int n, float *logits, int logits_from);

#endif

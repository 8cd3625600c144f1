/* llama.h: forward pass of a Llama-family decoder (Llama, SmolLM, ...; and Gemma 3, below) loaded from GGUF, with
 * its KV cache and attention in libkvq.
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
 *
 * Gemma 3 (general.architecture "gemma3"), the same skeleton with:
 *   x = embed[token] * sqrt(dim); head_dim = attention.key_length (256 for 270M: not dim / n_heads);
 *   q, k: an RMSNorm per head (attn_q_norm, attn_k_norm [head_dim]) before RoPE, which rotates NeoX halves
 *   (x[i], x[i + hd/2]): llama.cpp's converter does not permute Gemma's Q/K rows;
 *   x += rmsnorm(o Wo^T) * post_attention_norm;  x += rmsnorm(ffn(h)) * post_ffw_norm  (h = rmsnorm(x) * ffn_norm);
 *   ffn = (gelu_tanh(h Wg^T) * (h Wu^T)) Wd^T (GeGLU); logits soft-capped when final_logit_softcapping is given;
 *   layers alternate: every 6th layer (l % 6 == 5) is global (rope.freq_base, 1e6), the others local: sliding
 *   window attention.sliding_window (512) and RoPE base 10000 (llama.cpp's and transformers' Gemma 3 rule; the
 *   GGUF names neither the pattern nor the local base). The GGUF's norm weights are used as stored: llama.cpp's
 *   converter already added Gemma's 1 (transformers' (1 + w)), which transformers' GGUF loader subtracts again.
 *   Global and local layers have a kvq cache each (their own RoPE base for pre-RoPE keys, their own types, no
 *   sinks in the local one: the window does not see token 0).
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

enum llama_arch { LLAMA_ARCH_LLAMA = 0, LLAMA_ARCH_GEMMA3 = 1 };

typedef struct llama_config {
    int arch;       /* enum llama_arch */
    int dim;        /* embedding_length */
    int n_layers;   /* block_count */
    int n_heads;    /* attention.head_count */
    int n_kv_heads; /* attention.head_count_kv */
    int head_dim;   /* attention.key_length when given (Gemma), else dim / n_heads */
    int q_dim;      /* n_heads * head_dim */
    int hidden_dim; /* feed_forward_length */
    int vocab_size;
    int ctx_len; /* context_length: the longest context the model was trained for */
    float rope_theta;
    float norm_eps;
    /* Gemma 3 (0 for Llama) */
    int window;             /* attention.sliding_window of the local layers */
    int swa_period;         /* layer l is global iff l % swa_period == swa_period - 1; 0: every layer global */
    float rope_theta_local; /* RoPE base of the local layers */
    float rope_scale_global; /* linear RoPE scaling of the global layers (positions / factor); 1: none */
    float embed_scale;      /* embeddings * this (sqrt(dim)); 1 for Llama */
    float attn_scale;       /* of q.k: 1/sqrt(head_dim) unless the GGUF gives attention.scale */
    float final_softcap, attn_softcap; /* 0: none */
} llama_config;

/* 1 when layer l is a sliding-window (local) layer of the config. */
int llama_layer_is_local(const llama_config *c, int l);

typedef struct llama_layer {
    float *attn_norm;           /* [dim] */
    qmat wq, wk, wv, wo;        /* [dim][dim], [kv_dim][dim], [kv_dim][dim], [dim][dim]  (out x in) */
    float *ffn_norm;            /* [dim] */
    qmat w_gate, w_up, w_down;  /* [hidden][dim], [hidden][dim], [dim][hidden] */
    /* Gemma 3 only (NULL for Llama) */
    float *q_norm, *k_norm;        /* [head_dim] */
    float *post_attn_norm, *post_ffw_norm; /* [dim] */
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

/* Layers first..last (0-based, inclusive) of a context store their keys and values as type_k / type_v instead of the
 * context's types (llama_ctx_params.layer_types): mixed precision per layer, e.g. the layers most sensitive to KV
 * error at 8 bits and the rest at 2. */
typedef struct llama_layer_types {
    int first, last;
    kvq_type type_k, type_v;
} llama_layer_types;
#define LLAMA_MAX_LAYER_TYPES 64 /* ranges per context */
#define LLAMA_MAX_CACHES 8      /* distinct (layer kind, key type, value type) groups per context: one kvq cache each */

typedef struct llama_ctx_params {
    int n_ctx;       /* tokens the cache must hold */
    int max_batch;   /* tokens per forward call (prefill chunk); 0: 256 */
    kvq_type type_k, type_v;
    int residual;    /* -1: kvq's default */
    int group;       /* G of the grouped types; 0: kvq's default */
    int n_threads;   /* threads of weight products and attention (one pool, tpool.h); 0: the CPUs available */
    /* kvq.h section 10, passed to the cache as they are: -1 kvq's default for the types, 0 off (what a
     * zero-initialized llama_ctx_params gets) */
    int rotate, sinks, nonuniform;     /* sinks apply to global layers only: local (sliding-window) ones have none */
    uint32_t rotation_seed;
    /* Q-Norm of the grouped roles (kvq.h section 10, "Q-Norm"): KVQ_ROLES_*, 0 off (what a zero-initialized
     * llama_ctx_params gets), -1 llama_default_qnorm of each cache's types; the same in the GPU engine (its CUDA
     * caches write the CPU cache's bytes). */
    int qnorm;
    /* dense-and-sparse outliers of the grouped roles (kvq.h section 10, "Outliers"): KVQ_ROLES_*, 0 none (what a
     * zero-initialized llama_ctx_params gets), -1 llama_default_outliers of each cache's key type in the CPU engine and
     * none in the GPU engine (which refuses any other value). */
    int outliers;
    /* 8-bit group parameters of the grouped roles (kvq.h section 10, "8-bit parameters"): KVQ_ROLES_*, 0 and -1 none
     * (fp16 pairs); the CPU engine only (the GPU engine refuses other values). */
    int params8;
    int window8; /* 8-bit residual windows (kvq_cache_config.window8): KVQ_ROLES_*, 0 and -1 none; CPU only */
    /* pre-RoPE keys (kvq.h section 10): 1 the cache gets keys before RoPE and the model's rope parameters, 0 after
     * RoPE (what a zero-initialized llama_ctx_params gets), -1 llama_default_prerope of each cache's key type */
    int prerope;
    /* Gemma 3's local (sliding-window) layers: 0 (what a zero-initialized llama_ctx_params gets) they use type_k and
     * type_v like the global ones; 1 they use type_k_local / type_v_local. Ignored for a model without local layers. */
    int local_types;
    kvq_type type_k_local, type_v_local;
    /* SQuat keys (kvq.h section 10): the rank r of the query subspace that the first forward call of a sequence (its
     * first prefill batch) computes per layer and KV head and sets on the cache; 0 off (what a zero-initialized
     * llama_ctx_params gets), -1 llama_default_squat(type_k). Applies to caches whose key type is grouped (Q4, Q3,
     * Q2); others ignore it. The CPU engine only: the GPU engine's caches have none (the CLI resolves -1 to 0 there
     * and refuses r > 0). */
    int squat_rank;
    float squat_lambda; /* <= 0: kvq's auto rule */
    /* per-layer types: n_layer_types ranges (<= LLAMA_MAX_LAYER_TYPES, disjoint, inside the model's layers) that
     * override the types above (and a local layer's type_k_local / type_v_local); 0 / NULL: none. Layers of one kind
     * (global or local) and the same two types share a kvq cache; a context holds at most LLAMA_MAX_CACHES. Pre-RoPE
     * keys (prerope = -1) and SQuat (squat_rank = -1) follow each cache's own key type. Read by llama_ctx_create only. */
    int n_layer_types;
    const llama_layer_types *layer_types;
    /* How a forward call of n > 1 tokens attends: 0 (what a zero-initialized llama_ctx_params gets) as a prefill, all
     * n tokens appended and then all n queries attended at once; 1 as decode, token by token (append token t, attend
     * query t), the weight products still batched. The logits differ only where the cache's fp16 window matters:
     * with a grouped type a prefill flushes the batch's early tokens into pages before its early queries attend, so
     * they see them quantized, where decode keeps each query's last R tokens exact (docs/quality.md, 2026-12-05).
     * 1 scores quality as generation sees it; it costs more attention reads. */
    int decode_attn;
    /* A prefill (decode_attn 0, n > 1) with exact_batch != 0 attends before it appends (kvq_attn_prefill_exact): its
     * queries read the cache as it was before the batch (the last R tokens exact, as decode reads them) and the
     * batch's own K/V in fp16, never quantized, whatever the batch size; then the batch is appended. 0 (what a
     * zero-initialized llama_ctx_params gets) appends first and reads everything from the cache. -1: the engine's
     * default, on in the CPU engine. The GPU engine has no such prefill: it takes -1 as 0 and refuses 1. */
    int exact_batch;
} llama_ctx_params;

/* How llama_ctx_create spreads c's layers over caches for p (its types, local types and layer_types, the ranges
 * taken as valid): layer l goes to cache group[l]; group g holds layers of kind[g] (0 global, 1 local) with keys tk[g]
 * and values tv[g], numbered in the order of their first layer. Returns the number of groups, or KVQ_ERR_INVALID_ARG
 * (with a message) past LLAMA_MAX_CACHES. The arrays: n_layers and LLAMA_MAX_CACHES entries. */
int llama_layer_groups(const llama_config *c, const llama_ctx_params *p, int8_t *group, int8_t *kind, kvq_type *tk,
                       kvq_type *tv);
/* The kvq_cache_config fields both engines set alike for a cache of n_layers layers of kind `kind` (0 global, 1
 * local) with keys tk and values tv, model_layers their numbers in the model (the rotation seeds; NULL: 0..n_layers-1):
 * shape, types, residual, group, rotation, sinks (none in local layers), non-uniform levels, Q-Norm (-1:
 * llama_default_qnorm), outliers (-1: llama_default_outliers; the GPU engine sets its own). The rest (pre-RoPE,
 * SQuat, threads, sequences, arena) is each engine's. */
kvq_cache_config llama_cache_config(const llama_config *c, const llama_ctx_params *p, int kind, kvq_type tk,
                                    kvq_type tv, int n_layers, const int32_t *model_layers);
/* KVQ_OK when p's per-layer types (n_layer_types, layer_types) are valid for c: ranges inside the model, disjoint;
 * else the error, with a message. Both engines check them with this before llama_layer_groups. */
kvq_status llama_check_layer_types(const llama_config *c, const llama_ctx_params *p);

/* The engine's default for llama_ctx_params.prerope = -1, by key type (kvq.h section 10 has the measurement) */
int llama_default_prerope(kvq_type type_k);
/* The engine's default for llama_ctx_params.squat_rank = -1: 8 for Q2 keys, else 0 (kvq.h section 10) */
int llama_default_squat(kvq_type type_k);
/* The engine's default for llama_ctx_params.qnorm = -1, by types: the roles of grouped types (kvq.h section 10) */
int llama_default_qnorm(kvq_type type_k, kvq_type type_v);
/* The CPU engine's default for llama_ctx_params.outliers = -1, by key type: KVQ_ROLES_K for grouped keys (Q4, Q3,
 * Q2), else 0 (kvq.h section 10, "Outliers"). The GPU engine resolves -1 to 0 (its CUDA caches have none). */
int llama_default_outliers(kvq_type type_k);

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
/* The cache that holds layer l (layers of one kind and the same types share one), or NULL for l out of range. */
const kvq_cache *llama_ctx_layer_cache(const llama_ctx *c, int l);
/* Statistics of all the context's KV memory: kvq_cache_get_stats of each cache, the byte and page counts summed
 * (bytes_per_token and f16_bytes_per_token too: they cover all layers); tokens, n_seqs, capacity_tokens, page_bytes
 * are the global cache's. */
kvq_status llama_ctx_get_stats(const llama_ctx *c, kvq_cache_stats *s);

/* Runs n tokens (n <= max_batch) at the next positions. logits: NULL, or [n - logits_from][vocab] receiving the
 * logits of tokens logits_from .. n-1 (n - 1: the last only; >= n: none, the lm head is skipped). */
kvq_status llama_forward(llama_ctx *c, const int32_t *tokens, int n, float *logits, int logits_from);

#endif

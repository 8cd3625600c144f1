/* llama_gpu.h: the Llama forward pass of llama.h on one CUDA GPU, with the KV cache and attention in libkvq's CUDA
 * backend (kvq_cuda.h). Same semantics as llama_ctx / llama_forward: one sequence per context, n tokens per call at
 * the next positions, logits of tokens logits_from .. n-1 to the host.
 *
 *   weights   fp16 on the device, converted once at load from whatever the GGUF holds (F32, F16, BF16, Q8_0, Q4_0,
 *             Q4_1) through the CPU dequantizer gguf_tensor_to_f32, a slab of rows at a time (host memory: one
 *             64 MiB slab, never the model); F16 tensors are copied as they are. Norm weights stay fp32. Wq/Wk/Wv are
 *             stored as one [dim + 2 kv_dim][dim] matrix and gate/up as one [2 hidden][dim]: one GEMM each.
 *   matmuls   fp16 operands, fp32 accumulation and fp32 output; the residual stream x is fp32 and the attention
 *             and FFN outputs are added into it by the GEMM (beta = 1). Products of up to 8 rows (decode: one token
 *             of up to 8 sequences) run gemv_gpu.cu's kernel (gemv_gpu.h: every weight row read once for all rows),
 *             more rows (prefill) cublasGemmEx. The environment variable KVQ_GPU_GEMV, read by llama_gpu_load,
 *             changes that for measurements: "0" sends every product to cuBLAS, "U,W" picks the kernel's shape
 *             (kvqm_gemv_f16_shape: U 2/4/8 loads in flight per row, W 4/8 warps per block); anything else fails
 *             the load (KVQ_ERR_INVALID_ARG)
 *   kernels   embedding gather, RMSNorm (fp32 sums, fp16 out), RoPE on adjacent pairs (llama.c's layout: GGUF's
 *             Q/K rows are permuted for it; angles in fp64 as llama.c computes them), SwiGLU; RMSNorm a 1024-thread
 *             block per row, RoPE 8 blocks per row, SwiGLU spread over the grid (KVQ_GPU_ONEBLOCK=1 at load: one
 *             256-thread block per row for all three, the earlier shape, for measurements)
 *   attention kvq_cuda_append (fp32 K/V) then kvq_cuda_attn_decode for n == 1, kvq_cuda_attn_prefill for n > 1
 *             (q and the output in fp16: the kernels' tensor-core operands are fp16 anyway)
 *   graphs    a decode step's kernels between the kvq_cuda calls replayed as CUDA graphs (KVQ_GPU_GRAPH=0 turns
 *             it off; llama_gpu_ctx_set_graph below says what is captured and what is not)
 * All work of a model goes to one CUDA stream; forward returns after the logits are on the host.
 * Limits: architecture "llama" only; head_dim 64, 128 or 256 and <= 8 query heads per KV head (kvq_cuda.h section 4);
 * pre-RoPE keys and the non-uniform levels of q4 and q2 roles are not on the GPU (refused at context creation; q3's
 * are, the default as on the CPU). Every layer is on the GPU
 * (no partial offload). Per-layer types (llama_ctx_params.layer_types) give one kvq_cuda cache per group of layers,
 * grouped as the CPU engine groups them (llama_layer_groups), each layer's rotation seeded by its model number;
 * Q-Norm follows llama_ctx_params.qnorm as in the CPU engine (the same (scale, min) pairs; SQuat and pre-RoPE keys,
 * the CPU engine's default for q2 keys, are CPU only).
 * Built without CUDA (cmake -DKVQ_CUDA=OFF or no nvcc) every call returns KVQ_ERR_NO_DEVICE, "built without CUDA";
 * with CUDA but no usable GPU, llama_gpu_load returns KVQ_ERR_NO_DEVICE with kvq_cuda's reason. */
#ifndef KVQ_LLAMA_GPU_H
#define KVQ_LLAMA_GPU_H

#include <stddef.h>
#include <stdint.h>

#include "gguf.h"
#include "kvq.h"
#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct llama_gpu_model llama_gpu_model;
typedef struct llama_gpu_ctx llama_gpu_ctx;

/* 1 when this build has the CUDA engine. */
int llama_gpu_built(void);
/* Free and total bytes of `device` (cudaMemGetInfo). */
kvq_status llama_gpu_mem_info(int device, size_t *free_bytes, size_t *total_bytes);

/* Reads the shape (llama_read_config) and uploads the weights to `device`. */
kvq_status llama_gpu_load(const gguf_file *f, int device, llama_gpu_model **out);
void llama_gpu_free(llama_gpu_model *m);
const llama_config *llama_gpu_config(const llama_gpu_model *m);
/* Device bytes of the weights (fp16 matrices, fp32 norms). */
size_t llama_gpu_weight_bytes(const llama_gpu_model *m);

/* p as for llama_ctx_create (n_threads ignored). Errors: KVQ_ERR_INVALID_ARG (n_ctx, prerope = 1, nonuniform on a
 * q4 or q2 role), the CUDA cache's own (head dim, heads per KV head, types, group, residual; KVQ_ERR_CUDA /
 * OUT_OF_MEMORY on the device), each with a message. */
kvq_status llama_gpu_ctx_create(const llama_gpu_model *m, const llama_ctx_params *p, llama_gpu_ctx **out);
void llama_gpu_ctx_free(llama_gpu_ctx *c);
kvq_status llama_gpu_ctx_reset(llama_gpu_ctx *c);
int64_t llama_gpu_ctx_pos(const llama_gpu_ctx *c);
/* Sliding attention window of later forward calls (kvq_attn_params.window; 0: none, the default). kvq bench fills
 * long depths with it (prefill reads the cache once per query row: kvq_cuda.h). */
kvq_status llama_gpu_ctx_set_window(llama_gpu_ctx *c, int window);
/* The cache's memory in the CPU cache's terms (kvq_cache_stats): pages, resident windows, bytes per token.
 * Synchronises the stream. */
kvq_status llama_gpu_ctx_stats(const llama_gpu_ctx *c, kvq_cache_stats *st);
/* Device bytes of the context: KV cache (arena, windows, tables, workspace) + activation buffers. */
size_t llama_gpu_ctx_device_bytes(const llama_gpu_ctx *c);

/* As llama_forward (sequence 0). Synchronises (the logits are copied to the host); without logits (NULL, or
 * logits_from >= n) it returns with the work enqueued (llama_gpu_sync waits). */
kvq_status llama_gpu_forward(llama_gpu_ctx *c, const int32_t *tokens, int n, float *logits, int logits_from);

/* Several sequences at once (--parallel): a context of n_seqs (1..LLAMA_GPU_MAX_SEQS) sequences, each of up to
 * p->n_ctx tokens (the arena holds n_seqs x n_ctx). llama_gpu_ctx_create is n_seqs = 1; reset empties them all;
 * llama_gpu_ctx_pos is sequence 0's length. */
#define LLAMA_GPU_MAX_SEQS 64
kvq_status llama_gpu_ctx_create_par(const llama_gpu_model *m, const llama_ctx_params *p, int n_seqs, llama_gpu_ctx **out);
int64_t llama_gpu_ctx_seq_pos(const llama_gpu_ctx *c, int seq);
/* llama_gpu_forward on sequence `seq` (0..n_seqs-1): a prefill (or one decode token) of that sequence alone. */
kvq_status llama_gpu_forward_seq(llama_gpu_ctx *c, int seq, const int32_t *tokens, int n, float *logits, int logits_from);
/* One decode step of every sequence at once: tokens[n_seqs] (token i goes to sequence i, at its next position), one
 * GEMM of n_seqs rows per weight matrix, kvq_cuda_attn_decode over all sequences; logits NULL or [n_seqs][vocab].
 * Every sequence must have room for one more token (else KVQ_ERR_CACHE_FULL, nothing run). */
kvq_status llama_gpu_decode_batch(llama_gpu_ctx *c, const int32_t *tokens, float *logits);
kvq_status llama_gpu_sync(llama_gpu_ctx *c);

/* CUDA graphs (on by default). A forward call of n <= 8 rows (a decode step: llama_gpu_forward of one token,
 * llama_gpu_decode_batch) launches the kernels between two kvq_cuda calls (per layer: the output product, RMSNorm,
 * gate/up product, SwiGLU, down product, then the next layer's RMSNorm, QKV product and RoPE; the embedding before
 * layer 0; the final RMSNorm and logits product) as one CUDA graph each: captured from the stream the first time a
 * context runs that segment with n rows, replayed with cudaGraphLaunch after. The kvq_cuda append and attention
 * calls between them are eager launches here: their kernels take the cache's host-side state (page tables, window
 * heads, lengths) by value, different every step (whole-step graphs, below, capture them through a static plan). What a
 * graph reads (activation buffers, weights, the ids and positions copied to the device first) is fixed per context,
 * so nothing is re-captured between steps (not on reset, a window change or a new KV page). If a capture fails the
 * context goes on without graphs. The environment variable KVQ_GPU_GRAPH, read at context creation, switches it:
 * "0" every launch eager (the A/B and a safety switch), "1" graphs; anything else fails the creation
 * (KVQ_ERR_INVALID_ARG). llama_gpu_ctx_set_graph does the same for one context (off frees its graphs);
 * llama_gpu_ctx_graphs counts the graphs it holds. Results are the same either way (the same kernels, arguments
 * and order). */
kvq_status llama_gpu_ctx_set_graph(llama_gpu_ctx *c, int on);
int llama_gpu_ctx_graphs(const llama_gpu_ctx *c);
/* Whole decode steps in one graph (opt-in, with graphs on): a decode step (llama_gpu_decode_batch, or
 * llama_gpu_forward of one token in a context of one sequence) lends its sequences to a kvq_cuda static plan
 * (kvq_cuda.h section 5: the cache's bookkeeping on the device, pages reserved up to n_ctx) and replays ONE graph
 * per step: every segment above and, between them, the append and attention of every layer. The graph is captured
 * at the first step of a plan; a prefill, reset, window change or llama_gpu_ctx_stats ends the plan (the next decode
 * step makes a new one and captures again). If the plan or the capture is not possible the context goes on with the
 * segment graphs above. Results are the same bits either way (test_model_gpu).
 * Off by default: measured on the H200 (Llama-3-8B shape, kvq bench --gpu, same machine session, docs/bench-e2e-gpu.md)
 * it is no faster, since the engine's step is already bound by the GPU: depth 0 f16 5.02 vs 5.02 ms/step, q4 5.25 vs
 * 5.25; batch 8 at 32k q4 8.57-8.76 vs 8.60, q2 8.37-8.38 vs 8.05 (the decode kernel reading its arguments from
 * device memory; the plan's own kernel per layer). What it is for: callers whose host time per step is large
 * (Python frameworks: kvq.hf). KVQ_GPU_STATIC=1 (read at context creation) or llama_gpu_ctx_set_static(c, 1) turns it
 * on; "0" or unset leaves it off; anything else fails the creation (KVQ_ERR_INVALID_ARG).
 * llama_gpu_ctx_step_graphs counts the whole-step graphs held (0..2: with and without logits). */
kvq_status llama_gpu_ctx_set_static(llama_gpu_ctx *c, int on);
int llama_gpu_ctx_step_graphs(const llama_gpu_ctx *c);

#ifdef __cplusplus
}
#endif
#endif

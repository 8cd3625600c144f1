/*
 * kvq_cuda.h: the CUDA backend of libkvq. A device-resident paged KV cache with the SAME page byte layout as the
 * CPU cache (kvq.h section 5), quantize-on-append kernels, and attention kernels that read the quantized bytes
 * directly (decode: split over the sequence length and combined; prefill: causal over the cache).
 *
 * This header is the manual; read kvq.h first (types, page layout, residual window, attention semantics).
 *
 * ---------------------------------------------------------------------------------------------------------
 * 1. Memory and ownership
 * ---------------------------------------------------------------------------------------------------------
 * - kvq_cuda_cache_create allocates, with plain cudaMalloc on the chosen device (no managed memory): the page
 *   arena (arena_bytes), the residual windows of max_seqs x n_layers (sequence, layer) pairs (fp16 ring buffers
 *   of R + G rows), a page table of max_seq_tokens / 64 entries per pair, and a workspace for split attention
 *   (grown on demand with the stream-ordered allocator cudaMallocAsync). kvq_cuda_cache_free releases all of it
 *   (cudaFree: it waits for the device). Sizes: kvq_cuda_cache_get_stats.
 * - Bookkeeping (free pages, page lists, lengths) lives on the host, like the CPU cache (sequences lent to a static
 *   plan, section 5, keep theirs on the device meanwhile). Page-table updates reach
 *   the device inside the append kernels' parameters: no host-to-device copy, no pinned staging.
 * - Device pointers passed in (K, V, queries, outputs) are borrowed for the duration of the work enqueued.
 *
 * 2. Streams and synchronisation
 * - Every call that enqueues device work takes a stream (cudaStream_t; NULL = the legacy default stream) and
 *   returns as soon as the work is enqueued: no hidden synchronisation. Exceptions, documented per call:
 *   cache_create/cache_free, and the test helper kvq_cuda_seq_read, which synchronise.
 * - Host bookkeeping changes when a call returns, device contents when the stream reaches the work. Calls on one
 *   cache must be ordered: issue them to one stream (or order streams with events yourself). Attention calls of
 *   one cache share its workspace, so two of them must never run concurrently.
 * - kvq_cuda_seq_free and kvq_cuda_seq_truncate return pages to the free list at once; a later append may reuse
 *   them, which is safe when that append is ordered after the work that still reads them (same stream).
 * - Debugging: with the environment variable KVQ_CUDA_DEBUG set, the attention calls synchronise after each of
 *   their kernels and name the one that failed on stderr (a fault is otherwise reported by a later call).
 * - A/B switches of the decode kernel, read by kvq_cuda_cache_create (any value but "" and "0"): KVQ_CUDA_SPLIT_ROT=1
 *   un-rotates rotated values' outputs in a kernel of its own after the decode kernel instead of where the decode
 *   kernel stores them (the same bits); KVQ_CUDA_WIN_LAST=1 reads a pair's fp16 window and sink rows after its pages
 *   instead of before them (the same result up to fp32 summation order); KVQ_CUDA_WIN_WEIGHT=N (1 .. 64) counts each
 *   fp16 window or sink unit of a pair as N pages when a decode call splits the units over CTAs (default, per call:
 *   round(1.25 SMs / (row, KV head) pairs), at most the call's pages per SM, within [10, 20]: 20 for batch 1 of a
 *   long context, 10 once there are many pairs or few pages; 1: as one page, the split before 2026-12-06 and
 *   prefill's; another split: the same result up to fp32 summation order); KVQ_CUDA_ROW_TOKENS=N (1 .. 8) packs at
 *   most N query tokens of a sequence into one entry of a prefill or multi-token decode (default 8, within the 8 MMA
 *   columns; 1: one read of the cache per query row, as before 2026-12-06).
 *   KVQ_CUDA_PREFILL_TILES, read by every kvq_cuda_attn_prefill call: 0 sends every prefill through the decode
 *   kernel's entries, any other value through the tiled kernel (default: the tiled one from 64 query rows per KV head);
 *   docs/bench-cuda.md has their timings.
 * - A kvq_cuda_cache is not internally locked: every call that takes `kvq_cuda_cache *` needs exclusive access to
 *   the cache on the host (the const calls may run concurrently with each other).
 *
 * 3. Errors
 * - Every call validates its arguments first and returns a negative kvq_status (kvq.h) without changing the cache
 *   on error; the message is readable with kvq_last_error() (or its alias kvq_cuda_last_error(); thread-local).
 *   A failing CUDA runtime call gives KVQ_ERR_CUDA with the CUDA error string; a machine without a usable GPU
 *   gives KVQ_ERR_NO_DEVICE.
 * - Asynchronous kernel faults surface at the next synchronising CUDA call, as usual in CUDA.
 * - Unlike kvq_append, K/V are NOT checked for NaN/Inf/|x| > 65504 (that would need a synchronisation): the
 *   caller guarantees finite values in the fp16 range (for rotated roles, kvq.h section 10: rotated values too);
 *   otherwise the results are undefined.
 *
 * 4. Limits of this version
 * - page_tokens 64; group 64 for caches with a grouped type; head_dim 64, 128 or 256; at most 8 query heads per KV
 *   head. Other configurations return KVQ_ERR_INVALID_ARG / KVQ_ERR_UNSUPPORTED_HEAD_DIM at create (or attention)
 *   time. Every (type_k, type_v) pair of the seven types works, as in the CPU cache (e.g. Q8 keys with Q4 values);
 *   when either type is grouped, both roles flush in whole groups through the fp16 window.
 * - Pages are reference counted like the CPU cache's: kvq_cuda_seq_fork shares the parent's pages and an append
 *   that writes into a shared, partly filled page first copies it (copy on write, kvq.h section 1).
 * - Quality mechanisms (kvq.h section 10): rotate (any role set, any rotation_seed) and sinks (0 .. SR, SR =
 *   page_bytes / (4 H D): the sinks of a (sequence, layer) live in one sink page; SR >= 10 for every layout here),
 *   -1 resolving to the CPU core's defaults (Q8: keys rotated; Q4, Q3, Q2: keys and values rotated, 1 sink, and Q3's
 *   non-uniform levels; Q4 keys with Q2 values: values rotated, 1 sink; F16/BF16/FP8: none). Pages, windows and sink
 *   rows are byte-identical to the CPU cache's (kvq_cuda_seq_read, kvq_cuda_seq_read_sinks). nonuniform: Q3 roles
 *   (uniform or non-uniform levels; -1: non-uniform, the CPU's default); a Q4 or Q2 role with non-uniform levels is
 *   KVQ_ERR_INVALID_ARG (they are the CPU's only). squat_rank: 0 only (SQuat keys quantize on the CPU;
 *   KVQ_ERR_INVALID_ARG). Rotated caches: append rotates K/V (a small kernel into fp32 scratch, grown
 *   on demand with cudaMallocAsync on the call's stream: KVQ_ERR_OUT_OF_MEMORY when that fails, nothing changed) before
 *   the window and the quantizers; the decode/prefill kernel rotates each query as it loads it (per CTA and
 *   (row, KV head) pair: O(D log D) next to the pair's pages) and a small kernel un-rotates each output row once
 *   after the split merge (fp32 scratch, grown likewise).
 * - GPUs (issue 19): compute capability 8.0 or later with code in the build. The decode/prefill kernel has two
 *   pipelines over the same arithmetic (fp16/bf16 tensor-core MMAs, fp32 accumulation):
 *     Hopper   (sm_90: H100/H200): a producer warp streams pages into shared memory with the bulk copy engine
 *              (cp.async.bulk, completion on mbarriers); 200 KB ring.
 *     portable (sm_80 and later: A100 sm_80, RTX 30xx/A10 sm_86, L4/RTX 40xx sm_89, Blackwell sm_100/sm_120):
 *              the producer warp's 32 lanes copy 16 bytes each with cp.async and signal with
 *              cp.async.mbarrier.arrive; 72 KB ring (fits the 99 KB of shared memory of sm_86/sm_89/sm_120).
 *   A 9.x GPU running the build's sm_90a code gets the Hopper kernel; every other GPU gets the portable one.
 *   KVQ_CUDA_PORTABLE=1 (any value but "" and "0"), read by kvq_cuda_cache_create, gives the cache the portable
 *   kernel on an H100/H200 too (to test and time it there; docs/bench-cuda.md). The append kernels are plain CUDA.
 * - Which GPUs a build serves is its -gencode list (src/cuda/CMakeLists.txt): by default sm_90a + sm_80 cubins
 *   (sm_80's also loads on sm_86 and sm_89) + compute_80 PTX, which the driver JIT-compiles for other GPUs (Blackwell:
 *   minutes on first use, then cached by the driver); -DKVQ_CUDA_FAT=ON builds sm_80, sm_86, sm_89, sm_90a, sm_100
 *   cubins + compute_80 PTX (1.8x the default's compile time); -DKVQ_CUDA_GENCODE="..." sets any list. A GPU below
 *   8.0, or one the build has no code for (e.g. an A100 with a build of sm_90a only), is refused by kvq_cuda_cache_create and kvq_cuda_device_count with KVQ_ERR_NO_DEVICE and a
 *   message naming the device, its compute capability and the archs of the build; a decode launch that finds no
 *   kernel image returns KVQ_ERR_NO_DEVICE too. Never a wrong result.
 *
 * ---------------------------------------------------------------------------------------------------------
 * 5. Static plans: decode steps a CUDA graph can capture (issues 21, 23)
 * ---------------------------------------------------------------------------------------------------------
 * kvq_cuda_decode_step passes the page tables, window heads and lengths of the host's bookkeeping to its kernels by
 * value and picks pages from the host's free list, so a captured graph would replay the first step's arguments. A
 * static plan (like transformers' StaticCache: a fixed batch and a maximum length) lends n_seqs sequences to the
 * device instead:
 * - kvq_cuda_static_create reserves, for every lent (sequence, layer), the pages up to max_tokens (and a sink page,
 *   private copies of shared pages it will write), writes their page-table entries, and moves the lengths and window
 *   heads into device memory. It allocates, once, everything the steps need (argument blocks, the attention
 *   workspace, the rotation scratch) and synchronises `stream`.
 * - kvq_cuda_static_step(plan, layer, k, v, q, out, stream) is kvq_cuda_decode_step for the plan's sequences, in plan
 *   order: one token per sequence appended (k, v: DEVICE [n_seqs][n_kv_heads][head_dim] of kv_dtype), then decode
 *   attention (q, out: DEVICE [n_seqs][n_q_heads][head_dim] of qo_dtype). It enqueues a fixed sequence of kernels of
 *   fixed grids whose parameters are the call's pointers and the plan's: a small kernel reads the device state,
 *   writes the other kernels' arguments into device memory and advances the state, so the host does no bookkeeping,
 *   allocates nothing and never synchronises. Capture the steps of every layer in a graph
 *   (cudaStreamBeginCapture ... cudaGraphLaunch) and each replay appends and attends at the right positions. The
 *   results are the bits of kvq_cuda_decode_step on the same sequences (same kernels, same arguments, same split).
 * - A sequence at max_tokens in a layer keeps it: the step drops that token there (attention still runs over what
 *   is stored) and kvq_cuda_static_end reports KVQ_ERR_CACHE_FULL.
 * - kvq_cuda_static_lengths reads the lengths back (synchronises); kvq_cuda_static_end (synchronises) copies the
 *   state back to the host, returns the unused reservation to the free list and gives the sequences back.
 * - While lent, every other call naming one of the plan's sequences (append, attention, fork, truncate, free,
 *   length, read) fails with KVQ_ERR_INVALID_ARG; other sequences of the cache work as usual (the plan has its own
 *   workspace and pages). One plan per cache at a time. kvq_cuda_cache_free ends a live plan (the plan pointer is
 *   invalid afterwards). n_seqs <= 32.
 */
#ifndef KVQ_CUDA_H
#define KVQ_CUDA_H

#include "kvq.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Same type as cudaStream_t, without including the CUDA headers. */
typedef struct CUstream_st *kvq_cuda_stream;

/* Message of the last failing kvq_cuda_* call on this thread ("" if none). */
KVQ_API const char *kvq_cuda_last_error(void);

/* KVQ_OK and the number of usable devices (compute capability >= 8.0 with code in this build, section 4) in *n, or
 * KVQ_ERR_NO_DEVICE with the reason (device 0's name, compute capability and the build's archs). */
KVQ_API kvq_status kvq_cuda_device_count(int *n);

typedef struct kvq_cuda_cache kvq_cuda_cache;

/* Creates a device cache on `device` with the geometry of `cfg` (kvq.h section 6; n_threads is ignored).
 * max_seq_tokens: tokens one (sequence, layer) may hold in pages (sizes the device page table); 0 means the
 * arena's capacity per layer. Synchronises the device (cudaMalloc). The arena and windows are zeroed. */
KVQ_API kvq_status kvq_cuda_cache_create(const kvq_cache_config *cfg, int device, int64_t max_seq_tokens,
                                         kvq_cuda_cache **out);
KVQ_API void kvq_cuda_cache_free(kvq_cuda_cache *cache);
KVQ_API kvq_status kvq_cuda_cache_get_config(const kvq_cuda_cache *cache, kvq_cache_config *cfg,
                                             kvq_page_layout *layout);

typedef struct kvq_cuda_stats {
    int64_t pages_total, pages_free;
    size_t page_bytes;
    size_t arena_bytes;     /* device bytes of the page arena */
    size_t window_bytes;    /* device bytes of all residual windows (K and V) */
    size_t table_bytes;     /* device bytes of the page tables */
    size_t workspace_bytes; /* device bytes of the attention workspace and the rotation's scratch right now */
    int n_seqs;
    int64_t pages_shared;   /* pages referenced by more than one (sequence, layer) (after a fork) */
} kvq_cuda_stats;
KVQ_API kvq_status kvq_cuda_cache_get_stats(const kvq_cuda_cache *cache, kvq_cuda_stats *st);

/* Sequences. new, free and length are host bookkeeping only, no device work. Ids as in kvq.h section 7 (the
 * smallest free slot). seq_free drops the sequence's page references; pages nobody else references return to the
 * free list at once (section 2). */
KVQ_API kvq_status kvq_cuda_seq_new(kvq_cuda_cache *cache, int32_t *seq_out);
KVQ_API kvq_status kvq_cuda_seq_free(kvq_cuda_cache *cache, int32_t seq);
KVQ_API kvq_status kvq_cuda_seq_length(const kvq_cuda_cache *cache, int32_t seq, int layer, int64_t *len);

/* New sequence with the same content as `src` in every layer, as kvq_seq_fork: the pages are shared (reference
 * counts, no page is copied or allocated here; an append into a shared, partly filled last page copies that page
 * first, on the append's stream), the residual windows are copied. Enqueues device-to-device copies of src's window
 * rows and page tables on `stream` (cudaMemcpy2DAsync, no synchronisation); the child may be used by work ordered
 * after them. Errors (nothing changes): KVQ_ERR_NULL (cache or seq_out), KVQ_ERR_NO_SEQ (src not live),
 * KVQ_ERR_TOO_MANY_SEQS (max_seqs live), KVQ_ERR_OUT_OF_MEMORY (host), KVQ_ERR_CUDA (a copy could not be
 * enqueued). Needs exclusive access to the cache. */
KVQ_API kvq_status kvq_cuda_seq_fork(kvq_cuda_cache *cache, int32_t src, int32_t *seq_out, kvq_cuda_stream stream);

/* Keeps the first n_tokens tokens of `seq` in every layer (layers already shorter are left alone), as
 * kvq_seq_truncate: a cut inside the residual window only shortens the window; a cut inside the pages keeps the
 * whole flush units (G tokens for grouped types, 1 token otherwise) before it, moves the surviving tokens of the cut
 * unit back into the window, dequantized (fp16 of the dequantized value: as accurate as they were, not restored),
 * drops the later tokens and the window, and releases the pages past the new end (shared pages: one reference).
 * A partly filled last page that stays shared is copied by the next append that writes into it.
 * With sinks (kvq.h section 10) the cut counts them as kvq_seq_truncate does: a cut inside the sinks keeps the sinks
 * before it and drops everything after them (the sink page goes back at 0 tokens).
 * Device work: only for a cut inside the pages of a grouped (Q4/Q2) cache, one kernel on `stream` that
 * dequantizes the cut unit's tokens into the window (no synchronisation); otherwise host bookkeeping only.
 * n_tokens >= every layer's length is a no-op. Errors (nothing changes): KVQ_ERR_NULL, KVQ_ERR_NO_SEQ,
 * KVQ_ERR_RANGE (n_tokens < 0), KVQ_ERR_CUDA (the kernel could not be launched). Needs exclusive access. */
KVQ_API kvq_status kvq_cuda_seq_truncate(kvq_cuda_cache *cache, int32_t seq, int64_t n_tokens,
                                         kvq_cuda_stream stream);

/* Appends n_tokens[i] tokens to sequence seq_ids[i] of `layer` (distinct ids), exactly as kvq_append does
 * (same quantization, same residual-window flushes, byte-identical pages). k, v: DEVICE arrays
 * [sum n_tokens][n_kv_heads][head_dim] of dtype (F32, F16 or BF16). Enqueued on `stream`. All or nothing:
 * page availability and limits are checked before anything is enqueued. A flush into a partly filled last page
 * that is shared (after kvq_cuda_seq_fork) first copies it to a fresh page (cudaMemcpyAsync device to device on
 * `stream`); those pages are counted like kvq_append counts them (one per such sequence) in the check. */
KVQ_API kvq_status kvq_cuda_append(kvq_cuda_cache *cache, int layer, int n_seqs, const int32_t *seq_ids,
                                   const int32_t *n_tokens, kvq_dtype dtype, const void *k, const void *v,
                                   kvq_cuda_stream stream);

/* Decode attention, semantics of kvq_attn_decode (kvq.h section 9). q, out: DEVICE arrays
 * [n_seqs][n_q_heads][head_dim] of qo_dtype (F32, F16 or BF16). Enqueued on `stream`. Precision: the products run
 * on tensor cores with fp16 operands (bf16 for BF16 pages, so the query and the softmax weights are rounded to bf16
 * there), fp32 accumulation and softmax; against the CPU core's fp32 reference the NMSE is ~1e-7 for F16 and Q8
 * pages, ~5e-6 for BF16. Repeated calls on the same cache give identical bits. */
KVQ_API kvq_status kvq_cuda_attn_decode(kvq_cuda_cache *cache, int layer, int n_seqs, const int32_t *seq_ids,
                                        kvq_dtype qo_dtype, const void *q, void *out, const kvq_attn_params *p,
                                        kvq_cuda_stream stream);

/* One decode step of one layer in one call: kvq_cuda_append of ONE token to each of the n_seqs sequences (k, v:
 * DEVICE [n_seqs][n_kv_heads][head_dim] of kv_dtype), then kvq_cuda_attn_decode of the same sequences (q, out:
 * DEVICE [n_seqs][n_q_heads][head_dim] of qo_dtype), both enqueued on `stream`, with the bits of those two calls.
 * It exists for host time: a framework's decode loop (kvq.hf) makes one call per layer and step instead of two,
 * and the arguments are validated once.
 * Everything that can be refused is checked before anything changes: the layer, params, dtypes and pointers, the
 * sequences (live, distinct), room in the page table and the free list, and the device memory of both halves (the
 * rotation's scratch, the attention workspace, reserved for the call's size up front): an error leaves the cache as
 * it was (KVQ_ERR_NULL, KVQ_ERR_INVALID_ARG, KVQ_ERR_SHAPE, KVQ_ERR_NO_SEQ, KVQ_ERR_CACHE_FULL,
 * KVQ_ERR_OUT_OF_MEMORY). The one exception is a kernel launch failing after the append was enqueued (KVQ_ERR_CUDA:
 * the device context is broken, as after any failed launch); the token is then stored. */
KVQ_API kvq_status kvq_cuda_decode_step(kvq_cuda_cache *cache, int layer, int n_seqs, const int32_t *seq_ids,
                                        kvq_dtype kv_dtype, const void *k, const void *v, kvq_dtype qo_dtype,
                                        const void *q, void *out, const kvq_attn_params *p, kvq_cuda_stream stream);

/* Static plans (section 5). create: n_seqs live, distinct, not lent sequences (1..32), each holding at most
 * max_tokens tokens in every layer; p, kv_dtype and qo_dtype fixed for the plan's steps. Errors (nothing changes):
 * KVQ_ERR_NULL, KVQ_ERR_INVALID_ARG (a plan exists already, bad n_seqs/dtype/params, a sequence twice or lent),
 * KVQ_ERR_NO_SEQ, KVQ_ERR_RANGE (max_tokens < 1 or below a sequence's length), KVQ_ERR_CACHE_FULL (not enough free
 * pages, or max_tokens beyond the page table), KVQ_ERR_OUT_OF_MEMORY, KVQ_ERR_CUDA. */
typedef struct kvq_cuda_static kvq_cuda_static;
KVQ_API kvq_status kvq_cuda_static_create(kvq_cuda_cache *cache, int n_seqs, const int32_t *seq_ids, int64_t max_tokens,
                                          const kvq_attn_params *p, kvq_dtype kv_dtype, kvq_dtype qo_dtype,
                                          kvq_cuda_stream stream, kvq_cuda_static **out);
/* Enqueues one decode step of `layer` for every sequence of the plan (section 5); may be captured in a CUDA graph.
 * Errors: KVQ_ERR_NULL, KVQ_ERR_SHAPE (layer), KVQ_ERR_CUDA (a launch failed). */
KVQ_API kvq_status kvq_cuda_static_step(kvq_cuda_static *plan, int layer, const void *k, const void *v, const void *q,
                                        void *out, kvq_cuda_stream stream);
/* The plan's sequences' lengths in `layer` (tokens, sinks included) into len[n_seqs], in plan order. Synchronises. */
KVQ_API kvq_status kvq_cuda_static_lengths(kvq_cuda_static *plan, int layer, int64_t *len, kvq_cuda_stream stream);
/* Ends the plan (NULL: no-op): the state back to the host, the unused pages back to the free list, the sequences
 * usable again; the plan is freed whatever the result. Synchronises. KVQ_ERR_CACHE_FULL: a step dropped a token
 * (max_tokens reached); KVQ_ERR_CUDA: the device state could not be read (the sequences are as they were lent). */
KVQ_API kvq_status kvq_cuda_static_end(kvq_cuda_static *plan, kvq_cuda_stream stream);

/* Chunked causal prefill, semantics of kvq_attn_prefill: the n_q queries are the last n_q tokens of the sequence
 * (append them first). q, out: DEVICE [n_q][n_q_heads][head_dim] of qo_dtype. Enqueued on `stream`.
 * Where n_q x (n_q_heads / n_kv_heads) >= 64 (KVQ_CUDA_PREFILL_TILES, section 2, overrides), a tiled kernel
 * (FlashAttention-2 style, src/cuda/prefill.cu) takes 128 (token, query head) rows of one KV head per CTA (64 at
 * head_dim 256), copies each 64-token page (or fp16 window/sink rows) into shared memory while the previous one is
 * multiplied, dequantizes it there once for all of them and runs S = Q K^T, the online softmax and O += P V on
 * tensor cores; where its query tiles are too few to fill the GPU (short chunks after a long context) the positions
 * are split too and the partials merged, in the decode workspace. Smaller calls go through the decode kernel: its 8 MMA columns take max(1, 8 / (n_q_heads /
 * n_kv_heads)) query tokens at once, so the cache is read n_q / that many times (with p->window > 0 once per row).
 * docs/bench-cuda.md has both kernels' speed against torch SDPA's flash prefill. */
KVQ_API kvq_status kvq_cuda_attn_prefill(kvq_cuda_cache *cache, int layer, int32_t seq, int n_q, kvq_dtype qo_dtype,
                                         const void *q, void *out, const kvq_attn_params *p,
                                         kvq_cuda_stream stream);

/* Multi-token decode (the verify step of speculative decoding, parallel sampling): the last n_q >= 1 tokens of each
 * of the n_seqs sequences (distinct or not; append them first) are queries, causal among themselves: for every
 * sequence the semantics of kvq_attn_prefill with n_q rows, in one launch over all of them. q, out: DEVICE
 * [n_seqs][n_q][n_q_heads][head_dim] of qo_dtype. Up to 8 / (n_q_heads / n_kv_heads) tokens of a sequence share
 * one read of its pages (kvq_cuda_attn_prefill above; p->window > 0: one read per token): n_q = 2 costs Llama-3-8B's
 * shape about one decode step, not two. Enqueued on `stream`.
 * Errors (nothing enqueued): KVQ_ERR_NULL, KVQ_ERR_SHAPE (layer), KVQ_ERR_INVALID_ARG (n_q < 1, n_seqs < 0, the
 * params, a dtype), KVQ_ERR_NO_SEQ, KVQ_ERR_RANGE (a sequence shorter than n_q), KVQ_ERR_OUT_OF_MEMORY /
 * KVQ_ERR_CUDA (workspace, launch). */
KVQ_API kvq_status kvq_cuda_attn_decode_multi(kvq_cuda_cache *cache, int layer, int n_seqs, const int32_t *seq_ids,
                                              int n_q, kvq_dtype qo_dtype, const void *q, void *out,
                                              const kvq_attn_params *p, kvq_cuda_stream stream);

/* Bytes of KV data (pages and window rows) a decode of these sequences reads, for bandwidth figures. */
KVQ_API kvq_status kvq_cuda_attn_decode_bytes(const kvq_cuda_cache *cache, int layer, int n_seqs,
                                              const int32_t *seq_ids, const kvq_attn_params *p, double *bytes);

/* Test/debug helper: copies (sequence, layer)'s pages, in token order, into host `pages`
 * (n_pages * page_bytes bytes; n_pages = ceil(paged_tokens / 64)) and its window, oldest token first, into host
 * window_k / window_v ([window_tokens][H][D] fp16); any pointer may be NULL. The counts go to the out-pointers
 * (may be NULL). Synchronises `stream`. */
KVQ_API kvq_status kvq_cuda_seq_read(const kvq_cuda_cache *cache, int32_t seq, int layer, int64_t *paged_tokens,
                                     int32_t *window_tokens, void *pages, uint16_t *window_k, uint16_t *window_v,
                                     kvq_cuda_stream stream);

/* Test/debug helper: the attention sinks of (sequence, layer) (kvq.h section 10), tokens 0 .. sink_tokens-1, into
 * host k and v ([sink_tokens][H][D] fp16, exactly the CPU cache's sink rows; either may be NULL); the count into
 * *sink_tokens (may be NULL). kvq_cuda_seq_read's pages and window hold the tokens after them. Synchronises `stream`. */
KVQ_API kvq_status kvq_cuda_seq_read_sinks(const kvq_cuda_cache *cache, int32_t seq, int layer, int32_t *sink_tokens,
                                           uint16_t *k, uint16_t *v, kvq_cuda_stream stream);

#ifdef __cplusplus
}
#endif
#endif /* KVQ_CUDA_H */

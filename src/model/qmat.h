/* qmat.h: weight matrices kept in their GGUF encoding (pointing into the mapped file) and multiplied as they are.
 *
 * A qmat is W [rows][cols] (out x in) of one ggml type, each row `row_bytes` of whole blocks. qmat_mul computes
 * Y[n][rows] = X[n][cols] W^T (or adds it to Y) two ways:
 *   - n < the crossover (decode, short batches): per output row, a dot product straight on the blocks for each
 *     token: the weights' codes are converted to fp32 in registers, multiplied with the fp32 activations and
 *     scaled once per block (d * sum(q x), plus min * sum(x) from per-32 block sums of x computed once per call).
 *     Activations stay fp32: the result equals dequantize-then-multiply up to fp32 summation order.
 *   - n >= the crossover (prefill): tiles of W dequantized to fp32 and cblas_sgemm, which wins on large batches.
 * Why fp32 activations and not llama.cpp's 8-bit activation blocks with integer dot products (vpmaddubsw): both
 * were measured on SmolLM2 (an integer Q4_1/Q8_0 path was built for the comparison, AMD EPYC, loaded machine):
 *   - CPU time of `kvq run -p <12 tokens> -n 128 -t 1`: 1.63 s integer vs 1.85 s fp32 (mean of 3; -12%, the
 *     rest of the token being attention, norms, threads); decode tok/s differed by less than the machine's noise;
 *   - perplexity, ctx 512, -b 16 (both through the dot path): F16 cache 12.819 integer vs 12.891 fp32, where
 *     transformers on the dequantized weights gives 12.8917: -0.56%, outside model_ppl's 0.3% band; the Q4 cache's
 *     KL divergence from F16 0.0060 vs 0.0018.
 * 12% of CPU did not buy moving the engine's numbers off the reference, so activations stay fp32.
 *
 * Kernels: a scalar _ref kernel per type (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K, F32, F16, BF16 directly on
 * the blocks; Q5_1, Q2_K, Q3_K through a per-block dequantize-then-dot fallback) and AVX2 / AVX-512 kernels for
 * Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K, F32, F16 and BF16. The table is chosen by the library's rule (kvq_cpu_backend():
 * KVQ_FORCE_SCALAR, KVQ_CPU_KERNELS=scalar|avx2|avx512, else the best the CPU has). Rows are split over the threads
 * of a tpool (tpool.h). */
#ifndef KVQ_QMAT_H
#define KVQ_QMAT_H

#include <stddef.h>
#include <stdint.h>

#include "gguf.h"
#include "kvq.h"
#include "tpool.h"

typedef struct qmat {
    uint32_t type; /* enum ggml_ttype */
    int rows, cols;
    size_t row_bytes;
    const uint8_t *data; /* rows x row_bytes, not owned (usually inside the GGUF mapping) */
} qmat;

/* W over `data`: KVQ_ERR_NULL, KVQ_ERR_FORMAT for a type qmat cannot multiply or cols not a multiple of its block,
 * KVQ_ERR_INVALID_ARG for rows/cols < 1. */
kvq_status qmat_init(qmat *w, uint32_t type, int rows, int cols, const uint8_t *data);
/* Bytes of the encoded matrix (rows * row_bytes). */
size_t qmat_bytes(const qmat *w);
/* out[cols] = row r of W in fp32 (an embedding lookup). */
void qmat_row(const qmat *w, int r, float *out);

/* Scratch of one qmat_mul call: per-32 block sums of the activations, and the fp32 tiles of W for the sgemm path
 * (one share per thread). qmat_work_bytes gives what max_n tokens, max_cols input columns and n_threads threads
 * need; the caller owns the memory. */
typedef struct qmat_work {
    float *xsum; /* [max_n][max_cols / 32] */
    float *tile; /* [tile_floats]: n_threads shares */
    size_t tile_floats;
    int max_n, max_cols, n_threads;
} qmat_work;
/* The W tiles dequantized at once, all threads together: 4 MiB, a whole 1536 x 576 matrix of SmolLM2 (1/4 of it
 * gave 4 alternations per matrix between OpenMP's threads and OpenBLAS's own and cost ~10% more CPU in prefill, when
 * both had threads; 16 MiB gained nothing more). */
#define QMAT_TILE_FLOATS (1 << 20)
size_t qmat_work_bytes(int max_n, int max_cols, int n_threads);
/* xsum and tile carved out of one buffer of qmat_work_bytes(max_n, max_cols, n_threads) bytes. */
void qmat_work_init(qmat_work *wk, void *buf, int max_n, int max_cols, int n_threads);

/* Y[n][rows] (= or, with accumulate, +=) X[n][cols] W^T with ldx = cols, ldy = rows, on the pool's threads (NULL:
 * the caller's alone; a pool of more threads than the work was sized for runs the sgemm path on the caller).
 * The sgemm path calls cblas_sgemm from each pool thread, so the first product on a pool of several threads sets
 * OpenBLAS to one thread for the process (openblas_set_num_threads(1)).
 * KVQ_ERR_NULL / KVQ_ERR_INVALID_ARG (n < 1, n or cols beyond the work's sizes). */
kvq_status qmat_mul(const qmat *w, const float *x, int n, float *y, int accumulate, qmat_work *wk, tpool *pool);
/* The token count from which qmat_mul takes the dequantize + sgemm path (measured; see qmat.c). */
int qmat_sgemm_min_n(void);

/* ---- kernels (exposed for tests/test_qmat.c and the bench) ---- */
/* One output: the dot product of a row of W (cols elements, whole blocks) with x[cols]; xs = per-32 block sums
 * of x (only read by types with a min or offset, and only when cols % 32 == 0). */
typedef float (*qmat_dot_fn)(int cols, const uint8_t *w, const float *x, const float *xs);
#define QMAT_NTYPES 31 /* ggml type numbers 0..30 (BF16 = 30) */
typedef struct qmat_kernels {
    const char *name; /* "scalar", "avx2", "avx512" */
    qmat_dot_fn dot[QMAT_NTYPES];
} qmat_kernels;
extern const qmat_kernels qmat_kernels_ref;
/* NULL when not built for x86-64 or the CPU lacks the instructions */
const qmat_kernels *qmat_kernels_avx2(void);
const qmat_kernels *qmat_kernels_avx512(void);
/* The table qmat_mul uses (the library's choice, kvq_cpu_backend()). */
const qmat_kernels *qmat_kernels_active(void);
/* Row-parallel small-n product with a given table (qmat_mul's dot path; tests call it with every table). */
void qmat_mul_dot(const qmat_kernels *k, const qmat *w, const float *x, int n, float *y, int accumulate, float *xsum,
                  tpool *pool);
/* The other path: row blocks of W dequantized into each thread's share of wk->tile, then cblas_sgemm per block
 * (any n <= wk->max_n). */
void qmat_mul_tiles(const qmat *w, const float *x, int n, float *y, int accumulate, qmat_work *wk, tpool *pool);

#endif

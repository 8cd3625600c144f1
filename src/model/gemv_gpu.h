/* gemv_gpu.h: the GPU engine's weight product for few rows (decode: one token of up to 8 sequences).
 *
 *   Y[n][out] (fp32)  =  X[n][in] (fp16) W^T  (+ Y when beta is 1),   W [out][in] fp16 row-major,
 *
 * X rows of `in` halves (leading dimension in), Y rows of `out` floats (leading dimension out): the layout of
 * llama_gpu.cu's gemm(), which calls this for n <= KVQM_GEMV_MAX_ROWS and cuBLAS above. Every weight row is
 * read once for all n rows: one warp takes 16 weight rows and a slice of `in`, loads 16 bytes per lane per
 * row (ld.global.nc, no L1 allocation) several loads deep, and multiplies them on the tensor cores (mma.sync
 * m16n8k16, fp32 accumulation, the n <= 8 rows of X as the 8 columns of B); the warps of a block split `in`
 * and add their partial sums in shared memory. Products of fp16 values are exact in fp32, so the result
 * differs from cuBLAS's (fp32 accumulation too) only in the order of the additions.
 *
 * Requirements (else KVQ_ERR_NULL / KVQ_ERR_INVALID_ARG with a message, nothing enqueued): Y, X, W not NULL,
 * X and W 16-byte aligned, 1 <= n <= 8, in >= 8 and a multiple of 8, out >= 1, beta 0 or 1, Y not overlapping
 * X or W. kvqm_gemv_f16_ok says whether a call would be accepted (gemm() uses it to pick cuBLAS otherwise).
 * The work is enqueued on `stream`; a launch failure returns KVQ_ERR_CUDA. */
#ifndef KVQ_GEMV_GPU_H
#define KVQ_GEMV_GPU_H

#include <cuda_runtime_api.h>

#include "kvq.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVQM_GEMV_MAX_ROWS 8

/* 1 when kvqm_gemv_f16 accepts these arguments, else 0 (no message). */
int kvqm_gemv_f16_ok(const float *Y, const void *X, const void *W, int n, int in, int out, float beta);

kvq_status kvqm_gemv_f16(float *Y, const void *X, const void *W, int n, int in, int out, float beta,
                         cudaStream_t stream);

/* The same product with a chosen kernel shape, for the microbenchmark (tests/test_gemv_gpu.c --bench): unroll
 * 16-byte loads per lane per weight row in flight (2, 4 or 8) and warps per block (4 or 8). kvqm_gemv_f16
 * uses KVQM_GEMV_UNROLL and KVQM_GEMV_WARPS. KVQ_ERR_INVALID_ARG for another unroll or warp count. */
#define KVQM_GEMV_UNROLL 2
#define KVQM_GEMV_WARPS 8
kvq_status kvqm_gemv_f16_shape(float *Y, const void *X, const void *W, int n, int in, int out, float beta,
                               cudaStream_t stream, int unroll, int warps);

#ifdef __cplusplus
}
#endif

#endif

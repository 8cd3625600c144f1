// gemv_gpu.cu: the decode weight product of few rows on the tensor cores (gemv_gpu.h is the manual).
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "gemv_gpu.h"
extern "C" {
#include "model_err.h"
}

namespace {

// 16 bytes of a weight row: read once, so it skips L1 (the rows of X, read by every warp, stay there)
__device__ __forceinline__ uint4 ld_weights(const uint4 *p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

// c (16 x 8, fp32) += A (16 x 16, fp16, row) B (16 x 8, fp16, col)
__device__ __forceinline__ void mma16816(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One block: weight rows row0 .. row0+15 (rows past `out` are read as row out-1 and not stored). Lane (g, t)
// = (lane / 4, lane % 4) holds the fragments of rows g and g+8 and of X row g (zero when g >= n). The 16
// columns of an mma's k step need not be 16 consecutive elements of `in`, only the same ones in A and B: the
// 16 bytes lane (g, t) loads at piece p (elements 8p .. 8p+7) of row g feed two mmas, elements 8p+0..3 as A's
// columns 2t, 2t+1, 2t+8, 2t+9 of the first and 8p+4..7 of the second; the lane loads the same piece of X row
// g as B's rows 2t, 2t+1, 2t+8, 2t+9 (B's column g). So every product x[k] w[k] is formed once, with both at
// one k. Pieces: lane t of a group takes p = p0 + 4u + t, u < U: a group reads 64 U contiguous bytes of each
// of its rows. Warp w starts at p0 = 4 U w and steps by 4 U NW; the NW partial 16 x 8 tiles are added in
// shared memory.
template <int U, int NW>
__global__ void __launch_bounds__(NW * 32)
    gemv_f16_kernel(float *__restrict__ Y, const __half *__restrict__ X, const __half *__restrict__ W, int n,
                    int in, int out, int accumulate) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * 16;
    const int in8 = in >> 3; // 16-byte pieces per row
    const int ra = min(row0 + g, out - 1), rb = min(row0 + g + 8, out - 1);
    const uint4 *wa = reinterpret_cast<const uint4 *>(W) + (size_t)ra * in8;
    const uint4 *wb = reinterpret_cast<const uint4 *>(W) + (size_t)rb * in8;
    // lanes of X rows g >= n read row n-1 and multiply by zero: no branch between the loads
    const uint32_t xmask = g < n ? 0xffffffffu : 0u;
    const uint4 *xr = reinterpret_cast<const uint4 *>(X) + (size_t)min(g, n - 1) * in8;
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int p0 = warp * 4 * U;
    const int step = NW * 4 * U;
    // whole steps, software-pipelined: the loads of a warp's next step are issued before the mmas of this
    // one, so 3 U 16-byte loads per lane stay in flight while the tensor cores wait on the previous ones (the
    // last step reloads its own pieces, an L2 hit, instead of branching)
    if (p0 + 4 * U <= in8) {
        uint4 va[U], vb[U], vx[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            va[u] = ld_weights(wa + p0 + 4 * u + t);
            vb[u] = ld_weights(wb + p0 + 4 * u + t);
            vx[u] = __ldg(xr + p0 + 4 * u + t);
        }
        for (;;) {
            const int pn = p0 + step;
            const bool more = pn + 4 * U <= in8;
            const int pl = more ? pn : p0;
            uint4 na[U], nb[U], nx[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                na[u] = ld_weights(wa + pl + 4 * u + t);
                nb[u] = ld_weights(wb + pl + 4 * u + t);
                nx[u] = __ldg(xr + pl + 4 * u + t);
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                const uint4 x =
                    make_uint4(vx[u].x & xmask, vx[u].y & xmask, vx[u].z & xmask, vx[u].w & xmask);
                mma16816(c, va[u].x, vb[u].x, va[u].y, vb[u].y, x.x, x.y);
                mma16816(c, va[u].z, vb[u].z, va[u].w, vb[u].w, x.z, x.w);
            }
            p0 = pn;
            if (!more) break;
#pragma unroll
            for (int u = 0; u < U; u++) va[u] = na[u], vb[u] = nb[u], vx[u] = nx[u];
        }
    }
    // the last, partial step (in8 not a multiple of 4 U): at most one per warp, pieces past the row are zero
    if (p0 < in8) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int p = p0 + 4 * u + t;
            uint4 a = make_uint4(0, 0, 0, 0), b = a, x = a;
            if (p < in8) {
                a = ld_weights(wa + p), b = ld_weights(wb + p), x = __ldg(xr + p);
                x = make_uint4(x.x & xmask, x.y & xmask, x.z & xmask, x.w & xmask);
            }
            mma16816(c, a.x, b.x, a.y, b.y, x.x, x.y);
            mma16816(c, a.z, b.z, a.w, b.w, x.z, x.w);
        }
    }
    // c[j]: row g + 8 (j >= 2), column (row of X) 2t + (j & 1)
    __shared__ float red[NW][4][32];
#pragma unroll
    for (int j = 0; j < 4; j++) red[warp][j][lane] = c[j];
    __syncthreads();
    if (threadIdx.x < 128) {
        const int j = threadIdx.x >> 5, l = threadIdx.x & 31;
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < NW; w++) s += red[w][j][l];
        const int row = row0 + (l >> 2) + (j >= 2 ? 8 : 0), col = 2 * (l & 3) + (j & 1);
        if (row < out && col < n) {
            float *y = Y + (size_t)col * out + row;
            *y = accumulate ? *y + s : s;
        }
    }
}

template <int U, int NW>
void launch(float *Y, const void *X, const void *W, int n, int in, int out, int acc, cudaStream_t st) {
    const unsigned blocks = (unsigned)((out + 15) / 16);
    gemv_f16_kernel<U, NW>
        <<<blocks, NW * 32, 0, st>>>(Y, (const __half *)X, (const __half *)W, n, in, out, acc);
}

bool overlaps(const void *a, size_t an, const void *b, size_t bn) {
    const uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return x < y + bn && y < x + an;
}

} // namespace

extern "C" int kvqm_gemv_f16_ok(const float *Y, const void *X, const void *W, int n, int in, int out,
                                float beta) {
    if (!Y || !X || !W || n < 1 || n > KVQM_GEMV_MAX_ROWS || in < 8 || in % 8 || out < 1 ||
        (beta != 0.0f && beta != 1.0f))
        return 0;
    if (((uintptr_t)X | (uintptr_t)W) & 15) return 0;
    const size_t yb = (size_t)n * (size_t)out * 4, xb = (size_t)n * (size_t)in * 2,
                 wb = (size_t)out * (size_t)in * 2;
    return !overlaps(Y, yb, X, xb) && !overlaps(Y, yb, W, wb);
}

extern "C" kvq_status kvqm_gemv_f16_shape(float *Y, const void *X, const void *W, int n, int in, int out,
                                          float beta, cudaStream_t stream, int unroll, int warps) {
    if (!Y || !X || !W) return kvqm_fail(KVQ_ERR_NULL, "kvqm_gemv_f16: NULL pointer");
    if (n < 1 || n > KVQM_GEMV_MAX_ROWS)
        return kvqm_fail(KVQ_ERR_INVALID_ARG, "kvqm_gemv_f16: %d rows (1..%d)", n, KVQM_GEMV_MAX_ROWS);
    if (in < 8 || in % 8)
        return kvqm_fail(KVQ_ERR_INVALID_ARG, "kvqm_gemv_f16: in = %d is not a positive multiple of 8", in);
    if (out < 1) return kvqm_fail(KVQ_ERR_INVALID_ARG, "kvqm_gemv_f16: out = %d (>= 1)", out);
    if (beta != 0.0f && beta != 1.0f)
        return kvqm_fail(KVQ_ERR_INVALID_ARG, "kvqm_gemv_f16: beta %g (0 or 1)", (double)beta);
    if (((uintptr_t)X | (uintptr_t)W) & 15)
        return kvqm_fail(KVQ_ERR_INVALID_ARG, "kvqm_gemv_f16: X or W not 16-byte aligned");
    if (!kvqm_gemv_f16_ok(Y, X, W, n, in, out, beta))
        return kvqm_fail(KVQ_ERR_INVALID_ARG, "kvqm_gemv_f16: Y overlaps X or W");
    const int acc = beta == 1.0f;
    if (warps == 8) {
        if (unroll == 2)
            launch<2, 8>(Y, X, W, n, in, out, acc, stream);
        else if (unroll == 4)
            launch<4, 8>(Y, X, W, n, in, out, acc, stream);
        else if (unroll == 8)
            launch<8, 8>(Y, X, W, n, in, out, acc, stream);
        else
            return kvqm_fail(KVQ_ERR_INVALID_ARG, "kvqm_gemv_f16: unroll %d (2, 4 or 8)", unroll);
    } else if (warps == 4) {
        if (unroll == 2)
            launch<2, 4>(Y, X, W, n, in, out, acc, stream);
        else if (unroll == 4)
            launch<4, 4>(Y, X, W, n, in, out, acc, stream);
        else if (unroll == 8)
            launch<8, 4>(Y, X, W, n, in, out, acc, stream);
        else
            return kvqm_fail(KVQ_ERR_INVALID_ARG, "kvqm_gemv_f16: unroll %d (2, 4 or 8)", unroll);
    } else {
        return kvqm_fail(KVQ_ERR_INVALID_ARG, "kvqm_gemv_f16: %d warps per block (4 or 8)", warps);
    }
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return kvqm_fail(KVQ_ERR_CUDA, "kvqm_gemv_f16 (%d x %d x %d): %s", n, out, in, cudaGetErrorString(e));
    return KVQ_OK;
}

extern "C" kvq_status kvqm_gemv_f16(float *Y, const void *X, const void *W, int n, int in, int out,
                                    float beta, cudaStream_t stream) {
    return kvqm_gemv_f16_shape(Y, X, W, n, in, out, beta, stream, KVQM_GEMV_UNROLL, KVQM_GEMV_WARPS);
}

// Quantize-on-append: the residual-window flushes of kvq_append, byte for byte (kvq.h section 5, src/core/quant.c):
// fp16-rounded scales and mins, IEEE division, round-half-to-even, e4m3 with saturation.
//
// Two launches per call, in stream order: flush_kernel writes the pages (reading the oldest window rows and the new
// input), then window_kernel writes the new tokens that stay in the window. The window is a ring of R + G rows on
// the device, so a flush moves no data; the ring's head advances by the flushed count.
#include "common.cuh"

namespace kvqc {

__device__ __forceinline__ float src_val(const AppendArgs &A, const AppendEntry &E, int v, int h, int c, int D, bool isv) {
    if (v < E.W0) {
        int row = (E.whead0 + v) % A.wcap;
        return __half2float((isv ? E.wv : E.wk)[((int64_t)row * A.H + h) * D + c]);
    }
    float x = load_in(isv ? A.v : A.k, ((E.in_off + v - E.W0) * A.H + h) * D + c, A.dtype);
    return A.direct ? x : round_f16(x);
}

template <int QMAX> __device__ __forceinline__ int q_asym(float x, float mn, float s) {
    if (!(s > 0.f)) return 0;
    float r = rintf(__fdiv_rn(__fsub_rn(x, mn), s));
    return r < 0.f ? 0 : r > (float)QMAX ? QMAX : (int)r;
}

template <int T, int D> __global__ void __launch_bounds__(128) flush_kernel(const __grid_constant__ AppendArgs A) {
    using TR = Traits<T, D>;
    const FlushItem f = A.f[blockIdx.x];
    const int h = blockIdx.y;
    const AppendEntry &E = A.a[f.a];
    uint8_t *pg = A.arena + (int64_t)f.page * A.page_bytes;
    if (h == 0 && threadIdx.x == 0 && f.pt_idx >= 0) E.pt[f.pt_idx] = f.page;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    constexpr int EPL = D / 32;  // channels per lane in row-wise passes
    if constexpr (!TR::grouped) {
        for (int r = 0; r < 2; r++) {
            uint8_t *blk = r ? pg + A.v_off + h * TR::vblk : pg + h * TR::kblk;
            for (int tt = warp; tt < f.cnt; tt += 4) {
                const int v = f.v0 + tt, slot = f.slot + tt;
                float x[EPL];
#pragma unroll
                for (int e = 0; e < EPL; e++) x[e] = src_val(A, E, v, h, lane * EPL + e, D, r);
                uint8_t *row = blk + slot * TR::row;
                if constexpr (T == KVQ_TYPE_F16 || T == KVQ_TYPE_BF16) {
#pragma unroll
                    for (int e = 0; e < EPL; e++) {
                        uint16_t u;
                        if constexpr (T == KVQ_TYPE_F16) u = __half_as_ushort(__float2half_rn(x[e]));
                        else u = __bfloat16_as_ushort(__float2bfloat16_rn(x[e]));
                        reinterpret_cast<uint16_t *>(row)[lane * EPL + e] = u;
                    }
                } else {
                    float amax = 0.f;
#pragma unroll
                    for (int e = 0; e < EPL; e++) amax = fmaxf(amax, fabsf(x[e]));
#pragma unroll
                    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
                    const float s = round_f16(__fdiv_rn(amax, T == KVQ_TYPE_Q8 ? 127.f : 448.f));
                    uint32_t packed = 0;
#pragma unroll
                    for (int e = 0; e < EPL; e++) {
                        float y = s > 0.f ? __fdiv_rn(x[e], s) : 0.f;
                        uint32_t b;
                        if constexpr (T == KVQ_TYPE_Q8) {
                            float q = rintf(y);
                            q = q < -127.f ? -127.f : q > 127.f ? 127.f : q;
                            b = (uint32_t)(uint8_t)(int8_t)(int)q;
                        } else {
                            b = (uint32_t)__nv_cvt_float_to_fp8(y, __NV_SATFINITE, __NV_E4M3);
                        }
                        packed |= b << (8 * e);
                    }
                    if constexpr (EPL == 4) reinterpret_cast<uint32_t *>(row)[lane] = packed;
                    else reinterpret_cast<uint16_t *>(row)[lane] = (uint16_t)packed;
                    if (lane == 0) reinterpret_cast<__half *>(blk + PT * TR::row)[slot] = __float2half_rn(s);
                }
            }
        }
    } else {
        constexpr int B = TR::bits, QMAX = (1 << B) - 1, PER = 8 / B;
        // keys: one thread per channel over the G = 64 tokens of the page
        uint8_t *kb = pg + h * TR::kblk;
        const int c = threadIdx.x;
        if (c < D) {
            float lo = INFINITY, hi = -INFINITY;
            for (int t = 0; t < PT; t++) {
                float x = src_val(A, E, f.v0 + t, h, c, D, false);
                lo = fminf(lo, x), hi = fmaxf(hi, x);
            }
            const float mn = round_f16(lo), s = round_f16(__fdiv_rn(__fsub_rn(hi, mn), (float)QMAX));
            __half *par = reinterpret_cast<__half *>(kb + PT * TR::row);
            par[c] = __float2half_rn(s), par[D + c] = __float2half_rn(mn);
            for (int t = 0; t < PT; t++) {
                int q = q_asym<QMAX>(src_val(A, E, f.v0 + t, h, c, D, false), mn, s);
                int byte = q;
#pragma unroll
                for (int k = 1; k < PER; k++) byte |= __shfl_down_sync(0xffffffffu, q, k) << (k * B);
                if (c % PER == 0) kb[t * TR::row + c / PER] = (uint8_t)byte;
            }
        }
        // values: one warp per token, groups of 64 channels = 64 / EPL lanes
        uint8_t *vb = pg + A.v_off + h * TR::vblk;
        constexpr int LPG = 64 / EPL;
        for (int t = warp; t < PT; t += 4) {
            float x[EPL];
            float lo = INFINITY, hi = -INFINITY;
#pragma unroll
            for (int e = 0; e < EPL; e++) {
                x[e] = src_val(A, E, f.v0 + t, h, lane * EPL + e, D, true);
                lo = fminf(lo, x[e]), hi = fmaxf(hi, x[e]);
            }
#pragma unroll
            for (int o = 1; o < LPG; o <<= 1) {
                lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
                hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
            }
            const float mn = round_f16(lo), s = round_f16(__fdiv_rn(__fsub_rn(hi, mn), (float)QMAX));
            uint32_t bits = 0;
#pragma unroll
            for (int e = 0; e < EPL; e++) bits |= (uint32_t)q_asym<QMAX>(x[e], mn, s) << (e * B);
            uint8_t *row = vb + t * TR::row;
            constexpr int LBITS = EPL * B;  // bits per lane: 16, 8 (Q4: D 128, 64), 8, 4 (Q2)
            if constexpr (LBITS == 16) reinterpret_cast<uint16_t *>(row)[lane] = (uint16_t)bits;
            else if constexpr (LBITS == 8) row[lane] = (uint8_t)bits;
            else {
                uint32_t other = __shfl_down_sync(0xffffffffu, bits, 1);
                if (lane % 2 == 0) row[lane / 2] = (uint8_t)(bits | (other << 4));
            }
            if (lane % LPG == 0) {
                __half2 *par = reinterpret_cast<__half2 *>(vb + PT * TR::row);
                par[t * TR::ng + lane / LPG] = __halves2half2(__float2half_rn(s), __float2half_rn(mn));
            }
        }
    }
}

// New tokens that stay in the window: fp16 copies into the ring.
__global__ void __launch_bounds__(128) window_kernel(const __grid_constant__ AppendArgs A, int D, int n_entries) {
    const int64_t x = blockIdx.x;
    int lo = 0, hi = n_entries - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (A.a[mid].wstart <= x) lo = mid;
        else hi = mid - 1;
    }
    const AppendEntry &E = A.a[lo];
    const int v = max(E.FG, E.W0) + (int)(x - E.wstart);
    const int row = (E.whead0 + v) % A.wcap;
    const int64_t in = (E.in_off + v - E.W0) * A.H * D, out = (int64_t)row * A.H * D;
    for (int e = threadIdx.x; e < A.H * D; e += blockDim.x) {
        E.wk[out + e] = __float2half_rn(load_in(A.k, in + e, A.dtype));
        E.wv[out + e] = __float2half_rn(load_in(A.v, in + e, A.dtype));
    }
}

template <int T, int D> static cudaError_t run_flush(const AppendArgs &a, cudaStream_t st) {
    flush_kernel<T, D><<<dim3(a.n_items, a.H), 128, 0, st>>>(a);
    return cudaGetLastError();
}
template <int D> static cudaError_t run_flush_t(int type, const AppendArgs &a, cudaStream_t st) {
    switch (type) {
    case KVQ_TYPE_F16: return run_flush<KVQ_TYPE_F16, D>(a, st);
    case KVQ_TYPE_BF16: return run_flush<KVQ_TYPE_BF16, D>(a, st);
    case KVQ_TYPE_Q8: return run_flush<KVQ_TYPE_Q8, D>(a, st);
    case KVQ_TYPE_FP8: return run_flush<KVQ_TYPE_FP8, D>(a, st);
    case KVQ_TYPE_Q4: return run_flush<KVQ_TYPE_Q4, D>(a, st);
    default: return run_flush<KVQ_TYPE_Q2, D>(a, st);
    }
}

// n_items > 0: flush launch; n_wtok > 0: window launch (a.n_items == 0). n_entries for the window search.
cudaError_t launch_append(int type, int D, const AppendArgs &a, cudaStream_t st) {
    if (a.n_items > 0) return D == 64 ? run_flush_t<64>(type, a, st) : run_flush_t<128>(type, a, st);
    if (a.n_wtok > 0) {
        window_kernel<<<(unsigned)a.n_wtok, 128, 0, st>>>(a, D, a.n_entries);
        return cudaGetLastError();
    }
    return cudaSuccess;
}

}  // namespace kvqc

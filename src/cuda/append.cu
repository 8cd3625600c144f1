// Quantize-on-append: the residual-window flushes of kvq_append, byte for byte (kvq.h section 5, src/core/quant.c):
// fp16-rounded scales and mins, IEEE division, round-half-to-even, e4m3 with saturation.
//
// Two launches per call, in stream order: flush_kernel writes the pages (reading the oldest window rows and the new
// input), then window_kernel writes the new tokens that stay in the window. The window is a ring of R + G rows on
// the device, so a flush moves no data; the ring's head advances by the flushed count. Before them (kvq.h section 10):
// rotated caches rotate K and V into fp32 scratch in one launch (rotate_kernel; the kernels then read the scratch),
// caches with sinks write the first tokens of a sequence to its sink page (sink_kernel).
#include <stdio.h>
#include <stdlib.h>

#include "common.cuh"

namespace kvqc {

// 4 consecutive values (F32, F16 or BF16) at element i (a multiple of 4); vec: p is aligned for one vector load
// (the caller's K/V may start anywhere, kvq_cuda_append checks)
__device__ __forceinline__ float4 load4(const void *p, int64_t i, int dt, bool vec) {
    if (!vec) return make_float4(load_in(p, i, dt), load_in(p, i + 1, dt), load_in(p, i + 2, dt), load_in(p, i + 3, dt));
    if (dt == KVQ_DTYPE_F32) return *reinterpret_cast<const float4 *>(reinterpret_cast<const float *>(p) + i);
    const uint2 u = *reinterpret_cast<const uint2 *>(reinterpret_cast<const uint16_t *>(p) + i);
    if (dt == KVQ_DTYPE_F16) {
        const float2 a = __half22float2(*reinterpret_cast<const __half2 *>(&u.x));
        const float2 b = __half22float2(*reinterpret_cast<const __half2 *>(&u.y));
        return make_float4(a.x, a.y, b.x, b.y);
    }
    return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16),
                       __uint_as_float(u.y & 0xffff0000u));
}
__device__ __forceinline__ void store4h(__half *p, float4 x) {
    const __half2 a = __floats2half2_rn(x.x, x.y), b = __floats2half2_rn(x.z, x.w);
    uint2 u;
    u.x = *reinterpret_cast<const uint32_t *>(&a), u.y = *reinterpret_cast<const uint32_t *>(&b);
    *reinterpret_cast<uint2 *>(p) = u;
}

// Channels [c, c + 4) of virtual token v: a window ring row, or an input row (rounded to fp16 unless direct)
__device__ __forceinline__ float4 src4(const AppendArgs &A, const AppendEntry &E, int v, int h, int c, int D, bool isv) {
    if (v < E.W0) {
        const int row = (E.whead0 + v) % A.wcap;
        return load4(isv ? E.wv : E.wk, ((int64_t)row * A.H + h) * D + c, KVQ_DTYPE_F16, true);
    }
    float4 x = load4(isv ? A.v : A.k, ((E.in_off + v - E.W0) * A.H + h) * D + c, A.dtype, A.vec);
    if (!A.direct) x = make_float4(round_f16(x.x), round_f16(x.y), round_f16(x.z), round_f16(x.w));
    return x;
}

// Channels [c, c + N) of virtual token v, N = 8 (D = 256), 4 (D = 128) or 2 (D = 64)
template <int N>
__device__ __forceinline__ void src_row(const AppendArgs &A, const AppendEntry &E, int v, int h, int c, int D, bool isv,
                                        float (&x)[N]) {
    if constexpr (N == 4 || N == 8) {
#pragma unroll
        for (int i = 0; i < N; i += 4) {
            const float4 y = src4(A, E, v, h, c + i, D, isv);
            x[i] = y.x, x[i + 1] = y.y, x[i + 2] = y.z, x[i + 3] = y.w;
        }
    } else {
        static_assert(N == 2, "channels per lane");
        if (v < E.W0) {
            const int row = (E.whead0 + v) % A.wcap;
            const __half *w = (isv ? E.wv : E.wk) + ((int64_t)row * A.H + h) * D + c;
            const float2 y = __half22float2(*reinterpret_cast<const __half2 *>(w));
            x[0] = y.x, x[1] = y.y;
            return;
        }
        const int64_t i = ((E.in_off + v - E.W0) * A.H + h) * D + c;
        x[0] = load_in(isv ? A.v : A.k, i, A.dtype), x[1] = load_in(isv ? A.v : A.k, i + 1, A.dtype);
        if (!A.direct) x[0] = round_f16(x[0]), x[1] = round_f16(x[1]);
    }
}

// Channels staged at a time by the grouped flushes: all of them up to D = 128; D = 256 in two chunks of 128 (a page's
// 64 tokens of 256 channels in fp32 would be 64 KB of shared memory, past the 48 KB of a static allocation). Keys are
// quantized per channel and values in groups of 64 channels, so a chunk holds whole groups either way.
template <int D> constexpr int chunk_of() { return D > 128 ? 128 : D; }

// The G = 64 tokens v0 .. v0 + 63 of head h (keys or values), channels [c0, c0 + DC), into xs[t][DC], all of a
// thread's loads in flight at once (they were one dependent load per token and channel: a decode step that flushed a
// Q4/Q2 group took ~100 us).
template <int D, int DC = chunk_of<D>()>
__device__ __forceinline__ void stage(const AppendArgs &A, const AppendEntry &E, int v0, int h, bool isv, float *xs,
                                      int c0) {
    constexpr int TPR = DC / 4, RPI = 128 / TPR, IT = PT / RPI;  // threads per row, rows per pass, passes
    const int c = (threadIdx.x % TPR) * 4, r0 = threadIdx.x / TPR;
    float4 x[IT];
#pragma unroll
    for (int it = 0; it < IT; it++) x[it] = src4(A, E, v0 + r0 + it * RPI, h, c0 + c, D, isv);
#pragma unroll
    for (int it = 0; it < IT; it++) *reinterpret_cast<float4 *>(xs + (r0 + it * RPI) * DC + c) = x[it];
}

template <int QMAX> __device__ __forceinline__ int q_asym(float x, float mn, float s) {
    if (!(s > 0.f)) return 0;
    float r = rintf(__fdiv_rn(__fsub_rn(x, mn), s));
    return r < 0.f ? 0 : r > (float)QMAX ? QMAX : (int)r;
}

// The code of x under (mn, s) and the role's levels lw, as quant.c's code_of: uniform levels (Q4, Q2; Q3's uniform
// table) round (x - mn) / s to nearest even; Q3's non-uniform levels take the nearest level to 16 (x - mn) / s, the
// first of equals. level: the code's level in scale units (lv16[q] / 16), what Q-Norm sums.
template <int QMAX> struct Coder {
    bool nuq = false;
    uint32_t lw[2] = {0u, 0u};
    __device__ __forceinline__ explicit Coder(const uint32_t (&w)[2]) {
        if constexpr (QMAX == 7) {
            lw[0] = w[0], lw[1] = w[1];
            nuq = !(level_of(lw, 1) == 16 && level_of(lw, QMAX) == 16 * QMAX);
        }
    }
    __device__ __forceinline__ int code(float x, float mn, float s) const {
        if (!nuq) return q_asym<QMAX>(x, mn, s);
        if (!(s > 0.f)) return 0;
        const float w = __fmul_rn(__fdiv_rn(__fsub_rn(x, mn), s), 16.0f);
        int best = 0;
        float bd = fabsf(__fsub_rn(w, (float)level_of(lw, 0)));
#pragma unroll
        for (int q = 1; q <= QMAX; q++) {
            const float d = fabsf(__fsub_rn(w, (float)level_of(lw, q)));
            if (d < bd) bd = d, best = q;
        }
        return best;
    }
    __device__ __forceinline__ double level(int q) const {
        if constexpr (QMAX == 7) return (double)level_of(lw, q) * 0.0625;
        return (double)q;
    }
};

// min/max's fp16 (scale, min) of a grouped type's group whose extremes are lo and hi: quant.c's minmax_params,
// operation for operation
template <int QMAX> __device__ __forceinline__ void minmax_pair(float lo, float hi, float &mn, float &s) {
    mn = round_f16(lo), s = round_f16(__fdiv_rn(__fsub_rn(hi, mn), (float)QMAX));
}

// Per-token types (F16, BF16, Q8, FP8): the role's rows of the flush item's tokens. A warp per token, U tokens'
// loads in flight before the first is written (no staging: each row is quantized on its own, and shared memory
// would cut the resident blocks of a prefill).
template <int T, int D>
__device__ __forceinline__ void flush_rows(const AppendArgs &A, const AppendEntry &E, const FlushItem &f, int h,
                                           uint8_t *blk, bool isv) {
    using TR = Traits<T, D>;
    constexpr int EPL = D / 32, U = 4;  // channels per lane, tokens per warp in flight
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int t0 = warp; t0 < f.cnt; t0 += 4 * U) {
        float xu[U][EPL];
#pragma unroll
        for (int u = 0; u < U; u++)
            if (t0 + 4 * u < f.cnt) src_row<EPL>(A, E, f.v0 + t0 + 4 * u, h, lane * EPL, D, isv, xu[u]);
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int tt = t0 + 4 * u;
            if (tt >= f.cnt) break;
            const int slot = f.slot + tt;
            const float *x = xu[u];
            uint8_t *row = blk + slot * TR::row;
            if constexpr (T == KVQ_TYPE_F16 || T == KVQ_TYPE_BF16) {
#pragma unroll
                for (int e = 0; e < EPL; e++) {
                    uint16_t b16;
                    if constexpr (T == KVQ_TYPE_F16) b16 = __half_as_ushort(__float2half_rn(x[e]));
                    else b16 = __bfloat16_as_ushort(__float2bfloat16_rn(x[e]));
                    reinterpret_cast<uint16_t *>(row)[lane * EPL + e] = b16;
                }
            } else {
                float amax = 0.f;
#pragma unroll
                for (int e = 0; e < EPL; e++) amax = fmaxf(amax, fabsf(x[e]));
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
                const float s = round_f16(__fdiv_rn(amax, T == KVQ_TYPE_Q8 ? 127.f : 448.f));
                uint64_t packed = 0;
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
                    packed |= (uint64_t)b << (8 * e);
                }
                if constexpr (EPL == 8) reinterpret_cast<uint2 *>(row)[lane] = make_uint2((uint32_t)packed, (uint32_t)(packed >> 32));
                else if constexpr (EPL == 4) reinterpret_cast<uint32_t *>(row)[lane] = (uint32_t)packed;
                else reinterpret_cast<uint16_t *>(row)[lane] = (uint16_t)packed;
                if (lane == 0) reinterpret_cast<__half *>(blk + PT * TR::row)[slot] = __float2half_rn(s);
            }
        }
    }
}

// Q-Norm (kvq.h section 10; src/core/quant.c, qnorm_params): the fp16 (scale, min) under which a group's codes decode
// to its values' mean and standard deviation. The CPU's arithmetic in its order, each operation rounded on its own
// (no contraction into FMAs), so the pair has the CPU cache's bits. l: the code's level (Coder::level). Returns false
// where min/max's pair stays.
struct QNormSums {
    double sx = 0, sxx = 0, sl = 0, sll = 0;
    __device__ __forceinline__ void add(float v, double l) {
        sx = __dadd_rn(sx, (double)v), sxx = __dadd_rn(sxx, __dmul_rn((double)v, (double)v));
        sl = __dadd_rn(sl, l), sll = __dadd_rn(sll, __dmul_rn(l, l));
    }
    __device__ __forceinline__ bool pair(int n, float s, float &ns, float &nm) const {
        if (!(s > 0.f)) return false;
        const double dn = (double)n, mx = __ddiv_rn(sx, dn), ml = __ddiv_rn(sl, dn);
        const double vx = __dsub_rn(__ddiv_rn(sxx, dn), __dmul_rn(mx, mx));
        const double vl = __dsub_rn(__ddiv_rn(sll, dn), __dmul_rn(ml, ml));
        if (!(vl > 0) || !(vx > 0)) return false;
        const float a = round_f16(__double2float_rn(__dsqrt_rn(__ddiv_rn(vx, vl))));
        const float b = round_f16(__double2float_rn(__dsub_rn(mx, __dmul_rn((double)a, ml))));
        if (!(a > 0.f) || !isfinite(a) || !isfinite(b)) return false;  // beyond fp16: min/max's pair stays
        ns = a, nm = b;
        return true;
    }
};

// Grouped keys (Q4, Q2): one thread per channel over the G = 64 tokens of the page, staged in xs (channels c0 ..
// c0 + DC - 1). qn: Q-Norm, whose pair is stored; the codes stay min/max's for Q4 and are taken again under the new
// pair for Q2 (quant.c, group_quant).
template <int T, int D, int DC = chunk_of<D>()>
__device__ __forceinline__ void flush_group_keys(const float *xs, uint8_t *kb, bool qn, int c0, const Levels &lv) {
    using TR = Traits<T, D>;
    constexpr int B = TR::bits, QMAX = (1 << B) - 1, PER = B == 3 ? 4 : 8 / B;
    const Coder<QMAX> cd(lv.k);
    const int cx = threadIdx.x, c = c0 + cx;  // staged column, channel
    if (cx < DC) {
        float lo = INFINITY, hi = -INFINITY;
        for (int t = 0; t < PT; t++) {
            const float x = xs[t * DC + cx];
            lo = fminf(lo, x), hi = fmaxf(hi, x);
        }
        float mn, s;
        minmax_pair<QMAX>(lo, hi, mn, s);
        float pm = mn, ps = s;  // the stored pair
        if (qn) {
            QNormSums q;
            for (int t = 0; t < PT; t++) q.add(xs[t * DC + cx], cd.level(cd.code(xs[t * DC + cx], mn, s)));
            if (q.pair(PT, s, ps, pm) && QMAX == 3) mn = pm, s = ps;
        }
        __half *par = reinterpret_cast<__half *>(kb + PT * TR::row);
        par[c] = __float2half_rn(ps), par[D + c] = __float2half_rn(pm);
        for (int t = 0; t < PT; t++) {
            const int q = cd.code(xs[t * DC + cx], mn, s);
            constexpr int BL = B == 3 ? 2 : B;  // Q3: its low 2 bits as a Q2 row, then the high bits (kvq.h section 5)
            const int lo = q & ((1 << BL) - 1);
            int byte = lo;
#pragma unroll
            for (int k = 1; k < PER; k++) byte |= __shfl_down_sync(0xffffffffu, lo, k) << (k * BL);
            if (c % PER == 0) kb[t * TR::row + c / PER] = (uint8_t)byte;
            if constexpr (B == 3) {
                const int hi = q >> 2;
                int hb = hi;
#pragma unroll
                for (int k = 1; k < 8; k++) hb |= __shfl_down_sync(0xffffffffu, hi, k) << k;
                if (c % 8 == 0) kb[t * TR::row + D / 4 + c / 8] = (uint8_t)hb;
            }
        }
    }
}

// Grouped values (Q4, Q2): one warp per token, groups of 64 channels = 64 / EPL lanes, staged in xs.
// qn: Q-Norm as for the keys, its pairs first: a thread per (token, group) sums the group's 64 channels in channel
// order (the CPU's order: a split sum would round differently). Thread i starts its sum i % 32 steps late, so that
// the 32 reads of a warp's step fall in 32 banks (in step they would all hit one: rows are D floats apart). One warp
// summing its tokens in turn cost a Q4/Q2 flush 3.3x its time (H200, kvq-bench-cuda --qnorm).
// Channels c0 .. c0 + DC - 1 (groups c0 / 64 ..) are staged in xs.
template <int T, int D, int DC = chunk_of<D>()>
__device__ __forceinline__ void flush_group_values(const float *xs, uint8_t *vb, bool qn, int c0, const Levels &lv) {
    using TR = Traits<T, D>;
    constexpr int B = TR::bits, QMAX = (1 << B) - 1, EPL = DC / 32, LPG = 64 / EPL, NG = DC / 64;
    const Coder<QMAX> cd(lv.v);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __shared__ float2 qp[PT * NG];  // Q-Norm's (scale, min) of (token t, group g) at g * PT + t; scale -1: none
    if (qn) {
        static_assert(PT * NG <= 128, "a thread per (token, group)");
        const int i = threadIdx.x;
        if (i < PT * NG) {
            const float *g = xs + (i % PT) * DC + (i / PT) * 64;
            float lo = INFINITY, hi = -INFINITY;
            for (int j = 0; j < 64; j++) {  // any order: min and max
                const float x = g[(j + lane) & 63];
                lo = fminf(lo, x), hi = fmaxf(hi, x);
            }
            float mn, s;
            minmax_pair<QMAX>(lo, hi, mn, s);
            QNormSums q;
            for (int k = 0; k < 64 + 31; k++) {  // channel j = k - lane at step k
                const int j = k - lane;
                if (j >= 0 && j < 64) q.add(g[j], cd.level(cd.code(g[j], mn, s)));
            }
            float ns, nm;
            qp[i] = q.pair(64, s, ns, nm) ? make_float2(ns, nm) : make_float2(-1.f, 0.f);
        }
        __syncthreads();  // qn is the launch's: every thread gets here
    }
    for (int t = warp; t < PT; t += 4) {
        float x[EPL];
        float lo = INFINITY, hi = -INFINITY;
#pragma unroll
        for (int e = 0; e < EPL; e++) {
            x[e] = xs[t * DC + lane * EPL + e];
            lo = fminf(lo, x[e]), hi = fmaxf(hi, x[e]);
        }
#pragma unroll
        for (int o = 1; o < LPG; o <<= 1) {
            lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
            hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
        }
        float mn, s;
        minmax_pair<QMAX>(lo, hi, mn, s);
        float pm = mn, ps = s;  // the stored pair
        if (qn) {
            const float2 p = qp[(lane / LPG) * PT + t];
            if (p.x > 0.f) {
                ps = p.x, pm = p.y;
                if (QMAX == 3) mn = pm, s = ps;  // Q2 takes its codes again under the new pair
            }
        }
        constexpr int BL = B == 3 ? 2 : B;  // Q3: its low 2 bits as a Q2 row, then the high bits (kvq.h section 5)
        uint32_t bits = 0, hbits = 0;
#pragma unroll
        for (int e = 0; e < EPL; e++) {
            const uint32_t q = (uint32_t)cd.code(x[e], mn, s);
            bits |= (q & ((1u << BL) - 1)) << (e * BL);
            hbits |= (q >> 2) << e;  // (Q3 only)
        }
        uint8_t *row = vb + t * TR::row + c0 * BL / 8;
        constexpr int LBITS = EPL * BL;  // bits per lane: 16, 8 (Q4: DC 128, 64), 8, 4 (Q2 and Q3's low bits)
        if constexpr (LBITS == 16) reinterpret_cast<uint16_t *>(row)[lane] = (uint16_t)bits;
        else if constexpr (LBITS == 8) row[lane] = (uint8_t)bits;
        else {
            uint32_t other = __shfl_down_sync(0xffffffffu, bits, 1);
            if (lane % 2 == 0) row[lane / 2] = (uint8_t)(bits | (other << 4));
        }
        if constexpr (B == 3) {  // EPL high bits per lane: 8 / EPL lanes a byte, at byte D/4 + channel/8
            constexpr int LPB = 8 / EPL;
            uint32_t hb = hbits;
#pragma unroll
            for (int k = 1; k < LPB; k++) hb |= __shfl_down_sync(0xffffffffu, hbits, k) << (k * EPL);
            if (lane % LPB == 0) vb[t * TR::row + D / 4 + (c0 + lane * EPL) / 8] = (uint8_t)hb;
        }
        if (lane % LPG == 0) {
            __half2 *par = reinterpret_cast<__half2 *>(vb + PT * TR::row);
            par[t * TR::ng + c0 / 64 + lane / LPG] = __halves2half2(__float2half_rn(ps), __float2half_rn(pm));
        }
    }
}

// One flush item (a page's tokens) of one head: keys of type TK, then values of type TV
template <int TK, int TV, int D> __device__ __forceinline__ void flush_body(const AppendArgs &A) {
    using TRK = Traits<TK, D>;
    using TRV = Traits<TV, D>;
    const FlushItem f = A.f[blockIdx.x];
    const int h = blockIdx.y;
    const AppendEntry &E = A.a[f.a];
    uint8_t *pg = A.arena + (int64_t)f.page * A.page_bytes;
    if (h == 0 && threadIdx.x == 0 && f.pt_idx >= 0) E.pt[f.pt_idx] = f.page;
    uint8_t *kb = pg + h * TRK::kblk, *vb = pg + A.v_off + h * TRV::vblk;
    constexpr bool STAGED = TRK::grouped || TRV::grouped;  // grouped roles flush whole pages (cnt = G = 64)
    constexpr int DC = chunk_of<D>();
    // the page's 64 tokens of this head, one role and chunk of channels at a time
    __shared__ __align__(16) float xs[STAGED ? PT * DC : 4];
    if constexpr (TRK::grouped) {
        for (int c0 = 0; c0 < D; c0 += DC) {
            if (c0) __syncthreads();  // xs is free again
            stage<D>(A, E, f.v0, h, false, xs, c0);
            __syncthreads();
            flush_group_keys<TK, D>(xs, kb, A.qnorm & KVQ_ROLES_K, c0, A.lv);
        }
    } else {
        flush_rows<TK, D>(A, E, f, h, kb, false);
    }
    if constexpr (TRV::grouped) {
        for (int c0 = 0; c0 < D; c0 += DC) {
            if (TRK::grouped || c0) __syncthreads();  // xs is free again
            stage<D>(A, E, f.v0, h, true, xs, c0);
            __syncthreads();
            flush_group_values<TV, D>(xs, vb, A.qnorm & KVQ_ROLES_V, c0, A.lv);
        }
    } else {
        flush_rows<TV, D>(A, E, f, h, vb, true);
    }
}

template <int TK, int TV, int D> __global__ void __launch_bounds__(128) flush_kernel(const __grid_constant__ AppendArgs A) {
    flush_body<TK, TV, D>(A);
}
// static plans: the arguments in device memory, the grid the plan's maximum
template <int TK, int TV, int D> __global__ void __launch_bounds__(128) flush_kernel_g(const AppendArgs *__restrict__ A) {
    if (blockIdx.x < A->n_items) flush_body<TK, TV, D>(*A);
}

// New tokens that stay in the window: fp16 copies into the ring. A thread takes 2 chunks of 4 channels of K and V
// and issues all 4 loads before its stores (a load-store loop ran one dependent load at a time).
__device__ __forceinline__ void window_body(const AppendArgs &A, int D, int n_entries) {
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
    const int n = A.H * D;  // a multiple of 4
    for (int e0 = threadIdx.x * 4; e0 < n; e0 += 2 * 4 * 128) {
        float4 k[2], vv[2];
        const int es[2] = {e0, e0 + 4 * 128};
#pragma unroll
        for (int u = 0; u < 2; u++)
            if (es[u] < n) {
                k[u] = load4(A.k, in + es[u], A.dtype, A.vec);
                vv[u] = load4(A.v, in + es[u], A.dtype, A.vec);
            }
#pragma unroll
        for (int u = 0; u < 2; u++)
            if (es[u] < n) {
                store4h(E.wk + out + es[u], k[u]);
                store4h(E.wv + out + es[u], vv[u]);
            }
    }
}

__global__ void __launch_bounds__(128) window_kernel(const __grid_constant__ AppendArgs A, int D, int n_entries) {
    window_body(A, D, n_entries);
}
__global__ void __launch_bounds__(128) window_kernel_g(const AppendArgs *__restrict__ A, int D) {
    if (blockIdx.x < A->n_wtok) window_body(*A, D, A->n_entries);
}

// Sink rows (kvq.h section 10): the first S tokens of a sequence, fp16 of the (rotated) input as kvq_append's
// store_sink writes them (round to nearest even). A block per item, its tokens' K and V rows H * D apart.
__device__ __forceinline__ void sink_body(const SinkArgs &A) {
    const SinkItem &it = A.it[blockIdx.x];
    const int64_t n = (int64_t)it.n * A.HD, in = it.in_row * A.HD;
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
        it.dk[e] = __float2half_rn(load_in(A.k, in + e, A.dtype));
        it.dk[A.vo + e] = __float2half_rn(load_in(A.v, in + e, A.dtype));
    }
}

__global__ void __launch_bounds__(128) sink_kernel(const __grid_constant__ SinkArgs A) { sink_body(A); }
__global__ void __launch_bounds__(128) sink_kernel_g(const SinkArgs *__restrict__ A) {
    if (blockIdx.x < A->n_items) sink_body(*A);
}
cudaError_t launch_sinks_g(const SinkArgs *a, int n, cudaStream_t st) {
    sink_kernel_g<<<n, 128, 0, st>>>(a);
    return cudaGetLastError();
}

cudaError_t launch_sinks(const SinkArgs &a, cudaStream_t st) {
    if (a.n_items == 0) return cudaSuccess;
    sink_kernel<<<a.n_items, 128, 0, st>>>(a);
    return cudaGetLastError();
}

// Randomized Walsh-Hadamard rotation of rows of D channels (D = 64, 128, 256: one block), in the float operations of
// src/core/rotate.c's fwht_block, in its order, each rounded (no FMA contraction: the library is C17, GCC's
// -ffp-contract=off), so that the rotated K/V and the pages made from them are the CPU cache's bits. A warp per row
// (fwht_warp). inverse = 1 is unrotate_warp's order (the decode kernel's fused output rotation).
template <int D> __global__ void __launch_bounds__(128) rotate_kernel(const __grid_constant__ RotArgs A) {
    constexpr int EPL = D / 32;
    const int lane = threadIdx.x & 31;
    const int64_t row = (int64_t)blockIdx.x * 4 + (threadIdx.x >> 5);
    if (row >= A.rows) return;
    const RotJob &J = A.j[blockIdx.y];
    const void *in = J.in;
    void *out = J.out;
    const RotSigns &sg = J.sg;
    const int in_dt = A.in_dt, out_dt = A.out_dt, inverse = A.inverse;
    const int64_t base = row * D + lane * EPL;
    float x[EPL];
#pragma unroll
    for (int e = 0; e < EPL; e++) x[e] = load_in(in, base + e, in_dt);
    if (J.apply) {
        const float f = rot_scale(D);
        auto bit = [&](int c) { return (int)((sg.s[c >> 6] >> (c & 63)) & 1); };
#pragma unroll
        for (int e = 0; e < EPL; e++) {
            const int c = lane * EPL + e;
            x[e] = __fmul_rn(x[e], inverse ? f : (bit(c) ? -f : f));
        }
        fwht_warp<D>(x, lane);
        if (inverse) {
#pragma unroll
            for (int e = 0; e < EPL; e++)
                if (bit(lane * EPL + e)) x[e] = -x[e];
        }
    }
#pragma unroll
    for (int e = 0; e < EPL; e++) store_as(out, base + e, x[e], out_dt);
}

cudaError_t launch_rotate(const RotArgs &a, int D, cudaStream_t st) {
    if (a.rows <= 0) return cudaSuccess;
    const dim3 grid((unsigned)((a.rows + 3) / 4), (unsigned)a.n_jobs);
    if (D != 64 && D != 128 && D != 256) return cudaErrorInvalidValue;  // D = 80, 96: block-diagonal on the CPU
    cudaError_t e = with_head_dim(D, [&](auto DD) {
        rotate_kernel<decltype(DD)::value><<<grid, 128, 0, st>>>(a);
        return cudaGetLastError();
    });
    static const bool debug = getenv("KVQ_CUDA_DEBUG") != nullptr;  // kvq_cuda.h section 2
    if (e == cudaSuccess && debug && (e = cudaStreamSynchronize(st)) != cudaSuccess)
        fprintf(stderr, "kvq debug: rotate_kernel<%d> (%lld rows, %d jobs) failed: %s\n", D, (long long)a.rows, a.n_jobs,
                cudaGetErrorString(e));
    return e;
}

template <int TK, int TV, int D> static cudaError_t run_flush(const AppendArgs &a, cudaStream_t st) {
    flush_kernel<TK, TV, D><<<dim3(a.n_items, a.H), 128, 0, st>>>(a);
    return cudaGetLastError();
}
template <int D> static cudaError_t run_flush_t(int tk, int tv, const AppendArgs &a, cudaStream_t st) {
    return with_type(tk, [&](auto K) {
        return with_type(tv, [&](auto V) { return run_flush<decltype(K)::value, decltype(V)::value, D>(a, st); });
    });
}

template <int TK, int TV, int D> static cudaError_t run_flush_g(const AppendArgs *a, int n, int H, cudaStream_t st) {
    flush_kernel_g<TK, TV, D><<<dim3(n, H), 128, 0, st>>>(a);
    return cudaGetLastError();
}
template <int D> static cudaError_t run_flush_gt(int tk, int tv, const AppendArgs *a, int n, int H, cudaStream_t st) {
    return with_type(tk, [&](auto K) {
        return with_type(tv, [&](auto V) { return run_flush_g<decltype(K)::value, decltype(V)::value, D>(a, n, H, st); });
    });
}
// A static step (one token per sequence): at most one flush item and one window token per sequence
cudaError_t launch_append_g(int tk, int tv, int D, const AppendArgs *flush, const AppendArgs *win, int n, int H,
                            cudaStream_t st) {
    cudaError_t e = with_head_dim(D, [&](auto DD) { return run_flush_gt<decltype(DD)::value>(tk, tv, flush, n, H, st); });
    if (e != cudaSuccess) return e;
    window_kernel_g<<<n, 128, 0, st>>>(win, D);
    return cudaGetLastError();
}

// n_items > 0: flush launch; n_wtok > 0: window launch (a.n_items == 0). n_entries for the window search.
cudaError_t launch_append(int tk, int tv, int D, const AppendArgs &a, cudaStream_t st) {
    if (a.n_items > 0) return with_head_dim(D, [&](auto DD) { return run_flush_t<decltype(DD)::value>(tk, tv, a, st); });
    if (a.n_wtok > 0) {
        window_kernel<<<(unsigned)a.n_wtok, 128, 0, st>>>(a, D, a.n_entries);
        return cudaGetLastError();
    }
    return cudaSuccess;
}

}  // namespace kvqc

// Chunked prefill attention on the quantized pages, in FlashAttention-2 tiles (issue 19, item 5).
//
// The decode kernel (decode.cuh) gives each (row, KV head) pair 8 MMA columns, so a prefill of n_q tokens reads the
// cache n_q / (8 / Gq) times. Here a CTA takes ROWS = 128 query rows of one KV head (64 at D = 256; a row is a (token,
// query head) pair, token-major, so every row of a CTA reads the same keys) and walks the sequence's positions in
// tiles of KT tokens: the sink rows, the pages, the fp16 window, in position order. Each tile's bytes are copied into
// shared memory with cp.async while the previous tile is multiplied; then all the CTA's threads convert a quantized
// tile into fp16 rows there (bf16 for a BF16 role: its range is not fp16's), and each warp computes for its 16 rows,
// as FlashAttention-2 does,
//   S = Q K^T (16 x KT)   online softmax in the exp2 domain   O += P V (16 x D)     (mma m16n8k16, fp32 accumulation)
// so a page is dequantized once per ROWS rows. The tile's format is dispatched at run time (one branch per tile, the
// same for the whole CTA), which keeps the kernels at 3 head dims x 4 element-type pairs instead of 49 type pairs x 3.
// Queries are rotated (kvq.h section 10) and scaled as they are staged; outputs are un-rotated as they are stored.
// Tiles that every row of the CTA sees whole skip the mask. Long contexts with few query tiles are split over the
// positions (blockIdx.z), each split writing unnormalised partials that prefill_merge combines, as decode's split does.
#include <math.h>

#include "prefill.cuh"

#ifndef KVQ_PREFILL_FP32_DQ  // 1: every tile through dq8 (an A/B build)
#define KVQ_PREFILL_FP32_DQ 0
#endif

namespace kvqc {
namespace {

// W warps of 16 rows: 8 at D <= 128, 4 at D = 256 (the registers of O). 4 warps of 32 rows at D = 128 (two m16 tiles
// sharing each K and V fragment, as FlashAttention-2 has them; 255 registers) measured no faster for f16 and 3-14%
// slower for the quantized types and short chunks (H100, docs/bench-cuda.md): the CTA's conversion and copies had
// half the threads. Shared memory: the queries, and two buffers of a K tile and two of a V tile (one read by the MMAs
// while the next tile's bytes land in the other).
template <int D> struct PCfg {
    static constexpr int NW = prefill_rows(D) / 16;
    static constexpr int NT = 32 * NW, ROWS = 16 * NW;
    static constexpr int MINB = D == 256 ? 1 : 2;  // CTAs per SM the registers must allow
    static constexpr int KT = D == 256 ? 32 : 64;  // keys per tile (a page unit in 64 / KT tiles)
    static constexpr int LD = D + 8;               // shared-memory row stride (halves): ldmatrix rows 16 bytes
                                                   // apart in banks, so the 8 rows of a matrix never conflict
    static constexpr int TILE = KT * LD;           // halves of one K or V tile buffer
    static constexpr size_t smem = (size_t)(ROWS * LD + 4 * TILE) * 2;
    static_assert((size_t)ROWS * D * 4 <= smem, "the output staging reuses the tiles' shared memory");
    // a page's K or V block of any 8-bit type (Q8/FP8: the largest) fits a tile buffer as raw bytes
    static_assert(Traits<KVQ_TYPE_Q8, D>::kblk <= TILE * 2 && Traits<KVQ_TYPE_Q8, D>::vblk <= TILE * 2, "raw block");
};

__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm4t(uint32_t (&r)[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
// A pair of floats in the tile's element type. fp16 saturates: a dequantized value may round past 65504 (the
// cache's inputs are within it), and an inf would turn P V into NaN.
template <bool BF> __device__ __forceinline__ uint32_t pack2(float a, float b) {
    if constexpr (BF) {
        __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
        return *reinterpret_cast<uint32_t *>(&h);
    } else {
        __half2 h = __floats2half2_rn(fminf(fmaxf(a, -65504.f), 65504.f), fminf(fmaxf(b, -65504.f), 65504.f));
        return *reinterpret_cast<uint32_t *>(&h);
    }
}
template <bool BF> __device__ __forceinline__ uint4 pack8(const float (&x)[8]) {
    return make_uint4(pack2<BF>(x[0], x[1]), pack2<BF>(x[2], x[3]), pack2<BF>(x[4], x[5]), pack2<BF>(x[6], x[7]));
}
// Eight fp16 values (16 bytes) as floats
__device__ __forceinline__ void half8_to_float(const uint4 u, float (&x)[8]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const float2 f = __half22float2(*reinterpret_cast<const __half2 *>(&w[k]));
        x[2 * k] = f.x, x[2 * k + 1] = f.y;
    }
}

// Channels c8 .. c8+7 of token i of a K (ISV = false) or V block of type T, as kvq__dequant_row computes them (fp32
// scale * level, then + min, no fused multiply-add; unflush_kernel's dequant, eight channels a call).
template <int T, int D, bool ISV> __device__ __forceinline__ void dq8(const uint8_t *blk, int i, int c8, const Levels &lv, float (&x)[8]) {
    using TR = Traits<T, D>;
    const uint8_t *row = blk + i * TR::row;
    const __half *par = reinterpret_cast<const __half *>(blk + PT * TR::row);
    if constexpr (T == KVQ_TYPE_F16) {
        half8_to_float(*reinterpret_cast<const uint4 *>(row + 2 * c8), x);
    } else if constexpr (T == KVQ_TYPE_BF16) {
        const uint4 u = *reinterpret_cast<const uint4 *>(row + 2 * c8);
        const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int k = 0; k < 4; k++) x[2 * k] = __uint_as_float(w[k] << 16), x[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    } else if constexpr (T == KVQ_TYPE_Q8 || T == KVQ_TYPE_FP8) {
        const float s = __half2float(par[i]);
        const uint2 u = *reinterpret_cast<const uint2 *>(row + c8);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const uint32_t b = ((k < 4 ? u.x : u.y) >> (8 * (k & 3))) & 255u;
            if constexpr (T == KVQ_TYPE_Q8) x[k] = __fmul_rn(s, (float)(int8_t)b);
            else x[k] = __fmul_rn(s, __half2float(__half(__nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)b, __NV_E4M3))));
        }
    } else {
        constexpr int B = TR::bits;
        float lvl[8];
        if constexpr (B == 3) {  // low 2 bits as a Q2 row, the high bit at byte D/4 + ch/8 (kvq.h section 5)
            const uint32_t lo = *reinterpret_cast<const uint16_t *>(row + c8 / 4), hi = row[D / 4 + c8 / 8];
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const int q = (int)(((lo >> (2 * k)) & 3u) | (((hi >> k) & 1u) << 2));
                lvl[k] = __fmul_rn((float)level_of(ISV ? lv.v : lv.k, q), 0.0625f);
            }
        } else if constexpr (B == 4) {
            const uint32_t w = *reinterpret_cast<const uint32_t *>(row + c8 / 2);
#pragma unroll
            for (int k = 0; k < 8; k++) lvl[k] = (float)((w >> (4 * k)) & 15u);
        } else {
            const uint32_t w = *reinterpret_cast<const uint16_t *>(row + c8 / 4);
#pragma unroll
            for (int k = 0; k < 8; k++) lvl[k] = (float)((w >> (2 * k)) & 3u);
        }
        if constexpr (!ISV) {  // per channel over the page: scale[D], then min[D]
            const uint4 su = *reinterpret_cast<const uint4 *>(par + c8), mu = *reinterpret_cast<const uint4 *>(par + D + c8);
            const __half *sh = reinterpret_cast<const __half *>(&su), *mh = reinterpret_cast<const __half *>(&mu);
#pragma unroll
            for (int k = 0; k < 8; k++) x[k] = __fadd_rn(__fmul_rn(__half2float(sh[k]), lvl[k]), __half2float(mh[k]));
        } else {  // per token and group of 64 channels: (scale, min)
            const int vp = (i * TR::ng + c8 / GRP) * 2;
            const float s = __half2float(par[vp]), mn = __half2float(par[vp + 1]);
#pragma unroll
            for (int k = 0; k < 8; k++) x[k] = __fadd_rn(__fmul_rn(s, lvl[k]), mn);
        }
    }
}

// The same eight channels as fp16 (an fp16 tile) for Q8, FP8, Q4 and Q2, in half2 arithmetic: the integer codes
// become fp16 through the exponent (0x6400 | n is 1024 + n for n < 1024: one lop3 per pair), then (h - 1024) s + m.
// About half of dq8's instructions, which the tile conversion is made of (H100: a quantized tile cost 1.3-1.4x an
// fp16 one); one fp16 rounding where dq8 rounds in fp32 and then to fp16, so the two differ by at most an fp16 ulp.
template <int T> constexpr bool dq8h_ok = T == KVQ_TYPE_Q8 || T == KVQ_TYPE_FP8 || T == KVQ_TYPE_Q4 || T == KVQ_TYPE_Q2;
__device__ __forceinline__ __half2 as_h2(uint32_t u) { return *reinterpret_cast<const __half2 *>(&u); }
__device__ __forceinline__ uint32_t as_u32(__half2 h) { return *reinterpret_cast<const uint32_t *>(&h); }
// x within fp16's finite range (a dequantized value may round past 65504, and an inf would turn P V into NaN)
__device__ __forceinline__ __half2 sat2(__half2 x) {
    const __half2 big = __floats2half2_rn(65504.f, 65504.f);
    return __hmin2(__hmax2(x, __hneg2(big)), big);
}
template <int T, int D, bool ISV> __device__ __forceinline__ uint4 dq8h(const uint8_t *blk, int i, int c8) {
    using TR = Traits<T, D>;
    const uint8_t *row = blk + i * TR::row;
    const __half *par = reinterpret_cast<const __half *>(blk + PT * TR::row);
    uint32_t r[4];  // channel pairs (0, 1), (2, 3), (4, 5), (6, 7)
    if constexpr (TR::bits == 8) {
        const uint2 u = *reinterpret_cast<const uint2 *>(row + c8);
        const __half2 s = __half2half2(par[i]);
        const uint32_t w[2] = {u.x, u.y};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const uint32_t b = w[k >> 1] >> (16 * (k & 1));  // the pair's two bytes in bits 0-15
            __half2 x;
            if constexpr (T == KVQ_TYPE_FP8) {
                const __half2_raw hr = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(b & 0xffffu), __NV_E4M3);
                x = __hmul2(__half2(hr), s);
            } else {  // int8 b: 0x64 above b ^ 0x80 is 1024 + 128 + b
                const uint32_t h = __byte_perm(b, 0x64646464u, 0x5140) ^ 0x00800080u;
                x = __hmul2(__hsub2(as_h2(h), __floats2half2_rn(1152.f, 1152.f)), s);
            }
            r[k] = as_u32(sat2(x));
        }
    } else {
        // p[j]: lanes (channel j, channel j + 4) as 1024 + code
        uint32_t p[4];
        if constexpr (TR::bits == 4) {
            const uint32_t w = *reinterpret_cast<const uint32_t *>(row + c8 / 2);
#pragma unroll
            for (int j = 0; j < 4; j++) p[j] = ((w >> (4 * j)) & 0x000f000fu) | 0x64006400u;
        } else {
            const uint32_t w = *reinterpret_cast<const uint16_t *>(row + c8 / 4);
            const uint32_t u = (w & 0xffu) | ((w & 0xff00u) << 8);  // channels 0-3 in lane 0, 4-7 in lane 1
#pragma unroll
            for (int j = 0; j < 4; j++) p[j] = ((u >> (2 * j)) & 0x00030003u) | 0x64006400u;
        }
        const uint32_t q[4] = {__byte_perm(p[0], p[1], 0x5410), __byte_perm(p[2], p[3], 0x5410),
                               __byte_perm(p[0], p[1], 0x7632), __byte_perm(p[2], p[3], 0x7632)};
        const __half2 k1024 = __floats2half2_rn(1024.f, 1024.f);
        if constexpr (!ISV) {  // per channel over the page: scale[D], then min[D]
            const uint4 su = *reinterpret_cast<const uint4 *>(par + c8), mu = *reinterpret_cast<const uint4 *>(par + D + c8);
            const uint32_t sw[4] = {su.x, su.y, su.z, su.w}, mw[4] = {mu.x, mu.y, mu.z, mu.w};
#pragma unroll
            for (int k = 0; k < 4; k++) r[k] = as_u32(sat2(__hfma2(__hsub2(as_h2(q[k]), k1024), as_h2(sw[k]), as_h2(mw[k]))));
        } else {  // per token and group of 64 channels: (scale, min)
            const int vp = (i * TR::ng + c8 / GRP) * 2;
            const __half2 s = __half2half2(par[vp]), mn = __half2half2(par[vp + 1]);
#pragma unroll
            for (int k = 0; k < 4; k++) r[k] = as_u32(sat2(__hfma2(__hsub2(as_h2(q[k]), k1024), s, mn)));
        }
    }
    return make_uint4(r[0], r[1], r[2], r[3]);
}

// A tile's rows 0 .. cnt - 1 from row(i, c8) (channels c8 .. c8+7 of row i as 16 bytes of the tile's element type);
// rows cnt .. KT - 1 zeroed (a masked key still multiplies its V row by P = 0, and stale bits could be NaN). The
// sources are staged in shared memory, so each chunk is stored as soon as it is made: little latency to hide, and
// fewer live registers beside O's.
template <int D, class R> __device__ __forceinline__ void fill_tile(uint16_t *dst, int cnt, int tid, R &&row) {
    using C = PCfg<D>;
    constexpr int CH = D / 8, N = C::KT * CH / C::NT;
#pragma unroll 2
    for (int it = 0; it < N; it++) {
        const int c = tid + it * C::NT, i = c / CH, c8 = (c % CH) * 8;
        *reinterpret_cast<uint4 *>(dst + i * C::LD + c8) = i < cnt ? row(i, c8) : make_uint4(0, 0, 0, 0);
    }
}
// Tokens t0 .. t0 + cnt - 1 of a page's block into a tile
template <int T, int D, bool ISV, bool BF> __device__ __forceinline__ void fill_page(uint16_t *dst, const uint8_t *blk, int t0,
                                                                                    int cnt, const Levels &lv, int tid) {
    fill_tile<D>(dst, cnt, tid, [&](int i, int c8) {
        if constexpr ((T == KVQ_TYPE_F16 && !BF) || (T == KVQ_TYPE_BF16 && BF))  // stored as the tile holds them
            return *reinterpret_cast<const uint4 *>(blk + (t0 + i) * Traits<T, D>::row + 2 * c8);
        if constexpr (!BF && dq8h_ok<T> && !KVQ_PREFILL_FP32_DQ) return dq8h<T, D, ISV>(blk, t0 + i, c8);
        float x[8];
        dq8<T, D, ISV>(blk, t0 + i, c8, lv, x);
        return pack8<BF>(x);
    });
}
// f(std::integral_constant<int, T>{}) for the kvq_type t, in device code (a tile's format, the same for the CTA)
template <class F> __device__ __forceinline__ void with_type_dev(int t, F &&f) {
    switch (t) {
    case KVQ_TYPE_F16: f(std::integral_constant<int, KVQ_TYPE_F16>{}); break;
    case KVQ_TYPE_BF16: f(std::integral_constant<int, KVQ_TYPE_BF16>{}); break;
    case KVQ_TYPE_Q8: f(std::integral_constant<int, KVQ_TYPE_Q8>{}); break;
    case KVQ_TYPE_FP8: f(std::integral_constant<int, KVQ_TYPE_FP8>{}); break;
    case KVQ_TYPE_Q4: f(std::integral_constant<int, KVQ_TYPE_Q4>{}); break;
    case KVQ_TYPE_Q3: f(std::integral_constant<int, KVQ_TYPE_Q3>{}); break;
    default: f(std::integral_constant<int, KVQ_TYPE_Q2>{}); break;
    }
}
// A K (ISV = false) or V block of the role's type t (a page's block, staged raw in shared memory) into a tile
template <int D, bool ISV, bool BF> __device__ __forceinline__ void fill_block_rt(int t, uint16_t *dst, const uint8_t *blk, int t0,
                                                                                 int cnt, const Levels &lv, int tid) {
    with_type_dev(t, [&](auto TT) { fill_page<decltype(TT)::value, D, ISV, BF>(dst, blk, t0, cnt, lv, tid); });
}
// Bytes of a page's K (isv = false) or V block of type t at head dim D
template <int D> __device__ __forceinline__ int block_bytes(int t, bool isv) {
    int b = 0;
    with_type_dev(t, [&](auto TT) {
        using TR = Traits<decltype(TT)::value, D>;
        b = isv ? TR::vblk : TR::kblk;
    });
    return b;
}
// cnt fp16 rows (dense, D apart) into a tile, converted to its element type
template <int D, bool BF> __device__ __forceinline__ void fill_rows(uint16_t *dst, const __half *rows, int cnt, int tid) {
    fill_tile<D>(dst, cnt, tid, [&](int i, int c8) {
        const uint4 u = *reinterpret_cast<const uint4 *>(rows + i * D + c8);
        if constexpr (!BF) return u;
        float x[8];
        half8_to_float(u, x);
        return pack8<true>(x);
    });
}

// One tile for one warp's 16 rows: S = Q K^T, soft-cap, mask (MASK), online softmax, O += P V.
// Fragments (mma m16n8k16): thread (g = lane / 4, t4 = lane % 4) holds rows g and g + 8, columns 2 t4, 2 t4 + 1 of
// each 8-wide n tile: s[nt][e] is row g + 8 (e >> 1), key nt 8 + 2 t4 + (e & 1); o[dt][e] likewise, channel dt 8 + ...
template <int D, bool KB, bool VB, bool MASK>
__device__ __forceinline__ void tile_rows(const PrefillArgs &A, const uint16_t *sQ, const uint16_t *sK, const uint16_t *sV,
                                          int a, int cnt, const int (&qp)[2], float (&m)[2], float (&l)[2],
                                          float (&o)[D / 8][4], int warp, int lane) {
    using C = PCfg<D>;
    constexpr int KT = C::KT, LD = C::LD;
    const int t4 = lane & 3;
    float s[KT / 8][4];
#pragma unroll
    for (int nt = 0; nt < KT / 8; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
    // ldmatrix x4 addresses: lane L gives row L % 8 of matrix L / 8. Q (A operand): matrices (rows 0-7 | 8-15) x
    // (channels k | k + 8); K (B, non-transposed): (keys n | n + 8) x (channels k | k + 8); V (B, transposed):
    // (keys k | k + 8) x (channels n | n + 8)
    const uint16_t *qa = sQ + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + (lane >> 4) * 8;
    const uint16_t *kb = sK + ((lane & 7) + (lane >> 4) * 8) * LD + ((lane >> 3) & 1) * 8;
    const uint16_t *vb = sV + ((lane & 7) + ((lane >> 3) & 1) * 8) * LD + (lane >> 4) * 8;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        uint32_t af[4];
        ldsm4(af, qa + kk * 16);
#pragma unroll
        for (int np = 0; np < KT / 16; np++) {
            uint32_t bf[4];
            ldsm4(bf, kb + np * 16 * LD + kk * 16);
            mma<KB>(s[2 * np], af[0], af[1], af[2], af[3], bf[0], bf[1]);
            mma<KB>(s[2 * np + 1], af[0], af[1], af[2], af[3], bf[2], bf[3]);
        }
    }
    if (A.softcap > 0.f) {  // qscale has no log2(e) then (kvq_cuda.cu, attn_qscale)
#pragma unroll
        for (int nt = 0; nt < KT / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[nt][e] = A.softcap * tanhf(s[nt][e] / A.softcap) * 1.4426950408889634f;
    }
    if constexpr (MASK) {
#pragma unroll
        for (int nt = 0; nt < KT / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int col = nt * 8 + 2 * t4 + (e & 1);
                const int kp = a + col, q = qp[e >> 1];
                if (col >= cnt || kp > q || (A.window > 0 && kp <= q - A.window)) s[nt][e] = -INFINITY;
            }
    }
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < KT / 8; nt++) mx = fmaxf(mx, fmaxf(s[nt][2 * hr], s[nt][2 * hr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mn = fmaxf(m[hr], mx);
        const float base = mn == -INFINITY ? 0.f : mn;  // a row that sees nothing yet: every p is 0, not NaN
        const float al = ex2(m[hr] - base);
        m[hr] = mn;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < KT / 8; nt++)
#pragma unroll
            for (int e = 2 * hr; e < 2 * hr + 2; e++) {
                const float p = ex2(s[nt][e] - base);
                s[nt][e] = p;
                sum += p;
            }
        l[hr] = l[hr] * al + sum;  // this thread's columns; the quad's are added at the end
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) o[dt][2 * hr] *= al, o[dt][2 * hr + 1] *= al;
    }
    // P as the A operand: the score fragments of n tiles 2k, 2k + 1 are the A fragment of k step k
#pragma unroll
    for (int kk = 0; kk < KT / 16; kk++) {
        const uint32_t pf[4] = {pack2<VB>(s[2 * kk][0], s[2 * kk][1]), pack2<VB>(s[2 * kk][2], s[2 * kk][3]),
                                pack2<VB>(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack2<VB>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < D / 16; dp++) {
            uint32_t bf[4];
            ldsm4t(bf, vb + kk * 16 * LD + dp * 16);
            mma<VB>(o[2 * dp], pf[0], pf[1], pf[2], pf[3], bf[0], bf[1]);
            mma<VB>(o[2 * dp + 1], pf[0], pf[1], pf[2], pf[3], bf[2], bf[3]);
        }
    }
}

__device__ __forceinline__ void cp_async16(void *dst, const void *src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// A tile of keys: positions [a, a + cnt) of one unit (kind 0: the sink rows, 1: page idx, 2: window unit idx), its
// rows [off, off + cnt) there. ok = false: no more tiles for this CTA.
struct PTile {
    int kind, idx, off, cnt, a;  // positions fit int: a sequence holds under 2^31 tokens (PrefillArgs.len)
    bool ok;
};
// The next tile at or after unit u, offset off that some row of the CTA sees (queries at positions [qmin, qmax]), and
// (u, off) moved past it. Units come in position order, so the first tile past qmax ends the walk.
template <int D>
__device__ __forceinline__ PTile next_tile(const PrefillArgs &A, int &u, int &off, int u1, int qmin, int qmax) {
    constexpr int KT = PCfg<D>::KT;
    const int has_s = A.S > 0, np = (A.paged + PT - 1) / PT;
    for (; u < u1; u++, off = 0) {
        int kind, idx, ucnt, pos0;
        if (has_s && u == 0) kind = 0, idx = 0, pos0 = 0, ucnt = A.S;
        else if (u - has_s < np) kind = 1, idx = u - has_s, pos0 = A.S + idx * PT, ucnt = min(PT, A.paged - idx * PT);
        else kind = 2, idx = u - has_s - np, pos0 = A.S + A.paged + idx * PT, ucnt = min(PT, A.win - idx * PT);
        for (; off < ucnt; off += KT) {
            const int cnt = min(KT, ucnt - off);
            const int a = pos0 + off;
            if (a > qmax) {
                u = u1;
                return PTile{0, 0, 0, 0, 0, false};
            }
            if (A.window > 0 && a + cnt - 1 <= qmin - A.window) continue;  // before every row's window
            PTile t{kind, idx, off, cnt, a, true};
            off += KT;
            return t;
        }
    }
    return PTile{0, 0, 0, 0, 0, false};
}

// Whether a role's tile is copied as the MMAs read it (fp16 rows for an fp16 role, a BF16 page for a bf16 role), or
// staged raw (a quantized page's block, fp16 rows for a bf16 role) and converted into the other buffer afterwards
__device__ __forceinline__ bool tile_direct(int kind, int t, bool bf) {
    return kind == 1 ? (t == KVQ_TYPE_F16 && !bf) || (t == KVQ_TYPE_BF16 && bf) : !bf;
}

// Enqueues the asynchronous copies of one role's tile into buf (cp.async, 16 bytes a thread at a time): direct tiles
// in the tile layout (rows cnt .. KT-1 zeroed: the buffer may hold a raw block's bytes, which could be NaN as fp16),
// raw ones as the bytes they are (a page's whole block; fp16 rows dense, D apart).
template <int D>
__device__ __forceinline__ void issue_role(const PrefillArgs &A, const PTile &T, bool isv, bool bf, uint16_t *buf, int h, int tid) {
    using C = PCfg<D>;
    constexpr int CH = D / 8;
    const int t = isv ? A.tv : A.tk;
    const bool direct = tile_direct(T.kind, t, bf);
    if (T.kind == 1) {
        const uint8_t *pg = A.arena + (int64_t)A.pt[T.idx] * A.page_bytes;
        const int bb = block_bytes<D>(t, isv);
        const uint8_t *blk = pg + (isv ? A.v_off : 0) + h * bb;
        if (direct) {  // 16-bit rows: rows off .. off + cnt - 1 of the block
            for (int c = tid; c < C::KT * CH; c += C::NT) {
                const int i = c / CH, c8 = (c % CH) * 8;
                uint16_t *d = buf + i * C::LD + c8;
                if (i < T.cnt) cp_async16(d, blk + ((size_t)(T.off + i) * D + c8) * 2);
                else *reinterpret_cast<uint4 *>(d) = make_uint4(0, 0, 0, 0);
            }
        } else {
            for (int c = tid; c < bb / 16; c += C::NT) cp_async16(reinterpret_cast<uint8_t *>(buf) + c * 16, blk + c * 16);
        }
        return;
    }
    // fp16 rows: the window ring (row r of head h at wk/wv + (r H + h) D, from ring row whead + unit start + off) or
    // the sink page's rows
    const __half *base;
    int r0, wrap;
    if (T.kind == 2) {
        base = (isv ? A.wv : A.wk) + (int64_t)h * D;
        r0 = (int)(((int64_t)A.whead + (int64_t)T.idx * PT + T.off) % A.wcap), wrap = A.wcap;
    } else {
        base = A.sk + (isv ? A.sink_vo : 0) + (int64_t)h * D;
        r0 = T.off, wrap = 1 << 30;
    }
    for (int c = tid; c < C::KT * CH; c += C::NT) {
        const int i = c / CH, c8 = (c % CH) * 8;
        uint16_t *d = buf + i * (direct ? C::LD : D) + c8;
        if (i < T.cnt) {
            int r = r0 + i;
            r = r >= wrap ? r - wrap : r;
            cp_async16(d, base + (int64_t)r * A.H * D + c8);
        } else if (direct) {
            *reinterpret_cast<uint4 *>(d) = make_uint4(0, 0, 0, 0);
        }
    }
}
// After the copies landed (and a barrier): a raw role's tile converted from its staging buffer into dst
template <int D, bool ISV, bool BF>
__device__ __forceinline__ void convert_role(const PrefillArgs &A, const PTile &T, const uint16_t *raw, uint16_t *dst, int tid) {
    if (T.kind == 1) fill_block_rt<D, ISV, BF>(ISV ? A.tv : A.tk, dst, reinterpret_cast<const uint8_t *>(raw), T.off, T.cnt, A.lv, tid);
    else fill_rows<D, BF>(dst, reinterpret_cast<const __half *>(raw), T.cnt, tid);
}

// Output row `row` (this lane's D / 32 channels in x): un-rotated into the model's frame, stored in out's dtype
template <int D> __device__ __forceinline__ void store_row(const PrefillArgs &A, int64_t row, float (&x)[D / 32], int lane) {
    if (A.rot_o) unrotate_warp<D>(x, A.ro, lane);
    const int64_t oo = row * D + lane * (D / 32);
#pragma unroll
    for (int e = 0; e < D / 32; e++) store_as(A.out, oo + e, x[e], A.o_dtype);
}

template <int D, bool KB, bool VB> __global__ void __launch_bounds__(PCfg<D>::NT, PCfg<D>::MINB) prefill_kernel(const __grid_constant__ PrefillArgs A) {
    using C = PCfg<D>;
    constexpr int NW = C::NW, ROWS = C::ROWS, LD = C::LD, EPL = D / 32;
    extern __shared__ __align__(16) uint16_t sm[];
    // K buffers at kb0 + {0, 1} TILE, V buffers at kb0 + {2, 3} TILE (indexed by arithmetic: an array of pointers
    // indexed at run time would live in local memory)
    uint16_t *sQ = sm, *kb0 = sm + ROWS * LD, *vb0 = kb0 + 2 * C::TILE;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2;
    const int h = blockIdx.y, split = blockIdx.z, n_split = gridDim.z;
    const int tile = gridDim.x - 1 - blockIdx.x;  // the last query tiles see the most keys: they start first
    const int tok0 = tile * A.tpc, ntok = min(A.tpc, A.n_q - tok0);
    const int qbase = A.len - A.n_q;  // position of query token 0
    const int qmin = qbase + tok0, qmax = qbase + tok0 + ntok - 1;
    int u = split * A.per_split, off = 0;
    const int u1 = min(A.units, u + A.per_split);

    // the first tile's copies go out before the queries are staged, so that they land meanwhile
    PTile cur = next_tile<D>(A, u, off, u1, qmin, qmax);
    int ck = 0, cv = 0;  // buffers holding the current tile's K and V
    if (cur.ok) {
        issue_role<D>(A, cur, false, KB, kb0 + C::TILE, h, tid);
        issue_role<D>(A, cur, true, VB, vb0 + C::TILE, h, tid);
        cp_async_commit();
    }

    // ---- the queries: row r is token r / Gq, query head h Gq + r % Gq; rotated into the keys' frame, scaled, in the
    // keys' element type. Rows past the chunk are zero (their outputs are not stored).
    for (int r = warp; r < ROWS; r += NW) {
        const int ti = r / A.Gq, hq = h * A.Gq + r % A.Gq;
        float x[EPL];
        const int64_t qo = ((int64_t)(tok0 + ti) * A.nqh + hq) * D + lane * EPL;
#pragma unroll
        for (int e = 0; e < EPL; e++) x[e] = ti < ntok ? load_in(A.q, qo + e, A.q_dtype) : 0.f;
        if (A.rot_q) {  // R q = H diag(s) q / sqrt(D), rotate_kernel's order
            const float f = rot_scale(D);
#pragma unroll
            for (int e = 0; e < EPL; e++) {
                const int c = lane * EPL + e;
                x[e] = __fmul_rn(x[e], (A.rq.s[c >> 6] >> (c & 63)) & 1 ? -f : f);
            }
            fwht_warp<D>(x, lane);
        }
#pragma unroll
        for (int e = 0; e < EPL; e += 2)
            *reinterpret_cast<uint32_t *>(sQ + r * LD + lane * EPL + e) = pack2<KB>(x[e] * A.qscale, x[e + 1] * A.qscale);
    }
    // this thread's rows g and g + 8 of its warp: their positions (rows past the chunk: the chunk's last, so that
    // their softmax stays finite)
    int qp[2];
#pragma unroll
    for (int hr = 0; hr < 2; hr++) qp[hr] = qbase + tok0 + min((warp * 16 + g + 8 * hr) / A.Gq, ntok - 1);

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    float o[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;

    // ---- the tiles: tile n + 1's copies in flight while tile n is multiplied. A direct role's next tile lands in the
    // free buffer, which becomes the current one; a raw role's lands there raw and is converted into the current
    // buffer once the MMAs are done with it.
    if (cur.ok) {
        cp_async_wait();
        __syncthreads();  // the first tile's copies (every thread's) and sQ
        if (tile_direct(cur.kind, A.tk, KB)) ck = 1;
        else convert_role<D, false, KB>(A, cur, kb0 + C::TILE, kb0, tid);
        if (tile_direct(cur.kind, A.tv, VB)) cv = 1;
        else convert_role<D, true, VB>(A, cur, vb0 + C::TILE, vb0, tid);
        __syncthreads();
    }
    while (cur.ok) {
        const PTile nxt = next_tile<D>(A, u, off, u1, qmin, qmax);
        if (nxt.ok) {
            issue_role<D>(A, nxt, false, KB, kb0 + (ck ^ 1) * C::TILE, h, tid);
            issue_role<D>(A, nxt, true, VB, vb0 + (cv ^ 1) * C::TILE, h, tid);
            cp_async_commit();
        }
        const bool whole = cur.cnt == C::KT && cur.a + cur.cnt - 1 <= qmin && (A.window <= 0 || cur.a > qmax - A.window);
        const uint16_t *sK = kb0 + ck * C::TILE, *sV = vb0 + cv * C::TILE;
        if (whole) tile_rows<D, KB, VB, false>(A, sQ, sK, sV, cur.a, cur.cnt, qp, m, l, o, warp, lane);
        else tile_rows<D, KB, VB, true>(A, sQ, sK, sV, cur.a, cur.cnt, qp, m, l, o, warp, lane);
        if (!nxt.ok) break;
        cp_async_wait();
        __syncthreads();  // the next tile's copies landed; every warp is done with the current buffers
        if (tile_direct(nxt.kind, A.tk, KB)) ck ^= 1;
        else convert_role<D, false, KB>(A, nxt, kb0 + (ck ^ 1) * C::TILE, kb0 + ck * C::TILE, tid);
        if (tile_direct(nxt.kind, A.tv, VB)) cv ^= 1;
        else convert_role<D, true, VB>(A, nxt, vb0 + (cv ^ 1) * C::TILE, vb0 + cv * C::TILE, tid);
        __syncthreads();
        cur = nxt;
    }

    // ---- outputs: the quad's sums, O / l (or the partials), staged per warp as fp32 rows in the tiles' memory, then
    // a warp per row: un-rotated (values' frame back to the model's), converted, stored
    __syncthreads();
    float *stg = reinterpret_cast<float *>(sm) + warp * 16 * D;
    const bool part = n_split > 1;
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        float lq = l[hr];
        lq += __shfl_xor_sync(0xffffffffu, lq, 1);
        lq += __shfl_xor_sync(0xffffffffu, lq, 2);
        const float inv = part ? 1.f : 1.f / lq;
        const int rr = g + 8 * hr;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++)
            *reinterpret_cast<float2 *>(stg + rr * D + dt * 8 + 2 * (lane & 3)) = make_float2(o[dt][2 * hr] * inv, o[dt][2 * hr + 1] * inv);
        const int r = warp * 16 + rr, ti = r / A.Gq;
        if (part && (lane & 3) == 0 && ti < ntok) {
            const int64_t row = (int64_t)(tok0 + ti) * A.nqh + h * A.Gq + r % A.Gq;
            float *ml = A.part_ml + ((int64_t)split * A.n_q * A.nqh + row) * 2;
            ml[0] = m[hr], ml[1] = lq;
        }
    }
    __syncwarp();
    for (int rr = 0; rr < 16; rr++) {
        const int r = warp * 16 + rr, ti = r / A.Gq;
        if (ti >= ntok) break;  // rows are token-major: the rest are past the chunk too
        const int64_t row = (int64_t)(tok0 + ti) * A.nqh + h * A.Gq + r % A.Gq;
        float x[EPL];
#pragma unroll
        for (int e = 0; e < EPL; e++) x[e] = stg[rr * D + lane * EPL + e];
        if (part) {
            float *po = A.part_o + ((int64_t)split * A.n_q * A.nqh + row) * D + lane * EPL;
#pragma unroll
            for (int e = 0; e < EPL; e++) po[e] = x[e];
            continue;
        }
        store_row<D>(A, row, x, lane);
    }
}

// The splits' partials of each output row (a warp each): m = max m_z, O = sum 2^(m_z - m) O_z / sum 2^(m_z - m) l_z,
// in split order (the bits do not depend on timing), then un-rotated and stored as the kernel above would.
template <int D> __global__ void __launch_bounds__(128) prefill_merge_kernel(const __grid_constant__ PrefillArgs A, int n_split) {
    constexpr int EPL = D / 32;
    const int lane = threadIdx.x & 31;
    const int64_t rows = (int64_t)A.n_q * A.nqh, row = (int64_t)blockIdx.x * 4 + (threadIdx.x >> 5);
    if (row >= rows) return;
    float mx = -INFINITY;
    for (int z = 0; z < n_split; z++) mx = fmaxf(mx, A.part_ml[((int64_t)z * rows + row) * 2]);
    float x[EPL] = {}, den = 0.f;
    for (int z = 0; z < n_split; z++) {
        const float mz = A.part_ml[((int64_t)z * rows + row) * 2];
        if (mz == -INFINITY) continue;  // this split saw none of the row's keys
        const float w = ex2(mz - mx);
        den += w * A.part_ml[((int64_t)z * rows + row) * 2 + 1];
        const float *po = A.part_o + ((int64_t)z * rows + row) * D + lane * EPL;
#pragma unroll
        for (int e = 0; e < EPL; e++) x[e] += w * po[e];
    }
    const float inv = 1.f / den;
#pragma unroll
    for (int e = 0; e < EPL; e++) x[e] *= inv;
    store_row<D>(A, row, x, lane);
}

template <int D, bool KB, bool VB> cudaError_t run_prefill(const PrefillArgs &a, int splits, cudaStream_t st) {
    using C = PCfg<D>;
    static cudaError_t attr = cudaFuncSetAttribute(prefill_kernel<D, KB, VB>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::smem);
    if (attr != cudaSuccess) return attr;
    const dim3 grid((unsigned)((a.n_q + a.tpc - 1) / a.tpc), (unsigned)a.H, (unsigned)splits);
    prefill_kernel<D, KB, VB><<<grid, C::NT, C::smem, st>>>(a);
    return cudaGetLastError();
}
template <int D> cudaError_t run_prefill_d(const PrefillArgs &a, int splits, cudaStream_t st) {
    if (a.tpc * a.Gq > prefill_rows(D)) return cudaErrorInvalidValue;
    const bool kb = a.tk == KVQ_TYPE_BF16, vb = a.tv == KVQ_TYPE_BF16;
    if (kb && vb) return run_prefill<D, true, true>(a, splits, st);
    if (kb) return run_prefill<D, true, false>(a, splits, st);
    if (vb) return run_prefill<D, false, true>(a, splits, st);
    return run_prefill<D, false, false>(a, splits, st);
}
}  // namespace

cudaError_t launch_prefill(int D, const PrefillArgs &a, int splits, cudaStream_t st) {
    return with_head_dim(D, [&](auto DD) { return run_prefill_d<decltype(DD)::value>(a, splits, st); });
}

cudaError_t launch_prefill_merge(int D, const PrefillArgs &a, int splits, cudaStream_t st) {
    const int64_t rows = (int64_t)a.n_q * a.nqh;
    return with_head_dim(D, [&](auto DD) {
        prefill_merge_kernel<decltype(DD)::value><<<(unsigned)((rows + 3) / 4), 128, 0, st>>>(a, splits);
        return cudaGetLastError();
    });
}

}  // namespace kvqc

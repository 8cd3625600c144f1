// Chunked prefill attention on the quantized pages, in FlashAttention-2 tiles (issue 19, item 5).
//
// The decode kernel (decode.cuh) gives each (row, KV head) pair 8 MMA columns, so a prefill of n_q tokens reads the
// cache n_q / (8 / Gq) times. Here a CTA takes ROWS = 16 W query rows of one KV head (W warps; a row is a (token,
// query head) pair, token-major, so every row of a CTA reads the same keys) and walks the sequence's positions in
// tiles of KT tokens: the sink rows, the pages, the fp16 window, in position order. All the CTA's threads dequantize a
// tile into fp16 rows in shared memory (bf16 for a BF16 role: its range is not fp16's), then each warp computes for its
// 16 rows, as FlashAttention-2 does,
//   S = Q K^T (16 x KT)   online softmax in the exp2 domain   O += P V (16 x D)     (mma m16n8k16, fp32 accumulation)
// so a page is dequantized once per ROWS rows (128 at D <= 128), not once per 8 / Gq tokens. The tile's format is
// dispatched at run time (one branch per tile, the same for the whole CTA), which keeps the kernels at 3 head dims x
// 4 element-type pairs instead of 49 type pairs x 3.
// Queries are rotated (kvq.h section 10) and scaled as they are staged; outputs are un-rotated as they are stored.
// Tiles that every row of the CTA sees whole skip the mask. Long contexts with few query tiles are split over the
// positions (blockIdx.z), each split writing unnormalised partials that prefill_merge combines, as decode's split does.
#include <math.h>

#include "prefill.cuh"

namespace kvqc {
namespace {

// W warps of 16 rows: 8 (D <= 128; 4 with KVQ_CUDA_PREFILL_ROWS=64) or 4 (D = 256: the registers of O)
template <int D, int W> struct PCfg {
    static constexpr int NW = W;
    static constexpr int NT = 32 * NW, ROWS = 16 * NW;
    static constexpr int MINB = D == 256 ? 1 : 8 / W * 2 > 4 ? 4 : 8 / W * 2;  // CTAs per SM the registers must allow
    static constexpr int KT = D == 256 ? 32 : 64;   // keys per tile (a page unit in 64 / KT tiles)
    static constexpr int LD = D + 8;                // shared-memory row stride (halves): ldmatrix rows 16 bytes
                                                    // apart in banks, so the 8 rows of a matrix never conflict
    static constexpr size_t smem = (size_t)(ROWS + 2 * KT) * LD * 2;
    static_assert((size_t)ROWS * D * 4 <= smem, "the output staging reuses the tiles' shared memory");
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

// A tile's rows 0 .. cnt - 1 from row(i, c8) (channels c8 .. c8+7 of row i as 16 bytes); rows cnt .. KT - 1 zeroed (a
// masked key still multiplies its V row by P = 0, and stale bits could be NaN). Every load of the thread before any
// store.
template <int D, int W, class R> __device__ __forceinline__ void fill_tile(uint16_t *dst, int cnt, int tid, R &&row) {
    using C = PCfg<D, W>;
    constexpr int CH = D / 8, N = C::KT * CH / C::NT;
    uint4 u[N];
#pragma unroll
    for (int it = 0; it < N; it++) {
        const int c = tid + it * C::NT, i = c / CH;
        u[it] = i < cnt ? row(i, (c % CH) * 8) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int it = 0; it < N; it++) {
        const int c = tid + it * C::NT;
        *reinterpret_cast<uint4 *>(dst + (c / CH) * C::LD + (c % CH) * 8) = u[it];
    }
}
// Tokens t0 .. t0 + cnt - 1 of a page's block into tile rows 0 .. cnt - 1
template <int T, int D, int W, bool ISV, bool BF> __device__ __forceinline__ void fill_page(uint16_t *dst, const uint8_t *blk, int t0,
                                                                                    int cnt, const Levels &lv, int tid) {
    fill_tile<D, W>(dst, cnt, tid, [&](int i, int c8) {
        if constexpr ((T == KVQ_TYPE_F16 && !BF) || (T == KVQ_TYPE_BF16 && BF)) {  // stored as the tile holds them
            return *reinterpret_cast<const uint4 *>(blk + (t0 + i) * Traits<T, D>::row + 2 * c8);
        } else {
            float x[8];
            dq8<T, D, ISV>(blk, t0 + i, c8, lv, x);
            return pack8<BF>(x);
        }
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
// The role's block of head h in the page (ISV: the value blocks start at v_off), at the role's type
template <int D, int W, bool ISV, bool BF> __device__ __forceinline__ void fill_page_rt(int t, uint16_t *dst, const uint8_t *pg, int v_off,
                                                                                int h, int t0, int cnt, const Levels &lv, int tid) {
    with_type_dev(t, [&](auto TT) {
        constexpr int T = decltype(TT)::value;
        const uint8_t *blk = ISV ? pg + v_off + h * Traits<T, D>::vblk : pg + h * Traits<T, D>::kblk;
        fill_page<T, D, W, ISV, BF>(dst, blk, t0, cnt, lv, tid);
    });
}
// fp16 rows (window ring or sink page; row r of head h at base + (r H + h) D) r0 .. r0 + cnt - 1, wrapping at wrap
template <int D, int W, bool BF> __device__ __forceinline__ void fill_rows(uint16_t *dst, const __half *base, int HD, int r0, int wrap,
                                                                   int cnt, int tid) {
    fill_tile<D, W>(dst, cnt, tid, [&](int i, int c8) {
        int r = r0 + i;
        r = r >= wrap ? r - wrap : r;
        const uint4 u = *reinterpret_cast<const uint4 *>(base + (int64_t)r * HD + c8);
        if constexpr (!BF) return u;
        float x[8];
        half8_to_float(u, x);
        return pack8<true>(x);
    });
}

// One tile for one warp's 16 rows: S = Q K^T, soft-cap, mask (MASK), online softmax, O += P V.
// Fragments (mma m16n8k16): thread (g = lane / 4, t4 = lane % 4) holds rows g and g + 8, columns 2 t4, 2 t4 + 1 of
// each 8-wide n tile: s[nt][e] is row g + 8 (e >> 1), key nt 8 + 2 t4 + (e & 1); o[dt][e] likewise, channel dt 8 + ...
template <int D, int W, bool KB, bool VB, bool MASK>
__device__ __forceinline__ void tile_rows(const PrefillArgs &A, const uint16_t *sQ, const uint16_t *sK, const uint16_t *sV,
                                          int64_t a, int cnt, const int64_t (&qp)[2], float (&m)[2], float (&l)[2],
                                          float (&o)[D / 8][4], int warp, int lane) {
    using C = PCfg<D, W>;
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
                const int64_t kp = a + col, q = qp[e >> 1];
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

template <int D, int W, bool KB, bool VB> __global__ void __launch_bounds__(PCfg<D, W>::NT, PCfg<D, W>::MINB) prefill_kernel(const __grid_constant__ PrefillArgs A) {
    using C = PCfg<D, W>;
    constexpr int NW = C::NW, ROWS = C::ROWS, KT = C::KT, LD = C::LD, EPL = D / 32;
    extern __shared__ __align__(16) uint16_t sm[];
    uint16_t *sQ = sm, *sK = sm + ROWS * LD, *sV = sK + KT * LD;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2;
    const int h = blockIdx.y, split = blockIdx.z, n_split = gridDim.z;
    const int tile = gridDim.x - 1 - blockIdx.x;  // the last query tiles see the most keys: they start first
    const int tok0 = tile * A.tpc, ntok = min(A.tpc, A.n_q - tok0);
    const int64_t qbase = (int64_t)A.len - A.n_q;  // position of query token 0
    const int64_t qmin = qbase + tok0, qmax = qbase + tok0 + ntok - 1;

    // ---- the queries: row r is token r / Gq, query head h Gq + r % Gq; rotated into the keys' frame, scaled, in the
    // keys' element type. Rows past the chunk are zero (their outputs are not stored).
    for (int r = warp; r < ROWS; r += NW) {
        const int ti = r / A.Gq, hq = h * A.Gq + r % A.Gq;
        float x[EPL];
        const int64_t off = ((int64_t)(tok0 + ti) * A.nqh + hq) * D + lane * EPL;
#pragma unroll
        for (int e = 0; e < EPL; e++) x[e] = ti < ntok ? load_in(A.q, off + e, A.q_dtype) : 0.f;
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
    int64_t qp[2];
#pragma unroll
    for (int hr = 0; hr < 2; hr++) qp[hr] = qbase + tok0 + min((warp * 16 + g + 8 * hr) / A.Gq, ntok - 1);

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    float o[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;

    // ---- the units of this split: the sink unit (positions 0 .. S-1), pages, window units of 64 tokens
    const int has_s = A.S > 0, np = (A.paged + PT - 1) / PT;
    const int u0 = split * A.per_split, u1 = min(A.units, u0 + A.per_split);
    __syncthreads();  // sQ
    for (int u = u0; u < u1; u++) {
        int kind, idx, ucnt;  // 0 sinks, 1 page, 2 window
        int64_t pos0;
        if (has_s && u == 0) kind = 0, idx = 0, pos0 = 0, ucnt = A.S;
        else if (u - has_s < np) kind = 1, idx = u - has_s, pos0 = A.S + (int64_t)idx * PT, ucnt = min(PT, A.paged - idx * PT);
        else kind = 2, idx = u - has_s - np, pos0 = (int64_t)A.S + A.paged + (int64_t)idx * PT, ucnt = min(PT, A.win - idx * PT);
        if (pos0 > qmax) break;  // units come in position order
#pragma unroll 1
        for (int off = 0; off < ucnt; off += KT) {
            const int cnt = min(KT, ucnt - off);
            const int64_t a = pos0 + off, b = a + cnt - 1;
            if (a > qmax) break;
            if (A.window > 0 && b <= qmin - A.window) continue;  // before every row's window
            const bool whole = cnt == KT && b <= qmin && (A.window <= 0 || a > qmax - A.window);
            __syncthreads();  // every warp is done with the previous tile
            if (kind == 1) {
                const uint8_t *pg = A.arena + (int64_t)A.pt[idx] * A.page_bytes;
                fill_page_rt<D, W, false, KB>(A.tk, sK, pg, A.v_off, h, off, cnt, A.lv, tid);
                fill_page_rt<D, W, true, VB>(A.tv, sV, pg, A.v_off, h, off, cnt, A.lv, tid);
            } else if (kind == 2) {
                const int r0 = (int)(((int64_t)A.whead + (int64_t)idx * PT + off) % A.wcap);
                fill_rows<D, W, KB>(sK, A.wk + (int64_t)h * D, A.H * D, r0, A.wcap, cnt, tid);
                fill_rows<D, W, VB>(sV, A.wv + (int64_t)h * D, A.H * D, r0, A.wcap, cnt, tid);
            } else {
                fill_rows<D, W, KB>(sK, A.sk + (int64_t)h * D, A.H * D, off, 1 << 30, cnt, tid);
                fill_rows<D, W, VB>(sV, A.sk + A.sink_vo + (int64_t)h * D, A.H * D, off, 1 << 30, cnt, tid);
            }
            __syncthreads();
            if (whole) tile_rows<D, W, KB, VB, false>(A, sQ, sK, sV, a, cnt, qp, m, l, o, warp, lane);
            else tile_rows<D, W, KB, VB, true>(A, sQ, sK, sV, a, cnt, qp, m, l, o, warp, lane);
        }
    }

    // ---- outputs: the quad's sums, O / l (or the partials), staged per warp as fp32 rows in the tiles' memory, then
    // a warp per row: un-rotated (values' frame back to the model's), converted, stored
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        l[hr] += __shfl_xor_sync(0xffffffffu, l[hr], 1);
        l[hr] += __shfl_xor_sync(0xffffffffu, l[hr], 2);
    }
    __syncthreads();
    float *stg = reinterpret_cast<float *>(sm) + warp * 16 * D;
    const bool part = n_split > 1;
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        const float inv = part ? 1.f : 1.f / l[hr];
        const int rr = g + 8 * hr;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++)
            *reinterpret_cast<float2 *>(stg + rr * D + dt * 8 + 2 * (lane & 3)) = make_float2(o[dt][2 * hr] * inv, o[dt][2 * hr + 1] * inv);
        const int r = warp * 16 + rr, ti = r / A.Gq;
        if (part && (lane & 3) == 0 && ti < ntok) {
            const int64_t row = (int64_t)(tok0 + ti) * A.nqh + h * A.Gq + r % A.Gq;
            float *ml = A.part_ml + ((int64_t)split * A.n_q * A.nqh + row) * 2;
            ml[0] = m[hr], ml[1] = l[hr];
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
        if (A.rot_o) unrotate_warp<D>(x, A.ro, lane);
        const int64_t oo = row * D + lane * EPL;
#pragma unroll
        for (int e = 0; e < EPL; e++) store_as(A.out, oo + e, x[e], A.o_dtype);
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
    if (A.rot_o) unrotate_warp<D>(x, A.ro, lane);
    const int64_t oo = row * D + lane * EPL;
#pragma unroll
    for (int e = 0; e < EPL; e++) store_as(A.out, oo + e, x[e], A.o_dtype);
}

template <int D, int W, bool KB, bool VB> cudaError_t run_prefill(const PrefillArgs &a, int splits, cudaStream_t st) {
    using C = PCfg<D, W>;
    static cudaError_t attr = cudaFuncSetAttribute(prefill_kernel<D, W, KB, VB>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::smem);
    if (attr != cudaSuccess) return attr;
    const dim3 grid((unsigned)((a.n_q + a.tpc - 1) / a.tpc), (unsigned)a.H, (unsigned)splits);
    prefill_kernel<D, W, KB, VB><<<grid, C::NT, C::smem, st>>>(a);
    return cudaGetLastError();
}
template <int D, int W> cudaError_t run_prefill_w(const PrefillArgs &a, int splits, cudaStream_t st) {
    const bool kb = a.tk == KVQ_TYPE_BF16, vb = a.tv == KVQ_TYPE_BF16;
    if (kb && vb) return run_prefill<D, W, true, true>(a, splits, st);
    if (kb) return run_prefill<D, W, true, false>(a, splits, st);
    if (vb) return run_prefill<D, W, false, true>(a, splits, st);
    return run_prefill<D, W, false, false>(a, splits, st);
}
template <int D> cudaError_t run_prefill_d(const PrefillArgs &a, int rows, int splits, cudaStream_t st) {
    if (a.tpc * a.Gq > rows) return cudaErrorInvalidValue;
    if constexpr (D == 256) return run_prefill_w<D, 4>(a, splits, st);
    else return rows == 64 ? run_prefill_w<D, 4>(a, splits, st) : run_prefill_w<D, 8>(a, splits, st);
}
}  // namespace

cudaError_t launch_prefill(int D, int rows, const PrefillArgs &a, int splits, cudaStream_t st) {
    return with_head_dim(D, [&](auto DD) { return run_prefill_d<decltype(DD)::value>(a, rows, splits, st); });
}

cudaError_t launch_prefill_merge(int D, const PrefillArgs &a, int splits, cudaStream_t st) {
    const int64_t rows = (int64_t)a.n_q * a.nqh;
    return with_head_dim(D, [&](auto DD) {
        prefill_merge_kernel<decltype(DD)::value><<<(unsigned)((rows + 3) / 4), 128, 0, st>>>(a, splits);
        return cudaGetLastError();
    });
}

}  // namespace kvqc

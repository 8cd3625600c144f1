// Shared by the CUDA backend's translation units: compile-time type traits of the page layout (kvq.h section 5,
// specialised to page_tokens = 64, group = 64), kernel argument structs and small device helpers.
#pragma once
// (kernel argument structs are passed by value as __grid_constant__ parameters; static_asserts below keep them small)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "kvq.h"

namespace kvqc {

constexpr int PT = 64;   // tokens per page (the only page size this backend supports)
constexpr int GRP = 64;  // key group G / value group Gv for grouped types

__host__ __device__ constexpr int type_bits(int t) {
    return t == KVQ_TYPE_F16 || t == KVQ_TYPE_BF16 ? 16
           : t == KVQ_TYPE_Q8 || t == KVQ_TYPE_FP8 ? 8
           : t == KVQ_TYPE_Q4                      ? 4
           : t == KVQ_TYPE_Q3                      ? 3
                                                   : 2;
}
__host__ __device__ constexpr int pad16(int n) { return (n + 15) & ~15; }

template <int T, int D> struct Traits {
    static constexpr int bits = type_bits(T);
    static constexpr bool grouped = bits < 8;
    static constexpr bool scaled = bits == 8;       // one fp16 scale per token
    static constexpr int row = D * bits / 8;        // bytes of one token's row (Q3: D/4 of low bits, then D/8 of high)
    static constexpr int ng = D / GRP;              // value groups per token (grouped types)
    static constexpr int kpar = scaled ? 2 * PT : grouped ? 4 * D : 0;
    static constexpr int vpar = scaled ? 2 * PT : grouped ? PT * ng * 4 : 0;
    static constexpr int kblk = pad16(row * PT + kpar);
    static constexpr int vblk = pad16(row * PT + vpar);
};

// One attention row: a decode sequence, or one query of a prefill (same pages, shorter visible range).
struct Entry {
    const int32_t *pt;       // device page table of (seq, layer)
    const __half *wk, *wv;   // window rings [wcap][H][D]
    int32_t paged;           // tokens in pages
    int32_t lo, hi;          // visible tokens [lo, hi)
    int32_t whead;           // ring row of window token 0
    int32_t npu, n;          // page units; positions in the split: npu, then ww for each of the nw window units
    int32_t q_row;           // row of q / out (of its first token)
    int16_t nw;              // window units, the sink unit included
    int16_t ntok;            // query tokens (1 .. 8 / Gq): consecutive rows from q_row, causal among themselves
                             // (hi is the last one's; token x hides the last ntok - 1 - x positions), one read
    const __half *sk;        // sink page (kvq.h section 5: fp16 K [SR][H][D], then V): its K rows; V at + sink_vo
    int32_t slo, shi;        // visible sink tokens [slo, shi): one more unit, the entry's last, when shi > slo
    int64_t start;           // flattened index of (this entry, head 0, unit 0)
};
// With sinks (kvq.h section 10) paged, lo, hi, whead and the units count the tokens after the S sinks (u = t - S);
// the sinks are the last unit of an entry, read like a window unit (fp16 rows H * D apart).
// Window units weigh ww positions each in the split over CTAs (decode.cuh): a warp reads them straight from global
// memory, a chain of dependent loads that takes several page units' time while the bulk copies keep the memory busy,
// and the CTA holding them finished last (H100, q4, batch 1, 128k: its 4 window units cost ~25 us of an 81 us step).
// Unit q of the window is done by the CTA whose range holds position npu + ww q; the other ww - 1 positions are empty.

// Tokens an append bringing the window to T tokens flushes into pages: whole flush units (Gf tokens), once the window
// holds wcap = R + Gf tokens. Host (kvq_cuda_append) and device (static plans) share it: the same bits either way.
__host__ __device__ __forceinline__ int64_t flush_count(int64_t T, int wcap, int Gf) {
    return T < wcap ? 0 : (1 + (T - wcap) / Gf) * Gf;
}

// An entry's positions in the split over CTAs: its page units, then its window units (and sinks) at weight ww each.
// Host (decode, prefill) and device (static plans) weigh through this one function, so their splits stay the same.
__host__ __device__ __forceinline__ void entry_weigh(Entry &e, int ww) { e.n = e.npu + ww * e.nw; }

// The attention row of a (sequence, layer) whose visible end is hi_pos (a position, sinks included), from its state:
// tokens in pages and sinks, ring head, its page table, window rings and sink page (NULL: none). Host (run_entries'
// callers) and device (static plans) share it, so that both split the same units and give the same bits.
__host__ __device__ __forceinline__ Entry make_entry_at(const int32_t *pt, const __half *wk, const __half *wv,
                                                        const __half *sk, int64_t paged, int64_t sink, int32_t whead,
                                                        int64_t hi_pos, int window, int q_row) {
    Entry e;
    e.pt = pt, e.wk = wk, e.wv = wv, e.sk = sk;
    e.paged = (int32_t)paged;
    const int64_t lo_pos = window > 0 && hi_pos > window ? hi_pos - window : 0;
    e.slo = (int32_t)(lo_pos < sink ? lo_pos : sink), e.shi = (int32_t)(hi_pos < sink ? hi_pos : sink);
    const int64_t hi = hi_pos - sink > 0 ? hi_pos - sink : 0;
    e.hi = (int32_t)hi;
    e.lo = (int32_t)(lo_pos - sink > 0 ? lo_pos - sink : 0);
    e.whead = whead;
    const int64_t pe = paged < hi ? paged : hi;
    e.npu = e.lo < pe ? (int32_t)((pe + PT - 1) / PT - e.lo / PT) : 0;
    const int64_t ws = (e.lo > paged ? e.lo : paged) - paged, we = hi - paged;
    const int nwu = we > ws ? (int)((we + PT - 1) / PT - ws / PT) : 0;
    e.nw = (int16_t)(nwu + (e.shi > e.slo));  // the sinks: the last unit
    e.ntok = 1;
    entry_weigh(e, 1);
    e.q_row = q_row;
    e.start = 0;
    return e;
}

// Entry's ww for a decode call of `pairs` (row, KV head) pairs holding `pages` page units in all, on n_sm SMs, unless
// KVQ_CUDA_WIN_WEIGHT sets one: round(1.25 n_sm / pairs), capped by the call's page units per SM, within [10, 20]. A
// window unit holds its warp for about as long as its CTA takes for 20 page positions, and the ring waits for that
// warp; where it is alone in its CTA (few pairs: batch 1 of 8 KV heads on 132 SMs) it should weigh that much, but a
// CTA runs several side by side, one per warp, once the pairs pass ~1/8 of the SMs, and where a CTA holds few pages
// (Gemma 3 270M's 1 KV head at 32k) a weight of 20 spreads each pair over more CTAs to merge. H100, 128k, us per step
// with weight 1 / 4 / 10 / 14 / 20 / 30: batch 1 q4 80.2 / 78.3 / 73.2 / 69.0 / 65.9 / 71.3, q2 64.9 / 59.3 / 56.2 /
// 55.7 / 53.8 / 58.5; batch 8 q4 412.6 / 409.3 / 406.9 / 407.3 / 417.8 / 415.1; Gemma 3 270M, 32k, batch 2, weight 20
// against 10: q4 +21%, q2 +32% (docs/bench-cuda.md). Host (kvq_cuda_attn_decode) and device (static plans) share it.
__host__ __device__ __forceinline__ int win_weight(int64_t pairs, int64_t pages, int n_sm) {
    if (pairs < 1 || n_sm < 1) return 10;
    int64_t w = (5 * (int64_t)n_sm + 2 * pairs) / (4 * pairs);
    const int64_t per_sm = pages / n_sm;
    if (per_sm < w) w = per_sm;
    return (int)(w < 10 ? 10 : w > 20 ? 20 : w);
}
constexpr int MAXE = 48;  // entries per launch: keeps the parameters under the classic 4 KB (cheaper launches)

// Q3's levels (kvq.h section 10; src/core/quant.c lv_u3 / lv_n3): level q of a role is byte q of w (in 1/16 of the
// scale), the uniform 16 q or the non-uniform table. A code decodes to scale * level / 16 + min. Eight bytes, so that
// one prmt looks a code up (decode.cuh).
struct Levels {
    uint32_t k[2], v[2];
};
__host__ __device__ __forceinline__ int level_of(const uint32_t (&w)[2], int q) { return (int)((w[q >> 2] >> (8 * (q & 3))) & 255u); }

// ---- rotation (kvq.h section 10, src/core/rotate.c): one sign bit per channel, D <= 256
struct RotSigns {
    uint64_t s[4];
};
// rotate.c's 1/sqrt(n) (kvq__rot_scale: the same float constants) and log2(n), for the blocks n = 64, 128, 256
// (and the 16-64 channels a decode lane holds); constant trip counts, so that the butterfly loops unroll
__host__ __device__ constexpr float rot_scale(int n) { return n == 64 ? 0.125f : n == 128 ? 0.08838835f : 0.0625f; }
__host__ __device__ constexpr int log2_of(int n) { return n <= 1 ? 0 : 1 + log2_of(n / 2); }

// The Walsh-Hadamard butterflies of one row of D channels held by a warp, lane l holding channels [l EPL, (l + 1) EPL):
// spans h < EPL inside a lane, the others across lanes; the lower channel of a pair computes a + b, the upper a - b,
// each rounded (no contraction), in src/core/rotate.c's fwht_block order, so that the rows are the CPU cache's bits.
// Constant trip counts and linear induction (lg), so that the loops unroll and x stays in registers.
template <int D> __device__ __forceinline__ void fwht_warp(float (&x)[D / 32], int lane) {
    constexpr int EPL = D / 32;
#pragma unroll
    for (int lg = 0; lg < log2_of(D); lg++) {
        const int h = 1 << lg;
        if (h < EPL) {
#pragma unroll
            for (int j = 0; j < EPL; j++)
                if (!(j & h)) {
                    const float a = x[j], b = x[j + h];
                    x[j] = __fadd_rn(a, b);
                    x[j + h] = __fsub_rn(a, b);
                }
        } else {
            const int m = h / EPL;  // partner lane: channel c +- h
            const bool upper = lane & m;
#pragma unroll
            for (int e = 0; e < EPL; e++) {
                const float y = __shfl_xor_sync(0xffffffffu, x[e], m);
                x[e] = upper ? __fsub_rn(y, x[e]) : __fadd_rn(x[e], y);
            }
        }
    }
}
// R^T x = diag(s) H x / sqrt(D) for one row (the inverse of the rotation that rotate_kernel applies with inverse = 0):
// x scaled, the butterflies, then the signs, as rotate_kernel does with inverse = 1
template <int D> __device__ __forceinline__ void unrotate_warp(float (&x)[D / 32], const RotSigns &sg, int lane) {
    constexpr int EPL = D / 32;
    const float f = rot_scale(D);
#pragma unroll
    for (int e = 0; e < EPL; e++) x[e] = __fmul_rn(x[e], f);
    fwht_warp<D>(x, lane);
#pragma unroll
    for (int e = 0; e < EPL; e++) {
        const int c = lane * EPL + e;
        if ((sg.s[c >> 6] >> (c & 63)) & 1) x[e] = -x[e];
    }
}

#ifdef KVQ_DECODE_TRACE
constexpr int KVQ_TRACE_SLOTS = 24;  // stamps per CTA of a diagnostic build (decode.cuh)
#endif
struct DecodeArgs {
    const uint8_t *arena;
    int64_t page_bytes;
    int32_t v_off;  // byte offset of the value blocks in a page
    int32_t H, Gq, nqh, wcap, D;  // Gq: query heads per KV head
    int32_t Gs;        // columns of a partial slot: the largest ntok * Gq of the launch (<= 8)
    int32_t qo_dtype;  // dtype of out (and of q unless q_dtype says otherwise)
    int32_t q_dtype;   // dtype of q (out is fp32 scratch when the outputs are un-rotated after the kernel)
    int32_t sink_vo;   // elements from a sink page's K rows to its V rows: SR * H * D
    int32_t rot_q;     // rotate the queries into the keys' domain as they are loaded (signs rq; kvq.h section 10)
    int32_t rot_o;     // take the outputs back from the values' domain (signs ro) as they are stored
    int32_t win_first; // a pair's fp16 window and sink units before its pages (their load latency under the ring's fill)
    float qscale;   // attention scale, times log2(e) when there is no soft-cap
    float softcap;  // 0: off
    const void *q;
    void *out;
    float *part;     // [slot][Gs][D]
    float *part_ml;  // [slot][Gs][2]
    int32_t *cnt;    // [n_entries][H] CTAs done with the pair; zero between launches
    int32_t n_entries;
    int32_t n_cta;
    int64_t total;  // units in all
    int64_t L;      // units per CTA
    RotSigns rq;    // the keys' rotation signs (rot_q)
    RotSigns ro;    // the values' rotation signs (rot_o)
    Levels lv;      // Q3 roles' levels
#ifdef KVQ_DECODE_TRACE
    unsigned long long *trace;  // diagnostic builds only: [n_cta][KVQ_TRACE_SLOTS] stamps (decode.cuh)
#endif
    Entry e[MAXE];
};

// ---- append ----
struct FlushItem {
    int32_t a;      // append entry
    int32_t v0;     // first virtual token (0 = oldest window token)
    int32_t cnt;    // tokens (<= 64, one page)
    int32_t slot;   // first page slot
    int32_t page;   // page id
    int32_t pt_idx; // page-table index to write (-1: the page is already there)
};
struct AppendEntry {
    int32_t *pt;
    __half *wk, *wv;
    int32_t W0, whead0, T, FG;  // window tokens before, ring head before, W0 + n, flushed tokens
    int64_t in_off;             // first input row of this sequence
    int64_t wstart;             // prefix of window-written tokens
};
constexpr int MAXA = 32;  // append parameters under 4 KB as well
constexpr int MAXF = 80;
struct AppendArgs {
    uint8_t *arena;
    int64_t page_bytes;
    int32_t v_off, H, wcap, direct;  // direct: W == 1, values go straight to pages without fp16 rounding
    int32_t dtype;
    int32_t vec;  // k and v aligned for 4-value vector loads (16 bytes for F32, 8 for F16/BF16)
    int32_t qnorm, pad_;  // KVQ_ROLES_*: Q-Norm of the grouped roles (kvq.h section 10)
    Levels lv;            // Q3 roles' levels
    const void *k, *v;
    int32_t n_items, n_entries;
    int64_t n_wtok;
    AppendEntry a[MAXA];
    FlushItem f[MAXF];
};

// ---- sinks: fp16 rows of new tokens into sink pages (kvq.h section 5), exact as kvq_append's store_sink
struct SinkItem {
    int64_t in_row;  // first input token of the item
    __half *dk;      // sink page row of its first token: K; V at + vo
    int32_t n;       // tokens
    int32_t pad_;
};
constexpr int MAXS = 96;
struct SinkArgs {
    const void *k, *v;
    int32_t dtype, HD;  // input dtype, H * D
    int64_t vo;         // elements from a sink page's K rows to its V rows
    int32_t n_items, pad_;
    SinkItem it[MAXS];
};


// ---- static plans (kvq_cuda.h section 5): the bookkeeping of lent sequences lives on the device
struct DevSeq {
    int32_t paged, win, whead, sink;  // as SeqLayer's (kvq_cuda.cu)
};
// What plan_kernel needs to write one layer's AppendArgs / SinkArgs / DecodeArgs into device memory for one decode
// step of the plan's n sequences: the fixed geometry, the step's pointers, and where the arguments go.
struct StaticPlanArgs {
    uint8_t *arena;
    int64_t page_bytes, max_tokens, win_elems;
    int32_t v_off, H, D, Gq, nqh, wcap, Gf, S, SR, n, nl, layer, max_pages, n_sm, window;
    int32_t dtype, vec, qo_dtype, q_dtype, rot_q, qnorm, rot_o, win_first, ww;
    float qscale, softcap;
    __half *windows;          // the cache's windows [max_seqs][nl][2][wcap][H][D]
    int32_t *tables;          // the cache's page tables [max_seqs][nl][max_pages]
    const int32_t *seqs;      // [n] the sequence ids
    const int32_t *spage;     // [n][nl] sink page (reserved by the plan where sinks are still to come), or -1
    DevSeq *st;               // [n][nl]
    int32_t *flag;            // set to 1 when a step found a sequence at max_tokens (its token dropped)
    const void *k, *v, *q;    // this step's inputs (k, v: after the rotation, if any)
    void *out;                // decode output (fp32 scratch when the values are rotated)
    float *part, *part_ml;
    int32_t *cnt;
    RotSigns rq;
    RotSigns ro;
    Levels lv;
    AppendArgs *gflush, *gwin;
    SinkArgs *gsink;
    DecodeArgs *gdec;
};
static_assert(sizeof(StaticPlanArgs) <= 4096, "plan parameters");

static_assert(sizeof(DecodeArgs) <= 4096, "decode parameters");
static_assert(sizeof(SinkArgs) <= 4096, "sink parameters");
static_assert(sizeof(AppendArgs) <= 4096, "append parameters");

// ---- device helpers ----
__device__ __forceinline__ float load_in(const void *p, int64_t i, int dt) {
    if (dt == KVQ_DTYPE_F16) return __half2float(((const __half *)p)[i]);
    if (dt == KVQ_DTYPE_BF16) return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
    return ((const float *)p)[i];
}
__device__ __forceinline__ float round_f16(float x) { return __half2float(__float2half_rn(x)); }
// x into element i of p as dt (f32, or f16 / bf16 rounded to nearest): load_in's inverse
__device__ __forceinline__ void store_as(void *p, int64_t i, float x, int dt) {
    if (dt == KVQ_DTYPE_F32) reinterpret_cast<float *>(p)[i] = x;
    else if (dt == KVQ_DTYPE_F16) reinterpret_cast<__half *>(p)[i] = __float2half_rn(x);
    else reinterpret_cast<__nv_bfloat16 *>(p)[i] = __float2bfloat16_rn(x);
}
// PTX helpers of the attention kernels (decode.cuh, prefill.cu)
__device__ __forceinline__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
// 2^x, flushing subnormal results to 0 (exp2f also handles them: four more instructions per call)
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
// BF: bf16 operands. BF16 pages enter the MMA as they are stored (Q^T and P in bf16 too) instead of converting every
// K and V pair to fp16 (page loop: 704 SASS instructions instead of 1349; F16 has 710).
template <bool BF = false>
__device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                    uint32_t b1) {
    if constexpr (BF)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}


}  // namespace kvqc

// Host side: f(std::integral_constant<int, T>{}) for the kvq_type t, so that a launcher reaches the kernel
// template of T with one switch for every caller (types outside the seven are rejected at cache creation).
template <class F> cudaError_t with_type(int t, F &&f) {
    switch (t) {
    case KVQ_TYPE_F16: return f(std::integral_constant<int, KVQ_TYPE_F16>{});
    case KVQ_TYPE_BF16: return f(std::integral_constant<int, KVQ_TYPE_BF16>{});
    case KVQ_TYPE_Q8: return f(std::integral_constant<int, KVQ_TYPE_Q8>{});
    case KVQ_TYPE_FP8: return f(std::integral_constant<int, KVQ_TYPE_FP8>{});
    case KVQ_TYPE_Q4: return f(std::integral_constant<int, KVQ_TYPE_Q4>{});
    case KVQ_TYPE_Q3: return f(std::integral_constant<int, KVQ_TYPE_Q3>{});
    default: return f(std::integral_constant<int, KVQ_TYPE_Q2>{});
    }
}

// The same for the head dim: f(std::integral_constant<int, D>{}) for D = 64, 256, and 128 for any other (cache
// creation refuses head dims other than these three).
template <class F> cudaError_t with_head_dim(int D, F &&f) {
    switch (D) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 256: return f(std::integral_constant<int, 256>{});
    default: return f(std::integral_constant<int, 128>{});
    }
}

// host-side launchers (defined in the .cu files)
namespace kvqc {
// portable: the sm_80 kernel (cp.async pipeline) instead of the Hopper one (bulk copies; sm_90 only)
cudaError_t launch_decode(int type_k, int type_v, int D, const DecodeArgs &a, cudaStream_t st, bool portable);
template <int TK> cudaError_t launch_decode_k(int type_v, int D, const DecodeArgs &a, cudaStream_t st, bool portable);
cudaError_t launch_append(int type_k, int type_v, int D, const AppendArgs &a, cudaStream_t st);
cudaError_t launch_sinks(const SinkArgs &a, cudaStream_t st);
// Static plans: the same kernels reading their arguments from device memory, which plan_kernel wrote there (so
// that a captured CUDA graph replays them with the arguments of each step). Grids are the plan's maxima; blocks
// past the step's items return at once. setup_only: set the kernel's attributes, launch nothing (before a capture).
cudaError_t launch_plan(const StaticPlanArgs &a, cudaStream_t st);
cudaError_t launch_decode_g(int type_k, int type_v, int D, const DecodeArgs *a, int grid, cudaStream_t st, bool portable,
                            bool setup_only);
template <int TK>
cudaError_t launch_decode_gk(int type_v, int D, const DecodeArgs *a, int grid, cudaStream_t st, bool portable, bool setup_only);
cudaError_t launch_append_g(int type_k, int type_v, int D, const AppendArgs *flush, const AppendArgs *win, int n,
                            int H, cudaStream_t st);
cudaError_t launch_sinks_g(const SinkArgs *a, int n, cudaStream_t st);

// Rotation jobs of one launch (blockIdx.y): rows vectors of D floats from in (in_dt) to out (out_dt), x <- R x
// (inverse 0) or R^T x (inverse 1) with the signs sg, or converted only (apply 0)
struct RotJob {
    const void *in;
    void *out;
    RotSigns sg;
    int32_t apply, pad_;
};
struct RotArgs {
    RotJob j[2];
    int64_t rows;
    int32_t in_dt, out_dt, inverse, n_jobs;
};
cudaError_t launch_rotate(const RotArgs &a, int D, cudaStream_t st);
}  // namespace kvqc

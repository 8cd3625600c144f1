// Static plans (kvq_cuda.h section 5): plan_kernel does on the device what kvq_cuda_append and kvq_cuda_attn_decode do
// on the host for one token per sequence (kvq_cuda.cu: the append's Plan and sink_take, run_entries; flush_count and
// make_entry_at are common.cuh's, shared with the host), from the lent sequences' DevSeq state, and writes the arguments of that step's sink, flush, window and
// decode kernels into device memory. The pages were reserved when the plan was made, so nothing here allocates, and
// the same arithmetic gives the same kernels' arguments, hence the eager path's bits.
#include "common.cuh"

namespace kvqc {

__device__ static void append_fixed(AppendArgs &a, const StaticPlanArgs &P) {
    a.arena = P.arena;
    a.page_bytes = P.page_bytes;
    a.v_off = P.v_off, a.H = P.H, a.wcap = P.wcap, a.direct = P.wcap == 1;
    a.dtype = P.dtype, a.vec = P.vec, a.qnorm = P.qnorm, a.lv = P.lv;
    a.k = P.k, a.v = P.v;
    a.n_items = 0, a.n_entries = 0, a.n_wtok = 0;
}

// Exclusive prefix sum over the warp's lanes and the total (lane i: sequence i)
__device__ __forceinline__ int64_t warp_excl(int64_t x, int64_t &total) {
    const int lane = threadIdx.x;
    int64_t inc = x;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
        const int64_t y = __shfl_up_sync(0xffffffffu, inc, d);
        if (lane >= d) inc += y;
    }
    total = __shfl_sync(0xffffffffu, inc, 31);
    return inc - x;
}

// One warp, lane i for sequence i (n <= MAXA = 32): the items' slots come from prefix sums over the lanes, in
// sequence order, as the host builds them.
__global__ void __launch_bounds__(32) plan_kernel(const __grid_constant__ StaticPlanArgs P) {
    const int i = threadIdx.x;
    const bool on = i < P.n;
    AppendArgs &F = *P.gflush, &W = *P.gwin;
    SinkArgs &S = *P.gsink;
    DecodeArgs &A = *P.gdec;
    const int64_t HD = (int64_t)P.H * P.D;
    DevSeq s{0, 0, 0, 0};
    int32_t *pt = nullptr, spg = -1;
    __half *wk = nullptr, *wv = nullptr;
    int64_t me = 0;
    int nnew = 0, ns = 0, T = 0, FG = 0, nw = 0;
    if (on) {
        const int64_t sl = (int64_t)P.seqs[i] * P.nl + P.layer;
        me = (int64_t)i * P.nl + P.layer;
        s = P.st[me];
        pt = P.tables + sl * P.max_pages;
        wk = P.windows + sl * 2 * P.win_elems, wv = wk + P.win_elems;
        spg = P.spage[me];
        // the append of one token (kvq_cuda_append): sinks first, then the window, a flush unit when it is full
        nnew = (int64_t)s.sink + s.paged + s.win < P.max_tokens ? 1 : 0;
        if (!nnew) *P.flag = 1;  // no room left: the token is dropped, kvq_cuda_static_end reports it
        ns = nnew && s.sink < P.S ? 1 : 0;
        T = s.win + nnew - ns;
        FG = (int)flush_count(T, P.wcap, P.Gf);
        nw = T - max(FG, (int)s.win);
    }
    int64_t n_sink, n_flush, n_win, n_wtok;
    const int64_t at_sink = warp_excl(ns, n_sink), at_flush = warp_excl(FG > 0, n_flush);
    const int64_t at_win = warp_excl(nw > 0, n_win), wstart = warp_excl(nw, n_wtok);
    int64_t units = 0;
    Entry E;
    if (on) {
        if (ns) S.it[at_sink] = SinkItem{i, (__half *)(P.arena + spg * P.page_bytes) + s.sink * HD, 1, 0};
        AppendEntry e;
        e.pt = pt, e.wk = wk, e.wv = wv;
        e.W0 = s.win, e.whead0 = s.whead, e.T = T, e.FG = FG;
        e.in_off = i + ns, e.wstart = 0;
        if (FG > 0) {  // paged is a multiple of Gf, which divides PT: one item, inside one reserved page
            const int64_t pos = s.paged;
            F.a[at_flush] = e;
            F.f[at_flush] = FlushItem{(int32_t)at_flush, 0, FG, (int32_t)(pos % PT), pt[pos / PT], -1};
        }
        if (nw > 0) {
            e.wstart = wstart;
            W.a[at_win] = e;
        }
        s.paged += FG;
        s.win = T - FG;
        s.whead = (s.whead + FG) % P.wcap;
        s.sink += ns;
        P.st[me] = s;
        // the decode entry of the new length (kvq_cuda.cu's make_entry)
        E = make_entry_at(pt, wk, wv, spg >= 0 ? (const __half *)(P.arena + spg * P.page_bytes) : nullptr, s.paged,
                          s.sink, s.whead, (int64_t)s.sink + s.paged + s.win, P.window, i);
    }
    // the window units' weight of kvq_cuda_attn_decode: from every lane's page units, then each entry's positions
    int64_t pages;
    warp_excl(on ? (int64_t)P.H * E.npu : 0, pages);
    const int ww = P.ww > 0 ? P.ww : win_weight((int64_t)P.n * P.H, pages, P.n_sm);
    if (on) {
        entry_weigh(E, ww);
        units = (int64_t)P.H * E.n;
    }
    int64_t total;
    const int64_t start = warp_excl(units, total);
    if (on) {
        E.start = start;
        A.e[i] = E;
    }
    if (i != 0) return;
    append_fixed(F, P);
    append_fixed(W, P);
    F.n_items = F.n_entries = (int32_t)n_flush;
    W.n_entries = (int32_t)n_win, W.n_wtok = n_wtok;
    S.k = P.k, S.v = P.v, S.dtype = P.dtype, S.HD = (int32_t)HD, S.vo = (int64_t)P.SR * HD, S.n_items = (int32_t)n_sink;
    A.arena = P.arena;
    A.page_bytes = P.page_bytes;
    A.v_off = P.v_off;
    A.H = P.H, A.Gq = P.Gq, A.Gs = P.Gq, A.nqh = P.nqh, A.wcap = P.wcap, A.D = P.D;
    A.qo_dtype = P.qo_dtype, A.q_dtype = P.q_dtype;
    A.sink_vo = (int32_t)(P.SR * HD);
    A.rot_q = P.rot_q, A.rq = P.rq, A.lv = P.lv;
    A.rot_o = P.rot_o, A.ro = P.ro, A.win_first = P.win_first;
#ifdef KVQ_DECODE_TRACE
    A.trace = nullptr;  // diagnostic builds trace the eager launches only (run_entries)
#endif
    A.qscale = P.qscale, A.softcap = P.softcap;
    A.q = P.q, A.out = P.out;
    A.part = P.part, A.part_ml = P.part_ml, A.cnt = P.cnt;
    A.n_entries = P.n;
    // run_entries' split: the same L, so the same CTA ranges and the same bits as the eager path
    int64_t L = (total + P.n_sm - 1) / P.n_sm;
    if (L < 1) L = 1;
    A.total = total, A.L = L, A.n_cta = (int32_t)((total + L - 1) / L);
}

cudaError_t launch_plan(const StaticPlanArgs &a, cudaStream_t st) {
    plan_kernel<<<1, 32, 0, st>>>(a);
    return cudaGetLastError();
}

}  // namespace kvqc

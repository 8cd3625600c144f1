// The tiled prefill's arguments and launchers (prefill.cu; called by kvq_cuda.cu's kvq_cuda_attn_prefill).
#pragma once
#include "common.cuh"

namespace kvqc {
// Tiled prefill (prefill.cu): the last n_q tokens of one (sequence, layer) as queries, FlashAttention-2 tiles over
// its sink rows, pages and window. Grid (query tiles, KV heads, splits); with splits > 1 each CTA writes its rows'
// unnormalised partials (part_o [split][row][D], part_ml [split][row][2]; row = token * nqh + query head) and
// launch_prefill_merge combines them.
struct PrefillArgs {
    const uint8_t *arena;
    int64_t page_bytes;
    const int32_t *pt;      // device page table of (seq, layer)
    const __half *wk, *wv;  // window rings [wcap][H][D]
    const __half *sk;       // sink page's K rows [SR][H][D] (NULL: no sinks); V rows at + sink_vo
    int32_t v_off, sink_vo;
    int32_t S, paged, win, whead, wcap;  // tokens in sinks, pages and window; ring row of window token 0; ring rows
    int32_t len, n_q, H, Gq, nqh, tpc;   // tokens in all; queries (the last n_q); KV/query heads; tokens per CTA
    int32_t tk, tv, q_dtype, o_dtype;    // key/value types; dtypes of q and out (the split partials are fp32)
    int32_t window, rot_q, rot_o, units, per_split;  // units: sink unit + pages + window units; per CTA split
    float qscale, softcap;
    const void *q;
    void *out;
    float *part_o, *part_ml;
    RotSigns rq, ro;
    Levels lv;
};
static_assert(sizeof(PrefillArgs) <= 4096, "prefill parameters");
cudaError_t launch_prefill(int D, const PrefillArgs &a, int splits, cudaStream_t st);
cudaError_t launch_prefill_merge(int D, const PrefillArgs &a, int splits, cudaStream_t st);
// rows of query (token, head) pairs a prefill CTA takes at head dim D (16 rows a warp; at D = 256 the registers of O
// allow 4 warps). 64 rows at D = 128 (4 CTAs of 4 warps per SM instead of 2 of 8) measured slower (docs/bench-cuda.md).
constexpr int prefill_rows(int D) { return D == 256 ? 64 : 128; }
}  // namespace kvqc

// Decode attention straight from the quantized pages (flash-decoding with a balanced split).
//
// Work: the "units" of all (row, KV head) pairs, a unit being one 64-token page or 64 rows of the fp16 window, are
// laid end to end and cut into n_cta equal ranges, one CTA each (one wave, so no tail). A CTA range may start
// and end inside a pair; the CTA's warps merge their partials of a pair in shared memory. A pair inside one CTA is
// written out there; otherwise each of its CTAs writes one partial (m, l, O), and the last of them to finish (a
// counter per pair) merges them and writes the output, so no second kernel is needed.
//
// Inside a CTA one producer warp streams each page's K block and V block (contiguous in the page) into a ring of
// shared-memory slots with the bulk copy engine (cp.async.bulk, completion on an mbarrier), so many KB are in
// flight per SM with a single issuing thread. W consumer warps take the pages round-robin. A consumer computes
//   S^T (64 tokens x 8 query-head columns) = K (64 x D) . Q^T            (mma m16n8k16, fp16 in (BF16: bf16), fp32 acc)
//   O^T (D x 8)                            = V^T (D x 64) . P^T
// dequantizing K and V in registers into the MMA fragments. Every query head of the KV head is one column, so each
// KV byte is read once for all of them (GQA). Quantization parameters are folded in where they are cheapest:
//   Q8/FP8 keys: score_t = s_t * (q . q_t)              (per-token scale after the MMA)
//   KIVI keys:   score_t = sum_c (q_c scale_c) q_tc + sum_c q_c min_c   (scale folded into the Q fragment)
//   Q8/FP8 values: P'_t = p_t s_t;  KIVI values: P'_t,g = p_t scale_t,g plus a rank-16 MMA for sum_t p_t min_t,g.
// Channel order inside a fragment is free (any permutation of the reduction index works when Q uses the same),
// which lets each quantized format use its cheapest unpacking (lop3 + magic 0x6400 fp16 exponent).
// This header holds the kernel templates; decode.cu dispatches over the key type to decode_k*.cu, which instantiate
// them (49 type pairs x 3 head dims compile in parallel there).
#pragma once
#include <stdio.h>
#include <stdlib.h>

#include "common.cuh"

namespace kvqc {

// ------------------------------------------------------------------------------------------------ PTX helpers
__device__ __forceinline__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(uint64_t *b, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(b)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t *b, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t *b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t *b, uint32_t parity) {
    asm volatile(
        "{\n.reg .pred p;\nWAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAIT_%=;\n}\n" ::"r"(smem_u32(b)),
        "r"(parity)
        : "memory");
}
// Release (this CTA's writes ordered before it by a bar.sync, too) and acquire, at GPU scope; old value into prev
__device__ __forceinline__ void atom_add_acq_rel(int32_t *p, int &prev) {
    asm volatile("atom.add.acq_rel.gpu.s32 %0, [%1], 1;" : "=r"(prev) : "l"(p) : "memory");
}
__device__ __forceinline__ void bulk_g2s(void *dst, const void *src, uint32_t bytes, uint64_t *bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_u32(dst)),
        "l"(src), "r"(bytes), "r"(smem_u32(bar))
        : "memory");
}

// ---- the portable pipeline's primitives (sm_80: cp.async and the mbarrier's init/arrive/test_wait; no bulk copies,
// try_wait or async-proxy fences). cp.async (not .bulk) is a weak generic-proxy write by the issuing thread, so
// no proxy fence orders the consumers' reads before the next copy into a slot: the empty barrier's release/acquire
// does, as for any other write.
__device__ __forceinline__ void mbar_arrive_p(uint64_t *b) {  // no sink destination (PTX 7.8 spelling on sm_80)
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(smem_u32(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait_p(uint64_t *b, uint32_t parity) {  // test_wait spins: sm_80 has no try_wait
    asm volatile(
        "{\n.reg .pred p;\nTWAIT_%=:\n"
        "mbarrier.test_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra TWAIT_%=;\n}\n" ::"r"(smem_u32(b)),
        "r"(parity)
        : "memory");
}
// 16 bytes global -> shared, bypassing L1 (.cg); both addresses 16-byte aligned (page blocks are padded to 16)
__device__ __forceinline__ void cp_async16(void *dst, const void *src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_u32(dst)), "l"(src) : "memory");
}
// An arrive-on of b, made by the hardware once every cp.async this thread issued before it has completed (its
// writes visible to a thread that then observes the phase complete with test_wait). noinc: the arrival counts
// against the count b was initialised with (32: one per producer lane).
__device__ __forceinline__ void cp_async_arrive(uint64_t *b) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_u32(b)) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }
// bytes (a multiple of 16) from src to dst, 16 per lane per step, by the 32 lanes of a warp
__device__ __forceinline__ void copy_block_p(uint8_t *dst, const uint8_t *src, int bytes, int lane) {
    for (int o = lane * 16; o < bytes; o += 32 * 16) cp_async16(dst + o, src + o);
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

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t s) { return __byte_perm(a, b, s); }
__device__ __forceinline__ uint32_t h2u(__half2 h) { return *reinterpret_cast<uint32_t *>(&h); }
__device__ __forceinline__ __half2 u2h(uint32_t u) { return *reinterpret_cast<__half2 *>(&u); }
__device__ __forceinline__ uint32_t pack_h2(float lo, float hi) { return h2u(__floats2half2_rn(lo, hi)); }
__device__ __forceinline__ uint32_t pack_bf2(float lo, float hi) {
    __nv_bfloat162 b = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&b);
}
// 2^x, flushing subnormal results to 0 (exp2f also handles them: four more instructions per call)
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// (x & MASK) | 0x6400 in each half is 1024 + v * 2^SH exactly. One lop3 (C++ would give two: the mask and the
// magic are both immediates, and a LOP3 takes one).
template <uint32_t MASK> __device__ __forceinline__ uint32_t magic_raw(uint32_t x) {
    uint32_t h;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(h) : "r"(x), "n"(MASK), "n"(0x64006400u));  // (a & b) | c
    return h;
}
// The B-bit code at bit SH of each half of x: 1024 + v * 2^SH when RAW, else mapped back to v by one HFMA2.
template <int B, int SH, bool RAW> __device__ __forceinline__ uint32_t code(uint32_t x) {
    constexpr uint32_t MASK = (((1u << B) - 1) << SH) * 0x00010001u;
    if constexpr (RAW) return magic_raw<MASK>(x);
    constexpr float inv = 1.0f / (float)(1 << SH);
    return h2u(__hfma2(u2h(magic_raw<MASK>(x)), __float2half2_rn(inv), __float2half2_rn(-1024.0f * inv)));
}
// h[F] = the code at bit B * F, for every code of a byte (F < 8 / B)
template <int B, bool RAW, int F = 0> __device__ __forceinline__ void codes_of_byte(uint32_t x, uint32_t *h) {
    h[F] = code<B, B * F, RAW>(x);
    if constexpr (F + 1 < 8 / B) codes_of_byte<B, RAW, F + 1>(x, h);
}
// int8 pair in bytes 0 and 1 of (x ^ 0x80808080), selected by s, to fp16 pair
__device__ __forceinline__ uint32_t i8pair(uint32_t u, uint32_t s) {
    uint32_t h = prmt(u, 0x64646464u, s);
    return h2u(__hsub2(u2h(h), __float2half2_rn(1152.0f)));
}
__device__ __forceinline__ uint32_t e4m3pair(uint32_t x16) {
    __half2_raw r = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(x16 & 0xffff), __NV_E4M3);
    return (uint32_t)r.x | ((uint32_t)r.y << 16);
}
__device__ __forceinline__ uint32_t bf2pair(uint32_t w) {  // bf16 pair -> fp16 pair
    return pack_h2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}

template <int N> struct Words { uint32_t w[N]; };
template <int N> __device__ __forceinline__ Words<N> ldw(const uint8_t *p) {
    Words<N> r;
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N / 4; i++) {
            uint4 v = reinterpret_cast<const uint4 *>(p)[i];
            r.w[4 * i] = v.x, r.w[4 * i + 1] = v.y, r.w[4 * i + 2] = v.z, r.w[4 * i + 3] = v.w;
        }
    } else if constexpr (N == 2) {
        uint2 v = *reinterpret_cast<const uint2 *>(p);
        r.w[0] = v.x, r.w[1] = v.y;
    } else {
        r.w[0] = *reinterpret_cast<const uint32_t *>(p);
    }
    return r;
}

// ------------------------------------------------------------------------------------------------ key fragments
// Thread (g = lane/4, j = lane%4) holds, for each of its tokens, the D/4 channels [j*D/4, (j+1)*D/4) as fp16
// pairs h[2s] (MMA k-slots 2j, 2j+1 of step s) and h[2s+1] (slots 2j+8, 2j+9). key_chan says which channel each
// slot holds, per format.
template <int T, int D> __host__ __device__ constexpr int key_chan(int s, int e) {
    constexpr int b = type_bits(T);
    if constexpr (b >= 8) return 4 * s + e;
    else if constexpr (b == 3) return 16 * (s / 4) + s % 4 + 4 * e;  // load_key_q3: pairs (i, i + 4), (i + 8, i + 12)
    else if constexpr (b == 4) {
        int c = 8 * (s / 2) + 2 * (s % 2);
        return c + (e == 0 ? 0 : e == 1 ? 4 : e == 2 ? 1 : 5);
    } else {
        int c = 16 * (s / 4) + 2 * (s % 4);
        return c + (e == 0 ? 0 : e == 1 ? 8 : e == 2 ? 1 : 9);
    }
}

// Grouped types: the bit offset SH of the codes in fragment register k of load_key (h[k] = 1024 + v * 2^SH).
// Q3: h[k] = 1024 + level, the level in 1/16 of the scale: 2^-4 for every k.
template <int T> __host__ __device__ constexpr int key_shift(int k) {
    return type_bits(T) == 3 ? 4 : type_bits(T) * (k % (8 / type_bits(T)));
}
// Where channel c of a thread's D/4 key channels sits in the key fragment: register 2 s + e / 2, half e % 2, for the
// (s, e) with key_chan(s, e) = c (constant-folded: the loops run at compile time)
template <int T, int D> __host__ __device__ constexpr int key_slot(int c) {
    for (int s = 0; s < D / 16; s++)
        for (int e = 0; e < 4; e++)
            if (key_chan<T, D>(s, e) == c) return 4 * s + e;  // register (4 s + e) / 2, half e % 2
    return -1;
}
template <int T, int D> struct KeySlots {  // key_slot of every channel, as a constant table
    int s[D / 4];
    constexpr KeySlots() : s() {
        for (int c = 0; c < D / 4; c++) s[c] = key_slot<T, D>(c);
    }
};
// The fp16 pair (word a's half ha, word b's half hb): a prmt selector
__host__ __device__ constexpr uint32_t pair_sel(int ha, int hb) { return (ha ? 0x32u : 0x10u) | (hb ? 0x7600u : 0x5400u); }

// ------------------------------------------------------------------------------------------------ Q3 codes
// Q3 (kvq.h section 5): a row is D/4 bytes of low 2 bits (channel c at byte c/4, bits 2 (c%4)), then D/8 bytes of high
// bits (channel c at byte D/4 + c/8, bit c%8). Its codes go through the role's levels (Levels, quant.c's lv_u3 or
// lv_n3): one prmt looks up two codes at once, its selector's nibbles 0 and 2 being the codes and the table's 8 bytes
// the levels, and (r & 0x00ff00ff) | 0x64006400 makes the fp16 pair 1024 + level (exact: levels < 256). Decoded:
// scale * level / 16 + min, so Q3's RAW halves carry 2^4 where Q4's and Q2's carry 2^SH.
__device__ __forceinline__ uint32_t lut_pair(uint32_t sel, const uint32_t (&lw)[2]) {
    return magic_raw<0x00ff00ffu>(prmt(lw[0], lw[1], sel));
}
// The high bits of 16 channels (h16: bit k = channel k) as 4 nibbles, nibble k in the low nibble of byte k (the upper
// nibbles are not used)
__device__ __forceinline__ uint32_t q3_hspread(uint32_t h16) {
    const uint32_t x = prmt(h16, 0u, 0x1100u);  // bytes h0, h0, h1, h1
    uint32_t v;
    asm("lop3.b32 %0, %1, %2, %3, 0xd8;" : "=r"(v) : "r"(x >> 4), "r"(x), "n"(0x00ff00ffu));  // (b & c) | (a & ~c)
    return v;
}
// Of a word of low bits L (bytes b: channels 4 b .. 4 b + 3) and its spread high bits v: the 3-bit codes of channels
// 4 b + I in bytes b (bits 3-7 zero, so that a byte's low nibble is a prmt selector)
template <int I> __device__ __forceinline__ uint32_t q3_codes(uint32_t L, uint32_t v) {
    const uint32_t lo = (L >> (2 * I)) & 0x03030303u;
    const uint32_t hi = I <= 2 ? v << (2 - I) : v >> 1;
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0xf8;" : "=r"(r) : "r"(lo), "r"(hi), "n"(0x04040404u));  // a | (b & c)
    return r;
}
// Q3 keys: thread j's D/4 channels of a row at `row`, RAW (1024 + level): per word of low bits (16 channels), shift I:
// h[8 m + 2 I] = channels (I, I + 4), h[8 m + 2 I + 1] = (I + 8, I + 12) of the word (key_chan's order)
template <int D>
__device__ __forceinline__ void load_key_q3(const uint8_t *row, int j, const uint32_t (&lw)[2], uint32_t (&h)[D / 8]) {
    constexpr int NW = D / 64;  // words of low bits; the high bits: NW halfwords
    uint32_t L[NW], Hh[NW];
    const uint8_t *lo = row + j * (D / 16), *hi = row + D / 4 + j * (D / 32);
    if constexpr (NW == 1) {
        L[0] = *reinterpret_cast<const uint32_t *>(lo);
        Hh[0] = *reinterpret_cast<const uint16_t *>(hi);
    } else if constexpr (NW == 2) {
        const uint2 a = *reinterpret_cast<const uint2 *>(lo);
        const uint32_t b = *reinterpret_cast<const uint32_t *>(hi);
        L[0] = a.x, L[1] = a.y, Hh[0] = b & 0xffffu, Hh[1] = b >> 16;
    } else {
        static_assert(NW == 4, "head dim");
        const uint4 a = *reinterpret_cast<const uint4 *>(lo);
        const uint2 b = *reinterpret_cast<const uint2 *>(hi);
        L[0] = a.x, L[1] = a.y, L[2] = a.z, L[3] = a.w;
        Hh[0] = b.x & 0xffffu, Hh[1] = b.x >> 16, Hh[2] = b.y & 0xffffu, Hh[3] = b.y >> 16;
    }
#pragma unroll
    for (int m = 0; m < NW; m++) {
        const uint32_t v = q3_hspread(Hh[m]);
        uint32_t c[4] = {q3_codes<0>(L[m], v), q3_codes<1>(L[m], v), q3_codes<2>(L[m], v), q3_codes<3>(L[m], v)};
#pragma unroll
        for (int i = 0; i < 4; i++) h[8 * m + 2 * i] = lut_pair(c[i], lw), h[8 * m + 2 * i + 1] = lut_pair(c[i] >> 16, lw);
    }
}

// RAW (grouped types): the halves stay 1024 + v * 2^SH; the key MMA's Q^T carries the 2^-SH (see key_shift) and the
// 1024 comes off the scores as a constant, which saves an HFMA2 per pair of codes.
template <int T, int D, bool RAW = false>
__device__ __forceinline__ void load_key(const uint8_t *chunk, uint32_t (&h)[D / 8]) {
    constexpr int b = type_bits(T), NW = D / 4 * b / 32, S = D / 16;
    Words<NW> x = ldw<NW>(chunk);
    if constexpr (T == KVQ_TYPE_F16 || T == KVQ_TYPE_BF16) {  // BF16: bf16 pairs for the bf16 MMA
#pragma unroll
        for (int k = 0; k < NW; k++) h[k] = x.w[k];
    } else if constexpr (T == KVQ_TYPE_Q8) {
#pragma unroll
        for (int s = 0; s < S; s++) {
            uint32_t u = x.w[s] ^ 0x80808080u;
            h[2 * s] = i8pair(u, 0x4140), h[2 * s + 1] = i8pair(u, 0x4342);
        }
    } else if constexpr (T == KVQ_TYPE_FP8) {
#pragma unroll
        for (int s = 0; s < S; s++) h[2 * s] = e4m3pair(x.w[s]), h[2 * s + 1] = e4m3pair(x.w[s] >> 16);
    } else {  // Q4, Q2: the codes of bytes 0 and 2, then of bytes 1 and 3, of each word
        constexpr int PB = 8 / b;  // codes per byte
#pragma unroll
        for (int m = 0; m < NW; m++) {
            codes_of_byte<b, RAW>(x.w[m], h + 2 * PB * m);
            codes_of_byte<b, RAW>(x.w[m] >> 8, h + 2 * PB * m + PB);
        }
    }
}

// Q^T fragment for the key MMA in the channel order of format T: qf holds this thread's channels (head g).
// BF16: bf16 pairs, for the bf16 MMA.
template <int T, int D> __device__ __forceinline__ void build_bq(const float (&qf)[D / 4], uint32_t (&bq)[D / 8]) {
    auto pack = [](float lo, float hi) { return T == KVQ_TYPE_BF16 ? pack_bf2(lo, hi) : pack_h2(lo, hi); };
#pragma unroll
    for (int s = 0; s < D / 16; s++) {
        bq[2 * s] = pack(qf[key_chan<T, D>(s, 0)], qf[key_chan<T, D>(s, 1)]);
        bq[2 * s + 1] = pack(qf[key_chan<T, D>(s, 2)], qf[key_chan<T, D>(s, 3)]);
    }
}

// ------------------------------------------------------------------------------------------------ value fragments
#ifndef KVQ_VALUE_RAW  // 0: grouped value codes mapped to v by an HFMA2 each (for A/B timing)
#define KVQ_VALUE_RAW 1
#endif
// Thread (g, j), k-step of 16 tokens: its tokens rows[0..3] are j, j+4, j+8, j+12 (MMA k-slots 2j, 2j+1 -> j, j+4
// and 2j+8, 2j+9 -> j+8, j+12; P is stored in that order); m-tile i = 4*hh + ii covers channels 64hh + 8g' + 2ii
// (+1 for rows g'+8) for g' = 0..7, so a thread reads the 8 channels [64hh + 8g, 64hh + 8g + 8) of each token.
// RAW (grouped types): the halves stay 1024 + v * 2^SH, as for the keys. SH depends only on the A row (rows g: SH
// = vsh<T>(i, 0), rows g + 8: vsh<T>(i, 1)), so O carries the 2^SH until the end of the pair's pages (unraw_values),
// and the 1024 comes off through an MMA per group whose A rows are all -1024 (corr in do_unit), folded into O after
// every page: left to the end of a 128k pair, the 1024 sum_t P'_t grows so large that the tensor core's
// truncating fp32 adds lose the values (NMSE 3e-4). One LOP3 per pair of codes instead of a LOP3 and an HFMA2.
template <int T> __host__ __device__ constexpr int vsh(int i, int hi) {
    return type_bits(T) == 3 ? 4 : type_bits(T) == 4 ? 4 * hi : 4 * ((i % 4) & 1) + 2 * hi;
}
// Q3 values are RAW whatever KVQ_VALUE_RAW says (their lookup gives 1024 + level)
template <int T, int D> constexpr bool value_raw() { return Traits<T, D>::grouped && (KVQ_VALUE_RAW || type_bits(T) == 3); }
// Channel of the value fragment's A row g (hi = 0) or g + 8 (hi = 1) in m-tile x = 4 hh + ii: 64 hh + 8 g + 2 ii + hi;
// for Q3 values 64 hh + 8 g + ii + 4 hi (value_frags' Q3 order; the fp16 window of a Q3 cache takes it too)
template <int TV> __host__ __device__ constexpr int value_chan(int x, int g, int hi) {
    return type_bits(TV) == 3 ? 64 * (x / 4) + 8 * g + x % 4 + 4 * hi : 64 * (x / 4) + 8 * g + 2 * (x % 4) + hi;
}

// Q3ORDER (16-bit rows: the fp16 window of a cache with Q3 values): rows in value_chan<Q3>'s order. lw: Q3's levels.
template <int T, int D, bool RAW = false, bool Q3ORDER = false>
__device__ __forceinline__ void value_frags(const uint8_t *const (&rows)[4], int g, uint32_t (&a)[D / 16][4],
                                            const uint32_t (&lw)[2]) {
    constexpr int b = type_bits(T), NH = D / 64;
#pragma unroll
    for (int hh = 0; hh < NH; hh++) {
        const int off = (64 * hh + 8 * g) * b / 8;
        if constexpr (b == 16) {
            uint4 w[4];
#pragma unroll
            for (int t = 0; t < 4; t++) w[t] = *reinterpret_cast<const uint4 *>(rows[t] + off);
#pragma unroll
            for (int ii = 0; ii < 4; ii++) {
                uint32_t *o = a[4 * hh + ii];
                if constexpr (Q3ORDER) {  // channels ii (rows g) and ii + 4 (rows g + 8): words ii / 2, ii / 2 + 2
                    const int wl = ii / 2, wh = ii / 2 + 2;
                    const uint32_t sel = ii % 2 ? 0x7632 : 0x5410;
                    o[0] = prmt((&w[0].x)[wl], (&w[1].x)[wl], sel), o[1] = prmt((&w[0].x)[wh], (&w[1].x)[wh], sel);
                    o[2] = prmt((&w[2].x)[wl], (&w[3].x)[wl], sel), o[3] = prmt((&w[2].x)[wh], (&w[3].x)[wh], sel);
                } else {
                    uint32_t x0 = (&w[0].x)[ii], x1 = (&w[1].x)[ii], x2 = (&w[2].x)[ii], x3 = (&w[3].x)[ii];
                    o[0] = prmt(x0, x1, 0x5410), o[1] = prmt(x0, x1, 0x7632);
                    o[2] = prmt(x2, x3, 0x5410), o[3] = prmt(x2, x3, 0x7632);  // BF16: bf16 pairs for the bf16 MMA
                }
            }
        } else if constexpr (b == 3) {
            // 8 channels of 4 tokens: low bits 2 bytes at 16 hh + 2 g, high bits 1 byte at D/4 + 8 hh + g. Tokens in
            // pairs (t0, t1), (t2, t3): bytes b of q3_codes<ii> = (token b / 2, channel 4 (b % 2) + ii)
            uint32_t lo[4], hb[4];
#pragma unroll
            for (int t = 0; t < 4; t++) {
                lo[t] = *reinterpret_cast<const uint16_t *>(rows[t] + 16 * hh + 2 * g);
                hb[t] = rows[t][D / 4 + 8 * hh + g];
            }
            const uint32_t L01 = prmt(lo[0], lo[1], 0x5410), L23 = prmt(lo[2], lo[3], 0x5410);
            const uint32_t v01 = q3_hspread(hb[0] | hb[1] << 8), v23 = q3_hspread(hb[2] | hb[3] << 8);
            auto one = [&](auto I) {
                constexpr int ii = decltype(I)::value;
                const uint32_t c01 = q3_codes<ii>(L01, v01), c23 = q3_codes<ii>(L23, v23);
                uint32_t *o = a[4 * hh + ii];
                o[0] = lut_pair(prmt(c01, 0u, 0x0020u), lw), o[1] = lut_pair(prmt(c01, 0u, 0x0031u), lw);
                o[2] = lut_pair(prmt(c23, 0u, 0x0020u), lw), o[3] = lut_pair(prmt(c23, 0u, 0x0031u), lw);
            };
            one(std::integral_constant<int, 0>{}), one(std::integral_constant<int, 1>{});
            one(std::integral_constant<int, 2>{}), one(std::integral_constant<int, 3>{});
        } else if constexpr (b == 8) {
            uint2 w[4];
#pragma unroll
            for (int t = 0; t < 4; t++) w[t] = *reinterpret_cast<const uint2 *>(rows[t] + off);
#pragma unroll
            for (int ii = 0; ii < 4; ii++) {
                const uint32_t sel = ii % 2 ? 0x7362 : 0x5140;
                uint32_t y01 = prmt((&w[0].x)[ii / 2], (&w[1].x)[ii / 2], sel);
                uint32_t y23 = prmt((&w[2].x)[ii / 2], (&w[3].x)[ii / 2], sel);
                uint32_t *o = a[4 * hh + ii];
                if constexpr (T == KVQ_TYPE_Q8) {
                    y01 ^= 0x80808080u, y23 ^= 0x80808080u;
                    o[0] = i8pair(y01, 0x4140), o[1] = i8pair(y01, 0x4342);
                    o[2] = i8pair(y23, 0x4140), o[3] = i8pair(y23, 0x4342);
                } else {
                    o[0] = e4m3pair(y01), o[1] = e4m3pair(y01 >> 16);
                    o[2] = e4m3pair(y23), o[3] = e4m3pair(y23 >> 16);
                }
            }
        } else if constexpr (b == 4) {
            uint32_t w[4];
#pragma unroll
            for (int t = 0; t < 4; t++) w[t] = *reinterpret_cast<const uint32_t *>(rows[t] + off);
#pragma unroll
            for (int ip = 0; ip < 2; ip++) {
                const uint32_t sel = ip ? 0x7632 : 0x5410;
                uint32_t y01 = prmt(w[0], w[1], sel), y23 = prmt(w[2], w[3], sel);
#pragma unroll
                for (int q = 0; q < 2; q++) {
                    uint32_t z01 = q ? y01 >> 8 : y01, z23 = q ? y23 >> 8 : y23;
                    uint32_t *o = a[4 * hh + 2 * ip + q];
                    o[0] = code<4, 0, RAW>(z01), o[1] = code<4, 4, RAW>(z01);
                    o[2] = code<4, 0, RAW>(z23), o[3] = code<4, 4, RAW>(z23);
                }
            }
        } else {
            uint32_t w[4];
#pragma unroll
            for (int t = 0; t < 4; t++) w[t] = *reinterpret_cast<const uint16_t *>(rows[t] + off);
            uint32_t y01 = prmt(w[0], w[1], 0x5410), y23 = prmt(w[2], w[3], 0x5410);
            uint32_t z01 = y01 >> 8, z23 = y23 >> 8;
            // channel k of the 8 sits in (k < 4 ? y : y >> 8) at bits 2 * (k % 4)
#pragma unroll
            for (int ii = 0; ii < 4; ii++) {
                uint32_t *o = a[4 * hh + ii];
                const int c0 = 2 * ii, c1 = 2 * ii + 1;
                uint32_t s0 = c0 < 4 ? y01 : z01, s1 = c1 < 4 ? y01 : z01;
                uint32_t s2 = c0 < 4 ? y23 : z23, s3 = c1 < 4 ? y23 : z23;
                const int sh0 = 2 * (c0 % 4), sh1 = 2 * (c1 % 4);
                static_assert(vsh<T>(1, 0) == 4 && vsh<T>(2, 1) == 2, "vsh matches the Q2 channel order");
                o[0] = sh0 == 0 ? code<2, 0, RAW>(s0) : code<2, 4, RAW>(s0);
                o[1] = sh1 == 2 ? code<2, 2, RAW>(s1) : code<2, 6, RAW>(s1);
                o[2] = sh0 == 0 ? code<2, 0, RAW>(s2) : code<2, 4, RAW>(s2);
                o[3] = sh1 == 2 ? code<2, 2, RAW>(s3) : code<2, 6, RAW>(s3);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------ kernel config
constexpr int PS_STRIDE = 80;  // fp16 per head row of P: 40 words, so 8-byte reads by 16 lanes hit 32 banks

// Consumer warps of the Q2 decode kernel (the other types use 7; see Cfg::W)
#ifndef KVQ_DECODE_WARPS_Q2
#define KVQ_DECODE_WARPS_Q2 11
#endif
#ifndef KVQ_F16_SLOTS_PER_WARP
#define KVQ_F16_SLOTS_PER_WARP 2
#endif
// PORT: the portable kernel (sm_80 and later: cp.async instead of bulk copies). Its shared memory must fit the
// smallest opt-in limit of the GPUs it serves, 99 KB (sm_86, sm_89, sm_120; sm_80 has 163 KB, sm_90/sm_100 227 KB),
// so its ring is 72 KB instead of 200: fewer slots, and fewer consumer warps where a slot is large.
constexpr int PORT_SMEM_MAX = 99 * 1024;
// Shared memory beside the ring with w consumer warps and ns slots: P tiles, mbarriers, merge buffers (4 D floats
// and (m, l) per warp), the two merge jobs
constexpr int smem_beside_ring(int D, int w, int ns) { return w * 8 * PS_STRIDE * 2 + 2 * ns * 8 + w * (4 * D + 16) * 4 + 2 * 24; }
// Slots of the ring with w consumer warps. D <= 128: the ring budget. D = 256: the merge buffers of the warps no longer
// fit beside a 200 KB ring, so the ring takes what they leave.
constexpr int ring_slots(int D, int slot, int budget, int smax, int w) {
    const int ring = D <= 128 || smax - smem_beside_ring(D, w, 64) > budget ? budget : smax - smem_beside_ring(D, w, 64);
    return ring / slot > 64 ? 64 : ring / slot;
}
// The most consumer warps, up to w, that get spw slots each
constexpr int fit_warps(int D, int slot, int budget, int smax, int spw, int w) {
    return w <= 1 || ring_slots(D, slot, budget, smax, w) / spw >= w ? w : fit_warps(D, slot, budget, smax, spw, w - 1);
}
template <int TK, int TV, int D, bool PORT = false> struct Cfg {
    using TRK = Traits<TK, D>;
    using TRV = Traits<TV, D>;
    static constexpr int SLOT = TRK::kblk + TRV::vblk;
    static constexpr int RING_BUDGET = PORT ? 72 * 1024 : 200 * 1024;
    static constexpr int SMEM_MAX = PORT ? PORT_SMEM_MAX : 227 * 1024;
    // Page r goes to warp r % W through slot r % NS, and NS is a multiple of W, so each slot has one consumer that
    // takes its rounds in order: an mbarrier parity wait is only sound when the waiter is at most one phase ahead,
    // which a shared round-robin over all slots cannot promise once a slow warp falls a ring behind.
    // Consumer warps, >= 2 slots each. 7 (up to 255 registers) by default; Q2, with half Q4's bytes for the same
    // arithmetic per token, runs 8% faster with 11 (168 registers, a few spilled). Measured on the H100, batch 8,
    // 128k: Q2 297 us with 11 warps vs 314 with 7; Q4 436 us with 7 vs 444 with 11 (2 slots each instead of 3).
    // F16/BF16 at D = 128 have 6 slots, so 3 warps; one slot each (6 warps, -DKVQ_F16_SLOTS_PER_WARP=1) measured
    // batch 1, 4k 17.9 us against 19.2, but batch 8, 4k 58.5 against 56.6 and batch 1, 16k 36.4 against 35.5.
    // D = 256: at most 7 (8 warps with the producer, so 2 per SM quadrant and 255 registers: Q2 with 8 had 168 and
    // spilled 556 bytes). Slots over 32 KB there (F16/BF16: 64 KB, 3 in the ring and 1 in the portable one; 8-bit
    // with 16-bit), one warp each.
    static constexpr int WMAX = TRK::bits == 2 && TRV::bits == 2 && D <= 128 ? KVQ_DECODE_WARPS_Q2 : 7;
    static constexpr int SPW = D > 128                                   ? (SLOT > 32 * 1024 ? 1 : 2)
                               : TRK::bits == 16 && TRV::bits == 16 && D == 128 ? KVQ_F16_SLOTS_PER_WARP
                                                                                : 2;
    static constexpr int W0 = fit_warps(D, SLOT, RING_BUDGET, SMEM_MAX, SPW, WMAX);
    static constexpr int NS0 = ring_slots(D, SLOT, RING_BUDGET, SMEM_MAX, W0);
    static constexpr int W = NS0 / SPW >= W0 ? W0 : NS0 / SPW;
    static constexpr int NS = NS0 / W * W;
    static_assert(W >= 1 && NS >= SPW * W, "ring");
    static constexpr int THREADS = (W + 1) * 32;
    // The W warps' partials of a pair meet in shared memory, 4 query heads at a time: MB floats each, and (m, l)
    static constexpr int MB = 4 * D;
    static constexpr int SMEM = NS * SLOT + W * 8 * PS_STRIDE * 2 + 2 * NS * 8 + W * (MB + 16) * 4 + 2 * 24;
    static_assert(SMEM <= SMEM_MAX, "shared memory");
};

// The Hopper kernel's device code is compiled for sm_90 only (sm_90a cubins load on 9.0 devices alone); for any other
// target its body is a trap, never launched: the host picks it only where the loaded image came from compute_90
// (kvq_cuda.cu, check_device). The portable kernel is compiled for every target.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900
constexpr bool HOPPER_CODE = true;
#else
constexpr bool HOPPER_CODE = false;
#endif

struct Visible { int lo, hi; };  // unit-local valid token range

// P's bits in shared memory: fp16, or bf16 for the bf16 MMAs
template <bool BF> __device__ __forceinline__ __half to_p(float p) {
    if constexpr (BF) return __ushort_as_half(__bfloat16_as_ushort(__float2bfloat16_rn(p)));
    return __float2half_rn(p);
}

// One unit of 64 tokens for one warp. KROW(t)/VROW(t): row pointers; kpar/vpar: parameter areas (page units).
template <int TK, int TV, int D, bool WINDOW>
__device__ __forceinline__ void do_unit(const DecodeArgs &A, int Gq, const uint8_t *kblk, const uint8_t *vblk,
                                        const __half *wk, const __half *wv, int wrow0, int wcap, Visible vis,
                                        const uint32_t (&bq)[D / 8], float (&m)[2], float (&l)[2], float (&o)[D / 16][4],
                                        float (&bacc)[4], __half *ps, int lane) {
    using TRK = Traits<TK, D>;
    using TRV = Traits<TV, D>;
    constexpr int KT = WINDOW ? KVQ_TYPE_F16 : TK, VT = WINDOW ? KVQ_TYPE_F16 : TV;  // the window is fp16
    constexpr bool BFK = KT == KVQ_TYPE_BF16;  // bf16 key MMAs: Q^T (bq) in bf16 too
    constexpr bool BFV = VT == KVQ_TYPE_BF16;  // bf16 value MMAs: P in bf16 too
    constexpr int KROWB = type_bits(KT) * D / 8, VROWB = type_bits(VT) * D / 8;
    const int g = lane >> 2, j = lane & 3;
    const int H = A.H;
    const uint32_t lk[2] = {A.lv.k[0], A.lv.k[1]}, lvv[2] = {A.lv.v[0], A.lv.v[1]};  // Q3's levels
    // Window rows past the visible ones are masked, but they are read: clamp them to a visible row, since the ring
    // may hold fewer than 64 rows (F16/Q8 with a small residual) and its other rows may be stale.
    const int tmax = vis.hi - 1;
    // Row t of the unit: a window ring row (w), or row t of a page block (blk, rowb bytes a row)
    auto row = [&](int t, const __half *w, const uint8_t *blk, int rowb) -> const uint8_t * {
        if constexpr (WINDOW) {
            int r = wrow0 + min(t, tmax);
            r = r >= wcap ? r - wcap : r;
            return reinterpret_cast<const uint8_t *>(w + (int64_t)r * H * D);
        } else {
            return blk + t * rowb;
        }
    };
    auto krow = [&](int t) { return row(t, wk, kblk, KROWB); };
    auto vrow = [&](int t) { return row(t, wv, vblk, VROWB); };

    // ---- keys: S^T = K Q^T
    float s[4][4];
    if constexpr (TRK::grouped && !WINDOW) {
        // KIVI keys, per channel c: k = scale_c q_c + min_c. Q^T times the page's scales (fp16 pairs, in the key
        // fragment's channel order: pairs (c, c + OFF) and (c + 1, c + OFF + 1)), and sum_c q_c min_c as a
        // rank-1 MMA whose A rows all hold the mins: it starts every score accumulator.
        const uint8_t *kp = kblk + PT * TRK::row + j * (D / 4) * 2;  // scales [D], then mins [D] (fp16)
        const Words<D / 8> ksw = ldw<D / 8>(kp), kmw = ldw<D / 8>(kp + 2 * D);
        // The key halves are 1024 + v 2^SH (load_key RAW): Q^T also carries 2^-SH, and -1024 sum_c (that Q^T)_c
        // joins the constant. Products of fp16 are exact in fp32; the two sums round differently, by ~1e-4 of a
        // score (decode NMSE against the scalar CPU reference: ~3e-7, as before this folding).
        uint32_t bs[D / 8];
        // Two accumulators, added to the scores at the end: MMAs chain on their accumulator, and one chain of 2 D/16
        // ahead of the score chains was the longest dependency of the page (the warps are latency-bound: Q2's
        // arithmetic alone took 257 us at batch 8, 128k, as long as its loads alone).
        float kb[4] = {0.f, 0.f, 0.f, 0.f}, kc[4] = {0.f, 0.f, 0.f, 0.f};
        constexpr uint32_t M1024 = 0xE400E400u;  // (-1024, -1024)
#pragma unroll
        for (int st = 0; st < D / 16; st++) {
            uint32_t mp[2];  // the mins of register 2 st + e's channels (key_chan(st, 2 e), key_chan(st, 2 e + 1))
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int k = 2 * st + e, ca = key_chan<TK, D>(st, 2 * e), cb = key_chan<TK, D>(st, 2 * e + 1);
                const uint32_t sel = pair_sel(ca % 2, cb % 2);
                __half2 b = __hmul2(u2h(bq[k]), u2h(prmt(ksw.w[ca / 2], ksw.w[cb / 2], sel)));
                if (key_shift<TK>(k) > 0) b = __hmul2(b, __float2half2_rn(1.0f / (float)(1 << key_shift<TK>(k))));
                bs[k] = h2u(b);
                mp[e] = prmt(kmw.w[ca / 2], kmw.w[cb / 2], sel);
            }
            const uint32_t m0 = mp[0], m1 = mp[1];
            mma(kb, m0, m0, m1, m1, bq[2 * st], bq[2 * st + 1]);
            mma(kc, M1024, M1024, M1024, M1024, bs[2 * st], bs[2 * st + 1]);
        }
#pragma unroll
        for (int mt = 0; mt < 4; mt++) {  // from 0, not from kb: these chains need not wait for kb's
            s[mt][0] = s[mt][1] = s[mt][2] = s[mt][3] = 0.f;
            uint32_t ha[D / 8], hb[D / 8];
            if constexpr (KT == KVQ_TYPE_Q3) {
                load_key_q3<D>(krow(16 * mt + g), j, lk, ha);
                load_key_q3<D>(krow(16 * mt + g + 8), j, lk, hb);
            } else {
                load_key<KT, D, true>(krow(16 * mt + g) + j * (KROWB / 4), ha);
                load_key<KT, D, true>(krow(16 * mt + g + 8) + j * (KROWB / 4), hb);
            }
#pragma unroll
            for (int st = 0; st < D / 16; st++) mma(s[mt], ha[2 * st], hb[2 * st], ha[2 * st + 1], hb[2 * st + 1], bs[2 * st], bs[2 * st + 1]);
        }
#pragma unroll
        for (int mt = 0; mt < 4; mt++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[mt][e] += kb[e] + kc[e];
    } else {
        // the window is fp16: grouped types keep Q^T in their key order, which pairs channels (c, c + OFF)
        uint32_t bw[D / 8];
        if constexpr (TK == KVQ_TYPE_Q3) {  // natural pairs (2 x, 2 x + 1) from wherever key_chan put them
            constexpr KeySlots<TK, D> ks{};
#pragma unroll
            for (int x = 0; x < D / 8; x++) {
                const int s0 = ks.s[2 * x], s1 = ks.s[2 * x + 1];
                bw[x] = prmt(bq[s0 / 2], bq[s1 / 2], pair_sel(s0 % 2, s1 % 2));
            }
        } else if constexpr (TRK::grouped) {
            constexpr int OFF = TRK::bits == 4 ? 4 : 8;
#pragma unroll
            for (int st = 0; st < D / 16; st++) {
                const int c = key_chan<TK, D>(st, 0);
                bw[c / 2] = prmt(bq[2 * st], bq[2 * st + 1], 0x5410);
                bw[(c + OFF) / 2] = prmt(bq[2 * st], bq[2 * st + 1], 0x7632);
            }
        } else {
#pragma unroll
            for (int x = 0; x < D / 8; x++) bw[x] = TK == KVQ_TYPE_BF16 && WINDOW ? bf2pair(bq[x]) : bq[x];
        }
#pragma unroll
        for (int mt = 0; mt < 4; mt++) {
            s[mt][0] = s[mt][1] = s[mt][2] = s[mt][3] = 0.f;
            uint32_t ha[D / 8], hb[D / 8];
            load_key<KT, D>(krow(16 * mt + g) + j * (KROWB / 4), ha);
            load_key<KT, D>(krow(16 * mt + g + 8) + j * (KROWB / 4), hb);
#pragma unroll
            for (int st = 0; st < D / 16; st++) mma<BFK>(s[mt], ha[2 * st], hb[2 * st], ha[2 * st + 1], hb[2 * st + 1], bw[2 * st], bw[2 * st + 1]);
        }
    }
    // ---- scores: per-token scales, soft-cap, mask (both branches warp-uniform)
    if constexpr (TRK::scaled && !WINDOW) {
        const __half *ksc = reinterpret_cast<const __half *>(kblk + PT * TRK::row);
#pragma unroll
        for (int mt = 0; mt < 4; mt++) {
            const float s0 = __half2float(ksc[16 * mt + g]), s1 = __half2float(ksc[16 * mt + g + 8]);
            s[mt][0] *= s0, s[mt][1] *= s0, s[mt][2] *= s1, s[mt][3] *= s1;
        }
    }
    if (A.softcap > 0.f) {
#pragma unroll
        for (int mt = 0; mt < 4; mt++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[mt][e] = A.softcap * tanhf(s[mt][e] / A.softcap) * 1.4426950408889634f;
    }
    if (vis.lo > 0 || vis.hi < PT) {
#pragma unroll
        for (int mt = 0; mt < 4; mt++)
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int t = 16 * mt + g + 8 * r;
                if (t < vis.lo || t >= vis.hi) s[mt][2 * r] = s[mt][2 * r + 1] = -INFINITY;
            }
    }
    // ---- online softmax per head column (2j, 2j+1); P goes to shared memory as fp16 for the value MMA
    float alpha[2];
#pragma unroll
    for (int c = 0; c < 2; c++) {
        float mx = -INFINITY;
#pragma unroll
        for (int mt = 0; mt < 4; mt++) mx = fmaxf(mx, fmaxf(s[mt][c], s[mt][2 + c]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
        const float mnew = fmaxf(m[c], mx);
        const float mref = mnew == -INFINITY ? 0.f : mnew;  // all masked so far: p = 0, not NaN
        alpha[c] = ex2(m[c] - mref);                        // m = -inf: 0
        float sum = 0.f;
        __half *prow = ps + (2 * j + c) * PS_STRIDE;
#pragma unroll
        for (int mt = 0; mt < 4; mt++) {
            const float p0 = ex2(s[mt][c] - mref), p1 = ex2(s[mt][2 + c] - mref);
            sum += p0 + p1;
            // token tau = 16 mt + x is stored at 16 mt + 4 (x % 4) + x / 4, the value MMA's k-slot order (below)
            prow[16 * mt + 4 * (g % 4) + g / 4] = to_p<BFV>(p0);
            prow[16 * mt + 4 * (g % 4) + 2 + g / 4] = to_p<BFV>(p1);
        }
        l[c] = l[c] * alpha[c] + sum;  // this thread's rows only: summed over the warp once, at the end of the pair
        m[c] = mnew;
    }
    // Past the first pages the running maxima rarely move: skip the rescale when no column's did.
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
        for (int c = 0; c < 2; c++) {
#pragma unroll
            for (int i = 0; i < D / 16; i++) o[i][c] *= alpha[c], o[i][2 + c] *= alpha[c];
            bacc[c] *= alpha[c], bacc[2 + c] *= alpha[c];
        }
    }
    __syncwarp();
    // ---- values: O^T += V^T P'^T
    const bool head_ok = g < Gq;
    float corr[D / 64][4] = {};  // RAW values: -1024 sum_t P'_t of each channel group (every row alike)
#pragma unroll
    for (int ks = 0; ks < 4; ks++) {
        // Thread j's tokens are t0 + 4e (e < 4): for each e the lanes j = 0..3 read consecutive rows, on different
        // banks (tokens 4j..4j+3 put all four on the same banks for the 64/32-byte rows of Q4/Q2: a 4-way conflict).
        const int t0 = 16 * ks + j;
        const uint2 pp = head_ok ? *reinterpret_cast<const uint2 *>(ps + g * PS_STRIDE + 16 * ks + 4 * j) : make_uint2(0u, 0u);
        const uint32_t p01 = pp.x, p23 = pp.y;  // fp16 p of tokens (t0, t0 + 4), (t0 + 8, t0 + 12), head g
        const uint8_t *rows[4] = {vrow(t0), vrow(t0 + 4), vrow(t0 + 8), vrow(t0 + 12)};
        uint32_t a[D / 16][4];
        constexpr bool VRAW = !WINDOW && value_raw<TV, D>();
        value_frags<VT, D, VRAW, WINDOW && TV == KVQ_TYPE_Q3>(rows, g, a, lvv);
        if constexpr (TRV::grouped && !WINDOW) {
            constexpr int NG = TRV::ng;
            // (scale, min) fp16 pairs of tokens t0 + 4t, t < 4, groups 0..NG-1: word t * NG + group
            Words<4 * NG> vw;
#pragma unroll
            for (int t = 0; t < 4; t++) {
                const Words<NG> x = ldw<NG>(vblk + PT * TRV::row + (t0 + 4 * t) * NG * 4);
#pragma unroll
                for (int k = 0; k < NG; k++) vw.w[t * NG + k] = x.w[k];
            }
#pragma unroll
            for (int hh = 0; hh < NG; hh++) {
                const uint32_t b0 = h2u(__hmul2(u2h(p01), u2h(prmt(vw.w[hh], vw.w[NG + hh], 0x5410))));
                const uint32_t b1 = h2u(__hmul2(u2h(p23), u2h(prmt(vw.w[2 * NG + hh], vw.w[3 * NG + hh], 0x5410))));
#pragma unroll
                for (int ii = 0; ii < 4; ii++) mma(o[4 * hh + ii], a[4 * hh + ii][0], a[4 * hh + ii][1], a[4 * hh + ii][2], a[4 * hh + ii][3], b0, b1);
                if constexpr (VRAW) mma(corr[hh], 0xE400E400u, 0xE400E400u, 0xE400E400u, 0xE400E400u, b0, b1);
            }
            if constexpr (VRAW) {
                if (ks == 3) {
#pragma unroll
                    for (int x = 0; x < D / 16; x++)
#pragma unroll
                        for (int e = 0; e < 4; e++) o[x][e] += corr[x / 4][e];
                }
            }
            // mins: A row g = value group g (g < NG), B = unscaled p
            uint32_t am0 = 0u, am2 = 0u;
            if (g < NG) {
                uint32_t w[4];
#pragma unroll
                for (int t = 0; t < 4; t++) {  // word t * NG + g, by selects (a dynamic index would spill vw)
                    w[t] = vw.w[t * NG];
#pragma unroll
                    for (int k = 1; k < NG; k++) w[t] = g == k ? vw.w[t * NG + k] : w[t];
                }
                am0 = prmt(w[0], w[1], 0x7632), am2 = prmt(w[2], w[3], 0x7632);
            }
            mma(bacc, am0, 0u, am2, 0u, p01, p23);
        } else {
            uint32_t b0 = p01, b1 = p23;
            if constexpr (TRV::scaled && !WINDOW) {
                const uint16_t *vs = reinterpret_cast<const uint16_t *>(vblk + PT * TRV::row) + t0;  // fp16 scales
                b0 = h2u(__hmul2(u2h(p01), u2h(prmt(vs[0], vs[4], 0x5410))));
                b1 = h2u(__hmul2(u2h(p23), u2h(prmt(vs[8], vs[12], 0x5410))));
            }
#pragma unroll
            for (int i = 0; i < D / 16; i++) mma<BFV>(o[i], a[i][0], a[i][1], a[i][2], a[i][3], b0, b1);
        }
    }
    __syncwarp();
}

// After a pair's page units (before its fp16 window units): O of the RAW value codes back to the values' scale.
template <int TV, int D> __device__ __forceinline__ void unraw_values(float (&o)[D / 16][4]) {
    if constexpr (value_raw<TV, D>()) {
#pragma unroll
        for (int x = 0; x < D / 16; x++)
#pragma unroll
            for (int c = 0; c < 2; c++) {
                o[x][c] *= 1.0f / (float)(1 << vsh<TV>(x, 0));
                o[x][2 + c] *= 1.0f / (float)(1 << vsh<TV>(x, 1));
            }
    }
}

// The CTAs whose ranges hold units of (entry E, head h): [c0, c1]. Their partials sit in slots pair + c0 .. pair + c1.
__host__ __device__ __forceinline__ void pair_ctas(const DecodeArgs &A, const Entry &E, int h, int64_t &c0, int64_t &c1) {
    const int64_t su = E.start + (int64_t)h * E.n;
    c0 = su / A.L, c1 = (su + E.n - 1) / A.L;
}

// Unit k of entry E: page or window unit, and its visible token range.
__device__ __forceinline__ void unit_info(const Entry &E, int k, bool &page, int &idx, Visible &v) {
    if (k < E.npu) {
        page = true;
        idx = E.lo / PT + k;
        int t0 = idx * PT, pe = min(E.paged, E.hi);
        v.lo = max(E.lo - t0, 0), v.hi = min(pe - t0, PT);
    } else {
        page = false;
        int ws = max(E.lo, E.paged) - E.paged, we = E.hi - E.paged;
        idx = ws / PT + (k - E.npu);
        int t0 = idx * PT;
        v.lo = max(ws - t0, 0), v.hi = min(we - t0, PT);
    }
}

// Where a CTA range continues at pos, inside entry E: head h, and the units [k0, kend) of (E, h) before end
struct Span { int h, k0, kend; };
__device__ __forceinline__ Span span_at(const Entry &E, int64_t pos, int64_t end) {
    const int64_t rel = pos - E.start;
    Span p;
    p.h = (int)(rel / E.n), p.k0 = (int)(rel - (int64_t)p.h * E.n);
    p.kend = (int)min((int64_t)E.n, p.k0 + (end - pos));
    return p;
}
// Past the span: the next pair, of entry i + 1 after the last head
__device__ __forceinline__ void span_next(const Entry &E, const Span &p, int H, int64_t &pos, int &i) {
    pos += p.kend - p.k0;
    if (p.kend == E.n && p.h == H - 1) i++;
}

__device__ __forceinline__ int find_entry(const DecodeArgs &A, int64_t pos) {
    int lo = 0, hi = A.n_entries - 1;  // last entry with start <= pos
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (A.e[mid].start <= pos) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

__device__ __forceinline__ void store_out(const DecodeArgs &A, int64_t i, float x) {
    if (A.qo_dtype == KVQ_DTYPE_F32) reinterpret_cast<float *>(A.out)[i] = x;
    else if (A.qo_dtype == KVQ_DTYPE_F16) reinterpret_cast<__half *>(A.out)[i] = __float2half_rn(x);
    else reinterpret_cast<__nv_bfloat16 *>(A.out)[i] = __float2bfloat16_rn(x);
}

// The last CTA of a pair merges its ns partials (slots s0 ..) into the output rows orow .. orow + Gq - 1: a thread
// per 4 output channels, slots in batches of MB whose loads are all in flight at once (the partials are L2 hits and
// the merge is on the critical path of the step), folded in with a running maximum. Slots in order, so the result
// does not depend on which CTA came last. __ldcg: the partials come from other SMs.
template <int D, int NT>
__device__ __forceinline__ void merge_pair(const DecodeArgs &A, int64_t s0, int ns, int64_t orow) {
    constexpr int D4 = D / 4, MB = 16;
    const int Gq = A.Gq;
    const int64_t stride = (int64_t)Gq * D4;                                    // float4s from a slot to the next
    const float2 *ml = reinterpret_cast<const float2 *>(A.part_ml) + s0 * Gq;  // [ns][Gq] (m, l)
    const float4 *part = reinterpret_cast<const float4 *>(A.part) + s0 * stride;
    for (int v = threadIdx.x; v < Gq * D4; v += NT) {
        const int hq = v / D4;
        float M = -INFINITY, den = 0.f;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int s = 0; s < ns; s += MB) {
            float2 m[MB];
            float4 x[MB];
#pragma unroll
            for (int k = 0; k < MB; k++) {
                m[k] = make_float2(-INFINITY, 0.f), x[k] = make_float4(0.f, 0.f, 0.f, 0.f);
                if (s + k < ns) m[k] = __ldcg(ml + (s + k) * Gq + hq), x[k] = __ldcg(part + (s + k) * stride + v);
            }
            float Mn = M;
#pragma unroll
            for (int k = 0; k < MB; k++) Mn = fmaxf(Mn, m[k].x);
            if (Mn == -INFINITY) continue;                // no tokens so far
            const float a = M == -INFINITY ? 0.f : exp2f(M - Mn);
            den *= a, acc.x *= a, acc.y *= a, acc.z *= a, acc.w *= a;
#pragma unroll
            for (int k = 0; k < MB; k++) {
                const float w = m[k].x == -INFINITY ? 0.f : exp2f(m[k].x - Mn);  // a CTA without tokens of the pair: 0
                den += w * m[k].y;
                acc.x += w * x[k].x, acc.y += w * x[k].y, acc.z += w * x[k].z, acc.w += w * x[k].w;
            }
            M = Mn;
        }
        const float inv = 1.f / den;
        const int64_t o = (orow + hq) * D + (v % D4) * 4;
        store_out(A, o, acc.x * inv), store_out(A, o + 1, acc.y * inv);
        store_out(A, o + 2, acc.z * inv), store_out(A, o + 3, acc.w * inv);
    }
}

template <int TK, int TV, int D, bool PORT>
__device__ __forceinline__ void decode_body(const DecodeArgs &A);

// PORT = false: the Hopper pipeline (bulk copies, one issuing lane, try_wait). PORT = true: the portable one. Both
// run the same body (decode_body); only how a slot is filled, signalled and waited for differs:
//   full[s]  Hopper: count 1, the producer's arrive.expect_tx plus the bulk copies' complete_tx bytes.
//            Portable: count 32, one cp.async.mbarrier.arrive.noinc per producer lane, each triggered when that
//            lane's cp.async copies of the slot have completed, so the phase ends when the whole slot has landed.
//   empty[s] count 1 in both: lane 0 of the slot's consumer warp after a __syncwarp (the warp's reads of the slot
//            happen before it), a release; the producer's lanes wait for it (acquire) before copying into the slot
//            again. Hopper also needs fence.proxy.async (bulk copies write through the async proxy); cp.async does not.
//   waits    Hopper: mbarrier.try_wait.parity; portable: mbarrier.test_wait.parity in a loop (acquire at CTA scope).
template <int TK, int TV, int D, bool PORT>
__global__ void __launch_bounds__(Cfg<TK, TV, D, PORT>::THREADS, 1) decode_kernel(const __grid_constant__ DecodeArgs A) {
    if constexpr (PORT || HOPPER_CODE) decode_body<TK, TV, D, PORT>(A);
    else __trap();
}

template <int TK, int TV, int D, bool PORT>
__device__ __forceinline__ void decode_body(const DecodeArgs &A) {
    using C = Cfg<TK, TV, D, PORT>;
    using TRK = Traits<TK, D>;
    using TRV = Traits<TV, D>;
    constexpr int NS = C::NS, W = C::W;
    extern __shared__ __align__(128) uint8_t smem[];
    uint8_t *ring = smem;
    __half *psall = reinterpret_cast<__half *>(smem + NS * C::SLOT);
    uint64_t *full = reinterpret_cast<uint64_t *>(smem + NS * C::SLOT + W * 8 * PS_STRIDE * 2);
    uint64_t *empty = full + NS;
    float *mbuf = reinterpret_cast<float *>(empty + NS);  // [W][MB] partial O of 4 heads
    float *mlb = mbuf + W * C::MB;                       // [W][8][2] partial (m, l)
    struct Job { int64_t s0, orow; int ns, u; };       // a shared pair to merge (ns = 0: none)
    Job *jobs = reinterpret_cast<Job *>(mlb + W * 16);  // [2], written by thread 0
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int cta = blockIdx.x;
    const int64_t beg = (int64_t)cta * A.L, end = min(beg + A.L, A.total);
    if (threadIdx.x == 0) {
        for (int i = 0; i < NS; i++) mbar_init(&full[i], PORT ? 32 : 1), mbar_init(&empty[i], 1);
        if constexpr (!PORT) {  // (portable: the __syncthreads below orders the inits before every use)
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        }
    }
    __syncthreads();
    if (beg >= end) return;
    const int H = A.H;

    if (warp == W) {  // ---------------- producer
        int r = 0;
        int i = find_entry(A, beg);
        for (int64_t pos = beg; pos < end;) {
            const Entry &E = A.e[i];
            const Span sp = span_at(E, pos, end);
            const int h = sp.h, k0 = sp.k0, pend = min(sp.kend, E.npu);
            const int pfirst = E.lo / PT;
            for (int kb = k0; kb < pend; kb += 32) {
                int kk = kb + lane;
                int pid = kk < pend ? E.pt[pfirst + kk] : 0;
                int cnt = min(32, pend - kb);
                for (int x = 0; x < cnt; x++) {
                    int id = __shfl_sync(0xffffffffu, pid, x);
                    if constexpr (PORT) {  // every lane: wait for the slot, copy its share, arrive when it landed
                        const int sl = r % NS;
                        mbar_wait_p(&empty[sl], ((r / NS) & 1) ^ 1);
#ifdef KVQ_NO_LOAD
                        mbar_arrive_p(&full[sl]);
#else
                        const uint8_t *pg = A.arena + (int64_t)id * A.page_bytes;
                        copy_block_p(ring + sl * C::SLOT, pg + h * TRK::kblk, TRK::kblk, lane);
                        copy_block_p(ring + sl * C::SLOT + TRK::kblk, pg + A.v_off + h * TRV::vblk, TRV::vblk, lane);
                        cp_async_arrive(&full[sl]);
#endif
                    } else if (lane == 0) {
                        const int sl = r % NS;
                        mbar_wait(&empty[sl], ((r / NS) & 1) ^ 1);
#ifdef KVQ_NO_LOAD  // timing experiment: the consumers' arithmetic alone, on whatever the slot holds
                        mbar_arrive(&full[sl]);
#else
                        mbar_expect_tx(&full[sl], C::SLOT);
                        const uint8_t *pg = A.arena + (int64_t)id * A.page_bytes;
                        bulk_g2s(ring + sl * C::SLOT, pg + h * TRK::kblk, TRK::kblk, &full[sl]);
                        bulk_g2s(ring + sl * C::SLOT + TRK::kblk, pg + A.v_off + h * TRV::vblk, TRV::vblk, &full[sl]);
#endif
                    }
                    r++;
                }
            }
            span_next(E, sp, H, pos, i);
        }
        if constexpr (PORT) cp_async_wait_all();  // (the consumers waited for every copy already; tidy for the tools)
    } else {  // ---------------- consumers
        const int g = lane >> 2, j = lane & 3, Gq = A.Gq;
        __half *ps = psall + warp * 8 * PS_STRIDE;
        int r = 0, qw = 0;  // pages (slot ring) and window units seen so far
        // Pairs shared with other CTAs: at most the first (begun before beg) and the last (going on after end)
        int nshp = 0, prev[2] = {0, 0};  // shared pairs met; thread 0: their counts before this CTA's arrival
        int i = find_entry(A, beg);
        for (int64_t pos = beg; pos < end;) {
            const Entry &E = A.e[i];
            const Span sp = span_at(E, pos, end);
            const int h = sp.h, k0 = sp.k0, kend = sp.kend;
            // this pair's queries, scaled; head g of the group, channels [j D/4, (j+1) D/4)
            float qf[D / 4];
            {
                const int64_t qoff = ((int64_t)E.q_row * A.nqh + h * Gq + g) * D + j * (D / 4);
#pragma unroll
                for (int c = 0; c < D / 4; c++) {
                    float x = 0.f;
                    if (g < Gq) {
                        if (A.q_dtype == KVQ_DTYPE_F32) x = reinterpret_cast<const float *>(A.q)[qoff + c];
                        else if (A.q_dtype == KVQ_DTYPE_F16) x = __half2float(reinterpret_cast<const __half *>(A.q)[qoff + c]);
                        else x = __bfloat162float(reinterpret_cast<const __nv_bfloat16 *>(A.q)[qoff + c]);
                    }
                    qf[c] = x;
                }
                // Rotated keys (kvq.h section 10): q <- R q = H diag(s) q / sqrt(D) here, where the query is loaded (the
                // four lanes j of a head hold its D channels, D/4 each: butterflies of span < D/4 in registers, the two
                // others across lanes j ^ 1, j ^ 2), rather than in a kernel of its own before this one.
                if (A.rot_q) {
                    constexpr int NE = D / 4;
                    const float f = D == 64 ? 0.125f : D == 128 ? 0.08838835f : 0.0625f;  // rotate.c's 1/sqrt(D)
#pragma unroll
                    for (int c = 0; c < NE; c++) {
                        const int ch = j * NE + c;
                        qf[c] *= (A.rq.s[ch >> 6] >> (ch & 63)) & 1 ? -f : f;
                    }
                    // loops of constant trip counts and linear induction, so that they unroll and qf stays in
                    // registers (`hs <<= 1` loops did not: qf went to a 128-byte stack frame)
#pragma unroll
                    for (int lg = 0; lg < (NE == 16 ? 4 : NE == 32 ? 5 : 6); lg++) {  // log2(NE), NE = 16, 32, 64
                        const int hs = 1 << lg;
#pragma unroll
                        for (int c = 0; c < NE; c++)
                            if (!(c & hs)) {
                                const float a = qf[c], b = qf[c + hs];
                                qf[c] = a + b, qf[c + hs] = a - b;
                            }
                    }
#pragma unroll
                    for (int lm = 0; lm < 2; lm++) {
                        const int m = 1 << lm;
                        const bool upper = j & m;
#pragma unroll
                        for (int c = 0; c < NE; c++) {
                            const float y = __shfl_xor_sync(0xffffffffu, qf[c], m);
                            qf[c] = upper ? y - qf[c] : qf[c] + y;
                        }
                    }
                }
#pragma unroll
                for (int c = 0; c < D / 4; c++) qf[c] *= A.qscale;
            }
            uint32_t bq[D / 8];  // Q^T in the key order of TK (unscaled: grouped pages scale it per page)
            build_bq<TK, D>(qf, bq);
            float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, bacc[4] = {0.f, 0.f, 0.f, 0.f};
            float o[D / 16][4];
#pragma unroll
            for (int x = 0; x < D / 16; x++) o[x][0] = o[x][1] = o[x][2] = o[x][3] = 0.f;
            const __half *wk = E.wk + (int64_t)h * D, *wv = E.wv + (int64_t)h * D;
            // Units [k0, kend) of this pair: pages first, then window units. Page n of the CTA (r + k - k0 here) is
            // this warp's when n % W == warp; window units continue the count after the pair's pages.
            const int pend = min(kend, E.npu), np = max(pend - k0, 0);
            for (int k = k0 + (warp - r % W + W) % W; k < pend; k += W) {
                bool page;
                int idx;
                Visible vis;
                unit_info(E, k, page, idx, vis);
                const int rr = r + (k - k0), sl = rr % NS;
                if constexpr (PORT) mbar_wait_p(&full[sl], (rr / NS) & 1);
                else mbar_wait(&full[sl], (rr / NS) & 1);
                const uint8_t *kb = ring + sl * C::SLOT;
#ifndef KVQ_NO_COMPUTE
                do_unit<TK, TV, D, false>(A, Gq, kb, kb + TRK::kblk, nullptr, nullptr, 0, 0, vis, bq, m, l, o, bacc, ps, lane);
#else  // timing experiment: the loads alone
                o[0][0] += *reinterpret_cast<const float *>(kb + lane * 4);
#endif
                // The producer's next bulk copy into this slot is an async-proxy write: order this warp's generic-proxy
                // reads before it. Without the fence the copy could land before the last reads of the slot had
                // completed: with fast consumers (F16, D = 64, 3 pages per warp and pair) 4-10 of 30 identical prefill
                // calls differed, by up to 1e-2 NMSE in one (row, KV head) pair.
                // (portable: cp.async writes are generic-proxy writes; the __syncwarp ending do_unit and the release
                // of lane 0's arrive order the warp's reads before the producer's next copy into the slot)
                if constexpr (!PORT) asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
                if (lane == 0) {
                    if constexpr (PORT) mbar_arrive_p(&empty[sl]);
                    else mbar_arrive(&empty[sl]);
                }
            }
            r += np;
            unraw_values<TV, D>(o);
            const int wbeg = max(k0, E.npu);
            for (int k = wbeg + (warp - (qw + r) % W + W) % W; k < kend; k += W) {
                bool page;
                int idx;
                Visible vis;
                // the entry's last unit with sinks: the sink page's fp16 rows 0 .. shi-1, read like window rows
                // (H * D apart) that never wrap
                const __half *uk = wk, *uv = wv;
                int wrow0 = 0, wc = 1 << 30;
                if (E.shi > E.slo && k == E.n - 1) {
                    vis.lo = E.slo, vis.hi = E.shi;
                    uk = E.sk + (int64_t)h * D, uv = uk + A.sink_vo;
                } else {
                    unit_info(E, k, page, idx, vis);
                    wrow0 = (E.whead + idx * PT) % A.wcap, wc = A.wcap;
                }
                do_unit<TK, TV, D, true>(A, Gq, nullptr, nullptr, uk, uv, wrow0, wc, vis, bq, m, l, o, bacc, ps, lane);
            }
            qw += max(kend - wbeg, 0);
            // ---- the CTA's result for pair u = i*H + h: the W warps' partials merged in shared memory, then the
            // output itself (the pair lies inside this CTA) or one partial per CTA of the pair, which the last of
            // them merges
            {
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    l[c] += __shfl_xor_sync(0xffffffffu, l[c], 4);
                    l[c] += __shfl_xor_sync(0xffffffffu, l[c], 8);
                    l[c] += __shfl_xor_sync(0xffffffffu, l[c], 16);
                }
                if (g == 0) {
#pragma unroll
                    for (int c = 0; c < 2; c++) *reinterpret_cast<float2 *>(mlb + (warp * 8 + 2 * j + c) * 2) = make_float2(m[c], l[c]);
                }
                float bm[D / 64][2];  // KIVI value mins: sum_t p_t min_t of channel group hh, this thread's heads
#pragma unroll
                for (int hh = 0; hh < D / 64; hh++)
#pragma unroll
                    for (int c = 0; c < 2; c++) bm[hh][c] = TRV::grouped ? __shfl_sync(0xffffffffu, bacc[c], hh * 4 + j) : 0.f;
                const int64_t u = (int64_t)i * H + h;
                int64_t c0, c1;
                pair_ctas(A, E, h, c0, c1);
                const bool solo = c0 == c1;
                const int64_t slot = u + cta;
                float *po = A.part + slot * Gq * D;
                const int64_t orow = (int64_t)E.q_row * A.nqh + h * Gq;  // output row of query head 0 of the group
                // heads 4 pass .. 4 pass + 3, held by lanes j = 2 pass, 2 pass + 1
                for (int pass = 0; pass * 4 < Gq; pass++) {
                    if ((j >> 1) == pass) {
#pragma unroll
                        for (int x = 0; x < D / 16; x++) {
                            const int hh = x / 4;
                            const int ch = value_chan<TV>(x, g, 0), ch1 = value_chan<TV>(x, g, 1);
#pragma unroll
                            for (int c = 0; c < 2; c++) {
                                const int head = 2 * j + c - 4 * pass;
                                float *mb = mbuf + warp * C::MB + head * D;
                                if (ch1 == ch + 1) *reinterpret_cast<float2 *>(mb + ch) = make_float2(o[x][c] + bm[hh][c], o[x][2 + c] + bm[hh][c]);
                                else mb[ch] = o[x][c] + bm[hh][c], mb[ch1] = o[x][2 + c] + bm[hh][c];
                            }
                        }
                    }
                    asm volatile("bar.sync 1, %0;" ::"n"(W * 32) : "memory");
                    const int nh = min(Gq - 4 * pass, 4);
                    for (int idx = threadIdx.x; idx < nh * D; idx += W * 32) {
                        const int head = 4 * pass + idx / D;
                        float M = -INFINITY;
                        for (int w = 0; w < W; w++) M = fmaxf(M, mlb[(w * 8 + head) * 2]);
                        float acc = 0.f, lsum = 0.f;
                        if (M != -INFINITY)
                            for (int w = 0; w < W; w++) {
                                const float2 ml = *reinterpret_cast<const float2 *>(mlb + (w * 8 + head) * 2);
                                const float a = ex2(ml.x - M);  // a warp without tokens: m = -inf, a = 0
                                acc += a * mbuf[w * C::MB + idx];
                                lsum += a * ml.y;
                            }
                        if (solo) store_out(A, (orow + head) * D + idx % D, acc * (1.f / lsum));
                        else {
                            po[head * D + idx % D] = acc;
                            if (idx % D == 0) *reinterpret_cast<float2 *>(A.part_ml + (slot * Gq + head) * 2) = make_float2(M, lsum);
                        }
                    }
                    asm volatile("bar.sync 1, %0;" ::"n"(W * 32) : "memory");  // mbuf and mlb are free again
                }
                if (!solo) {
                    // Count this CTA in. The pass loop's last bar.sync has ordered every consumer's partial before
                    // thread 0's release-acquire atomic (the semaphore pattern), and the final bar.sync orders the
                    // merge's reads after it. Its result is first used at the end, so only warp 0 waits for it,
                    // there. (At most two shared pairs: the first, begun before beg, and the last.)
                    if (threadIdx.x == 0) {
                        jobs[nshp ? 1 : 0] = Job{u + c0, orow, (int)(c1 - c0 + 1), (int)u};
                        if (nshp) atom_add_acq_rel(A.cnt + u, prev[1]);
                        else atom_add_acq_rel(A.cnt + u, prev[0]);
                    }
                    nshp++;
                }
            }
            span_next(E, sp, H, pos, i);
        }
        if (threadIdx.x == 0) {
#pragma unroll
            for (int x = 0; x < 2; x++) {
                if (x < nshp && prev[x] == jobs[x].ns - 1) A.cnt[jobs[x].u] = 0;  // last: zero for the next launch
                else jobs[x].ns = 0;
            }
        }
    }
    // ---------------- the last CTA of a shared pair merges it, with all its warps (the producer's too)
    asm volatile("bar.sync 2, %0;" ::"n"(C::THREADS) : "memory");
#pragma unroll
    for (int x = 0; x < 2; x++)
        if (jobs[x].ns) merge_pair<D, C::THREADS>(A, jobs[x].s0, jobs[x].ns, jobs[x].orow);
}

// The same kernel with its arguments in device memory (static plans, kvq_cuda.h section 5): plan_kernel wrote them
// for this step, and the grid is the plan's maximum (CTAs past the step's n_cta find no units and return).
template <int TK, int TV, int D, bool PORT>
__global__ void __launch_bounds__(Cfg<TK, TV, D, PORT>::THREADS, 1) decode_kernel_g(const DecodeArgs *__restrict__ A) {
    if constexpr (PORT || HOPPER_CODE) decode_body<TK, TV, D, PORT>(*A);
    else __trap();
}

template <int TK, int TV, int D, bool PORT>
static cudaError_t run_g(const DecodeArgs *a, int grid, cudaStream_t st, bool setup_only) {
    using C = Cfg<TK, TV, D, PORT>;
    if (setup_only)
        return cudaFuncSetAttribute(decode_kernel_g<TK, TV, D, PORT>, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
    decode_kernel_g<TK, TV, D, PORT><<<grid, C::THREADS, C::SMEM, st>>>(a);
    return cudaGetLastError();
}

template <int TK, int TV, int D, bool PORT> static cudaError_t run(const DecodeArgs &a, cudaStream_t st) {
    using C = Cfg<TK, TV, D, PORT>;
    static bool attr_set = false;  // once per process (single-device use; harmless to repeat)
    cudaError_t e = cudaSuccess;
    if (!attr_set) {
        e = cudaFuncSetAttribute(decode_kernel<TK, TV, D, PORT>, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
        if (e != cudaSuccess) return e;
        attr_set = true;
    }
    decode_kernel<TK, TV, D, PORT><<<a.n_cta, C::THREADS, C::SMEM, st>>>(a);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    static const bool debug = getenv("KVQ_CUDA_DEBUG") != nullptr;  // synchronise after the kernel, name a failure
    if (debug && (e = cudaStreamSynchronize(st)) != cudaSuccess) {
        fprintf(stderr, "kvq debug: decode_kernel<%d,%d,%d,%s> failed: %s (entries %d, total %lld, L %lld, n_cta %d)\n",
                TK, TV, D, PORT ? "portable" : "hopper", cudaGetErrorString(e), a.n_entries, (long long)a.total, (long long)a.L, a.n_cta);
        return e;
    }
    return cudaGetLastError();
}

template <int TK, int D> static cudaError_t run_v(int tv, const DecodeArgs &a, cudaStream_t st, bool port) {
    return with_type(tv, [&](auto V) {
        return port ? run<TK, decltype(V)::value, D, true>(a, st) : run<TK, decltype(V)::value, D, false>(a, st);
    });
}

template <int TK>
cudaError_t launch_decode_gk(int tv, int D, const DecodeArgs *a, int grid, cudaStream_t st, bool port, bool setup_only) {
    return with_type(tv, [&](auto V) {
        constexpr int TV = decltype(V)::value;
        if (D == 64) return port ? run_g<TK, TV, 64, true>(a, grid, st, setup_only) : run_g<TK, TV, 64, false>(a, grid, st, setup_only);
        if (D == 256) return port ? run_g<TK, TV, 256, true>(a, grid, st, setup_only) : run_g<TK, TV, 256, false>(a, grid, st, setup_only);
        return port ? run_g<TK, TV, 128, true>(a, grid, st, setup_only) : run_g<TK, TV, 128, false>(a, grid, st, setup_only);
    });
}

// The kernels of key type TK, for every value type and head dim (instantiated in decode_k*.cu)
template <int TK> cudaError_t launch_decode_k(int tv, int D, const DecodeArgs &a, cudaStream_t st, bool port) {
    return D == 64 ? run_v<TK, 64>(tv, a, st, port) : D == 256 ? run_v<TK, 256>(tv, a, st, port) : run_v<TK, 128>(tv, a, st, port);
}

}  // namespace kvqc

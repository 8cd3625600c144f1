#!/usr/bin/env python3
"""torch scaled_dot_product_attention (fp16, GQA) decode timings for kvq-bench cuda: prints "batch,ctx,ms" lines.

Same shapes and method as bench/bench_cuda.cu: Llama-3-8B (32 query heads, 8 KV heads, D = 128; --shape gemma3-12b:
16 query heads, 8 KV heads, D = 256; gemma3-270m: 4 and 1, D = 256), one query token,
CUDA events, 3 warm-ups, L2 flushed before each of the timed runs (by reading a 256 MB buffer; --flush-write: by
writing it, whose dirty lines are then written back during the timed call), median."""
import sys

import torch
import torch.nn.functional as F

SHAPES = {"llama3-8b": (32, 8, 128), "gemma3-12b": (16, 8, 256), "gemma3-270m": (4, 1, 256)}  # query heads, KV heads, D


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 20
    quick = "--quick" in sys.argv
    flush_write = "--flush-write" in sys.argv
    shape = sys.argv[sys.argv.index("--shape") + 1] if "--shape" in sys.argv else "llama3-8b"
    if shape not in SHAPES:
        sys.exit(f"unknown --shape {shape!r} ({', '.join(SHAPES)})")
    nqh, nkv, d = SHAPES[shape]
    dev = "cuda"
    flush = torch.ones(64 << 20, dtype=torch.int32, device=dev)
    if "--prefill" in sys.argv:
        return prefill(reps, nqh, nkv, d, flush, dev)
    print("batch,ctx,ms")
    for b in (1, 8) if quick else (1, 8, 32):
        for ctx in (4096, 131072) if quick else (4096, 16384, 65536, 131072):
            q = torch.randn(b, nqh, 1, d, dtype=torch.float16, device=dev)
            k = torch.randn(b, nkv, ctx, d, dtype=torch.float16, device=dev)
            v = torch.randn(b, nkv, ctx, d, dtype=torch.float16, device=dev)
            for _ in range(3):
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            ts = []
            for r in range(reps):
                if flush_write:
                    flush.fill_(r)
                else:
                    flush.max()  # reads 256 MB
                # ~0.1 ms of GPU spin, so Python enqueues the timed call before the GPU gets there (without it, the
                # launch gap after a short flush was timed: 36 instead of 18 us at batch 1, 4k)
                torch.cuda._sleep(200_000)
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                e1.record()
                e1.synchronize()
                ts.append(e0.elapsed_time(e1))
            ts.sort()
            print(f"{b},{ctx},{ts[len(ts) // 2]:.4f}", flush=True)
            del q, k, v
            torch.cuda.empty_cache()


def prefill(reps, nqh, nkv, d, flush, dev):
    """--prefill CHUNKS --ctx DEPTHS: one sequence, `chunk` queries after `depth` keys, causal aligned to the lower right
    (query i sees depth + i + 1 keys: torch.nn.attention.bias.causal_lower_right), the flash backend only; lines
    "prefill,depth,chunk,ms" (kvq-bench cuda --prefill reads them), and which SDPA path ran on stderr."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    # the flash kernel only (FlashAttention-2). Where the lengths are equal, causal_lower_right hands the call to plain
    # SDPA, whose own choice of backend ran the 8k causal square at 599 TFLOP/s on an H100, against 337-356 for the
    # flash path at the other shapes (2026-12-07); --any-backend leaves torch that choice
    anyb = "--any-backend" in sys.argv
    chunks = [int(x) for x in sys.argv[sys.argv.index("--prefill") + 1].split(",")]
    depths = [int(x) for x in sys.argv[sys.argv.index("--ctx") + 1].split(",")] if "--ctx" in sys.argv else [0]
    print("kind,depth,chunk,ms")
    for depth in depths:
        for chunk in chunks:
            q = torch.randn(1, nqh, chunk, d, dtype=torch.float16, device=dev)
            k = torch.randn(1, nkv, depth + chunk, d, dtype=torch.float16, device=dev)
            v = torch.randn(1, nkv, depth + chunk, d, dtype=torch.float16, device=dev)
            mask = causal_lower_right(chunk, depth + chunk)
            how = ("torch's choice" if anyb else "flash") + ", enable_gqa"

            def run():
                with nullcontext() if anyb else sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

            try:
                run()
            except RuntimeError as e:  # a torch whose lower-right flash path takes no GQA: the K/V heads repeated
                how = f"K/V heads repeated ({str(e).splitlines()[0][:80]})"
                k, v = k.repeat_interleave(nqh // nkv, 1), v.repeat_interleave(nqh // nkv, 1)

                def run():
                    with nullcontext() if anyb else sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

            for _ in range(3):
                run()
            ts = []
            for r in range(reps):
                flush.max()
                torch.cuda._sleep(200_000)
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                run()
                e1.record()
                e1.synchronize()
                ts.append(e0.elapsed_time(e1))
            ts.sort()
            print(f"prefill,{depth},{chunk},{ts[len(ts) // 2]:.4f}", flush=True)
            print(f"sdpa prefill depth {depth} chunk {chunk}: {how}", file=sys.stderr)
            del q, k, v
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

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


if __name__ == "__main__":
    main()

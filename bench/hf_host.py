#!/usr/bin/env python3
"""Host time of one layer's decode step through kvq.KVQCache on the CPU backend (issue 23): cache.update() + the "kvq"
attention function, as a transformers attention module calls them, for one new token per row, against the bare C
calls (kvq_append + kvq_attn_decode with their arguments prepared once) on the same cache. The difference is what
the Python layer costs per layer and step; most of that code is shared with the CUDA path (kvq.hf).

  fast     KVQCache's decode path (KVQCache._decode_step: per-layer calls prepared once, output buffer kept)
  general  the general path (KVQCache._fast_decode = False: arguments checked and converted, arrays built and an
           output allocated at every call; the path decode steps took before issue 23)
  bare C   the two C calls alone (the floor)

The cache is cut back to the same length after every step, so every step does the same C work. torch on 1 thread,
kvq's attention on 1 thread. Printed: the minimum over --repeats of the median over --steps steps (of all layers).

  python3 bench/hf_host.py                      # q8 and q4, batch 1 and 8
  python3 bench/hf_host.py --types f16 --batch 1 --steps 5000
"""
import argparse
import ctypes as C
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "python"))
import torch  # noqa: E402

import kvq  # noqa: E402
from kvq import _native as N  # noqa: E402
from kvq import hf  # noqa: E402
from hf_models import make  # noqa: E402


def measure(kv_type, B, steps, repeats, layers=4, past=16):
    model = make("llama", num_hidden_layers=layers)
    model.set_attn_implementation("kvq")
    cfg = model.config
    Hq, H, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    cache = kvq.KVQCache(cfg, kv_type=kv_type, max_cache_len=past + 64, n_threads=1)
    g = torch.Generator().manual_seed(0)
    k0 = torch.randn(B, H, past, D, generator=g)
    for li in range(layers):
        cache.append_kv(li, k0, k0)
    mod = model.model.layers[0].self_attn
    q = torch.randn(B, Hq, 1, D, generator=g)
    k = torch.randn(B, H, 1, D, generator=g)
    v = torch.randn(B, H, 1, D, generator=g)
    scale = D ** -0.5

    def through_cache(li):
        kk, vv = cache.update(k, v, li)
        return hf.kvq_attention_forward(mod, q, kk, vv, None, scaling=scale)[0]

    grp = cache._groups[0]  # one kv type: one kvq cache holds every layer
    h, n = grp.handle._h, len(grp.seqs)
    ids = (C.c_int32 * n)(*grp.seqs)
    ones = (C.c_int32 * n)(*([1] * n))
    params = N.AttnParams(Hq, scale, 0, 0.0)
    pref = C.byref(params)
    out = torch.empty(B, Hq, D)
    ptrs = (k.data_ptr(), v.data_ptr(), q.data_ptr(), out.data_ptr())
    append, decode = N._lib.kvq_append, N._lib.kvq_attn_decode

    def bare(li):
        append(h, li, n, ids, ones, N.DTYPE_F32, ptrs[0], ptrs[1])
        decode(h, li, n, ids, ptrs[2], ptrs[3], pref)
        return out

    def run(fn):
        per = []
        for _ in range(steps):
            t0 = time.perf_counter()
            for li in range(layers):
                fn(li)
            per.append((time.perf_counter() - t0) / layers)
            for s in grp.seqs:  # back to `past` tokens: the same C work at every step
                grp.handle.seq_truncate(s, past)
            for layer in cache.layers:
                layer.hf_len = past
        return statistics.median(per) * 1e6

    res = {}
    for _ in range(repeats):  # interleaved, so that a drift of the machine hits all three alike
        for name, fast in (("fast", True), ("general", False), ("bare C", None)):
            if fast is None:
                res.setdefault(name, []).append(run(bare))
            else:
                cache._fast_decode = fast
                res.setdefault(name, []).append(run(through_cache))
    cache.reset()
    return {k_: min(v_) for k_, v_ in res.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="q8,q4")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"kvq {kvq.version()} ({kvq.cpu_backend()} kernels), torch {torch.__version__}; us per layer-step, min over "
          f"{a.repeats} repeats of the median of {a.steps} steps x 4 layers")
    print("| type | batch | fast | general | bare C | fast - bare (Python) | general - bare (Python) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with torch.no_grad():
        for t in a.types.split(","):
            for b in (int(x) for x in a.batch.split(",")):
                r = measure(t, b, a.steps, a.repeats)
                print(f"| {t} | {b} | {r['fast']:.1f} | {r['general']:.1f} | {r['bare C']:.1f} | "
                      f"{r['fast'] - r['bare C']:.1f} | {r['general'] - r['bare C']:.1f} |", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Decode throughput and memory of KV caches in HF transformers, on a random-weight Llama-architecture model with
Llama-3-8B attention shapes (hidden 4096, 32 query heads, 8 KV heads, head_dim 128, MLP 14336), a few layers.

For each cache, context length and batch size: the context is loaded straight into the cache (random K/V with the
model's shapes: the prefill is not what is measured), then `--steps` decode steps of the whole model run
(embedding, layers, LM head) and are timed after `--warmup` steps.

Caches:
  dynamic   transformers DynamicCache, fp16, attn_implementation="sdpa"
  icw-int8  the icw-kv-quant method re-implemented in a few lines: int8 K/V with one scale per (batch, head) over the
            whole sequence; each step dequantizes everything, appends the new token, re-quantizes everything,
            and hands the fp16 copy to attention (sdpa)
  quanto-q4 transformers QuantizedCache(backend="quanto", nbits=4), if optimum-quanto is installed
  kvq-q8/q4/q2  kvq.KVQCache with attn_implementation="kvq": attention on the quantized pages (kvq_cuda_* on GPU,
            kvq_attn_* on CPU)

Columns: tokens/s = batch * steps / time; KV MiB = bytes the cache holds for K/V (pages + residual windows for kvq,
tensors for the others); peak MiB = peak GPU memory above the model weights during the run (torch allocator peak, plus
the kvq device allocations, which are made outside torch's allocator).

  python3 bench/bench_hf.py --device cuda --contexts 8192,32768,131072 --batches 1,8 --out docs/bench-hf.md
  python3 bench/bench_hf.py --device cpu --contexts 512,2048 --batches 1,4 --layers 2   # CPU, small
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import kvq  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.cache_utils import Cache, DynamicLayer  # noqa: E402


# ------------------------------------------------------------------------------------------------------------
# the icw-kv-quant method (int8 per (batch, head), full dequantize + re-quantize at every step)
# ------------------------------------------------------------------------------------------------------------
class ICWInt8Layer(DynamicLayer):
    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.kq = None
        if self.kq is not None:
            key_states = torch.cat([self.kq.to(self.dtype) * self.ks, key_states], dim=-2)
            value_states = torch.cat([self.vq.to(self.dtype) * self.vs, value_states], dim=-2)
        self.kq, self.ks = self._q(key_states)
        self.vq, self.vs = self._q(value_states)
        return key_states, value_states

    @staticmethod
    def _q(x):
        s = (x.abs().amax(dim=(-2, -1), keepdim=True) / 127.0).clamp(min=1e-8)
        return (x / s).round().to(torch.int8), s

    def get_seq_length(self):
        return 0 if getattr(self, "kq", None) is None else self.kq.shape[-2]

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.kq, self.ks, self.vq, self.vs))


class ICWInt8Cache(Cache):
    def __init__(self, n_layers):
        super().__init__(layers=[ICWInt8Layer() for _ in range(n_layers)])


# ------------------------------------------------------------------------------------------------------------
def make_model(n_layers, device, dtype):
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=n_layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                      rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(device):
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = LlamaForCausalLM(cfg).eval()
        finally:
            torch.set_default_dtype(old)
    return model


def fill(cache, method, model, B, ctx, device, dtype):
    cfg = model.config
    H, D, L = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    g = torch.Generator(device=device).manual_seed(1)
    chunk = 8192
    for layer in range(L):
        if method.startswith("kvq"):
            for s in range(0, ctx, chunk):
                n = min(chunk, ctx - s)
                k = torch.randn((B, H, n, D), device=device, dtype=dtype, generator=g)
                v = torch.randn((B, H, n, D), device=device, dtype=dtype, generator=g)
                cache.append_kv(layer, k, v)
        else:
            k = torch.randn((B, H, ctx, D), device=device, dtype=dtype, generator=g)
            v = torch.randn((B, H, ctx, D), device=device, dtype=dtype, generator=g)
            cache.update(k, v, layer)
            del k, v


def kv_bytes(cache, method):
    if method.startswith("kvq"):
        b = cache.kv_bytes()
        return b["in_use"] + b["window"]
    if method == "icw-int8":
        return sum(layer.nbytes() for layer in cache.layers)
    if method == "dynamic":
        return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    return float("nan")


def kvq_device_bytes(cache):
    tot = 0
    for g in cache._groups:
        if g.handle is not None and cache.is_cuda:
            st = g.handle.stats()
            tot += st["arena_bytes"] + st["window_bytes"] + st["table_bytes"] + st["workspace_bytes"]
    return tot


def run_one(model, method, B, ctx, steps, warmup, device, dtype):
    cuda = device == "cuda"
    n_layers = model.config.num_hidden_layers
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    if method == "dynamic":
        cache, impl = DynamicCache(config=model.config), "sdpa"
    elif method == "icw-int8":
        cache, impl = ICWInt8Cache(n_layers), "sdpa"
    elif method == "quanto-q4":
        from transformers import QuantizedCache
        cache, impl = QuantizedCache("quanto", model.config, nbits=4), "sdpa"
    else:
        cache = kvq.KVQCache(model.config, kv_type=method.split("-")[1], max_cache_len=ctx + steps + warmup + 64,
                             max_batch_size=B)
        impl = "kvq"
    model.set_attn_implementation(impl)
    fill(cache, method, model, B, ctx, device, dtype)
    ids = torch.randint(0, 32000, (B, 1), device=device)
    with torch.no_grad():
        for i in range(warmup + steps):
            if i == warmup:
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            model(ids, past_key_values=cache, use_cache=True)
        if cuda:
            torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    res = {"method": method, "batch": B, "context": ctx, "tok_s": B * steps / dt, "ms_per_step": 1000 * dt / steps,
           "kv_mib": kv_bytes(cache, method) / 2**20}
    if cuda:
        extra = kvq_device_bytes(cache) if method.startswith("kvq") else 0
        res["peak_mib"] = (torch.cuda.max_memory_allocated() - base + extra) / 2**20
    del cache
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--contexts", default="8192,32768,131072")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--methods", default="dynamic,icw-int8,quanto-q4,kvq-q8,kvq-q4,kvq-q2")
    ap.add_argument("--out", default=None, help="markdown table to write (default: stdout only)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dtype = torch.float16 if a.device == "cuda" else torch.float32
    model = make_model(a.layers, a.device, dtype)
    methods = a.methods.split(",")
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        if "quanto-q4" in methods:
            methods.remove("quanto-q4")
            print("quanto-q4: optimum-quanto is not installed here: skipped", flush=True)
    rows = []
    for ctx in [int(x) for x in a.contexts.split(",")]:
        for B in [int(x) for x in a.batches.split(",")]:
            for m in methods:
                try:
                    r = run_one(model, m, B, ctx, a.steps, a.warmup, a.device, dtype)
                except torch.cuda.OutOfMemoryError:
                    r = {"method": m, "batch": B, "context": ctx, "error": "OOM"}
                except Exception as e:  # report and go on
                    r = {"method": m, "batch": B, "context": ctx, "error": f"{type(e).__name__}: {e}"[:200]}
                rows.append(r)
                print(json.dumps(r), flush=True)
    dev = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU ({os.cpu_count()} threads)"
    lines = [f"Device: {dev}; torch {torch.__version__}; {a.layers} layers, fp16 model (fp32 on CPU); "
             f"{a.steps} timed decode steps after {a.warmup} warm-up steps.", "",
             "| context | batch | cache | tokens/s | ms/step | KV MiB | KV vs dynamic | peak MiB |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['context']} | {r['batch']} | {r['method']} | {r['error']} | | | | |")
            continue
        ref = next((x for x in rows if x["method"] == "dynamic" and x["batch"] == r["batch"]
                    and x["context"] == r["context"] and "error" not in x), None)
        ratio = f"{r['kv_mib'] / ref['kv_mib']:.3f}" if ref else "-"
        peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-"
        lines.append(f"| {r['context']} | {r['batch']} | {r['method']} | {r['tok_s']:.1f} | {r['ms_per_step']:.2f} | "
                     f"{r['kv_mib']:.0f} | {ratio} | {peak} |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

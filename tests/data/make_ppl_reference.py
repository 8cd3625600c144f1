#!/usr/bin/env python3
"""Independent perplexity reference for every KV type of tests/test_model_ppl.sh: a numpy Llama forward pass on the
GGUF weights (dequantized by the `gguf` package, not by kvq) whose KV cache is emulated in float64 from the page
format written in include/kvq.h (section 5) and the residual-window rule of section 1, not from kvq's code.

    pip install numpy gguf
    python3 tests/data/make_ppl_reference.py build/bin/kvq [--chunks N] [--seeds S] [--types f16,q8,q4,q2]

What is emulated, per (chunk, layer, KV head), exactly as `kvq perplexity --ctx CTX --batch 256` runs a chunk:
  - tokens go in batches of 256; after each batch is appended, the cache is in its documented state and the batch's
    queries attend causally to it (fp64 softmax, scale 1/sqrt(D));
  - f16: K and V rounded to fp16;
  - q8: per token per head: s = fp16(max|x| / 127), q = clamp(round(x / s), -127, 127), x' = s q;
  - q4/q2 (b bits): the newest tokens stay in an fp16 window; when the window reaches R + G tokens (R = 128,
    G = 64) its oldest G are quantized: keys per channel over the G tokens, values per token over Gv = 64
    channels (here D = 64), scale = fp16((max - min) / (2^b - 1)), min = fp16(min),
    q = clamp(round((x - min) / scale), 0, 2^b - 1), x' = scale q + min.
Weights are dequantized to float32 and the matrix products run in float32 (as kvq does); norms, RoPE, attention
and the log-softmax run in float64.

Sensitivity (--seeds S > 0): the quantized types are discontinuous in K and V (a last-bit change flips a code),
so two correct engines that differ only in fp32 summation order (OpenBLAS kernels, kvq's SIMD tables) can give
visibly different perplexities. To measure that spread independently of kvq, each seed repeats the run with every
matrix product's output multiplied by (1 + 1e-6 N(0,1)), the size of fp32 accumulation error over 576..1536 terms
(~sqrt(K) 2^-24). The script prints, per type, the unperturbed PPL, the ratio to F16, and the mean, standard
deviation, minimum and maximum over the seeds. Token ids come from `kvq tokenize --ids` (its tokenizer is checked
against HF tokenizers over the whole corpus by test_model_golden).
"""
import argparse
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
R_WIN, G = 128, 64
BATCH = 256


def f16(x):
    return x.astype(np.float16).astype(np.float64)


def q8(x):  # x: [T][D], per token
    s = f16(np.abs(x).max(axis=-1, keepdims=True) / 127.0)
    q = np.where(s > 0, np.clip(np.rint(x / np.where(s > 0, s, 1)), -127, 127), 0)
    return s * q


def kivi(x, bits, axis):  # asymmetric over `axis` (0: over tokens = per channel; 1: over channels = per token)
    lv = 2 ** bits - 1
    mn, mx = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
    scale, mn16 = f16((mx - mn) / lv), f16(mn)
    q = np.where(scale > 0, np.clip(np.rint((x - mn16) / np.where(scale > 0, scale, 1)), 0, lv), 0)
    return scale * q + mn16


class KVEmu:
    """The cache of one layer and KV head: returns the K and V attention reads after each append."""

    def __init__(self, kind):
        self.kind = kind
        self.k = np.zeros((0, 64))
        self.v = np.zeros((0, 64))
        self.nq = 0  # tokens quantized into pages (grouped types)

    def append(self, k, v):  # k, v: [n][D] float64 (exact engine values)
        if self.kind == "f16":
            k, v = f16(k), f16(v)
        elif self.kind == "q8":
            k, v = q8(k), q8(v)
        else:
            k, v = f16(k), f16(v)  # window: fp16
        self.k = np.concatenate([self.k, k])
        self.v = np.concatenate([self.v, v])
        if self.kind in ("q4", "q2"):
            bits = 4 if self.kind == "q4" else 2
            while len(self.k) - self.nq >= R_WIN + G:  # the window reached R + G: its oldest G go to pages
                a, b = self.nq, self.nq + G
                # quantized from the window's fp16 values
                self.k[a:b] = kivi(self.k[a:b], bits, axis=0)
                self.v[a:b] = kivi(self.v[a:b], bits, axis=1)
                self.nq = b
        return self.k, self.v


def load_weights():
    from gguf import GGUFReader
    from gguf.quants import dequantize
    r = GGUFReader(MODEL)
    W = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type)
        W[t.name] = np.ascontiguousarray(a.reshape([int(x) for x in reversed(t.shape.tolist())]).astype(np.float32))
    cfg = {k: r.fields[k].contents() for k in ("llama.block_count", "llama.attention.head_count",
                                                "llama.attention.head_count_kv", "llama.rope.freq_base",
                                                "llama.attention.layer_norm_rms_epsilon")}
    return W, cfg


def forward_chunk(W, cfg, ids, kind, first, rng):
    """NLL of tokens first..len-1 of one chunk (logits at positions first-1..len-2)."""
    n_layers = cfg["llama.block_count"]
    nh, nkv = cfg["llama.attention.head_count"], cfg["llama.attention.head_count_kv"]
    eps, theta = cfg["llama.attention.layer_norm_rms_epsilon"], cfg["llama.rope.freq_base"]
    dim = W["token_embd.weight"].shape[1]
    hd = dim // nh
    inv = theta ** (-np.arange(0, hd, 2) / hd)

    def mm(x, w):  # float32 product (as the engine), optionally perturbed at fp32-accumulation size
        y = (x.astype(np.float32) @ W[w].T).astype(np.float64)
        if rng is not None:
            y *= 1 + 1e-6 * rng.standard_normal(y.shape)
        return y

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * W[w].astype(np.float64)

    def rope(x, pos):  # x: [n][heads][hd]; adjacent pairs (GGUF's Q/K rows are permuted for this form)
        ang = pos[:, None] * inv[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out

    caches = [[KVEmu(kind) for _ in range(nkv)] for _ in range(n_layers)]
    nll = []
    n = len(ids)
    for b0 in range(0, n, BATCH):
        tok = ids[b0:b0 + BATCH]
        nb = len(tok)
        pos = np.arange(b0, b0 + nb, dtype=np.float64)
        x = W["token_embd.weight"][tok].astype(np.float64)
        for L in range(n_layers):
            p = f"blk.{L}."
            h = norm(x, p + "attn_norm.weight")
            q = rope(mm(h, p + "attn_q.weight").reshape(nb, nh, hd), pos)
            k = rope(mm(h, p + "attn_k.weight").reshape(nb, nkv, hd), pos)
            v = mm(h, p + "attn_v.weight").reshape(nb, nkv, hd)
            o = np.empty((nb, nh, hd))
            for g in range(nkv):
                K, V = caches[L][g].append(k[:, g], v[:, g])
                T = len(K)
                mask = np.arange(T)[None, :] <= (b0 + np.arange(nb))[:, None]
                for hh in range(g * (nh // nkv), (g + 1) * (nh // nkv)):
                    s = (q[:, hh] @ K.T) / np.sqrt(hd)
                    s = np.where(mask, s, -np.inf)
                    s -= s.max(-1, keepdims=True)
                    e = np.exp(s)
                    o[:, hh] = (e @ V) / e.sum(-1, keepdims=True)
            x = x + mm(o.reshape(nb, dim), p + "attn_output.weight")
            h = norm(x, p + "ffn_norm.weight")
            gt, up = mm(h, p + "ffn_gate.weight"), mm(h, p + "ffn_up.weight")
            x = x + mm(gt / (1 + np.exp(-gt)) * up, p + "ffn_down.weight")
        lo = max(first - 1 - b0, 0)
        if lo >= nb:
            continue
        hN = norm(x[lo:], "output_norm.weight")
        logits = mm(hN, "token_embd.weight")  # tied embeddings
        m = logits.max(-1, keepdims=True)
        lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
        for j in range(lo, nb):
            if b0 + j + 1 < n:
                nll.append(lse[j - lo] - logits[j - lo, ids[b0 + j + 1]])
    return nll


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kvq")
    ap.add_argument("--text", default=os.path.join(ROOT, "tests", "data", "ppl_excerpt.txt"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=0)
    ap.add_argument("--types", default="f16,q8,q4,q2")
    a = ap.parse_args()
    out = subprocess.run([a.kvq, "tokenize", "-m", MODEL, "-f", a.text, "--ids"], check=True, capture_output=True,
                         text=True).stdout
    ids = [int(t) for t in out.split()]
    W, cfg = load_weights()
    n_chunks = min(a.chunks, len(ids) // a.ctx)
    print(f"{len(ids)} ids, {n_chunks} chunks of {a.ctx}", flush=True)
    types = a.types.split(",")

    def ppl(kind, rng):
        nll = []
        for c in range(n_chunks):
            nll.append(forward_chunk(W, cfg, ids[c * a.ctx:(c + 1) * a.ctx], kind, a.ctx // 2, rng))
        return float(np.exp(np.mean(np.concatenate(nll)))), nll

    base, first = {}, {}
    for kind in types:
        t0 = time.time()
        base[kind], nll = ppl(kind, None)
        first[kind] = float(np.exp(np.mean(nll[0])))
        print(f"{kind} {base[kind]:.4f} (first chunk {first[kind]:.4f}; {time.time() - t0:.0f}s)", flush=True)
    if a.seeds:
        for kind in types:
            vals = [ppl(kind, np.random.default_rng(s + 1))[0] for s in range(a.seeds)]
            ratio = np.array(vals) / base.get("f16", 1)
            print(f"perturbed {kind}: mean {np.mean(vals):.4f} sd {np.std(vals, ddof=1):.4f} min {min(vals):.4f} "
                  f"max {max(vals):.4f}  values " + " ".join(f"{v:.4f}" for v in vals), flush=True)
    print(f"ref {a.ctx} {n_chunks} " + " ".join(f"{k} {v:.4f}" for k, v in base.items()))
    print(f"ref {a.ctx} 1 " + " ".join(f"{k} {v:.4f}" for k, v in first.items()))


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""What calibrated non-uniform levels and dense-and-sparse outliers (KVQuant's methods) would buy over kvq's grouped
formats, measured before building them into the cache: KV quantization emulated inside a transformers model.

An attention function quantizes and dequantizes the post-RoPE keys and values of every layer the way kvq's grouped
types store them, after a randomized Walsh-Hadamard rotation of each head (undone after, as kvq's rotation does):
keys per channel over groups of 64 tokens, values per token over groups of 64 channels, min/max (scale, min) rounded
to fp16, each value to the nearest level. Every token is quantized: no fp16 window, no sinks, no Q-Norm, no SQuat
(the same for every method, so the rows compare the methods, not kvq's absolute quality: kvq perplexity measures
that). Methods, at 4, 3 and 2 bits:
  uniform              kvq's default levels (q4, q2)
  fixed_nuq            kvq's data-free non-uniform levels (src/core/quant.c lv_n*, kvq.h section 10 `nonuniform`)
  calibrated_nuq       per layer and role, Lloyd levels fitted to the calibration text's normalized values (KVQuant's
                       per-layer codebooks; unweighted k-means, rounded to 1/16 of a step, the format's resolution)
  uniform+outliers     the largest |x| of each group of 64 (1.6%) kept exact (KVQuant's dense-and-sparse: one fp16
                       value and a 6-bit index per group, +0.34 bits per element), min/max over the rest
  fixed_nuq+outliers   both
  ...+p8               (scale, min) in 8 bits each instead of fp16 (params8: a log-grid scale and an integer zero
                       point; 0.25 bits per element instead of 0.5): what compressed parameters would cost
Scored as kvq perplexity scores: chunks of --ctx tokens of the evaluation text, the second half of each chunk, KL
divergence of the next-token distributions from the unquantized model's, dPPL, top-1 agreement. Also the squared
error of each method on the calibration text's keys and values, relative to uniform (sqerr_* columns: summed over
layers; the calibrated levels fitted on half the groups and scored on the other half).
Calibration and evaluation texts must not overlap (docs/quality.md uses debian-reference: lines 1-9693 evaluate,
9694- calibrate, as kvq calibrate).

usage: bench/quant_emulation.py --model-dir models --gguf SmolLM2-135M-Instruct.Q4_1.gguf --eval EVAL.txt
       --calib CALIB.txt [--ctx 2048] [--chunks 2] [--threads 2] [--out docs] [--methods uniform,fixed_nuq+p8,...]
       [--bits 4,3,2] [--zp-unit 16] [--tag=-NAME]
Needs torch, transformers, gguf, accelerate. Writes quant-emulation-<gguf stem>.csv to --out (stdout without)."""
import argparse
import math
import os
import sys

import numpy as np
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# src/core/quant.c: the non-uniform levels in 1/16 steps (lv_n4, lv_n3, lv_n2)
FIXED = {4: [4, 28, 46, 62, 76, 90, 102, 114, 126, 138, 150, 164, 178, 194, 212, 236],
         3: [6, 24, 38, 50, 62, 74, 88, 106],
         2: [8, 20, 28, 40]}
UNIFORM = {b: [16 * i for i in range(1 << b)] for b in FIXED}
TABLES = {"uniform": UNIFORM, "fixed": FIXED}
# (name, levels, outliers, 8-bit parameters)
METHODS = (("uniform", "uniform", False, False), ("fixed_nuq", "fixed", False, False),
           ("calibrated_nuq", "cal", False, False), ("uniform+outliers", "uniform", True, False),
           ("fixed_nuq+outliers", "fixed", True, False), ("uniform+p8", "uniform", False, True),
           ("fixed_nuq+p8", "fixed", False, True), ("fixed_nuq+outliers+p8", "fixed", True, True))


class Emulator:
    def __init__(self):
        self.mode = None  # None: exact; "collect": record normalized values; "quant": quantize
        self.bits, self.levels, self.outliers, self.p8 = 4, "uniform", False, 0
        self.collected, self.cal, self.rot = {}, {}, {}

    def rotation(self, D, layer):
        if (D, layer) not in self.rot:
            H = torch.ones(1, 1)
            while H.shape[0] < D:
                H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
            if H.shape[0] != D:
                sys.exit(f"head_dim {D} is not a power of two")
            s = torch.randint(0, 2, (D,), generator=torch.Generator().manual_seed(1000 + layer)).float() * 2 - 1
            self.rot[(D, layer)] = H * s[None, :] / math.sqrt(D)
        return self.rot[(D, layer)]

    @staticmethod
    def groups(x, role):
        """[B, H, T, D] (T a multiple of 64) -> [..., 64]: keys per channel over 64 tokens, values per token"""
        B, H, T, D = x.shape
        if role == "k":
            return x.reshape(B, H, T // 64, 64, D).transpose(-1, -2)
        return x.reshape(B, H, T, D // 64, 64)

    @staticmethod
    def ungroup(y, role, shape):
        B, H, T, D = shape
        return y.transpose(-1, -2).reshape(shape) if role == "k" else y.reshape(shape)

    def levels_of(self, layer, role):
        return self.cal[(layer, role)] if self.levels == "cal" else TABLES[self.levels][self.bits]

    def apply(self, x, role, layer):
        B, H, T, D = x.shape
        R = self.rotation(D, layer)
        xr = x @ R
        T0 = T // 64 * 64  # a tail of < 64 tokens stays exact (kvq's window would hold it)
        g = self.groups(xr[:, :, :T0], role)
        if self.mode == "collect":
            self.collected.setdefault((layer, role), []).append(g.reshape(-1, 64).numpy().copy())
            return x
        y = quant_groups(g, self.bits, self.levels_of(layer, role), self.outliers, self.p8)
        return torch.cat([self.ungroup(y, role, (B, H, T0, D)), xr[:, :, T0:]], 2) @ R.T


def f16(x):
    return x.half().float()


ZP_UNIT = 16  # params8's zero point counts 1/16 scales (measured: 1 and 4 cost Gemma 3's q3 +60% and +51% KLD)


def params8(lo, hi, qmax, F):
    """(scale, min) in 8 bits each instead of fp16 (-0.25 bits per element): the scale an 8-bit code on a 1/16-octave
    grid (16 octaves from a per-page base, which this emulation does not clip), rounded up; the min an 8-bit zero
    point z in 1/F of the scale (x = (level + z / F) s), rounded down, offset by qmax / 2 steps so that a group
    centered on 0 sits mid-range (z / F in [-128 / F - qmax / 2, 127 / F - qmax / 2] steps); the scale grown where
    the min lies beyond that, then a grid step at a time until the group is covered"""
    zlo, zhi = -128 - qmax * F // 2, 127 - qmax * F // 2
    s = ((hi - lo) / qmax).clamp_min(1e-30)
    s = torch.maximum(s, torch.maximum(lo * F / zlo, hi / (zhi / F + qmax)))
    s = torch.exp2(torch.ceil(16 * torch.log2(s)) / 16)
    for _ in range(64):
        z = torch.floor(lo * F / s).clamp(zlo, zhi)
        bad = (hi > (z / F + qmax) * s) | (lo < z / F * s)
        if not bool(bad.any()):
            break
        s = torch.where(bad, s * 2 ** (1 / 16), s)
    return z / F * s, s


def quant_groups(g, bits, levels, outliers, p8=0):
    """quantize-dequantize each group of 64 along the last axis; p8: 0 for fp16 (scale, min), else params8's
    zero-point unit"""
    qmax = (1 << bits) - 1
    keep = None
    if outliers:  # the largest |x| of the group exact; min/max over the others
        keep = torch.ones_like(g, dtype=torch.bool).scatter_(-1, g.abs().argmax(-1, keepdim=True), False)
        lo = torch.where(keep, g, torch.full_like(g, float("inf"))).amin(-1, keepdim=True)
        hi = torch.where(keep, g, torch.full_like(g, float("-inf"))).amax(-1, keepdim=True)
    else:
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    if p8:
        lo, s = params8(lo, hi, qmax, p8)
    else:
        lo = f16(lo)
        s = f16((hi - lo) / qmax).clamp_min(1e-30)
    u = (g - lo) / s
    L = torch.tensor(levels, dtype=g.dtype) / 16.0
    y = L[(u.unsqueeze(-1) - L).abs().argmin(-1)] * s + lo
    return torch.where(keep, y, g) if outliers else y


def sqerr(g, bits, levels, outliers, p8):
    return float(((quant_groups(torch.from_numpy(g), bits, levels, outliers, p8) - torch.from_numpy(g)) ** 2).sum())


def normalized(g, bits):
    qmax = (1 << bits) - 1
    lo, hi = g.min(1, keepdims=True), g.max(1, keepdims=True)
    return ((g - lo) / np.maximum((hi - lo) / qmax, 1e-30)).ravel()


def lloyd(u, bits, init, rng):
    """Lloyd (1-D k-means) levels for normalized values u, from `init`, in 1/16 steps within [0, qmax]"""
    u = u[rng.permutation(len(u))[:200000]]
    L = np.array(init, float) / 16.0
    for _ in range(30):
        q = np.abs(u[:, None] - L[None, :]).argmin(-1)
        for j in range(len(L)):
            if (q == j).any():
                L[j] = u[q == j].mean()
        L = np.sort(L)
    return [int(v) for v in np.clip(np.round(L * 16), 0, 16 * ((1 << bits) - 1))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--gguf", required=True, help="file name inside --model-dir")
    ap.add_argument("--eval", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--methods", default=None, help="comma list of METHODS' names (uniform is always run: the "
                    "sqerr column is relative to it); default all")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--tag", default="", help="appended to the CSV's name")
    ap.add_argument("--zp-unit", type=int, default=ZP_UNIT, help="params8's zero point counts 1/N of a scale "
                    "(256 values: 256 / N steps, centred qmax / 2 steps below 0)")
    a = ap.parse_args()
    want = set(a.methods.split(",")) | {"uniform"} if a.methods else None
    # the 8-bit parameters' flag as params8's zero-point unit (0: fp16 parameters)
    methods = [(n, lv, o, a.zp_unit if p8 else 0) for n, lv, o, p8 in METHODS if want is None or n in want]
    cal = any(m[1] == "cal" for m in methods)
    if a.zp_unit < 1:
        sys.exit("--zp-unit: >= 1")
    if a.ctx < 128 or a.ctx % 64:
        sys.exit("--ctx: a multiple of 64, >= 128")
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model_dir, gguf_file=a.gguf)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, gguf_file=a.gguf, dtype=torch.float32).eval()
    em = Emulator()

    def attn(module, query, key, value, attention_mask, **kw):
        if em.mode is not None:
            key, value = em.apply(key, "k", module.layer_idx), em.apply(value, "v", module.layer_idx)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("kvq_emulation", attn)
    model.set_attn_implementation("kvq_emulation")

    def chunks(path):
        ids = tok(open(path).read(), return_tensors="pt").input_ids[0]
        out = [ids[i * a.ctx:(i + 1) * a.ctx] for i in range(a.chunks) if (i + 1) * a.ctx <= len(ids)]
        if not out:
            sys.exit(f"{path}: fewer than {a.ctx} tokens")
        return out

    ev, cal = chunks(a.eval), chunks(a.calib)

    def logp(ch):
        with torch.no_grad():
            return torch.log_softmax(model(ch[None]).logits[0, a.ctx // 2:-1].float(), -1)

    em.mode = None
    ref = [logp(c) for c in ev]
    tgt = [c[a.ctx // 2 + 1:] for c in ev]
    nll0 = float(np.mean([-r[torch.arange(len(t)), t].mean().item() for r, t in zip(ref, tgt)]))
    # the calibration text's rotated keys and values, once
    em.mode, em.collected = "collect", {}
    for c in cal:
        logp(c)
    data = {k: np.concatenate(v) for k, v in em.collected.items()}
    rng = np.random.default_rng(0)
    rows = []
    for bits in [int(b) for b in a.bits.split(",")]:
        # squared error on the calibration text; the calibrated levels fitted on half the groups, scored on the rest
        se = dict.fromkeys([m[0] for m in methods], 0.0)
        em.cal = {}
        for key, g in data.items():
            p = rng.permutation(len(g))
            fit, held = g[p[:len(g) // 2]], g[p[len(g) // 2:]]
            lv = lloyd(normalized(fit, bits), bits, FIXED[bits], rng) if cal else None
            for name, levels, outl, p8 in methods:
                se[name] += sqerr(held, bits, lv if levels == "cal" else TABLES[levels][bits], outl, p8)
            if cal:
                em.cal[key] = lloyd(normalized(g, bits), bits, FIXED[bits], rng)  # all of it for the KLD runs
        for name, levels, outl, p8 in methods:
            em.mode, em.bits, em.levels, em.outliers, em.p8 = "quant", bits, levels, outl, p8
            kl, nll, top = [], [], []
            for c, r, t in zip(ev, ref, tgt):
                lq = logp(c)
                kl.append((r.exp() * (r - lq)).sum(-1).mean().item())
                nll.append(-lq[torch.arange(len(t)), t].mean().item())
                top.append((lq.argmax(-1) == r.argmax(-1)).float().mean().item())
            extra = 22 / 64 if outl else 0.0  # one fp16 value and a 6-bit index per group of 64
            rows.append(f"{bits},{name},{bits + (0.25 if p8 else 0.5) + extra:.3f},{np.mean(kl):.6f},"
                        f"{100 * (math.exp(float(np.mean(nll)) - nll0) - 1):+.3f},{100 * np.mean(top):.2f},"
                        f"{se[name] / se['uniform']:.4f}")
            print(rows[-1], file=sys.stderr, flush=True)
    head = "bits,method,bits_per_element,kld_mean,dppl_pct,top1_pct,sqerr_vs_uniform"
    text = "\n".join([head] + rows) + "\n"
    if a.out:
        path = os.path.join(a.out, f"quant-emulation-{os.path.splitext(a.gguf)[0]}{a.tag}.csv")
        with open(path, "w") as fo:
            fo.write(text)
        print(f"wrote {path}")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()

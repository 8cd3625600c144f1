#!/usr/bin/env python3
"""Quality of KV caches in HF transformers on a real model and real text: kvq.KVQCache against transformers'
QuantizedCache (quanto and HQQ backends), with DynamicCache as the reference.

Model: SmolLM2-135M-Instruct loaded by transformers from the GGUF (models/SmolLM2-135M-Instruct.Q4_1.gguf,
scripts/fetch-model.sh; dequantized to fp32 by transformers' GGUF loader, which needs `gguf` and `accelerate`).
Text: the Debian reference manual (/usr/share/debian-reference/debian-reference.en.txt.gz, package
debian-reference-en), which the model was not tuned on; tokenized whole, cut into consecutive chunks of
PREFILL + DECODE + 1 tokens from --offset (tokens).

Protocol, per chunk (the chunks of a method run as one batch, one row each):
  1. prefill: one forward call on the first --prefill (512) tokens, with a fresh cache of the method;
  2. --decode (512) one-token forward calls on the following tokens, each scored: the NLL of the next token, and,
     against DynamicCache's log-probabilities at the same step, KL(P_dynamic || P_method) and whether the top-1
     token is the same. The prefill's own logits are not scored: what is measured is decoding from a cache that was
     quantized, including the tokens quantized on the way (KIVI-style residual windows flush as decoding goes).
Reported per method: PPL = exp(mean NLL), dPPL % vs DynamicCache, mean and 99th percentile of the per-token KLD
(nats), top-1 agreement %, and bits per K/V element of the cache at the end of the protocol (prefill + decode
tokens stored): every byte of the quantized data, with scales / zeros and the full-precision residual window
counted at 16 bits (an fp16 deployment; the model here runs fp32, which does not change the formats' bits):
kvq from its own statistics (page bytes in use + residual windows), quanto / HQQ from the tensors in the cache
(integer tensors at their size, float tensors at 16 bits per value).

Methods (--methods, comma-separated):
  dynamic            transformers DynamicCache (fp32 here; counted as 16 bits), sdpa attention: the reference
  kvq-q8, kvq-q4,    kvq.KVQCache(kv_type=...) with attn_implementation="kvq" (attention on kvq's pages, what a user
  kvq-q3, kvq-q2     runs); kvq's defaults (group 64, residual 128 for Q4/Q3/Q2, and the section-10 mechanisms at
                     their defaults). kvq-q3 is reported as not available where the library has no Q3 type.
  quanto-4, quanto-2 QuantizedCache(backend="quanto", nbits=...), transformers' defaults (group 64, residual 128,
                     keys and values quantized along axis 0); quanto has no 8-bit KV option. Its C++ unpack
                     extension is replaced by the same bit unpacking in torch ops (nothing JIT-compiled).
  hqq-8, hqq-4,      QuantizedCache(backend="hqq", nbits=...), transformers' defaults (group 64, residual 128, axis 0)
  hqq-2
The kvq methods take KVQCache keywords with int values after slashes: kvq-q4/rotate=0/sinks=4.

Versions the table in docs/ was made with: torch 2.15.0, transformers 5.24.0, optimum-quanto 0.2.7,
hqq 0.2.8.post1, accelerate 1.16.0, gguf 0.19.0 (pip install optimum-quanto==0.2.7 hqq==0.2.8.post1
accelerate==1.16.0 gguf==0.19.0).

  python3 bench/bench_hf_quality.py --chunks 4 --threads 1 --out docs   # writes docs/bench-hf-quality.{csv,md}
  (--threads 1 on a shared machine: torch's two threads, oversubscribed, made a method take 10x longer)
  python3 bench/bench_hf_quality.py --chunks 1 --decode 64 --methods dynamic,kvq-q4,quanto-4   # quick look

Without --out it only prints. CSV columns (read by name by bench/quality.sh): method, nbits, ppl, dppl_pct,
kld_mean, kld_p99, top1_pct, bits_per_element, tokens, chunks.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import math
import os
import platform
import sys
import time
import types

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
from cache_tensors import cache_tensors  # noqa: E402

DEFAULT_MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_TEXT = "/usr/share/debian-reference/debian-reference.en.txt.gz"
DEFAULT_METHODS = "dynamic,kvq-q8,kvq-q4,kvq-q3,kvq-q2,quanto-4,quanto-2,hqq-8,hqq-4,hqq-2"
CSV_COLUMNS = ["method", "nbits", "ppl", "dppl_pct", "kld_mean", "kld_p99", "top1_pct", "bits_per_element", "tokens",
               "chunks"]


class NotAvailable(Exception):
    """A method this machine cannot run (package or kv type missing): reported, not fatal."""


# ------------------------------------------------------------------------------------------------------------
def load_text(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def load_model(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return tok, model


def _torch_unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's bit unpacking (value i of a byte in bits [bits*i, bits*(i+1)), stacked along dim 0) in torch ops."""
    mask = (1 << bits) - 1
    return torch.cat([(packed >> (bits * i)) & mask for i in range(8 // bits)]).to(torch.uint8)


def setup_quanto() -> str:
    try:
        import importlib.metadata
        import optimum.quanto  # noqa: F401
        from optimum.quanto.library.extensions import extension as qext
    except ImportError as e:
        raise NotAvailable(f"optimum-quanto not installed ({e})")
    for ext in qext._extensions.values():
        if ext._lib is None:  # its C++ extension would be JIT-compiled (minutes); the same unpacking in torch ops
            ext._lib = types.SimpleNamespace(unpack=_torch_unpack)
    return importlib.metadata.version("optimum-quanto")


def cache_kwarg() -> str:
    """The name the installed transformers takes the cache under (kvq.hf.CACHE_KWARG, without loading libkvq)."""
    import inspect
    from transformers.generation.utils import GenerationMixin
    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def parse_method(name: str):
    """'kvq-q4/rotate=0/sinks=4' -> ('kvq', 'q4', {'rotate': 0, 'sinks': 4}); 'hqq-4' -> ('hqq', 4, {})."""
    base, *opts = name.split("/")
    kw = {}
    for o in opts:
        k, _, v = o.partition("=")
        kw[k] = int(v)
    if base == "dynamic":
        return "dynamic", 16, kw
    fam, _, arg = base.partition("-")
    if fam == "kvq":
        return "kvq", arg, kw
    if fam in ("quanto", "hqq"):
        return fam, int(arg), kw
    raise ValueError(f"unknown method {name!r} (dynamic, kvq-q8/q4/q3/q2, quanto-4/2, hqq-8/4/2)")


def make_cache(model, name: str, max_len: int):
    """-> (cache, attn_implementation, nbits)."""
    fam, arg, kw = parse_method(name)
    if fam == "dynamic":
        from transformers import DynamicCache
        return DynamicCache(config=model.config), "sdpa", 16
    if fam == "kvq":
        import kvq
        from kvq import _native as N
        try:
            code = kvq.type_from_name(arg)  # raises for a type this libkvq lacks or has not implemented (q3)
        except ValueError as e:
            raise NotAvailable(str(e))
        kvq.register_attention()
        cache = kvq.KVQCache(model.config, kv_type=arg, max_cache_len=max_len, **kw)
        return cache, "kvq", int(N.kvq_type_traits(code)["bits"])
    from transformers import QuantizedCache
    if fam == "quanto":
        setup_quanto()
        if arg not in (2, 4):
            raise NotAvailable(f"quanto's KV cache has nbits 2 and 4 only, not {arg}")
    else:
        try:
            import hqq  # noqa: F401
        except ImportError as e:
            raise NotAvailable(f"hqq not installed ({e})")
    return QuantizedCache(fam, model.config, nbits=arg), "sdpa", arg


# ------------------------------------------------------------------------------------------------------------
def bits_per_element(cache, fam: str, model, batch: int, tokens: int) -> float:
    tc = model.config
    elems = 2 * tc.num_hidden_layers * tc.num_key_value_heads * tc.head_dim * batch * tokens
    if fam == "dynamic":
        return 16.0
    if fam == "kvq":
        b = cache.kv_bytes()
        return 8.0 * (b["in_use"] + b["window"]) / elems
    # integer storages at their size, float ones (scales, zeros, the residual) at 16 bits per value
    bits = sum(t.untyped_storage().nbytes() * (16 // t.element_size() if t.is_floating_point() else 8)
               for t in cache_tensors(cache))
    return bits / elems


# ------------------------------------------------------------------------------------------------------------
def run_method(model, name, ids, prefill, decode, ref_lp):
    """ids [B, prefill + decode + 1]. -> dict of per-token arrays (nll, kld, top1) and bits; fills ref_lp (the
    log-probs of each scored step, [B, decode, V]) when it is None-filled for the reference."""
    fam, _, _ = parse_method(name)
    B = ids.shape[0]
    cache, attn, nbits = make_cache(model, name, prefill + decode + 8)
    model.set_attn_implementation(attn)
    ck = cache_kwarg()
    nll = torch.empty((B, decode), dtype=torch.float64)
    kld = torch.empty((B, decode), dtype=torch.float64)
    top1 = torch.empty((B, decode), dtype=torch.bool)
    with torch.no_grad():
        model(ids[:, :prefill], use_cache=True, **{ck: cache})
        for i in range(decode):
            t = prefill + i
            out = model(ids[:, t:t + 1], use_cache=True, **{ck: cache})
            lp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
            nll[:, i] = -lp.gather(1, ids[:, t + 1:t + 2])[:, 0].double()
            if ref_lp[0] is None:
                ref_lp[1][:, i] = lp
                kld[:, i] = 0.0
                top1[:, i] = True
            else:
                r = ref_lp[1][:, i]
                kld[:, i] = (r.exp() * (r - lp)).sum(-1).double()
                top1[:, i] = r.argmax(-1) == lp.argmax(-1)
    bpe = bits_per_element(cache, fam, model, B, prefill + decode)
    return {"nll": nll, "kld": kld, "top1": top1, "bits": bpe, "nbits": nbits}


def fmt_row(r):
    return (f"| {r['method']} | {r['nbits']} | {r['ppl']:.4f} | {r['dppl_pct']:+.2f}% | {r['kld_mean']:.5f} | "
            f"{r['kld_p99']:.4f} | {r['top1_pct']:.2f}% | {r['bits_per_element']:.2f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=512)
    ap.add_argument("--offset", type=int, default=0, help="first token of the first chunk")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="folder for bench-hf-quality.csv and .md (docs: the tracked ones)")
    args = ap.parse_args(argv)
    if args.chunks < 1 or args.prefill < 1 or args.decode < 1:
        ap.error("--chunks, --prefill and --decode must be >= 1")
    methods = [m for m in args.methods.split(",") if m]
    if methods[0] != "dynamic":
        methods = ["dynamic"] + [m for m in methods if m != "dynamic"]  # the reference runs first
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    t_start = time.time()
    tok, model = load_model(args.model)
    text = load_text(args.text)
    n_tok = args.prefill + args.decode + 1
    need = args.offset + args.chunks * n_tok
    # tokenize a prefix long enough (about 4 characters per token; doubled until enough tokens)
    n_chars = need * 5
    while True:
        all_ids = tok(text[:n_chars], return_tensors="pt").input_ids[0]
        if all_ids.numel() >= need or n_chars >= len(text):
            break
        n_chars *= 2
    if all_ids.numel() < need:
        sys.exit(f"the text has {all_ids.numel()} tokens, {need} needed")
    ids = all_ids[args.offset:need].view(args.chunks, n_tok)
    V = model.config.vocab_size
    ref = [None, torch.empty((args.chunks, args.decode, V), dtype=torch.float32)]
    print(f"model {os.path.basename(args.model)} ({model.config.num_hidden_layers} layers, "
          f"{model.config.num_key_value_heads} KV heads of {model.config.head_dim}), {args.chunks} chunks x "
          f"(prefill {args.prefill} + {args.decode} scored decode calls), torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {torch.get_num_threads()} threads", flush=True)
    rows, notes, base = [], [], None
    for m in methods:
        t0 = time.time()
        try:
            r = run_method(model, m, ids, args.prefill, args.decode, ref)
        except NotAvailable as e:
            notes.append(f"{m}: not run: {e}")
            print(f"{m}: not run: {e}", flush=True)
            continue
        nll = r["nll"].flatten()
        ppl = math.exp(nll.mean().item())
        if base is None:
            base = ppl
            ref[0] = True
        kld = r["kld"].flatten().numpy()
        row = {"method": m, "nbits": r["nbits"], "ppl": ppl, "dppl_pct": 100.0 * (ppl / base - 1.0),
               "kld_mean": float(kld.mean()), "kld_p99": float(np.percentile(kld, 99)),
               "top1_pct": 100.0 * r["top1"].float().mean().item(), "bits_per_element": r["bits"],
               "tokens": nll.numel(), "chunks": args.chunks}
        rows.append(row)
        print(fmt_row(row) + f"  ({time.time() - t0:.0f} s)", flush=True)
        if args.out:  # after every method, so that a run cut short keeps what it measured
            write_out(args, argv, rows, notes, time.time() - t_start)
    if args.out:
        write_out(args, argv, rows, notes, time.time() - t_start)
        print(f"wrote {args.out}/bench-hf-quality.csv and .md")
    print("\n".join(table(rows, notes)))


def table(rows, notes):
    md = ["| method | nbits | PPL | dPPL | mean KLD | p99 KLD | top-1 | bits/elem |", "|---|---|---|---|---|---|---|---|"]
    md += [fmt_row(r) for r in rows]
    if notes:
        md += [""] + [f"- {n}" for n in notes]
    return md


def write_out(args, argv, rows, notes, elapsed):
    import importlib.metadata
    import transformers
    versions = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    for pkg in ("optimum-quanto", "hqq", "gguf", "accelerate"):
        try:
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except Exception:  # noqa: BLE001 - not installed
            pass
    cmd = "python3 bench/bench_hf_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = ["# KV cache quality in HF transformers: kvq vs QuantizedCache (quanto, HQQ)", "",
          f"Written by `{cmd.strip()}` ({elapsed / 60:.0f} min on {os.cpu_count()} {platform.machine()} CPUs, "
          f"{torch.get_num_threads()} torch threads; {', '.join(versions)}).", "",
          f"SmolLM2-135M-Instruct (GGUF Q4_1 weights, dequantized to fp32 by transformers), the Debian reference "
          f"manual, {args.chunks} chunks of prefill {args.prefill} tokens + {args.decode} one-token decode calls, "
          f"each scored: {rows[0]['tokens'] if rows else 0} tokens. dPPL, KLD (nats, KL(P_DynamicCache || "
          "P_method) per token) and top-1 agreement are against DynamicCache at the same step. Bits per element: the "
          f"cache at {args.prefill + args.decode} tokens, scales / zeros and the full-precision residual window "
          "counted at 16 bits. See the docstring of bench/bench_hf_quality.py for the protocol.", ""]
    md += table(rows, notes)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench-hf-quality.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in CSV_COLUMNS})
    with open(os.path.join(args.out, "bench-hf-quality.md"), "w") as f:
        f.write("\n".join(md) + "\n")

if __name__ == "__main__":
    main()

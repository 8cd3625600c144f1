"""kvq.calibrate: per-layer KV types for a bit budget, from a transformers model and calibration text (issue 20).

The same method as `kvq calibrate` (src/cli/calibrate.c), on the HF side:
  * each layer's sensitivity s_l(t) to a candidate type t is measured alone: the model runs over the calibration chunks
    with every layer's KVQCache layer in f16 but layer l's in t, and s_l(t) is the mean KL divergence of its next-token
    distributions from the all-f16 run's, over the second half of each chunk (kvq perplexity's scoring: each chunk
    starts from an empty cache and is fed in batches of `batch` tokens, so the scored tokens read up to ctx/2 earlier
    tokens back from the quantized pages);
  * errors in different layers add up nearly linearly in the KLD (docs/quality.md, "Per-layer types"), so the plan
    minimizes sum_l s_l(t_l): every layer starts at its cheapest candidate, then the upgrade with the most KLD saved
    per bit added is taken while the mean stays within the budget;
  * bits per element count pages, scales, the fp16 window and sinks once `bits_ctx` tokens are held, measured on a
    one-layer kvq cache fed as the cache is fed (a sliding-window layer holds only its window and one batch), which
    is what `kvq perplexity`'s bits/elem column and `kvq calibrate` count.
Use calibration text other than the text you evaluate on.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from . import _native as N
from .hf import ATTN_IMPLEMENTATION, CACHE_KWARG, KVQCache, _shape_of, register_attention
from .plan import Plan, plan_for_budget  # noqa: F401


def _token_ids(texts, tokenizer) -> torch.Tensor:
    if isinstance(texts, torch.Tensor):
        ids = texts.reshape(-1)
    elif isinstance(texts, str) or (isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts)):
        if tokenizer is None:
            raise ValueError("kvq.calibrate: texts are strings: pass tokenizer= (the model's tokenizer)")
        joined = texts if isinstance(texts, str) else "\n\n".join(texts)
        ids = torch.tensor(tokenizer(joined, add_special_tokens=False)["input_ids"], dtype=torch.long)
    elif isinstance(texts, (list, tuple, np.ndarray)):
        ids = torch.as_tensor(np.asarray(texts, dtype=np.int64)).reshape(-1)
    else:
        raise TypeError("kvq.calibrate: texts is a string, a list of strings or a sequence of token ids, got "
                        f"{type(texts).__name__}")
    return ids.to(torch.long)


def _layer_bytes(n_kv: int, head_dim: int, tk: int, tv: int, tokens: int, batch: int, window: int,
                 residual: int, group: int, quality: dict) -> float:
    """Bytes one layer holds after `tokens` tokens went in by batches of `batch`: pages in use (sinks included) plus
    the fp16 window rows, on a one-layer cache fed zeros (bytes do not depend on the values). A sliding-window layer
    (window > 0) holds only its window, one batch and two pages, and has no sinks, as kvq's engine and kvq calibrate
    count it."""
    held = tokens
    q = dict(quality)
    if window > 0:
        q["sinks"] = 0
        P = max(group, 64)
        held = min(held, window + batch + 2 * P)
    with N.Cache(1, n_kv, head_dim, tk, tv, max_tokens=held + batch + 64, residual=residual, group=group,
                 max_seqs=1, n_threads=1, **q) as c:
        s = c.seq_new()
        z = np.zeros((batch, n_kv, head_dim), dtype=np.float16)
        done = 0
        while done < held:
            n = min(batch, held - done)
            c.append(0, [s], [n], z[:n], z[:n])
            done += n
        st = c.stats()
    return float(st["page_bytes_in_use"] + st["window_bytes"])


def _chunk_logprobs(model, ids: torch.Tensor, cache: KVQCache, batch: int, first: int) -> torch.Tensor:
    """log-softmax of the model's logits at positions first-1..len-2 of one chunk (the distributions of its second
    half's tokens first..len-1, as kvq perplexity scores them), fed in batches through `cache`."""
    out = []
    n = ids.shape[0]
    dev = next(model.parameters()).device
    for s in range(0, n, batch):
        e = min(n, s + batch)
        r = model(input_ids=ids[s:e].unsqueeze(0).to(dev), use_cache=True, **{CACHE_KWARG: cache})
        lo, hi = max(s, first - 1), min(e, n - 1)
        if hi > lo:
            out.append(torch.log_softmax(r.logits[0, lo - s:hi - s].float(), dim=-1).cpu())
    return torch.cat(out)


def calibrate(model: Any, texts: Union[str, Sequence[str], Sequence[int], torch.Tensor], budget: float, *,
              tokenizer: Any = None, types: Sequence[str] = ("q2", "q4", "q8"), ctx: int = 1024, chunks: int = 2,
              batch: int = 256, bits_ctx: Optional[int] = None, bos: Optional[int] = -1,
              cache_kwargs: Optional[dict] = None, progress: Optional[Callable[[int, int], None]] = None) -> Plan:
    """Per-layer KV types whose mean stored bits per K/V element fit `budget` and whose summed per-layer KLD from
    the f16 cache is lowest (the module docstring says how). Returns a kvq.Plan: pass it to KVQCache(config,
    plan=...) or save it (plan.save(path)) for `kvq run/perplexity --kv-plan` on the GGUF of the same model.

    texts: calibration text (a string or a list of strings, tokenized with `tokenizer`) or token ids.
    types: 2 to 6 distinct candidates, each "T" or "KEYS/VALUES" (kvq type names).
    ctx, chunks: the measurement runs `chunks` chunks of `ctx` tokens (the text must hold them); batch: tokens per
        forward call. bits_ctx: the context length at which bits are counted (default ctx).
    bos: the token id that replaces the first of each chunk; -1 (default): the tokenizer's BOS when it adds one to
        every text (Gemma), as kvq perplexity does, else none; None: the text's own tokens.
    cache_kwargs: other KVQCache arguments (residual, group, rotate, sinks, nonuniform, squat_rank, n_threads...),
        the same for every run and for the bits.
    progress: called as progress(done, total) after each measured configuration.
    """
    cache_kwargs = dict(cache_kwargs or {})
    for k in ("kv_type", "value_type", "plan", "max_cache_len", "max_batch_size"):
        if k in cache_kwargs:
            raise ValueError(f"kvq.calibrate: cache_kwargs may not set {k} (calibrate chooses it)")
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not 0.5 <= float(budget) <= 32:
        raise ValueError(f"kvq.calibrate: budget = {budget!r} must be a number of bits in 0.5..32")
    ctx, chunks, batch = (N._int(x, n, 1) for x, n in ((ctx, "ctx"), (chunks, "chunks"), (batch, "batch")))
    if ctx < 4:
        raise ValueError(f"kvq.calibrate: ctx = {ctx} must be >= 4")
    bits_ctx = ctx if bits_ctx is None else N._int(bits_ctx, "bits_ctx", 1)
    if isinstance(types, str) or not 2 <= len(types) <= 6:
        raise ValueError("kvq.calibrate: types is a list of 2 to 6 candidates, e.g. ('q2', 'q4', 'q8')")
    cand = []
    for t in types:
        if not isinstance(t, str):
            raise TypeError(f"kvq.calibrate: a candidate is a type name ('q4' or 'q8/q4'), got {t!r}")
        k, _, v = t.partition("/")
        pair = (N.type_from_name(k), N.type_from_name(v if v else k))
        if pair in [p for p, _ in cand]:
            raise ValueError(f"kvq.calibrate: candidate {t!r} is listed twice")
        name = N.type_name(pair[0]) if pair[0] == pair[1] else f"{N.type_name(pair[0])}/{N.type_name(pair[1])}"
        cand.append((pair, name))
    cfg = model.config
    tc, NL, _, n_kv, head_dim = _shape_of(cfg)
    ids = _token_ids(texts, tokenizer)
    if ids.numel() < ctx * chunks:
        raise ValueError(f"kvq.calibrate: the text has {ids.numel()} tokens, {chunks} chunks of {ctx} need "
                         f"{ctx * chunks}")
    if bos == -1:  # as kvq perplexity: BOS starts each chunk where the tokenizer adds one (Gemma), not otherwise
        bos = None
        b = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
        if b is not None:
            enc = tokenizer("a", add_special_tokens=True)["input_ids"]
            bos = b if len(enc) and enc[0] == b else None
    # the quality options the cache resolves for these types: the same for the bits as for the runs
    probe = KVQCache(cfg, kv_type="f16", max_cache_len=1, **cache_kwargs)
    quality = dict(probe.kvq_quality)
    residual, group = probe.kvq_residual, probe.kvq_group
    windows = [0] * NL
    sw = getattr(tc, "sliding_window", None) or 0
    for i, layer in enumerate(probe.layers):
        if layer.is_sliding and sw:
            windows[i] = int(sw)
    del probe

    den = 2.0 * NL * n_kv * head_dim  # K and V elements per token
    memo: dict = {}
    cost = np.zeros((NL, len(cand)))
    for l in range(NL):
        for j, ((tk, tv), _) in enumerate(cand):
            key = (tk, tv, windows[l])
            if key not in memo:
                memo[key] = _layer_bytes(n_kv, head_dim, tk, tv, bits_ctx, batch, windows[l], residual, group, quality)
            cost[l, j] = memo[key] / bits_ctx
    cheapest = sum(cost[l].min() for l in range(NL))
    if cheapest > float(budget) * den / 8.0 * (1 + 1e-9):  # before the measurement, not after it
        raise ValueError(f"kvq.calibrate: budget {float(budget):.3f}: the cheapest plan (every layer its cheapest "
                         f"candidate) needs {8.0 * cheapest / den:.3f} bits at bits_ctx {bits_ctx}")

    prev_attn = getattr(cfg, "_attn_implementation", None)
    register_attention()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    chunk_ids = []
    for c in range(chunks):
        x = ids[c * ctx:(c + 1) * ctx].clone()
        if bos is not None:
            x[0] = int(bos)
        chunk_ids.append(x)
    first = ctx // 2
    f16 = ["f16"] * NL
    try:
        with torch.no_grad():
            base = [_chunk_logprobs(model, x, KVQCache(cfg, kv_type=f16, max_cache_len=ctx, max_batch_size=1,
                                                        **cache_kwargs), batch, first) for x in chunk_ids]
            sens = np.zeros((NL, len(cand)))
            todo = [(l, j) for l in range(NL) for j, (p, _) in enumerate(cand) if p != (0, 0)]
            for done, (l, j) in enumerate(todo, 1):
                (tk, tv), _ = cand[j]
                ks = {l: N.type_name(tk), "default": "f16"}
                vs = {l: N.type_name(tv), "default": "f16"}
                kl_sum, n_tok = 0.0, 0
                for x, lp0 in zip(chunk_ids, base):
                    cache = KVQCache(cfg, kv_type=ks, value_type=vs, max_cache_len=ctx, max_batch_size=1,
                                     **cache_kwargs)
                    lp = _chunk_logprobs(model, x, cache, batch, first)
                    kl_sum += float((lp0.exp() * (lp0 - lp)).sum())
                    n_tok += lp.shape[0]
                sens[l, j] = max(kl_sum / n_tok, 0.0)
                if progress is not None:
                    progress(done, len(todo))
    finally:
        if prev_attn is not None:
            model.set_attn_implementation(prev_attn)

    sensitivity = {(l, cand[j][1]): (float(sens[l, j]), 8.0 * cost[l, j] * NL / den)
                   for l in range(NL) for j in range(len(cand))}
    return plan_for_budget(sensitivity, [n for _, n in cand], NL, float(budget), bits_ctx)


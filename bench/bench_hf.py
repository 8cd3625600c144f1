#!/usr/bin/env python3
"""Decode speed and memory of KV caches in HF transformers, on a random-weight Llama-architecture model with
Llama-3-8B shapes (hidden 4096, 32 query heads, 8 KV heads, head_dim 128, MLP 14336, vocabulary 128256), a few
layers (--layers, default 4).

Per cache, context length and batch size (all with the same model, the same context length and the same number of
decode steps):
  1. the context is loaded straight into the cache: random fp16 K/V of the model's shapes, one update per layer
     (the prefill is not what is measured and is excluded from time and peak memory);
  2. --warmup decode steps of the whole model (embedding, layers, LM head), not timed;
  3. --steps timed decode steps (Python's garbage collector off): a CUDA event after each step; the host time of
     each model() call is kept too ("host ms");
  4. --host-steps steps with a host clock (time.perf_counter) around every layer's cache.update() and attention
     function, nothing else: "host us/layer" is the host time of one layer's KV update + attention call (for kvq: the
     append and the attention on the pages; DynamicCache + SDPA: torch.cat and the SDPA call), the median over those
     steps of their mean over layers. It is the per-layer host cost the cache adds to a step (issue 23), measured
     the same way for every method, in the same run;
  5. --breakdown-steps instrumented steps: the GPU is first held by a spin kernel (torch.cuda._sleep) long enough
     for the host to queue the whole step, so the step then runs on the GPU without host gaps; CUDA events around
     every layer's cache.update() and attention function give "GPU ms/step" (pure device time of a step), "KV
     update ms" (cache.update: concatenation / quantization / dequantization) and "attention ms" (the attention
     function; for kvq it includes the append, which kvq does inside its attention);
  6. peak GPU memory: torch.cuda.max_memory_allocated() over steps 2-5 (its counter is reset after the context is
     loaded), minus the model weights, plus the device memory kvq allocates outside torch's allocator (arena,
     residual windows, page tables, workspace);
  7. KV MiB: the bytes of the cache's K/V contents at the end (tensors of DynamicCache / QuantizedCache / icw; kvq:
     pages in use + residual windows), and a check that the cache holds context + all decode steps tokens.
All of this is done --rounds times (default 2) per row, the methods of one (context, batch) in turn and every other
round in reverse order, so that slow drifts of the host (the steps of a 4-layer model at batch 1 are bound by Python
overhead) do not favour one method; ms/step = the MEDIAN of the per-step intervals of all rounds, tokens/s =
batch / ms/step.

Caches (--methods):
  dynamic        transformers DynamicCache, fp16, attn_implementation="sdpa", SDPA pinned to one backend (--sdpa,
                 default flash: FlashAttention-2 through torch.nn.attention.sdpa_kernel)
  dynamic@auto   the same with torch's own SDPA backend choice. On Hopper with cuDNN > 9.15 torch puts cuDNN first
                 (torch 2.11: TORCH_CUDNN_SDPA_DEPRIORITIZED unset), and cuDNN builds an execution plan for every new
                 (batch, kv length) shape: in decode the length grows by one each step, so EVERY step pays a plan
                 build (~30 ms), whatever the context and batch. That was the fixed ~36 ms/step of the earlier
                 docs/bench-hf.md, and it also made icw-int8 look faster than DynamicCache (icw ran second and found
                 the plans of the same lengths already built). Any sdpa method takes @flash/@cudnn/@efficient/
                 @math/@auto.
  icw-int8       the icw-kv-quant method re-implemented in a few lines: int8 K/V with one scale per (batch, head)
                 over the whole sequence; each step dequantizes everything, appends the new token, re-quantizes
                 everything, and hands the fp16 copy to SDPA
  quanto-q4/q2   transformers QuantizedCache(backend="quanto", nbits=4/2) (optimum-quanto; K and V quantized in
                 groups of 64, 128-token fp16 residual; every step dequantizes the whole cache and hands the fp16
                 copy to SDPA; every 128 steps the whole cache is re-quantized: that flush is timed separately, see
                 "flush ms"). quanto's CUDA unpack is a JIT-compiled extension (nvcc, minutes, with Marlin/AWQ
                 kernels); by default it is replaced by the same bit unpacking in plain torch ops (--quanto-unpack
                 torch), --quanto-unpack ext compiles and uses the extension (compiled before any timing)
  kvq-q8/q4/q2   kvq.KVQCache with attn_implementation="kvq": attention on the quantized pages (kvq_cuda_* on GPU,
                 kvq_attn_* on CPU); decode steps make one prepared call per layer (kvq_cuda_decode_step)
  static+graph   captured decode (issue 23): transformers StaticCache (buffers of the maximum length, a device-side
                 length) with its sdpa attention (K/V repeated to the query heads because a mask is passed), the
                 whole decode step captured once with torch.cuda.CUDAGraph and replayed (the mask of the filled
                 positions is made inside the graph from a device position); static-gqa+graph: the same with SDPA's
                 enable_gqa instead of the repeat (the strongest StaticCache baseline); static+compile /
                 static-gqa+compile: torch.compile(mode="reduce-overhead", fullgraph=True) instead of the manual
                 capture (compiles per batch and context: 5-18 s each on the H200 host)
  kvq-q4+graph   kvq.hf.CUDAGraphDecode over a KVQCache (kvq.StaticPlan: lengths and page tables on the device): the
                 whole decode step as one graph replay, kvq's append and attention included (CUDA only);
                 kvq-q4+compile: kvq.hf.CompiledDecode, torch.compile(mode="reduce-overhead", fullgraph=True) of the
                 forward with kvq's append + attention as the custom op kvq::decode_step (the same static plans)
  kvq-q4/general the same with the decode steps through KVQCache's general path (append + attention as two calls with
                 the arguments checked and converted at every call, an output allocated per call: the path before
                 issue 23), to measure the host time of both in one run (compare "host us/layer")

Rows that fail (OOM, missing package, ...) are reported as such. Results are written after every row (--out
markdown, --csv), so a run cut short still leaves what it measured; --budget-s skips what would start after that
many seconds (reported as skipped); a row with no result after --row-timeout-s (a hang in a CUDA or kvq call) is
reported as hung, the rest as not run, the Python stacks are printed and the process exits with status 3.

  python3 bench/bench_hf.py --out docs/bench-hf.md --csv docs/bench-hf.csv                      # GPU, full default
  python3 bench/bench_hf.py --ctx 8192,32768,131072 --batch 1,8 --layers 4 --steps 16           # quicker subset
  python3 bench/bench_hf.py --device cpu --ctx 256,512 --batch 1,2 --layers 2 --steps 4 --vocab 1024 --mlp 1024
"""
import argparse
import contextlib
import csv
import faulthandler
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import kvq  # noqa: E402
from cache_tensors import cache_tensors  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers import __version__ as TRANSFORMERS_VERSION  # noqa: E402
from transformers.cache_utils import Cache, DynamicLayer  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

DEFAULT_METHODS = "dynamic,dynamic@auto,icw-int8,quanto-q4,quanto-q2,kvq-q8,kvq-q4,kvq-q2"
MiB = 2 ** 20


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


class ICWInt8Cache(Cache):
    def __init__(self, n_layers):
        super().__init__(layers=[ICWInt8Layer() for _ in range(n_layers)])


# ------------------------------------------------------------------------------------------------------------
# optimum-quanto without its JIT-compiled extensions
# ------------------------------------------------------------------------------------------------------------
def _torch_unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's bit unpacking (uint8 holding 8/bits values; value i of a byte is in bits [bits*i, bits*(i+1)),
    unpacked values stacked along dim 0 in order i) in plain torch ops."""
    mask = (1 << bits) - 1
    return torch.cat([(packed >> (bits * i)) & mask for i in range(8 // bits)]).to(torch.uint8)


def setup_quanto(mode, device):
    """Import optimum.quanto; -> (version, note). mode "torch": the quanto::unpack kernels of its C++/CUDA extensions
    (compiled by torch.utils.cpp_extension on first use) are replaced by _torch_unpack, so nothing is compiled.
    mode "ext": the extension of `device` is compiled now, before any timing."""
    import importlib.metadata
    import optimum.quanto  # noqa: F401
    from optimum.quanto.library.extensions import extension as qext
    ver = importlib.metadata.version("optimum-quanto")
    if mode == "ext":
        name = "quanto_cuda" if device == "cuda" else "quanto_cpp"
        t0 = time.perf_counter()
        qext.get_extension(name).lib  # noqa: B018  (compiles)
        return ver, f"quanto {ver}: {name} extension compiled in {time.perf_counter() - t0:.0f} s (not timed)"
    for ext in qext._extensions.values():
        if ext._lib is None:
            ext._lib = types.SimpleNamespace(unpack=_torch_unpack)
    return ver, f"quanto {ver}: unpack in torch ops (its JIT-compiled C++/CUDA extensions replaced, nothing compiled)"


# ------------------------------------------------------------------------------------------------------------
def make_model(n_layers, device, dtype, vocab, mlp):
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=mlp, num_hidden_layers=n_layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                      rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    return model


def split_method(m, default_sdpa):
    name, _, backend = m.partition("@")
    if name.startswith("kvq"):
        return name, None
    return name, backend or default_sdpa


def make_cache(name, model, B, max_len):
    cfg = model.config
    if name == "dynamic":
        return DynamicCache(config=cfg), "sdpa"
    if name == "icw-int8":
        return ICWInt8Cache(cfg.num_hidden_layers), "sdpa"
    if name.startswith("quanto-q"):
        from transformers import QuantizedCache
        return QuantizedCache("quanto", cfg, nbits=int(name[len("quanto-q"):])), "sdpa"
    if name.startswith("kvq-"):
        kv_type, _, path = name.split("-", 1)[1].partition("/")
        if path not in ("", "general"):
            raise ValueError(f"unknown kvq path {path!r} in {name} (kvq-TYPE or kvq-TYPE/general)")
        cache = kvq.KVQCache(cfg, kv_type=kv_type, max_cache_len=max_len, max_batch_size=B)
        cache._fast_decode = path != "general"
        return cache, "kvq"
    raise ValueError(f"unknown method {name}")


def sdpa_context(backend, device):
    if backend in (None, "auto"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    b = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend]
    return sdpa_kernel([b])


def fill(cache, name, model, B, ctx, device, dtype):
    """Load `ctx` random tokens of K/V into every layer (chunked for kvq, one update for the others)."""
    cfg = model.config
    H, D, L = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    g = torch.Generator(device=device).manual_seed(1)
    for layer in range(L):
        if name.startswith("kvq"):
            for s in range(0, ctx, 8192):
                n = min(8192, ctx - s)
                k = torch.randn((B, H, n, D), device=device, dtype=dtype, generator=g)
                v = torch.randn((B, H, n, D), device=device, dtype=dtype, generator=g)
                cache.append_kv(layer, k, v)
                del k, v
        else:
            k = torch.randn((B, H, ctx, D), device=device, dtype=dtype, generator=g)
            v = torch.randn((B, H, ctx, D), device=device, dtype=dtype, generator=g)
            cache.update(k, v, layer)
            del k, v


def kv_bytes(cache, name):
    if name.startswith("kvq"):
        b = cache.kv_bytes()
        return b["in_use"] + b["window"], b["arena"] + b["window"]
    tot = sum(t.untyped_storage().nbytes() for t in cache_tensors(cache))
    return tot, tot


def kvq_device_bytes(cache):
    tot = 0
    if not cache.is_cuda:
        return 0
    for g in cache._groups:
        if g.handle is not None:
            st = g.handle.stats()
            tot += st["arena_bytes"] + st["window_bytes"] + st["table_bytes"] + st["workspace_bytes"]
    return tot


def tokens_held(cache, name):
    n = int(cache.get_seq_length())  # StaticCache's is a device tensor
    if name.startswith("kvq"):
        rows = cache.seq_lengths(0)
        return n, (min(rows) if rows else 0)
    return n, n


def row_figures(res, cache, name, model, B, ctx, n_dec, per_step, host, gpu_steps, steps, cuda, weights_bytes):
    """The figures every row reports (run_one, run_graph), from its timed steps and its cache at the end: ms/step
    statistics, tokens/s, host and GPU ms, peak GPU memory above the weights (+ kvq's own device memory), the KV
    bytes held, and a note when the cache does not hold ctx + n_dec tokens."""
    med = statistics.median(per_step)
    res.update(ms_step=med, ms_mean=statistics.mean(per_step), ms_min=min(per_step), ms_max=max(per_step),
               tok_s=B * 1000.0 / med, host_ms=statistics.median(host), steps=steps,
               _per_step=per_step, _host=host, _gpu=gpu_steps)
    if gpu_steps:
        res["gpu_ms"] = statistics.median(gpu_steps)
    if cuda:
        extra = kvq_device_bytes(cache) if name.startswith("kvq") else 0
        res["peak_mib"] = (torch.cuda.max_memory_allocated() - weights_bytes + extra) / MiB
    kvb, alloc = kv_bytes(cache, name)
    res["kv_mib"] = kvb / MiB
    res["kv_alloc_mib"] = alloc / MiB
    res["kv_mib_per_layer"] = kvb / MiB / model.config.num_hidden_layers
    held, held_rows = tokens_held(cache, name)
    res["tokens"] = held
    want = ctx + n_dec
    if held != want or held_rows != want:
        res["note"] = f"cache holds {held} tokens (rows: {held_rows}), expected {want}"


# ------------------------------------------------------------------------------------------------------------
# clocks and instrumentation
# ------------------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self, cuda):
        self.cuda = cuda

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b):
        return a.elapsed_time(b) if self.cuda else 1000.0 * (b - a)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


class Probe:
    """Events around every layer's cache.update() and attention function during instrumented steps; also records
    which SDPA backend torch picks for the first attention call."""

    def __init__(self, cache, impl, clock):
        self.cache, self.impl, self.clock = cache, impl, clock
        self.on = False
        self.host_on = False  # host clock only (the --host-steps steps)
        self.host_steps = []  # per host step: {layer: [t_update_start, t_attention_end]}
        self.sdpa_choice = None
        self.marks = []  # per step: list of (layer, t_update_start, t_update_end, t_attn_end)
        self._orig_update = cache.update
        self._orig_attn = ALL_ATTENTION_FUNCTIONS[impl]
        self._cur = {}

        def update(key_states, value_states, layer_idx, *a, **kw):
            if self.host_on:
                self._cur[layer_idx] = [time.perf_counter()]
                return self._orig_update(key_states, value_states, layer_idx, *a, **kw)
            if self.on:
                t0 = self.clock.mark()
            out = self._orig_update(key_states, value_states, layer_idx, *a, **kw)
            if self.on:
                self._cur[layer_idx] = [t0, self.clock.mark()]
            return out

        def attention(module, query, key, value, attention_mask, *a, **kw):
            if self.sdpa_choice is None and impl in ("sdpa", "sdpa_gqa"):
                self.sdpa_choice = sdpa_choice(module, query, key, value, attention_mask, impl == "sdpa_gqa")
            out = self._orig_attn(module, query, key, value, attention_mask, *a, **kw)
            if self.host_on:
                self._cur[module.layer_idx].append(time.perf_counter())
            elif self.on:
                self._cur[module.layer_idx].append(self.clock.mark())
            return out

        cache.update = update
        ALL_ATTENTION_FUNCTIONS[impl] = attention  # local override of the shared instance the models use

    def begin_step(self):
        self._cur = {}

    def end_step(self):
        self.marks.append([(li, *ts) for li, ts in sorted(self._cur.items())])

    def end_host_step(self):
        self.host_steps.append(dict(self._cur))

    def host_us_per_layer(self):
        """Median over the host steps of the mean over layers of (attention end - update start), in us."""
        per = [1e6 * statistics.mean(t[1] - t[0] for t in st.values()) for st in self.host_steps
               if st and all(len(t) == 2 for t in st.values())]
        return statistics.median(per) if per else float("nan")

    def close(self):
        del ALL_ATTENTION_FUNCTIONS[self.impl]
        try:
            del self.cache.update
        except AttributeError:
            pass

    def split_ms(self):
        """-> (median KV update ms/step, median attention ms/step) over the instrumented steps."""
        upd, att = [], []
        for step in self.marks:
            if not step or any(len(x) != 4 for x in step):
                continue
            upd.append(sum(self.clock.ms(a, b) for _, a, b, _c in step))
            att.append(sum(self.clock.ms(b, c) for _, _a, b, c in step))
        return (statistics.median(upd) if upd else float("nan"), statistics.median(att) if att else float("nan"))


def sdpa_choice(module, query, key, value, attention_mask, gqa=None):
    """Name of the backend torch's SDPA dispatch picks for this call under the current sdpa_kernel settings."""
    try:
        from torch.nn.attention import SDPBackend
        if gqa is None:  # transformers' sdpa integration: enable_gqa only without a mask
            gqa = getattr(module, "num_key_value_groups", 1) > 1 and attention_mask is None
        i = torch._fused_sdp_choice(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                    enable_gqa=gqa)
        names = {int(v.value) if hasattr(v, "value") else int(v): k for k, v in SDPBackend.__members__.items()}
        return names.get(int(i), str(i)).lower()
    except Exception as e:  # private API: report, never fail the row on it
        return f"? ({type(e).__name__})"


def sleep_cycles_per_ms():
    """GPU clock cycles per ms of torch.cuda._sleep (measured once)."""
    if not hasattr(torch.cuda, "_sleep"):
        return None
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000000)
    e0.record()
    torch.cuda._sleep(20000000)
    e1.record()
    e1.synchronize()
    return 20000000 / max(e0.elapsed_time(e1), 1e-3)


# ------------------------------------------------------------------------------------------------------------
def quanto_flush_ms(cache, clock):
    """Time of one full re-quantization of every layer (what QuantizedCache does every residual_length steps)."""
    xs = []
    for layer in cache.layers:
        xs.append((layer, layer._dequantize(layer._quantized_keys).contiguous(),
                   layer._dequantize(layer._quantized_values).contiguous()))
    clock.sync()
    t0 = clock.mark()
    for layer, k, v in xs:
        layer._quantize(k, axis=layer.axis_key)
        layer._quantize(v, axis=layer.axis_value)
    t1 = clock.mark()
    clock.sync()
    return clock.ms(t0, t1), getattr(cache.layers[0], "residual_length", 0)


# ------------------------------------------------------------------------------------------------------------
# captured decode (issue 23): a whole decode step as one CUDA graph, kvq against StaticCache
# ------------------------------------------------------------------------------------------------------------
def sdpa_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA sharing the KV heads through enable_gqa. transformers' own sdpa integration repeats K and V in memory
    (4x the whole cache for Llama-3's 32/8 heads) whenever a mask is passed, which every StaticCache decode step
    needs (its buffer is longer than what it holds): this is the strongest StaticCache + SDPA we can give it."""
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def register_sdpa_gqa():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register("sdpa_gqa", sdpa_gqa_attention)
    AttentionMaskInterface.register("sdpa_gqa", sdpa_mask)


class StaticGraphDecode:
    """Decode steps over a transformers StaticCache holding the context, replayed as one CUDA graph per step (mode
    "graph": torch.cuda.CUDAGraph around the eager forward, the way kvq.hf.CUDAGraphDecode captures kvq) or through
    torch.compile(mode="reduce-overhead", fullgraph=True) (mode "compile": inductor's kernels, cudagraph trees). The
    mask of the static buffer (positions <= the current one) is made inside the step from a device tensor, so a
    replay needs no host work. On the CPU (tests) mode "graph" runs eagerly."""

    def __init__(self, model, cache, batch, pos, max_len, mode):
        dev = model.device
        self.model, self.cache, self.batch, self.pos, self.mode = model, cache, batch, pos, mode
        self._ids = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        self._pos = torch.full((batch, 1), pos, dtype=torch.long, device=dev)
        self._cpos = torch.full((1,), pos, dtype=torch.long, device=dev)
        self._kv_pos = torch.arange(max_len, device=dev)
        self.graph, self._out = None, None
        self._fn = self._step
        if mode == "compile":
            self._fn = torch.compile(self._step, mode="reduce-overhead", fullgraph=True)

    def _step(self, ids, pos, cpos):
        mask = (self._kv_pos <= cpos).view(1, 1, 1, -1).expand(self.batch, 1, 1, -1)
        return self.model(input_ids=ids, position_ids=pos, cache_position=cpos, attention_mask=mask,
                          past_key_values=self.cache, use_cache=True).logits

    def __call__(self, tokens):
        self._ids.copy_(tokens.reshape(self.batch, 1))
        self._pos.fill_(self.pos)
        self._cpos.fill_(self.pos)
        self.pos += 1
        if self.mode == "graph" and self._ids.is_cuda:
            if self.graph is None:  # as CUDAGraphDecode: one real step on a side stream, then the capture
                dev = self._ids.device
                side = torch.cuda.Stream(device=dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):
                    first = self._step(self._ids, self._pos, self._cpos)[:, -1].clone()
                    self._pos.fill_(self.pos)
                    self._cpos.fill_(self.pos)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=side):  # recorded, not run
                    self._out = self._step(self._ids, self._pos, self._cpos)
                torch.cuda.current_stream(dev).wait_stream(side)
                self.graph = graph
                return first
            self.graph.replay()
            return self._out[:, -1]
        return self._fn(self._ids, self._pos, self._cpos)[:, -1]


def graph_method(name):
    """'static+graph' -> ('static', 'graph'); 'kvq-q4+graph' -> ('kvq-q4', 'graph'); 'dynamic' -> ('dynamic', '')."""
    base, _, mode = name.partition("+")
    if mode not in ("", "graph", "compile"):
        raise ValueError(f"unknown mode {mode!r} in {name} (+graph or +compile)")
    if mode and not (base in ("static", "static-gqa") or (base.startswith("kvq-") and "/" not in base)):
        raise ValueError(f"{name}: +graph and +compile work with static, static-gqa and kvq-TYPE")
    return base, mode


def run_graph(model, method, B, ctx, a, device, dtype, weights_bytes, sleep_rate):
    """One row of a captured method: the context loaded, then every decode step one graph replay (the first call
    captures). Host ms is the time to launch a replay; GPU ms a replay queued behind a spin kernel."""
    from transformers import StaticCache
    cuda = device == "cuda"
    clock = Clock(cuda)
    name, backend = split_method(method, None)
    base, mode = graph_method(name)
    if backend is None and not base.startswith("kvq"):
        backend = "auto"  # flash (--sdpa's default) takes no mask, which every StaticCache step needs
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
    n_dec = a.warmup + a.steps + a.breakdown_steps
    max_len = ctx + n_dec + 64
    res = {"method": method, "batch": B, "ctx": ctx, "layers": model.config.num_hidden_layers}
    if base.startswith("kvq"):
        cache, impl = make_cache(base, model, B, max_len)
        res["sdpa_pinned"] = ""
    else:
        if base == "static-gqa":
            register_sdpa_gqa()
        cache, impl = StaticCache(config=model.config, max_cache_len=max_len), (
            "sdpa_gqa" if base == "static-gqa" else "sdpa")
        res["sdpa_pinned"] = backend or ""
    res["attn_impl"] = impl
    model.set_attn_implementation(impl)
    dec, probe = None, None
    try:
        with torch.no_grad():
            fill(cache, base, model, B, ctx, device, dtype)
            clock.sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            ids = torch.randint(0, model.config.vocab_size, (B,), device=device)
            if mode == "graph":  # only its SDPA backend record (the captured step has no host part); dynamo
                probe = Probe(cache, impl, clock)  # cannot trace its host calls, so not under +compile
            gc.collect()
            gc.disable()
            with sdpa_context(backend if impl != "kvq" else None, device):
                if base.startswith("kvq"):
                    dec = (kvq.hf.CUDAGraphDecode(model, cache) if mode == "graph" else
                           kvq.hf.CompiledDecode(model, cache))
                else:
                    dec = StaticGraphDecode(model, cache, B, ctx, max_len, mode)
                t = time.perf_counter()
                for _ in range(a.warmup):  # the first call captures (or compiles)
                    dec(ids)
                clock.sync()
                res["capture_s"] = time.perf_counter() - t
                marks, host = [clock.mark()], []
                for _ in range(a.steps):
                    t = time.perf_counter()
                    dec(ids)
                    host.append(1000.0 * (time.perf_counter() - t))
                    marks.append(clock.mark())
                clock.sync()
                per_step = [clock.ms(marks[i], marks[i + 1]) for i in range(a.steps)]
                gpu_steps = []
                hold_ms = max(20.0, 3.0 * statistics.median(host))
                for _ in range(a.breakdown_steps):
                    if cuda and sleep_rate:
                        torch.cuda._sleep(int(hold_ms * sleep_rate))
                    t0 = clock.mark()
                    dec(ids)
                    t1 = clock.mark()
                    clock.sync()
                    gpu_steps.append(clock.ms(t0, t1))
            clock.sync()
            gc.enable()
            if base.startswith("kvq"):
                dec.close()  # gives the sequences back: their lengths are read from the device
            row_figures(res, cache, base, model, B, ctx, n_dec, per_step, host, gpu_steps, a.steps, cuda, weights_bytes)
            res["sdpa_backend"] = "kvq" if impl == "kvq" else ((probe.sdpa_choice or "") if probe else "inductor")
            res["sdpa_backend"] += f" ({mode}, capture {res['capture_s']:.1f} s)"
    finally:
        gc.enable()
        if dec is not None and base.startswith("kvq") and not dec._closed:  # both kvq decoders have _closed
            dec.close()
        if probe is not None:
            probe.close()
        if base.startswith("kvq"):
            cache.reset()
        del dec, cache
    return res


def run_one(model, method, B, ctx, a, device, dtype, weights_bytes, sleep_rate):
    cuda = device == "cuda"
    clock = Clock(cuda)
    name, backend = split_method(method, a.sdpa)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
    n_dec = a.warmup + a.steps + a.host_steps + a.breakdown_steps
    cache, impl = make_cache(name, model, B, ctx + n_dec + 64)
    model.set_attn_implementation(impl)
    res = {"method": method, "batch": B, "ctx": ctx, "layers": model.config.num_hidden_layers,
           "sdpa_pinned": backend if impl == "sdpa" else "", "attn_impl": impl}
    probe = None
    try:
        with torch.no_grad():
            fill(cache, name, model, B, ctx, device, dtype)
            clock.sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            ids = torch.randint(0, model.config.vocab_size, (B, 1), device=device)
            probe = Probe(cache, impl, clock)
            gc.collect()
            gc.disable()  # no collector pauses inside the measured steps (as timeit does)
            with sdpa_context(backend if impl == "sdpa" else None, device):
                for _ in range(a.warmup):
                    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                clock.sync()
                # timed steps: one event per step boundary, nothing synchronized in between
                marks, host = [clock.mark()], []
                for _ in range(a.steps):
                    t = time.perf_counter()
                    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    host.append(1000.0 * (time.perf_counter() - t))
                    marks.append(clock.mark())
                clock.sync()
                per_step = [clock.ms(marks[i], marks[i + 1]) for i in range(a.steps)]
                # host steps: a host clock around every layer's update + attention, no events
                probe.host_on = True
                for _ in range(a.host_steps):
                    probe.begin_step()
                    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    probe.end_host_step()
                probe.host_on = False
                clock.sync()
                # instrumented steps, each queued behind a spin kernel so that it runs without host gaps
                gpu_steps, host_b = [], []
                hold_ms = max(20.0, 3.0 * statistics.median(host))
                probe.on = True
                for _ in range(a.breakdown_steps):
                    if cuda and sleep_rate:
                        torch.cuda._sleep(int(hold_ms * sleep_rate))
                    probe.begin_step()
                    t0 = clock.mark()
                    t = time.perf_counter()
                    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    host_b.append(1000.0 * (time.perf_counter() - t))
                    t1 = clock.mark()
                    probe.end_step()
                    clock.sync()
                    gpu_steps.append(clock.ms(t0, t1))
                probe.on = False
            clock.sync()
            gc.enable()
            row_figures(res, cache, name, model, B, ctx, n_dec, per_step, host, gpu_steps, a.steps, cuda, weights_bytes)
            if probe.host_steps:
                res["host_us_layer"] = probe.host_us_per_layer()
                res["_host_layer"] = [probe.host_us_per_layer()]
            if gpu_steps:
                upd, att = probe.split_ms()
                res.update(kv_update_ms=upd, attn_ms=att,
                           gaps="" if not cuda or max(host_b) < hold_ms else "host slower than hold: gaps possible")
            res["sdpa_backend"] = probe.sdpa_choice or ("kvq" if impl == "kvq" else "")
            if name.startswith("quanto"):
                fms, rl = quanto_flush_ms(cache, clock)
                res["flush_ms"], res["residual"] = fms, rl
    finally:
        gc.enable()
        if probe is not None:
            probe.close()
        if name.startswith("kvq"):
            cache.reset()
        del cache
    return res


def merge_rounds(results):
    """One row from the results of the rounds of one (method, batch, ctx): ms/step, host and GPU ms are medians over
    the samples of all successful rounds, KV update / attention the median of the rounds' values, peak the max."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return dict(results[0])
    r = dict(ok[-1])
    per_step = [x for o in ok for x in o["_per_step"]]
    med = statistics.median(per_step)
    r.update(ms_step=med, ms_mean=statistics.mean(per_step), ms_min=min(per_step), ms_max=max(per_step),
             tok_s=r["batch"] * 1000.0 / med, host_ms=statistics.median([x for o in ok for x in o["_host"]]),
             steps=len(per_step), rounds=len(ok), wall_s=sum(o.get("wall_s", 0.0) for o in results))
    hl = [x for o in ok for x in o.get("_host_layer", []) if not math.isnan(x)]
    if hl:
        r["host_us_layer"] = statistics.median(hl)
    gpu = [x for o in ok for x in o.get("_gpu", [])]
    if gpu:
        r["gpu_ms"] = statistics.median(gpu)
        for k in ("kv_update_ms", "attn_ms"):
            v = [o[k] for o in ok if k in o and not math.isnan(o[k])]
            r[k] = statistics.median(v) if v else float("nan")
        r["gaps"] = "; ".join(sorted({o["gaps"] for o in ok if o.get("gaps")}))
    if any("peak_mib" in o for o in ok):
        r["peak_mib"] = max(o.get("peak_mib", 0.0) for o in ok)
    bad = [f"round {i + 1}: {o['error']}" for i, o in enumerate(results) if "error" in o]
    notes = sorted({o["note"] for o in ok if o.get("note")}) + bad
    if notes:
        r["note"] = "; ".join(notes)
    return r


def public(r):
    return {k: v for k, v in r.items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------------------
CSV_FIELDS = ["method", "batch", "ctx", "layers", "ms_step", "tok_s", "speedup_vs_dynamic", "kv_mib", "kv_ratio",
              "peak_mib", "ms_mean", "ms_min", "ms_max", "host_ms", "gpu_ms", "kv_update_ms", "attn_ms",
              "host_us_layer", "kv_mib_per_layer", "kv_alloc_mib", "tokens", "steps", "attn_impl", "sdpa_pinned", "sdpa_backend",
              "flush_ms", "residual", "rounds", "gaps", "note", "error", "wall_s"]


def ref_row(rows, r):
    return next((x for x in rows if x["method"] == "dynamic" and x["batch"] == r["batch"] and x["ctx"] == r["ctx"]
                 and "error" not in x), None)


def with_ratios(rows):
    out = []
    for r in rows:
        r = dict(r)
        ref = ref_row(rows, r)
        if ref and "error" not in r:
            r["speedup_vs_dynamic"] = ref["ms_step"] / r["ms_step"]
            r["kv_ratio"] = r["kv_mib"] / ref["kv_mib"]
        out.append(r)
    return out


def f(x, fmt):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def write_csv(path, rows):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})


def criteria(rows):
    """Issue 23's eager targets: kvq Q8 and Q4 at least as fast as DynamicCache at every context >= 8k (>= 4x at batch
    8, 128k); the KV ratio beside it (<= 0.55x / <= 0.32x was the first HF issue's memory target, from 32k)."""
    out = []
    for r in rows:
        if r["method"] not in ("kvq-q8", "kvq-q4") or r["ctx"] < 8192:
            continue
        lim = 0.55 if r["method"] == "kvq-q8" else 0.32
        want = 4.0 if r["batch"] == 8 and r["ctx"] >= 131072 else 1.0
        if "error" in r or "speedup_vs_dynamic" not in r:
            out.append(f"| {r['method']} | {r['batch']} | {r['ctx']} | not measured | | |")
            continue
        fast = r["speedup_vs_dynamic"] >= want
        small = r["kv_ratio"] <= lim  # the first HF issue's memory target, shown; issue 23's are speed only
        out.append(f"| {r['method']} | {r['batch']} | {r['ctx']} | {r['speedup_vs_dynamic']:.2f}x >= {want:.1f} "
                   f"({'yes' if fast else 'NO'}) | {r['kv_ratio']:.3f} ({'<=' if small else '>'} {lim}) | "
                   f"{'met' if fast else 'NOT met'} |")
    return out


def captured_rows(rows):
    """Each captured kvq row against the fastest captured StaticCache row of the same batch and context (issue 23:
    kvq q4 >= 1.2x at 32k batch 8 and >= 3x at 128k batch 8)."""
    out = []
    for r in rows:
        if not (r["method"].startswith("kvq-") and "+" in r["method"]) or "error" in r:
            continue
        peers = [x for x in rows if x["method"].startswith("static") and x["batch"] == r["batch"]
                 and x["ctx"] == r["ctx"] and "error" not in x]
        if not peers:
            continue
        best = min(peers, key=lambda x: x["ms_step"])
        ratio = best["ms_step"] / r["ms_step"]
        want = {32768: 1.2, 131072: 3.0}.get(r["ctx"]) if r["batch"] == 8 and r["method"].startswith("kvq-q4") \
            else None
        verdict = "" if want is None else f"{want:.1f}x: {'met' if ratio >= want else 'NOT met'}"
        out.append(f"| {r['method']} | {r['batch']} | {r['ctx']} | {r['ms_step']:.2f} | {best['method']} | "
                   f"{best['ms_step']:.2f} | {ratio:.2f}x | {verdict} |")
    return out


def write_md(path, rows, meta, a):
    rows = with_ratios(rows)
    L = []
    L.append("# HF transformers decode benchmark (bench/bench_hf.py)")
    L.append("")
    L.append(f"{meta['device']}; torch {meta['torch']}, transformers {meta['transformers']}, cuDNN "
             f"{meta['cudnn']}, {meta['quanto']}. Model: random-weight Llama architecture, Llama-3-8B shapes (hidden "
             f"4096, 32 query / 8 KV heads, head_dim 128, MLP {a.mlp}, vocabulary {a.vocab}), **{a.layers} layers**, "
             f"{meta['dtype']}, weights {meta['weights_mib']:.0f} MiB. Per row: context loaded into the cache "
             f"(random K/V, not timed), {a.warmup} warm-up steps, {a.steps} timed decode steps, {a.breakdown_steps} "
             f"instrumented steps; **{a.rounds} rounds** (the methods of a context and batch in turn, every other "
             f"round in reverse order), **ms/step = median of the per-step {meta['timer']} intervals of all rounds**. "
             f"Run took {meta['elapsed_s']:.0f} s.")
    L.append("")
    L.append("Command: `" + meta["command"] + "`")
    L.append("")
    L.append(f"- `dynamic`: DynamicCache {meta['dtype']}, SDPA pinned to " + f"`{a.sdpa}`" + " (torch.nn.attention.sdpa_kernel); "
             "`dynamic@auto`: the same with torch's own SDPA backend choice (see the note on cuDNN below). "
             "`icw-int8`: the icw-kv-quant method (int8, one scale per batch row and head, full dequantize + "
             "re-quantize every step, SDPA on the fp16 copy). `quanto-q4/q2`: transformers QuantizedCache, quanto "
             "backend (groups of 64, 128-token fp16 residual; dequantizes the whole cache every step). "
             "`kvq-q8/q4/q2`: kvq.KVQCache, attention on the quantized pages.")
    L.append("- ms/step: median over the timed steps; tokens/s = batch / ms/step; speed-up = DynamicCache ms/step / "
             "this ms/step (same batch and context). KV MiB: bytes of the K/V the cache holds after the run "
             "(kvq: pages in use + fp16 residual windows; QuantizedCache: packed data + scales + residual); KV ratio "
             "= KV MiB / DynamicCache's. Peak MiB: peak GPU memory during decode above the weights (torch "
             "allocator peak after the context was loaded, + kvq's own device allocations, whole arena included).")
    L.append("")
    L.append("| method | batch | ctx | ms/step | tokens/s | speed-up vs dynamic | KV MiB | KV ratio | peak MiB |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            L.append(f"| {r['method']} | {r['batch']} | {r['ctx']} | **{r['error']}** | | | | | |")
            continue
        L.append(f"| {r['method']} | {r['batch']} | {r['ctx']} | {r['ms_step']:.2f} | {r['tok_s']:.1f} | "
                 f"{f(r.get('speedup_vs_dynamic'), '.2f')} | {r['kv_mib']:.0f} | {f(r.get('kv_ratio'), '.3f')} | "
                 f"{f(r.get('peak_mib'), '.0f')} |")
    L.append("")
    L.append("## Where the time goes")
    L.append("")
    L.append("host ms: median time for the host to return from one model() call during the timed steps (when it is "
             "close to ms/step, the step is bound by Python/launch overhead, not by the GPU). GPU ms: median device "
             "time of one instrumented step queued behind a spin kernel, so without host gaps; KV update and "
             "attention: its parts spent in cache.update() (concatenation, (de)quantization) and in the attention "
             "function (for kvq: append + attention on the pages), summed over layers. sdpa backend: what torch's "
             "dispatch picked for the first attention call. tokens: what the cache holds at the end (context + "
             f"{a.warmup + a.steps + a.host_steps + a.breakdown_steps} decode steps). host us/layer: host time of one "
             "layer's cache.update() + attention function call (for kvq: append + attention on the pages; for "
             "DynamicCache + SDPA: torch.cat + SDPA), median over the --host-steps steps of the mean over layers: "
             "what the cache adds to a step's host time per layer (issue 23).")
    L.append("")
    L.append("| method | batch | ctx | ms/step | mean | host ms | host us/layer | GPU ms | KV update ms | attention ms "
             "| KV MiB/layer | tokens | sdpa backend |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if "error" in r:
            continue
        note = (" (" + r["gaps"] + ")") if r.get("gaps") else ""
        note += (" **" + r["note"] + "**") if r.get("note") else ""
        L.append(f"| {r['method']} | {r['batch']} | {r['ctx']} | {r['ms_step']:.2f} | {r['ms_mean']:.2f} | "
                 f"{r['host_ms']:.2f} | {f(r.get('host_us_layer'), '.1f')} | {f(r.get('gpu_ms'), '.2f')} | {f(r.get('kv_update_ms'), '.2f')} | "
                 f"{f(r.get('attn_ms'), '.2f')} | {r['kv_mib_per_layer']:.1f} | {r['tokens']} | "
                 f"{r.get('sdpa_backend', '')}{note} |")
    fl = [r for r in rows if "flush_ms" in r and "error" not in r]
    if fl:
        L.append("")
        L.append("QuantizedCache re-quantizes the whole cache every `residual` steps (not inside the timed window "
                 "above, which starts with an empty residual). One flush, all layers, and what it adds per step "
                 "when spread over `residual` steps:")
        L.append("")
        L.append("| method | batch | ctx | flush ms | residual | + ms/step amortized | ms/step incl. flush |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        for r in fl:
            am = r["flush_ms"] / r["residual"] if r["residual"] else float("nan")
            L.append(f"| {r['method']} | {r['batch']} | {r['ctx']} | {r['flush_ms']:.1f} | {r['residual']} | "
                     f"{am:.2f} | {r['ms_step'] + am:.2f} |")
    cap = captured_rows(rows)
    if cap:
        L.append("")
        L.append("## Captured decode: kvq against StaticCache, both one CUDA graph per step")
        L.append("")
        L.append("`kvq-TYPE+graph`: kvq.hf.CUDAGraphDecode (kvq.StaticPlan per layer group: lengths and page tables "
                 "on the device, the whole forward captured with torch.cuda.CUDAGraph). `static+graph`: transformers' "
                 "StaticCache + its sdpa attention (which repeats K/V to the query heads in memory because a mask is "
                 "passed), the same manual capture; `static-gqa+graph`: the same with SDPA's enable_gqa instead of "
                 "the repeat; `+compile`: torch.compile(mode=\"reduce-overhead\", fullgraph=True) instead of the "
                 "manual capture (inductor's kernels, cudagraph trees; for kvq: kvq.hf.CompiledDecode, kvq's append "
                 "+ attention as the custom op kvq::decode_step). Ratio: the fastest StaticCache row's ms/step / "
                 "kvq's.")
        L.append("")
        L.append("| method | batch | ctx | ms/step | fastest StaticCache row | its ms/step | kvq speed-up | target |")
        L.append("|---|---:|---:|---:|---|---:|---:|---|")
        L.extend(cap)
    crit = criteria(rows)
    if crit:
        L.append("")
        L.append("## Eager targets (kvq Q8/Q4 >= 1.0x DynamicCache at >= 8k, >= 4x at batch 8 128k; the KV ratio "
                 "beside it)")
        L.append("")
        L.append("| method | batch | ctx | speed-up vs dynamic | KV ratio | target |")
        L.append("|---|---:|---:|---|---|---|")
        L.extend(crit)
    L.append("")
    L.append("## Notes")
    L.append("")
    L.append("- SDPA backend: on Hopper with cuDNN > 9.15, torch (2.11 at least) moves cuDNN attention to the front of "
             "its SDPA priority list. cuDNN builds one execution plan per (batch, kv length, ...) shape and caches it "
             "per process; in decode the kv length grows by one every step, so every step pays a plan build "
             "(tens of ms) whatever the context and batch: this is what `dynamic@auto` shows, and what made the "
             "DynamicCache rows of the first version of this page a constant ~36 ms/step (icw-int8, which ran right "
             "after it with the same lengths, found the plans built and looked faster). The `dynamic`, `icw-int8` "
             "and `quanto-*` rows pin SDPA to one backend (--sdpa, FlashAttention-2 by default), which needs no "
             "per-shape preparation. `TORCH_CUDNN_SDPA_DEPRIORITIZED=1` gives the same without pinning.")
    L.append("- With few layers (here " + f"{a.layers}" + ") the per-step Python/launch overhead of transformers is a "
             "large part of a step at small batch and context: compare ms/step with host ms and GPU ms. The KV "
             "part grows with the number of layers (a real Llama-3-8B has 32); KV MiB and the KV ratios scale "
             "with it exactly.")
    L.append("- DynamicCache concatenates each layer's whole cache into a new tensor every step (torch.cat): its "
             "KV update reads and writes the whole cache, and its peak holds one layer twice.")
    for n in meta.get("notes", []):
        L.append("- " + n)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("\n".join(L) + "\n")


# ------------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ctx", "--contexts", dest="ctx", default="8192,16384,32768,65536,131072")
    ap.add_argument("--batch", "--batches", dest="batch", default="1,8")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per row (median)")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--host-steps", type=int, default=8,
                    help="steps per row with a host clock around each layer's update + attention (0: none)")
    ap.add_argument("--breakdown-steps", type=int, default=4, help="instrumented steps per row (0: none)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="measure every row this many times, the methods of a (ctx, batch) in turn, odd rounds in "
                         "reverse order; a row's figures pool the samples of its rounds")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--sdpa", default=None, choices=["flash", "cudnn", "efficient", "math", "auto"],
                    help="SDPA backend of the sdpa methods without @backend (default: flash on CUDA, auto on CPU)")
    ap.add_argument("--quanto-unpack", default="torch", choices=["torch", "ext"])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--mlp", type=int, default=14336)
    ap.add_argument("--budget-s", type=float, default=0, help="skip rows that would start after this many seconds")
    ap.add_argument("--row-timeout-s", type=float, default=120,
                    help="a row without result after this long is reported as hung and the run stops (0: never)")
    ap.add_argument("--out", default=None, help="markdown to write (rewritten after every row); without --out and "
                                                "--csv the tables are printed only (docs/: --out docs/bench-hf.md)")
    ap.add_argument("--csv", default=None, help="CSV to write (default: --out with .csv)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.sdpa is None:
        a.sdpa = "flash" if a.device == "cuda" else "auto"
    if a.csv is None and a.out:
        a.csv = os.path.splitext(a.out)[0] + ".csv"
    t_start = time.perf_counter()
    cuda = a.device == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    methods = [m for m in a.methods.split(",") if m]
    notes = []
    quanto = "optimum-quanto not used"
    if any(m.startswith("quanto") for m in methods):
        try:
            _, quanto = setup_quanto(a.quanto_unpack, a.device)
        except Exception as e:
            quanto = f"optimum-quanto unavailable ({type(e).__name__}: {e})"
            print(quanto, flush=True)
    model = make_model(a.layers, a.device, dtype, a.vocab, a.mlp)
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sleep_rate = None
    if cuda:
        torch.cuda.synchronize()
        sleep_rate = sleep_cycles_per_ms()
        if sleep_rate is None:
            notes.append("torch.cuda._sleep is missing: instrumented steps may include host gaps")
        dev = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
        ok, why = kvq.cuda_available()
        if not ok:
            notes.append(f"kvq CUDA backend unavailable: {why}")
    else:
        dev = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"
    meta = {"device": dev, "torch": torch.__version__, "transformers": TRANSFORMERS_VERSION,
            "cudnn": torch.backends.cudnn.version() if cuda else "-", "quanto": quanto,
            "dtype": "fp16" if cuda else "fp32 (CPU)", "timer": "CUDA-event" if cuda else "host-clock",
            "weights_mib": weights_bytes / MiB, "notes": notes,
            "command": "python3 bench/bench_hf.py " + " ".join(sys.argv[1:]), "elapsed_s": 0.0}
    print(json.dumps({k: v for k, v in meta.items() if k != "notes"}), flush=True)
    # one short decode on a tiny DynamicCache first: CUDA context, cuBLAS handles, kernel loading
    with torch.no_grad():
        c = DynamicCache(config=model.config)
        model.set_attn_implementation("sdpa")
        model(torch.zeros((1, 16), dtype=torch.long, device=a.device), past_key_values=c, use_cache=True)
        for _ in range(3):
            model(torch.zeros((1, 1), dtype=torch.long, device=a.device), past_key_values=c, use_cache=True)
        del c
    groups = [(ctx, B) for ctx in [int(x) for x in a.ctx.split(",")] for B in [int(x) for x in a.batch.split(",")]]
    plan = [(ctx, B, m) for ctx, B in groups for m in methods]
    results = {k: [] for k in plan}  # (ctx, B, method) -> one result per round
    rows = []

    def collect():
        rows[:] = [public(merge_rounds(results[k])) for k in plan if results[k]]

    def save(final=False):
        collect()
        meta["elapsed_s"] = time.perf_counter() - t_start
        if a.out:
            write_md(a.out, rows, meta, a)
        if a.csv:
            write_csv(a.csv, with_ratios(rows))
        if a.json and final:
            with open(a.json, "w") as fh:
                json.dump({"meta": meta, "rows": with_ratios(rows)}, fh, indent=1, default=str)

    def hung(key, rnd):
        """Watchdog (another thread; the main one is stuck, typically in a CUDA or kvq call): report the run as hung,
        what has no result as not run, write everything, dump the stacks and stop the process."""
        ctx, B, m = key
        results[key].append({"method": m, "batch": B, "ctx": ctx, "layers": a.layers,
                             "error": f"HANG: no result after {a.row_timeout_s:.0f} s (round {rnd + 1}), run stopped"})
        for k in plan:
            if not results[k]:
                results[k].append({"method": k[2], "batch": k[1], "ctx": k[0], "layers": a.layers,
                                   "error": "not run (stopped by a hang)"})
        meta["notes"].append(f"the run stopped: {m} batch {B} ctx {ctx} (round {rnd + 1}) gave no result within "
                             f"{a.row_timeout_s:.0f} s (Python stacks in the log)")
        print(json.dumps(results[key][-1]), flush=True)
        try:
            save(final=True)
        finally:
            faulthandler.dump_traceback(all_threads=True)
            sys.stdout.flush()
            os._exit(3)

    for ctx, B in groups:
        for rnd in range(a.rounds):
            for m in (methods if rnd % 2 == 0 else methods[::-1]):  # odd rounds in reverse order
                key = (ctx, B, m)
                base = {"method": m, "batch": B, "ctx": ctx, "layers": a.layers}
                t0 = time.perf_counter()
                if a.budget_s and t0 - t_start > a.budget_s:
                    if rnd == 0:
                        results[key].append({**base, "error": "skipped (time budget)"})
                    continue  # later rounds: keep what the earlier ones measured
                if m.startswith("quanto") and "unavailable" in quanto:
                    if rnd == 0:
                        results[key].append({**base, "error": "optimum-quanto not installed"})
                    continue
                dog = threading.Timer(a.row_timeout_s, hung, args=(key, rnd)) if a.row_timeout_s > 0 else None
                if dog:
                    dog.daemon = True
                    dog.start()
                try:
                    run = run_graph if "+" in m else run_one
                    r = run(model, m, B, ctx, a, a.device, dtype, weights_bytes, sleep_rate)
                except torch.cuda.OutOfMemoryError:
                    r = {**base, "error": "OOM"}
                except Exception as e:  # report and go on
                    msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
                    r = {**base, "error": ("OOM: " if "out of memory" in msg.lower() else "") + msg[:160]}
                finally:
                    if dog:
                        dog.cancel()
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                r["wall_s"] = time.perf_counter() - t0
                r["round"] = rnd + 1
                results[key].append(r)
                print(json.dumps(public(r), default=str), flush=True)
                save()
    save(final=True)
    if a.out:
        print(open(a.out).read())
    if a.csv:  # the PNG next to the CSV (bench/plot.py; without matplotlib it only prints a note)
        plot = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "plot.py"), "--csv", a.csv, "hf"]
        if subprocess.call(plot) != 0:
            print("bench_hf: no plot (" + " ".join(plot) + " failed)", flush=True)
    print(f"done in {meta['elapsed_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()

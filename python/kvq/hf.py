"""HF transformers integration: KVQCache (the Cache API over libkvq), the "kvq" attention implementation (attention
computed by libkvq on the quantized pages), and patch_model_with_int8_kv_cache (one-line switch for icw-kv-quant users).

How the pieces fit:
  * KVQCache.update(k, v, layer) is called by every attention module. With attn_implementation="kvq" it stores
    nothing yet: it tags the new K/V with the cache and returns them. The "kvq" attention function then appends them
    to libkvq (dropping left-padding tokens, which the 2D attention mask identifies) and runs kvq_attn_prefill /
    kvq_attn_decode (CPU) or kvq_cuda_attn_* (GPU) on the quantized pages: no dequantized copy of the cache exists.
  * A decode step (one new token per row, none of them padding) costs one prepared C call per layer on CUDA
    (kvq_cuda_decode_step: append + attention) and two on the CPU (kvq_append, kvq_attn_decode): the arguments are
    converted once per (layer, batch, shapes, dtypes, scale, window, softcap) and the output buffer is kept per layer
    (KVQCache._decode_step; issue 23: host time per layer-step). Prefill chunks and padded steps take the general path.
  * With any other attention implementation (eager, sdpa, ...) KVQCache still works on CPU: update() appends and
    returns the whole cache dequantized by kvq_read (like transformers' QuantizedCache does). That mode is for
    compatibility and tests; it is slower and has no memory benefit during attention.
  * The two paths compute the same attention of the same cache bytes: to fp32 rounding with kvq's scalar kernels
    (KVQ_CPU_KERNELS=scalar), and within the integer arithmetic of the SIMD kernels otherwise (decode with <= 4 query
    heads per KV head: the query rounded to int16 per key group (int8 for Q2 keys at head dim 128/256 on an
    AVX512-VNNI CPU, kvq.h section 9), Q4/Q2 softmax weights to 8 bits; relative error
    ~1e-4 for Q8, ~1e-3 for Q4/Q2): tests/python/test_hf_paths.py. A whole model run through each path does not
    store the same bytes, though: the paths' fp32 rounding differs, later layers' K/V move by ~1e-7, and a few of
    them cross a quantization rounding boundary; a real model amplifies that (SmolLM2-135M, Q8, prefill 512: logits
    differ by ~0.2 between the two paths, as much as between transformers' own sdpa and eager on a kvq cache, against
    3e-5 between sdpa and eager on an fp32 DynamicCache), so perplexities through the two paths differ by that noise.
  * patch_model_with_int8_kv_cache wraps generate() and the forward of the model and of its base model, so that
    every call that uses a cache gets a KVQCache (made when none is given; any other Cache class is refused), and
    takes the cache as cache= (transformers' name from 5.2x on) or past_key_values= (before), passing it on under
    the installed version's name (CACHE_KWARG).
  * Batch rows are kvq sequences; beam search reorders them with kvq_seq_fork / kvq_cuda_seq_fork (pages shared,
    copy on write), and crop truncates them with kvq_seq_truncate / kvq_cuda_seq_truncate. On CUDA their device work
    (window copies, the dequantization of a cut group) is enqueued on the current torch stream.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import math
import os
import warnings
import weakref
from typing import Any, Dict, List, Union

_HINT = "pip install kvq[hf]  (torch and transformers >= 5.17, < 6)"
try:
    import torch
except Exception as _e:  # not installed, or installed but broken (a CUDA wheel without its nvidia libraries)
    raise ImportError(f"kvq's transformers integration (kvq.hf) needs torch, which cannot be imported "
                      f"({type(_e).__name__}: {_e}): "
                      f"{_HINT}") from _e
try:
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs
    from transformers.masking_utils import AttentionMaskInterface
except Exception as _e:
    raise ImportError(f"kvq's transformers integration (kvq.hf) needs transformers >= 5.17, which cannot be imported "
                      f"({_e}): {_HINT}") from _e

from . import _native as N
from .plan import Plan

ATTN_IMPLEMENTATION = "kvq"


def engine_default_qnorm(type_k: int, type_v: int) -> int:
    """KVQCache(qnorm=-1): kvq's engine default (src/model/llama.c, llama_default_qnorm; kvq.h section 10,
    "Q-Norm"): the roles of grouped types (q4, q3, q2)."""
    g = lambda t: bool(N.kvq_type_traits(t)["grouped"])  # noqa: E731
    return (N.ROLES_K if g(type_k) else 0) | (N.ROLES_V if g(type_v) else 0)
# a kv type name or code, a list with one per layer, a dict {layer: type, "default": type}, or a kvq.Plan
KVTypeSpec = Union[str, int, List[Union[str, int]], Dict[Any, Union[str, int]], Plan]
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3", "qwen2")
_TORCH_DTYPES = {torch.float32: N.DTYPE_F32, torch.float16: N.DTYPE_F16, torch.bfloat16: N.DTYPE_BF16}
_SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _shape_of(config):
    tc = _text_config(config)
    n_heads = tc.num_attention_heads
    n_kv = getattr(tc, "num_key_value_heads", None) or n_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // n_heads
    return tc, tc.num_hidden_layers, n_heads, n_kv, head_dim


def _parse_types(kv_type, value_type, n_layers):
    """-> list of (type_k, type_v) ints, one per layer. kv_type: a name, a list of names (one per layer), or a dict
    {layer: name} with the key "default" (or None) for the others; value_type likewise, defaulting to kv_type. None:
    "q8". A kvq.Plan gives both (value_type must be None)."""
    if kv_type is None:
        kv_type = "q8"
    if isinstance(kv_type, Plan):
        if value_type is not None:
            raise ValueError("kvq: a plan gives every layer's key and value types: value_type must be left unset")
        if kv_type.n_layers != n_layers:
            raise ValueError(f"kvq: the plan is for {kv_type.n_layers} layers, the model has {n_layers}")
        return [(N.type_from_name(k), N.type_from_name(v)) for k, v in kv_type.types]

    def per_layer(spec, what):
        if isinstance(spec, (list, tuple)):
            if len(spec) != n_layers:
                raise ValueError(f"kvq: {what} has {len(spec)} entries, the model has {n_layers} layers")
            return [N.type_from_name(s) for s in spec]
        if isinstance(spec, dict):
            default = spec.get("default", spec.get(None, "q8"))
            return [N.type_from_name(spec.get(i, default)) for i in range(n_layers)]
        return [N.type_from_name(spec)] * n_layers

    tk = per_layer(kv_type, "kv_type")
    tv = per_layer(value_type, "value_type") if value_type is not None else list(tk)
    return list(zip(tk, tv))


class _Group:
    """One kvq cache (CPU or CUDA) holding the layers that share a (type_k, type_v)."""

    def __init__(self, types, layers):
        self.types = types
        self.layers = layers  # global layer indices
        self.local = {g: i for i, g in enumerate(layers)}
        self.handle = None
        self.seqs: list[int] = []


class KVQLayer(CacheLayerMixin):
    """Per-layer view for the Cache API; the storage lives in the owning KVQCache's kvq caches."""

    is_compileable = False
    is_croppable = True

    def __init__(self, owner: "KVQCache", layer_idx: int, is_sliding: bool):
        super().__init__()
        self._owner = owner
        self.layer_idx = layer_idx
        self.is_sliding = is_sliding
        self.hf_len = 0  # the length transformers sees (padding included)

    def lazy_initialization(self, key_states, value_states):
        self._owner._lazy_init(key_states)

    def update(self, key_states, value_states, *args, **kwargs):
        return self._owner.update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length: int):
        if self._owner._compiled:  # inside CompiledDecode's traced step: a constant (kvq's mask ignores it), so
            return query_length, 0  # that dynamo does not specialise on the length and recompile every step
        return self.hf_len + query_length, 0

    def get_seq_length(self) -> int:
        if self._owner._compiled:  # as get_mask_sizes: transformers reads it for the mask's offset only, which
            return 0  # kvq's mask ignores; a constant keeps dynamo from recompiling for the second length
        return self.hf_len

    def get_max_length(self) -> int:
        return -1

    def reset(self):
        self.hf_len = 0

    def crop(self, tokens_to_remove: int):
        self._owner.crop(tokens_to_remove)

    def reorder_cache(self, beam_idx):  # the cache reorders all layers at once (sequences span layers)
        raise RuntimeError("kvq: reorder through KVQCache.reorder_cache")

    def offload(self):
        pass

    def prefetch(self):
        pass

    def batch_repeat_interleave(self, repeats):
        raise RuntimeError("kvq: use KVQCache.batch_repeat_interleave")

    def batch_select_indices(self, indices):
        raise RuntimeError("kvq: use KVQCache.batch_select_indices")


class KVQCache(Cache):
    """A transformers Cache stored in libkvq pages.

    Args:
        config: the model's config (`model.config`).
        kv_type: "f16", "bf16", "q8", "fp8", "q4", "q3" or "q2"; or a list with one per layer; or a dict {layer: type,
            "default": type}; or a kvq.Plan. Layers of the same types share one kvq cache; each layer's rotation is
            seeded by its model layer number, so a layer holds the same bytes however the layers are grouped (as in
            kvq's engine). Default (None): "q8", or the plan's types.
        value_type: the same for values when they should differ from keys (default: kv_type).
        plan: a kvq.Plan or the path of a kvq-plan file (docs/kv-plan.md; `kvq calibrate -o` and kvq.calibrate make
            them): every layer's key and value types, in place of kv_type / value_type (which must then be unset).
        max_cache_len: tokens one sequence may hold (prompt + generated, padding excluded). Sizes the page arena
            (allocated once, at the first update); appending beyond it raises kvq.CacheFullError.
        max_batch_size: sequences the arena is sized for (default: the batch size of the first update). A beam
            reorder briefly holds up to 2 x that many sequences (forks before frees); on CUDA the fp16 residual
            windows of 2 x max_batch_size + 2 sequences are allocated up front, on the CPU + 8.
        arena_bytes: size the arena yourself instead (per distinct type).
        residual: residual fp16 window R of grouped types (Q4/Q3/Q2), -1 for kvq's default (128).
        group: key group G of grouped types (16, 32, 64, 128; 0: kvq's default 64; the CUDA backend needs 64).
        n_threads: OpenMP threads of the CPU attention (0: all).
        rotate, sinks, nonuniform: kvq's quality mechanisms (kvq.h section 10), passed to kvq.Cache: -1 (default)
            lets kvq pick them for the types, 0 switches one off; rotate and nonuniform take a role set (1 keys,
            2 values, 3 both), sinks a token count (0 .. 1024). Checked here for range; the library says whether
            it implements a value when the cache is made (at the first update). The CUDA backend has none of them:
            any value but -1 or 0 is refused there.
        qnorm: Q-Norm of the grouped roles (kvq.h section 10, "Q-Norm"): a role set, 0 off, -1 kvq's engine default
            (the q4/q3/q2 roles: engine_default_qnorm), on the CPU and on CUDA alike.
        outliers: dense-and-sparse outliers of the grouped roles (kvq.h section 10, "Outliers"; CPU only): a role set,
            0 and -1 off (the default).
        params8: 8-bit group parameters of the grouped roles (kvq.h sections 5 and 10; CPU only): a role set, 0 and -1
            off (the default, fp16 pairs); 0.25 bits per element less at group 64.
        window8: 8-bit residual windows (kvq.h section 10, "8-bit window"; CPU only): a role set, 0 and -1 off (the
            default, fp16 windows); the window's rows as int8 with a scale per token and head, half the bytes.
        squat_rank, squat_lambda: SQuat keys (kvq.h section 10; CPU only): the keys' quantization error is kept out of
            the subspace of the first prefill's queries (the top squat_rank eigenvectors of Q^T Q per sequence, layer
            and KV head, computed here from the queries the attention receives, set before the keys are appended).
            -1 (default): kvq's engine default, rank 8 for Q2 keys on the CPU, off otherwise; 0 off; 1 .. 32 (below
            head_dim) the rank. squat_lambda <= 0: kvq's automatic lambda (rank / head_dim).
        prefill: how a forward call of several tokens per row attends with attn_implementation="kvq" on the CPU:
            "cache" (default) appends them, then reads everything back from the cache (kvq_attn_prefill), so a batch
            longer than the residual window reads its own first tokens quantized; "exact" attends first
            (kvq_attn_prefill_exact: the cache as it is and the batch's own K/V in fp16, as transformers'
            QuantizedCache prefills), then appends. kvq's CLI engine prefills prompts the "exact" way (passkey keys
            found at 4k: q3 13/15 -> 15/15, docs/quality.md). CPU only: refused on CUDA at the first update.

    Padding: tokens the attention mask marks as padding are never stored. On CUDA, decode steps (one new token
    per row) do not read the mask, since that would synchronise with the GPU at every step; generate() marks every
    generated token real, so only a hand-written loop that masks out a new token would see a difference.
    """

    # Decode steps through the prepared per-layer calls (_decode_step); False: through the general path, which makes
    # the same C calls with the same inputs (tests compare the two bit for bit)
    _fast_decode = True

    def __init__(self, config: Any, kv_type: KVTypeSpec | None = None, value_type: KVTypeSpec | None = None,
                 max_cache_len: int = 4096, max_batch_size: int | None = None, arena_bytes: int | None = None,
                 residual: int = -1, group: int = 0, n_threads: int = 0, rotate: int = -1, sinks: int = -1,
                 nonuniform: int = -1, squat_rank: int = -1, squat_lambda: float = 0.0,
                 plan: Plan | str | os.PathLike | None = None, qnorm: int = -1, outliers: int = 0,
                 params8: int = 0, window8: int = 0, prefill: str = "cache") -> None:
        if not hasattr(config, "num_attention_heads") and not hasattr(config, "get_text_config"):
            raise TypeError(f"kvq: KVQCache takes the model's config (model.config), got {type(config).__name__}")
        if plan is not None:
            if kv_type is not None or value_type is not None:
                raise ValueError("kvq: plan gives every layer's types: leave kv_type and value_type unset")
            if not isinstance(plan, Plan):
                if not isinstance(plan, (str, os.PathLike)):
                    raise TypeError(f"kvq: plan is a kvq.Plan or a file path, got {type(plan).__name__}")
                plan = Plan.load(plan)
            kv_type = plan
        max_cache_len = N._nonneg(max_cache_len, "max_cache_len", N.INT64_MAX, "int64")
        if max_cache_len < 1:
            raise ValueError("kvq: max_cache_len must be >= 1")
        if max_batch_size is not None and N._int(max_batch_size, "max_batch_size") < 1:
            raise ValueError(f"kvq: max_batch_size = {max_batch_size} must be >= 1")
        if arena_bytes is not None:
            N._size(arena_bytes, "arena_bytes")
        if not -1 <= N._int(residual, "residual") <= 4096:
            raise ValueError(f"kvq: residual = {residual} must be -1 (kvq's default) or 0 .. 4096")
        if N._int(group, "group") not in (0, 16, 32, 64, 128):
            raise ValueError(f"kvq: group = {group} must be 0 (kvq's default), 16, 32, 64 or 128")
        if not 0 <= N._int(n_threads, "n_threads") <= 1024:
            raise ValueError(f"kvq: n_threads = {n_threads} must be 0 (all) .. 1024")
        for name, val, hi, what in (("rotate", rotate, 3, "a role set: 1 keys, 2 values, 3 both"),
                                    ("nonuniform", nonuniform, 3, "a role set: 1 keys, 2 values, 3 both"),
                                    ("qnorm", qnorm, 3, "a role set: 1 keys, 2 values, 3 both"),
                                    ("outliers", outliers, 3, "a role set: 1 keys, 2 values, 3 both"),
                                    ("params8", params8, 3, "a role set: 1 keys, 2 values, 3 both"),
                                    ("window8", window8, 3, "a role set: 1 keys, 2 values, 3 both"),
                                    ("sinks", sinks, 1024, "tokens kept exact, 0 .. 1024")):
            if not -1 <= N._int(val, name) <= hi:
                raise ValueError(f"kvq: {name} = {val} must be -1 (kvq's default), 0 (off) or {what}")
        if prefill not in ("cache", "exact"):
            raise ValueError(f"kvq: prefill = {prefill!r} must be 'cache' or 'exact'")
        if not -1 <= N._int(squat_rank, "squat_rank") <= 32:
            raise ValueError(f"kvq: squat_rank = {squat_rank} must be -1 (kvq's default), 0 (off) or 1 .. 32")
        if not isinstance(squat_lambda, (int, float)) or not math.isfinite(squat_lambda):
            raise ValueError(f"kvq: squat_lambda = {squat_lambda!r} must be a finite number (<= 0: automatic)")
        tc, n_layers, n_heads, n_kv, head_dim = _shape_of(config)
        if squat_rank >= head_dim:
            raise ValueError(f"kvq: squat_rank = {squat_rank} must be below head_dim {head_dim}")
        self._config = tc
        self.n_layers, self.n_q_heads, self.n_kv_heads, self.head_dim = n_layers, n_heads, n_kv, head_dim
        if head_dim not in N.HEAD_DIMS:
            raise ValueError(f"kvq: head_dim {head_dim} is not supported (supported: {N.HEAD_DIMS})")
        if n_heads % n_kv:
            raise ValueError(f"kvq: {n_heads} query heads is not a multiple of {n_kv} KV heads")
        layer_types, _ = get_layer_types_and_kwargs(tc)
        bad = sorted(set(layer_types) - set(_SUPPORTED_LAYER_TYPES))
        if bad:
            raise ValueError(f"kvq: layer types {bad} are not supported (supported: {_SUPPORTED_LAYER_TYPES})")
        self.layer_types_per_layer = _parse_types(kv_type, value_type, n_layers)
        for tk, tv in self.layer_types_per_layer:  # validates the head dim / types now, before anything happens
            N.page_layout(tk, tv, n_kv, head_dim, 64, group)
        self.kvq_max_len = int(max_cache_len)
        self.kvq_max_batch = max_batch_size
        self.kvq_arena_bytes = arena_bytes
        self.kvq_residual = residual
        self.kvq_group = group
        self.kvq_n_threads = n_threads
        self.kvq_quality = {"rotate": int(rotate), "sinks": int(sinks), "nonuniform": int(nonuniform)}
        self.kvq_squat = (int(squat_rank), float(squat_lambda))
        self.kvq_qnorm = int(qnorm)
        self.kvq_outliers = max(int(outliers), 0)
        self.kvq_params8 = max(int(params8), 0)
        self.kvq_window8 = max(int(window8), 0)
        self.kvq_prefill = prefill
        self._squat_set: set = set()  # (group index, sequence, local layer) whose key subspace is set
        groups: dict = {}
        for i, t in enumerate(self.layer_types_per_layer):
            groups.setdefault(t, []).append(i)
        self._groups = [_Group(t, ls) for t, ls in groups.items()]
        self._group_of = {}
        for g in self._groups:
            for li in g.layers:
                self._group_of[li] = g
        self._device = None
        self.kvq_batch = 0
        self._mask_memo = None
        # Decode fast path (attend): per layer, the prepared C call and its output buffer, valid while _gen (bumped
        # whenever the batch rows' sequences change) is the one they were made with
        self._plans: dict = {}
        self._gen = 0
        # Captured decode (CUDAGraphDecode): decode steps through kvq.StaticPlan, one per kvq cache (group index ->
        # (attention arguments, plan)); any other use of the sequences ends the plans first (_end_static)
        self._static_on = False
        self._static: dict = {}
        # True only while CompiledDecode runs its compiled step: update() hands K/V through untouched and the
        # attention is the custom op kvq::decode_step (append + attention of one layer)
        self._compiled = False
        # transformers' config._attn_implementation is a property over _attn_implementation_internal behind two
        # __getattribute__ overrides (~3 us per read, once per layer and step in update()): read the attribute itself
        # where the config stores it there (checked now), through the property otherwise
        d = getattr(tc, "__dict__", None)
        self._cfg_dict = d if (isinstance(getattr(type(tc), "_attn_implementation", None), property) and
                               isinstance(d, dict) and "_attn_implementation_internal" in d and
                               d["_attn_implementation_internal"] == getattr(tc, "_attn_implementation", None)) else None
        layers = [KVQLayer(self, i, lt != "full_attention") for i, lt in enumerate(layer_types)]
        super().__init__(layers=layers)

    # ---------------------------------------------------------------------------------------------------------
    @property
    def device(self):
        return self._device

    @property
    def is_cuda(self) -> bool:
        return self._device is not None and self._device.type == "cuda"

    @property
    def fused(self) -> bool:
        """True when the model runs the "kvq" attention (attention on the pages); False: dequantize-and-return."""
        d = self._cfg_dict
        if d is not None:
            return d.get("_attn_implementation_internal") == ATTN_IMPLEMENTATION
        return getattr(self._config, "_attn_implementation", None) == ATTN_IMPLEMENTATION

    @property
    def is_initialized(self) -> bool:
        return self._device is not None

    @property
    def batch_size(self) -> int:
        return self.kvq_batch if self._device is not None else -1

    def _lazy_init(self, key_states: torch.Tensor):
        if self._device is not None:
            return
        if key_states.dim() != 4:
            raise ValueError(f"kvq: expected key states [batch, heads, tokens, head_dim], got {tuple(key_states.shape)}")
        B, H, _, D = key_states.shape
        if (H, D) != (self.n_kv_heads, self.head_dim):
            raise ValueError(f"kvq: key states have {H} heads of {D}, the config says {self.n_kv_heads} of "
                             f"{self.head_dim}")
        if key_states.dtype not in _TORCH_DTYPES:
            raise TypeError(f"kvq: dtype {key_states.dtype} is not supported (float32, float16, bfloat16)")
        dev = key_states.device
        nb = int(self.kvq_max_batch or B)
        if B > nb:
            raise ValueError(f"kvq: batch {B} exceeds max_batch_size {nb}")
        if dev.type == "cuda":
            ok, why = N.cuda_available()
            if not ok:
                raise RuntimeError(f"kvq: CUDA tensors but {why}")
            if not self.fused:
                raise RuntimeError('kvq: on CUDA the cache needs attn_implementation="kvq" (the CUDA backend has no '
                                   "read-back; attention runs on the pages)")
            if self.kvq_prefill == "exact":
                raise ValueError('kvq: prefill="exact" runs on the CPU only (the CUDA backend has no such prefill)')
            if self.head_dim not in N.CUDA_HEAD_DIMS:
                raise ValueError(f"kvq: head_dim {self.head_dim} is not supported by the CUDA backend "
                                 f"({N.CUDA_HEAD_DIMS})")
            if self.n_q_heads // self.n_kv_heads > 8:
                raise ValueError("kvq: the CUDA backend supports at most 8 query heads per KV head")
            if self.kvq_group not in (0, 64):
                raise ValueError("kvq: the CUDA backend supports group 64 only")
            nu = self.kvq_quality["nonuniform"]
            q42 = (N.type_from_name("q4"), N.type_from_name("q2"))
            if nu > 0 and any((nu & 1 and g.types[0] in q42) or (nu & 2 and g.types[1] in q42) for g in self._groups):
                raise ValueError("kvq: the CUDA backend has non-uniform levels for q3 only, not for q4 or q2 roles "
                                 f"(kvq.h section 10): nonuniform={nu}")
            if self.kvq_outliers:
                raise ValueError(f"kvq: the CUDA backend has no dense-and-sparse outliers: outliers={self.kvq_outliers}")
            if self.kvq_params8:
                raise ValueError(f"kvq: the CUDA backend reads fp16 group parameters only: params8={self.kvq_params8}")
            if self.kvq_window8:
                raise ValueError(f"kvq: the CUDA backend keeps fp16 windows only: window8={self.kvq_window8}")
            if self.kvq_squat[0] > 0:
                raise ValueError("kvq: the CUDA backend has no SQuat keys (kvq.h section 10): squat_rank="
                                 f"{self.kvq_squat[0]}")
        elif dev.type != "cpu":
            raise ValueError(f"kvq: device {dev} is not supported (cpu, cuda)")
        handles = []
        try:
            for g in self._groups:
                nl = len(g.layers)
                ab = self.kvq_arena_bytes or N.arena_bytes_for(nl, self.n_kv_heads, self.head_dim, g.types[0], g.types[1],
                                                           self.kvq_max_len, nb, 64, self.kvq_group,
                                                           outliers=self.kvq_outliers)
                # each layer's rotation seeded by its model layer number (kvq.h, rotation_layers), as the engine does:
                # a layer's bytes do not depend on which other layers share its cache
                rl = None if g.layers == list(range(nl)) else g.layers
                qn = engine_default_qnorm(*g.types) if self.kvq_qnorm < 0 else self.kvq_qnorm
                if dev.type == "cuda":
                    h = N.CudaCache(nl, self.n_kv_heads, self.head_dim, g.types[0], g.types[1], arena_bytes=ab,
                                    residual=self.kvq_residual, max_seqs=2 * nb + 2,
                                    device=dev.index if dev.index is not None else torch.cuda.current_device(),
                                    max_seq_tokens=self.kvq_max_len + 64, rotation_layers=rl, qnorm=qn,
                                    **self.kvq_quality)
                else:
                    rank = self.kvq_squat[0]
                    if rank < 0:  # the engine's default (src/cli): SQuat for Q2 keys, where queries reach the cache
                        rank = 8 if (g.types[0] == N.type_from_name("q2") and self.head_dim > 8 and self.fused) else 0
                    if rank and not self.fused:
                        raise ValueError('kvq: SQuat keys (squat_rank > 0) need attn_implementation="kvq": with '
                                         "eager/sdpa the keys are stored before any query is seen")
                    h = N.Cache(nl, self.n_kv_heads, self.head_dim, g.types[0], g.types[1], arena_bytes=ab,
                                residual=self.kvq_residual, group=self.kvq_group, max_seqs=2 * nb + 8,
                                n_threads=self.kvq_n_threads, squat_rank=rank, squat_lambda=self.kvq_squat[1],
                                rotation_layers=rl,
                                qnorm=qn, outliers=self.kvq_outliers, params8=self.kvq_params8,
                                window8=self.kvq_window8,
                                **self.kvq_quality)
                handles.append(h)
                seqs = [h.seq_new() for _ in range(B)]
                g.handle, g.seqs = h, seqs
        except Exception:
            for g in self._groups:
                g.handle, g.seqs = None, []
            raise
        self._device, self.kvq_batch, self._dtype = dev, B, key_states.dtype
        self._plans.clear()
        self._gen += 1
        if dev.type == "cuda":  # the current torch stream of the device, read at every step (_raw_stream)
            get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
            idx = dev.index if dev.index is not None else torch.cuda.current_device()
            self._stream = functools.partial(get, idx) if get is not None else functools.partial(_raw_stream, dev)

    # ---------------------------------------------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self._compiled:  # CompiledDecode: the op appends (no Python state may change inside a traced step)
            return key_states, value_states
        if self._device is None:
            self._lazy_init(key_states)
        if key_states.shape[0] != self.kvq_batch:
            raise ValueError(f"kvq: batch {key_states.shape[0]} differs from the cache's {self.kvq_batch}")
        layer = self.layers[layer_idx]
        q = key_states.shape[2]
        past = layer.hf_len
        if self.fused:
            layer.hf_len = past + q
            key_states._kvq = (self, layer_idx, past)
            return key_states, value_states
        # compatibility mode (eager/sdpa): append everything, return the whole cache dequantized
        if self.is_cuda:
            raise RuntimeError('kvq: on CUDA the cache needs attn_implementation="kvq"')
        g = self._group_of[layer_idx]
        li = g.local[layer_idx]
        k = key_states.transpose(1, 2).contiguous()
        v = value_states.transpose(1, 2).contiguous()
        g.handle.append_ptr(li, g.seqs, [q] * self.kvq_batch, _TORCH_DTYPES[k.dtype], k.data_ptr(), v.data_ptr())
        layer.hf_len = past + q
        L = layer.hf_len
        ko = torch.empty((self.kvq_batch, L, self.n_kv_heads, self.head_dim), dtype=torch.float32)
        vo = torch.empty_like(ko)
        for b, s in enumerate(g.seqs):
            n = g.handle.seq_length(s, li)
            if n != L:
                raise RuntimeError(f"kvq: sequence length {n} != {L} (mixing attention implementations?)")
            g.handle.read_into(s, li, 0, L, ko[b].data_ptr(), vo[b].data_ptr())
        return (ko.transpose(1, 2).to(key_states.dtype), vo.transpose(1, 2).to(value_states.dtype))

    def append_kv(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Append K/V [batch, kv_heads, tokens, head_dim] of every row to `layer_idx` without computing attention
        (to load a context computed elsewhere, or fill a cache in benchmarks). All tokens count as real."""
        self._lazy_init(key_states)
        B, _, q, _ = key_states.shape
        if B != self.kvq_batch:
            raise ValueError(f"kvq: batch {B} differs from the cache's {self.kvq_batch}")
        g = self._group_of[layer_idx]
        k = key_states.transpose(1, 2).contiguous()
        v = value_states.transpose(1, 2).contiguous()
        g.handle.append_ptr(g.local[layer_idx], g.seqs, [q] * B, _TORCH_DTYPES[k.dtype], k.data_ptr(), v.data_ptr(),
                            *self._stream_args())
        self.layers[layer_idx].hf_len += q

    # ---------------------------------------------------------------------------------------------------------
    def _valid(self, attention_mask, past, q):
        """Which of the q new tokens of each row are real (not padding): None when all are, else bool [B, q] (CPU).
        Computed once per forward (the same mask object reaches every layer)."""
        if attention_mask is None:
            return None
        if q == 1 and attention_mask.is_cuda:
            # Decode step on the GPU: reading the mask would synchronise with the device at every step, and
            # generate() always marks the new tokens real (padding exists only in the prompt, handled below).
            return None
        memo = self._mask_memo
        if memo is not None and memo[0] is attention_mask and memo[1] == past and memo[2] == q:
            return memo[3]
        m = attention_mask
        if m.dim() == 2:
            cols = m[:, past:past + q] if m.shape[1] >= past + q else m[:, -q:]
            valid = cols.bool()
        elif m.dim() == 4:
            cols = m[:, 0, :, past:past + q] if m.shape[-1] >= past + q else m[:, 0, :, -q:]
            allowed = cols if cols.dtype == torch.bool else (cols == 0)
            valid = allowed.any(dim=1)
        else:
            raise ValueError(f"kvq: attention mask of shape {tuple(m.shape)} is not supported")
        valid = valid.cpu()
        res = None if bool(valid.all()) else valid
        self._mask_memo = (attention_mask, past, q, res)
        return res

    def attend(self, layer_idx, past, query, key, value, attention_mask, scaling, window, softcap):
        """Append the new K/V of `layer_idx` and compute attention on the pages. query [B, Hq, q, D] ->
        [B, q, Hq, D]."""
        B, Hq, q, D = query.shape
        if Hq % self.n_kv_heads:
            raise ValueError(f"kvq: {Hq} query heads is not a multiple of {self.n_kv_heads}")
        valid = self._valid(attention_mask, past, q)
        if q == 1 and valid is None and self._fast_decode and query.dtype in _TORCH_DTYPES:
            return self._decode_step(layer_idx, query, key, value, scaling, window, softcap)
        if self._static:
            self._end_static()
        g = self._group_of[layer_idx]
        li = g.local[layer_idx]
        h = g.handle
        kd = _TORCH_DTYPES[key.dtype]
        k = key.transpose(1, 2)  # [B, q, H, D]
        v = value.transpose(1, 2)
        scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(D)
        window = int(window or 0)
        softcap = float(softcap or 0.0)
        cuda = self.is_cuda
        sa = self._stream_args()
        if not cuda and h.config.squat_rank:
            self._set_subspaces(g, li, query, valid)
        # prefill="exact": the rows attend before their tokens are appended (kvq_attn_prefill_exact), below
        exact = not cuda and q > 1 and self.kvq_prefill == "exact"
        if valid is None:
            kc, vc = k.contiguous(), v.contiguous()
            counts = [q] * B
            rows = list(range(B))
            if not exact:
                h.append_ptr(li, g.seqs, counts, kd, kc.data_ptr(), vc.data_ptr(), *sa)
        else:
            counts_all = valid.sum(dim=1).tolist()
            rows = [b for b in range(B) if counts_all[b] > 0]
            counts = [counts_all[b] for b in rows]
            vdev = valid.to(key.device)
            kc = k[vdev].contiguous()  # [sum counts, H, D], rows back to back
            vc = v[vdev].contiguous()
            if rows and not exact:
                h.append_ptr(li, [g.seqs[b] for b in rows], counts, kd, kc.data_ptr(), vc.data_ptr(), *sa)
        qt = query.transpose(1, 2)  # [B, q, Hq, D]
        if cuda:
            return self._attend_cuda(h, li, g, qt, valid, rows, counts, scale, window, softcap, sa[0])
        qf = qt.to(torch.float32)
        if valid is None and q == 1:
            qd = qf.reshape(B, Hq, D).contiguous()
            out = torch.empty_like(qd)
            h.attn_decode_ptr(li, g.seqs, qd.data_ptr(), out.data_ptr(), Hq, scale, window, softcap)
            return out.view(B, 1, Hq, D).to(query.dtype)
        out = torch.zeros((B, q, Hq, D), dtype=torch.float32)
        row_bytes = self.n_kv_heads * D * kc.element_size()
        off = 0  # the row's first token in kc / vc (rows back to back)
        for b, n in zip(rows, counts):
            if valid is None:
                qb = qf[b].contiguous()
                ob = out[b]
            else:
                idx = valid[b].nonzero().squeeze(1)
                qb = qf[b].index_select(0, idx).contiguous()
                ob = torch.empty_like(qb)
            if exact:
                h.attn_prefill_exact_ptr(li, g.seqs[b], n, qb.data_ptr(), kd, kc.data_ptr() + off * row_bytes,
                                         vc.data_ptr() + off * row_bytes, ob.data_ptr(), Hq, scale, window, softcap)
            else:
                h.attn_prefill_ptr(li, g.seqs[b], n, qb.data_ptr(), ob.data_ptr(), Hq, scale, window, softcap)
            if valid is not None:
                out[b].index_copy_(0, idx, ob)
            off += n
        if exact and rows:
            h.append_ptr(li, [g.seqs[b] for b in rows], counts, kd, kc.data_ptr(), vc.data_ptr())
        return out.to(query.dtype)

    def _decode_step(self, layer_idx, query, key, value, scaling, window, softcap, out=None):
        """attend() for a decode step (one new token per row, all real): one prepared C call per layer on CUDA
        (kvq_cuda_decode_step: append + attention), two on the CPU (kvq_append, kvq_attn_decode), into an output
        buffer kept per layer. What the general path recomputes at every call (argument checks and conversions, the
        sequence id and token count arrays, the attention parameters, the output allocation, transposes) is made
        once per (layer, batch, shape, dtype, scale, window, softcap) and after any change of the rows' sequences.
        The returned tensor is that buffer: the next step of this layer overwrites it (the attention module consumes
        it at once, in o_proj), unless `out` ([B, 1, Hq, D], query's dtype, contiguous) is given: then the result
        goes there (kvq::decode_step, whose outputs must be fresh tensors)."""
        B, Hq, _, D = query.shape
        key_ = (self._gen, B, Hq, query.dtype, key.dtype, None if scaling is None else float(scaling), int(window or 0),
                float(softcap or 0.0))  # normalised: the eager call and kvq::decode_step must find the same plan
        plan = self._plans.get(layer_idx)
        if plan is None or plan[0] != key_:
            plan = self._plans[layer_idx] = self._make_plan(layer_idx, key_, query, key, scaling, window, softcap)
        _, step, buf, cuda = plan
        # [B, H, 1, D] with one token is the [B][H][D] rows kvq reads (contiguous, whatever the size-1 dim's stride)
        k = key if key.is_contiguous() else key.contiguous()
        v = value if value.is_contiguous() else value.contiguous()
        if cuda:
            qc = query if query.is_contiguous() else query.contiguous()
            o = buf if out is None else out
            step(k.data_ptr(), v.data_ptr(), qc.data_ptr(), o.data_ptr(), self._stream())
            return o
        qf = query if query.dtype == torch.float32 and query.is_contiguous() else \
            query.to(torch.float32).contiguous()
        step(k.data_ptr(), v.data_ptr(), qf.data_ptr(), buf.data_ptr())
        if out is not None:
            return out.copy_(buf)
        return buf if query.dtype == torch.float32 else buf.to(query.dtype)

    def _make_plan(self, layer_idx, key_, query, key, scaling, window, softcap):
        B, Hq, _, D = query.shape
        g = self._group_of[layer_idx]
        li = g.local[layer_idx]
        scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(D)
        window, softcap = int(window or 0), float(softcap or 0.0)
        kd = _TORCH_DTYPES[key.dtype]
        if self.is_cuda:
            out = torch.empty((B, 1, Hq, D), dtype=query.dtype, device=query.device)
            qd = _TORCH_DTYPES[query.dtype]
            if self._static_on:  # the plan's steps (kvq_cuda_static_step) can be captured in a CUDA graph
                gi = self._groups.index(g)
                skey = (kd, qd, Hq, scale, window, softcap)
                ent = self._static.get(gi)
                if ent is None:
                    ent = self._static[gi] = (skey, N.StaticPlan(g.handle, g.seqs, self.kvq_max_len, kd, qd, Hq, scale,
                                                                 window, softcap, stream=self._stream()))
                elif ent[0] != skey:
                    raise ValueError("kvq: a captured decode needs the same attention arguments (dtypes, heads, scale, "
                                     f"window, softcap) in every layer of a KV type: {ent[0]} vs {skey}")
                return key_, functools.partial(ent[1].step_ptr, li), out, True
            step = g.handle.decode_plan(li, g.seqs, kd, qd, Hq, scale, window, softcap)
            return key_, step, out, True
        step = g.handle.decode_plan(li, g.seqs, kd, Hq, scale, window, softcap)
        return key_, step, torch.empty((B, 1, Hq, D), dtype=torch.float32), False

    def _attend_cuda(self, h, li, g, qt, valid, rows, counts, scale, window, softcap, stream):
        B, q, Hq, D = qt.shape
        qd = qt if qt.dtype in (torch.float16, torch.bfloat16, torch.float32) else qt.float()
        dt = _TORCH_DTYPES[qd.dtype]
        if valid is None and q == 1:
            qc = qd.reshape(B, Hq, D).contiguous()
            out = torch.empty_like(qc)
            h.attn_decode_ptr(li, g.seqs, dt, qc.data_ptr(), out.data_ptr(), Hq, scale, window, softcap, stream)
            return out.view(B, 1, Hq, D)
        out = torch.zeros((B, q, Hq, D), dtype=qd.dtype, device=qd.device)
        for b, n in zip(rows, counts):
            if valid is None:
                qb = qd[b].contiguous()
                ob = torch.empty_like(qb)
                h.attn_prefill_ptr(li, g.seqs[b], n, dt, qb.data_ptr(), ob.data_ptr(), Hq, scale, window, softcap,
                                   stream)
                out[b] = ob
            else:
                idx = valid[b].nonzero().squeeze(1).to(qd.device)
                qb = qd[b].index_select(0, idx).contiguous()
                ob = torch.empty_like(qb)
                h.attn_prefill_ptr(li, g.seqs[b], n, dt, qb.data_ptr(), ob.data_ptr(), Hq, scale, window, softcap,
                                   stream)
                out[b].index_copy_(0, idx, ob)
        return out

    # ---------------------------------------------------------------------------------------------------------
    def _stream_args(self) -> tuple:
        """The trailing arguments of the handles' calls that enqueue device work: (cudaStream_t of the current
        torch stream on the cache's device,) on CUDA; () on the CPU, whose calls take no stream."""
        return (_raw_stream(self._device),) if self.is_cuda else ()

    def _set_subspaces(self, g, li, query, valid) -> None:
        """SQuat: the key subspace of every (sequence, layer li, KV head) that has none yet, from this call's queries
        of the sequence (its real tokens; all query heads of the KV head's group), before its keys are appended."""
        gi = self._groups.index(g)
        B, Hq, q, D = query.shape
        rep_ = Hq // self.n_kv_heads
        rank = g.handle.config.squat_rank
        qf = None
        for b, seq in enumerate(g.seqs):
            if (gi, seq, li) in self._squat_set:
                continue
            if qf is None:
                qf = query.detach().to(torch.float64).cpu()
            rows = qf[b] if valid is None else qf[b][:, valid[b]]
            if rows.shape[1] == 0:
                continue
            for kh in range(self.n_kv_heads):
                qs = rows[kh * rep_:(kh + 1) * rep_].reshape(-1, D).numpy()
                g.handle.set_key_subspace(seq, li, kh, N.key_subspace(qs, rank))
            self._squat_set.add((gi, seq, li))

    def _end_static(self) -> None:
        """Gives the sequences lent to static plans back (their state to the host), before any other use of them."""
        plans, self._static = list(self._static.values()), {}
        self._static_on = False
        if not plans:
            return
        self._plans.clear()
        self._gen += 1
        sa = self._stream_args()
        for _, sp in plans:
            sp.end(*sa)

    def _remap(self, src_rows: list[int]):
        """New row i = old row src_rows[i] (beam reorder, select, repeat): the first user of an old sequence keeps
        it, the others fork it (pages shared, copy on write); old sequences nobody uses are freed."""
        if self._device is None:
            return
        self._end_static()
        if src_rows == list(range(self.kvq_batch)):
            return
        for i in src_rows:  # before anything changes: a negative index would silently pick the last row
            if not 0 <= i < self.kvq_batch:
                raise IndexError(f"kvq: batch row {i} outside 0 .. {self.kvq_batch - 1}")
        sa = self._stream_args()
        # Two phases, so that a failure (no free sequence slot, no page for a copy on write) in any group leaves
        # every group as it was: first all forks, then, once all succeeded, the frees.
        plans = []
        try:
            for g in self._groups:
                used, new = set(), []
                plans.append((g, used, new))
                for src in src_rows:
                    s = g.seqs[src]
                    if s in used:
                        new.append(g.handle.seq_fork(s, *sa))
                    else:
                        used.add(s)
                        new.append(s)
        except Exception:
            for g, _, new in plans:
                for s in new:
                    if s not in g.seqs:
                        g.handle.seq_free(s)
            raise
        done = self._squat_set
        for gi, (g, used, new) in enumerate(plans):
            for src, s in zip(src_rows, new):  # a fork has its source's subspaces (kvq_seq_fork copies them)
                for li in g.local.values():
                    if (gi, g.seqs[src], li) in done:
                        done.add((gi, s, li))
            for s in g.seqs:
                if s not in used:
                    g.handle.seq_free(s)
                    for li in g.local.values():
                        done.discard((gi, s, li))
            g.seqs = new
        self.kvq_batch = len(src_rows)
        self._mask_memo = None
        self._plans.clear()
        self._gen += 1

    def reorder_cache(self, beam_idx: Any) -> None:
        idx = beam_idx.tolist() if hasattr(beam_idx, "tolist") else list(beam_idx)
        self._remap([N._int(i, "beam_idx[]") for i in idx])

    def batch_repeat_interleave(self, repeats: int) -> None:
        repeats = N._int(repeats, "repeats")
        if repeats < 1:
            raise ValueError(f"kvq: repeats = {repeats} must be >= 1")
        self._remap([b for b in range(self.kvq_batch) for _ in range(repeats)])

    def batch_select_indices(self, indices: Any) -> None:
        idx = indices.tolist() if hasattr(indices, "tolist") else list(indices)
        if isinstance(idx, list) and idx and isinstance(idx[0], bool):
            idx = [i for i, keep in enumerate(idx) if keep]
        self._remap([N._int(i, "indices[]") for i in idx])

    def crop(self, tokens_to_remove: int) -> None:
        tokens_to_remove = N._i64(tokens_to_remove, "tokens_to_remove")
        hf_len = max(layer.hf_len for layer in self.layers)
        remove = -tokens_to_remove if tokens_to_remove < 0 else max(0, hf_len - tokens_to_remove)
        if remove == 0 or self._device is None:
            return
        self._end_static()
        sa = self._stream_args()
        for g in self._groups:
            for s in g.seqs:
                g.handle.seq_truncate(s, max(0, g.handle.seq_length(s, 0) - remove), *sa)
        for layer in self.layers:
            layer.hf_len = max(0, layer.hf_len - remove)
        self._mask_memo = None

    def reset(self) -> None:
        self._end_static()
        for g in self._groups:
            if g.handle is not None:
                for s in g.seqs:
                    g.handle.seq_free(s)
                g.handle.close()
            g.handle, g.seqs = None, []
        for layer in self.layers:
            layer.hf_len = 0
        self._squat_set = set()
        self._device, self.kvq_batch, self._mask_memo = None, 0, None
        self._plans.clear()
        self._gen += 1

    # ---------------------------------------------------------------------------------------------------------
    def kv_bytes(self) -> dict:
        """Bytes of KV storage: {'arena': page arena bytes (allocated), 'in_use': page bytes in use, 'window':
        residual windows} summed over the kvq caches."""
        out = {"arena": 0, "in_use": 0, "window": 0}
        self._end_static()  # the plans' reservations are not in use
        for g in self._groups:
            if g.handle is None:
                continue
            st = g.handle.stats()
            out["arena"] += st["arena_bytes"]
            out["window"] += st["window_bytes"]
            if "page_bytes_in_use" in st:
                out["in_use"] += st["page_bytes_in_use"]
            else:
                out["in_use"] += (st["pages_total"] - st["pages_free"]) * st["page_bytes"]
        return out

    def seq_lengths(self, layer_idx: int = 0) -> list[int]:
        """Tokens stored per batch row in kvq (padding excluded)."""
        self._end_static()
        g = self._group_of[layer_idx]
        return [g.handle.seq_length(s, g.local[layer_idx]) for s in g.seqs] if g.handle else []

    def __repr__(self):
        names = sorted({f"{N.type_name(tk)}/{N.type_name(tv)}" for tk, tv in self.layer_types_per_layer})
        return f"KVQCache(types={names}, layers={self.n_layers}, batch={self.kvq_batch}, device={self._device})"


def _check_one_length(cache: "KVQCache", who: str) -> None:
    """The captured and compiled decoders feed one position to every row: every row of every layer must hold the
    same number of tokens (no padding in the prompt)."""
    lens = [cache.seq_lengths(li) for li in range(cache.n_layers)]
    if any(len(set(x)) != 1 for x in lens) or len({x[0] for x in lens}) != 1:
        raise ValueError(f"kvq: {who} needs rows of one length (no padding), got {lens[0]}")


class CUDAGraphDecode:
    """Decode steps of `model` over `cache` (a KVQCache on CUDA holding the prompt: call it after the prefill) replayed
    as ONE CUDA graph per step (issue 23): every kernel of the forward, kvq's append and attention included, with no
    Python, transformers or kvq host work per layer. How: the first call runs the step eagerly on a side stream with
    the cache's sequences lent to kvq.StaticPlan (kvq_cuda.h section 5: lengths and page tables on the device, pages
    reserved up to the cache's max_cache_len), then captures the same forward with torch.cuda.CUDAGraph; later calls
    copy the tokens and positions into the graph's input tensors and replay it. The raw-pointer API under capture,
    not torch.compile: kvq's calls are ctypes calls, which dynamo would cut the graph at.

        dec = kvq.hf.CUDAGraphDecode(model, cache)
        for _ in range(n):
            logits = dec(next_tokens)  # [batch] token ids -> [batch, vocab]: a buffer the next call overwrites

    Every row must hold the same number of tokens (no padding in the prompt). The attention arguments must be the same
    in every layer of a KV type (Llama, Mistral, Qwen; not Gemma 2's alternating windows). close() (or any other use
    of the cache: a prefill, crop, reorder, reset) gives the sequences back; the decoder must not be called after
    that (it raises)."""

    def __init__(self, model: Any, cache: "KVQCache") -> None:
        if not isinstance(cache, KVQCache) or not cache.is_cuda:
            raise ValueError("kvq: CUDAGraphDecode needs a KVQCache on CUDA that holds the prompt (call it after the "
                             "prefill)")
        _check_one_length(cache, "CUDAGraphDecode")
        self.model, self.cache = model, cache
        self.batch = cache.kvq_batch
        self.graph = None
        self._out = None
        self._sps: list = []  # the static plans the graph captured
        self._closed = False

    def _forward(self):
        return self.model(input_ids=self._ids, position_ids=self._pos, cache_position=self._cpos, use_cache=True,
                          **{CACHE_KWARG: self.cache})

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        c = self.cache
        if self._closed:
            raise RuntimeError("kvq: this CUDAGraphDecode was closed")
        tok = tokens.reshape(self.batch, 1)
        pos = c.layers[0].hf_len
        if self.graph is not None:
            if any(sp.closed for sp in self._sps):  # the graph would write through freed plans
                self.graph = None
                self._closed = True
                raise RuntimeError("kvq: the cache was used in between (its static plans ended): make a new "
                                   "CUDAGraphDecode")
            self._ids.copy_(tok)
            self._pos.fill_(pos)
            self._cpos.fill_(pos)
            self.graph.replay()
            for layer in c.layers:
                layer.hf_len += 1
            return self._out[:, -1]
        dev = c.device
        self._ids = tok.to(device=dev, dtype=torch.long).clone()
        self._pos = torch.full((self.batch, 1), pos, dtype=torch.long, device=dev)
        self._cpos = torch.full((1,), pos, dtype=torch.long, device=dev)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        c._static_on = True
        c._plans.clear()
        c._gen += 1
        with torch.no_grad():
            with torch.cuda.stream(side):  # the real step, eagerly: makes the plans, warms cuBLAS on this stream
                first = self._forward().logits[:, -1].clone()
            saved = [layer.hf_len for layer in c.layers]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):  # recorded, not run: the lengths Python counted go back
                self._out = self._forward().logits
            for layer, n in zip(c.layers, saved):
                layer.hf_len = n
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = graph
        self._sps = [sp for _, sp in c._static.values()]
        return first

    def close(self) -> None:
        """Drops the graph and gives the cache's sequences back (it goes on eagerly)."""
        self.graph = None
        self._closed = True
        self.cache._end_static()


_COMPILED_CACHES: "weakref.WeakValueDictionary[int, KVQCache]" = weakref.WeakValueDictionary()
_COMPILED_IDS = itertools.count(1)
_DECODE_OP = None


def _decode_op():
    """torch.ops.kvq.decode_step(query, key, value, cache_id, layer_idx, scaling, window, softcap) -> [B, 1, Hq, D]:
    one layer's decode step of a KVQCache (append the token's K/V, attend on the pages) as a torch custom op, so that
    dynamo keeps it as one opaque node (ctypes calls would break the graph) and cudagraph trees record its kernels.
    Registered on first use (torch.library.custom_op: torch >= 2.4)."""
    global _DECODE_OP
    if _DECODE_OP is not None:
        return _DECODE_OP
    if not hasattr(torch.library, "custom_op"):
        raise RuntimeError(f"kvq: CompiledDecode needs torch >= 2.4 (torch.library.custom_op); this is {torch.__version__}")

    @torch.library.custom_op("kvq::decode_step", mutates_args=())
    def decode_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache_id: int, layer_idx: int,
                    scaling: float, window: int, softcap: float) -> torch.Tensor:
        cache = _COMPILED_CACHES.get(cache_id)
        if cache is None:
            raise RuntimeError(f"kvq: decode_step: no KVQCache with id {cache_id} (its CompiledDecode was closed)")
        B, Hq, _, D = query.shape
        out = torch.empty((B, 1, Hq, D), dtype=query.dtype, device=query.device)
        return cache._decode_step(layer_idx, query, key, value, None if scaling < 0 else scaling, window, softcap,
                                  out=out)

    @decode_step.register_fake
    def _(query, key, value, cache_id, layer_idx, scaling, window, softcap):
        B, Hq, _, D = query.shape
        return query.new_empty((B, 1, Hq, D))

    _DECODE_OP = decode_step
    return decode_step


class CompiledDecode:
    """Decode steps of `model` over `cache` (a KVQCache holding the prompt: call it after the prefill) through
    torch.compile: the whole forward is traced with kvq's append + attention of each layer as one custom op
    (kvq::decode_step), so inductor fuses the rest of the model (norms, RoPE, activations) as it does for
    StaticCache, and with mode="reduce-overhead" (the default) cudagraph trees replay the step as CUDA graphs. On
    CUDA the layers' steps go through kvq.StaticPlan (lengths and page tables on the device), as in CUDAGraphDecode,
    so the recorded graph appends and attends without the host; on the CPU the same traced step runs kvq's CPU calls.

        dec = kvq.hf.CompiledDecode(model, cache)
        for _ in range(n):
            logits = dec(next_tokens)  # [batch] token ids -> [batch, vocab]: overwritten by the next call

    The first calls compile (tens of seconds) and warm up; after that, a step with the same batch needs no
    recompilation (positions are tensors, lengths are not read). Every row must hold the same number of tokens; on
    CUDA the attention arguments must be the same in every layer of a KV type. close() or any other use of the
    cache ends it (a later call raises)."""

    def __init__(self, model: Any, cache: "KVQCache", mode: str | None = "reduce-overhead",
                 fullgraph: bool = True) -> None:
        if not isinstance(cache, KVQCache) or cache._device is None:
            raise ValueError("kvq: CompiledDecode needs a KVQCache that holds the prompt (call it after the prefill)")
        _check_one_length(cache, "CompiledDecode")
        _decode_op()
        self.model, self.cache = model, cache
        self.batch = cache.kvq_batch
        self._id = next(_COMPILED_IDS)
        _COMPILED_CACHES[self._id] = cache
        self._fn = torch.compile(self._forward, mode=mode, fullgraph=fullgraph)
        self._ids = None
        self._sps: list = []
        self._closed = False

    def _forward(self, ids, pos, cpos):
        return self.model(input_ids=ids, position_ids=pos, cache_position=cpos, use_cache=True,
                          kvq_cache_id=self._id, **{CACHE_KWARG: self.cache}).logits

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        c = self.cache
        if self._closed:
            raise RuntimeError("kvq: this CompiledDecode was closed")
        if self._ids is not None and (any(sp.closed for sp in self._sps) or (c.is_cuda and not c._static_on)):
            self.close()
            raise RuntimeError("kvq: the cache was used in between (its static plans ended): make a new "
                               "CompiledDecode")
        pos = c.layers[0].hf_len
        first = self._ids is None
        if first:
            dev = c.device
            self._ids = torch.zeros((self.batch, 1), dtype=torch.long, device=dev)
            self._pos = torch.zeros((self.batch, 1), dtype=torch.long, device=dev)
            self._cpos = torch.zeros((1,), dtype=torch.long, device=dev)
            c._end_static()
            c._static_on = c.is_cuda
            c._plans.clear()
            c._gen += 1
        self._ids.copy_(tokens.reshape(self.batch, 1))
        self._pos.fill_(pos)
        self._cpos.fill_(pos)
        if first:
            # The first step runs eagerly: it makes the layers' plans (static plans on CUDA) and their buffers
            # outside the compiled region, whose allocations cudagraph trees would own (and refuse to see kept).
            with torch.no_grad():
                out = self.model(input_ids=self._ids, position_ids=self._pos, cache_position=self._cpos,
                                 use_cache=True, **{CACHE_KWARG: c}).logits
            self._sps = [sp for _, sp in c._static.values()]
            return out[:, -1]
        c._compiled = True
        try:
            with torch.no_grad():
                out = self._fn(self._ids, self._pos, self._cpos)
        finally:
            c._compiled = False
        for layer in c.layers:
            layer.hf_len += 1
        return out[:, -1]

    def close(self) -> None:
        """Ends the decoder: the op no longer finds the cache, the static plans give the sequences back (the cache
        goes on eagerly)."""
        self._closed = True
        _COMPILED_CACHES.pop(self._id, None)
        if self.cache.is_cuda:
            self.cache._end_static()


def _raw_stream(device) -> int:
    """cudaStream_t of the current torch stream, as an int. torch's private raw getter skips building a Stream
    object (a few us per layer at every decode step); the public call is the fallback."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return get(idx) if get is not None else torch.cuda.current_stream(device).cuda_stream


# -------------------------------------------------------------------------------------------------------------
# The "kvq" attention implementation
# -------------------------------------------------------------------------------------------------------------
def _fallback_attention(module, query, key, value, attention_mask, scaling, window, softcap):
    """Plain fp attention for calls without a KVQCache (no cache, or another Cache class): the "kvq" mask function
    hands over the 2D padding mask, so build causal + window + padding here."""
    B, Hq, q, D = query.shape
    H, L = key.shape[1], key.shape[2]
    rep = Hq // H
    k = key.repeat_interleave(rep, dim=1).float()
    v = value.repeat_interleave(rep, dim=1).float()
    s = torch.matmul(query.float(), k.transpose(2, 3)) * (scaling if scaling is not None else D ** -0.5)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    qpos = torch.arange(L - q, L, device=query.device)[:, None]
    kpos = torch.arange(L, device=query.device)[None, :]
    allow = kpos <= qpos
    if window:
        allow = allow & (kpos > qpos - window)
    allow = allow[None, None]
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            allow = allow & attention_mask[:, -L:].bool()[:, None, None, :]
        elif attention_mask.dim() == 4:
            m = attention_mask[..., -L:]
            allow = allow & (m if m.dtype == torch.bool else (m == 0))
    s = s.masked_fill(~allow, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.matmul(p, v).to(query.dtype).transpose(1, 2).contiguous()


def kvq_attention_forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          sliding_window: int | None = None, softcap: float | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    cid = kwargs.get("kvq_cache_id")
    if cid is not None:  # CompiledDecode's traced step: append + attention as one custom op
        return _decode_op()(query, key, value, cid, module.layer_idx, -1.0 if scaling is None else float(scaling),
                            int(sliding_window or 0), float(softcap or 0.0)), None
    ctx = getattr(key, "_kvq", None)
    if ctx is None:
        return _fallback_attention(module, query, key, value, attention_mask, scaling, sliding_window, softcap), None
    cache, layer_idx, past = ctx
    out = cache.attend(layer_idx, past, query, key, value, attention_mask, scaling, sliding_window, softcap)
    return out, None


def kvq_mask(batch_size=None, q_length=None, kv_length=None, q_offset=None, kv_offset=None, mask_function=None,
             attention_mask=None, **kwargs):
    """The "kvq" mask: the 2D padding mask as is (None when there is none). kvq applies causality and the sliding
    window itself; padding tokens are never stored."""
    return attention_mask


def register_attention() -> str:
    """Registers attn_implementation="kvq" with transformers (done on import of kvq.hf). Returns the name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvq_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, kvq_mask)
    return ATTN_IMPLEMENTATION


register_attention()


# -------------------------------------------------------------------------------------------------------------
# patch_model_with_int8_kv_cache
# -------------------------------------------------------------------------------------------------------------
def _check_model(model, kv_type):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError("kvq: expected a transformers PreTrainedModel (no .config)")
    tc, n_layers, n_heads, n_kv, head_dim = _shape_of(cfg)
    mt = getattr(tc, "model_type", "?")
    if mt not in SUPPORTED_MODEL_TYPES:
        warnings.warn(f"kvq: model type {mt!r} is not one of the tested families {SUPPORTED_MODEL_TYPES}; "
                      "patching anyway", stacklevel=3)
    if head_dim not in N.HEAD_DIMS:
        raise ValueError(f"kvq: head_dim {head_dim} is not supported (supported: {N.HEAD_DIMS})")
    p = next(model.parameters(), None)
    if p is not None:
        if p.dtype not in _TORCH_DTYPES:
            raise TypeError(f"kvq: model dtype {p.dtype} is not supported (float32, float16, bfloat16)")
        if p.device.type == "cuda":
            ok, why = N.cuda_available()
            if not ok:
                raise RuntimeError(f"kvq: the model is on CUDA but {why}")
            if head_dim not in N.CUDA_HEAD_DIMS:
                raise ValueError(f"kvq: head_dim {head_dim} is not supported by the CUDA backend {N.CUDA_HEAD_DIMS}")
            if n_heads // n_kv > 8:
                raise ValueError("kvq: the CUDA backend supports at most 8 query heads per KV head")
        elif p.device.type != "cpu":
            raise ValueError(f"kvq: device {p.device} is not supported (cpu, cuda)")
    _parse_types(kv_type, None, n_layers)
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError("kvq: this transformers version has no set_attn_implementation (need transformers >= 5)")


def _cache_kwarg_of(fn) -> str:
    """The name under which `fn` (a model's forward, prepare_inputs_for_generation) takes the cache: "cache" from
    transformers 5.2x on (which renamed it and warns about the old name), "past_key_values" before."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


try:
    from transformers.generation.utils import GenerationMixin as _GenerationMixin
    # The name generate() and the model outputs use for the cache in the installed transformers: pass a KVQCache to an
    # unpatched model as model(..., **{kvq.hf.CACHE_KWARG: cache}) to avoid the deprecation warning on either side of
    # the rename. A patched model takes both names.
    CACHE_KWARG = _cache_kwarg_of(_GenerationMixin.prepare_inputs_for_generation)
except Exception:  # noqa: BLE001 - an unusual transformers: the old name
    CACHE_KWARG = "past_key_values"
_CACHE_NAMES = ("cache", "past_key_values")


def output_cache(out: Any):
    """The cache of a model output or generate() output, read under the installed transformers' name (the old name
    is a deprecated property from 5.2x on, which logs a warning)."""
    return getattr(out, CACHE_KWARG)


def _take_cache(args: tuple, kwargs: dict, pos: int | None, what: str):
    """Pops the cache argument given under either name (or positionally at `pos`) -> (cache or None, args)."""
    found = [(k, kwargs.pop(k)) for k in _CACHE_NAMES if k in kwargs]
    if pos is not None and len(args) > pos:
        found.append(("positional", args[pos]))
        args = args[:pos] + (None,) + args[pos + 1:]
    given = [(k, v) for k, v in found if v is not None]
    if len(given) > 1 and any(v is not given[0][1] for _, v in given[1:]):
        raise TypeError(f"kvq: {what} got two different caches ({' and '.join(k for k, _ in given)}): pass one, as "
                        "cache= or past_key_values=")
    return (given[0][1] if given else None), args


def _refuse(cache, what: str):
    raise TypeError(
        f"kvq: {what} was given a {type(cache).__name__}, but this model was patched by "
        "patch_model_with_int8_kv_cache, whose caches are kvq's: that cache would keep the K/V in torch tensors "
        "(no kvq pages, no memory saving). Pass no cache (the model makes a KVQCache, returned in the output, to pass "
        "to the next call), or a kvq.KVQCache(model.config, ...), or call kvq.unpatch_model(model) first.")


def _length_of(args: tuple, kwargs: dict) -> int:
    """Tokens of the call's input (input_ids or inputs_embeds, positional or keyword), 0 when unknown."""
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None and args and hasattr(args[0], "shape"):
        x = args[0]
    return int(x.shape[1]) if x is not None and hasattr(x, "shape") and x.dim() >= 2 else 0


class _PatchState:
    """What patch_model_with_int8_kv_cache keeps on the model to make caches and to undo itself."""

    def __init__(self, model, kv_type, max_cache_len, cache_kwargs, previous_attn):
        self.model = model
        self.kv_type = kv_type
        self.max_cache_len = max_cache_len
        self.cache_kwargs = cache_kwargs
        self.previous_attn = previous_attn
        self.originals: list = []  # (module, had its own instance attribute "forward"/"generate", name, original)

    def new_cache(self, tokens: int, default_len: int) -> "KVQCache":
        n = self.max_cache_len or max(default_len, tokens + 8)
        return KVQCache(self.model.config, kv_type=self.kv_type, max_cache_len=n, **self.cache_kwargs)

    def forward_default_len(self, tokens: int) -> int:
        """Tokens per sequence of a cache made for a forward call without one: the call cannot say how long the
        caller's loop will run, so the model's context (max_position_embeddings; on the CPU the arena's memory is
        committed only as pages are used), at most 32768 on CUDA, where the arena is allocated up front."""
        tc = _text_config(self.model.config)
        ctx = int(getattr(tc, "max_position_embeddings", 0) or 4096)
        p = next(self.model.parameters(), None)
        if p is not None and p.device.type == "cuda":
            ctx = min(ctx, 32768)
        return max(ctx, tokens + 8)


def _wrap_forward(state: _PatchState, module) -> None:
    original = module.forward  # bound method (or an instance attribute someone else set)
    name = _cache_kwarg_of(original)
    try:
        params = list(inspect.signature(original).parameters)
    except (TypeError, ValueError):
        params = []
    pos = params.index(name) if name in params else None
    what = f"{type(module).__name__}.forward"
    config = state.model.config

    @functools.wraps(original)
    def forward(*args, **kwargs):
        cache, args = _take_cache(args, kwargs, pos, what)
        if cache is None:
            use_cache = kwargs.get("use_cache")
            if use_cache is None:
                use_cache = getattr(_text_config(config), "use_cache", True)
            # training with gradients: kvq's attention has no backward, so no cache is made (the call runs the
            # fallback attention, as transformers' own cache would be of no use there either)
            if use_cache and not (module.training and torch.is_grad_enabled()):
                n = _length_of(args, kwargs)
                cache = state.new_cache(n, state.forward_default_len(n))
        elif not isinstance(cache, KVQCache):
            _refuse(cache, what)
        if cache is not None:
            if pos is not None and len(args) > pos:
                args = args[:pos] + (cache,) + args[pos + 1:]
            else:
                kwargs[name] = cache
        return original(*args, **kwargs)

    state.originals.append((module, "forward" in module.__dict__, "forward", module.__dict__.get("forward")))
    module.forward = forward


def _wrap_generate(state: _PatchState, model) -> None:
    original = model.generate
    what = f"{type(model).__name__}.generate"

    @functools.wraps(original)
    def generate(*args, **kwargs):
        cache, args = _take_cache(args, kwargs, None, what)
        if cache is None and kwargs.get("use_cache", True) is not False:
            if kwargs.get("cache_implementation") is not None:
                raise TypeError(f"kvq: {what}: cache_implementation={kwargs['cache_implementation']!r} asks for "
                                "transformers' own cache, but this model was patched by patch_model_with_int8_kv_cache "
                                "(kvq's caches); call kvq.unpatch_model(model) first")
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs.get("inputs_embeds")
            prompt = ids.shape[1] if ids is not None and hasattr(ids, "shape") and ids.dim() >= 2 else 0
            gc = kwargs.get("generation_config") or model.generation_config
            new = kwargs.get("max_new_tokens") or getattr(gc, "max_new_tokens", None)
            if new is None:
                max_len = kwargs.get("max_length") or getattr(gc, "max_length", None) or 4096
                new = max(0, max_len - prompt)
            cache = state.new_cache(prompt, prompt + new + 8)
        elif cache is not None and not isinstance(cache, KVQCache):
            _refuse(cache, what)
        if cache is not None:
            kwargs[CACHE_KWARG] = cache
        return original(*args, **kwargs)

    state.originals.append((model, "generate" in model.__dict__, "generate", model.__dict__.get("generate")))
    model.generate = generate


def patch_model_with_int8_kv_cache(model: Any, kv_type: KVTypeSpec | None = None, max_cache_len: int | None = None,
                                   **cache_kwargs: Any) -> Any:
    """Make `model` keep its KV cache in kvq (int8 by default) and run attention on the quantized pages, whatever
    calls it.

    Same call as icw-kv-quant's: `patch_model_with_int8_kv_cache(model)`, in place (the model is also returned).
    Afterwards the model's attention implementation is "kvq", and every call that uses a cache stores its K/V in
    kvq pages:
      * `model.generate(...)` makes a KVQCache(kv_type) sized to prompt + max_new_tokens;
      * `model(...)` / `model.forward(...)` (the model and its base model, e.g. model.model) with use_cache on (the
        config's default) and no cache make a KVQCache (returned as the output's cache, to pass to the next call: a
        hand-written decode loop); it holds max_cache_len tokens per sequence, by default the model's
        max_position_embeddings (at most 32768 on CUDA);
      * a KVQCache passed in is used as is, as `cache=` or `past_key_values=` on any supported transformers version
        (translated to the name the installed version takes, so neither warns);
      * any other cache passed in (DynamicCache, QuantizedCache, StaticCache, ...) is refused with a TypeError: it
        would silently keep fp K/V in torch tensors;
      * in training mode with gradients on, no cache is made (kvq's attention has no backward).
    cache_kwargs go to every KVQCache the patch makes (residual=, qnorm=, plan=FILE for per-layer types from
    kvq.calibrate / `kvq calibrate -o`, ...).
    Everything is checked (head dim, dtype, device, types, cache arguments) before anything is changed.
    kvq.unpatch_model(model) undoes it.
    """
    if getattr(model, "_is_kv_quant_patched", False):
        return model
    if isinstance(cache_kwargs.get("plan"), (str, os.PathLike)):  # read once, not at every cache the patch makes
        cache_kwargs["plan"] = Plan.load(cache_kwargs["plan"])
    _check_model(model, kv_type)
    # the cache's own arguments are checked now too (a KVQCache allocates nothing before its first update), so that
    # a bad keyword fails here rather than inside generate()
    KVQCache(model.config, kv_type=kv_type, max_cache_len=4096 if max_cache_len is None else max_cache_len,
             **cache_kwargs)
    register_attention()
    state = _PatchState(model, kv_type, max_cache_len, dict(cache_kwargs), model.config._attn_implementation)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    _wrap_generate(state, model)
    modules = [model]
    base = getattr(model, "base_model", model)
    if base is not model and isinstance(base, torch.nn.Module):
        modules.append(base)
    for m in modules:
        _wrap_forward(state, m)
    model._kvq_patch = state
    model._is_kv_quant_patched = True
    return model


def unpatch_model(model: Any) -> Any:
    """Undo patch_model_with_int8_kv_cache."""
    if not getattr(model, "_is_kv_quant_patched", False):
        return model
    state = model._kvq_patch
    model.set_attn_implementation(state.previous_attn)
    for module, had, name, before in reversed(state.originals):
        if had:
            setattr(module, name, before)
        else:
            delattr(module, name)
    del model._kvq_patch
    model._is_kv_quant_patched = False
    return model


__all__ = ["KVQCache", "CUDAGraphDecode", "patch_model_with_int8_kv_cache", "unpatch_model", "register_attention",
           "kvq_attention_forward", "ATTN_IMPLEMENTATION", "CACHE_KWARG", "output_cache"]

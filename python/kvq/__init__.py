"""kvq: a quantized, paged KV cache (F16/BF16/Q8/FP8/Q4/Q2) with attention computed on the quantized bytes.

Low-level bindings (numpy, no torch needed): kvq.Cache, kvq.CudaCache, kvq.KvqError, ...
HF transformers integration (needs torch + transformers): kvq.KVQCache, kvq.patch_model_with_int8_kv_cache,
kvq.register_attention (attn_implementation="kvq").
"""
from ._native import (  # noqa: F401
    CUDA_LIBRARY_PATH, HEAD_DIMS, LIBRARY_PATH, Cache, CacheFullError, CudaCache, KvqError, arena_bytes_for,
    bytes_per_token, cpu_backend, cuda_available, page_layout, type_from_name, type_name, version,
)

__version__ = "0.1.0"

_HF_NAMES = ("KVQCache", "patch_model_with_int8_kv_cache", "unpatch_model", "register_attention",
             "kvq_attention_forward", "ATTN_IMPLEMENTATION")


def _load_hf():
    """Import the transformers integration (registers attn_implementation="kvq") when torch and transformers are
    installed; numpy-only installs skip it."""
    import importlib.util
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        return None
    from . import hf
    return hf


_hf = _load_hf()


def __getattr__(name):  # the transformers part is imported on first use, so that numpy-only users never need torch
    if name in _HF_NAMES:
        from . import hf
        return getattr(hf, name)
    raise AttributeError(f"module 'kvq' has no attribute {name!r}")


__all__ = ["Cache", "CudaCache", "KvqError", "CacheFullError", "cuda_available", "version", "cpu_backend",
           "type_from_name", "bytes_per_token", *_HF_NAMES]

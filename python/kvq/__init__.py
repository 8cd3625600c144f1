"""kvq: a quantized, paged KV cache (F16/BF16/Q8/FP8/Q4/Q2) with attention computed on the quantized bytes.

Low-level bindings (numpy, no torch needed): kvq.Cache, kvq.CudaCache, kvq.KvqError, ...
HF transformers integration (needs torch + transformers: pip install kvq[hf]): kvq.KVQCache,
kvq.patch_model_with_int8_kv_cache, kvq.register_attention (attn_implementation="kvq"), kvq.calibrate (per-layer
KV types for a bit budget). Per-layer plans (no torch needed): kvq.Plan, kvq.load_plan (docs/kv-plan.md).
"""
from __future__ import annotations

from typing import Any, Optional

from ._native import (  # noqa: F401
    CUDA_LIBRARY_PATH, HEAD_DIMS, LIBRARY_PATH, Cache, CacheClosedError, CacheFullError, CudaCache, KvqError,
    arena_bytes_for, bytes_per_token, cpu_backend, cuda_available, key_subspace, page_layout, type_from_name, type_name,
    version,
)
from .plan import Plan, PlanError, load_plan  # noqa: F401

__version__ = "0.1.0"

_HF_NAMES = ("KVQCache", "patch_model_with_int8_kv_cache", "unpatch_model", "register_attention",
             "kvq_attention_forward", "ATTN_IMPLEMENTATION", "CACHE_KWARG", "output_cache", "calibrate")

HF_INSTALL_HINT = "pip install kvq[hf]  (torch and transformers >= 5.17, < 6)"

# Why the transformers integration could not be imported when kvq was ("" when it was, or was not tried because
# torch / transformers are not installed).
_hf_error: Optional[BaseException] = None


def _load_hf():
    """Import the transformers integration (registers attn_implementation="kvq") when torch and transformers are
    installed; numpy-only installs skip it. A torch that is installed but cannot be imported (missing shared
    libraries, ...) must not break `import kvq`: the error is kept and raised when an HF name is used."""
    global _hf_error
    import importlib.util
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        return None
    try:
        from . import hf
    except Exception as e:  # noqa: BLE001 - reported on first use of an HF name
        _hf_error = e
        return None
    return hf


_hf = _load_hf()


def __getattr__(name: str) -> Any:  # the transformers part is imported on first use: numpy-only users never need torch
    if name in _HF_NAMES:
        try:
            from . import hf
        except ImportError as e:
            msg = str(e) if "kvq[hf]" in str(e) else f"it needs torch and transformers ({e}): {HF_INSTALL_HINT}"
            raise ImportError(f"kvq.{name} is unavailable: {msg}") from e
        except Exception as e:  # noqa: BLE001 - e.g. a torch whose shared libraries are missing
            raise ImportError(f"kvq.{name}: the transformers integration failed to import: "
                              f"{type(e).__name__}: {e}") from e
        if name == "calibrate":
            from ._calibrate import calibrate
            return calibrate
        return getattr(hf, name)
    raise AttributeError(f"module 'kvq' has no attribute {name!r}")


__all__ = ["Cache", "CudaCache", "KvqError", "CacheFullError", "CacheClosedError", "cuda_available", "version",
           "cpu_backend", "type_from_name", "type_name", "bytes_per_token", "page_layout", "arena_bytes_for",
           "key_subspace", "HEAD_DIMS", "Plan", "PlanError", "load_plan", *_HF_NAMES]

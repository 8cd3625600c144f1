"""The tensors a transformers cache holds, for counting its bytes (bench_hf.py, bench_hf_quality.py)."""
from __future__ import annotations

import torch

# Attributes of a cache layer that hold K/V data: DynamicCache (keys, values), QuantizedCache (_quantized_*),
# the icw-kv-quant method of bench_hf.py (kq, ks, vq, vs).
LAYER_ATTRS = ("keys", "values", "kq", "ks", "vq", "vs", "_quantized_keys", "_quantized_values")


def unique_tensors(obj, seen: set | None = None):
    """Yield each plain tensor reachable from obj once: tensors, tensor subclasses (quanto's) through their inner
    tensors, lists, tuples, dicts (HQQ's meta); a storage already seen (same device, pointer) is skipped."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            for n in names:
                yield from unique_tensors(getattr(obj, n), seen)
            return
        if obj.numel() == 0:
            return
        key = (obj.device, obj.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from unique_tensors(x, seen)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from unique_tensors(x, seen)


def cache_tensors(cache):
    """Every K/V tensor of a transformers cache's layers, each storage once."""
    seen: set = set()
    for layer in cache.layers:
        for attr in LAYER_ATTRS:
            yield from unique_tensors(getattr(layer, attr, None), seen)

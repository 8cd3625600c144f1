"""ctypes bindings over libkvq (include/kvq.h) and, when it was built, the CUDA backend (include/kvq_cuda.h).

Nothing here needs torch: arrays are numpy arrays or raw addresses (ints). The kernels all live in C/CUDA; this module
only marshals arguments and turns negative kvq_status codes into KvqError with the library's own message.

Every public function and method checks its arguments before any C call (issue 17): integers must be ints (numpy
integers too; not floats, not bools) that fit the C parameter (int32, int64, size_t, a pointer), else TypeError /
OverflowError; numpy arrays must have the shape the cache and the other arguments imply and a supported dtype, else
ValueError / TypeError, so that no C call reads or writes past a buffer that Python allocated. Checks of the cache's
own state (does the sequence exist, is the layer in range, is there room) stay in C, which reports them as KvqError
and leaves the cache exactly as it was. The *_ptr methods take raw addresses: their buffers are the caller's
responsibility (sizes are in each docstring).
"""
from __future__ import annotations

import ctypes as C
import glob
import math
import operator
import os
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

# kvq_type / kvq_dtype / kvq_status values (kvq.h; append-only enums).
TYPE_F16, TYPE_BF16, TYPE_Q8, TYPE_FP8, TYPE_Q4, TYPE_Q2, TYPE_Q3 = 0, 1, 2, 3, 4, 5, 6
DTYPE_F32, DTYPE_F16, DTYPE_BF16 = 0, 1, 2
HEAD_DIMS = (64, 80, 96, 128, 256)
CUDA_HEAD_DIMS = (64, 128, 256)
# kvq.h role sets (rotate, nonuniform, qnorm)
ROLES_NONE, ROLES_K, ROLES_V, ROLES_KV = 0, 1, 2, 3

STATUS_NAMES = {
    -1: "KVQ_ERR_NULL", -2: "KVQ_ERR_INVALID_ARG", -3: "KVQ_ERR_UNSUPPORTED_TYPE", -4: "KVQ_ERR_UNSUPPORTED_HEAD_DIM",
    -5: "KVQ_ERR_SHAPE", -6: "KVQ_ERR_NO_SEQ", -7: "KVQ_ERR_CACHE_FULL", -8: "KVQ_ERR_TOO_MANY_SEQS",
    -9: "KVQ_ERR_NONFINITE", -10: "KVQ_ERR_OUT_OF_MEMORY", -11: "KVQ_ERR_RANGE", -12: "KVQ_ERR_CUDA",
    -13: "KVQ_ERR_NO_DEVICE", -14: "KVQ_ERR_IO", -15: "KVQ_ERR_FORMAT", -16: "KVQ_ERR_TRUNCATED",
    -17: "KVQ_ERR_INTERNAL",
}

# Ranges of the C parameter types, for the checks before every call (ctypes would truncate silently).
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
SIZE_MAX = 2**(8 * C.sizeof(C.c_size_t)) - 1
PTR_MAX = 2**(8 * C.sizeof(C.c_void_p)) - 1
FLOAT32_MAX = 3.4028234663852886e38

TypeSpec = Union[str, int]


class KvqError(RuntimeError):
    """A kvq call returned a negative kvq_status. `.status` is the code, the message is kvq's own."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.name = STATUS_NAMES.get(status, str(status))
        super().__init__(f"{message} ({self.name})")


class CacheFullError(KvqError, MemoryError):
    pass


class CacheClosedError(KvqError, ValueError):
    """A method of a Cache / CudaCache that was closed (close(), or the end of its `with` block)."""

    def __init__(self, what: str):
        super().__init__(-1, f"kvq: this {what} is closed (close() or the end of its with block); create a new one")


# ----------------------------------------------------------------------------------------------------------------
# argument checks (all before any C call)
# ----------------------------------------------------------------------------------------------------------------
def _int(x: Any, name: str, lo: int = INT32_MIN, hi: int = INT32_MAX, ctype: str = "int32") -> int:
    """x as a Python int if it is an integer (int, numpy integer, anything with __index__ but bool) in [lo, hi]."""
    if type(x) is not int:
        if isinstance(x, (bool, np.bool_)) or not hasattr(type(x), "__index__"):
            raise TypeError(f"kvq: {name} must be an int, got {type(x).__name__} {x!r}")
        x = operator.index(x)
    if x < lo or x > hi:
        raise OverflowError(f"kvq: {name} = {x} does not fit {ctype} ({lo} .. {hi})")
    return x


def _i64(x: Any, name: str) -> int:
    return _int(x, name, INT64_MIN, INT64_MAX, "int64")


def _nonneg(x: Any, name: str, hi: int = INT32_MAX, ctype: str = "int32") -> int:
    x = _int(x, name, INT64_MIN if hi > INT32_MAX else INT32_MIN, hi, ctype)
    if x < 0:
        raise ValueError(f"kvq: {name} = {x} is negative")
    return x


def _size(x: Any, name: str) -> int:
    return _int(x, name, 0, SIZE_MAX, "size_t")


def _addr(x: Any, name: str) -> Optional[int]:
    """A raw address (int) or None / 0 for NULL -> value for a c_void_p argument."""
    if x is None:
        return None
    return _int(x, name, 0, PTR_MAX, "a pointer") or None


def _real(x: Any, name: str) -> float:
    """A finite float32 >= 0 (attention scale / softcap); None means 0 (the default)."""
    if x is None:
        return 0.0
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"kvq: {name} must be a number, got {type(x).__name__} {x!r}")
    f = float(x)
    if not math.isfinite(f) or f < 0:
        raise ValueError(f"kvq: {name} = {x} must be finite and >= 0")
    if f > FLOAT32_MAX:
        raise OverflowError(f"kvq: {name} = {x} does not fit a float32")
    return f


def _dtype_code(x: Any) -> int:
    d = _int(x, "dtype")
    if d not in (DTYPE_F32, DTYPE_F16, DTYPE_BF16):
        raise ValueError(f"kvq: dtype {d} is not a kvq_dtype (DTYPE_F32 = 0, DTYPE_F16 = 1, DTYPE_BF16 = 2)")
    return d


def _stats_dict(s) -> dict:
    return {name: getattr(s, name) for name, _ in s._fields_}


class CacheConfig(C.Structure):
    _fields_ = [("n_layers", C.c_int), ("n_kv_heads", C.c_int), ("head_dim", C.c_int), ("type_k", C.c_int),
                ("type_v", C.c_int), ("arena_bytes", C.c_size_t), ("page_tokens", C.c_int), ("group", C.c_int),
                ("residual", C.c_int), ("max_seqs", C.c_int), ("n_threads", C.c_int), ("rotate", C.c_int),
                ("rotation_seed", C.c_uint32), ("sinks", C.c_int), ("nonuniform", C.c_int), ("prerope", C.c_int),
                ("rope_neox", C.c_int), ("rope_theta", C.c_float), ("rope_freqs", C.POINTER(C.c_float)),
                ("squat_rank", C.c_int), ("squat_lambda", C.c_float),
                ("rotation_layers", C.POINTER(C.c_int32)),  # NULL: the cache's layer indices seed the signs
                ("qnorm", C.c_int), ("outliers", C.c_int), ("params8", C.c_int), ("window8", C.c_int)]


class PageLayout(C.Structure):
    _fields_ = [("page_tokens", C.c_int), ("head_dim", C.c_int), ("n_kv_heads", C.c_int), ("group", C.c_int),
                ("value_group", C.c_int), ("type_k", C.c_int), ("type_v", C.c_int), ("k_row_bytes", C.c_size_t),
                ("v_row_bytes", C.c_size_t), ("k_block_bytes", C.c_size_t), ("v_block_bytes", C.c_size_t),
                ("k_offset", C.c_size_t), ("v_offset", C.c_size_t), ("page_bytes", C.c_size_t),
                ("nonuniform", C.c_int), ("outliers", C.c_int), ("params8", C.c_int)]


class CacheStats(C.Structure):
    _fields_ = [("pages_total", C.c_int64), ("pages_free", C.c_int64), ("pages_shared", C.c_int64),
                ("page_bytes", C.c_size_t), ("arena_bytes", C.c_size_t), ("page_bytes_in_use", C.c_size_t),
                ("window_bytes", C.c_size_t), ("n_seqs", C.c_int), ("tokens", C.c_int64),
                ("bytes_per_token", C.c_double), ("f16_bytes_per_token", C.c_double),
                ("capacity_tokens", C.c_int64)]


class AttnParams(C.Structure):
    _fields_ = [("n_q_heads", C.c_int), ("scale", C.c_float), ("window", C.c_int), ("softcap", C.c_float)]


class TypeTraits(C.Structure):
    _fields_ = [("name", C.c_char_p), ("bits", C.c_int), ("grouped", C.c_int), ("implemented", C.c_int)]


class CudaStats(C.Structure):
    _fields_ = [("pages_total", C.c_int64), ("pages_free", C.c_int64), ("page_bytes", C.c_size_t),
                ("arena_bytes", C.c_size_t), ("window_bytes", C.c_size_t), ("table_bytes", C.c_size_t),
                ("workspace_bytes", C.c_size_t), ("n_seqs", C.c_int), ("pages_shared", C.c_int64)]


# ----------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------
_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))


def _candidates(env: str, names: list[str]) -> list[str]:
    out = []
    if os.environ.get(env):
        return [os.environ[env]]
    for n in names:
        out += sorted(glob.glob(os.path.join(_HERE, "_lib", n)))
    for b in ("build-py", "build"):  # a source checkout, for development
        for n in names:
            out += sorted(glob.glob(os.path.join(_REPO, b, "**", n), recursive=True))
    return out


def _load(env: str, names: list[str], what: str, required: bool):
    """(CDLL, path, why): why says what was tried when nothing loaded."""
    errors = []
    for path in _candidates(env, names):
        try:
            return C.CDLL(path), path, ""
        except OSError as e:  # pragma: no cover - depends on the machine
            errors.append(f"{path}: {e}")
    if required:
        raise ImportError(f"kvq: cannot load {what} (set {env} to its path, or `pip install .` the repository)"
                          + ("; tried: " + "; ".join(errors) if errors else ""))
    if os.environ.get(env):
        return None, None, f"{env}={os.environ[env]} cannot be loaded ({'; '.join(errors)})"
    if errors:
        return None, None, f"{what} was found but cannot be loaded ({'; '.join(errors)})"
    return None, None, ""


_lib, LIBRARY_PATH, _ = _load("KVQ_LIBRARY", ["libkvq.so.0", "libkvq.so.*.*.*", "libkvq.so", "libkvq.dylib"], "libkvq",
                              True)

_P = C.c_void_p
_I32P = C.POINTER(C.c_int32)


def _proto(lib, name, res, *args):
    f = getattr(lib, name)
    f.restype = res
    f.argtypes = list(args)
    return f


for _n, _r, _a in [
    ("kvq_version_number", C.c_uint, []), ("kvq_version_string", C.c_char_p, []),
    ("kvq_strerror", C.c_char_p, [C.c_int]), ("kvq_last_error", C.c_char_p, []),
    ("kvq_type_get_traits", C.POINTER(TypeTraits), [C.c_int]),
    ("kvq_type_from_name", C.c_int, [C.c_char_p, C.POINTER(C.c_int)]),
    ("kvq_type_bytes_per_token", C.c_double, [C.c_int, C.c_int, C.c_int, C.c_int]),
    ("kvq_page_layout_make", C.c_int, [C.c_int, C.c_int, C.c_int, C.c_int, C.c_int, C.c_int, C.POINTER(PageLayout)]),
    ("kvq_cache_config_default", CacheConfig, []),
    ("kvq_cache_capacity_tokens", C.c_int64, [C.POINTER(CacheConfig)]),
    ("kvq_cache_arena_bytes_for", C.c_size_t, [C.POINTER(CacheConfig), C.c_int64]),
    ("kvq_cache_config_layout", C.c_int, [C.POINTER(CacheConfig), C.POINTER(PageLayout)]),
    ("kvq_cache_create", C.c_int, [C.POINTER(CacheConfig), C.POINTER(_P)]),
    ("kvq_cache_free", None, [_P]),
    ("kvq_cache_get_config", C.c_int, [_P, C.POINTER(CacheConfig), C.POINTER(PageLayout)]),
    ("kvq_cache_get_stats", C.c_int, [_P, C.POINTER(CacheStats)]),
    ("kvq_seq_new", C.c_int, [_P, _I32P]),
    ("kvq_seq_fork", C.c_int, [_P, C.c_int32, _I32P]),
    ("kvq_seq_truncate", C.c_int, [_P, C.c_int32, C.c_int64]),
    ("kvq_seq_free", C.c_int, [_P, C.c_int32]),
    ("kvq_seq_length", C.c_int, [_P, C.c_int32, C.c_int, C.POINTER(C.c_int64)]),
    ("kvq_seq_set_key_subspace", C.c_int, [_P, C.c_int32, C.c_int, C.c_int, _P]),
    ("kvq_seq_get_key_subspace", C.c_int, [_P, C.c_int32, C.c_int, C.c_int, _P, C.POINTER(C.c_int)]),
    ("kvq_append", C.c_int, [_P, C.c_int, C.c_int, _I32P, _I32P, C.c_int, _P, _P]),
    ("kvq_read", C.c_int, [_P, C.c_int32, C.c_int, C.c_int64, C.c_int64, _P, _P]),
    ("kvq_rope_apply", C.c_int, [_P, C.c_int64, C.c_int64, C.c_int, _P]),
    ("kvq_attn_decode", C.c_int, [_P, C.c_int, C.c_int, _I32P, _P, _P, C.POINTER(AttnParams)]),
    ("kvq_attn_prefill", C.c_int, [_P, C.c_int, C.c_int32, C.c_int, _P, _P, C.POINTER(AttnParams)]),
    ("kvq_attn_prefill_exact", C.c_int, [_P, C.c_int, C.c_int32, C.c_int, _P, C.c_int, _P, _P, _P,
                                         C.POINTER(AttnParams)]),
    ("kvq_cpu_backend", C.c_char_p, []),
]:
    _proto(_lib, _n, _r, *_a)


def _check(status: int, lib_err=None) -> None:
    if status < 0:
        msg = (lib_err or _lib.kvq_last_error)().decode(errors="replace")
        if not msg:
            msg = _lib.kvq_strerror(status).decode()
        if status == -7:
            raise CacheFullError(status, msg)
        raise KvqError(status, msg)


def version() -> str:
    """libkvq's version, "major.minor.patch"."""
    return _lib.kvq_version_string().decode()


def cpu_backend() -> str:
    """The CPU attention kernels that run: "avx512", "avx2" or "scalar" (kvq_cpu_backend)."""
    return _lib.kvq_cpu_backend().decode()


_TYPE_COUNT = 7  # KVQ_TYPE_COUNT


def type_from_name(name: TypeSpec) -> int:
    """kvq_type code of a name ("f16", "bf16", "q8", "fp8", "q4", "q3", "q2"; case-insensitive) or of a code (checked)."""
    if isinstance(name, (bool, np.bool_)):
        raise TypeError(f"kvq: a kv type is a name or a kvq_type code, got {name!r}")
    if isinstance(name, (int, np.integer)):
        t = int(name)
        if not 0 <= t < _TYPE_COUNT:
            raise ValueError(f"kvq: unknown kv type {t}: use one of f16, bf16, q8, fp8, q4, q2, q3 (0 .. 6)")
        tr = kvq_type_traits(t)
        if tr is None or not tr["implemented"]:
            raise ValueError(f"kvq: kv type {t} is not implemented")
        return t
    if not isinstance(name, str):
        raise TypeError(f"kvq: a kv type is a name (str) or a kvq_type code (int), got {type(name).__name__}")
    out = C.c_int()
    try:
        raw = name.encode()
    except UnicodeEncodeError:
        raw = b"?"
    if b"\0" in raw or _lib.kvq_type_from_name(raw, C.byref(out)) < 0:
        raise ValueError(f"kvq: unknown kv type {name!r}: use one of f16, bf16, q8, fp8, q4, q3, q2")
    tr = kvq_type_traits(out.value)
    if tr is None or not tr["implemented"]:
        raise ValueError(f"kvq: kv type {name!r} is not implemented")
    return out.value


def kvq_type_traits(t: int) -> Optional[dict]:
    """{"name", "bits", "grouped", "implemented"} of a kvq_type code; None when the code is outside the enum."""
    t = _int(t, "kv type")
    p = _lib.kvq_type_get_traits(t)
    if not p:
        return None
    return {"name": p.contents.name.decode(), "bits": p.contents.bits, "grouped": p.contents.grouped,
            "implemented": p.contents.implemented}


def type_name(t: int) -> str:
    """Name of a kvq_type code ("q4")."""
    tr = kvq_type_traits(t)
    if tr is None:
        raise ValueError(f"kvq: unknown kv type {t}")
    return tr["name"]


def bytes_per_token(kv_type: TypeSpec, role: int, head_dim: int, group: int = 0) -> float:
    """Page bytes of one token of one head (role 0: keys, 1: values), amortized over a page
    (kvq_type_bytes_per_token)."""
    t = type_from_name(kv_type)
    role = _int(role, "role")
    if role not in (0, 1):
        raise ValueError(f"kvq: role {role} is neither 0 (keys) nor 1 (values)")
    head_dim, group = _int(head_dim, "head_dim"), _int(group, "group")
    r = _lib.kvq_type_bytes_per_token(t, role, head_dim, group)
    if r <= 0:
        raise ValueError(f"kvq: bytes_per_token: head_dim {head_dim} with group {group} is not valid for "
                         f"{type_name(t)} (head dims {HEAD_DIMS}, groups 0, 16, 32, 64, 128)")
    return r


def page_layout(type_k: TypeSpec, type_v: TypeSpec, n_kv_heads: int, head_dim: int, page_tokens: int = 64,
                group: int = 0) -> PageLayout:
    """The page layout (kvq.h section 5) of a configuration; KvqError when it is invalid."""
    tk, tv = type_from_name(type_k), type_from_name(type_v)
    args = [_int(x, n) for x, n in ((n_kv_heads, "n_kv_heads"), (head_dim, "head_dim"), (page_tokens, "page_tokens"),
                                    (group, "group"))]
    lay = PageLayout()
    _check(_lib.kvq_page_layout_make(tk, tv, *args, C.byref(lay)))
    return lay


_IDS_MEMO: dict = {}


def _ids(vals: Any, name: str = "seq_ids", nonneg: bool = False):
    """(n, int32 pointer, tuple) for a list / tuple / 1-D integer array of int32 values, checked. Memoized: the same
    few lists (sequence ids, [1] * batch) come back at every layer of every decode step, and building them anew cost
    ~6 us each, a visible part of a step's host time at batch 1. The arrays are only read by the C calls."""
    if isinstance(vals, np.ndarray):
        if vals.ndim != 1:
            raise ValueError(f"kvq: {name} must be 1-D, got shape {vals.shape}")
        if vals.dtype.kind not in "iu":
            raise TypeError(f"kvq: {name} must hold integers, got dtype {vals.dtype}")
        key = tuple(vals.tolist())
    elif isinstance(vals, (list, tuple, range)):
        key = tuple(vals)
    elif isinstance(vals, (str, bytes, dict, set)) or not hasattr(vals, "__iter__"):
        raise TypeError(f"kvq: {name} must be a list of ints, got {type(vals).__name__}")
    else:
        key = tuple(vals)
    if not all(type(x) is int for x in key):
        key = tuple(_int(x, f"{name}[{i}]") for i, x in enumerate(key))
    r = _IDS_MEMO.get((key, nonneg))
    if r is None:
        for i, x in enumerate(key):
            if x < INT32_MIN or x > INT32_MAX:
                raise OverflowError(f"kvq: {name}[{i}] = {x} does not fit int32")
            if nonneg and x < 0:
                raise ValueError(f"kvq: {name}[{i}] = {x} is negative")
        if len(key) > INT32_MAX:
            raise OverflowError(f"kvq: {len(key)} entries in {name} do not fit int32")
        if len(_IDS_MEMO) > 256:
            _IDS_MEMO.clear()
        a = (C.c_int32 * max(1, len(key)))(*key)
        r = _IDS_MEMO[(key, nonneg)] = (len(key), C.cast(a, _I32P), key, a)
    return r[0], r[1], r[2]


_NP_DTYPES = {np.dtype(np.float32): DTYPE_F32, np.dtype(np.float16): DTYPE_F16}


def make_config(n_layers: int, n_kv_heads: int, head_dim: int, type_k: TypeSpec = "f16",
                type_v: Optional[TypeSpec] = None, arena_bytes: int = 0, page_tokens: int = 0, group: int = 0,
                residual: int = -1, max_seqs: int = 0, n_threads: int = 0, rotate: int = -1, rotation_seed: int = 0,
                sinks: int = -1, nonuniform: int = -1, prerope: int = 0, rope_neox: int = 0, rope_theta: float = 0.0,
                rope_freqs=None, squat_rank: int = 0, squat_lambda: float = 0.0,
                rotation_layers=None, qnorm: int = -1, outliers: int = -1, params8: int = -1,
                window8: int = -1) -> CacheConfig:
    """A kvq_cache_config with every field checked against its C type (the values themselves: kvq_cache_create).
    rotate, sinks, nonuniform: kvq.h section 10 (-1: the default for the types; 0: off). prerope (0/1), rope_neox,
    rope_theta, rope_freqs (None or head_dim / 2 inverse frequencies): pre-RoPE keys, kvq.h section 10; the
    config keeps a float32 copy of rope_freqs alive (kvq_cache_create copies it). squat_rank (0 off, 1..32, < head_dim;
    grouped key types only), squat_lambda (<= 0: auto): SQuat keys, kvq.h section 10; the subspace itself is set per
    sequence with Cache.set_key_subspace. rotation_layers: None, or n_layers numbers >= 0 that seed each layer's
    rotation signs in place of its index (a model's layer numbers when its layers are split over several caches, so
    that each layer holds the same bytes however they are grouped); kept alive by the config like rope_freqs.
    qnorm: Q-Norm of the grouped roles (kvq.h section 10, "Q-Norm"): a role set, -1 the library's default (none), 0
    none. outliers: dense-and-sparse outliers of the grouped roles (kvq.h section 10, "Outliers"): a role set, -1 the
    library's default (none), 0 none; CPU caches only. params8: 8-bit group parameters of the grouped roles (kvq.h
    sections 5 and 10): a role set, -1 the library's default (fp16 pairs), 0 none; CPU caches only. window8: 8-bit
    residual windows (kvq.h section 10, "8-bit window"): a role set, -1 the library's default (fp16), 0 none; CPU
    caches only."""
    vals = {n: _int(x, n) for n, x in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim),
                                        ("page_tokens", page_tokens), ("group", group), ("residual", residual),
                                        ("max_seqs", max_seqs), ("n_threads", n_threads), ("rotate", rotate),
                                        ("sinks", sinks), ("nonuniform", nonuniform), ("prerope", prerope),
                                        ("rope_neox", rope_neox), ("squat_rank", squat_rank), ("qnorm", qnorm),
                                        ("outliers", outliers), ("params8", params8), ("window8", window8))}
    if isinstance(squat_lambda, bool) or not isinstance(squat_lambda, (int, float, np.integer, np.floating)) or \
            not np.isfinite(float(squat_lambda)):
        raise ValueError(f"kvq: squat_lambda must be a finite number (<= 0: auto), not {squat_lambda!r}")
    if not isinstance(rotation_seed, (int, np.integer)) or isinstance(rotation_seed, bool) or \
            not 0 <= int(rotation_seed) <= 0xFFFFFFFF:
        raise ValueError(f"kvq: rotation_seed must be an integer in 0..2**32-1, not {rotation_seed!r}")
    vals["rotation_seed"] = int(rotation_seed)
    tk = type_from_name(type_k)
    tv = type_from_name(type_v if type_v is not None else type_k)
    ab = _size(arena_bytes, "arena_bytes")
    cfg = _lib.kvq_cache_config_default()
    for n, x in vals.items():
        setattr(cfg, n, x)
    cfg.type_k, cfg.type_v, cfg.arena_bytes = tk, tv, ab
    cfg.rope_theta = float(rope_theta)
    cfg.squat_lambda = float(squat_lambda)
    if rope_freqs is not None:
        f = np.ascontiguousarray(np.asarray(rope_freqs, dtype=np.float32).reshape(-1))
        if f.size != vals["head_dim"] // 2:
            raise ValueError(f"kvq: rope_freqs has {f.size} values, head_dim / 2 = {vals['head_dim'] // 2} expected")
        cfg._rope_freqs_keep = f  # borrowed by kvq_cache_create, which copies it
        cfg.rope_freqs = f.ctypes.data_as(C.POINTER(C.c_float))
    if rotation_layers is not None:
        r = [_int(x, "rotation_layers[]", 0) for x in rotation_layers]
        if len(r) != vals["n_layers"]:
            raise ValueError(f"kvq: rotation_layers has {len(r)} numbers, n_layers = {vals['n_layers']} expected")
        a = np.ascontiguousarray(np.asarray(r, dtype=np.int32))
        cfg._rotation_layers_keep = a  # borrowed by kvq_cache_create / kvq_cuda_cache_create, which copy it
        cfg.rotation_layers = a.ctypes.data_as(C.POINTER(C.c_int32))
    return cfg


def key_subspace(queries, rank: int):
    """SQuat (kvq.h section 10): the top-`rank` right singular vectors of the query rows ([n][head_dim] or
    [..][head_dim]) as a [head_dim][rank] float32 matrix with orthonormal columns."""
    q = np.asarray(queries, dtype=np.float64)
    q = q.reshape(-1, q.shape[-1])
    rank = _int(rank, "rank")
    if not 1 <= rank < q.shape[1]:
        raise ValueError(f"kvq: rank {rank} outside 1..{q.shape[1] - 1}")
    if not np.all(np.isfinite(q)):
        raise ValueError("kvq: queries must be finite")
    w, v = np.linalg.eigh(q.T @ q)
    return np.ascontiguousarray(v[:, ::-1][:, :rank], dtype=np.float32)


def arena_bytes_for(n_layers: int, n_kv_heads: int, head_dim: int, type_k: TypeSpec,
                    type_v: Optional[TypeSpec] = None, tokens_per_seq: int = 4096, n_seqs: int = 1,
                    page_tokens: int = 64, group: int = 0, slack_pages_per_seq: int = 2, outliers: int = 0) -> int:
    """Arena bytes for n_seqs sequences of tokens_per_seq tokens each, in every layer, with a few pages of slack per
    (sequence, layer) for copy-on-write after a fork. outliers: the role set of a cache with dense-and-sparse outliers
    (kvq.h section 10), whose pages are larger."""
    n_layers = _nonneg(n_layers, "n_layers")
    tokens_per_seq = _nonneg(tokens_per_seq, "tokens_per_seq", INT64_MAX, "int64")
    n_seqs = _nonneg(n_seqs, "n_seqs")
    slack = _nonneg(slack_pages_per_seq, "slack_pages_per_seq")
    if _int(outliers, "outliers") > 0:
        cfg = make_config(max(n_layers, 1), n_kv_heads, head_dim, type_k, type_v, 0, _int(page_tokens, "page_tokens"),
                          group, outliers=outliers)
        lay = PageLayout()
        _check(_lib.kvq_cache_config_layout(C.byref(cfg), C.byref(lay)))
    else:
        lay = page_layout(type_k, type_v if type_v is not None else type_k, n_kv_heads, head_dim,
                          _int(page_tokens, "page_tokens") or 64, group)
    P = lay.page_tokens
    pages = n_layers * n_seqs * (-(-tokens_per_seq // P) + slack)
    total = pages * lay.page_bytes
    if total > SIZE_MAX:
        raise OverflowError(f"kvq: {total} arena bytes do not fit size_t")
    return total


_PARAMS_MEMO: dict = {}


def _params(n_q_heads: Any, scale: Any = 0.0, window: Any = 0, softcap: Any = 0.0) -> AttnParams:
    """The AttnParams struct, checked and memoized like _ids (the C calls only read it)."""
    key = (n_q_heads, scale, window, softcap)
    try:
        p = _PARAMS_MEMO.get(key)
    except TypeError:  # unhashable: the checks below say what is wrong
        p = None
    exact = type(n_q_heads) is int and type(window) is int and type(scale) in (int, float) and \
        type(softcap) in (int, float)  # a memo hit must not let 8.0 stand for 8 (hash-equal keys)
    if p is None or not exact:
        checked = (_int(n_q_heads, "n_q_heads"), _real(scale, "scale"), _int(window or 0, "window"),
                   _real(softcap, "softcap"))
        if checked[0] < 1:
            raise ValueError(f"kvq: n_q_heads = {checked[0]} must be >= 1")
        if checked[2] < 0:
            raise ValueError(f"kvq: window = {checked[2]} is negative")
        if len(_PARAMS_MEMO) > 256:
            _PARAMS_MEMO.clear()
        p = AttnParams(*checked)
        if exact:
            _PARAMS_MEMO[key] = p
    return p


def _floats(a: Any, name: str) -> np.ndarray:
    """K/V for append: a float32 or float16 numpy array, made C-contiguous and aligned (a copy when it is not)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"kvq: {name} must be a numpy array (float32 or float16), got {type(a).__name__}")
    if a.dtype not in _NP_DTYPES:
        raise TypeError(f"kvq: {name} has dtype {a.dtype}: kvq takes float32 or float16 numpy arrays")
    return np.require(a, requirements=["C", "A"])


class Cache:
    """A CPU kvq_cache. Arrays are numpy (float32 or float16) or raw addresses through the *_ptr methods.

    A context manager: `with kvq.Cache(...) as c:` frees the cache at the end of the block (close() does it by hand;
    a closed cache raises CacheClosedError)."""

    _h: Optional[C.c_void_p] = None
    _what = "kvq.Cache"

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, type_k: TypeSpec = "f16",
                 type_v: Optional[TypeSpec] = None, arena_bytes: Optional[int] = None, max_tokens: int = 4096,
                 page_tokens: int = 0, group: int = 0, residual: int = -1, max_seqs: int = 0, n_threads: int = 0,
                 rotate: int = -1, rotation_seed: int = 0, sinks: int = -1, nonuniform: int = -1, prerope: int = 0,
                 rope_neox: int = 0, rope_theta: float = 0.0, rope_freqs=None, squat_rank: int = 0,
                 squat_lambda: float = 0.0, rotation_layers=None, qnorm: int = -1, outliers: int = -1,
                 params8: int = -1, window8: int = -1):
        cfg = make_config(n_layers, n_kv_heads, head_dim, type_k, type_v, 0, page_tokens, group, residual, max_seqs,
                          n_threads, rotate, rotation_seed, sinks, nonuniform, prerope, rope_neox, rope_theta,
                          rope_freqs, squat_rank, squat_lambda, rotation_layers, qnorm, outliers, params8, window8)
        if arena_bytes is None:
            max_tokens = _nonneg(max_tokens, "max_tokens", INT64_MAX, "int64")
            arena_bytes = arena_bytes_for(n_layers, n_kv_heads, head_dim, type_k, type_v, max_tokens, 1,
                                          cfg.page_tokens or 64, group)
            if cfg.sinks != 0 or cfg.outliers > 0:
                # the sink pages and the outlier sections (kvq.h section 10): what libkvq's sizing adds for them
                flat = CacheConfig.from_buffer_copy(cfg)
                flat.sinks, flat.outliers = 0, 0
                with_them, without = (_lib.kvq_cache_arena_bytes_for(C.byref(x), max_tokens) for x in (cfg, flat))
                if with_them == 0 or without == 0:
                    _check(-2)  # KVQ_ERR_INVALID_ARG, with libkvq's message
                arena_bytes += with_them - without
        cfg.arena_bytes = _size(arena_bytes, "arena_bytes")
        h = _P()
        _check(_lib.kvq_cache_create(C.byref(cfg), C.byref(h)))
        self._h = h
        self.config = CacheConfig()
        self.layout = PageLayout()
        _check(_lib.kvq_cache_get_config(h, C.byref(self.config), C.byref(self.layout)))
        self.n_layers, self.n_kv_heads, self.head_dim = self.config.n_layers, self.config.n_kv_heads, \
            self.config.head_dim

    # lifetime
    def close(self) -> None:
        """Free the cache (idempotent). Later calls raise CacheClosedError."""
        h, self._h = self._h, None
        if h:
            _lib.kvq_cache_free(h)

    @property
    def closed(self) -> bool:
        return not self._h

    def __enter__(self) -> "Cache":
        self._handle()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass

    def _handle(self) -> C.c_void_p:
        h = self._h
        if not h:
            raise CacheClosedError(self._what)
        return h

    # sequences
    def seq_new(self) -> int:
        """A new empty sequence; its id."""
        h = self._handle()
        s = C.c_int32()
        _check(_lib.kvq_seq_new(h, C.byref(s)))
        return s.value

    def seq_fork(self, src: int) -> int:
        """A new sequence with src's content (pages shared, copy on write); its id."""
        h = self._handle()
        src = _int(src, "src")
        s = C.c_int32()
        _check(_lib.kvq_seq_fork(h, src, C.byref(s)))
        return s.value

    def seq_truncate(self, seq: int, n_tokens: int) -> None:
        """Keep the first n_tokens tokens of seq in every layer."""
        h = self._handle()
        seq, n_tokens = _int(seq, "seq"), _i64(n_tokens, "n_tokens")
        _check(_lib.kvq_seq_truncate(h, seq, n_tokens))

    def seq_free(self, seq: int) -> None:
        h = self._handle()
        _check(_lib.kvq_seq_free(h, _int(seq, "seq")))

    def seq_length(self, seq: int, layer: int = 0) -> int:
        """Tokens of seq in layer."""
        h = self._handle()
        seq, layer = _int(seq, "seq"), _int(layer, "layer")
        n = C.c_int64()
        _check(_lib.kvq_seq_length(h, seq, layer, C.byref(n)))
        return n.value

    def stats(self) -> dict:
        """kvq_cache_stats as a dict."""
        h = self._handle()
        s = CacheStats()
        _check(_lib.kvq_cache_get_stats(h, C.byref(s)))
        return _stats_dict(s)

    # SQuat keys (kvq.h section 10)
    def set_key_subspace(self, seq: int, layer: int, kv_head: int, basis) -> None:
        """The query subspace of (seq, layer, kv_head): basis [head_dim][squat_rank] with orthonormal columns, in the
        frame of the keys appended (un-rotated); None clears it. Needs a cache made with squat_rank > 0."""
        h = self._handle()
        seq, layer, kv_head = _int(seq, "seq"), _int(layer, "layer"), _int(kv_head, "kv_head")
        if basis is None:
            _check(_lib.kvq_seq_set_key_subspace(h, seq, layer, kv_head, None))
            return
        b = np.ascontiguousarray(np.asarray(basis, dtype=np.float32))
        want = (self.head_dim, self.config.squat_rank)
        if want[1] and b.shape != want:  # squat_rank 0: libkvq names the error
            raise ValueError(f"kvq: basis has shape {b.shape}, (head_dim, squat_rank) = {want} expected")
        _check(_lib.kvq_seq_set_key_subspace(h, seq, layer, kv_head, b.ctypes.data))

    def get_key_subspace(self, seq: int, layer: int, kv_head: int):
        """The basis set for (seq, layer, kv_head) as [head_dim][squat_rank] float32, or None when none is set."""
        h = self._handle()
        seq, layer, kv_head = _int(seq, "seq"), _int(layer, "layer"), _int(kv_head, "kv_head")
        r = max(self.config.squat_rank, 1)
        out = np.zeros((self.head_dim, r), dtype=np.float32)
        is_set = C.c_int()
        _check(_lib.kvq_seq_get_key_subspace(h, seq, layer, kv_head, out.ctypes.data, C.byref(is_set)))
        return out if is_set.value else None

    def set_key_subspace_from_queries(self, seq: int, layer: int, kv_head: int, queries) -> None:
        """Computes and sets the subspace as kvq's engine does: the top squat_rank eigenvectors of Q^T Q, Q the query
        rows ([n][head_dim], every query head of the KV head's group, in the keys' frame)."""
        self.set_key_subspace(seq, layer, kv_head, key_subspace(queries, self.config.squat_rank))

    # append
    def append_ptr(self, layer: int, seq_ids: Sequence[int], n_tokens: Sequence[int], dtype: int, k_addr: int,
                   v_addr: int) -> None:
        """kvq_append with raw addresses: k_addr and v_addr must each hold [sum n_tokens][n_kv_heads][head_dim]
        elements of `dtype` (DTYPE_F32 / DTYPE_F16 / DTYPE_BF16), dense."""
        h = self._handle()
        layer = _int(layer, "layer")
        n, idp, _ = _ids(seq_ids, "seq_ids")
        nt, ntp, _ = _ids(n_tokens, "n_tokens", nonneg=True)
        if n != nt:
            raise ValueError(f"kvq: seq_ids has {n} entries, n_tokens {nt}")
        dtype = _dtype_code(dtype)
        k_addr, v_addr = _addr(k_addr, "k_addr"), _addr(v_addr, "v_addr")
        _check(_lib.kvq_append(h, layer, n, idp, ntp, dtype, k_addr, v_addr))

    def append(self, layer: int, seq_ids: Sequence[int], n_tokens: Sequence[int], k: np.ndarray,
               v: np.ndarray) -> None:
        """k, v: [sum n_tokens][n_kv_heads][head_dim] numpy arrays, both float32 or both float16 (copied when not
        C-contiguous); the tokens of seq_ids[i] are rows sum(n_tokens[:i]) .. of k and v."""
        h = self._handle()
        layer = _int(layer, "layer")
        n, idp, _ = _ids(seq_ids, "seq_ids")
        nt, ntp, counts = _ids(n_tokens, "n_tokens", nonneg=True)
        if n != nt:
            raise ValueError(f"kvq: seq_ids has {n} entries, n_tokens {nt}")
        k, v = _floats(k, "k"), _floats(v, "v")
        if k.dtype != v.dtype:
            raise TypeError(f"kvq: k is {k.dtype} and v is {v.dtype}: both must be float32 or both float16")
        want = (sum(counts), self.n_kv_heads, self.head_dim)
        if k.shape != want or v.shape != want:
            raise ValueError(f"kvq: k/v shape {k.shape}/{v.shape}, expected {want} ([sum n_tokens][n_kv_heads]"
                             "[head_dim])")
        _check(_lib.kvq_append(h, layer, n, idp, ntp, _NP_DTYPES[k.dtype], k.ctypes.data, v.ctypes.data))

    # read back
    def read(self, seq: int, layer: int, start: int = 0, n: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Tokens [start, start + n) of (seq, layer) dequantized: (k, v) float32 [n][n_kv_heads][head_dim]; n None:
        to the end."""
        self._handle()
        seq, layer, start = _int(seq, "seq"), _int(layer, "layer"), _i64(start, "start")
        length = self.seq_length(seq, layer)  # KvqError for an unknown sequence or layer
        n = length - start if n is None else _i64(n, "n")
        if start < 0 or n < 0 or start > length or n > length - start:
            raise KvqError(-11, f"kvq: read: tokens [{start}, {start + n}) are outside sequence {seq}'s {length} "
                                f"tokens in layer {layer}")
        k = np.empty((n, self.n_kv_heads, self.head_dim), np.float32)
        v = np.empty_like(k)
        _check(_lib.kvq_read(self._handle(), seq, layer, start, n, k.ctypes.data, v.ctypes.data))
        return k, v

    def rope_apply(self, x: np.ndarray, pos0: int, inverse: bool = False) -> None:
        """kvq_rope_apply in place on float32 x [n][n_kv_heads][head_dim] (C-contiguous): token i rotated by the
        cache's RoPE at position pos0 + i (inverse: back). Pre-RoPE caches only (kvq.h section 10)."""
        h = self._handle()
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or not x.flags.c_contiguous or x.ndim != 3 or \
                x.shape[1:] != (self.n_kv_heads, self.head_dim) or not x.flags.writeable:
            raise ValueError(f"kvq: rope_apply: x must be a writable C-contiguous float32 array [n][{self.n_kv_heads}]"
                             f"[{self.head_dim}]")
        _check(_lib.kvq_rope_apply(h, _i64(pos0, "pos0"), x.shape[0], 1 if inverse else 0, x.ctypes.data))

    def read_into(self, seq: int, layer: int, start: int, n: int, k_addr: Optional[int],
                  v_addr: Optional[int]) -> None:
        """kvq_read into raw addresses of float32 [n][n_kv_heads][head_dim] each (None / 0: skip it)."""
        h = self._handle()
        seq, layer, start, n = _int(seq, "seq"), _int(layer, "layer"), _i64(start, "start"), _i64(n, "n")
        _check(_lib.kvq_read(h, seq, layer, start, n, _addr(k_addr, "k_addr"), _addr(v_addr, "v_addr")))

    # attention (fp32 q / out)
    def attn_decode_ptr(self, layer: int, seq_ids: Sequence[int], q_addr: int, out_addr: int, n_q_heads: int,
                        scale: float = 0.0, window: int = 0, softcap: float = 0.0) -> None:
        """kvq_attn_decode with raw addresses: q and out float32 [len(seq_ids)][n_q_heads][head_dim]."""
        h = self._handle()
        layer = _int(layer, "layer")
        n, idp, _ = _ids(seq_ids, "seq_ids")
        p = _params(n_q_heads, scale, window, softcap)
        q_addr, out_addr = _addr(q_addr, "q_addr"), _addr(out_addr, "out_addr")
        _check(_lib.kvq_attn_decode(h, layer, n, idp, q_addr, out_addr, C.byref(p)))

    def decode_plan(self, layer: int, seq_ids: Sequence[int], dtype: int, n_q_heads: int, scale: float = 0.0,
                    window: int = 0, softcap: float = 0.0):
        """A decode step of `layer` for seq_ids with every argument checked and converted once: returns
        step(k_addr, v_addr, q_addr, out_addr), which appends one token per sequence (kvq_append; k, v: raw addresses
        of [len(seq_ids)][n_kv_heads][head_dim] elements of `dtype`) and computes kvq_attn_decode (q, out: float32
        [len(seq_ids)][n_q_heads][head_dim]). For loops that call the same step at every token (kvq.hf, once per
        layer and step): the per-call work is the two C calls. The buffers are the caller's responsibility, as for the
        *_ptr methods; the C calls still check the cache's state (KvqError); a closed cache raises
        CacheClosedError."""
        h = self._handle()
        layer = _int(layer, "layer")
        n, _, key = _ids(seq_ids, "seq_ids")
        dtype = _dtype_code(dtype)
        ids = (C.c_int32 * max(1, n))(*key)  # owned by the step (the _ids memo may drop its arrays)
        ones = (C.c_int32 * max(1, n))(*([1] * n))
        idp, onep = C.cast(ids, _I32P), C.cast(ones, _I32P)
        p0 = _params(n_q_heads, scale, window, softcap)
        p = AttnParams(p0.n_q_heads, p0.scale, p0.window, p0.softcap)
        pref = C.byref(p)
        append, decode, owner = _lib.kvq_append, _lib.kvq_attn_decode, self

        def step(k_addr: int, v_addr: int, q_addr: int, out_addr: int) -> None:
            if owner._h is not h:
                raise CacheClosedError(owner._what)
            st = append(h, layer, n, idp, onep, dtype, k_addr, v_addr)
            if st < 0:
                _check(st)
            st = decode(h, layer, n, idp, q_addr, out_addr, pref)
            if st < 0:
                _check(st)

        step.keep = (ids, ones, p)  # the C arguments live as long as the step
        return step

    def attn_prefill_ptr(self, layer: int, seq: int, n_q: int, q_addr: int, out_addr: int, n_q_heads: int,
                         scale: float = 0.0, window: int = 0, softcap: float = 0.0) -> None:
        """kvq_attn_prefill with raw addresses: q and out float32 [n_q][n_q_heads][head_dim]."""
        h = self._handle()
        layer, seq, n_q = _int(layer, "layer"), _int(seq, "seq"), _int(n_q, "n_q")
        p = _params(n_q_heads, scale, window, softcap)
        q_addr, out_addr = _addr(q_addr, "q_addr"), _addr(out_addr, "out_addr")
        _check(_lib.kvq_attn_prefill(h, layer, seq, n_q, q_addr, out_addr, C.byref(p)))

    def attn_prefill_exact_ptr(self, layer: int, seq: int, n_q: int, q_addr: int, dtype: int, k_addr: int,
                               v_addr: int, out_addr: int, n_q_heads: int, scale: float = 0.0, window: int = 0,
                               softcap: float = 0.0) -> None:
        """kvq_attn_prefill_exact with raw addresses: n_q new tokens (not appended yet); q and out float32
        [n_q][n_q_heads][head_dim], k and v [n_q][n_kv_heads][head_dim] of `dtype`."""
        h = self._handle()
        layer, seq, n_q = _int(layer, "layer"), _int(seq, "seq"), _int(n_q, "n_q")
        p = _params(n_q_heads, scale, window, softcap)
        dtype = _dtype_code(dtype)
        q_addr, out_addr = _addr(q_addr, "q_addr"), _addr(out_addr, "out_addr")
        k_addr, v_addr = _addr(k_addr, "k_addr"), _addr(v_addr, "v_addr")
        _check(_lib.kvq_attn_prefill_exact(h, layer, seq, n_q, q_addr, dtype, k_addr, v_addr, out_addr, C.byref(p)))

    def _query(self, q: Any, rows: int, rows_what: str) -> np.ndarray:
        """q as C-contiguous float32 [rows][n_q_heads][head_dim] (a copy when it is another float dtype or not
        contiguous), after checking its shape against the cache."""
        if not isinstance(q, np.ndarray):
            q = np.asarray(q)
        if q.dtype.kind != "f":
            raise TypeError(f"kvq: q has dtype {q.dtype}: kvq takes a float array (computed in float32)")
        if q.ndim != 3:
            raise ValueError(f"kvq: q must be 3-D [{rows_what}][n_q_heads][head_dim], got shape {q.shape}")
        r, hq, d = q.shape
        if rows >= 0 and r != rows:
            raise ValueError(f"kvq: q has {r} rows, {rows_what} = {rows}")
        if d != self.head_dim:
            raise ValueError(f"kvq: q has head dim {d}, the cache's head_dim is {self.head_dim}")
        if hq < 1 or hq % self.n_kv_heads:
            raise ValueError(f"kvq: q has {hq} query heads, not a positive multiple of the cache's "
                             f"{self.n_kv_heads} KV heads")
        return np.require(q, np.float32, ["C", "A"])

    def attn_decode(self, layer: int, seq_ids: Sequence[int], q: np.ndarray, scale: float = 0.0, window: int = 0,
                    softcap: float = 0.0) -> np.ndarray:
        """q: [len(seq_ids)][n_q_heads][head_dim] float (computed in float32) -> out of the same shape (float32)."""
        self._handle()
        n, _, _ = _ids(seq_ids, "seq_ids")
        q = self._query(q, n, "len(seq_ids)")
        out = np.empty_like(q)
        self.attn_decode_ptr(layer, seq_ids, q.ctypes.data, out.ctypes.data, q.shape[1], scale, window, softcap)
        return out

    def attn_prefill(self, layer: int, seq: int, q: np.ndarray, scale: float = 0.0, window: int = 0,
                     softcap: float = 0.0) -> np.ndarray:
        """q: [n_q][n_q_heads][head_dim] float, the last n_q tokens of `seq` -> out of the same shape (float32)."""
        self._handle()
        q = self._query(q, -1, "n_q")
        out = np.empty_like(q)
        self.attn_prefill_ptr(layer, seq, _int(q.shape[0], "n_q"), q.ctypes.data, out.ctypes.data, q.shape[1],
                              scale, window, softcap)
        return out

    def attn_prefill_exact(self, layer: int, seq: int, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                           scale: float = 0.0, window: int = 0, softcap: float = 0.0) -> np.ndarray:
        """q: [n_q][n_q_heads][head_dim] float, the queries of n_q NEW tokens of `seq` whose keys and values are k, v
        ([n_q][n_kv_heads][head_dim], both float32 or both float16): attention over the cache as it is and the batch
        itself in fp16, never quantized (kvq.h section 9). Nothing is appended: call append(k, v) next to keep it."""
        self._handle()
        q = self._query(q, -1, "n_q")
        k, v = _floats(k, "k"), _floats(v, "v")
        if k.dtype != v.dtype:
            raise TypeError(f"kvq: k is {k.dtype} and v is {v.dtype}: both must be float32 or both float16")
        want = (q.shape[0], self.n_kv_heads, self.head_dim)
        if k.shape != want or v.shape != want:
            raise ValueError(f"kvq: k/v shape {k.shape}/{v.shape}, expected {want} ([n_q][n_kv_heads][head_dim])")
        out = np.empty_like(q)
        self.attn_prefill_exact_ptr(layer, seq, _int(q.shape[0], "n_q"), q.ctypes.data, _NP_DTYPES[k.dtype],
                                    k.ctypes.data, v.ctypes.data, out.ctypes.data, q.shape[1], scale, window, softcap)
        return out


# ----------------------------------------------------------------------------------------------------------------
# CUDA backend (optional library)
# ----------------------------------------------------------------------------------------------------------------
_cuda, CUDA_LIBRARY_PATH, _CUDA_WHY = _load("KVQ_CUDA_LIBRARY", ["libkvq_cuda_py.so"], "the kvq CUDA library", False)
# _CUDA_WHY: why there is no usable CUDA library ("" when none was found at all: it was not built)
if _cuda is not None:
    _cuda_entries = [
        ("kvq_cuda_last_error", C.c_char_p, []),
        ("kvq_cuda_device_count", C.c_int, [C.POINTER(C.c_int)]),
        ("kvq_cuda_cache_create", C.c_int, [C.POINTER(CacheConfig), C.c_int, C.c_int64, C.POINTER(_P)]),
        ("kvq_cuda_cache_free", None, [_P]),
        ("kvq_cuda_cache_get_config", C.c_int, [_P, C.POINTER(CacheConfig), C.POINTER(PageLayout)]),
        ("kvq_cuda_cache_get_stats", C.c_int, [_P, C.POINTER(CudaStats)]),
        ("kvq_cuda_seq_new", C.c_int, [_P, _I32P]),
        ("kvq_cuda_seq_free", C.c_int, [_P, C.c_int32]),
        ("kvq_cuda_seq_length", C.c_int, [_P, C.c_int32, C.c_int, C.POINTER(C.c_int64)]),
        ("kvq_cuda_seq_fork", C.c_int, [_P, C.c_int32, _I32P, _P]),
        ("kvq_cuda_seq_truncate", C.c_int, [_P, C.c_int32, C.c_int64, _P]),
        ("kvq_cuda_append", C.c_int, [_P, C.c_int, C.c_int, _I32P, _I32P, C.c_int, _P, _P, _P]),
        ("kvq_cuda_attn_decode", C.c_int, [_P, C.c_int, C.c_int, _I32P, C.c_int, _P, _P, C.POINTER(AttnParams), _P]),
        ("kvq_cuda_attn_prefill", C.c_int, [_P, C.c_int, C.c_int32, C.c_int, C.c_int, _P, _P, C.POINTER(AttnParams),
                                            _P]),
        ("kvq_cuda_attn_decode_multi", C.c_int, [_P, C.c_int, C.c_int, _I32P, C.c_int, C.c_int, _P, _P,
                                                 C.POINTER(AttnParams), _P]),
        ("kvq_cuda_decode_step", C.c_int, [_P, C.c_int, C.c_int, _I32P, C.c_int, _P, _P, C.c_int, _P, _P,
                                           C.POINTER(AttnParams), _P]),
        ("kvq_cuda_static_create", C.c_int, [_P, C.c_int, _I32P, C.c_int64, C.POINTER(AttnParams), C.c_int, C.c_int,
                                             _P, C.POINTER(_P)]),
        ("kvq_cuda_static_step", C.c_int, [_P, C.c_int, _P, _P, _P, _P, _P]),
        ("kvq_cuda_static_lengths", C.c_int, [_P, C.c_int, C.POINTER(C.c_int64), _P]),
        ("kvq_cuda_static_end", C.c_int, [_P, _P]),
    ]
    try:
        for _n, _r, _a in _cuda_entries:
            _proto(_cuda, _n, _r, *_a)
    except AttributeError:  # a library built from an older tree: the CPU part stays usable
        _CUDA_WHY = (f"{CUDA_LIBRARY_PATH} is older than this package (no {_n}): rebuild it "
                     "(python3 python/build_native.py or pip install .)")
        _cuda = None


def _check_cuda(status: int) -> None:
    _check(status, _cuda.kvq_cuda_last_error)


# CUresult codes of the driver API (cuda.h) that tell why there is no usable device.
_CU_NO_DEVICE, _CU_INSUFFICIENT_DRIVER, _CU_NOT_INITIALIZED, _CU_SYSTEM_DRIVER_MISMATCH = 100, 35, 3, 803
_CU_COMPAT_NOT_SUPPORTED = 804


def _cuda_version_str(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}" if v > 0 else "unknown"


_cdll = C.CDLL  # how _driver_why opens libcuda (tests put a fake driver here)


def _driver_why(runtime_msg: str = "", cdll=None, runtime_version: int = 0) -> str:
    """Why the machine cannot run kvq's CUDA kernels, asked from the NVIDIA driver itself (libcuda), so that a
    machine without a GPU is not told that its driver is too old (which is what the CUDA runtime says when it finds
    no driver at all). runtime_msg: kvq_cuda_device_count's message; runtime_version: the CUDA version kvq's library
    was built with (CUDA's 12040 form; 0 unknown). "" when the driver and a GPU are there (runtime_msg says the
    rest, e.g. no device of compute capability 8.0 or later with code in the build)."""
    try:
        cu = (cdll or _cdll)("libcuda.so.1")
    except OSError:
        return ("no NVIDIA driver on this machine (libcuda.so.1 cannot be loaded): it has no NVIDIA GPU, or the GPU's "
                "driver is not installed")
    drv = C.c_int(0)
    try:
        if cu.cuDriverGetVersion(C.byref(drv)) != 0:
            drv.value = 0
        st = cu.cuInit(0)
    except AttributeError:
        return "libcuda.so.1 is not an NVIDIA driver library (no cuInit / cuDriverGetVersion)"
    have = _cuda_version_str(drv.value)
    if st == _CU_NO_DEVICE:
        return (f"the NVIDIA driver (CUDA {have}) is installed but sees no GPU (CUDA_ERROR_NO_DEVICE; is "
                "CUDA_VISIBLE_DEVICES empty?)")
    too_old = st in (_CU_INSUFFICIENT_DRIVER, _CU_COMPAT_NOT_SUPPORTED) or "insufficient" in runtime_msg.lower() or \
        (runtime_version > 0 and 0 < drv.value < runtime_version)
    if too_old:
        need = f"CUDA {_cuda_version_str(runtime_version)}" if runtime_version > 0 else "a newer CUDA"
        return (f"the NVIDIA driver is too old: it supports CUDA {have}, kvq's CUDA library needs {need} "
                "(update the NVIDIA driver)")
    if st == _CU_SYSTEM_DRIVER_MISMATCH:
        return "the NVIDIA kernel module and libcuda.so.1 are of different versions (reboot or reinstall the driver)"
    if st != 0:
        return f"the NVIDIA driver (CUDA {have}) failed to initialise: cuInit returned CUresult {st}"
    n = C.c_int(0)
    if cu.cuDeviceGetCount(C.byref(n)) == 0 and n.value == 0:
        return f"the NVIDIA driver (CUDA {have}) is installed but sees no GPU"
    return ""


def _runtime_version() -> int:
    f = getattr(_cuda, "cudaRuntimeGetVersion", None) if _cuda is not None else None
    if f is None:
        return 0
    v = C.c_int(0)
    try:
        return v.value if f(C.byref(v)) == 0 else 0
    except Exception:  # pragma: no cover
        return 0


def cuda_available() -> Tuple[bool, str]:
    """(True, "") when kvq's CUDA library is loaded and a usable GPU (compute capability >= 8.0) is there, else
    (False, why). The reasons are told apart: the CUDA library was not built (or cannot be loaded, or is out of
    date); no NVIDIA driver (a machine without a GPU); the driver sees no GPU; the driver is too old for the
    library; GPUs of another compute capability."""
    if _cuda is None:
        return False, _CUDA_WHY or ("kvq's CUDA library is not built: libkvq_cuda_py.so is built only where nvcc is "
                                    "found (pip install . or python3 python/build_native.py on a machine with the "
                                    "CUDA toolkit; KVQ_CUDA_LIBRARY=path loads one by hand)")
    n = C.c_int()
    st = _cuda.kvq_cuda_device_count(C.byref(n))
    if st < 0 or n.value < 1:
        msg = _cuda.kvq_cuda_last_error().decode(errors="replace")
        why = _driver_why(msg, runtime_version=_runtime_version())
        return False, why or msg or "no usable GPU"
    return True, ""


class CudaCache:
    """A device kvq_cuda_cache. Tensors are passed as device addresses; `stream` is a cudaStream_t as int (0: legacy
    default stream). A context manager like Cache (the end of the `with` block frees the device memory)."""

    _h: Optional[C.c_void_p] = None
    _what = "kvq.CudaCache"

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, type_k: TypeSpec = "f16",
                 type_v: Optional[TypeSpec] = None, arena_bytes: Optional[int] = None, max_tokens: int = 4096,
                 residual: int = -1, max_seqs: int = 0, device: int = 0, max_seq_tokens: int = 0,
                 rotate: int = -1, rotation_seed: int = 0, sinks: int = -1, nonuniform: int = -1,
                 rotation_layers=None, qnorm: int = -1):
        """rotate, rotation_seed, sinks, rotation_layers, qnorm: kvq.h section 10, as Cache (-1: the CPU cache's
        defaults, so that both hold the same bytes); nonuniform: Q3 roles only (the CUDA backend has no non-uniform
        levels for Q4 or Q2)."""
        cfg = make_config(n_layers, n_kv_heads, head_dim, type_k, type_v, 0, 64, 0, residual, max_seqs, 0, rotate,
                          rotation_seed, sinks, nonuniform, rotation_layers=rotation_layers, qnorm=qnorm)
        if arena_bytes is None:
            max_tokens = _nonneg(max_tokens, "max_tokens", INT64_MAX, "int64")
            # one more page per (sequence, layer) for the sink page (this backend keeps at most one)
            arena_bytes = arena_bytes_for(n_layers, n_kv_heads, head_dim, type_k, type_v, max_tokens, 1,
                                          slack_pages_per_seq=2 + (cfg.sinks != 0))
        cfg.arena_bytes = _size(arena_bytes, "arena_bytes")
        device, max_seq_tokens = _int(device, "device"), _i64(max_seq_tokens, "max_seq_tokens")
        ok, why = cuda_available()
        if not ok:
            raise KvqError(-13, f"kvq CUDA backend unavailable: {why}")
        h = _P()
        _check_cuda(_cuda.kvq_cuda_cache_create(C.byref(cfg), device, max_seq_tokens, C.byref(h)))
        self._h = h
        self.config = CacheConfig()
        self.layout = PageLayout()
        _check_cuda(_cuda.kvq_cuda_cache_get_config(h, C.byref(self.config), C.byref(self.layout)))
        self.n_layers, self.n_kv_heads, self.head_dim = self.config.n_layers, self.config.n_kv_heads, \
            self.config.head_dim

    _plan: Optional["StaticPlan"] = None  # the live static plan (kvq_cuda.h section 5: one per cache)

    def close(self) -> None:
        """Free the device cache (idempotent; waits for the device). Later calls raise CacheClosedError. A live
        static plan is freed with it (its handle becomes closed)."""
        h, self._h = self._h, None
        if self._plan is not None:
            self._plan._p = None
            self._plan = None
        if h:
            _cuda.kvq_cuda_cache_free(h)

    closed = Cache.closed
    __enter__ = Cache.__enter__
    __exit__ = Cache.__exit__
    __del__ = Cache.__del__
    _handle = Cache._handle

    def seq_new(self) -> int:
        h = self._handle()
        s = C.c_int32()
        _check_cuda(_cuda.kvq_cuda_seq_new(h, C.byref(s)))
        return s.value

    def seq_free(self, seq: int) -> None:
        h = self._handle()
        _check_cuda(_cuda.kvq_cuda_seq_free(h, _int(seq, "seq")))

    def seq_fork(self, src: int, stream: int = 0) -> int:
        """New sequence sharing src's pages (copy on write); the window copies are enqueued on `stream`."""
        h = self._handle()
        src, stream = _int(src, "src"), _addr(stream, "stream")
        s = C.c_int32()
        _check_cuda(_cuda.kvq_cuda_seq_fork(h, src, C.byref(s), stream))
        return s.value

    def seq_truncate(self, seq: int, n_tokens: int, stream: int = 0) -> None:
        """Keep the first n_tokens tokens of every layer (kvq_seq_truncate semantics); device work on `stream`."""
        h = self._handle()
        seq, n_tokens, stream = _int(seq, "seq"), _i64(n_tokens, "n_tokens"), _addr(stream, "stream")
        _check_cuda(_cuda.kvq_cuda_seq_truncate(h, seq, n_tokens, stream))

    def seq_length(self, seq: int, layer: int = 0) -> int:
        h = self._handle()
        seq, layer = _int(seq, "seq"), _int(layer, "layer")
        n = C.c_int64()
        _check_cuda(_cuda.kvq_cuda_seq_length(h, seq, layer, C.byref(n)))
        return n.value

    def stats(self) -> dict:
        h = self._handle()
        s = CudaStats()
        _check_cuda(_cuda.kvq_cuda_cache_get_stats(h, C.byref(s)))
        return _stats_dict(s)

    def append_ptr(self, layer: int, seq_ids: Sequence[int], n_tokens: Sequence[int], dtype: int, k_addr: int,
                   v_addr: int, stream: int = 0) -> None:
        """kvq_cuda_append: k_addr / v_addr are device addresses of [sum n_tokens][n_kv_heads][head_dim] elements of
        `dtype`, dense."""
        h = self._handle()
        layer = _int(layer, "layer")
        n, idp, _ = _ids(seq_ids, "seq_ids")
        nt, ntp, _ = _ids(n_tokens, "n_tokens", nonneg=True)
        if n != nt:
            raise ValueError(f"kvq: seq_ids has {n} entries, n_tokens {nt}")
        dtype = _dtype_code(dtype)
        k_addr, v_addr, stream = _addr(k_addr, "k_addr"), _addr(v_addr, "v_addr"), _addr(stream, "stream")
        _check_cuda(_cuda.kvq_cuda_append(h, layer, n, idp, ntp, dtype, k_addr, v_addr, stream))

    def attn_decode_ptr(self, layer: int, seq_ids: Sequence[int], qo_dtype: int, q_addr: int, out_addr: int,
                        n_q_heads: int, scale: float = 0.0, window: int = 0, softcap: float = 0.0,
                        stream: int = 0) -> None:
        """kvq_cuda_attn_decode: q / out device addresses of [len(seq_ids)][n_q_heads][head_dim] `qo_dtype`."""
        h = self._handle()
        layer = _int(layer, "layer")
        n, idp, _ = _ids(seq_ids, "seq_ids")
        qo_dtype = _dtype_code(qo_dtype)
        p = _params(n_q_heads, scale, window, softcap)
        q_addr, out_addr, stream = _addr(q_addr, "q_addr"), _addr(out_addr, "out_addr"), _addr(stream, "stream")
        _check_cuda(_cuda.kvq_cuda_attn_decode(h, layer, n, idp, qo_dtype, q_addr, out_addr, C.byref(p), stream))

    def attn_prefill_ptr(self, layer: int, seq: int, n_q: int, qo_dtype: int, q_addr: int, out_addr: int,
                         n_q_heads: int, scale: float = 0.0, window: int = 0, softcap: float = 0.0,
                         stream: int = 0) -> None:
        """kvq_cuda_attn_prefill: q / out device addresses of [n_q][n_q_heads][head_dim] `qo_dtype`."""
        h = self._handle()
        layer, seq, n_q = _int(layer, "layer"), _int(seq, "seq"), _int(n_q, "n_q")
        qo_dtype = _dtype_code(qo_dtype)
        p = _params(n_q_heads, scale, window, softcap)
        q_addr, out_addr, stream = _addr(q_addr, "q_addr"), _addr(out_addr, "out_addr"), _addr(stream, "stream")
        _check_cuda(_cuda.kvq_cuda_attn_prefill(h, layer, seq, n_q, qo_dtype, q_addr, out_addr, C.byref(p), stream))

    def attn_decode_multi_ptr(self, layer: int, seq_ids: Sequence[int], n_q: int, qo_dtype: int, q_addr: int,
                              out_addr: int, n_q_heads: int, scale: float = 0.0, window: int = 0, softcap: float = 0.0,
                              stream: int = 0) -> None:
        """kvq_cuda_attn_decode_multi: the last n_q tokens of each sequence as causal queries (speculative decoding's
        verify step); q / out device addresses of [len(seq_ids)][n_q][n_q_heads][head_dim] `qo_dtype`."""
        h = self._handle()
        layer, n_q = _int(layer, "layer"), _int(n_q, "n_q")
        n, idp, _ = _ids(seq_ids, "seq_ids")
        qo_dtype = _dtype_code(qo_dtype)
        p = _params(n_q_heads, scale, window, softcap)
        q_addr, out_addr, stream = _addr(q_addr, "q_addr"), _addr(out_addr, "out_addr"), _addr(stream, "stream")
        _check_cuda(_cuda.kvq_cuda_attn_decode_multi(h, layer, n, idp, n_q, qo_dtype, q_addr, out_addr, C.byref(p),
                                                     stream))

    def decode_step_ptr(self, layer: int, seq_ids: Sequence[int], kv_dtype: int, k_addr: int, v_addr: int,
                        qo_dtype: int, q_addr: int, out_addr: int, n_q_heads: int, scale: float = 0.0, window: int = 0,
                        softcap: float = 0.0, stream: int = 0) -> None:
        """kvq_cuda_decode_step: one token appended to each sequence (k, v device addresses of
        [len(seq_ids)][n_kv_heads][head_dim] `kv_dtype`), then decode attention (q, out device addresses of
        [len(seq_ids)][n_q_heads][head_dim] `qo_dtype`), in one call; an error leaves the cache as it was."""
        h = self._handle()
        layer = _int(layer, "layer")
        n, idp, _ = _ids(seq_ids, "seq_ids")
        kv_dtype, qo_dtype = _dtype_code(kv_dtype), _dtype_code(qo_dtype)
        p = _params(n_q_heads, scale, window, softcap)
        k_addr, v_addr = _addr(k_addr, "k_addr"), _addr(v_addr, "v_addr")
        q_addr, out_addr, stream = _addr(q_addr, "q_addr"), _addr(out_addr, "out_addr"), _addr(stream, "stream")
        _check_cuda(_cuda.kvq_cuda_decode_step(h, layer, n, idp, kv_dtype, k_addr, v_addr, qo_dtype, q_addr, out_addr,
                                               C.byref(p), stream))

    def decode_plan(self, layer: int, seq_ids: Sequence[int], kv_dtype: int, qo_dtype: int, n_q_heads: int,
                    scale: float = 0.0, window: int = 0, softcap: float = 0.0):
        """decode_step_ptr with every argument but the addresses and the stream checked and converted once: returns
        step(k_addr, v_addr, q_addr, out_addr, stream), one kvq_cuda_decode_step call (Cache.decode_plan's CUDA
        counterpart; the buffers are the caller's responsibility)."""
        h = self._handle()
        layer = _int(layer, "layer")
        n, _, key = _ids(seq_ids, "seq_ids")
        kv_dtype, qo_dtype = _dtype_code(kv_dtype), _dtype_code(qo_dtype)
        ids = (C.c_int32 * max(1, n))(*key)
        idp = C.cast(ids, _I32P)
        p0 = _params(n_q_heads, scale, window, softcap)
        p = AttnParams(p0.n_q_heads, p0.scale, p0.window, p0.softcap)
        pref = C.byref(p)
        fn, owner = _cuda.kvq_cuda_decode_step, self

        def step(k_addr: int, v_addr: int, q_addr: int, out_addr: int, stream: int) -> None:
            if owner._h is not h:
                raise CacheClosedError(owner._what)
            st = fn(h, layer, n, idp, kv_dtype, k_addr, v_addr, qo_dtype, q_addr, out_addr, pref, stream)
            if st < 0:
                _check_cuda(st)

        step.keep = (ids, p)
        return step


class StaticPlan:
    """A kvq_cuda static plan (kvq_cuda.h section 5): the sequences `seq_ids` of `cache` lent to the device, with
    pages reserved up to `max_tokens` each, so that a decode step (step_ptr: one token appended to every sequence,
    then decode attention) is a fixed sequence of kernels a CUDA graph can capture and replay (kvq.hf's captured
    decode). While it lives, the cache refuses every other call on those sequences. end() (or the end of a `with`
    block, or closing the cache) gives them back; end() raises CacheFullError when a step found a sequence at
    max_tokens (that token was not stored)."""

    _p: Optional[C.c_void_p] = None
    _what = "kvq.StaticPlan"

    def __init__(self, cache: CudaCache, seq_ids: Sequence[int], max_tokens: int, kv_dtype: int, qo_dtype: int,
                 n_q_heads: int, scale: float = 0.0, window: int = 0, softcap: float = 0.0, stream: int = 0):
        h = cache._handle()
        n, idp, key = _ids(seq_ids, "seq_ids")
        max_tokens = _i64(max_tokens, "max_tokens")
        kv_dtype, qo_dtype = _dtype_code(kv_dtype), _dtype_code(qo_dtype)
        p = _params(n_q_heads, scale, window, softcap)
        stream = _addr(stream, "stream")
        out = _P()
        _check_cuda(_cuda.kvq_cuda_static_create(h, n, idp, max_tokens, C.byref(p), kv_dtype, qo_dtype, stream,
                                                 C.byref(out)))
        self._p, self._cache, self.seq_ids, self.n = out, cache, list(key), n
        cache._plan = self
        self._step = _cuda.kvq_cuda_static_step

    def _handle(self):
        if self._p is None:
            raise CacheClosedError(self._what)
        return self._p

    @property
    def closed(self) -> bool:
        return self._p is None

    def step_ptr(self, layer: int, k_addr: int, v_addr: int, q_addr: int, out_addr: int, stream: int = 0) -> None:
        """kvq_cuda_static_step: k, v device addresses of [n][n_kv_heads][head_dim] kv_dtype, q, out of
        [n][n_q_heads][head_dim] qo_dtype, rows in seq_ids order. Enqueues only (capturable); no argument
        conversion beyond ctypes' own (this is the per-layer hot call)."""
        p = self._p
        if p is None:
            raise CacheClosedError(self._what)
        st = self._step(p, layer, k_addr, v_addr, q_addr, out_addr, stream)
        if st < 0:
            _check_cuda(st)

    def lengths(self, layer: int = 0, stream: int = 0) -> list:
        """The sequences' lengths in `layer` (read from the device: synchronises `stream`)."""
        p = self._handle()
        out = (C.c_int64 * self.n)()
        _check_cuda(_cuda.kvq_cuda_static_lengths(p, _int(layer, "layer"), out, _addr(stream, "stream")))
        return list(out)

    def end(self, stream: int = 0) -> None:
        """Give the sequences back (synchronises `stream`); idempotent."""
        p, self._p = self._p, None
        if p is None:
            return
        if self._cache._plan is self:
            self._cache._plan = None
        _check_cuda(_cuda.kvq_cuda_static_end(p, _addr(stream, "stream")))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.end()

    def __del__(self):
        try:
            if self._p is not None and self._cache._h is not None:
                self.end()
        except Exception:  # never raise from a finalizer
            pass

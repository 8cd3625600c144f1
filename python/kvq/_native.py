"""ctypes bindings over libkvq (include/kvq.h) and, when it was built, the CUDA backend (include/kvq_cuda.h).

Nothing here needs torch: arrays are numpy arrays or raw addresses (ints). The kernels all live in C/CUDA; this module
only marshals arguments and turns negative kvq_status codes into KvqError with the library's own message.
"""
from __future__ import annotations

import ctypes as C
import glob
import os

import numpy as np

# kvq_type / kvq_dtype / kvq_status values (kvq.h; append-only enums).
TYPE_F16, TYPE_BF16, TYPE_Q8, TYPE_FP8, TYPE_Q4, TYPE_Q2 = 0, 1, 2, 3, 4, 5
DTYPE_F32, DTYPE_F16, DTYPE_BF16 = 0, 1, 2
HEAD_DIMS = (64, 80, 96, 128, 256)
CUDA_HEAD_DIMS = (64, 128)

STATUS_NAMES = {
    -1: "KVQ_ERR_NULL", -2: "KVQ_ERR_INVALID_ARG", -3: "KVQ_ERR_UNSUPPORTED_TYPE", -4: "KVQ_ERR_UNSUPPORTED_HEAD_DIM",
    -5: "KVQ_ERR_SHAPE", -6: "KVQ_ERR_NO_SEQ", -7: "KVQ_ERR_CACHE_FULL", -8: "KVQ_ERR_TOO_MANY_SEQS",
    -9: "KVQ_ERR_NONFINITE", -10: "KVQ_ERR_OUT_OF_MEMORY", -11: "KVQ_ERR_RANGE", -12: "KVQ_ERR_CUDA",
    -13: "KVQ_ERR_NO_DEVICE", -14: "KVQ_ERR_IO", -15: "KVQ_ERR_FORMAT", -16: "KVQ_ERR_TRUNCATED",
    -17: "KVQ_ERR_INTERNAL",
}


class KvqError(RuntimeError):
    """A kvq call returned a negative kvq_status. `.status` is the code, the message is kvq's own."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.name = STATUS_NAMES.get(status, str(status))
        super().__init__(f"{message} ({self.name})")


class CacheFullError(KvqError, MemoryError):
    pass


class CacheConfig(C.Structure):
    _fields_ = [("n_layers", C.c_int), ("n_kv_heads", C.c_int), ("head_dim", C.c_int), ("type_k", C.c_int),
                ("type_v", C.c_int), ("arena_bytes", C.c_size_t), ("page_tokens", C.c_int), ("group", C.c_int),
                ("residual", C.c_int), ("max_seqs", C.c_int), ("n_threads", C.c_int)]


class PageLayout(C.Structure):
    _fields_ = [("page_tokens", C.c_int), ("head_dim", C.c_int), ("n_kv_heads", C.c_int), ("group", C.c_int),
                ("value_group", C.c_int), ("type_k", C.c_int), ("type_v", C.c_int), ("k_row_bytes", C.c_size_t),
                ("v_row_bytes", C.c_size_t), ("k_block_bytes", C.c_size_t), ("v_block_bytes", C.c_size_t),
                ("k_offset", C.c_size_t), ("v_offset", C.c_size_t), ("page_bytes", C.c_size_t)]


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


def _stats_dict(s) -> dict:
    return {name: getattr(s, name) for name, _ in s._fields_}


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
    errors = []
    for path in _candidates(env, names):
        try:
            return C.CDLL(path), path
        except OSError as e:  # pragma: no cover - depends on the machine
            errors.append(f"{path}: {e}")
    if required:
        raise ImportError(f"kvq: cannot load {what} (set {env} to its path, or `pip install .` the repository)"
                          + ("; tried: " + "; ".join(errors) if errors else ""))
    return None, None


_lib, LIBRARY_PATH = _load("KVQ_LIBRARY", ["libkvq.so.0", "libkvq.so.*.*.*", "libkvq.so", "libkvq.dylib"], "libkvq", True)

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
    ("kvq_cache_create", C.c_int, [C.POINTER(CacheConfig), C.POINTER(_P)]),
    ("kvq_cache_free", None, [_P]),
    ("kvq_cache_get_config", C.c_int, [_P, C.POINTER(CacheConfig), C.POINTER(PageLayout)]),
    ("kvq_cache_get_stats", C.c_int, [_P, C.POINTER(CacheStats)]),
    ("kvq_seq_new", C.c_int, [_P, _I32P]),
    ("kvq_seq_fork", C.c_int, [_P, C.c_int32, _I32P]),
    ("kvq_seq_truncate", C.c_int, [_P, C.c_int32, C.c_int64]),
    ("kvq_seq_free", C.c_int, [_P, C.c_int32]),
    ("kvq_seq_length", C.c_int, [_P, C.c_int32, C.c_int, C.POINTER(C.c_int64)]),
    ("kvq_append", C.c_int, [_P, C.c_int, C.c_int, _I32P, _I32P, C.c_int, _P, _P]),
    ("kvq_read", C.c_int, [_P, C.c_int32, C.c_int, C.c_int64, C.c_int64, _P, _P]),
    ("kvq_attn_decode", C.c_int, [_P, C.c_int, C.c_int, _I32P, _P, _P, C.POINTER(AttnParams)]),
    ("kvq_attn_prefill", C.c_int, [_P, C.c_int, C.c_int32, C.c_int, _P, _P, C.POINTER(AttnParams)]),
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
    return _lib.kvq_version_string().decode()


def cpu_backend() -> str:
    return _lib.kvq_cpu_backend().decode()


def type_from_name(name) -> int:
    if isinstance(name, int):
        if kvq_type_traits(name) is None:
            raise ValueError(f"kvq: unknown kv type {name}")
        return name
    out = C.c_int()
    st = _lib.kvq_type_from_name(str(name).encode(), C.byref(out))
    if st < 0:
        raise ValueError(f"kvq: unknown kv type {name!r}: use one of f16, bf16, q8, fp8, q4, q2")
    tr = kvq_type_traits(out.value)
    if tr is None or not tr["implemented"]:
        raise ValueError(f"kvq: kv type {name!r} is not implemented")
    return out.value


def kvq_type_traits(t: int):
    p = _lib.kvq_type_get_traits(int(t))
    if not p:
        return None
    return {"name": p.contents.name.decode(), "bits": p.contents.bits, "grouped": p.contents.grouped,
            "implemented": p.contents.implemented}


def type_name(t: int) -> str:
    return kvq_type_traits(t)["name"]


def bytes_per_token(kv_type, role: int, head_dim: int, group: int = 0) -> float:
    return _lib.kvq_type_bytes_per_token(type_from_name(kv_type), role, head_dim, group)


def page_layout(type_k, type_v, n_kv_heads, head_dim, page_tokens=64, group=0) -> PageLayout:
    lay = PageLayout()
    _check(_lib.kvq_page_layout_make(type_from_name(type_k), type_from_name(type_v), n_kv_heads, head_dim,
                                     page_tokens, group, C.byref(lay)))
    return lay


_IDS_MEMO: dict = {}


def _ids(seq_ids):
    """(array, int32 pointer) for a list of ints. Memoized: the same few lists (sequence ids, [1] * batch) come back
    at every layer of every decode step, and building them anew cost ~6 us each, a visible part of a step's host
    time at batch 1. The arrays are only read by the C calls."""
    key = tuple(int(x) for x in seq_ids) if not isinstance(seq_ids, np.ndarray) else tuple(seq_ids.reshape(-1).tolist())
    r = _IDS_MEMO.get(key)
    if r is None:
        if len(_IDS_MEMO) > 256:
            _IDS_MEMO.clear()
        if any(x < -2**31 or x >= 2**31 for x in key):
            raise OverflowError(f"kvq: {list(key)} does not fit int32")
        a = (C.c_int32 * len(key))(*key)
        r = _IDS_MEMO[key] = (a, C.cast(a, _I32P))
    return r


_NP_DTYPES = {np.dtype(np.float32): DTYPE_F32, np.dtype(np.float16): DTYPE_F16}


def make_config(n_layers, n_kv_heads, head_dim, type_k="f16", type_v=None, arena_bytes=0, page_tokens=0,
                group=0, residual=-1, max_seqs=0, n_threads=0) -> CacheConfig:
    cfg = _lib.kvq_cache_config_default()
    cfg.n_layers, cfg.n_kv_heads, cfg.head_dim = int(n_layers), int(n_kv_heads), int(head_dim)
    cfg.type_k = type_from_name(type_k)
    cfg.type_v = type_from_name(type_v if type_v is not None else type_k)
    cfg.arena_bytes = int(arena_bytes)
    cfg.page_tokens, cfg.group, cfg.residual = int(page_tokens), int(group), int(residual)
    cfg.max_seqs, cfg.n_threads = int(max_seqs), int(n_threads)
    return cfg


def arena_bytes_for(n_layers, n_kv_heads, head_dim, type_k, type_v=None, tokens_per_seq=4096, n_seqs=1,
                    page_tokens=64, group=0, slack_pages_per_seq=2) -> int:
    """Arena bytes for n_seqs sequences of tokens_per_seq tokens each, in every layer, with a few pages of slack per
    (sequence, layer) for copy-on-write after a fork."""
    lay = page_layout(type_k, type_v if type_v is not None else type_k, n_kv_heads, head_dim, page_tokens or 64, group)
    P = lay.page_tokens
    pages = n_layers * n_seqs * (-(-int(tokens_per_seq) // P) + slack_pages_per_seq)
    return pages * lay.page_bytes


_PARAMS_MEMO: dict = {}


def _params(n_q_heads, scale=0.0, window=0, softcap=0.0) -> AttnParams:
    """The AttnParams struct, memoized like _ids (the C calls only read it)."""
    key = (int(n_q_heads), float(scale or 0.0), int(window or 0), float(softcap or 0.0))
    p = _PARAMS_MEMO.get(key)
    if p is None:
        if len(_PARAMS_MEMO) > 256:
            _PARAMS_MEMO.clear()
        p = _PARAMS_MEMO[key] = AttnParams(*key)
    return p


class Cache:
    """A CPU kvq_cache. Arrays are numpy (float32 or float16) or raw addresses through the *_ptr methods."""

    def __init__(self, n_layers, n_kv_heads, head_dim, type_k="f16", type_v=None, arena_bytes=None,
                 max_tokens=4096, page_tokens=0, group=0, residual=-1, max_seqs=0, n_threads=0):
        if arena_bytes is None:
            arena_bytes = arena_bytes_for(n_layers, n_kv_heads, head_dim, type_k, type_v, max_tokens, 1,
                                          page_tokens or 64, group)
        cfg = make_config(n_layers, n_kv_heads, head_dim, type_k, type_v, arena_bytes, page_tokens, group, residual,
                          max_seqs, n_threads)
        h = _P()
        _check(_lib.kvq_cache_create(C.byref(cfg), C.byref(h)))
        self._h = h
        self.config = CacheConfig()
        self.layout = PageLayout()
        _check(_lib.kvq_cache_get_config(h, C.byref(self.config), C.byref(self.layout)))
        self.n_layers, self.n_kv_heads, self.head_dim = self.config.n_layers, self.config.n_kv_heads, \
            self.config.head_dim

    def close(self):
        if getattr(self, "_h", None):
            _lib.kvq_cache_free(self._h)
            self._h = None

    __del__ = close

    # sequences
    def seq_new(self) -> int:
        s = C.c_int32()
        _check(_lib.kvq_seq_new(self._h, C.byref(s)))
        return s.value

    def seq_fork(self, src: int) -> int:
        s = C.c_int32()
        _check(_lib.kvq_seq_fork(self._h, int(src), C.byref(s)))
        return s.value

    def seq_truncate(self, seq: int, n_tokens: int) -> None:
        _check(_lib.kvq_seq_truncate(self._h, int(seq), int(n_tokens)))

    def seq_free(self, seq: int) -> None:
        _check(_lib.kvq_seq_free(self._h, int(seq)))

    def seq_length(self, seq: int, layer: int = 0) -> int:
        n = C.c_int64()
        _check(_lib.kvq_seq_length(self._h, int(seq), int(layer), C.byref(n)))
        return n.value

    def stats(self) -> dict:
        s = CacheStats()
        _check(_lib.kvq_cache_get_stats(self._h, C.byref(s)))
        return _stats_dict(s)

    # append
    def append_ptr(self, layer, seq_ids, n_tokens, dtype: int, k_addr: int, v_addr: int) -> None:
        ids, idp = _ids(seq_ids)
        nt, ntp = _ids(n_tokens)
        if len(ids) != len(nt):
            raise ValueError("kvq: seq_ids and n_tokens differ in length")
        _check(_lib.kvq_append(self._h, int(layer), len(ids), idp, ntp, int(dtype), _P(k_addr), _P(v_addr)))

    def append(self, layer, seq_ids, n_tokens, k: np.ndarray, v: np.ndarray) -> None:
        """k, v: [sum n_tokens][n_kv_heads][head_dim], float32 or float16."""
        k = np.ascontiguousarray(k)
        v = np.ascontiguousarray(v)
        if k.dtype != v.dtype or k.dtype not in _NP_DTYPES:
            raise TypeError("kvq: k and v must both be float32 or float16 numpy arrays")
        total = int(np.sum(n_tokens))
        want = (total, self.n_kv_heads, self.head_dim)
        if k.shape != want or v.shape != want:
            raise ValueError(f"kvq: k/v shape {k.shape}/{v.shape}, expected {want}")
        self.append_ptr(layer, seq_ids, n_tokens, _NP_DTYPES[k.dtype], k.ctypes.data, v.ctypes.data)

    def read(self, seq, layer, start=0, n=None):
        if n is None:
            n = self.seq_length(seq, layer) - start
        k = np.empty((n, self.n_kv_heads, self.head_dim), np.float32)
        v = np.empty_like(k)
        _check(_lib.kvq_read(self._h, int(seq), int(layer), int(start), int(n), k.ctypes.data, v.ctypes.data))
        return k, v

    def read_into(self, seq, layer, start, n, k_addr, v_addr) -> None:
        _check(_lib.kvq_read(self._h, int(seq), int(layer), int(start), int(n), _P(k_addr), _P(v_addr)))

    # attention (fp32 q / out)
    def attn_decode_ptr(self, layer, seq_ids, q_addr, out_addr, n_q_heads, scale=0.0, window=0, softcap=0.0):
        ids, idp = _ids(seq_ids)
        p = _params(n_q_heads, scale, window, softcap)
        _check(_lib.kvq_attn_decode(self._h, int(layer), len(ids), idp, _P(q_addr), _P(out_addr), C.byref(p)))

    def attn_prefill_ptr(self, layer, seq, n_q, q_addr, out_addr, n_q_heads, scale=0.0, window=0, softcap=0.0):
        p = _params(n_q_heads, scale, window, softcap)
        _check(_lib.kvq_attn_prefill(self._h, int(layer), int(seq), int(n_q), _P(q_addr), _P(out_addr), C.byref(p)))

    def attn_decode(self, layer, seq_ids, q: np.ndarray, scale=0.0, window=0, softcap=0.0) -> np.ndarray:
        """q: [n_seqs][n_q_heads][head_dim] -> out of the same shape (float32)."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        out = np.empty_like(q)
        self.attn_decode_ptr(layer, seq_ids, q.ctypes.data, out.ctypes.data, q.shape[1], scale, window, softcap)
        return out

    def attn_prefill(self, layer, seq, q: np.ndarray, scale=0.0, window=0, softcap=0.0) -> np.ndarray:
        """q: [n_q][n_q_heads][head_dim], the last n_q tokens of `seq` -> out of the same shape (float32)."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        out = np.empty_like(q)
        self.attn_prefill_ptr(layer, seq, q.shape[0], q.ctypes.data, out.ctypes.data, q.shape[1], scale, window,
                              softcap)
        return out


# ----------------------------------------------------------------------------------------------------------------
# CUDA backend (optional library)
# ----------------------------------------------------------------------------------------------------------------
_cuda, CUDA_LIBRARY_PATH = _load("KVQ_CUDA_LIBRARY", ["libkvq_cuda_py.so"], "the kvq CUDA library", False)
_CUDA_WHY = ""  # why a CUDA library that was found cannot be used
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
    ]
    try:
        for _n, _r, _a in _cuda_entries:
            _proto(_cuda, _n, _r, *_a)
    except AttributeError:  # a library built from an older tree: the CPU part stays usable
        _CUDA_WHY = (f"{CUDA_LIBRARY_PATH} is older than this package (no {_n}): rebuild it "
                     "(python3 python/build_native.py or pip install .)")
        _cuda = None


def _check_cuda(status):
    _check(status, _cuda.kvq_cuda_last_error)


def cuda_available() -> tuple[bool, str]:
    """(True, "") when the CUDA library is loaded and a usable GPU (sm_90) is there, else (False, why)."""
    if _cuda is None:
        return False, _CUDA_WHY or "libkvq was built without its CUDA backend (no nvcc at build time)"
    n = C.c_int()
    st = _cuda.kvq_cuda_device_count(C.byref(n))
    if st < 0 or n.value < 1:
        return False, _cuda.kvq_cuda_last_error().decode() or "no usable GPU"
    return True, ""


class CudaCache:
    """A device kvq_cuda_cache. Tensors are passed as device addresses; `stream` is a cudaStream_t as int (0: legacy
    default stream)."""

    def __init__(self, n_layers, n_kv_heads, head_dim, type_k="f16", type_v=None, arena_bytes=None,
                 max_tokens=4096, residual=-1, max_seqs=0, device=0, max_seq_tokens=0):
        ok, why = cuda_available()
        if not ok:
            raise KvqError(-13, f"kvq CUDA backend unavailable: {why}")
        if arena_bytes is None:
            arena_bytes = arena_bytes_for(n_layers, n_kv_heads, head_dim, type_k, type_v, max_tokens, 1)
        cfg = make_config(n_layers, n_kv_heads, head_dim, type_k, type_v, arena_bytes, 64, 0, residual, max_seqs, 0)
        h = _P()
        _check_cuda(_cuda.kvq_cuda_cache_create(C.byref(cfg), int(device), int(max_seq_tokens), C.byref(h)))
        self._h = h
        self.config = CacheConfig()
        self.layout = PageLayout()
        _check_cuda(_cuda.kvq_cuda_cache_get_config(h, C.byref(self.config), C.byref(self.layout)))
        self.n_layers, self.n_kv_heads, self.head_dim = self.config.n_layers, self.config.n_kv_heads, \
            self.config.head_dim

    def close(self):
        if getattr(self, "_h", None):
            _cuda.kvq_cuda_cache_free(self._h)
            self._h = None

    __del__ = close

    def seq_new(self) -> int:
        s = C.c_int32()
        _check_cuda(_cuda.kvq_cuda_seq_new(self._h, C.byref(s)))
        return s.value

    def seq_free(self, seq) -> None:
        _check_cuda(_cuda.kvq_cuda_seq_free(self._h, int(seq)))

    def seq_fork(self, src, stream=0) -> int:
        """New sequence sharing src's pages (copy on write); the window copies are enqueued on `stream`."""
        s = C.c_int32()
        _check_cuda(_cuda.kvq_cuda_seq_fork(self._h, int(src), C.byref(s), _P(stream or None)))
        return s.value

    def seq_truncate(self, seq, n_tokens, stream=0) -> None:
        """Keep the first n_tokens tokens of every layer (kvq_seq_truncate semantics); device work on `stream`."""
        _check_cuda(_cuda.kvq_cuda_seq_truncate(self._h, int(seq), int(n_tokens), _P(stream or None)))

    def seq_length(self, seq, layer=0) -> int:
        n = C.c_int64()
        _check_cuda(_cuda.kvq_cuda_seq_length(self._h, int(seq), int(layer), C.byref(n)))
        return n.value

    def stats(self) -> dict:
        s = CudaStats()
        _check_cuda(_cuda.kvq_cuda_cache_get_stats(self._h, C.byref(s)))
        return _stats_dict(s)

    def append_ptr(self, layer, seq_ids, n_tokens, dtype, k_addr, v_addr, stream=0) -> None:
        ids, idp = _ids(seq_ids)
        nt, ntp = _ids(n_tokens)
        _check_cuda(_cuda.kvq_cuda_append(self._h, int(layer), len(ids), idp, ntp, int(dtype), _P(k_addr),
                                          _P(v_addr), _P(stream or None)))

    def attn_decode_ptr(self, layer, seq_ids, qo_dtype, q_addr, out_addr, n_q_heads, scale=0.0, window=0,
                        softcap=0.0, stream=0) -> None:
        ids, idp = _ids(seq_ids)
        p = _params(n_q_heads, scale, window, softcap)
        _check_cuda(_cuda.kvq_cuda_attn_decode(self._h, int(layer), len(ids), idp, int(qo_dtype), _P(q_addr),
                                               _P(out_addr), C.byref(p), _P(stream or None)))

    def attn_prefill_ptr(self, layer, seq, n_q, qo_dtype, q_addr, out_addr, n_q_heads, scale=0.0, window=0,
                         softcap=0.0, stream=0) -> None:
        p = _params(n_q_heads, scale, window, softcap)
        _check_cuda(_cuda.kvq_cuda_attn_prefill(self._h, int(layer), int(seq), int(n_q), int(qo_dtype), _P(q_addr),
                                                _P(out_addr), C.byref(p), _P(stream or None)))

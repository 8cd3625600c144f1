"""Argument checks of the Python bindings (issue 17) and their lifetime / import behaviour (issue 16). numpy only.

Every bad call must raise a named Python exception (TypeError, ValueError, OverflowError, KvqError and its
subclasses) before any C call, and leave the cache exactly as it was: the tests compare full snapshots (stats,
every length, every dequantized byte). Calls that corrupted memory before the checks existed (q of the wrong head
dim: C wrote n_q_heads * head_dim floats per row into the smaller `out`; raw addresses like -1) run in a child
process, so that on code without the checks they fail as a crash of that child, not of the whole test run.
"""
import ctypes
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import kvq
from kvq import _native as N

PY_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "python"))
H, D = 2, 64


_BLOCK_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"


def run_child(code: str, env=None, prelude: str = _BLOCK_TORCH):
    """Runs `code` in a fresh python with this package; (returncode, stdout + stderr). By default the child runs as
    without torch: `import kvq` would otherwise import torch and transformers (seconds) to register its attention."""
    head = "" if os.environ.get("KVQ_TEST_INSTALLED") else f"import sys; sys.path.insert(0, {PY_DIR!r})\n"
    src = prelude + head + textwrap.dedent(code)
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=300, env=e)
    return p.returncode, p.stdout + p.stderr


def snapshot(c, seqs):
    lens = [[c.seq_length(s, layer) for layer in range(c.n_layers)] for s in seqs]
    data = []
    for s in seqs:
        for layer in range(c.n_layers):
            k, v = c.read(s, layer)
            data.append((k.tobytes(), v.tobytes()))
    return c.stats(), lens, data


@pytest.fixture
def filled():
    rng = np.random.default_rng(5)
    c = kvq.Cache(2, H, D, "q8", max_tokens=256, max_seqs=4)
    a, b = c.seq_new(), c.seq_new()
    for layer in range(2):
        k = rng.standard_normal((30, H, D)).astype(np.float32)
        c.append(layer, [a, b], [20, 10], k, k * 0.5)
    yield c, a, b
    c.close()


# ----------------------------------------------------------------------------------------------------------------
# the overflows of issue 17, each in a child process
# ----------------------------------------------------------------------------------------------------------------
_SETUP = """
import numpy as np, kvq
c = kvq.Cache(1, 2, 64, "f16", max_tokens=64, max_seqs=4)
s = c.seq_new()
k = np.ones((4, 2, 64), np.float32)
c.append(0, [s], [4], k, k)
def attempt(f):
    before = (c.stats(), c.seq_length(s, 0), [x.tobytes() for x in c.read(s, 0)])
    try:
        f()
    except Exception as e:
        print("RAISED", type(e).__name__, e)
        assert (c.stats(), c.seq_length(s, 0), [x.tobytes() for x in c.read(s, 0)]) == before, "changed"
        return
    print("NO ERROR")
"""

OVERFLOWS = {
    # the example: head_dim 32 queries on a head_dim 64 cache (glibc heap-corruption abort before)
    "decode_q_head_dim": ("attempt(lambda: c.attn_decode(0, [s], np.ones((1, 8, 32), np.float32)))", "ValueError",
                          "head dim 32"),
    "prefill_q_head_dim": ("attempt(lambda: c.attn_prefill(0, s, np.ones((4, 8, 32), np.float32)))", "ValueError",
                           "head dim 32"),
    # one query row for two sequences: C read and wrote a second row past both arrays
    "decode_q_rows": ("t = c.seq_new(); c.append(0, [t], [4], k, k)\n"
                      "attempt(lambda: c.attn_decode(0, [s, t], np.ones((1, 8, 64), np.float32)))", "ValueError",
                      "1 rows, len\\(seq_ids\\) = 2"),
    # a 2-D q: its second axis (head_dim 64) was taken for 64 query heads, 64 x 64 floats written into 4 x 64
    "decode_q_2d": ("attempt(lambda: c.attn_decode(0, [s], np.ones((4, 64), np.float32)))", "ValueError", "3-D"),
    # raw addresses that are not addresses: -1 became 0xffffffffffffffff
    "append_ptr_negative_address": ("attempt(lambda: c.append_ptr(0, [s], [1], 0, -1, k.ctypes.data))",
                                    "OverflowError", "k_addr = -1"),
    "read_into_negative_address": ("attempt(lambda: c.read_into(s, 0, 0, 4, -8, None))", "OverflowError",
                                   "k_addr = -8"),
}


@pytest.mark.parametrize("case", sorted(OVERFLOWS))
def test_overflow_examples_raise_in_python(case):
    code, exc, match = OVERFLOWS[case]
    rc, out = run_child(_SETUP + code + "\n")
    assert rc == 0, f"{case}: the child died (rc {rc}): {out[-2000:]}"
    import re
    assert re.search(rf"RAISED {exc} .*{match}", out), f"{case}: expected {exc} ({match}), got: {out[-2000:]}"


def test_layer_2_pow_40_does_not_reach_layer_0(filled):
    """ctypes truncated 2**40 to 0: the tokens went into layer 0."""
    c, a, b = filled
    before = snapshot(c, [a, b])
    k = np.ones((3, H, D), np.float32)
    with pytest.raises(OverflowError, match="layer = 1099511627776 does not fit int32"):
        c.append(2**40, [a], [3], k, k)
    with pytest.raises(OverflowError, match="layer"):
        c.append_ptr(2**40, [a], [3], N.DTYPE_F32, k.ctypes.data, k.ctypes.data)
    assert snapshot(c, [a, b]) == before


# ----------------------------------------------------------------------------------------------------------------
# every bad argument: the named error, nothing changed
# ----------------------------------------------------------------------------------------------------------------
K3 = np.ones((3, H, D), np.float32)
Q1 = np.ones((1, 4, D), np.float32)

BAD = {
    # append
    "append layer bool": (lambda c, a, b: c.append(True, [a], [3], K3, K3), TypeError, "layer must be an int"),
    "append layer float": (lambda c, a, b: c.append(1.0, [a], [3], K3, K3), TypeError, "layer must be an int"),
    "append n_tokens float": (lambda c, a, b: c.append(0, [a], [3.0], K3, K3), TypeError, r"n_tokens\[0\]"),
    "append n_tokens negative": (lambda c, a, b: c.append(0, [a, b], [4, -1], K3, K3), ValueError, "negative"),
    "append seq id 2**32": (lambda c, a, b: c.append(0, [2**32 + a], [3], K3, K3), OverflowError, "int32"),
    "append seq_ids str": (lambda c, a, b: c.append(0, "ab", [3], K3, K3), TypeError, "seq_ids must be a list"),
    "append seq_ids int": (lambda c, a, b: c.append(0, a, [3], K3, K3), TypeError, "seq_ids must be a list"),
    "append seq_ids float array": (lambda c, a, b: c.append(0, np.array([a], np.float64), [3], K3, K3), TypeError,
                                   "integers"),
    "append seq_ids 2-D": (lambda c, a, b: c.append(0, np.array([[a]]), [3], K3, K3), ValueError, "1-D"),
    "append counts length": (lambda c, a, b: c.append(0, [a, b], [3], K3, K3), ValueError, "2 entries, n_tokens 1"),
    "append float64": (lambda c, a, b: c.append(0, [a], [3], K3.astype(np.float64), K3.astype(np.float64)),
                       TypeError, "float64"),
    "append list": (lambda c, a, b: c.append(0, [a], [3], K3.tolist(), K3.tolist()), TypeError, "numpy array"),
    "append mixed dtypes": (lambda c, a, b: c.append(0, [a], [3], K3, K3.astype(np.float16)), TypeError, "both"),
    "append shape": (lambda c, a, b: c.append(0, [a], [3], np.ones((3, 3, D), np.float32),
                                              np.ones((3, 3, D), np.float32)), ValueError, "shape"),
    "append rows vs counts": (lambda c, a, b: c.append(0, [a], [2], K3, K3), ValueError, "shape"),
    "append_ptr dtype 2**32": (lambda c, a, b: c.append_ptr(0, [a], [3], 2**32, K3.ctypes.data, K3.ctypes.data),
                               OverflowError, "dtype"),
    "append_ptr dtype 7": (lambda c, a, b: c.append_ptr(0, [a], [3], 7, K3.ctypes.data, K3.ctypes.data), ValueError,
                           "not a kvq_dtype"),
    "append_ptr address float": (lambda c, a, b: c.append_ptr(0, [a], [3], 0, float(K3.ctypes.data),
                                                              K3.ctypes.data), TypeError, "k_addr"),
    # sequences
    "truncate 2**64": (lambda c, a, b: c.seq_truncate(a, 2**64), OverflowError, "n_tokens .* int64"),
    "truncate float": (lambda c, a, b: c.seq_truncate(a, 5.5), TypeError, "n_tokens"),
    "truncate seq 2**32": (lambda c, a, b: c.seq_truncate(2**32 + a, 5), OverflowError, "seq"),
    "fork 2**32": (lambda c, a, b: c.seq_fork(2**32 + a), OverflowError, "src"),
    "fork str": (lambda c, a, b: c.seq_fork("0"), TypeError, "src"),
    "free 2**32": (lambda c, a, b: c.seq_free(2**32 + a), OverflowError, "seq"),
    "length layer 2**32": (lambda c, a, b: c.seq_length(a, 2**32), OverflowError, "layer"),
    # read back
    "read n huge": (lambda c, a, b: c.read(a, 0, 0, 10**12), kvq.KvqError, "outside"),
    "read start past end": (lambda c, a, b: c.read(a, 0, 25), kvq.KvqError, "outside"),
    "read start 2**63": (lambda c, a, b: c.read(a, 0, 2**63), OverflowError, "start"),
    "read seq float": (lambda c, a, b: c.read(float(a), 0), TypeError, "seq"),
    "read_into n 2**64": (lambda c, a, b: c.read_into(a, 0, 0, 2**64, None, None), OverflowError, "n ="),
    # attention
    "decode window 2**31": (lambda c, a, b: c.attn_decode(0, [a], Q1, window=2**31), OverflowError, "window"),
    "decode window negative": (lambda c, a, b: c.attn_decode(0, [a], Q1, window=-1), ValueError, "window"),
    "decode scale nan": (lambda c, a, b: c.attn_decode(0, [a], Q1, scale=float("nan")), ValueError, "scale"),
    "decode scale str": (lambda c, a, b: c.attn_decode(0, [a], Q1, scale="0.1"), TypeError, "scale"),
    "decode scale 1e39": (lambda c, a, b: c.attn_decode(0, [a], Q1, scale=1e39), OverflowError, "float32"),
    "decode softcap -1": (lambda c, a, b: c.attn_decode(0, [a], Q1, softcap=-1.0), ValueError, "softcap"),
    "decode q int": (lambda c, a, b: c.attn_decode(0, [a], np.ones((1, 4, D), np.int32)), TypeError, "dtype int32"),
    "decode q rows": (lambda c, a, b: c.attn_decode(0, [a], np.ones((2, 4, D), np.float32)), ValueError, "2 rows"),
    "decode q heads": (lambda c, a, b: c.attn_decode(0, [a], np.ones((1, 3, D), np.float32)), ValueError,
                       "3 query heads"),
    "decode q no heads": (lambda c, a, b: c.attn_decode(0, [a], np.ones((1, 0, D), np.float32)), ValueError,
                          "0 query heads"),
    "decode layer 2**32": (lambda c, a, b: c.attn_decode(2**32, [a], Q1), OverflowError, "layer"),
    "decode_ptr heads 2**32+4": (lambda c, a, b: c.attn_decode_ptr(0, [a], Q1.ctypes.data, Q1.copy().ctypes.data,
                                                                   2**32 + 4), OverflowError, "n_q_heads"),
    "decode_ptr heads 4.0": (lambda c, a, b: c.attn_decode_ptr(0, [a], Q1.ctypes.data, Q1.copy().ctypes.data, 4.0),
                             TypeError, "n_q_heads"),
    "prefill q head dim": (lambda c, a, b: c.attn_prefill(0, a, np.ones((2, 4, 128), np.float32)), ValueError,
                           "head dim 128"),
    "prefill seq 2**32": (lambda c, a, b: c.attn_prefill(0, 2**32 + a, Q1), OverflowError, "seq"),
    "prefill_ptr n_q 2**31": (lambda c, a, b: c.attn_prefill_ptr(0, a, 2**31, Q1.ctypes.data,
                                                                 Q1.copy().ctypes.data, 4), OverflowError, "n_q"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_argument_raises_named_error_and_changes_nothing(filled, case):
    c, a, b = filled
    f, exc, match = BAD[case]
    before = snapshot(c, [a, b])
    with pytest.raises(exc, match=match):
        f(c, a, b)
    assert snapshot(c, [a, b]) == before, f"{case}: the cache changed"


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(head_dim=64.0), TypeError, "head_dim"),
    (dict(head_dim=2**32 + 64), OverflowError, "head_dim"),
    (dict(n_layers=2**31), OverflowError, "n_layers"),
    (dict(arena_bytes=-1), OverflowError, "arena_bytes .* size_t"),
    (dict(arena_bytes=2**64), OverflowError, "arena_bytes"),
    (dict(max_seqs=2**32 + 2), OverflowError, "max_seqs"),
    (dict(residual=2**32), OverflowError, "residual"),
    (dict(max_tokens=-5), ValueError, "max_tokens"),
    (dict(max_tokens=2.5), TypeError, "max_tokens"),
    (dict(type_k=2**32 + 4), ValueError, "unknown kv type"),
    (dict(type_k=None), TypeError, "kv type"),
    (dict(type_k=True), TypeError, "kv type"),
    (dict(type_k="q4\0"), ValueError, "unknown kv type"),
    (dict(type_v=7), ValueError, "unknown kv type"),  # past KVQ_TYPE_COUNT
])
def test_cache_config_checked(kwargs, exc, match):
    args = dict(n_layers=1, n_kv_heads=2, head_dim=64, type_k="q8", max_tokens=64)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        kvq.Cache(**args)


def test_module_functions_checked():
    assert kvq.type_from_name(np.int64(4)) == 4 and kvq.type_name(2) == "q8"
    with pytest.raises(ValueError, match="unknown kv type"):
        kvq.type_from_name(2**32 + 2)  # was truncated to 2 (q8)
    with pytest.raises(ValueError, match="unknown kv type"):
        kvq.type_name(99)
    with pytest.raises(ValueError, match="role 2"):
        kvq.bytes_per_token("q4", 2, 128)  # was 0.0
    with pytest.raises(ValueError, match="head_dim 48"):
        kvq.bytes_per_token("q4", 0, 48)  # was 0.0
    with pytest.raises(OverflowError, match="head_dim"):
        kvq.bytes_per_token("q4", 0, 2**32 + 128)  # was 72.0 (truncated to 128)
    with pytest.raises(OverflowError, match="head_dim"):
        kvq.page_layout("q4", "q4", 2, 2**32 + 64)
    with pytest.raises(ValueError, match="tokens_per_seq"):
        kvq.arena_bytes_for(1, 2, 64, "q8", tokens_per_seq=-64)
    with pytest.raises(OverflowError, match="size_t"):
        kvq.arena_bytes_for(2**20, 2, 64, "q8", tokens_per_seq=2**50, n_seqs=2**20)


def test_valid_inputs_still_accepted(filled):
    """The checks take numpy integers, integer arrays of ids, and copy non-contiguous / other float arrays."""
    c, a, b = filled
    rng = np.random.default_rng(9)
    q = rng.standard_normal((2, 4, D)).astype(np.float32)
    ref = c.attn_decode(0, [a, b], q)
    np.testing.assert_array_equal(c.attn_decode(np.int64(0), np.array([a, b], np.int32), q), ref)
    wide = np.zeros((2, 4, 2 * D), np.float32)
    wide[:, :, ::2] = q
    assert not wide[:, :, ::2].flags.c_contiguous
    np.testing.assert_array_equal(c.attn_decode(0, (a, b), wide[:, :, ::2]), ref)
    np.testing.assert_array_equal(c.attn_decode(0, [a, b], q.astype(np.float64)), ref)
    qp = rng.standard_normal((3, 4, D)).astype(np.float32)
    np.testing.assert_array_equal(c.attn_prefill(1, b, np.asfortranarray(qp)), c.attn_prefill(1, b, qp))
    k = rng.standard_normal((2, H, D)).astype(np.float32)
    c.append(np.int32(1), np.array([a], np.int64), np.array([2], np.uint8), np.asfortranarray(k), k[::1])
    kr, _ = c.read(a, 1, 20, 2)
    np.testing.assert_allclose(kr, k, atol=0.05)
    assert c.seq_length(np.int16(a), np.int8(1)) == 22
    assert c.attn_decode(0, [a], Q1, scale=np.float32(0.125), window=np.int64(5), softcap=None).shape == (1, 4, D)


# ----------------------------------------------------------------------------------------------------------------
# lifetime: context manager, closed caches
# ----------------------------------------------------------------------------------------------------------------
def test_context_manager_and_closed_cache():
    with kvq.Cache(1, H, D, "q4", max_tokens=64) as c:
        assert not c.closed
        s = c.seq_new()
        c.append(0, [s], [3], K3, K3)
        assert c.seq_length(s) == 3
    assert c.closed
    calls = {
        "seq_new": lambda: c.seq_new(), "seq_fork": lambda: c.seq_fork(s), "seq_free": lambda: c.seq_free(s),
        "seq_truncate": lambda: c.seq_truncate(s, 1), "seq_length": lambda: c.seq_length(s), "stats": c.stats,
        "append": lambda: c.append(0, [s], [3], K3, K3), "read": lambda: c.read(s, 0),
        "append_ptr": lambda: c.append_ptr(0, [s], [3], 0, K3.ctypes.data, K3.ctypes.data),
        "read_into": lambda: c.read_into(s, 0, 0, 1, None, None),
        "attn_decode": lambda: c.attn_decode(0, [s], Q1), "attn_prefill": lambda: c.attn_prefill(0, s, Q1),
        "attn_decode_ptr": lambda: c.attn_decode_ptr(0, [s], Q1.ctypes.data, Q1.copy().ctypes.data, 4),
        "attn_prefill_ptr": lambda: c.attn_prefill_ptr(0, s, 1, Q1.ctypes.data, Q1.copy().ctypes.data, 4),
    }
    for name, f in calls.items():
        with pytest.raises(kvq.CacheClosedError, match="closed"):
            f()
    with pytest.raises(ValueError, match="closed"):  # a CacheClosedError is a ValueError, like a closed file's
        c.stats()
    c.close()  # idempotent
    with pytest.raises(kvq.CacheClosedError):
        with c:
            pass


def test_exception_in_with_block_still_frees():
    with pytest.raises(ZeroDivisionError):
        with kvq.Cache(1, H, D) as c:
            c.seq_new()
            1 / 0
    assert c.closed


# ----------------------------------------------------------------------------------------------------------------
# CudaCache: the same checks, before any call into the CUDA library (a recording fake stands in for it)
# ----------------------------------------------------------------------------------------------------------------
class FakeCuda:
    """Records every kvq_cuda_* call; each succeeds."""

    def __init__(self):
        self.calls = []

    def kvq_cuda_last_error(self):
        return b""

    def __getattr__(self, name):
        if not name.startswith("kvq_cuda_"):
            raise AttributeError(name)

        def f(*args):
            self.calls.append((name, args))
            return 0
        return f


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(N, "_cuda", fake)
    g = object.__new__(N.CudaCache)
    g._h = ctypes.c_void_p(0x1000)
    g.n_layers, g.n_kv_heads, g.head_dim = 2, H, D
    yield g, fake
    g._h = None


CUDA_BAD = {
    "append layer 2**40": (lambda g: g.append_ptr(2**40, [0], [1], 0, 4096, 4096), OverflowError, "layer"),
    "append dtype 2**32": (lambda g: g.append_ptr(0, [0], [1], 2**32, 4096, 4096), OverflowError, "dtype"),
    "append dtype 5": (lambda g: g.append_ptr(0, [0], [1], 5, 4096, 4096), ValueError, "kvq_dtype"),
    "append counts": (lambda g: g.append_ptr(0, [0, 1], [1], 0, 4096, 4096), ValueError, "n_tokens 1"),
    "append count float": (lambda g: g.append_ptr(0, [0], [1.0], 0, 4096, 4096), TypeError, "n_tokens"),
    "append address -1": (lambda g: g.append_ptr(0, [0], [1], 0, -1, 4096), OverflowError, "k_addr"),
    "append stream -1": (lambda g: g.append_ptr(0, [0], [1], 0, 4096, 4096, -1), OverflowError, "stream"),
    "decode heads 2**32+8": (lambda g: g.attn_decode_ptr(0, [0], 0, 4096, 8192, 2**32 + 8), OverflowError,
                             "n_q_heads"),
    "decode qo_dtype 3": (lambda g: g.attn_decode_ptr(0, [0], 3, 4096, 8192, 8), ValueError, "kvq_dtype"),
    "decode window 2**31": (lambda g: g.attn_decode_ptr(0, [0], 0, 4096, 8192, 8, window=2**31), OverflowError,
                            "window"),
    "decode scale inf": (lambda g: g.attn_decode_ptr(0, [0], 0, 4096, 8192, 8, scale=float("inf")), ValueError,
                         "scale"),
    "prefill n_q 2**31": (lambda g: g.attn_prefill_ptr(0, 0, 2**31, 0, 4096, 8192, 8), OverflowError, "n_q"),
    "prefill seq float": (lambda g: g.attn_prefill_ptr(0, 0.0, 1, 0, 4096, 8192, 8), TypeError, "seq"),
    "fork 2**32": (lambda g: g.seq_fork(2**32), OverflowError, "src"),
    "truncate 2**64": (lambda g: g.seq_truncate(0, 2**64), OverflowError, "n_tokens"),
    "truncate stream str": (lambda g: g.seq_truncate(0, 1, "s"), TypeError, "stream"),
    "free bool": (lambda g: g.seq_free(False), TypeError, "seq"),
    "length layer 2**32": (lambda g: g.seq_length(0, 2**32), OverflowError, "layer"),
}


@pytest.mark.parametrize("case", sorted(CUDA_BAD))
def test_cuda_bad_argument_raises_before_the_library(fake_cuda, case):
    g, fake = fake_cuda
    f, exc, match = CUDA_BAD[case]
    with pytest.raises(exc, match=match):
        f(g)
    assert fake.calls == [], f"{case}: reached the CUDA library: {fake.calls}"


def test_cuda_good_arguments_reach_the_library(fake_cuda):
    g, fake = fake_cuda
    g.append_ptr(np.int64(1), np.array([0, 1]), [2, 3], N.DTYPE_F16, 4096, 8192, 77)
    g.attn_decode_ptr(1, [0, 1], N.DTYPE_BF16, 4096, 8192, 8, 0.5, 16, 30.0, 77)
    g.attn_prefill_ptr(1, 1, 5, N.DTYPE_F32, 4096, 8192, 4, stream=0)
    g.seq_fork(1, 77)
    g.seq_truncate(1, 3, 77)
    names = [n for n, _ in fake.calls]
    assert names == ["kvq_cuda_append", "kvq_cuda_attn_decode", "kvq_cuda_attn_prefill", "kvq_cuda_seq_fork",
                     "kvq_cuda_seq_truncate"]
    args = fake.calls[0][1]
    assert args[1:3] == (1, 2) and args[5:] == (N.DTYPE_F16, 4096, 8192, 77)
    p = fake.calls[1][1][7]._obj
    assert (p.n_q_heads, p.scale, p.window, p.softcap) == (8, 0.5, 16, 30.0)
    assert fake.calls[2][1][8] is None  # stream 0: the legacy default stream (NULL)


def test_cuda_closed_cache_raises_before_the_library(fake_cuda):
    g, fake = fake_cuda
    g._h = None
    for f in (g.seq_new, lambda: g.seq_free(0), lambda: g.seq_length(0), g.stats, lambda: g.seq_fork(0),
              lambda: g.seq_truncate(0, 1), lambda: g.append_ptr(0, [0], [1], 0, 4096, 4096),
              lambda: g.attn_decode_ptr(0, [0], 0, 4096, 8192, 8),
              lambda: g.attn_prefill_ptr(0, 0, 1, 0, 4096, 8192, 8)):
        with pytest.raises(kvq.CacheClosedError, match="CudaCache is closed"):
            f()
    assert fake.calls == []


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(device=2**32), OverflowError, "device"),
    (dict(max_seq_tokens=2**63), OverflowError, "max_seq_tokens"),
    (dict(head_dim=64.0), TypeError, "head_dim"),
    (dict(arena_bytes=-1), OverflowError, "arena_bytes"),
])
def test_cuda_cache_config_checked_first(kwargs, exc, match):
    """Bad arguments are named even where no GPU is (they were hidden behind 'CUDA backend unavailable')."""
    args = dict(n_layers=1, n_kv_heads=2, head_dim=64)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        kvq.CudaCache(**args)


# ----------------------------------------------------------------------------------------------------------------
# cuda_available: why, told apart (issue 16)
# ----------------------------------------------------------------------------------------------------------------
def test_cuda_not_built_is_named(monkeypatch):
    monkeypatch.setattr(N, "_cuda", None)
    monkeypatch.setattr(N, "_CUDA_WHY", "")
    ok, why = kvq.cuda_available()
    assert not ok and "CUDA library is not built" in why and "driver" not in why


def test_cuda_library_path_that_does_not_load_is_named():
    rc, out = run_child("import kvq; print(kvq.cuda_available())",
                        env={"KVQ_CUDA_LIBRARY": "/nonexistent/libkvq_cuda_py.so"})
    assert rc == 0 and "KVQ_CUDA_LIBRARY=/nonexistent/libkvq_cuda_py.so cannot be loaded" in out, out


class FakeDriver:
    def __init__(self, version=13000, init=0, count=1):
        self.version, self.init, self.count = version, init, count

    def cuDriverGetVersion(self, p):
        p._obj.value = self.version
        return 0

    def cuInit(self, flags):
        return self.init

    def cuDeviceGetCount(self, p):
        p._obj.value = self.count
        return 0


class FakeCudaNoDevice(FakeCuda):
    def __init__(self, msg):
        super().__init__()
        self.msg = msg

    def kvq_cuda_last_error(self):
        return self.msg.encode()

    def kvq_cuda_device_count(self, p):
        p._obj.value = 0
        return -13


def _no_driver(name):
    raise OSError(f"{name}: cannot open shared object file: No such file or directory")


RUNTIME_NO_DRIVER = "no CUDA device (CUDA driver version is insufficient for CUDA runtime version)"


@pytest.mark.parametrize("driver,runtime_msg,want,not_want", [
    # what the CUDA runtime says on a machine without any NVIDIA driver: it must not be blamed on the driver's age
    (None, RUNTIME_NO_DRIVER, "no NVIDIA driver on this machine", "too old"),
    (FakeDriver(init=100, count=0), "no CUDA device (no CUDA-capable device is detected)", "sees no GPU", "too old"),
    (FakeDriver(version=12040), RUNTIME_NO_DRIVER, "driver is too old: it supports CUDA 12.4", "no GPU"),
    (FakeDriver(init=35, version=11080), "no CUDA device (x)", "too old: it supports CUDA 11.8", "no GPU"),
    (FakeDriver(), "2 CUDA device(s), none of compute capability 9.0", "none of compute capability 9.0", "driver"),
])
def test_cuda_available_tells_why(monkeypatch, driver, runtime_msg, want, not_want):
    monkeypatch.setattr(N, "_cuda", FakeCudaNoDevice(runtime_msg))
    monkeypatch.setattr(N, "_cdll", _no_driver if driver is None else (lambda name: driver))
    ok, why = kvq.cuda_available()
    assert not ok and want in why and not_want not in why, why
    with pytest.raises(kvq.KvqError) as e:
        kvq.CudaCache(1, 2, 64)
    assert "unavailable" in str(e.value) and want in str(e.value), str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# without torch (issue 16)
# ----------------------------------------------------------------------------------------------------------------
_USE = """
import numpy as np, kvq
with kvq.Cache(1, 2, 64, "q4") as c:
    s = c.seq_new()
    c.append(0, [s], [2], np.ones((2, 2, 64), np.float32), np.ones((2, 2, 64), np.float32))
    print("decode", c.attn_decode(0, [s], np.ones((1, 2, 64), np.float32)).shape)
for how in ("attr", "from", "module"):
    try:
        if how == "attr":
            kvq.KVQCache
        elif how == "from":
            from kvq import patch_model_with_int8_kv_cache
        else:
            import kvq.hf
        print(how, "NO ERROR")
    except ImportError as e:
        print(how, "ImportError:", e)
"""


def test_without_torch_numpy_bindings_work_and_hf_names_say_what_to_install():
    rc, out = run_child(_USE, prelude=_BLOCK_TORCH)
    assert rc == 0, out
    assert "decode (1, 2, 64)" in out
    for how in ("attr", "from", "module"):
        line = next((x for x in out.splitlines() if x.startswith(how + " ")), "")
        assert "ImportError:" in line and "pip install kvq[hf]" in line and "torch" in line, out


def test_broken_torch_does_not_break_import_kvq(tmp_path):
    """A torch that is installed but fails to import (the CUDA wheel without its nvidia libraries) must not take
    `import kvq` down with it; the HF names then say why."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "raise OSError('libcufile.so.0: cannot open shared object file: No such file or directory')\n")
    (tmp_path / "transformers").mkdir()
    (tmp_path / "transformers" / "__init__.py").write_text("")
    rc, out = run_child(_USE, prelude=f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n")
    assert rc == 0, out
    assert "decode (1, 2, 64)" in out
    line = next((x for x in out.splitlines() if x.startswith("attr ")), "")
    assert "ImportError:" in line and "libcufile.so.0" in line, out

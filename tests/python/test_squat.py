"""SQuat keys (kvq.h section 10) through the Python bindings: the config pass-through and its validation, the subspace
API (set / get / clear, fork copies it, bad input rejected with the cache unchanged), and the effect: keys quantized
with a subspace have a much smaller error inside it than plain quantization's."""
import math

import pytest

np = pytest.importorskip("numpy")

import kvq  # noqa: E402

D, H, R = 64, 2, 8


def basis(rng, d=D, r=R):
    q, _ = np.linalg.qr(rng.standard_normal((d, r)))
    return q.astype(np.float32)


def test_config_passthrough_and_validation():
    c = kvq.Cache(2, H, D, "q4", max_tokens=256, squat_rank=R, squat_lambda=0.05)
    assert c.config.squat_rank == R and math.isclose(c.config.squat_lambda, 0.05, rel_tol=1e-6)
    assert kvq.Cache(1, H, D, "q4", max_tokens=64).config.squat_rank == 0  # off by default
    assert kvq.Cache(1, H, D, "q4", max_tokens=64, squat_rank=4, squat_lambda=-1).config.squat_lambda == 0  # auto
    with pytest.raises(kvq.KvqError, match="squat_rank"):
        kvq.Cache(1, H, D, "q4", max_tokens=64, squat_rank=33)
    with pytest.raises(kvq.KvqError, match="grouped key type"):
        kvq.Cache(1, H, D, "q8", max_tokens=64, squat_rank=4)
    for bad in (float("nan"), float("inf"), "0.1", None, True):
        with pytest.raises(ValueError, match="squat_lambda"):
            kvq.Cache(1, H, D, "q4", max_tokens=64, squat_rank=4, squat_lambda=bad)
    with pytest.raises(TypeError, match="squat_rank"):
        kvq.Cache(1, H, D, "q4", max_tokens=64, squat_rank=1.5)


def test_subspace_api():
    rng = np.random.default_rng(1)
    c = kvq.Cache(2, H, D, "q4", max_tokens=512, max_seqs=4, squat_rank=R, rotate=1)
    s = c.seq_new()
    assert c.get_key_subspace(s, 1, 0) is None
    B = basis(rng)
    c.set_key_subspace(s, 1, 0, B)
    np.testing.assert_allclose(c.get_key_subspace(s, 1, 0), B, atol=1e-5)  # rotated in, rotated back
    assert c.get_key_subspace(s, 1, 1) is None
    with pytest.raises(ValueError, match="shape"):
        c.set_key_subspace(s, 0, 0, B[:, :4])
    bad = B.copy()
    bad[:, 2] *= 1.01
    with pytest.raises(kvq.KvqError, match="orthonormal"):
        c.set_key_subspace(s, 0, 0, bad)
    with pytest.raises(kvq.KvqError):
        c.set_key_subspace(s, 0, H, B)
    with pytest.raises(kvq.KvqError):
        c.set_key_subspace(s + 1, 0, 0, B)
    assert c.get_key_subspace(s, 0, 0) is None  # failed calls changed nothing
    f = c.seq_fork(s)
    np.testing.assert_allclose(c.get_key_subspace(f, 1, 0), B, atol=1e-5)
    c.set_key_subspace(f, 1, 0, None)
    assert c.get_key_subspace(f, 1, 0) is None and c.get_key_subspace(s, 1, 0) is not None
    # a cache without SQuat refuses a subspace
    with pytest.raises(kvq.KvqError, match="squat_rank"):
        p = kvq.Cache(1, H, D, "q4", max_tokens=64)
        p.set_key_subspace(p.seq_new(), 0, 0, B)


@pytest.mark.parametrize("kv_type", ["q4", "q3", "q2"])
def test_error_leaves_the_query_subspace(kv_type):
    rng = np.random.default_rng(7)
    L = 320
    # queries concentrated in a subspace: the engine's way of finding it (key_subspace) must recover it
    true = basis(rng)
    q = (rng.standard_normal((200, R)) * 5) @ true.T + 0.05 * rng.standard_normal((200, D))
    B = kvq.key_subspace(q, R)
    assert np.linalg.norm(B.T @ true) ** 2 > R - 0.05  # the same subspace
    k = rng.standard_normal((L, H, D)).astype(np.float32)
    v = rng.standard_normal((L, H, D)).astype(np.float32)
    c = kvq.Cache(1, H, D, kv_type, max_tokens=2 * L, max_seqs=2, squat_rank=R, residual=0, sinks=0)
    plain, sq = c.seq_new(), c.seq_new()
    for h in range(H):
        c.set_key_subspace_from_queries(sq, 0, h, q)
    for s in (plain, sq):
        c.append(0, [s], [L], k, v)
    err = {}
    for s in (plain, sq):
        e = c.read(s, 0)[0] - k
        err[s] = (np.sum((e @ B) ** 2), np.sum(e ** 2))
    # tests/test_squat.c measures x0.17 .. x0.22 of the in-subspace error at x1.16 .. x1.18 the total (auto lambda)
    assert err[sq][0] < 0.4 * err[plain][0], err
    assert err[sq][1] < 1.8 * err[plain][1], err

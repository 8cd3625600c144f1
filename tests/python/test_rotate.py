"""A rotated cache (kvq.h section 10: rotate, rotation_seed) through the Python bindings: it reads back what was
appended (within the type's error) and attends like numpy attention over what it reads back; the rotation is
internal, so a caller sees the same API as without it."""
import numpy as np
import pytest

import kvq
from test_bindings import ref_attention


@pytest.mark.parametrize("kv_type", ["q8", "q4", "q2"])
@pytest.mark.parametrize("rotate", [1, 2, 3])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_rotated_roundtrip_and_attention(kv_type, rotate, head_dim):
    rng = np.random.default_rng(3)
    H, Hq, L = 2, 4, 300
    k = rng.standard_normal((L, H, head_dim)).astype(np.float32)
    v = rng.standard_normal((L, H, head_dim)).astype(np.float32)
    k[:, :, 5] *= 20  # an outlier channel: what the rotation is for
    v[:, :, 5] *= 20
    errs = {}
    for rot in (0, rotate):
        c = kvq.Cache(2, H, head_dim, kv_type, max_tokens=512, rotate=rot, rotation_seed=1234)
        assert c.config.rotate == rot and c.config.rotation_seed == 1234
        s = c.seq_new()
        c.append(1, [s], [L], k, v)
        kr, vr = c.read(s, 1)
        errs[rot] = (np.sum((kr - k) ** 2) / np.sum(k ** 2), np.sum((vr - v) ** 2) / np.sum(v ** 2))
        scale = 1 / np.sqrt(head_dim)
        q = rng.standard_normal((1, Hq, head_dim)).astype(np.float32)
        ref = ref_attention(q, kr, vr, scale)
        # the AVX2/AVX-512 Q4/Q2 value kernels' 8-bit softmax weights (test_bindings): relative to the output's size
        tol = (2e-2 if kv_type in ("q4", "q2") else 2e-3) * np.abs(ref).max()
        np.testing.assert_allclose(c.attn_decode(1, [s], q), ref, atol=tol)
        qp = rng.standard_normal((5, Hq, head_dim)).astype(np.float32)
        np.testing.assert_allclose(c.attn_prefill(1, s, qp), ref_attention(qp, kr, vr, scale), atol=tol)
    # read-back error of a rotated role: the type's (NMSE bounds of test_roundtrip); for per-token scales (q8 both,
    # q4/q2 values) the outlier channel no longer sets every row's step: lower than without rotation
    bound = {"q8": 3e-4, "q4": 2e-2, "q2": 0.4}[kv_type]
    for role in (0, 1):
        if rotate >> role & 1:
            assert errs[rotate][role] < bound
            if kv_type == "q8" or role == 1:
                # one outlier channel: q2 values gain less (measured 0.80x at the worst here; q8 and q4 < 0.5x)
                assert errs[rotate][role] < (0.9 if kv_type == "q2" else 0.5) * errs[0][role], (role, errs)
        else:
            assert errs[rotate][role] == errs[0][role]


def test_rotate_validation():
    with pytest.raises(Exception):
        kvq.Cache(1, 1, 64, "q4", max_tokens=64, rotate=4)
    with pytest.raises(ValueError):
        kvq.Cache(1, 1, 64, "q4", max_tokens=64, rotation_seed=-1)
    c = kvq.Cache(1, 1, 64, "f16", max_tokens=64)
    assert c.config.rotate == 0  # F16: never rotated by default

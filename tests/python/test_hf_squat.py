"""SQuat keys in kvq.KVQCache (kvq.h section 10, issue 20) on the CPU: the cache sets each (sequence, layer, KV head)'s
key subspace from the queries the attention receives at the first prefill (real tokens only, every query head of the
KV head's group), before the keys are appended; forks keep it; the default follows kvq's engine (rank 8 for q2 keys,
off otherwise, off where no query reaches the cache); bad values and the compat path are refused."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
np = pytest.importorskip("numpy")
import kvq  # noqa: E402
from hf_models import make  # noqa: E402

C = kvq.CACHE_KWARG


def _record_queries(cache):
    """Wraps cache.attend to keep every call's (layer, query) on the CPU in fp64."""
    seen = []
    attend = cache.attend

    def rec(layer_idx, past, query, *a, **k):
        seen.append((layer_idx, query.detach().double().clone()))
        return attend(layer_idx, past, query, *a, **k)

    cache.attend = rec
    return seen


def test_subspace_from_the_first_prefill_queries():
    model = make("llama")
    model.set_attn_implementation("kvq")
    cfg = model.config
    H, rep = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    cache = kvq.KVQCache(cfg, kv_type="q2", max_cache_len=256, n_threads=1)
    seen = _record_queries(cache)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding: row 1's first 6 queries are not its tokens
    with torch.no_grad():
        model(ids, attention_mask=mask, use_cache=True, **{C: cache})
    grp = cache._groups[0]
    h = grp.handle
    assert h.config.squat_rank == 8  # the default for q2 keys
    prefill = dict(seen)
    for layer in range(cfg.num_hidden_layers):
        q = prefill[layer]  # [B, Hq, q, D]
        for b, seq in enumerate(grp.seqs):
            rows = q[b] if b == 0 else q[b][:, 6:]
            for kh in range(H):
                want = kvq.key_subspace(rows[kh * rep:(kh + 1) * rep].reshape(-1, q.shape[-1]).numpy(), 8)
                got = h.get_key_subspace(seq, grp.local[layer], kh)
                assert got is not None
                # the same subspace (eigenvectors are defined up to sign): the projections agree
                assert np.abs(got @ got.T - want @ want.T).max() < 1e-4, (layer, b, kh)
    before = {(s, li, kh): h.get_key_subspace(s, li, kh) for s in grp.seqs for li in range(cfg.num_hidden_layers)
              for kh in range(H)}
    # later calls (decode steps, a second chunk) keep the first prefill's subspace; a fork carries it
    with torch.no_grad():
        m = torch.cat([mask, torch.ones((2, 1), dtype=mask.dtype)], 1)
        model(torch.tensor([[5], [7]]), attention_mask=m, use_cache=True, **{C: cache})
        m = torch.cat([m, torch.ones((2, 8), dtype=mask.dtype)], 1)
        model(torch.randint(3, 128, (2, 8), generator=g), attention_mask=m, use_cache=True, **{C: cache})
    for (s, li, kh), b in before.items():
        assert np.array_equal(h.get_key_subspace(s, li, kh), b)
    cache.reorder_cache(torch.tensor([0, 0]))
    s0, s1 = grp.seqs
    assert s0 != s1
    for li in range(cfg.num_hidden_layers):
        for kh in range(H):
            assert np.array_equal(h.get_key_subspace(s1, li, kh), before[(s0, li, kh)])
            assert (cache._groups.index(grp), s1, li) in cache._squat_set


def test_defaults_and_refusals():
    model = make("llama")
    model.set_attn_implementation("kvq")
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    for kv_type, want in (("q4", 0), ("q8", 0), ("q2", 8)):
        cache = kvq.KVQCache(model.config, kv_type=kv_type, max_cache_len=64)
        with torch.no_grad():
            model(ids, use_cache=True, **{C: cache})
        assert cache._groups[0].handle.config.squat_rank == want, kv_type
    cache = kvq.KVQCache(model.config, kv_type="q4", max_cache_len=64, squat_rank=4, squat_lambda=0.05)
    with torch.no_grad():
        model(ids, use_cache=True, **{C: cache})
    h = cache._groups[0].handle
    assert h.config.squat_rank == 4 and abs(h.config.squat_lambda - 0.05) < 1e-6
    assert h.get_key_subspace(cache._groups[0].seqs[0], 0, 0).shape == (model.config.head_dim, 4)
    for bad in (dict(squat_rank=33), dict(squat_rank=-2), dict(squat_rank=model.config.head_dim),
                dict(squat_lambda=float("nan")), dict(squat_lambda="0.1")):
        with pytest.raises(ValueError, match="squat"):
            kvq.KVQCache(model.config, kv_type="q2", max_cache_len=64, **bad)
    # the compat path (sdpa) stores keys before any query: its default is off, an explicit rank is refused
    sd = make("llama")
    sd.set_attn_implementation("sdpa")
    cache = kvq.KVQCache(sd.config, kv_type="q2", max_cache_len=64)
    with torch.no_grad():
        sd(ids, use_cache=True, **{C: cache})
    assert cache._groups[0].handle.config.squat_rank == 0
    cache = kvq.KVQCache(sd.config, kv_type="q2", max_cache_len=64, squat_rank=8)
    with pytest.raises(ValueError, match="attn_implementation"):
        with torch.no_grad():
            sd(ids, use_cache=True, **{C: cache})

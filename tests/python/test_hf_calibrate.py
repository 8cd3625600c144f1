"""kvq.calibrate and plans in KVQCache (issue 20, per-layer bit budgets on the HF side): sensitivities measured one
layer at a time against the f16 cache, a plan within the budget, the same bits per element as `kvq calibrate`
counts, plans taken by KVQCache / patch_model_with_int8_kv_cache, and each layer's rotation seeded by its model
layer number whatever the grouping."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
np = pytest.importorskip("numpy")
import kvq  # noqa: E402
from hf_models import make  # noqa: E402

C = kvq.CACHE_KWARG


def _ids(n, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (n,), generator=g)


@pytest.fixture(scope="module")
def model3():
    return make("llama", num_hidden_layers=3)


@pytest.fixture(scope="module")
def plan3(model3):
    calls = []
    p = kvq.calibrate(model3, _ids(768), budget=6.0, types=("q2", "q4", "f16"), ctx=384, chunks=2, batch=64, bits_ctx=8192,
                      cache_kwargs={"n_threads": 1}, progress=lambda d, t: calls.append((d, t)))
    return p, calls


def test_calibrate_sensitivities_and_plan(model3, plan3):
    p, calls = plan3
    assert p.n_layers == 3 and p.candidates == ["q2", "q4", "f16"]
    assert calls[-1] == (6, 6)  # 3 layers x 2 quantized candidates: f16 costs no run
    for l in range(3):
        k2, b2 = p.sensitivity[(l, "q2")]
        k4, b4 = p.sensitivity[(l, "q4")]
        k16, b16 = p.sensitivity[(l, "f16")]
        assert k16 == 0.0 and b16 == 16.0
        assert k2 > k4 > 0, (l, k2, k4)  # fewer bits, more error, on every layer of this model
        assert b2 < b4 < b16
    assert p.bits <= 6.0 + 1e-9 and p.budget == 6.0 and p.bits_ctx == 8192
    assert abs(p.predicted_kld - sum(p.sensitivity[(l, "q2" if k == "q2" else k)][0]
                                     for l, (k, _) in enumerate(p.types))) < 1e-12
    # the same model at a bigger budget: never a worse predicted KLD, never fewer bits
    q = kvq.calibrate(model3, _ids(768), budget=12.0, types=("q2", "q4", "f16"), ctx=384, chunks=2, batch=64, bits_ctx=8192,
                      cache_kwargs={"n_threads": 1})
    assert q.predicted_kld <= p.predicted_kld and q.bits >= p.bits
    # re-planning from the first run's table (no model) gives the second run's plan: the same measurement, same greedy
    r = p.replan(12.0)
    assert r.types == q.types and abs(r.bits - q.bits) < 1e-9 and abs(r.predicted_kld - q.predicted_kld) < 1e-12


def test_a_plan_runs_in_kvqcache_and_the_patch(model3, plan3, tmp_path):
    p, _ = plan3
    f = tmp_path / "m3.plan"
    p.save(f)
    model3.set_attn_implementation("kvq")
    ids = _ids(40, seed=9).unsqueeze(0)
    for plan in (p, str(f), f):
        cache = kvq.KVQCache(model3.config, plan=plan, max_cache_len=64, n_threads=1)
        assert [(kvq.type_name(a), kvq.type_name(b)) for a, b in cache.layer_types_per_layer] == p.types
        with torch.no_grad():
            out = model3(input_ids=ids, use_cache=True, **{C: cache})
        assert torch.isfinite(out.logits).all()
    m = make("llama", num_hidden_layers=3)
    kvq.patch_model_with_int8_kv_cache(m, max_cache_len=128, plan=f, n_threads=1)
    with torch.no_grad():
        gen = m.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 44)
    kvq.unpatch_model(m)


def test_plan_arguments_refused(model3, tmp_path):
    p = kvq.Plan(types=["q4", "q2", "q2"])
    cfg = model3.config
    with pytest.raises(ValueError, match="leave kv_type and value_type unset"):
        kvq.KVQCache(cfg, kv_type="q4", plan=p)
    with pytest.raises(ValueError, match="leave kv_type and value_type unset"):
        kvq.KVQCache(cfg, value_type="q4", plan=p)
    with pytest.raises(ValueError, match="the plan is for 2 layers, the model has 3"):
        kvq.KVQCache(cfg, plan=kvq.Plan(types=["q4", "q2"]))
    with pytest.raises(ValueError, match="value_type must be left unset"):
        kvq.KVQCache(cfg, kv_type=p, value_type="q4")
    with pytest.raises(TypeError, match="plan is a kvq.Plan or a file path"):
        kvq.KVQCache(cfg, plan=3)
    (tmp_path / "bad.plan").write_text("kvq-plan 9\n")
    with pytest.raises(kvq.PlanError, match="written by a newer kvq"):
        kvq.KVQCache(cfg, plan=tmp_path / "bad.plan")
    assert kvq.KVQCache(cfg, kv_type=p).layer_types_per_layer[1] == (kvq.type_from_name("q2"),) * 2
    assert kvq.KVQCache(cfg).layer_types_per_layer[0] == (kvq.type_from_name("q8"),) * 2  # the default stays q8


def test_calibrate_arguments_refused(model3):
    ids = _ids(256)
    for kw, msg in (({"budget": 0.1}, "budget = 0.1"), ({"budget": 6, "types": ("q2",)}, "2 to 6 candidates"),
                    ({"budget": 6, "types": ("q2", "q2")}, "listed twice"),
                    ({"budget": 6, "types": ("q2", "q5")}, "unknown kv type"),
                    ({"budget": 6, "ctx": 512, "chunks": 1}, "the text has 256 tokens"),
                    ({"budget": 6, "cache_kwargs": {"kv_type": "q4"}}, "may not set kv_type"),
                    ({"budget": 1.0, "types": ("q2", "q4"), "ctx": 128, "chunks": 1}, "the cheapest plan")):
        with pytest.raises((ValueError, TypeError), match=msg):
            kvq.calibrate(model3, ids, **kw)
    with pytest.raises(ValueError, match="pass tokenizer="):
        kvq.calibrate(model3, "some text", budget=4)


def test_bits_are_kvq_calibrates():
    """SmolLM2-135M's KV shape (3 KV heads of 64): the bits per element at 8192 tokens with batches of 256 that
    `kvq calibrate --bits-ctx 8192 -b 256` prints for it (tests/test_gen_model.sh's 3-layer model: q2 2.836, q4
    4.805, f16 16.000)."""
    from kvq._calibrate import _layer_bytes
    q = {"rotate": -1, "sinks": -1, "nonuniform": -1}
    per = lambda t: 8.0 * _layer_bytes(3, 64, kvq.type_from_name(t), kvq.type_from_name(t), 8192, 256, 0, -1, 0, q) \
        / (8192 * 2 * 3 * 64)
    assert abs(per("q2") - 2.835938) < 1e-6 and abs(per("q4") - 4.804688) < 1e-6 and per("f16") == 16.0


def test_layer_rotation_follows_the_model_layer():
    """The same K/V given to layer 2 in q4 come back the same (the same bytes) whether layers 0-1 are q4 too (one
    cache), f16 (layers 1-2 or layer 2 alone in a cache of their own): its rotation is seeded by its model layer
    number, 2, however the layers are grouped (compat mode: update() returns the cache read back)."""
    m = make("llama", num_hidden_layers=3)
    m.set_attn_implementation("eager")
    g = torch.Generator().manual_seed(4)
    k = torch.randn(1, 2, 70, 64, generator=g)
    v = torch.randn(1, 2, 70, 64, generator=g)
    got = []
    for types in (["q4", "q4", "q4"], ["f16", "q4", "q4"], ["f16", "f16", "q4"], ["q2", "f16", "q4"]):
        cache = kvq.KVQCache(m.config, kv_type=types, max_cache_len=128, n_threads=1)
        outs = [cache.update(k, v, layer) for layer in range(3)]
        got.append(outs[2])
        assert not torch.equal(outs[2][0], outs[1][0]) or types[1] != "q4"  # layers 1 and 2 rotate differently
    for g2 in got[1:]:
        assert torch.equal(got[0][0], g2[0]) and torch.equal(got[0][1], g2[1])


def _llama_with_f16_logits(seed):
    """A 2-layer Llama on kvq attention, 60 token ids [1, 60], and their logits through an F16 KVQCache: the reference
    the KVQCache option tests compare a quantized cache's logits with."""
    m = make("llama", num_hidden_layers=2)
    m.set_attn_implementation("kvq")
    ids = _ids(60, seed=seed).unsqueeze(0)
    with torch.no_grad():
        ref = m(input_ids=ids, use_cache=True, **{C: kvq.KVQCache(m.config, kv_type="f16", max_cache_len=64)}).logits
    return m, ids, ref


def test_kvqcache_outliers_reach_the_cache():
    """KVQCache(outliers=): the role set reaches each CPU cache (its arena sized for the larger pages: the prompt
    fits), beside q2's SQuat keys, the logits stay within q4's reach of the F16 cache's; out of range refused at
    construction."""
    m, ids, ref = _llama_with_f16_logits(seed=3)
    for kw, want, squat in (({"kv_type": "q4", "outliers": 3}, 3, 0), ({"kv_type": "q2", "outliers": 1}, 1, 8),
                            ({"kv_type": "q2", "outliers": 2}, 2, 8), ({"kv_type": "q4"}, 0, 0)):
        cache = kvq.KVQCache(m.config, max_cache_len=64, n_threads=1, group=16, residual=0, **kw)
        with torch.no_grad():
            got = m(input_ids=ids, use_cache=True, **{C: cache}).logits
        h = cache._groups[0].handle
        assert (h.config.outliers, h.config.squat_rank) == (want, squat), (kw, h.config.outliers, h.config.squat_rank)
        assert cache.get_seq_length() == 60
        if kw["kv_type"] == "q4":
            cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1).mean().item()
            assert cos > 0.99, (kw, cos)
    with pytest.raises(ValueError, match="outliers = 4 must be"):
        kvq.KVQCache(m.config, kv_type="q4", outliers=4)


def test_kvqcache_params8_reach_the_cache():
    """KVQCache(params8=): the role set reaches each CPU cache (smaller pages), the logits stay within q4's reach of
    the F16 cache's; out of range refused at construction."""
    m, ids, ref = _llama_with_f16_logits(seed=4)
    pages = {}
    for p8 in (3, 0):
        cache = kvq.KVQCache(m.config, kv_type="q4", max_cache_len=64, n_threads=1, group=16, residual=0, params8=p8)
        with torch.no_grad():
            got = m(input_ids=ids, use_cache=True, **{C: cache}).logits
        h = cache._groups[0].handle
        assert h.config.params8 == p8 and h.layout.params8 == p8
        pages[p8] = h.layout.page_bytes
        assert cache.get_seq_length() == 60
        cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1).mean().item()
        assert cos > 0.99, (p8, cos)
    assert pages[3] < pages[0], pages
    with pytest.raises(ValueError, match="params8 = 4 must be"):
        kvq.KVQCache(m.config, kv_type="q4", params8=4)


def test_kvqcache_window8_reaches_the_cache():
    """KVQCache(window8=): the role set reaches each CPU cache (the window holds about half the bytes), prefill and
    token-by-token decode stay within q4's reach of the F16 cache's logits; out of range refused at construction."""
    m, ids, ref = _llama_with_f16_logits(seed=5)
    wb = {}
    for w8 in (3, 0):
        cache = kvq.KVQCache(m.config, kv_type="q4", max_cache_len=64, n_threads=1, group=16, residual=8, window8=w8)
        with torch.no_grad():
            got = m(input_ids=ids[:, :50], use_cache=True, **{C: cache}).logits
            for t in range(50, 60):  # decode steps: the 8-bit window grows, flushes a group of 16 at 24 rows
                got = torch.cat([got, m(input_ids=ids[:, t:t + 1], use_cache=True, **{C: cache}).logits], dim=1)
        h = cache._groups[0].handle
        assert h.config.window8 == w8
        wb[w8] = h.stats()["window_bytes"]
        assert cache.get_seq_length() == 60
        cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1).mean().item()
        assert cos > 0.99, (w8, cos)
    assert 0 < wb[3] < 0.6 * wb[0], wb
    with pytest.raises(ValueError, match="window8 = 4 must be"):
        kvq.KVQCache(m.config, kv_type="q4", window8=4)


def test_kvqcache_qnorm_follows_the_engine():
    """KVQCache(qnorm=-1) on the CPU: Q-Norm for the grouped roles, as kvq's engine (llama_default_qnorm); 0 off; a
    role set as given; out of range refused before anything is allocated."""
    m = make("llama", num_hidden_layers=2)
    m.set_attn_implementation("kvq")
    ids = _ids(20, seed=2).unsqueeze(0)
    for kw, want in (({"kv_type": "q4"}, 3), ({"kv_type": "q8", "value_type": "q2"}, 2), ({"kv_type": "q8"}, 0),
                     ({"kv_type": "q4", "qnorm": 0}, 0), ({"kv_type": "q2", "qnorm": 1}, 1)):
        cache = kvq.KVQCache(m.config, max_cache_len=64, n_threads=1, **kw)
        with torch.no_grad():
            m(input_ids=ids, use_cache=True, **{C: cache})
        assert cache._groups[0].handle.config.qnorm == want, (kw, want)
    with pytest.raises(ValueError, match="qnorm = 4 must be"):
        kvq.KVQCache(m.config, kv_type="q4", qnorm=4)

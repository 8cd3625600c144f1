"""transformers integration on CPU: small random-weight models of each family (tests/python/hf_models.py).

Measures (stated bounds):
  * F16 kvq cache: greedy generation identical to transformers' DynamicCache (with its default attention), batch of
    2, prompt 20 + 20 new tokens, sliding windows of 16 (Mistral, Gemma 2/3) so the window is exercised.
  * Q8: teacher-forced next-token logits (prompt 24, 24 decode steps) within max|dlogit| <= Q8_BOUND * std(logits).
  * Q4 / Q2 (KIVI, group 16 and residual 16 so that most of the 40 tokens are quantized): top-1 agreement with the fp reference >= 0.95 / 0.85 and
    mean cosine similarity of the logits >= 0.999 / 0.99.
  * beam search (3 beams) and left-padded batches: identical to transformers with the F16 kvq cache.
"""
import weakref

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import kvq  # noqa: E402
from hf_models import FAMILIES, make  # noqa: E402

# the cache argument under the installed transformers' name (cache from the 5.2x rename on, past_key_values before):
# the deprecated name would warn, and these warnings are errors here
C = kvq.CACHE_KWARG
pytestmark = [pytest.mark.filterwarnings("error:.*past_key_values:FutureWarning"),
              pytest.mark.filterwarnings("error:.*cache.*:FutureWarning")]

Q8_BOUND = 0.05
Q4_TOP1, Q4_COS = 0.95, 0.999
Q2_TOP1, Q2_COS = 0.85, 0.99


def _gen(model, ids, mask=None, **kw):
    if mask is None:
        mask = torch.ones_like(ids)
    return model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, **kw)


class kvq_attention:
    """Run the model with attn_implementation="kvq" inside the block."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.prev = self.model.config._attn_implementation
        self.model.set_attn_implementation("kvq")
        return self.model

    def __exit__(self, *a):
        self.model.set_attn_implementation(self.prev)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, make(request.param)


def test_f16_greedy_identical(family_model):
    fam, model = family_model
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    ref = _gen(model, ids, max_new_tokens=20)
    with kvq_attention(model):
        cache = kvq.KVQCache(model.config, kv_type="f16", max_cache_len=64)
        out = _gen(model, ids, max_new_tokens=20, **{C: cache})
    assert torch.equal(out, ref), f"{fam}: kvq F16 greedy differs from transformers"
    assert cache.seq_lengths() == [39, 39]  # the last generated token is never fed back


def _teacher_forced_logits(model, ids, cont, cache):
    out = model(ids, **{C: cache}, use_cache=True)
    logits = [out.logits[:, -1]]
    for t in range(cont.shape[1]):
        out = model(cont[:, t:t + 1], **{C: cache}, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1).float()


# DynamicCache's logits per model. Keyed by the model object, not id(model): the module-scoped models of one
# family are freed before the next family's are made, and a new model may get a dead one's id (a qwen2 run once
# compared its logits with another family's reference).
_REF = weakref.WeakKeyDictionary()


def _compare(model, kv_type, residual=-1, group=0):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 128, (2, 24), generator=g)
    cont = torch.randint(3, 128, (2, 16), generator=g)
    if model not in _REF:
        _REF[model] = _teacher_forced_logits(model, ids, cont, transformers.DynamicCache(config=model.config))
    ref = _REF[model]
    with kvq_attention(model):
        cache = kvq.KVQCache(model.config, kv_type=kv_type, max_cache_len=64, residual=residual, group=group)
        got = _teacher_forced_logits(model, ids, cont, cache)
        if group:
            assert cache.kv_bytes()["in_use"] > 0  # tokens really went to quantized pages
    err = (got - ref).abs().max().item() / ref.std().item()
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1).mean().item()
    return err, top1, cos


def test_q8_logits_within_bound(family_model):
    fam, model = family_model
    err, top1, cos = _compare(model, "q8")
    assert err <= Q8_BOUND, f"{fam}: Q8 max|dlogit|/std = {err:.4f} > {Q8_BOUND}"


@pytest.mark.parametrize("kv_type,min_top1,min_cos", [("q4", Q4_TOP1, Q4_COS), ("q2", Q2_TOP1, Q2_COS)])
def test_q4_q2_close(family_model, kv_type, min_top1, min_cos):
    fam, model = family_model
    err, top1, cos = _compare(model, kv_type, residual=16, group=16)
    assert top1 >= min_top1 and cos >= min_cos, f"{fam} {kv_type}: top1 {top1:.3f} cos {cos:.4f}"


def test_exact_prefill(family_model):
    """prefill="exact" (kvq_attn_prefill_exact): a 48-token prompt on a q2 cache with residual 16 and group 16 (so the
    default prefill reads the prompt's first 32 tokens back from 2-bit pages) gives the prompt's logits of the fp
    reference up to fp16 K/V, left-padded rows too; "cache" does not. Decode goes on from the same stored bytes."""
    fam, model = family_model
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 128, (2, 48), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # the second row left-padded: its 43 real tokens go through the valid-row path
    ref = model(ids, attention_mask=mask, **{C: transformers.DynamicCache(config=model.config)}, use_cache=True).logits
    errs, caches = {}, {}
    with kvq_attention(model):
        for mode in ("exact", "cache"):
            cache = kvq.KVQCache(model.config, kv_type="q2", max_cache_len=64, residual=16, group=16, prefill=mode)
            got = model(ids, attention_mask=mask, **{C: cache}, use_cache=True).logits
            errs[mode] = max(((got[b, -40:] - ref[b, -40:]).abs().max() / ref[b, -40:].std()).item() for b in range(2))
            caches[mode] = cache
            assert cache.seq_lengths() == [48, 43]
    assert errs["exact"] < 0.01, f"{fam}: exact prefill max|dlogit|/std {errs['exact']:.4f}"
    assert errs["cache"] > 5 * errs["exact"], f"{fam}: cache {errs['cache']:.4f} vs exact {errs['exact']:.4f}"
    # the first layer's K/V do not depend on attention: stored the same either way (later layers' inputs differ)
    a, b = caches["exact"]._group_of[0], caches["cache"]._group_of[0]
    for s in range(2):
        for x, y in zip(a.handle.read(a.seqs[s], a.local[0]), b.handle.read(b.seqs[s], b.local[0])):
            assert (x == y).all()
    with pytest.raises(ValueError, match="'cache' or 'exact'"):
        kvq.KVQCache(model.config, kv_type="q2", prefill="fast")


@pytest.mark.parametrize("fam", ["llama", "gemma2"])
def test_beam_search(fam):
    model = make(fam)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    ref = _gen(model, ids, max_new_tokens=12, num_beams=3, num_return_sequences=2)
    with kvq_attention(model):
        cache = kvq.KVQCache(model.config, kv_type="f16", max_cache_len=32)
        out = _gen(model, ids, max_new_tokens=12, num_beams=3, num_return_sequences=2, **{C: cache})
    assert torch.equal(out, ref)
    st = cache._groups[0].handle.stats()
    assert st["n_seqs"] == 6  # 2 prompts x 3 beams, forks freed as beams die


@pytest.mark.parametrize("fam", ["llama", "mistral", "gemma3"])
def test_batched_left_padding(fam):
    model = make(fam)
    g = torch.Generator().manual_seed(4)
    lens = [20, 13, 6]
    ids = torch.zeros((3, 20), dtype=torch.long)
    mask = torch.zeros((3, 20), dtype=torch.long)
    for b, n in enumerate(lens):
        ids[b, 20 - n:] = torch.randint(3, 128, (n,), generator=g)
        mask[b, 20 - n:] = 1
    ref = _gen(model, ids, mask, max_new_tokens=16)
    with kvq_attention(model):
        cache = kvq.KVQCache(model.config, kv_type="f16", max_cache_len=64)
        out = _gen(model, ids, mask, max_new_tokens=16, **{C: cache})
        # padding is never stored: each row holds only its own tokens
        assert cache.seq_lengths() == [n + 15 for n in lens]
        # and each row generates what it generates alone, unpadded
        for b, n in enumerate(lens):
            alone = _gen(model, ids[b:b + 1, 20 - n:], max_new_tokens=16,
                         **{C: kvq.KVQCache(model.config, kv_type="f16", max_cache_len=64)})
            assert torch.equal(alone[0, n:], out[b, 20:])
    assert torch.equal(out, ref)


def test_compat_mode_sdpa_f16_identical():
    """Without attn_implementation="kvq", KVQCache returns the dequantized cache (CPU) to sdpa/eager."""
    model = make("qwen2")
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    ref = _gen(model, ids, max_new_tokens=10)
    cache = kvq.KVQCache(model.config, kv_type="f16", max_cache_len=32)
    assert not cache.fused
    out = _gen(model, ids, max_new_tokens=10, **{C: cache})
    assert torch.equal(out, ref)


def test_per_layer_types_and_crop():
    model = make("gemma3")
    n = model.config.num_hidden_layers
    types = ["q4" if i % 2 else "q8" for i in range(n)]
    with kvq_attention(model):
        cache = kvq.KVQCache(model.config, kv_type=types, max_cache_len=64)
        ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(6))
        _gen(model, ids, max_new_tokens=8, **{C: cache})
        assert len(cache._groups) == 2 and cache.get_seq_length() == 27
        cache.crop(-5)
        assert cache.get_seq_length() == 22 and cache.seq_lengths() == [22]
        out = model(torch.tensor([[5]]), **{C: cache}, use_cache=True)
        assert out.logits.shape == (1, 1, 128) and cache.get_seq_length() == 23


def test_remap_failure_leaves_every_group_as_it_was(monkeypatch):
    """A fork failing in the second type group (beam reorder) must not leave the first group remapped."""
    model = make("llama")
    n = model.config.num_hidden_layers
    with kvq_attention(model):
        cache = kvq.KVQCache(model.config, kv_type=["q8" if i % 2 else "f16" for i in range(n)], max_cache_len=64)
        ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(8))
        _gen(model, ids, max_new_tokens=4, **{C: cache})
        assert len(cache._groups) == 2
        before = [(list(g.seqs), g.handle.stats()["n_seqs"]) for g in cache._groups]

        def refuse(*a, **k):
            raise kvq.CacheFullError(-8, "no free sequence slot (test)")

        monkeypatch.setattr(cache._groups[1].handle, "seq_fork", refuse)
        with pytest.raises(kvq.CacheFullError):
            cache.batch_repeat_interleave(2)
        assert [(list(g.seqs), g.handle.stats()["n_seqs"]) for g in cache._groups] == before
        assert cache.batch_size == 2
        monkeypatch.undo()
        cache.batch_repeat_interleave(2)  # and it still works afterwards
        assert cache.batch_size == 4 and [g.handle.stats()["n_seqs"] for g in cache._groups] == [4, 4]


def test_patch_model_with_int8_kv_cache():
    model = make("llama")
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(7))
    ref = _gen(model, ids, max_new_tokens=12)
    assert kvq.patch_model_with_int8_kv_cache(model) is model
    assert model.config._attn_implementation == "kvq" and model._is_kv_quant_patched
    out = _gen(model, ids, max_new_tokens=12, return_dict_in_generate=True)
    assert isinstance(kvq.output_cache(out), kvq.KVQCache)
    assert kvq.output_cache(out).layer_types_per_layer[0] == (2, 2)  # q8 keys and values
    agree = (out.sequences[:, 16:] == ref[:, 16:]).float().mean().item()
    assert agree >= 0.9, agree
    # plain forward without a cache still works (fallback attention), and matches the unpatched model
    kvq.unpatch_model(model)
    base = model(ids).logits
    kvq.patch_model_with_int8_kv_cache(model)
    torch.testing.assert_close(model(ids, use_cache=False).logits, base, atol=1e-4, rtol=1e-4)
    kvq.unpatch_model(model)
    assert model.config._attn_implementation != "kvq"


def test_unsupported_raise_before_any_change():
    model = make("llama", head_dim=32)  # head_dim 32 is not supported by kvq
    impl = model.config._attn_implementation
    with pytest.raises(ValueError, match="head_dim 32"):
        kvq.patch_model_with_int8_kv_cache(model)
    with pytest.raises(ValueError, match="head_dim 32"):
        kvq.KVQCache(model.config, kv_type="q8")
    assert model.config._attn_implementation == impl and not getattr(model, "_is_kv_quant_patched", False)
    model64 = make("llama").to(torch.float64)
    with pytest.raises(TypeError, match="float64"):
        kvq.patch_model_with_int8_kv_cache(model64)
    assert model64.config._attn_implementation == impl
    with pytest.raises(ValueError, match="unknown kv type"):
        kvq.KVQCache(make("llama").config, kv_type="q5")
    # a cache of the wrong dtype fails at its first update, before anything is stored
    cache = kvq.KVQCache(model64.config, kv_type="q8")
    with pytest.raises(TypeError, match="float64"):
        cache.update(torch.zeros(1, 2, 3, 64, dtype=torch.float64), torch.zeros(1, 2, 3, 64, dtype=torch.float64), 0)
    assert cache.get_seq_length() == 0


@pytest.mark.parametrize("kw,exc,match", [
    (dict(max_cache_len=0), ValueError, "max_cache_len"),
    (dict(max_cache_len=2.5), TypeError, "max_cache_len"),
    (dict(max_cache_len=2**63), OverflowError, "max_cache_len"),
    (dict(max_batch_size=0), ValueError, "max_batch_size"),
    (dict(arena_bytes=-1), OverflowError, "arena_bytes"),
    (dict(residual=5000), ValueError, "residual"),
    (dict(group=48), ValueError, "group"),
    (dict(n_threads=-1), ValueError, "n_threads"),
    (dict(kv_type=2**32 + 2), ValueError, "unknown kv type"),
    (dict(rotate=4), ValueError, "rotate"),
    (dict(rotate=-2), ValueError, "rotate"),
    (dict(nonuniform=4), ValueError, "nonuniform"),
    (dict(sinks=1025), ValueError, "sinks"),
    (dict(sinks=True), TypeError, "sinks"),
    (dict(rotate=2**32), OverflowError, "rotate"),
])
def test_kvqcache_arguments_checked_at_construction(kw, exc, match):
    """Bad arguments fail when the cache is made, not at the first update inside generate() (nor are they
    truncated: 2**32 + 2 was q8)."""
    with pytest.raises(exc, match=match):
        kvq.KVQCache(make("llama").config, **kw)
    with pytest.raises(TypeError, match="model.config"):
        kvq.KVQCache(object())


def test_patch_checks_cache_arguments_before_patching():
    model = make("llama")
    impl = model.config._attn_implementation
    with pytest.raises(ValueError, match="residual"):
        kvq.patch_model_with_int8_kv_cache(model, residual=5000)
    with pytest.raises(TypeError, match="no_such_option"):
        kvq.patch_model_with_int8_kv_cache(model, no_such_option=1)
    with pytest.raises(ValueError, match="max_cache_len"):
        kvq.patch_model_with_int8_kv_cache(model, max_cache_len=0)
    assert model.config._attn_implementation == impl and not getattr(model, "_is_kv_quant_patched", False)


def test_reorder_rejects_rows_outside_the_batch():
    """A negative beam index silently picked the last row; an index past the batch failed half-way."""
    model = make("llama")
    with kvq_attention(model):
        cache = kvq.KVQCache(model.config, kv_type="q8", max_cache_len=64)
        ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(9))
        _gen(model, ids, max_new_tokens=3, **{C: cache})
        before = [(list(g.seqs), g.handle.stats()) for g in cache._groups]
        for bad in ([0, -1], [0, 2], [1.5, 0]):
            with pytest.raises((IndexError, TypeError)):
                cache.reorder_cache(torch.tensor(bad) if not isinstance(bad[0], float) else bad)
            assert [(list(g.seqs), g.handle.stats()) for g in cache._groups] == before
        with pytest.raises(ValueError, match="repeats"):
            cache.batch_repeat_interleave(0)
        cache.reorder_cache(torch.tensor([1, 1]))
        assert cache.batch_size == 2 and cache.seq_lengths()[0] == cache.seq_lengths()[1]


def test_kvqcache_with_closed_handle_raises_clearly():
    model = make("llama")
    with kvq_attention(model):
        cache = kvq.KVQCache(model.config, kv_type="q8", max_cache_len=64)
        ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(10))
        _gen(model, ids, max_new_tokens=2, **{C: cache})
        cache._groups[0].handle.close()
        with pytest.raises(kvq.CacheClosedError, match="closed"):
            cache.seq_lengths()


def _spy_on_native_cache(monkeypatch):
    """Records the keywords KVQCache gives kvq.Cache (and makes the real cache)."""
    import kvq.hf as H
    real, calls = H.N.Cache, []

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(H.N, "Cache", spy)
    return calls


def test_quality_options_reach_kvq(monkeypatch):
    """rotate=, sinks=, nonuniform= (kvq.h section 10) go to kvq.Cache as given: 0 switches a mechanism off and the
    cache works; the defaults (-1) are passed as -1 (kvq picks per type); patch_model_with_int8_kv_cache passes them
    on too."""
    calls = _spy_on_native_cache(monkeypatch)
    model = make("llama")
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(5))
    ref = model(ids).logits
    with kvq_attention(model):
        cache = kvq.KVQCache(model.config, kv_type="q8", max_cache_len=32)
        model(ids, **{C: cache}, use_cache=True)
        assert calls[-1]["rotate"] == -1 and calls[-1]["sinks"] == -1 and calls[-1]["nonuniform"] == -1
        cache = kvq.KVQCache(model.config, kv_type="q8", max_cache_len=32, rotate=0, sinks=0, nonuniform=0)
        got = model(ids, **{C: cache}, use_cache=True).logits
    assert (calls[-1]["rotate"], calls[-1]["sinks"], calls[-1]["nonuniform"]) == (0, 0, 0)
    assert cache.seq_lengths() == [24]
    err = (got - ref).abs().max().item() / ref.std().item()
    assert err <= Q8_BOUND, f"Q8 with the mechanisms off: max|dlogit|/std = {err:.4f}"
    kvq.patch_model_with_int8_kv_cache(model, sinks=0, rotate=0)
    try:
        out = model(ids, use_cache=True)
        assert (calls[-1]["rotate"], calls[-1]["sinks"], calls[-1]["nonuniform"]) == (0, 0, -1)
        assert kvq.output_cache(out).seq_lengths() == [24]
    finally:
        kvq.unpatch_model(model)


@pytest.mark.parametrize("kw", [dict(rotate=3), dict(sinks=4), dict(nonuniform=3)])
def test_quality_option_on_reaches_kvq(monkeypatch, kw):
    """A mechanism switched on reaches libkvq: either the library builds the cache with it (the attention then
    works and stays within Q4's bounds of the fp model), or it refuses it as not implemented (kvq.h section 10, until
    the mechanism lands), with KvqError naming the field and nothing allocated: the cache is still uninitialized."""
    calls = _spy_on_native_cache(monkeypatch)
    model = make("llama")
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(6))
    ref = model(ids).logits
    (name, val), = kw.items()
    with kvq_attention(model):
        cache = kvq.KVQCache(model.config, kv_type="q4", max_cache_len=32, group=16, residual=0, **kw)
        try:
            got = model(ids, **{C: cache}, use_cache=True).logits
        except kvq.KvqError as e:
            assert name in str(e), f"kvq refused {kw} without naming it: {e}"
            assert not cache.is_initialized and cache.get_seq_length() == 0
            return
        finally:
            assert calls and calls[-1][name] == val
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1).mean().item()
    assert cos >= Q4_COS, f"q4 with {kw}: mean cosine of the logits {cos:.5f} < {Q4_COS}"

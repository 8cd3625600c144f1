"""patch_model_with_int8_kv_cache (issue 24): after the one call, every call that uses a cache keeps the K/V in kvq
pages, on every transformers version the package claims, under either name of the cache argument, without warnings.

For each way of calling a patched model (generate; a hand-written loop passing the returned cache back, as
past_key_values= or cache=, or positionally; model.forward with use_cache=True; the config's default use_cache; the
base model, model.model) the test checks
  * that the returned cache is a KVQCache whose kvq page bytes in use are exactly those of the tokens fed (one
    64-token Q8 page per started 64 tokens, per layer and row: counted from kvq's statistics), and
  * that the logits equal those of the unpatched model run with attn_implementation="kvq" and an explicit
    KVQCache(kv_type="q8") (the same kernels on the same bytes: equal to fp32 rounding; bound 1e-5 x std).
A user-supplied non-kvq cache (DynamicCache, QuantizedCache-like, StaticCache) is refused with a TypeError that says
why and what to do; training with gradients makes no cache. Warnings are errors in this file (FutureWarning about
past_key_values / "Both past_key_values and cache are set" included), and transformers' deprecation log lines are
collected and must be absent.
"""
import logging
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import kvq  # noqa: E402
import kvq.hf as H  # noqa: E402
from hf_models import make  # noqa: E402

pytestmark = pytest.mark.filterwarnings("error")

P, STEPS, B = 20, 6, 2


@pytest.fixture
def no_deprecation_logs(caplog):
    """transformers logs (logger.warning_once) when a deprecated cache name is read or passed."""
    caplog.set_level(logging.WARNING, logger="transformers")
    yield
    bad = [r.getMessage() for r in caplog.records if "past_key_values" in r.getMessage() or "cache" in r.getMessage()]
    assert not bad, bad


def _inputs(seed=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (B, P), generator=g), torch.randint(3, 128, (B, STEPS), generator=g)


def _q8_pages_bytes(model, tokens):
    """kvq page bytes that `tokens` tokens of every row occupy in a Q8 cache of `model` (64-token pages)."""
    tc = model.config
    lay = kvq.page_layout("q8", "q8", tc.num_key_value_heads, tc.head_dim)
    pages = -(-tokens // lay.page_tokens)
    return tc.num_hidden_layers * B * pages * lay.page_bytes


def _assert_in_kvq_pages(model, cache, tokens):
    assert isinstance(cache, kvq.KVQCache), type(cache)
    assert cache.layer_types_per_layer == [(kvq.type_from_name("q8"),) * 2] * model.config.num_hidden_layers
    assert cache.seq_lengths() == [tokens] * B
    assert cache.kv_bytes()["in_use"] == _q8_pages_bytes(model, tokens)
    for g in cache._groups:
        st = g.handle.stats()
        assert st["n_seqs"] == B


def _reference(model, ids, cont):
    """Logits of the unpatched model with the "kvq" attention and an explicit KVQCache(kv_type="q8")."""
    prev = model.config._attn_implementation
    model.set_attn_implementation("kvq")
    try:
        cache = kvq.KVQCache(model.config, kv_type="q8", max_cache_len=64)
        with torch.no_grad():
            out = model(ids, use_cache=True, **{kvq.CACHE_KWARG: cache})
            logits = [out.logits[:, -1]]
            for t in range(cont.shape[1]):
                out = model(cont[:, t:t + 1], use_cache=True, **{kvq.CACHE_KWARG: cache})
                logits.append(out.logits[:, -1])
    finally:
        model.set_attn_implementation(prev)
    return torch.stack(logits, 1)


def _close(got, ref):
    err = (got - ref).abs().max().item()
    assert err <= 1e-5 * ref.std().item(), f"max|dlogit| {err:.3g} vs std {ref.std().item():.3g}"


@pytest.fixture
def patched():
    model = make("llama")
    ids, cont = _inputs()
    ref = _reference(model, ids, cont)
    kvq.patch_model_with_int8_kv_cache(model)
    yield model, ids, cont, ref
    kvq.unpatch_model(model)


@pytest.mark.parametrize("name", ["past_key_values", "cache"])
def test_manual_loop_passing_the_returned_cache_back(patched, name, no_deprecation_logs):
    """The perplexity-script loop: no cache in the first call, then the output's cache, under either name."""
    model, ids, cont, ref = patched
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = kvq.output_cache(out)
        _assert_in_kvq_pages(model, cache, P)
        logits = [out.logits[:, -1]]
        for t in range(STEPS):
            out = model(cont[:, t:t + 1], use_cache=True, **{name: cache})
            assert kvq.output_cache(out) is cache
            logits.append(out.logits[:, -1])
    _assert_in_kvq_pages(model, cache, P + STEPS)
    _close(torch.stack(logits, 1), ref)


def test_manual_loop_with_none_then_cache_and_default_use_cache(patched, no_deprecation_logs):
    """past_key_values=None in the first call, use_cache left to the config's default (True)."""
    model, ids, cont, ref = patched
    past = None
    logits = []
    with torch.no_grad():
        for x in [ids] + [cont[:, t:t + 1] for t in range(STEPS)]:
            out = model(x, past_key_values=past)
            past = kvq.output_cache(out)
            logits.append(out.logits[:, -1])
    _assert_in_kvq_pages(model, past, P + STEPS)
    _close(torch.stack(logits, 1), ref)


def test_manual_loop_with_a_user_kvqcache(patched, no_deprecation_logs):
    model, ids, cont, ref = patched
    cache = kvq.KVQCache(model.config, kv_type="q8", max_cache_len=64)
    logits = []
    with torch.no_grad():
        for i, x in enumerate([ids] + [cont[:, t:t + 1] for t in range(STEPS)]):
            kw = {"cache": cache} if i % 2 else {"past_key_values": cache}
            out = model(x, use_cache=True, **kw)
            logits.append(out.logits[:, -1])
    _assert_in_kvq_pages(model, cache, P + STEPS)
    _close(torch.stack(logits, 1), ref)


def test_forward_called_directly(patched, no_deprecation_logs):
    """model.forward(...) bypasses nn.Module.__call__ (and its hooks): it must still store kvq pages."""
    model, ids, cont, ref = patched
    with torch.no_grad():
        out = model.forward(ids, use_cache=True)
        cache = kvq.output_cache(out)
        logits = [out.logits[:, -1]]
        for t in range(STEPS):
            out = model.forward(input_ids=cont[:, t:t + 1], use_cache=True, **{kvq.CACHE_KWARG: cache})
            logits.append(out.logits[:, -1])
    _assert_in_kvq_pages(model, cache, P + STEPS)
    _close(torch.stack(logits, 1), ref)


def test_cache_passed_positionally(patched, no_deprecation_logs):
    """forward(input_ids, attention_mask, position_ids, cache): the 4th positional parameter."""
    model, ids, cont, ref = patched
    with torch.no_grad():
        out = model(ids, None, None, None)
        cache = kvq.output_cache(out)
        logits = [out.logits[:, -1]]
        for t in range(STEPS):
            out = model(cont[:, t:t + 1], None, None, cache)
            logits.append(out.logits[:, -1])
    _assert_in_kvq_pages(model, cache, P + STEPS)
    _close(torch.stack(logits, 1), ref)


def test_base_model_called_directly(patched, no_deprecation_logs):
    """model.model(...) (hidden states, no LM head) makes a kvq cache too."""
    model, ids, cont, _ = patched
    with torch.no_grad():
        out = model.model(ids, use_cache=True)
    _assert_in_kvq_pages(model, kvq.output_cache(out), P)


@pytest.mark.parametrize("name", ["past_key_values", "cache", None])
def test_generate(patched, name, no_deprecation_logs):
    """generate() with no cache (the patch makes one) or a KVQCache under either name: kvq pages, and scores equal
    to the explicit-cache reference (teacher forcing through generate's own greedy choices)."""
    model, ids, _, _ = patched
    kw = {} if name is None else {name: kvq.KVQCache(model.config, kv_type="q8", max_cache_len=64)}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                         max_new_tokens=STEPS + 1, return_dict_in_generate=True, output_logits=True, **kw)
    cache = kvq.output_cache(out)
    if name is not None:
        assert cache is kw[name]
    _assert_in_kvq_pages(model, cache, P + STEPS)  # the last generated token is never fed back
    got = torch.stack(out.logits, 1)
    kvq.unpatch_model(model)
    ref = _reference(model, ids, out.sequences[:, P:P + STEPS])
    kvq.patch_model_with_int8_kv_cache(model)
    _close(got, ref)


@pytest.mark.parametrize("how", ["forward", "forward-cache-name", "generate", "base"])
@pytest.mark.parametrize("make_cache", ["dynamic", "static"])
def test_a_non_kvq_cache_is_refused(patched, how, make_cache):
    model, ids, _, _ = patched
    if make_cache == "dynamic":
        other = transformers.DynamicCache(config=model.config)
    else:
        other = transformers.StaticCache(config=model.config, max_cache_len=64)
    with pytest.raises(TypeError, match=r"patch_model_with_int8_kv_cache.*KVQCache.*unpatch_model"):
        if how == "forward":
            model(ids, past_key_values=other, use_cache=True)
        elif how == "forward-cache-name":
            model(ids, cache=other)
        elif how == "generate":
            model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, **{kvq.CACHE_KWARG: other})
        else:
            model.model(ids, **{kvq.CACHE_KWARG: other})
    assert other.get_seq_length() == 0


def test_two_different_caches_are_refused(patched):
    model, ids, _, _ = patched
    a = kvq.KVQCache(model.config, max_cache_len=64)
    b = kvq.KVQCache(model.config, max_cache_len=64)
    with pytest.raises(TypeError, match="two different caches"):
        model(ids, past_key_values=a, cache=b)
    out = model(ids, past_key_values=a, cache=a)  # the same one under both names is fine
    assert kvq.output_cache(out) is a and a.get_seq_length() == P


def test_generate_cache_implementation_is_refused(patched):
    model, ids, _, _ = patched
    with pytest.raises(TypeError, match="cache_implementation"):
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, cache_implementation="static")


def test_no_cache_when_asked_or_training(patched):
    model, ids, _, _ = patched
    with torch.no_grad():
        out = model(ids, use_cache=False)
    assert kvq.output_cache(out) is None
    model.train()
    try:
        out = model(ids, use_cache=True)  # gradients on: kvq's attention has no backward, no cache is made
        out.logits.sum().backward()
        assert model.model.embed_tokens.weight.grad is not None
        assert not isinstance(kvq.output_cache(out), kvq.KVQCache)
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)


def test_forward_made_cache_is_sized_to_the_model_context(patched):
    """A forward call cannot know how long the caller's loop runs: its cache holds max_position_embeddings tokens
    (512 here), or the patch's max_cache_len."""
    model, ids, _, _ = patched
    with torch.no_grad():
        cache = kvq.output_cache(model(ids))
    assert cache.kvq_max_len == model.config.max_position_embeddings
    kvq.unpatch_model(model)
    kvq.patch_model_with_int8_kv_cache(model, max_cache_len=100)
    with torch.no_grad():
        cache = kvq.output_cache(model(ids))
    assert cache.kvq_max_len == 100


def test_unpatch_restores_every_call(no_deprecation_logs):
    model = make("llama")
    ids, _ = _inputs()
    impl = model.config._attn_implementation
    kvq.patch_model_with_int8_kv_cache(model)
    kvq.unpatch_model(model)
    assert model.config._attn_implementation == impl
    assert "forward" not in vars(model) and "generate" not in vars(model) and "forward" not in vars(model.model)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    assert isinstance(kvq.output_cache(out), transformers.DynamicCache)


def test_unpatched_kvqcache_takes_the_installed_name_without_warning(no_deprecation_logs):
    """kvq.CACHE_KWARG is the name the installed transformers takes (cache from the rename on, past_key_values
    before), so an unpatched model given a KVQCache under it warns about nothing."""
    model = make("llama")
    ids, _ = _inputs()
    assert kvq.CACHE_KWARG in ("cache", "past_key_values")
    fwd = H._cache_kwarg_of(model.forward)
    assert fwd == kvq.CACHE_KWARG
    cache = kvq.KVQCache(model.config, kv_type="q8", max_cache_len=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, **{kvq.CACHE_KWARG: cache})
    assert cache.seq_lengths() == [P + 2] * B

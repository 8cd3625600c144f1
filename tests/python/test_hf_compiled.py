"""kvq.hf.CompiledDecode on the CPU (issue 23): the decode step traced whole by torch.compile with kvq's append +
attention as the custom op kvq::decode_step. Same model, same prompt, the eager cache fed the same tokens: logits
within 1e-4 of their spread at every step (inductor fuses the rest of the model, so not bit for bit), top-1 equal;
one compilation for all steps; after close() the cache holds the same lengths and goes on eagerly like the other."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
import kvq  # noqa: E402
import kvq.hf  # noqa: E402
from hf_models import make  # noqa: E402

C = kvq.CACHE_KWARG


@pytest.mark.parametrize("kv_type", ["q8", "q4", "q2"])
def test_compiled_decode_equals_eager(kv_type):
    counters = pytest.importorskip("torch._dynamo.utils").counters
    model = make("llama")
    model.set_attn_implementation("kvq")
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 128, (2, 40), generator=g)
    caches = [kvq.KVQCache(model.config, kv_type=kv_type, max_cache_len=256, n_threads=1) for _ in range(2)]
    with torch.no_grad():
        first = [model(ids, use_cache=True, **{C: c}).logits[:, -1] for c in caches]
        assert torch.equal(first[0], first[1])
        dec = kvq.hf.CompiledDecode(model, caches[1], mode=None)  # inductor without cudagraphs (CPU)
        tok = first[0].argmax(-1)
        frames = None
        for step in range(12):  # 12 steps: past a group boundary of every grouped type's pages
            ref = model(tok[:, None], use_cache=True, **{C: caches[0]}).logits[:, -1]
            got = dec(tok)
            d = (ref - got).abs().max().item()
            assert d <= 1e-4 * ref.std().item(), (step, d)
            assert torch.equal(ref.argmax(-1), got.argmax(-1)), step
            if step == 0:
                frames = counters["frames"]["ok"]
            tok = ref.argmax(-1)
        assert counters["frames"]["ok"] == frames, "recompiled after the first step"
    assert caches[0].seq_lengths(0) == caches[1].seq_lengths(0) == [52, 52]
    assert caches[1].get_seq_length() == 52
    dec.close()
    with pytest.raises(RuntimeError, match="closed"):
        dec(tok)
    with torch.no_grad():  # the cache goes on eagerly, as the other
        nxt = torch.tensor([[5], [7]])
        la, lb = (model(nxt, use_cache=True, **{C: c}).logits for c in caches)
    assert (la - lb).abs().max().item() <= 1e-4 * la.std().item()


def test_compiled_decode_refuses():
    model = make("llama")
    model.set_attn_implementation("kvq")
    cache = kvq.KVQCache(model.config, kv_type="q8", max_cache_len=64)
    with pytest.raises(ValueError, match="holds the prompt"):
        kvq.hf.CompiledDecode(model, cache)  # empty: no prefill yet
    with pytest.raises(ValueError, match="holds the prompt"):
        kvq.hf.CompiledDecode(model, object())
    ids = torch.randint(3, 128, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: rows of different lengths
    with torch.no_grad():
        model(ids, attention_mask=mask, use_cache=True, **{C: cache})
    with pytest.raises(ValueError, match="one length"):
        kvq.hf.CompiledDecode(model, cache)

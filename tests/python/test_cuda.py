"""GPU tests (skipped without torch, a CUDA device, or kvq's CUDA library): the "kvq" attention running on the
kvq_cuda_* kernels. Measures: logits of the CUDA path vs kvq's CPU path on the same fp32 model and the same cache
type (byte-identical pages: max|dlogit| <= 1e-2 * std), and fp16 greedy generation vs transformers' DynamicCache
(token agreement >= 0.9; fp16 accumulation order differs, so exact equality is not expected)."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
import kvq  # noqa: E402
from hf_models import make  # noqa: E402

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
_ok, _why = kvq.cuda_available()
if not _ok:
    pytest.skip(f"kvq CUDA backend: {_why}", allow_module_level=True)


def _logits(model, ids, cont, cache):
    out = model(ids, past_key_values=cache, use_cache=True)
    res = [out.logits[:, -1]]
    for t in range(cont.shape[1]):
        out = model(cont[:, t:t + 1], past_key_values=cache, use_cache=True)
        res.append(out.logits[:, -1])
    return torch.stack(res, 1).float().cpu()


@pytest.mark.parametrize("fam", ["llama", "gemma2", "mistral"])
@pytest.mark.parametrize("kv_type", ["f16", "q8", "q4"])
def test_cuda_matches_cpu(fam, kv_type):
    model = make(fam)
    model.set_attn_implementation("kvq")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 128, (2, 100), generator=g)
    cont = torch.randint(3, 128, (2, 40), generator=g)
    cpu = _logits(model, ids, cont, kvq.KVQCache(model.config, kv_type=kv_type, max_cache_len=256))
    model.cuda()
    gpu = _logits(model, ids.cuda(), cont.cuda(), kvq.KVQCache(model.config, kv_type=kv_type, max_cache_len=256))
    err = (gpu - cpu).abs().max().item() / cpu.std().item()
    assert err <= 1e-2, f"{fam} {kv_type}: CUDA vs CPU max|dlogit|/std = {err:.4g}"


def test_cuda_fp16_generate_and_padding():
    model = make("llama").half().cuda()
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(3)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    model.set_attn_implementation("kvq")
    cache = kvq.KVQCache(model.config, kv_type="f16", max_cache_len=64)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
                         past_key_values=cache)
    assert cache.is_cuda and cache.seq_lengths() == [47, 38]
    agree = (out[:, 24:] == ref[:, 24:]).float().mean().item()
    assert agree >= 0.9, agree


def test_cuda_beam_search_is_refused_clearly():
    model = make("llama").cuda()
    model.set_attn_implementation("kvq")
    ids = torch.randint(3, 128, (1, 8)).cuda()
    with pytest.raises(NotImplementedError, match="kvq_cuda_seq_fork"):
        model.generate(ids, max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0,
                       past_key_values=kvq.KVQCache(model.config, kv_type="q8", max_cache_len=32))

"""Small random-weight models of each supported family, built in code (no hub downloads)."""
import torch

V = 128


def _common(over, **family):
    """The shared config, then the family's own settings, then the caller's overrides (which may replace either)."""
    base = dict(vocab_size=V, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
                bos_token_id=2)
    base.update(family)
    base.update(over)
    return base


def make(family: str, dtype=torch.float32, seed=0, **over):
    import transformers as T
    torch.manual_seed(seed)
    if family == "llama":
        cfg = T.LlamaConfig(**_common(over))
        cls = T.LlamaForCausalLM
    elif family == "mistral":  # sliding window smaller than the test sequences
        cfg = T.MistralConfig(**_common(over, sliding_window=16))
        cls = T.MistralForCausalLM
    elif family == "gemma":
        cfg = T.GemmaConfig(**_common(over))
        cls = T.GemmaForCausalLM
    elif family == "gemma2":  # hybrid sliding/full layers + attention logit soft-capping
        cfg = T.Gemma2Config(**_common(over, sliding_window=16, attn_logit_softcapping=5.0,
                                       final_logit_softcapping=30.0, query_pre_attn_scalar=64, num_hidden_layers=4))
        cls = T.Gemma2ForCausalLM
    elif family == "gemma3":  # 5 sliding : 1 full
        cfg = T.Gemma3TextConfig(**_common(over, sliding_window=16, query_pre_attn_scalar=64, num_hidden_layers=6))
        cls = T.Gemma3ForCausalLM
    elif family == "phi3":
        cfg = T.Phi3Config(**_common(over))
        cls = T.Phi3ForCausalLM
    elif family == "qwen2":
        cfg = T.Qwen2Config(**_common(over))
        cls = T.Qwen2ForCausalLM
    else:
        raise ValueError(family)
    model = cls(cfg).to(dtype).eval()
    # random init has tiny weights: scale the embeddings so attention is not uniform (sharper, more realistic)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8.0)
    return model


FAMILIES = ["llama", "mistral", "gemma", "gemma2", "gemma3", "phi3", "qwen2"]

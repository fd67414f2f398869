"""Tiny random decoders built with our own models.CausalLM."""
import torch

HF_CONFIG = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rms_norm_eps=1e-5, rope_theta=10000.0)


def tiny_causal_lm(vocab: int = 64, tie: bool = True, seed: int = 0):
    """HF_CONFIG's Llama with N(0, 0.3) matrices, in eval mode."""
    from lora_core.models import CausalLM, ModelConfig

    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.from_hf_dict({**HF_CONFIG, "vocab_size": vocab, "tie_word_embeddings": tie}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)  # strong enough that different inputs give clearly different logits
    return model.eval()


def tiny_model(vocab_size, seed=0):
    """A float32 tied-embedding Llama at its default init, for training runs."""
    from lora_core.models import CausalLM, ModelConfig

    torch.manual_seed(seed)
    config = ModelConfig.from_hf_dict({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "intermediate_size": 64, "vocab_size": vocab_size, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "max_position_embeddings": 256})
    return CausalLM(config).float()

"""A tiny random llama checkpoint written in the real HF format (safetensors + tokenizer.json +
chat template), so tests can load it through `models.load_model` like any user checkpoint."""
import torch

from helpers.tiny_models import HF_CONFIG, tiny_causal_lm
from helpers.tokenizers import make_tokenizer_dir


def write_tiny_chat_checkpoint(path, vocab: int = 512, seed: int = 0):
    from lora_core.models.hf_format import write_hf_directory

    tok_dir, _ = make_tokenizer_dir(path.parent / f"{path.name}-tokenizer")
    hf = {**HF_CONFIG, "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
          "tie_word_embeddings": True, "torch_dtype": "float32"}
    tensors = {n: t.contiguous() for n, t in tiny_causal_lm(vocab=vocab, seed=seed).state_dict().items()
               if n != "lm_head.weight"}
    extra = {p.name: p.read_bytes() for p in tok_dir.iterdir()}
    return write_hf_directory(path, hf, tensors, extra_files=extra)


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from one full forward pass over the concatenated ids: an
    implementation independent of train.eval.metrics.score_continuations."""
    ctx = tokenizer.encode(context, add_special_tokens=False)
    cont = tokenizer.encode(continuation, add_special_tokens=False)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        out = model(ids)
        logits = out.logits if hasattr(out, "logits") else out
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))

"""models: a minimal Llama/Qwen2 decoder and everything to get a real checkpoint into it.

Public API: ModelConfig, CausalLM, KVCache, causal_lm_loss, Tokenizer, load_model,
load_hf_directory, generate. Pulls (registry, fetch, GGUF import) live in their own modules and
are imported lazily by `load_model`.
"""
from .config import ModelConfig
from .decoder import CausalLM
from .kv_cache import KVCache
from .loss import causal_lm_loss
from .tokenizer import Tokenizer
from .chat_template import ChatTemplateError, render_chat_template
from .hf_loader import load_hf_directory
from .loading import load_model
from .generate import generate
from .registry import pull

__all__ = ["ModelConfig", "CausalLM", "KVCache", "causal_lm_loss", "Tokenizer", "ChatTemplateError",
           "render_chat_template", "load_hf_directory", "load_model", "generate", "pull"]

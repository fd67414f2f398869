"""lora_core: the LoRA layer, injection into any nn.Module, and PEFT-format adapter files."""
from .config import LoRAConfig, layer_index
from .layer import LoRALinear
from .inject import (AdaptersOff, adapter_state_dict, disable_adapters, inject_lora, load_adapter_state_dict,
                     lora_modules, mark_only_lora_trainable, merge_adapters, select_targets,
                     unmerge_adapters)
from .adapter_io import load_adapter, save_adapter
from .regularizer import OrthogonalityRegularizer
from .merge import MergeReport, merge_lora
from .merge_math import merged_weight
from .overlap import OverlapReport, analyse_adapter, analyse_update, analyse_weight
from .svd_cache import SVDCache, SpectralBasis, top_k_svd

__all__ = ["LoRAConfig", "layer_index", "LoRALinear", "AdaptersOff", "adapter_state_dict", "disable_adapters",
           "inject_lora", "load_adapter_state_dict", "lora_modules", "mark_only_lora_trainable", "merge_adapters",
           "select_targets", "unmerge_adapters", "load_adapter", "save_adapter", "OrthogonalityRegularizer",
           "MergeReport", "merge_lora", "merged_weight", "OverlapReport", "analyse_adapter", "analyse_update",
           "analyse_weight", "SVDCache", "SpectralBasis", "top_k_svd"]

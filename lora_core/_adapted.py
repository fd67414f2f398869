"""Find the LoRA-adapted modules of a model and their layer index / module type.

Shared by the regulariser, the overlap analysis and the merge; the module list is the layer's own
`lora_modules` (every LoRALinear, in module order). The layer index is LoRAConfig's rule
(`lora_core.config.layer_index`), re-exported here so the analysis groups modules by the same
block index that the `layers` filter selected them with.
"""
from __future__ import annotations

import torch.nn as nn

from lora_core.config import layer_index

__all__ = ["adapted_modules", "layer_index", "module_type"]


def adapted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> LoRALinear (imported lazily: this file must not import the layer at load)."""
    from lora_core.inject import lora_modules

    return dict(lora_modules(model))


def module_type(name: str) -> str:
    """Last component of the qualified name without a trailing '.weight' (e.g. 'up_proj')."""
    if name.endswith(".weight"):
        name = name[: -len(".weight")]
    return name.rsplit(".", 1)[-1]

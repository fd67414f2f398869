"""Find the LoRA-adapted modules of a model and their layer index / module type.

Shared by the regulariser, the overlap analysis and the merge; the module list is the layer's own
`lora_modules` (every LoRALinear, in module order).
"""
from __future__ import annotations

import re

import torch.nn as nn

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def adapted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> LoRALinear (imported lazily: this file must not import the layer at load)."""
    from lora_core.inject import lora_modules

    return dict(lora_modules(model))


def layer_index(name: str) -> int | None:
    """Layer index from a qualified name (r"\\.layers\\.(\\d+)\\."), None outside the layer stack."""
    m = _LAYER_RE.search(name if name.endswith(".") else name + ".")
    return int(m.group(1)) if m else None


def module_type(name: str) -> str:
    """Last component of the qualified name without a trailing '.weight' (e.g. 'up_proj')."""
    if name.endswith(".weight"):
        name = name[: -len(".weight")]
    return name.rsplit(".", 1)[-1]

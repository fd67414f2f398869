"""Fused LoRA linear: Triton kernels (forward and backward), the torch path, and dispatch."""
from .dispatch import lora_linear

__all__ = ["lora_linear"]

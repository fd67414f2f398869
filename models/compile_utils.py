"""torch.compile for the decode step: the switch, one compiled decoder layer, the eager fallback.

What is compiled is one decoder layer's step (norms, projections, RoPE, attention over the static
cache, SwiGLU), and the same compiled graph serves every layer: parameters are graph inputs, and
each layer gets its own cache view so the layer index is never read (reading it made dynamo
specialise on it and recompile once per layer). Compiling the whole 30-layer step instead took
several times longer than one layer, for the same code.

The switch: `generate(..., compile=True/False)`, or the environment variable LORA_CORE_COMPILE=1/0
when the argument is left at None. Off by default, because on a CPU it does not pay: a little
faster at batch 1, slower at batch 16 (the compiled layers keep plain F.linear, because packed
weights patched into each layer would make dynamo compile once per layer), and compiling costs
seconds to a minute per shape bucket, once per process. A decode step is mostly skinny matmuls
that inductor hands to the same BLAS calls, so compiling only removes the elementwise glue and
Python overhead. lm_head runs outside the compiled layers and stays packed. Figures:
bench/RESULTS.md, "Measurements cited by the code".

Fallback: if compiling or running the compiled layer raises, a one-line warning is given, the
process stops trying, and the step runs eagerly (the same numerics, no compile).
"""
from __future__ import annotations

import os
import warnings

import torch

ENV_VAR = "LORA_CORE_COMPILE"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
_state = {"failed": False, "compiled": None}


def compile_requested(value: bool | None) -> bool:
    """The argument when given, else LORA_CORE_COMPILE, else off."""
    if value is not None:
        if not isinstance(value, bool):
            raise TypeError(f"compile must be True, False or None, got {value!r}")
        return value
    raw = os.environ.get(ENV_VAR, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE or raw == "":
        return False
    raise ValueError(f"{ENV_VAR} must be 1 or 0 (or unset), got {os.environ[ENV_VAR]!r}")


def _layer_step(layer, h, cos, sin, mask, view):
    return layer(h, cos, sin, mask, False, view)  # (B, 1, D)


def compiled_layer_step():
    """The compiled `_layer_step`, or None once compiling has failed in this process."""
    if _state["failed"]:
        return None
    if _state["compiled"] is None:
        _state["compiled"] = torch.compile(_layer_step)
    return _state["compiled"]


def run_layers(layers, views, h, cos, sin, mask, use_compile: bool) -> torch.Tensor:
    """h (B, 1, D) through every layer, compiled when asked and possible, else eagerly.

    Args:
        layers: the model's decoder layers, in order.
        views: one static-cache view per layer (the same length as `layers`); each layer writes
            this step's keys and values into its own view.
        h: (B, 1, D) hidden states of the step's token.
        cos, sin: rotary tables for the step's positions, (B, 1, 1, head_dim).
        mask: (B, 1, 1, L) boolean attention mask over the cache (True = may attend).
        use_compile: try the compiled layer step (it falls back to eager for good on a failure).
    """
    step = compiled_layer_step() if use_compile else None
    if step is not None:
        try:
            out = h
            for layer, view in zip(layers, views):
                out = step(layer, out, cos, sin, mask, view)
            return out
        except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
            # Re-running eagerly from the same input is safe: each layer rewrites the same cache
            # slot with the same values.
            _state["failed"] = True
            first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
            warnings.warn(f"torch.compile of the decode step failed ({type(exc).__name__}: {first_line}); "
                          f"decoding eagerly from now on (set {ENV_VAR}=0 to skip compiling)",
                          RuntimeWarning, stacklevel=2)
    for layer, view in zip(layers, views):
        h = layer(h, cos, sin, mask, False, view)
    return h


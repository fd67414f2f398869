"""Put LoRA adapters into any nn.Module in place, and the small utilities around them.

Injection swaps each selected nn.Linear for a LoRALinear that reuses its parameters, so no model
class is copied or subclassed and base checkpoints keep loading by their original keys. Selection
follows LoRAConfig (suffixes or a regex, optionally a set of block indices).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .common.progress import progress as progress_bar
from .config import LAYER_INDEX_RE, LoRAConfig, layer_index
from .layer import LoRALinear

# How many distinct (layer-collapsed) Linear names an error message lists before trimming.
_MAX_NAMES_IN_ERROR = 24

# Attribute marking a module whose parameters are a full trainable copy (LoRAConfig.modules_to_save),
# and the one holding the parameters it replaced (unregistered: no checkpoint key, no extra memory
# when the original is tied elsewhere), so `disable_adapters` can still run the base model.
FULL_COPY_FLAG = "lora_full_copy"
_ORIGINALS = "_lora_full_copy_originals"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Qualified name -> LoRALinear, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def full_copy_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module holding a full trainable copy (modules_to_save), in module order."""
    return {name: m for name, m in model.named_modules() if getattr(m, FULL_COPY_FLAG, False)}


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the Linear output head(s) that "all-linear" leaves out.

    PEFT drops `get_output_embeddings()` of a transformers model; a module without that method (our
    decoder) names its head `lm_head`. A Linear whose weight is an Embedding's (a tied head) is a
    head whatever its name.
    """
    heads: set[int] = set()
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        head = getter()
        if head is not None:
            heads.add(id(head))
    elif isinstance(getattr(model, "lm_head", None), nn.Linear):
        heads.add(id(model.lm_head))
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {name for name, m in model.named_modules(remove_duplicate=False)
            if type(m) is nn.Linear and (id(m) in heads or id(m.weight) in embedding_weights)}


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the plain nn.Linear modules of `model` (subclasses excluded: they may
    have their own forward, e.g. MultiheadAttention's out_proj, that an adapter would bypass)."""
    return [name for name, m in model.named_modules(remove_duplicate=False) if type(m) is nn.Linear]


def summarize_names(names: list[str], limit: int = _MAX_NAMES_IN_ERROR) -> str:
    """Names with block indices collapsed ("model.layers.{0-11}.mlp.up_proj"), trimmed to `limit`."""
    groups: dict[str, list[int]] = {}
    for name in names:
        idx = layer_index(name)
        key = name if idx is None else LAYER_INDEX_RE.sub(".layers.{}.", name, count=1)
        groups.setdefault(key, [])
        if idx is not None:
            groups[key].append(idx)
    items = []
    for key, idxs in groups.items():
        if idxs:
            lo, hi = min(idxs), max(idxs)
            contiguous = len(set(idxs)) == hi - lo + 1
            span = str(lo) if lo == hi else (f"{lo}-{hi}" if contiguous else f"{len(set(idxs))} of {lo}-{hi}")
            key = key.replace("{}", "{" + span + "}")
        items.append(key)
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def select_targets(model: nn.Module, config: LoRAConfig, strict: bool = True) -> list[tuple[str, nn.Linear]]:
    """The (name, nn.Linear) pairs `config` selects; raises ValueError naming what does not match.

    The one selection rule (injection, adapter loading and the trainer's up-front check all use it):
    `config.matches`, i.e. suffix or regex targets plus the `layers` filter. Refused: a config that
    matches no Linear; a target suffix or listed layer index that matches nothing (a typo would
    otherwise silently train fewer modules); r > min(N, K) for a selected module; a model that
    already carries LoRA modules. `strict=False` lets the unused suffixes / layers and a rank above
    a layer's size pass, as PEFT does, for configs read from adapter files; SVD inits still need
    r <= min(N, K), since they take r singular triplets of the weight.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"expected a LoRAConfig, got {type(config).__name__}")
    existing = lora_modules(model)
    if existing:
        raise ValueError(f"model already has LoRA modules ({summarize_names(list(existing))}); "
                         "injecting twice is refused")
    seen = linear_names(model)
    if not seen:
        raise ValueError(f"model {type(model).__name__} has no nn.Linear modules to adapt")
    heads = output_head_names(model) if config.all_linear else set()
    chosen = [n for n in seen if config.matches(n) and n not in heads]
    where = f"target_modules={config.target_modules!r}, layers={_fmt_layers(config.layers)}"
    if not chosen:
        raise ValueError(f"LoRA config ({where}) matches no nn.Linear module; the model has "
                         f"{_fmt_layer_count(seen)} and: {summarize_names(seen)}")
    if strict and isinstance(config.target_modules, list):
        unused = [t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in chosen)]
        if unused:
            raise ValueError(f"LoRA target_modules {unused} match no nn.Linear module ({where}); the "
                             f"model has: {summarize_names(seen)}")
    if strict and config.layers is not None:
        found = {layer_index(n) for n in chosen}
        missing = [i for i in config.layers if i not in found]
        if missing:
            raise ValueError(f"LoRA layers {missing} have no module matching target_modules="
                             f"{config.target_modules!r}; the model's layer indices: {_fmt_indices(seen)}")
    if "" in chosen:
        raise ValueError("the model itself is an nn.Linear: wrap it in a module to inject LoRA")
    pairs = [(n, model.get_submodule(n)) for n in chosen]
    if strict or config.init in ("pissa", "milora"):
        for name, lin in pairs:
            _check_rank(name, lin, config.for_module(name))
    return pairs


def _check_rank(name: str, linear: nn.Linear, config: LoRAConfig) -> None:
    out, inp = linear.out_features, linear.in_features
    if config.r <= min(out, inp):
        return
    msg = f"rank {config.r} is larger than layer {name} ({out}x{inp}) allows"
    if config.init in ("pissa", "milora"):
        msg += (f"; init={config.init!r} needs r <= min(N, K), but {name} has weight shape "
                f"{tuple(linear.weight.shape)} and r={config.r}")
    raise ValueError(msg)


def inject_lora(model: nn.Module, config: LoRAConfig, *, strict: bool = True) -> list[str]:
    """Replace the nn.Linear modules selected by `config` with LoRALinear, in place.

    Each module gets its own r / alpha when rank_pattern / alpha_pattern select it. Modules in
    `config.modules_to_save` get a full trainable copy of their parameters (a tied weight is untied,
    as in PEFT). Every other parameter is frozen; only lora_A / lora_B and the copies train. Returns
    the adapted names. A Linear reachable under two names (shared module) becomes one shared
    LoRALinear, configured by its first name. `strict` as in `select_targets`.
    """
    pairs = select_targets(model, config, strict=strict)
    to_copy = _modules_to_copy(model, config, [n for n, _ in pairs], strict=strict)
    replaced: dict[int, LoRALinear] = {}
    svd = config.init in ("pissa", "milora")
    bar = progress_bar(pairs, desc=f"LoRA init ({config.init})", enabled=None if svd else False)
    for name, linear in bar:
        new = replaced.get(id(linear))
        if new is None:
            new = replaced[id(linear)] = LoRALinear.from_linear(linear, config.for_module(name))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    for module in to_copy.values():
        make_full_copy(module)
    mark_only_lora_trainable(model)
    return [name for name, _ in pairs]


def _modules_to_copy(model: nn.Module, config: LoRAConfig, adapted: list[str],
                     strict: bool = True) -> dict[str, nn.Module]:
    """The modules `config.modules_to_save` selects, checked before anything changes."""
    if not config.modules_to_save:
        return {}
    found = {n: m for n, m in model.named_modules(remove_duplicate=False) if config.saves_module(n)}
    if strict and not found:
        raise ValueError(f"LoRA modules_to_save {config.modules_to_save} match no module of the model")
    clash = [n for n in found if any(a == n or a.startswith(n + ".") or n.startswith(a + ".") for a in adapted)]
    if clash:
        raise ValueError(f"modules {summarize_names(clash)} are both LoRA targets (or hold some) and in "
                         "modules_to_save; a module gets an adapter or a full copy, not both")
    return found


@torch.no_grad()
def make_full_copy(module: nn.Module) -> None:
    """Give `module` trainable copies of all its parameters (no-op when it already has them).

    The replaced parameters are kept, unregistered, for `disable_adapters`; a weight tied to another
    module (lm_head and embed_tokens) stays with that module, so the copy unties them.
    """
    if getattr(module, FULL_COPY_FLAG, False):
        return
    originals = {}
    for pname, p in list(module.named_parameters()):
        owner_name, _, leaf = pname.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        originals[pname] = p
        setattr(owner, leaf, nn.Parameter(p.detach().clone(), requires_grad=True))
    object.__setattr__(module, _ORIGINALS, originals)
    setattr(module, FULL_COPY_FLAG, True)


def _swap_parameters(module: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """Put `params` into `module` by name; returns the parameters they replaced."""
    before = {}
    for pname, p in params.items():
        owner_name, _, leaf = pname.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        before[pname] = getattr(owner, leaf)
        setattr(owner, leaf, p)
    return before


def mark_only_lora_trainable(model: nn.Module) -> None:
    """requires_grad=True on every lora_A / lora_B and full copy (modules_to_save), False elsewhere."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in lora_modules(model).values():
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
    for m in full_copy_modules(model).values():
        for p in m.parameters():
            p.requires_grad_(True)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: "<qualified>.lora_A" (r, K) and "<qualified>.lora_B" (N, r), and the
    full copies of modules_to_save as "<qualified>.modules_to_save.<parameter>", detached."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    for name, m in full_copy_modules(model).items():
        for pname, p in m.named_parameters():
            out[f"{name}.modules_to_save.{pname}"] = p.detach()
    return out


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors keyed like `adapter_state_dict` into the model's adapters (cast to their dtype).

    Every key and shape is checked before anything is written; missing, extra or mis-shaped keys are
    refused by name.
    """
    modules = lora_modules(model)
    if not modules:
        raise ValueError("model has no LoRA modules: inject_lora first")
    expected = {}
    for name, m in modules.items():
        expected[f"{name}.lora_A"] = (m.lora_A, tuple(m.lora_A.shape))
        expected[f"{name}.lora_B"] = (m.lora_B, tuple(m.lora_B.shape))
    for name, m in full_copy_modules(model).items():
        for pname, p in m.named_parameters():
            expected[f"{name}.modules_to_save.{pname}"] = (p, tuple(p.shape))
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"adapter state does not fit the model: missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected keys {extra[:8]}"
                         f"{' ...' if len(extra) > 8 else ''}")
    for key, (_, shape) in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"adapter tensor {key} has shape {tuple(state[key].shape)}, the model expects {shape}")
    for key, (param, _) in expected.items():
        param.copy_(state[key].to(device=param.device, dtype=param.dtype))


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: every LoRALinear uses its frozen weight only and every full copy
    (modules_to_save) its original parameters; restored on exit (also on exceptions). Refused when
    an adapter is merged, since its delta is then part of the weight."""
    modules = lora_modules(model)
    merged = [n for n, m in modules.items() if m.merged]
    if merged:
        raise ValueError(f"cannot disable merged adapters ({summarize_names(merged)}): unmerge first")
    before = {n: m.adapters_enabled for n, m in modules.items()}
    copies = list(full_copy_modules(model).values())
    swapped = []
    try:
        for m in modules.values():
            m.adapters_enabled = False
        for m in copies:
            swapped.append((m, _swap_parameters(m, getattr(m, _ORIGINALS))))
        yield model
    finally:
        for n, m in modules.items():
            m.adapters_enabled = before[n]
        for m, params in reversed(swapped):
            _swap_parameters(m, params)


class AdaptersOff(nn.Module):
    """A view of `model` with its adapters switched off on every call: the base model for drift
    measures and retain terms without a second copy of the weights in memory.

    It forwards `forward` and `hidden_states` (the decoder's two entry points) and shares
    `lm_head`, so code that reads hidden states and applies the head itself sees the base too.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model
        self.lm_head = model.lm_head

    def hidden_states(self, *args, **kwargs):
        with disable_adapters(self.inner):
            return self.inner.hidden_states(*args, **kwargs)

    def forward(self, *args, **kwargs):
        with disable_adapters(self.inner):
            return self.inner(*args, **kwargs)


def merge_adapters(model: nn.Module) -> None:
    """merge() on every LoRALinear (modules stay LoRALinear; see lora_core.merge_lora for export).

    Same arithmetic as merge_lora: both go through `merge_math.merged_weight`."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """unmerge() on every LoRALinear."""
    for m in lora_modules(model).values():
        m.unmerge()


def _fmt_indices(names: list[str]) -> str:
    present = sorted({i for i in map(layer_index, names) if i is not None})
    return f"{present[0]}-{present[-1]}" if present else "none"


def _fmt_layer_count(names: list[str]) -> str:
    count = len({i for i in map(layer_index, names) if i is not None})
    return f"{count} layers (indices {_fmt_indices(names)})" if count else "no .layers.<i>. blocks"


def _fmt_layers(layers) -> str:
    if isinstance(layers, range) and layers.step == 1:
        return f"range({layers.start}, {layers.stop})"
    return repr(layers)

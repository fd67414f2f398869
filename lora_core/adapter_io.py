"""Adapter files in PEFT's format: adapter_config.json + adapter_model.safetensors.

Why PEFT's format: an adapter trained here then loads into `transformers` + `peft` (and vLLM) on
the same base weights, and an adapter from PEFT loads here. Tensor keys are
"base_model.model.<qualified>.lora_A.weight" (r, K) and "... .lora_B.weight" (N, r).

PiSSA / MiLoRA adapters also changed the base (W became the SVD residual). PEFT's way out, done here
too: the file holds the adapter expressed against the *original* W, as a rank-2r plain LoRA,
delta = s (B A - B0 A0) = s [B | -B0] [A ; A0], with alpha adjusted so the scaling is unchanged.
Load such a file into the original base model, not into the one that holds the residual.

Files as PEFT users write them load too: target_modules="all-linear" (every Linear but the output
head), per-module rank_pattern / alpha_pattern (PEFT's matching rule, `config.pattern_key`) and
modules_to_save (full copies, e.g. of lm_head, keyed "base_model.model.lm_head.weight"); saving
writes the same fields when the model uses them. Loading refuses NaN/inf tensors and absurd
scalings by name, and warns when the file names another base model than the caller's.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .common.files import atomic_directory, atomic_write_text, atomic_write_via, read_json
from .config import LoRAConfig, layer_index, pattern_key
from .inject import (full_copy_modules, inject_lora, linear_names, lora_modules, make_full_copy, select_targets,
                     summarize_names)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."

# PEFT's adapter_config fields that would change the maths if set (truthy); all default to a falsy value.
_UNSUPPORTED_IF_SET = (
    "use_dora", "fan_in_fan_out", "lora_bias", "layer_replication", "target_parameters", "exclude_modules",
    "use_qalora", "trainable_token_indices", "use_bdlora",
)

# Largest scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) a loaded adapter may have. Published
# adapters use alpha <= 4 r, i.e. scaling <= 4 (rsLoRA: <= 4 sqrt(r), ~64 at r = 256); a scaling
# this far above them (alpha 1e9) multiplies the update into noise rather than meaning anything.
MAX_SCALING = 1024.0

_MODULES_TO_SAVE = "modules_to_save"


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model: str = "",
                 config: LoRAConfig | None = None) -> Path:
    """Write the model's adapters to `directory` in PEFT's format; returns the directory.

    r, scaling and dropout come from the modules; modules whose r or alpha differ from the common
    one are written as rank_pattern / alpha_pattern entries (exact module names), and full copies
    (modules_to_save) as "base_model.model.<name>.<parameter>", as PEFT writes them. `config`, when
    given, supplies alpha / use_rslora and must agree with every module. A new directory is built
    in a temp sibling and renamed into place; an existing one gets its two files replaced atomically.
    """
    modules = lora_modules(model)
    if not modules:
        raise ValueError("save_adapter: the model has no LoRA modules")
    dropouts = {m.dropout_p for m in modules.values()}
    if len(dropouts) > 1:
        raise ValueError(f"save_adapter needs one dropout for all modules, got {sorted(dropouts)}")
    dropout = dropouts.pop()
    if config is not None and not isinstance(config, LoRAConfig):
        raise TypeError(f"save_adapter config must be a LoRAConfig, got {type(config).__name__}")
    use_rslora = bool(config is not None and config.use_rslora)

    svd_names = [n for n, m in modules.items() if m.init_method in ("pissa", "milora")]
    if svd_names and len(svd_names) != len(modules):
        raise ValueError(f"save_adapter: only some modules use an SVD init ({summarize_names(svd_names)}); "
                         "they cannot share one rank in the file")
    # PiSSA / MiLoRA: rank 2r in the file, and alpha scaled so alpha / r (or / sqrt(r)) is unchanged.
    r_factor, alpha_factor = (2, math.sqrt(2) if use_rslora else 2) if svd_names else (1, 1)

    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        if config is not None:
            own = config.for_module(name)
            if own.r != m.r or not math.isclose(own.scaling, m.scaling, rel_tol=1e-9):
                raise ValueError(f"save_adapter: config (r={own.r}, scaling={own.scaling:g} for {name}) disagrees "
                                 f"with the model's adapter there (r={m.r}, scaling={m.scaling:g})")
            alpha = own.alpha
        else:
            alpha = m.scaling * m.r
        ranks[name], alphas[name] = m.r * r_factor, alpha * alpha_factor
        a, b = m.lora_A.detach(), m.lora_B.detach()
        if svd_names:
            a = torch.cat([a, m.lora_A_init.to(a.dtype)], dim=0)  # (2r, K)
            b = torch.cat([b, -m.lora_B_init.to(b.dtype)], dim=1)  # (N, 2r)
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = a.to("cpu").contiguous()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = b.to("cpu").contiguous()
    if svd_names:
        warnings.warn(f"save_adapter: {modules[svd_names[0]].init_method} adapter saved as a rank-2r "
                      f"(rank-{2 * modules[svd_names[0]].r}) plain LoRA against the ORIGINAL base weights "
                      "(PEFT's conversion); load it into the unmodified base model, not into this one whose "
                      "weights hold the SVD residual", stacklevel=2)

    copies = full_copy_modules(model)
    for name, m in copies.items():
        for pname, p in m.named_parameters():
            tensors[f"{KEY_PREFIX}{name}.{pname}"] = p.detach().to("cpu").contiguous()

    if config is not None:
        r, alpha = config.r * r_factor, config.alpha * alpha_factor
    else:  # the most common values, so the patterns list only the exceptions
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
    names = set(linear_names(model)) | set(modules)
    rank_pattern = {_exact_key(n, names): v for n, v in ranks.items() if v != r}
    alpha_pattern = {_exact_key(n, names): v for n, v in alphas.items() if v != alpha}

    targets, layers = _peft_targets(model, list(modules))
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "auto_mapping": None,
        "base_model_name_or_path": base_model or None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "layers_to_transform": layers,
        "layers_pattern": "layers" if layers is not None else None,
        "use_rslora": use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": list(copies) or None,
        "exclude_modules": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_dora": False,
        "lora_bias": False,
        "layer_replication": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
    }
    return _write_dir(Path(directory), peft_config, tensors)


def _exact_key(name: str, names: set[str]) -> str:
    """A rank/alpha_pattern key that selects `name` and no other module: the name itself (what
    people write), or the name with its dots escaped when, read as a regex, it selects others."""
    if any(other != name and pattern_key({name: 0}, other) for other in names):
        return re.escape(name)
    return name


def load_adapter(model: nn.Module, directory: str | os.PathLike, base_model: str | None = None,
                 *, strict_base: bool = False) -> LoRAConfig:
    """Load a PEFT-format LoRA adapter into `model`; injects LoRA first when the model has none.

    Every tensor key, shape and value (finite) and every module's scaling are checked before
    anything changes; a mismatch, a missing or an extra key, NaN/inf or a scaling above
    MAX_SCALING is refused by name. `base_model`, the name or path the caller loaded, is compared
    with the file's base_model_name_or_path: a different model is a warning naming both (an error
    with `strict_base`). Returns the adapter's LoRAConfig.
    """
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {directory}")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"adapter config not found: {cfg_path}")
    if not w_path.is_file():
        hint = " (only adapter_model.bin found: pickle files are not loaded, convert it to safetensors)" \
            if (directory / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"adapter weights not found: {w_path}{hint}")
    raw = read_json(cfg_path)
    config = config_from_peft(raw, source=str(cfg_path))
    if base_model is not None:
        _check_base_model(raw.get("base_model_name_or_path"), base_model, directory, strict_base)
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{w_path}: not a readable safetensors file ({err})") from None
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{w_path}: tensor {key} holds {bad} NaN/inf value(s); the adapter is corrupt "
                             "(or its training diverged) and would turn every output into garbage")

    copy_targets = {n: m for n, m in model.named_modules() if config.saves_module(n)}
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    copied: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for key, t in tensors.items():
        m = re.fullmatch(re.escape(KEY_PREFIX) + r"(.+)\.(lora_A|lora_B)\.weight", key)
        if m is not None:
            by_module.setdefault(m.group(1), {})[m.group(2)] = t
            continue
        found = _full_copy_key(key, copy_targets)
        if found is None:
            bad.append(key)
        else:
            copied.setdefault(found[0], {})[found[1]] = t
    if bad:
        raise ValueError(f"{w_path}: unexpected keys (not LoRA A/B weights of this format, nor parameters of "
                         f"a module in modules_to_save={config.modules_to_save}): {bad[:8]}"
                         f"{' ...' if len(bad) > 8 else ''}")

    existing = lora_modules(model)
    if existing:
        modules = {n: (m.out_features, m.in_features) for n, m in existing.items()}
        busy = [n for n, m in existing.items() if m.merged or m.init_method in ("pissa", "milora")]
        if busy:
            raise ValueError(f"load_adapter: modules {summarize_names(busy)} are merged or hold an SVD "
                             "residual; load into a fresh base model instead")
        other_rank = [n for n, m in existing.items() if m.r != config.for_module(n).r]
        if other_rank:
            ranks = sorted({m.r for m in existing.values()})
            raise ValueError(f"load_adapter: {cfg_path} has r={config.r}"
                             f"{' (and a rank_pattern)' if config.rank_pattern else ''} but the model's LoRA "
                             f"modules have r={ranks} ({summarize_names(other_rank)}); load into a fresh base "
                             "model instead")
    else:
        modules = {n: (lin.out_features, lin.in_features) for n, lin in select_targets(model, config, strict=False)}
    missing = sorted(set(modules) - set(by_module))
    extra = sorted(set(by_module) - set(modules))
    if missing or extra:
        raise ValueError(f"{w_path} does not fit the model: modules missing from the file "
                         f"{[KEY_PREFIX + n for n in missing[:6]]}{' ...' if len(missing) > 6 else ''}; "
                         f"file keys with no matching adapted module {[KEY_PREFIX + n for n in extra[:6]]}"
                         f"{' ...' if len(extra) > 6 else ''}")
    for name, (n_out, k_in) in modules.items():
        own = config.for_module(name)
        if not own.scaling <= MAX_SCALING:
            raise ValueError(f"{cfg_path}: lora_alpha={own.alpha:g} with r={own.r} gives {name} a scaling of "
                             f"{own.scaling:g}, above {MAX_SCALING:g}; an alpha this large turns the update into "
                             "noise (a typo in lora_alpha or alpha_pattern?)")
        want = {"lora_A": (own.r, k_in), "lora_B": (n_out, own.r)}
        for part, shape in want.items():
            if part not in by_module[name]:
                raise ValueError(f"{w_path}: key {KEY_PREFIX}{name}.{part}.weight is missing")
            got = tuple(by_module[name][part].shape)
            if got != shape:
                raise ValueError(f"{w_path}: key {KEY_PREFIX}{name}.{part}.weight has shape {got}, the model "
                                 f"expects {shape} (adapter for another base model or rank?)")
    for name, module in copy_targets.items():
        want = dict(module.named_parameters())
        have = copied.get(name, {})
        if set(have) != set(want):
            raise ValueError(f"{w_path}: modules_to_save module {name} needs parameters {sorted(want)}, the file "
                             f"has {sorted(have)}")
        for pname, p in want.items():
            if tuple(have[pname].shape) != tuple(p.shape):
                raise ValueError(f"{w_path}: key {KEY_PREFIX}{name}.{pname} has shape {tuple(have[pname].shape)}, "
                                 f"the model expects {tuple(p.shape)}")

    if not existing:
        inject_lora(model, config, strict=False)
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            own = config.for_module(name)
            m.lora_A.copy_(by_module[name]["lora_A"].to(device=m.lora_A.device, dtype=m.lora_A.dtype))
            m.lora_B.copy_(by_module[name]["lora_B"].to(device=m.lora_B.device, dtype=m.lora_B.dtype))
            m.scaling, m.dropout_p = own.scaling, own.dropout
        for name, module in copy_targets.items():
            make_full_copy(module)
            for pname, p in module.named_parameters():
                p.copy_(copied[name][pname].to(device=p.device, dtype=p.dtype))
    return config


def _full_copy_key(key: str, targets: dict[str, nn.Module]) -> tuple[str, str] | None:
    """(module, parameter) for a file key of a modules_to_save copy, else None.

    Accepted spellings: PEFT's "<prefix><module>.<param>", and the wrapper's own names
    "<prefix><module>.modules_to_save[.<adapter>].<param>" that some tools write.
    """
    if not key.startswith(KEY_PREFIX):
        return None
    rest = key[len(KEY_PREFIX):]
    for name in sorted(targets, key=len, reverse=True):  # the innermost module that holds the key
        if not rest.startswith(name + "."):
            continue
        param = rest[len(name) + 1:]
        names = dict(targets[name].named_parameters())
        if param.startswith(_MODULES_TO_SAVE + "."):
            param = param[len(_MODULES_TO_SAVE) + 1:]
            if param not in names and param.partition(".")[2] in names:
                param = param.partition(".")[2]  # drop the adapter name ("default")
        return (name, param) if param in names else None
    return None


def _model_name(name: str) -> str:
    """What identifies a base model across spellings: the last path component, lower-cased
    ("HuggingFaceTB/SmolLM2-135M-Instruct" and "/cache/smollm2-135m-instruct/" are the same)."""
    return name.replace("\\", "/").rstrip("/").rpartition("/")[2].lower()


def _check_base_model(saved: str | None, loading: str, directory: Path, strict: bool) -> None:
    if not saved or not isinstance(saved, str) or not loading:
        return
    if saved == loading or _model_name(saved) == _model_name(loading):
        return
    msg = (f"adapter {directory} was saved for base model {saved!r} but is being loaded into {loading!r}; "
           "an adapter on another base model (even one of the same shapes) gives meaningless outputs")
    if strict:
        raise ValueError(msg)
    warnings.warn(msg, UserWarning, stacklevel=3)


def config_from_peft(raw: dict, source: str = CONFIG_NAME) -> LoRAConfig:
    """LoRAConfig from a PEFT adapter_config dict; refuses options that change the maths."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a JSON object")
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{source}: peft_type is {raw.get('peft_type')!r}, only 'LORA' is supported")
    for key in _UNSUPPORTED_IF_SET:
        if raw.get(key):
            raise ValueError(f"{source}: {key}={raw[key]!r} is not supported (only its default, unset)")
    if raw.get("bias", "none") != "none":
        raise ValueError(f"{source}: bias={raw.get('bias')!r} is not supported (only 'none')")
    init = raw.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise ValueError(f"{source}: init_lora_weights={init!r} means the adapter was saved against a "
                         "modified base; re-save it with PEFT's path_initial_model_for_weight_conversion")
    pattern = raw.get("layers_pattern")
    if pattern not in (None, "", [], "layers", ["layers"]):
        raise ValueError(f"{source}: layers_pattern={pattern!r} is not supported (only 'layers')")
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers == []:
        layers = None
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in raw:
            raise ValueError(f"{source}: required field {key!r} is missing")
    try:
        return LoRAConfig(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0) or 0.0,
                          target_modules=raw["target_modules"], layers=layers,
                          use_rslora=bool(raw.get("use_rslora", False)), init="default",
                          rank_pattern=raw.get("rank_pattern") or {}, alpha_pattern=raw.get("alpha_pattern") or {},
                          modules_to_save=raw.get("modules_to_save") or None)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None


def _peft_targets(model: nn.Module, adapted: list[str]) -> tuple[list[str] | str, list[int] | None]:
    """target_modules (+ layers_to_transform) that make PEFT select exactly `adapted` in this model.

    Prefer PEFT's usual form, the module suffixes and a layer list; when that would select a different
    set (checked by replaying PEFT's matching rule on every candidate name), fall back to a regex that
    fullmatches exactly the adapted names.
    """
    candidates = set(linear_names(model)) | set(lora_modules(model)) | set(adapted)
    # PEFT (layers_pattern="layers") also finds "layers.<i>." at the very start of a name, hence the ".".
    index = {n: layer_index("." + n) for n in candidates}
    suffixes = sorted({n.rpartition(".")[2] for n in adapted})
    wanted = set(adapted)

    def select(layers: set[int] | None) -> set[str]:
        hits = {n for n in candidates if n in suffixes or any(n.endswith("." + s) for s in suffixes)}
        if layers is not None:
            hits = {n for n in hits if index[n] in layers}
        return hits

    if select(None) == wanted:
        return suffixes, None
    idx = {index[n] for n in adapted}
    if None not in idx and select(idx) == wanted:
        return suffixes, sorted(idx)
    return "(" + "|".join(re.escape(n) for n in sorted(adapted)) + ")", None


def _write_dir(out: Path, peft_config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write both files; never leave a half-written directory or file behind."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"save_adapter: {out} exists and is not a directory")
    config_text = json.dumps(peft_config, indent=2, sort_keys=True) + "\n"

    def write_weights(path: Path) -> None:
        save_file(tensors, str(path), metadata={"format": "pt"})

    if not out.exists():
        with atomic_directory(out) as tmp:
            write_weights(tmp / WEIGHTS_NAME)
            (tmp / CONFIG_NAME).write_text(config_text)
        return out
    # The directory exists (maybe a run directory with other files): replace our two files only.
    atomic_write_via(out / WEIGHTS_NAME, write_weights)
    atomic_write_text(out / CONFIG_NAME, config_text)
    return out

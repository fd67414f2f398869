"""LoRAConfig: which linear layers get an adapter, and with what rank, scale and initialisation.

One dataclass shared by injection, the adapter files and training, validated on construction so a
bad value fails where it is written rather than deep inside a forward pass. The matching rules
(suffixes, or one regex matched against the whole qualified name) follow PEFT's, so a config means
the same module set here and in an `adapter_config.json`.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field, replace

INIT_METHODS = ("default", "gaussian", "pissa", "milora")

# The projections of a Llama/Qwen2 block, named as in HF; the paper's "all linear" setting.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# PEFT's shorthand for "every nn.Linear except the output head" (compared case-insensitively, as PEFT
# does); the head is found by `inject.output_head_names`, since a name alone cannot tell it.
ALL_LINEAR = "all-linear"

# A module's block index: the first ".layers.<i>." in its qualified name (project-wide contract;
# `layer_index` is the only reader, and error messages collapse indices with this same pattern).
LAYER_INDEX_RE = re.compile(r"\.layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Block index of a qualified module name, or None when it is not inside `.layers.<i>.`.

    A caller whose names may start at the layer stack ("layers.3.mlp...", PEFT's convention for
    `layers_to_transform`) passes "." + name.
    """
    match = LAYER_INDEX_RE.search(name)
    return int(match.group(1)) if match else None


@dataclass
class LoRAConfig:
    """Hyper-parameters of a LoRA adapter.

    target_modules: a list of name suffixes (a module matches when its qualified name equals a
        suffix or ends with "." + suffix), or a single regex string matched with `re.fullmatch`
        against the whole qualified name (PEFT's two conventions).
    layers: None for every block, else the block indices to adapt (list or range); a module's
        index comes from `layer_index`. Modules outside `.layers.<i>.` never match when set.
        "all-linear" selects every nn.Linear except the output head (PEFT's shorthand).
    init: "default" (A Kaiming-uniform a=sqrt(5), B = 0), "gaussian" (A ~ N(0, 1/r^2), B = 0),
        "pissa" / "milora" (A, B from the top / bottom r singular triplets of W; W keeps the rest).
    rank_pattern / alpha_pattern: per-module r / alpha, keyed by regexes matched as PEFT does
        (`pattern_key`); the first key in order that matches wins, other modules keep r / alpha.
    modules_to_save: names of modules (any type, e.g. "lm_head") that get a full trainable copy
        instead of an adapter; a module is selected when its qualified name ends with an entry
        (plain string suffix, PEFT's rule).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    layers: list[int] | range | None = None
    use_rslora: bool = False
    init: str = "default"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, numbers.Integral) or self.r < 1:
            raise ValueError(f"LoRAConfig.r must be an integer >= 1, got {self.r!r}")
        self.r = int(self.r)
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real)
                or not math.isfinite(self.alpha) or self.alpha <= 0):
            raise ValueError(f"LoRAConfig.alpha must be a finite number > 0, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real)
                or not 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if self.init not in INIT_METHODS:
            raise ValueError(f"LoRAConfig.init must be one of {INIT_METHODS}, got {self.init!r}")
        if not isinstance(self.use_rslora, bool):
            raise TypeError(f"LoRAConfig.use_rslora must be a bool, got {self.use_rslora!r}")
        self.target_modules = _check_targets(self.target_modules)
        self.layers = _check_layers(self.layers)
        self.rank_pattern = _check_pattern("rank_pattern", self.rank_pattern, _check_rank_value)
        self.alpha_pattern = _check_pattern("alpha_pattern", self.alpha_pattern, _check_alpha_value)
        self.modules_to_save = _check_modules_to_save(self.modules_to_save)

    @property
    def all_linear(self) -> bool:
        """Whether target_modules is PEFT's "all-linear" shorthand."""
        return isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR

    def for_module(self, name: str) -> "LoRAConfig":
        """This config with r and alpha resolved for one module by rank_pattern / alpha_pattern
        (patterns emptied), so a layer built from it carries that module's own rank and scaling."""
        r_key = pattern_key(self.rank_pattern, name)
        a_key = pattern_key(self.alpha_pattern, name)
        if r_key is None and a_key is None and not self.rank_pattern and not self.alpha_pattern:
            return self
        return replace(self, r=self.r if r_key is None else self.rank_pattern[r_key],
                       alpha=self.alpha if a_key is None else self.alpha_pattern[a_key],
                       rank_pattern={}, alpha_pattern={})

    def saves_module(self, name: str) -> bool:
        """Whether the module with this qualified name is in modules_to_save (PEFT: plain endswith)."""
        return bool(self.modules_to_save) and bool(name) and any(name.endswith(t) for t in self.modules_to_save)

    @property
    def scaling(self) -> float:
        """Factor on B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA (rank-stabilised)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def matches_target(self, name: str) -> bool:
        """Whether a qualified module name is selected by `target_modules` (layers ignored)."""
        if self.all_linear:
            return True  # the output head is excluded by select_targets, which sees the model
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(name == t or name.endswith("." + t) for t in self.target_modules)

    def matches_layer(self, name: str) -> bool:
        """Whether a qualified module name passes the `layers` filter."""
        if self.layers is None:
            return True
        index = layer_index(name)
        return index is not None and index in self.layers

    def matches(self, name: str) -> bool:
        """Whether the module with this qualified name gets an adapter under this config."""
        return self.matches_target(name) and self.matches_layer(name)


def pattern_key(patterns: dict, name: str) -> str | None:
    """The first key of `patterns` (in order) that selects the module `name`, else None.

    PEFT's rule for rank_pattern / alpha_pattern: the key is a regex that must match a whole trailing
    run of dot-separated components of the qualified name: "up_proj" and "layers.1.mlp.up_proj"
    select "model.layers.1.mlp.up_proj", "proj" selects nothing.
    """
    for key in patterns:
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", name):
            return key
    return None


def _check_rank_value(v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"must be an integer >= 1, got {v!r}")
    return int(v)


def _check_alpha_value(v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"must be a finite number > 0, got {v!r}")
    return float(v)


def _check_pattern(what: str, patterns, check_value) -> dict:
    if patterns is None:
        return {}
    if not isinstance(patterns, dict):
        raise TypeError(f"LoRAConfig.{what} must be a dict of module-name pattern -> value, got {patterns!r}")
    out = {}
    for key, value in patterns.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"LoRAConfig.{what} key {key!r} is not a module-name pattern")
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(f"LoRAConfig.{what} key {key!r} does not compile as a regex: {err}") from None
        try:
            out[key] = check_value(value)
        except ValueError as err:
            raise ValueError(f"LoRAConfig.{what}[{key!r}] {err}") from None
    return out


def _check_modules_to_save(names) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, (list, tuple, set, frozenset)):
        raise TypeError(f"LoRAConfig.modules_to_save must be None or a list of module names, got {names!r}")
    names = sorted(names) if isinstance(names, (set, frozenset)) else list(names)
    for n in names:
        if not isinstance(n, str) or not n:
            raise ValueError(f"LoRAConfig.modules_to_save entry {n!r} is not a module name")
    return names or None


def _check_targets(targets: list[str] | tuple[str, ...] | str) -> list[str] | str:
    if isinstance(targets, str):
        if not targets:
            raise ValueError("LoRAConfig.target_modules must not be an empty string")
        if targets.lower() == ALL_LINEAR:
            return targets
        try:
            re.compile(targets)
        except re.error as err:
            raise ValueError(f"LoRAConfig.target_modules regex {targets!r} does not compile: {err}") from None
        return targets
    if not isinstance(targets, (list, tuple, set, frozenset)):
        raise TypeError("LoRAConfig.target_modules must be a list of name suffixes or a regex string, "
                        f"got {type(targets).__name__}")
    targets = sorted(targets) if isinstance(targets, (set, frozenset)) else list(targets)
    if not targets:
        raise ValueError("LoRAConfig.target_modules must not be empty")
    for t in targets:
        if not isinstance(t, str) or not t or t.startswith(".") or t.endswith("."):
            raise ValueError(f"LoRAConfig.target_modules entry {t!r} is not a module name suffix")
    return targets


def _check_layers(layers: list[int] | range | None) -> list[int] | range | None:
    if layers is None:
        return None
    if isinstance(layers, range):
        if len(layers) == 0 or min(layers) < 0:
            raise ValueError(f"LoRAConfig.layers {layers!r} must be non-empty with indices >= 0")
        return layers
    if isinstance(layers, (bool, str)) or not isinstance(layers, (list, tuple, set, frozenset)):
        raise TypeError(f"LoRAConfig.layers must be None, a list of ints or a range, got {layers!r}")
    out = []
    for i in sorted(layers) if isinstance(layers, (set, frozenset)) else layers:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0:
            raise ValueError(f"LoRAConfig.layers entry {i!r} is not a layer index >= 0")
        out.append(int(i))
    if not out:
        raise ValueError("LoRAConfig.layers must not be empty (use None for every layer)")
    return out

"""Experiment presets: the grid of arms a `lora-core reproduce` run trains, evaluates and compares.

A preset is one YAML file (train/repro/presets/<name>.yaml ships `paper-small` and `paper`) read
into the dataclasses below. Every key is checked: an unknown key or a bad value is refused with a
one-line message that names the file and the key's path (e.g. `arms[3].train.rnak`), because a
typo that silently fell back to a default would run an hour of the wrong experiment.

Arm kinds:
- base: the untrained model, evaluated once (seeds do not apply);
- lora / full: a refusal SFT run per seed (train.sft), `train` holds TrainConfig overrides on top
  of the preset's shared `train` block; epochs come from the preset's `epochs` by kind, so the
  paper's 10 (LoRA) : 5 (full) ratio is written once;
- merge: a post-hoc projected merge (lora_core.merge_lora) of the adapter of another LoRA arm
  (`source`) with the same seed: no training, evaluated and analysed like the others.
A preset may start with `extends: <shipped preset>`: it then holds only what it adds. Its arms
are appended to the parent's, its `claims.roles` entries added to the parent's, and any other
block (train, eval, cost, ...) replaces the parent's block of that name key by key.

`matched:<method>` names the arm that method's search selects at matched safety
(claims.matched_safety): as `train.lr`, that arm's learning rate (such arms run after the searches);
as a merge arm's `source`, that arm's adapter; as a single role of `claims.roles`, that arm, so the
claims are read between equally safe arms.

`train.dtype` (the shared block's; an arm may not set its own) is the precision of the whole grid:
every arm trains in it (train.sft: bf16 LoRA keeps fp32 adapters, bf16 full fine-tuning keeps fp32
master weights) and every arm, the base model included, is evaluated in it.

`eval.execute_code: true` runs the suite's HumanEval and MBPP items (model-written code, in the
limited runner of train.eval.code_runner); the cost block then needs `code_item_s`.

`train.layers` may also be `early`, `middle` or `late`: thirds of the model's depth. The paper's
flagship, layers 16-31 of 48, is exactly the middle third of its model (train.repro.grid).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lora_core.train.eval.suites import SUITES, SuiteConfig
from lora_core.regularizer import SIDES
from lora_core.train.sft import spec_fields
from lora_core.train.sft.config import LORA_ONLY_KEYS, METHODS, PAPER_EPOCHS, RUNNER_KEYS, TrainConfig

KINDS = ("base", "lora", "full", "merge")
PRESET_DIR = Path(__file__).parent / "presets"


class PresetError(ValueError):
    """A preset file that cannot be used; the message names the file and the key."""


# `matched:<method>`: the arm that method's matched-safety search selects (as an lr: that arm's lr;
# as a claims role or a merge source: that arm).
MATCHED = "matched:"


def matched_method(value) -> str | None:
    """<method> of a `matched:<method>` value, else None."""
    if isinstance(value, str) and value.startswith(MATCHED) and value[len(MATCHED):]:
        return value[len(MATCHED):]
    return None


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str
    label: str = ""
    train: dict = field(default_factory=dict)  # TrainConfig overrides (lora/full)
    seeds: tuple[int, ...] | None = None  # None: the preset's seeds
    source: str | None = None  # merge: the LoRA arm whose adapter is merged
    projection: str | None = None  # merge: column | row | both
    k: int | None = None  # merge: top-k directions removed

    @property
    def title(self) -> str:
        return self.label or self.name

    @property
    def matched_lr(self) -> str | None:
        """The method whose matched-safety selection sets this arm's lr (`lr: matched:<method>`)."""
        return matched_method(self.train.get("lr"))


@dataclass(frozen=True)
class Preset:
    name: str
    model: str
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    description: str = ""
    data: dict = field(default_factory=lambda: {"dataset": "advbench", "limit": None, "seed": 0,
                                                "reasoning_line": None})
    train: dict = field(default_factory=dict)
    epochs: dict = field(default_factory=lambda: dict(PAPER_EPOCHS))
    eval: dict = field(default_factory=lambda: {"suite": "standard", "overrides": {}, "seed": 0})
    overlap: dict = field(default_factory=lambda: {"k": [16, 64], "side": "column"})
    claims: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    source_file: str = ""

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(name)

    def seeds_of(self, arm: Arm) -> tuple[int, ...]:
        if arm.kind == "base":
            return (0,)
        return arm.seeds if arm.seeds is not None else self.seeds

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------- checking helpers
class _Reader:
    """Checks of one file's values; every error starts with the file and the key path."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, path: str, why: str):
        raise PresetError(f"{self.where}: {path}: {why}")

    def mapping(self, value, path: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {type(value).__name__}")
        for key in value:
            if key not in allowed:
                self.fail(f"{path}.{key}" if path else str(key),
                          f"unknown key (known: {', '.join(allowed)})")
        for key in required:
            if key not in value:
                self.fail(f"{path}.{key}" if path else key, "is required")
        return value

    def string(self, value, path: str, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(path, f"expected a non-empty string, got {value!r}")
        if choices is not None and value not in choices:
            self.fail(path, f"expected one of {'|'.join(choices)}, got {value!r}")
        return value

    def integer(self, value, path: str, least: int | None = None, optional: bool = False):
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"expected an integer, got {value!r}")
        if least is not None and value < least:
            self.fail(path, f"must be >= {least}, got {value}")
        return value

    def number(self, value, path: str, positive: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(path, f"expected a finite number, got {value!r}")
        if positive and value <= 0:
            self.fail(path, f"must be > 0, got {value}")
        return float(value)

    def int_list(self, value, path: str, least: int = 0) -> tuple[int, ...]:
        if not isinstance(value, list) or not value:
            self.fail(path, f"expected a non-empty list of integers, got {value!r}")
        out = tuple(self.integer(v, f"{path}[{i}]", least) for i, v in enumerate(value))
        if len(set(out)) != len(out):
            self.fail(path, f"has repeated values {list(out)}")
        return out

    def str_list(self, value, path: str) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            self.fail(path, f"expected a name or a non-empty list of names, got {value!r}")
        return tuple(self.string(v, f"{path}[{i}]") for i, v in enumerate(value))


# ------------------------------------------------------------------------- sections
def _train_overrides(r: _Reader, value, path: str) -> dict:
    """TrainConfig keys, each value checked by TrainConfig itself; the keys the runner sets per
    run (model, method, seed, out, epochs, ...: RUNNER_KEYS) are not the preset's to set."""
    if value is None:
        return {}
    known = tuple(key for key in spec_fields.keys(TrainConfig) if key not in RUNNER_KEYS)
    r.mapping(value, path, known)
    plain = {k: v for k, v in value.items() if not (k == "layers" and v in ("early", "middle", "late"))
             and not (k == "lr" and matched_method(v))}
    try:
        TrainConfig.from_flat(**plain)
    except (TypeError, ValueError) as error:
        r.fail(path, str(error))
    return dict(value)


def _arm(r: _Reader, value, i: int) -> Arm:
    path = f"arms[{i}]"
    r.mapping(value, path, ("name", "kind", "label", "train", "seeds", "source", "projection", "k"),
              required=("name", "kind"))
    name = r.string(value["name"], f"{path}.name")
    if "/" in name or name.startswith(".") or name in ("report", "runs"):
        r.fail(f"{path}.name", f"{name!r} cannot name a run directory")
    kind = r.string(value["kind"], f"{path}.kind", KINDS)
    label = value.get("label", "")
    if not isinstance(label, str):
        r.fail(f"{path}.label", f"expected a string, got {label!r}")
    seeds = r.int_list(value["seeds"], f"{path}.seeds") if "seeds" in value else None
    train = _train_overrides(r, value.get("train"), f"{path}.train")
    if "dtype" in train:
        r.fail(f"{path}.train.dtype", "the preset's train.dtype sets every arm's precision, in training and in "
               "evaluation alike, so no arm is measured in another precision than another")
    if kind in ("base", "merge") and train:
        r.fail(f"{path}.train", f"a {kind} arm trains nothing")
    lora_only = [k for k in train if k in LORA_ONLY_KEYS]
    if kind == "full" and lora_only:
        r.fail(f"{path}.train.{lora_only[0]}", "a LoRA-only key on a full fine-tuning arm (the LoRA-only keys: "
               f"{', '.join(LORA_ONLY_KEYS)})")
    merge_keys = {"source", "projection", "k"} & set(value)
    if kind != "merge" and merge_keys:
        r.fail(f"{path}.{sorted(merge_keys)[0]}", "only a merge arm has source/projection/k")
    source = projection = k = None
    if kind == "merge":
        r.mapping(value, path, tuple(value), required=("source", "projection", "k"))
        source = r.string(value["source"], f"{path}.source")
        projection = r.string(value["projection"], f"{path}.projection", SIDES)
        k = r.integer(value["k"], f"{path}.k", least=1)
    return Arm(name=name, kind=kind, label=label, train=train, seeds=seeds, source=source,
               projection=projection, k=k)


def _eval(r: _Reader, value) -> dict:
    value = r.mapping(value, "eval", ("suite", "overrides", "seed", "execute_code"), required=("suite",))
    suite = r.string(value["suite"], "eval.suite", tuple(SUITES))
    overrides = value.get("overrides") or {}
    r.mapping(overrides, "eval.overrides", tuple(f.name for f in dataclasses.fields(SuiteConfig)))
    try:
        dataclasses.replace(SUITES[suite], **overrides)
    except (TypeError, ValueError) as error:
        r.fail("eval.overrides", str(error))
    for key, v in overrides.items():
        for sub, n in (v.items() if isinstance(v, dict) and key != "sampling" else [(None, v)]):
            if key in ("max_new_tokens", "sampling", "batch_size", "seed"):
                continue
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
                r.fail(f"eval.overrides.{key}" + (f".{sub}" if sub else ""),
                       f"expected a count >= 0 or null (the whole set), got {n!r}")
    execute_code = value.get("execute_code", False)
    if not isinstance(execute_code, bool):
        r.fail("eval.execute_code", f"expected true or false, got {execute_code!r}")
    return {"suite": suite, "overrides": dict(overrides), "execute_code": execute_code,
            "seed": r.integer(value.get("seed", 0), "eval.seed", least=0)}


def _claims(r: _Reader, value, arms: dict[str, Arm]) -> dict:
    roles_single = ("base", "lora", "full", "rank1_middle", "rank1_early", "rank1_late",
                    "lora_high_lr", "full_high_lr")
    roles_many = ("regularised", "regularised_high_lr", "merged", "rank_sweep")
    value = r.mapping(value or {}, "claims", ("safety", "over_refusal", "reasoning", "lower_is_better", "margin",
                                              "resamples", "roles", "matched_safety"),
                      required=("safety", "reasoning", "roles"))
    roles = r.mapping(value["roles"], "claims.roles", roles_single + roles_many, required=("base", "lora", "full"))
    matched = _matched_safety(r, value.get("matched_safety"), arms, value["safety"])
    searches = (matched or {}).get("search", {})
    out_roles = {}
    for role, name in roles.items():
        names = (r.str_list(name, f"claims.roles.{role}") if role in roles_many
                 else (r.string(name, f"claims.roles.{role}"),))
        for n in names:
            method = matched_method(n)
            if method is not None and role in roles_many:
                r.fail(f"claims.roles.{role}", f"{n!r}: a list role names arms; 'matched:' is for the single roles")
            if method is not None and method not in searches:
                r.fail(f"claims.roles.{role}", f"{n!r} names no search of claims.matched_safety "
                       f"(searches: {', '.join(searches) or 'none'})")
            if method is None and n not in arms:
                r.fail(f"claims.roles.{role}", f"names no arm: {n!r} (arms: {', '.join(arms)})")
        out_roles[role] = list(names) if role in roles_many else names[0]
    if matched_method(out_roles["base"]):
        r.fail("claims.roles.base", "the base model is no search's selection")
    if out_roles.get("regularised_high_lr") and "lora_high_lr" not in out_roles:
        r.fail("claims.roles.regularised_high_lr", "needs claims.roles.lora_high_lr, the plain LoRA arm they are "
               "compared with")
    return {"safety": r.string(value["safety"], "claims.safety"),
            "over_refusal": r.string(value["over_refusal"], "claims.over_refusal") if "over_refusal" in value else None,
            "reasoning": list(r.str_list(value["reasoning"], "claims.reasoning")),
            "lower_is_better": list(r.str_list(value.get("lower_is_better", ["_"]), "claims.lower_is_better")),
            "margin": r.number(value.get("margin", 0.1), "claims.margin", positive=True),
            "resamples": r.integer(value.get("resamples", 2000), "claims.resamples", least=100),
            "roles": out_roles,
            "matched_safety": matched}


def _matched_safety(r: _Reader, value, arms: dict[str, Arm], safety: str) -> dict | None:
    """claims.matched_safety (train.repro.matched_safety): target, validation split, searches."""
    if value is None:
        return None
    path = "claims.matched_safety"
    value = r.mapping(value, path, ("target", "validation_n", "validation_seed", "search"),
                      required=("target", "validation_n", "search"))
    if not safety.startswith("safety.") or safety.count(".") < 2:
        r.fail(f"{path}", f"needs claims.safety to be a safety.<set>.<rate> measure, got {safety!r}")
    target = r.number(value["target"], f"{path}.target", positive=True)
    if target > 1:
        r.fail(f"{path}.target", f"a refusal rate is at most 1, got {target}")
    raw_search = value["search"]
    search = r.mapping(raw_search, f"{path}.search", tuple(raw_search) if isinstance(raw_search, dict) else ())
    if not search:
        r.fail(f"{path}.search", "names no method")
    out = {}
    for method, names in search.items():
        names = r.str_list(names, f"{path}.search.{method}")
        for name in names:
            if name not in arms or arms[name].kind not in ("lora", "full"):
                r.fail(f"{path}.search.{method}", f"{name!r} is not a LoRA or full fine-tuning arm")
        out[method] = list(names)
    if "full" not in out:
        r.fail(f"{path}.search", "needs a 'full' method: the reference every other method is compared with")
    return {"target": target, "validation_n": r.integer(value["validation_n"], f"{path}.validation_n", least=4),
            "validation_seed": r.integer(value.get("validation_seed", 1), f"{path}.validation_seed", least=0),
            "search": out}


COST_KEYS = ("lora_step_s", "full_step_s", "generate_item_s", "code_item_s", "bpb_item_s", "arc_item_s",
             "overlap_lora_module_s", "overlap_dense_module_s", "load_s", "measured")


def _cost(r: _Reader, value) -> dict:
    value = r.mapping(value or {}, "cost", COST_KEYS)
    out = {}
    for key, v in value.items():
        out[key] = r.string(v, "cost.measured") if key == "measured" else r.number(v, f"cost.{key}", positive=True)
    return out


def _extended(r: _Reader, raw: dict) -> dict:
    """`raw` on top of the shipped preset it names in `extends` (see the module docstring)."""
    parent_name = r.string(raw["extends"], "extends", tuple(preset_names()))
    parent = yaml.safe_load((PRESET_DIR / f"{parent_name}.yaml").read_text(encoding="utf-8"))
    if "extends" in parent:
        r.fail("extends", f"{parent_name!r} extends another preset itself; one level only")
    merged = dict(parent)
    for key, value in raw.items():
        if key == "extends":
            continue
        if key == "arms":
            merged["arms"] = list(parent.get("arms") or []) + list(value or [])
        elif key == "claims" and isinstance(value, dict):
            claims = {**parent.get("claims", {}), **value}
            claims["roles"] = {**parent.get("claims", {}).get("roles", {}), **value.get("roles", {})}
            merged["claims"] = claims
        elif isinstance(value, dict) and isinstance(parent.get(key), dict):
            merged[key] = {**parent[key], **value}
        else:
            merged[key] = value
    return merged


def preset_from_dict(raw, where: str) -> Preset:
    r = _Reader(where)
    top = ("name", "description", "model", "seeds", "data", "train", "epochs", "eval", "overlap",
           "claims", "cost", "arms", "extends")
    if isinstance(raw, dict) and "extends" in raw:
        r.mapping(raw, "", top)
        raw = _extended(r, raw)
    raw = r.mapping(raw, "", top, required=("name", "model", "arms", "eval", "claims"))
    data = r.mapping(raw.get("data") or {}, "data", ("dataset", "limit", "seed", "reasoning_line"))
    data = {"dataset": r.string(data.get("dataset", "advbench"), "data.dataset"),
            "limit": r.integer(data.get("limit"), "data.limit", least=1, optional=True),
            "seed": r.integer(data.get("seed", 0), "data.seed", least=0),
            "reasoning_line": data.get("reasoning_line")}
    if data["reasoning_line"] not in (None, True, False):
        r.fail("data.reasoning_line", f"expected true, false or null, got {data['reasoning_line']!r}")
    epochs = r.mapping(raw.get("epochs") or PAPER_EPOCHS, "epochs", METHODS, required=METHODS)
    epochs = {k: r.number(v, f"epochs.{k}", positive=True) for k, v in epochs.items()}
    overlap = r.mapping(raw.get("overlap") or {"k": [16, 64]}, "overlap", ("k", "side"), required=("k",))
    overlap = {"k": list(r.int_list(overlap["k"], "overlap.k", least=1)),
               "side": r.string(overlap.get("side", "column"), "overlap.side", SIDES)}
    if not isinstance(raw["arms"], list) or not raw["arms"]:
        r.fail("arms", "expected a non-empty list of arms")
    arms = [_arm(r, a, i) for i, a in enumerate(raw["arms"])]
    by_name: dict[str, Arm] = {}
    for i, a in enumerate(arms):
        if a.name in by_name:
            r.fail(f"arms[{i}].name", f"{a.name!r} is used twice")
        if a.kind == "merge" and not matched_method(a.source):  # a search's selection is checked below
            src = by_name.get(a.source)
            if src is None or src.kind != "lora":
                r.fail(f"arms[{i}].source", f"{a.source!r} is not a LoRA arm listed before this one")
        by_name[a.name] = a
    if sum(a.kind == "base" for a in arms) != 1:
        r.fail("arms", "needs exactly one arm of kind base (the model every arm is compared with)")
    preset = Preset(
        name=r.string(raw["name"], "name"), model=r.string(raw["model"], "model"), arms=tuple(arms),
        seeds=r.int_list(raw.get("seeds", [0, 1, 2]), "seeds"),
        description=str(raw.get("description", "")), data=data,
        train=_train_overrides(r, raw.get("train"), "train"), epochs=epochs, eval=_eval(r, raw["eval"]),
        overlap=overlap, claims=_claims(r, raw["claims"], by_name), cost=_cost(r, raw.get("cost")),
        source_file=where)
    if preset.eval["execute_code"] and preset.cost and "code_item_s" not in preset.cost:
        r.fail("cost.code_item_s", "is required when eval.execute_code is true: a program written and run costs "
               "many refusals' time, and the estimate would be short without it")
    matched = preset.claims.get("matched_safety") or {"search": {}}
    searched = {name for names in matched["search"].values() for name in names}
    for i, a in enumerate(arms):
        if a.matched_lr and a.matched_lr not in matched["search"]:
            r.fail(f"arms[{i}].train.lr", f"{a.train['lr']!r} names no search of claims.matched_safety "
                   f"(searches: {', '.join(matched['search']) or 'none'})")
        if a.matched_lr and a.name in searched:
            r.fail(f"arms[{i}].train.lr", "an arm of a search cannot take its lr from a search")
    for i, a in enumerate(arms):
        if a.kind != "merge":
            continue
        method = matched_method(a.source)
        if method is not None and method not in matched["search"]:
            r.fail(f"arms[{i}].source", f"{a.source!r} names no search of claims.matched_safety "
                   f"(searches: {', '.join(matched['search']) or 'none'})")
        sources = matched["search"][method] if method is not None else [a.source]
        for source in sources:
            if by_name[source].kind != "lora":
                r.fail(f"arms[{i}].source", f"{a.source!r}: the search's arm {source!r} is not a LoRA arm")
            missing = set(preset.seeds_of(a)) - set(preset.seeds_of(by_name[source]))
            if missing:
                r.fail(f"arms[{i}].seeds", f"seeds {sorted(missing)} have no run of {source!r} to merge")
    return preset


def load_preset_file(path: str | Path) -> Preset:
    path = Path(path)
    if not path.is_file():
        raise PresetError(f"preset file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise PresetError(f"{path}: not valid YAML ({first})") from None
    return preset_from_dict(raw, str(path))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> Preset:
    """A shipped preset by name (`paper-small`, `paper`)."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise PresetError(f"unknown preset {name!r}; shipped presets: {', '.join(preset_names())} "
                          "(or give your own file with --config)")
    return load_preset_file(path)

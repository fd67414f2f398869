"""A nested run spec, seen flat: the machinery behind TrainConfig's groups and field roles.

TrainConfig (train/sft/config.py) is a frozen dataclass of small frozen groups (data, LoRA,
optimiser, regulariser, retain term, checkpoints, logging). On disk (config.json), on the command
line and in presets a knob is one flat key: `lr`, `rank`, `retain_beta`. A group may give its
fields a prefix (`retain.beta` is `retain_beta`), and a field may name its key outright
(metadata "key"), so the flat keys stay the ones users type and old run directories hold.

Each leaf field's metadata says what it is for (read once, here, by every caller):
    role     "learning" (default): changes what is learned; compared on resume, part of a
             reproduce run's identity. "bookkeeping": changes what is written or shown, not the
             result; may change on resume. "invocation": about this invocation only (where the
             run is now, progress display); never stored as part of the run's identity.
    resume   "extend": may grow on resume (max_steps: a run is extended, never shortened)
    preset   False: set by the experiment runner itself from a preset's other blocks, so a
             preset's `train` block may not set it
plus the command-line metadata train.cli._options reads (help, choices, flags, cli, min).
A group's metadata (on the TrainConfig field that holds it): title (its --help heading), prefix,
and lora_only (its knobs mean nothing for full fine-tuning).
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field

ROLES = ("learning", "bookkeeping", "invocation")


def option(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, **metadata):
    """A leaf field: its default and its metadata (role, help, choices, ...)."""
    role = metadata.get("role", "learning")
    if role not in ROLES:
        raise ValueError(f"unknown field role {role!r} (known: {', '.join(ROLES)})")
    return field(default=default, default_factory=factory, metadata=metadata)


def group(cls, title: str, prefix: str = "", lora_only: bool = False):
    """A field holding one group dataclass, at its defaults unless given."""
    return field(default_factory=cls, metadata={"spec_group": cls, "title": title, "prefix": prefix,
                                                "lora_only": lora_only})


def split_optional(hint):
    """(T, True) for `T | None`, (hint, False) otherwise."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return hint, False


def type_error(leaf: "Leaf", value) -> str | None:
    """Why `value` cannot be this knob's (wrong type), or None. A preset or a library caller can
    hand any YAML/JSON value; `lr: "1e-3"` must be named, not fail later in a comparison."""
    kind, optional = split_optional(leaf.hint)
    if value is None:
        return None if optional else "must be given (got none)"
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind in (int, bool, str):
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    else:
        return None
    return None if ok else f"expected {'a number' if kind is float else kind.__name__}, got {value!r}"


@dataclass(frozen=True)
class Leaf:
    """One knob of a nested spec: its flat key and where it sits."""

    key: str  # the flat name: config.json key, preset key, --flag
    group: str | None  # attribute of the group holding it (None: a top-level field)
    field: dataclasses.Field
    hint: object  # its type annotation
    title: str | None  # the group's --help heading
    lora_only: bool

    @property
    def name(self) -> str:
        """The flat key, under the name argparse and callers of dataclass fields expect."""
        return self.key

    @property
    def role(self) -> str:
        return self.field.metadata.get("role", "learning")

    def value_in(self, spec):
        """This knob's value in a nested spec."""
        return getattr(getattr(spec, self.group) if self.group else spec, self.field.name)

    @property
    def meta(self) -> dict:
        """The field's metadata with its group's --help heading, as train.cli._options reads it
        (a plain dataclass may name the heading itself: metadata "group")."""
        return {"group": self.title, **self.field.metadata} if self.title else dict(self.field.metadata)


@functools.cache
def leaves(cls) -> tuple[Leaf, ...]:
    """Every knob of `cls` in declaration order (a group's knobs where the group is declared).
    Cached: every TrainConfig built reads it to validate and to flatten."""
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("spec_group")
        if sub is None:
            out.append(Leaf(f.metadata.get("key", f.name), None, f, hints[f.name],
                            f.metadata.get("title"), False))
            continue
        sub_hints = typing.get_type_hints(sub)
        for g in dataclasses.fields(sub):
            key = g.metadata.get("key", f.metadata["prefix"] + g.name)
            out.append(Leaf(key, f.name, g, sub_hints[g.name], f.metadata["title"], f.metadata["lora_only"]))
    keys = [leaf.key for leaf in out]
    if len(set(keys)) != len(keys):
        raise TypeError(f"{cls.__name__}: two fields share a flat key")
    return tuple(out)


def keys(cls, *, role: str | None = None, lora_only: bool | None = None, **metadata) -> tuple[str, ...]:
    """The flat keys whose leaf matches every condition given (metadata compared with .get)."""
    return tuple(leaf.key for leaf in leaves(cls)
                 if (role is None or leaf.role == role)
                 and (lora_only is None or leaf.lora_only == lora_only)
                 and all(leaf.field.metadata.get(k) == v for k, v in metadata.items()))


def to_flat(spec) -> dict:
    """{flat key: value} of a nested spec (the form config.json and presets use)."""
    return {leaf.key: leaf.value_in(spec) for leaf in leaves(type(spec))}


def from_flat(cls, values: dict):
    """`cls` from flat keys; a key `cls` does not know is refused by name (a typo must not fall
    back to a default silently)."""
    known = {leaf.key: leaf for leaf in leaves(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {unknown}")
    top, grouped = {}, {}
    for key, value in values.items():
        leaf = known[key]
        if leaf.group is None:
            top[leaf.field.name] = value
        else:
            grouped.setdefault(leaf.group, {})[leaf.field.name] = value
    holders = {f.name: f.metadata["spec_group"] for f in dataclasses.fields(cls) if "spec_group" in f.metadata}
    return cls(**top, **{name: holders[name](**fields) for name, fields in grouped.items()})

"""Command-line options generated from a dataclass's fields, so each knob is written once.

A config dataclass (train.sft.config.TrainConfig, train.demo.DemoConfig) is the single source of
a flag's name, type, default, help and choices; a command module turns it into argparse options
with `add_dataclass_arguments` and back into the dataclass with `dataclass_from_args`. Hand-written
copies of the same fields in the parser and in the args->config copy drifted apart before.

A nested dataclass (TrainConfig's groups) gives one flag per leaf, named by its flat key
(train.sft.spec_fields), under its group's --help heading. Per-field settings live in
`dataclasses.field(metadata={...})`, all optional:

    help     help text; "%(default)s" expands to the dataclass default, as in plain argparse
    choices  the allowed values (a tuple owned by the code that uses them)
    group    title of the argparse argument group the flag is listed under in --help
    flags    the option strings, when not "--field-name" (e.g. ("--rank", "-r"), ("--rslora",))
    cli      False: an internal field that gets no flag (it keeps its dataclass default)

Types: int, float, str; bool (default False: a store_true switch; True or None: --x/--no-x);
`int | None` and `float | None` also take the word "none" for None (no number can be spelt so;
for `str | None` "none" stays a string, since it may be a real value such as a file name);
`list[T]` takes zero or more values. Any other type (a dict, say) must be marked cli=False.

The flags a user actually typed are recorded (`given_fields(args)`): `train --resume` must tell
"--lr 5e-5 typed" from "--lr left at its default" to compare it with the run's stored config.

This module's name starts with "_", so the CLI does not take it for a command (train/cli/__init__.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

from lora_core.train.sft.spec_fields import Leaf, from_flat, leaves, split_optional

# The namespace attribute that collects the dests of the generated flags the user typed.
_GIVEN = "_given_fields"

# Metadata a dataclass may take from a like-named field of another (see `inherit` below). Flags,
# groups and cli are left out: they are a property of one command's parser, not of the knob.
_INHERITED = ("help", "choices")


def flags_of(leaf: Leaf) -> tuple[str, ...]:
    """The knob's option strings: its own (metadata "flags"), or --flat-key."""
    return tuple(leaf.field.metadata.get("flags") or ("--" + leaf.key.replace("_", "-"),))


def cli_fields(cls, exclude=()) -> list[Leaf]:
    """The knobs of `cls` that get a flag, in declaration order (the order --help lists them)."""
    return [leaf for leaf in leaves(cls) if leaf.field.metadata.get("cli", True) and leaf.key not in exclude]


def _none_or(kind):
    """An argparse type for `kind | None`: the word "none" (any case) or "" is None."""
    def parse(text: str):
        return None if text.strip().lower() in ("none", "") else kind(text)
    # argparse names the type in its errors: "invalid int value: 'x'", not the helper's name.
    parse.__name__ = kind.__name__
    return parse


def _recording(action_class):
    """`action_class`, also noting its dest in the namespace when the flag is typed."""
    class Recording(action_class):
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            # A subcommand's namespace is copied into the top-level one attribute by attribute,
            # so the set travels with the parsed values.
            vars(namespace).setdefault(_GIVEN, set()).add(self.dest)
    Recording.__name__ = action_class.__name__
    return Recording


_STORE, _STORE_TRUE = _recording(argparse._StoreAction), _recording(argparse._StoreTrueAction)
_BOOLEAN_OPTIONAL = _recording(argparse.BooleanOptionalAction)


def given_fields(args: argparse.Namespace) -> set[str]:
    """The dests of the generated flags that were typed on the command line (not defaulted)."""
    return set(getattr(args, _GIVEN, ()))


def _bool_kwargs(default) -> dict:
    # A switch that is off by default needs only --x; one that is on, or "decide for me" (None),
    # needs a way to say no as well.
    if default is False:
        return {"action": _STORE_TRUE}
    return {"action": _BOOLEAN_OPTIONAL}


def _type_kwargs(leaf: Leaf, hint, default) -> dict:
    """The argparse keywords that follow from the field's type annotation."""
    kind, optional = split_optional(hint)
    if kind is bool:
        return _bool_kwargs(default)
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind) or (str,)
        return {"type": item, "nargs": "*"}
    if kind in (int, float):
        return {"type": _none_or(kind) if optional else kind}
    if kind is str:
        return {}
    raise TypeError(f"{leaf.key}: no command-line form for type {hint!r}; give it metadata "
                    "{'cli': False} or pass it in exclude")


def _default_of(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise TypeError(f"{field.name}: a field without a default cannot be an option")


def _metadata(leaf: Leaf, inherit) -> dict:
    """The knob's metadata, with help/choices it lacks taken from `inherit`'s like-keyed knob."""
    base = {other.key: other.field.metadata for other in leaves(inherit)} if inherit else {}
    meta = {key: base[leaf.key][key] for key in _INHERITED if key in base.get(leaf.key, {})}
    meta.update(leaf.meta)
    return meta


def _container(parser, title, groups: dict):
    """The argument group titled `title` (made on first use), or the parser itself for None."""
    if title is None:
        return parser
    if title not in groups:
        groups[title] = parser.add_argument_group(title)
    return groups[title]


def add_dataclass_arguments(parser, cls, *, exclude=(), groups: dict | None = None,
                            inherit=None) -> dict:
    """Add one option per field of dataclass `cls` to `parser` (a parser or an argument group).

    exclude: field names that get no flag (as metadata cli=False does).
    groups: title -> argument group, reused and filled in, so a caller can add more to a group.
    inherit: another dataclass whose like-named fields lend the help and choices a field lacks
        (the demo's --rank is TrainConfig's --rank).
    Returns {field name: the parser or group its flag went to}, so a command can put a flag of its
    own (e.g. `train --resume`) beside a generated one.
    """
    groups = {} if groups is None else groups
    placed = {}
    for leaf in cli_fields(cls, exclude):
        meta = _metadata(leaf, inherit)
        default = _default_of(leaf.field)
        kwargs = {"dest": leaf.key, "default": default, "help": meta.get("help"), "action": _STORE,
                  **_type_kwargs(leaf, leaf.hint, default)}
        if "choices" in meta:
            kwargs["choices"] = tuple(meta["choices"])
        placed[leaf.key] = _container(parser, meta.get("group"), groups)
        placed[leaf.key].add_argument(*flags_of(leaf), **kwargs)
    return placed


def dataclass_from_args(cls, args: argparse.Namespace, *, exclude=(), **overrides):
    """`cls` built from the parsed flags of its CLI fields; `overrides` win, the rest keep defaults.

    `exclude` must match the one given to add_dataclass_arguments.
    """
    values = {leaf.key: getattr(args, leaf.key) for leaf in cli_fields(cls, exclude)}
    values.update(overrides)
    return from_flat(cls, values)

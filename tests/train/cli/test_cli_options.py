"""Flags generated from dataclass fields (train.cli._options) and the commands built on them.

The flag lists of `lora-core train` and `lora-core demo` are written out below on purpose: they are
the commands' public interface, so a field renamed or marked cli=False must show up here as a
deliberate change, not slip through because the parser and the config moved together.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import pytest

from lora_core.train.cli import build_parser, main
from lora_core.train.cli._options import (add_dataclass_arguments, cli_fields, dataclass_from_args, flags_of,
                                          given_fields)
from lora_core.train.sft.retain_set import RETAIN_TARGETS
from lora_core.train.demo import DemoConfig
from lora_core.train.sft.config import DTYPES, TrainConfig

TRAIN_FLAGS = {
    "--model", "--method", "--data", "--dataset", "--limit", "--reasoning-line", "--no-reasoning-line",
    "--max-length", "--rank", "-r", "--alpha", "--dropout", "--targets", "--layers", "--rslora", "--init",
    "--lr", "--weight-decay", "--scheduler", "--warmup-steps", "--epochs", "--max-steps", "--batch-size",
    "--grad-accum", "--clip", "--dtype", "--grad-checkpointing", "--compile", "--seed", "--ortho-beta", "--ortho-k",
    "--ortho-side", "--ortho-weighting", "--ortho-normalize", "--ortho-scaled-update", "--retain-beta", "--retain-data",
    "--retain-targets", "--retain-target-tokens", "--retain-in-sft", "--retain-per-step", "--retain-limit",
    "--retain-unlikelihood", "--retain-unlikelihood-tokens",
    "--retain-max-length", "--retain-exclude-suite", "--retain-exclude-limit", "--retain-exclude-seed",
    "--out", "--resume", "--save-every", "--keep-checkpoints", "--eval-every", "--tensorboard", "--debug",
    "--device", "--nproc",  # about the invocation, not the run (train/cli/_device.py, _launch.py)
}
DEMO_FLAGS = {
    "--model", "--out", "--steps", "--lr", "--rank", "--targets", "--layers", "--batch-size", "--dtype", "--device",
    "--suite", "--eval-limit", "--seed", "--retain-beta", "--retain-per-step", "--retain-data",
    "--retain-targets", "--debug",
}


@dataclass
class Toy:
    count: int = 3
    rate: float = 0.5
    name: str = field(default="a", metadata={"help": "the name (default %(default)s)", "choices": ("a", "b")})
    fast: bool = False
    safe: bool = True
    auto: bool | None = None
    cap: int | None = 7
    scale: float | None = None
    path: str | None = None
    ids: list[int] = field(default_factory=list)
    group_me: int = field(default=1, metadata={"group": "extras", "flags": ("--grouped", "-g")})
    hidden: dict = field(default_factory=dict, metadata={"cli": False})


def _toy_parser(**kw) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_dataclass_arguments(parser, Toy, **kw)
    return parser


def _options(parser) -> dict[str, argparse.Action]:
    """dest -> action, for the options a test added (not -h)."""
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def _command(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _flags(parser) -> set[str]:
    return {flag for action in _options(parser).values() for flag in action.option_strings}


def test_one_flag_per_field_with_the_dataclass_default():
    options = _options(_toy_parser())
    assert set(options) == {f.name for f in cli_fields(Toy)} == {f.name for f in dataclasses.fields(Toy)} - {"hidden"}
    assert options["group_me"].option_strings == ["--grouped", "-g"]
    assert options["count"].option_strings == ["--count"]
    defaults = vars(_toy_parser().parse_args([]))
    assert defaults == {f.name: getattr(Toy(), f.name) for f in cli_fields(Toy)}


def test_types_bools_and_lists():
    args = _toy_parser().parse_args(["--count", "4", "--rate", "0.25", "--fast", "--no-safe", "--auto",
                                     "--ids", "1", "2", "-g", "5"])
    assert (args.count, args.rate, args.fast, args.safe, args.auto, args.ids, args.group_me) == \
        (4, 0.25, True, False, True, [1, 2], 5)
    assert _toy_parser().parse_args(["--no-auto"]).auto is False


def test_none_parses_to_none_for_optional_numbers_only():
    args = _toy_parser().parse_args(["--cap", "none", "--scale", "None", "--path", "none"])
    assert args.cap is None and args.scale is None
    assert args.path == "none"  # a string "none" may be a real value (a file name)
    assert _toy_parser().parse_args(["--cap", "12"]).cap == 12


def test_choices_and_types_are_enforced_with_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _toy_parser().parse_args(["--name", "c"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'c'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _toy_parser().parse_args(["--cap", "many"])
    assert "invalid int value: 'many'" in capsys.readouterr().err


def test_help_expands_the_default_and_lists_groups():
    text = _toy_parser().format_help()
    assert "the name (default a)" in text
    assert "extras:" in text and "--hidden" not in text


def test_round_trip_args_to_dataclass():
    argv = ["--count", "9", "--name", "b", "--fast", "--cap", "none", "--ids", "4", "--grouped", "2"]
    built = dataclass_from_args(Toy, _toy_parser().parse_args(argv), hidden={"x": 1})
    assert built == Toy(count=9, name="b", fast=True, cap=None, ids=[4], group_me=2, hidden={"x": 1})


def test_exclude_and_untyped_fields():
    parser = _toy_parser(exclude=("rate",))
    assert "rate" not in _options(parser)
    assert dataclass_from_args(Toy, parser.parse_args([]), exclude=("rate",)) == Toy()

    @dataclass
    class Bad:
        table: dict = field(default_factory=dict)
    with pytest.raises(TypeError, match="table"):
        add_dataclass_arguments(argparse.ArgumentParser(), Bad)


def test_train_flags_are_unchanged_and_default_to_train_config():
    parser = _command("train")
    assert _flags(parser) == TRAIN_FLAGS
    from lora_core.train.cli.train import config_from_args

    assert config_from_args(parser.parse_args([])) == TrainConfig()


def test_train_round_trip_and_special_flags():
    from lora_core.train.cli.train import config_from_args

    argv = ["--method", "lora", "-r", "4", "--rslora", "--init", "pissa", "--no-reasoning-line",
            "--retain-limit", "none", "--limit", "12", "--layers", "0-3", "--clip", "0", "--ortho-side", "row",
            "--scheduler", "linear", "--dtype", "bfloat16", "--retain-targets", "self", "--grad-checkpointing"]
    args = _command("train").parse_args(argv + ["--resume"])
    assert args.resume is True
    assert config_from_args(args) == TrainConfig.from_flat(
        rank=4, use_rslora=True, init="pissa", reasoning_line=False, retain_limit=None, limit=12, layers="0-3",
        clip=None, ortho_side="row", scheduler="linear", dtype="bfloat16", retain_targets="self",
        grad_checkpointing=True)


def test_train_choices_come_from_the_field_and_validate_checks_them(capsys):
    parser = _command("train")
    actions = _options(parser)
    declared = [leaf for leaf in cli_fields(TrainConfig) if "choices" in leaf.field.metadata]
    assert {leaf.key for leaf in declared} >= {"method", "init", "scheduler", "dtype", "ortho_side",
                                               "ortho_weighting", "retain_targets"}
    for leaf in declared:
        assert actions[leaf.key].choices == tuple(leaf.field.metadata["choices"])
        with pytest.raises(ValueError, match=flags_of(leaf)[0]):
            TrainConfig.from_flat(**{leaf.key: "no-such-choice"})
    with pytest.raises(SystemExit):
        parser.parse_args(["--ortho-weighting", "flat"])
    assert "invalid choice" in capsys.readouterr().err


def test_train_help_lists_every_cli_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for f in cli_fields(TrainConfig):
        assert flags_of(f)[0] in text, f.name
    for title in ("model and data:", "LoRA:", "optimisation (paper defaults):", "run directory:",
                  "orthogonality regulariser", "retain term"):
        assert title in text
    # Internal fields stay off the command line.
    assert "--data-info" not in text and "--progress" not in text


def test_demo_flags_are_unchanged_and_inherit_train_choices():
    parser = _command("demo")
    assert _flags(parser) == DEMO_FLAGS
    actions = _options(parser)
    assert actions["dtype"].choices == DTYPES
    assert actions["retain_targets"].choices == RETAIN_TARGETS
    # The demo's own help wins over TrainConfig's; the default is the demo's.
    assert "must be new or empty" in actions["out"].help and actions["out"].default == DemoConfig().out
    assert dataclass_from_args(DemoConfig, parser.parse_args([])) == DemoConfig()


def test_given_fields_are_the_flags_typed_not_the_defaults():
    """`train --resume` compares only what was typed: "--count 3" typed equals the default, yet
    counts as given; flags left out do not."""
    parser = _toy_parser()
    assert given_fields(parser.parse_args([])) == set()
    args = parser.parse_args(["--count", "3", "--fast", "--no-safe", "--ids", "1", "2", "-g", "4"])
    assert given_fields(args) == {"count", "fast", "safe", "ids", "group_me"}
    train = _command("train")
    assert given_fields(train.parse_args(["--resume", "--lr", "5e-5"])) == {"lr"}


def test_top_level_help_lists_every_command(capsys):
    """`lora-core --help` used to fail with a TypeError: compare's help says "95% intervals", and
    argparse %-formats help strings."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("chat", "compare", "demo", "eval", "merge", "overlap", "pull", "reproduce", "train"):
        assert command in text
    assert "95% intervals" in text

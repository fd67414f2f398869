"""The `lora-core` command line.

Each subcommand lives in its own module in this package (`train/cli/<name>.py`) and is found by
name, so adding a command never touches this file; modules whose name starts with "_" are helpers. A command module
defines:

    HELP: str                              one line for `lora-core --help`
    add_arguments(parser) -> None          its flags (keep heavy imports out of this function)
    run(args) -> int                       the work; heavy imports go here, so `--help` stays fast

Errors meant for the user are raised as `UserError` (or ValueError/FileNotFoundError from the
library) and printed as one line without a traceback; anything else is a bug and keeps its traceback.
`--debug` (before or after the command) shows the traceback of every error, expected or not.

Exit codes, the same for every command:
    0    done
    1    an unexpected error: a bug, printed with its traceback
    2    bad input or an expected failure (a wrong flag, a missing or corrupt file, a full disk,
         a training run that diverged): one line naming what is wrong; argparse's usage errors too
    130  interrupted (Ctrl-C); files already written are complete, a training run continues with
         --resume
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


class UserError(Exception):
    """A problem with the user's input that a message explains fully."""


def _command_modules():
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        yield info.name.replace("_", "-"), importlib.import_module(f"{__name__}.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-core",
        description="LoRA safety alignment of reasoning LLMs: pull a model, evaluate, train a "
        "refusal adapter, analyse its overlap with the base weights, merge and export.",
    )
    debug_help = "show the full traceback of an error instead of its one-line message"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _command_modules():
        # argparse %-formats help text (for %(default)s): a literal "95% intervals" must be escaped,
        # or `lora-core --help` itself fails.
        command_parser = sub.add_parser(name, help=module.HELP.replace("%", "%%"), description=module.HELP)
        # Also after the command, where people add it when a command fails. SUPPRESS: leaving it
        # out there must not overwrite a --debug given before the command.
        command_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # for `train --nproc`, which relaunches it
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    if args.debug:
        return int(args._run(args) or 0)
    try:
        return int(args._run(args) or 0)
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
            FileExistsError) as error:
        print(f"lora-core {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        # Every write is atomic, so what is on disk is the last complete file or checkpoint; a
        # training run deferred the stop to the end of its step and checkpointed it (StopRequested).
        how = {"reproduce": "rerun the same command to continue", "train": "continue with --resume"}.get(args.command)
        what = str(stop) or "interrupted; files already written are complete"
        print(f"lora-core {args.command}: {what}" + (f" ({how})" if how else ""), file=sys.stderr)
        return 130
    except OSError as error:  # a full disk or a vanished folder, mid-write: name it, no traceback
        where = f" ({error.filename})" if error.filename else ""
        print(f"lora-core {args.command}: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

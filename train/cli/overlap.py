"""`lora-core overlap`: how much an adapter (or a full fine-tuning run) overlaps W's top-k subspace.

Writes overlap.json (every record), overlap.md (summary tables) and overlap.png (by layer and module
type, with the random-update baseline) into --out. The paper's claim to check: a LoRA update's
energy fraction sits near or below the random baseline, a full fine-tuning update's above it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lora_core import load_adapter
from lora_core.models import load_model
from lora_core.overlap import analyse_adapter, analyse_update, default_update_names
from lora_core.overlap_report import write_all
from lora_core.regularizer import SIDES
from lora_core.svd_cache import SVDCache
from lora_core.train.cli import UserError
from lora_core.train.cli._device import add_device_arguments, resolve_device
from lora_core.train.cli._paths import check_output_dir

HELP = "analyse the overlap of a LoRA adapter or a full fine-tuning update with the base weights' top-k subspace"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model: HF directory, .gguf file or registry name")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter",
                     help="PEFT-format adapter directory (adapter_config.json + adapter_model.safetensors)")
    src.add_argument("--tuned",
                     help="fully fine-tuned checkpoint: HF directory, directory of .safetensors, "
                          "or a .safetensors file")
    parser.add_argument("--k", type=int, required=True,
                        help="top singular directions of each W (capped per module by min(N, K))")
    parser.add_argument("--out", required=True, help="output directory for overlap.json / overlap.md / overlap.png")
    parser.add_argument("--side", choices=SIDES, default="column",
                        help="side plotted and printed (all sides are in the JSON)")
    parser.add_argument("--svd-dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--svd-cache", default=None,
                        help="safetensors file to read top-k SVDs from (if present) and write them back to")

    # float32 by default, unlike the other commands: dW = tuned - base must not carry the rounding
    # of a base checkpoint stored in fp32 and loaded as bf16.
    add_device_arguments(parser, dtype_help="dtype the base model loads in (default float32: exact for any "
                         "checkpoint; bfloat16 halves the memory and is exact for a bf16 checkpoint)")


def _load_tensors(path: Path) -> dict:
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in tuned checkpoint directory {path}")
    else:
        raise FileNotFoundError(f"tuned checkpoint not found: {path}")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except SafetensorError as error:
            raise ValueError(f"{f}: cannot read safetensors ({error})") from error
    return state


def run(args) -> int:
    if args.k < 1:
        raise UserError(f"--k must be >= 1, got {args.k}")
    out = check_output_dir(args.out)
    cache = SVDCache()
    cache_path = Path(args.svd_cache) if args.svd_cache else None
    # Checked before any model loads: the cache is written back only after all the work.
    if cache_path is not None and cache_path.exists() and not cache_path.is_file():
        raise UserError(f"--svd-cache {cache_path} exists and is not a file")
    if cache_path is not None and cache_path.is_file():
        cache.load(cache_path)  # a damaged file is a ValueError naming it
    dtype = torch.float64 if args.svd_dtype == "float64" else torch.float32

    device = resolve_device(args.device)
    load_dtype = getattr(torch, args.dtype or "float32")

    if args.adapter:
        adapter = Path(args.adapter)
        if not adapter.is_dir():
            raise FileNotFoundError(f"--adapter directory not found: {adapter}")
        model, _ = load_model(args.model, dtype=load_dtype, device=device)
        load_adapter(model, adapter, base_model=str(args.model))  # warns when it names another model
        report = analyse_adapter(model, args.k, svd_dtype=dtype, cache=cache)
    else:
        tuned = {n: t.to(device) for n, t in _load_tensors(Path(args.tuned)).items()}
        model, _ = load_model(args.model, dtype=load_dtype, device=device)
        base = {n: t.detach() for n, t in model.state_dict().items()}
        names = [n for n in default_update_names(base) if n in tuned]
        if not names:
            raise UserError(f"--tuned {args.tuned} shares no layer weights with the base model "
                            f"(expected keys like model.layers.0.mlp.up_proj.weight)")
        report = analyse_update(base, tuned, args.k, names, svd_dtype=dtype, cache=cache)
    paths = write_all(report, out, side=args.side)
    if cache_path is not None:
        cache.save(cache_path)
    overall = report.summary()["overall"]
    if overall.get("modules"):
        print(f"{overall['modules']} modules, k={args.k}: {args.side} energy fraction "
              f"{overall[f'energy_{args.side}']:.4g} vs random baseline {overall[f'baseline_{args.side}']:.4g} "
              f"(ratio {overall[f'ratio_{args.side}']:.3g})")
    else:
        print("every update is zero (an untrained adapter?): nothing to compare")
    for kind, p in paths.items():
        print(f"{kind}: {p}")
    return 0

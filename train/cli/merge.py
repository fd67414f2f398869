"""`lora-core merge`: fold a LoRA adapter into its base model and export an HF-format checkpoint.

Optionally removes the part of each update inside W's top-k singular subspace first (`--project
column|row|both|either --k K`, the paper's post-hoc alternative to the regulariser). The output directory
(config.json, safetensors weights, sharded with an index when large, tokenizer files with the chat
template, generation_config.json, merge_report.json/.md) is built in a temporary sibling and renamed
into place, so a failed merge leaves nothing half-written. Every merged weight is checked to be
finite before anything is written (`--unsafe` skips it). `transformers` and `models.load_model`
both load it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lora_core import load_adapter
from lora_core.merge import merge_lora
from lora_core.merge_math import PROJECTIONS
from lora_core.models import load_hf_directory
from lora_core.models.hf_format import write_hf_directory
from lora_core.models.loading import resolve_source
from lora_core.train.cli import UserError
from lora_core.train.cli._device import add_device_argument, resolve_device
from lora_core.train.cli._paths import check_output_dir

HELP = "merge a LoRA adapter into its base model (optionally removing dW's top-k part) and export it"

# Files copied from the source directory when present: what a tokenizer and generation need.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json")
EXPORT_DTYPES = ("bfloat16", "float16", "float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model: HF directory, .gguf file or registry name")
    parser.add_argument("--adapter", required=True, help="PEFT-format adapter directory")
    parser.add_argument("--out", required=True, help="output HF-format directory (must not exist or be empty)")
    parser.add_argument("--project", choices=[p for p in PROJECTIONS if p], default=None,
                        help="remove dW's component in W's top-k left (column) or right (row) subspace, in both "
                             "at once (both: U U^T dW V V^T, what --ortho-side both penalises) or in either "
                             "(the union)")
    parser.add_argument("--k", type=int, default=None, help="subspace size for --project")
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, default=None,
                        help="dtype of the exported weights (default: the source checkpoint's)")
    parser.add_argument("--svd-dtype", choices=["float32", "float64"], default="float32",
                        help="dtype of the SVD and of the merge sum")

    # --dtype here keeps its own default (the source checkpoint's): an export should not change
    # its dtype because of the machine it was merged on.
    add_device_argument(parser)
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="shard size of the safetensors files")
    parser.add_argument("--unsafe", action="store_true",
                        help="skip the check that every merged weight is finite (on by default: one cheap pass "
                             "per weight, before anything is written)")


def run(args) -> int:
    if args.project is None and args.k is not None:
        raise UserError("--k is only used with --project column|row|both|either")
    if args.project is not None and args.k is None:
        raise UserError(f"--project {args.project} needs --k (how many top singular directions to remove)")
    if args.max_shard_gb <= 0:
        raise UserError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty directory")
    check_output_dir(out)
    adapter = Path(args.adapter)
    if not adapter.is_dir():
        raise FileNotFoundError(f"--adapter directory not found: {adapter}")

    device = resolve_device(args.device)
    source = resolve_source(args.model)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, _ = load_hf_directory(source, dtype=dtype, device=device)
    load_adapter(model, adapter, base_model=str(args.model))  # warns when the file names another model
    svd_dtype = torch.float64 if args.svd_dtype == "float64" else torch.float32
    report = merge_lora(model, projection=args.project, k=args.k, svd_dtype=svd_dtype, safe=not args.unsafe)

    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        head, emb = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
        if head is not None and emb is not None and head.data_ptr() == emb.data_ptr():
            tensors.pop("lm_head.weight")  # shares storage with the embeddings; loaders re-tie it
        elif head is not None:
            # an adapted lm_head was merged into its own weight: the export must stop tying it
            config["tie_word_embeddings"] = False
    out_dtype = next(iter(tensors.values())).dtype
    config["torch_dtype"] = str(out_dtype).replace("torch.", "")
    extra = {name: (source / name).read_bytes() for name in TOKENIZER_FILES if (source / name).is_file()}
    rep = report.to_dict()
    rep.update(model=str(args.model), adapter=str(adapter))
    extra["merge_report.json"] = json.dumps(rep, indent=2) + "\n"
    extra["merge_report.md"] = report.markdown()
    write_hf_directory(out, config, tensors, extra_files=extra, max_shard_bytes=int(args.max_shard_gb * 1024**3))
    print(f"merged {rep['modules_merged']} modules (projection {args.project or 'none'}"
          + (f", k={args.k}, mean share of ||dW||^2 removed {rep['mean_removed_share']:.4g}" if args.project else "")
          + f"); largest cast error {rep['max_cast_abs_error']:.3g} (relative {rep['max_cast_rel_fro_error']:.3g})")
    print(f"wrote {out}")
    return 0

"""One LoRA training step: lora-core vs transformers+peft on the default model (CPU).

Setting (the issue's): SmolLM2-135M-Instruct, LoRA r=8 alpha 16 dropout 0.05 on all seven
projections (q,k,v,o,gate,up,down), batch 4 x 256 tokens, AdamW, bfloat16 and float32 weights.
In bfloat16 both stacks keep the adapter weights in float32 (peft's default `autocast_adapter_dtype`;
ours: the adapters are upcast after injection and the kernel casts them per call).

Every (stack, dtype) runs in its own fresh subprocess, one after the other in this invocation, so
neither inherits the other's allocator state or thread pools. A step is forward + backward +
optimiser step; after `--warmup` steps, `--steps` steps are timed and the median gives tokens/s.
Peak memory is the subprocess's ru_maxrss from os.wait4 (model loading included, for both).
Output: a table on stdout and JSON (`--out`, default bench/results/bench_train.json) with ratios
ours/theirs (tokens/s: higher is better, target >= 2; peak memory: lower is better, target <= 0.5,
issue 12).

transformers and peft are test-only dependencies of this project; only the worker of the "hf"
stack imports them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batch(vocab: int, batch: int, seq: int):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)  # (B, T)
    return ids, torch.ones_like(ids)


def _ours(model_dir: Path, dtype, batch, seq, compile_ops: bool = False):
    import torch

    from lora_core.models import causal_lm_loss, load_hf_directory
    from lora_core.train.sft.config import TrainConfig
    from lora_core.train.sft.model_prep import prepare_model

    # The trainer's own preparation (freeze, inject, fp32 adapters for bf16, allocator, compile),
    # so the benchmark measures what `lora-core train` runs.
    model, _ = load_hf_directory(model_dir, dtype=dtype)
    config = TrainConfig.from_flat(rank=8, alpha=16, dropout=0.05, targets=",".join(TARGETS),
                         dtype="bfloat16" if dtype == torch.bfloat16 else "float32", compile=compile_ops)
    params, _ = prepare_model(model, config)
    model.train()
    ids, mask = _batch(model.config.vocab_size, batch, seq)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = causal_lm_loss(model, ids, ids, attention_mask=mask)
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step


def _hf(model_dir: Path, dtype, batch, seq):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS,
                                             bias="none", task_type="CAUSAL_LM"))
    model.train()
    ids, mask = _batch(model.config.vocab_size, batch, seq)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step


def worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    if args.stack == "ours":
        step = _ours(Path(args.model_dir), dtype, args.batch, args.seq, args.compile)
    else:
        step = _hf(Path(args.model_dir), dtype, args.batch, args.seq)
    load_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    if args.profile:
        _profile(step, args)
        return
    times, losses = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    tokens = args.batch * args.seq
    result = {"stack": args.stack, "dtype": args.dtype, "load_s": load_s, "step_s": times,
              "median_step_s": statistics.median(times), "tokens_per_s": tokens / statistics.median(times),
              "losses": losses, "threads": torch.get_num_threads()}
    Path(args.result).write_text(json.dumps(result))


def _profile(step, args) -> None:
    """One step under torch.profiler; its op table (self CPU time first) to args.profile."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)
    Path(args.result).write_text(json.dumps({"table": table, "threads": torch.get_num_threads()}))


def _machine() -> dict:
    """CPU model, ISA flags and load: figures differ between machines and with other users' load."""
    from lora_core.kernels.cpu_caps import cpu_caps

    return cpu_caps().as_json() | {"cores": os.cpu_count(), "loadavg_1_5_15": list(os.getloadavg())}


def run_one(stack: str, dtype: str, args, model_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", "--stack", stack, "--dtype", dtype,
               "--model-dir", str(model_dir), "--batch", str(args.batch), "--seq", str(args.seq),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--result", str(result_file),
               "--threads", str(args.threads)] + (["--profile", "1"] if args.profile else []) \
            + (["--compile"] if args.compile and stack == "ours" else [])
        # The worker imports the installed lora_core; the repository root on its path would shadow
        # Hugging Face's `kernels` package, which transformers imports.
        proc = subprocess.Popen(cmd)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"worker {stack}/{dtype} failed with exit code {proc.returncode}")
        result = json.loads(result_file.read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stack", choices=("ours", "hf"))
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--model-dir", help="HF directory (default: the pulled registry model)")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0 = torch default)")
    parser.add_argument("--compile", action="store_true", help="ours with --compile (load_s includes compiling)")
    parser.add_argument("--profile", help="write a torch.profiler table of one step per dtype (ours only) "
                        "to this Markdown file instead of timing")
    parser.add_argument("--profile-rows", type=int, default=30, help=argparse.SUPPRESS)
    parser.add_argument("--profile-stacks", nargs="+", choices=("ours", "hf"), default=["ours"],
                        help="which stacks --profile profiles (default ours)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_train.json"))
    args = parser.parse_args(argv)
    if args.worker:
        args.dtype = args.dtype[0] if isinstance(args.dtype, list) else args.dtype
        worker(args)
        return 0
    from lora_core.common.files import atomic_write_text
    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        from lora_core.models.registry import pull

        model_dir = pull(args.model)
    if args.profile:
        return _write_profile(args, model_dir, atomic_write_text)
    rows = []
    for dtype in args.dtype:
        pair = {stack: run_one(stack, dtype, args, model_dir) for stack in ("ours", "hf")}
        rows.append({"dtype": dtype, "ours": pair["ours"], "hf": pair["hf"],
                     "tokens_per_s_ratio": pair["ours"]["tokens_per_s"] / pair["hf"]["tokens_per_s"],
                     "peak_rss_ratio": pair["ours"]["peak_rss_mb"] / pair["hf"]["peak_rss_mb"]})
    print(f"LoRA training step, r=8 on 7 projections, batch {args.batch} x {args.seq} tokens, CPU")
    print(f"{'dtype':9} {'ours tok/s':>10} {'hf tok/s':>9} {'ratio':>6}   {'ours MB':>8} {'hf MB':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['dtype']:9} {r['ours']['tokens_per_s']:10.1f} {r['hf']['tokens_per_s']:9.1f} "
              f"{r['tokens_per_s_ratio']:6.2f}   {r['ours']['peak_rss_mb']:8.0f} {r['hf']['peak_rss_mb']:8.0f} "
              f"{r['peak_rss_ratio']:6.2f}")
    out = Path(args.out)
    atomic_write_text(out, json.dumps({"setting": vars(args) | {"model_dir": str(model_dir)},
                                       "machine": _machine(), "rows": rows,
                               "targets": {"tokens_per_s_ratio": ">= 2", "peak_rss_ratio": "<= 0.5"}},
                              indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


def _write_profile(args, model_dir: Path, atomic_write_text) -> int:
    parts = [f"# Profile of one LoRA training step, batch {args.batch} x {args.seq}, "
             f"dropout 0.05, r=8 on 7 projections\n", f"CPU: {json.dumps(_machine())}\n"]
    for dtype in args.dtype:
        for stack in args.profile_stacks:
            result = run_one(stack, dtype, args, model_dir)
            parts.append(f"## {stack}, {dtype}, {result['threads']} thread(s), peak RSS "
                         f"{result['peak_rss_mb']:.0f} MB\n\n```\n{result['table']}\n```\n")
    atomic_write_text(Path(args.profile), "\n".join(parts))
    print(f"wrote {args.profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Microbenchmark of the LoRA linear: frozen dense vs unfused (PEFT-style) LoRA vs lora_linear.

Three layers, same inputs, timed in the same run so ratios are fair:
  dense   F.linear(x, W, b); backward = dX only (the frozen base layer's own cost)
  unfused F.linear(x, W, b) + s * F.linear(F.linear(drop(x), A), B), autograd backward
  ours    kernels.lora_linear (Triton on CUDA, the torch path on CPU)
for forward (graph recorded, as in training), backward (dX, dA, dB from a retained graph)
and both. CUDA: triton.testing.do_bench. CPU: the implementations are timed interleaved,
round-robin, and the median per implementation is reported, so load from other processes on a
shared machine hits all three alike. Prints a table (ms, TFLOP/s, ratio to dense) and writes
JSON plus a Markdown table.

    python bench/bench_lora_linear.py --quick --out bench/results_cpu.json    # ~3 min on CPU
    python bench/bench_lora_linear.py --out bench/results.json                 # default grid
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm  # tqdm.write keeps the bar intact

from lora_core.kernels import lora_linear
from lora_core.kernels.cpu_caps import cpu_caps
from lora_core.common.files import atomic_write_text
from lora_core.common.progress import progress

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("fwd", "bwd", "fwd+bwd")
IMPLS = ("dense", "unfused", "ours")


@dataclass(frozen=True)
class Case:
    M: int
    K: int
    N: int
    r: int
    dtype: str


def flops(case: Case, impl: str, mode: str) -> float:
    """Useful flops: dense 2MNK per GEMM; LoRA adds S, expand (fwd) and dS, dB, dA, dS A (bwd)."""
    M, K, N, r = case.M, case.K, case.N, case.r
    fwd, bwd = 2 * M * N * K, 2 * M * N * K
    if impl != "dense":
        fwd += 2 * M * r * (K + N)
        bwd += 2 * M * r * (2 * N + 2 * K)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def build(case: Case, device: str, dropout: float, modes=MODES, seed: int = 0):
    """Inputs and one closure per (impl, mode); every closure runs the whole step it times."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = DTYPES[case.dtype]
    rnd = lambda *s: torch.randn(*s, device=device, generator=gen).to(dt)
    x = rnd(case.M, case.K).requires_grad_(True)
    w, b = rnd(case.N, case.K), rnd(case.N)
    a = (rnd(case.r, case.K) / case.K**0.5).requires_grad_(True)
    lb = (rnd(case.N, case.r) * 0.01).requires_grad_(True)
    dy = rnd(case.M, case.N)
    scale = 2.0

    def unfused():
        xd = F.dropout(x, dropout, training=True) if dropout > 0 else x
        return F.linear(x, w, b) + F.linear(F.linear(xd, a), lb) * scale

    forwards = {
        "dense": (lambda: F.linear(x, w, b), (x,)),
        "unfused": (unfused, (x, a, lb)),
        "ours": (lambda: lora_linear(x, w, b, a, lb, scale, dropout, training=True), (x, a, lb)),
    }
    steps = {}
    for impl, (fwd, leaves) in forwards.items():
        steps[(impl, "fwd")] = fwd
        steps[(impl, "fwd+bwd")] = lambda fwd=fwd, leaves=leaves: torch.autograd.grad(fwd(), leaves, dy)
        graph = {}

        def bwd(fwd=fwd, leaves=leaves, graph=graph):
            if "y" not in graph:  # the forward is recorded once, outside the timed region
                graph["y"] = fwd()
            return torch.autograd.grad(graph["y"], leaves, dy, retain_graph=True)

        steps[(impl, "bwd")] = bwd
    return {k: v for k, v in steps.items() if k[1] in modes}


def time_cuda(steps) -> dict:
    from triton.testing import do_bench

    out = {}
    for key, fn in steps.items():
        if key[1] == "bwd":
            fn()  # record the graph before timing
        out[key] = do_bench(fn, warmup=25, rep=100)
    return out


def time_cpu(steps, min_reps: int, budget_s: float) -> dict:
    """Interleaved medians in ms: every round times each step once, until both the minimum
    number of rounds and the time budget are reached."""
    samples = {k: [] for k in steps}
    for fn in steps.values():  # warm-up (allocator, BLAS threads, graph recording)
        fn()
    start = time.perf_counter()
    rounds = 0
    while rounds < min_reps or (time.perf_counter() - start < budget_s and rounds < 50):
        for key, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            samples[key].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return {k: statistics.median(v) for k, v in samples.items()}


def cases_from_args(args, device: str) -> list[Case]:
    target = [Case(1024, 2048, 2048, 16, "fp32"), Case(1024, 2048, 2048, 16, "bf16")]
    if args.quick:
        return target
    if args.M or args.KN or args.r or args.dtype:
        Ms, KNs = args.M or [1024], args.KN or [2048]
        rs, dts = args.r or [16], args.dtype or ["fp32"]
        return [Case(m, kn, kn, r, dt) for dt in dts for m in Ms for kn in KNs for r in rs]
    if device == "cuda" or args.full:
        grid = [Case(m, kn, kn, r, "bf16") for m in (512, 8192) for kn in (576, 4096)
                for r in (1, 8, 16, 64)]
        return grid + target
    # CPU default: the grid at its small corner (the M=8192, K=N=4096 points take
    # minutes each on two cores), plus the CPU target point in both dtypes.
    return [Case(512, 576, 576, r, "fp32") for r in (1, 8, 16, 64)] + target


def markdown(rows: list[dict], device_name: str) -> str:
    lines = [f"LoRA linear benchmark on {device_name}; ratio = time / dense time, same run.", "",
             "| M | K=N | r | dtype | mode | dense ms | unfused ms | ours ms | unfused/dense "
             "| ours/dense | ours TFLOP/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['M']} | {r['K']} | {r['r']} | {r['dtype']} | {r['mode']} | "
                     f"{r['ms']['dense']:.3f} | {r['ms']['unfused']:.3f} | {r['ms']['ours']:.3f} | "
                     f"{r['ratio']['unfused']:.3f} | {r['ratio']['ours']:.3f} | "
                     f"{r['tflops']['ours']:.4g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="only the CPU target point M=1024, K=N=2048, r=16 in fp32 and bf16, "
                    "fwd+bwd only unless --modes says otherwise")
    ap.add_argument("--modes", nargs="+", choices=MODES, help="which passes to time (default all)")
    ap.add_argument("--full", action="store_true", help="the issue's whole grid even on CPU (slow)")
    ap.add_argument("--M", type=int, nargs="+", help="custom grid: row counts")
    ap.add_argument("--KN", type=int, nargs="+", help="custom grid: K = N sizes")
    ap.add_argument("--r", type=int, nargs="+", help="custom grid: ranks")
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="custom grid: dtypes")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU: torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--min-reps", type=int, default=3, help="CPU: minimum interleaved rounds")
    ap.add_argument("--budget", type=float, default=4.0, help="CPU: seconds per case (soft)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path; a Markdown table is written next to it (.md)")
    args = ap.parse_args(argv)
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.out is not None and args.out.suffix != ".json":
        raise ValueError(f"--out must name a .json file, got {args.out}")

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else f"CPU ({torch.get_num_threads()} threads, shared machine)")
    modes = args.modes or (["fwd+bwd"] if args.quick else list(MODES))
    rows = []
    cases = cases_from_args(args, args.device)
    for case in progress(cases, desc="cases"):
        steps = build(case, args.device, args.dropout, modes)
        ms = (time_cuda(steps) if args.device == "cuda"
              else time_cpu(steps, args.min_reps, args.budget))
        for mode in modes:
            t = {impl: ms[(impl, mode)] for impl in IMPLS}
            rows.append({**asdict(case), "mode": mode, "ms": t,
                         "ratio": {impl: t[impl] / t["dense"] for impl in IMPLS},
                         "tflops": {impl: flops(case, impl, mode) / (t[impl] * 1e-3) / 1e12
                                    for impl in IMPLS}})
            # Streamed as measured: a CPU grid on a shared machine can take many minutes.
            tqdm.write(f"{case} {mode}: " + ", ".join(f"{i} {t[i]:.2f} ms" for i in IMPLS)
                       + f"; ours/dense {t['ours'] / t['dense']:.3f}", file=sys.stderr)
        del steps

    table = markdown(rows, device_name)
    print(table)
    if args.out is not None:
        import os

        # Figures differ between machines (native bf16 or not) and with other users' load.
        meta = {"device": device_name, "torch": torch.__version__, "dropout": args.dropout,
                "cpu": cpu_caps().as_json(), "loadavg_1_5_15": list(os.getloadavg()),
                "timer": "triton.testing.do_bench" if args.device == "cuda"
                else "interleaved perf_counter medians"}
        atomic_write_text(args.out, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        atomic_write_text(args.out.with_suffix(".md"), table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

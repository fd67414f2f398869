"""Evaluation throughput before and after a change, measured in one run on one machine.

"Before" is a git ref of this repository (default: the last commit with static batches) installed
into a temporary folder (`pip install --no-deps --target`) and imported through PYTHONPATH;
"after" is the lora_core this interpreter imports. Each workload runs in a fresh process per side,
the sides alternating, so both meet the same machine:

- `humaneval`: greedy answers to N HumanEval items (the standard suite's prompt, token budget and
  batch size), timed around generate(); items/s and new tokens/s, and how many answers are the
  same text on both sides (greedy decoding; bf16 rounding may flip a few).
- `suite`: `lora-core eval --suite standard` end to end; items/s = answers generated / wall time.
- `demo`: `lora-core demo` end to end (evaluate, train, evaluate); its wall time only.

    python bench/bench_eval_throughput.py --model qwen2.5-coder-0.5b-instruct --workloads humaneval --n 40
    python bench/bench_eval_throughput.py --model smollm2-135m-instruct --workloads suite

Writes bench/results/bench_eval_throughput.{json,md}. The CPU model and ISA flags go with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE_REF = "98cadf6"  # the last commit that decoded in static batches (before continuous batching)


def _install_ref(ref: str, into: Path) -> Path:
    """`ref` of this repository, installed (no dependencies) into `into`/site; -> that folder."""
    tree, site = into / "tree", into / "site"
    added = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref],
                           capture_output=True, text=True)
    if added.returncode != 0:
        raise SystemExit(f"bench_eval_throughput: --before {ref!r} is not a commit of {ROOT} "
                         f"({added.stderr.strip().splitlines()[-1] if added.stderr.strip() else 'git failed'})")
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--target", str(site), str(tree)], check=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False,
                       capture_output=True)
    return site


def _worker_humaneval(args) -> dict:
    import torch

    import lora_core
    from lora_core.models import generate, load_model
    from lora_core.train.data.registry import load_records
    from lora_core.train.eval.code_tasks import user_prompt
    from lora_core.train.eval.context import chat_prompt
    from lora_core.train.eval.suites import SUITES

    torch.set_num_threads(args.threads)
    cfg = SUITES["standard"]
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    records = load_records("humaneval", limit=args.n, seed=0)
    prompts = [chat_prompt(tok, user_prompt("humaneval", r)) for r in records]
    start = time.perf_counter()
    texts = generate(model, tok, prompts, max_new_tokens=cfg.budget("humaneval"), batch_size=cfg.batch_size,
                     progress=False)
    wall = time.perf_counter() - start
    new_tokens = sum(len(tok.encode(t, add_special_tokens=False)) for t in texts)
    return {"lora_core": str(Path(lora_core.__file__).parent), "items": len(texts), "wall_s": wall,
            "items_per_s": len(texts) / wall, "new_tokens": new_tokens, "new_tokens_per_s": new_tokens / wall,
            "budget": cfg.budget("humaneval"), "batch_size": cfg.batch_size, "texts": texts}


def _imported_from(env: dict, cwd: Path) -> str:
    """The folder `import lora_core` resolves to for a process with this environment and folder."""
    probe = [sys.executable, "-c", "import lora_core, pathlib; print(pathlib.Path(lora_core.__file__).parent)"]
    return subprocess.run(probe, env=env, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _run_cli(command: list[str], env: dict, threads: int) -> tuple[float, Path, str]:
    """Wall time of `lora-core <command> --out <new folder>`, run from a folder outside the
    repository (`python -m` puts its working folder first on sys.path, where the repository's own
    lora_core/ would shadow the side under test); -> (seconds, the run folder, the lora_core it used)."""
    work = Path(tempfile.mkdtemp(prefix="lora-core-bench-"))
    out = work / "run"
    used = _imported_from(env, work)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lora_core.train.cli", *command, "--out", str(out)], check=True,
                   env=env | {"OMP_NUM_THREADS": str(threads)}, cwd=work)
    return time.perf_counter() - start, out, used


def _run_suite(model: str, dtype: str, env: dict, threads: int) -> dict:
    wall, out, used = _run_cli(["eval", "--model", model, "--suite", "standard", "--dtype", dtype], env, threads)
    answers = sum(1 for _ in open(out / "generations.jsonl", encoding="utf-8"))
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return {"lora_core": used, "items": answers, "wall_s": wall, "items_per_s": answers / wall,
            "parts_wall_s": results.get("timings", {})}


def _run_demo(model: str, dtype: str, env: dict, threads: int) -> dict:
    wall, _, used = _run_cli(["demo", "--model", model, "--dtype", dtype], env, threads)
    return {"lora_core": used, "items": None, "wall_s": wall, "items_per_s": None}


def _side(workload: str, args, env: dict) -> dict:
    if workload in ("suite", "demo"):
        return (_run_suite if workload == "suite" else _run_demo)(args.model, args.dtype, env, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        subprocess.run([sys.executable, __file__, "--worker", workload, "--model", args.model, "--dtype", args.dtype,
                        "--n", str(args.n), "--threads", str(args.threads), "--out", str(out)], check=True, env=env)
        return json.loads(out.read_text(encoding="utf-8"))


def _machine() -> dict:
    from lora_core.kernels.cpu_caps import cpu_caps

    return cpu_caps().as_json() | {"cores": os.cpu_count(), "loadavg_1_5_15": list(os.getloadavg())}


def _markdown(rows: list[dict], meta: dict) -> str:
    cpu = meta["machine"]
    lines = [f"# Evaluation throughput, before ({meta['before']}) and after, same run", "",
             f"Model {meta['model']}, {meta['dtype']}, {meta['threads']} threads; CPU {cpu.get('model')} "
             f"(flags {', '.join(cpu.get('flags', [])) or 'n/a'}); load average at the end "
             f"{' / '.join(f'{x:.2f}' for x in meta['machine_after']['loadavg_1_5_15'])}.", "",
             "| workload | items | before s | after s | before items/s | after items/s | speed-up | same text |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        same = f"{r['same_text']}/{r['items']}" if r.get("same_text") is not None else "n/a"
        rates = [f"{r[side]['items_per_s']:.3f}" if r[side]["items_per_s"] else "n/a" for side in ("before", "after")]
        lines.append(f"| {r['workload']} | {r['items'] or 'n/a'} | {r['before']['wall_s']:.1f} | "
                     f"{r['after']['wall_s']:.1f} | {rates[0]} | {rates[1]} | **{r['speedup']:.2f}x** | {same} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--workloads", nargs="+", default=["humaneval"], choices=["humaneval", "suite", "demo"])
    parser.add_argument("--n", type=int, default=40, help="HumanEval items (default 40)")
    parser.add_argument("--before", default=BEFORE_REF, help=f"git ref of the 'before' side (default {BEFORE_REF})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--worker", choices=["humaneval"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.n < 1 or args.threads < 1:
        raise SystemExit("bench_eval_throughput: --n and --threads must be >= 1")
    if args.worker:
        args.out.write_text(json.dumps(_worker_humaneval(args)), encoding="utf-8")
        return 0
    from lora_core.common.files import atomic_write_text

    machine = _machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        site = _install_ref(args.before, Path(tmp))
        before_env = os.environ | {"PYTHONPATH": str(site)}
        after_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        for workload in args.workloads:
            before = _side(workload, args, before_env)
            after = _side(workload, args, after_env)
            if before["lora_core"] == after["lora_core"] or not before["lora_core"].startswith(str(site)):
                raise SystemExit(f"bench_eval_throughput: both sides imported {after['lora_core']}: "
                                 "the comparison would be of one version with itself")
            row = {"workload": workload, "items": after["items"], "before": before, "after": after,
                   "speedup": before["wall_s"] / after["wall_s"], "same_text": None}
            if "texts" in after:
                pairs = list(zip(before.pop("texts"), after.pop("texts")))
                row["same_text"] = sum(a == b for a, b in pairs)
                # Where greedy answers part: late in a long answer is rounding (bf16 near-ties),
                # at the first characters it would be a defect.
                row["differences"] = [{"item": i, "first_differing_char": next(
                    (j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))),
                    "chars_before": len(a), "chars_after": len(b)} for i, (a, b) in enumerate(pairs) if a != b]
            print(f"{workload}: before {before['wall_s']:.1f} s, after {after['wall_s']:.1f} s, "
                  f"{row['speedup']:.2f}x", flush=True)
            rows.append(row)
    meta = {"model": args.model, "dtype": args.dtype, "threads": args.threads, "before": args.before,
            "machine": machine, "machine_after": _machine()}
    stem = f"bench_eval_throughput_{args.model.replace('/', '_')}"
    atomic_write_text(args.out_dir / f"{stem}.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    atomic_write_text(args.out_dir / f"{stem}.md", _markdown(rows, meta))
    print(f"wrote {args.out_dir / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run the CPU benchmarks and rewrite their tables in bench/RESULTS.md.

    python bench/run_all.py [--threads 1] [--only generate train lora_linear ...] [--render-only]

Generation and the training step are measured on both registry models: the 135M default and the
0.5B coder model (`generate_coder`, `train_coder`).

Each benchmark runs in its own subprocess, both dtypes, and writes its JSON under bench/results/
(the reference is measured in the same run by each benchmark itself). Then every table between
`<!-- run_all:begin NAME -->` and `<!-- run_all:end NAME -->` in RESULTS.md is replaced by one
rendered from that JSON, and the `machine` block by the machine's description (CPU model, the ISA
flags that decide bf16 speed, threads, load average, torch version): figures differ between
machines, and a shared machine's load shows in them.

Tables are written generically from each JSON's `rows`: every scalar field is a column, nested
dicts are flattened as `outer.inner`, and columns named like a ratio (`tokens_per_s_ratio`,
`peak_rss_ratio`, `ratio`, `ratio.ours`, ...) are set in bold. A benchmark that gains a field gains
a column with no change here. Text outside the markers is left alone; a marker pair that is
missing is appended at the end of the file.

Do not run this on a machine other jobs are using and then read the figures as the machine's: the
benchmarks time two stacks in turn, and someone else's burst lands on whichever runs then.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
RESULTS_DIR = ROOT / "bench" / "results"

CODER = "qwen2.5-coder-0.5b-instruct"  # the second registry model: larger matrices change the balance

# name -> (script, arguments after the script, JSON it writes, one-line title). Both dtypes each,
# except the 0.5B's training step, run in bf16 only (the dtype of the target and of training on a
# CPU with bf16 units; its fp32 step takes minutes per stack).
BENCHES = {
    "generate": ("bench_generate.py", ["--dtypes", "float32", "bfloat16", "--compile", "--out-dir", "{results}"],
                 "bench_generate.json", "Greedy generation vs transformers `generate` (same weights, same run)"),
    "generate_coder": ("bench_generate.py", ["--model", CODER, "--dtypes", "float32", "bfloat16", "--out-dir",
                                             "{results}", "--stem", "bench_generate_coder"],
                       "bench_generate_coder.json", f"Greedy generation vs transformers `generate`, {CODER}"),
    "train": ("bench_train.py", ["--dtype", "bfloat16", "float32", "--out", "{results}/bench_train.json"],
              "bench_train.json", "LoRA training step vs transformers + peft (same run)"),
    "train_coder": ("bench_train.py", ["--model", CODER, "--dtype", "bfloat16", "--out",
                                       "{results}/bench_train_coder.json"],
                    "bench_train_coder.json", f"LoRA training step vs transformers + peft, {CODER}"),
    "lora_linear": ("bench_lora_linear.py", ["--quick", "--out", "{results}/bench_lora_linear.json"],
                    "bench_lora_linear.json", "LoRA linear forward+backward vs dense and unfused (same run)"),
}


def machine_description(threads: int | None) -> dict:
    """CPU model and ISA flags (kernels.cpu_caps, the detection the kernels choose by), cores,
    threads, load average, torch version."""
    from lora_core.kernels.cpu_caps import cpu_caps

    caps = cpu_caps()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    import torch

    return {"cpu": caps.model, "isa_flags": list(caps.flags), "torch_cpu_capability": caps.torch_capability,
            "cores": os.cpu_count(), "threads": threads if threads else torch.get_num_threads(),
            "load_average_1_5_15": load, "torch": torch.__version__, "python": platform.python_version()}


def _flatten(row: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, (str, int, float, bool)) or value is None:
            flat[name] = value
    return flat


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return "" if value is None else str(value).replace("|", "\\|")


def render_table(rows: list[dict]) -> str:
    """Markdown table of `rows` (dicts, possibly nested); ratio columns in bold."""
    if not rows:
        return "_(no rows)_"
    flat = [_flatten(r) for r in rows]
    columns: list[str] = []
    for r in flat:
        columns += [c for c in r if c not in columns]
    is_ratio = {c: "ratio" in c.rsplit(".", 1)[-1] or c.startswith("ratio.") for c in columns}
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if any(isinstance(r.get(c), (int, float))
                                                                                  for r in flat) else "---"
                                                                 for c in columns) + "|"]
    for r in flat:
        cells = []
        for c in columns:
            text = _cell(r.get(c))
            cells.append(f"**{text}**" if is_ratio[c] and text else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_block(name: str, payload: dict, source: Path) -> str:
    title = BENCHES[name][3] if name in BENCHES else name
    rel = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source
    meta = payload.get("meta") or payload.get("machine") or {}
    meta_line = ", ".join(f"{k} {v}" for k, v in _flatten(meta).items() if not isinstance(v, bool))
    return "\n".join([f"**{title}** (`{rel}`)", "", render_table(payload.get("rows", [])), "",
                      f"<sub>{meta_line}</sub>" if meta_line else ""]).rstrip()


def render_machine(machine: dict) -> str:
    from lora_core.kernels.cpu_caps import ISA_FLAGS

    flags = ", ".join(machine["isa_flags"]) or "none of " + ", ".join(ISA_FLAGS)
    load = machine["load_average_1_5_15"]
    return (f"Machine: **{machine['cpu']}**, {machine['cores']} cores, ISA flags {flags} "
            f"(torch dispatch level {machine['torch_cpu_capability']}); {machine['threads']} torch thread(s); "
            f"load average {' / '.join(map(str, load)) if load else 'unknown'} (1/5/15 min) when the tables "
            f"were written; torch {machine['torch']}, Python {machine['python']}.")


def replace_block(text: str, name: str, body: str) -> str:
    """Put `body` between the markers of `name`; append the marker pair when it is missing."""
    begin, end = f"<!-- run_all:begin {name} -->", f"<!-- run_all:end {name} -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    block = f"{begin}\n{body}\n{end}"
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    return text.rstrip("\n") + "\n\n" + block + "\n"


def run_bench(name: str, threads: int | None, results: Path) -> None:
    script, extra, _, _ = BENCHES[name]
    cmd = [sys.executable, str(ROOT / "bench" / script)] + [a.format(results=results) for a in extra]
    if threads:
        cmd += ["--threads", str(threads)]
    print("+ " + " ".join(cmd), flush=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    done = subprocess.run(cmd, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"run_all: {script} failed with exit code {done.returncode}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), default=sorted(BENCHES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every benchmark")
    parser.add_argument("--render-only", action="store_true",
                        help="run nothing: rewrite RESULTS.md from the JSON already in --results")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--markdown", type=Path, default=RESULTS_MD)
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"run_all: --threads must be >= 1, got {args.threads}")
    if not args.markdown.is_file():
        raise SystemExit(f"run_all: {args.markdown} not found")
    from lora_core.common.files import atomic_write_text

    if not args.render_only:
        for name in args.only:
            run_bench(name, args.threads, args.results)
    text = args.markdown.read_text(encoding="utf-8")
    text = replace_block(text, "machine", render_machine(machine_description(args.threads)))
    for name in args.only:
        source = args.results / BENCHES[name][2]
        try:
            payload = json.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SystemExit(f"run_all: {source} not found (run without --render-only first)") from None
        except json.JSONDecodeError as exc:
            raise SystemExit(f"run_all: {source} is not valid JSON ({exc})") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list):
            raise SystemExit(f"run_all: {source} has no 'rows' list")
        text = replace_block(text, name, render_block(name, payload, source))
    atomic_write_text(args.markdown, text)
    print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

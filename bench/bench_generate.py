"""Greedy generation throughput: our decoder vs transformers `generate`, same weights, same run.

Both load the same HF-format directory (the default registry model, or --model DIR). Every
sequence generates exactly --max-new-tokens tokens on both sides (EOS is switched off) so the work
is identical; tokens/s = batch * new tokens / wall time of the generate call (median of --repeats
after one warm-up). Results go to JSON + a Markdown table. CPU timings on a shared machine are
noisy: compare ratios from the same run, not absolute figures across runs.

    python bench/bench_generate.py [--model smollm2-135m-instruct] [--max-new-tokens 32]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


from lora_core.models import generate, load_hf_directory
from lora_core.models.loading import resolve_source
from lora_core.common.files import atomic_write_text

QUESTIONS = [
    "What is the capital of France?", "Give me three tips for better sleep.", "Explain photosynthesis briefly.",
    "Write a haiku about autumn.", "How do I boil an egg?", "What is 17 times 23?",
    "Name three primary colors.", "Why is the sky blue?", "Translate 'good morning' into Spanish.",
    "What does a CPU do?", "Suggest a name for a cat.", "How many legs does a spider have?",
    "What is the boiling point of water?", "Summarise the plot of Cinderella in one sentence.",
    "What is a prime number?", "Recommend a book for a long flight.",
]


def _cpu_description() -> str:
    """CPU model name and the ISA flags that decide bf16 speed (Linux /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                         if f in value.split()]
                break
    except OSError:
        pass
    return f"{model} ({', '.join(flags) or 'no AVX2/AVX-512 flags'})"


def _load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _median_times(fns, repeats: int) -> list[float]:
    """Median wall time of each function; runs are interleaved so load drift on a shared CPU hits
    every function alike instead of whichever happened to run during a busy minute."""
    for fn in fns:
        fn()  # warm-up: allocator, kernels, lazy init
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def bench(model_dir: Path, batch_sizes, dtypes, new_tokens: int, repeats: int, with_compile: bool) -> list[dict]:
    import transformers

    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        ours, tok = load_hf_directory(model_dir, dtype=dtype)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
        no_eos = copy.copy(tok)
        no_eos.eos_token_ids = set()  # fixed-length generation on our side
        for batch in batch_sizes:
            prompts = [tok.apply_chat_template([{"role": "user", "content": q}])
                       for q in (QUESTIONS * (batch // len(QUESTIONS) + 1))[:batch]]
            encoded = [tok.encode(p) for p in prompts]
            width = max(map(len, encoded))
            ids = torch.full((batch, width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros(batch, width, dtype=torch.long)
            for i, e in enumerate(encoded):
                ids[i, width - len(e):] = torch.tensor(e)
                mask[i, width - len(e):] = 1

            def run_ours():
                return generate(ours, no_eos, prompts, max_new_tokens=new_tokens, batch_size=batch, progress=False,
                                compile=False)

            def run_compiled():
                return generate(ours, no_eos, prompts, max_new_tokens=new_tokens, batch_size=batch, progress=False,
                                compile=True)

            def run_theirs():
                with torch.inference_mode():
                    return theirs.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                           min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                           pad_token_id=tok.pad_token_id)

            out_theirs = run_theirs()
            assert out_theirs.shape[1] == width + new_tokens, "transformers did not generate the full length"
            fns = [run_ours, run_theirs]
            compile_s = None
            if with_compile:
                # First call of a new shape bucket = compile + one run; the steady time is subtracted.
                start = time.perf_counter()
                run_compiled()
                first = time.perf_counter() - start
                fns.append(run_compiled)
            times = _median_times(fns, repeats)
            t_ours, t_theirs = times[:2]
            row = dict(dtype=dtype_name, batch=batch, new_tokens=new_tokens, prompt_tokens=width,
                       ours_tok_s=batch * new_tokens / t_ours, transformers_tok_s=batch * new_tokens / t_theirs,
                       ours_s=t_ours, transformers_s=t_theirs)
            row["tokens_per_s_ratio"] = row["ours_tok_s"] / row["transformers_tok_s"]
            if with_compile:
                row["compiled_tok_s"] = batch * new_tokens / times[2]
                row["compiled_ratio"] = row["compiled_tok_s"] / row["transformers_tok_s"]
                row["compile_s"] = compile_s = max(first - times[2], 0.0)
            print(f"{dtype_name:9s} batch {batch:3d}: ours {row['ours_tok_s']:8.1f} tok/s, "
                  f"transformers {row['transformers_tok_s']:8.1f} tok/s, ratio {row['tokens_per_s_ratio']:.2f}x"
                  + (f"; compiled {row['compiled_tok_s']:.1f} tok/s ({row['compiled_ratio']:.2f}x), "
                     f"compile {compile_s:.1f} s" if with_compile else ""), flush=True)
            rows.append(row)
        ours = theirs = None  # free both models before the next dtype loads (closures above read them)
    return rows


def _batch_prompts(tok, batch: int) -> list[str]:
    return [tok.apply_chat_template([{"role": "user", "content": q}])
            for q in (QUESTIONS * (batch // len(QUESTIONS) + 1))[:batch]]


def _dynamic_step(model, tok, prompts):
    """The decode step generate() used before its fixed-shape caches: model.hidden_states on one new
    token with the growing KVCache, lm_head on it, argmax. Returns a zero-argument step."""
    encoded = [tok.encode(p) for p in prompts]
    batch, width = len(encoded), max(map(len, encoded))
    ids = torch.full((batch, width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.bool)
    for i, e in enumerate(encoded):
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = True
    cache = model.new_kv_cache(width + 64)
    with torch.inference_mode():
        hidden = model.hidden_states(ids, attention_mask=mask, kv_cache=cache)
        state = dict(positions=mask.long().sum(-1) - 1, next_ids=model.lm_head(hidden[:, -1]).argmax(-1))
    step_mask = torch.ones(batch, 1, dtype=torch.bool)

    @torch.inference_mode()
    def step():
        state["positions"] = state["positions"] + 1
        h = model.hidden_states(state["next_ids"].unsqueeze(1), attention_mask=step_mask,
                                position_ids=state["positions"].unsqueeze(1), kv_cache=cache)
        state["next_ids"] = model.lm_head(h[:, -1]).float().argmax(-1)
    return step


def _static_step(model, tok, prompts, use_compile: bool):
    """generate()'s decode step today: the slot cache, packed weights (eager) or the compiled layer."""
    from lora_core.models.continuous_batching import _decode_step, _prefill
    from lora_core.models.kv_cache import SlotKVCache
    from lora_core.models.packed_linear import packed_linears

    encoded = [tok.encode(p) for p in prompts]
    packed = packed_linears(model, len(prompts), enabled=not use_compile)
    packed.__enter__()  # kept on for the profiled steps (this process profiles, then exits)
    cfg = model.config
    cache = SlotKVCache(cfg.num_hidden_layers, len(prompts), cfg.num_key_value_heads, cfg.head_dim,
                        max(map(len, encoded)) + 64, model.dtype)
    with torch.inference_mode():
        prefilled, logits = _prefill(model, encoded, tok.pad_token_id, None)
        prompt_lengths = torch.tensor(cache.fill(list(range(len(prompts))), prefilled))
    state = dict(next_ids=logits.argmax(-1))
    live = torch.ones(len(prompts), dtype=torch.bool)

    @torch.inference_mode()
    def step():
        if int(cache.lengths.max()) >= cache.capacity - 1:  # profiling many steps: wrap around
            cache.lengths.copy_(prompt_lengths)
        logits = _decode_step(model, cache, state["next_ids"], use_compile)
        cache.advance(live)
        state["next_ids"] = logits.argmax(-1)
    step.packed = packed  # the packs stay patched in while the step is alive
    return step


def _step_factory(kind: str):
    if kind == "dynamic":
        return _dynamic_step
    return lambda model, tok, prompts: _static_step(model, tok, prompts, use_compile=kind == "compiled")


def profile(model_dir: Path, batch_sizes, dtypes, kind: str, steps: int, out_file: Path) -> None:
    """torch.profiler table of one decode step (averaged over `steps`) per dtype and batch size."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    sections = [f"# One greedy decode step, profiled (`--profile {kind}`)", "",
                f"{_cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
                f"load average {_load_average()}. Each table: {steps} decode steps after 3 warm-up steps, "
                "times per step (total / steps), top operators by self CPU time.", ""]
    for dtype_name in dtypes:
        model, tok = load_hf_directory(model_dir, dtype=getattr(torch, dtype_name))
        for batch in batch_sizes:
            step = _step_factory(kind)(model, tok, _batch_prompts(tok, batch))
            for _ in range(3):
                step()
            start = time.perf_counter()
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    step()
            wall = (time.perf_counter() - start) / steps
            events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            total_self = sum(e.self_cpu_time_total for e in events) or 1.0
            sections += [f"## {dtype_name}, batch {batch}: {wall * 1e3:.1f} ms per step under the profiler "
                         f"({batch / wall:.0f} tok/s)", "",
                         "| operator | calls/step | self CPU ms/step | share |", "|---|---:|---:|---:|"]
            for e in events[:15]:
                sections.append(f"| `{e.key}` | {e.count / steps:.0f} | {e.self_cpu_time_total / 1e3 / steps:.2f} | "
                                f"{100 * e.self_cpu_time_total / total_self:.1f}% |")
            sections.append("")
            print(f"{dtype_name} batch {batch}: {wall * 1e3:.1f} ms/step", flush=True)
            del step  # restores the patched forwards before the next step packs them again
        del model
    atomic_write_text(out_file, "\n".join(sections) + "\n")
    print(f"wrote {out_file}")


def _markdown(rows, meta) -> str:
    compiled = any("compiled_tok_s" in r for r in rows)
    lines = [f"# Greedy generation throughput ({meta['model']}, {meta['new_tokens']} new tokens, CPU)", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}, {meta['threads']} threads, "
             f"{meta['cpu']}, load average before/after {meta['load_before']} / {meta['load_after']}. "
             "Ratios are the figure to read.", "",
             "| dtype | batch | ours tok/s | transformers tok/s | ratio |"
             + (" compiled tok/s | compiled ratio | compile s |" if compiled else ""),
             "|---|---:|---:|---:|---:|" + ("---:|---:|---:|" if compiled else "")]
    for r in rows:
        line = (f"| {r['dtype']} | {r['batch']} | {r['ours_tok_s']:.1f} | {r['transformers_tok_s']:.1f} | "
                f"{r['tokens_per_s_ratio']:.2f}x |")
        if compiled:
            line += f" {r['compiled_tok_s']:.1f} | {r['compiled_ratio']:.2f}x | {r['compile_s']:.1f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="HF directory, .gguf or registry name")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", default="bench/results")
    parser.add_argument("--stem", default="bench_generate", help="file name of the JSON and Markdown written")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both sides (default: torch's choice). On a CPU shared with other "
                        "jobs, 1 avoids OpenMP spin contention that made 2-thread matmuls ~20x slower here")
    parser.add_argument("--compile", action="store_true",
                        help="also time generate(compile=True) and report its one-off compile cost")
    parser.add_argument("--profile", choices=["dynamic", "static", "compiled"], default=None,
                        help="instead of the benchmark, write a torch.profiler table of one decode step of this "
                        "kind (dynamic = the growing-cache path generate() used before) to --profile-out")
    parser.add_argument("--profile-out", default=None)
    parser.add_argument("--profile-steps", type=int, default=8)
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    import transformers

    model_dir = resolve_source(args.model)
    if args.profile:
        out_file = Path(args.profile_out or f"{args.out_dir}/profile_decode_{args.profile}.md")
        profile(model_dir, args.batch_sizes, args.dtypes, args.profile, args.profile_steps, out_file)
        return 0
    load_before = _load_average()
    rows = bench(model_dir, args.batch_sizes, args.dtypes, args.max_new_tokens, args.repeats, args.compile)
    meta = dict(model=str(args.model), new_tokens=args.max_new_tokens, repeats=args.repeats, torch=torch.__version__,
                transformers=transformers.__version__, threads=torch.get_num_threads(), cpu=_cpu_description(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(), load_before=load_before,
                load_after=_load_average())
    out = Path(args.out_dir)
    print(f"load average before/after: {load_before} / {meta['load_after']}")
    atomic_write_text(out / f"{args.stem}.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    atomic_write_text(out / f"{args.stem}.md", _markdown(rows, meta))
    print(f"wrote {out / args.stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The grid's report: report.json (everything), report.md (settings, claims, tables) and plots.

Read only from the run directories' files (eval/results.json, overlap/k-<k>.json, done.json), so
a report can be rebuilt from a finished grid without rerunning anything. Every n is stated: items
per measure (from the results), seeds per arm, training examples and steps.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from lora_core.common.files import atomic_write_json, atomic_write_text, read_json
from lora_core.common.text import fmt_number
from lora_core.kernels.cpu_caps import cpu_caps
from lora_core.train.repro import claims as claim_rule
from lora_core.train.repro.grid import Run
from lora_core.train.repro import matched_safety as matched_safety_rule
from lora_core.train.repro.matched_safety import collect_validation, resolve, select
from lora_core.train.repro.paper_claims import claim_rows, matched_rows
from lora_core.train.repro.plots import plot_matched_safety, plot_overlap_per_layer, plot_safety_vs_reasoning
from lora_core.train.repro.tensorboard_grid import write_grid_events


def collect(out: Path, runs: list[Run], side: str) -> tuple[dict, dict, dict, list[dict]]:
    """(values[arm][seed][metric] = {id: value}, overlap[arm][seed][k] = {module: energy},
    overlap_records[arm][seed][k] = records, per-run rows) of the finished runs."""
    values, overlap, records, rows = {}, {}, {}, []
    for run in runs:
        d = out / run.run_dir
        if not (d / "done.json").is_file():
            continue
        done = read_json(d / "done.json")
        results = read_json(d / "eval" / "results.json")
        values.setdefault(run.arm.name, {})[run.seed] = {
            m: dict(zip(v["ids"], v["values"])) for m, v in results.get("items", {}).items()}
        for k in done.get("overlap", {}):
            recs = read_json(d / "overlap" / f"k-{k}.json")["records"]
            live = [r for r in recs if not r["zero_update"]]
            overlap.setdefault(run.arm.name, {}).setdefault(run.seed, {})[k] = {r["name"]: r["energy"][side]
                                                                                for r in live}
            records.setdefault(run.arm.name, {}).setdefault(run.seed, {})[k] = live
        rows.append({"key": run.key, "arm": run.arm.name, "seed": run.seed, "metrics": results["metrics"],
                     "train": done.get("train"), "overlap": done.get("overlap"), "seconds": done.get("seconds")})
    return values, overlap, records, rows


def arm_table(preset, values: dict, overlap: dict, metrics: list[str]) -> list[dict]:
    resamples = preset.claims["resamples"]
    table = []
    for arm in preset.arms:
        if arm.name not in values:
            continue
        row = {"arm": arm.name, "label": arm.title, "kind": arm.kind, "seeds": sorted(values[arm.name]),
               "metrics": {}, "overlap": {}}
        for m in metrics:
            data = {s: v[m] for s, v in values[arm.name].items() if m in v}
            if data:
                row["metrics"][m] = claim_rule.pooled_mean(data, resamples=resamples)
        for k in preset.overlap["k"]:
            data = {s: v[str(k)] for s, v in overlap.get(arm.name, {}).items() if str(k) in v}
            if data:
                row["overlap"][str(k)] = claim_rule.pooled_mean(data, resamples=resamples)
        table.append(row)
    return table


def overlap_by_module_type(records: dict, ks: list[int], side: str) -> dict:
    """{k: {arm: {module type: mean of energy / random baseline}}} over layers and seeds: the
    overlap per module type on one scale (1 = a random update), whatever the weight's shape."""
    out = {}
    for k in ks:
        for arm, by_seed in records.items():
            ratios = {}
            for by_k in by_seed.values():
                for r in by_k.get(str(k), []):
                    if r.get("module_type") and r["baseline"][side] > 0:
                        ratios.setdefault(r["module_type"], []).append(r["energy"][side] / r["baseline"][side])
            if ratios:
                out.setdefault(str(k), {})[arm] = {t: sum(v) / len(v) for t, v in ratios.items()}
    return out


def machine() -> dict:
    """What the wall time was measured on: CPU model and ISA flags, cores, threads, load, torch."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {**cpu_caps().as_json(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "load_average_1_5_15_at_report": load, "gpu": gpu, "torch": torch.__version__}


def baselines(records: dict, ks: list[int], side: str) -> dict:
    """Mean random-update baseline energy per k over the modules any arm adapted (module-weighted)."""
    out = {}
    for k in ks:
        vals = [r["baseline"][side] for by_seed in records.values() for by_k in by_seed.values()
                for r in by_k.get(str(k), [])]
        out[str(k)] = sum(vals) / len(vals) if vals else None
    return out


def _fmt(x):
    return fmt_number(x, small=".2e")


def _secs(x):
    return "-" if x is None else f"{x:.0f}"


def _ci(ci):
    return "-" if ci is None else f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


CLAIMS_HEAD = ["| claim | statement | measure | read as | n | seeds X/Y | difference [95% CI] | margin | verdict |",
               "|---|---|---|---|---:|---|---|---|---|"]


def _claim_lines(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if r.get("verdict") == "not run":
            lines.append(f"| ({r['claim']}) | {r['text']} | {r['measure']} | | 0 | | | | not run ({r['why']}) |")
            continue
        read = "higher better" if r["higher_is_better"] else "lower better"
        margin = "-" if r.get("margin") is None else _fmt(r["margin"])
        verdict = f"**{r['verdict']}**" + (f" ({r['why']}; rule 4 alone: {r['rule4_verdict']})"
                                            if r.get("rule4_verdict") else "")
        lines.append(f"| ({r['claim']}) | {r['text']} | {r['measure']} | {read} | {r['n']} | "
                     f"{r['seeds_x']}/{r['seeds_y']} | {_fmt(r['oriented_difference'])} {_ci(r['oriented_ci95'])} | "
                     f"{margin} | {verdict} |")
    return lines


def _matched_lines(matched: dict | None) -> list[str]:
    """The matched-safety section: each search's curve and selection, then its claim rows."""
    if not matched:
        return []
    lines = ["", "## At matched safety", "",
             f"Per method, the first arm of its learning-rate search whose refusal rate on a validation split "
             f"({matched['validation_n']} prompts the evaluation never asks) reaches {matched['target']:g} "
             "(train/repro/matched_safety.py); picture: matched_safety.png.", "",
             "| method | search (validation safety, seeds) | selected | bracketed | why |", "|---|---|---|---|---|"]
    for method, info in matched["selection"].items():
        curve = ", ".join(f"{c['arm']} ({_fmt(c['validation_safety'])}, {c['seeds']})" for c in info["curve"])
        bracketed = "-" if not info["selected"] else "yes" if info["bracketed"] else "**no**"
        lines.append(f"| {method} | {curve} | {info['selected'] or 'none'} | {bracketed} | {info['why']} |")
    loose = [m for m, info in matched["selection"].items() if info["selected"] and not info["bracketed"]]
    if loose:
        lines += ["", f"Not bracketed: {', '.join(loose)}. Each such selection is its search's lowest rate and "
                  "already passed the target there, so the rows below compare an arm that may be trained harder "
                  "than matched safety needs: read a cost it shows as an upper bound."]
    return lines + ["", *CLAIMS_HEAD, *_claim_lines(matched["claims"])]


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# lora-core reproduce: {s['preset']}", "", s.get("description", "").strip(), "",
             "## Claims", "",
             "Verdicts are computed from the 95% intervals (rule below), never written by hand. "
             "Difference = Y - X, oriented so that > 0 favours Y; n = paired units (items or modules).", "",
             *CLAIMS_HEAD, *_claim_lines(report["claims"])]
    lines += _matched_lines(report.get("matched_safety"))
    lines += ["", "<details><summary>The verdict rule (train/repro/claims.py)</summary>", "",
              report["verdict_rule"].strip(), "", "</details>", "", "## Arms", "",
              "Means over items, seeds pooled, with the two-level bootstrap 95% interval; n = items (or modules).", ""]
    metrics = report["metrics_shown"]
    ks = [str(k) for k in s["overlap"]["k"]]
    head = "| arm | kind | seeds | " + " | ".join(metrics) + " | " + " | ".join(f"overlap k={k}" for k in ks) + " |"
    lines += [head, "|" + "---|" * (3 + len(metrics) + len(ks))]
    for a in report["arms"]:
        cells = []
        for m in metrics + [f"overlap:{k}" for k in ks]:
            e = a["overlap"].get(m.split(":", 1)[1]) if m.startswith("overlap:") else a["metrics"].get(m)
            cells.append("-" if e is None else f"{_fmt(e['mean'])} {_ci(e['ci95'])} (n={e['n']})")
        lines.append(f"| {a['label']} | {a['kind']} | {len(a['seeds'])} | " + " | ".join(cells) + " |")
    base = report["random_baseline"]
    lines += ["", "Random-update baseline of the overlap energy (share a rotation-invariant random dW has in "
              "the top-k subspace, mean over the adapted modules): " +
              ", ".join(f"k={k}: {_fmt(base.get(k))}" for k in ks), "",
              "![safety vs reasoning](safety_vs_reasoning.png)", "", "![overlap per layer](overlap_per_layer.png)", ""]
    lines += _module_type_table(report, ks)
    lines += ["## Settings", ""]
    lines += [f"- model: {s['model']}; training examples: {s['examples']} ({s['data']['dataset']}, data seed "
              f"{s['data']['seed']}), the same for every arm and seed",
              f"- epochs: LoRA {s['epochs']['lora']:g}, full fine-tuning {s['epochs']['full']:g} (the paper: 10 and 5)",
              f"- shared training settings: {s['train']}",
              f"- evaluation: suite {s['eval']['suite']} with overrides {s['eval']['overrides']}, item seed "
              f"{s['eval']['seed']}; every arm sees the same items",
              "- items per measure (n): " + ", ".join(f"{m} {n}" for m, n in s["n_items"].items()),
              f"- overlap: side {s['overlap']['side']}, k = {s['overlap']['k']}",
              f"- claims: safety measure {s['claims']['safety']}, reasoning {s['claims']['reasoning']}, "
              f"margin {s['claims']['margin']}, {s['claims']['resamples']} bootstrap resamples",
              f"- {_wall_line(s)}; threads: {s['threads']}",
              f"- machine: {_machine_line(s.get('machine') or {})}", ""]
    for note in s.get("notes", []):
        lines.append(f"- {note}")
    lines += ["", "## Runs", "", "| run | steps | final loss | train s | eval s | overlap s |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        t, sec = r.get("train") or {}, r.get("seconds") or {}
        lines.append(f"| {r['key']} | {t.get('steps', '-')} | {_fmt(t.get('final_loss'))} | "
                     f"{_secs(sec.get('train'))} | "
                     f"{_secs(sec.get('eval'))} | {_secs(sec.get('overlap'))} |")
    return "\n".join(lines) + "\n"


def _module_type_table(report: dict, ks: list[str]) -> list[str]:
    by_k = report.get("overlap_by_module_type") or {}
    labels = {a["arm"]: a["label"] for a in report["arms"]}
    lines = []
    for k in ks:
        arms = by_k.get(k)
        if not arms:
            continue
        types = sorted({t for v in arms.values() for t in v})
        lines += [f"Overlap by module type, k={k}: energy share in W's top-{k} subspace over the random baseline "
                  "(1 = a random update), mean over layers and seeds.", "",
                  "| arm | " + " | ".join(types) + " |", "|" + "---|" * (1 + len(types))]
        for arm, ratios in arms.items():
            lines.append(f"| {labels.get(arm, arm)} | " + " | ".join(_fmt(ratios.get(t)) for t in types) + " |")
        lines.append("")
    return lines


def _wall_line(s: dict) -> str:
    """The grid's wall time over its invocations (each from its start to its last run; model and
    data loading included), this one's, and the runs' own time (train + eval + overlap)."""
    calls = s.get("invocations") or []
    total = sum(c["wall_seconds"] for c in calls)
    outcomes = ", ".join(f"{c['outcome']} {c['wall_seconds']:.0f} s ({c['runs_finished']} runs)" for c in calls)
    return (f"wall time: {total:.0f} s ({total / 60:.1f} min) over {len(calls)} invocation(s)"
            + (f" [{outcomes}]" if calls else "") + f"; the runs' own time: {s['runs_seconds']:.0f} s")


def _machine_line(m: dict) -> str:
    if not m:
        return "not recorded"
    parts = [m.get("model", "?"), f"ISA flags {', '.join(m.get('flags') or []) or 'none'}",
             f"torch capability {m.get('torch_capability')}", f"{m.get('cores')} cores",
             f"load {m.get('load_average_1_5_15_at_report')} (1/5/15 min) at the report", f"torch {m.get('torch')}"]
    if m.get("gpu"):
        parts.append(f"GPU {m['gpu']}")
    return "; ".join(str(p) for p in parts)


def write_report(ctx, runs: list[Run], wall_seconds: float) -> dict:
    preset, out = ctx.preset, ctx.out
    side = preset.overlap["side"]
    values, overlap, records, run_rows = collect(out, runs, side)
    cfg = preset.claims
    shown = [cfg["safety"]] + [m for m in cfg["reasoning"] if m != cfg["safety"]]
    for extra in ("safety.over_refusal.rate", "drift.kl_base"):
        if any(extra in v for by_seed in values.values() for v in by_seed.values()) and extra not in shown:
            shown.append(extra)
    n_items = {}
    for r in run_rows:
        for m in shown:
            if m in r["metrics"]:
                n_items[m] = r["metrics"][m].get("n")
    matched = cfg.get("matched_safety")
    selection = select(matched["search"], collect_validation(out, runs), matched["target"]) if matched else {}
    cfg, arms = _resolved(cfg, preset.arms, selection)
    report = {
        "settings": {"preset": preset.name, "description": preset.description, "model": preset.model,
                     "source_file": preset.source_file, "data": preset.data, "examples": len(ctx.examples),
                     "data_info": ctx.data_info, "epochs": preset.epochs, "train": preset.train,
                     "eval": preset.eval, "suite": dataclasses.asdict(ctx.suite), "n_items": n_items,
                     "overlap": preset.overlap, "claims": preset.claims, "seeds": list(preset.seeds),
                     "wall_seconds": wall_seconds, "threads": torch.get_num_threads(),
                     "invocations": read_json(out / "invocations.json") if (out / "invocations.json").is_file() else [],
                     "runs_seconds": sum(sum((r.get("seconds") or {}).values()) for r in run_rows),
                     "machine": machine(),
                     "notes": _notes(preset)},
        "verdict_rule": claim_rule.__doc__,
        "claims": claim_rows(values, overlap, cfg, arms, preset.overlap["k"]),
        "metrics_shown": shown,
        "arms": arm_table(preset, values, overlap, shown),
        "random_baseline": baselines(records, preset.overlap["k"], side),
        "overlap_by_module_type": overlap_by_module_type(records, preset.overlap["k"], side),
        "runs": run_rows,
        "missing_runs": [r.key for r in runs if not (out / r.run_dir / "done.json").is_file()],
    }
    if matched:
        report["matched_safety"] = {**matched, "selection": selection,
                                    "rule": matched_safety_rule.__doc__,
                                    "claims": matched_rows(values, cfg, selection)}
        plot_matched_safety(selection, report["arms"], arms, cfg["safety"], cfg["reasoning"][0], matched["target"],
                            out / "matched_safety.png")
    plot_safety_vs_reasoning(run_rows, arms, cfg["safety"], cfg["reasoning"][0], out / "safety_vs_reasoning.png",
                             values=values, base=cfg["roles"]["base"], resamples=cfg["resamples"])
    plot_overlap_per_layer(records, arms, cfg["roles"], preset.overlap["k"][0], side, out / "overlap_per_layer.png")
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown(report))
    if ctx.tensorboard:
        write_grid_events(out, run_rows, arms, preset.train)
    return report


def _resolved(cfg: dict, arms, selection: dict) -> tuple[dict, dict]:
    """The claims config and the arms with every `matched:<method>` role and merge source replaced by
    the arm that search selected (train.repro.matched_safety.resolve). A search that selected none
    leaves "<value> (none selected)", which names no run: its rows are "not run"."""
    def arm_of(value):
        return resolve(value, selection) or f"{value} (none selected)"

    roles = {role: v if isinstance(v, list) else arm_of(v) for role, v in cfg["roles"].items()}
    by_name = {a.name: dataclasses.replace(a, source=arm_of(a.source)) if a.kind == "merge" else a for a in arms}
    return {**cfg, "roles": roles}, by_name


def _notes(preset) -> list[str]:
    notes = []
    if any(a.kind == "merge" for a in preset.arms):
        notes.append("merge arms: the adapter of their source arm (same seed) merged with W' = W + P dW, P "
                     "removing W's top-k directions on the named side (lora_core.merge); no training of their own")
    if any(a.train.get("retain_beta") or preset.train.get("retain_beta") for a in preset.arms):
        notes.append("arms with retain_beta > 0 are 'LoRA + retain' (not in the paper)")
    return notes

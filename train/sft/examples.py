"""The chat examples a run trains on: the user's JSONL (checked against the evaluation sets)
or AdvBench prompts with templated refusals."""
from __future__ import annotations

from lora_core.train.data import refusal
from lora_core.train.sft.config import TrainConfig


def _template_is_reasoning(tokenizer) -> bool:
    # DeepSeek-R1-Distill's template (the paper's 7B GGUF) names only "</think>", to cut reasoning
    # from the chat history; newer versions also open "<think>" in the generation prompt.
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and ("<think>" in template or "</think>" in template)


def build_examples(config: TrainConfig, tokenizer) -> tuple[list[dict], dict]:
    """The chat examples of the run: the user's JSONL, or AdvBench + refusal templates."""
    if config.data.jsonl:
        data = refusal.load_user_jsonl(config.data.jsonl, limit=config.data.limit)
        # User data is checked against the safety evaluation sets too: a model trained on the
        # test prompts would report a refusal rate that means nothing.
        try:
            held_out, used = refusal.held_out_prompts(refusal.EVAL_DATASETS)
        except (FileNotFoundError, OSError, RuntimeError) as error:
            data.info["disjoint_from_eval"] = f"not checked ({error})"
            return data.examples, data.info
        prompts = [next((m["content"] for m in reversed(e["messages"]) if m["role"] == "user"), "")
                   for e in data.examples]
        kept, _ = refusal.drop_overlaps(prompts, held_out)
        kept_set = set(kept)
        examples = [e for e, p in zip(data.examples, prompts) if p in kept_set]
        if not examples:
            raise ValueError(f"--data {config.data.jsonl}: every example overlaps the evaluation sets {used}")
        data.info.update(dropped_overlapping_eval=len(data.examples) - len(examples),
                         held_out_eval_sets=used, disjoint_from_eval=True, examples=len(examples))
        return examples, data.info
    reasoning = config.data.reasoning_line
    if reasoning is None:
        reasoning = _template_is_reasoning(tokenizer)
    data = refusal.build_refusal_set(config.data.dataset, limit=config.data.limit, seed=config.optim.seed,
                                     reasoning=reasoning)
    return data.examples, data.info

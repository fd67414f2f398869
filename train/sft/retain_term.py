"""The retain set of a run and its batches: built once (with the base model's own answers when
the targets are "self", cached in the run directory), then one batch per optimiser step."""
from __future__ import annotations

import torch

from lora_core import disable_adapters
from lora_core.common.files import atomic_write_json, read_json
from lora_core.models import generate
from lora_core.train.eval.runner import chat_prompt
from lora_core.train.sft.batches import pad_token_id_of, step_batch
from lora_core.train.sft.config import TrainConfig
from lora_core.train.sft.retain_set import build_retain_set


class RetainTerm:
    """Owns the tokenized retain examples of a run; `batch(step)` is a pure function of the step
    (like the learning rate), so resume needs nothing more."""

    def __init__(self, config: TrainConfig, model, tokenizer, run_dir, log=print):
        self.config, self.model, self.tokenizer, self.run_dir, self.log = config, model, tokenizer, run_dir, log
        self.pad_id = pad_token_id_of(tokenizer)
        self.answered: list[tuple[str, str]] = []  # (prompt, the base model's answer), "self" targets
        self.examples, self.info = self._build(config, tokenizer)

    def _build(self, config: TrainConfig, tokenizer):
        return build_retain_set(tokenizer, source=config.retain.data, limit=config.retain.limit,
                                seed=config.optim.seed, exclude_suite=config.retain.exclude_suite,
                                eval_seed=config.retain.exclude_seed, eval_limit=config.retain.exclude_limit,
                                max_length=config.retain.max_length, targets=config.retain.targets,
                                answer_fn=self._base_answers)

    def _base_answers(self, prompts: list[str]) -> list[str]:
        """The base model's greedy answers to `prompts` (adapters off), cached in the run
        directory so a resumed run teacher-forces exactly the same targets."""
        cache = self.run_dir / "retain_answers.json"
        if cache.is_file():
            saved = read_json(cache)  # a damaged cache is reported with its path
            if saved.get("prompts") == prompts:
                self.answered = list(zip(prompts, saved["answers"]))
                return saved["answers"]
        self.log(f"      answering {len(prompts)} retain prompts with the base model "
                 f"(<= {self.config.retain.target_tokens} tokens each)")
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), disable_adapters(self.model):
                answers = generate(self.model, self.tokenizer, [chat_prompt(self.tokenizer, p) for p in prompts],
                                   max_new_tokens=self.config.retain.target_tokens, temperature=0.0,
                                   batch_size=16, progress=self.config.logging.progress is not False)
        finally:
            self.model.train(was_training)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, {"prompts": prompts, "answers": answers})
        self.answered = list(zip(prompts, answers))
        return answers

    def chat_examples(self) -> list[dict]:
        """The retain prompts with the base model's own answers, as SFT chat examples."""
        return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a.strip()}]}
                for p, a in self.answered if a.strip()]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        return step_batch(self.examples, self.config.retain.per_step, step, self.config.optim.seed + 1,
                          self.pad_id)

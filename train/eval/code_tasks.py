"""Code tasks by execution: HumanEval and MBPP pass@1, greedy and sampled.

Both run only with allow_code_execution (`lora-core eval --execute-code`): each answer's program
runs in train.eval.code_runner's separate, limited process, where "passed" means a clean exit and
a failed assert, an exception or a timeout all count as a failure.

Prompts (one user turn in the model's chat template; the first fenced code block of the answer,
else the whole answer, is the code, see `code_runner.extract_code`):
- HumanEval (HUMANEVAL_PROMPT): the signature and docstring in a ```python block; the program is
  the answer's function (or, when it does not define the entry point, the prompt continued by the
  answer), then the problem's `check` (`code_runner.humaneval_program`).
- MBPP (MBPP_PROMPT): the task statement and the item's first test assert, which fixes the
  function's name and signature, as MBPP evaluations usually show one test; the program is the
  code, the item's test set-up, then all of its asserts (`code_runner.mbpp_program`). E.g.

      Write a python function to find the largest negative number from the given list.
      Your code should pass this test:

      assert largest_neg([1,2,3,-4,-6]) == -6

      Reply with the whole function in a ```python code block.

Metrics (per-item values recorded, as for every metric):
- reasoning.<humaneval|mbpp>.pass_at_1: the greedy answer passes (a rate with a Wilson interval).
- reasoning.<humaneval|mbpp>.pass_at_1_sampled: with the suite's sampling k > 0, k answers per item
  at its temperature/top-p (the paper: 8 at T 0.6, top-p 0.95), mean over items of passes/k, with
  its standard error (`context.sampled_pass_at_1`, the sampler of GSM8K's exact match too).
- An answer cut off inside <think> runs nothing and fails (status "truncated_in_think"), since
  code drafted in a thought is not an answer; `truncated_in_think` reports the share (reasoning
  models only), as for the exact-match tasks.
"""
from __future__ import annotations

from lora_core.train.eval.answers import final_answer_text
from lora_core.train.eval.code_runner import (extract_code, humaneval_program, mbpp_program, run_program,
                                              sandbox_available)
from lora_core.train.eval.context import chat_prompt, record_truncation, sampled_pass_at_1

__all__ = ["HUMANEVAL_PROMPT", "MBPP_PROMPT", "CODE_TASKS", "user_prompt", "program", "run_code"]

HUMANEVAL_PROMPT = ("Complete the following Python function. Reply with the whole function in a "
                    "```python code block.\n\n```python\n{prompt}```")
MBPP_PROMPT = ("{statement}\nYour code should pass this test:\n\n{test}\n\n"
               "Reply with the whole function in a ```python code block.")

CODE_TASKS = ("humaneval", "mbpp")


def user_prompt(task: str, record: dict) -> str:
    """The user turn that asks for one item's code (before the chat template)."""
    if task == "humaneval":
        return HUMANEVAL_PROMPT.format(prompt=record["prompt"])
    if task == "mbpp":
        return MBPP_PROMPT.format(statement=record["prompt"], test=record["tests"][0])
    raise ValueError(f"no code task {task!r}; known: {', '.join(CODE_TASKS)}")


def program(task: str, record: dict, code: str) -> str:
    """The program that runs `code` against the item's tests."""
    return humaneval_program(record, code) if task == "humaneval" else mbpp_program(record, code)


def _outcome(task: str, record: dict, prompt: str, response: str) -> tuple[bool, dict]:
    """(passed, fields of its generations row) of one answer."""
    answer = final_answer_text(prompt, response)
    if answer is None:
        return False, {"status": "truncated_in_think", "correct": False}
    status = run_program(program(task, record, extract_code(answer)))["status"]
    return status == "passed", {"status": status, "correct": status == "passed"}


def _sizes(cfg) -> dict:
    return {name: getattr(cfg, name) for name in CODE_TASKS if getattr(cfg, name) != 0}


def run_code(run, allow: bool) -> None:
    """Greedy (and, with sampling, sampled) pass@1 of every code task the suite does not skip."""
    sizes = _sizes(run.cfg)
    if not sizes:
        return
    if not allow:
        run.skipped += [f"{name}: generated code runs only with allow_code_execution / --execute-code"
                        for name in sizes]
        return
    if not sandbox_available():
        run.skipped += [f"{name}: no POSIX resource limits on this platform" for name in sizes]
        return
    for name, size in sizes.items():
        records = run.records(name, size)
        prompts = [chat_prompt(run.tokenizer, user_prompt(name, r)) for r in records]
        ids = [r["id"] for r in records]
        with run.timed(f"reasoning.{name}"):
            responses = run.generate(prompts, name, f"pass@1/{name}")
            outcomes = [_outcome(name, r, p, resp) for r, p, resp in zip(records, prompts, responses)]
            run.rate(f"reasoning.{name}.pass_at_1", ids, [ok for ok, _ in outcomes])
            record_truncation(run, f"reasoning.{name}", ids, prompts, responses)
            run.generations += [{"task": f"reasoning.{name}", "id": r["id"], "prompt": r["prompt"],
                                 "response": resp, **fields, "decoding": "greedy"}
                                for r, resp, (_, fields) in zip(records, responses, outcomes)]
        if run.cfg.sampling.k:
            with run.timed(f"reasoning.{name}.sampled"):
                sampled_pass_at_1(run, name, name, records, prompts,
                                  lambda i, resp: _outcome(name, records[i], prompts[i], resp))

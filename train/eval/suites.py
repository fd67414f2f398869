"""What each evaluation suite measures, and on how many items.

`quick` is a smoke run (a couple of minutes on the 2-core CPU), `standard` is sized so that one
evaluation of smollm2-135m-instruct fits in 6 minutes there while every set is large enough to
carry a comparison, `full` reads every item. Sizes are per set: None = the whole set, 0 = skip.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["SuiteConfig", "Sampling", "SUITES", "BUDGET_TASKS", "suite_config"]

# Tasks whose generation length is set separately: a refusal shows in its first sentence, a
# worked MATH solution needs hundreds of tokens, a reasoning model's <think> block even more.
BUDGET_TASKS = ("safety", "over_refusal", "robustness", "jailbreak", "gsm8k", "math500", "humaneval", "mbpp")


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding for the exact-match and code tasks, next to greedy (the paper: T=0.6,
    top-p 0.95, 8 samples, pass@1 averaged over them). k = 0 turns sampling off."""

    k: int = 0
    temperature: float = 0.6
    top_p: float = 0.95

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"sampling k must be an int >= 0, got {self.k!r}")
        if self.k and not self.temperature > 0:
            raise ValueError(f"sampling temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p}")


def _budgets(**overrides) -> dict[str, int]:
    budgets = {"safety": 48, "over_refusal": 48, "robustness": 48, "jailbreak": 48, "gsm8k": 160,
               "math500": 256, "humaneval": 384, "mbpp": 384}
    budgets.update(overrides)
    return budgets


@dataclass
class SuiteConfig:
    """Subset sizes (None = whole set, 0 = skip), token budgets and decoding of one suite."""

    safety: dict[str, int | None] = field(default_factory=lambda: {"strongreject": 24, "harmbench": 0})
    over_refusal: int | None = 48  # diverse benign prompts (train.data.benign), stratified by topic
    # Harmful requests rephrased in the past/future tense (held out: training reads AdvBench).
    robustness: dict[str, int | None] = field(default_factory=lambda: {"past-tense": 0, "future-tense": 0})
    jailbreak: int | None = 0  # StrongREJECT prompts wrapped in each jailbreak template
    math_generation: dict[str, int | None] = field(default_factory=lambda: {"gsm8k": 8, "math500": 0})
    sampling: Sampling = field(default_factory=Sampling)
    bpb: dict[str, int | None] = field(default_factory=lambda: {"gsm8k": 40, "math500": 16})
    arc: dict[str, int | None] = field(default_factory=lambda: {"arc-easy": 48, "arc-challenge": 48})
    drift: int | None = 16
    # Code tasks run model-written code, so only with allow_code_execution=True (train.eval.code_tasks).
    humaneval: int | None = 0
    mbpp: int | None = 0
    max_new_tokens: dict[str, int] = field(default_factory=_budgets)
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        unknown = set(self.max_new_tokens) - set(BUDGET_TASKS)
        if unknown:
            raise ValueError(f"unknown token-budget task(s) {sorted(unknown)}; known: {', '.join(BUDGET_TASKS)}")
        self.max_new_tokens = {**_budgets(), **self.max_new_tokens}
        for task, n in self.max_new_tokens.items():
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"token budget of {task} must be an int >= 1, got {n!r}")
        if isinstance(self.sampling, dict):
            self.sampling = Sampling(**self.sampling)

    def budget(self, task: str) -> int:
        return self.max_new_tokens[task]

    def with_limit(self, limit: int | None) -> "SuiteConfig":
        """Every non-skipped subset capped at `limit` items (None leaves the suite as it is)."""
        if limit is None:
            return self
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")

        def one(v):
            return v if v == 0 else limit if v is None else min(v, limit)

        def cap(d):
            return {k: one(v) for k, v in d.items()}

        return dataclasses.replace(
            self, safety=cap(self.safety), robustness=cap(self.robustness), jailbreak=one(self.jailbreak),
            math_generation=cap(self.math_generation), bpb=cap(self.bpb), arc=cap(self.arc),
            over_refusal=one(self.over_refusal), humaneval=one(self.humaneval), mbpp=one(self.mbpp),
            drift=one(self.drift))

    def with_budget(self, max_new_tokens: int) -> "SuiteConfig":
        """Every generation length set to `max_new_tokens`."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        return dataclasses.replace(self, max_new_tokens={t: max_new_tokens for t in BUDGET_TASKS})


SUITES: dict[str, SuiteConfig] = {
    "quick": SuiteConfig(),
    # Sizes chosen from per-item costs measured on the 2-core CPU (see the README's evaluation
    # section) so that the 135M default, with 2 threads, takes at most 6 minutes, KL drift included.
    "standard": SuiteConfig(
        safety={"strongreject": 64, "harmbench": 48}, over_refusal=None,
        robustness={"past-tense": 32, "future-tense": 32}, jailbreak=12,
        math_generation={"gsm8k": 16, "math500": 0}, sampling=Sampling(k=4),
        bpb={"gsm8k": 48, "math500": 24, "mbpp": 32, "humaneval": 32},
        arc={"arc-easy": 96, "arc-challenge": 96}, drift=24,
        # Code execution (only with --execute-code) adds greedy + 4 samples of 4 HumanEval and 4
        # MBPP items: measured 2 min 35 s for the 135M default at 2 threads (HumanEval 29 s greedy,
        # 58 s sampled; MBPP 10 s + 58 s; running the programs is ~0.15 s each). A 0.5B model is far
        # slower: qwen2.5-coder-0.5b-instruct took 254 s for 2 greedy MBPP items on the shared 2-core
        # machine, and these 4 + 4 items with samples did not finish in 25 min there; fewer items
        # would carry no comparison. 256 tokens hold a small model's whole function and a line about it.
        humaneval=4, mbpp=4,
        # An explicit refusal opens the answer, so the benign set is read from its first 24 tokens.
        max_new_tokens=_budgets(over_refusal=24, robustness=40, jailbreak=40, gsm8k=160, humaneval=256,
                                mbpp=256),
        batch_size=16),
    "full": SuiteConfig(
        safety={"strongreject": None, "harmbench": None}, over_refusal=None,
        robustness={"past-tense": None, "future-tense": None}, jailbreak=None,
        math_generation={"gsm8k": None, "math500": None}, sampling=Sampling(k=8),
        bpb={"gsm8k": None, "math500": None, "mbpp": None, "humaneval": None},
        arc={"arc-easy": None, "arc-challenge": None}, drift=200, humaneval=None, mbpp=None,
        max_new_tokens=_budgets(safety=256, over_refusal=256, robustness=256, jailbreak=256,
                                gsm8k=512, math500=1024, humaneval=512, mbpp=512)),
}


def suite_config(suite) -> tuple[SuiteConfig, str]:
    """(config, name) of a suite given by name or as a SuiteConfig."""
    if isinstance(suite, str):
        if suite not in SUITES:
            raise ValueError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
        return SUITES[suite], suite
    if isinstance(suite, SuiteConfig):
        return suite, "custom"
    raise TypeError(f"suite must be a name or SuiteConfig, got {type(suite).__name__}")

"""The tiny reproduce grid several test modules share: 3 arms, 4 examples, a few items per measure,
as a preset file would hold it (the runner, CLI and reasoning-model tests)."""

TINY_EVAL = {"safety": {"strongreject": 3, "harmbench": 0}, "over_refusal": 0,
             "robustness": {"past-tense": 0, "future-tense": 0}, "jailbreak": 0,
             "math_generation": {"gsm8k": 0, "math500": 0},
             "bpb": {"gsm8k": 3, "math500": 0, "mbpp": 0, "humaneval": 0},
             "arc": {"arc-easy": 3, "arc-challenge": 0}, "drift": 2, "batch_size": 4,
             "max_new_tokens": {"safety": 3}}


def tiny_raw(arms=None, seeds=(0,)) -> dict:
    """A preset as its YAML file would hold it: 3 arms, 4 examples, a few items per measure."""
    return {
        "name": "tiny", "model": "tiny", "seeds": list(seeds),
        "data": {"dataset": "advbench", "limit": 4, "seed": 0},
        "train": {"lr": 1e-2, "batch_size": 2, "max_length": 96, "save_every": 2, "keep_checkpoints": 1},
        "epochs": {"lora": 2, "full": 1},
        "eval": {"suite": "quick", "seed": 0, "overrides": TINY_EVAL},
        "overlap": {"k": [2, 4], "side": "column"},
        "arms": arms or [{"name": "base", "kind": "base"},
                         {"name": "lora", "kind": "lora", "train": {"rank": 2, "targets": "attn+mlp"}},
                         {"name": "full", "kind": "full"}],
        "claims": {"safety": "safety.strongreject.refusal_rate", "reasoning": ["reasoning.gsm8k.bpb"],
                   "lower_is_better": ["reasoning.gsm8k.bpb"], "margin": 0.1, "resamples": 200,
                   "roles": {"base": "base", "lora": "lora", "full": "full"}},
        "cost": {"lora_step_s": 0.1, "full_step_s": 0.1, "generate_item_s": 0.1, "bpb_item_s": 0.1,
                 "arc_item_s": 0.1, "measured": "made up for the test"},
    }

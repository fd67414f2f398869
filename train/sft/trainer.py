"""The Trainer of one refusal SFT run: LoRA or full fine-tuning through the same code.

Built by `prepare_run` (train.sft.loop), the one door every entry point uses.

One optimiser step = `grad_accum` micro-batches. The loss of a step is the token-weighted mean CE
over all assistant tokens of its micro-batches (each micro-batch's mean is scaled by its share of
the step's loss tokens), plus `ortho_beta * R` from the orthogonality regulariser when enabled.
The learning rate is a pure function of the step (warm-up then cosine/linear/constant), so resume
needs only the step count, and the data order is a permutation fixed by (seed, epoch), so resume
needs only (epoch, micro-batch index). With optimiser state and RNG restored, a resumed run
repeats the uninterrupted run's losses bit for bit on CPU. Flags given with a resume are checked
against the stored config (train.sft.resume_config).

A step is kept only if it is sound: a non-finite loss, a non-finite or zero gradient norm (nothing
left to learn from: at lr 1e6 a real model was seen to predict a uniform distribution, loss =
ln(vocab), gradient 0) or non-finite weights stop the run before that step can become the newest
checkpoint, with a message naming the newest checkpoint that does exist.

Run directory: config.json (resolved), metrics.jsonl (one line per step), checkpoints/ (atomic,
see train.sft.checkpoint), adapter/ (PEFT format) or model/ (full fine-tuning, HF safetensors),
summary.json. Paths recorded inside it are relative to it, so a moved or copied run resumes
where it now is.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_core import OrthogonalityRegularizer
from lora_core.common.files import atomic_write_json, atomic_write_text
from lora_core.common.progress import progress
from lora_core.models import causal_lm_loss
from lora_core.train.sft import distributed as dist_mod
from lora_core.train.sft.batches import IGNORE_INDEX, collate, micro_batches, pad_token_id_of, tokenize_examples
from lora_core.train.sft.checkpoint import (
    clean_interrupted_writes,
    latest_checkpoint,
    load_checkpoint,
    naming_write_failures,
    restore_trainable,
    save_checkpoint,
)
from lora_core.train.sft.config import TrainConfig
from lora_core.train.sft.distributed import Distributed
from lora_core.train.sft.examples import build_examples
from lora_core.train.sft.export import write_final_output
from lora_core.train.sft.graceful_stop import GracefulStop, StopRequested
from lora_core.train.sft.losses import retain_kl
from lora_core.train.sft.model_prep import build_optimizer, prepare_model
from lora_core.train.sft.retain_term import RetainTerm
from lora_core.train.sft.unlikelihood_term import UnlikelihoodTerm, refusal_unlikelihood
from lora_core.train.sft.rng import rng_state, seed_everything, set_rng_state
from lora_core.train.sft.schedule import lr_at, total_steps_of
from lora_core.train.sft.tensorboard_log import open_sink


class TrainingDiverged(RuntimeError):
    """A step went wrong (NaN/inf loss, gradient or weights, or a zero gradient); the newest
    checkpoint, written before that step, is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: list[float]
    train_seconds: float
    output_path: Path | None
    metrics: list[dict] = field(default_factory=list)
    trainable_params: int = 0
    provenance: dict = field(default_factory=dict)  # where the data came from (config.json's data_info)


class Trainer:
    """Owns the model, data and optimiser of one run; `train()` runs it to the end."""

    def __init__(self, config: TrainConfig, model, tokenizer, examples: list[dict] | None = None,
                 data_info: dict | None = None, evaluate_fn=None, log=print, dist: Distributed | None = None):
        """`config` is validated already (TrainConfig checks itself when built) and is only read.

        Args:
            examples, data_info: the chat examples and where they came from; None builds them
                from the config (the user's JSONL, or AdvBench with refusal templates).
            evaluate_fn: `(model, tokenizer, out_dir) -> results`, run every --eval-every steps.
            dist: this process's place in a torchrun group (default: one process on the
                model's device).
        """
        self.config = config
        # One process, or this rank of a torchrun group (train.sft.distributed: sharding, data split).
        self.dist = dist or Distributed(device=next(model.parameters()).device)
        # LoRA initialisation and dropout masks draw from torch's RNG: --seed must fix them, or two
        # identical commands train different adapters (a resume restores the RNG state it saved).
        seed_everything(config.optim.seed)
        self.model, self.tokenizer, self.log = model, tokenizer, log
        self.run_dir = Path(config.checkpoints.out)
        if examples is None:
            examples, data_info = build_examples(config, tokenizer)
        self.params, self.lora_cfg = prepare_model(model, config)
        self.retain = None
        data_info = dict(data_info or {})
        self.unlikelihood = None
        if config.retain.unlikelihood > 0:
            self.unlikelihood = UnlikelihoodTerm(config, tokenizer)
            data_info["unlikelihood"] = self.unlikelihood.info
        if config.retain.beta > 0:
            self.retain = RetainTerm(config, model, tokenizer, self.run_dir, log=log)
            data_info["retain"] = self.retain.info
            if config.retain.in_sft:
                # Benign requests answered as the base model answers them, beside the refusals:
                # the SFT data itself then shows what not to refuse.
                benign = self.retain.chat_examples()
                examples = list(examples) + benign
                data_info["benign_sft_examples"] = len(benign)
        self.tokenized, token_stats = tokenize_examples(tokenizer, examples, config.data.max_length)
        # Where the data came from: written beside the config (config.json's "data_info") and
        # returned with the result, never into the config itself.
        self.provenance = {**data_info, **token_stats}
        self.dist.check_data(len(self.tokenized), config.optim.batch_size)
        self.trainable_count = sum(p.numel() for p in self.params)
        self.regularizer = None
        if config.ortho.beta > 0:
            ortho = config.ortho
            self.regularizer = OrthogonalityRegularizer(model, ortho.k, side=ortho.side, weighting=ortho.weighting,
                                                        normalize=ortho.normalize, scaled_update=ortho.scaled_update)
        self.params = self.dist.shard(model, config.optim.seed)  # before the optimiser sees them
        self.optimizer = build_optimizer(model, config)
        self.total_steps = total_steps_of(config, len(self.tokenized))
        self.evaluate_fn = evaluate_fn
        self.step = 0
        self.epoch, self.batch_index = 0, 0
        self.pad_id = pad_token_id_of(tokenizer)
        self.vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)

    def state(self) -> dict:
        state = {"step": self.step, "epoch": self.epoch, "batch_index": self.batch_index,
                 "optimizer": self.dist.optimizer_state(self.model, self.optimizer),
                 "scheduler": {"step": self.step}, "rng": rng_state(), "total_steps": self.total_steps}
        if self.dist.active:  # every rank's own dropout stream, and the layout it belongs to
            state.update(rng=self.dist.gather_objects(state["rng"]), world_size=self.dist.world_size)
        return state

    def resume(self) -> int:
        """Restore the newest checkpoint of the run directory; returns its step."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        ckpt = load_checkpoint(path)
        saved_world = int(ckpt.state.get("world_size", 1))
        if saved_world != self.dist.world_size:
            raise ValueError(f"--resume: {path} was written by {saved_world} process(es); resume it with "
                             f"{saved_world} (this run has {self.dist.world_size})")
        restore_trainable(self.model, ckpt.trainable)
        try:
            self.dist.load_optimizer_state(self.model, self.optimizer, ckpt.state["optimizer"])
            self.step, self.epoch = int(ckpt.state["step"]), int(ckpt.state["epoch"])
            self.batch_index = int(ckpt.state["batch_index"])
            rng = ckpt.state["rng"]
            set_rng_state(rng[self.dist.rank] if self.dist.active else rng)
        except (KeyError, ValueError, TypeError, RuntimeError) as error:
            raise ValueError(f"corrupt checkpoint {path}: state.pt unusable ({error})") from None
        # Metrics past the checkpoint belong to the abandoned tail of the interrupted run.
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.is_file() and self.dist.is_main:
            lines = [l for l in metrics.read_text().splitlines()
                     if l.strip() and json.loads(l).get("step", 0) <= self.step]
            atomic_write_text(metrics, "".join(l + "\n" for l in lines))
        self.log(f"resumed from {path} (step {self.step})")
        return self.step

    # --- data ------------------------------------------------------------------------------
    def _next_micro_batch(self) -> dict[str, torch.Tensor]:
        optim = self.config.optim
        batches = micro_batches(len(self.tokenized), optim.batch_size, self.epoch, optim.seed)
        if self.batch_index >= len(batches):
            self.epoch, self.batch_index = self.epoch + 1, 0
            batches = micro_batches(len(self.tokenized), optim.batch_size, self.epoch, optim.seed)
        indices = batches[self.batch_index]
        self.batch_index += 1
        return collate([self.tokenized[i] for i in indices], self.pad_id)

    def _autocast(self):
        if self.config.optim.dtype == "bfloat16" and self.config.method == "full":
            return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- one optimiser step ----------------------------------------------------------------
    def train_step(self) -> dict:
        config = self.config
        t0 = time.perf_counter()
        lr = lr_at(self.step, config, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        batches = [self._next_micro_batch() for _ in range(config.optim.grad_accum)]
        loss_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        total_loss, tokens = 0.0, 0
        for batch in batches:
            batch = self.dist.local_rows(batch)  # this rank's rows (all of them in one process)
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            with self._autocast():
                loss = causal_lm_loss(self.model, batch["input_ids"], batch["labels"],
                                      attention_mask=batch["attention_mask"])
            if not torch.isfinite(loss):
                raise self._diverged(f"loss became {loss.item()}")
            (loss * (n / loss_tokens * self.dist.grad_scale)).backward()
            total_loss += loss.item() * n / loss_tokens
            tokens += int(batch["attention_mask"].sum())
        if self.dist.active:
            total_loss, tokens = self.dist.sum(total_loss, tokens)
            tokens = int(tokens)
        retain_value, unlikelihood_value = None, None
        if self.retain is not None:
            retain_value, n = self._side_term(self.retain, retain_kl, config.retain.beta, "retain KL")
            tokens += n
        if self.unlikelihood is not None:
            unlikelihood_value, n = self._side_term(self.unlikelihood, refusal_unlikelihood,
                                                    config.retain.unlikelihood, "refusal unlikelihood")
            tokens += n
        reg_value = None
        if self.regularizer is not None:
            reg = self.regularizer.reg()
            (config.ortho.beta * reg).backward()
            reg_value = float(reg.detach())
        max_norm = config.optim.clip if config.optim.clip else float("inf")
        grad_norm = dist_mod.grad_norm_and_clip(self.params, max_norm)
        if not math.isfinite(grad_norm):
            raise self._diverged(f"gradient norm became {grad_norm}")
        if grad_norm == 0.0:
            uniform = math.log(self.vocab_size) if self.vocab_size else None
            saturated = (" = ln(vocab): the model predicts a uniform distribution"
                         if uniform and abs(total_loss - uniform) < 1e-3 * uniform else "")
            raise self._diverged(f"gradient norm is 0 (loss {total_loss:.4f}{saturated}); nothing "
                                 "can be learned from here")
        self.optimizer.step()
        self.step += 1
        dt = time.perf_counter() - t0
        return {"step": self.step, "epoch": self.epoch, "loss": total_loss, "reg": reg_value,
                "retain_kl": retain_value, "unlikelihood": unlikelihood_value,
                "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "loss_tokens": loss_tokens,
                "tokens_per_s": tokens / dt if dt > 0 else None, "step_s": dt}

    def _side_term(self, term, loss_fn, weight: float, what: str) -> tuple[float, int]:
        """Backward of weight * loss_fn on `term`'s batch of this step (retain KL, refusal
        unlikelihood); -> (its value, the batch's tokens)."""
        batch = self.dist.local_rows(term.batch(self.step))
        with self._autocast():
            value = loss_fn(self.model, batch["input_ids"], batch["labels"], batch["attention_mask"])
        if not torch.isfinite(value):
            raise self._diverged(f"{what} became {value.item()}")
        (weight * value).backward()
        return float(value.detach()), int(batch["attention_mask"].sum())

    def _diverged(self, what: str, step: int | None = None) -> TrainingDiverged:
        """The error for an unsound step (default: the one being taken): what happened, and the
        newest checkpoint that exists."""
        try:
            newest = latest_checkpoint(self.run_dir)
        except ValueError:  # a damaged LATEST pointer: say so rather than name a folder
            newest = None
        if newest is not None:
            kept = (f"the newest checkpoint, written before this step, is {newest} (continue from "
                    "it with --resume, or start again with a lower --lr)")
        else:
            kept = "no checkpoint was written before it (lower --lr and start again)"
        step = self.step + 1 if step is None else step
        return TrainingDiverged(f"{what} at step {step} (lr {self.config.optim.lr:g}); stopped: {kept}")

    def _save(self) -> None:
        """Checkpoint the current step, unless its weights are no longer finite (lr inf)."""
        if not self.dist.all_finite(self.params):
            raise self._diverged("weights became non-finite after the optimiser update", step=self.step)
        # Gathering is collective; rank 0 alone writes, and the others wait until it has.
        trainable, state = dist_mod.trainable_tensors(self.model), self.state()
        if self.dist.is_main:
            save_checkpoint(self.run_dir, self.step, self.model, state,
                            self.config.checkpoints.keep_checkpoints, trainable=trainable)
        self.dist.barrier()

    # --- the run ---------------------------------------------------------------------------
    def _evaluate(self, tag: str) -> dict | None:
        if self.evaluate_fn is None:
            return None
        # Evaluation may sample; it must not move the training RNG, or a resumed run (which does
        # not repeat the evaluation) would draw different dropout masks.
        was_training = self.model.training
        self.model.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            result = self.evaluate_fn(self.model, self.tokenizer, out_dir=self.run_dir / "eval" / tag)
        self.model.train(was_training)
        return result

    def train(self, resume: bool = False) -> TrainResult:
        config, run_dir = self.config, self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume and latest_checkpoint(run_dir) is not None:
            raise ValueError(f"--out {run_dir} already holds checkpoints: pass --resume to continue "
                             "that run, or choose another --out")
        main = self.dist.is_main  # only rank 0 writes, logs and shows progress
        for path in clean_interrupted_writes(run_dir) if main else []:
            self.log(f"removed {path}, left by a write that was interrupted")
        self.dist.barrier()
        if resume:
            self.resume()
        elif main:
            atomic_write_text(run_dir / "metrics.jsonl", "")
        if main:
            atomic_write_json(run_dir / "config.json", {**config.to_dict(), "data_info": self.provenance,
                                                        "total_steps": self.total_steps,
                                                        "trainable_params": self.trainable_count})
        self.dist.barrier()
        self.model.train()
        losses, metrics = [], []
        t_start = time.perf_counter()
        # Opened before the first step, so a missing tensorboard package fails now.
        sink = open_sink(run_dir, config.logging.tensorboard and main)
        bar = progress(total=self.total_steps, initial=self.step, desc=f"train ({config.method})",
                       enabled=config.logging.progress if main else False)
        stop = GracefulStop(enabled=not self.dist.active, log=self.log)
        try:
            with stop, (run_dir / "metrics.jsonl" if main else Path(os.devnull)).open("a") as metrics_file:
                while self.step < self.total_steps:
                    record = self.train_step()
                    losses.append(record["loss"])
                    metrics.append(record)
                    every = config.logging.log_every
                    if every and (self.step % every == 0 or self.step == self.total_steps):
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                        sink.write(record)
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{record['tokens_per_s'] or 0:.0f}")
                    save_every = config.checkpoints.save_every
                    due = bool(save_every) and self.step % save_every == 0
                    if due or stop.requested is not None:
                        self._save()
                    if stop.requested is not None:
                        raise StopRequested(f"training stopped after step {self.step} of {self.total_steps}, "
                                            "which is checkpointed")
                    eval_every = config.logging.eval_every
                    if eval_every and self.step % eval_every == 0 and self.step < self.total_steps:
                        result = self._evaluate(f"step-{self.step:06d}")
                        if result is not None:
                            line = {"step": self.step, "eval": _scalars(result)}
                            metrics_file.write(json.dumps(line) + "\n")
                            sink.write(line)
        finally:
            bar.close()
            sink.close()
        train_seconds = time.perf_counter() - t_start
        self._save()
        self.model.eval()
        final = "adapter" if config.method == "lora" else "model"
        output = run_dir / final
        # Under torchrun every rank gathers the whole model, and rank 0 writes the files one process does.
        state = self.dist.full_state(self.model) if config.method == "full" else None
        whole = self.dist.unsharded(self.model) if state is None else contextlib.nullcontext()
        with whole, naming_write_failures(run_dir / final, what=f"the final {final}"):
            if main:
                output = write_final_output(self.model, self.tokenizer, config, run_dir, self.lora_cfg, state=state)
        self.dist.barrier()
        if not main:
            return TrainResult(run_dir, self.step, losses, train_seconds, output, metrics, self.trainable_count,
                               self.provenance)
        atomic_write_json(run_dir / "summary.json", {
            # A run resumed at its last checkpoint trains no step now: its final loss is the one logged.
            "steps": self.step, "final_loss": losses[-1] if losses else _last_logged_loss(run_dir / "metrics.jsonl"),
            "train_seconds": train_seconds, "output": output.relative_to(run_dir).as_posix(),
            "trainable_params": self.trainable_count,
            "mean_tokens_per_s": (sum(m["tokens"] for m in metrics) / sum(m["step_s"] for m in metrics))
            if metrics else None})
        return TrainResult(run_dir, self.step, losses, train_seconds, output, metrics, self.trainable_count,
                               self.provenance)


def _last_logged_loss(metrics: Path) -> float | None:
    """The loss of the last step metrics.jsonl holds (None when it logs none)."""
    if not metrics.is_file():
        return None
    losses = [json.loads(line).get("loss") for line in metrics.read_text().splitlines() if line.strip()]
    losses = [loss for loss in losses if loss is not None]
    return losses[-1] if losses else None


def _scalars(d: dict, prefix: str = "") -> dict:
    """Flatten the numbers of an evaluation result for a metrics line."""
    out = {}
    for k, v in d.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[prefix + k] = v
        elif isinstance(v, dict):
            out.update(_scalars(v, prefix + k + "."))
    return out

"""The SFT loop for refusal training: LoRA or full fine-tuning through the same code.

One optimiser step = `grad_accum` micro-batches. The loss of a step is the token-weighted mean CE
over all assistant tokens of its micro-batches (each micro-batch's mean is scaled by its share of
the step's loss tokens), plus `ortho_beta * R` from the orthogonality regulariser when enabled.
The learning rate is a pure function of the step (warm-up then cosine/linear/constant), so resume
needs only the step count, and the data order is a permutation fixed by (seed, epoch), so resume
needs only (epoch, micro-batch index). With optimiser state and RNG restored, a resumed run
repeats the uninterrupted run's losses bit for bit on CPU.

Run directory: config.json (resolved), metrics.jsonl (one line per step), checkpoints/ (atomic,
see train.sft.checkpoint), adapter/ (PEFT format) or model/ (full fine-tuning, HF safetensors),
summary.json.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from train.sft.checkpoint import (atomic_write_json, latest_checkpoint, load_checkpoint, restore_trainable,
                              rng_state, save_checkpoint, set_rng_state)
from train.sft.config import TrainConfig, parse_layers, resolve_targets
from train.progress import progress
from train.sft.batches import IGNORE_INDEX, collate, micro_batches, tokenize_examples


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: list[float]
    train_seconds: float
    output_path: Path | None
    metrics: list[dict] = field(default_factory=list)
    trainable_params: int = 0


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimiser step `step` (0-based): linear warm-up, then the schedule to 0."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.scheduler == "constant":
        return config.lr
    span = max(1, total_steps - config.warmup_steps)
    progress_frac = min(1.0, (step - config.warmup_steps) / span)
    if config.scheduler == "linear":
        return config.lr * (1.0 - progress_frac)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress_frac))


def total_steps_of(config: TrainConfig, n_examples: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    micro_per_epoch = math.ceil(n_examples / config.batch_size)
    return max(1, math.ceil(config.epochs * micro_per_epoch / config.grad_accum))


def lora_config_of(config: TrainConfig):
    from lora_core import LoRAConfig

    return LoRAConfig(r=config.rank, alpha=config.alpha, dropout=config.dropout,
                      target_modules=resolve_targets(config.targets), layers=parse_layers(config.layers),
                      use_rslora=config.use_rslora, init=config.init)


def _check_targets(model: torch.nn.Module, config: TrainConfig) -> None:
    """Clear errors before injection: a target set that matches nothing, a rank above a layer's size."""
    import re

    suffixes = resolve_targets(config.targets)
    layers = parse_layers(config.layers)
    matched = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.split(".")[-1] not in suffixes:
            continue
        if layers is not None:
            m = re.search(r"\.layers\.(\d+)\.", name + ".")
            if m is None or int(m.group(1)) not in layers:
                continue
        matched.append((name, module))
    if not matched:
        n_layers = len(getattr(getattr(model, "model", None), "layers", []))
        raise ValueError(f"--targets {config.targets!r} with --layers {config.layers!r} matches no "
                         f"linear layer of the model ({n_layers} layers; projection names: "
                         "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)")
    for name, module in matched:
        if config.rank > min(module.in_features, module.out_features):
            raise ValueError(f"--rank {config.rank} is larger than layer {name} "
                             f"({module.out_features}x{module.in_features}) allows")


def prepare_model(model: torch.nn.Module, config: TrainConfig):
    """Freeze/inject for the method; returns (trainable params, LoRAConfig or None)."""
    if config.method == "lora":
        from lora_core import inject_lora

        _check_targets(model, config)
        for p in model.parameters():
            p.requires_grad_(False)
        if config.dtype == "bfloat16":
            # The LoRA kernel wants x and the frozen weight in one dtype, so autocast (which hands
            # it bf16 activations next to fp32 weights) does not fit: the frozen base is stored in
            # bf16 instead, and the adapters stay fp32 (the kernel casts them per call, as peft's
            # autocast_adapter_dtype does), so the optimiser updates fp32 master weights.
            model.to(torch.bfloat16)
        lora_cfg = lora_config_of(config)
        names = inject_lora(model, lora_cfg)
        if not names:
            raise ValueError(f"--targets {config.targets!r} matched no module")
        if config.dtype == "bfloat16":
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
    else:
        lora_cfg = None
        for p in model.parameters():
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    if config.grad_checkpointing:
        enable_gradient_checkpointing(model)
    return params, lora_cfg


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward instead of storing its activations."""
    from torch.utils.checkpoint import checkpoint

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError("--grad-checkpointing needs a model with model.layers")
    for layer in layers:
        if getattr(layer, "_lora_core_checkpointed", False):
            continue
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
        layer._lora_core_checkpointed = True


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # Biases and norm gains get no decay (as the HF Trainer the authors used): decaying a gain
    # pulls it toward 0, which is not a prior anyone wants. LoRA A/B are all matrices: all decayed.
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)


def _template_is_reasoning(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "<think>" in template


def build_examples(config: TrainConfig, tokenizer) -> tuple[list[dict], dict]:
    """The chat examples of the run: the user's JSONL, or AdvBench + refusal templates."""
    from train.data.refusal import build_refusal_set, drop_overlaps, load_user_jsonl

    if config.data:
        data = load_user_jsonl(config.data, limit=config.limit)
        # User data is checked against the safety evaluation sets too: a model trained on the
        # test prompts would report a refusal rate that means nothing.
        try:
            from train.data.refusal import EVAL_DATASETS, _held_out_prompts

            held_out, used = _held_out_prompts(EVAL_DATASETS)
        except (FileNotFoundError, OSError, RuntimeError) as error:
            data.info["disjoint_from_eval"] = f"not checked ({error})"
            return data.examples, data.info
        prompts = [next((m["content"] for m in reversed(e["messages"]) if m["role"] == "user"), "")
                   for e in data.examples]
        kept, _ = drop_overlaps(prompts, held_out)
        kept_set = set(kept)
        examples = [e for e, p in zip(data.examples, prompts) if p in kept_set]
        if not examples:
            raise ValueError(f"--data {config.data}: every example overlaps the evaluation sets {used}")
        data.info.update(dropped_overlapping_eval=len(data.examples) - len(examples),
                         held_out_eval_sets=used, disjoint_from_eval=True, examples=len(examples))
        return examples, data.info
    reasoning = config.reasoning_line
    if reasoning is None:
        reasoning = _template_is_reasoning(tokenizer)
    data = build_refusal_set(config.dataset, limit=config.limit, seed=config.seed, reasoning=reasoning)
    return data.examples, data.info


def _chunk_kl_sum(model, h: torch.Tensor, h_base: torch.Tensor) -> torch.Tensor:
    """Sum over rows of KL(base || adapted) of the next-token distributions; h, h_base (N, D)."""
    from lora_core import disable_adapters

    # lm_head may itself carry an adapter: the base logits must come with adapters switched off.
    with torch.no_grad(), disable_adapters(model):
        lp_base = torch.log_softmax(model.lm_head(h_base).float(), dim=-1)  # (N, V)
    lp = torch.log_softmax(model.lm_head(h).float(), dim=-1)  # (N, V)
    return (lp_base.exp() * (lp_base - lp)).sum()


def retain_kl(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
              chunk_size: int = 256) -> torch.Tensor:
    """Mean per-token KL(base || adapted) in nats over the positions that predict a label.

    The base is the same model under lora_core.disable_adapters (no copy in memory). input_ids,
    labels, attention_mask: (B, T), labels aligned with input_ids as for models.causal_lm_loss.
    Decoder states are computed once per model; the (N, V) logits only per chunk of `chunk_size`
    rows, recomputed in backward (checkpoint), so full fp32 logits are never held.
    Exactly 0 while every LoRA B is 0. Differentiable in the adapters only.
    """
    from torch.utils.checkpoint import checkpoint

    from lora_core import disable_adapters

    if input_ids.shape != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
    with torch.no_grad(), disable_adapters(model):
        hidden_base = model.hidden_states(input_ids, attention_mask=attention_mask)  # (B, T, D)
    hidden = model.hidden_states(input_ids, attention_mask=attention_mask)  # (B, T, D)
    valid = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts label t+1
    if attention_mask is not None:
        valid = valid & (attention_mask[:, 1:] != 0)
    h, hb = hidden[:, :-1][valid], hidden_base[:, :-1][valid]  # (N, D)
    count = h.shape[0]
    if count == 0:
        return hidden.sum().float() * 0.0
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, count, chunk_size):
        hc, hbc = h[start:start + chunk_size], hb[start:start + chunk_size]
        if torch.is_grad_enabled() and hc.requires_grad:
            total = total + checkpoint(_chunk_kl_sum, model, hc, hbc, use_reentrant=False)
        else:
            total = total + _chunk_kl_sum(model, hc, hbc)
    return total / count


def _write_final(model, tokenizer, config: TrainConfig, run_dir: Path, lora_cfg) -> Path:
    if config.method == "lora":
        from lora_core import save_adapter

        out = run_dir / "adapter"
        save_adapter(model, out, base_model=config.model, config=lora_cfg)
        return out
    from models.hf_format import write_hf_directory

    hf_config = model.config.to_hf_dict()
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if hf_config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)  # shares storage with the embeddings; HF re-ties it
    return write_hf_directory(run_dir / "model", hf_config, tensors, extra_files=_tokenizer_files(config.model, tokenizer),
                              overwrite=True)


def _tokenizer_files(source: str, tokenizer) -> dict[str, bytes]:
    """Tokenizer files next to the source weights, so a full fine-tune is a loadable HF directory.

    Looks in the tokenizer's own directory, the source directory, or the registry cache if that
    model was already pulled; never downloads anything just for this.
    """
    candidates = [Path(getattr(tokenizer, "name", "") or "."), Path(source)]
    try:
        from models.registry import is_pulled, model_dir

        if is_pulled(source):
            candidates.append(model_dir(source))
    except (ImportError, ValueError, KeyError):
        pass
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "generation_config.json", "chat_template.jinja")
    for path in candidates:
        if (path / "tokenizer.json").is_file():
            return {n: (path / n).read_bytes() for n in names if (path / n).is_file()}
    return {}


class Trainer:
    """Owns the model, data and optimiser of one run; `train()` runs it to the end."""

    def __init__(self, config: TrainConfig, model, tokenizer, examples: list[dict] | None = None,
                 data_info: dict | None = None, evaluate_fn=None, log=print):
        self.config = config.validate()
        self.model, self.tokenizer, self.log = model, tokenizer, log
        self.run_dir = Path(config.out)
        if examples is None:
            examples, data_info = build_examples(config, tokenizer)
        self.tokenized, token_stats = tokenize_examples(tokenizer, examples, config.max_length)
        config.data_info = {**(data_info or {}), **token_stats}
        self.params, self.lora_cfg = prepare_model(model, config)
        self.trainable_count = sum(p.numel() for p in self.params)
        self.regularizer = None
        if config.ortho_beta > 0:
            from lora_core import OrthogonalityRegularizer

            self.regularizer = OrthogonalityRegularizer(model, config.ortho_k, side=config.ortho_side,
                                                        weighting=config.ortho_weighting,
                                                        normalize=config.ortho_normalize)
        self.retain, self.retain_info = None, None
        if config.retain_beta > 0:
            self.retain, self.retain_info = self._build_retain(config, tokenizer)
            config.data_info = {**config.data_info, "retain": self.retain_info}
        self.optimizer = _optimizer(model, config)
        self.total_steps = total_steps_of(config, len(self.tokenized))
        self.evaluate_fn = evaluate_fn
        self.step = 0
        self.epoch, self.batch_index = 0, 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _build_retain(self, config: TrainConfig, tokenizer):
        from train.data.retain import build_retain_set

        return build_retain_set(tokenizer, source=config.retain_data, limit=config.retain_limit,
                                seed=config.seed, exclude_suite=config.retain_exclude_suite,
                                eval_seed=config.retain_exclude_seed, eval_limit=config.retain_exclude_limit,
                                max_length=config.retain_max_length, targets=config.retain_targets,
                                answer_fn=self._base_answers)

    def _base_answers(self, prompts: list[str]) -> list[str]:
        """The base model's greedy answers to `prompts` (adapters off), cached in the run
        directory so a resumed run teacher-forces exactly the same targets."""
        from lora_core import disable_adapters
        from models import generate

        cache = self.run_dir / "retain_answers.json"
        if cache.is_file():
            saved = json.loads(cache.read_text())
            if saved.get("prompts") == prompts:
                return saved["answers"]
        self.log(f"      answering {len(prompts)} retain prompts with the base model "
                 f"(<= {self.config.retain_target_tokens} tokens each)")
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), disable_adapters(self.model):
                rendered = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                               add_generation_prompt=True) for p in prompts]
                answers = generate(self.model, self.tokenizer, rendered,
                                   max_new_tokens=self.config.retain_target_tokens, temperature=0.0,
                                   batch_size=16, progress=bool(self.config.progress))
        finally:
            self.model.train(was_training)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, {"prompts": prompts, "answers": answers})
        return answers

    def _retain_batch(self) -> dict[str, torch.Tensor]:
        # A pure function of the step (like the learning rate), so resume needs nothing more.
        per = min(self.config.retain_per_step, len(self.retain))
        n_batches = len(self.retain) // per
        epoch, index = divmod(self.step, n_batches)
        batches = micro_batches(n_batches * per, per, epoch, self.config.seed + 1)
        return collate([self.retain[i] for i in batches[index]], self.pad_id)

    # --- state -----------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_index": self.batch_index,
                "optimizer": self.optimizer.state_dict(), "scheduler": {"step": self.step},
                "rng": rng_state(), "total_steps": self.total_steps}

    def resume(self) -> int:
        """Restore the newest checkpoint of the run directory; returns its step."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        ckpt = load_checkpoint(path)
        restore_trainable(self.model, ckpt.trainable)
        try:
            self.optimizer.load_state_dict(ckpt.state["optimizer"])
            self.step, self.epoch = int(ckpt.state["step"]), int(ckpt.state["epoch"])
            self.batch_index = int(ckpt.state["batch_index"])
            set_rng_state(ckpt.state["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError) as error:
            raise ValueError(f"corrupt checkpoint {path}: state.pt unusable ({error})") from None
        # Metrics past the checkpoint belong to the abandoned tail of the interrupted run.
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.is_file():
            lines = [l for l in metrics.read_text().splitlines()
                     if l.strip() and json.loads(l).get("step", 0) <= self.step]
            metrics.write_text("".join(l + "\n" for l in lines))
        self.log(f"resumed from {path} (step {self.step})")
        return self.step

    # --- data ------------------------------------------------------------------------------
    def _next_micro_batch(self) -> dict[str, torch.Tensor]:
        batches = micro_batches(len(self.tokenized), self.config.batch_size, self.epoch, self.config.seed)
        if self.batch_index >= len(batches):
            self.epoch, self.batch_index = self.epoch + 1, 0
            batches = micro_batches(len(self.tokenized), self.config.batch_size, self.epoch, self.config.seed)
        indices = batches[self.batch_index]
        self.batch_index += 1
        return collate([self.tokenized[i] for i in indices], self.pad_id)

    def _autocast(self):
        if self.config.dtype == "bfloat16" and self.config.method == "full":
            return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- one optimiser step ----------------------------------------------------------------
    def train_step(self) -> dict:
        from models import causal_lm_loss

        config = self.config
        t0 = time.perf_counter()
        lr = lr_at(self.step, config, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        batches = [self._next_micro_batch() for _ in range(config.grad_accum)]
        loss_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        total_loss, tokens = 0.0, 0
        for batch in batches:
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            with self._autocast():
                loss = causal_lm_loss(self.model, batch["input_ids"], batch["labels"],
                                      attention_mask=batch["attention_mask"])
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"loss became {loss.item()} at step {self.step + 1}; stopped, "
                                       f"the last good checkpoint is kept in {self.run_dir / 'checkpoints'}")
            (loss * (n / loss_tokens)).backward()
            total_loss += loss.item() * n / loss_tokens
            tokens += int(batch["attention_mask"].sum())
        retain_value = None
        if self.retain is not None:
            batch = self._retain_batch()
            with self._autocast():
                kl = retain_kl(self.model, batch["input_ids"], batch["labels"], batch["attention_mask"])
            if not torch.isfinite(kl):
                raise TrainingDiverged(f"retain KL became {kl.item()} at step {self.step + 1}; stopped")
            (config.retain_beta * kl).backward()
            retain_value = float(kl.detach())
            tokens += int(batch["attention_mask"].sum())
        reg_value = None
        if self.regularizer is not None:
            reg = self.regularizer.reg()
            (config.ortho_beta * reg).backward()
            reg_value = float(reg.detach())
        max_norm = config.clip if config.clip else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(f"gradient norm became {grad_norm} at step {self.step + 1}; stopped, "
                                   f"the last good checkpoint is kept in {self.run_dir / 'checkpoints'}")
        self.optimizer.step()
        self.step += 1
        dt = time.perf_counter() - t0
        return {"step": self.step, "epoch": self.epoch, "loss": total_loss, "reg": reg_value,
                "retain_kl": retain_value,
                "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "loss_tokens": loss_tokens,
                "tokens_per_s": tokens / dt if dt > 0 else None, "step_s": dt}

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
        if resume:
            self.resume()
        elif latest_checkpoint(run_dir) is not None:
            raise ValueError(f"--out {run_dir} already holds checkpoints: pass --resume to continue "
                             "that run, or choose another --out")
        else:
            (run_dir / "metrics.jsonl").write_text("")
        atomic_write_json(run_dir / "config.json", {**config.to_dict(), "total_steps": self.total_steps,
                                                    "trainable_params": self.trainable_count})
        self.model.train()
        losses, metrics = [], []
        t_start = time.perf_counter()
        bar = progress(total=self.total_steps, initial=self.step, desc=f"train ({config.method})",
                       enabled=config.progress)
        try:
            with (run_dir / "metrics.jsonl").open("a") as metrics_file:
                while self.step < self.total_steps:
                    record = self.train_step()
                    losses.append(record["loss"])
                    metrics.append(record)
                    if config.log_every and (self.step % config.log_every == 0 or self.step == self.total_steps):
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{record['tokens_per_s'] or 0:.0f}")
                    if config.save_every and self.step % config.save_every == 0:
                        save_checkpoint(run_dir, self.step, self.model, self.state(), config.keep_checkpoints)
                    if config.eval_every and self.step % config.eval_every == 0 and self.step < self.total_steps:
                        result = self._evaluate(f"step-{self.step:06d}")
                        if result is not None:
                            metrics_file.write(json.dumps({"step": self.step, "eval": _scalars(result)}) + "\n")
        finally:
            bar.close()
        train_seconds = time.perf_counter() - t_start
        save_checkpoint(run_dir, self.step, self.model, self.state(), config.keep_checkpoints)
        self.model.eval()
        output = _write_final(self.model, self.tokenizer, config, run_dir, self.lora_cfg)
        atomic_write_json(run_dir / "summary.json", {
            "steps": self.step, "final_loss": losses[-1] if losses else None,
            "train_seconds": train_seconds, "output": str(output), "trainable_params": self.trainable_count,
            "mean_tokens_per_s": (sum(m["tokens"] for m in metrics) / sum(m["step_s"] for m in metrics))
            if metrics else None})
        return TrainResult(run_dir, self.step, losses, train_seconds, output, metrics, self.trainable_count)


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


def load_model_for(config: TrainConfig):
    """The model (fp32 master weights: bf16 runs under autocast) and tokenizer of `config.model`."""
    from models import load_model

    return load_model(config.model, dtype=torch.float32)


def train(config: TrainConfig, resume: bool = False, model=None, tokenizer=None, examples=None,
          evaluate_fn=None, log=print) -> TrainResult:
    """Run `config` end to end; with `resume`, continue the run in `config.out`."""
    if resume:
        saved = Path(config.out) / "config.json"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {saved} not found (no run to continue in --out {config.out})")
        on_disk = json.loads(saved.read_text())
        on_disk.pop("total_steps", None)
        on_disk.pop("trainable_params", None)
        keep = {k: getattr(config, k) for k in ("progress",)}
        config = TrainConfig.from_dict({**on_disk, **keep})
    config.validate()
    if model is None:
        model, tokenizer = load_model_for(config)
    trainer = Trainer(config, model, tokenizer, examples=examples, evaluate_fn=evaluate_fn, log=log)
    return trainer.train(resume=resume)

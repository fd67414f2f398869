"""Training on several processes with PyTorch's FSDP2 (`fully_shard`), launched by torchrun.

The trainer (train.sft.loop) runs the same code in one process or in N; this module holds what
differs, behind a `Distributed` object whose single-process form does nothing:

- Launch: `torchrun --nproc-per-node N -m lora_core.train.cli train ...` (or `lora-core train --nproc N`,
  which starts that command). torchrun's WORLD_SIZE/RANK/LOCAL_RANK select the process group:
  NCCL when training on CUDA (one GPU per process, LOCAL_RANK's), gloo on the CPU.
- Sharding: every decoder layer is its own `fully_shard` unit, then the root (embeddings, final
  norm, lm_head). No sharding or gradient reduction of our own: FSDP2 reduce-scatters the
  gradients. The loss goes through `CausalLM.hidden_states`, so that method is registered as an
  FSDP forward; the root's parameters stay unsharded after it (FSDP2 never reshards the root after
  forward), which is when lm_head computes the logits. Dtypes are the single-process ones: LoRA
  keeps the frozen base in the load dtype (bf16 on GPUs) and the adapters and AdamW state in fp32;
  full fine-tuning keeps fp32 master weights under the same bf16 autocast as one process.
- Data: each global micro-batch (the one a single process would draw, in the same seeded order)
  is cut into N equal row blocks, one per rank. Every rank counts the loss tokens of the whole
  global step itself (all ranks hold the tokenised data), scales its micro-batch loss by its share
  of them, times N to undo FSDP's average over ranks, so the gradient is the single process's
  token-weighted mean: losses and adapters match one process within float rounding.
- Checkpoints: trainable tensors are gathered with DTensor.full_tensor() and the optimiser state
  with torch.distributed.checkpoint's full state dict; rank 0 writes the same atomic checkpoint
  folder as one process (train.sft.checkpoint), with every rank's RNG state, so resuming on the
  same world size is exact. Final exports unshard the model and rank 0 writes them with the single
  process's code: the same files.
- Only rank 0 writes, logs and shows progress.
Refused under torchrun (a clear error, not a hang): the orthogonality regulariser and the retain
term (both read whole weights or a second forward outside the sharded step), periodic evaluation,
and a world size that does not split every micro-batch evenly.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: rank `rank` of `world_size`, computing on `device`."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def grad_scale(self) -> float:
        """The factor on each rank's loss that undoes FSDP's average over ranks: the losses are
        already weighted by each rank's share of the step's tokens, so the gradients must add up.
        (FSDP's own set_gradient_divide_factor(1) needs a PREMUL_SUM reduction, which gloo lacks.)"""
        return float(self.world_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- collectives (no-ops in one process) ------------------------------------------------
    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def sum(self, *values: float) -> list[float]:
        """The sums over ranks of a few scalars (for logging: the step's loss and token count)."""
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def gather_objects(self, value) -> list:
        """Every rank's `value`, in rank order (for the per-rank RNG states of a checkpoint)."""
        if not self.active:
            return [value]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, value)
        return out

    # --- what differs between one process and N -------------------------------------------
    def check_config(self, config) -> None:
        """Refuse what the sharded step does not support, before anything loads."""
        if not self.active:
            return
        if config.optim.batch_size % self.world_size:
            raise ValueError(f"--batch-size {config.optim.batch_size} does not split over {self.world_size} processes: "
                             f"each micro-batch is cut into equal row blocks, one per process; use a multiple "
                             f"of {self.world_size}")
        for flag, value in (("--ortho-beta", config.ortho.beta), ("--retain-beta", config.retain.beta),
                            ("--eval-every", config.logging.eval_every)):
            if value:
                raise ValueError(f"{flag} is not supported under torchrun yet; train with one process, or "
                                 "evaluate the run's output afterwards with lora-core eval")

    def check_data(self, n_examples: int, batch_size: int) -> None:
        """Every micro-batch, the short last one of an epoch included, must split into equal blocks."""
        last = n_examples % batch_size
        if self.active and last % self.world_size:
            raise ValueError(f"{n_examples} examples in micro-batches of {batch_size} leave a last micro-batch "
                             f"of {last}, which does not split over {self.world_size} processes; use --limit "
                             f"{n_examples - last} (or any count whose remainder splits evenly)")

    def local_rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's block of rows of a global micro-batch, on its device."""
        if self.active:
            rows = batch["input_ids"].shape[0] // self.world_size
            batch = {k: v[self.rank * rows:(self.rank + 1) * rows] for k, v in batch.items()}
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def shard(self, model: torch.nn.Module, seed: int) -> list[torch.nn.Parameter]:
        """fully_shard each decoder layer, then the root; returns the (new, DTensor) trainable params.

        Every rank holds the same initial weights (the same seed drew the same LoRA init), so each
        keeps its own slice. Afterwards the RNG is reseeded per rank: dropout masks of different rows
        must not repeat across processes.
        """
        model.to(self.device)
        if not self.active:
            return [p for p in model.parameters() if p.requires_grad]
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None:
            raise ValueError("distributed training needs a decoder with model.layers")
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        register_fsdp_forward_method(model, "hidden_states")
        torch.manual_seed(seed * 1_000_003 + self.rank)
        return [p for p in model.parameters() if p.requires_grad]

    def all_finite(self, params: list[torch.nn.Parameter]) -> bool:
        """Whether every rank's shards are finite (the same answer on every rank)."""
        local = all(bool(torch.isfinite(getattr(p, "_local_tensor", p)).all()) for p in params)
        return self.sum(0.0 if local else 1.0)[0] == 0.0

    def optimizer_state(self, model, optimizer) -> dict:
        """The optimiser's state dict: as is in one process, else gathered whole, keyed by name."""
        if not self.active:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        if not self.active:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))

    def full_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's tensors on rank 0's CPU (a collective); None in one process, where the
        model's own state_dict is whole. (An unsharded FSDP2 model still reports DTensor shards from
        state_dict(), so the full fine-tune export needs this.)"""
        if not self.active:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    @contextlib.contextmanager
    def unsharded(self, model: torch.nn.Module):
        """The model with whole parameters (all ranks all-gather), for rank 0 to export with the
        single-process code; resharded afterwards."""
        if not self.active:
            yield model
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.unshard()
        try:
            yield model
        finally:
            for unit in units:
                unit.reshard()


def from_environment(device: torch.device | str) -> Distributed:
    """The process group torchrun set up for this process (a single process when WORLD_SIZE <= 1).

    A backend this torch lacks is named before any model loads, as is a CUDA run with more
    processes on a node than visible GPUs.
    """
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Distributed(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_available():
        raise ValueError(f"torchrun started {world} processes, but this torch build has no "
                         "torch.distributed; install a torch with distributed support")
    present = torch.distributed.is_nccl_available() if backend == "nccl" else torch.distributed.is_gloo_available()
    if not present:
        raise ValueError(f"torchrun started {world} processes on {device.type}, which needs the {backend} "
                         f"backend, and this torch build has none (use a torch wheel with {backend})")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local >= count:
            raise ValueError(f"torchrun started local rank {local} but this node has {count} CUDA device(s): "
                             f"use --nproc-per-node {count} or fewer")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return Distributed(rank=rank, world_size=world, device=device)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective: every rank calls it), a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def grad_norm_and_clip(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """clip_grad_norm_ over all ranks' shards; the total norm as a float on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(full(norm))


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, gathered whole on the CPU (a collective under torchrun)."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = full(p.detach()).to("cpu").contiguous()
    return out

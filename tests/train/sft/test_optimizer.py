"""The trainer's AdamW: fused on plain CPU tensors (one kernel over all parameters instead of the
foreach path, 10x faster a step on a 0.5B model here), with the same update as the default path."""
import copy

import torch

from helpers.tiny_models import tiny_model
from lora_core.train.sft.config import TrainConfig
from lora_core.train.sft.model_prep import build_optimizer, prepare_model


def _steps(model, optimizer, batches):
    for ids in batches:
        optimizer.zero_grad()
        model(ids).float().square().mean().backward()
        optimizer.step()


def test_full_fine_tuning_on_cpu_uses_the_fused_adamw_with_the_default_paths_update():
    config = TrainConfig.from_flat(method="full", lr=1e-3, weight_decay=0.1)
    model = tiny_model(64)
    prepare_model(model, config)
    reference = copy.deepcopy(model)
    fused = build_optimizer(model, config)
    assert all(group["fused"] for group in fused.param_groups)
    groups = [{"params": [p for p in reference.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in reference.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    default = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    batches = [torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    _steps(model, fused, batches)
    _steps(reference, default, batches)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        # Same float32 arithmetic in another order: a few ulps of a value ~0.02 after 3 steps of 1e-3.
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_a_dtensor_like_parameter_keeps_the_default_path():
    from lora_core.train.sft.model_prep import _can_fuse

    class Sharded(torch.Tensor):  # FSDP2's DTensor is a Tensor subclass too
        pass

    plain = torch.nn.Parameter(torch.zeros(2, 2))
    assert _can_fuse([plain])
    sharded = torch.nn.Parameter(torch.zeros(2, 2).as_subclass(Sharded))
    assert not _can_fuse([plain, sharded])
    assert not _can_fuse([])

"""merge_lora's safe mode (PEFT's safe_merge): a merged weight with NaN/inf is refused by module name
before the model changes; the unchecked merge on the same input really does write inf (so the check
is what refuses it)."""
import pytest
import torch
from torch import nn

from lora_core import LoRAConfig, LoRALinear, inject_lora, lora_modules
from lora_core.merge import merge_lora


def adapted(dtype):
    torch.manual_seed(0)
    root = nn.Module()
    root.up_proj = nn.Linear(8, 12).to(dtype)
    root.down_proj = nn.Linear(12, 8).to(dtype)
    inject_lora(root, LoRAConfig(r=2, alpha=4.0, dropout=0.0, target_modules=["up_proj", "down_proj"]))
    for m in lora_modules(root).values():
        with torch.no_grad():
            m.lora_B.normal_(0, 0.1)
    return root


def snapshot(root):
    return {k: v.clone() for k, v in root.state_dict().items()}


def test_overflow_in_the_final_cast_is_refused_and_the_model_kept():
    root = adapted(torch.float16)
    with torch.no_grad():  # finite in float16, but s * B @ A = 2 * 2 * 300 * 100 = 120000 > 65504
        root.down_proj.lora_A.fill_(100.0)
        root.down_proj.lora_B.fill_(300.0)
    before = snapshot(root)
    with pytest.raises(ValueError, match=r"merged weight of down_proj has 96 NaN/inf value\(s\) \(W \+ dW "
                                         r"overflows float16"):
        merge_lora(root)
    # up_proj was merged and swapped first: it is put back, and nothing else changed
    assert all(isinstance(m, LoRALinear) for m in (root.up_proj, root.down_proj))
    after = snapshot(root)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    merge_lora(root, safe=False)
    assert isinstance(root.down_proj, nn.Linear) and torch.isinf(root.down_proj.weight).all()


@pytest.mark.parametrize("where, why", [("lora_B", "the adapter holds NaN/inf"),
                                        ("weight", "the base weight itself is not finite")])
def test_non_finite_inputs_are_named(where, why):
    root = adapted(torch.float32)
    with torch.no_grad():
        getattr(root.up_proj, where)[0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"up_proj .*\({why}\)"):
        merge_lora(root)
    assert isinstance(root.up_proj, LoRALinear) and isinstance(root.down_proj, LoRALinear)

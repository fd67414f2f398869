"""Run by tests/packaging/test_coexistence.py in two environments: the repository's own venv and
a fresh one holding our wheel beside the newest transformers (and so Hugging Face's `kernels`).

Standalone on purpose (no test helpers, no repository on sys.path): it sees only what the
environment installed. It writes, into the folder given as argv[1]:
  lora.safetensors  a LoRA linear's output and every gradient, forward and backward, training mode
                    with dropout (the numbers both environments must agree on bit for bit)
  where.json        the file each of `lora_core`, `lora_core.kernels` and `kernels` was imported from
argv[2], when given, is a tiny HF checkpoint: transformers loads it (where.json gets its logits'
largest difference from our decoder's on the same ids).
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import lora_core


def lora_forward_backward() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(48, 40))
    lora_core.inject_lora(layer, lora_core.LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=["0"]))
    lora = layer[0]
    with torch.no_grad():
        lora.lora_B.normal_()  # B starts at zero; a zero adapter would compare nothing
    layer.train()
    x = torch.randn(3, 5, 48, requires_grad=True)
    y = layer(x)
    (y.square().sum()).backward()
    return {"y": y.detach(), "dx": x.grad, "dA": lora.lora_A.grad, "dB": lora.lora_B.grad}


def transformers_vs_ours(checkpoint: Path) -> float:
    import transformers

    from lora_core.models import load_model

    ids = torch.tensor([[1, 5, 9, 30, 2, 7]])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ours, _ = load_model(str(checkpoint), dtype=torch.float32, device="cpu")
    with torch.no_grad():
        return (theirs(ids).logits - ours(ids)).abs().max().item()  # ours returns the logits


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    save_file(lora_forward_backward(), out / "lora.safetensors")
    import kernels  # whichever `kernels` this environment resolves: ours must never be it
    import lora_core.kernels as our_kernels

    where = {"lora_core": lora_core.__file__, "lora_core.kernels": our_kernels.__file__,
             "kernels": getattr(kernels, "__file__", None), "sys.path": sys.path}
    if len(sys.argv) > 2:
        where["transformers_logits_max_diff"] = transformers_vs_ours(Path(sys.argv[2]))
    (out / "where.json").write_text(json.dumps(where, indent=1))


if __name__ == "__main__":
    main()

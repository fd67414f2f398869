"""Loading straight into the target dtype: values equal safetensors' own reader cast once, and the
host's peak memory stays near the loaded model's size (no second copy, no fp32 detour).

The peak is measured in a child process: VmHWM (peak resident set) after the kernel's peak counter
is reset (`/proc/self/clear_refs` = 5), minus the resident set at that moment. A warm-up load of a
tiny checkpoint first pulls in the code pages and allocator pools that any first load costs.
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.tiny_models import HF_CONFIG

pytestmark = pytest.mark.usefixtures("single_thread")


def _write_random_checkpoint(path: Path, dtype: torch.dtype, **sizes) -> int:
    """A random llama checkpoint of `sizes` stored in `dtype`; returns its parameter count."""
    from lora_core.models import CausalLM, ModelConfig
    from lora_core.models.hf_format import write_hf_directory

    hf = {**HF_CONFIG, "architectures": ["LlamaForCausalLM"], "vocab_size": 64,
          "tie_word_embeddings": True, "torch_dtype": str(dtype).removeprefix("torch."), **sizes}
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in CausalLM(ModelConfig.from_hf_dict(hf)).state_dict().items()
                  if n != "lm_head.weight"}
    generator = torch.Generator().manual_seed(0)
    tensors = {n: (torch.randn(s, generator=generator) * 0.02).to(dtype) for n, s in shapes.items()}
    write_hf_directory(path, hf, tensors)
    return sum(t.numel() for t in tensors.values())


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target", [torch.float32, torch.bfloat16])
def test_values_are_the_stored_ones_cast_once(tmp_path, stored, target):
    from lora_core.models.hf_loader import load_weights

    _write_random_checkpoint(tmp_path / "ckpt", stored)
    reference = load_file(str(tmp_path / "ckpt" / "model.safetensors"))  # an independent reader
    model = load_weights(tmp_path / "ckpt", dtype=target)
    state = model.state_dict()
    for name, tensor in reference.items():
        assert state[name].dtype == target, name
        assert torch.equal(state[name], tensor.to(target)), \
            f"{name}: max error {(state[name].float() - tensor.float()).abs().max()}"


_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from lora_core.models.hf_loader import load_weights

    def status():
        fields = {}
        for line in open("/proc/self/status"):
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        return fields

    load_weights(sys.argv[1], dtype=sys.argv[3])  # warm-up: code pages, allocator pools
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current resident set
    before = status()["VmRSS"]
    model = load_weights(sys.argv[2], dtype=sys.argv[3])
    loaded = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak_growth": status()["VmHWM"] - before, "loaded": loaded}))
""")


def _peak_growth(tmp_path: Path, stored: torch.dtype, target: str) -> dict:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset the peak resident set")
    _write_random_checkpoint(tmp_path / "warm", stored)
    # 35.6M parameters (71 MB in bf16) in tensors of at most 2M values (8 MB in fp32): the peak a
    # streaming load may add over the model itself is one stored tensor.
    _write_random_checkpoint(tmp_path / "big", stored, vocab_size=4096, hidden_size=512,
                             intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                             num_key_value_heads=8)
    result = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "warm"), str(tmp_path / "big"), target],
                            capture_output=True, text=True, timeout=300,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path.cwd()),
                                 # Large blocks straight from mmap, handed back on free: the peak
                                 # then counts what the loader holds, not what glibc's heap keeps.
                                 "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32], ids=["bf16-file", "fp32-file"])
def test_bf16_load_peaks_near_the_bf16_size(tmp_path, stored):
    figures = _peak_growth(tmp_path, stored, "bfloat16")
    largest_stored = 4096 * 512 * stored.itemsize  # the embedding
    # Allowance: one stored tensor, plus 10% for allocator rounding. A mapped file (the old reader)
    # counts its pages as resident next to the copies: 2x the bf16 size and more for an fp32 file.
    limit = 1.10 * figures["loaded"] + largest_stored
    assert figures["peak_growth"] <= limit, (
        f"peak grew {figures['peak_growth'] / 2**20:.1f} MiB for a {figures['loaded'] / 2**20:.1f} MiB "
        f"bf16 model (limit {limit / 2**20:.1f} MiB)")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loads_onto_the_gpu_in_bf16(tmp_path):
    from lora_core.models.hf_loader import load_weights

    _write_random_checkpoint(tmp_path / "ckpt", torch.float32)
    reference = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    model = load_weights(tmp_path / "ckpt", dtype=torch.bfloat16, device="cuda")
    for name, tensor in model.state_dict().items():
        assert tensor.is_cuda and tensor.dtype == torch.bfloat16, name
        if name in reference:
            assert torch.equal(tensor.cpu(), reference[name].to(torch.bfloat16)), name

"""Manual parity check of the paper's 7B (DeepSeek-R1-Distill-Qwen-7B, GGUF Q4_K_M) against
transformers, on the first N layers (not run in CI: it needs the 4.7 GB file and ~12 GB of memory).

Both sides read the same truncated GGUF: this script copies the file's metadata (with
`block_count` = N) and the raw, still-quantised bytes of the embeddings, the final norm, lm_head
and layers 0..N-1 into a new GGUF. transformers loads it with its own GGUF loader in float32 (the
reference); lora-core imports it to bfloat16 with the streaming importer and runs it in float32
(weights rounded to bf16, compute exact) and in bfloat16 (as `lora-core chat` does). Reported per
prompt: max |logit error|, that error over the reference logits' std, greedy-token agreement and
KL(reference || ours) of the next-token distributions.

    python bench/parity_7b.py                      # the registry's 7B (pulled if needed), 2 layers
    python bench/parity_7b.py --gguf FILE --layers 4
    python bench/parity_7b.py --gguf FILE --synthetic-seed 0   # random K-quant bytes, real shapes

--synthetic-seed replaces the quantised bytes by random blocks with small scales (real shapes and
tokenizer, meaningless weights): a stand-in for measuring the numerics at the 7B's sizes while the
file's parts 0002..0047 are not published. Writes bench/results/parity_7b.json.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PROMPTS = ["How many r are in the word strawberry?", "写一首关于秋天的短诗。",
           "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n# fib(30) ="]


def truncate_gguf(source: Path, target: Path, layers: int, synthetic_seed: int | None) -> None:
    import gguf

    reader = gguf.GGUFReader(str(source), "r")
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(str(target), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = layers if key == f"{arch}.block_count" else field.contents()
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    rng = np.random.default_rng(synthetic_seed) if synthetic_seed is not None else None
    for tensor in reader.tensors:
        name = tensor.name
        if name.startswith("blk.") and int(name.split(".")[1]) >= layers:
            continue
        data = np.array(tensor.data)  # a copy of this tensor's bytes only
        if rng is not None:
            data = _synthetic(rng, data, tensor.tensor_type)
        if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _synthetic(rng, data: np.ndarray, qtype) -> np.ndarray:
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return (1.0 + 0.05 * rng.standard_normal(data.shape)).astype(np.float32)
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=data.size, dtype=np.uint8).reshape(-1, size)
    if qtype == Q.Q4_K:
        blocks[:, 0:2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
        blocks[:, 2:4] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)
    elif qtype == Q.Q6_K:
        blocks[:, size - 2:] = np.frombuffer(np.float16(0.0003).tobytes(), np.uint8)
    else:
        raise SystemExit(f"--synthetic-seed knows Q4_K, Q6_K and F32 only, not {qtype.name}")
    return blocks.reshape(data.shape)


def _compare(reference: torch.Tensor, ours: torch.Tensor) -> dict:
    reference, ours = reference.double(), ours.double()
    err = float((ours - reference).abs().max())
    kl = torch.nn.functional.kl_div(ours.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    return {"max_abs_err": err, "err_over_std": err / float(reference.std()),
            "top1_agree": float((ours.argmax(-1) == reference.argmax(-1)).double().mean()),
            "kl_max": float(kl.max()), "kl_mean": float(kl.mean())}


def _run(source: Path, work: Path, args) -> dict:
    from lora_core.models.gguf_import import convert_gguf
    from lora_core.models.loading import load_model

    truncated = work / "truncated.gguf"
    start = time.perf_counter()
    truncate_gguf(source, truncated, args.layers, args.synthetic_seed)
    print(f"truncated to {args.layers} layers: {truncated.stat().st_size / 1e9:.2f} GB "
          f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    directory = convert_gguf(truncated, work / "ours", dtype="bfloat16")
    results: dict = {"source": str(source), "layers": args.layers, "synthetic_seed": args.synthetic_seed,
                     "prompts": PROMPTS, "bf16": [], "fp32": []}
    ours_logits: dict[str, list[torch.Tensor]] = {"bf16": [], "fp32": []}
    for kind, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        model, tokenizer = load_model(directory, dtype=dtype)
        with torch.no_grad():
            for prompt in PROMPTS:
                text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
                ids = torch.tensor([tokenizer.encode(text, add_special_tokens=True)])
                ours_logits[kind].append(model(ids)[0].float())
        del model

    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=truncated.name, dtype=torch.float32)
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            ids = torch.tensor([tokenizer.encode(text, add_special_tokens=True)])
            expected = reference(ids).logits[0].float()
            for kind in ("bf16", "fp32"):
                results[kind].append(_compare(expected, ours_logits[kind][i]))

    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", help="the 7B GGUF (default: the registry's, pulled if needed)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--synthetic-seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "parity_7b.json"))
    args = parser.parse_args()
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    torch.set_num_threads(args.threads)
    from lora_core.common.files import atomic_write_json
    from lora_core.models import registry

    try:
        source = Path(args.gguf) if args.gguf else registry.gguf_path("deepseek-r1-distill-qwen-7b")
    except ValueError as error:  # a missing or corrupt part: the message says where to put it
        raise SystemExit(f"parity_7b: {error}") from None
    if not source.is_file():
        parser.error(f"no such file: {source}")
    work = Path(tempfile.mkdtemp(prefix="parity-7b-"))
    try:  # the truncated GGUF and its import take ~4 GB: never left behind
        results = _run(source, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'prompt':<10}{'dtype':<6}{'max|err|':>10}{'err/std':>9}{'top-1':>7}{'KL max':>10}")
    for kind in ("fp32", "bf16"):
        for i, row in enumerate(results[kind]):
            print(f"{i:<10}{kind:<6}{row['max_abs_err']:>10.3g}{row['err_over_std']:>9.3g}"
                  f"{row['top1_agree']:>7.2f}{row['kl_max']:>10.3g}")
    atomic_write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a finished run leaves behind: a PEFT-format adapter (LoRA) or a loadable HF-format
directory with the tokenizer files (full fine-tuning)."""
from __future__ import annotations

from pathlib import Path

from lora_core import save_adapter
from lora_core.models.hf_format import write_hf_directory
from lora_core.models.registry import is_pulled, model_dir
from lora_core.train.sft.config import TrainConfig


def write_final_output(model, tokenizer, config: TrainConfig, run_dir: Path, lora_cfg,
                       state: dict | None = None) -> Path:
    """`state`: the full model's tensors when the model's own are shards (train.sft.distributed
    gathers them); default: model.state_dict()."""
    if config.method == "lora":
        out = run_dir / "adapter"
        save_adapter(model, out, base_model=config.model, config=lora_cfg)
        return out
    hf_config = model.config.to_hf_dict()
    tensors = {k: v.detach().contiguous() for k, v in (model.state_dict() if state is None else state).items()}
    if hf_config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)  # shares storage with the embeddings; HF re-ties it
    return write_hf_directory(run_dir / "model", hf_config, tensors,
                              extra_files=_tokenizer_files(config.model, tokenizer), overwrite=True)


def _tokenizer_files(source: str, tokenizer) -> dict[str, bytes]:
    """Tokenizer files next to the source weights, so a full fine-tune is a loadable HF directory.

    Looks in the tokenizer's own directory, the source directory, or the registry cache if that
    model was already pulled; never downloads anything just for this.
    """
    candidates = [Path(getattr(tokenizer, "name", "") or "."), Path(source)]
    try:
        if is_pulled(source):
            candidates.append(model_dir(source))
    except (ValueError, KeyError):
        pass  # not a registry name: a directory or file path
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "generation_config.json", "chat_template.jinja")
    for path in candidates:
        if (path / "tokenizer.json").is_file():
            return {n: (path / n).read_bytes() for n in names if (path / n).is_file()}
    return {}

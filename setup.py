"""Packaging for lora-core: LoRA safety alignment of reasoning LLMs, with fused Triton kernels.

The library never imports `transformers` or `peft`: they are independent references used by
the tests only, so they live in the `test` extra.
"""
from setuptools import find_packages, setup

# One import namespace, `lora_core`: the repository keeps the design's top-level folders, and each
# is installed inside it (kernels/ -> lora_core.kernels, ...). Top-level names such as `kernels`
# collide with other distributions (transformers 5 depends on Hugging Face's `kernels`), so nothing
# else may land at the top of site-packages.
LAYERS = {"lora_core": "lora_core", "lora_core.kernels": "kernels", "lora_core.models": "models",
          "lora_core.train": "train"}


def _packages():
    """Every package under each layer's folder, named inside the namespace (lora_core.train.data, ...)."""
    names = []
    for namespace, folder in LAYERS.items():
        names.append(namespace)
        names += [f"{namespace}.{sub}" for sub in find_packages(where=folder)]
    return names


setup(
    name="lora-core",
    version="0.1.0",
    description="LoRA safety alignment for reasoning LLMs: fused Triton LoRA kernels, a minimal "
    "decoder, an orthogonality-regularised refusal SFT, overlap analysis and merges.",
    packages=_packages(),
    package_dir=LAYERS,
    # Prompt sets we wrote (train/data/benign.py); third-party data is fetched, never shipped.
    package_data={"lora_core.train.data": ["*.jsonl"], "lora_core.train.repro": ["presets/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton; sys_platform == 'linux'",
        "safetensors",
        "tokenizers",
        "numpy",
        "jinja2>=3.1",
        "tqdm",
        "gguf>=0.10",
        "matplotlib",
        "pyyaml",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-timeout",
            "hypothesis",
            "ruff",  # the lint the test command runs first (ruff.toml)
            # Independent references for parity tests; never imported by the library.
            "transformers>=4.45",
            "peft>=0.13",
            # The --tensorboard option's optional dependency, so its test runs in CI too.
            "tensorboard",
        ],
        "tensorboard": ["tensorboard"],
    },
    entry_points={"console_scripts": ["lora-core=lora_core.train.cli:main"]},
)

"""Packaging for lora-core: LoRA safety alignment of reasoning LLMs, with fused Triton kernels.

The library never imports `transformers` or `peft`: they are independent references used by
the tests only, so they live in the `test` extra.
"""
from setuptools import find_packages, setup

setup(
    name="lora-core",
    version="0.1.0",
    description="LoRA safety alignment for reasoning LLMs: fused Triton LoRA kernels, a minimal "
    "decoder, an orthogonality-regularised refusal SFT, overlap analysis and merges.",
    # Every subpackage of the four layers (lora_core.common, train.data, ...), never tests/ or bench/.
    packages=find_packages(include=["lora_core", "lora_core.*", "kernels", "kernels.*", "models", "models.*",
                                    "train", "train.*"]),
    # Prompt sets we wrote (train/data/benign.py); third-party data is fetched, never shipped.
    package_data={"train.data": ["*.jsonl"], "train.repro": ["presets/*.yaml"]},
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
            # Independent references for parity tests; never imported by the library.
            "transformers>=4.45",
            "peft>=0.13",
            # The --tensorboard option's optional dependency, so its test runs in CI too.
            "tensorboard",
        ],
        "tensorboard": ["tensorboard"],
    },
    entry_points={"console_scripts": ["lora-core=train.cli:main"]},
)

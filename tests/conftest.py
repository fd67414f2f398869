"""Test-wide set-up.

The Triton interpreter must be switched on before `triton` is first imported, so this runs at
collection time: without a CUDA GPU every Triton kernel is executed by the numpy interpreter
(correct for float32/float16, slow, no timing meaning).
"""
import os


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch missing is reported by the imports of the tests themselves
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""Test-wide set-up.

The Triton interpreter must be switched on before `triton` is first imported, so this runs at
collection time: without a CUDA GPU every Triton kernel is executed by the numpy interpreter
(correct for float32/float16, slow, no timing meaning). Importing torch here is safe: torch does
not import triton at import time (checked with torch 2.13).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

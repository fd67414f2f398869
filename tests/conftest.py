"""Test-wide set-up.

The Triton interpreter must be switched on before `triton` is first imported, so this runs at
collection time: without a CUDA GPU every Triton kernel is executed by the numpy interpreter
(correct for float32/float16, slow, no timing meaning). Importing torch here is safe: torch does
not import triton at import time (checked with torch 2.13).
"""
import os
import sys
from pathlib import Path

# `python -m pytest` puts the working directory, the repository root, first on sys.path. There its
# folders kernels/, models/ and train/ (installed as lora_core.kernels, ...) are top-level packages
# that would shadow installed distributions of the same names: transformers 5 imports Hugging
# Face's `kernels`. At the end of sys.path the root can shadow nothing and still serves an
# editable install's `lora_core`. This runs before any test module imports anything.
REPO_ROOT = Path(__file__).resolve().parent.parent
_at_root = [p for p in sys.path if Path(p or os.curdir).resolve() == REPO_ROOT]
sys.path[:] = [p for p in sys.path if p not in _at_root] + _at_root

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests with one torch thread.

    Tests on tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    spinning threads made them 10-20x slower (measured: one tiny forward 0.6 s with 1 thread vs
    11 s with 2 at load 10). Opt in with `pytestmark = pytest.mark.usefixtures("single_thread")`.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """models.Tokenizer over helpers.tokenizers.make_tokenizer_dir (byte-level BPE, ChatML template),
    built once per module; for the SFT loop and retain-term tests."""
    from helpers.tokenizers import make_tokenizer_dir
    from lora_core.models import Tokenizer

    path, _ = make_tokenizer_dir(tmp_path_factory.mktemp("tok"))
    return Tokenizer.from_directory(path)

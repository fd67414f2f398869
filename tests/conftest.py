"""Test-wide set-up.

The Triton interpreter must be switched on before `triton` is first imported, so this runs at
collection time: without a CUDA GPU every Triton kernel is executed by the numpy interpreter
(correct for float32/float16, slow, no timing meaning). Importing torch here is safe: torch does
not import triton at import time (checked with torch 2.13).
"""
import os

import pytest
import torch

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
    from models import Tokenizer

    path, _ = make_tokenizer_dir(tmp_path_factory.mktemp("tok"))
    return Tokenizer.from_directory(path)

"""`lora-core train --nproc N`: start torchrun with this same command line, minus --nproc.

What can be checked before N processes start is checked here, so a bad flag is one line rather
than N tracebacks and torchrun's summary of them: the config, the batch split, and the GPUs.
`--standalone` gives torchrun a free local port; several nodes need torchrun run by hand (README).
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from lora_core.train.sft.distributed import Distributed


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            out.append(token)
    return out


def launch_torchrun(args, config, device) -> int:
    """Run `torchrun --standalone --nproc-per-node N -m lora_core.train.cli <argv>`; its exit code."""
    n = args.nproc
    Distributed(rank=0, world_size=n, device=device).check_config(config)
    if device.type == "cuda" and n > torch.cuda.device_count():
        raise ValueError(f"--nproc {n}: this machine has {torch.cuda.device_count()} CUDA device(s), one per process")
    if device.type == "cuda" and device.index is not None:
        raise ValueError(f"--device {device} with --nproc {n}: each process takes its own GPU; use --device cuda")
    argv = _without_nproc(getattr(args, "_argv", None) or sys.argv[1:])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "-m", "lora_core.train.cli", *argv]
    # Threads: torchrun would set OMP_NUM_THREADS=1 with a warning; N processes share the cores.
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n)), **os.environ}
    completed = subprocess.run(command, env=env)
    if completed.returncode:
        raise ValueError(f"torchrun's {n} training processes failed (exit code {completed.returncode}); "
                         "rank 0's error is printed above")
    return 0

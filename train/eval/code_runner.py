"""Run untrusted, model-written Python in a separate, limited process (HumanEval pass@1).

The program runs as `python -I` (isolated: no user site, no PYTHON* variables, no cwd on sys.path)
in a fresh temporary directory, with an EMPTY environment, stdin closed, its own session (so the
whole process group is killed on timeout), and resource limits set in the child before exec:
address space (memory), CPU seconds, file size, open files, no core dumps. A wall-clock timeout
backs up the CPU limit (a sleeping program uses no CPU).

This is a guard against accidents (infinite loops, memory blow-ups, stray files), not a security
boundary: the child can still read files and open sockets that the user can. So code execution is
opt-in (`allow_code_execution=True` / `lora-core eval --execute-code`), and on platforms without
`resource` (Windows) `run_program` returns status "skipped" instead of running anything.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SandboxLimits", "sandbox_available", "run_program", "humaneval_program", "extract_code"]

try:
    import resource
except ImportError:  # Windows
    resource = None


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    open_files: int = 64


def sandbox_available() -> bool:
    return resource is not None and os.name == "posix"


def _limit_child(limits: SandboxLimits):
    def apply():  # runs in the child between fork and exec
        mem = limits.memory_mb * 1024 * 1024
        cpu = max(1, int(limits.timeout_s) + 1)
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_mb * 1024 * 1024,) * 2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_program(code: str, limits: SandboxLimits = SandboxLimits()) -> dict:
    """Run `code`; returns {"status": "passed"|"failed"|"timeout"|"skipped", "returncode", "stderr"}.

    "passed" means exit status 0 (HumanEval's `check()` raises AssertionError on a wrong answer).
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be str, got {type(code).__name__}")
    if not sandbox_available():
        return {"status": "skipped", "returncode": None, "stderr": "no POSIX resource limits here"}
    with tempfile.TemporaryDirectory(prefix="lora-core-exec-") as tmp:
        script = Path(tmp) / "program.py"
        script.write_text(code, encoding="utf-8")
        proc = subprocess.Popen([sys.executable, "-I", "-B", str(script)], cwd=tmp, env={},
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=_limit_child(limits))
        try:
            _, err = proc.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"status": "timeout", "returncode": None, "stderr": ""}
    tail = err.decode("utf-8", "replace")[-500:]
    if proc.returncode == -signal.SIGXCPU or proc.returncode == -signal.SIGKILL:
        return {"status": "timeout", "returncode": proc.returncode, "stderr": tail}
    return {"status": "passed" if proc.returncode == 0 else "failed", "returncode": proc.returncode,
            "stderr": tail}


def extract_code(response: str) -> str:
    """The first fenced code block of a chat answer (```python ... ```), else the whole text."""
    match = re.search(r"```(?:python|py)?\s*\n(.*?)```", response, re.DOTALL)
    if match:
        return match.group(1)
    match = re.search(r"```(?:python|py)?\s*\n(.*)", response, re.DOTALL)  # cut off mid-block
    return match.group(1) if match else response


def humaneval_program(problem: dict, completion: str) -> str:
    """Program that defines the function and runs the problem's tests.

    A completion that defines the entry point itself is used whole (after the prompt's imports);
    otherwise it is taken as the body that continues the prompt.
    """
    entry = problem["entry_point"]
    if re.search(rf"^def {re.escape(entry)}\s*\(", completion, re.MULTILINE):
        imports = "".join(line + "\n" for line in problem["prompt"].splitlines()
                          if line.startswith(("import ", "from ")))
        code = imports + completion
    else:
        code = problem["prompt"] + completion
    return f"{code}\n\n{problem['test']}\n\ncheck({entry})\n"

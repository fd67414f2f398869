"""Run untrusted, model-written Python in a separate, limited process (HumanEval and MBPP pass@1).

The program runs as `python -I` (isolated: no user site, no PYTHON* variables, no cwd on sys.path)
in a fresh temporary folder, stdin closed, with resource limits set before exec: address space
(memory), CPU seconds, file size, open files, no core dumps. A wall-clock timeout backs up the CPU
limit (a sleeping program uses no CPU).

Nothing the program starts may outlive it. A program can fork and `setsid()`, which takes its
children out of any process group or session we could kill (measured: such a grandchild slept past
the timeout and then wrote outside the folder). So the program runs under a small supervisor
(SUPERVISOR below, its own session) that makes itself a child subreaper (Linux `prctl`): every
orphan of the program is re-parented to it instead of to init, so the supervisor sees the whole
tree under itself in /proc and kills all of it, on timeout and when the program ends, before it
reports. Signals go through pidfds, so a recycled pid is never hit. Where there is no subreaper
(not Linux) only the program's own process group is killed.

Writes are pointed into the folder: it is the working directory, and HOME, TMPDIR (TMP, TEMP) and
the XDG folders all name it; the environment is otherwise empty; RLIMIT_FSIZE caps each file.

This is a guard against accidents (infinite loops, memory blow-ups, stray files and processes),
not a security boundary: the child can still read, and write by absolute path, whatever the user
can, and open sockets. So code execution is opt-in (`allow_code_execution=True` / `lora-core eval
--execute-code`), and on platforms without `resource` (Windows) `run_program` returns status
"skipped" instead of running anything.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SandboxLimits", "sandbox_available", "run_program", "humaneval_program", "mbpp_program",
           "extract_code"]

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


# How long past the program's timeout the parent waits for the supervisor (its own start-up and the
# sweep) before it kills the supervisor's session itself.
_SUPERVISOR_GRACE_S = 10.0

# Run as `python -I -B -c SUPERVISOR program.py timeout_s memory_bytes cpu_s fsize_bytes nofile`.
# It prints one JSON line {"returncode", "timeout"} on stdout; the program's stdout is /dev/null and
# its stderr is the supervisor's, which the parent reads.
SUPERVISOR = r"""
import ctypes, json, os, resource, signal, subprocess, sys, time

script, timeout = sys.argv[1], float(sys.argv[2])
mem, cpu, fsize, nofile = (int(v) for v in sys.argv[3:7])
PR_SET_CHILD_SUBREAPER = 36
try:
    reaper = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
except (OSError, AttributeError):
    reaper = False


def limit():
    os.setpgid(0, 0)  # its own group, so a timeout kills what it forked without a sweep too
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def parents():
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    out[int(entry)] = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def descendants():
    up = parents()
    tree, todo = set(), [os.getpid()]
    while todo:
        me = todo.pop()
        for pid, ppid in up.items():
            if ppid == me and pid not in tree:
                tree.add(pid)
                todo.append(pid)
    return tree


def kill(pid, tree):
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    try:
        if fd is not None:
            # the fd pins the process: if the pid was recycled, its parent is no longer in our tree
            if parents().get(pid) not in tree | {os.getpid()}:
                return
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    finally:
        if fd is not None:
            os.close(fd)


def reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def sweep():
    deadline = time.monotonic() + 10.0
    while os.path.isdir("/proc") and time.monotonic() < deadline:
        tree = descendants()
        if not tree:
            return
        for pid in tree:
            kill(pid, tree)
        time.sleep(0.01)
        reap()


proc = subprocess.Popen([sys.executable, "-I", "-B", script], stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL, preexec_fn=limit)
try:
    proc.wait(timeout=timeout)
    timed_out = False
except subprocess.TimeoutExpired:
    timed_out = True
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
if not reaper:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
sweep()
print(json.dumps({"returncode": proc.returncode, "timeout": timed_out, "subreaper": reaper}), flush=True)
"""


def sandbox_available() -> bool:
    return resource is not None and os.name == "posix"


def _environment(folder: str) -> dict[str, str]:
    """Every variable that names a place to write points into the program's folder."""
    return {"HOME": folder, "TMPDIR": folder, "TMP": folder, "TEMP": folder, "XDG_CACHE_HOME": folder,
            "XDG_CONFIG_HOME": folder, "XDG_DATA_HOME": folder, "XDG_STATE_HOME": folder,
            "XDG_RUNTIME_DIR": folder, "PYTHONDONTWRITEBYTECODE": "1"}


def run_program(code: str, limits: SandboxLimits = SandboxLimits()) -> dict:
    """Run `code`; returns {"status": "passed"|"failed"|"timeout"|"skipped", "returncode", "stderr"}.

    "passed" means exit status 0 (HumanEval's `check()` raises AssertionError on a wrong answer).
    Every process the program started is gone when this returns.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be str, got {type(code).__name__}")
    if not sandbox_available():
        return {"status": "skipped", "returncode": None, "stderr": "no POSIX resource limits here"}
    with tempfile.TemporaryDirectory(prefix="lora-core-exec-", ignore_cleanup_errors=True) as tmp:
        script = Path(tmp) / "program.py"
        script.write_text(code, encoding="utf-8")
        mb = 1024 * 1024
        argv = [sys.executable, "-I", "-B", "-c", SUPERVISOR, str(script), str(limits.timeout_s),
                str(limits.memory_mb * mb), str(max(1, int(limits.timeout_s) + 1)),
                str(limits.file_size_mb * mb), str(limits.open_files)]
        proc = subprocess.Popen(argv, cwd=tmp, env=_environment(tmp), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=limits.timeout_s + _SUPERVISOR_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            try:
                proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a stray holds the pipes open; stop reading them
                pass
            return {"status": "timeout", "returncode": None, "stderr": ""}
    tail = err.decode("utf-8", "replace")[-500:]
    try:
        report = json.loads(out.decode("utf-8", "replace").strip().splitlines()[-1])
        returncode, timed_out = report["returncode"], bool(report["timeout"])
    except (IndexError, ValueError, KeyError, TypeError):
        return {"status": "failed", "returncode": proc.returncode, "stderr": "supervisor failed: " + tail}
    if timed_out or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return {"status": "timeout", "returncode": returncode, "stderr": tail}
    return {"status": "passed" if returncode == 0 else "failed", "returncode": returncode, "stderr": tail}


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


def mbpp_program(problem: dict, code: str) -> str:
    """The code, the item's test set-up, then every one of its asserts: MBPP's own check, which
    passes when the program exits cleanly (a failed assert or any exception exits non-zero)."""
    setup = problem.get("test_setup") or ""
    return f"{code}\n\n{setup}\n\n" + "\n".join(problem["tests"]) + "\n"

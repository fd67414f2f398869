"""The HumanEval runner leaves nothing behind: a grandchild that leaves the program's session with
setsid() and sleeps, to write outside the temp folder later, is killed when the program ends and on
timeout (the file never appears, the process is gone); places to write point into the folder."""
import os
import time

import pytest

from lora_core.train.eval.code_runner import SandboxLimits, run_program, sandbox_available

pytestmark = pytest.mark.skipif(not sandbox_available(), reason="no POSIX resource limits here")

# Forks, leaves the session, forks again (the grandchild is orphaned: re-parented away from the
# program), reports the grandchild's pid on stderr, then the grandchild sleeps and writes `target`.
ESCAPE = """
import os, sys, time
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(w, str(os.getpid()).encode())
        os.close(w)
        time.sleep({sleep})
        with open({target!r}, "w") as f:
            f.write("escaped")
        os._exit(0)
    os._exit(0)
os.close(w)
print("grandchild", os.read(r, 32).decode(), file=sys.stderr, flush=True)
{then}
"""


def grandchild_pid(result):
    words = result["stderr"].split()
    assert "grandchild" in words, result
    return int(words[words.index("grandchild") + 1])


def assert_gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return
    assert state in ("Z", "X"), f"grandchild {pid} is still alive (state {state})"


@pytest.mark.parametrize("then, status", [("", "passed"), ("time.sleep(60)", "timeout")],
                         ids=["program-ends", "program-times-out"])
def test_setsid_grandchild_is_killed_and_never_writes(tmp_path, then, status):
    target = tmp_path / "outside.txt"
    start = time.monotonic()
    res = run_program(ESCAPE.format(sleep=1.5, target=str(target), then=then), SandboxLimits(timeout_s=1.0))
    time.sleep(max(0.0, start + 3.0 - time.monotonic()))  # well past the grandchild's 1.5 s
    assert not target.exists(), "the grandchild outlived the runner and wrote outside its folder"
    assert res["status"] == status, res
    assert_gone(grandchild_pid(res))


def test_places_to_write_point_into_the_folder():
    res = run_program(
        "import os, sys, tempfile\n"
        "cwd = os.getcwd()\n"
        "assert os.path.basename(cwd).startswith('lora-core-exec-'), cwd\n"
        "for var in ('HOME', 'TMPDIR', 'XDG_CACHE_HOME'):\n"
        "    assert os.environ[var] == cwd, (var, os.environ[var])\n"
        "assert tempfile.gettempdir() == cwd and os.path.expanduser('~') == cwd\n"
        "open(os.path.join(os.path.expanduser('~'), 'x'), 'w').write('ok')\n"
        "sys.stderr.write(cwd)\n", SandboxLimits(timeout_s=5.0))
    assert res["status"] == "passed", res
    assert not os.path.exists(res["stderr"]), "the folder is removed afterwards"


def test_file_size_limit():
    res = run_program("open('big', 'wb').write(b'x' * (3 * 1024 * 1024))\n",
                      SandboxLimits(timeout_s=5.0, file_size_mb=1))
    assert res["status"] == "failed" and res["returncode"] != 0, res

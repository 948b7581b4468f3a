"""conv2former/process_exit.py: a stage's process ends with its code, after its atexit handlers and its output, and
waits for a non-daemon thread still at work."""

import subprocess
import sys
import textwrap

from conftest import REPO

PROGRAM = textwrap.dedent(
    """
    import atexit, runpy, sys, threading, time
    exit_process = runpy.run_path("conv2former/process_exit.py")["exit_process"]  # (not the package: no torch import)

    atexit.register(lambda: open(sys.argv[1], "a").write("atexit\\n"))
    if sys.argv[2] == "thread":
        threading.Thread(target=lambda: (time.sleep(0.3), open(sys.argv[1], "a").write("thread\\n"))).start()
    print("printed", end="")  # (no newline: still in stdout's buffer when exit_process is called)
    exit_process(int(sys.argv[3]))
    """
)


def run(tmp_path, mode: str, code: int):
    marks = tmp_path / f"marks-{mode}"
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(marks), mode, str(code)], capture_output=True, text=True, cwd=REPO
    )
    return done, marks.read_text().split()


def test_the_exit_code_the_output_and_the_atexit_handlers_survive(tmp_path):
    done, marks = run(tmp_path, "plain", 3)
    assert (done.returncode, done.stdout, marks) == (3, "printed", ["atexit"])


def test_a_running_non_daemon_thread_is_waited_for(tmp_path):
    done, marks = run(tmp_path, "thread", 0)
    assert (done.returncode, done.stdout, marks) == (0, "printed", ["thread", "atexit"])

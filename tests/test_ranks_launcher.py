"""The tests' launcher (tests/ranks.py) and the session's zygote (tests/zygote.py): a rank the zygote forks gets what a
fresh interpreter gets (command line, environment, folder, output, exit code), a test's SIGKILL of the launcher's
process group ends it too, and an environment other than the stages' own gets a fresh interpreter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import REPO, ranks_launch, stage_env, zygote_socket

pytestmark = pytest.mark.slow  # (the first test waits for the zygote's imports)

PROBE = """
import json, os, sys, time
record = {"argv": sys.argv[1:], "cwd": os.getcwd(), "rank": os.environ["RANK"], "threads": os.environ["OMP_NUM_THREADS"],
          "name": __name__, "path0": sys.path[0], "warm": "torch" in sys.modules, "pid": os.getpid()}
os.write(1, (json.dumps(record) + "\\n").encode())  # (one write: the ranks share the pipe)
if sys.argv[2] == "fail" and os.environ["RANK"] == "1":
    sys.exit(3)
if sys.argv[2] == "sleep":
    time.sleep(300)
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> str:
    script = tmp_path_factory.mktemp("probe") / "probe.py"
    script.write_text(PROBE)
    path = zygote_socket()
    if path is None:
        pytest.skip("no zygote under coverage or with C2F_TEST_ZYGOTE=off")
    deadline = time.monotonic() + 120
    while not os.path.exists(path) and time.monotonic() < deadline:  # (its imports, the first time)
        time.sleep(0.2)
    return str(script)


def launch(command: list, environ: dict) -> tuple:
    proc = subprocess.run(command, env=environ, capture_output=True, text=True, cwd=REPO / "docs", timeout=120)
    return proc.returncode, sorted((json.loads(line) for line in proc.stdout.splitlines()), key=lambda r: r["rank"])


def without_zygote(command: list) -> list:
    i = command.index("--zygote")
    return command[:i] + command[i + 2 :]


@pytest.mark.parametrize("mode", ["ok", "fail"])
def test_a_forked_rank_gets_what_a_fresh_interpreter_gets(probe, mode):
    environ = stage_env()
    command = ranks_launch(probe, mode, "--flag")
    assert "--zygote" in command
    forked = launch(command, environ)
    fresh = launch(without_zygote(command), environ)
    assert forked[0] == fresh[0] == (3 if mode == "fail" else 0)
    assert [r["warm"] for r in forked[1]] == [True, True] and [r["warm"] for r in fresh[1]] == [False, False]
    for r in forked[1] + fresh[1]:
        del r["warm"], r["pid"]
    assert forked[1] == fresh[1] and [r["rank"] for r in forked[1]] == ["0", "1"]
    assert forked[1][0] == {
        "argv": ["--local_rank=0", mode, "--flag"], "cwd": str(REPO / "docs"), "rank": "0", "threads": "1",
        "name": "__main__", "path0": os.path.dirname(probe),
    }  # fmt: skip


def test_an_environment_of_its_own_gets_a_fresh_interpreter(probe):
    environ = dict(stage_env(), PYTHONPATH=stage_env()["PYTHONPATH"] + os.pathsep + "/nonexistent")
    code, records = launch(ranks_launch(probe, "ok"), environ)
    assert code == 0 and [r["warm"] for r in records] == [False, False]


def test_killing_the_launchers_group_ends_the_forked_ranks(probe):
    proc = subprocess.Popen(
        ranks_launch(probe, "sleep"), env=stage_env(), stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    records = [json.loads(proc.stdout.readline()) for _ in range(2)]
    assert [r["warm"] for r in records] == [True, True]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    alive = [r["pid"] for r in records]
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if os.path.exists(f"/proc/{pid}") and "Z" not in status(pid)]
        time.sleep(0.05)
    assert alive == []


def status(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0]
    except FileNotFoundError:
        return "Z"

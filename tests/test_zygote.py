"""The session's zygotes (tests/zygote.py, tests/zygote_site/): a process a zygote forks gets what a fresh interpreter
gets (command line, sys.path, environment, folder, standard streams, signal dispositions, exit code, traceback),
through tests/ranks.py too; its stand-in forwards signals and ends as it ended; a test's SIGKILL of the launcher's
process group ends the forked ranks; an environment seen again gets a zygote of its own; environments that differ only
where no import looks share one, and one that differs where an import looks, or whose sys.path would find a library
elsewhere, starts fresh."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import FRESH_BEFORE_ZYGOTE, REPO, ZYGOTES, ranks_launch, real_processes, stage_env

pytestmark = pytest.mark.slow  # (the first test waits for the zygote's imports)

PROBE = """
import json, os, signal, sys, time
handlers = {name: str(signal.getsignal(getattr(signal, name))) for name in ("SIGINT", "SIGTERM", "SIGPIPE", "SIGUSR1")}
record = {"argv": sys.argv, "orig_argv": sys.orig_argv[1:], "cwd": os.getcwd(), "rank": os.environ.get("RANK"),
          "threads": os.environ["OMP_NUM_THREADS"], "name": __name__, "path": sys.path, "executable": sys.executable,
          "stdout": [type(sys.stdout.buffer).__name__, sys.stdout.line_buffering, sys.stdout.encoding],
          "stderr": [type(sys.stderr.buffer).__name__, sys.stderr.line_buffering, sys.stderr.errors],
          "handlers": handlers, "umask": os.umask(0o22), "env": dict(os.environ), "warm": "torch" in sys.modules,
          "pid": os.getpid()}
mode = [a for a in sys.argv[1:] if not a.startswith("--")][0]
if mode == "usr1":  # (before the record: a test signals once it has read it)
    signal.signal(signal.SIGUSR1, lambda *_: sys.exit(7))
os.write(1, (json.dumps(record) + "\\n").encode())  # (one write: ranks share the pipe)
if mode == "fail" and os.environ.get("RANK", "1") == "1":
    sys.exit(3)
if mode == "raise":
    raise ValueError("the probe's own error")
if mode in ("sleep", "usr1"):
    time.sleep(300)
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("probe")
    (folder / "zprobe.py").write_text(PROBE)
    if ZYGOTES is None:
        pytest.skip("no zygote under coverage or with C2F_TEST_ZYGOTE=off")
    stage_env()  # (starts the stages' zygote and waits for it)
    return str(folder / "zprobe.py")


def run(command: list, environ: dict, cwd=REPO / "docs") -> tuple:
    proc = subprocess.run(command, env=environ, capture_output=True, text=True, cwd=cwd, timeout=120)
    records = sorted((json.loads(line) for line in proc.stdout.splitlines()), key=lambda r: r["rank"] or "")
    return proc.returncode, records, proc.stderr


def comparable(records: list) -> list:
    """All but the pid and whether torch was imported; the environment but the session's zygote folder (which
    ``real_processes`` leaves out)."""
    own = [{k: v for k, v in r["env"].items() if k != "C2F_ZYGOTES"} for r in records]
    return [{**{k: v for k, v in r.items() if k not in ("warm", "pid")}, "env": env} for r, env in zip(records, own)]


@pytest.mark.parametrize("mode", ["ok", "fail"])
def test_ranks_forked_get_what_fresh_ranks_get(probe, mode):
    command = ranks_launch(probe, mode, "--flag")
    forked, fresh = run(command, stage_env()), run(command, real_processes(stage_env()))
    assert forked[0] == fresh[0] == (3 if mode == "fail" else 0)
    assert [r["warm"] for r in forked[1]] == [True, True] and [r["warm"] for r in fresh[1]] == [False, False]
    assert comparable(forked[1]) == comparable(fresh[1]) and [r["rank"] for r in forked[1]] == ["0", "1"]
    assert forked[1][0]["argv"] == [probe, "--local_rank=0", mode, "--flag"]
    assert forked[1][0]["cwd"] == str(REPO / "docs") and forked[1][0]["path"][0] == os.path.dirname(probe)


@pytest.mark.parametrize("form", ["script", "unbuffered script", "module", "command"])
def test_a_forked_process_gets_what_a_fresh_interpreter_gets(probe, form):
    """A plain script (buffered streams), -u, -m (sys.path[0] the folder), -c: the same record, exit code and
    traceback (from the script's own frames) forked and fresh."""
    folder = os.path.dirname(probe)
    command = {
        "script": [sys.executable, probe, "raise"],
        "unbuffered script": [sys.executable, "-u", probe, "raise"],
        "module": [sys.executable, "-m", "zprobe", "raise"],
        "command": [sys.executable, "-c", open(probe).read(), "raise"],
    }[form]
    forked, fresh = run(command, stage_env(), cwd=folder), run(command, real_processes(stage_env()), cwd=folder)
    assert forked[1][0]["warm"] and not fresh[1][0]["warm"]
    assert forked[0] == fresh[0] == 1 and comparable(forked[1]) == comparable(fresh[1])
    assert forked[2] == fresh[2] and forked[2].splitlines()[-1] == "ValueError: the probe's own error", forked[2]
    assert "zygote" not in forked[2]  # (the traceback starts at the script's own frames)


def test_the_stand_in_forwards_signals_and_ends_as_its_process_ended(probe):
    """SIGUSR1 to the stand-in reaches the forked process's handler (exit 7); SIGTERM ends it by SIGTERM, and the
    stand-in ends the same way."""
    codes = []
    for mode, sig in (("usr1", signal.SIGUSR1), ("sleep", signal.SIGTERM)):
        proc = subprocess.Popen([sys.executable, probe, mode], env=stage_env(), stdout=subprocess.PIPE, text=True)
        record = json.loads(proc.stdout.readline())
        assert record["warm"] and record["pid"] != proc.pid
        proc.send_signal(sig)
        codes.append(proc.wait(timeout=30))
    assert codes == [7, -signal.SIGTERM]


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


def test_an_environment_seen_again_gets_a_zygote_of_its_own(probe, monkeypatch):
    monkeypatch.setattr(ZYGOTES, "max_zygotes", ZYGOTES.max_zygotes + 1)  # (whatever the session's others)
    environ = dict(stage_env(), TORCH_ZYGOTE_TEST_MARK="1")  # (a load-time name: another key)
    first = run([sys.executable, probe, "ok"], environ)[1][0]
    assert not first["warm"]  # (none yet: a fresh interpreter, and the manager hears of it)
    sockets = len([f for f in os.listdir(ZYGOTES.folder) if f.endswith(".sock")])
    for _ in range(FRESH_BEFORE_ZYGOTE - 1):  # (then the manager starts its zygote)
        run([sys.executable, probe, "ok"], environ)
    deadline = time.monotonic() + 120
    while len([f for f in os.listdir(ZYGOTES.folder) if f.endswith(".sock")]) == sockets:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert run([sys.executable, probe, "ok"], environ)[1][0]["warm"]


def test_what_no_import_reads_may_differ_and_what_one_reads_may_not(probe, tmp_path):
    """A Slurm task's variables, the shell's, a test's own and another PYTHONPATH entry: the same zygote forks the
    process, which gets exactly its own environment; a variable DeepSpeed reads when imported (DEEPSPEED_TIMEOUT, the
    default of its collectives' timeout) or a PYTHONPATH entry that shadows a library the zygote imported (yaml): a
    fresh interpreter, as the process must be."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / "yaml.py").write_text("SHADOW = True\n")
    base = stage_env()
    elsewhere = dict(base, SLURM_JOB_ID="12", SLURM_PROCID="1", OLDPWD="/", SHLVL="3", DATA_1K="/data", TMPDIR="/tmp",
                     PYTHONPATH=os.pathsep.join([str(tmp_path / "plain"), base["PYTHONPATH"]]))  # fmt: skip
    forked, fresh = (
        run([sys.executable, probe, "ok"], elsewhere),
        run([sys.executable, probe, "ok"], real_processes(elsewhere)),
    )
    assert forked[1][0]["warm"] and not fresh[1][0]["warm"]
    assert comparable(forked[1]) == comparable(fresh[1]) and forked[1][0]["env"]["SLURM_JOB_ID"] == "12"

    read = dict(base, DEEPSPEED_TIMEOUT="7")
    assert not run([sys.executable, probe, "ok"], read)[1][0]["warm"]
    shadowed = dict(base, PYTHONPATH=os.pathsep.join([str(tmp_path / "shadow"), base["PYTHONPATH"]]))
    code = "import sys, yaml; print('torch' in sys.modules, getattr(yaml, 'SHADOW', False))"
    done = subprocess.run([sys.executable, "-c", code], env=shadowed, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "True"], done.stderr


def status(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0]
    except FileNotFoundError:
        return "Z"

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Tests run on CPU, deterministically, with DeepSpeed's CPU accelerator.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# CPU tuning (conv2former/cpu), where a run installs it, uses the fixed depthwise formulation rule, not timings, so
# separate runs compare bit for bit (tests/test_cpu_tuning.py and the resume test of measured choices set their own).
os.environ.setdefault("C2F_DEPTHWISE", "fixed")
# The environment's own tools first (deepspeed, ninja): DeepSpeed JIT-builds its CPU shared-memory op with the first
# `ninja` on PATH, and two ninja versions (the system's 1.11 and the venv's 1.13) hash commands differently, so
# alternating between them rebuilt the op (~1 minute on 2 cores) again and again during a test session.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
sys.path.insert(0, os.path.dirname(__file__))

from conv2former.engine.distributed import python_path  # noqa: E402  (after the environment above is set)


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test leaves the process environment as it found it: a stage run in-process (``main([...])``: a dry run,
    a config error) sets the launcher's variables (RANK, MASTER_PORT, ...) for itself, and a later test's
    subprocesses must not inherit them (they would rendezvous on a port this process still listens on)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, saying why, where no CUDA GPU is visible (CI)."""
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run benchmarks/gpu_checklist.py on a GPU host")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_FILE_SECONDS: dict = {}  # test file: seconds of its tests' setup, call and teardown
_FAST_SECONDS: dict = {}  # test not marked slow: seconds of its setup, call and teardown
FAST_BUDGET_S = 3.0  # a test over this (its fixtures' first setup included) is marked slow: make test-fast stays quick


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    _FILE_SECONDS[path] = _FILE_SECONDS.get(path, 0.0) + report.duration
    if "slow" not in report.keywords:
        _FAST_SECONDS[report.nodeid] = _FAST_SECONDS.get(report.nodeid, 0.0) + report.duration


_WORKER_ZYGOTES: dict = {}  # pytest-xdist worker: its zygotes' report lines


def pytest_sessionfinish(session):
    """A pytest-xdist worker hands its zygotes' report to the process that prints the summary."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None and ZYGOTES is not None:
        workeroutput["zygotes"] = ZYGOTES.report()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    lines = getattr(node, "workeroutput", {}).get("zygotes")
    if lines:
        _WORKER_ZYGOTES[node.gateway.id] = lines


def pytest_terminal_summary(terminalreporter):
    """The suite's time per test file, slowest first (the budget: docs/performance.md "Test time per file"); a
    session-scoped fixture's setup counts towards the file of the first test that used it."""
    if not _FILE_SECONDS:
        return
    terminalreporter.section("time per test file")
    for path, seconds in sorted(_FILE_SECONDS.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{seconds:8.1f}s  {path}")
    terminalreporter.write_line(f"{sum(_FILE_SECONDS.values()):8.1f}s  in all")
    if _WORKER_ZYGOTES:  # (pytest-xdist: each worker's own zygotes; this process ran no test)
        terminalreporter.section("the session's zygotes (tests/zygote.py), per worker")
        for worker, lines in sorted(_WORKER_ZYGOTES.items()):
            for line in lines:
                terminalreporter.write_line(f"{worker}: {line}")
    elif ZYGOTES is not None:
        terminalreporter.section("the session's zygotes (tests/zygote.py)")
        for line in ZYGOTES.report():
            terminalreporter.write_line(line)
    over = sorted(((s, n) for n, s in _FAST_SECONDS.items() if s > FAST_BUDGET_S), reverse=True)
    # the fast set's budget (docs/performance.md "Test time per file"): mark these slow or make them quick; a run in
    # workers (make test) does not list them: each worker slows the other's tests down
    if over and not terminalreporter.config.getoption("numprocesses", None):
        terminalreporter.section(f"tests not marked slow that took over {FAST_BUDGET_S:.0f} s")
        for seconds, nodeid in over:
            terminalreporter.write_line(f"{seconds:8.1f}s  {nodeid}")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The demo dataset (``data_prep/shard.py demo``: generated images, "22k" and "1k" shards), built once per test
    session under pytest's temporary directory, never inside the checkout."""
    out = tmp_path_factory.mktemp("demo-data")
    env = dict(os.environ, PYTHONPATH=python_path(str(REPO)), OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, str(REPO / "data_prep" / "shard.py"), "demo", "--out", str(out), "--quiet"],
        check=True,
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )
    return out


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory):
    """The session's launched reference runs (tests/reference_runs.py): each command line launched once, shared by
    every module that asks for it."""
    from reference_runs import ReferenceRuns

    return ReferenceRuns(tmp_path_factory)


@pytest.fixture(scope="session")
def demo_shards(demo_root) -> str:
    """The demo "22k" shard root (40 classes)."""
    return str(demo_root / "in22k")


@pytest.fixture(scope="session")
def demo_in1k(demo_root) -> str:
    """The demo "1k" shard root (10 classes)."""
    return str(demo_root / "in1k")


# -- helpers shared by the tests that run the stages as users do (import them: ``from conftest import ...``) ----------
BIN = Path(sys.executable).parent  # the environment's deepspeed, torchrun, ninja
# each pytest-xdist worker (`make test` runs two: PYTEST_XDIST_WORKER gw0, gw1) counts from a base of its own
_PORT = [29700 + 1000 * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])]


def next_port() -> int:
    """A rendezvous port of its own for each launch of the session (of its worker: 1,000 launches each)."""
    _PORT[0] += 1
    return _PORT[0]


def stage_env() -> dict:
    """The environment a stage runs in: one OpenMP thread per rank, DeepSpeed's CPU accelerator, this checkout."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        PATH=f"{BIN}:{os.environ['PATH']}",
        PYTHONPATH=python_path(str(REPO)),
    )
    if ZYGOTES is not None:  # its zygote, ready before the stage starts (or the stage would import it all itself)
        ZYGOTES.start(env, wait=True)
    return env


def deepspeed_launch(script: str, *args: str, ranks: int = 2) -> list:
    """The command that runs ``script`` on ``ranks`` CPU ranks under the deepspeed launcher (the tests about the
    launcher itself: signals, a dead rank, what users type)."""
    from conv2former.engine.distributed import deepspeed_command

    return deepspeed_command(script, *args, ranks=ranks, port=next_port())


ZYGOTE_SITE = REPO / "tests" / "zygote_site"
FRESH_BEFORE_ZYGOTE = 3  # an environment gets a zygote once this many of its processes started fresh (pairs do not pay)
MAX_ZYGOTES = 6  # (each holds ~0.9 GB of imported libraries; one idle for 10 minutes ends, and comes back at the
#  next process of its environment)


class Zygotes:
    """The session's zygotes (tests/zygote.py) and their manager: every Python process the session starts runs
    tests/zygote_site's sitecustomize, which has the process forked by the zygote of its interpreter and environment
    where there is one, and otherwise tells this manager, which starts a zygote for an environment it hears of three
    times, or again at once for one whose zygote ended idle (``start`` starts one at once). None under coverage (its
    subprocess patch measures fresh interpreters only) or with C2F_TEST_ZYGOTE=off; a test that needs real processes
    runs them with ``real_processes(env)``."""

    def __init__(self) -> None:
        import socket
        import tempfile
        import threading

        self.folder = tempfile.mkdtemp(prefix="c2f-z-")  # (short: a Unix socket's path has at most 107 bytes)
        self.seen: dict = {}  # key: processes of that environment that started fresh since its last zygote
        self.fresh = 0
        self.started: dict = {}  # key: its process
        self.had: set = set()  # the keys that had a zygote (one that ended idle starts again at once)
        self.lock = threading.Lock()
        self.max_zygotes = MAX_ZYGOTES
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(os.path.join(self.folder, "manager.sock"))
        self.server.listen(64)
        threading.Thread(target=self.serve, name="zygote-manager", daemon=True).start()

    def serve(self) -> None:
        import json

        while True:
            conn, _ = self.server.accept()
            with conn:
                data = b"".join(iter(lambda: conn.recv(1 << 16), b""))
            try:
                message = json.loads(data)
            except ValueError:
                continue
            self.seen[message["key"]] = self.seen.get(message["key"], 0) + 1
            self.fresh += 1
            if self.seen[message["key"]] == 1:  # (what that environment is, for whoever reads the folder)
                with open(os.path.join(self.folder, message["key"] + ".seen.json"), "w") as record:
                    json.dump(message, record)
            if self.seen[message["key"]] >= FRESH_BEFORE_ZYGOTE or message["key"] in self.had:
                self.start(message["env"], message["executable"], message["key"])

    def start(self, env: dict, executable: str = sys.executable, key: str | None = None, wait: bool = False) -> None:
        """Start the zygote of ``env`` (the key zygote_client gives it) unless there is one or ``max_zygotes``;
        ``wait``: until it listens (the stages' own: what starts before it would start fresh)."""
        import time

        import zygote_client

        key = key or zygote_client.key_of(env)
        self._start(key, env, executable)
        deadline = time.monotonic() + 120
        socket_path = os.path.join(self.folder, key + ".sock")
        while wait and key in self.started and not os.path.exists(socket_path) and time.monotonic() < deadline:
            if self.started[key].poll() is not None:
                break
            time.sleep(0.1)

    def _start(self, key: str, env: dict, executable: str) -> None:
        import zygote_client

        with self.lock:
            for ended in [k for k, process in self.started.items() if process.poll() is not None]:
                del self.started[ended]  # (idle for a while: tests/zygote.py's IDLE_S)
                self.seen[ended] = 0
            if key in self.started or len(self.started) >= self.max_zygotes:
                return
            self.had.add(key)
            with open(os.path.join(self.folder, key + ".log"), "a") as log:
                self.started[key] = subprocess.Popen(
                    [executable, "-u", str(REPO / "tests" / "zygote.py"), os.path.join(self.folder, key + ".sock")],
                    env={**zygote_client.own_environment(env), zygote_client.ROLE: "server"},
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                )  # fmt: skip

    def report(self) -> list:
        """One line per environment that had a zygote (its starts, the processes it forked and refused), and how many
        processes started fresh with none ready."""
        lines = []
        for name in sorted(os.listdir(self.folder)):
            if name.endswith(".log"):
                with open(os.path.join(self.folder, name)) as log:
                    text = log.read()
                starts, forked = text.count(" ready: "), text.count("zygote: forked ")
                refused = text.count("zygote: a fresh interpreter")
                lines.append(f"zygote {name[:-4]}: started {starts}x, {forked} processes forked, {refused} refused")
        lines.append(f"{self.fresh} processes started fresh with no zygote ready ({len(self.seen)} environments)")
        return lines

    def stop(self) -> None:
        import shutil

        for process in self.started.values():
            process.kill()
            process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def _zygotes() -> Zygotes | None:
    covered = "coverage" in sys.modules and sys.modules["coverage"].Coverage.current() is not None
    if covered or os.environ.get("COVERAGE_FILE") or os.environ.get("C2F_TEST_ZYGOTE") == "off":
        return None
    import atexit

    sys.path.insert(0, str(ZYGOTE_SITE))
    zygotes = Zygotes()
    atexit.register(zygotes.stop)
    os.environ["C2F_ZYGOTES"] = zygotes.folder
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ZYGOTE_SITE)) if p)
    return zygotes


ZYGOTES = _zygotes()


def real_processes(env: dict) -> dict:
    """``env`` for processes that must be fresh interpreters (a test that stops one with SIGSTOP, or measures its
    imports): no zygote forks them."""
    return {k: v for k, v in env.items() if k != "C2F_ZYGOTES"}


def ranks_launch(script: str, *args: str, ranks: int = 2) -> list:
    """The command that runs ``script`` on ``ranks`` CPU ranks as the deepspeed launcher does on one node, without its
    two interpreter hops (tests/ranks.py: ~6.5 s less a launch): every end-to-end test not about the launcher."""
    return [
        sys.executable,
        str(REPO / "tests" / "ranks.py"),
        "--ranks",
        str(ranks),
        "--port",
        str(next_port()),
        script,
        *args,
    ]


def run_ranks(script: str, *args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    """``script ARGS`` run to its end on ``ranks`` CPU ranks (``ranks_launch``), output captured; it must exit 0."""
    proc = subprocess.run(
        ranks_launch(script, *args, ranks=ranks),
        env=stage_env(),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def summary_from(stdout: str) -> dict:
    """The run summary a training stage logs last (``summary: {...}``), parsed."""
    import json

    line = [line for line in stdout.splitlines() if line.startswith("summary: ")][-1]
    return json.loads(line[len("summary: ") :])

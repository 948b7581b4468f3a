"""A warm interpreter that forks the ranks of the tests' launches, so that no rank pays the imports of torch,
DeepSpeed, timm, DALI and webdataset again (~4-5 s of every launch on 2 cores, paid in parallel by its ranks).

The session starts one (conftest's ``ranks_launch``) in the environment every launched stage gets (``stage_env``);
it imports the third-party libraries only (none of this checkout's modules: a rank imports those itself, as a fresh
process does) and then waits on a Unix socket. ``tests/ranks.py`` asks it for each rank: the rank's command line,
environment and working folder, its stdin/stdout/stderr and a *lifeline* (the read end of a pipe whose write end
``tests/ranks.py`` holds) pass as file descriptors. The zygote answers ``no`` (and ``tests/ranks.py`` starts the rank
as a fresh ``python -u SCRIPT``) unless the environment equals its own but for the launcher's per-rank variables: a
test that changes anything an import could read (PYTHONPATH, a library's variable) gets a fresh interpreter.
Otherwise it forks; the child takes those descriptors as 0, 1 and 2, that environment and folder, ``sys.argv`` and
``sys.path[0]`` of the script, and runs the script as ``__main__`` (``runpy``), ending as the interpreter would
(atexit handlers, flushed output, the exit code of ``SystemExit`` or 1 after a traceback). The zygote reports
``exit CODE`` (a negative code: killed by that signal) when it reaps the child.

Signals: a rank killed or signalled directly behaves as any process. ``tests/ranks.py`` forwards SIGTERM/SIGINT to its
ranks as before; a forked rank is not in ``tests/ranks.py``'s process group, so a test's ``killpg(SIGKILL)`` of the
launcher reaches it through the lifeline instead: when the pipe's last write end closes (the launcher is gone, however
it ended), a thread of the rank SIGKILLs the rank at once. Under ``make coverage`` no zygote is started (ranks are
fresh processes, measured by coverage's subprocess patch).

    python -u tests/zygote.py SOCKET_PATH
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import select
import signal
import socket
import struct
import sys
import threading
import traceback
from typing import Dict, List, Tuple

# what a training, evaluation or fine-tuning rank imports before its first step (third-party only)
PRELOAD = (
    "torch",
    "torchvision",
    "deepspeed",
    "timm",
    "timm.data",
    "webdataset",
    "numpy",
    "PIL.Image",
    "safetensors.torch",
    "fsspec",
    "yaml",
    "tqdm",
    "torch.utils.tensorboard",
    "nvidia.dali",
    "nvidia.dali.fn",
)
# the only variables in which a forked rank's environment may differ from the zygote's: the launcher's, set for each
# rank, the name of the test pytest is running, and this checkout's own C2F_* (read only by its modules, which the
# zygote never imports: serve() checks it); no library reads any of them when imported
PER_RANK = frozenset(
    {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    | {"CUDA_VISIBLE_DEVICES", "PYTEST_CURRENT_TEST"}
)
OURS = "C2F_"
CHECKOUT_PACKAGES = ("conv2former", "launch", "data_prep", "pretrain", "finetune")
HEADER = struct.Struct("!I")  # a request: its JSON's length, then the JSON; its four descriptors ride on the first part


def preload() -> List[str]:
    """Import the libraries a rank needs; those not installed are left to the rank (it fails as it would)."""
    loaded = []
    for name in PRELOAD:
        try:
            importlib.import_module(name)
            loaded.append(name)
        except ImportError:
            pass
    return loaded


BEFORE_IMPORTS = dict(os.environ)  # (the libraries set a few variables when imported: see set_by_imports)


def set_by_imports() -> Dict[str, str]:
    """The variables the preloaded libraries set when imported (DeepSpeed: PYTORCH_NVML_BASED_CUDA_CHECK; torch:
    TORCHINDUCTOR_CACHE_DIR, ...): a fresh rank would have them too, so a forked one gets them."""
    return {k: v for k, v in os.environ.items() if BEFORE_IMPORTS.get(k) != v}


def differences(env: Dict[str, str]) -> List[str]:
    """The variables (besides the launcher's per-rank ones) in which ``env`` differs from the environment this
    process started in."""
    own = BEFORE_IMPORTS
    return sorted(
        k for k in set(env) | set(own) if k not in PER_RANK and not k.startswith(OURS) and env.get(k) != own.get(k)
    )


def receive(conn: socket.socket) -> Tuple[dict, List[int]]:
    """One request: (its JSON, its descriptors: stdin, stdout, stderr, lifeline)."""
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 4)
    while len(data) < HEADER.size:
        data += conn.recv(1 << 16)
    (length,) = HEADER.unpack(data[: HEADER.size])
    body = data[HEADER.size :]
    while len(body) < length:
        more = conn.recv(1 << 16)
        if not more:
            raise ConnectionError("request cut short")
        body += more
    return json.loads(body), list(fds)


def run_rank(request: dict, fds: List[int]) -> None:
    """In the forked child: become the rank the request describes, run its script, end as the interpreter would."""
    stdin, stdout, stderr, lifeline = fds
    for target, fd in ((0, stdin), (1, stdout), (2, stderr)):
        os.dup2(fd, target)
    for fd in (stdin, stdout, stderr):
        if fd > 2:
            os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.update(request["set_by_imports"])
    os.chdir(request["cwd"])

    def watch() -> None:  # the launcher is gone (every write end closed): end as its killpg would have ended us
        while os.read(lifeline, 1):
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="zygote-lifeline", daemon=True).start()
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as end:
        if end.code is None or isinstance(end.code, int):
            code = int(end.code or 0)
        else:
            print(end.code, file=sys.stderr)
            code = 1
    except BaseException as error:
        tb = error.__traceback__  # (from the script's own frames on, as the interpreter prints it)
        while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>"):
            tb = tb.tb_next
        traceback.print_exception(type(error), error, tb)
        code = 1
        if isinstance(error, KeyboardInterrupt):  # (the interpreter then ends by SIGINT itself)
            code = -signal.SIGINT
    atexit._run_exitfuncs()  # (what the interpreter runs at exit)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code == -signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def fork_rank(conn: socket.socket, closing: List[int]) -> int:
    """Read one request from ``conn`` and fork its rank; the child's pid, or 0 where it was refused."""
    request, fds = receive(conn)
    differing = differences(request["env"])
    if len(fds) != 4 or differing:
        for fd in fds:
            os.close(fd)
        conn.sendall(b"no\n")
        print(
            f"zygote: a fresh interpreter for {request['argv'][0]}: its environment differs in {differing}", flush=True
        )
        return 0
    request["set_by_imports"] = set_by_imports()
    pid = os.fork()
    if pid == 0:
        try:
            for fd in closing:
                os.close(fd)
            signal.set_wakeup_fd(-1)
            for sig, handler in ((signal.SIGCHLD, signal.SIG_DFL), (signal.SIGTERM, signal.SIG_DFL)):
                signal.signal(sig, handler)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            conn.close()
            run_rank(request, fds)
        finally:
            os._exit(1)
    for fd in fds:
        os.close(fd)
    conn.sendall(f"ok {pid}\n".encode())
    return pid


def reap(children: Dict[int, socket.socket]) -> None:
    """Report the exit code of every child that ended to the launcher that asked for it."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            try:
                conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
            except OSError:
                pass
            conn.close()


def serve(path: str) -> None:
    loaded = preload()
    ours = sorted(m for m in sys.modules if m.split(".")[0] in CHECKOUT_PACKAGES)
    if ours:  # (a forked rank would get them as imported here, under the zygote's C2F_* variables)
        sys.exit(f"zygote: a preloaded library imported this checkout's {ours}: no zygote")
    parent = os.getppid()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    server.listen(64)
    os.rename(path + ".tmp", path)  # (a launcher that finds the path finds a listening socket)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    print(f"zygote {os.getpid()} ready: {', '.join(loaded)}", flush=True)
    children: Dict[int, socket.socket] = {}
    while os.getppid() == parent:  # (the session that started it ended: so does it)
        readable, _, _ = select.select([server, wake_r], [], [], 1.0)
        if wake_r in readable:
            os.read(wake_r, 4096)
        if server in readable:
            conn, _ = server.accept()
            closing = [server.fileno(), wake_r, wake_w, *(c.fileno() for c in children.values())]
            try:
                pid = fork_rank(conn, closing)
            except (OSError, ValueError, ConnectionError) as error:
                print(f"zygote: request dropped: {error}", flush=True)
                pid = 0
            if pid:
                children[pid] = conn
            else:
                conn.close()
        reap(children)


if __name__ == "__main__":
    serve(sys.argv[1])

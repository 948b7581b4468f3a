"""A warm interpreter that forks the test session's Python processes, so that a launched rank, a launcher or a
script does not pay the imports of torch, DeepSpeed, timm, DALI and webdataset again (~4-5 s of CPU each on 2 cores).

The session's manager (conftest) starts one per environment that the session's processes use more than once; it
imports the third-party libraries only (none of this checkout's modules: a process imports those itself, as a fresh
one does) and waits on a Unix socket. A new process asks it from its sitecustomize (tests/zygote_site/zygote_client.py)
where its interpreter and the part of its environment that an import can read match (zygote_client's key; the
zygote also compares what its own imports were seen to read, and checks that the process's sys.path finds every
module it imported where it found it): its stdin, stdout, stderr and a *lifeline* (see zygote_client) pass as descriptors, with
its command line, environment, folder, sys.path, signal dispositions and mask, CPU affinity and umask. The zygote
checks the match again, forks, and the child becomes that process and runs its script (``runpy``, as the interpreter
does for ``-m``), ending as the interpreter would: non-daemon threads joined, atexit handlers, flushed output, the code
of ``SystemExit``, a traceback through ``sys.excepthook`` and 1, SIGINT's end for KeyboardInterrupt. The zygote
reports ``exit CODE`` (negative: killed by that signal) to the process that asked, which ends the same way.

Under ``make coverage`` (its subprocess patch measures fresh interpreters) and with ``C2F_TEST_ZYGOTE=off`` there is
none. What stays different from a fresh interpreter: the child shares the zygote's hash seed (str hashes are equal
across the session's forked processes) and its parent process is the zygote.

    python -u tests/zygote.py SOCKET_PATH
"""

from __future__ import annotations

import atexit
import builtins
import gc
import importlib
import io
import json
import os
import runpy
import select
import signal
import socket
import struct
import sys
import threading
import time
import types
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "zygote_site"))
import zygote_client  # noqa: E402  (the key and the request's fields are the client's)

# what a training, evaluation or fine-tuning process imports before its first step (third-party only)
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
CHECKOUT_PACKAGES = ("conv2former", "launch", "data_prep", "pretrain", "finetune", "benchmarks", "tools")
HEADER = struct.Struct("!I")
IDLE_S = 600  # a zygote nothing asked for this long, with no child running, ends
BEFORE_IMPORTS = dict(os.environ)  # (a forked process gets its own environment: not the variables the imports set here,
#  DeepSpeed's PYTORCH_NVML_BASED_CUDA_CHECK, torch's TORCHINDUCTOR_CACHE_DIR, MLflow's telemetry id: their libraries
#  read them, or set them again, where they are used)


# libraries whose imports scan the whole environment for their own prefix (reading every variable as they go)
SCANNERS = {os.path.join("tqdm", "utils.py"): "TQDM_", os.path.join("fsspec", "config.py"): "FSSPEC_"}
READ: Dict[str, object] = {"names": set(), "prefixes": set(), "everything": False}  # what the imports read (preload)


def _reader() -> str:
    """The file of the code that reads the environment (past os.py's and the mapping's own frames)."""
    frame = sys._getframe(1)
    skipped = (__file__, os.__file__, "<frozen os>", "<frozen _collections_abc>")
    while frame is not None and frame.f_code.co_filename in skipped:
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else ""


def _note(name=None) -> None:
    reader = _reader()
    scan = next((prefix for tail, prefix in SCANNERS.items() if reader.endswith(tail)), None)
    if scan is not None:
        READ["prefixes"].add(scan)
    elif name is None:
        READ["everything"] = True  # (an unknown scan: every variable may matter)
    else:
        READ["names"].add(name.decode() if isinstance(name, bytes) else name)


def preload() -> List[str]:
    """Import the libraries (those not installed are left to the process: it fails as it would), noting every
    environment variable their Python code reads (a process whose value differs is refused: see refusal)."""
    mapping = type(os.environ)
    get, contains, iterate = mapping.__getitem__, mapping.__contains__, mapping.__iter__
    mapping.__getitem__ = lambda self, key: (_note(key), get(self, key))[1]
    mapping.__contains__ = lambda self, key: (_note(key), contains(self, key))[1]
    mapping.__iter__ = lambda self: (_note(), iterate(self))[1]
    loaded = []
    try:
        for name in PRELOAD:
            try:
                importlib.import_module(name)
                loaded.append(name)
            except ImportError:
                pass
    finally:
        mapping.__getitem__, mapping.__contains__, mapping.__iter__ = get, contains, iterate
    return loaded


def compared(env: dict) -> dict:
    """What of ``env`` must equal the zygote's: the load-time variables and those the imports read."""
    names, prefixes = READ["names"], tuple(READ["prefixes"])
    if READ["everything"]:
        return zygote_client.comparable(env, wanted=lambda _name: True)
    return zygote_client.comparable(
        env, wanted=lambda k: zygote_client.load_time(k) or k in names or k.startswith(prefixes)
    )


def found_elsewhere(path: List[str]) -> str:
    """The first module imported here that ``path`` (the process's sys.path) finds elsewhere ("" if none): where the
    process's PYTHONPATH or folder would shadow a library, or add to a namespace package, it starts fresh."""
    from importlib.machinery import PathFinder

    def where(name: str, search: List[str]):
        spec = PathFinder.find_spec(name, search)
        return spec and (spec.origin, list(spec.submodule_search_locations or []))

    for name in sorted({m.split(".")[0] for m in sys.modules} - set(sys.builtin_module_names)):
        ours = where(name, sys.path)  # (None: not found through sys.path, as a module made at run time)
        if ours is not None and where(name, path) != ours:
            return name
    return ""


def refusal(request: dict) -> str:
    """Why this zygote cannot be ``request``'s process ("" where it can)."""
    if request.get("interpreter") != zygote_client.interpreter():
        return "another interpreter"
    own, theirs = compared(BEFORE_IMPORTS), compared(request["env"])
    differing = sorted(k for k in set(own) | set(theirs) if own.get(k) != theirs.get(k))
    if differing:
        return f"its environment differs in {differing}"
    if request["rlimits"] != zygote_client.state_rlimits():
        return "other resource limits"
    theirs, own = request["identity"], zygote_client.identity()
    if theirs != own:
        names = ("user", "group", "groups", "namespaces", "cgroup")
        return "another " + ", ".join(n for n, a, b in zip(names, theirs, own) if a != b) + f" ({theirs} vs {own})"
    path = [first_path_entry(*request["mode_target"], request["cwd"]), *request["path"]]
    shadowing = found_elsewhere([entry or request["cwd"] for entry in path])  # ("": the process's folder)
    if shadowing:
        return f"its sys.path finds {shadowing} elsewhere"
    return ""


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


def standard_streams(unbuffered: bool) -> None:
    """sys.stdin/stdout/stderr on descriptors 0-2 as the interpreter makes them (with or without -u)."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        old = getattr(sys, name)
        raw_only = unbuffered and fd > 0
        binary = io.open(fd, "rb" if fd == 0 else "wb", buffering=0 if raw_only else -1, closefd=False)
        line_buffered = not unbuffered and fd > 0 and (fd == 2 or os.isatty(fd))
        stream = io.TextIOWrapper(binary, encoding=old.encoding, errors=old.errors, line_buffering=line_buffered,
                                  write_through=raw_only)  # fmt: skip
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def first_path_entry(mode: str, target: str, cwd: str) -> str:
    """sys.path[0] as the interpreter sets it: the script's folder, the working folder for -m, "" for -c."""
    return {"script": os.path.dirname(os.path.realpath(os.path.join(cwd, target))), "module": cwd, "command": ""}[mode]


def become(request: dict, fds: List[int]) -> None:
    """In the forked child: take over the state of the process that asked (see zygote_client.state)."""
    for target, fd in zip((0, 1, 2), fds[:3]):
        os.dup2(fd, target)
    for fd in fds[:3]:
        if fd > 2:
            os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.sched_setaffinity(0, request["affinity"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig, handler in request["dispositions"].items():
        try:
            signal.signal(int(sig), signal.Handlers(handler))
        except (OSError, ValueError, RuntimeError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, request["blocked"])
    sys.path[:] = [first_path_entry(*request["mode_target"], request["cwd"]), *request["path"]]
    sys.argv, sys.orig_argv, sys.executable = request["argv"], request["orig_argv"], request["executable"]
    standard_streams(request["unbuffered"])
    if "numpy" in sys.modules:  # (a fresh interpreter seeds numpy's global generator anew)
        sys.modules["numpy"].random.seed()
    lifeline = fds[3]

    def watch() -> None:  # the stand-in is gone (the write end closed): end this process's group (its own children
        while os.read(lifeline, 1):  # and their stand-ins) as a killpg of the stand-in's group would have ended them
            pass
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="zygote-lifeline", daemon=True).start()


def run(mode: str, target: str) -> int:
    """Run the script, module or code as ``__main__``: its exit code as the interpreter would give it."""
    try:
        main = types.ModuleType("__main__")  # (an empty __main__, as a fresh interpreter's: not this zygote's)
        main.__builtins__ = builtins
        sys.modules["__main__"] = main
        if mode == "script":
            runpy.run_path(target, run_name="__main__")
        elif mode == "module":
            runpy._run_module_as_main(target, alter_argv=True)  # (what the interpreter runs for -m)
        else:
            exec(compile(target, "<string>", "exec"), main.__dict__)
    except SystemExit as end:
        if end.code is None or isinstance(end.code, int):
            return int(end.code or 0)
        print(end.code, file=sys.stderr)
        return 1
    except BaseException as error:
        tb = error.__traceback__  # (from the script's own frames on, as the interpreter prints it; -m shows runpy's)
        ours = (__file__, runpy.__file__, "<frozen runpy>") if mode == "script" else (__file__,)
        while tb is not None and tb.tb_frame.f_code.co_filename in ours:
            tb = tb.tb_next
        sys.excepthook(type(error), error.with_traceback(tb), tb)
        return -signal.SIGINT if isinstance(error, KeyboardInterrupt) else 1
    return 0


def finish(code: int) -> None:
    """End as the interpreter ends: non-daemon threads, atexit, flushed streams; KeyboardInterrupt: by SIGINT."""
    threading._shutdown()  # (the interpreter joins the non-daemon threads before the atexit handlers)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code == -signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def fork_process(conn: socket.socket, closing: List[int]) -> int:
    """Read one request from ``conn`` and fork its process; the child's pid, or 0 where it was refused."""
    request, fds = receive(conn)
    why = "descriptors" if len(fds) != 4 else refusal(request)
    if why:
        for fd in fds:
            os.close(fd)
        conn.sendall(b"no\n")
        print(f"zygote: a fresh interpreter for {request.get('argv')}: {why}", flush=True)
        return 0
    pid = os.fork()
    if pid == 0:
        try:
            for fd in closing:
                os.close(fd)
            os.setpgid(0, 0)  # (a group of its own and its children's: see become's watch)
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            conn.close()
            become(request, fds)
            finish(run(*request["mode_target"]))
        finally:
            os._exit(1)
    for fd in fds:
        os.close(fd)
    conn.sendall(f"ok {pid}\n".encode())
    print(f"zygote: forked {pid} for {request['argv'][:1]}", flush=True)
    return pid


def reap(children: Dict[int, socket.socket]) -> None:
    """Report the exit code of every child that ended to the process that asked for it."""
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


def listen(path: str) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    server.listen(64)
    os.rename(path + ".tmp", path)  # (a client that finds the path finds a listening socket)
    return server


def serve(path: str) -> None:
    loaded = preload()
    ours = sorted(m for m in sys.modules if m.split(".")[0] in CHECKOUT_PACKAGES)
    if ours:  # (a forked process would get them as imported here, under the zygote's C2F_* variables)
        sys.exit(f"zygote: a preloaded library imported this checkout's {ours}: no zygote")
    gc.freeze()  # (the imports' objects: a child's collections skip them and leave their pages shared; DALI's atexit
    #  handler alone runs gc.collect, 0.25 s over them)
    parent = os.getppid()
    server = listen(path)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    print(f"zygote {os.getpid()} ready: {', '.join(loaded)}", flush=True)
    children: Dict[int, socket.socket] = {}
    last_use = time.monotonic()
    while os.getppid() == parent:  # (the session that started it ended: so does it)
        if not children and time.monotonic() - last_use > IDLE_S:  # (its memory back: the manager may start another)
            os.unlink(path)
            print(f"zygote: idle for {IDLE_S} s, ended", flush=True)
            return
        readable, _, _ = select.select([server, wake_r], [], [], 1.0)
        if wake_r in readable:
            os.read(wake_r, 4096)
        if server in readable:
            last_use = time.monotonic()
            conn, _ = server.accept()
            closing = [server.fileno(), wake_r, wake_w, *(c.fileno() for c in children.values())]
            try:
                pid = fork_process(conn, closing)
            except (OSError, ValueError, ConnectionError, KeyError, TypeError) as error:
                print(f"zygote: request dropped: {error!r}", flush=True)
                pid = 0
            if pid:
                children[pid] = conn
            else:
                conn.close()
        reap(children)


if __name__ == "__main__":
    serve(sys.argv[1])

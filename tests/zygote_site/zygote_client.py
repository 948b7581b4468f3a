"""The client half of the tests' zygotes (tests/zygote.py), run by this folder's sitecustomize in every Python process
the test session starts (conftest puts this folder on PYTHONPATH and names the session's zygote folder in C2F_ZYGOTES).

A process whose interpreter, options and environment (where an import can read it) match a warm zygote's (torch, DeepSpeed, timm, DALI, webdataset
already imported) does not import them again: it asks that zygote to fork a child that becomes this process (its
command line, environment, folder, sys.path, standard streams, signal dispositions and mask, CPU affinity, umask) and
runs the script, and stays behind as that child's *stand-in*: it forwards the signals it gets to the child and ends as
the child ended (its exit code, or killed by the same signal), so its parent (a launcher, a test) sees what it would
see. The child watches a *lifeline* (a pipe whose write end only the stand-in holds): when the stand-in is gone, however
it ended (a test's SIGKILL of its process group included), the child SIGKILLs itself.

A process that matches no zygote runs as it would have (a fresh interpreter) and tells the session's manager
(conftest) its environment: an environment seen three times gets a zygote of its own. Processes that must be real
(a test that stops a rank with SIGSTOP, an import-time measurement) run with C2F_ZYGOTES unset.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

# the variables in which a forked process's environment may differ from its zygote's: the launchers' per-rank ones,
# the test pytest is running, the shell's last command; no library reads any of them when imported
PER_PROCESS = frozenset(
    {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    | {"CUDA_VISIBLE_DEVICES", "PYTEST_CURRENT_TEST", "_"}
)
OURS = "C2F_"  # this checkout's own variables: read by its modules only, which a zygote never imports
FOLDER = "C2F_ZYGOTES"  # the session's zygote folder: <key>.sock per zygote, manager.sock
ROLE = "C2F_ZYGOTE_ROLE"  # "server" in a zygote itself (it must not ask itself)
# What a library can read while it is loaded. C code reads its variables when its library loads, where no Python code
# can see it (OpenMP, MKL, oneDNN, OpenBLAS, glibc's locale and malloc, CUDA, NCCL, DALI, the interpreter's PYTHON*):
# those are named here. What Python code reads while imported, a zygote records (tests/zygote.py) and compares too, so
# the key is only where to look: environments that differ elsewhere (a Slurm job's SLURM_*, a test's own variables,
# the shell's OLDPWD) share a zygote.
LOAD_TIME_PREFIXES = (
    "PYTHON", "LD_", "OMP_", "GOMP_", "KMP_", "MKL_", "DNNL_", "ONEDNN_", "OPENBLAS_", "ATEN_", "TORCH", "PYTORCH_",
    "CUDA", "NCCL_", "NVIDIA_", "DALI_", "TRITON_", "DS_", "MALLOC_", "GLIBC_", "LC_", "XDG_", "HF_", "TIMM_", "WDS_",
    "TQDM_", "FSSPEC_", "AWS_", "MLFLOW_", "WANDB_",
)  # fmt: skip
LOAD_TIME_NAMES = frozenset({"PATH", "HOME", "USER", "LANG", "LANGUAGE", "TZ", "TERM", "CI"})
TEMP_NAMES = ("TMPDIR", "TEMP", "TMP")  # (compared as the folder tempfile would choose: Slurm sets TMPDIR=/tmp)


def _paths(value: str) -> list:
    return list(dict.fromkeys(value.split(os.pathsep)))  # (a repeated entry changes no lookup)


def load_time(name: str) -> bool:
    return name in LOAD_TIME_NAMES or name.startswith(LOAD_TIME_PREFIXES)


def temp_folder(env: dict) -> str:
    """The folder tempfile.gettempdir() starts from under ``env`` (its first candidate)."""
    return next((os.path.abspath(env[n]) for n in TEMP_NAMES if env.get(n)), "/tmp")


def comparable(env: dict, wanted=load_time) -> dict:
    """The part of ``env`` a zygote's imports can depend on, among the variables ``wanted`` names: none of the
    per-process and C2F_* ones; PATH without repeated entries (DeepSpeed's runner puts its folder first again: the
    lookups are the same); the temporary folder as tempfile would choose it; no PYTHONPATH (the zygote checks that the
    process's sys.path finds every module it imported where it found it)."""
    out = {k: v for k, v in env.items() if wanted(k) and k not in PER_PROCESS and not k.startswith(OURS)}
    for name in ("PYTHONPATH", *TEMP_NAMES):
        out.pop(name, None)
    if "PATH" in out:
        out["PATH"] = os.pathsep.join(_paths(out["PATH"]))
    out[" tempdir"] = temp_folder(env)
    return out


def own_environment(env: dict) -> dict:
    """``env`` as a zygote is started with: all but the per-process and C2F_* variables."""
    return {k: v for k, v in env.items() if k not in PER_PROCESS and not k.startswith(OURS)}


def interpreter() -> list:
    return [os.path.realpath(sys.executable), sys.prefix, sys.base_prefix, sys.version]


def key_of(env: dict) -> str:
    """The zygote a process with ``env`` can be forked by (this interpreter's)."""
    text = json.dumps([interpreter(), sorted(comparable(env).items())])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def what_to_run() -> tuple | None:
    """(mode, target) of this interpreter's command line (``[-u] SCRIPT``, ``[-u] -m MODULE``, ``[-u] -c CODE``);
    None for any other option (-X, -O, -I, ...: a fresh interpreter)."""
    args = list(sys.orig_argv[1:])
    while args[:1] == ["-u"]:
        args.pop(0)
    if not args or args[0] == "-":
        return None
    if args[0] in ("-m", "-c"):
        return ("module" if args[0] == "-m" else "command", args[1]) if len(args) > 1 else None
    if args[0].startswith("-"):
        return None
    return "script", args[0]


def only_standard_streams() -> bool:
    """Only descriptors 0, 1 and 2 open (and valid): anything passed beyond them (pass_fds, a multiprocessing spawn)
    could not follow the fork; an unopened standard stream could not be passed."""
    listed = {int(name) for name in os.listdir("/proc/self/fd")}  # (and the listing's own, closed by now)
    for fd in listed - {0, 1, 2}:
        try:
            os.fstat(fd)
            return False
        except OSError:
            pass
    return {0, 1, 2} <= listed


def state() -> dict:
    """The parts of this process a forked child takes over (beyond its environment and descriptors)."""
    import signal

    umask = os.umask(0)
    os.umask(umask)
    dispositions = {}
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
        if handler in (signal.SIG_IGN, signal.SIG_DFL):
            dispositions[int(sig)] = int(handler)
    return {
        "mode_target": what_to_run(),
        "argv": sys.argv,
        "orig_argv": sys.orig_argv,
        "executable": sys.executable,
        "interpreter": interpreter(),
        "path": sys.path,
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "umask": umask,
        "unbuffered": unbuffered(),
        "dispositions": dispositions,
        "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "affinity": sorted(os.sched_getaffinity(0)),
        "rlimits": state_rlimits(),
        "identity": identity(),
    }


def identity() -> list:
    """What a forked child would silently not share with this process where it differs from its zygote's: user,
    groups, namespaces (``ip netns exec``: the two-node test), cgroup (a Slurm job step's)."""
    namespaces = {}
    for name in ("net", "mnt", "pid", "uts", "ipc", "user", "cgroup"):
        try:
            namespaces[name] = os.readlink(f"/proc/self/ns/{name}")
        except OSError:
            namespaces[name] = None
    try:
        with open("/proc/self/cgroup") as cgroup:
            groups = cgroup.read()
    except OSError:
        groups = None
    # (the groups with the process's own: what permission checks see; a Slurm task lists its primary group again)
    return [os.getuid(), os.getgid(), sorted(set(os.getgroups()) | {os.getgid()}), namespaces, groups]


def unbuffered() -> bool:
    """Whether the interpreter runs unbuffered (-u before the script, -m or -c; PYTHONUNBUFFERED)."""
    return sys.orig_argv[1:2] == ["-u"] or bool(os.environ.get("PYTHONUNBUFFERED"))


def state_rlimits() -> dict:
    import resource

    names = [n for n in dir(resource) if n.startswith("RLIMIT_")]
    return {n: list(resource.getrlimit(getattr(resource, n))) for n in names}


HEADER_BYTES = (
    4  # a request: its JSON's length (big-endian), then the JSON; its four descriptors ride on the first part
)


def send_request(path: str, request: dict, fds: list):
    """Connect to the zygote at ``path`` and send ``request`` with ``fds``; the connection, or None."""
    import socket
    import struct

    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        body = json.dumps(request).encode()
        socket.send_fds(conn, [struct.pack("!I", len(body)) + body], fds)
        return conn
    except OSError:
        conn.close()
        return None


def read_line(conn) -> str:
    """One line from ``conn``, read byte by byte (what follows it stays unread); "" at its end."""
    line = b""
    while not line.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte:
            break
        line += byte
    return line.decode()


def tell_manager(folder: str, key: str) -> None:
    """Say that a process of environment ``key`` started fresh (conftest starts a zygote for an environment seen
    three times); nothing waits for an answer."""
    import socket

    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(os.path.join(folder, "manager.sock"))
        conn.sendall(json.dumps({"key": key, "env": own_environment(dict(os.environ)), "argv": sys.orig_argv[:3],
                                 "executable": sys.executable}).encode())  # fmt: skip
    except OSError:
        pass
    finally:
        conn.close()


def forwarded_signals() -> list:
    """The signals a stand-in forwards to its child."""
    import signal

    return [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
            signal.SIGALRM, signal.SIGCONT, signal.SIGWINCH]  # fmt: skip


def stand_in(pid: int, conn, mask: set) -> None:
    """Be the forked child's stand-in until it ends: forward the signals this process gets (those that came while
    the child was being forked were held: ``mask`` is the signal mask to return to), then end as it did."""
    import signal

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in forwarded_signals():
        if signal.getsignal(sig) != signal.SIG_IGN:  # (an ignored signal: the child ignores it too)
            signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # (a signal held meanwhile is forwarded now)
    line = read_line(conn).split()  # (the zygote's "exit CODE" when it reaps the child; EOF: it went away)
    code = int(line[1]) if line[:1] == ["exit"] else 1
    if code < 0:  # killed by a signal: so is this process
        signal.signal(-code, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [-code])
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code & 0xFF)


def run_forked_or_return() -> None:
    """Become the stand-in of a child a zygote forked for this process (never returns), or return: this process
    then goes on as a fresh interpreter."""
    folder = os.environ.get(FOLDER)
    if not folder or os.environ.get(ROLE) or what_to_run() is None or not only_standard_streams():
        return
    key = key_of(dict(os.environ))
    path = os.path.join(folder, key + ".sock")
    if not os.path.exists(path):
        tell_manager(folder, key)
        return
    import signal

    lifeline_r, lifeline_w = os.pipe()  # (only this process holds the write end)
    request = state()  # (the child takes this signal mask; until this process forwards, the signals wait)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, forwarded_signals())
    conn = send_request(path, request, [0, 1, 2, lifeline_r])
    os.close(lifeline_r)
    answer = read_line(conn).split() if conn is not None else []
    if answer[:1] != ["ok"]:
        if conn is not None:
            conn.close()
        os.close(lifeline_w)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # (a fresh interpreter: what came meanwhile acts now)
        return
    stand_in(int(answer[1]), conn, mask)

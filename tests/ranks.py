"""Run a script on N local ranks as deepspeed's launcher does on one node, without its two Python hops.

``deepspeed`` starts ``deepspeed.launcher.runner``, which starts ``deepspeed.launcher.launch``, which starts the ranks;
each hop imports torch and DeepSpeed first (~3 s each on 2 cores, ~6.5 s a launch, ~9 minutes over the suite's
launches). torchrun is one hop that still imports torch. This parent imports only the standard library and gives each
rank what ``deepspeed.launcher.launch`` gives it (DeepSpeed 0.18, one node): the same environment (RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_SIZE, CROSS_RANK, CROSS_SIZE, MASTER_ADDR, MASTER_PORT, CUDA_VISIBLE_DEVICES), the command
``python -u SCRIPT --local_rank=N ARGS``; when a rank fails it ends the others a second later (SIGTERM, SIGKILL after
30 s: the launcher polls each second) and exits with that rank's code; SIGINT/SIGTERM end every rank and exit 1. A run
that succeeds ends when its last rank does (the launcher's poll adds up to a second). With ``--zygote SOCKET`` the
ranks are forked by the session's zygote (tests/zygote.py: torch, DeepSpeed, timm, DALI already imported) where it
accepts their environment, and start as fresh interpreters where it does not. The tests about the launcher itself
(signals to the ranks, a dead or hung rank, Slurm, the demo, two nodes, torchrun) use the real launchers.

    python tests/ranks.py --ranks N --port P [--zygote SOCKET] SCRIPT [ARGS...]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

HEADER = struct.Struct("!I")  # tests/zygote.py's request header: the JSON's length
LIFELINES: list = []  # write ends of the forked ranks' lifelines, open while this launcher lives


def rank_env(rank: int, ranks: int, port: int) -> dict:
    """The environment deepspeed.launcher.launch gives local rank ``rank`` of ``ranks`` on a single node."""
    return dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(ranks),
        CROSS_RANK="0",
        CROSS_SIZE="1",
        LOCAL_SIZE=str(ranks),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        CUDA_VISIBLE_DEVICES=",".join(str(r) for r in range(ranks)),
    )


class ForkedRank:
    """A rank the session's zygote (tests/zygote.py) forked: the subset of ``subprocess.Popen`` the launcher uses."""

    def __init__(self, pid: int, conn: socket.socket) -> None:
        self.pid, self.conn, self.returncode = pid, conn, None
        self._pending = b""

    def read_exit(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds (None: for ever) for the zygote's ``exit CODE`` (EOF without it: 1)."""
        while self.returncode is None:
            ready, _, _ = select.select([self.conn], [], [], timeout)
            if not ready:
                return
            data = self.conn.recv(256)
            self._pending += data
            if b"\n" in self._pending or not data:
                line = self._pending.decode().strip()
                self.returncode = int(line.split()[1]) if line.startswith("exit ") else 1
                self.conn.close()

    def poll(self) -> int | None:
        self.read_exit(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        self.read_exit(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(f"rank {self.pid}", timeout or 0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def first_line(conn: socket.socket) -> str:
    """The zygote's answer to a request, read byte by byte (its ``exit`` line, maybe already sent, stays unread)."""
    line = b""
    while not line.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte:
            break
        line += byte
    return line.decode()


def fork_ranks(path: str | None, commands: list, environments: list) -> list | None:
    """The ranks forked by the zygote listening at ``path``, or None where there is none (yet) or it refuses (an
    environment other than its own): the ranks then start as fresh interpreters."""
    if not path or not os.path.exists(path):
        return None
    lifeline_r, lifeline_w = os.pipe()  # (kept open here until this launcher ends: see tests/zygote.py)
    ranks = []
    for argv, environment in zip(commands, environments):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
            body = json.dumps({"argv": argv, "env": environment, "cwd": os.getcwd()}).encode()
            socket.send_fds(conn, [HEADER.pack(len(body)) + body], [0, 1, 2, lifeline_r])
            answer = first_line(conn).split()
        except OSError:
            answer = []
        if answer[:1] != ["ok"]:
            conn.close()
            if ranks:  # (only a zygote that went away mid-launch: end what it started)
                end_all(ranks)
            os.close(lifeline_r)
            os.close(lifeline_w)
            return None
        ranks.append(ForkedRank(int(answer[1]), conn))
    os.close(lifeline_r)
    LIFELINES.append(lifeline_w)
    return ranks


def end_all(processes: list) -> None:
    """SIGTERM to every rank still running, SIGKILL to those alive 30 s later (deepspeed's terminate_process_tree)."""
    for p in processes:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 30
    for p in processes:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_for_ranks(processes: list) -> int:
    """Wait until every rank ended (0), or one failed: then, a second later, end the others (its code)."""
    running = list(processes)
    while running:
        if isinstance(running[0], ForkedRank):
            ready, _, _ = select.select([p.conn for p in running], [], [])
            ended = [p for p in running if p.conn in ready and p.poll() is not None]
        else:
            pid, status = os.wait()
            ended = [p for p in running if p.pid == pid]
            for p in ended:
                p.returncode = os.waitstatus_to_exitcode(status)
        for p in ended:
            running.remove(p)
            if p.returncode != 0:
                time.sleep(1)  # deepspeed's launcher notices a failed rank at its next poll, up to a second later
                end_all(processes)
                return p.returncode
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--zygote", help="the socket of the session's zygote (tests/zygote.py), where there is one")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    a = parser.parse_args()
    commands = [[a.script, f"--local_rank={r}", *a.args] for r in range(a.ranks)]
    environments = [rank_env(r, a.ranks, a.port) for r in range(a.ranks)]
    processes = fork_ranks(a.zygote, commands, environments) or [
        subprocess.Popen([sys.executable, "-u", *argv], env=environment)
        for argv, environment in zip(commands, environments)
    ]

    def on_signal(signum, frame):
        end_all(processes)
        sys.exit(1)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return wait_for_ranks(processes)


if __name__ == "__main__":
    sys.exit(main())

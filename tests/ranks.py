"""Run a script on N local ranks as deepspeed's launcher does on one node, without its two Python hops.

``deepspeed`` starts ``deepspeed.launcher.runner``, which starts ``deepspeed.launcher.launch``, which starts the ranks;
each hop imports torch and DeepSpeed first (~3 s each on 2 cores, ~6.5 s a launch, ~9 minutes over the suite's
launches). torchrun is one hop that still imports torch. This parent imports only the standard library and gives each
rank what ``deepspeed.launcher.launch`` gives it (DeepSpeed 0.18, one node): the same environment (RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_SIZE, CROSS_RANK, CROSS_SIZE, MASTER_ADDR, MASTER_PORT, CUDA_VISIBLE_DEVICES), the command
``python -u SCRIPT --local_rank=N ARGS``; when a rank fails it ends the others a second later (SIGTERM, SIGKILL after
30 s: the launcher polls each second) and exits with that rank's code; SIGINT/SIGTERM end every rank and exit 1. A run
that succeeds ends when its last rank does (the launcher's poll adds up to a second). In the test session the ranks,
like every Python process it starts, are forked by a warm zygote where one matches them (tests/zygote.py). The tests
about the launcher itself (signals to the ranks, a dead or hung rank, Slurm, the demo, two nodes, torchrun) use the
real launchers.

    python tests/ranks.py --ranks N --port P SCRIPT [ARGS...]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time


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
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    a = parser.parse_args()
    commands = [[a.script, f"--local_rank={r}", *a.args] for r in range(a.ranks)]
    environments = [rank_env(r, a.ranks, a.port) for r in range(a.ranks)]
    processes = [
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

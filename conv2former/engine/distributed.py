"""Where this process sits: rank variables from the launcher (or a one-rank default), free ports, cross-rank sync."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from typing import List, Optional, Tuple

import torch.distributed as dist


def free_port() -> int:
    """A TCP port free on this host right now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """Without a launcher (plain ``python launch/...``) run as rank 0 of 1 on a free local port."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def route_interface(address: str) -> Optional[str]:
    """The name of this host's network interface whose address the kernel would send from to reach ``address``."""
    import psutil

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((socket.gethostbyname(address), 9))  # UDP connect: a route lookup, no packet is sent
            local = probe.getsockname()[0]
    except OSError:
        return None
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addresses):
            return name
    return None


def pin_gloo_interface(backend: str) -> Optional[str]:
    """gloo binds each rank to the address its host name resolves to, which on many machines (containers, network
    namespaces, hosts whose name maps to 127.0.1.1) is not one the other nodes can reach, and the job then hangs in
    its first collective. Unless GLOO_SOCKET_IFNAME is set, use the interface that routes to MASTER_ADDR: the one
    the rendezvous already reaches. Returns the interface chosen, or None when nothing was changed."""
    if backend != "gloo" or os.environ.get("GLOO_SOCKET_IFNAME") or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return None
    name = route_interface(os.environ.get("MASTER_ADDR", "127.0.0.1"))
    if name:
        os.environ["GLOO_SOCKET_IFNAME"] = name
    return name


def world_from_env() -> Tuple[int, int, int]:
    """(rank, world size, local rank) as the launcher (deepspeed, torchrun, srun wrapper) set them."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


# What a failed collective says (gloo raises a plain RuntimeError; NCCL and the store raise torch's DistError types).
COLLECTIVE_FAILURES = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "gloo", "NCCL")


def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another rank died or hung (not a bug of this rank)."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err) for text in COLLECTIVE_FAILURES)


def _rendezvous_store(wait_s: float) -> "dist.TCPStore":
    """A client of the rendezvous store at MASTER_ADDR:MASTER_PORT (under the deepspeed launcher it lives in rank 0's
    process; under torchrun in the agent)."""
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=wait_s),
        wait_for_workers=False,
    )


def _key(kind: str, rank: int) -> str:
    return f"c2f/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{kind}/{rank}"


def announce_fault(rank: int, status: str) -> None:
    """Before a rank leaves for a fault of its own (it printed the line), tell the others through the store, so that
    their roll call does not report it as a lost rank. Best effort: the store may be gone."""
    try:
        _rendezvous_store(2.0).set(_key("fault", rank), status)
    except (RuntimeError, KeyError, ValueError):
        pass


def roll_call(rank: int, world_size: int, wait_s: float = 5.0) -> Optional[Tuple[List[int], List[int]]]:
    """After a failed collective: (the ranks that do not answer within ``wait_s``, those of them that announced a
    fault of their own), each surviving rank answering by writing a key into the rendezvous store; None when that
    store itself is gone."""
    try:
        store = _rendezvous_store(wait_s)
        store.set(_key("alive", rank), "1")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(world_size) if not store.check([_key("alive", r)])]
            if not missing or time.monotonic() > deadline:
                return missing, [r for r in missing if store.check([_key("fault", r)])]
            time.sleep(0.2)
    except (RuntimeError, KeyError, ValueError):  # store unreachable (DistStoreError is a RuntimeError)
        return None


def lost_ranks_line(rank: int, world_size: int, step: int, err: BaseException, timeout_min: float) -> str:
    """The one line naming the rank(s) that failed, printed by the lowest surviving rank; '' on the others, and when
    the lost ranks left for a fault they reported themselves."""
    seen = (str(err).strip().splitlines() or [""])[0]
    seen = seen.split("] ", 1)[-1][:160]  # without gloo's source-file prefix
    answer = roll_call(rank, world_size)
    if answer is None:  # the store in rank 0's process is gone: rank 0 died or left
        who, printer = "rank 0 (which hosts the rendezvous store) is gone (see its own error line, if any)", 1
    elif answer[0] and set(answer[1]) == set(answer[0]):
        return ""  # they left for a fault of their own and printed why
    elif answer[0]:
        missing = answer[0]
        who = f"rank {','.join(map(str, missing))} stopped answering (dead, or hung past the collective timeout)"
        printer = min(r for r in range(world_size) if r not in missing)
    else:
        who, printer = "a collective failed although every rank still answers", 0
    if rank != printer:
        return ""
    return (
        f"{who} at step {step}; rank {rank} saw: {seen}; collective timeout {timeout_min:g} min "
        "(--set deepspeed.timeout_minutes); relaunch the same command to resume from the newest complete checkpoint"
    )


def set_collective_timeout(minutes: float) -> timedelta:
    """Make ``minutes`` the timeout of every process group of this process, DeepSpeed's included.

    DeepSpeed passes the timeout of ``init_distributed`` to the world group only; the groups it creates afterwards
    (ZeRO's data-parallel group) come from ``torch.distributed.new_group(ranks)`` with no timeout, which takes torch's
    module default (30 min for gloo, 10 for NCCL). So the defaults are set too, before any group exists. On NCCL the
    enforcement is torch's own watchdog (TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default)."""
    from torch.distributed import distributed_c10d

    timeout = timedelta(minutes=minutes)
    distributed_c10d.default_pg_timeout = timeout
    if hasattr(distributed_c10d, "default_pg_nccl_timeout"):
        distributed_c10d.default_pg_nccl_timeout = timeout
    return timeout

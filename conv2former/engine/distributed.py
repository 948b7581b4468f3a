"""Process setup, written once for every stage: where this process sits (rank variables from the launcher, or a
one-rank default), its device, and joining the process group (backend, gloo interface, collective timeout). What
a failed collective means is conv2former/engine/lost_ranks.py."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, List, Optional, Tuple

import torch

from conv2former.errors import UserError


def deepspeed_command(script: str, *args: str, ranks: int = 2, port: Optional[int] = None) -> List[str]:
    """The command line that runs ``script`` on ``ranks`` local ranks under the deepspeed launcher of this Python
    (``python -m deepspeed.launcher.runner``: what the ``deepspeed`` script runs, found wherever deepspeed is importable,
    a ``pip --target`` directory on PYTHONPATH included), on a free rendezvous port unless ``port`` is given (the demo,
    the benchmarks and the tests)."""
    port = free_port() if port is None else port
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"]
    return [*launcher, "--num_gpus", str(ranks), "--master_port", str(port), script, *args]


def python_path(*first: str) -> str:
    """A PYTHONPATH with ``first`` ahead of the environment's own entries (extended, never replaced: a ``pip --target``
    install on PYTHONPATH stays importable in the child)."""
    entries = [*first, *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    return os.pathsep.join(dict.fromkeys(e for e in entries if e))


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


@dataclass(frozen=True)
class Process:
    """This process's place in the job: its ranks and its device (the GPU of its local rank, else the CPU)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def backend(self) -> str:
        return "nccl" if self.gpu else "gloo"


def make_deterministic() -> None:
    """The same bits run to run (``deterministic: true``): cuDNN's deterministic kernels and no benchmark search,
    PyTorch's deterministic algorithms (a warning, not an error, for an op that has none: our evaluator's
    ``index_add_`` of whole counts is exact in any order), cuBLAS with a fixed workspace. Call before any CUDA work."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def cuda_index(local_rank: int, visible: int) -> int:
    """Which of the ``visible`` GPUs this process sees is its own: its local rank where each rank sees every GPU of
    the node (deepspeed, torchrun, srun without binding), the only one where it sees one (Slurm's
    ``--gpus-per-task=1`` and sites that bind a GPU to each task set CUDA_VISIBLE_DEVICES per rank). A one-line
    ``UserError`` where neither holds."""
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    shown = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    raise UserError(
        f"local rank {local_rank} sees {visible} GPUs (CUDA_VISIBLE_DEVICES={shown}): start at most {visible} ranks "
        "per node, or bind one GPU to each rank (srun --gpus-per-task=1)"
    )


def this_process() -> Process:
    """Where this process sits, from the launcher's variables (a one-rank job without one), with its GPU made the
    current device (so that NCCL collectives and DALI run on the rank's own GPU, not all on GPU 0)."""
    single_process_env()
    rank, world_size, local_rank = world_from_env()
    gpu = torch.cuda.is_available()
    device = torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count())) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    return Process(rank, world_size, local_rank, device)


# On NCCL a failed or timed-out collective is handled by torch's watchdog thread, not in Python (docs/training.md "A
# dead or hung rank"): it tears the process down (SIGABRT) after the collective timeout, or at once when NCCL reports
# the peer's connection lost. That is torch's default and kept: after an NCCL abort the CUDA stream may never finish,
# so no Python code could safely take a roll call. What the engine adds is the flight recorder: each rank's last
# collectives dumped on a timeout, for torch.distributed.flight_recorder.fr_trace to name the rank that did not join.
NCCL_FAULT_SETTINGS = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",  # torch's default: tear the process down (no NCCL clean-up)
    "TORCH_FR_BUFFER_SIZE": "2000",  # the flight recorder: the last 2000 collectives of each rank (torch >= 2.14's name)
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",  # ... written out when a collective times out
}


DEPRECATED_NAMES = {"TORCH_FR_BUFFER_SIZE": "TORCH_NCCL_TRACE_BUFFER_SIZE"}  # torch still reads the old name


def nccl_fault_settings(trace_dir: str) -> Dict[str, str]:
    """Set (unless already set) the NCCL fault settings above, the flight recorder dumping into ``trace_dir``
    (``rank_<N>`` files); returns what was set. Must run before the process group starts."""
    wanted = {**NCCL_FAULT_SETTINGS, "TORCH_FR_DUMP_TEMP_FILE": os.path.join(trace_dir, "rank_")}
    chosen = {
        key: value
        for key, value in wanted.items()
        if key not in os.environ and DEPRECATED_NAMES.get(key, key) not in os.environ  # a user's old name wins too
    }
    if "TORCH_FR_DUMP_TEMP_FILE" in chosen:
        os.makedirs(trace_dir, exist_ok=True)
    os.environ.update(chosen)
    return chosen


def join_group(process: Process, timeout_minutes: Optional[float] = None, trace_dir: Optional[str] = None) -> None:
    """Start the process group through DeepSpeed: NCCL on GPU (its fault settings, the flight recorder dumping into
    ``trace_dir``), gloo on CPU pinned to the interface that reaches MASTER_ADDR (across nodes), every group's
    collectives bounded by ``timeout_minutes`` (a lost rank ends the run)."""
    import deepspeed

    if process.backend == "nccl" and trace_dir is not None:
        nccl_fault_settings(trace_dir)
    pin_gloo_interface(process.backend)
    timeout = set_collective_timeout(timeout_minutes) if timeout_minutes is not None else None
    kwargs = {"timeout": timeout} if timeout is not None else {}
    deepspeed.init_distributed(dist_backend=process.backend, verbose=False, **kwargs)
    if process.backend == "gloo":
        release_shared_memory_names()


SHM_ALLREDUCE_BUFFER = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


def release_shared_memory_names() -> None:
    """Remove the name of this rank's shared-memory allreduce buffer once every rank has mapped it.

    DeepSpeed's CPU allreduce (its shm comm op, where all ranks are on one host) creates a 69 MB buffer per rank in
    /dev/shm, named by MASTER_ADDR, MASTER_PORT and the rank, and never removes it (DeepSpeed 0.19: no shm_unlink
    after ``shm_initialize``): each CPU run on a new port left its ranks' buffers in RAM until the host rebooted
    (estimated for the test suite's ~120 launches: ~16 GB; 17 GB were found on a 24 GB test machine), a run of one
    rank too. ``init_distributed`` returns once this rank has
    mapped every other rank's buffer, so after a barrier (every rank has returned) each rank removes its own name;
    the mappings stay valid and the memory is freed when the last rank ends, however it ends."""
    import torch.distributed as dist

    path = SHM_ALLREDUCE_BUFFER.format(
        uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""), port=os.environ.get("MASTER_PORT", ""),
        rank=dist.get_rank(),
    )  # fmt: skip
    if dist.get_world_size() > 1:  # (one rank maps its own buffer too: nothing to wait for)
        dist.barrier()
    try:
        os.unlink(path)
    except FileNotFoundError:  # (ranks on several hosts: DeepSpeed made none)
        pass


def gather(obj: Any) -> List[Any]:
    """``obj`` from every rank, in rank order (``[obj]`` without a process group): the one gather of the engine."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def first_failure(error: Optional[str]) -> Optional[Tuple[int, str]]:
    """(rank, error) of the first rank whose ``error`` is set, on every rank; None when none is."""
    return next(((rank, e) for rank, e in enumerate(gather(error)) if e), None)

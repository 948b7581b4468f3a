"""The engine inside the pytest process, on one rank (world size 1), on the real DeepSpeed engine and the real loaders:
how single-rank behaviours of the loop are tested in seconds, without a launcher (tests/test_single_rank.py,
tests/test_run_resolution.py). Multi-rank behaviour stays in the launched end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Iterator, List

from conv2former import depthwise

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def single_rank() -> Iterator[None]:
    """A one-rank run in this process, left as found: no process group, no depthwise chooser, the default
    handlers of SIGTERM/SIGUSR1 (the preemption handlers a run installs) and none of the launcher's variables."""
    import deepspeed
    import torch.distributed as dist

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    saved = {k: os.environ.get(k) for k in LAUNCHER_VARIABLES}
    for key in LAUNCHER_VARIABLES:  # (this_process() then sets a free port of its own)
        os.environ.pop(key, None)
    try:
        yield
    finally:
        if dist.is_initialized():
            deepspeed.comm.destroy_process_group()
        depthwise.use_chooser(None)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def pretrain_config(data: str, output: str, *flags: str):  # -> TrainConfig
    """The config ``launch/pretrain.py`` resolves for these flags (the demo variant at 32 px by default)."""
    from launch.pretrain import configure

    argv: List[str] = ["--variant", "demo", "--image-size", "32", "--data", data, "--output", output, *flags]
    return configure(argv)[1]

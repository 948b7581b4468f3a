"""Run by tests/test_remote.py as ``python concurrent_open.py ROOT WORKER WORKERS CACHE...``: open a remote split and
fetch every shard into each cache folder in turn, every worker starting each round together (a barrier of marker
files beside the cache), printing one JSON line per round."""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time


def barrier(cache: str, worker: int, workers: int, timeout: float = 120.0) -> None:
    open(f"{cache}.ready-{worker}", "w").close()
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(f"{cache}.ready-{w}") for w in range(workers)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other workers did not reach round {cache}")
        time.sleep(0.001)


def main(root: str, worker: int, workers: int, caches: list) -> None:
    faulthandler.dump_traceback_later(240, exit=True)  # a hang shows every thread's stack to the test, then ends
    from conv2former.data.shards import open_split

    for cache in caches:
        barrier(cache, worker, workers)
        try:
            shards = open_split(root, "train", cache)
            failed = shards.cache.fetch([s.wanted() for s in shards.shards])
            shards.cache.close()
            result = "ok" if not failed else f"failed: {failed}"
        except Exception as err:  # noqa: BLE001 - reported to the test
            result = f"{type(err).__name__}: {err}"
        print(json.dumps({"cache": cache, "result": result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])

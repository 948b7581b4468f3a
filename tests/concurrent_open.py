"""Run by tests/test_remote.py in processes of their own (``spawn``: a forked child would inherit s3fs's event loop
thread mid-call): open a remote split and fetch every shard, once per cache folder, all processes starting each round
together at a barrier."""

from __future__ import annotations


def open_and_fetch_rounds(root: str, caches: list, barrier, results) -> None:
    from conv2former.data.shards import open_split

    for cache in caches:
        barrier.wait(timeout=120)
        try:
            shards = open_split(root, "train", cache)
            failed = shards.cache.fetch([s.wanted() for s in shards.shards])
            shards.cache.close()
            results.put((cache, "ok" if not failed else f"failed: {failed}"))
        except BaseException as err:  # noqa: BLE001 - reported to the test
            results.put((cache, f"{type(err).__name__}: {err}"))

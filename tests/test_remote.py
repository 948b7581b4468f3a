"""Training straight from an object store: moto's S3 server on loopback, the demo shards uploaded to it. Each rank
fetches only its shards into a node-local cache its node's ranks share; the batches equal a local root's."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch
from moto_s3 import moto_s3

from conv2former.config import DataConfig
from conv2former.data.loader import build_loader
from conv2former.data.remote import LOCK_SUFFIX, PARTIAL
from conv2former.data.shards import open_split
from conv2former.errors import UserError
from conv2former.units import parse_bytes

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def s3(demo_root):
    """A moto S3 server on 127.0.0.1 holding the demo "1k" shards at s3://c2f-remote/in1k; the environment points
    s3fs (and every process started from here) at it. Yields the local root the shards came from."""
    with moto_s3("c2f-remote"):  # a bucket no other test uses
        local = demo_root / "in1k"
        fsspec.filesystem("s3").put(str(local), "c2f-remote/in1k", recursive=True)
        yield local


def cfg_for(root, cache=None, **kwargs) -> DataConfig:
    base = dict(root=str(root), backend="dali-cpu", image_size=32, batch_size=16, workers=1, shuffle_buffer=64,
                cache_dir=str(cache) if cache else None)  # fmt: skip
    base.update(kwargs)
    return DataConfig(**base)


def batches(loader, epochs):
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        out += [(x.clone(), y.clone()) for x, y in loader]
    return out


def cached_tars(cache: Path):
    return sorted(p.name for p in cache.iterdir() if p.name.endswith(".tar"))


def test_a_rank_fetches_only_its_shards_and_reads_what_a_local_root_gives(s3, tmp_path):
    local = build_loader(cfg_for(s3), "train", rank=1, world_size=4)
    remote = build_loader(cfg_for("s3://c2f-remote/in1k", tmp_path / "cache"), "train", rank=1, world_size=4)
    assert cached_tars(tmp_path / "cache") == []  # opening fetched the indexes only
    want, got = batches(local, [0, 1]), batches(remote, [0, 1])
    assert len(want) == len(got) == 2 * len(local)
    for (x, y), (rx, ry) in zip(want, got):
        assert torch.equal(y, ry) and torch.equal(x, rx)
    # exactly the shards the dealing rule gives this rank in epochs 0, 1 (and 2, fetched in the background)
    dealt = {shard.tar for e in (0, 1, 2) for shard, _, _ in remote._quiet_slices(e)}
    remote.shards.cache._pool.shutdown(wait=True)  # let the background fetch of epoch 2 finish
    assert {str(p) for p in (tmp_path / "cache").glob("*.tar")} == dealt
    stats = remote.fetch_stats()
    indexes = len(list((tmp_path / "cache").glob("*.idx")))
    assert stats["files"] == len(dealt) + indexes and stats["waited"] > 0
    assert stats["bytes"] == sum(
        p.stat().st_size for p in (tmp_path / "cache").glob("*") if p.suffix in (".tar", ".idx")
    )
    assert not list((tmp_path / "cache").glob(f"*{PARTIAL}*"))


def test_a_cache_limit_below_the_split_evicts_and_fetches_again(s3, tmp_path):
    cfg = cfg_for("s3://c2f-remote/in1k", tmp_path / "cache")
    probe = build_loader(cfg, "train", rank=0, world_size=2)
    share = max(sum(s.size for s, _, _ in probe._quiet_slices(e)) for e in (0, 1, 2))
    split = sum(s.size for s in probe.shards.shards)
    indexes = sum(p.stat().st_size for p in (tmp_path / "cache").glob("*.idx"))
    assert share < split
    limit = indexes + share + share // 4
    remote = build_loader(dataclasses.replace(cfg, cache_limit=str(limit)), "train", rank=0, world_size=2)
    local = build_loader(cfg_for(s3), "train", rank=0, world_size=2)
    got, want = batches(remote, [0, 1, 2]), batches(local, [0, 1, 2])
    assert len(got) == len(want) and all(
        torch.equal(x, rx) and torch.equal(y, ry) for (x, y), (rx, ry) in zip(want, got)
    )
    assert remote.fetch_stats()["evicted"] > 0  # epochs 1 and 2 fetched again what the limit made it drop
    files = [p for p in (tmp_path / "cache").iterdir() if p.is_file() and not p.name.endswith(LOCK_SUFFIX)]
    assert sum(p.stat().st_size for p in files) <= limit


def test_a_limit_below_one_epoch_is_a_one_line_error(s3, tmp_path):
    with pytest.raises(UserError, match=r"data.cache_limit 10KB is smaller than the indexes of s3://c2f-remote/in1k"):
        build_loader(cfg_for("s3://c2f-remote/in1k", tmp_path / "cache", cache_limit="10KB"), "train", 0, 2)
    indexes = sum(p.stat().st_size for p in (s3 / "train").glob("*.idx"))
    with pytest.raises(UserError, match=r"data.cache_limit .* is smaller than one epoch .* set it to at least"):
        build_loader(cfg_for("s3://c2f-remote/in1k", tmp_path / "c2", cache_limit=indexes + 10_000), "train", 0, 2)
    assert parse_bytes("200GB") == 200 * 10**9 and parse_bytes("1.5KiB") == 1536 and parse_bytes(None) is None
    with pytest.raises(UserError, match="is not a size"):
        parse_bytes("lots")


OPEN_AND_FETCH = (
    "import sys; from conv2former.data.shards import open_split; shards = open_split(sys.argv[1], 'train', sys.argv[2]); "
    "failed = shards.cache.fetch([s.wanted() for s in shards.shards]); print('ok' if not failed else failed)"
)


def test_two_processes_opening_the_same_split_at_once_never_fail(s3, tmp_path):
    """Fresh processes (as two ranks of a node are), started together on an empty cache, 5 rounds."""
    for round_ in range(5):
        cache = tmp_path / f"cache{round_}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", OPEN_AND_FETCH, "s3://c2f-remote/in1k", str(cache)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=str(REPO),
            )  # fmt: skip
            for _ in (0, 1)
        ]
        results = [p.communicate(timeout=120) for p in procs]
        assert [out.strip().splitlines()[-1] if out.strip() else err[-500:] for out, err in results] == ["ok", "ok"]
        names = json.loads((s3 / "_info.json").read_text())["splits"]["train"]["filenames"]
        assert len(cached_tars(cache)) == len(names)
        assert not list(cache.glob(f"*{PARTIAL}*"))


def test_remote_failures_are_one_line_errors(s3, tmp_path):
    with pytest.raises(UserError, match="data root not found: s3://c2f-remote/nothing"):
        open_split("s3://c2f-remote/nothing", "train", str(tmp_path))
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put(str(s3), "c2f-remote/broken", recursive=True)
    victim = json.loads((s3 / "_info.json").read_text())["splits"]["train"]["filenames"][0]
    fs.rm(f"c2f-remote/broken/{victim}")
    with pytest.raises(UserError, match=f"shard listed in _info.json is missing: s3://c2f-remote/broken/{victim}"):
        open_split("s3://c2f-remote/broken", "train", str(tmp_path))
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_no_credentials_is_one_line_naming_the_url(s3, tmp_path):
    """A fresh process without credentials (and without the instance metadata service: nothing off loopback)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", DS_ACCELERATOR="cpu")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "pretrain.py"), "--variant", "demo", "--data", "s3://c2f-remote/in1k",
         "--output", str(tmp_path / "run"), "--dry-run"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "no credentials for s3://c2f-remote/in1k (s3:" in line and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_two_ranks_training_from_s3_end_bit_for_bit_like_a_local_root(s3, tmp_path):
    """The real launcher, 2 CPU ranks on one "node" sharing one cache, 2 epochs with evaluation, from s3:// and from
    the local copy of the same shards: the same summary and the same exported weights."""
    from test_pretrain import FAST, exports_equal, run_pretrain

    common = [*FAST, "--epochs", "2", "--max-steps", "17", "--save-every", "10"]  # epoch 0 is 15 steps
    local = run_pretrain(*common, "--data", str(s3), "--output", str(tmp_path / "local"))
    remote = run_pretrain(*common, "--data", "s3://c2f-remote/in1k", "--output", str(tmp_path / "s3"), "--set",
                          f"data.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    assert remote["step"] == local["step"] == 17 and remote["loss"] == local["loss"]
    assert remote["eval"] == local["eval"]
    assert exports_equal(tmp_path / "local", tmp_path / "s3")
    fetched = remote["data_fetch"]  # rank 0's: its own shards of the 2 epochs, some fetched by rank 1 already
    assert fetched["files"] + fetched["hits"] > 0 and local["data_fetch"] == {}
    cache = tmp_path / "cache"
    assert not list(cache.glob(f"*{PARTIAL}*"))

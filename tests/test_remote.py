"""Training straight from an object store: moto's S3 server on loopback, the demo shards uploaded to it. Each rank
fetches only its shards into a node-local cache its node's ranks share; the batches equal a local root's."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
import torch
from conftest import summary_from
from moto_s3 import moto_s3

from conv2former.config import DataConfig
from conv2former.data.loader import build_loader
from conv2former.data.remote import LOCK_SUFFIX, PARTIAL
from conv2former.data.shards import open_split
from conv2former.engine.distributed import python_path
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert parse_bytes("200GB", "k") == 200 * 10**9 and parse_bytes("1.5KiB", "k") == 1536
    assert parse_bytes(None, "k") is None
    with pytest.raises(UserError, match="is not a size"):
        parse_bytes("lots", "data.cache_limit")


@pytest.mark.slow
def test_two_processes_opening_the_same_split_at_once_never_fail(s3, tmp_path):
    """Two fresh processes (as two ranks of a node are) open the split and fetch it into an empty cache at the same
    moment, 20 times (a new cache each round): no failure, every shard in place, no temporary file left."""
    caches = [str(tmp_path / f"cache{round_}") for round_ in range(20)]
    worker = str(Path(__file__).parent / "concurrent_open.py")
    procs = [subprocess.Popen([sys.executable, worker, "s3://c2f-remote/in1k", str(w), "2", *caches], cwd=str(REPO),
                              env=dict(os.environ, PYTHONPATH=python_path(str(REPO))), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for w in (0, 1)]  # fmt: skip
    outputs = [proc.communicate(timeout=400) for proc in procs]  # (a worker ends itself after 240 s, with stacks)
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        results = [json.loads(line)["result"] for line in out.splitlines() if line.startswith("{")]
        assert results == ["ok"] * len(caches), err[-3000:]
    names = json.loads((s3 / "_info.json").read_text())["splits"]["train"]["filenames"]
    for cache in map(Path, caches):
        assert len(cached_tars(cache)) == len(names) and not list(cache.glob(f"*{PARTIAL}*"))


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


@pytest.mark.slow
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


COMMON = ["--epochs", "2", "--max-steps", "17", "--save-every", "10"]  # epoch 0 is 15 steps


@pytest.fixture
def local_reference(s3, reference_runs):
    """The session's uninterrupted 2-rank run from the local copy of the shards, to a local folder: 2 epochs with
    evaluation, 17 steps, checkpoints at 10, 15 and 17."""
    from test_pretrain import FAST, PRETRAIN

    return reference_runs.get(PRETRAIN, *FAST, *COMMON, "--data", str(s3))


@pytest.mark.slow
def test_two_ranks_training_from_s3_end_bit_for_bit_like_a_local_root(s3, local_reference, tmp_path):
    """2 CPU ranks on one "node" sharing one cache, 2 epochs with evaluation, from s3:// and from
    the local copy of the same shards: the same summary and the same exported weights."""
    from test_pretrain import FAST, exports_equal, run_pretrain

    ref, local = local_reference
    remote = run_pretrain(*FAST, *COMMON, "--data", "s3://c2f-remote/in1k", "--output", str(tmp_path / "s3"),
                          "--set", f"data.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    assert remote["step"] == local["step"] == 17 and remote["loss"] == local["loss"]
    assert remote["eval"] == local["eval"]
    assert exports_equal(ref, tmp_path / "s3")
    fetched = remote["data_fetch"]  # rank 0's: its own shards of the 2 epochs, some fetched by rank 1 already
    assert fetched["files"] + fetched["hits"] > 0 and local["data_fetch"] == {}
    cache = tmp_path / "cache"
    assert not list(cache.glob(f"*{PARTIAL}*"))


def remote_complete(fs, run: str, tag: str) -> bool:
    fs.invalidate_cache()
    return fs.exists(f"{run}/checkpoints/{tag}/complete")


@pytest.mark.slow
def test_output_to_s3_killed_then_relaunched_on_a_fresh_node_resumes_bit_for_bit(s3, local_reference, tmp_path):
    """Data and output in the bucket, 2 ranks: killed (kill -9, every rank and the launcher) once checkpoint 10 is
    complete remotely, relaunched with an empty staging folder (a fresh node): it resumes from the bucket and ends
    bit for bit like the uninterrupted local run; the bucket holds keep_last=2 tags, the export, the whole log,
    TensorBoard files and the summary. Then the remote export is fine-tuned from and evaluated directly."""
    from test_pretrain import FAST, deepspeed_cmd, env, exports_equal

    ref, want = local_reference
    run, url = "c2f-remote/runs/r1", "s3://c2f-remote/runs/r1"
    args = [*FAST, *COMMON, "--data", "s3://c2f-remote/in1k", "--output", url, "--set", "checkpoint.keep_last=2",
            "--set", f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    staging = tmp_path / "staging-node-a"
    first_log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(deepspeed_cmd(*args, "--set", f"checkpoint.staging_dir={staging}"), env=env(),
                             stdout=first_log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not remote_complete(fs, run, "step000000010"):
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    first_log.close()
    tail = (tmp_path / "first.log").read_text(errors="replace")[-3000:]
    assert remote_complete(fs, run, "step000000010") and not fs.exists(f"{run}/export"), tail
    shutil.rmtree(staging)  # the node is gone
    exported = subprocess.run(
        [sys.executable, str(REPO / "launch" / "export.py"), url, "--staging-dir", str(tmp_path / "export-staging")],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip  (the stopped run's newest checkpoint, exported in the bucket)
    assert exported.returncode == 0 and f"uploaded to {url}/export" in exported.stdout, exported.stderr[-2000:]
    assert fs.exists(f"{run}/export/model.safetensors") and fs.exists(f"{run}/export/config.json")
    proc = subprocess.run(deepspeed_cmd(*args, "--set", f"checkpoint.staging_dir={tmp_path / 'staging-node-b'}"),
                          env=env(), capture_output=True, text=True, errors="replace", timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"resumed from step0000000(10|15)", proc.stdout)
    summary = summary_from(proc.stdout)
    assert summary["step"] == 17 and summary["loss"] == want["loss"] and summary["eval"] == want["eval"]
    assert summary["export"] == f"{url}/export" and summary["upload"]["uploaded"]["files"] > 0
    fs.invalidate_cache()
    got = tmp_path / "downloaded"
    fs.get(f"{run}/export", str(got / "export"), recursive=True)
    assert exports_equal(ref, got)
    tags = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{run}/checkpoints") if "/step" in p)
    assert tags == ["step000000015", "step000000017"] and fs.cat(f"{run}/checkpoints/latest").decode() == tags[-1]
    assert all(remote_complete(fs, run, t) for t in tags)
    log = [json.loads(x) for x in fs.cat(f"{run}/log.jsonl").decode().splitlines()]
    steps = {r["step"] for r in log if r["kind"] == "train"}
    assert {1, 10, 17} <= steps  # the first node's records came back with the staging folder
    assert json.loads(fs.cat(f"{run}/summary.json"))["status"] == "finished" and fs.find(f"{run}/tb")
    assert_remote_export_is_read_directly(url, s3, want, tmp_path)


def assert_remote_export_is_read_directly(url: str, data: Path, want: dict, tmp_path: Path) -> None:
    """launch/evaluate.py --weights s3://.../export --ema gives the run's EMA accuracy; launch/finetune.py
    --pretrained s3://.../export (--max-steps 0: the transferred model) exports the same weights."""
    from test_pretrain import env, exports_equal

    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "evaluate.py"), "--variant", "demo", "--weights", f"{url}/export",
         "--data", str(data), "--resolution", "32", "--ema", "--batch", "50", "--json", str(tmp_path / "eval.json")],
        env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["top1"] == pytest.approx(want["eval"]["ema_top1"], abs=1e-9)
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "finetune.py"), "--variant", "demo", "--pretrained", f"{url}/export",
         "--data", str(data), "--output", str(tmp_path / "ft"), "--image-size", "32", "--max-steps", "0"],
        env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert exports_equal(tmp_path / "downloaded", tmp_path / "ft")


def put(fs, path: str, data: bytes = b"x") -> None:
    fs.pipe_file(path, data)


def test_a_fresh_staging_folder_takes_the_newest_complete_remote_checkpoint_and_the_run_files(tmp_path):
    """RunOutput on memory://: the remote is the truth at start (its newest complete tag comes down, a local tag it
    does not have complete is dropped, log.jsonl and tb/ come down); uploads send only what changed, the marker last
    and keep keep_last tags remotely."""
    from conv2former.engine.run_output import RunOutput

    fs = fsspec.filesystem("memory")
    root = "/runs/unit"
    put(fs, f"{root}/checkpoints/step000000010/mp_rank_00_model_states.pt", b"ten")
    put(fs, f"{root}/checkpoints/step000000010/complete", b'{"step": 10, "world_size": 1}')
    put(fs, f"{root}/checkpoints/step000000020/mp_rank_00_model_states.pt", b"twenty, never marked complete")
    put(fs, f"{root}/log.jsonl", b'{"kind": "train", "step": 1}\n')
    put(fs, f"{root}/tb/events.out.tfevents.1", b"events")
    output = RunOutput(f"memory://{root}", str(tmp_path / "staging"), rank=0, local_rank=0)
    stale = Path(output.local) / "checkpoints" / "step000000030"
    stale.mkdir(parents=True)
    (stale / "complete").write_text("{}")  # complete here, never uploaded: not part of the remote run
    output.restore()
    ckpts = Path(output.local) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step000000010"]
    assert (ckpts / "step000000010" / "mp_rank_00_model_states.pt").read_bytes() == b"ten"
    assert (ckpts / "latest").read_text() == "step000000010"
    assert (Path(output.local) / "tb" / "events.out.tfevents.1").read_bytes() == b"events"
    assert output.push_files() is None and output.stats["files"] == 0  # what came down is not sent back
    with open(Path(output.local) / "log.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 2}\n')
    assert output.push_files() is None and output.stats["files"] == 1
    assert fs.cat(f"{root}/log.jsonl").decode().count("\n") == 2
    tag = ckpts / "step000000040"
    tag.mkdir()
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"forty")
    (tag / "complete").write_text('{"step": 40, "world_size": 1}')
    (ckpts / "latest").write_text("step000000040")
    output.push_checkpoint("step000000040", keep_last=1)
    assert output.remote_complete_tags() == ["step000000040"]
    assert sorted(fs.ls(f"{root}/checkpoints", detail=False)) == [
        f"{root}/checkpoints/latest",
        f"{root}/checkpoints/step000000040",
    ]
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step000000040"]
    fs.rm(root, recursive=True)


def test_an_output_bucket_that_does_not_exist_is_a_one_line_error_at_start(s3, tmp_path):
    from conv2former.engine.run_output import RunOutput

    output = RunOutput("s3://c2f-no-such-bucket/run", str(tmp_path), rank=0, local_rank=0)
    with pytest.raises(UserError, match=r"--output s3://c2f-no-such-bucket/run is not writable \(.*\): create the"):
        output.restore()
